// AVX2 + FMA + F16C variants of qmatmul and attention (x86_attention.h: the micro-kernel
// of avx2_isa.h serves both of its products).
//
// Small M (decode): an integer GEMV that streams the weights once at memory bandwidth.
// x is prepared once per call (x86_common.h) as 15-bit integers split into two int8
// halves, so each 32 plane bytes (64 weights) cost a shift, two nibble masks and four
// vpmaddubsw per x row. vpmaddubsw adds pairs of u8*s8 products in int16: with codes <= 15 and
// |x half| <= 128 a pair stays below 3840, and two pairs below 7680, so nothing
// saturates; the INT8 view must keep its planes apart because a whole 8-bit code
// (<= 255) would.
//
// Large M (prefill): dequantized float32 panels and a 6x16 FMA micro-kernel
// (x86_qmatmul.h), 12 accumulators + 2 panel rows + 1 broadcast of 16 ymm registers.
// At act_bits 8 the INT4 view's large M runs the int8 GEMM (int8_gemm.h) instead, with
// vpmaddubsw on the packed codes: below.
//
// The traits struct (Avx2) lives in avx2_isa.h, shared with the AVX-VNNI unit.
#include "avx2_isa.h"
#include "int8_gemm_ymm.h"

namespace bitswitch {
namespace cpu {
namespace {
namespace i8gemm {

// The int8 GEMM's kernel for AVX2, INT4 view at act_bits 8 only: vpmaddubsw multiplies the
// codes (u8) by int8 x and adds pairs of products into int16 lanes, which saturate past
// 32767. A pair is at most 2 * 15 * 127 = 3810, so kFlushSteps = 8 steps of pairs add up in
// int16 (<= 30480) before vpmaddwd widens them into the group's int32 sums: per 4 inputs and
// 8 outputs one vpmaddubsw and one vpaddw, where the FMA GEMM spends four FMAs. (The INT8
// view's 8-bit codes would saturate a single pair; 15-bit x needs two products per code:
// both keep the FMA GEMM.)
struct Avx2Int8 : YmmInt8Pack {
  static constexpr int kFlushSteps = 8;
  // Of the 16 ymm registers: 2 * MR int16 and 2 * MR int32 sums, 2 * MR float32 sums, 2
  // weight vectors and 1 broadcast x.
  template <bool LO>
  static constexpr int mr() {
    return 2;
  }

  // c[MR x 16] = (zero ? 0 : c) + the fold of `groups` groups of G inputs (arguments as in
  // the AVX-512 kernel's block, avx512_int8_gemm.h).
  template <int MR, int G, bool LO>
  __attribute__((noinline)) static void block(const int8_t* x, int64_t ldx, const uint8_t* w, int64_t groups,
                                              const float* sb, int64_t ldsb, const float* dx, const float* xs,
                                              int64_t ldg, float* c, int64_t ldc, bool zero) {
    static_assert(!LO, "15-bit x is not multiplied by this kernel");
    static_assert((G / kQuad) % kFlushSteps == 0, "a group is whole flushes");
    __m256 acc[MR][2];
    load_acc<MR>(acc, c, ldc, zero);
    const __m256i ones = _mm256_set1_epi16(1);
    const int64_t bias_off = ldsb / 2;
    for (int64_t g = 0; g < groups; ++g, x += G, sb += ldsb) {
      __m256i sum[MR][2];
      for (int i = 0; i < MR; ++i) sum[i][0] = sum[i][1] = _mm256_setzero_si256();
      for (int s0 = 0; s0 < G / kQuad; s0 += kFlushSteps) {
        __m256i p[MR][2];
        for (int i = 0; i < MR; ++i) p[i][0] = p[i][1] = _mm256_setzero_si256();
#pragma GCC unroll 2
        for (int s = s0; s < s0 + kFlushSteps; ++s, w += kStepBytes) {
          const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
          const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32));
          for (int i = 0; i < MR; ++i) {
            int32_t quad;
            std::memcpy(&quad, x + i * ldx + s * kQuad, sizeof(quad));
            const __m256i xv = _mm256_set1_epi32(quad);
            p[i][0] = _mm256_add_epi16(p[i][0], _mm256_maddubs_epi16(w0, xv));
            p[i][1] = _mm256_add_epi16(p[i][1], _mm256_maddubs_epi16(w1, xv));
          }
        }
        for (int i = 0; i < MR; ++i)
          for (int h = 0; h < 2; ++h) sum[i][h] = _mm256_add_epi32(sum[i][h], _mm256_madd_epi16(p[i][h], ones));
      }
      fold_group<MR>(acc, sum, sb, bias_off, dx, xs, ldg, g);
    }
    store_acc<MR>(acc, c, ldc);
  }
};

}  // namespace i8gemm
}  // namespace

Status qmatmul_avx2(const QMatmulArgs& a, ThreadPool& pool) {
  if (a.m > kGemvMaxM && a.act_bits == kActBitsInt8 && a.bits == fmt::kInt4Bits)
    return i8gemm::gemm_g<i8gemm::Avx2Int8, fmt::kInt4Bits, false>(a, pool);
  return qmatmul_x86<Avx2>(a, pool);
}

Status attention_avx2(const AttentionArgs& a, ThreadPool& pool) { return attention_x86<Avx2>(a, pool); }

}  // namespace cpu
}  // namespace bitswitch
