// The fused layer ops (layer_ops.h) compiled for the scalar unit (no ISA flags: the portable build and the oracle of the vector units' rounding).
#include "layer_ops.h"

namespace bitswitch {
namespace cpu {

const LayerOps& layer_ops_scalar() { return layer_ops_table(); }

}  // namespace cpu
}  // namespace bitswitch
