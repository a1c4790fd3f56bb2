// Dequantized weight panels in bf16, shared by the two bf16 GEMMs for prefill-sized M:
// the AMX tile GEMM (amx.cpp) and the AVX512-BF16 vdpbf16ps GEMM (avx512_bf16.cpp). Both
// multiply bf16 x by the weights dequantized once per call:
//     y[m, n] = bf16( sum_k x[m, k] * w[n, k] ),  w[n, k] = bf16( s*c + b )
// (the contract at the top of amx.cpp), and both read the weights in the same layout.
//
// Layout: a "tile" is 16 outputs x 32 inputs (one step): 16 rows p, row p holding for each
// of the 16 outputs the pair (k = 32s + 2p, 32s + 2p + 1) as two bf16 in one dword. That
// is tdpbf16ps's VNNI operand and, row by row, vdpbf16ps's: one 64-byte row is one zmm of
// 16 outputs' pairs. A plane byte holds exactly such a pair (low nibble k even, high nibble
// k odd), so a tile is a 16 x 16 byte transpose followed by a per-byte widening.
//
// Include only from units built with AVX-512 (F, BW, DQ, VL) and AVX512-BF16; everything
// here has internal linkage, so units built with different flags keep their own copies.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "x86_common.h"

namespace bitswitch {
namespace cpu {
namespace {

// Tile geometry: 16 rows of 64 bytes (AMX palette 1's maximum).
constexpr int kTileRows = 16;
constexpr int kTileBytes = 64;
constexpr int kTileK = kTileBytes / 2;           // bf16 inputs per x-tile row: one step
constexpr int kTileElems = kTileRows * kTileK;   // 512 bf16 (1 KB) per x or code tile
constexpr int kBlockN = 2 * kTileRows;          // outputs per block: two 16-output slices
// Tile pairs: the two 16-output slices of a block interleaved per step, so that the
// weights of a block are one sequential stream.
constexpr int64_t kPairElems = 2 * kTileElems;
// Inputs per chunk: the weights of one block for one chunk (32 outputs x 256 inputs, 16 KB)
// stay in L1 while the x rows stream past them.
constexpr int64_t kKC = 256;
constexpr int64_t kKCSteps = kKC / kTileK;

static_assert(fmt::kMinGroupSize % kTileK == 0, "a step never straddles two groups");
static_assert(kKC % fmt::kMaxGroupSize == 0, "a chunk holds whole groups");

inline __m512 load16(const void* p, DType t) {
  switch (t) {
    case DType::kBFloat16:
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(static_cast<const __m256i*>(p))), 16));
    case DType::kFloat16:
      return _mm512_cvtph_ps(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
    default:
      return _mm512_loadu_ps(static_cast<const float*>(p));
  }
}


inline __m512 load16_masked(const void* p, DType t, __mmask16 mask) {
  switch (t) {
    case DType::kBFloat16:
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
    case DType::kFloat16:
      return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p));
    default:
      return _mm512_maskz_loadu_ps(mask, p);
  }
}


// Round to nearest even bf16 (16 lanes) and back.
inline __m256i to_bf16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }
inline __m512 from_bf16(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// rows[i] = the 16 bytes of output row i at this step; out[p] = byte p of every row.
inline void transpose16x16(const __m128i (&rows)[16], __m128i (&out)[16]) {
  __m128i a[16], b[16], c[16];
  for (int i = 0; i < 8; ++i) {  // a[2i + h]: rows 2i, 2i+1 interleaved, bytes 8h .. 8h + 7
    a[2 * i] = _mm_unpacklo_epi8(rows[2 * i], rows[2 * i + 1]);
    a[2 * i + 1] = _mm_unpackhi_epi8(rows[2 * i], rows[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i)  // b[4i + 2h + l]: rows 4i .. 4i+3, bytes 8h + 4l .. + 3
    for (int h = 0; h < 2; ++h) {
      b[4 * i + 2 * h] = _mm_unpacklo_epi16(a[4 * i + h], a[4 * i + 2 + h]);
      b[4 * i + 2 * h + 1] = _mm_unpackhi_epi16(a[4 * i + h], a[4 * i + 2 + h]);
    }
  for (int i = 0; i < 2; ++i)  // c[8i + q]: rows 8i .. 8i+7, bytes 2q, 2q + 1
    for (int q = 0; q < 4; ++q) {
      c[8 * i + 2 * q] = _mm_unpacklo_epi32(b[8 * i + q], b[8 * i + 4 + q]);
      c[8 * i + 2 * q + 1] = _mm_unpackhi_epi32(b[8 * i + q], b[8 * i + 4 + q]);
    }
  for (int q = 0; q < 8; ++q) {
    out[2 * q] = _mm_unpacklo_epi64(c[q], c[8 + q]);
    out[2 * q + 1] = _mm_unpackhi_epi64(c[q], c[8 + q]);
  }
}

// In-place transpose of 16 x 16 floats: v[i] lane j <-> v[j] lane i.
inline void transpose16x16_ps(__m512 (&v)[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4i + c]: lane L holds rows 4i .. 4i+3 of column 4L + c
    u[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {  // a 4 x 4 transpose of the 128-bit lanes of u[c], u[4 + c], ...
    const __m512 x0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88), x1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);
    const __m512 y0 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88), y1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
    v[c] = _mm512_shuffle_f32x4(x0, y0, 0x88);
    v[8 + c] = _mm512_shuffle_f32x4(x0, y0, 0xDD);
    v[4 + c] = _mm512_shuffle_f32x4(x1, y1, 0x88);
    v[12 + c] = _mm512_shuffle_f32x4(x1, y1, 0xDD);
  }
}

// Effective scale and bias of outputs n0 .. n0 + nb - 1 for groups g0 .. g0 + cg - 1 as
// float32 rows over the outputs: sb[2g][j] = s, sb[2g + 1][j] = b (zero past N, so the
// padded outputs dequantize to 0). One output's scales are contiguous, so 16 outputs x 16
// groups are loaded as rows and transposed (a third of the time of scattering them).
template <int BITS>
void dense_affine(const QMatmulArgs& a, int64_t n0, int64_t nb, int64_t g0, int64_t cg, float* sb) {
  const int64_t groups = fmt::groups_per_row(a.k, a.group_size), es = dtype_size(a.scale_dtype);
  const char* scales = static_cast<const char*>(a.scales);
  const char* biases = static_cast<const char*>(a.biases);
  for (int64_t j0 = 0; j0 < nb; j0 += kTileRows) {
    for (int64_t g = 0; g < cg; g += 16) {
      const int64_t ng = imin(16, cg - g);
      const __mmask16 mask = ng == 16 ? __mmask16(0xFFFF) : __mmask16((1u << ng) - 1);
      __m512 sc[16], bi[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t n = n0 + j0 + i;
        if (n >= a.n) {
          sc[i] = bi[i] = _mm512_setzero_ps();
          continue;
        }
        const int64_t at = (n * groups + g0 + g) * es;
        sc[i] = load16_masked(scales + at, a.scale_dtype, mask);
        bi[i] = load16_masked(biases + at, a.scale_dtype, mask);
        if (BITS == fmt::kInt8Bits) {  // fmt::int8_scale / int8_bias, operation for operation
          const __m512 inv_div = _mm512_set1_ps(1.0f / fmt::kResidualDivisor);
          bi[i] = _mm512_sub_ps(bi[i], _mm512_mul_ps(_mm512_mul_ps(sc[i], _mm512_set1_ps(fmt::kResidualCenter)), inv_div));
          sc[i] = _mm512_mul_ps(sc[i], inv_div);
        }
      }
      transpose16x16_ps(sc);
      transpose16x16_ps(bi);
      for (int64_t i = 0; i < ng; ++i) {
        _mm512_storeu_ps(sb + 2 * (g + i) * nb + j0, sc[i]);
        _mm512_storeu_ps(sb + (2 * (g + i) + 1) * nb + j0, bi[i]);
      }
    }
  }
}

// transpose16x16 on four steps at once: each 128-bit lane of rows[i] holds output i's 16
// bytes of one step, and lane L of out[p] the bytes p of the 16 outputs at step L. A
// 512-bit shuffle does the work of four 128-bit ones: 20% (INT4) and 32% (INT8) off the
// dequantization at 3072 x 1024.
inline void transpose16x16_x4(const __m512i (&rows)[16], __m512i (&out)[16]) {
  __m512i a[16], b[16], c[16];
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_unpacklo_epi8(rows[2 * i], rows[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi8(rows[2 * i], rows[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i)
    for (int h = 0; h < 2; ++h) {
      b[4 * i + 2 * h] = _mm512_unpacklo_epi16(a[4 * i + h], a[4 * i + 2 + h]);
      b[4 * i + 2 * h + 1] = _mm512_unpackhi_epi16(a[4 * i + h], a[4 * i + 2 + h]);
    }
  for (int i = 0; i < 2; ++i)
    for (int q = 0; q < 4; ++q) {
      c[8 * i + 2 * q] = _mm512_unpacklo_epi32(b[8 * i + q], b[8 * i + 4 + q]);
      c[8 * i + 2 * q + 1] = _mm512_unpackhi_epi32(b[8 * i + q], b[8 * i + 4 + q]);
    }
  for (int q = 0; q < 8; ++q) {
    out[2 * q] = _mm512_unpacklo_epi64(c[q], c[8 + q]);
    out[2 * q + 1] = _mm512_unpackhi_epi64(c[q], c[8 + q]);
  }
}

// One weight tile row: for 16 outputs (lanes) the bf16 pair (w[k], w[k + 1]) from their
// plane bytes q (and r), w = s*c + b by one float32 FMA, rounded once to bf16.
template <int BITS>
inline __m512i dequant_row(__m128i q, __m128i r, __m512 sv, __m512 bv) {
  // cvtne2ps puts the even inputs' bf16 in words 0..15 and the odd ones' in 16..31.
  const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,  //
                                         23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i vq = _mm512_cvtepu8_epi32(q);
  __m512i e, o;
  if (BITS == fmt::kInt4Bits) {
    e = _mm512_and_si512(vq, _mm512_set1_epi32(0xF));
    o = _mm512_srli_epi32(vq, 4);
  } else {  // c = 16q + r: the low nibbles make the even input's code, the high ones the odd's
    const __m512i vr = _mm512_cvtepu8_epi32(r), hi4 = _mm512_set1_epi32(0xF0);
    e = _mm512_ternarylogic_epi32(hi4, _mm512_slli_epi32(vq, 4), vr, 0xCA);
    o = _mm512_ternarylogic_epi32(hi4, vq, _mm512_srli_epi32(vr, 4), 0xCA);
  }
  const __m512 we = _mm512_fmadd_ps(_mm512_cvtepi32_ps(e), sv, bv);
  const __m512 wo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(o), sv, bv);
  return _mm512_permutexvar_epi16(pairs, (__m512i)_mm512_cvtne2ps_pbh(wo, we));
}

// Where the dequantized tiles of a panel go: [chunk][32-output block][step][2][16][32], so
// that each tile block reads its weights as one sequential stream and the next block's
// follow them.
struct PanelLayout {
  uint16_t* base;
  int64_t steps;   // steps of the panel
  int64_t blocks;  // 32-output blocks of the panel
  // The tile of 16-output slice sl at step s.
  uint16_t* tile(int64_t sl, int64_t s) const {
    const int64_t c = s / kKCSteps, cs = imin(kKCSteps, steps - c * kKCSteps);
    return base + ((c * blocks * kKCSteps + (sl / 2) * cs + s % kKCSteps) * 2 + sl % 2) * kTileElems;
  }
  // The weights of 32-output block j for the chunk starting at step c0.
  const uint16_t* block(int64_t j, int64_t c0) const {
    const int64_t cs = imin(kKCSteps, steps - c0);
    return base + (c0 * blocks + j * cs) * kPairElems;
  }
};

// The weight tiles of 16-output slice sl for the panel's steps, from plane word w0 on;
// rows0[i] (and rows1[i]) point at output i's plane row (rows past N repeat row N - 1; their
// scales are zero). sb: the slice's column of dense_affine's rows (row stride 2 * nb).
template <int BITS>
void dense_dequant(const uint32_t* const (&rows0)[kTileRows], const uint32_t* const (&rows1)[kTileRows], int64_t w0,
                   int64_t G, const float* sb, int64_t nb, const PanelLayout& out, int64_t sl) {
  constexpr int kWordsPerStep = kTileK / fmt::kValuesPerWord;
  const int64_t steps = out.steps;
  int64_t s = 0;
  for (; s + 4 <= steps; s += 4) {  // four steps: one 64-byte line of each plane row
    const int64_t w = w0 + s * kWordsPerStep;
    __m512i in[kTileRows], q[kTileRows], r[kTileRows];
    for (int i = 0; i < kTileRows; ++i) in[i] = _mm512_loadu_si512(rows0[i] + w);
    transpose16x16_x4(in, q);
    if (BITS == fmt::kInt8Bits) {
      for (int i = 0; i < kTileRows; ++i) in[i] = _mm512_loadu_si512(rows1[i] + w);
      transpose16x16_x4(in, r);
    }
    // Spilled once so that each step's 16 bytes are a plain 16-byte load.
    alignas(64) __m128i qb[kTileRows][4], rb[BITS == fmt::kInt8Bits ? kTileRows : 1][4];
    for (int p = 0; p < kTileRows; ++p) {
      _mm512_store_si512(qb[p], q[p]);
      if (BITS == fmt::kInt8Bits) _mm512_store_si512(rb[p], r[p]);
    }
    for (int l = 0; l < 4; ++l) {
      const int64_t g = (s + l) * kTileK / G;
      const __m512 sv = _mm512_loadu_ps(sb + 2 * g * nb), bv = _mm512_loadu_ps(sb + (2 * g + 1) * nb);
      uint16_t* tile = out.tile(sl, s + l);
      for (int p = 0; p < kTileRows; ++p) {
        const __m128i qp = _mm_load_si128(&qb[p][l]);
        const __m128i rp = BITS == fmt::kInt8Bits ? _mm_load_si128(&rb[p][l]) : qp;
        _mm512_store_si512(tile + p * kTileK, dequant_row<BITS>(qp, rp, sv, bv));
      }
    }
  }
  for (; s < steps; ++s) {  // K % 128 != 0: the last one to three steps
    const int64_t g = s * kTileK / G;
    const __m512 sv = _mm512_loadu_ps(sb + 2 * g * nb), bv = _mm512_loadu_ps(sb + (2 * g + 1) * nb);
    const int64_t w = w0 + s * kWordsPerStep;
    __m128i in[kTileRows], q[kTileRows], r[kTileRows];
    for (int i = 0; i < kTileRows; ++i) in[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows0[i] + w));
    transpose16x16(in, q);
    if (BITS == fmt::kInt8Bits) {
      for (int i = 0; i < kTileRows; ++i) in[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows1[i] + w));
      transpose16x16(in, r);
    }
    uint16_t* tile = out.tile(sl, s);
    for (int p = 0; p < kTileRows; ++p) _mm512_store_si512(tile + p * kTileK, dequant_row<BITS>(q[p], r[p], sv, bv));
  }
}

// Dequantizes the nbv (a multiple of kTileRows) outputs from n0 on, inputs [k0, k0 + kl),
// into `out`: their scales and biases first (dense_affine into sb), then each 16-output
// slice's tiles. Rows past N repeat row N - 1 (their scales are zero).
template <int BITS>
void dequant_panel(const QMatmulArgs& a, int64_t n0, int64_t nb, int64_t nbv, int64_t k0, int64_t kl, float* sb,
                   const PanelLayout& out) {
  const int64_t G = a.group_size, words = fmt::words_per_row(a.k);
  dense_affine<BITS>(a, n0, nb, k0 / G, kl / G, sb);
  for (int64_t sl = 0; sl < nbv / kTileRows; ++sl) {
    const uint32_t* r0[kTileRows];
    const uint32_t* r1[kTileRows];
    for (int i = 0; i < kTileRows; ++i) {
      const int64_t n = imin(n0 + sl * kTileRows + i, a.n - 1);
      r0[i] = a.plane0 + n * words;
      r1[i] = BITS == fmt::kInt8Bits ? a.plane1 + n * words : r0[i];
    }
    dense_dequant<BITS>(r0, r1, k0 / fmt::kValuesPerWord, G, sb + sl * kTileRows, nb, out, sl);
  }
}

// y rows [m, m + rows) x columns [n, n + cols) from float32 c (rows of ldc floats), rounded
// to nearest even bf16. Whole 64-byte lines of 32 outputs: half the time of masked 32-byte
// stores at M = 512, and aligned to the lines of memory (a large numpy y is 16-byte aligned;
// split lines cost 2-5% of the call on 2 threads). Writing y is ~10% of a call at M >= 512
// on 2 threads, memory-bound: non-temporal stores, deferring each block's stores to the next
// block, or prefetching the lines for writing were all within 3% of these plain stores.
void dense_store_y(const QMatmulArgs& a, const float* c, int64_t ldc, int64_t m, int64_t rows, int64_t n,
                   int64_t cols) {
  uint16_t* y = static_cast<uint16_t*>(a.y);
  for (int64_t r = 0; r < rows; ++r) {
    uint16_t* dst = y + (m + r) * a.n + n;
    const float* src = c + r * ldc;
    // Up to the first 64-byte boundary of the row, then whole lines.
    int64_t j = imin(cols, int64_t((64 - (reinterpret_cast<uintptr_t>(dst) & 63)) & 63) / 2);
    for (int64_t h = 0; h < j; h += 16) {
      const __mmask16 mask = j - h >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (j - h)) - 1);
      _mm256_mask_storeu_epi16(dst + h, mask, to_bf16(_mm512_maskz_loadu_ps(mask, src + h)));
    }
    for (; j + 32 <= cols; j += 32)
      _mm512_storeu_si512(dst + j, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + j + 16), _mm512_loadu_ps(src + j)));
    for (; j < cols; j += 16) {
      const __mmask16 mask = cols - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (cols - j)) - 1);
      _mm256_mask_storeu_epi16(dst + j, mask, to_bf16(_mm512_maskz_loadu_ps(mask, src + j)));
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace bitswitch
