// bitswitch packed weight format: "nibble planes".
//
// This header is the single source of truth for the stored format. It compiles as
// C++17, as CUDA (functions are __host__ __device__) and as Metal Shading Language
// (plain scalar types only, no standard library).
//
// A weight W[N, K] (nn.Linear layout: N outputs, K inputs) is stored as
//   plane 0:  uint32[N, K/8]   the INT4 code q (0..15) of every element
//   plane 1:  uint32[N, K/8]   optional: a 4-bit residual r (0..15)
//   scales:   [N, K/G]         one affine scale per group of G consecutive inputs
//   biases:   [N, K/G]         one affine bias per group
// Element k of a row sits in bits 4*(k % 8) .. 4*(k % 8) + 3 of word k / 8, least
// significant first: MLX's 4-bit order, so an MLX 4-bit weight *is* a plane 0.
//
// Reading one plane (INT4 view):  w = s*q + b
// Reading two planes (INT8 view): w = s*q + b + (s/16)*(r - 7.5)
//                                   = (s/16)*(16q + r) + (b - 7.5*s/16)
// so the INT8 view is an 8-bit affine code c = 16q + r with scale s/16 and bias
// b - 7.5*s/16. Scales may be negative (MLX's quantizer makes them so).
#pragma once

#if !defined(__METAL_VERSION__)
#include <stdint.h>  // MSL has the fixed-width integer types built in
#endif

#if defined(__CUDACC__)
#define BITSWITCH_HD __host__ __device__ inline
#else
#define BITSWITCH_HD inline
#endif

// MSL keeps program-scope variables in the constant address space.
#if defined(__METAL_VERSION__)
#define BITSWITCH_CONSTEXPR constant constexpr
#else
#define BITSWITCH_CONSTEXPR constexpr
#endif

namespace bitswitch {
namespace format {

// Bits per stored code in one plane.
BITSWITCH_CONSTEXPR int kPlaneBits = 4;
// Codes per 32-bit word of a plane.
BITSWITCH_CONSTEXPR int kValuesPerWord = 32 / kPlaneBits;
// Largest code in a plane.
BITSWITCH_CONSTEXPR int kCodeMax = (1 << kPlaneBits) - 1;
// Planes a weight can hold: plane 0 (INT4 code) and plane 1 (residual).
BITSWITCH_CONSTEXPR int kMaxPlanes = 2;
// Supported group sizes along K. Every kernel instantiates exactly these.
BITSWITCH_CONSTEXPR int kGroupSize32 = 32;
BITSWITCH_CONSTEXPR int kGroupSize64 = 64;
BITSWITCH_CONSTEXPR int kGroupSize128 = 128;
BITSWITCH_CONSTEXPR int kMinGroupSize = kGroupSize32;
BITSWITCH_CONSTEXPR int kMaxGroupSize = kGroupSize128;
// The INT8 view: plane 1 refines plane 0 in steps of s / kResidualDivisor around
// kResidualCenter, so 16q + r is an 8-bit code.
BITSWITCH_CONSTEXPR int kResidualDivisor = 1 << kPlaneBits;
BITSWITCH_CONSTEXPR float kResidualCenter = 7.5f;
// Bits per weight element each view reads.
BITSWITCH_CONSTEXPR int kInt4Bits = kPlaneBits;
BITSWITCH_CONSTEXPR int kInt8Bits = 2 * kPlaneBits;

static_assert(kValuesPerWord * kPlaneBits == 32, "a plane word holds a whole number of codes");
static_assert(kValuesPerWord == 8, "MLX 4-bit order packs 8 codes per uint32");
static_assert(kMinGroupSize % kValuesPerWord == 0, "a group covers whole plane words");
static_assert(kResidualDivisor * kCodeMax + kCodeMax == 255, "16q + r is exactly one byte");
static_assert(kResidualCenter * 2 == kCodeMax, "the residual is centred on its code range");

BITSWITCH_HD bool is_supported_group_size(int g) {
  return g == kGroupSize32 || g == kGroupSize64 || g == kGroupSize128;
}

BITSWITCH_HD bool is_supported_bits(int bits) { return bits == kInt4Bits || bits == kInt8Bits; }

// Number of planes the `bits` view reads (1 for INT4, 2 for INT8).
BITSWITCH_HD int planes_for_bits(int bits) { return bits / kPlaneBits; }

// uint32 words per row of one plane for K inputs.
BITSWITCH_HD int64_t words_per_row(int64_t k) { return k / kValuesPerWord; }

// Groups per row for K inputs and group size g.
BITSWITCH_HD int64_t groups_per_row(int64_t k, int g) { return k / g; }

// Code i (0..7) of a plane word.
BITSWITCH_HD uint32_t unpack_code(uint32_t word, int i) {
  return (word >> (kPlaneBits * i)) & uint32_t(kCodeMax);
}

// The 8-bit code of the INT8 view from the two plane codes.
BITSWITCH_HD uint32_t int8_code(uint32_t q, uint32_t r) { return q * kResidualDivisor + r; }

// INT8 view as an affine 8-bit code: scale and bias that multiply / offset int8_code().
BITSWITCH_HD float int8_scale(float s) { return s / float(kResidualDivisor); }
BITSWITCH_HD float int8_bias(float s, float b) {
  return b - kResidualCenter * s / float(kResidualDivisor);
}

// Dequantize one element (float32 arithmetic; the reference oracle uses float64).
BITSWITCH_HD float dequant_int4(uint32_t q, float s, float b) { return s * float(q) + b; }
BITSWITCH_HD float dequant_int8(uint32_t q, uint32_t r, float s, float b) {
  return int8_scale(s) * float(int8_code(q, r)) + int8_bias(s, b);
}

// MLX 8-bit weights map onto the planes as plane 0 = c8 >> 4, plane 1 = c8 & 15,
// s = 16*s8, b = b8 + 7.5*s8: the INT8 view then reproduces MLX's s8*c8 + b8 and plane 0
// alone is a free INT4 view (the conversion lives in python/bitswitch/quant.py).

}  // namespace format
}  // namespace bitswitch
