// How the panel GEMMs for prefill-sized M split a call into tasks: the AMX and vdpbf16ps
// dense GEMMs (bf16_panels.h) and the int8 GEMMs (int8_gemm.h). Each task owns nb
// outputs and mrows rows of x, and packs (dequantizes) its nb x ks panel of weights once
// per ks inputs, reusing it for all its rows.
#pragma once

#include <cstddef>
#include <cstdint>

#include "scratch.h"
#include "thread_pool.h"
#include "x86_common.h"

namespace bitswitch {
namespace cpu {
namespace {

struct PanelSplit {
  int64_t ks;        // inputs per panel: a multiple of kc, or all of K
  int64_t nb;        // outputs per task (a multiple of block_n)
  int64_t n_blocks;  // tasks along N
  int64_t mrows;     // x rows per task (a multiple of block_m)
  int64_t m_splits;  // tasks along M
};

// m x k of x taking x_bytes, n outputs; blocks of block_n outputs and block_m rows; panels of
// at most panel_bytes at weight_bytes per weight, ks a multiple of kc.
inline PanelSplit split_panels(int64_t m, int64_t n, int64_t k, int64_t x_bytes, int64_t threads, int64_t block_n,
                               int64_t block_m, int64_t kc, int64_t panel_bytes, int64_t weight_bytes) {
  PanelSplit p;
  // Outputs per task: every x chunk is read once per task, so wider panels when x outgrows
  // L2 (AMX, 3072 x 1024, M = 2048, one core: 128 / 256 / 512 outputs ran at 1300 / 1446 /
  // 1553 GFLOP/s; at M = 128 the narrower panels were within 5% of each other). Then
  // narrower ones while the threads would get fewer than two each or unequal shares (over
  // 10% idle).
  p.nb = x_bytes <= (512 << 10) ? 128 : x_bytes <= (2 << 20) ? 256 : 512;
  auto uneven = [&](int64_t nb) {
    const int64_t blocks = (n + nb - 1) / nb;
    return blocks < 2 * threads || double((blocks + threads - 1) / threads * threads * nb) > 1.1 * double(n);
  };
  while (p.nb > block_n && uneven(p.nb)) p.nb /= 2;
  p.n_blocks = (n + p.nb - 1) / p.nb;
  // x rows split across tasks only when there are fewer panels than threads (each piece
  // packs the panel again).
  p.m_splits = p.n_blocks < threads ? imin((m + block_m - 1) / block_m, (threads + p.n_blocks - 1) / p.n_blocks) : 1;
  p.mrows = round_up((m + p.m_splits - 1) / p.m_splits, block_m);
  p.m_splits = (m + p.mrows - 1) / p.mrows;
  const int64_t ks_max = panel_bytes / (weight_bytes * p.nb) / kc * kc;
  p.ks = k <= ks_max ? k : ks_max;
  return p;
}

// Runs every task of the split on the pool, each with this thread's two scratch buffers:
// fn(n0, m0, rows, buf, acc) for outputs [n0, n0 + nb) and x rows [m0, m0 + rows) of m.
template <class F>
Status run_panel_tasks(ThreadPool& pool, const PanelSplit& sp, int64_t m, size_t buf_bytes, size_t acc_bytes,
                       F&& fn) {
  bool oom = false;
  pool.parallel_for(sp.n_blocks * sp.m_splits, [&](int64_t t, int) {
    const int64_t n0 = (t / sp.m_splits) * sp.nb, m0 = (t % sp.m_splits) * sp.mrows;
    char* buf = static_cast<char*>(thread_scratch(kScratchPanel, buf_bytes));
    float* acc = static_cast<float*>(thread_scratch(kScratchAcc, acc_bytes));
    if (!buf || !acc) {
      oom = true;
      return;
    }
    fn(n0, m0, imin(sp.mrows, m - m0), buf, acc);
  });
  return oom ? Status::kOutOfMemory : Status::kOk;
}

}  // namespace
}  // namespace cpu
}  // namespace bitswitch
