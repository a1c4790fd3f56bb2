// One decode step of a Qwen3 / Qwen2 model in a single native call: see decode_step.h.
//
// Every kernel runs through the ops glue (ops.h), which checks its arrays before touching
// memory, exactly as the Python path calls it; this file adds only what has no op of its own:
// the embedding row, the projection bias and the buffers. Built with -ffp-contract=off: the
// embedding and bias arithmetic must round after every operation, as torch does.
#include "decode_step.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "bitswitch/format.h"
#include "cpu/convert.h"

namespace bitswitch {
namespace {

namespace fmt = format;

const char* const kOp = "DecodeStep";

std::string pre(const char* arg) { return std::string(kOp) + ": " + arg + " "; }

// A C-contiguous view of CPU memory.
TensorView view(void* data, DType t, std::initializer_list<int64_t> shape) {
  TensorView v;
  v.data = data;
  v.dtype_known = true;
  v.dtype = t;
  v.ndim = int(shape.size());
  int i = 0;
  for (int64_t s : shape) v.shape[i++] = s;
  int64_t stride = 1;
  for (int j = v.ndim - 1; j >= 0; --j) {
    v.strides[j] = stride;
    stride *= v.shape[j];
  }
  v.device = Device::kCPU;
  return v;
}

void check_cpu(const char* arg, const TensorView& t) {
  if (t.device != Device::kCPU)
    throw ValueError(pre(arg) + "must be in CPU memory (the native decode step runs on the CPU), got " + t.where());
}

// An array of the model's dtype and the given shape, C-contiguous, in CPU memory.
void check_exact(const char* arg, const TensorView& t, DType dtype, std::initializer_list<int64_t> shape) {
  check_cpu(arg, t);
  if (!t.dtype_known || t.dtype != dtype)
    throw TypeError(pre(arg) + "must have the model's dtype " + dtype_str(dtype) + ", got " + t.type_str());
  bool ok = t.ndim == int(shape.size());
  int i = 0;
  for (int64_t s : shape) ok = ok && t.shape[i++] == s;
  if (!ok) {
    std::string want = "(";
    for (int64_t s : shape) want += std::to_string(s) + ", ";
    want = want.substr(0, want.size() - 2) + (shape.size() == 1 ? ",)" : ")");
    throw ValueError(pre(arg) + "must have shape " + want + ", got " + t.shape_str());
  }
  if (!t.row_contiguous() || t.data == nullptr) throw ValueError(pre(arg) + "must be a C-contiguous array");
}

void check_linear(const char* arg, const DecodeLinear& l, int64_t n, int64_t k, bool embedding) {
  validate_weight(kOp, l.w);
  check_cpu(arg, l.w.plane0);
  if (l.w.plane0.shape[0] != n || l.w.plane0.shape[1] * fmt::kValuesPerWord != k)
    throw ValueError(pre(arg) + "must be a [" + std::to_string(n) + ", " + std::to_string(k) +
                     "] weight, got plane0 of shape " + l.w.plane0.shape_str());
  if (!fmt::is_supported_bits(int(l.bits)))
    throw ValueError(pre(arg) + "bits must be 4 or 8, got " + std::to_string(l.bits));
  if (l.bits == fmt::kInt8Bits && !l.w.has_plane1)
    throw ValueError(pre(arg) + "bits is 8 but the weight has no plane 1 (it holds only the INT4 view)");
  if (!embedding && l.act_bits != 16 && l.act_bits != 8)
    throw ValueError(pre(arg) + "act_bits must be 16 or 8, got " + std::to_string(l.act_bits));
  if (embedding) {  // read here row by row: unit stride along K
    for (const TensorView* t : {&l.w.plane0, l.w.has_plane1 ? &l.w.plane1 : nullptr, &l.w.scales, &l.w.biases})
      if (t && t->strides[1] != 1) throw ValueError(pre(arg) + "arrays must have unit stride along K");
  }
  if (l.has_bias) check_exact((std::string(arg) + " bias").c_str(), l.bias, l.bias.dtype, {n});
  if (l.has_bias && !l.bias.is_float()) throw TypeError(pre(arg) + "bias must be a float array");
}

// Parts of a fused projection: each a [n_i, k] weight, the n_i adding up to n.
void check_parts(const char* arg, const std::vector<DecodeLinear>& parts, int64_t n, int64_t k) {
  if (parts.empty()) throw ValueError(pre(arg) + "must have at least one weight");
  int64_t total = 0;
  for (const DecodeLinear& l : parts) {
    check_linear(arg, l, l.w.plane0.shape[0], k, false);  // validate_weight checks plane0 is 2-D
    total += l.w.plane0.shape[0];
  }
  if (total != n)
    throw ValueError(pre(arg) + "outputs must add up to " + std::to_string(n) + ", got " + std::to_string(total));
}

float round_to(DType t, float v) {
  float out = 0.0f;
  cpu::store_f32(&out, t, 0, v);
  return cpu::load_f32(&out, t, 0);
}

}  // namespace

void* DecodeStep::alloc(int64_t bytes) {
  Buffer b;
  const int64_t padded = (bytes + 63) / 64 * 64 + 64;
  b.bytes.reset(new unsigned char[size_t(padded)]());
  const uintptr_t p = reinterpret_cast<uintptr_t>(b.bytes.get());
  b.data = reinterpret_cast<void*>((p + 63) / 64 * 64);
  buffers_.push_back(std::move(b));
  return buffers_.back().data;
}

DecodeStep::DecodeStep(DecodeModel model) : m_(std::move(model)) {
  const DecodeModel& m = m_;
  if (m.batch < 1 || m.hidden < 1 || m.heads < 1 || m.kv_heads < 1 || m.head_dim < 1 || m.intermediate < 1 ||
      m.vocab < 1)
    throw ValueError(pre("dims") + "must all be positive");
  if (m.heads % m.kv_heads) throw ValueError(pre("heads") + "must be a multiple of kv_heads");
  if (m.dtype != DType::kFloat32 && m.dtype != DType::kBFloat16 && m.dtype != DType::kFloat16)
    throw TypeError(pre("dtype") + "must be float32, bfloat16 or float16");
  const int64_t hd = m.heads * m.head_dim, qkv_n = (m.heads + 2 * m.kv_heads) * m.head_dim;
  check_linear("embed", m.embed, m.vocab, m.hidden, true);
  check_linear("lm_head", m.lm_head, m.vocab, m.hidden, false);
  check_exact("final_norm", m.final_norm, m.dtype, {m.hidden});
  check_cpu("cos", m.cos);
  check_cpu("sin", m.sin);
  if (m.layers.empty()) throw ValueError(pre("layers") + "must not be empty");
  const TensorView& kc0 = m.layers[0].k_cache;
  if (kc0.ndim != 4) throw ValueError(pre("k_cache") + "must be 4-D [batch, kv_heads, capacity, head_dim]");
  const int64_t capacity = kc0.shape[2];
  for (const DecodeLayer& l : m.layers) {
    check_parts("qkv", l.qkv, qkv_n, m.hidden);
    check_linear("o_proj", l.o, m.hidden, hd, false);
    check_parts("gate_up", l.gate_up, 2 * m.intermediate, m.hidden);
    check_linear("down_proj", l.down, m.hidden, m.intermediate, false);
    check_exact("input_norm", l.input_norm, m.dtype, {m.hidden});
    check_exact("post_norm", l.post_norm, m.dtype, {m.hidden});
    if (l.qk_norm) {
      check_exact("q_norm", l.q_norm, m.dtype, {m.head_dim});
      check_exact("k_norm", l.k_norm, m.dtype, {m.head_dim});
    }
    check_exact("k_cache", l.k_cache, m.dtype, {m.batch, m.kv_heads, capacity, m.head_dim});
    check_exact("v_cache", l.v_cache, m.dtype, {m.batch, m.kv_heads, capacity, m.head_dim});
  }
  const int64_t es = cpu::dtype_size(m.dtype), b = m.batch;
  h_ = alloc(b * m.hidden * es);
  delta_ = alloc(b * m.hidden * es);
  x_ = alloc(b * m.hidden * es);
  qkv_ = alloc(b * qkv_n * es);
  q_ = alloc(b * hd * es);
  o_ = alloc(b * hd * es);
  gate_up_ = alloc(b * 2 * m.intermediate * es);
  act_ = alloc(b * m.intermediate * es);
  part_ = alloc(b * (qkv_n > 2 * m.intermediate ? qkv_n : 2 * m.intermediate) * es);
  max_pages_ = (capacity + 31) / 32;  // the most blocks any block_k (>= 32) gives
  positions_ = static_cast<int32_t*>(alloc(b * 4));
  indptr_ = static_cast<int32_t*>(alloc(b * m.kv_heads * 2 * 4));
  indices_ = static_cast<int32_t*>(alloc(b * m.kv_heads * max_pages_ * 4));
}

// y = x W^T (+ bias) through the qmatmul op.
void DecodeStep::linear(const DecodeLinear& l, const TensorView& x, const TensorView& y) const {
  qmatmul(x, l.w, l.bits, y, l.act_bits);
  if (!l.has_bias) return;
  const int64_t n = l.w.plane0.shape[0], rows = y.numel() / n;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j) {
      // As torch: the bias cast to y's dtype, then one rounded add.
      const float bias = round_to(y.dtype, cpu::load_f32(l.bias.data, l.bias.dtype, j));
      cpu::store_f32(y.data, y.dtype, r * n + j, cpu::load_f32(y.data, y.dtype, r * n + j) + bias);
    }
}

// y = [x W_0^T | x W_1^T | ...]: one call for a fused weight; parts computed one by one (as
// torch.cat of the parts' outputs) into part_, then copied to their columns.
void DecodeStep::linears(const std::vector<DecodeLinear>& parts, const TensorView& x, const TensorView& y) const {
  if (parts.size() == 1) return linear(parts[0], x, y);
  const int64_t rows = x.numel() / x.shape[x.ndim - 1], n = y.shape[y.ndim - 1], es = cpu::dtype_size(y.dtype);
  int64_t col = 0;
  for (const DecodeLinear& l : parts) {
    const int64_t np = l.w.plane0.shape[0];
    linear(l, x, view(part_, y.dtype, {rows, 1, np}));
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(static_cast<char*>(y.data) + (r * n + col) * es, static_cast<const char*>(part_) + r * np * es,
                  size_t(np * es));
    col += np;
  }
}

// h[b] = the dequantized embedding row ids[b], computed as QEmbedding does in float32:
// s * q + b (INT4), then + (s / 16) * (r - 7.5) (INT8), each operation rounded, then one
// rounding to the model's dtype.
void DecodeStep::embed(const std::vector<int64_t>& ids, void* h) const {
  const DecodeLinear& e = m_.embed;
  const int64_t g = e.w.group_size, k = m_.hidden;
  for (size_t b = 0; b < ids.size(); ++b) {
    const int64_t row = ids[b];
    const uint32_t* p0 = static_cast<const uint32_t*>(e.w.plane0.data) + row * e.w.plane0.strides[0];
    const uint32_t* p1 =
        e.bits == fmt::kInt8Bits ? static_cast<const uint32_t*>(e.w.plane1.data) + row * e.w.plane1.strides[0] : nullptr;
    const int64_t srow = row * e.w.scales.strides[0], brow = row * e.w.biases.strides[0];
    for (int64_t i = 0; i < k; ++i) {
      const float s = cpu::load_f32(e.w.scales.data, e.w.scales.dtype, srow + i / g);
      const float bias = cpu::load_f32(e.w.biases.data, e.w.biases.dtype, brow + i / g);
      const int shift = int(fmt::kPlaneBits * (i % fmt::kValuesPerWord));
      const float q = float((p0[i / fmt::kValuesPerWord] >> shift) & fmt::kCodeMax);
      float w = s * q;
      w = w + bias;
      if (p1) {
        const float r = float((p1[i / fmt::kValuesPerWord] >> shift) & fmt::kCodeMax);
        const float t = (s / float(fmt::kResidualDivisor)) * (r - float(fmt::kResidualCenter));
        w = w + t;
      }
      cpu::store_f32(h, m_.dtype, int64_t(b) * k + i, w);
    }
  }
}

void DecodeStep::run(const std::vector<int64_t>& ids, int64_t pos, const std::vector<DecodePagesArg>& pages,
                     const TensorView& logits) {
  std::lock_guard<std::mutex> lock(mutex_);
  const DecodeModel& m = m_;
  const int64_t b = m.batch, capacity = m.layers[0].k_cache.shape[2], hd = m.heads * m.head_dim;
  if (int64_t(ids.size()) != b)
    throw ValueError(pre("ids") + "must hold one token per batch row (" + std::to_string(b) + "), got " +
                     std::to_string(ids.size()));
  for (int64_t id : ids)
    if (id < 0 || id >= m.vocab)
      throw ValueError(pre("ids") + "must be token ids in [0, " + std::to_string(m.vocab) + "), got " + std::to_string(id));
  if (pos < 0 || pos >= capacity)
    throw ValueError(pre("pos") + "must be in [0, " + std::to_string(capacity) + ") (the cache capacity), got " +
                     std::to_string(pos));
  check_exact("logits", logits, m.dtype, {b, 1, m.vocab});
  if (!logits.writable) throw ValueError(pre("logits") + "is read-only");
  std::vector<const DecodePagesArg*> by_layer(m.layers.size(), nullptr);
  for (const DecodePagesArg& p : pages) {
    if (p.layer < 0 || p.layer >= int64_t(m.layers.size()) || by_layer[size_t(p.layer)])
      throw ValueError(pre("pages") + "must name distinct layers in [0, " + std::to_string(m.layers.size()) +
                       "), got layer " + std::to_string(p.layer));
    if (p.block_k != 32 && p.block_k != 64 && p.block_k != 128)
      throw ValueError(pre("pages") + "block_k must be 32, 64 or 128, got " + std::to_string(p.block_k));
    const int64_t nkb = (capacity + p.block_k - 1) / p.block_k;
    if (p.n < 1 || p.n > nkb)
      throw ValueError(pre("pages") + "n must be in [1, " + std::to_string(nkb) + "], got " + std::to_string(p.n));
    by_layer[size_t(p.layer)] = &p;
  }

  const DType dt = m.dtype;
  embed(ids, h_);
  const TensorView h = view(h_, dt, {b, 1, m.hidden}), delta = view(delta_, dt, {b, 1, m.hidden}),
                   x = view(x_, dt, {b, 1, m.hidden});
  const TensorView qkv = view(qkv_, dt, {b, 1, (m.heads + 2 * m.kv_heads) * m.head_dim});
  const TensorView q = view(q_, dt, {b, m.heads, 1, m.head_dim});
  const TensorView o_rows = view(o_, dt, {b, 1, hd});
  // attention writes [B, Hq, 1, D] into the [B, 1, Hq, D] buffer o_proj reads
  TensorView o_heads = view(o_, dt, {b, m.heads, 1, m.head_dim});
  o_heads.strides[2] = hd;
  const TensorView gate_up = view(gate_up_, dt, {b, 1, 2 * m.intermediate});
  const TensorView act = view(act_, dt, {b, 1, m.intermediate});
  bool has_delta = false;
  for (size_t i = 0; i < m.layers.size(); ++i) {
    const DecodeLayer& l = m.layers[i];
    rms_norm(h, has_delta ? &delta : nullptr, l.input_norm, m.eps, x);
    linears(l.qkv, x, qkv);
    rope_qkv(qkv, l.qk_norm ? &l.q_norm : nullptr, l.qk_norm ? &l.k_norm : nullptr, m.eps, m.cos, m.sin, pos, q,
             l.k_cache, l.v_cache);
    BlockMaskViews mask;
    mask.block_q = mask.block_k = 128;  // the dense tile (bitswitch.ops._DENSE_TILE)
    if (const DecodePagesArg* p = by_layer[i]) {
      for (int64_t r = 0; r < b; ++r) positions_[r] = int32_t(pos);
      const TensorView indices = view(indices_, DType::kInt32, {b, m.kv_heads, p->n});
      select_pages_at(q, l.k_cache, p->kmin, p->kmax, view(positions_, DType::kInt32, {b}), indices, 1, p->block_k);
      for (int64_t r = 0; r < b * m.kv_heads; ++r) indptr_[2 * r] = 0, indptr_[2 * r + 1] = int32_t(p->n);
      mask.has_mask = true;
      mask.indptr = view(indptr_, DType::kInt32, {b, m.kv_heads, 2});
      mask.indices = indices;
      mask.block_q = 64;
      mask.block_k = p->block_k;
    }
    TensorView k = l.k_cache, v = l.v_cache;  // keys [0, pos]
    k.shape[2] = v.shape[2] = pos + 1;
    attention(q, k, v, mask, true, std::numeric_limits<double>::quiet_NaN(), pos, o_heads, nullptr);
    linear(l.o, o_rows, delta);
    rms_norm(h, &delta, l.post_norm, m.eps, x);
    linears(l.gate_up, x, gate_up);
    silu_mul(gate_up, act);
    linear(l.down, act, delta);
    has_delta = true;
  }
  rms_norm(h, &delta, m.final_norm, m.eps, x);
  linear(m.lm_head, x, logits);
}

}  // namespace bitswitch
