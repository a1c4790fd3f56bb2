// The AVX-512 VNNI kernels of the int8 GEMM (int8_gemm.h has the contract, the layout and
// the driver): 16 outputs per zmm of sums, blocks of 32 outputs, 6 x rows per register
// block (4 with the lo halves). Used for M above the GEMV's rows by the `avx512` and
// `avx512bf16` variants at act_bits 8, and by `avx512bf16` (the choice on AMD) for float16
// x at act_bits 16.
//
// Per group the integer sums are folded into float32 (a convert and two FMAs per 16 outputs
// and x row), which costs a fifth of the group's dot products at G = 64.
//
// Include only from the AVX-512 unit (avx512.cpp), after x86_qmatmul.h.
#pragma once

#include <immintrin.h>

#include <cstring>

#include "avx512_transpose.h"
#include "int8_gemm.h"

namespace bitswitch {
namespace cpu {
namespace {
namespace i8gemm {

// The 64 codes of 32 plane bytes, one per byte in input order (a plane byte holds an even
// input in its low nibble and the next odd one in its high nibble).
inline __m512i expand_nibbles(__m256i bytes) {
  const __m512i w = _mm512_cvtepu8_epi16(bytes);  // word j = plane byte j
  // (w | w << 4) & 0x0F0F: low byte the low nibble, high byte the high nibble.
  return _mm512_ternarylogic_epi32(w, _mm512_slli_epi16(w, 4), _mm512_set1_epi32(0x0F0F0F0F), 0xA8);
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

struct Avx512Int8 {
  static constexpr int kSlice = 16;
  static constexpr int kBlockN = 2 * kSlice;
  static constexpr int64_t kStepBytes = kBlockN * kQuad;  // 128
  // x rows per register block: 2 * MR int32 sums (twice that with lo halves) + 2 * MR
  // float32 sums + 2 weight vectors of the 32 zmm registers, the rest for the fold.
  template <bool LO>
  static constexpr int mr() {
    return LO ? 4 : 6;
  }

  // Codes of outputs [n0, n0 + 16) (zero past N) for inputs [k0, k0 + kl) into slice `half`
  // of a block's steps: step t at dst + t * kStepBytes + half * 64.
  template <int BITS>
  static void pack_slice(const QMatmulArgs& a, int64_t n0, int64_t k0, int64_t kl, uint8_t* dst, int half) {
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
        prefetch_ahead<BITS>(a, n, k0 + kk, off, row_bytes);
      }
      transpose16x16_epi32(r);
      uint8_t* d = dst + (kk / kQuad) * kStepBytes + half * 64;
      const int steps = full ? 16 : 8;
      for (int t = 0; t < steps; ++t) _mm512_storeu_si512(d + t * kStepBytes, r[t]);
    }
  }

  // The scales and biases of outputs [n0, n0 + nbv) for groups [g0, g0 + groups), as the view
  // reads them (format.h's int8_scale and int8_bias for the INT8 view): group g's scales at
  // sb + g * 2 * nbv, its biases nbv further; zero past N. 16 outputs x 16 groups at a time,
  // transposed in registers (the scales are stored [N][groups]).
  template <int BITS>
  static void pack_affine(const QMatmulArgs& a, int64_t n0, int64_t nbv, int64_t g0, int64_t groups, float* sb) {
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

  // c[MR x 32] = (zero ? 0 : c) + the fold of `groups` groups of G inputs:
  //   x: the rows' first input (int8), rows ldx apart;  w: the block's steps from there on;
  //   sb: group g's 32 scales at sb + g * ldsb and its 32 biases ldsb / 2 further;
  //   dx, xs: row i's group g at dx[i * ldg + g], xs[i * ldg + g];  c: rows ldc apart.
  template <int MR, int G, bool LO>
  __attribute__((noinline)) static void block(const int8_t* x, int64_t ldx, const uint8_t* w, int64_t groups,
                                              const float* sb, int64_t ldsb, const float* dx, const float* xs,
                                              int64_t ldg, float* c, int64_t ldc, bool zero) {
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
};

}  // namespace i8gemm

inline Status qmatmul_int8_gemm(const QMatmulArgs& a, ThreadPool& pool) {
  return i8gemm::run<i8gemm::Avx512Int8>(a, pool);
}

}  // namespace
}  // namespace cpu
}  // namespace bitswitch
