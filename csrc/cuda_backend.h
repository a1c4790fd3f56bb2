// The seam between the ops glue (in _C, built without CUDA) and the CUDA kernels (in
// _cuda, built by nvcc when it is found). _cuda hands _C a table of entry points at
// import (bitswitch._cuda.backend(), a PyCapsule passed to _C._set_cuda_backend); the glue
// validates arguments exactly as for CPU arrays and then calls through the table, so CUDA
// tensors get the same checks and messages as CPU ones. Plain C types only: the two
// modules are separate shared objects built by different compilers.
#pragma once

#include <cstdint>

#include "cpu/kernels.h"

namespace bitswitch {

// Bump when the layout of anything below (or of the argument structs) changes; _C refuses
// a table of another version.
constexpr int32_t kCudaBackendAbi = 4;

// Where a CUDA op runs: the caller's stream on the caller's device, with scratch memory
// the caller allocated (from torch's allocator, so launches stay graph-capturable).
struct CudaLaunch {
  void* stream = nullptr;         // cudaStream_t; null is the legacy default stream
  int32_t device = -1;            // CUDA device index of the arrays; -1: the current device
  void* workspace = nullptr;      // device scratch, may be null
  int64_t workspace_bytes = 0;
};

// Each entry returns 0 or a cudaError_t code and then writes a message into err.
struct CudaBackend {
  int32_t abi = kCudaBackendAbi;
  int32_t (*qmatmul)(const cpu::QMatmulArgs* a, const CudaLaunch* l, char* err, int32_t errlen) = nullptr;
  int32_t (*attention)(const cpu::AttentionArgs* a, const CudaLaunch* l, char* err, int32_t errlen) = nullptr;
  int32_t (*select_pages)(const cpu::PageSelectArgs* a, const CudaLaunch* l, char* err, int32_t errlen) = nullptr;
  int32_t (*rms_norm)(const cpu::RmsNormArgs* a, const CudaLaunch* l, char* err, int32_t errlen) = nullptr;
  int32_t (*rope)(const cpu::RopeArgs* a, const CudaLaunch* l, char* err, int32_t errlen) = nullptr;
  int32_t (*silu_mul)(const cpu::SiluMulArgs* a, const CudaLaunch* l, char* err, int32_t errlen) = nullptr;
  // W [n, k] into a->y (dtype a->x_dtype); a->x and a->m unused.
  int32_t (*dequantize)(const cpu::QMatmulArgs* a, const CudaLaunch* l, char* err, int32_t errlen) = nullptr;
};

}  // namespace bitswitch
