// One decode step of a Qwen3 / Qwen2 model in a single native call (CPU).
//
// An eager decode step in Python spends as long in the interpreter and in small torch ops
// as the GEMVs take to stream a small model's weights (~150 us per layer of 0.6B against
// ~250 us of kernels), and the pool's other threads idle meanwhile. DecodeStep runs the
// same kernels through the same ops glue, in the same order on the same buffers, for every
// layer and the lm_head: its logits are the Python path's, bit for bit.
//
// Per layer, for one new token per batch row:
//   x = RMSNorm(h += delta); qkv = x Wqkv^T (+ bias); q = rope_qkv(qkv) (k, v -> cache);
//   o = attention(q, cache[:pos + 1]) (dense, or over the pages select_pages_at keeps);
//   x = RMSNorm(h += o Wo^T); delta = silu_mul(x Wgu^T) Wd^T
// and at the end logits = RMSNorm(h += delta) Wlm^T. The embedding row is dequantized here
// as bitswitch.models.qwen3.QEmbedding computes it (float32 ops, one rounding to the dtype).
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "ops.h"

namespace bitswitch {

// A projection: its weight, the view it reads (bits 4 or 8) and its activation bits, and an
// optional bias [N] (Qwen2's q/k/v; added after the GEMV as y + bias rounded to y's dtype).
struct DecodeLinear {
  WeightViews w;
  int64_t bits = 4;
  int64_t act_bits = 16;
  bool has_bias = false;
  TensorView bias;
};

struct DecodeLayer {
  // q|k|v and gate|up: one fused weight, or the parts (each its own view), whose outputs lie
  // side by side along N.
  std::vector<DecodeLinear> qkv, gate_up;
  DecodeLinear o, down;
  TensorView input_norm, post_norm;    // [hidden]
  bool qk_norm = false;
  TensorView q_norm, k_norm;           // [head_dim] (Qwen3)
  TensorView k_cache, v_cache;         // [batch, kv_heads, capacity, head_dim]
};

struct DecodeModel {
  int64_t batch = 0, hidden = 0, heads = 0, kv_heads = 0, head_dim = 0, intermediate = 0, vocab = 0;
  double eps = 1e-6;
  DType dtype = DType::kFloat32;  // activations, norms, caches, logits
  DecodeLinear embed;             // [vocab, hidden] read as embed.bits (act_bits unused)
  DecodeLinear lm_head;           // [vocab, hidden]
  TensorView final_norm;          // [hidden]
  TensorView cos, sin;            // [positions, head_dim], rows pos.. used
  std::vector<DecodeLayer> layers;
};

// A sparse layer's page selection for one step (bitswitch.torch.DecodePages): the summaries
// cover keys [0, pos) or [0, pos]; select_pages_at folds the step's key in and keeps n blocks.
struct DecodePagesArg {
  int64_t layer = 0;
  TensorView kmin, kmax;  // float32 [batch, kv_heads, ceil(capacity / block_k), head_dim]
  int64_t n = 0;          // key blocks kept, 1 .. ceil(capacity / block_k)
  int64_t block_k = 64;
};

class DecodeStep {
 public:
  // Checks every array once (shapes, dtypes, CPU memory) and allocates the step's buffers.
  explicit DecodeStep(DecodeModel model);

  // Writes logits [batch, vocab] (the model's dtype, row-contiguous) of tokens ids[batch] at
  // cache position pos (the cache holds keys [0, pos)); the step's k and v land in row pos.
  // pages: the layers that attend sparsely this step (any order, each at most once).
  void run(const std::vector<int64_t>& ids, int64_t pos, const std::vector<DecodePagesArg>& pages,
           const TensorView& logits);

  const DecodeModel& model() const { return m_; }

 private:
  struct Buffer {
    std::unique_ptr<unsigned char[]> bytes;
    void* data = nullptr;
  };
  void* alloc(int64_t bytes);
  void linear(const DecodeLinear& l, const TensorView& x, const TensorView& y) const;
  void linears(const std::vector<DecodeLinear>& parts, const TensorView& x, const TensorView& y) const;
  void embed(const std::vector<int64_t>& ids, void* h) const;

  DecodeModel m_;
  std::vector<Buffer> buffers_;
  void *h_ = nullptr, *delta_ = nullptr, *x_ = nullptr, *qkv_ = nullptr, *q_ = nullptr, *o_ = nullptr,
       *gate_up_ = nullptr, *act_ = nullptr, *part_ = nullptr;
  int32_t *positions_ = nullptr, *indptr_ = nullptr, *indices_ = nullptr;
  int64_t max_pages_ = 0;
  std::mutex mutex_;  // one step at a time: the buffers are the object's
};

}  // namespace bitswitch
