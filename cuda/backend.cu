// bitswitch._cuda's backend: turns the ops glue's validated arguments (csrc/cpu/kernels.h
// structs) into the kernels' parameters and launches them on the caller's stream and
// device. Nothing here allocates or synchronizes, so the ops can be captured in CUDA graphs.
#include <cuda_runtime.h>

#include <cstdio>
#include <mutex>
#include <vector>

#include "attention.cuh"
#include "backend.h"
#include "layer_ops.cuh"
#include "page_select.cuh"
#include "qmatmul.cuh"

namespace bitswitch {
namespace cuda {
namespace {

DType to_cuda(bitswitch::DType t) {
  switch (t) {
    case bitswitch::DType::kBFloat16: return DType::kBFloat16;
    case bitswitch::DType::kFloat16: return DType::kFloat16;
    default: return DType::kFloat32;
  }
}

// Makes `device` current for the launch and restores the caller's device afterwards (torch
// leaves the current device alone when it calls a Python op on another device's tensors).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (device >= 0 && cudaGetDevice(&prev_) == cudaSuccess && prev_ != device) {
      err_ = cudaSetDevice(device);
      switched_ = err_ == cudaSuccess;
    }
  }
  ~DeviceGuard() {
    if (switched_) cudaSetDevice(prev_);
  }
  cudaError_t error() const { return err_; }

 private:
  int prev_ = -1;
  bool switched_ = false;
  cudaError_t err_ = cudaSuccess;
};

int32_t fail(cudaError_t e, const char* what, char* err, int32_t errlen) {
  std::snprintf(err, size_t(errlen), "%s: %s (%s)", what, cudaGetErrorString(e), cudaGetErrorName(e));
  cudaGetLastError();  // clear a sticky launch error so the next call starts clean
  return int32_t(e);
}

QMatmulParams qmatmul_params(const cpu::QMatmulArgs& a) {
  QMatmulParams p;
  p.x = a.x;
  p.y = a.y;
  p.plane0 = a.plane0;
  p.plane1 = a.plane1;
  p.scales = a.scales;
  p.biases = a.biases;
  p.m = a.m;
  p.n = a.n;
  p.k = a.k;
  p.group_size = a.group_size;
  p.bits = a.bits;
  p.x_dtype = to_cuda(a.x_dtype);
  p.scale_dtype = to_cuda(a.scale_dtype);
  return p;
}

AttentionParams attention_params(const cpu::AttentionArgs& a) {
  AttentionParams p;
  p.q = a.q;
  p.k = a.k;
  p.v = a.v;
  p.out = a.out;
  p.lse = a.lse;
  p.dtype = to_cuda(a.dtype);
  p.b = a.b;
  p.hq = a.hq;
  p.hkv = a.hkv;
  p.lq = a.lq;
  p.lk = a.lk;
  p.d = a.d;
  for (int i = 0; i < 3; ++i) {
    p.q_strides[i] = a.q_strides[i];
    p.k_strides[i] = a.k_strides[i];
    p.v_strides[i] = a.v_strides[i];
    p.o_strides[i] = a.o_strides[i];
  }
  p.indptr = a.indptr;
  p.indices = a.indices;
  p.nnz_cap = a.nnz_cap;
  p.block_q = a.block_q;
  p.block_k = a.block_k;
  p.causal = a.causal;
  p.scale = a.scale;
  p.q_offset = a.q_offset;
  p.kv_splits = a.kv_splits;
  p.q_offsets = a.q_offsets;
  return p;
}

PageSelectParams select_pages_params(const cpu::PageSelectArgs& a) {
  PageSelectParams p;
  p.q = a.q;
  p.k = a.k;
  p.kmin = a.kmin;
  p.kmax = a.kmax;
  p.indices = a.indices;
  p.positions = a.positions;
  p.dtype = to_cuda(a.dtype);
  p.b = a.b;
  p.hq = a.hq;
  p.hkv = a.hkv;
  p.capacity = a.capacity;
  p.d = a.d;
  p.nkb = a.nkb;
  p.n = a.n;
  p.q_strides[0] = a.q_strides[0];
  p.q_strides[1] = a.q_strides[1];
  for (int i = 0; i < 3; ++i) p.k_strides[i] = a.k_strides[i];
  p.block_k = a.block_k;
  p.sinks = a.sinks;
  return p;
}

// Runs launch(params, workspace, bytes, num_sms, stream) on the caller's device and stream.
template <class Params, class Launch>
int32_t launch_on(const CudaLaunch* l, const Params& p, Launch launch, const char* what, char* err, int32_t errlen) {
  DeviceGuard guard(l->device);
  if (guard.error() != cudaSuccess) return fail(guard.error(), "cudaSetDevice", err, errlen);
  const cudaError_t e = launch(p, l->workspace, size_t(l->workspace_bytes), num_sms(l->device),
                               static_cast<cudaStream_t>(l->stream));
  return e == cudaSuccess ? 0 : fail(e, what, err, errlen);
}

int32_t qmatmul_entry(const cpu::QMatmulArgs* a, const CudaLaunch* l, char* err, int32_t errlen) {
  return launch_on(l, qmatmul_params(*a), &cuda::qmatmul, "qmatmul launch", err, errlen);
}

int32_t dequantize_entry(const cpu::QMatmulArgs* a, const CudaLaunch* l, char* err, int32_t errlen) {
  return launch_on(l, qmatmul_params(*a), &cuda::dequantize, "dequantize launch", err, errlen);
}

int32_t attention_entry(const cpu::AttentionArgs* a, const CudaLaunch* l, char* err, int32_t errlen) {
  return launch_on(l, attention_params(*a), &cuda::attention, "attention launch", err, errlen);
}

RmsNormParams rms_norm_params(const cpu::RmsNormArgs& a) {
  RmsNormParams p;
  p.x = a.x;
  p.delta = a.delta;
  p.weight = a.weight;
  p.out = a.out;
  p.rows = a.rows;
  p.h = a.h;
  p.x_stride = a.x_stride;
  p.delta_stride = a.delta_stride;
  p.out_stride = a.out_stride;
  p.eps = a.eps;
  p.dtype = to_cuda(a.dtype);
  return p;
}

RopeParams rope_params(const cpu::RopeArgs& a) {
  RopeParams p;
  p.qkv = a.qkv;
  p.qkv_strides[0] = a.qkv_strides[0];
  p.qkv_strides[1] = a.qkv_strides[1];
  p.b = a.b;
  p.n = a.n;
  p.hq = a.hq;
  p.hkv = a.hkv;
  p.d = a.d;
  p.q_weight = a.q_weight;
  p.k_weight = a.k_weight;
  p.eps = a.eps;
  p.cos = a.cos;
  p.sin = a.sin;
  p.table_rows = a.table_rows;
  p.pos = a.pos;
  p.positions = a.positions;
  p.q_out = a.q_out;
  p.k_cache = a.k_cache;
  p.v_cache = a.v_cache;
  for (int i = 0; i < 3; ++i) {
    p.q_strides[i] = a.q_strides[i];
    p.k_strides[i] = a.k_strides[i];
    p.v_strides[i] = a.v_strides[i];
  }
  p.capacity = a.capacity;
  p.dtype = to_cuda(a.dtype);
  return p;
}

SiluMulParams silu_mul_params(const cpu::SiluMulArgs& a) {
  SiluMulParams p;
  p.gate_up = a.gate_up;
  p.out = a.out;
  p.rows = a.rows;
  p.i = a.i;
  p.gu_stride = a.gu_stride;
  p.out_stride = a.out_stride;
  p.dtype = to_cuda(a.dtype);
  return p;
}

// An entry for a launcher that takes (params, stream) only (no scratch).
template <class Params, cudaError_t (*Launch)(const Params&, cudaStream_t)>
int32_t stream_entry(const CudaLaunch* l, const Params& p, const char* what, char* err, int32_t errlen) {
  auto launch = [](const Params& q, void*, size_t, int, cudaStream_t s) { return Launch(q, s); };
  return launch_on(l, p, launch, what, err, errlen);
}

int32_t rms_norm_entry(const cpu::RmsNormArgs* a, const CudaLaunch* l, char* err, int32_t errlen) {
  return stream_entry<RmsNormParams, &cuda::rms_norm>(l, rms_norm_params(*a), "rms_norm launch", err, errlen);
}

int32_t rope_entry(const cpu::RopeArgs* a, const CudaLaunch* l, char* err, int32_t errlen) {
  return stream_entry<RopeParams, &cuda::rope>(l, rope_params(*a), "rope_qkv launch", err, errlen);
}

int32_t silu_mul_entry(const cpu::SiluMulArgs* a, const CudaLaunch* l, char* err, int32_t errlen) {
  return stream_entry<SiluMulParams, &cuda::silu_mul>(l, silu_mul_params(*a), "silu_mul launch", err, errlen);
}

int32_t select_pages_entry(const cpu::PageSelectArgs* a, const CudaLaunch* l, char* err, int32_t errlen) {
  return stream_entry<PageSelectParams, &cuda::select_pages>(l, select_pages_params(*a), "select_pages_at launch", err,
                                                             errlen);
}

}  // namespace

const CudaBackend* backend_table() {
  static const CudaBackend table = [] {
    CudaBackend t;
    t.qmatmul = qmatmul_entry;
    t.attention = attention_entry;
    t.select_pages = select_pages_entry;
    t.rms_norm = rms_norm_entry;
    t.rope = rope_entry;
    t.silu_mul = silu_mul_entry;
    t.dequantize = dequantize_entry;
    return t;
  }();
  return &table;
}

int num_sms(int device) {
  // Queried once per device: cudaDeviceGetAttribute is cheap but not free, and the count
  // never changes. 0 when the query fails (the launchers then assume a mid-size GPU).
  static std::mutex mu;
  static std::vector<int> cache;
  if (device < 0 && cudaGetDevice(&device) != cudaSuccess) return 0;
  std::lock_guard<std::mutex> lock(mu);
  if (size_t(device) >= cache.size()) cache.resize(size_t(device) + 1, -1);
  if (cache[size_t(device)] < 0) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      cudaGetLastError();
      n = 0;
    }
    cache[size_t(device)] = n;
  }
  return cache[size_t(device)];
}

size_t qmatmul_workspace(int64_t m, int64_t n, int64_t k, int32_t group_size, int32_t bits, int32_t x_dtype,
                         int32_t scale_dtype, int device) {
  QMatmulParams p{};
  p.m = m;
  p.n = n;
  p.k = k;
  p.group_size = group_size;
  p.bits = bits;
  p.x_dtype = DType(x_dtype);
  p.scale_dtype = DType(scale_dtype);
  return qmatmul_workspace_bytes(p, num_sms(device));
}

size_t attention_workspace(int64_t b, int64_t hq, int64_t hkv, int64_t lq, int64_t lk, int64_t d, int32_t dtype,
                           int32_t block_q, int32_t block_k, bool has_mask, bool causal, int device) {
  AttentionParams p{};
  p.b = b;
  p.hq = hq;
  p.hkv = hkv;
  p.lq = lq;
  p.lk = lk;
  p.d = d;
  p.dtype = DType(dtype);
  p.block_q = block_q;
  p.block_k = block_k;
  p.causal = causal;
  p.nnz_cap = has_mask ? (lk + block_k - 1) / block_k : 0;
  return attention_workspace_bytes(p, num_sms(device));
}

}  // namespace cuda
}  // namespace bitswitch
