// Activation precision of qmatmul: how x is quantized per group of G inputs.
//
//   act_bits 16 (default): v = round(x / dx) with dx = max|x| / 32639, split into two int8
//     halves by the integer GEMVs; ~3e-5 relative error, float-grade.
//   act_bits 8: v = round(x / dx) with dx = max|x| / 127, one int8 per element (the trade
//     llama.cpp's Q8 dot products make). Every kernel computes with the dequantized values
//     v * dx, so the result does not depend on the kernel or on M.
//
// The scalar functions here are the definition: every variant quantizes with exactly
// these float32 operations (a multiply by 1/dx and round-to-nearest-even), so the int8
// codes agree bit for bit across the scalar reference, AVX2, AVX-512 and Python.
#pragma once

#include <cmath>
#include <cstdint>

namespace bitswitch {
namespace cpu {
namespace {

constexpr int kActBitsExact = 16;
constexpr int kActBitsInt8 = 8;
// Largest |v|: the 16-bit mode splits v = 256*hi + lo with hi = round(v / 256) <= 127.
constexpr float kActMaxExact = 127.0f * 256.0f + 127.0f;
constexpr float kActMaxInt8 = 127.0f;

inline bool is_supported_act_bits(int a) { return a == kActBitsExact || a == kActBitsInt8; }
inline float act_max(int act_bits) { return act_bits == kActBitsInt8 ? kActMaxInt8 : kActMaxExact; }

// 1 / dx of a group from its absolute maximum (0 for an all-zero group).
inline float act_inverse_step(float amax, float qmax) { return amax > 0.0f ? qmax / amax : 0.0f; }

// Replaces x[0..k) by its act_bits = 8 values v * dx, group by group (k a multiple of g).
inline void fake_quantize_int8(float* x, int64_t k, int g) {
  for (int64_t g0 = 0; g0 < k; g0 += g) {
    float amax = 0.0f;
    for (int j = 0; j < g; ++j) amax = std::fmax(amax, std::fabs(x[g0 + j]));
    const float inv = act_inverse_step(amax, kActMaxInt8), dx = amax / kActMaxInt8;
    for (int j = 0; j < g; ++j) x[g0 + j] = std::nearbyint(x[g0 + j] * inv) * dx;
  }
}

}  // namespace
}  // namespace cpu
}  // namespace bitswitch
