// Portable stand-ins for the AVX-512 intrinsics the AVX-512 unit uses, for testing that
// unit's logic on CPUs without AVX-512 (configure with -DBITSWITCH_EMULATE_AVX512=ON;
// never used in a release build). Each intrinsic becomes a macro for a lane loop over
// GCC's 64-byte vector types, following the instruction's definition in Intel's SDM.
// Only what csrc/cpu/avx512.cpp (with avx512_int8_gemm.h) and csrc/cpu/avx512_bf16.cpp (with
// bf16_panels.h) call is here: a missing one fails to compile ("target specific option
// mismatch"), never silently runs the real instruction. Masked loads and stores touch only the lanes of their mask,
// as the real ones do, so AddressSanitizer sees what the hardware would.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace bitswitch_avx512_emulation {

union V {
  __m512 f;
  __m512i i;
  __m512d d;
  float f32[16];
  double f64[8];
  int32_t i32[16];
  uint32_t u32[16];
  uint16_t u16[32];
  int64_t i64[8];
  int8_t i8[64];
  uint8_t u8[64];
};

inline V vi(__m512i a) {
  V v;
  v.i = a;
  return v;
}
inline V vf(__m512 a) {
  V v;
  v.f = a;
  return v;
}

inline __m512 setzero_ps() {
  V v;
  std::memset(&v, 0, sizeof v);
  return v.f;
}
inline __m512i setzero_si512() {
  V v;
  std::memset(&v, 0, sizeof v);
  return v.i;
}
inline __m512 set1_ps(float x) {
  V v;
  for (float& e : v.f32) e = x;
  return v.f;
}
inline __m512i set1_epi8(char x) {
  V v;
  for (int8_t& e : v.i8) e = int8_t(x);
  return v.i;
}
inline __m512i setr_epi32(int e0, int e1, int e2, int e3, int e4, int e5, int e6, int e7, int e8, int e9,
                          int e10, int e11, int e12, int e13, int e14, int e15) {
  V v;
  const int e[16] = {e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, e14, e15};
  for (int i = 0; i < 16; ++i) v.i32[i] = e[i];
  return v.i;
}
inline __m512 loadu_ps(const void* p) {
  V v;
  std::memcpy(&v, p, 64);
  return v.f;
}
inline __m512i loadu_si512(const void* p) {
  V v;
  std::memcpy(&v, p, 64);
  return v.i;
}
inline __m512 load_ps(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % 64) __builtin_trap();  // the real load faults
  return loadu_ps(p);
}
inline __m512i load_si512(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % 64) __builtin_trap();
  return loadu_si512(p);
}
inline void storeu_ps(void* p, __m512 a) { std::memcpy(p, &a, 64); }

inline __m512i and_si512(__m512i a, __m512i b) {
  V x = vi(a), y = vi(b);
  for (int i = 0; i < 16; ++i) x.i32[i] &= y.i32[i];
  return x.i;
}
inline __m512i or_si512(__m512i a, __m512i b) {
  V x = vi(a), y = vi(b);
  for (int i = 0; i < 16; ++i) x.i32[i] |= y.i32[i];
  return x.i;
}
inline __m512i srli_epi16(__m512i a, unsigned n) {
  V x = vi(a);
  for (uint16_t& e : x.u16) e = n > 15 ? 0 : uint16_t(e >> n);
  return x.i;
}
inline __m512i slli_epi16(__m512i a, unsigned n) {
  V x = vi(a);
  for (uint16_t& e : x.u16) e = n > 15 ? 0 : uint16_t(e << n);
  return x.i;
}
inline __m512i slli_epi32(__m512i a, unsigned n) {
  V x = vi(a);
  for (int32_t& e : x.i32) e = n > 31 ? 0 : int32_t(uint32_t(e) << n);
  return x.i;
}
inline __m512i add_epi32(__m512i a, __m512i b) {
  V x = vi(a), y = vi(b);
  for (int i = 0; i < 16; ++i) x.i32[i] = int32_t(uint32_t(x.i32[i]) + uint32_t(y.i32[i]));
  return x.i;
}
// VPDPBUSD: src + sum of four u8(a) * s8(b) products per 32-bit lane, wrapping.
inline __m512i dpbusd_epi32(__m512i src, __m512i a, __m512i b) {
  V s = vi(src), x = vi(a), y = vi(b);
  for (int i = 0; i < 16; ++i) {
    int32_t acc = 0;
    for (int j = 0; j < 4; ++j) acc += int32_t(x.u8[4 * i + j]) * int32_t(y.i8[4 * i + j]);
    s.i32[i] = int32_t(uint32_t(s.i32[i]) + uint32_t(acc));
  }
  return s.i;
}
inline __m512 cvtepi32_ps(__m512i a) {
  V x = vi(a), r;
  for (int i = 0; i < 16; ++i) r.f32[i] = float(x.i32[i]);
  return r.f;
}
inline __m512 mul_ps(__m512 a, __m512 b) {
  V x = vf(a), y = vf(b);
  for (int i = 0; i < 16; ++i) x.f32[i] *= y.f32[i];
  return x.f;
}
inline __m512 fmadd_ps(__m512 a, __m512 b, __m512 c) {
  V x = vf(a), y = vf(b), z = vf(c);
  for (int i = 0; i < 16; ++i) z.f32[i] = __builtin_fmaf(x.f32[i], y.f32[i], z.f32[i]);
  return z.f;
}
inline __m512 permutexvar_ps(__m512i idx, __m512 a) {
  V ix = vi(idx), x = vf(a), r;
  for (int i = 0; i < 16; ++i) r.f32[i] = x.f32[ix.i32[i] & 15];
  return r.f;
}
inline __m512 add_ps(__m512 a, __m512 b) {
  V x = vf(a), y = vf(b);
  for (int i = 0; i < 16; ++i) x.f32[i] += y.f32[i];
  return x.f;
}
inline __m512 sub_ps(__m512 a, __m512 b) {
  V x = vf(a), y = vf(b);
  for (int i = 0; i < 16; ++i) x.f32[i] -= y.f32[i];
  return x.f;
}
// MAXPS / MINPS: the second operand when either is NaN (or both are zeros).
inline __m512 max_ps(__m512 a, __m512 b) {
  V x = vf(a), y = vf(b);
  for (int i = 0; i < 16; ++i) x.f32[i] = x.f32[i] > y.f32[i] ? x.f32[i] : y.f32[i];
  return x.f;
}
inline __m512 min_ps(__m512 a, __m512 b) {
  V x = vf(a), y = vf(b);
  for (int i = 0; i < 16; ++i) x.f32[i] = x.f32[i] < y.f32[i] ? x.f32[i] : y.f32[i];
  return x.f;
}
// VCMPPS into a mask: only the predicates the unit uses; any other traps.
inline __mmask16 cmp_ps_mask(__m512 a, __m512 b, int pred) {
  V x = vf(a), y = vf(b);
  __mmask16 k = 0;
  for (int i = 0; i < 16; ++i) {
    bool r;
    switch (pred) {
      case _CMP_GE_OQ: r = x.f32[i] >= y.f32[i]; break;  // false when either is NaN
      case _CMP_LT_OQ: r = x.f32[i] < y.f32[i]; break;
      default: __builtin_trap();
    }
    k = __mmask16(k | (r ? 1u << i : 0u));
  }
  return k;
}
// VRNDSCALEPS with scale 0 (imm[7:4] = 0): round to an integer in the mode of imm[1:0].
inline __m512 roundscale_ps(__m512 a, int imm) {
  if (imm & 0xF0) __builtin_trap();
  V x = vf(a);
  for (float& e : x.f32) {
    switch (imm & 3) {
      case 0: e = std::nearbyint(e); break;  // the default rounding mode: to nearest even
      case 1: e = std::floor(e); break;
      case 2: e = std::ceil(e); break;
      default: e = std::trunc(e);
    }
  }
  return x.f;
}
// VSCALEFPS, zero-masked: a * 2^floor(b) where k is set, else 0.
inline __m512 maskz_scalef_ps(__mmask16 k, __m512 a, __m512 b) {
  V x = vf(a), y = vf(b), r;
  for (int i = 0; i < 16; ++i) {
    const float e = y.f32[i];
    float v;
    if (std::isnan(x.f32[i]) || std::isnan(e)) v = x.f32[i] + e;
    else if (std::isinf(e)) v = e > 0 ? x.f32[i] * e : (x.f32[i] == 0 || std::isinf(x.f32[i]) ? NAN : std::copysign(0.0f, x.f32[i]));
    else v = std::ldexp(x.f32[i], int(std::fmax(std::fmin(std::floor(e), 1000.0f), -1000.0f)));
    r.f32[i] = (k >> i) & 1 ? v : 0.0f;
  }
  return r.f;
}
inline __m512 cvtph_ps(__m256i a) {
  V r;
  const __m256 lo = _mm256_cvtph_ps(_mm256_castsi256_si128(a)), hi = _mm256_cvtph_ps(_mm256_extracti128_si256(a, 1));
  std::memcpy(r.f32, &lo, 32);
  std::memcpy(r.f32 + 8, &hi, 32);
  return r.f;
}
inline __m512i set4_epi32(int d, int c, int b, int a) {
  V v;
  for (int i = 0; i < 16; i += 4) v.i32[i] = a, v.i32[i + 1] = b, v.i32[i + 2] = c, v.i32[i + 3] = d;
  return v.i;
}
// VPSHUFB: within each 128-bit lane, byte i = a[idx & 15], or 0 when idx bit 7 is set.
inline __m512i shuffle_epi8(__m512i a, __m512i idx) {
  V x = vi(a), ix = vi(idx), r;
  for (int i = 0; i < 64; ++i) r.u8[i] = ix.u8[i] & 0x80 ? 0 : x.u8[(i & ~15) | (ix.u8[i] & 15)];
  return r.i;
}
// Within each 128-bit lane: unpacklo_ps [a0 b0 a1 b1], unpackhi_ps [a2 b2 a3 b3];
// unpacklo_pd [a0 b0], unpackhi_pd [a1 b1] (64-bit elements).
inline __m512 unpack_ps(__m512 a, __m512 b, int hi) {
  V x = vf(a), y = vf(b), r;
  for (int l = 0; l < 16; l += 4) {
    r.f32[l] = x.f32[l + 2 * hi];
    r.f32[l + 1] = y.f32[l + 2 * hi];
    r.f32[l + 2] = x.f32[l + 2 * hi + 1];
    r.f32[l + 3] = y.f32[l + 2 * hi + 1];
  }
  return r.f;
}
inline __m512d unpack_pd(__m512d a, __m512d b, int hi) {
  V x, y, r;
  x.d = a;
  y.d = b;
  for (int l = 0; l < 8; l += 2) {
    r.f64[l] = x.f64[l + hi];
    r.f64[l + 1] = y.f64[l + hi];
  }
  return r.d;
}
inline __m512d castps_pd(__m512 a) {
  V v;
  v.f = a;
  return v.d;
}
inline __m512 castpd_ps(__m512d a) {
  V v;
  v.d = a;
  return v.f;
}
inline __m512 castsi512_ps(__m512i a) {
  V v;
  v.i = a;
  return v.f;
}
// VSHUFF32X4: 128-bit lanes 0, 1 from a and 2, 3 from b, chosen by 2-bit fields of imm.
inline __m512 shuffle_f32x4(__m512 a, __m512 b, int imm) {
  V x = vf(a), y = vf(b), r;
  for (int l = 0; l < 4; ++l) std::memcpy(r.f32 + 4 * l, (l < 2 ? x : y).f32 + 4 * ((imm >> (2 * l)) & 3), 16);
  return r.f;
}
// VPERMT2PS: lane i = (idx_i & 16 ? b : a)[idx_i & 15].
inline __m512 permutex2var_ps(__m512 a, __m512i idx, __m512 b) {
  V x = vf(a), y = vf(b), ix = vi(idx), r;
  for (int i = 0; i < 16; ++i) r.f32[i] = (ix.i32[i] & 16 ? y : x).f32[ix.i32[i] & 15];
  return r.f;
}
inline __m512 castps128_ps512(__m128 a) {
  V r;
  std::memset(&r, 0, sizeof r);  // upper lanes are undefined for the real cast
  std::memcpy(&r, &a, 16);
  return r.f;
}
inline __m512 castps256_ps512(__m256 a) {
  V r;
  std::memset(&r, 0, sizeof r);
  std::memcpy(&r, &a, 32);
  return r.f;
}
inline __m256 castps512_ps256(__m512 a) {
  __m256 r;
  std::memcpy(&r, &a, 32);
  return r;
}
inline __m256 extractf32x8_ps(__m512 a, int half) {
  __m256 r;
  std::memcpy(&r, reinterpret_cast<const char*>(&a) + 32 * (half & 1), 32);
  return r;
}
inline __m512 insertf32x8(__m512 a, __m256 b, int half) {
  std::memcpy(reinterpret_cast<char*>(&a) + 32 * (half & 1), &b, 32);
  return a;
}

inline __m512i set1_epi32(int x) {
  V v;
  for (int32_t& e : v.i32) e = x;
  return v.i;
}
// _mm512_set_epi16 takes its 32 words highest first.
inline __m512i set_epi16(const int (&hi_first)[32]) {
  V v;
  for (int i = 0; i < 32; ++i) v.u16[i] = uint16_t(hi_first[31 - i]);
  return v.i;
}
inline void storeu_si512(void* p, __m512i a) { std::memcpy(p, &a, 64); }
inline void store_si512(void* p, __m512i a) {
  if (reinterpret_cast<uintptr_t>(p) % 64) __builtin_trap();
  storeu_si512(p, a);
}
inline __m512 maskz_loadu_ps(__mmask16 k, const void* p) {
  V v;
  for (int i = 0; i < 16; ++i) {
    v.f32[i] = 0.0f;
    if ((k >> i) & 1) std::memcpy(&v.f32[i], static_cast<const char*>(p) + 4 * i, 4);
  }
  return v.f;
}
inline __m256i maskz_loadu_epi16_256(__mmask16 k, const void* p) {
  uint16_t w[16];
  for (int i = 0; i < 16; ++i) {
    w[i] = 0;
    if ((k >> i) & 1) std::memcpy(&w[i], static_cast<const char*>(p) + 2 * i, 2);
  }
  __m256i r;
  std::memcpy(&r, w, 32);
  return r;
}
inline void mask_storeu_epi16_256(void* p, __mmask16 k, __m256i a) {
  uint16_t w[16];
  std::memcpy(w, &a, 32);
  for (int i = 0; i < 16; ++i)
    if ((k >> i) & 1) std::memcpy(static_cast<char*>(p) + 2 * i, &w[i], 2);
}
inline __m512i cvtepu16_epi32(__m256i a) {
  uint16_t w[16];
  std::memcpy(w, &a, 32);
  V r;
  for (int i = 0; i < 16; ++i) r.i32[i] = w[i];
  return r.i;
}
inline __m512i cvtepu8_epi32(__m128i a) {
  uint8_t b[16];
  std::memcpy(b, &a, 16);
  V r;
  for (int i = 0; i < 16; ++i) r.i32[i] = b[i];
  return r.i;
}
inline __m512i cvtepu8_epi16(__m256i a) {
  uint8_t b[32];
  std::memcpy(b, &a, 32);
  V r;
  for (int i = 0; i < 32; ++i) r.u16[i] = b[i];
  return r.i;
}
inline __m512i castps_si512(__m512 a) { return vf(a).i; }
// VSHUFI32X4: 128-bit lanes 0, 1 from a and 2, 3 from b, each picked by two bits of imm.
inline __m512i shuffle_i32x4(__m512i a, __m512i b, int imm) {
  V x = vi(a), y = vi(b), r;
  for (int l = 0; l < 4; ++l) std::memcpy(r.u32 + 4 * l, (l < 2 ? x : y).u32 + 4 * ((imm >> (2 * l)) & 3), 16);
  return r.i;
}
inline __m512i srli_epi32(__m512i a, unsigned n) {
  V x = vi(a);
  for (uint32_t& e : x.u32) e = n > 31 ? 0 : e >> n;
  return x.i;
}
// VPTERNLOGD: bit j of each result = imm bit (a_j << 2 | b_j << 1 | c_j).
inline __m512i ternarylogic_epi32(__m512i a, __m512i b, __m512i c, int imm) {
  V x = vi(a), y = vi(b), z = vi(c), r;
  for (int i = 0; i < 16; ++i) {
    uint32_t out = 0;
    for (int j = 0; j < 32; ++j) {
      const unsigned sel = ((x.u32[i] >> j) & 1) << 2 | ((y.u32[i] >> j) & 1) << 1 | ((z.u32[i] >> j) & 1);
      out |= uint32_t((imm >> sel) & 1) << j;
    }
    r.u32[i] = out;
  }
  return r.i;
}
// VPERMW: word i = a[idx_i & 31].
inline __m512i permutexvar_epi16(__m512i idx, __m512i a) {
  V ix = vi(idx), x = vi(a), r;
  for (int i = 0; i < 32; ++i) r.u16[i] = x.u16[ix.u16[i] & 31];
  return r.i;
}
// Within each 128-bit lane, elements of `bytes` bytes from the low (hi = 0) or high half
// of a and b, interleaved: [a0 b0 a1 b1 ...] (VPUNPCKL* / VPUNPCKH*).
inline __m512i unpack_epi(__m512i a, __m512i b, int bytes, int hi) {
  V x = vi(a), y = vi(b), r;
  const int n = 16 / bytes;  // elements per lane
  for (int l = 0; l < 64; l += 16)
    for (int j = 0; j < n / 2; ++j) {
      std::memcpy(r.u8 + l + 2 * j * bytes, x.u8 + l + (j + hi * n / 2) * bytes, bytes);
      std::memcpy(r.u8 + l + (2 * j + 1) * bytes, y.u8 + l + (j + hi * n / 2) * bytes, bytes);
    }
  return r.i;
}
// VSHUFPS: within each 128-bit lane [a[imm0] a[imm1] b[imm2] b[imm3]] (2-bit fields).
inline __m512 shuffle_ps(__m512 a, __m512 b, int imm) {
  V x = vf(a), y = vf(b), r;
  for (int l = 0; l < 16; l += 4) {
    r.f32[l] = x.f32[l + (imm & 3)];
    r.f32[l + 1] = x.f32[l + ((imm >> 2) & 3)];
    r.f32[l + 2] = y.f32[l + ((imm >> 4) & 3)];
    r.f32[l + 3] = y.f32[l + ((imm >> 6) & 3)];
  }
  return r.f;
}

// AVX512-BF16, by the SDM's pseudo-code. float32 -> bf16: zeros and denormals to a signed
// zero, NaNs quieted, infinities kept, the rest rounded to nearest even.
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7F800000u) == 0) return uint16_t((u >> 16) & 0x8000u);
  if ((u & 0x7FFFFFFFu) == 0x7F800000u) return uint16_t(u >> 16);
  if ((u & 0x7F800000u) == 0x7F800000u) return uint16_t((u >> 16) | 0x40u);
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
// bf16 -> float32 with denormals as zero (DAZ), and float32 results flushed to zero (FTZ).
inline float from_bf16_daz(uint16_t h) {
  const uint32_t u = (h & 0x7F80u) == 0 ? uint32_t(h & 0x8000u) << 16 : uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float ftz(float f) { return std::fpclassify(f) == FP_SUBNORMAL ? std::copysign(0.0f, f) : f; }
inline __m256bh cvtneps_pbh(__m512 a) {
  V x = vf(a);
  uint16_t w[16];
  for (int i = 0; i < 16; ++i) w[i] = to_bf16(x.f32[i]);
  __m256bh r;
  std::memcpy(&r, w, 32);
  return r;
}
// VCVTNE2PS2BF16: words 0..15 from b, 16..31 from a.
inline __m512bh cvtne2ps_pbh(__m512 a, __m512 b) {
  V x = vf(a), y = vf(b), r;
  for (int i = 0; i < 16; ++i) {
    r.u16[i] = to_bf16(y.f32[i]);
    r.u16[16 + i] = to_bf16(x.f32[i]);
  }
  __m512bh out;
  std::memcpy(&out, &r, 64);
  return out;
}
// VDPBF16PS: lane i += a.odd * b.odd, then += a.even * b.even (each product exact in
// float32; each sum rounded to nearest even; DAZ and FTZ).
inline __m512 dpbf16_ps(__m512 src, __m512bh a, __m512bh b) {
  V s = vf(src), x, y;
  std::memcpy(&x, &a, 64);
  std::memcpy(&y, &b, 64);
  for (int i = 0; i < 16; ++i) {
    float acc = ftz(s.f32[i]);
    acc = ftz(acc + ftz(from_bf16_daz(x.u16[2 * i + 1]) * from_bf16_daz(y.u16[2 * i + 1])));
    acc = ftz(acc + ftz(from_bf16_daz(x.u16[2 * i]) * from_bf16_daz(y.u16[2 * i])));
    s.f32[i] = acc;
  }
  return s.f;
}

}  // namespace bitswitch_avx512_emulation

#define BSEMU ::bitswitch_avx512_emulation
#define _mm512_setzero_ps() BSEMU::setzero_ps()
#define _mm512_setzero_si512() BSEMU::setzero_si512()
#define _mm512_set1_ps(x) BSEMU::set1_ps(x)
#define _mm512_set1_epi8(x) BSEMU::set1_epi8(x)
#undef _mm512_setr_epi32  // a macro in gcc's avx512fintrin.h
#define _mm512_setr_epi32(...) BSEMU::setr_epi32(__VA_ARGS__)
#define _mm512_loadu_ps(p) BSEMU::loadu_ps(p)
#define _mm512_loadu_si512(p) BSEMU::loadu_si512(p)
#define _mm512_load_ps(p) BSEMU::load_ps(p)
#define _mm512_load_si512(p) BSEMU::load_si512(p)
#define _mm512_storeu_ps(p, a) BSEMU::storeu_ps(p, a)
#define _mm512_and_si512(a, b) BSEMU::and_si512(a, b)
#define _mm512_or_si512(a, b) BSEMU::or_si512(a, b)
#define _mm512_srli_epi16(a, n) BSEMU::srli_epi16(a, n)
#define _mm512_slli_epi16(a, n) BSEMU::slli_epi16(a, n)
#define _mm512_slli_epi32(a, n) BSEMU::slli_epi32(a, n)
#define _mm512_add_epi32(a, b) BSEMU::add_epi32(a, b)
#define _mm512_dpbusd_epi32(s, a, b) BSEMU::dpbusd_epi32(s, a, b)
#define _mm512_cvtepi32_ps(a) BSEMU::cvtepi32_ps(a)
#define _mm512_mul_ps(a, b) BSEMU::mul_ps(a, b)
#define _mm512_fmadd_ps(a, b, c) BSEMU::fmadd_ps(a, b, c)
#define _mm512_permutexvar_ps(i, a) BSEMU::permutexvar_ps(i, a)
#define _mm512_castps128_ps512(a) BSEMU::castps128_ps512(a)
#define _mm512_castps256_ps512(a) BSEMU::castps256_ps512(a)
#define _mm512_castps512_ps256(a) BSEMU::castps512_ps256(a)
#define _mm512_extractf32x8_ps(a, h) BSEMU::extractf32x8_ps(a, h)
#define _mm512_insertf32x8(a, b, h) BSEMU::insertf32x8(a, b, h)
#undef _mm512_add_ps
#define _mm512_add_ps(a, b) BSEMU::add_ps(a, b)
#undef _mm512_sub_ps
#define _mm512_sub_ps(a, b) BSEMU::sub_ps(a, b)
#undef _mm512_max_ps
#define _mm512_max_ps(a, b) BSEMU::max_ps(a, b)
#undef _mm512_min_ps
#define _mm512_min_ps(a, b) BSEMU::min_ps(a, b)
#undef _mm512_cmp_ps_mask
#define _mm512_cmp_ps_mask(a, b, p) BSEMU::cmp_ps_mask(a, b, p)
#undef _mm512_roundscale_ps
#define _mm512_roundscale_ps(a, imm) BSEMU::roundscale_ps(a, imm)
#undef _mm512_maskz_scalef_ps
#define _mm512_maskz_scalef_ps(k, a, b) BSEMU::maskz_scalef_ps(k, a, b)
#undef _mm512_cvtph_ps
#define _mm512_cvtph_ps(a) BSEMU::cvtph_ps(a)
#undef _mm512_set4_epi32
#define _mm512_set4_epi32(d, c, b, a) BSEMU::set4_epi32(d, c, b, a)
#undef _mm512_shuffle_epi8
#define _mm512_shuffle_epi8(a, i) BSEMU::shuffle_epi8(a, i)
#undef _mm512_unpacklo_ps
#define _mm512_unpacklo_ps(a, b) BSEMU::unpack_ps(a, b, 0)
#undef _mm512_unpackhi_ps
#define _mm512_unpackhi_ps(a, b) BSEMU::unpack_ps(a, b, 1)
#undef _mm512_unpacklo_pd
#define _mm512_unpacklo_pd(a, b) BSEMU::unpack_pd(a, b, 0)
#undef _mm512_unpackhi_pd
#define _mm512_unpackhi_pd(a, b) BSEMU::unpack_pd(a, b, 1)
#undef _mm512_castps_pd
#define _mm512_castps_pd(a) BSEMU::castps_pd(a)
#undef _mm512_castpd_ps
#define _mm512_castpd_ps(a) BSEMU::castpd_ps(a)
#undef _mm512_castsi512_ps
#define _mm512_castsi512_ps(a) BSEMU::castsi512_ps(a)
#undef _mm512_shuffle_f32x4
#define _mm512_shuffle_f32x4(a, b, imm) BSEMU::shuffle_f32x4(a, b, imm)
#undef _mm512_permutex2var_ps
#define _mm512_permutex2var_ps(a, i, b) BSEMU::permutex2var_ps(a, i, b)
#undef _mm512_set1_epi32
#define _mm512_set1_epi32(x) BSEMU::set1_epi32(x)
#undef _mm512_set_epi16
#define _mm512_set_epi16(...) BSEMU::set_epi16({__VA_ARGS__})
#define _mm512_storeu_si512(p, a) BSEMU::storeu_si512(p, a)
#define _mm512_store_si512(p, a) BSEMU::store_si512(p, a)
#undef _mm512_maskz_loadu_ps
#define _mm512_maskz_loadu_ps(k, p) BSEMU::maskz_loadu_ps(k, p)
#undef _mm256_maskz_loadu_epi16
#define _mm256_maskz_loadu_epi16(k, p) BSEMU::maskz_loadu_epi16_256(k, p)
#undef _mm256_mask_storeu_epi16
#define _mm256_mask_storeu_epi16(p, k, a) BSEMU::mask_storeu_epi16_256(p, k, a)
#undef _mm512_cvtepu16_epi32
#define _mm512_cvtepu16_epi32(a) BSEMU::cvtepu16_epi32(a)
#undef _mm512_cvtepu8_epi32
#define _mm512_cvtepu8_epi32(a) BSEMU::cvtepu8_epi32(a)
#undef _mm512_cvtepu8_epi16
#define _mm512_cvtepu8_epi16(a) BSEMU::cvtepu8_epi16(a)
#undef _mm512_castps_si512
#define _mm512_castps_si512(a) BSEMU::castps_si512(a)
#undef _mm512_shuffle_i32x4
#define _mm512_shuffle_i32x4(a, b, imm) BSEMU::shuffle_i32x4(a, b, imm)
#undef _mm512_srli_epi32
#define _mm512_srli_epi32(a, n) BSEMU::srli_epi32(a, n)
#undef _mm512_ternarylogic_epi32
#define _mm512_ternarylogic_epi32(a, b, c, imm) BSEMU::ternarylogic_epi32(a, b, c, imm)
#undef _mm512_permutexvar_epi16
#define _mm512_permutexvar_epi16(i, a) BSEMU::permutexvar_epi16(i, a)
#undef _mm512_unpacklo_epi8
#define _mm512_unpacklo_epi8(a, b) BSEMU::unpack_epi(a, b, 1, 0)
#undef _mm512_unpackhi_epi8
#define _mm512_unpackhi_epi8(a, b) BSEMU::unpack_epi(a, b, 1, 1)
#undef _mm512_unpacklo_epi16
#define _mm512_unpacklo_epi16(a, b) BSEMU::unpack_epi(a, b, 2, 0)
#undef _mm512_unpackhi_epi16
#define _mm512_unpackhi_epi16(a, b) BSEMU::unpack_epi(a, b, 2, 1)
#undef _mm512_unpacklo_epi32
#define _mm512_unpacklo_epi32(a, b) BSEMU::unpack_epi(a, b, 4, 0)
#undef _mm512_unpackhi_epi32
#define _mm512_unpackhi_epi32(a, b) BSEMU::unpack_epi(a, b, 4, 1)
#undef _mm512_unpacklo_epi64
#define _mm512_unpacklo_epi64(a, b) BSEMU::unpack_epi(a, b, 8, 0)
#undef _mm512_unpackhi_epi64
#define _mm512_unpackhi_epi64(a, b) BSEMU::unpack_epi(a, b, 8, 1)
#undef _mm512_shuffle_ps
#define _mm512_shuffle_ps(a, b, imm) BSEMU::shuffle_ps(a, b, imm)
#undef _mm512_cvtneps_pbh
#define _mm512_cvtneps_pbh(a) BSEMU::cvtneps_pbh(a)
#undef _mm512_cvtne2ps_pbh
#define _mm512_cvtne2ps_pbh(a, b) BSEMU::cvtne2ps_pbh(a, b)
#undef _mm512_dpbf16_ps
#define _mm512_dpbf16_ps(s, a, b) BSEMU::dpbf16_ps(s, a, b)
