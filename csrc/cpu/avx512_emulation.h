// Portable stand-ins for the AVX-512 intrinsics the AVX-512 unit uses, for testing that
// unit's logic on CPUs without AVX-512 (configure with -DBITSWITCH_EMULATE_AVX512=ON;
// never used in a release build). Each intrinsic becomes a macro for a lane loop over
// GCC's 64-byte vector types, following the instruction's definition in Intel's SDM.
// Only what csrc/cpu/avx512.cpp calls is here: a missing one fails to compile
// ("target specific option mismatch"), never silently runs the real instruction.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace bitswitch_avx512_emulation {

union V {
  __m512 f;
  __m512i i;
  float f32[16];
  int32_t i32[16];
  uint16_t u16[32];
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
