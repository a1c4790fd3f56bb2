// qmatmul instances for bfloat16 activations.
//
// - qmv_kernel<__nv_bfloat16, MT, planes>, MT = 1, 2, 4, planes 1 (INT4) and 2 (INT8):
//   decode (M <= 2), bound by the weight stream; MT = 4 also serves, in M/4 tiles, x rows that
//   are not 16-byte aligned (cp.async cannot load them: a rare view). The 8- and 16-row tiles
//   would run only there and cost more compile time than all the tensor-core instances.
// - qmm_kernel<__nv_bfloat16, planes, BM>, planes 1 and 2, on tensor cores:
//   BM = 16, 32, 64 (x 256 rows of W): small batches, 2 < M <= 64, where the weight stream and
//   the once-per-block dequantization set the time; one BM per power of two so past 16 rows at
//   most half of the mma work is spent on zero rows (below 16 the mma is far from the limit).
//   BM = 128 (x 128): prefill, M > 64.
//   Split-K fills the GPU when M x N gives few tiles.
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
