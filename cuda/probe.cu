// Instance file for the probe kernel.
#include "probe.cuh"

namespace bitswitch {
namespace cuda {

cudaError_t launch_unpack_codes(const uint32_t* words, uint32_t* out, int64_t n, cudaStream_t stream) {
  return unpack_codes(words, out, n, stream);
}

}  // namespace cuda
}  // namespace bitswitch
