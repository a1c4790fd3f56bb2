// A minimal kernel + launcher in the shape every bitswitch CUDA kernel follows:
// raw pointers, sizes and a stream in, cudaError_t out, no host synchronization.
#pragma once

#include <cuda_runtime.h>

#include "bitswitch/format.h"

namespace bitswitch {
namespace cuda {

// out[i] = the INT4 code i % 8 of words[i / 8] (format.h compiled for the device).
// words: [n / 8] uint32, out: [n] uint32.
__global__ void unpack_codes_kernel(const uint32_t* __restrict__ words, uint32_t* __restrict__ out, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = format::unpack_code(words[i / format::kValuesPerWord], int(i % format::kValuesPerWord));
}

inline cudaError_t unpack_codes(const uint32_t* words, uint32_t* out, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  unpack_codes_kernel<<<unsigned(blocks), kThreads, 0, stream>>>(words, out, n);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace bitswitch
