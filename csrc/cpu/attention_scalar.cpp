// The scalar attention reference: for every query row, the visible scores, a two-pass
// softmax and the weighted sum of values, in float32. The oracle of the fast variants
// (and itself tested against float64 numpy).
#include <cmath>
#include <limits>
#include <algorithm>

#include "attention_common.h"
#include "convert.h"
#include "kernels.h"
#include "scratch.h"
#include "thread_pool.h"

namespace bitswitch {
namespace cpu {

Status attention_scalar(const AttentionArgs& a, ThreadPool& pool) {
  const int64_t nqb = ceil_div(a.lq, a.block_q), group = a.hq / a.hkv, D = a.d;
  bool oom = false;
  pool.parallel_for(a.b * a.hq * nqb, [&](int64_t task, int) {
    const int64_t qb = task % nqb, hq = (task / nqb) % a.hq, b = task / (nqb * a.hq), hk = hq / group;
    // Per task: scores of one row over all keys, q and one output row in float32.
    float* buf = static_cast<float*>(thread_scratch(kScratchX, size_t(a.lk + 2 * D) * sizeof(float)));
    if (!buf) {
      oom = true;
      return;
    }
    float* s = buf;
    float* qr = buf + a.lk;
    float* o = qr + D;
    const BlockList blocks = key_blocks(a, b, hk, qb);
    const int64_t i_end = std::min(a.lq, (qb + 1) * a.block_q);
    for (int64_t i = qb * a.block_q; i < i_end; ++i) {
      const int64_t qoff = offset(a.q_strides, b, hq, i);
      for (int64_t d = 0; d < D; ++d) qr[d] = load_f32(a.q, a.dtype, qoff + d);
      const int64_t limit = key_limit(a, i);
      float mx = -std::numeric_limits<float>::infinity();
      int64_t n = 0;
      // Visible scores in block order, stored compactly; the second pass walks the same keys.
      for (int64_t bi = 0; bi < blocks.count; ++bi) {
        const int64_t j0 = blocks[bi] * a.block_k, j1 = std::min(limit, j0 + a.block_k);
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t koff = offset(a.k_strides, b, hk, j);
          float dot = 0.0f;
          for (int64_t d = 0; d < D; ++d) dot += qr[d] * load_f32(a.k, a.dtype, koff + d);
          s[n++] = dot * a.scale;
          mx = std::max(mx, dot * a.scale);
        }
      }
      for (int64_t d = 0; d < D; ++d) o[d] = 0.0f;
      float l = 0.0f;
      n = 0;
      for (int64_t bi = 0; bi < blocks.count; ++bi) {
        const int64_t j0 = blocks[bi] * a.block_k, j1 = std::min(limit, j0 + a.block_k);
        for (int64_t j = j0; j < j1; ++j) {
          const float p = std::exp(s[n++] - mx);
          l += p;
          const int64_t voff = offset(a.v_strides, b, hk, j);
          for (int64_t d = 0; d < D; ++d) o[d] += p * load_f32(a.v, a.dtype, voff + d);
        }
      }
      // A row that sees no key has l == 0: its output is 0 and its lse -inf, never NaN.
      const float inv = l > 0.0f ? 1.0f / l : 0.0f;
      const int64_t ooff = offset(a.o_strides, b, hq, i);
      for (int64_t d = 0; d < D; ++d) store_f32(a.out, a.dtype, ooff + d, o[d] * inv);
      if (a.lse)
        a.lse[(b * a.hq + hq) * a.lq + i] = l > 0.0f ? mx + std::log(l) : -std::numeric_limits<float>::infinity();
    }
  });
  return oom ? Status::kOutOfMemory : Status::kOk;
}

}  // namespace cpu
}  // namespace bitswitch
