// The small per-token operations of a transformer layer, fused so that a decode step
// makes a few native calls instead of dozens of framework ones: RMSNorm (with the
// residual add folded in), q/k RMSNorm + RoPE + KV-cache write, and SiLU(gate) * up.
//
// At decode sizes (one row of 1-4K elements) each of these is ~1 µs of arithmetic; done
// as separate torch ops they cost 2-8 µs each, and a Qwen3 layer needs about forty of
// them, which measured ~0.3 ms per layer (more than the layer's INT4 GEMVs at 0.6B).
//
// Rounding follows Hugging Face transformers op for op, so a bfloat16 model computes the
// values transformers computes: every torch op of the reference rounds its result to the
// activation dtype, and so do the fused kernels at the same points (noted per op below);
// everything between those points is float32.
//
// The code is plain C++ written so that the compiler vectorizes it; layer_ops_*.cpp
// instantiate it once per ISA unit with that unit's flags (scalar, AVX2, AVX-512), and
// the ops glue picks the unit of the active variant like every other kernel. The oracle
// is the same computation in torch (tests/test_layer_ops.py), which is what the model
// runs under torch.compile and on other devices.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "bitswitch/exp_approx.h"
#include "convert.h"
#include "kernels.h"
#include "thread_pool.h"

namespace bitswitch {
namespace cpu {

// The argument structs (RmsNormArgs, RopeArgs, SiluMulArgs) and the width limits are in
// kernels.h, shared with the CUDA backend.

// One unit's entry points (see layer_ops_{scalar,avx2,avx512}.cpp).
struct LayerOps {
  Status (*rms_norm)(const RmsNormArgs&, ThreadPool&);
  Status (*rope)(const RopeArgs&, ThreadPool&);
  Status (*silu_mul)(const SiluMulArgs&, ThreadPool&);
};
const LayerOps& layer_ops_scalar();
const LayerOps& layer_ops_avx2();
const LayerOps& layer_ops_avx512();

namespace {
namespace layer {

// Elements per chunk: rows are converted to float32 a chunk at a time in stack buffers.
constexpr int64_t kChunk = 256;
// Below this many elements a call runs on the calling thread: waking the pool costs
// more than the work (a decode row is 1-12K elements).
constexpr int64_t kParallelElements = 1 << 15;

// Conversions with the dtype a template parameter, so that every loop below is compiled
// for one dtype and vectorizes (with the dtype a run-time value inside the loops the
// compiler kept them scalar: a 512-token prefill spent ~3 ms per layer in the RoPE op).
// Same results as convert.h; float16 keeps convert.h's scalar code (fp16 models are rare).
inline uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return uint16_t((u & 0x7FFFFFFFu) > 0x7F800000u ? (u >> 16) | 0x40u : rounded);
}

// f rounded to dtype T, as a float32 (the value a torch op of that dtype would hold).
template <DType T>
inline float round_to(float f) {
  if constexpr (T == DType::kBFloat16) {
    const uint32_t u = uint32_t(bf16_bits(f)) << 16;
    float r;
    std::memcpy(&r, &u, 4);
    return r;
  } else if constexpr (T == DType::kFloat16) {
    return f16_to_f32(f32_to_f16(f));
  } else {
    return f;
  }
}

template <DType T>
inline void load_chunk(const void* p, int64_t off, int64_t n, float* dst) {
  if constexpr (T == DType::kBFloat16) {
    const uint16_t* s = static_cast<const uint16_t*>(p) + off;
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t u = uint32_t(s[i]) << 16;
      std::memcpy(dst + i, &u, 4);
    }
  } else if constexpr (T == DType::kFloat16) {
    const uint16_t* s = static_cast<const uint16_t*>(p) + off;
    for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
  } else {
    std::memcpy(dst, static_cast<const float*>(p) + off, size_t(n) * 4);
  }
}

template <DType T>
inline void store_chunk(void* p, int64_t off, int64_t n, const float* src) {
  if constexpr (T == DType::kBFloat16) {
    uint16_t* d = static_cast<uint16_t*>(p) + off;
    for (int64_t i = 0; i < n; ++i) d[i] = bf16_bits(src[i]);
  } else if constexpr (T == DType::kFloat16) {
    uint16_t* d = static_cast<uint16_t*>(p) + off;
    for (int64_t i = 0; i < n; ++i) d[i] = f32_to_f16(src[i]);
  } else {
    std::memcpy(static_cast<float*>(p) + off, src, size_t(n) * 4);
  }
}

template <DType T>
inline void round_chunk(float* v, int64_t n) {
  if constexpr (T != DType::kFloat32)
    for (int64_t i = 0; i < n; ++i) v[i] = round_to<T>(v[i]);
}

// Runs f(row) for rows [0, rows), on the pool when there is enough work.
template <class F>
void for_rows(ThreadPool& pool, int64_t rows, int64_t row_elements, F&& f) {
  if (rows * row_elements < kParallelElements || rows == 1) {
    for (int64_t r = 0; r < rows; ++r) f(r);
    return;
  }
  const int64_t per_task = (kParallelElements / 4 + row_elements - 1) / row_elements;
  pool.parallel_for((rows + per_task - 1) / per_task, [&](int64_t task, int) {
    const int64_t r1 = (task + 1) * per_task < rows ? (task + 1) * per_task : rows;
    for (int64_t r = task * per_task; r < r1; ++r) f(r);
  });
}

// Normalizes v[0..h) in place: v = round(round(v * r) * w), r = 1 / sqrt(mean(v^2) + eps).
template <DType T>
inline void rms_normalize(float* v, int64_t h, const float* w, float eps) {
  // 16 partial sums: without them the compiler may not reorder the float additions, and a
  // single running sum is a serial chain (~4 cycles per element) as well as less accurate.
  float part[16] = {};
  int64_t i = 0;
  for (; i + 16 <= h; i += 16)
    for (int j = 0; j < 16; ++j) part[j] += v[i + j] * v[i + j];
  float ss = 0.0f;
  for (; i < h; ++i) ss += v[i] * v[i];
  for (int j = 0; j < 16; ++j) ss += part[j];
  const float r = 1.0f / std::sqrt(ss / float(h) + eps);
  for (i = 0; i < h; ++i) v[i] = round_to<T>(round_to<T>(v[i] * r) * w[i]);
}

template <DType T>
Status rms_norm_t(const RmsNormArgs& a, ThreadPool& pool) {
  constexpr int64_t es = T == DType::kFloat32 ? 4 : 2;
  // The weight in float32, converted once per call (a row needs all of it).
  alignas(64) float w[kMaxNormWidth];
  load_chunk<T>(a.weight, 0, a.h, w);
  for_rows(pool, a.rows, a.h, [&](int64_t r) {
    char* x = static_cast<char*>(a.x) + r * a.x_stride * es;
    alignas(64) float v[kMaxNormWidth];
    load_chunk<T>(x, 0, a.h, v);
    if (a.delta) {
      alignas(64) float dl[kChunk];
      const char* src = static_cast<const char*>(a.delta) + r * a.delta_stride * es;
      for (int64_t c = 0; c < a.h; c += kChunk) {
        const int64_t n = a.h - c < kChunk ? a.h - c : kChunk;
        load_chunk<T>(src, c, n, dl);
        for (int64_t i = 0; i < n; ++i) v[c + i] = round_to<T>(v[c + i] + dl[i]);
      }
      store_chunk<T>(x, 0, a.h, v);
    }
    rms_normalize<T>(v, a.h, w, a.eps);
    store_chunk<T>(static_cast<char*>(a.out) + r * a.out_stride * es, 0, a.h, v);
  });
  return Status::kOk;
}

template <DType T>
Status rope_t(const RopeArgs& a, ThreadPool& pool) {
  constexpr int64_t es = T == DType::kFloat32 ? 4 : 2;
  const int64_t d = a.d, half = d / 2, heads = a.hq + 2 * a.hkv;
  // One task per (batch, token): all its heads share the cos/sin rows.
  for_rows(pool, a.b * a.n, heads * d, [&](int64_t bt) {
    const int64_t bi = bt / a.n, ti = bt % a.n, p = a.pos + ti;
    alignas(64) float cs[kMaxHeadDim], sn[kMaxHeadDim], qw[kMaxHeadDim], kw[kMaxHeadDim], v[kMaxHeadDim],
        out[kMaxHeadDim];
    load_chunk<T>(a.cos, p * d, d, cs);
    load_chunk<T>(a.sin, p * d, d, sn);
    const bool norm = a.q_weight != nullptr;
    if (norm) {
      load_chunk<T>(a.q_weight, 0, d, qw);
      load_chunk<T>(a.k_weight, 0, d, kw);
    }
    const char* src = static_cast<const char*>(a.qkv) + (bi * a.qkv_strides[0] + ti * a.qkv_strides[1]) * es;
    for (int64_t h = 0; h < heads; ++h) {
      load_chunk<T>(src, h * d, d, v);
      if (h >= a.hq + a.hkv) {  // v: copied to the cache as is
        const int64_t hv = h - a.hq - a.hkv;
        store_chunk<T>(static_cast<char*>(a.v_cache) +
                           (bi * a.v_strides[0] + hv * a.v_strides[1] + p * a.v_strides[2]) * es, 0, d, v);
        continue;
      }
      const bool is_q = h < a.hq;
      if (norm) rms_normalize<T>(v, d, is_q ? qw : kw, a.eps);
      // rotate_half as a roll: out[i] = v[i] cos[i] + v[(i + d/2) mod d] sin[i] (sin's first
      // half negated), each product rounded as torch's ops on this dtype round it.
      for (int64_t i = 0; i < half; ++i)
        out[i] = round_to<T>(round_to<T>(v[i] * cs[i]) + round_to<T>(v[i + half] * sn[i]));
      for (int64_t i = half; i < d; ++i)
        out[i] = round_to<T>(round_to<T>(v[i] * cs[i]) + round_to<T>(v[i - half] * sn[i]));
      char* dst;
      if (is_q) {
        dst = static_cast<char*>(a.q_out) + (bi * a.q_strides[0] + h * a.q_strides[1] + ti * a.q_strides[2]) * es;
      } else {
        const int64_t hk = h - a.hq;
        dst = static_cast<char*>(a.k_cache) + (bi * a.k_strides[0] + hk * a.k_strides[1] + p * a.k_strides[2]) * es;
      }
      store_chunk<T>(dst, 0, d, out);
    }
  });
  return Status::kOk;
}

template <DType T>
Status silu_mul_t(const SiluMulArgs& a, ThreadPool& pool) {
  constexpr int64_t es = T == DType::kFloat32 ? 4 : 2;
  for_rows(pool, a.rows, a.i, [&](int64_t r) {
    const char* gu = static_cast<const char*>(a.gate_up) + r * a.gu_stride * es;
    char* out = static_cast<char*>(a.out) + r * a.out_stride * es;
    alignas(64) float g[kChunk], u[kChunk];
    for (int64_t c = 0; c < a.i; c += kChunk) {
      const int64_t n = a.i - c < kChunk ? a.i - c : kChunk;
      load_chunk<T>(gu, c, n, g);
      load_chunk<T>(gu, a.i + c, n, u);
      for (int64_t j = 0; j < n; ++j) g[j] = round_to<T>(round_to<T>(g[j] / (1.0f + exp_approx(-g[j]))) * u[j]);
      store_chunk<T>(out, c, n, g);
    }
  });
  return Status::kOk;
}

// The dtype becomes a template parameter here, once per call.
#define BITSWITCH_LAYER_DISPATCH(fn, args, pool)                              \
  switch ((args).dtype) {                                                     \
    case DType::kBFloat16: return fn<DType::kBFloat16>(args, pool);           \
    case DType::kFloat16: return fn<DType::kFloat16>(args, pool);             \
    case DType::kFloat32: return fn<DType::kFloat32>(args, pool);             \
    default: return Status::kInvalidArgument;                                 \
  }

Status rms_norm_impl(const RmsNormArgs& a, ThreadPool& pool) { BITSWITCH_LAYER_DISPATCH(rms_norm_t, a, pool) }
Status rope_impl(const RopeArgs& a, ThreadPool& pool) { BITSWITCH_LAYER_DISPATCH(rope_t, a, pool) }
Status silu_mul_impl(const SiluMulArgs& a, ThreadPool& pool) { BITSWITCH_LAYER_DISPATCH(silu_mul_t, a, pool) }
#undef BITSWITCH_LAYER_DISPATCH

}  // namespace layer

// The table a unit returns from its layer_ops_<unit>() (internal linkage per unit).
inline const LayerOps& layer_ops_table() {
  static const LayerOps ops = {layer::rms_norm_impl, layer::rope_impl, layer::silu_mul_impl};
  return ops;
}

}  // namespace
}  // namespace cpu
}  // namespace bitswitch
