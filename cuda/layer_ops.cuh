// The fused per-token layer ops on NVIDIA GPUs: RMSNorm (with the residual add folded in),
// q/k RMSNorm + RoPE + KV-cache write of a fused q|k|v projection, and SiLU(gate) * up. The
// semantics and rounding points are those of the CPU kernels (csrc/cpu/layer_ops.h, which
// follow transformers op for op): each value is rounded to the activation dtype where a
// torch op of the reference would round it, and everything between is float32.
//
// Why on the GPU: done as torch ops, a Qwen3 layer's norms, RoPE and SiLU are ~30 small
// kernels; in a decode step captured in a CUDA graph each still costs its launch slot
// (~1-2 us), several times the layer's INT4 GEMV time at small sizes. Fused, they are
// three launches per layer, and the RoPE op reads its position from device memory, so the
// step stays capturable.
//
// Kernels (one per op, templated on the element type; launchers below):
//   rms_norm_kernel: one CTA of 256 threads per row; the sum of squares is a CTA reduction.
//   rope_kernel:     one CTA per (batch, token, head) of the fused projection, a thread per
//                    element of head_dim; q/k heads normalize (CTA reduction), exchange
//                    halves through shared memory for the rotation and write q_out / the k
//                    cache; v heads are copied to the v cache.
//   silu_mul_kernel: elementwise over rows x inter, grid-stride.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "bitswitch/exp_approx.h"
#include "common.cuh"

namespace bitswitch {
namespace cuda {

// See csrc/cpu/kernels.h RmsNormArgs, RopeArgs, SiluMulArgs (the same fields).
struct RmsNormParams {
  void* x;
  const void* delta;   // may be null
  const void* weight;
  void* out;           // may be x
  int64_t rows, h;
  int64_t x_stride, delta_stride, out_stride;
  float eps;
  DType dtype;
};

struct RopeParams {
  const void* qkv;
  int64_t qkv_strides[2];
  int64_t b, n, hq, hkv, d;
  const void* q_weight;  // both null: no q/k norm
  const void* k_weight;
  float eps;
  const void* cos;
  const void* sin;
  int64_t table_rows;    // rows of cos / sin
  int64_t pos;
  const int32_t* positions;  // [b] in device memory (replaces pos); clamped to the cache and tables
  void* q_out;
  int64_t q_strides[3];
  void* k_cache;
  void* v_cache;
  int64_t k_strides[3];
  int64_t v_strides[3];
  int64_t capacity;
  DType dtype;
};

struct SiluMulParams {
  const void* gate_up;
  void* out;
  int64_t rows, i;
  int64_t gu_stride, out_stride;
  DType dtype;
};

namespace layer {

constexpr int kNormThreads = 256;
constexpr int kMaxWarps = 8;  // CTAs here have at most 256 threads

// f rounded to T, as a float.
template <class T> BS_DEVICE float round_to(float f) { return to_float(from_float<T>(f)); }

// Grid: one CTA per row; block: kNormThreads.
template <class T>
__global__ void __launch_bounds__(kNormThreads) rms_norm_kernel(const RmsNormParams p) {
  __shared__ float red[kMaxWarps];
  const int64_t row = blockIdx.x;
  T* x = static_cast<T*>(p.x) + row * p.x_stride;
  const T* dl = p.delta ? static_cast<const T*>(p.delta) + row * p.delta_stride : nullptr;
  const T* w = static_cast<const T*>(p.weight);
  T* out = static_cast<T*>(p.out) + row * p.out_stride;
  float ss = 0.0f;
  for (int64_t i = threadIdx.x; i < p.h; i += kNormThreads) {
    float v = to_float(x[i]);
    if (dl) {
      v = round_to<T>(v + to_float(dl[i]));
      x[i] = from_float<T>(v);
    }
    ss += v * v;
  }
  const float r = 1.0f / sqrtf(block_sum(ss, red) / float(p.h) + p.eps);
  // Each thread reads back only the elements it wrote (out may be x).
  for (int64_t i = threadIdx.x; i < p.h; i += kNormThreads)
    out[i] = from_float<T>(round_to<T>(round_to<T>(to_float(x[i]) * r) * to_float(w[i])));
}

// Grid: one CTA per (batch, token, head), head fastest; block: head_dim rounded up to a
// multiple of 32 (threads past head_dim only join the reductions).
template <class T>
__global__ void __launch_bounds__(256) rope_kernel(const RopeParams p) {
  __shared__ float red[kMaxWarps];
  __shared__ float sv[256];
  const int64_t heads = p.hq + 2 * p.hkv;
  const int64_t h = blockIdx.x % heads, bt = blockIdx.x / heads, bi = bt / p.n, ti = bt % p.n;
  const int d = int(p.d), half = d / 2, i = int(threadIdx.x);
  const bool on = i < d;
  int64_t pos = (p.positions ? int64_t(p.positions[bi]) : p.pos) + ti;
  const int64_t last = (p.capacity < p.table_rows ? p.capacity : p.table_rows) - 1;
  pos = pos < 0 ? 0 : (pos > last ? last : pos);
  const T* src = static_cast<const T*>(p.qkv) + bi * p.qkv_strides[0] + ti * p.qkv_strides[1] + h * d;
  float v = on ? to_float(src[i]) : 0.0f;
  if (h >= p.hq + p.hkv) {  // v: copied to the cache as is (uniform over the CTA)
    if (on) {
      T* dst = static_cast<T*>(p.v_cache) + bi * p.v_strides[0] + (h - p.hq - p.hkv) * p.v_strides[1] +
               pos * p.v_strides[2];
      dst[i] = from_float<T>(v);
    }
    return;
  }
  const bool is_q = h < p.hq;
  if (p.q_weight) {
    const float r = 1.0f / sqrtf(block_sum(v * v, red) / float(d) + p.eps);
    const T* w = static_cast<const T*>(is_q ? p.q_weight : p.k_weight);
    if (on) v = round_to<T>(round_to<T>(v * r) * to_float(w[i]));
  }
  sv[i] = v;
  __syncthreads();
  if (!on) return;
  const float other = sv[i < half ? i + half : i - half];
  const float cs = to_float(static_cast<const T*>(p.cos)[pos * d + i]);
  const float sn = to_float(static_cast<const T*>(p.sin)[pos * d + i]);
  const float y = round_to<T>(round_to<T>(v * cs) + round_to<T>(other * sn));
  T* dst = is_q ? static_cast<T*>(p.q_out) + bi * p.q_strides[0] + h * p.q_strides[1] + ti * p.q_strides[2]
                : static_cast<T*>(p.k_cache) + bi * p.k_strides[0] + (h - p.hq) * p.k_strides[1] + pos * p.k_strides[2];
  dst[i] = from_float<T>(y);
}

// Grid-stride over rows x i; block 256.
template <class T>
__global__ void __launch_bounds__(256) silu_mul_kernel(const SiluMulParams p) {
  const int64_t total = p.rows * p.i;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = e / p.i, j = e % p.i;
    const T* gu = static_cast<const T*>(p.gate_up) + r * p.gu_stride;
    const float g = to_float(gu[j]), u = to_float(gu[p.i + j]);
    static_cast<T*>(p.out)[r * p.out_stride + j] = from_float<T>(round_to<T>(round_to<T>(g / (1.0f + bitswitch::exp_approx(-g))) * u));
  }
}

template <class T>
cudaError_t launch_rms_norm(const RmsNormParams& p, cudaStream_t s) {
  return BS_LAUNCH((rms_norm_kernel<T>), p.rows, kNormThreads, 0, s, p);
}

template <class T>
cudaError_t launch_rope(const RopeParams& p, cudaStream_t s) {
  const int threads = int((p.d + 31) / 32 * 32);
  return BS_LAUNCH((rope_kernel<T>), p.b * p.n * (p.hq + 2 * p.hkv), threads, 0, s, p);
}

template <class T>
cudaError_t launch_silu_mul(const SiluMulParams& p, cudaStream_t s) {
  const int64_t total = p.rows * p.i, blocks = (total + 255) / 256;
  return BS_LAUNCH((silu_mul_kernel<T>), blocks < 65536 ? blocks : 65536, 256, 0, s, p);
}

#define BS_LAYER_DISPATCH(launch, p, s)                                   \
  switch ((p).dtype) {                                                    \
    case DType::kBFloat16: return launch<__nv_bfloat16>(p, s);            \
    case DType::kFloat16: return launch<__half>(p, s);                    \
    case DType::kFloat32: return launch<float>(p, s);                     \
    default: return cudaErrorInvalidValue;                                \
  }

}  // namespace layer

// Launchers: no allocation, no host synchronization (capturable in a CUDA graph). Arguments
// are validated by the ops glue (csrc/ops_layer.cpp); these reject only what would launch
// an invalid grid.
inline cudaError_t rms_norm(const RmsNormParams& p, cudaStream_t stream) {
  if (p.rows <= 0 || p.h <= 0) return p.rows == 0 ? cudaSuccess : cudaErrorInvalidValue;
  if (p.rows > 0x7fffffff) return cudaErrorInvalidConfiguration;
  BS_LAYER_DISPATCH(layer::launch_rms_norm, p, stream)
}

inline cudaError_t rope(const RopeParams& p, cudaStream_t stream) {
  if (p.b * p.n == 0) return cudaSuccess;
  if (p.d < 2 || p.d % 2 || p.d > 256 || p.hkv <= 0 || p.capacity <= 0 || p.table_rows <= 0) return cudaErrorInvalidValue;
  if (p.b * p.n * (p.hq + 2 * p.hkv) > 0x7fffffff) return cudaErrorInvalidConfiguration;
  BS_LAYER_DISPATCH(layer::launch_rope, p, stream)
}

inline cudaError_t silu_mul(const SiluMulParams& p, cudaStream_t stream) {
  if (p.rows * p.i == 0) return cudaSuccess;
  BS_LAYER_DISPATCH(layer::launch_silu_mul, p, stream)
}

#undef BS_LAYER_DISPATCH

}  // namespace cuda
}  // namespace bitswitch
