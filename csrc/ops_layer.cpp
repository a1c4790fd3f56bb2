// Glue for the fused layer ops (cpu/layer_ops.h, cuda/layer_ops.cuh): validation and
// dispatch. Every array is C-contiguous, all of one call share one float dtype and one
// device (CPU memory, or one CUDA device: then the CUDA kernels run on the caller's stream).
#include <cmath>
#include <string>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/layer_ops.h"
#include "cpu/thread_pool.h"
#include "ops.h"

namespace bitswitch {
namespace {

std::string pre(const char* op, const char* arg) { return std::string(op) + ": " + arg + " "; }

// `where`: the array that sets the call's device (the first one checked).
void check_array(const char* op, const char* arg, const TensorView& t, DType dtype, bool written,
                 const TensorView* where = nullptr) {
  if (where == nullptr || where == &t) {
    if (t.device == Device::kOther)
      throw ValueError(pre(op, arg) + "must be in CPU memory or on a CUDA device (this op has no kernel for its device)");
  } else if (!t.same_device(*where)) {
    throw ValueError(pre(op, arg) + "is in " + t.where() + " but the other arrays are in " + where->where() +
                     "; put them on one device");
  }
  if (!t.is_float()) throw TypeError(pre(op, arg) + "must be float32, bfloat16 or float16, got " + t.type_str());
  if (t.dtype != dtype)
    throw TypeError(pre(op, arg) + "must have the dtype of the other arrays (" + dtype_str(dtype) + "), got " +
                    t.type_str());
  if (!t.row_contiguous()) throw ValueError(pre(op, arg) + "must be C-contiguous");
  if (t.numel() > 0 && t.data == nullptr) throw ValueError(pre(op, arg) + "has no data");
  if (written && !t.writable) throw ValueError(pre(op, arg) + "must be writable");
}

void check_shape(const char* op, const char* arg, const TensorView& t, std::initializer_list<int64_t> shape) {
  bool ok = t.ndim == int(shape.size());
  int i = 0;
  for (int64_t s : shape) ok = ok && t.shape[i++] == s;
  if (!ok) {
    std::string want = "(";
    i = 0;
    for (int64_t s : shape) want += (i++ ? ", " : "") + std::to_string(s);
    throw ValueError(pre(op, arg) + "must have shape " + want + (shape.size() == 1 ? ",)" : ")") + ", got " +
                     t.shape_str());
  }
}

void check_eps(const char* op, double eps) {
  if (!(eps >= 0.0) || !std::isfinite(eps)) throw ValueError(pre(op, "eps") + "must be finite and >= 0");
}

const cpu::LayerOps& unit(const char* op) {
  switch (variant_or_throw(op)) {
    case cpu::Variant::kScalar: return cpu::layer_ops_scalar();
    case cpu::Variant::kAvxVnni:
    case cpu::Variant::kAvx2: return cpu::layer_ops_avx2();
    default: return cpu::layer_ops_avx512();
  }
}

void no_overlap(const char* op, const char* a, const TensorView& x, const char* b, const TensorView& y) {
  if (x.numel() > 0 && y.numel() > 0 && x.overlaps(y))
    throw ValueError(pre(op, a) + "overlaps " + b + "; give separate arrays");
}

}  // namespace

void rms_norm(const TensorView& x, const TensorView* delta, const TensorView& weight, double eps,
              const TensorView& out, const CudaLaunch* cuda) {
  const char* op = "rms_norm";
  if (x.ndim < 1) throw ValueError(pre(op, "x") + "must have at least one dimension [..., hidden]");
  check_array(op, "x", x, x.dtype, delta != nullptr, &x);
  const int64_t h = x.shape[x.ndim - 1];
  if (h < 1 || h > cpu::kMaxNormWidth)
    throw ValueError(pre(op, "x") + "must have 1 .. " + std::to_string(cpu::kMaxNormWidth) +
                     " elements in its last dimension, got " + std::to_string(h));
  check_array(op, "weight", weight, x.dtype, false, &x);
  check_shape(op, "weight", weight, {h});
  check_array(op, "out", out, x.dtype, true, &x);
  bool same_shape = out.ndim == x.ndim;
  for (int i = 0; same_shape && i < x.ndim; ++i) same_shape = out.shape[i] == x.shape[i];
  if (!same_shape) throw ValueError(pre(op, "out") + "must have x's shape " + x.shape_str() + ", got " + out.shape_str());
  // out may be x itself (an in-place norm), but no other overlap.
  if (out.data != x.data) no_overlap(op, "out", out, "x", x);
  no_overlap(op, "out", out, "weight", weight);
  if (delta) {
    check_array(op, "delta", *delta, x.dtype, false, &x);
    bool same = delta->ndim == x.ndim;
    for (int i = 0; same && i < x.ndim; ++i) same = delta->shape[i] == x.shape[i];
    if (!same) throw ValueError(pre(op, "delta") + "must have x's shape " + x.shape_str() + ", got " + delta->shape_str());
    no_overlap(op, "delta", *delta, "x", x);
    no_overlap(op, "delta", *delta, "out", out);
  }
  check_eps(op, eps);
  cpu::RmsNormArgs a;
  a.x = x.data;
  a.delta = delta ? delta->data : nullptr;
  a.weight = weight.data;
  a.out = out.data;
  a.rows = x.numel() / h;
  a.h = h;
  a.x_stride = a.delta_stride = a.out_stride = h;
  a.eps = float(eps);
  a.dtype = x.dtype;
  if (a.rows == 0) return;
  if (x.device == Device::kCUDA) return run_cuda(op, "x", x, cuda, a, [](const CudaBackend& b) { return b.rms_norm; });
  auto pool = cpu::pool();
  check_status(op, unit(op).rms_norm(a, *pool));
}

void rope_qkv(const TensorView& qkv, const TensorView* q_weight, const TensorView* k_weight, double eps,
              const TensorView& cos, const TensorView& sin, int64_t pos, const TensorView& q_out,
              const TensorView& k_cache, const TensorView& v_cache, const CudaLaunch* cuda,
              const TensorView* positions) {
  const char* op = "rope_qkv";
  if (q_out.ndim != 4) throw ValueError(pre(op, "q_out") + "must be 4-D [batch, q_heads, tokens, head_dim], got shape " + q_out.shape_str());
  if (k_cache.ndim != 4)
    throw ValueError(pre(op, "k_cache") + "must be 4-D [batch, kv_heads, capacity, head_dim], got shape " +
                     k_cache.shape_str());
  const DType t = qkv.dtype;
  check_array(op, "qkv", qkv, t, false, &qkv);
  const int64_t b = q_out.shape[0], hq = q_out.shape[1], n = q_out.shape[2], d = q_out.shape[3];
  const int64_t hkv = k_cache.shape[1], cap = k_cache.shape[2];
  if (d < 2 || d % 2 || d > cpu::kMaxHeadDim)
    throw ValueError(pre(op, "q_out") + "head_dim must be even and at most " + std::to_string(cpu::kMaxHeadDim) +
                     ", got " + std::to_string(d));
  if (hkv < 1 || hq % hkv) throw ValueError(pre(op, "q_out") + "heads must be a multiple of k_cache's heads");
  check_array(op, "q_out", q_out, t, true, &qkv);
  check_array(op, "k_cache", k_cache, t, true, &qkv);
  check_array(op, "v_cache", v_cache, t, true, &qkv);
  check_shape(op, "qkv", qkv, {b, n, (hq + 2 * hkv) * d});
  check_shape(op, "k_cache", k_cache, {b, hkv, cap, d});
  check_shape(op, "v_cache", v_cache, {b, hkv, cap, d});
  std::vector<int64_t> offs;  // positions, copied (CPU memory only): the writes below cannot change them
  if (positions) {
    if (!positions->same_device(qkv))
      throw ValueError(pre(op, "positions") + "is in " + positions->where() + " but qkv is in " + qkv.where() +
                       "; put them on one device");
    if (!positions->dtype_known || positions->dtype != DType::kInt32 || positions->ndim != 1 ||
        positions->shape[0] != b || !positions->row_contiguous() || positions->data == nullptr)
      throw ValueError(pre(op, "positions") + "must be a contiguous int32 array of shape (" + std::to_string(b) +
                       ",) (the position of token 0 per batch row), got " + positions->type_str() + " " +
                       positions->shape_str());
    if (qkv.device == Device::kCPU) {
      const int32_t* src = static_cast<const int32_t*>(positions->data);
      offs.assign(src, src + b);
      pos = 0;
      for (int64_t v : offs) {
        if (v < 0) throw ValueError(pre(op, "positions") + "must be >= 0, got " + std::to_string(v));
        pos = v > pos ? v : pos;  // the largest must fit the cache and tables
      }
    }
  }
  if (pos < 0 || pos + n > cap)
    throw ValueError(pre(op, positions ? "positions" : "pos") + "plus the " + std::to_string(n) +
                     " new tokens must fit the cache capacity " + std::to_string(cap) + ", got " + std::to_string(pos));
  if (cos.ndim != 2 || cos.shape[1] != d || cos.shape[0] < pos + n)
    throw ValueError(pre(op, "cos") + "must have shape (positions >= " + std::to_string(pos + n) + ", " +
                     std::to_string(d) + "), got " + cos.shape_str());
  check_array(op, "cos", cos, t, false, &qkv);
  check_array(op, "sin", sin, t, false, &qkv);
  check_shape(op, "sin", sin, {cos.shape[0], d});
  if ((q_weight == nullptr) != (k_weight == nullptr))
    throw ValueError(pre(op, "q_weight") + "and k_weight must be given together (q/k norm) or both be None");
  if (q_weight) {
    check_array(op, "q_weight", *q_weight, t, false, &qkv);
    check_array(op, "k_weight", *k_weight, t, false, &qkv);
    check_shape(op, "q_weight", *q_weight, {d});
    check_shape(op, "k_weight", *k_weight, {d});
  }
  check_eps(op, eps);
  const TensorView* outs[] = {&q_out, &k_cache, &v_cache};
  const char* names[] = {"q_out", "k_cache", "v_cache"};
  for (int i = 0; i < 3; ++i) {
    no_overlap(op, names[i], *outs[i], "qkv", qkv);
    no_overlap(op, names[i], *outs[i], "cos", cos);
    no_overlap(op, names[i], *outs[i], "sin", sin);
    for (int j = i + 1; j < 3; ++j) no_overlap(op, names[i], *outs[i], names[j], *outs[j]);
  }
  cpu::RopeArgs a;
  a.qkv = qkv.data;
  a.qkv_strides[0] = qkv.strides[0];
  a.qkv_strides[1] = qkv.strides[1];
  a.b = b;
  a.n = n;
  a.hq = hq;
  a.hkv = hkv;
  a.d = d;
  a.q_weight = q_weight ? q_weight->data : nullptr;
  a.k_weight = k_weight ? k_weight->data : nullptr;
  a.eps = float(eps);
  a.cos = cos.data;
  a.sin = sin.data;
  a.pos = pos;
  a.q_out = q_out.data;
  a.k_cache = k_cache.data;
  a.v_cache = v_cache.data;
  for (int i = 0; i < 3; ++i) {
    a.q_strides[i] = q_out.strides[i];
    a.k_strides[i] = k_cache.strides[i];
    a.v_strides[i] = v_cache.strides[i];
  }
  a.dtype = t;
  a.table_rows = cos.shape[0];
  a.capacity = cap;
  if (b * n == 0) return;
  if (qkv.device == Device::kCUDA) {
    a.positions = positions ? static_cast<const int32_t*>(positions->data) : nullptr;
    return run_cuda(op, "qkv", qkv, cuda, a, [](const CudaBackend& be) { return be.rope; });
  }
  auto pool = cpu::pool();
  if (offs.empty()) return check_status(op, unit(op).rope(a, *pool));
  // Per-row positions on the CPU: one call per batch row, each at its own position.
  const int64_t es = cpu::dtype_size(t);
  for (int64_t bi = 0; bi < b; ++bi) {
    cpu::RopeArgs r = a;
    r.b = 1;
    r.pos = offs[bi];
    r.qkv = static_cast<const char*>(a.qkv) + bi * a.qkv_strides[0] * es;
    r.q_out = static_cast<char*>(a.q_out) + bi * a.q_strides[0] * es;
    r.k_cache = static_cast<char*>(a.k_cache) + bi * a.k_strides[0] * es;
    r.v_cache = static_cast<char*>(a.v_cache) + bi * a.v_strides[0] * es;
    check_status(op, unit(op).rope(r, *pool));
  }
}

void silu_mul(const TensorView& gate_up, const TensorView& out, const CudaLaunch* cuda) {
  const char* op = "silu_mul";
  if (gate_up.ndim < 1) throw ValueError(pre(op, "gate_up") + "must have at least one dimension [..., 2 * inter]");
  check_array(op, "gate_up", gate_up, gate_up.dtype, false, &gate_up);
  const int64_t two_i = gate_up.shape[gate_up.ndim - 1];
  if (two_i % 2) throw ValueError(pre(op, "gate_up") + "must have an even last dimension [gate | up], got " + std::to_string(two_i));
  check_array(op, "out", out, gate_up.dtype, true, &gate_up);
  bool ok = out.ndim == gate_up.ndim && out.shape[out.ndim - 1] == two_i / 2;
  for (int i = 0; ok && i + 1 < out.ndim; ++i) ok = out.shape[i] == gate_up.shape[i];
  if (!ok)
    throw ValueError(pre(op, "out") + "must have gate_up's shape with half its last dimension, got " + out.shape_str() +
                     " for gate_up " + gate_up.shape_str());
  no_overlap(op, "out", out, "gate_up", gate_up);
  cpu::SiluMulArgs a;
  a.gate_up = gate_up.data;
  a.out = out.data;
  a.i = two_i / 2;
  a.rows = a.i ? out.numel() / a.i : 0;
  a.gu_stride = two_i;
  a.out_stride = a.i;
  a.dtype = gate_up.dtype;
  if (a.rows == 0) return;
  if (gate_up.device == Device::kCUDA)
    return run_cuda(op, "gate_up", gate_up, cuda, a, [](const CudaBackend& b) { return b.silu_mul; });
  auto pool = cpu::pool();
  check_status(op, unit(op).silu_mul(a, *pool));
}

}  // namespace bitswitch
