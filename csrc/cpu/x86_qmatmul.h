// The x86 qmatmul drivers shared by the AVX2 and AVX-512 units: blocking, threading,
// tails and dispatch. Each unit supplies an `Isa` traits struct with its register type,
// its 128-element GEMV step and its GEMM micro-kernel:
//
//   struct Isa {
//     using Acc = __m256 / __m512;             // one float accumulator register
//     static constexpr int kMaxMT;             // x rows per GEMV pass
//     static constexpr int kMR, kNR;           // GEMM micro-kernel tile (kNR a multiple of 8)
//     static Acc zero();
//     static float hsum(Acc);
//     template <int BITS, int G, DType SD, int MT>
//     static void step(w0, w1, sc, xq, xl, Acc (&acc)[kRows][MT]);
//     template <int MRt>
//     static void micro(x, ldx, panel, klen, c, ldc);  // c[MRt x kNR] += x @ panel
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
// Weight rows per GEMV block: four rows share every x load.
constexpr int kRows = 4;
// Software prefetch distance in bytes of one plane: with two threads the hardware
// prefetcher alone leaves about a third of the read bandwidth unused.
constexpr int64_t kPrefetchBytes = 8192;
// GEMM blocking: kNB output columns per task, kKB deep panels (64 x 256 float32 = 64 KB,
// resident in L2 while every row of x streams past it).
constexpr int kNB = 64;
constexpr int64_t kKB = 256;

// Scale i of a row of SD values. memcpy, not a typed load: the tail path reads scales from
// a uint32 buffer, and a float or uint16 lvalue there would break strict aliasing.
template <DType SD>
inline float load_scale(const void* p, int64_t i) {
  if (SD == DType::kFloat32) {
    float f;
    std::memcpy(&f, static_cast<const char*>(p) + 4 * i, 4);
    return f;
  }
  uint16_t h;
  std::memcpy(&h, static_cast<const char*>(p) + 2 * i, 2);
  return SD == DType::kBFloat16 ? bf16_to_f32(h) : _cvtsh_ss(h);
}

struct GemvCtx {
  const QMatmulArgs* a;
  XPrep xp;
  int64_t n_blocks;         // ceil(N / kRows)
  int64_t blocks_per_task;
  int64_t prefetch_words;   // distance in words of one plane, whole row blocks
};

// Weight rows [kRows*b, kRows*b + kRows) against x rows [m0, m0 + MT).
template <class Isa, int BITS, int G, DType SD, int MT>
inline void gemv_rows(const GemvCtx& ctx, int64_t b, int64_t m0) {
  using Acc = typename Isa::Acc;
  const QMatmulArgs& a = *ctx.a;
  const XPrep& xp = ctx.xp;
  const int64_t words = fmt::words_per_row(a.k), groups = fmt::groups_per_row(a.k, G);
  const int64_t full_steps = a.k / kStep;
  const int64_t es = dtype_size(SD);
  constexpr int64_t kGroupsPerStep = kStep / G;

  int64_t rows[kRows];
  const uint32_t* w0[kRows];
  const uint32_t* w1[kRows];
  const void* sc[kRows];
  for (int r = 0; r < kRows; ++r) {
    rows[r] = imin(b * kRows + r, a.n - 1);  // a short last block repeats row N-1
    w0[r] = a.plane0 + rows[r] * words;
    w1[r] = BITS == fmt::kInt8Bits ? a.plane1 + rows[r] * words : w0[r];
    sc[r] = static_cast<const char*>(a.scales) + rows[r] * groups * es;
  }
  Acc acc[kRows][MT];
  for (int r = 0; r < kRows; ++r)
    for (int t = 0; t < MT; ++t) acc[r][t] = Isa::zero();

  const int8_t* xq[MT];
  const float* xl[MT];
  const uint32_t* s0[kRows];
  const uint32_t* s1[kRows];
  const void* ss[kRows];
  for (int64_t s = 0; s < full_steps; ++s) {
    for (int r = 0; r < kRows; ++r) {
      s0[r] = w0[r] + s * kStepWords;
      s1[r] = w1[r] + s * kStepWords;
      ss[r] = static_cast<const char*>(sc[r]) + s * kGroupsPerStep * es;
      _mm_prefetch(reinterpret_cast<const char*>(s0[r] + ctx.prefetch_words), _MM_HINT_T0);
      if (BITS == fmt::kInt8Bits)
        _mm_prefetch(reinterpret_cast<const char*>(s1[r] + ctx.prefetch_words), _MM_HINT_T0);
    }
    for (int t = 0; t < MT; ++t) {
      xq[t] = xp.q(m0 + t, s);
      xl[t] = xp.lanes(m0 + t, s);
    }
    Isa::template step<BITS, G, SD, MT>(s0, s1, ss, xq, xl, acc);
  }
  if (full_steps < xp.steps) {
    // K % 128 != 0: the last partial step runs on zero-padded copies (x is padded too).
    alignas(64) uint32_t t0[kRows][kStepWords] = {}, t1[kRows][kStepWords] = {};
    alignas(64) uint32_t ts[kRows][kGroupsPerStep] = {};  // >= 4 bytes per scale
    const int64_t wl = words - full_steps * kStepWords, gl = groups - full_steps * kGroupsPerStep;
    for (int r = 0; r < kRows; ++r) {
      std::memcpy(t0[r], w0[r] + full_steps * kStepWords, size_t(wl) * 4);
      if (BITS == fmt::kInt8Bits) std::memcpy(t1[r], w1[r] + full_steps * kStepWords, size_t(wl) * 4);
      std::memcpy(ts[r], static_cast<const char*>(sc[r]) + full_steps * kGroupsPerStep * es, size_t(gl * es));
      s0[r] = t0[r];
      s1[r] = t1[r];
      ss[r] = ts[r];
    }
    for (int t = 0; t < MT; ++t) {
      xq[t] = xp.q(m0 + t, full_steps);
      xl[t] = xp.lanes(m0 + t, full_steps);
    }
    Isa::template step<BITS, G, SD, MT>(s0, s1, ss, xq, xl, acc);
  }
  for (int r = 0; r < kRows; ++r) {
    if (b * kRows + r >= a.n) break;
    for (int t = 0; t < MT; ++t) {
      const float y = Isa::hsum(acc[r][t]) +
                      bias_dot<BITS>(a.scales, a.biases, SD, rows[r] * groups, xp.xsum(m0 + t), groups);
      store_f32(a.y, a.x_dtype, (m0 + t) * a.n + rows[r], y);
    }
  }
}

template <class Isa, int BITS, int G, DType SD>
Status gemv(const QMatmulArgs& a, ThreadPool& pool) {
  GemvCtx ctx;
  ctx.a = &a;
  ctx.xp = plan_xprep(a.k, G);
  ctx.xp.base = static_cast<uint8_t*>(thread_scratch(kScratchX, size_t(ctx.xp.row_bytes * a.m)));
  if (!ctx.xp.base) return Status::kOutOfMemory;
  const float lane_mult = BITS == fmt::kInt8Bits ? 1.0f / fmt::kResidualDivisor : 1.0f;
  const int64_t es = dtype_size(a.x_dtype);
  for (int64_t m = 0; m < a.m; ++m)
    prep_x_row(static_cast<const char*>(a.x) + m * a.k * es, a.x_dtype, a.k, G, lane_mult, ctx.xp, m);

  const int64_t block_bytes = kRows * fmt::words_per_row(a.k) * 4;
  const int64_t ahead_blocks = imax(1, (kPrefetchBytes + block_bytes - 1) / block_bytes);
  ctx.prefetch_words = ahead_blocks * kRows * fmt::words_per_row(a.k);
  ctx.n_blocks = (a.n + kRows - 1) / kRows;
  // About 8 tasks per thread balances a noisy machine while keeping each thread's reads
  // in long contiguous runs.
  ctx.blocks_per_task = imax(1, ctx.n_blocks / (int64_t(pool.num_threads()) * 8));
  const int64_t tasks = (ctx.n_blocks + ctx.blocks_per_task - 1) / ctx.blocks_per_task;
  pool.parallel_for(tasks, [&ctx](int64_t task, int) {
    const QMatmulArgs& a = *ctx.a;
    const int64_t b_end = imin(ctx.n_blocks, (task + 1) * ctx.blocks_per_task);
    for (int64_t b = task * ctx.blocks_per_task; b < b_end; ++b) {
      int64_t m0 = 0;
      for (; m0 + Isa::kMaxMT <= a.m; m0 += Isa::kMaxMT) gemv_rows<Isa, BITS, G, SD, Isa::kMaxMT>(ctx, b, m0);
      if (Isa::kMaxMT > 2)
        for (; m0 + 2 <= a.m; m0 += 2) gemv_rows<Isa, BITS, G, SD, 2>(ctx, b, m0);
      if (m0 < a.m) gemv_rows<Isa, BITS, G, SD, 1>(ctx, b, m0);
    }
  });
  return Status::kOk;
}

template <class Isa, int MRt>
inline void micro_rows_at_most(int mr, const float* x, int64_t ldx, const float* panel, int64_t klen,
                               float* c, int64_t ldc) {
  if (mr == MRt) {
    Isa::template micro<MRt>(x, ldx, panel, klen, c, ldc);
  } else if constexpr (MRt > 1) {
    micro_rows_at_most<Isa, MRt - 1>(mr, x, ldx, panel, klen, c, ldc);
  }
}

template <class Isa, int BITS, DType SD>
Status gemm(const QMatmulArgs& a, ThreadPool& pool) {
  constexpr int kNR = Isa::kNR, kMR = Isa::kMR;
  static_assert(kNB % kNR == 0 && kNR % 8 == 0, "panels are built from 8x8 transposes");
  const int64_t M = a.m, N = a.n, K = a.k;
  const float* xf = static_cast<const float*>(a.x);
  if (a.x_dtype != DType::kFloat32) {
    float* buf = static_cast<float*>(thread_scratch(kScratchX, size_t(M * K) * 4));
    if (!buf) return Status::kOutOfMemory;
    const int64_t es = dtype_size(a.x_dtype);
    pool.parallel_for(M, [&](int64_t m, int) {
      const char* src = static_cast<const char*>(a.x) + m * K * es;
      for (int64_t k = 0; k < K; k += 8) _mm256_storeu_ps(buf + m * K + k, load8(src + k * es, a.x_dtype));
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
          micro_rows_at_most<Isa, kMR>(mr, xf + m * K + k0, K, panel + j * kKB * kNR, klen,
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

// bits -> group -> scale dtype: one nested chain; the glue has validated every value.
template <class Isa, int BITS, int G>
Status gemv_sd(const QMatmulArgs& a, ThreadPool& pool) {
  switch (a.scale_dtype) {
    case DType::kBFloat16: return gemv<Isa, BITS, G, DType::kBFloat16>(a, pool);
    case DType::kFloat16: return gemv<Isa, BITS, G, DType::kFloat16>(a, pool);
    case DType::kFloat32: return gemv<Isa, BITS, G, DType::kFloat32>(a, pool);
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
