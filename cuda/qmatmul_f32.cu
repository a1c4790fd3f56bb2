// qmatmul instances for float32 activations.
//
// float32 x has no tensor-core path (mma.m16n8k16 takes 16-bit operands), so every M runs the
// GEMV kernel: qmv_kernel<float, MT, planes> for MT = 1, 2, 4, 8, 16 rows of x per launch tile
// (M <= 16 in one tile; larger M in M/16 tiles, re-reading the weights per tile, mostly from L2)
// and both views (planes 1: INT4, 2: INT8). Group size and scale dtype are runtime values
// (a shift and a uniform branch per chunk), so they add no instances. dequantize_kernel<float,
// planes> writes W as a dense float32 matrix.
#include "qmatmul.cuh"

namespace bitswitch {
namespace cuda {

cudaError_t qmatmul_f32(const QMatmulParams& p, void* ws, size_t ws_bytes, int num_sms, cudaStream_t stream) {
  return qmm::qmatmul_typed<float, false>(p, ws, ws_bytes, num_sms, stream);
}

cudaError_t dequantize_f32(const QMatmulParams& p, int num_sms, cudaStream_t stream) {
  return qmm::dequantize_typed<float>(p, num_sms, stream);
}

}  // namespace cuda
}  // namespace bitswitch
