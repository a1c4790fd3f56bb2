// AVX512-BF16 variant of qmatmul (`avx512bf16`): the AVX-512 kernels, except that bf16 x
// with more than kGemvMaxM rows multiplies by the weights dequantized once per call to bf16,
// with vdpbf16ps (two bf16 products summed into each float32 lane). (act_bits 8, and
// float16 x, go to the AVX-512 unit's int8 GEMM, avx512_int8_gemm.h.) The contract is the
// AMX tile GEMM's (amx.cpp, bf16_panels.h):
//     y[m, n] = bf16( sum_k x[m, k] * w[n, k] ),  w[n, k] = bf16( s*c + b )
// with the sum in float32. vdpbf16ps does twice the multiply-adds of a float32 FMA per
// instruction, so on CPUs with AVX512-BF16 and no AMX (AMD Zen 4 and 5, Intel Cooper Lake)
// prefill runs at about twice the float32 GEMM of the avx512 variant (bench/RESULTS.md).
//
// Data flow per task (outputs n0 .. n0 + nb - 1, x rows m0 .. m0 + mrows - 1), as in the
// AMX dense GEMM:
//   for each panel of ks inputs (all of K unless the panel would pass kPanelBytes):
//     dequantize the nb x ks weights once into the pair layout (bf16_panels.h);
//     for each block of kMR x rows:
//       for each chunk of kKC inputs:        the rows' chunk (kMR x 512 bytes) stays in L1
//         for each 32-output block:          kMR x 32 float32 sums in 2 * kMR registers,
//                                            its 16 KB of weights streaming from L2
//       round the block's results to bf16 into y (last panel only).
// x is read in place: a pair of bf16 inputs is one dword, broadcast to the 16 lanes.
//
// Built without compiler support for AVX512-BF16 this unit is a stub and the variant
// reports itself unsupported. Built with BITSWITCH_EMULATE_AVX512 (a test build) its
// intrinsics map onto portable code (avx512_emulation.h), as the AVX-512 unit's do.
#include "kernels.h"

#if defined(BITSWITCH_HAVE_AVX512BF16)
#if defined(BITSWITCH_EMULATE_AVX512)
#include "avx512_emulation.h"
#endif
#include <immintrin.h>

#include <array>
#include <cstring>
#include <utility>

#include "bf16_panels.h"
#include "panel_tasks.h"
#include "scratch.h"
#include "thread_pool.h"
#include "x86_common.h"
#endif

namespace bitswitch {
namespace cpu {

#if !defined(BITSWITCH_HAVE_AVX512BF16)

bool avx512bf16_built() { return false; }
Status qmatmul_avx512bf16(const QMatmulArgs&, ThreadPool&) { return Status::kUnsupported; }

#else

namespace {

// Largest M left to the AVX-512 GEMV (as in x86_qmatmul.h).
constexpr int64_t kBf16GemvMaxM = 8;
// x rows per register block: 2 * kMR accumulators + 2 weight rows + 1 broadcast of the 32
// zmm registers.
constexpr int kMR = 12;
// Dequantized panel bytes: 512 KB, half of a Zen 4 / 5 L2, next to the x chunks and the
// float32 sums.
constexpr int64_t kPanelBytes = 512 << 10;
static_assert(kPanelBytes % (kKC * 2 * kBlockN) == 0, "whole chunks");

// c[MR x 32] = (zero ? 0 : c) + x[MR rows] w[block] over `steps` steps of 32 inputs. x: the
// rows' first input, rows ldx apart; w: the block's tile pairs from the first step on;
// c: rows of ldc floats.
template <int MR>
__attribute__((noinline)) void dp_block(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t steps, float* c,
                                        int64_t ldc, bool zero) {
  __m512 acc[MR][2];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    acc[i][0] = zero ? _mm512_setzero_ps() : _mm512_loadu_ps(c + i * ldc);
    acc[i][1] = zero ? _mm512_setzero_ps() : _mm512_loadu_ps(c + i * ldc + kTileRows);
  }
  for (int64_t s = 0; s < steps; ++s, x += kTileK, w += kPairElems) {
#pragma GCC unroll 2
    for (int p = 0; p < kTileRows; ++p) {  // row p: inputs 2p, 2p + 1 of the step
      const __m512bh b0 = (__m512bh)_mm512_loadu_si512(w + p * kTileK);
      const __m512bh b1 = (__m512bh)_mm512_loadu_si512(w + kTileElems + p * kTileK);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        int32_t pair;
        std::memcpy(&pair, x + i * ldx + 2 * p, sizeof(pair));
        const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
        acc[i][0] = _mm512_dpbf16_ps(acc[i][0], xv, b0);
        acc[i][1] = _mm512_dpbf16_ps(acc[i][1], xv, b1);
      }
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    _mm512_storeu_ps(c + i * ldc, acc[i][0]);
    _mm512_storeu_ps(c + i * ldc + kTileRows, acc[i][1]);
  }
}

using DpBlockFn = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, float*, int64_t, bool);

template <int... R>
constexpr auto make_dp_blocks(std::integer_sequence<int, R...>) {
  return std::array<DpBlockFn, sizeof...(R)>{dp_block<R + 1>...};
}
// kDpBlocks[r - 1]: blocks of r rows (the last block of x may be short).
constexpr auto kDpBlocks = make_dp_blocks(std::make_integer_sequence<int, kMR>{});

struct Ctx : PanelSplit {
  const QMatmulArgs* a;
};

// One task: outputs [n0, n0 + nb) for x rows [m0, m0 + mrows). panel: nb x ks bf16; sb:
// [2 * ks / 32][nb] floats; acc: the float32 sums, [kMR][nb] when one panel covers K, else
// [mrows][nb] (kept across panels).
template <int BITS>
void task(const Ctx& ctx, uint16_t* panel, float* sb, float* acc, int64_t n0, int64_t m0, int64_t mrows) {
  const QMatmulArgs& a = *ctx.a;
  const int64_t nb = ctx.nb;
  const int64_t ncols = imin(nb, a.n - n0), nbv = round_up(ncols, kBlockN);  // whole blocks
  const int64_t mend = imin(m0 + mrows, a.m);
  const uint16_t* x = static_cast<const uint16_t*>(a.x);
  for (int64_t k0 = 0; k0 < a.k; k0 += ctx.ks) {
    const int64_t kl = imin(ctx.ks, a.k - k0);
    const bool first = k0 == 0, last = k0 + kl == a.k;
    PanelLayout layout{panel, kl / kTileK, nbv / kBlockN};
    dequant_panel<BITS>(a, n0, nb, nbv, k0, kl, sb, layout);
    for (int64_t m = m0; m < mend; m += kMR) {
      const int64_t rows = imin(kMR, mend - m);
      float* arow = ctx.ks == a.k ? acc : acc + (m - m0) * nb;
      const DpBlockFn block = kDpBlocks[rows - 1];
      for (int64_t c0 = 0; c0 < layout.steps; c0 += kKCSteps) {
        const int64_t cs = imin(kKCSteps, layout.steps - c0);
        const uint16_t* xc = x + m * a.k + k0 + c0 * kTileK;
        for (int64_t j = 0; j < nbv; j += kBlockN)
          block(xc, a.k, layout.block(j / kBlockN, c0), cs, arow + j, nb, first && c0 == 0);
      }
      if (last) dense_store_y(a, arow, nb, m, rows, n0, ncols);
    }
  }
}

template <int BITS>
Status dense_gemm(const QMatmulArgs& a, ThreadPool& pool) {
  Ctx ctx;
  ctx.a = &a;
  static_cast<PanelSplit&>(ctx) =
      split_panels(a.m, a.n, a.k, a.m * a.k * 2, pool.num_threads(), kBlockN, kMR, kKC, kPanelBytes, 2);
  const size_t panel_bytes = size_t(ctx.nb * ctx.ks) * 2;
  const size_t sb_bytes = size_t(2 * (ctx.ks / fmt::kMinGroupSize) * ctx.nb) * 4;
  const size_t acc_bytes = size_t((ctx.ks < a.k ? ctx.mrows : kMR) * ctx.nb) * 4;
  return run_panel_tasks(pool, ctx, a.m, panel_bytes + sb_bytes, acc_bytes,
                         [&](int64_t n0, int64_t m0, int64_t rows, char* buf, float* acc) {
                           task<BITS>(ctx, reinterpret_cast<uint16_t*>(buf),
                                      reinterpret_cast<float*>(buf + panel_bytes), acc, n0, m0, rows);
                         });
}

}  // namespace

bool avx512bf16_built() { return true; }

Status qmatmul_avx512bf16(const QMatmulArgs& a, ThreadPool& pool) {
  if (a.m <= kBf16GemvMaxM) return qmatmul_avx512(a, pool);
  // act_bits 8, and float16 x: the AVX-512 unit's int8 GEMM (avx512_int8_gemm.h), for
  // float16 x on the GEMV's 15-bit x, whose error (~5e-5) is far below float16's own and
  // which runs at a median 1.9x the float32 GEMM on a Zen 5 (bench/RESULTS.md). float32 x keeps
  // the exact FMA GEMM (~1e-6): whoever passes float32 asks for it.
  if (a.x_dtype == DType::kFloat16 || a.act_bits == kActBitsInt8) return qmatmul_avx512_int8(a, pool);
  if (a.x_dtype != DType::kBFloat16) return qmatmul_avx512(a, pool);
  if (!fmt::is_supported_group_size(a.group_size) || !(a.bits == fmt::kInt4Bits || a.bits == fmt::kInt8Bits))
    return Status::kInvalidArgument;
  return a.bits == fmt::kInt8Bits ? dense_gemm<fmt::kInt8Bits>(a, pool) : dense_gemm<fmt::kInt4Bits>(a, pool);
}

#endif

}  // namespace cpu
}  // namespace bitswitch
