// The int8 GEMM's weight packers and fold for 256-bit registers (int8_gemm.h has the layout),
// shared by the AVX2 unit (vpmaddubsw kernel) and the AVX-VNNI unit (vpdpbusd kernel).
#pragma once

#include <immintrin.h>

#include "int8_gemm.h"

namespace bitswitch {
namespace cpu {
namespace {
namespace i8gemm {

// The 32 codes of 16 plane bytes, one per byte in input order (a plane byte holds an even
// input in its low nibble and the next odd one in its high nibble).
inline __m256i expand_nibbles(__m128i bytes) {
  const __m256i w = _mm256_cvtepu8_epi16(bytes);  // word j = plane byte j
  return _mm256_and_si256(_mm256_or_si256(w, _mm256_slli_epi16(w, 4)), _mm256_set1_epi16(0x0F0F));
}

// 8 values of type t from p (only the first n, the rest zero) as float32.
inline __m256 load8_n(const void* p, DType t, int64_t n) {
  if (n >= 8) return load8(p, t);
  alignas(32) float v[8] = {};
  for (int64_t i = 0; i < n; ++i) v[i] = load_f32(p, t, i);
  return _mm256_load_ps(v);
}

// The int8 GEMM's packers and float32 fold on ymm registers (int8_gemm.h): 8 outputs per
// register of sums, blocks of 16 outputs. The AVX2 and AVX-VNNI kernels derive from it,
// adding mr() and block().
struct YmmInt8Pack {
  static constexpr int kSlice = 8;
  static constexpr int kBlockN = 2 * kSlice;
  static constexpr int64_t kStepBytes = kBlockN * kQuad;  // 64

  // Codes of outputs [n0, n0 + 8) (zero past N) for inputs [k0, k0 + kl) into slice `half`
  // of a block's steps: step t at dst + t * kStepBytes + half * 32.
  template <int BITS>
  static void pack_slice(const QMatmulArgs& a, int64_t n0, int64_t k0, int64_t kl, uint8_t* dst, int half) {
    const int64_t row_bytes = fmt::words_per_row(a.k) * 4;
    const uint8_t* p0 = reinterpret_cast<const uint8_t*>(a.plane0);
    const uint8_t* p1 = reinterpret_cast<const uint8_t*>(a.plane1);
    for (int64_t kk = 0; kk < kl; kk += 32) {  // 8 steps: 16 plane bytes of each row
      __m256 r[8];
      for (int i = 0; i < kSlice; ++i) {
        const int64_t n = n0 + i;
        if (n >= a.n) {
          r[i] = _mm256_setzero_ps();
          continue;
        }
        const int64_t off = n * row_bytes + (k0 + kk) / 2;
        __m256i c = expand_nibbles(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p0 + off)));
        if (BITS == fmt::kInt8Bits)  // c = 16q + r; each byte is below 16, so no carry across bytes
          c = _mm256_or_si256(_mm256_slli_epi16(c, 4),
                              expand_nibbles(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p1 + off))));
        prefetch_ahead<BITS>(a, n, k0 + kk, off, row_bytes);
        r[i] = _mm256_castsi256_ps(c);
      }
      transpose8(r);  // r[t]: dword t (inputs 4t .. 4t + 3) of the 8 rows
      uint8_t* d = dst + (kk / kQuad) * kStepBytes + half * 32;
      for (int t = 0; t < 8; ++t) _mm256_storeu_ps(reinterpret_cast<float*>(d + t * kStepBytes), r[t]);
    }
  }

  // The scales and biases of outputs [n0, n0 + nbv) for groups [g0, g0 + groups), as the
  // view reads them: group g's scales at sb + g * 2 * nbv, its biases nbv further; zero past
  // N. 8 outputs x 8 groups at a time, transposed in registers.
  template <int BITS>
  static void pack_affine(const QMatmulArgs& a, int64_t n0, int64_t nbv, int64_t g0, int64_t groups, float* sb) {
    const int64_t row_groups = fmt::groups_per_row(a.k, a.group_size), es = dtype_size(a.scale_dtype);
    const char* sp = static_cast<const char*>(a.scales);
    const char* bp = static_cast<const char*>(a.biases);
    for (int64_t j0 = 0; j0 < nbv; j0 += kSlice) {
      for (int64_t gg = 0; gg < groups; gg += 8) {
        const int64_t ng = imin(8, groups - gg);
        __m256 s[8], b[8];
        for (int i = 0; i < kSlice; ++i) {
          const int64_t n = n0 + j0 + i, off = (n * row_groups + g0 + gg) * es;
          s[i] = n < a.n ? load8_n(sp + off, a.scale_dtype, ng) : _mm256_setzero_ps();
          b[i] = n < a.n ? load8_n(bp + off, a.scale_dtype, ng) : _mm256_setzero_ps();
        }
        transpose8(s);
        transpose8(b);
        for (int64_t t = 0; t < ng; ++t) {
          view_affine8<BITS>(s[t], b[t]);
          float* dst = sb + (gg + t) * 2 * nbv + j0;
          _mm256_storeu_ps(dst, s[t]);
          _mm256_storeu_ps(dst + nbv, b[t]);
        }
      }
    }
  }

  // The kernels' register tile of float32 sums, c[MR x 16] (rows ldc apart): loaded (or
  // zeroed), one group's integer sums folded in with the group's scales / biases (sb, the
  // biases bias_off further) and the rows' dx / xsum (row i's at i * ldg + g), stored.
  template <int MR>
  BITSWITCH_INLINE static void load_acc(__m256 (&acc)[MR][2], const float* c, int64_t ldc, bool zero) {
    for (int i = 0; i < MR; ++i) {
      acc[i][0] = zero ? _mm256_setzero_ps() : _mm256_loadu_ps(c + i * ldc);
      acc[i][1] = zero ? _mm256_setzero_ps() : _mm256_loadu_ps(c + i * ldc + kSlice);
    }
  }
  template <int MR>
  BITSWITCH_INLINE static void fold_group(__m256 (&acc)[MR][2], const __m256i (&sum)[MR][2], const float* sb,
                                          int64_t bias_off, const float* dx, const float* xs, int64_t ldg, int64_t g) {
    for (int h = 0; h < 2; ++h) {
      const __m256 sv = _mm256_loadu_ps(sb + h * kSlice), bv = _mm256_loadu_ps(sb + bias_off + h * kSlice);
      for (int i = 0; i < MR; ++i) {
        const __m256 f = _mm256_mul_ps(sv, _mm256_set1_ps(dx[i * ldg + g]));
        acc[i][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[i][h]), f, acc[i][h]);
        acc[i][h] = _mm256_fmadd_ps(bv, _mm256_set1_ps(xs[i * ldg + g]), acc[i][h]);
      }
    }
  }
  template <int MR>
  BITSWITCH_INLINE static void store_acc(const __m256 (&acc)[MR][2], float* c, int64_t ldc) {
    for (int i = 0; i < MR; ++i) {
      _mm256_storeu_ps(c + i * ldc, acc[i][0]);
      _mm256_storeu_ps(c + i * ldc + kSlice, acc[i][1]);
    }
  }
};

}  // namespace i8gemm
}  // namespace
}  // namespace cpu
}  // namespace bitswitch
