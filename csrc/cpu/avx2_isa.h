// The AVX2 unit's `Isa` traits (x86_qmatmul.h): the maddubs GEMV step, the 6x16 FMA
// micro-kernel and the decode attention rows. Shared by the AVX2 unit (avx2.cpp) and the
// AVX-VNNI unit (avx_vnni.cpp), which keeps everything but the GEMV step; each includes it
// under its own compiler flags (internal linkage, as x86_common.h).
#pragma once

#include "x86_attention.h"

namespace bitswitch {
namespace cpu {
namespace {

// Group factors (scale * dx) of the 8 int32 lanes of chunk c (0 or 1) of a step; f points
// at the step's first group. Lane l of chunk c covers elements 64c + 8l .. 64c + 8l + 7.
template <int G>
inline __m256 group_factors(const float* f, int c) {
  if (G == 128) return _mm256_broadcast_ss(f);
  if (G == 64) return _mm256_broadcast_ss(f + c);
  return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_broadcast_ss(f + 2 * c)), _mm_broadcast_ss(f + 2 * c + 1), 1);
}

struct Avx2 {
  using Acc = __m256;
  // x rows per GEMV pass: the codes of a chunk are unpacked once for all of them.
  static constexpr int kMaxMT = 4;
  // Weight rows advancing together through the GEMV steps (x86_qmatmul.h gemv_rows).
  static constexpr int kGemvRows = 4;
  static constexpr int kMR = 6, kNR = 16;

  static Acc zero() { return _mm256_setzero_ps(); }
  static __m256 fold(Acc v) { return v; }

  // Decode attention (x86_attention.h): one key row at a time against every row.
  static size_t decode_floats(int64_t rows, int64_t d, int64_t block_k) {
    return DotScratch::floats(rows, d, block_k);
  }
  static void decode_rows(const AttentionArgs& a, const AttnTask& t, const BlockList& blocks, int64_t bi0,
                          int64_t bi1, float* scratch, const DecodeRows& st) {
    attention_task_dot(a, t, blocks, bi0, bi1, scratch, st);
  }

  // One 128-element step (two 64-element chunks) of one weight row against MT x rows.
  // w0, w1: the step's 16 words of plane 0 / plane 1.  f: per x row, the step's first
  // group factor.  xq: per x row, the step's prepped bytes.  acc: per x row, 8 partial sums.
  template <int BITS, int G, int MT, bool LO>
  BITSWITCH_INLINE static void step(const uint32_t* w0, const uint32_t* w1, const float* const (&f)[MT],
                   const int8_t* const (&xq)[MT], Acc (&acc)[MT]) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i one = _mm256_set1_epi16(1);
    const __m256i x16 = _mm256_set1_epi16(16);
    // With the lo halves (act_bits 16) x is v = 256*hi + lo; without (act_bits 8), v = hi.
    const __m256i hi_w = _mm256_set1_epi16(LO ? 256 : 1);
    for (int c = 0; c < 2; ++c) {
      const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + 8 * c));
      const __m256i L = _mm256_and_si256(p, m4);
      const __m256i H = _mm256_and_si256(_mm256_srli_epi16(p, 4), m4);
      __m256i L1 = L, H1 = H;
      if (BITS == fmt::kInt8Bits) {
        const __m256i p1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w1 + 8 * c));
        L1 = _mm256_and_si256(p1, m4);
        H1 = _mm256_and_si256(_mm256_srli_epi16(p1, 4), m4);
      }
      for (int t = 0; t < MT; ++t) {
        // xv: [xe_hi 0..1 | xo_hi 2..3 | xe_lo 4..5 | xo_lo 6..7], 32 bytes each.
        const __m256i* xv = reinterpret_cast<const __m256i*>(xq[t]);
        const __m256i ehi = _mm256_load_si256(xv + c), ohi = _mm256_load_si256(xv + 2 + c);
        const __m256i hi = _mm256_add_epi16(_mm256_maddubs_epi16(L, ehi), _mm256_maddubs_epi16(H, ohi));
        __m256i i32;
        if (BITS == fmt::kInt8Bits) {
          // code 16q + r: 16 * (q . v) + (r . v).
          const __m256i rhi = _mm256_add_epi16(_mm256_maddubs_epi16(L1, ehi), _mm256_maddubs_epi16(H1, ohi));
          i32 = _mm256_add_epi32(_mm256_madd_epi16(hi, _mm256_mullo_epi16(hi_w, x16)), _mm256_madd_epi16(rhi, hi_w));
          if (LO) {
            const __m256i elo = _mm256_load_si256(xv + 4 + c), olo = _mm256_load_si256(xv + 6 + c);
            const __m256i lo = _mm256_add_epi16(_mm256_maddubs_epi16(L, elo), _mm256_maddubs_epi16(H, olo));
            const __m256i rlo = _mm256_add_epi16(_mm256_maddubs_epi16(L1, elo), _mm256_maddubs_epi16(H1, olo));
            i32 = _mm256_add_epi32(i32, _mm256_add_epi32(_mm256_madd_epi16(lo, x16), _mm256_madd_epi16(rlo, one)));
          }
        } else {
          i32 = _mm256_madd_epi16(hi, hi_w);
          if (LO) {
            const __m256i elo = _mm256_load_si256(xv + 4 + c), olo = _mm256_load_si256(xv + 6 + c);
            const __m256i lo = _mm256_add_epi16(_mm256_maddubs_epi16(L, elo), _mm256_maddubs_epi16(H, olo));
            i32 = _mm256_add_epi32(i32, _mm256_madd_epi16(lo, one));
          }
        }
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i32), group_factors<G>(f[t], c), acc[t]);
      }
    }
  }

  // c[MRt x 16] += x[MRt x klen] @ panel[klen x 16]; x[i][k] at x[i * ldx + k * ldk], c rows ldc
  // apart.
  template <int MRt>
  static void micro(const float* x, int64_t ldx, int64_t ldk, const float* panel, int64_t klen, float* c,
                    int64_t ldc) {
    __m256 acc[MRt][2];
#pragma GCC unroll 8
    for (int i = 0; i < MRt; ++i) {
      acc[i][0] = _mm256_loadu_ps(c + i * ldc);
      acc[i][1] = _mm256_loadu_ps(c + i * ldc + 8);
    }
    for (int64_t k = 0; k < klen; ++k, x += ldk) {
      const __m256 b0 = _mm256_load_ps(panel + k * kNR), b1 = _mm256_load_ps(panel + k * kNR + 8);
#pragma GCC unroll 8
      for (int i = 0; i < MRt; ++i) {
        const __m256 xv = _mm256_broadcast_ss(x + i * ldx);
        acc[i][0] = _mm256_fmadd_ps(xv, b0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(xv, b1, acc[i][1]);
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < MRt; ++i) {
      _mm256_storeu_ps(c + i * ldc, acc[i][0]);
      _mm256_storeu_ps(c + i * ldc + 8, acc[i][1]);
    }
  }
};

}  // namespace
}  // namespace cpu
}  // namespace bitswitch
