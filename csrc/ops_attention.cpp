// Glue for attention: validation (shapes, strides, dtypes, the block mask's structure)
// and dispatch to the kernel variant.
#include <atomic>
#include <cmath>
#include <sstream>
#include <vector>

#include "cpu/convert.h"
#include "cpu/cpu_features.h"
#include "cpu/thread_pool.h"
#include "ops.h"

namespace bitswitch {
namespace {

const char* kOp = "attention";

std::atomic<int64_t> g_kv_splits{0};  // set_attention_kv_splits

// "op: arg " for messages; the checks below serve attention and select_pages_at.
std::string pre(const char* arg, const char* op = kOp) { return std::string(op) + ": " + arg + " "; }

// No two elements share memory: sorted by stride, each stride covers the dims below it.
bool non_overlapping(const TensorView& t) {
  int order[TensorView::kMaxDims];
  const int n = t.ndim < TensorView::kMaxDims ? t.ndim : TensorView::kMaxDims;
  for (int i = 0; i < n; ++i) {  // insertion sort by stride: at most 8 dims
    int j = i;
    for (; j > 0 && t.strides[order[j - 1]] > t.strides[i]; --j) order[j] = order[j - 1];
    order[j] = i;
  }
  int64_t span = 1;
  for (int i = 0; i < n; ++i) {
    const int d = order[i];
    if (t.shape[d] == 1) continue;
    if (t.strides[d] < span) return false;
    span = t.strides[d] * t.shape[d];
  }
  return true;
}

// Every array of a call lives where q does: CPU memory or one CUDA device.
void check_with_q(const char* arg, const TensorView& t, const TensorView& q, const char* op = kOp) {
  if (q.device == Device::kOther)
    throw ValueError(pre("q", op) + "must be in CPU memory or on a CUDA device (this op has no kernel for its device)");
  if (!t.same_device(q))
    throw ValueError(pre(arg, op) + "is in " + t.where() + " but q is in " + q.where() +
                     "; put every array of the call on one device");
}

void check_4d(const char* arg, const TensorView& t, const char* op = kOp) {
  if (t.ndim != 4)
    throw ValueError(pre(arg, op) + "must be 4-D [batch, heads, length, head_dim], got shape " + t.shape_str());
  for (int i = 0; i < 4; ++i)
    if (t.shape[i] <= 0 || t.shape[i] >= (int64_t(1) << 31))
      throw ValueError(pre(arg, op) + "has an empty or too large dimension: shape " + t.shape_str());
  if (t.strides[3] != 1)
    throw ValueError(pre(arg, op) + "must have unit stride on head_dim (the last dimension); make it contiguous");
  for (int i = 0; i < 3; ++i)
    if (t.strides[i] < 0) throw ValueError(pre(arg, op) + "must not have negative strides");
  if (!t.is_float()) throw TypeError(pre(arg, op) + "must be float32, bfloat16 or float16, got " + t.type_str());
  if (t.data == nullptr) throw ValueError(pre(arg, op) + "has no data");
}

void check_index_array(const char* arg, const TensorView& t, int64_t b, int64_t h) {
  if (!t.dtype_known || t.dtype != DType::kInt32) throw TypeError(pre(arg) + "must be int32, got " + t.type_str());
  if (t.ndim != 3 || t.shape[0] != b || t.shape[1] != h) {
    std::ostringstream s;
    s << pre(arg) << "must have shape (" << b << ", " << h << ", n) for q batch " << b << " and " << h
      << " kv heads, got " << t.shape_str();
    throw ValueError(s.str());
  }
  if (!t.row_contiguous()) throw ValueError(pre(arg) + "must be C-contiguous");
}

void validate_mask(const BlockMaskViews& m, const TensorView& q, int64_t b, int64_t hkv, int64_t lq, int64_t lk) {
  for (auto [name, v] : {std::pair<const char*, int64_t>{"block_q", m.block_q}, {"block_k", m.block_k}})
    if (v != 32 && v != 64 && v != 128)
      throw ValueError(pre("mask") + name + " must be 32, 64 or 128, got " + std::to_string(v));
  if (!m.has_mask) return;
  check_with_q("mask.indptr", m.indptr, q);
  check_with_q("mask.indices", m.indices, q);
  check_index_array("mask.indptr", m.indptr, b, hkv);
  check_index_array("mask.indices", m.indices, b, hkv);
  const int64_t nqb = (lq + m.block_q - 1) / m.block_q, nkb = (lk + m.block_k - 1) / m.block_k;
  if (m.indptr.shape[2] != nqb + 1)
    throw ValueError(pre("mask.indptr") + "must have " + std::to_string(nqb + 1) + " entries per row (Lq = " +
                     std::to_string(lq) + " in blocks of " + std::to_string(m.block_q) + ", plus one), got " +
                     std::to_string(m.indptr.shape[2]));
  const int64_t cap = m.indices.shape[2];
  if (cap > 0 && m.indices.data == nullptr) throw ValueError(pre("mask.indices") + "has no data");
  // The contents of a mask in GPU memory cannot be read here without synchronizing with the
  // device; the CUDA kernels clamp indptr and skip block numbers out of range instead.
  if (q.device == Device::kCUDA) return;
  const int32_t* ip = static_cast<const int32_t*>(m.indptr.data);
  const int32_t* ix = static_cast<const int32_t*>(m.indices.data);
  for (int64_t r = 0; r < b * hkv; ++r) {
    const int32_t* p = ip + r * (nqb + 1);
    const int32_t* x = ix + r * cap;
    if (p[0] != 0) throw ValueError(pre("mask.indptr") + "rows must start at 0");
    for (int64_t i = 0; i < nqb; ++i) {
      if (p[i + 1] < p[i]) throw ValueError(pre("mask.indptr") + "must be non-decreasing");
      if (p[i + 1] > cap)
        throw ValueError(pre("mask.indptr") + "points past the end of indices (capacity " + std::to_string(cap) + ")");
    }
    for (int64_t i = 0; i < nqb; ++i) {
      for (int32_t j = p[i]; j < p[i + 1]; ++j) {
        if (x[j] < 0 || x[j] >= nkb)
          throw ValueError(pre("mask.indices") + "holds key block " + std::to_string(x[j]) + ", outside 0.." +
                           std::to_string(nkb - 1) + " (Lk = " + std::to_string(lk) + " in blocks of " +
                           std::to_string(m.block_k) + ")");
        if (j > p[i] && x[j] <= x[j - 1])
          throw ValueError(pre("mask.indices") + "must be strictly increasing within each query block");
      }
    }
  }
}

}  // namespace

void set_attention_kv_splits(int64_t n) {
  if (n < 0) throw ValueError("set_attention_kv_splits: n must be >= 0 (0: automatic), got " + std::to_string(n));
  g_kv_splits.store(n);
}

void attention(const TensorView& q, const TensorView& k, const TensorView& v, const BlockMaskViews& mask,
               bool causal, double scale, int64_t q_offset, const TensorView& out, const TensorView* lse,
               const CudaLaunch* cuda, const TensorView* q_offsets) {
  check_with_q("q", q, q);
  check_with_q("k", k, q);
  check_with_q("v", v, q);
  check_with_q("out", out, q);
  if (lse) check_with_q("lse", *lse, q);
  check_4d("q", q);
  check_4d("k", k);
  check_4d("v", v);
  check_4d("out", out);
  const int64_t B = q.shape[0], Hq = q.shape[1], Lq = q.shape[2], D = q.shape[3];
  const int64_t Hkv = k.shape[1], Lk = k.shape[2];
  if (D != 64 && D != 128) throw ValueError(pre("q") + "head_dim must be 64 or 128, got " + std::to_string(D));
  if (k.shape[0] != B || k.shape[3] != D)
    throw ValueError(pre("k") + "must have q's batch and head_dim: q " + q.shape_str() + ", k " + k.shape_str());
  for (int i = 0; i < 4; ++i)
    if (v.shape[i] != k.shape[i]) throw ValueError(pre("v") + "must have k's shape " + k.shape_str() + ", got " + v.shape_str());
  if (Hq % Hkv != 0)
    throw ValueError(pre("q") + "heads (" + std::to_string(Hq) + ") must be a multiple of k's heads (" +
                     std::to_string(Hkv) + ")");
  if (k.dtype != q.dtype || v.dtype != q.dtype)
    throw TypeError(pre("k") + "and v must have q's dtype " + q.type_str() + ", got " + k.type_str() + " and " +
                    v.type_str());
  for (int i = 0; i < 4; ++i)
    if (out.shape[i] != q.shape[i]) throw ValueError(pre("out") + "must have q's shape " + q.shape_str() + ", got " + out.shape_str());
  if (out.dtype != q.dtype) throw TypeError(pre("out") + "must have q's dtype " + q.type_str() + ", got " + out.type_str());
  if (!out.writable || !non_overlapping(out)) throw ValueError(pre("out") + "must be writable with non-overlapping elements");
  for (const TensorView* in : {&q, &k, &v})
    if (out.overlaps(*in)) throw ValueError(pre("out") + "overlaps an input array");
  if (lse) {
    if (!lse->dtype_known || lse->dtype != DType::kFloat32 || lse->ndim != 3 ||
        lse->shape[0] != B || lse->shape[1] != Hq || lse->shape[2] != Lq || !lse->row_contiguous() || !lse->writable)
      throw ValueError(pre("lse") + "must be a writable C-contiguous float32 array of shape (" + std::to_string(B) +
                       ", " + std::to_string(Hq) + ", " + std::to_string(Lq) + ")");
    for (const TensorView* in : {&q, &k, &v, &out})
      if (lse->overlaps(*in)) throw ValueError(pre("lse") + "overlaps another array");
  }
  if (q_offset < 0) throw ValueError(pre("q_offset") + "must be >= 0, got " + std::to_string(q_offset));
  if (q_offsets) {
    check_with_q("q_offsets", *q_offsets, q);
    if (!q_offsets->dtype_known || q_offsets->dtype != DType::kInt32 || q_offsets->ndim != 1 ||
        q_offsets->shape[0] != B || !q_offsets->row_contiguous() || q_offsets->data == nullptr)
      throw ValueError(pre("q_offsets") + "must be a contiguous int32 array of shape (" + std::to_string(B) +
                       ",) (one q_offset per batch row), got " + q_offsets->type_str() + " " + q_offsets->shape_str());
  }
  if (std::isnan(scale)) scale = 1.0 / std::sqrt(double(D));
  if (!std::isfinite(scale)) throw ValueError(pre("scale") + "must be finite");
  validate_mask(mask, q, B, Hkv, Lq, Lk);

  cpu::AttentionArgs a;
  a.q = q.data;
  a.k = k.data;
  a.v = v.data;
  a.out = out.data;
  a.lse = lse ? static_cast<float*>(lse->data) : nullptr;
  a.dtype = q.dtype;
  a.b = B;
  a.hq = Hq;
  a.hkv = Hkv;
  a.lq = Lq;
  a.lk = Lk;
  a.d = D;
  for (int i = 0; i < 3; ++i) {
    a.q_strides[i] = q.strides[i];
    a.k_strides[i] = k.strides[i];
    a.v_strides[i] = v.strides[i];
    a.o_strides[i] = out.strides[i];
  }
  a.indptr = mask.has_mask ? static_cast<const int32_t*>(mask.indptr.data) : nullptr;
  a.indices = mask.has_mask ? static_cast<const int32_t*>(mask.indices.data) : nullptr;
  a.nnz_cap = mask.has_mask ? mask.indices.shape[2] : 0;
  a.block_q = int32_t(mask.block_q);
  a.block_k = int32_t(mask.block_k);
  a.causal = causal;
  a.scale = float(scale);
  a.q_offset = q_offset;
  a.kv_splits = g_kv_splits.load(std::memory_order_relaxed);

  if (q.device == Device::kCUDA) {
    a.q_offsets = q_offsets ? static_cast<const int32_t*>(q_offsets->data) : nullptr;
    return run_cuda(kOp, "q", q, cuda, a, [](const CudaBackend& b) { return b.attention; });
  }

  const cpu::Variant variant = variant_or_throw(kOp);
  auto pool = cpu::pool();
  auto run = [&](const cpu::AttentionArgs& args) {
    Status s;
    switch (variant) {
      case cpu::Variant::kAmx: s = cpu::attention_amx(args, *pool); break;
      case cpu::Variant::kAvx512Bf16: s = cpu::attention_avx512bf16(args, *pool); break;
      case cpu::Variant::kAvx512: s = cpu::attention_avx512(args, *pool); break;
      case cpu::Variant::kAvxVnni:  // the AVX2 unit's attention (no integer products in it)
      case cpu::Variant::kAvx2: s = cpu::attention_avx2(args, *pool); break;
      default: s = cpu::attention_scalar(args, *pool); break;
    }
    check_status(kOp, s);
  };
  if (!q_offsets) return run(a);
  // Per-row offsets on the CPU: one call per batch row, each with its own q_offset (copied
  // first: an output that overlaps them cannot change them between rows).
  const int32_t* src = static_cast<const int32_t*>(q_offsets->data);
  const std::vector<int32_t> offs(src, src + B);
  for (int64_t bi = 0; bi < B; ++bi)
    if (offs[bi] < 0) throw ValueError(pre("q_offsets") + "must be >= 0, got " + std::to_string(offs[bi]));
  const int64_t es = cpu::dtype_size(q.dtype);
  const int64_t nqb = (Lq + mask.block_q - 1) / mask.block_q;
  for (int64_t bi = 0; bi < B; ++bi) {
    cpu::AttentionArgs r = a;
    r.b = 1;
    r.q = static_cast<const char*>(a.q) + bi * a.q_strides[0] * es;
    r.k = static_cast<const char*>(a.k) + bi * a.k_strides[0] * es;
    r.v = static_cast<const char*>(a.v) + bi * a.v_strides[0] * es;
    r.out = static_cast<char*>(a.out) + bi * a.o_strides[0] * es;
    if (a.lse) r.lse = a.lse + bi * Hq * Lq;
    if (a.indptr) {
      r.indptr = a.indptr + bi * Hkv * (nqb + 1);
      r.indices = a.indices + bi * Hkv * a.nnz_cap;
    }
    r.q_offset = offs[bi];
    run(r);
  }
}

}  // namespace bitswitch

// -- decode page selection ----------------------------------------------------------------
namespace bitswitch {
namespace {

const char* kSelectOp = "select_pages_at";

// A C-contiguous array of `dtype` with exactly `shape`, on q's device (writable if asked).
void check_exact(const char* arg, const TensorView& t, const TensorView& q, DType dtype,
                 std::initializer_list<int64_t> shape, bool writable) {
  check_with_q(arg, t, q, kSelectOp);
  std::ostringstream want;
  want << "(";
  int i = 0;
  bool ok = t.ndim == int(shape.size());
  for (int64_t s : shape) {
    want << (i ? ", " : "") << s;
    if (ok && t.shape[i] != s) ok = false;
    ++i;
  }
  want << (shape.size() == 1 ? ",)" : ")");
  if (!t.dtype_known || t.dtype != dtype)
    throw TypeError(pre(arg, kSelectOp) + "must be " + dtype_str(dtype) + ", got " + t.type_str());
  if (!ok) throw ValueError(pre(arg, kSelectOp) + "must have shape " + want.str() + ", got " + t.shape_str());
  if (!t.row_contiguous()) throw ValueError(pre(arg, kSelectOp) + "must be C-contiguous");
  if (t.data == nullptr) throw ValueError(pre(arg, kSelectOp) + "has no data");
  if (writable && !t.writable) throw ValueError(pre(arg, kSelectOp) + "must be writable");
}

}  // namespace

void select_pages_at(const TensorView& q, const TensorView& k, const TensorView& kmin, const TensorView& kmax,
                     const TensorView& positions, const TensorView& indices, int64_t sinks, int64_t block_k,
                     const CudaLaunch* cuda) {
  check_with_q("q", q, q, kSelectOp);
  check_with_q("k", k, q, kSelectOp);
  check_4d("q", q, kSelectOp);
  check_4d("k", k, kSelectOp);
  const int64_t B = q.shape[0], Hq = q.shape[1], D = q.shape[3], Hkv = k.shape[1], cap = k.shape[2];
  if (q.shape[2] != 1)
    throw ValueError(pre("q", kSelectOp) + "must hold one query per batch row and head ([B, Hq, 1, D]), got shape " + q.shape_str());
  if (D != 64 && D != 128) throw ValueError(pre("q", kSelectOp) + "head_dim must be 64 or 128, got " + std::to_string(D));
  if (k.shape[0] != B || k.shape[3] != D)
    throw ValueError(pre("k", kSelectOp) + "must have q's batch and head_dim: q " + q.shape_str() + ", k " + k.shape_str());
  if (Hq % Hkv != 0)
    throw ValueError(pre("q", kSelectOp) + "heads (" + std::to_string(Hq) + ") must be a multiple of k's heads (" +
                     std::to_string(Hkv) + ")");
  if (k.dtype != q.dtype) throw TypeError(pre("k", kSelectOp) + "must have q's dtype " + q.type_str() + ", got " + k.type_str());
  if (block_k != 32 && block_k != 64 && block_k != 128)
    throw ValueError(pre("block_k", kSelectOp) + "must be 32, 64 or 128, got " + std::to_string(block_k));
  if (sinks < 0 || sinks >= (int64_t(1) << 31)) throw ValueError(pre("sinks", kSelectOp) + "must be >= 0, got " + std::to_string(sinks));
  const int64_t nkb = (cap + block_k - 1) / block_k;
  check_exact("kmin", kmin, q, DType::kFloat32, {B, Hkv, nkb, D}, true);
  check_exact("kmax", kmax, q, DType::kFloat32, {B, Hkv, nkb, D}, true);
  check_exact("positions", positions, q, DType::kInt32, {B}, false);
  if (indices.ndim != 3 || indices.shape[2] < 1 || indices.shape[2] > nkb) {
    std::ostringstream s;
    s << pre("indices", kSelectOp) << "must have shape (" << B << ", " << Hkv << ", n) with 1 <= n <= " << nkb
      << " (the cache's key blocks), got " << indices.shape_str();
    throw ValueError(s.str());
  }
  const int64_t n = indices.shape[2];
  check_exact("indices", indices, q, DType::kInt32, {B, Hkv, n}, true);
  const TensorView* outs[] = {&kmin, &kmax, &indices};
  const TensorView* all[] = {&q, &k, &kmin, &kmax, &positions, &indices};
  for (const TensorView* o : outs)
    for (const TensorView* t : all)
      if (o != t && o->overlaps(*t)) throw ValueError(std::string(kSelectOp) + ": kmin, kmax and indices must not overlap each other or an input");

  cpu::PageSelectArgs a;
  a.q = q.data;
  a.k = k.data;
  a.kmin = static_cast<float*>(kmin.data);
  a.kmax = static_cast<float*>(kmax.data);
  a.indices = static_cast<int32_t*>(indices.data);
  a.positions = static_cast<const int32_t*>(positions.data);
  a.dtype = q.dtype;
  a.b = B;
  a.hq = Hq;
  a.hkv = Hkv;
  a.capacity = cap;
  a.d = D;
  a.nkb = nkb;
  a.n = n;
  a.q_strides[0] = q.strides[0];
  a.q_strides[1] = q.strides[1];
  for (int i = 0; i < 3; ++i) a.k_strides[i] = k.strides[i];
  a.block_k = int32_t(block_k);
  a.sinks = int32_t(sinks);

  if (q.device == Device::kCUDA) {
    // The kernel keeps a kv head's queries and block scores in shared memory.
    if ((Hq / Hkv) * D > 2048 || nkb > 8192)
      throw ValueError(pre("q", kSelectOp) + "on CUDA takes at most 2048 / head_dim query heads per kv head and 8192 key "
                       "blocks; got " + std::to_string(Hq / Hkv) + " and " + std::to_string(nkb));
    for (auto [name, t] : {std::pair<const char*, const TensorView*>{"kmin", &kmin}, {"kmax", &kmax}})
      if (reinterpret_cast<uintptr_t>(t->data) % 16 != 0)
        throw ValueError(pre(name, kSelectOp) + "must start 16-byte aligned on CUDA (the kernel reads it in 16-byte loads)");
    return run_cuda(kSelectOp, "q", q, cuda, a, [](const CudaBackend& b) { return b.select_pages; });
  }
  const int32_t* pos = a.positions;
  for (int64_t bi = 0; bi < B; ++bi)
    if (pos[bi] < 0 || pos[bi] >= cap)
      throw ValueError(pre("positions", kSelectOp) + "must be in [0, " + std::to_string(cap) + ") (the cache's capacity), got " +
                       std::to_string(pos[bi]));
  check_status(kSelectOp, cpu::select_pages_scalar(a, *cpu::pool()));
}

}  // namespace bitswitch
