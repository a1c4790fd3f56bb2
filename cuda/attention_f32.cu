// float32 attention instances (attention.cuh holds the templates and the launcher).
//   D = 128: Qwen3's head_dim.  D = 64: the other head_dim the op accepts.
// Tensor cores take no float32 operands (tf32 would round q and k to 10 mantissa bits, below
// the CPU reference's accuracy), so each instance is the SIMT rows kernel for prefill and
// decode, plus the split-KV combine; it exists so that every dtype the CPU op accepts also
// runs on CUDA. Causal, mask, block sizes, GQA group, strides and q_offset are runtime values.
#include "attention.cuh"

namespace bitswitch {
namespace cuda {
namespace attn {

BS_ATTENTION_INSTANCE(, float, 64)
BS_ATTENTION_INSTANCE(, float, 128)

}  // namespace attn
}  // namespace cuda
}  // namespace bitswitch
