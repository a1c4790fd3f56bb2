// Decode page selection on the GPU (Quest): for one decode step, per (batch, kv head), fold
// the step's key into its block's summary and pick the n key blocks whose bound on q . k is
// highest. The semantics are exactly those of the CPU kernel (csrc/cpu/kernels.h,
// PageSelectArgs); only float summation order differs.
//
// One CTA of 256 threads per (batch, kv head), four phases:
//   1. fold: threads d < D fold key `pos` into kmin / kmax of block pos / block_k;
//   2. scores: each thread takes whole key blocks (thread t: blocks t, t + 256, ...), reads
//      the block's kmin / kmax once in 16-byte loads and accumulates the bound of every
//      query head of the group (q in shared memory: all lanes read the same element, a
//      broadcast); a block's score is stored in shared memory as an order-preserving uint32;
//   3. threshold: the n-th largest key T, found bit by bit from the top (32 CTA-wide counts:
//      no atomics, no sort);
//   4. compaction: blocks above T, plus the first (n - #above) equal to T in block order,
//      written in increasing block order through two CTA-wide prefix sums.
// The work is B * Hkv CTAs of nkb * D * (G + 2) multiply-adds each: a few microseconds,
// independent of the cache's length beyond nkb. Nothing is allocated and the position is
// read from device memory, so a decode step that selects pages is capturable in a CUDA graph.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "common.cuh"

namespace bitswitch {
namespace cuda {

struct PageSelectParams {
  const void* q;             // q: [B, Hq, 1, D], dtype; B and H strides below, unit stride on D
  const void* k;             // k: [B, Hkv, capacity, D], dtype; strides below, unit stride on D
  float* kmin;               // kmin, kmax: [B, Hkv, nkb, D] float32, C-contiguous
  float* kmax;
  int32_t* indices;          // indices: [B, Hkv, n] C-contiguous
  const int32_t* positions;  // positions: [B] (clamped to [0, capacity))
  DType dtype;               // of q and k
  int64_t b, hq, hkv, capacity, d, nkb, n;
  int64_t q_strides[2];      // element strides of q's B and H dimensions
  int64_t k_strides[3];      // element strides of k's B, H and L dimensions
  int32_t block_k, sinks;
};

namespace pages {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Shared memory: the group's queries (G * D floats) and one key per block. The ops glue
// enforces these limits (48 KiB of dynamic shared memory needs no opt-in).
constexpr int kMaxQueryFloats = 2048;
constexpr int kMaxBlocks = 8192;
constexpr int kMaxGroup = 16;  // query heads whose bounds one pass over a block accumulates

// A float's bits mapped so that unsigned order is float order (-inf lowest, +inf highest).
BS_DEVICE uint32_t order_key(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Exclusive prefix sum of v over the CTA's threads in thread order.
BS_DEVICE int block_exclusive_scan(int v, int* red) {
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  int x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  __syncthreads();
  if (lane == 31) red[warp] = x;
  __syncthreads();
  int before = 0;
  for (int w = 0; w < warp; ++w) before += red[w];
  return before + x - v;
}

// Grid: one CTA per (batch, kv head), kv head fastest. Block: kThreads. Dynamic shared
// memory: (G * D + nkb) * 4 bytes.
template <class T>
__global__ void __launch_bounds__(kThreads) select_pages_kernel(const PageSelectParams p) {
  BS_DYNAMIC_SMEM(float, smem);
  float* sq = smem;                                                      // [G][D]
  uint32_t* skey = reinterpret_cast<uint32_t*>(smem + (p.hq / p.hkv) * p.d);  // [nkb]
  __shared__ int red[kWarps];

  const int tid = int(threadIdx.x);
  const int64_t b = blockIdx.x / p.hkv, h = blockIdx.x % p.hkv;
  const int D = int(p.d), G = int(p.hq / p.hkv), nkb = int(p.nkb), n = int(p.n);
  int64_t pos = p.positions[b];
  pos = pos < 0 ? 0 : (pos >= p.capacity ? p.capacity - 1 : pos);
  const int last = int(pos / p.block_k);
  float* kmin = p.kmin + (b * p.hkv + h) * p.nkb * D;
  float* kmax = p.kmax + (b * p.hkv + h) * p.nkb * D;

  // 1. Fold key pos into block `last`; the queries into shared memory.
  const T* k = static_cast<const T*>(p.k) + b * p.k_strides[0] + h * p.k_strides[1] + pos * p.k_strides[2];
  const bool first = pos % p.block_k == 0;
  for (int j = tid; j < D; j += kThreads) {
    const float x = to_float(k[j]);
    float* lo = kmin + int64_t(last) * D + j;
    float* hi = kmax + int64_t(last) * D + j;
    *lo = first ? x : fminf(*lo, x);
    *hi = first ? x : fmaxf(*hi, x);
  }
  const T* q = static_cast<const T*>(p.q) + b * p.q_strides[0] + h * G * p.q_strides[1];
  for (int i = tid; i < G * D; i += kThreads) sq[i] = to_float(q[(i / D) * p.q_strides[1] + i % D]);
  __syncthreads();  // block `last`'s summary and sq are visible to every thread

  // 2. Scores: thread t takes blocks t, t + kThreads, ...
  for (int blk = tid; blk < nkb; blk += kThreads) {
    float s;
    if (blk > last) {
      s = -INFINITY;
    } else if (blk < p.sinks || blk == last) {
      s = INFINITY;
    } else {
      s = -INFINITY;
      const float4* lo4 = reinterpret_cast<const float4*>(kmin + int64_t(blk) * D);
      const float4* hi4 = reinterpret_cast<const float4*>(kmax + int64_t(blk) * D);
      for (int g0 = 0; g0 < G; g0 += kMaxGroup) {
        float acc[kMaxGroup];
#pragma unroll
        for (int g = 0; g < kMaxGroup; ++g) acc[g] = 0.0f;
        for (int j4 = 0; j4 < D / 4; ++j4) {
          const float4 lo = lo4[j4], hi = hi4[j4];
          const float c[4] = {0.5f * (hi.x + lo.x), 0.5f * (hi.y + lo.y), 0.5f * (hi.z + lo.z), 0.5f * (hi.w + lo.w)};
          const float r[4] = {0.5f * (hi.x - lo.x), 0.5f * (hi.y - lo.y), 0.5f * (hi.z - lo.z), 0.5f * (hi.w - lo.w)};
#pragma unroll
          for (int g = 0; g < kMaxGroup; ++g) {
            if (g0 + g < G) {
              const float* qg = sq + (g0 + g) * D + j4 * 4;
#pragma unroll
              for (int e = 0; e < 4; ++e) acc[g] += qg[e] * c[e] + fabsf(qg[e]) * r[e];
            }
          }
        }
#pragma unroll
        for (int g = 0; g < kMaxGroup; ++g)
          if (g0 + g < G && acc[g] > s) s = acc[g];  // a NaN bound never wins
      }
    }
    skey[blk] = order_key(s);
  }
  __syncthreads();

  // 3. T = the n-th largest key: the largest t with #(key >= t) >= n, built from the top bit.
  uint32_t thresh = 0;
  for (int bit = 31; bit >= 0; --bit) {
    const uint32_t cand = thresh | (1u << bit);
    int c = 0;
    for (int i = tid; i < nkb; i += kThreads) c += skey[i] >= cand ? 1 : 0;
    if (block_sum(c, red) >= n) thresh = cand;
  }

  // 4. Keep every key above T and the first (n - #above) keys equal to T in block order.
  // Thread t owns the contiguous blocks [t * per, (t + 1) * per).
  const int per = (nkb + kThreads - 1) / kThreads;
  const int i0 = tid * per < nkb ? tid * per : nkb, i1 = i0 + per < nkb ? i0 + per : nkb;
  int above = 0, equal = 0;
  for (int i = i0; i < i1; ++i) {
    above += skey[i] > thresh ? 1 : 0;
    equal += skey[i] == thresh ? 1 : 0;
  }
  const int ties = n - block_sum(above, red);  // >= 1: T itself is among the n
  const int eq_before = block_exclusive_scan(equal, red);
  int kept = 0;
  for (int i = i0, r = eq_before; i < i1; ++i) {
    const bool tie = skey[i] == thresh;
    kept += (skey[i] > thresh || (tie && r < ties)) ? 1 : 0;
    r += tie ? 1 : 0;
  }
  int out = block_exclusive_scan(kept, red);
  int32_t* dst = p.indices + (b * p.hkv + h) * p.n;
  for (int i = i0, r = eq_before; i < i1; ++i) {
    const bool tie = skey[i] == thresh;
    if (skey[i] > thresh || (tie && r < ties)) dst[out++] = i;
    r += tie ? 1 : 0;
  }
}

template <class T>
cudaError_t select_pages_run(const PageSelectParams& p, cudaStream_t stream) {
  const size_t smem = size_t((p.hq / p.hkv) * p.d + p.nkb) * 4;
  return BS_LAUNCH((select_pages_kernel<T>), p.b * p.hkv, kThreads, smem, stream, p);
}

}  // namespace pages

// Launches the selection on `stream`: no allocation, no host synchronization.
inline cudaError_t select_pages(const PageSelectParams& p, cudaStream_t stream) {
  if (p.b <= 0 || p.hkv <= 0 || p.hq % p.hkv != 0 || (p.d != 64 && p.d != 128) || p.nkb <= 0 || p.n < 1 ||
      p.n > p.nkb || p.nkb > pages::kMaxBlocks || (p.hq / p.hkv) * p.d > pages::kMaxQueryFloats ||
      (p.block_k != 32 && p.block_k != 64 && p.block_k != 128))
    return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kBFloat16: return pages::select_pages_run<__nv_bfloat16>(p, stream);
    case DType::kFloat16: return pages::select_pages_run<__half>(p, stream);
    default: return pages::select_pages_run<float>(p, stream);
  }
}

}  // namespace cuda
}  // namespace bitswitch
