// A 16 x 16 dword transpose in zmm registers, for the AVX-512 units (avx512.cpp,
// avx512_bf16.cpp, amx.cpp): each includes it under its own flags (internal linkage).
#pragma once

#include <immintrin.h>

namespace bitswitch {
namespace cpu {
namespace {

// In-place transpose of a 16 x 16 matrix of dwords, r[i] holding row i.
inline void transpose16x16_epi32(__m512i (&r)[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: rows 2i, 2i+1 interleaved
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + j], lane L: element 4L + j of rows 4i .. 4i + 3
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int j = 0; j < 4; ++j) {  // element 4L + j of all rows: lane L of r[j], r[4 + j], ...
    const __m512i ab_lo = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x44), ab_hi = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xEE);
    const __m512i cd_lo = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x44),
                  cd_hi = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xEE);
    t[j] = _mm512_shuffle_i32x4(ab_lo, cd_lo, 0x88);
    t[4 + j] = _mm512_shuffle_i32x4(ab_lo, cd_lo, 0xDD);
    t[8 + j] = _mm512_shuffle_i32x4(ab_hi, cd_hi, 0x88);
    t[12 + j] = _mm512_shuffle_i32x4(ab_hi, cd_hi, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

}  // namespace
}  // namespace cpu
}  // namespace bitswitch
