// e^x as bitswitch's SiLU computes it, shared by the CPU kernels (csrc/cpu/layer_ops.h) and
// the CUDA kernels (cuda/layer_ops.cuh) so both round the same way: relative error < 2e-7
// over the range that matters (below -87 the result is a denormal or 0 and the SiLU is -0
// to float32 precision; above 88 it is inf). Written without branches or library calls so
// that a CPU loop around it vectorizes. C++17 and CUDA (__host__ __device__).
#pragma once

#include <stdint.h>
#include <string.h>

#include "bitswitch/format.h"  // BITSWITCH_HD

namespace bitswitch {
// Internal linkage: the CPU's ISA units compile this with their own flags (AVX2, AVX-512), so
// it must not become one shared symbol the linker picks for all of them.
namespace {

BITSWITCH_HD float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float t = x * 1.4426950408889634f;
  // Round to nearest with the 1.5 * 2^23 trick (exact for |t| < 2^22).
  const float n = (t + 12582912.0f) - 12582912.0f;
  const float f = t - n;  // [-0.5, 0.5]
  float p = 1.5403530393381608e-4f;
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.0f;
  const uint32_t e = uint32_t(int32_t(n) + 127) << 23;
  float s;
  memcpy(&s, &e, 4);
  return p * s;
}

}  // namespace
}  // namespace bitswitch
