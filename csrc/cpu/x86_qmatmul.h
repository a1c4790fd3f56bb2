// The x86 qmatmul drivers shared by the AVX2 and AVX-512 units: blocking, threading,
// tails and dispatch. Each unit supplies an `Isa` traits struct with its register type,
// its 128-element GEMV step and its GEMM micro-kernel:
//
//   struct Isa {
//     using Acc = __m256 / __m512;             // one float accumulator register
//     static constexpr int kMaxMT;             // x rows per GEMV pass
//     static constexpr int kGemvRows;          // weight rows per GEMV pass (1 or 4)
//     static constexpr int kMR, kNR;           // GEMM micro-kernel tile (kNR a multiple of 8)
//     static Acc zero();
//     static __m256 fold(Acc);                // the 8-lane partial sums of an accumulator
//     template <int BITS, int G, int MT, bool LO>          // LO: the act_bits 16 lo halves
//     static void step(w0, w1, f, xq, Acc (&acc)[MT]);   // one 128-element step of one row
//     template <int MRt>
//     static void micro(x, ldx, ldk, panel, klen, c, ldc);  // c[MRt x kNR] += x @ panel,
//                                              // x[i][k] at x[i * ldx + k * ldk]
//   };
#pragma once

#include "x86_common.h"

#include "scratch.h"
#include "thread_pool.h"

namespace bitswitch {
namespace cpu {
namespace {

// Largest M served by the GEMV path. Above it unpacking the weights once per x row is no
// longer cheap and the FMA GEMM wins (measured with `bitswitch bench kernels`).
constexpr int64_t kGemvMaxM = 8;
// How far ahead each weight row's stream is prefetched into L1, in bytes of one plane: the
// kGemvRows rows of a pass advance in lockstep, so the bytes in flight per thread are about
// kGemvRows times this, and a row's prefetch runs on into the same row of a later pass.
// Measured on the 0.6B model's decode GEMVs (INT8, 2 threads, Sapphire Rapids VM) as a
// distance in memory, which at K = 1024 is 4x this: no prefetch 40.5 ms, 8 KB 27.7 ms,
// 4 KB 27.1, 16 KB 31.7, 64 KB 34.8. An earlier version prefetched a fixed distance ahead
// in memory, which for rows longer than 4 KB landed on rows of the pass being read: the
// down_proj GEMVs of 4B / 8B (K = 9728 / 12288) ran at 1/1.3 (INT4) and 1/1.16 (INT8) of
// their speed now, interleaved A/B on an AVX-512 EPYC; 1 / 2 / 4 / 8 KB per row measured
// within 3% of each other on every shape there.
constexpr int64_t kPrefetchBytes = 2048;
// GEMM blocking: kNB output columns per task, kKB deep panels (64 x 256 float32 = 64 KB,
// resident in L2 while every row of x streams past it).
constexpr int kNB = 64;
constexpr int64_t kKB = 256;

struct GemvCtx {
  const QMatmulArgs* a;
  XPrep xp;
  int64_t rows_per_task;    // a multiple of Isa::kGemvRows, except for the last task
  int64_t prefetch_words;   // software prefetch distance in words of one plane
  int64_t prefetch_rows;    // the same in rows (where the scales' prefetch points)
  int64_t gpad;             // groups per row padded to whole steps
};

// For x row t of a pass, the float work of the GEMV done once per group instead of once
// per dot product: f[t][g] = s_eff[g] * dx[t][g] (zero past the last group, for the padded
// step), and the bias half of y, sum_g b_eff[g] * xsum[t][g], left as 8 partial sums. The
// steps then need one convert and one FMA with a broadcast per group.
template <int BITS, DType SD, int MT>
BITSWITCH_INLINE void precompute_groups(const QMatmulArgs& a, const GemvCtx& ctx, int64_t row, int64_t m0, float* f,
                              __m256 (&bias)[MT]) {
  const XPrep& xp = ctx.xp;
  const int64_t groups = xp.groups, es = dtype_size(SD);
  const char* srow = static_cast<const char*>(a.scales) + row * groups * es;
  const char* brow = static_cast<const char*>(a.biases) + row * groups * es;
  // INT8 view: b_eff = b - 7.5 * s / 16 (the 1/16 of s_eff is folded into dx).
  const __m256 c8 = _mm256_set1_ps(-fmt::kResidualCenter / fmt::kResidualDivisor);
  for (int t = 0; t < MT; ++t) {
    const float* dx = xp.dx(m0 + t);
    const float* xs = xp.xsum(m0 + t);
    float* ft = f + t * ctx.gpad;
    __m256 bacc = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= groups; g += 8) {
      const __m256 sv = load8_t<SD>(srow + g * es);
      const __m256 xsv = _mm256_loadu_ps(xs + g);
      _mm256_storeu_ps(ft + g, _mm256_mul_ps(sv, _mm256_loadu_ps(dx + g)));
      __m256 bv = load8_t<SD>(brow + g * es);
      if (BITS == fmt::kInt8Bits) bv = _mm256_fmadd_ps(sv, c8, bv);
      bacc = _mm256_fmadd_ps(bv, xsv, bacc);
    }
    float tail = 0.0f;
    for (; g < groups; ++g) {
      const float sc = load_f32(a.scales, SD, row * groups + g), bi = load_f32(a.biases, SD, row * groups + g);
      ft[g] = sc * dx[g];
      tail += (BITS == fmt::kInt8Bits ? fmt::int8_bias(sc, bi) : bi) * xs[g];
    }
    for (; g < ctx.gpad; ++g) ft[g] = 0.0f;  // only when K % 128 != 0
    bias[t] = _mm256_add_ps(bacc, _mm256_setr_ps(tail, 0, 0, 0, 0, 0, 0, 0));
  }
}

// Weight rows [row, row + R) against x rows [m0, m0 + MT); y[m0 + t] of row row + r goes to
// yrow[r + t * ld]. R = Isa::kGemvRows rows advance through their steps together: they
// share the x loads and the loop, and their horizontal sums share one reduction. With R = 1
// a row of the 0.6B model's K = 1024 (8 steps) spent ~40% of its time outside its steps.
// The R rows are adjacent in memory, so the reads stay one sequential region per task.
// f: scratch for the group factors of R * MT (row, x row) pairs.
template <class Isa, int BITS, int G, DType SD, bool LO, int MT, int R>
BITSWITCH_INLINE void gemv_rows(const GemvCtx& ctx, int64_t row, int64_t m0, float* f, float* yrow, int64_t ld) {
  using Acc = typename Isa::Acc;
  const QMatmulArgs& a = *ctx.a;
  const XPrep& xp = ctx.xp;
  const int64_t words = fmt::words_per_row(a.k);
  const int64_t full_steps = a.k / kStep;
  constexpr int64_t kGroupsPerStep = kStep / G;
  const uint32_t* w0 = a.plane0 + row * words;
  const uint32_t* w1 = BITS == fmt::kInt8Bits ? a.plane1 + row * words : w0;

  if (m0 == 0) {
    // The scales and biases are separate streams from the planes: prefetch those of the
    // rows being prefetched too, or every row starts with cache misses.
    const int64_t es = dtype_size(SD);
    const int64_t ahead = imin(row + ctx.prefetch_rows, a.n - 1);
    _mm_prefetch(static_cast<const char*>(a.scales) + ahead * xp.groups * es, _MM_HINT_T0);
    _mm_prefetch(static_cast<const char*>(a.biases) + ahead * xp.groups * es, _MM_HINT_T0);
  }
  __m256 part[R][MT];
  for (int r = 0; r < R; ++r) precompute_groups<BITS, SD, MT>(a, ctx, row + r, m0, f + r * MT * ctx.gpad, part[r]);

  Acc acc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < MT; ++t) acc[r][t] = Isa::zero();
  const int8_t* xq[MT];
  const float* fs[R][MT];
  for (int64_t s = 0; s < full_steps; ++s) {
    for (int t = 0; t < MT; ++t) xq[t] = xp.q(m0 + t, s);
    for (int r = 0; r < R; ++r) {
      const uint32_t* s0 = w0 + r * words + s * kStepWords;
      const uint32_t* s1 = w1 + r * words + s * kStepWords;
      // The word this row's stream reads prefetch_words from now: further along the row,
      // or in the same row of a later group of R (the R rows advance in lockstep).
      const int64_t ahead = s * kStepWords + ctx.prefetch_words;
      const int64_t pf = (r + R * (ahead / words)) * words + ahead % words;
      _mm_prefetch(reinterpret_cast<const char*>(w0 + pf), _MM_HINT_T0);
      if (BITS == fmt::kInt8Bits) _mm_prefetch(reinterpret_cast<const char*>(w1 + pf), _MM_HINT_T0);
      for (int t = 0; t < MT; ++t) fs[r][t] = f + (r * MT + t) * ctx.gpad + s * kGroupsPerStep;
      Isa::template step<BITS, G, MT, LO>(s0, s1, fs[r], xq, acc[r]);
    }
  }
  if (full_steps < xp.steps) {
    // K % 128 != 0: the last partial step runs on zero-padded copies of the planes (x and
    // the group factors are padded with zeros too).
    for (int t = 0; t < MT; ++t) xq[t] = xp.q(m0 + t, full_steps);
    const int64_t wl = words - full_steps * kStepWords;
    for (int r = 0; r < R; ++r) {
      alignas(64) uint32_t t0[kStepWords] = {}, t1[kStepWords] = {};
      std::memcpy(t0, w0 + r * words + full_steps * kStepWords, size_t(wl) * 4);
      if (BITS == fmt::kInt8Bits) std::memcpy(t1, w1 + r * words + full_steps * kStepWords, size_t(wl) * 4);
      for (int t = 0; t < MT; ++t) fs[r][t] = f + (r * MT + t) * ctx.gpad + full_steps * kGroupsPerStep;
      Isa::template step<BITS, G, MT, LO>(t0, t1, fs[r], xq, acc[r]);
    }
  }
  for (int t = 0; t < MT; ++t) {
    if constexpr (R == 4) {
      _mm_storeu_ps(yrow + t * ld, hsum4(_mm256_add_ps(part[0][t], Isa::fold(acc[0][t])),
                                         _mm256_add_ps(part[1][t], Isa::fold(acc[1][t])),
                                         _mm256_add_ps(part[2][t], Isa::fold(acc[2][t])),
                                         _mm256_add_ps(part[3][t], Isa::fold(acc[3][t]))));
    } else {
      for (int r = 0; r < R; ++r) yrow[r + t * ld] = hsum(_mm256_add_ps(part[r][t], Isa::fold(acc[r][t])));
    }
  }
}

// Every row of [start, end) against x rows [m0, m0 + MT).
template <class Isa, int BITS, int G, DType SD, bool LO, int MT>
inline void gemv_block(const GemvCtx& ctx, int64_t start, int64_t end, int64_t m0, float* f, float* yf, int64_t ld) {
  constexpr int R = Isa::kGemvRows;
  int64_t row = start;
  for (; row + R <= end; row += R)
    gemv_rows<Isa, BITS, G, SD, LO, MT, R>(ctx, row, m0, f, yf + (row - start) + m0 * ld, ld);
  for (; row < end; ++row) gemv_rows<Isa, BITS, G, SD, LO, MT, 1>(ctx, row, m0, f, yf + (row - start) + m0 * ld, ld);
}

template <class Isa, int BITS, int G, DType SD, bool LO>
Status gemv(const QMatmulArgs& a, ThreadPool& pool) {
  GemvCtx ctx;
  ctx.a = &a;
  ctx.xp = plan_xprep(a.k, G);
  ctx.xp.base = static_cast<uint8_t*>(thread_scratch(kScratchX, size_t(ctx.xp.row_bytes * a.m)));
  if (!ctx.xp.base) return Status::kOutOfMemory;
  const float dx_mult = BITS == fmt::kInt8Bits ? 1.0f / fmt::kResidualDivisor : 1.0f;
  const int64_t es = dtype_size(a.x_dtype);
  for (int64_t m = 0; m < a.m; ++m)
    prep_x_row(static_cast<const char*>(a.x) + m * a.k * es, a.x_dtype, a.k, G, a.act_bits, dx_mult, ctx.xp, m);
  ctx.gpad = ctx.xp.steps * (kStep / G);

  ctx.prefetch_words = kPrefetchBytes / 4;
  ctx.prefetch_rows = Isa::kGemvRows * (1 + ctx.prefetch_words / fmt::words_per_row(a.k));
  // Two tasks per thread: each task is one sequential stream, and every task start costs
  // a prefetch ramp (the first kPrefetchBytes are not prefetched, the hardware prefetcher
  // retrains). Measured on the 0.6B model's decode GEMVs, streamed from DRAM, 2 threads:
  // 16 tasks per thread 32.0 ms, 8: 27.9, 4: 27.7, 2: 26.0, 1: 26.0 (INT8); two keep a
  // little room for balancing on a noisy machine (a task that starts late is picked up
  // by the other thread).
  ctx.rows_per_task = round_up(imax(1, a.n / (int64_t(pool.num_threads()) * 2)), Isa::kGemvRows);
  const int64_t tasks = (a.n + ctx.rows_per_task - 1) / ctx.rows_per_task;
  bool oom = false;
  pool.parallel_for(tasks, [&ctx, &oom](int64_t task, int) {
    const QMatmulArgs& a = *ctx.a;
    const int64_t start = task * ctx.rows_per_task, end = imin(a.n, start + ctx.rows_per_task), ld = end - start;
    // Group factors, and the task's y in float32: converted to x's dtype 8 at a time at the end.
    float* f = static_cast<float*>(thread_scratch(kScratchPanel, size_t(Isa::kGemvRows * Isa::kMaxMT * ctx.gpad) * 4));
    float* yf = static_cast<float*>(thread_scratch(kScratchAcc, size_t(a.m * ld) * 4));
    if (!f || !yf) {
      oom = true;
      return;
    }
    int64_t m0 = 0;
    for (; m0 + Isa::kMaxMT <= a.m; m0 += Isa::kMaxMT)
      gemv_block<Isa, BITS, G, SD, LO, Isa::kMaxMT>(ctx, start, end, m0, f, yf, ld);
    if (Isa::kMaxMT > 2)
      for (; m0 + 2 <= a.m; m0 += 2) gemv_block<Isa, BITS, G, SD, LO, 2>(ctx, start, end, m0, f, yf, ld);
    if (m0 < a.m) gemv_block<Isa, BITS, G, SD, LO, 1>(ctx, start, end, m0, f, yf, ld);
    const int64_t es = dtype_size(a.x_dtype);
    for (int64_t m = 0; m < a.m; ++m) {
      char* dst = static_cast<char*>(a.y) + (m * a.n + start) * es;
      int64_t j = 0;
      for (; j + 8 <= ld; j += 8) store8(dst + j * es, a.x_dtype, _mm256_loadu_ps(yf + m * ld + j));
      for (; j < ld; ++j) store_f32(dst, a.x_dtype, j, yf[m * ld + j]);
    }
  });
  return oom ? Status::kOutOfMemory : Status::kOk;
}

template <class Isa, int MRt>
inline void micro_rows_at_most(int mr, const float* x, int64_t ldx, int64_t ldk, const float* panel,
                               int64_t klen, float* c, int64_t ldc) {
  if (mr == MRt) {
    Isa::template micro<MRt>(x, ldx, ldk, panel, klen, c, ldc);
  } else if constexpr (MRt > 1) {
    micro_rows_at_most<Isa, MRt - 1>(mr, x, ldx, ldk, panel, klen, c, ldc);
  }
}

template <class Isa, int BITS, DType SD>
Status gemm(const QMatmulArgs& a, ThreadPool& pool) {
  constexpr int kNR = Isa::kNR, kMR = Isa::kMR;
  static_assert(kNB % kNR == 0 && kNR % 8 == 0, "panels are built from 8x8 transposes");
  const int64_t M = a.m, N = a.n, K = a.k;
  const float* xf = static_cast<const float*>(a.x);
  if (a.x_dtype != DType::kFloat32 || a.act_bits == kActBitsInt8) {
    // x as float32 (and at act_bits 8, replaced by its int8 values times dx).
    float* buf = static_cast<float*>(thread_scratch(kScratchX, size_t(M * K) * 4));
    if (!buf) return Status::kOutOfMemory;
    const int64_t es = dtype_size(a.x_dtype);
    pool.parallel_for(M, [&](int64_t m, int) {
      x_row_f32(static_cast<const char*>(a.x) + m * K * es, a.x_dtype, K, a.group_size, a.act_bits, buf + m * K);
    });
    xf = buf;
  }
  bool oom = false;
  pool.parallel_for((N + kNB - 1) / kNB, [&](int64_t task, int) {
    const int64_t n0 = task * kNB;
    const int panels = int((imin(kNB, N - n0) + kNR - 1) / kNR);
    float* panel = static_cast<float*>(thread_scratch(kScratchPanel, size_t(kNB * kKB) * 4));
    float* c = static_cast<float*>(thread_scratch(kScratchAcc, size_t(M * kNB) * 4));
    if (!panel || !c) {
      oom = true;
      return;
    }
    std::memset(c, 0, size_t(M * kNB) * 4);
    for (int64_t k0 = 0; k0 < K; k0 += kKB) {
      const int64_t klen = imin(kKB, K - k0);
      for (int j = 0; j < panels; ++j)
        dequant_panel<BITS, kNR, SD>(a, n0 + j * kNR, k0, klen, panel + j * kKB * kNR);
      for (int64_t m = 0; m < M; m += kMR) {
        const int mr = int(imin(kMR, M - m));
        for (int j = 0; j < panels; ++j)
          micro_rows_at_most<Isa, kMR>(mr, xf + m * K + k0, K, 1, panel + j * kKB * kNR, klen,
                                       c + m * kNB + j * kNR, kNB);
      }
    }
    const int64_t cols = imin(kNB, N - n0);
    const int64_t es = dtype_size(a.x_dtype);
    for (int64_t m = 0; m < M; ++m) {
      char* yrow = static_cast<char*>(a.y) + (m * N + n0) * es;
      int64_t j = 0;
      for (; j + 8 <= cols; j += 8) store8(yrow + j * es, a.x_dtype, _mm256_loadu_ps(c + m * kNB + j));
      for (; j < cols; ++j) store_f32(yrow, a.x_dtype, j, c[m * kNB + j]);
    }
  });
  return oom ? Status::kOutOfMemory : Status::kOk;
}

// bits -> group -> scale dtype -> activation precision: one nested chain; the glue has
// validated every value.
template <class Isa, int BITS, int G, DType SD>
Status gemv_act(const QMatmulArgs& a, ThreadPool& pool) {
  return a.act_bits == kActBitsInt8 ? gemv<Isa, BITS, G, SD, false>(a, pool) : gemv<Isa, BITS, G, SD, true>(a, pool);
}

template <class Isa, int BITS, int G>
Status gemv_sd(const QMatmulArgs& a, ThreadPool& pool) {
  switch (a.scale_dtype) {
    case DType::kBFloat16: return gemv_act<Isa, BITS, G, DType::kBFloat16>(a, pool);
    case DType::kFloat16: return gemv_act<Isa, BITS, G, DType::kFloat16>(a, pool);
    case DType::kFloat32: return gemv_act<Isa, BITS, G, DType::kFloat32>(a, pool);
    default: return Status::kInvalidArgument;
  }
}

template <class Isa, int BITS>
Status gemv_g(const QMatmulArgs& a, ThreadPool& pool) {
  switch (a.group_size) {
    case fmt::kGroupSize32: return gemv_sd<Isa, BITS, fmt::kGroupSize32>(a, pool);
    case fmt::kGroupSize64: return gemv_sd<Isa, BITS, fmt::kGroupSize64>(a, pool);
    case fmt::kGroupSize128: return gemv_sd<Isa, BITS, fmt::kGroupSize128>(a, pool);
    default: return Status::kInvalidArgument;
  }
}

template <class Isa, int BITS>
Status gemm_sd(const QMatmulArgs& a, ThreadPool& pool) {
  switch (a.scale_dtype) {
    case DType::kBFloat16: return gemm<Isa, BITS, DType::kBFloat16>(a, pool);
    case DType::kFloat16: return gemm<Isa, BITS, DType::kFloat16>(a, pool);
    case DType::kFloat32: return gemm<Isa, BITS, DType::kFloat32>(a, pool);
    default: return Status::kInvalidArgument;
  }
}

template <class Isa>
Status qmatmul_x86(const QMatmulArgs& a, ThreadPool& pool) {
  const bool int8 = a.bits == fmt::kInt8Bits;
  if (a.m > kGemvMaxM) return int8 ? gemm_sd<Isa, fmt::kInt8Bits>(a, pool) : gemm_sd<Isa, fmt::kInt4Bits>(a, pool);
  return int8 ? gemv_g<Isa, fmt::kInt8Bits>(a, pool) : gemv_g<Isa, fmt::kInt4Bits>(a, pool);
}

}  // namespace
}  // namespace cpu
}  // namespace bitswitch
