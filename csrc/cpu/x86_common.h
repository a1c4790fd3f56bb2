// AVX2-level building blocks shared by the AVX2 and AVX-512 translation units.
//
// Everything here has internal linkage: each ISA unit is compiled with its own flags and
// gets its own copy, so no function compiled for AVX-512 can be picked by the linker
// for a caller on an AVX2-only CPU.
//
// Activation layout for the integer GEMV ("x prep"). One 128-element step of a row of x
// is stored as 256 bytes:
//     [ xe_hi[64] | xo_hi[64] | xe_lo[64] | xo_lo[64] ]
// where xe/xo are the even/odd elements of the step (a plane byte holds an even element
// in its low nibble and the next odd one in its high nibble, so permuting x once per
// call lets the weights be used as loaded). At act_bits 16 every element is a 15-bit
// integer v = round(x / dx) split as v = 256*hi + lo with hi, lo both int8: two int8 dot
// products give float-grade accuracy (~3e-5 relative). At act_bits 8, v = hi and lo is
// zero (act_quant.h). dx is per group of G elements; the prep also keeps each group's dx
// and sum of x.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "act_quant.h"
#include "bitswitch/format.h"
#include "convert.h"
#include "kernels.h"

namespace bitswitch {
namespace cpu {
namespace {

namespace fmt = bitswitch::format;

// For the GEMV's per-row and per-step functions: left to itself gcc 12 calls them out of
// line, spills the accumulators to the stack every step and pays a call per weight row.
#define BITSWITCH_INLINE inline __attribute__((always_inline))

// Elements per x-prep step: one 64-byte cache line of one plane row.
constexpr int64_t kStep = 128;
constexpr int64_t kStepWords = kStep / fmt::kValuesPerWord;  // 16 uint32 per plane row
constexpr int64_t kStepBytes = 256;                           // prepped int8 bytes per step

static_assert(kStep % fmt::kMaxGroupSize == 0, "a step holds whole groups");

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// 8 floats from p[0..7] of type t.
inline __m256 load8(const void* p, DType t) {
  switch (t) {
    case DType::kBFloat16: {
      __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p)));
      return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
    }
    case DType::kFloat16:
      return _mm256_cvtph_ps(_mm_loadu_si128(static_cast<const __m128i*>(p)));
    default:
      return _mm256_loadu_ps(static_cast<const float*>(p));
  }
}

template <DType T>
inline __m256 load8_t(const void* p) {
  return load8(p, T);  // T is a constant: the switch folds away
}

// Stores 8 floats to p[0..7] as type t (round to nearest even).
inline void store8(void* p, DType t, __m256 v) {
  switch (t) {
    case DType::kBFloat16: {
      __m256i u = _mm256_castps_si256(v);
      __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
      __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
      // NaN must stay NaN (the rounding add could carry it into infinity).
      __m256 isnan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
      __m256i qnan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
      r = _mm256_blendv_epi8(r, qnan, _mm256_castps_si256(isnan));
      __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
      _mm_storeu_si128(static_cast<__m128i*>(p), packed);
      break;
    }
    case DType::kFloat16:
      _mm_storeu_si128(static_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
      break;
    default:
      _mm256_storeu_ps(static_cast<float*>(p), v);
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The horizontal sums of a, b, c, d as one vector [sum a, sum b, sum c, sum d].
inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// In-place transpose of an 8x8 float block held in 8 registers.
inline void transpose8(__m256 r[8]) {
  __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  __m256 u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  __m256 u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// One row of x (k elements of type t, k a multiple of g) as float32 into dst: x itself, or
// at act_bits 8 its values v * dx (act_quant.h's fake_quantize_int8, bit for bit: the same
// multiply by 1/dx, round-to-nearest-even and multiply by dx, 8 lanes at a time).
inline void x_row_f32(const void* x, DType t, int64_t k, int g, int act_bits, float* dst) {
  const char* src = static_cast<const char*>(x);
  const int64_t es = dtype_size(t);
  if (act_bits != kActBitsInt8) {
    for (int64_t i = 0; i < k; i += 8) _mm256_storeu_ps(dst + i, load8(src + i * es, t));
    return;
  }
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int64_t g0 = 0; g0 < k; g0 += g) {
    __m256 mx = _mm256_setzero_ps();
    for (int j = 0; j < g; j += 8) {
      const __m256 v = load8(src + (g0 + j) * es, t);
      _mm256_storeu_ps(dst + g0 + j, v);
      mx = _mm256_max_ps(mx, _mm256_and_ps(v, absmask));
    }
    const float amax = hmax(mx);
    const __m256 inv = _mm256_set1_ps(act_inverse_step(amax, kActMaxInt8));
    const __m256 dx = _mm256_set1_ps(amax / kActMaxInt8);
    for (int j = 0; j < g; j += 8) {
      const __m256 q = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(dst + g0 + j), inv),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm256_storeu_ps(dst + g0 + j, _mm256_mul_ps(q, dx));
    }
  }
}

// ---------------------------------------------------------------------------------------
// x prep for the integer GEMV.

struct XPrep {
  uint8_t* base = nullptr;  // row m starts at base + m * row_bytes
  int64_t row_bytes = 0;
  int64_t steps = 0;        // ceil(K / kStep); the last step is zero-padded
  int64_t groups = 0;       // K / G
  int64_t dx_off = 0;       // float per-group dx (times the view's factor): [groups]
  int64_t xsum_off = 0;     // float per-group sums of x: [groups]

  const int8_t* q(int64_t m, int64_t step) const {
    return reinterpret_cast<const int8_t*>(base + m * row_bytes + step * kStepBytes);
  }
  const float* dx(int64_t m) const { return reinterpret_cast<const float*>(base + m * row_bytes + dx_off); }
  const float* xsum(int64_t m) const {
    return reinterpret_cast<const float*>(base + m * row_bytes + xsum_off);
  }
};

inline XPrep plan_xprep(int64_t k, int g) {
  XPrep p;
  p.steps = (k + kStep - 1) / kStep;
  p.groups = k / g;
  p.dx_off = p.steps * kStepBytes;
  p.xsum_off = p.dx_off + round_up(p.groups * 4, 64);
  p.row_bytes = round_up(p.xsum_off + p.groups * 4, 64);
  return p;
}

// Packs 4 vectors of 8 int32 (each within int8 range) into 32 int8 in order.
inline __m256i pack_i32x32_to_i8(__m256i a, __m256i b, __m256i c, __m256i d) {
  __m256i ab = _mm256_packs_epi32(a, b), cd = _mm256_packs_epi32(c, d);
  __m256i r = _mm256_packs_epi16(ab, cd);
  return _mm256_permutevar8x32_epi32(r, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// Even and odd elements of the 16 floats a (0..7) and b (8..15), each in order.
inline void split_even_odd(__m256 a, __m256 b, __m256& ev, __m256& od) {
  __m256 e = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
  __m256 o = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
  ev = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), _MM_SHUFFLE(3, 1, 2, 0)));
  od = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(o), _MM_SHUFFLE(3, 1, 2, 0)));
}

// Prepares one row of x (K elements of type t) at act_bits 16 or 8 (act_quant.h). dx_mult
// multiplies every stored dx (1/16 folds the INT8 view's s/16 into the activations). At
// act_bits 8 only the hi halves are used (lo is zero) and the stored sums are of the
// quantized values, so the bias term sees the same x as the dot products.
inline void prep_x_row(const void* x, DType t, int64_t k, int g, int act_bits, float dx_mult, const XPrep& p,
                       int64_t m) {
  uint8_t* row = p.base + m * p.row_bytes;
  float* dxg = reinterpret_cast<float*>(row + p.dx_off);
  float* xsum = reinterpret_cast<float*>(row + p.xsum_off);
  const int64_t esize = dtype_size(t);
  const char* xb = static_cast<const char*>(x);
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const bool split = act_bits == kActBitsExact;
  const float qmax = act_max(act_bits);
  for (int64_t s = 0; s < p.steps; ++s) {
    const int64_t e0 = s * kStep;
    const int64_t n_el = imin(kStep, k - e0);  // multiple of 32
    constexpr int kMaxGroupsPerStep = kStep / fmt::kMinGroupSize;
    // dx and 1/dx of the groups in this step, from their absolute maximum.
    float ginv[kMaxGroupsPerStep] = {}, gdx[kMaxGroupsPerStep] = {};
    const int gps = int(kStep / g);
    for (int gi = 0; gi < gps; ++gi) {
      const int64_t ge = e0 + int64_t(gi) * g;
      if (ge >= k) break;
      __m256 mx = _mm256_setzero_ps(), sm = _mm256_setzero_ps();
      for (int j = 0; j < g; j += 8) {
        __m256 v = load8(xb + (ge + j) * esize, t);
        mx = _mm256_max_ps(mx, _mm256_and_ps(v, absmask));
        sm = _mm256_add_ps(sm, v);
      }
      const float amax = hmax(mx);
      if (split) xsum[ge / g] = hsum(sm);
      gdx[gi] = amax / qmax;
      dxg[ge / g] = gdx[gi] * dx_mult;
      ginv[gi] = act_inverse_step(amax, qmax);
    }
    // Quantize: 8 blocks of 16 elements -> 8 even and 8 odd vectors of 8.
    __m256i eh[8], el[8], oh[8], ol[8];
    __m256i vsum[kMaxGroupsPerStep] = {};
    for (int i = 0; i < 8; ++i) {
      const int64_t e = int64_t(i) * 16;
      if (e >= n_el) {
        eh[i] = el[i] = oh[i] = ol[i] = _mm256_setzero_si256();
        continue;
      }
      __m256 a = load8(xb + (e0 + e) * esize, t), b = load8(xb + (e0 + e + 8) * esize, t);
      __m256 ev, od;
      split_even_odd(a, b, ev, od);
      const __m256 sc = _mm256_set1_ps(ginv[e / g]);
      const __m256i ve = _mm256_cvtps_epi32(_mm256_mul_ps(ev, sc));
      const __m256i vo = _mm256_cvtps_epi32(_mm256_mul_ps(od, sc));
      if (split) {
        const __m256i c128 = _mm256_set1_epi32(128);
        eh[i] = _mm256_srai_epi32(_mm256_add_epi32(ve, c128), 8);
        oh[i] = _mm256_srai_epi32(_mm256_add_epi32(vo, c128), 8);
        el[i] = _mm256_sub_epi32(ve, _mm256_slli_epi32(eh[i], 8));
        ol[i] = _mm256_sub_epi32(vo, _mm256_slli_epi32(oh[i], 8));
      } else {
        eh[i] = ve;
        oh[i] = vo;
        el[i] = ol[i] = _mm256_setzero_si256();
        vsum[e / g] = _mm256_add_epi32(vsum[e / g], _mm256_add_epi32(ve, vo));
      }
    }
    if (!split) {
      for (int gi = 0; gi < gps && e0 + int64_t(gi) * g < k; ++gi) {
        const __m256 vs = _mm256_cvtepi32_ps(vsum[gi]);  // exact: |sum| < 2^24
        xsum[(e0 + int64_t(gi) * g) / g] = hsum(vs) * gdx[gi];
      }
    }
    __m256i* dst = reinterpret_cast<__m256i*>(row + s * kStepBytes);
    dst[0] = pack_i32x32_to_i8(eh[0], eh[1], eh[2], eh[3]);
    dst[1] = pack_i32x32_to_i8(eh[4], eh[5], eh[6], eh[7]);
    dst[2] = pack_i32x32_to_i8(oh[0], oh[1], oh[2], oh[3]);
    dst[3] = pack_i32x32_to_i8(oh[4], oh[5], oh[6], oh[7]);
    dst[4] = pack_i32x32_to_i8(el[0], el[1], el[2], el[3]);
    dst[5] = pack_i32x32_to_i8(el[4], el[5], el[6], el[7]);
    dst[6] = pack_i32x32_to_i8(ol[0], ol[1], ol[2], ol[3]);
    dst[7] = pack_i32x32_to_i8(ol[4], ol[5], ol[6], ol[7]);
  }
}

// Per-row affine constants of one group, as the view reads them: y += s_eff*code + b_eff.
template <int BITS>
inline void group_affine(float s, float b, float& s_eff, float& b_eff) {
  if (BITS == fmt::kInt8Bits) {
    s_eff = fmt::int8_scale(s);
    b_eff = fmt::int8_bias(s, b);
  } else {
    s_eff = s;
    b_eff = b;
  }
}

// ---------------------------------------------------------------------------------------
// Dequantization into a GEMM panel: panel[k][NR] holds W[n0 + c, k0 + k] for c < NR, so
// the micro-kernel reads one contiguous row of NR weights per k. Rows past N are zero.
//
// The weights are stored row-major (k fastest) and the panel is k-major, so something has
// to be transposed. Transposing the packed words (8 rows x 8 words, 24 shuffles per 512
// weights) instead of the dequantized floats (24 shuffles per 64) leaves one shift, mask,
// convert and FMA per 8 weights: each transposed vector holds word j of 8 rows, and its
// nibble t is element 8j + t of all 8 rows at once, which is exactly one panel row.

// Scale and bias vectors (as the view reads them) of group g for 8 rows.
template <int BITS, DType SD>
inline void group_affine8(const void* scales, const void* biases, const int64_t* row_off, int64_t g,
                          const bool* valid, __m256& sv, __m256& bv) {
  alignas(32) float s[8], b[8];
  for (int i = 0; i < 8; ++i) {
    if (!valid[i]) {
      s[i] = b[i] = 0.0f;
      continue;
    }
    group_affine<BITS>(load_f32(scales, SD, row_off[i] + g), load_f32(biases, SD, row_off[i] + g), s[i], b[i]);
  }
  sv = _mm256_load_ps(s);
  bv = _mm256_load_ps(b);
}

// Words [w0, w0 + nw) of 8 rows, transposed: out[j] holds word w0 + j of rows 0..7.
// nw is 8 or 4 (the K tail is a multiple of 32 inputs = 4 words).
inline void load_words8(const uint32_t* const* rows, int64_t w0, int nw, __m256i out[8]) {
  __m256 r[8];
  const __m256i mask = _mm256_setr_epi32(-1, -1, -1, -1, nw > 4 ? -1 : 0, nw > 4 ? -1 : 0, nw > 4 ? -1 : 0,
                                         nw > 4 ? -1 : 0);
  for (int i = 0; i < 8; ++i)
    r[i] = _mm256_castsi256_ps(nw == 8 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[i] + w0))
                                       : _mm256_maskload_epi32(reinterpret_cast<const int*>(rows[i] + w0), mask));
  transpose8(r);
  for (int j = 0; j < 8; ++j) out[j] = _mm256_castps_si256(r[j]);
}

template <int BITS, int NR, DType SD>
inline void dequant_panel(const QMatmulArgs& a, int64_t n0, int64_t k0, int64_t klen, float* panel) {
  const int64_t words = fmt::words_per_row(a.k), groups = fmt::groups_per_row(a.k, a.group_size);
  const int64_t wpg = a.group_size / fmt::kValuesPerWord;  // words per group
  const __m256i nib = _mm256_set1_epi32(fmt::kCodeMax);
  for (int c0 = 0; c0 < NR; c0 += 8) {
    const uint32_t* p0[8];
    const uint32_t* p1[8];
    int64_t soff[8];
    bool valid[8];
    for (int i = 0; i < 8; ++i) {
      const int64_t n = imin(n0 + c0 + i, a.n - 1);  // rows past N read row N-1 with zero scales
      valid[i] = n0 + c0 + i < a.n;
      p0[i] = a.plane0 + n * words;
      p1[i] = BITS == fmt::kInt8Bits ? a.plane1 + n * words : p0[i];
      soff[i] = n * groups;
    }
    __m256 sv = _mm256_setzero_ps(), bv = _mm256_setzero_ps();
    int64_t cur_group = -1;
    for (int64_t kk = 0; kk < klen; kk += 64) {
      const int64_t w0 = (k0 + kk) / fmt::kValuesPerWord;
      const int nw = klen - kk >= 64 ? 8 : 4;
      __m256i q[8], r[8];
      load_words8(p0, w0, nw, q);
      if (BITS == fmt::kInt8Bits) load_words8(p1, w0, nw, r);
      for (int j = 0; j < nw; ++j) {
        const int64_t g = (w0 + j) / wpg;
        if (g != cur_group) {
          group_affine8<BITS, SD>(a.scales, a.biases, soff, g, valid, sv, bv);
          cur_group = g;
        }
        float* dst = panel + (kk + 8 * j) * NR + c0;
        for (int t = 0; t < fmt::kValuesPerWord; ++t) {
          __m256i c = _mm256_and_si256(_mm256_srli_epi32(q[j], fmt::kPlaneBits * t), nib);
          if (BITS == fmt::kInt8Bits)
            c = _mm256_or_si256(_mm256_slli_epi32(c, fmt::kPlaneBits),
                                _mm256_and_si256(_mm256_srli_epi32(r[j], fmt::kPlaneBits * t), nib));
          _mm256_store_ps(dst + t * NR, _mm256_fmadd_ps(_mm256_cvtepi32_ps(c), sv, bv));
        }
      }
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace bitswitch
