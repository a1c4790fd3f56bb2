// qmatmul instances for float16 activations: the same set as qmatmul_bf16.cu (see there),
// with the f16 form of mma.m16n8k16.
#include "qmatmul.cuh"

namespace bitswitch {
namespace cuda {

cudaError_t qmatmul_f16(const QMatmulParams& p, void* ws, size_t ws_bytes, int num_sms, cudaStream_t stream) {
  return qmm::qmatmul_typed<__half, true>(p, ws, ws_bytes, num_sms, stream);
}

}  // namespace cuda
}  // namespace bitswitch
