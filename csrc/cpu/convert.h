// Portable scalar conversions between float32 and the 16-bit float types. Used by the
// scalar reference and by the ISA variants for tails and one-off values; all functions
// are internal to each translation unit (ISA units are compiled with different flags,
// so nothing here may become a shared symbol).
#pragma once

#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace bitswitch {
namespace cpu {
namespace {

inline float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bf16_to_f32(uint16_t h) { return bits_to_f32(uint32_t(h) << 16); }

// Round to nearest even; NaN stays a (quiet) NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_to_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((u >> 16) | 0x0040u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  if (exp == 0x1F) return bits_to_f32(sign | 0x7F800000u | (man << 13));  // inf / NaN
  if (exp == 0) {
    if (man == 0) return bits_to_f32(sign);
    // Subnormal: value = man * 2^-24.
    float v = float(man) * (1.0f / 16777216.0f);
    return sign ? -v : v;
  }
  return bits_to_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

// Round to nearest even, overflow to infinity, NaN stays NaN.
inline uint16_t f32_to_f16(float f) {
  uint32_t u = f32_to_bits(f);
  uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return uint16_t(sign | 0x7E00u);
  if (a >= 0x477FF000u) return uint16_t(sign | 0x7C00u);  // rounds to >= 65520: inf
  if (a < 0x38800000u) {
    // Result is subnormal or zero in half: scale so the integer part is the mantissa.
    // 2^-24 is the smallest half subnormal; rounding follows float->int rounding rules.
    float v = bits_to_f32(a) * 16777216.0f;  // exact
    uint32_t m = uint32_t(v);
    float frac = v - float(m);
    if (frac > 0.5f || (frac == 0.5f && (m & 1u))) ++m;
    return uint16_t(sign | m);
  }
  uint32_t exp = (a >> 23) - 112u;
  uint32_t man = a & 0x7FFFFFu;
  uint32_t h = (exp << 10) | (man >> 13);
  uint32_t rest = man & 0x1FFFu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // may carry into the exponent
  return uint16_t(sign | h);
}

inline float load_f32(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::kBFloat16:
      return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case DType::kFloat16:
      return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

inline void store_f32(void* p, DType t, int64_t i, float v) {
  switch (t) {
    case DType::kBFloat16:
      static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
      break;
    case DType::kFloat16:
      static_cast<uint16_t*>(p)[i] = f32_to_f16(v);
      break;
    default:
      static_cast<float*>(p)[i] = v;
  }
}

inline int64_t dtype_size(DType t) {
  return t == DType::kFloat32 || t == DType::kUInt32 || t == DType::kInt32 ? 4 : 2;
}

}  // namespace
}  // namespace cpu
}  // namespace bitswitch
