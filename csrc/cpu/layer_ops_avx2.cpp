// The fused layer ops (layer_ops.h) compiled for the AVX2 unit (compiled with -mavx2 -mfma -mf16c).
#include "layer_ops.h"

namespace bitswitch {
namespace cpu {

const LayerOps& layer_ops_avx2() { return layer_ops_table(); }

}  // namespace cpu
}  // namespace bitswitch
