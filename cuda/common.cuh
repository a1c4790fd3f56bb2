// Everything the bitswitch CUDA kernels use beyond plain C++: element types, the PTX
// instructions (tensor-core mma, ldmatrix, cp.async, streaming loads) and the launch macro.
//
// The kernels compile two ways:
//   - with nvcc for the GPU (the definitions below, inline PTX on sm_80 and newer);
//   - with a host C++ compiler against tests/cuda/cuda_emulation.h (BITSWITCH_CUDA_EMULATION
//     defined), which runs each thread block's threads as fibers on a CPU and implements every
//     function declared here with the PTX ISA's semantics (fragment layouts included), so the
//     kernels' logic is tested against the CPU reference on machines without a GPU.
// A kernel may therefore use only: the CUDA built-ins the emulation provides (threadIdx,
// blockIdx, blockDim, gridDim, __syncthreads, __syncwarp, __shfl_sync, __shfl_xor_sync,
// __shfl_down_sync with a full mask, __shared__ arrays, uint2/uint4/float2/float4/int4 and
// their make_* functions, expf/exp2f/logf/log2f/fmaxf/fminf/fabsf/sqrtf/rsqrtf/__expf/
// __fdividef, min/max on integers), the __half / __nv_bfloat16 conversions listed under
// "Element types", and the functions of this header.
#pragma once

#include <stdint.h>

#include <cstdlib>
#include <cstring>

#if defined(BITSWITCH_CUDA_EMULATION)
// cuda_emulation.h (included before this header) defines the built-ins, the element types
// and every function of namespace bitswitch::cuda::ptx below.
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include "bitswitch/format.h"

#if defined(BITSWITCH_CUDA_EMULATION)
#define BS_DEVICE inline
#define BS_HOST_DEVICE inline
// Dynamic shared memory: `BS_DYNAMIC_SMEM(uint4, smem);` declares `uint4* smem`.
#define BS_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(::cuda_emu::dynamic_shared_memory())
// Launches kernel<<<grid, block, smem_bytes, stream>>>(args...) and returns its cudaError_t.
#define BS_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  ::cuda_emu::launch_kernel(kernel, dim3(grid), dim3(block), size_t(smem_bytes), stream, __VA_ARGS__)
#else
#define BS_DEVICE __device__ __forceinline__
#define BS_HOST_DEVICE __host__ __device__ __forceinline__
#define BS_DYNAMIC_SMEM(T, name) \
  extern __shared__ __align__(16) unsigned char bs_dynamic_smem_[]; \
  T* name = reinterpret_cast<T*>(bs_dynamic_smem_)
#define BS_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  (kernel<<<dim3(grid), dim3(block), size_t(smem_bytes), stream>>>(__VA_ARGS__), cudaGetLastError())
#endif

namespace bitswitch {
namespace cuda {

// The float types of activations and scales (values match bitswitch::DType's).
enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// ---- Element types -----------------------------------------------------------------------
// __half and __nv_bfloat16 with __float2half_rn, __half2float, __float2bfloat16_rn,
// __bfloat162float (cuda_fp16.h / cuda_bf16.h, or the emulation's equivalents).

BS_DEVICE float to_float(float v) { return v; }
BS_DEVICE float to_float(__half v) { return __half2float(v); }
BS_DEVICE float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T> BS_DEVICE T from_float(float v);
template <> BS_DEVICE float from_float<float>(float v) { return v; }
template <> BS_DEVICE __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> BS_DEVICE __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Sum of v (int or float) over the CTA, returned to every thread. blockDim.x must be a
// multiple of 32; red: blockDim.x / 32 values of shared memory, reusable by the next call
// (the first barrier waits for the previous call's readers).
template <class V> BS_DEVICE V block_sum(V v, V* red) {
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, warps = int(blockDim.x) / 32;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  V t = 0;
  for (int w = 0; w < warps; ++w) t += red[w];
  return t;
}

// The raw 16 bits of a half / bfloat16 value and back.
template <class T> BS_DEVICE uint16_t bits16(T v) {
  static_assert(sizeof(T) == 2, "16-bit float types only");
  uint16_t r;
  __builtin_memcpy(&r, &v, 2);
  return r;
}
template <class T> BS_DEVICE T from_bits16(uint16_t b) {
  static_assert(sizeof(T) == 2, "16-bit float types only");
  T r;
  __builtin_memcpy(&r, &b, 2);
  return r;
}

// Two 16-bit values in one 32-bit register, `lo` in the low half: the packing of mma operands.
template <class T> BS_DEVICE uint32_t pack2(float lo, float hi) {
  return uint32_t(bits16(from_float<T>(lo))) | (uint32_t(bits16(from_float<T>(hi))) << 16);
}
template <class T> BS_DEVICE float2 unpack2(uint32_t v) {
  return make_float2(to_float(from_bits16<T>(uint16_t(v & 0xffffu))), to_float(from_bits16<T>(uint16_t(v >> 16))));
}

// A scale or bias of a runtime dtype (uniform across a warp: the branch costs nothing).
BS_DEVICE float load_scale(const void* p, int64_t i, DType t) {
  switch (t) {
    case DType::kBFloat16: return to_float(static_cast<const __nv_bfloat16*>(p)[i]);
    case DType::kFloat16: return to_float(static_cast<const __half*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// A host-side A/B switch between a kernel path and an older one kept for comparisons: true
// (the new path) unless the environment variable `env` equals "simt"; the caller reads it
// once per process and passes it in. override >= 0 (tests) wins: 1 new path, 0 the old one.
inline bool ab_switch_on(int override, bool env_on) { return override >= 0 ? override != 0 : env_on; }
inline bool env_not_simt(const char* env) {
  const char* v = std::getenv(env);
  return !(v != nullptr && std::strcmp(v, "simt") == 0);
}

// ---- PTX -----------------------------------------------------------------------------------
namespace ptx {

#if !defined(BITSWITCH_CUDA_EMULATION)

// D = A * B + C on tensor cores, m16n8k16, A row-major, B column-major, f32 accumulators.
// T is __half or __nv_bfloat16. Per lane (g = lane / 4, t = lane % 4), with two 16-bit values
// per 32-bit register, the lower column/row index in the low half:
//   a[0]: A[g][2t..2t+1]   a[1]: A[g+8][2t..2t+1]   a[2]: A[g][2t+8..2t+9]   a[3]: A[g+8][2t+8..2t+9]
//   b[0]: B[2t..2t+1][g]   b[1]: B[2t+8..2t+9][g]
//   c[0], c[1]: C[g][2t], C[g][2t+1]    c[2], c[3]: C[g+8][2t], C[g+8][2t+1]   (d likewise)
template <class T> BS_DEVICE void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]);

template <> BS_DEVICE void mma_m16n8k16<__nv_bfloat16>(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                        const float c[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
}

template <> BS_DEVICE void mma_m16n8k16<__half>(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
}

BS_DEVICE uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lanes 8i..8i+7 give the addresses of rows 0..7 of
// matrix i (16 bytes each); r[i] receives, for lane l, row l/4, columns 2(l%4)..2(l%4)+1 of
// matrix i. The .trans form gives row 2(l%4)..2(l%4)+1, column l/4 instead.
BS_DEVICE void ldmatrix_x4(uint32_t r[4], const void* row_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row_addr)));
}
BS_DEVICE void ldmatrix_x4_trans(uint32_t r[4], const void* row_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row_addr)));
}
// x2: lanes 0..15 give the row addresses of matrices 0 and 1 (the other lanes' are ignored).
BS_DEVICE void ldmatrix_x2(uint32_t r[2], const void* row_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(row_addr)));
}
BS_DEVICE void ldmatrix_x2_trans(uint32_t r[2], const void* row_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(row_addr)));
}

// cp.async.cg of 16 bytes global -> shared, bypassing L1. When !pred nothing is read and the
// 16 shared bytes are zero-filled (src-size 0). Both addresses 16-byte aligned.
BS_DEVICE void cp_async16(void* smem, const void* gmem, bool pred) {
  const int src_size = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "r"(src_size));
}
// Closes the group of cp.async issued by this thread since the last commit.
BS_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N of this thread's committed groups are still in flight. The data is
// visible to other threads only after a __syncthreads() that follows.
template <int N> BS_DEVICE void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// 16-byte global load that is not kept in L1 and is the first evicted from L2 (weights read
// once per call: they must not push out activations and the KV cache).
BS_DEVICE uint4 ld_stream(const void* p) {
  uint4 r;
  asm volatile("ld.global.cs.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}
// 16-byte read-only global load through the non-coherent (texture) path.
BS_DEVICE uint4 ld_nc(const void* p) { return __ldg(static_cast<const uint4*>(p)); }

// (a & b) | c in one LOP3 (ptxas otherwise emits an AND and an OR when b and c are both
// immediates).
BS_DEVICE uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// a * b + c on two packed 16-bit values of type T (lower element in the low half), rounded
// once to nearest even (fma.rn.bf16x2 / fma.rn.f16x2).
template <class T> BS_DEVICE uint32_t fma2(uint32_t a, uint32_t b, uint32_t c);
template <> BS_DEVICE uint32_t fma2<__nv_bfloat16>(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}
template <> BS_DEVICE uint32_t fma2<__half>(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// 2^x with the MUFU unit alone (ex2.approx.ftz.f32: relative error ~2^-22, subnormal inputs
// and results flushed to zero, ex2(-inf) = 0). exp2f without fast-math adds a range check
// and two multiplies around the same instruction to keep subnormal results.
BS_DEVICE float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

#endif  // !BITSWITCH_CUDA_EMULATION

}  // namespace ptx
}  // namespace cuda
}  // namespace bitswitch
