// Decode page selection (kernels.h PageSelectArgs): the scalar kernel every device's
// result is checked against. One task per (batch, kv head); the work is small (nkb * D *
// (G + 2) multiply-adds), so the only care taken is to follow the contract exactly.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "convert.h"
#include "kernels.h"
#include "thread_pool.h"

namespace bitswitch {
namespace cpu {
namespace {

// Folds key pos into the summary of its block.
void fold_key(const PageSelectArgs& a, int64_t b, int64_t h, int64_t pos) {
  const int64_t last = pos / a.block_k, d = a.d;
  const int64_t key = b * a.k_strides[0] + h * a.k_strides[1] + pos * a.k_strides[2];
  float* lo = a.kmin + ((b * a.hkv + h) * a.nkb + last) * d;
  float* hi = a.kmax + ((b * a.hkv + h) * a.nkb + last) * d;
  const bool first = pos % a.block_k == 0;
  for (int64_t j = 0; j < d; ++j) {
    const float x = load_f32(a.k, a.dtype, key + j);
    lo[j] = first ? x : std::min(lo[j], x);
    hi[j] = first ? x : std::max(hi[j], x);
  }
}

// Scratch of one task: the kv head's queries and their magnitudes [G, D], a block's c and r
// [D], scores and order [nkb].
struct Scratch {
  std::vector<float> q, qa, c, r, score;  // qa: |q|
  std::vector<int32_t> order;
};

void select_one(const PageSelectArgs& a, int64_t b, int64_t h, Scratch& w) {
  std::vector<float>&q = w.q, &qa = w.qa, &c = w.c, &r = w.r, &score = w.score;
  std::vector<int32_t>& order = w.order;
  const int64_t pos = a.positions[b], last = pos / a.block_k, d = a.d, group = a.hq / a.hkv;
  fold_key(a, b, h, pos);
  for (int64_t g = 0; g < group; ++g) {
    const int64_t off = b * a.q_strides[0] + (h * group + g) * a.q_strides[1];
    for (int64_t j = 0; j < d; ++j) {
      q[size_t(g * d + j)] = load_f32(a.q, a.dtype, off + j);
      w.qa[size_t(g * d + j)] = std::fabs(q[size_t(g * d + j)]);
    }
  }
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t blk = 0; blk < a.nkb; ++blk) {
    float s;
    if (blk > last) {
      s = -inf;
    } else if (blk < a.sinks || blk == last) {
      s = inf;
    } else {
      const float* lo = a.kmin + ((b * a.hkv + h) * a.nkb + blk) * d;
      const float* hi = a.kmax + ((b * a.hkv + h) * a.nkb + blk) * d;
      for (int64_t j = 0; j < d; ++j) {
        c[size_t(j)] = 0.5f * (hi[j] + lo[j]);
        r[size_t(j)] = 0.5f * (hi[j] - lo[j]);
      }
      s = -inf;
      for (int64_t g = 0; g < group; ++g) {
        // Eight independent partial sums (D is a multiple of 8): the compiler keeps them in
        // one vector register instead of a serial chain of adds.
        const float* qg = q.data() + g * d;
        const float* aq = qa.data() + g * d;
        float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t j = 0; j < d; j += 8)
          for (int l = 0; l < 8; ++l) part[l] += qg[j + l] * c[size_t(j + l)] + aq[j + l] * r[size_t(j + l)];
        const float acc = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
        if (acc > s) s = acc;  // a NaN score never wins (nor does it replace -inf)
      }
    }
    score[size_t(blk)] = s;
  }
  for (int64_t blk = 0; blk < a.nkb; ++blk) order[size_t(blk)] = int32_t(blk);
  const float* sc = score.data();
  std::partial_sort(order.begin(), order.begin() + a.n, order.end(), [sc](int32_t x, int32_t y) {
    return sc[x] > sc[y] || (sc[x] == sc[y] && x < y);
  });
  std::sort(order.begin(), order.begin() + a.n);
  std::copy(order.begin(), order.begin() + a.n, a.indices + (b * a.hkv + h) * a.n);
}

}  // namespace

Status select_pages_scalar(const PageSelectArgs& a, ThreadPool& pool) {
  pool.parallel_for(a.b * a.hkv, [&](int64_t task, int) {
    Scratch w{std::vector<float>(size_t(a.hq / a.hkv * a.d)), std::vector<float>(size_t(a.hq / a.hkv * a.d)),
              std::vector<float>(size_t(a.d)),
              std::vector<float>(size_t(a.d)), std::vector<float>(size_t(a.nkb)), std::vector<int32_t>(size_t(a.nkb))};
    select_one(a, task / a.hkv, task % a.hkv, w);
  });
  return Status::kOk;
}

}  // namespace cpu
}  // namespace bitswitch
