// float16 attention instances (attention.cuh holds the templates and the launcher).
//   D = 128: Qwen3's head_dim (every Qwen3 size).
//   D = 64:  the other head_dim the op accepts (smaller models, tests).
// Each instance compiles three kernels: the tensor-core prefill, the SIMT rows kernel
// (decode split-KV, and rows that are not 16-byte aligned) and the split-KV combine.
// Causal, mask / dense, block sizes, GQA group, strides and q_offset are runtime values, so
// these two instances cover every call with float16 inputs.
#include "attention.cuh"

namespace bitswitch {
namespace cuda {
namespace attn {

BS_ATTENTION_INSTANCE(, __half, 64)
BS_ATTENTION_INSTANCE(, __half, 128)

}  // namespace attn
}  // namespace cuda
}  // namespace bitswitch
