// qmatmul instances for bfloat16 activations.
//
// - qmv_kernel<__nv_bfloat16, MT, planes>, MT = 1, 2, 4, 8, 16, planes 1 (INT4) and 2 (INT8):
//   decode and small batches (M <= 16), bound by the weight stream; one MT per power of two so
//   the FMA work per weight byte grows with M at most 2x past what the call needs.
// - qmm_kernel<__nv_bfloat16, planes>, planes 1 and 2: prefill (M > 16) on tensor cores, one
//   128x128x32 tile shape for all M (split-K fills the GPU when M x N gives few tiles).
// - qmm_splitk_reduce_kernel<__nv_bfloat16>: sums the split-K partials of either kernel.
// Group size and scale dtype are runtime values and add no instances.
#include "qmatmul.cuh"

namespace bitswitch {
namespace cuda {

cudaError_t qmatmul_bf16(const QMatmulParams& p, void* ws, size_t ws_bytes, int num_sms, cudaStream_t stream) {
  return qmm::qmatmul_typed<__nv_bfloat16, true>(p, ws, ws_bytes, num_sms, stream);
}

}  // namespace cuda
}  // namespace bitswitch
