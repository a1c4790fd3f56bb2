// AVX-VNNI variant of qmatmul (`avxvnni`): AVX2 + FMA + F16C + AVX-VNNI, the VEX-encoded
// vpdpbusd on ymm registers that Intel's client cores from Alder Lake on (and the E-core
// Xeons) have without AVX-512. Everything but qmatmul is the AVX2 unit's.
//
// Small M (decode): the AVX2 GEMV (x86_qmatmul.h, avx2_isa.h) with vpdpbusd for the
// vpmaddubsw + vpmaddwd pairs. As in the AVX-512 unit, no int16 intermediate can saturate,
// so the INT8 view packs its planes into one 8-bit code c = 16q + r and costs the INT4
// view's dot products: per 32 plane bytes and x row, 2 vpdpbusd (4 at act_bits 16) where
// AVX2 spends 4 vpmaddubsw, 2 vpaddw and 2 vpmaddwd (8, 4 and 4 for INT8).
//
// Large M (prefill): the int8 GEMM (int8_gemm.h) on 8-output ymm slices, for every x at
// act_bits 8 and for bfloat16 / float16 x at act_bits 16 (both int8 halves of the GEMV's
// 15-bit x, whose error is far below those dtypes' own rounding); float32 x at act_bits 16
// keeps the exact float32 FMA GEMM, as on the AVX-512 variants.
//
// The assembler encodes a bare `vpdpbusd` on ymm as the EVEX (AVX512-VL) instruction,
// which these CPUs cannot run: the inline asm below says {vex}, as the intrinsic does.
//
// Built without compiler support for -mavxvnni this unit is a stub and the variant
// reports itself unsupported.
#include "kernels.h"

#if defined(BITSWITCH_HAVE_AVXVNNI)
#include "avx2_isa.h"
#include "int8_gemm_ymm.h"
#endif

namespace bitswitch {
namespace cpu {

#if !defined(BITSWITCH_HAVE_AVXVNNI)

bool avxvnni_built() { return false; }
Status qmatmul_avxvnni(const QMatmulArgs&, ThreadPool&) { return Status::kUnsupported; }

#else

namespace {

// acc + the four-product dot of each lane, VEX-encoded. As with the AVX-512 unit's zmm
// form (avx512_int8_gemm.h), gcc 12 would copy each accumulator of the intrinsic through
// a scratch register; the asm keeps it in place, and lets the signed operand (x) come
// straight from memory, which the GEMV's 16 accumulators need (all registers are taken).
BITSWITCH_INLINE __m256i dpbusd(__m256i acc, __m256i u8, __m256i s8) {
  asm("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(u8), "xm"(s8));
  return acc;
}

struct AvxVnni : Avx2 {
  // One 128-element step (two 64-element chunks) of one weight row against MT x rows
  // (arguments as in Avx2::step).
  template <int BITS, int G, int MT, bool LO>
  BITSWITCH_INLINE static void step(const uint32_t* w0, const uint32_t* w1, const float* const (&f)[MT],
                                    const int8_t* const (&xq)[MT], Acc (&acc)[MT]) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int c = 0; c < 2; ++c) {
      const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + 8 * c));
      __m256i ce = _mm256_and_si256(p, m4);                        // even elements
      __m256i co = _mm256_and_si256(_mm256_srli_epi16(p, 4), m4);  // odd elements
      if (BITS == fmt::kInt8Bits) {  // c = 16q + r: bytes below 16 shift without carrying
        const __m256i p1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w1 + 8 * c));
        ce = _mm256_or_si256(_mm256_slli_epi16(ce, 4), _mm256_and_si256(p1, m4));
        co = _mm256_or_si256(_mm256_slli_epi16(co, 4), _mm256_and_si256(_mm256_srli_epi16(p1, 4), m4));
      }
      for (int t = 0; t < MT; ++t) {
        // xv: [xe_hi 0..1 | xo_hi 2..3 | xe_lo 4..5 | xo_lo 6..7], 32 bytes each.
        const __m256i* xv = reinterpret_cast<const __m256i*>(xq[t]);
        const __m256i zero = _mm256_setzero_si256();
        __m256i i32 = dpbusd(dpbusd(zero, ce, _mm256_load_si256(xv + c)), co, _mm256_load_si256(xv + 2 + c));
        if (LO) {  // act_bits 16: v = 256*hi + lo
          const __m256i lo =
              dpbusd(dpbusd(zero, ce, _mm256_load_si256(xv + 4 + c)), co, _mm256_load_si256(xv + 6 + c));
          i32 = _mm256_add_epi32(_mm256_slli_epi32(i32, 8), lo);
        }
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i32), group_factors<G>(f[t], c), acc[t]);
      }
    }
  }
};

}  // namespace

namespace {
namespace i8gemm {

// The int8 GEMM's kernel on ymm registers: 3 x rows per register block (2 with the lo
// halves).
struct AvxVnniInt8 : YmmInt8Pack {
  // Of the 16 ymm registers: 2 * MR int32 sums (twice that with lo halves), 2 * MR float32
  // sums, 2 weight vectors and 1 broadcast x.
  template <bool LO>
  static constexpr int mr() {
    return LO ? 2 : 3;
  }

  // c[MR x 16] = (zero ? 0 : c) + the fold of `groups` groups of G inputs (arguments as in
  // the AVX-512 kernel's block, avx512_int8_gemm.h).
  template <int MR, int G, bool LO>
  __attribute__((noinline)) static void block(const int8_t* x, int64_t ldx, const uint8_t* w, int64_t groups,
                                              const float* sb, int64_t ldsb, const float* dx, const float* xs,
                                              int64_t ldg, float* c, int64_t ldc, bool zero) {
    __m256 acc[MR][2];
    load_acc<MR>(acc, c, ldc, zero);
    const int64_t bias_off = ldsb / 2;
    for (int64_t g = 0; g < groups; ++g, x += G, sb += ldsb) {
      __m256i sum[MR][2], lo[LO ? MR : 1][2];
      for (int i = 0; i < MR; ++i) sum[i][0] = sum[i][1] = _mm256_setzero_si256();
      for (int i = 0; i < (LO ? MR : 1); ++i) lo[i][0] = lo[i][1] = _mm256_setzero_si256();
#pragma GCC unroll 4
      for (int s = 0; s < G / kQuad; ++s, w += kStepBytes) {
        const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
        const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32));
        for (int i = 0; i < MR; ++i) {
          int32_t quad;
          std::memcpy(&quad, x + i * ldx + s * kQuad, sizeof(quad));
          const __m256i xv = _mm256_set1_epi32(quad);
          sum[i][0] = dpbusd(sum[i][0], w0, xv);
          sum[i][1] = dpbusd(sum[i][1], w1, xv);
          if (LO) {  // the lo halves, ldx / 2 past the hi halves
            std::memcpy(&quad, x + i * ldx + ldx / 2 + s * kQuad, sizeof(quad));
            const __m256i xl = _mm256_set1_epi32(quad);
            lo[i][0] = dpbusd(lo[i][0], w0, xl);
            lo[i][1] = dpbusd(lo[i][1], w1, xl);
          }
        }
      }
      if (LO)  // v = 256 hi + lo, exact in int32 (int8_gemm.h)
        for (int i = 0; i < MR; ++i)
          for (int h = 0; h < 2; ++h) sum[i][h] = _mm256_add_epi32(_mm256_slli_epi32(sum[i][h], 8), lo[i][h]);
      fold_group<MR>(acc, sum, sb, bias_off, dx, xs, ldg, g);
    }
    store_acc<MR>(acc, c, ldc);
  }
};

}  // namespace i8gemm
}  // namespace

bool avxvnni_built() { return true; }

Status qmatmul_avxvnni(const QMatmulArgs& a, ThreadPool& pool) {
  if (a.m > kGemvMaxM && (a.act_bits == kActBitsInt8 || a.x_dtype != DType::kFloat32))
    return i8gemm::run<i8gemm::AvxVnniInt8>(a, pool);
  return qmatmul_x86<AvxVnni>(a, pool);
}

#endif  // BITSWITCH_HAVE_AVXVNNI

}  // namespace cpu
}  // namespace bitswitch
