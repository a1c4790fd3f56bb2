// qmatmul instances for float16 activations.
//
// - qmv_tc_kernel<__half, MT, planes, stored>, MT = 8, 16, 32: M <= 64 on tensor cores, weights
//   streamed straight into mma fragments (the decode path); planes 1 with `stored` (scales in
//   float16: one exact packed FMA per code pair) and without, planes 2 without.
// - qmv_kernel<__half, MT, planes>, MT = 1, 2, 4, planes 1 (INT4) and 2 (INT8): x rows that
//   are not 16-byte aligned (cp.async and the tensor-core GEMV's staging need them: a rare
//   view), in M/4 tiles; and M <= 2 under BITSWITCH_CUDA_SMALL_M=simt.
// - qmm_kernel<__half, planes, BM>, planes 1 and 2, on tensor cores:
//   BM = 128 (x 128): M > 64 (below BITSWITCH_CUDA_DEQUANT_M rows in bitswitch.torch);
//   BM = 16, 32, 64 (x 256, 256, 128 rows of W) for 2 < M <= 64 under
//   BITSWITCH_CUDA_SMALL_M=simt only.
//   Split-K fills the GPU when M x N gives few tiles.
// - dequantize_kernel<__half, planes>: W as a dense matrix (bitswitch.torch's large-M path).
// - qmm_splitk_reduce_kernel<__half>: sums the split-K partials of every kernel above.
// Group size and scale dtype are runtime values and add no instances (but `stored`).
#include "qmatmul.cuh"

namespace bitswitch {
namespace cuda {

cudaError_t qmatmul_f16(const QMatmulParams& p, void* ws, size_t ws_bytes, int num_sms, cudaStream_t stream) {
  return qmm::qmatmul_typed<__half, true>(p, ws, ws_bytes, num_sms, stream);
}

cudaError_t dequantize_f16(const QMatmulParams& p, int num_sms, cudaStream_t stream) {
  return qmm::dequantize_typed<__half>(p, num_sms, stream);
}

}  // namespace cuda
}  // namespace bitswitch
