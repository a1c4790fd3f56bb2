// The fused layer ops (layer_ops.h) compiled for the AVX-512 unit (compiled with the AVX-512 flags).
#include "layer_ops.h"

namespace bitswitch {
namespace cpu {

const LayerOps& layer_ops_avx512() { return layer_ops_table(); }

}  // namespace cpu
}  // namespace bitswitch
