// Pieces of the attention kernels shared by the scalar reference and the ISA variants:
// which key blocks a query block reads, and where rows live.
#pragma once

#include <cstdint>

#include "kernels.h"

namespace bitswitch {
namespace cpu {
namespace {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The minimax polynomial of degree 4 for 2^f on [0, 1], highest power first: relative error
// 2.7e-6 (degree 3 would be 7.5e-5). The bf16 prefill kernels (AMX, vdpbf16ps) use it where
// P is rounded to bf16 anyway and the lse bound is 1e-4.
constexpr float kExp2Poly4[5] = {0.013534137047827244f, 0.05201146379113197f, 0.24144279956817627f,
                                 0.6930038332939148f, 1.0000026226043701f};

// The key blocks query block qb of (batch b, kv head h) reads, in order: the mask's row, or
// every block. Causality is applied by the caller (whole blocks past the diagonal are
// skipped, the diagonal block is masked element by element).
struct BlockList {
  const int32_t* list = nullptr;  // null: blocks 0 .. count-1
  int64_t count = 0;
  int64_t operator[](int64_t i) const { return list ? int64_t(list[i]) : i; }
};

inline BlockList key_blocks(const AttentionArgs& a, int64_t b, int64_t h, int64_t qb) {
  BlockList bl;
  if (!a.indptr) {
    bl.count = ceil_div(a.lk, a.block_k);
    return bl;
  }
  const int64_t nqb = ceil_div(a.lq, a.block_q);
  const int32_t* ip = a.indptr + (b * a.hkv + h) * (nqb + 1);
  bl.list = a.indices + (b * a.hkv + h) * a.nnz_cap + ip[qb];
  bl.count = ip[qb + 1] - ip[qb];
  return bl;
}

// Last key a query row at local index i may see (exclusive bound), or lk without causality.
inline int64_t key_limit(const AttentionArgs& a, int64_t i) {
  if (!a.causal) return a.lk;
  const int64_t lim = a.q_offset + i + 1;
  return lim < 0 ? 0 : (lim < a.lk ? lim : a.lk);
}

inline int64_t offset(const int64_t* strides, int64_t b, int64_t h, int64_t l) {
  return b * strides[0] + h * strides[1] + l * strides[2];
}

}  // namespace
}  // namespace cpu
}  // namespace bitswitch
