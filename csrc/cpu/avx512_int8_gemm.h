// qmatmul for prefill-sized M on AVX-512 VNNI: int8 activations times the weights' integer
// codes with vpdpbusd, integer sums per group, the affine map per group in float32. Used
// for M above the GEMV's rows by the `avx512` and `avx512bf16` variants at act_bits 8, and
// by `avx512bf16` (the choice on AMD) for float16 x at act_bits 16.
//
// The contract is the GEMV's (x86_common.h, act_quant.h): x is quantized per group with
// the same float32 operations as every other kernel, v = round(x / dx), and y is
// float-grade on those values. At act_bits 8, v is one int8; at act_bits 16, v is a 15-bit
// integer split as v = 256 hi + lo into two int8 halves, each multiplied by the codes, and
// the two integer sums combined exactly. With w = s*c + b (c the INT4 code 0..15, or the
// INT8 view's 16q + r 0..255 with s and b as format.h maps them):
//     y[m, n] = sum_g  dx[m, g] * s[n, g] * ( sum_{k in g} c[n, k] v[m, k] )
//                    + b[n, g] * xsum[m, g]
// with xsum the group's sum of v * dx (act_bits 8) or of x itself (act_bits 16). The inner
// sums are exact in int32 (|c v| <= 255 * 32767, at most 128 of them), so the only
// roundings are the float32 fold per group, as in the GEMV: results agree with it to
// float32 rounding, whatever M.
//
// vpdpbusd multiplies 64 unsigned bytes (the codes) by 64 signed bytes (x) and adds each
// lane's four products into int32: twice the multiply-adds per instruction of vdpbf16ps and
// four times a float32 FMA's. Per group the integer sums are folded into float32 (a convert
// and two FMAs per 16 outputs and x row), which costs a fifth of the group's dot products
// at G = 64. act_bits 16 doubles the dot products (hi and lo halves) but not the fold.
//
// Layout. The weights of a call are packed once per task into a panel of bytes: per block
// of 32 outputs (two 16-output slices), one "step" of 4 inputs is 128 bytes, slice 0's 16
// dwords then slice 1's, dword o of a slice holding the codes of output o at those 4
// inputs, i.e. exactly vpdpbusd's unsigned operand. A block's steps are consecutive, so a
// block is one sequential stream. Four consecutive int8 x values are one dword, broadcast
// to the 16 lanes. x is quantized once per call into [M][K] int8 (and [M][K] lo halves)
// with its per-group dx and xsum.
//
// Data flow per task (outputs n0 .. n0 + nb - 1, x rows m0 .. m0 + mrows - 1), as in the
// bf16 dense GEMMs (bf16_panels.h):
//   for each panel of ks inputs (all of K unless the panel would pass kPanelBytes):
//     pack the nb x ks codes, and the groups' scales and biases;
//     for each block of kMR x rows:
//       for each chunk of kKC inputs:      the rows' chunk (kMR x 256 bytes) stays in L1
//         for each 32-output block:        kMR x 32 int32 sums and as many float32 sums in
//                                          4 * kMR registers, the block's 8 KB from L2
//       convert the block's results to x's dtype into y (last panel only).
//
// Include only from the AVX-512 unit (avx512.cpp), after x86_qmatmul.h.
#pragma once

#include <immintrin.h>

#include <array>
#include <cstring>
#include <utility>

#include "panel_tasks.h"
#include "x86_common.h"

namespace bitswitch {
namespace cpu {
namespace {
namespace i8gemm {

constexpr int kSlice = 16;                     // outputs per zmm of sums
constexpr int kBlockN = 2 * kSlice;            // outputs per micro-kernel block
constexpr int kQuad = 4;                       // inputs per vpdpbusd lane
constexpr int64_t kStepBytes = kBlockN * kQuad;  // 128: one 4-input step of a block
// x rows per register block: 2 * MR int32 sums (twice that with lo halves) + 2 * MR
// float32 sums + 2 weight vectors of the 32 zmm registers, the rest for the fold.
template <bool LO>
constexpr int kMR = LO ? 4 : 6;
// Inputs per chunk: a block's chunk (32 x 256 bytes = 8 KB) is read from L2 once per
// block of x rows while the rows' chunk stays in L1.
constexpr int64_t kKC = 256;
// pack_slice prefetches each row's next line this many rows ahead (the next slice's rows):
// at M = 16, where packing is most of a call, 9728 x 2560 INT4 took 1.3-1.4 ms without
// and 1.2-1.3 with it (32 rows ahead: in between), with no change at M = 512.
constexpr int64_t kPackPrefetchRows = 16;
// Packed panel bytes: half of a Zen 4 / 5 L2 (as the bf16 GEMMs' panels).
constexpr int64_t kPanelBytes = 512 << 10;

static_assert(kKC % fmt::kMaxGroupSize == 0, "a chunk holds whole groups");
static_assert(fmt::kMinGroupSize % 32 == 0, "pack_slice packs whole 32-input units");

// In-place transpose of a 16 x 16 matrix of dwords, r[i] holding row i.
inline void transpose16x16_epi32(__m512i (&r)[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: rows 2i, 2i+1 interleaved
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + j], lane L: element 4L + j of rows 4i .. 4i + 3
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int j = 0; j < 4; ++j) {  // element 4L + j of all rows: lane L of r[j], r[4 + j], ...
    const __m512i ab_lo = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x44), ab_hi = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xEE);
    const __m512i cd_lo = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x44),
                  cd_hi = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xEE);
    t[j] = _mm512_shuffle_i32x4(ab_lo, cd_lo, 0x88);
    t[4 + j] = _mm512_shuffle_i32x4(ab_lo, cd_lo, 0xDD);
    t[8 + j] = _mm512_shuffle_i32x4(ab_hi, cd_hi, 0x88);
    t[12 + j] = _mm512_shuffle_i32x4(ab_hi, cd_hi, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// The 64 codes of 32 plane bytes, one per byte in input order (a plane byte holds an even
// input in its low nibble and the next odd one in its high nibble).
inline __m512i expand_nibbles(__m256i bytes) {
  const __m512i w = _mm512_cvtepu8_epi16(bytes);  // word j = plane byte j
  // (w | w << 4) & 0x0F0F: low byte the low nibble, high byte the high nibble.
  return _mm512_ternarylogic_epi32(w, _mm512_slli_epi16(w, 4), _mm512_set1_epi32(0x0F0F0F0F), 0xA8);
}

// Codes of outputs [n0, n0 + 16) (zero past N) for inputs [k0, k0 + kl) into slice `half`
// of a block's steps: step t at dst + t * kStepBytes + half * 64.
template <int BITS>
inline void pack_slice(const QMatmulArgs& a, int64_t n0, int64_t k0, int64_t kl, uint8_t* dst, int half) {
  const int64_t row_bytes = fmt::words_per_row(a.k) * 4;
  const uint8_t* p0 = reinterpret_cast<const uint8_t*>(a.plane0);
  const uint8_t* p1 = reinterpret_cast<const uint8_t*>(a.plane1);
  for (int64_t kk = 0; kk < kl; kk += 64) {  // 16 steps (or the 8 of a 32-input tail)
    const bool full = kl - kk >= 64;
    __m512i r[16];
    for (int i = 0; i < kSlice; ++i) {
      const int64_t n = n0 + i;
      if (n >= a.n) {
        r[i] = _mm512_setzero_si512();
        continue;
      }
      const int64_t off = n * row_bytes + (k0 + kk) / 2;
      auto load = [&](const uint8_t* p) {
        return full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + off))
                    : _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + off)));
      };
      r[i] = expand_nibbles(load(p0));
      if (BITS == fmt::kInt8Bits)  // c = 16q + r; each byte is below 16, so no carry across bytes
        r[i] = _mm512_or_si512(_mm512_slli_epi16(r[i], 4), expand_nibbles(load(p1)));
      if (n + kPackPrefetchRows < a.n && ((k0 + kk) & 127) == 0) {
        _mm_prefetch(reinterpret_cast<const char*>(p0 + off + kPackPrefetchRows * row_bytes), _MM_HINT_T0);
        if (BITS == fmt::kInt8Bits)
          _mm_prefetch(reinterpret_cast<const char*>(p1 + off + kPackPrefetchRows * row_bytes), _MM_HINT_T0);
      }
    }
    transpose16x16_epi32(r);
    uint8_t* d = dst + (kk / kQuad) * kStepBytes + half * 64;
    const int steps = full ? 16 : 8;
    for (int t = 0; t < steps; ++t) _mm512_storeu_si512(d + t * kStepBytes, r[t]);
  }
}

// acc + the four-product dot of each lane (vpdpbusd). gcc 12 copies every accumulator of
// the intrinsic in and out of a scratch register each step of the loop below (24 moves per
// 12 dot products); the asm form keeps each accumulator in one register.
BITSWITCH_INLINE __m512i dpbusd(__m512i acc, __m512i u8, __m512i s8) {
#if defined(BITSWITCH_EMULATE_AVX512)
  return _mm512_dpbusd_epi32(acc, u8, s8);
#else
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
  return acc;
#endif
}

// c[MR x 32] = (zero ? 0 : c) + the fold of `groups` groups of G inputs:
//   x: the rows' first input (int8), rows ldx apart;  w: the block's steps from there on;
//   sb: group g's 32 scales at sb + g * ldsb and its 32 biases ldsb / 2 further;
//   dx, xs: row i's group g at dx[i * ldg + g], xs[i * ldg + g];  c: rows ldc apart.
template <int MR, int G, bool LO>
__attribute__((noinline)) void block(const int8_t* x, int64_t ldx, const uint8_t* w, int64_t groups, const float* sb,
                                     int64_t ldsb, const float* dx, const float* xs, int64_t ldg, float* c,
                                     int64_t ldc, bool zero) {
  __m512 acc[MR][2];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    acc[i][0] = zero ? _mm512_setzero_ps() : _mm512_loadu_ps(c + i * ldc);
    acc[i][1] = zero ? _mm512_setzero_ps() : _mm512_loadu_ps(c + i * ldc + kSlice);
  }
  const int64_t bias_off = ldsb / 2;
  for (int64_t g = 0; g < groups; ++g, x += G, sb += ldsb) {
    __m512i sum[MR][2], lo[LO ? MR : 1][2];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) sum[i][0] = sum[i][1] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int i = 0; i < (LO ? MR : 1); ++i) lo[i][0] = lo[i][1] = _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int s = 0; s < G / kQuad; ++s, w += kStepBytes) {
      const __m512i w0 = _mm512_loadu_si512(w), w1 = _mm512_loadu_si512(w + 64);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        int32_t quad;
        std::memcpy(&quad, x + i * ldx + s * kQuad, sizeof(quad));
        const __m512i xv = _mm512_set1_epi32(quad);
        sum[i][0] = dpbusd(sum[i][0], w0, xv);
        sum[i][1] = dpbusd(sum[i][1], w1, xv);
        if (LO) {  // the lo halves, ldx / 2 past the hi halves
          std::memcpy(&quad, x + i * ldx + ldx / 2 + s * kQuad, sizeof(quad));
          const __m512i xl = _mm512_set1_epi32(quad);
          lo[i][0] = dpbusd(lo[i][0], w0, xl);
          lo[i][1] = dpbusd(lo[i][1], w1, xl);
        }
      }
    }
    if (LO) {  // v = 256 hi + lo: exact in int32 (|256 sum_hi| <= 2^8 * 128 * 255 * 127 < 2^31)
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i)
        for (int h = 0; h < 2; ++h) sum[i][h] = _mm512_add_epi32(_mm512_slli_epi32(sum[i][h], 8), lo[i][h]);
    }
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const __m512 sv = _mm512_loadu_ps(sb + h * kSlice), bv = _mm512_loadu_ps(sb + bias_off + h * kSlice);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const __m512 f = _mm512_mul_ps(sv, _mm512_set1_ps(dx[i * ldg + g]));
        acc[i][h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[i][h]), f, acc[i][h]);
        acc[i][h] = _mm512_fmadd_ps(bv, _mm512_set1_ps(xs[i * ldg + g]), acc[i][h]);
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    _mm512_storeu_ps(c + i * ldc, acc[i][0]);
    _mm512_storeu_ps(c + i * ldc + kSlice, acc[i][1]);
  }
}

using BlockFn = void (*)(const int8_t*, int64_t, const uint8_t*, int64_t, const float*, int64_t, const float*,
                         const float*, int64_t, float*, int64_t, bool);

template <int G, bool LO, int... R>
constexpr auto make_blocks(std::integer_sequence<int, R...>) {
  return std::array<BlockFn, sizeof...(R)>{block<R + 1, G, LO>...};
}
// kBlocks<G, LO>[r - 1]: blocks of r rows (the last block of x may be short).
template <int G, bool LO>
constexpr auto kBlocks = make_blocks<G, LO>(std::make_integer_sequence<int, kMR<LO>>{});

// x quantized once per call: row m's codes at q + m * k (act_bits 8), or its hi halves at
// q + m * 2k and lo halves k further (act_bits 16); its groups' dx and xsum at dx / xs + m * groups.
struct XInt8 {
  int8_t* q;
  float* dx;
  float* xs;
  int64_t groups;
};

// One row of x (k inputs of type t) quantized per group of g with the float32 operations
// of every other kernel (a multiply by 1/dx, round to nearest even): at act_bits 8 those of
// x_row_f32 and fake_quantize_int8, xs the sum of the values v * dx; at act_bits 16 (LO)
// those of prep_x_row, v = 256 hi + lo split into two int8 halves, xs the sum of x itself.
template <bool LO>
inline void quantize_row(const void* x, DType t, int64_t k, int g, int8_t* q, float* dx, float* xs) {
  const char* src = static_cast<const char*>(x);
  const int64_t es = dtype_size(t);
  const float qmax = LO ? kActMaxExact : kActMaxInt8;
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int64_t g0 = 0; g0 < k; g0 += g) {
    __m256 mx = _mm256_setzero_ps(), xsum = _mm256_setzero_ps();
    for (int j = 0; j < g; j += 8) {
      const __m256 v = load8(src + (g0 + j) * es, t);
      mx = _mm256_max_ps(mx, _mm256_and_ps(v, absmask));
      if (LO) xsum = _mm256_add_ps(xsum, v);
    }
    const float amax = hmax(mx);
    const __m256 inv = _mm256_set1_ps(act_inverse_step(amax, qmax));
    __m256i vsum = _mm256_setzero_si256();
    for (int j = 0; j < g; j += 32) {
      __m256i v[4], lo[4];
      for (int u = 0; u < 4; ++u) {
        v[u] = _mm256_cvtps_epi32(_mm256_mul_ps(load8(src + (g0 + j + 8 * u) * es, t), inv));
        if (LO) {
          const __m256i hi = _mm256_srai_epi32(_mm256_add_epi32(v[u], _mm256_set1_epi32(128)), 8);
          lo[u] = _mm256_sub_epi32(v[u], _mm256_slli_epi32(hi, 8));
          v[u] = hi;
        } else {
          vsum = _mm256_add_epi32(vsum, v[u]);
        }
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + g0 + j), pack_i32x32_to_i8(v[0], v[1], v[2], v[3]));
      if (LO)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k + g0 + j), pack_i32x32_to_i8(lo[0], lo[1], lo[2], lo[3]));
    }
    const float step = amax / qmax;
    dx[g0 / g] = step;
    xs[g0 / g] = LO ? hsum(xsum) : hsum(_mm256_cvtepi32_ps(vsum)) * step;  // exact int sum: |sum| < 2^24
  }
}

struct Ctx : PanelSplit {
  const QMatmulArgs* a;
  XInt8 x;
};

// 16 values of type t from p as float32, lanes past n zero (and not read).
inline __m512 load16(const void* p, DType t, int64_t n) {
  const __mmask16 k = n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
  switch (t) {
    case DType::kBFloat16:
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
    case DType::kFloat16:
      return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
    default:
      return _mm512_maskz_loadu_ps(k, p);
  }
}

// The scales and biases of outputs [n0, n0 + nbv) for groups [g0, g0 + groups), as the view
// reads them (format.h's int8_scale and int8_bias for the INT8 view): group g's scales at
// sb + g * 2 * nbv, its biases nbv further; zero past N. 16 outputs x 16 groups at a time,
// transposed in registers (the scales are stored [N][groups]).
template <int BITS>
inline void pack_affine(const QMatmulArgs& a, int64_t n0, int64_t nbv, int64_t g0, int64_t groups, float* sb) {
  const int64_t row_groups = fmt::groups_per_row(a.k, a.group_size), es = dtype_size(a.scale_dtype);
  const char* sp = static_cast<const char*>(a.scales);
  const char* bp = static_cast<const char*>(a.biases);
  for (int64_t j0 = 0; j0 < nbv; j0 += kSlice) {
    for (int64_t gg = 0; gg < groups; gg += 16) {
      const int64_t ng = imin(16, groups - gg);
      __m512i s[16], b[16];
      for (int i = 0; i < kSlice; ++i) {
        const int64_t n = n0 + j0 + i, off = (n * row_groups + g0 + gg) * es;
        s[i] = n < a.n ? _mm512_castps_si512(load16(sp + off, a.scale_dtype, ng)) : _mm512_setzero_si512();
        b[i] = n < a.n ? _mm512_castps_si512(load16(bp + off, a.scale_dtype, ng)) : _mm512_setzero_si512();
      }
      transpose16x16_epi32(s);
      transpose16x16_epi32(b);
      for (int64_t t = 0; t < ng; ++t) {
        __m512 sv = _mm512_castsi512_ps(s[t]), bv = _mm512_castsi512_ps(b[t]);
        if (BITS == fmt::kInt8Bits) {  // s / 16 and b - 7.5 * s / 16, exactly as format.h
          const __m512 inv = _mm512_set1_ps(1.0f / float(fmt::kResidualDivisor));
          bv = _mm512_sub_ps(bv, _mm512_mul_ps(_mm512_mul_ps(sv, _mm512_set1_ps(fmt::kResidualCenter)), inv));
          sv = _mm512_mul_ps(sv, inv);
        }
        float* dst = sb + (gg + t) * 2 * nbv + j0;
        _mm512_storeu_ps(dst, sv);
        _mm512_storeu_ps(dst + nbv, bv);
      }
    }
  }
}

// float32 rows of c (ldc apart) into y rows [m, m + rows), outputs [n, n + cols).
inline void store_rows(const QMatmulArgs& a, const float* c, int64_t ldc, int64_t m, int64_t rows, int64_t n,
                       int64_t cols) {
  const int64_t es = dtype_size(a.x_dtype);
  for (int64_t r = 0; r < rows; ++r) {
    char* dst = static_cast<char*>(a.y) + ((m + r) * a.n + n) * es;
    const float* src = c + r * ldc;
    int64_t j = 0;
    for (; j + 8 <= cols; j += 8) store8(dst + j * es, a.x_dtype, _mm256_loadu_ps(src + j));
    for (; j < cols; ++j) store_f32(dst, a.x_dtype, j, src[j]);
  }
}

// One task: outputs [n0, n0 + nb) for x rows [m0, m0 + mrows). panel: nbv x ks bytes;
// sb: 2 * nbv floats per group of the panel; acc: the float32 sums, [kMR][nb] when one
// panel covers K, else [mrows][nb] (kept across panels).
template <int BITS, int G, bool LO>
void task(const Ctx& ctx, uint8_t* panel, float* sb, float* acc, int64_t n0, int64_t m0, int64_t mrows) {
  const QMatmulArgs& a = *ctx.a;
  const XInt8& xq = ctx.x;
  const int64_t nb = ctx.nb;
  const int64_t ncols = imin(nb, a.n - n0), nbv = round_up(ncols, kBlockN);  // whole blocks
  const int64_t mend = imin(m0 + mrows, a.m), ldx = LO ? 2 * a.k : a.k;
  constexpr int kRows = kMR<LO>;
  for (int64_t k0 = 0; k0 < a.k; k0 += ctx.ks) {
    const int64_t kl = imin(ctx.ks, a.k - k0);
    const bool first = k0 == 0, last = k0 + kl == a.k;
    const int64_t block_bytes = kl / kQuad * kStepBytes;
    for (int64_t j = 0; j < nbv; j += kBlockN) {
      pack_slice<BITS>(a, n0 + j, k0, kl, panel + (j / kBlockN) * block_bytes, 0);
      pack_slice<BITS>(a, n0 + j + kSlice, k0, kl, panel + (j / kBlockN) * block_bytes, 1);
    }
    pack_affine<BITS>(a, n0, nbv, k0 / G, kl / G, sb);
    for (int64_t m = m0; m < mend; m += kRows) {
      const int64_t rows = imin(kRows, mend - m);
      float* arow = ctx.ks == a.k ? acc : acc + (m - m0) * nb;
      const BlockFn fn = kBlocks<G, LO>[rows - 1];
      for (int64_t c0 = 0; c0 < kl; c0 += kKC) {
        const int64_t cl = imin(kKC, kl - c0), g = (k0 + c0) / G;
        const int8_t* xc = xq.q + m * ldx + k0 + c0;
        for (int64_t j = 0; j < nbv; j += kBlockN)
          fn(xc, ldx, panel + (j / kBlockN) * block_bytes + c0 / kQuad * kStepBytes, cl / G,
             sb + (c0 / G) * 2 * nbv + j, 2 * nbv, xq.dx + m * xq.groups + g, xq.xs + m * xq.groups + g, xq.groups,
             arow + j, nb, first && c0 == 0);
      }
      if (last) store_rows(a, arow, nb, m, rows, n0, ncols);
    }
  }
}

template <int BITS, int G, bool LO>
Status gemm(const QMatmulArgs& a, ThreadPool& pool) {
  constexpr int kRows = kMR<LO>;
  Ctx ctx;
  ctx.a = &a;
  // x quantized once: [M][K] codes, then [M][groups] dx and xsum.
  ctx.x.groups = a.k / G;
  const size_t qbytes = size_t(round_up(a.m * a.k * (LO ? 2 : 1), 64)), fbytes = size_t(a.m * ctx.x.groups) * 4;
  char* xbuf = static_cast<char*>(thread_scratch(kScratchX, qbytes + 2 * fbytes));
  if (!xbuf) return Status::kOutOfMemory;
  ctx.x.q = reinterpret_cast<int8_t*>(xbuf);
  ctx.x.dx = reinterpret_cast<float*>(xbuf + qbytes);
  ctx.x.xs = reinterpret_cast<float*>(xbuf + qbytes + fbytes);
  const int64_t es = dtype_size(a.x_dtype);
  pool.parallel_for(a.m, [&](int64_t m, int) {
    quantize_row<LO>(static_cast<const char*>(a.x) + m * a.k * es, a.x_dtype, a.k, G, ctx.x.q + m * a.k * (LO ? 2 : 1),
                 ctx.x.dx + m * ctx.x.groups, ctx.x.xs + m * ctx.x.groups);
  });

  static_cast<PanelSplit&>(ctx) = split_panels(a.m, a.n, a.k, a.m * a.k * (LO ? 2 : 1), pool.num_threads(), kBlockN,
                                                kRows, kKC, kPanelBytes, 1);
  const size_t panel_bytes = size_t(ctx.nb * ctx.ks);
  const size_t sb_bytes = size_t(2 * (ctx.ks / G) * ctx.nb) * 4;
  const size_t acc_bytes = size_t((ctx.ks < a.k ? ctx.mrows : kRows) * ctx.nb) * 4;
  return run_panel_tasks(pool, ctx, a.m, panel_bytes + sb_bytes, acc_bytes,
                         [&](int64_t n0, int64_t m0, int64_t rows, char* buf, float* acc) {
                           task<BITS, G, LO>(ctx, reinterpret_cast<uint8_t*>(buf),
                                             reinterpret_cast<float*>(buf + panel_bytes), acc, n0, m0, rows);
                         });
}

template <int BITS, bool LO>
Status gemm_g(const QMatmulArgs& a, ThreadPool& pool) {
  switch (a.group_size) {
    case fmt::kGroupSize32: return gemm<BITS, fmt::kGroupSize32, LO>(a, pool);
    case fmt::kGroupSize64: return gemm<BITS, fmt::kGroupSize64, LO>(a, pool);
    case fmt::kGroupSize128: return gemm<BITS, fmt::kGroupSize128, LO>(a, pool);
    default: return Status::kInvalidArgument;
  }
}

template <bool LO>
Status gemm_bits(const QMatmulArgs& a, ThreadPool& pool) {
  return a.bits == fmt::kInt8Bits ? gemm_g<fmt::kInt8Bits, LO>(a, pool) : gemm_g<fmt::kInt4Bits, LO>(a, pool);
}

}  // namespace i8gemm

// Any x dtype, M above the GEMV's rows; act_bits 16 multiplies both int8 halves of x.
inline Status qmatmul_int8_gemm(const QMatmulArgs& a, ThreadPool& pool) {
  return a.act_bits == kActBitsInt8 ? i8gemm::gemm_bits<false>(a, pool) : i8gemm::gemm_bits<true>(a, pool);
}

}  // namespace
}  // namespace cpu
}  // namespace bitswitch
