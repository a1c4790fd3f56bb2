// The host side of bitswitch._cuda: the table of entry points _C calls for CUDA arrays
// (csrc/cuda_backend.h) and the scratch sizes callers allocate. Defined in backend.cu;
// plain C++ so the pybind11 module (compiled by the host compiler) can include it.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cuda_backend.h"

namespace bitswitch {
namespace cuda {

// The table passed to _C._set_cuda_backend (a static object: valid for the process).
const CudaBackend* backend_table();

// Streaming multiprocessors of a device (cached per device; -1: the current one).
int num_sms(int device);

// Bytes of workspace qmatmul / attention can use for these arguments on `device`; the
// kernels also run with less (or none), more slowly. x_dtype / dtype: DType values.
size_t qmatmul_workspace(int64_t m, int64_t n, int64_t k, int32_t group_size, int32_t bits, int32_t x_dtype,
                         int32_t scale_dtype, int device);
size_t attention_workspace(int64_t b, int64_t hq, int64_t hkv, int64_t lq, int64_t lk, int64_t d, int32_t dtype,
                           int32_t block_q, int32_t block_k, bool has_mask, bool causal, int device);

}  // namespace cuda
}  // namespace bitswitch
