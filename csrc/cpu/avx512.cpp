// AVX-512 (F, BW, DQ, VL) + VNNI variants of qmatmul and attention (x86_attention.h).
//
// Small M: the integer GEMV of the AVX2 unit with one 64-byte step per weight row and
// vpdpbusd, which multiplies unsigned by signed bytes and sums four products straight
// into int32. With no int16 intermediate to saturate, the INT8 view packs its two planes
// into one 8-bit code c = 16q + r (a shift and an OR per plane) and needs the same four
// dot products per step as the INT4 view.
//
// Large M: dequantized float32 panels and an 8x32 FMA micro-kernel (16 accumulators); at
// act_bits 8, int8 x times the codes with vpdpbusd (avx512_int8_gemm.h).
//
// Decode attention: avx512_attention.h.
//
// Built with BITSWITCH_EMULATE_AVX512 the 512-bit intrinsics map onto portable code
// (avx512_emulation.h) so this unit's logic is tested on CPUs without AVX-512.
#if defined(BITSWITCH_EMULATE_AVX512)
#include "avx512_emulation.h"
#endif

#include "avx512_attention.h"
#include "avx512_int8_gemm.h"

namespace bitswitch {
namespace cpu {
namespace {

// Group factors (scale * dx) of the 16 int32 lanes of a step; f points at the step's
// first group. Lane l covers elements 8l .. 8l + 7.
template <int G>
inline __m512 group_factors(const float* f) {
  if (G == 128) return _mm512_set1_ps(f[0]);
  if (G == 64)
    return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_broadcast_ss(f)), _mm256_broadcast_ss(f + 1), 1);
  const __m512i idx = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_loadu_ps(f)));
}

struct Avx512 {
  using Acc = __m512;
  // x rows per GEMV pass: the codes of a step are unpacked once for all of them.
  static constexpr int kMaxMT = 4;
  // Weight rows advancing together through the GEMV steps (x86_qmatmul.h gemv_rows).
  static constexpr int kGemvRows = 4;
  static constexpr int kMR = 8, kNR = 32;

  static Acc zero() { return _mm512_setzero_ps(); }
  static __m256 fold(Acc v) { return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)); }

  // Decode attention: 16 keys per score vector (avx512_attention.h).
  static size_t decode_floats(int64_t rows, int64_t d, int64_t block_k) {
    return Decode512Scratch::floats(rows, d, block_k);
  }
  static void decode_rows(const AttentionArgs& a, const AttnTask& t, const BlockList& blocks, int64_t bi0,
                          int64_t bi1, float* scratch, const DecodeRows& st) {
    decode_rows_avx512(a, t, blocks, bi0, bi1, scratch, st);
  }

  // One 128-element step of one weight row against MT x rows (arguments as in the AVX2 unit).
  template <int BITS, int G, int MT, bool LO>
  BITSWITCH_INLINE static void step(const uint32_t* w0, const uint32_t* w1, const float* const (&f)[MT],
                   const int8_t* const (&xq)[MT], Acc (&acc)[MT]) {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const __m512i zero = _mm512_setzero_si512();
    const __m512i p = _mm512_loadu_si512(w0);
    __m512i ce = _mm512_and_si512(p, m4);                        // even elements
    __m512i co = _mm512_and_si512(_mm512_srli_epi16(p, 4), m4);  // odd elements
    if (BITS == fmt::kInt8Bits) {
      // Every byte holds a value below 16, so shifting 16-bit lanes by 4 cannot carry
      // into the neighbouring byte.
      const __m512i p1 = _mm512_loadu_si512(w1);
      ce = _mm512_or_si512(_mm512_slli_epi16(ce, 4), _mm512_and_si512(p1, m4));
      co = _mm512_or_si512(_mm512_slli_epi16(co, 4), _mm512_and_si512(_mm512_srli_epi16(p1, 4), m4));
    }
    for (int t = 0; t < MT; ++t) {
      const __m512i* xv = reinterpret_cast<const __m512i*>(xq[t]);  // xe_hi, xo_hi, xe_lo, xo_lo
      __m512i i32 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, ce, _mm512_load_si512(xv)), co,
                                        _mm512_load_si512(xv + 1));
      if (LO) {  // act_bits 16: v = 256*hi + lo
        const __m512i lo = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, ce, _mm512_load_si512(xv + 2)), co,
                                               _mm512_load_si512(xv + 3));
        i32 = _mm512_add_epi32(_mm512_slli_epi32(i32, 8), lo);
      }
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i32), group_factors<G>(f[t]), acc[t]);
    }
  }

  // c[MRt x 32] += x[MRt x klen] @ panel[klen x 32]; x[i][k] at x[i * ldx + k * ldk].
  template <int MRt>
  static void micro(const float* x, int64_t ldx, int64_t ldk, const float* panel, int64_t klen, float* c,
                    int64_t ldc) {
    __m512 acc[MRt][2];
#pragma GCC unroll 8
    for (int i = 0; i < MRt; ++i) {
      acc[i][0] = _mm512_loadu_ps(c + i * ldc);
      acc[i][1] = _mm512_loadu_ps(c + i * ldc + 16);
    }
    for (int64_t k = 0; k < klen; ++k, x += ldk) {
      const __m512 b0 = _mm512_load_ps(panel + k * kNR), b1 = _mm512_load_ps(panel + k * kNR + 16);
#pragma GCC unroll 8
      for (int i = 0; i < MRt; ++i) {
        const __m512 xv = _mm512_set1_ps(x[i * ldx]);
        acc[i][0] = _mm512_fmadd_ps(xv, b0, acc[i][0]);
        acc[i][1] = _mm512_fmadd_ps(xv, b1, acc[i][1]);
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < MRt; ++i) {
      _mm512_storeu_ps(c + i * ldc, acc[i][0]);
      _mm512_storeu_ps(c + i * ldc + 16, acc[i][1]);
    }
  }
};

}  // namespace

Status qmatmul_avx512(const QMatmulArgs& a, ThreadPool& pool) {
  if (a.m > kGemvMaxM && a.act_bits == kActBitsInt8) return qmatmul_int8_gemm(a, pool);
  return qmatmul_x86<Avx512>(a, pool);
}

Status qmatmul_avx512_int8(const QMatmulArgs& a, ThreadPool& pool) {
  if (a.m <= kGemvMaxM) return qmatmul_x86<Avx512>(a, pool);
  return qmatmul_int8_gemm(a, pool);
}

Status attention_avx512(const AttentionArgs& a, ThreadPool& pool) { return attention_x86<Avx512>(a, pool); }

}  // namespace cpu
}  // namespace bitswitch
