// msl_emulation.h - run Metal Shading Language kernels as C++17 on a CPU.
//
// The Metal kernels in metal/*.metal are compiled with the host C++ compiler against this
// header and run against a CPU reference. A translation unit looks like
//
//     #include "msl_emulation.h"
//     using namespace metal;
//     <kernel source, after the threadgroup filter>
//     <host driver calling msl_emu::launch>
//
// Before compilation the kernel source goes through a line-preserving filter that rewrites the
// `threadgroup` keyword: as the storage class of an array it becomes `static` (all GPU threads
// of one threadgroup then share the function-local array; threadgroups run one at a time), as a
// pointer qualifier it is removed. This header therefore does not define `threadgroup`.
//
// What is provided (namespace metal):
//   - scalar types uint, ushort, uchar, ulong, half (_Float16; __fp16 with GCC 12 on AArch64),
//     bfloat (the upper half of a float, rounded to nearest even), numeric_limits for them;
//   - vectors vec<T, N> (N = 2, 3, 4) named as in MSL (float4, half2, uint3, ...), with .x .y .z
//     .w, operator[], elementwise arithmetic, broadcast and element-type conversions, dot();
//   - math: max min abs fabs fma exp exp2 log log2 sqrt rsqrt isinf isnan clamp select (and a
//     few neighbours), metal::fast and metal::precise variants, as_type<>;
//   - threadgroup_barrier, simdgroup_barrier, the simd_* collectives (SIMD width 32);
//   - simdgroup_matrix<T, 8, 8> with simdgroup_load/store/multiply(_accumulate).
//
// The GPU threads of one threadgroup run either as cooperative fibers on the calling thread
// (Mode::fibers: fast, deterministic) or as one OS thread each (Mode::threads: for
// ThreadSanitizer, which then reports a missing barrier as a data race between two GPU
// threads). Misuse that would hang or silently misbehave on a GPU - a barrier or a simd
// collective not reached by every thread, lanes calling different collectives, non-uniform
// arguments to simdgroup-matrix operations, a C++ exception - ends the launch with an error
// message instead.
//
// Fibers switch with a few instructions of hand-written assembly on x86-64 and AArch64 (ELF),
// with ucontext elsewhere; each has its own 256 KiB stack (1 MiB under AddressSanitizer, whose
// switch API is used, so ASan works in both modes) above a guard page. Under ThreadSanitizer
// Mode::fibers requests run as Mode::threads.
//
// What a kernel author should know:
//   - Threadgroups run one after another, never concurrently: a kernel that waits for another
//     threadgroup (spinning on device memory) hangs. Atomics are not provided.
//   - Collectives are matched per simdgroup by their order in each lane, not by call site:
//     `if (lane < 16) a = simd_sum(a); b = simd_sum(b);` pairs lanes 0-15's first call with
//     lanes 16-31's first call. Two different collectives meeting, or lanes that never arrive,
//     are reported; a same-kind mismatch is not.
//   - simd_sum/max/min reduce in a fixed order (msl_emu::detail::tree_reduce): bit-exact
//     across runs and modes. Reductions of half values add in half.
//   - simdgroup matrices are 8x8; every lane holds the whole matrix (no thread_elements()), a
//     default-constructed one is zero, products accumulate in float (order documented below).
//   - fast:: and precise:: math are both the C library's float functions; half math goes
//     through float.
//   - A kernel that never reaches a wait (an endless loop) hangs in either mode; a fiber stack
//     overflow faults on the guard page (raise MSL_EMU_FIBER_STACK_BYTES).
//   - Mode::threads starts threads_per_group OS threads per threadgroup: keep its grids small.
//   - Function-local statics stand in for threadgroup memory, so two launches of the same
//     kernel must not run at the same time (from different OS threads).
//
// After this header the identifiers `kernel`, `device`, `constant` and `thread` are empty
// macros (MSL address spaces and the kernel specifier). Host code that follows it must not use
// them as names (std::thread, std::random_device, ...): include and use such things before.
//
// With MSL_EMU_CORE_ONLY defined, only the language-neutral core is declared: the launcher
// (fibers, threads, barriers, the exchange behind every simd collective, deadlock and
// divergence reports) and the 16-bit float types msl_emu::detail::half_t and bfloat16. No
// namespace metal, no macros. tests/cuda/cuda_emulation.h builds CUDA's built-ins on it.

#pragma once

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#include <unistd.h>
#endif

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

// Sanitizers. AddressSanitizer is told about every fiber switch
// (__sanitizer_start/finish_switch_fiber), so Mode::fibers works under it. ThreadSanitizer
// cannot follow the hand-written context switch: under it Mode::fibers runs as Mode::threads.
#if defined(__SANITIZE_ADDRESS__)
#define MSL_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MSL_EMU_ASAN 1
#endif
#endif
#if defined(__SANITIZE_THREAD__)
#define MSL_EMU_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define MSL_EMU_TSAN 1
#endif
#endif

#if defined(MSL_EMU_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// Context switch implementation: hand-written for x86-64 and AArch64 ELF targets, ucontext
// elsewhere (or when MSL_EMU_FORCE_UCONTEXT is defined).
#if !defined(MSL_EMU_FORCE_UCONTEXT) && defined(__ELF__) && defined(__x86_64__)
#define MSL_EMU_SWITCH_X86_64 1
#elif !defined(MSL_EMU_FORCE_UCONTEXT) && defined(__ELF__) && defined(__aarch64__)
#define MSL_EMU_SWITCH_AARCH64 1
#else
#define MSL_EMU_SWITCH_UCONTEXT 1
#include <ucontext.h>
#endif

// Usable stack of one fiber (a guard page lies below it). Kernels keep little on the stack;
// AddressSanitizer's redzones need more room.
#ifndef MSL_EMU_FIBER_STACK_BYTES
#if defined(MSL_EMU_ASAN)
#define MSL_EMU_FIBER_STACK_BYTES (1024 * 1024)
#else
#define MSL_EMU_FIBER_STACK_BYTES (256 * 1024)
#endif
#endif

// ---------------------------------------------------------------------------------------------
// Scalar types, vectors, math
// ---------------------------------------------------------------------------------------------

namespace msl_emu {
namespace detail {
// The 16-bit IEEE float behind MSL's half. GCC before 13 has no _Float16 in C++ on AArch64;
// its __fp16 has the same format and conversions (arithmetic on it happens in float).
#if defined(__aarch64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
typedef __fp16 half_t;
#else
typedef _Float16 half_t;
#endif
template <class T> struct identity { using type = T; };
template <class T> using identity_t = typename identity<T>::type;  // blocks template deduction
template <class T> constexpr bool is_scalar_arith_v = std::is_arithmetic<T>::value || std::is_same<T, half_t>::value;

// bfloat16 (MSL's bfloat, CUDA's __nv_bfloat16): the upper 16 bits of an IEEE float.
// Conversion from float rounds to nearest even (a NaN stays a NaN, quieted); conversion to
// float is exact. Arithmetic goes through float: `a * b` of two bfloats is a float, assigning
// it back rounds.
struct bfloat16 {
  uint16_t bits;

  bfloat16() = default;
  template <class U, std::enable_if_t<is_scalar_arith_v<U>, int> = 0>
  constexpr bfloat16(U v) : bits(round_from_float(static_cast<float>(v))) {}

  constexpr operator float() const { return __builtin_bit_cast(float, uint32_t(bits) << 16); }

  static constexpr bfloat16 from_bits(uint16_t b) {
    bfloat16 r{};
    r.bits = b;
    return r;
  }
  static constexpr uint16_t round_from_float(float f) {
    uint32_t u = __builtin_bit_cast(uint32_t, f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x0040u);  // NaN: quiet it
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even (overflow gives inf)
    return uint16_t(u >> 16);
  }

  bfloat16& operator+=(float v) { return *this = bfloat16(float(*this) + v); }
  bfloat16& operator-=(float v) { return *this = bfloat16(float(*this) - v); }
  bfloat16& operator*=(float v) { return *this = bfloat16(float(*this) * v); }
  bfloat16& operator/=(float v) { return *this = bfloat16(float(*this) / v); }
};
static_assert(sizeof(bfloat16) == 2 && std::is_trivially_copyable<bfloat16>::value, "bfloat layout");
}  // namespace detail
}  // namespace msl_emu

#ifndef MSL_EMU_CORE_ONLY

namespace metal {

typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;  // 64 bits on the LP64 targets this header supports
static_assert(sizeof(ulong) == 8, "MSL ulong is 64 bits");

typedef msl_emu::detail::half_t half;
typedef msl_emu::detail::bfloat16 bfloat;

// numeric_limits: std's for the built-in types, filled in for half and bfloat (which GCC 12's
// std::numeric_limits does not know).
template <class T> struct numeric_limits : std::numeric_limits<T> {};
template <> struct numeric_limits<half> {
  static constexpr bool is_specialized = true;
  static constexpr int digits = 11;
  static constexpr half min() { return half(6.103515625e-05f); }
  static constexpr half max() { return half(65504.0f); }
  static constexpr half lowest() { return half(-65504.0f); }
  static constexpr half epsilon() { return half(0.0009765625f); }
  static constexpr half infinity() { return half(__builtin_inff()); }
  static constexpr half quiet_NaN() { return half(__builtin_nanf("")); }
};
template <> struct numeric_limits<bfloat> {
  static constexpr bool is_specialized = true;
  static constexpr int digits = 8;
  static constexpr bfloat min() { return bfloat::from_bits(0x0080); }
  static constexpr bfloat max() { return bfloat::from_bits(0x7f7f); }
  static constexpr bfloat lowest() { return bfloat::from_bits(0xff7f); }
  static constexpr bfloat epsilon() { return bfloat::from_bits(0x3c00); }
  static constexpr bfloat infinity() { return bfloat::from_bits(0x7f80); }
  static constexpr bfloat quiet_NaN() { return bfloat::from_bits(0x7fc0); }
};

// ---- Vectors ----------------------------------------------------------------------------------
//
// vec<T, N> has the members of MSL vectors (x, y, z, w) and MSL's size and alignment (a
// 3-vector occupies the space of a 4-vector). Scalars convert implicitly (broadcast), other
// element types only by explicit construction: float4(h4).

template <class T, int N> struct vec;

template <class T, int N> struct vec_storage;

template <class T> struct alignas(2 * sizeof(T)) vec_storage<T, 2> {
  T x, y;
  vec_storage() = default;
  constexpr vec_storage(T x_, T y_) : x(x_), y(y_) {}
};

template <class T> struct alignas(4 * sizeof(T)) vec_storage<T, 3> {
  T x, y, z;
  vec_storage() = default;
  constexpr vec_storage(T x_, T y_, T z_) : x(x_), y(y_), z(z_) {}
  constexpr vec_storage(const vec<T, 2>& xy, T z_) : x(xy.x), y(xy.y), z(z_) {}
  constexpr vec_storage(T x_, const vec<T, 2>& yz) : x(x_), y(yz.x), z(yz.y) {}
};

template <class T> struct alignas(4 * sizeof(T)) vec_storage<T, 4> {
  T x, y, z, w;
  vec_storage() = default;
  constexpr vec_storage(T x_, T y_, T z_, T w_) : x(x_), y(y_), z(z_), w(w_) {}
  constexpr vec_storage(const vec<T, 2>& xy, const vec<T, 2>& zw) : x(xy.x), y(xy.y), z(zw.x), w(zw.y) {}
  constexpr vec_storage(const vec<T, 3>& xyz, T w_) : x(xyz.x), y(xyz.y), z(xyz.z), w(w_) {}
  constexpr vec_storage(T x_, const vec<T, 3>& yzw) : x(x_), y(yzw.x), z(yzw.y), w(yzw.z) {}
};

template <class T, int N>
struct vec : vec_storage<T, N> {
  static_assert(N >= 2 && N <= 4, "MSL vectors have 2, 3 or 4 elements");
  using value_type = T;
  static constexpr int elements = N;

  using vec_storage<T, N>::vec_storage;
  vec() = default;
  // Broadcast: float4(0.0f), or `float4 v = 1.0f;` as MSL allows.
  vec(T s) {
    for (int i = 0; i < N; ++i) (*this)[i] = s;
  }
  // Element-type conversion: float4(h4), int2(f2), bfloat4(f4).
  template <class U, std::enable_if_t<!std::is_same<U, T>::value, int> = 0>
  explicit vec(const vec<U, N>& o) {
    for (int i = 0; i < N; ++i) (*this)[i] = static_cast<T>(o[i]);
  }

  T& operator[](int i) { return i == 0 ? this->x : i == 1 ? this->y : elem_hi(i); }
  const T& operator[](int i) const { return const_cast<vec&>(*this)[i]; }

  // Elementwise arithmetic. Scalars on either side broadcast through the implicit constructor.
  friend vec operator+(const vec& a, const vec& b) { return map2(a, b, [](T u, T v) { return T(u + v); }); }
  friend vec operator-(const vec& a, const vec& b) { return map2(a, b, [](T u, T v) { return T(u - v); }); }
  friend vec operator*(const vec& a, const vec& b) { return map2(a, b, [](T u, T v) { return T(u * v); }); }
  friend vec operator/(const vec& a, const vec& b) { return map2(a, b, [](T u, T v) { return T(u / v); }); }
  friend vec operator-(const vec& a) {
    vec r = a;
    for (int i = 0; i < N; ++i) r[i] = T(-a[i]);
    return r;
  }
  vec& operator+=(const vec& b) { return *this = *this + b; }
  vec& operator-=(const vec& b) { return *this = *this - b; }
  vec& operator*=(const vec& b) { return *this = *this * b; }
  vec& operator/=(const vec& b) { return *this = *this / b; }

 private:
  T& elem_hi(int i) {
    if constexpr (N == 2) {
      (void)i;
      return this->y;  // out of range: unspecified, as in MSL
    } else if constexpr (N == 3) {
      (void)i;
      return this->z;
    } else {
      return i == 2 ? this->z : this->w;
    }
  }
  template <class F> static vec map2(const vec& a, const vec& b, F f) {
    vec r = a;
    for (int i = 0; i < N; ++i) r[i] = f(a[i], b[i]);
    return r;
  }
};

#define MSL_EMU_VECTOR_TYPES(T, name) \
  typedef vec<T, 2> name##2;          \
  typedef vec<T, 3> name##3;          \
  typedef vec<T, 4> name##4;
MSL_EMU_VECTOR_TYPES(float, float)
MSL_EMU_VECTOR_TYPES(half, half)
MSL_EMU_VECTOR_TYPES(bfloat, bfloat)
MSL_EMU_VECTOR_TYPES(int, int)
MSL_EMU_VECTOR_TYPES(uint, uint)
MSL_EMU_VECTOR_TYPES(short, short)
MSL_EMU_VECTOR_TYPES(ushort, ushort)
MSL_EMU_VECTOR_TYPES(char, char)
MSL_EMU_VECTOR_TYPES(uchar, uchar)
MSL_EMU_VECTOR_TYPES(long, long)
MSL_EMU_VECTOR_TYPES(ulong, ulong)
MSL_EMU_VECTOR_TYPES(bool, bool)
#undef MSL_EMU_VECTOR_TYPES

template <class T, int N> inline T dot(const vec<T, N>& a, const vec<T, N>& b) {
  T s = T(a[0] * b[0]);
  for (int i = 1; i < N; ++i) s = T(s + a[i] * b[i]);
  return s;
}

// ---- Math -------------------------------------------------------------------------------------
//
// Each function brings in std's overloads (float, double, integers: the same entities as the
// C library's global ones, so `using namespace metal;` creates no ambiguity) and adds half and
// vector versions. half math is computed in float and rounded once.

#define MSL_EMU_UNARY(name)                                                       \
  using std::name;                                                                \
  inline half name(half x) { return half(std::name(float(x))); }                 \
  template <class T, int N> inline vec<T, N> name(vec<T, N> v) {                  \
    for (int i = 0; i < N; ++i) v[i] = T(name(v[i]));                             \
    return v;                                                                     \
  }
MSL_EMU_UNARY(exp)
MSL_EMU_UNARY(exp2)
MSL_EMU_UNARY(log)
MSL_EMU_UNARY(log2)
MSL_EMU_UNARY(sqrt)
MSL_EMU_UNARY(fabs)
MSL_EMU_UNARY(abs)
MSL_EMU_UNARY(floor)
MSL_EMU_UNARY(ceil)
MSL_EMU_UNARY(trunc)
MSL_EMU_UNARY(round)
MSL_EMU_UNARY(rint)
MSL_EMU_UNARY(sin)
MSL_EMU_UNARY(cos)
MSL_EMU_UNARY(tanh)
#undef MSL_EMU_UNARY

inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
inline half rsqrt(half x) { return half(1.0f / std::sqrt(float(x))); }
template <class T, int N> inline vec<T, N> rsqrt(vec<T, N> v) {
  for (int i = 0; i < N; ++i) v[i] = T(rsqrt(v[i]));
  return v;
}

using std::fma;
inline half fma(half a, half b, half c) { return half(std::fma(float(a), float(b), float(c))); }
template <class T, int N> inline vec<T, N> fma(vec<T, N> a, const vec<T, N>& b, const vec<T, N>& c) {
  for (int i = 0; i < N; ++i) a[i] = T(fma(a[i], b[i], c[i]));
  return a;
}

using std::pow;
inline half pow(half a, half b) { return half(std::pow(float(a), float(b))); }

using std::fmax;
using std::fmin;
inline half fmax(half a, half b) { return half(std::fmax(float(a), float(b))); }
inline half fmin(half a, half b) { return half(std::fmin(float(a), float(b))); }

using std::isfinite;
using std::isinf;
using std::isnan;
inline bool isinf(half x) { return std::isinf(float(x)); }
inline bool isnan(half x) { return std::isnan(float(x)); }
inline bool isfinite(half x) { return std::isfinite(float(x)); }

// max/min: MSL's float max/min return the other operand when one is a NaN (fmax/fmin).
inline float max(float a, float b) { return std::fmax(a, b); }
inline float min(float a, float b) { return std::fmin(a, b); }
inline half max(half a, half b) { return half(std::fmax(float(a), float(b))); }
inline half min(half a, half b) { return half(std::fmin(float(a), float(b))); }
#define MSL_EMU_INT_MINMAX(T)                              \
  inline T max(T a, T b) { return a > b ? a : b; }         \
  inline T min(T a, T b) { return a < b ? a : b; }
MSL_EMU_INT_MINMAX(int)
MSL_EMU_INT_MINMAX(uint)
MSL_EMU_INT_MINMAX(long)
MSL_EMU_INT_MINMAX(ulong)
#undef MSL_EMU_INT_MINMAX
template <class T, int N> inline vec<T, N> max(vec<T, N> a, const vec<T, N>& b) {
  for (int i = 0; i < N; ++i) a[i] = T(max(a[i], b[i]));
  return a;
}
template <class T, int N> inline vec<T, N> min(vec<T, N> a, const vec<T, N>& b) {
  for (int i = 0; i < N; ++i) a[i] = T(min(a[i], b[i]));
  return a;
}
template <class T, int N> inline vec<T, N> max(const vec<T, N>& a, msl_emu::detail::identity_t<T> b) {
  return max(a, vec<T, N>(b));
}
template <class T, int N> inline vec<T, N> min(const vec<T, N>& a, msl_emu::detail::identity_t<T> b) {
  return min(a, vec<T, N>(b));
}

inline float clamp(float x, float lo, float hi) { return min(max(x, lo), hi); }
inline half clamp(half x, half lo, half hi) { return min(max(x, lo), hi); }
inline int clamp(int x, int lo, int hi) { return min(max(x, lo), hi); }
inline uint clamp(uint x, uint lo, uint hi) { return min(max(x, lo), hi); }
template <class T, int N> inline vec<T, N> clamp(const vec<T, N>& x, const vec<T, N>& lo, const vec<T, N>& hi) {
  return min(max(x, lo), hi);
}
template <class T, int N>
inline vec<T, N> clamp(const vec<T, N>& x, msl_emu::detail::identity_t<T> lo, msl_emu::detail::identity_t<T> hi) {
  return min(max(x, vec<T, N>(lo)), vec<T, N>(hi));
}

// select(a, b, c): c ? b : a.
inline float select(float a, float b, bool c) { return c ? b : a; }
template <class T> inline T select(T a, T b, bool c) { return c ? b : a; }

// metal::fast and metal::precise. The emulation computes both with the float library functions.
#define MSL_EMU_FAST_PRECISE(name)                                                         \
  inline float name(float x) { return std::name(x); }                                      \
  inline half name(half x) { return half(std::name(float(x))); }                          \
  template <class T, int N> inline vec<T, N> name(vec<T, N> v) {                           \
    for (int i = 0; i < N; ++i) v[i] = T(name(v[i]));                                      \
    return v;                                                                              \
  }
namespace fast {
MSL_EMU_FAST_PRECISE(exp)
MSL_EMU_FAST_PRECISE(exp2)
MSL_EMU_FAST_PRECISE(log)
MSL_EMU_FAST_PRECISE(log2)
MSL_EMU_FAST_PRECISE(sqrt)
MSL_EMU_FAST_PRECISE(tanh)
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
}  // namespace fast
namespace precise {
MSL_EMU_FAST_PRECISE(exp)
MSL_EMU_FAST_PRECISE(exp2)
MSL_EMU_FAST_PRECISE(log)
MSL_EMU_FAST_PRECISE(log2)
MSL_EMU_FAST_PRECISE(sqrt)
MSL_EMU_FAST_PRECISE(tanh)
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
}  // namespace precise
#undef MSL_EMU_FAST_PRECISE

// as_type<To>(x): reinterpret the bits of x (same size), e.g. as_type<uint>(1.0f).
template <class To, class From> inline To as_type(const From& x) {
  static_assert(sizeof(To) == sizeof(From), "as_type needs types of the same size");
  static_assert(std::is_trivially_copyable<To>::value && std::is_trivially_copyable<From>::value,
                "as_type needs trivially copyable types");
  To r;
  std::memcpy(static_cast<void*>(&r), &x, sizeof(To));
  return r;
}

enum class mem_flags : unsigned { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
constexpr mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(unsigned(a) | unsigned(b)); }
constexpr mem_flags operator&(mem_flags a, mem_flags b) { return mem_flags(unsigned(a) & unsigned(b)); }

}  // namespace metal

#endif  // !MSL_EMU_CORE_ONLY

// ---------------------------------------------------------------------------------------------
// The launcher
// ---------------------------------------------------------------------------------------------

namespace msl_emu {

enum class Mode { fibers, threads };

// Identity of one GPU thread: threadgroup index in the grid, thread index in the threadgroup,
// lane (lid % 32) and simdgroup (lid / 32).
struct ThreadIds {
  uint32_t group;
  uint32_t lid;
  uint32_t lane;
  uint32_t simdgroup;
};

constexpr uint32_t simd_width = 32;
constexpr uint32_t max_threads_per_group = 1024;

// The words error messages use for the levels of the thread hierarchy, so that a report about
// a CUDA kernel speaks of blocks and warps.
struct Dialect {
  const char* group;        // "threadgroup"
  const char* simdgroup;    // "simdgroup"
  const char* collectives;  // "simd collectives"
};
inline constexpr Dialect metal_dialect{"threadgroup", "simdgroup", "simd collectives"};

struct LaunchOptions {
  Mode mode = Mode::fibers;
  // Check that the arguments of simdgroup-matrix operations are uniform across the simdgroup.
  bool strict = true;
  const Dialect* dialect = &metal_dialect;
  // Called on the launching OS thread before the threads of group g start: resets what a
  // group's threads share (a CUDA block's dynamic shared memory).
  std::function<void(uint32_t g)> before_group;
  // How error messages name group g; "threadgroup 3" (dialect->group and g) when empty.
  std::function<std::string(uint32_t g)> group_label;
  // For the built-ins of a dialect layered on this core: reachable from a running GPU thread
  // as detail::current(...).group->opts->user.
  void* user = nullptr;
};

// Runs `groups` threadgroups of `threads_per_group` threads (a multiple of 32, at most 1024),
// one threadgroup after the other in order 0..groups-1, calling body(ids) as the code of each
// GPU thread. Returns "" on success, else a message naming the threadgroup and the problem.
std::string launch(uint32_t groups, uint32_t threads_per_group,
                   const std::function<void(const ThreadIds&)>& body, const LaunchOptions& options);
inline std::string launch(uint32_t groups, uint32_t threads_per_group,
                          const std::function<void(const ThreadIds&)>& body, Mode mode = Mode::fibers,
                          bool strict = true) {
  LaunchOptions o;
  o.mode = mode;
  o.strict = strict;
  return launch(groups, threads_per_group, body, o);
}

namespace detail {

constexpr size_t kSlotBytes = 64;  // largest value a simd collective exchanges

// Operations that synchronize GPU threads; their names appear in error messages.
enum class Op : uint8_t {
  none,
  threadgroup_barrier,
  simdgroup_barrier,
  simd_sum,
  simd_max,
  simd_min,
  simd_shuffle,
  simd_shuffle_xor,
  simd_shuffle_down,
  simd_shuffle_up,
  simd_broadcast,
  simd_broadcast_first,
  simd_prefix_inclusive_sum,
  simd_prefix_exclusive_sum,
  simd_any,
  simd_all,
  simdgroup_load,
  simdgroup_store,
  simdgroup_multiply,
  simdgroup_multiply_accumulate,
  // CUDA (tests/cuda/cuda_emulation.h)
  syncthreads,
  syncwarp,
  shfl_sync,
  shfl_xor_sync,
  shfl_down_sync,
  shfl_up_sync,
  mma_m16n8k16_f16,
  mma_m16n8k16_bf16,
  ldmatrix_x4,
  ldmatrix_x4_trans,
  ldmatrix_x2,
  ldmatrix_x2_trans,
};

inline const char* op_name(Op op) {
  static const char* const names[] = {
      "none",           "threadgroup_barrier",       "simdgroup_barrier",         "simd_sum",
      "simd_max",       "simd_min",                  "simd_shuffle",              "simd_shuffle_xor",
      "simd_shuffle_down", "simd_shuffle_up",        "simd_broadcast",            "simd_broadcast_first",
      "simd_prefix_inclusive_sum", "simd_prefix_exclusive_sum", "simd_any",        "simd_all",
      "simdgroup_load", "simdgroup_store",           "simdgroup_multiply",        "simdgroup_multiply_accumulate",
      "__syncthreads",  "__syncwarp",                "__shfl_sync",               "__shfl_xor_sync",
      "__shfl_down_sync", "__shfl_up_sync",          "mma_m16n8k16<__half>",      "mma_m16n8k16<__nv_bfloat16>",
      "ldmatrix_x4",    "ldmatrix_x4_trans",         "ldmatrix_x2",               "ldmatrix_x2_trans",
  };
  static_assert(sizeof(names) / sizeof(names[0]) == size_t(Op::ldmatrix_x2_trans) + 1, "a name for every Op");
  return names[size_t(op)];
}

inline bool is_matrix_op(Op op) { return op >= Op::simdgroup_load && op <= Op::simdgroup_multiply_accumulate; }

// What a simdgroup-matrix operation passes to its uniformity check (no padding: compared as
// bytes). `hash` digests the matrix operands.
struct MatrixArgs {
  uint64_t ptr, elements_per_row, origin_x, origin_y, transpose, hash;
};
static_assert(sizeof(MatrixArgs) <= kSlotBytes, "MatrixArgs must fit a slot");

enum class State : uint8_t { running, at_barrier, in_simd, done };

// Thrown inside a GPU thread to unwind it once its launch has failed.
struct Cancelled {};

// ---- Fiber contexts -----------------------------------------------------------------------

#if defined(MSL_EMU_SWITCH_X86_64) || defined(MSL_EMU_SWITCH_AARCH64)

// A suspended fiber is its stack pointer: the switch pushes the callee-saved registers and the
// floating-point control state on the old stack and pops them from the new one.
struct Context {
  void* sp = nullptr;
};

}  // namespace detail
}  // namespace msl_emu

extern "C" {
// msl_emu_switch(save, to): saves the current context, stores its stack pointer in *save and
// resumes the context whose stack pointer is `to`.
__attribute__((visibility("hidden"))) void msl_emu_switch(void** save, void* to);
// First code of a new fiber: calls fn(arg) from registers set up by the context's initial frame.
__attribute__((visibility("hidden"))) void msl_emu_fiber_start();
}

#if defined(MSL_EMU_SWITCH_X86_64)
// x86-64 System V: callee-saved rbx rbp r12-r15, plus MXCSR and the x87 control word. The
// routines live in a COMDAT group so that several translation units may include this header.
__asm__(R"(
    .pushsection .text.msl_emu_switch,"axG",@progbits,msl_emu_switch,comdat
    .globl msl_emu_switch
    .hidden msl_emu_switch
    .type msl_emu_switch,@function
    .p2align 4
msl_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size msl_emu_switch, .-msl_emu_switch

    .globl msl_emu_fiber_start
    .hidden msl_emu_fiber_start
    .type msl_emu_fiber_start,@function
    .p2align 4
msl_emu_fiber_start:
    .cfi_startproc
    .cfi_undefined rip
    movq %r12, %rdi
    andq $-16, %rsp
    callq *%r13
    ud2
    .cfi_endproc
    .size msl_emu_fiber_start, .-msl_emu_fiber_start
    .popsection
)");
#else
// AArch64 AAPCS64: callee-saved x19-x28, frame pointer x29, link register x30, d8-d15, plus
// FPCR. sp is the context itself.
__asm__(R"(
    .pushsection .text.msl_emu_switch,"axG",%progbits,msl_emu_switch,comdat
    .globl msl_emu_switch
    .hidden msl_emu_switch
    .type msl_emu_switch,%function
    .p2align 4
msl_emu_switch:
    sub sp, sp, #176
    stp x19, x20, [sp, #0]
    stp x21, x22, [sp, #16]
    stp x23, x24, [sp, #32]
    stp x25, x26, [sp, #48]
    stp x27, x28, [sp, #64]
    stp x29, x30, [sp, #80]
    stp d8, d9, [sp, #96]
    stp d10, d11, [sp, #112]
    stp d12, d13, [sp, #128]
    stp d14, d15, [sp, #144]
    mrs x9, fpcr
    str x9, [sp, #160]
    mov x9, sp
    str x9, [x0]
    mov sp, x1
    ldp x19, x20, [sp, #0]
    ldp x21, x22, [sp, #16]
    ldp x23, x24, [sp, #32]
    ldp x25, x26, [sp, #48]
    ldp x27, x28, [sp, #64]
    ldp x29, x30, [sp, #80]
    ldp d8, d9, [sp, #96]
    ldp d10, d11, [sp, #112]
    ldp d12, d13, [sp, #128]
    ldp d14, d15, [sp, #144]
    ldr x9, [sp, #160]
    msr fpcr, x9
    add sp, sp, #176
    ret
    .size msl_emu_switch, .-msl_emu_switch

    .globl msl_emu_fiber_start
    .hidden msl_emu_fiber_start
    .type msl_emu_fiber_start,%function
    .p2align 4
msl_emu_fiber_start:
    .cfi_startproc
    .cfi_undefined x30
    mov x0, x19
    blr x20
    brk #0
    .cfi_endproc
    .size msl_emu_fiber_start, .-msl_emu_fiber_start
    .popsection
)");
#endif

namespace msl_emu {
namespace detail {

// Prepares `ctx` to call fn(arg) on the stack [lo, lo + size) when first switched to.
inline void context_init(Context& ctx, void* lo, size_t size, void (*fn)(void*), void* arg) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(lo) + size) & ~uintptr_t(15);
#if defined(MSL_EMU_SWITCH_X86_64)
  // Initial frame, lowest address first: MXCSR and x87 control word, r15 r14 r13 r12 rbx rbp,
  // return address. The new fiber inherits the caller's floating-point modes.
  uint64_t* f = reinterpret_cast<uint64_t*>(top) - 8;
  uint32_t mxcsr = __builtin_ia32_stmxcsr();
  uint16_t fpucw;
  __asm__ volatile("fnstcw %0" : "=m"(fpucw));
  f[0] = uint64_t(mxcsr) | (uint64_t(fpucw) << 32);
  f[1] = 0;                                                  // r15
  f[2] = 0;                                                  // r14
  f[3] = reinterpret_cast<uint64_t>(fn);                     // r13: entry point
  f[4] = reinterpret_cast<uint64_t>(arg);                    // r12: its argument
  f[5] = 0;                                                  // rbx
  f[6] = 0;                                                  // rbp: ends frame-pointer walks
  f[7] = reinterpret_cast<uint64_t>(&msl_emu_fiber_start);  // `ret` lands here
  ctx.sp = f;
#else
  // Initial frame: x19 (argument), x20 (entry point), x21-x28, x29 = 0, x30 = start routine,
  // d8-d15, FPCR (inherited).
  uint64_t* f = reinterpret_cast<uint64_t*>(top - 176);
  std::memset(f, 0, 176);
  uint64_t fpcr;
  __asm__ volatile("mrs %0, fpcr" : "=r"(fpcr));
  f[0] = reinterpret_cast<uint64_t>(arg);
  f[1] = reinterpret_cast<uint64_t>(fn);
  f[11] = reinterpret_cast<uint64_t>(&msl_emu_fiber_start);
  f[20] = fpcr;
  ctx.sp = f;
#endif
}

inline void context_switch(Context& save, Context& to) { msl_emu_switch(&save.sp, to.sp); }

#else  // ucontext

struct Context {
  ucontext_t uc;
};

inline void context_entry(unsigned fn_lo, unsigned fn_hi, unsigned arg_lo, unsigned arg_hi) {
  auto fn = reinterpret_cast<void (*)(void*)>((uintptr_t(fn_hi) << 16 << 16) | fn_lo);
  void* arg = reinterpret_cast<void*>((uintptr_t(arg_hi) << 16 << 16) | arg_lo);
  fn(arg);
}

inline void context_init(Context& ctx, void* lo, size_t size, void (*fn)(void*), void* arg) {
  getcontext(&ctx.uc);
  ctx.uc.uc_stack.ss_sp = lo;
  ctx.uc.uc_stack.ss_size = size;
  ctx.uc.uc_link = nullptr;
  const uintptr_t f = reinterpret_cast<uintptr_t>(fn), a = reinterpret_cast<uintptr_t>(arg);
  makecontext(&ctx.uc, reinterpret_cast<void (*)()>(&context_entry), 4, unsigned(f), unsigned(f >> 16 >> 16),
              unsigned(a), unsigned(a >> 16 >> 16));
}

inline void context_switch(Context& save, Context& to) { swapcontext(&save.uc, &to.uc); }

#endif

// AddressSanitizer keeps its own idea of the current stack; tell it about every switch.
#if defined(MSL_EMU_ASAN)
inline void asan_start_switch(void** fake_stack, const void* lo, size_t size) {
  __sanitizer_start_switch_fiber(fake_stack, lo, size);
}
inline void asan_finish_switch(void* fake_stack, const void** old_lo, size_t* old_size) {
  __sanitizer_finish_switch_fiber(fake_stack, old_lo, old_size);
}
inline void asan_unpoison(void* p, size_t n) { ASAN_UNPOISON_MEMORY_REGION(p, n); }
#else
inline void asan_start_switch(void**, const void*, size_t) {}
inline void asan_finish_switch(void*, const void**, size_t*) {}
inline void asan_unpoison(void*, size_t) {}
#endif

// ---- Fiber stacks -------------------------------------------------------------------------

// Fiber stacks of the calling OS thread, kept for later threadgroups and launches. Each has an
// inaccessible guard page below it, so an overflow faults instead of corrupting a neighbour.
class StackPool {
 public:
  struct Stack {
    void* mapping = nullptr;
    size_t mapping_bytes = 0;
    void* lo = nullptr;  // usable range [lo, lo + bytes)
    size_t bytes = 0;
  };

  StackPool() = default;
  StackPool(const StackPool&) = delete;
  StackPool& operator=(const StackPool&) = delete;
  ~StackPool() {
    for (Stack& s : stacks_) release(s);
  }

  // Makes sure there are at least n stacks; false if memory ran out.
  bool reserve(size_t n) {
    while (stacks_.size() < n) {
      Stack s;
      if (!allocate(s)) return false;
      stacks_.push_back(s);
    }
    return true;
  }
  Stack& operator[](size_t i) { return stacks_[i]; }

 private:
  static bool allocate(Stack& s) {
    const size_t bytes = MSL_EMU_FIBER_STACK_BYTES;
#if defined(__unix__) || defined(__APPLE__)
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    const size_t usable = (bytes + page - 1) / page * page;
#if defined(MAP_NORESERVE)
    const int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;  // pages are touched lazily
#else
    const int flags = MAP_PRIVATE | MAP_ANONYMOUS;
#endif
    void* m = mmap(nullptr, usable + page, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (m == MAP_FAILED) return false;
    mprotect(m, page, PROT_NONE);
    s.mapping = m;
    s.mapping_bytes = usable + page;
    s.lo = static_cast<char*>(m) + page;
    s.bytes = usable;
#else
    s.mapping = std::malloc(bytes);
    if (!s.mapping) return false;
    s.mapping_bytes = bytes;
    s.lo = s.mapping;
    s.bytes = bytes;
#endif
    return true;
  }
  static void release(Stack& s) {
#if defined(__unix__) || defined(__APPLE__)
    munmap(s.mapping, s.mapping_bytes);
#else
    std::free(s.mapping);
#endif
  }

  std::vector<Stack> stacks_;
};

inline thread_local StackPool tls_stacks;

// ---- Threadgroup state --------------------------------------------------------------------

struct Group;

// One GPU thread.
struct Lane {
  ThreadIds ids{};
  Group* group = nullptr;
  uint32_t collectives = 0;  // simd collectives entered so far (selects the exchange buffer)
  // What the thread is doing; read by other threads only to describe a deadlock.
  std::atomic<State> state{State::running};
  std::atomic<Op> waits_in{Op::none};
  // Mode::fibers.
  Context ctx{};
  StackPool::Stack* stack = nullptr;
  bool started = false;
  void* asan_fake_stack = nullptr;
};

// One simdgroup: the exchange slots of its collectives and their synchronization.
//
// A collective writes each lane's value into slot[b][lane] and waits until the 32 lanes have
// arrived; every lane then reads the values it needs. b alternates with each collective
// (lane.collectives & 1): a lane can only write to b again two collectives later, after every
// lane has arrived at the collective in between and has therefore finished reading b.
struct SimdState {
  uint32_t arrived = 0;
  uint64_t generation = 0;  // Mode::threads: completed collectives
  std::mutex mu;            // Mode::threads
  std::condition_variable cv;
  alignas(16) unsigned char slot[2][simd_width][kSlotBytes];
  Op op[2][simd_width];
  uint8_t bytes[2][simd_width];
};

// The threadgroup being run.
struct Group {
  uint32_t index = 0;
  uint32_t n = 0;
  const LaunchOptions* opts;
  Mode mode = Mode::fibers;
  bool strict = true;
  const std::function<void(const ThreadIds&)>* body = nullptr;
  std::unique_ptr<Lane[]> lanes;
  std::unique_ptr<SimdState[]> simd;

  // threadgroup_barrier
  uint32_t bar_arrived = 0;
  uint64_t bar_generation = 0;
  std::mutex bar_mu;  // Mode::threads
  std::condition_variable bar_cv;

  // Mode::threads deadlock detection: the low 32 bits count threads that wait without having
  // been released plus threads that have returned, the high 32 bits the returned ones alone.
  // When the low count reaches n no thread can make progress. Updated with relaxed atomics so
  // that ThreadSanitizer sees no synchronization through it (which would hide data races).
  std::atomic<uint64_t> stuck{0};

  // Failure: the first error wins; `cancel` makes every thread unwind at its next wait.
  std::atomic<bool> cancel{false};
  std::mutex err_mu;
  std::string error;

  // Mode::fibers scheduler.
  Context sched_ctx{};
  void* sched_fake_stack = nullptr;
  const void* sched_stack_lo = nullptr;
  size_t sched_stack_bytes = 0;
  uint32_t done = 0;

  Group(uint32_t threads, const LaunchOptions& o, Mode m, const std::function<void(const ThreadIds&)>* b)
      : n(threads), opts(&o), mode(m), strict(o.strict), body(b), lanes(new Lane[threads]),
        simd(new SimdState[threads / simd_width]) {}

  const Dialect& words() const { return *opts->dialect; }
  std::string label() const {
    return opts->group_label ? opts->group_label(index) : words().group + (" " + std::to_string(index));
  }

  // Resets the per-threadgroup state for threadgroup `g`.
  void begin(uint32_t g) {
    index = g;
    for (uint32_t i = 0; i < n; ++i) {
      Lane& l = lanes[i];
      l.ids = ThreadIds{g, i, i % simd_width, i / simd_width};
      l.group = this;
      l.collectives = 0;
      l.state.store(State::running, std::memory_order_relaxed);
      l.waits_in.store(Op::none, std::memory_order_relaxed);
      l.started = false;
      l.asan_fake_stack = nullptr;
    }
    for (uint32_t s = 0; s < n / simd_width; ++s) {
      simd[s].arrived = 0;
      simd[s].generation = 0;
    }
    bar_arrived = 0;
    bar_generation = 0;
    stuck.store(0, std::memory_order_relaxed);
    cancel.store(false, std::memory_order_relaxed);
    error.clear();
    done = 0;
  }

  // ---- Failure ----

  void record_error(const std::string& what) {
    std::lock_guard<std::mutex> lk(err_mu);
    if (error.empty()) error = label() + ": " + what;
  }

  // Makes every waiting thread unwind. Must be called without holding any of the group's locks.
  void cancel_all() {
    cancel.store(true, std::memory_order_relaxed);
    if (mode != Mode::threads) return;  // fibers: the scheduler resumes the waiting fibers
    { std::lock_guard<std::mutex> lk(bar_mu); }
    bar_cv.notify_all();
    for (uint32_t s = 0; s < n / simd_width; ++s) {
      { std::lock_guard<std::mutex> lk(simd[s].mu); }
      simd[s].cv.notify_all();
    }
  }

  [[noreturn]] void fail(const std::string& what) {
    record_error(what);
    cancel_all();
    throw Cancelled{};
  }

  void check_cancel() const {
    if (cancel.load(std::memory_order_relaxed)) throw Cancelled{};
  }

  // "deadlock: threads 0-63 at threadgroup_barrier, threads 64-127 returned (hint)".
  std::string describe_deadlock() const {
    auto activity = [&](uint32_t i) -> std::string {
      switch (lanes[i].state.load(std::memory_order_relaxed)) {
        case State::done: return "returned";
        case State::running: return "running";
        case State::at_barrier: return std::string("at ") + op_name(lanes[i].waits_in.load(std::memory_order_relaxed));
        case State::in_simd: return std::string("in ") + op_name(lanes[i].waits_in.load(std::memory_order_relaxed));
      }
      return "?";
    };
    std::string msg = "deadlock:";
    int ranges = 0;
    for (uint32_t i = 0; i < n;) {
      const std::string what = activity(i);
      uint32_t j = i + 1;
      while (j < n && activity(j) == what) ++j;
      if (++ranges > 16) {
        msg += ", ...";
        break;
      }
      msg += ranges > 1 ? ", " : " ";
      msg += j - i == 1 ? "thread " + std::to_string(i) : "threads " + std::to_string(i) + "-" + std::to_string(j - 1);
      msg += " " + what;
      i = j;
    }
    // Name the rule that was broken.
    for (uint32_t i = 0; i < n; ++i) {
      if (lanes[i].state.load(std::memory_order_relaxed) == State::at_barrier) {
        msg += std::string(" (") + op_name(lanes[i].waits_in.load(std::memory_order_relaxed)) +
               " must be reached by every thread of the " + words().group +
               ": is it in divergent control flow, or after an early return?)";
        break;
      }
    }
    for (uint32_t sg = 0; sg < n / simd_width; ++sg) {
      bool some = false, all = true;
      for (uint32_t l = 0; l < simd_width; ++l) {
        const bool in = lanes[sg * simd_width + l].state.load(std::memory_order_relaxed) == State::in_simd;
        some |= in;
        all &= in;
      }
      if (some && !all) {
        msg += std::string(" (") + words().collectives + " must be reached by all 32 lanes of a " + words().simdgroup +
               "; " + words().simdgroup + " " + std::to_string(sg) + " is split)";
        break;
      }
    }
    return msg;
  }

  void report_deadlock() {
    record_error(describe_deadlock());
    cancel_all();
  }

  // ---- Mode::threads accounting ----

  // The calling thread is about to wait: true if now every thread waits or has returned.
  bool block_one() { return uint32_t(stuck.fetch_add(1, std::memory_order_relaxed)) + 1 == n; }
  void release(uint32_t k) { stuck.fetch_sub(k, std::memory_order_relaxed); }
  void thread_exited() {
    const uint64_t old = stuck.fetch_add(1 + (uint64_t(1) << 32), std::memory_order_relaxed);
    const uint32_t stuck_now = uint32_t(old) + 1, exited = uint32_t(old >> 32) + 1;
    if (stuck_now == n && exited < n && !cancel.load(std::memory_order_relaxed)) report_deadlock();
  }

  // Waits on cv until pred() holds, or fails the launch if that can never happen.
  template <class Pred> void wait_threads(std::unique_lock<std::mutex>& lk, std::condition_variable& cv, Pred pred) {
    if (block_one()) {
      lk.unlock();
      report_deadlock();
      throw Cancelled{};
    }
    cv.wait(lk, [&] { return pred() || cancel.load(std::memory_order_relaxed); });
    check_cancel();
  }

  // ---- Mode::fibers ----

  // Suspends the calling fiber until the scheduler resumes it.
  void fiber_yield(Lane& me) {
    asan_start_switch(&me.asan_fake_stack, sched_stack_lo, sched_stack_bytes);
    context_switch(me.ctx, sched_ctx);
    asan_finish_switch(me.asan_fake_stack, &sched_stack_lo, &sched_stack_bytes);
  }

  // ---- Synchronization ----

  // A barrier of the whole group; `op` names it in reports.
  void barrier(Lane& me, Op op) {
    check_cancel();
    if (mode == Mode::fibers) {
      if (++bar_arrived == n) {
        bar_arrived = 0;
        for (uint32_t i = 0; i < n; ++i)
          if (lanes[i].state.load(std::memory_order_relaxed) == State::at_barrier)
            lanes[i].state.store(State::running, std::memory_order_relaxed);
        return;
      }
      me.waits_in.store(op, std::memory_order_relaxed);
      me.state.store(State::at_barrier, std::memory_order_relaxed);
      fiber_yield(me);
      check_cancel();
      return;
    }
    std::unique_lock<std::mutex> lk(bar_mu);
    if (++bar_arrived == n) {
      bar_arrived = 0;
      ++bar_generation;
      release(n - 1);
      lk.unlock();
      bar_cv.notify_all();
      return;
    }
    const uint64_t gen = bar_generation;
    me.waits_in.store(op, std::memory_order_relaxed);
    me.state.store(State::at_barrier, std::memory_order_relaxed);
    wait_threads(lk, bar_cv, [&] { return bar_generation != gen; });
    me.state.store(State::running, std::memory_order_relaxed);
  }

  // Checks a completed collective: every lane called the same operation with the same value
  // size, and (strict) a simdgroup-matrix operation with the same arguments. "" if fine.
  std::string check_collective(const SimdState& s, unsigned b, uint32_t sg) const {
    const std::string where = words().simdgroup + (" " + std::to_string(sg)) + ": ";
    for (uint32_t l = 1; l < simd_width; ++l) {
      if (s.op[b][l] != s.op[b][0] || s.bytes[b][l] != s.bytes[b][0])
        return where + "lanes reached different " + words().collectives + " at the same time (lane 0: " +
               op_name(s.op[b][0]) + ", lane " + std::to_string(l) + ": " + op_name(s.op[b][l]) +
               "; every lane must call the same collectives in the same order)";
    }
    if (!strict || !is_matrix_op(s.op[b][0])) return "";
    for (uint32_t l = 1; l < simd_width; ++l) {
      if (std::memcmp(s.slot[b][l], s.slot[b][0], sizeof(MatrixArgs)) != 0) {
        MatrixArgs a0, al;
        std::memcpy(&a0, s.slot[b][0], sizeof a0);
        std::memcpy(&al, s.slot[b][l], sizeof al);
        const Op op = s.op[b][0];
        auto show = [op](const MatrixArgs& a) {
          char buf[192];
          if (op == Op::simdgroup_load || op == Op::simdgroup_store)
            std::snprintf(buf, sizeof buf, "%s=%#llx elements_per_row=%llu origin=(%llu, %llu) transpose=%llu",
                          op == Op::simdgroup_load ? "src" : "dst", (unsigned long long)a.ptr,
                          (unsigned long long)a.elements_per_row, (unsigned long long)a.origin_x,
                          (unsigned long long)a.origin_y, (unsigned long long)a.transpose);
          else
            buf[0] = 0;
          std::string r = buf;
          if (op != Op::simdgroup_load) {
            std::snprintf(buf, sizeof buf, "%smatrix digest %#llx", r.empty() ? "" : " ", (unsigned long long)a.hash);
            r += buf;
          }
          return r;
        };
        return where + op_name(s.op[b][0]) + " called with non-uniform arguments (lane 0: " + show(a0) +
               "; lane " + std::to_string(l) + ": " + show(al) + ")";
      }
    }
    return "";
  }

  // The core of every simd collective: deposits `bytes` bytes at `value` in the calling lane's
  // slot, waits for all 32 lanes of its simdgroup and returns the slot row (lane j's value at
  // row + j * kSlotBytes).
  const unsigned char* simd_exchange(Lane& me, Op op, const void* value, size_t bytes) {
    check_cancel();
    SimdState& s = simd[me.ids.simdgroup];
    const unsigned b = me.collectives++ & 1u;
    if (bytes) std::memcpy(s.slot[b][me.ids.lane], value, bytes);
    s.op[b][me.ids.lane] = op;
    s.bytes[b][me.ids.lane] = uint8_t(bytes);
    if (mode == Mode::fibers) {
      if (++s.arrived == simd_width) {
        s.arrived = 0;
        const std::string problem = check_collective(s, b, me.ids.simdgroup);
        if (!problem.empty()) fail(problem);
        Lane* sg = &lanes[me.ids.simdgroup * simd_width];
        for (uint32_t l = 0; l < simd_width; ++l)
          if (sg[l].state.load(std::memory_order_relaxed) == State::in_simd)
            sg[l].state.store(State::running, std::memory_order_relaxed);
      } else {
        me.waits_in.store(op, std::memory_order_relaxed);
        me.state.store(State::in_simd, std::memory_order_relaxed);
        fiber_yield(me);
        check_cancel();
      }
      return s.slot[b][0];
    }
    std::unique_lock<std::mutex> lk(s.mu);
    if (++s.arrived == simd_width) {
      s.arrived = 0;
      ++s.generation;
      release(simd_width - 1);
      const std::string problem = check_collective(s, b, me.ids.simdgroup);
      if (!problem.empty()) {
        record_error(problem);
        cancel.store(true, std::memory_order_relaxed);
      }
      lk.unlock();
      s.cv.notify_all();
      if (!problem.empty()) {
        cancel_all();
        throw Cancelled{};
      }
      return s.slot[b][0];
    }
    const uint64_t gen = s.generation;
    me.waits_in.store(op, std::memory_order_relaxed);
    me.state.store(State::in_simd, std::memory_order_relaxed);
    wait_threads(lk, s.cv, [&] { return s.generation != gen; });
    me.state.store(State::running, std::memory_order_relaxed);
    return s.slot[b][0];
  }

  // ---- Running a thread's body ----

  void run_body(Lane& me) {
    try {
      (*body)(me.ids);
    } catch (const Cancelled&) {
    } catch (const std::exception& e) {
      record_error("thread " + std::to_string(me.ids.lid) + ": exception: " + e.what());
      cancel_all();
    } catch (...) {
      record_error("thread " + std::to_string(me.ids.lid) + ": unknown exception");
      cancel_all();
    }
  }
};

inline thread_local Lane* tls_current = nullptr;
inline thread_local bool tls_in_launch = false;

inline Lane& current(const char* what) {
  Lane* l = tls_current;
  if (!l) throw std::logic_error(std::string(what) + " called outside a kernel launch");
  return *l;
}

// ---- Mode::fibers -------------------------------------------------------------------------

[[noreturn]] inline void fiber_main(void* arg) {
  Lane& me = *static_cast<Lane*>(arg);
  Group& g = *me.group;
  asan_finish_switch(nullptr, &g.sched_stack_lo, &g.sched_stack_bytes);
  g.run_body(me);
  me.state.store(State::done, std::memory_order_relaxed);
  ++g.done;
  // Leave for good: nothing on this stack is needed any more (its frames have all returned).
  asan_start_switch(nullptr, g.sched_stack_lo, g.sched_stack_bytes);
  context_switch(me.ctx, g.sched_ctx);
  std::abort();  // never resumed
}

inline std::string run_fibers(Group& g) {
  if (!tls_stacks.reserve(g.n)) return g.label() + ": cannot allocate fiber stacks";
  for (uint32_t i = 0; i < g.n; ++i) {
    Lane& l = g.lanes[i];
    l.stack = &tls_stacks[i];
    asan_unpoison(l.stack->lo, l.stack->bytes);  // stale redzones of an earlier threadgroup
    context_init(l.ctx, l.stack->lo, l.stack->bytes, &fiber_main, &l);
  }
  auto resume = [&](Lane& l) {
    l.started = true;
    tls_current = &l;
    asan_start_switch(&g.sched_fake_stack, l.stack->lo, l.stack->bytes);
    context_switch(g.sched_ctx, l.ctx);
    asan_finish_switch(g.sched_fake_stack, nullptr, nullptr);
    tls_current = nullptr;
  };
  // Round robin: each fiber runs until it waits or returns. A pass that resumes nothing while
  // some fiber has not returned is a deadlock.
  while (g.done < g.n && !g.cancel.load(std::memory_order_relaxed)) {
    bool ran = false;
    for (uint32_t i = 0; i < g.n && !g.cancel.load(std::memory_order_relaxed); ++i) {
      Lane& l = g.lanes[i];
      if (l.state.load(std::memory_order_relaxed) == State::running) {
        resume(l);
        ran = true;
      }
    }
    if (!ran && g.done < g.n) g.report_deadlock();
  }
  if (g.cancel.load(std::memory_order_relaxed)) {
    // Unwind the suspended fibers on their own stacks: each resumes inside its wait, sees the
    // cancellation and throws Cancelled up to fiber_main.
    for (uint32_t i = 0; i < g.n; ++i) {
      Lane& l = g.lanes[i];
      if (l.state.load(std::memory_order_relaxed) == State::done) continue;
      if (!l.started) {
        l.state.store(State::done, std::memory_order_relaxed);
        continue;
      }
      l.state.store(State::running, std::memory_order_relaxed);
      resume(l);
    }
  }
  std::lock_guard<std::mutex> lk(g.err_mu);
  return g.error;
}

// ---- Mode::threads ------------------------------------------------------------------------

inline std::string run_threads(Group& g) {
  std::vector<std::thread> threads;
  threads.reserve(g.n);
  for (uint32_t i = 0; i < g.n; ++i) {
    try {
      threads.emplace_back([&g, i] {
        Lane& me = g.lanes[i];
        tls_current = &me;
        g.run_body(me);
        me.state.store(State::done, std::memory_order_relaxed);
        tls_current = nullptr;
        g.thread_exited();
      });
    } catch (const std::system_error& e) {
      g.record_error("cannot start thread " + std::to_string(i) + ": " + e.what());
      g.cancel_all();
      break;
    }
  }
  for (std::thread& t : threads) t.join();
  std::lock_guard<std::mutex> lk(g.err_mu);
  return g.error;
}

// ---- Value exchange helpers for the collectives -------------------------------------------

template <class T> struct Exchanged {
  const unsigned char* row;
  uint32_t lane;
  T at(uint32_t j) const {
    T v;
    std::memcpy(static_cast<void*>(&v), row + size_t(j) * kSlotBytes, sizeof(T));
    return v;
  }
};

template <class T> inline Exchanged<T> exchange(Op op, const T& v) {
  static_assert(std::is_trivially_copyable<T>::value, "simd collectives need trivially copyable values");
  static_assert(sizeof(T) <= kSlotBytes, "value too large for a simd collective");
  Lane& me = current(op_name(op));
  return Exchanged<T>{me.group->simd_exchange(me, op, &v, sizeof(T)), me.ids.lane};
}

// Reduction in a fixed order: pairs (i, i + 16), then (i, i + 8), ... - the value lane 0 gets
// from the usual `v = f(v, simd_shuffle_down(v, offset))` loop with offset = 16, 8, 4, 2, 1.
template <class T, class F> inline T tree_reduce(const Exchanged<T>& x, F f) {
  T t[simd_width];
  for (uint32_t j = 0; j < simd_width; ++j) t[j] = x.at(j);
  for (uint32_t w = simd_width / 2; w >= 1; w /= 2)
    for (uint32_t j = 0; j < w; ++j) t[j] = f(t[j], t[j + w]);
  return t[0];
}

inline uint64_t fnv1a(const void* p, size_t n, uint64_t h = 1469598103934665603ull) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  for (size_t i = 0; i < n; ++i) h = (h ^ c[i]) * 1099511628211ull;
  return h;
}

}  // namespace detail

inline std::string launch(uint32_t groups, uint32_t threads_per_group,
                          const std::function<void(const ThreadIds&)>& body, const LaunchOptions& options) {
  if (threads_per_group == 0 || threads_per_group % simd_width != 0 || threads_per_group > max_threads_per_group)
    return "launch: threads_per_group = " + std::to_string(threads_per_group) +
           " must be a multiple of 32 between 32 and 1024";
  if (detail::tls_current || detail::tls_in_launch)
    return "launch: called from inside a running launch (nested launches are not supported)";
  if (!body) return "launch: empty kernel body";
  Mode mode = options.mode;
#if defined(MSL_EMU_TSAN)
  mode = Mode::threads;  // ThreadSanitizer cannot follow the fiber switches
#endif
  struct InLaunch {
    InLaunch() { detail::tls_in_launch = true; }
    ~InLaunch() { detail::tls_in_launch = false; }
  } in_launch;
  detail::Group g(threads_per_group, options, mode, &body);
  for (uint32_t i = 0; i < groups; ++i) {
    if (options.before_group) options.before_group(i);
    g.begin(i);
    std::string err = mode == Mode::fibers ? detail::run_fibers(g) : detail::run_threads(g);
    if (!err.empty()) return err;
  }
  return "";
}

}  // namespace msl_emu

#ifndef MSL_EMU_CORE_ONLY

// ---------------------------------------------------------------------------------------------
// Barriers, simd collectives, simdgroup matrices
// ---------------------------------------------------------------------------------------------

namespace metal {

// Waits until every thread of the threadgroup has reached a threadgroup_barrier. All memory
// effects before it are visible after it (the flags are accepted and not needed).
inline void threadgroup_barrier(mem_flags) {
  msl_emu::detail::Lane& me = msl_emu::detail::current("threadgroup_barrier");
  me.group->barrier(me, msl_emu::detail::Op::threadgroup_barrier);
}

// Waits until the 32 lanes of the simdgroup have reached a simdgroup_barrier.
inline void simdgroup_barrier(mem_flags) {
  msl_emu::detail::Lane& me = msl_emu::detail::current("simdgroup_barrier");
  me.group->simd_exchange(me, msl_emu::detail::Op::simdgroup_barrier, nullptr, 0);
}

// ---- simd collectives -----------------------------------------------------------------------
//
// Every lane of the simdgroup must call the same collectives in the same order (as on the GPU,
// where the 32 lanes execute them together). T: any trivially copyable type up to 64 bytes.
// Reductions use the fixed order of msl_emu::detail::tree_reduce, so every lane gets the same bits.

template <class T> inline T simd_sum(T v) {
  auto x = msl_emu::detail::exchange(msl_emu::detail::Op::simd_sum, v);
  return msl_emu::detail::tree_reduce(x, [](const T& a, const T& b) { return T(a + b); });
}
template <class T> inline T simd_max(T v) {
  auto x = msl_emu::detail::exchange(msl_emu::detail::Op::simd_max, v);
  return msl_emu::detail::tree_reduce(x, [](const T& a, const T& b) { return T(max(a, b)); });
}
template <class T> inline T simd_min(T v) {
  auto x = msl_emu::detail::exchange(msl_emu::detail::Op::simd_min, v);
  return msl_emu::detail::tree_reduce(x, [](const T& a, const T& b) { return T(min(a, b)); });
}

// Prefix sums in lane order: lane i gets v0 + ... + vi (inclusive) or v0 + ... + v(i-1).
template <class T> inline T simd_prefix_inclusive_sum(T v) {
  auto x = msl_emu::detail::exchange(msl_emu::detail::Op::simd_prefix_inclusive_sum, v);
  T s = x.at(0);
  for (uint32_t j = 1; j <= x.lane; ++j) s = T(s + x.at(j));
  return s;
}
template <class T> inline T simd_prefix_exclusive_sum(T v) {
  auto x = msl_emu::detail::exchange(msl_emu::detail::Op::simd_prefix_exclusive_sum, v);
  T s = T(0);
  for (uint32_t j = 0; j < x.lane; ++j) s = T(s + x.at(j));
  return s;
}

inline bool simd_any(bool v) {
  auto x = msl_emu::detail::exchange(msl_emu::detail::Op::simd_any, v);
  for (uint32_t j = 0; j < msl_emu::simd_width; ++j)
    if (x.at(j)) return true;
  return false;
}
inline bool simd_all(bool v) {
  auto x = msl_emu::detail::exchange(msl_emu::detail::Op::simd_all, v);
  for (uint32_t j = 0; j < msl_emu::simd_width; ++j)
    if (!x.at(j)) return false;
  return true;
}

// Shuffles: a source lane outside 0..31 yields the calling lane's own value (MSL's rule for
// simd_shuffle_down/up past the end).
template <class T> inline T simd_shuffle(T v, uint lane) {
  auto x = msl_emu::detail::exchange(msl_emu::detail::Op::simd_shuffle, v);
  return lane < msl_emu::simd_width ? x.at(lane) : v;
}
template <class T> inline T simd_shuffle_xor(T v, uint mask) {
  auto x = msl_emu::detail::exchange(msl_emu::detail::Op::simd_shuffle_xor, v);
  const uint src = x.lane ^ mask;
  return src < msl_emu::simd_width ? x.at(src) : v;
}
template <class T> inline T simd_shuffle_down(T v, uint delta) {
  auto x = msl_emu::detail::exchange(msl_emu::detail::Op::simd_shuffle_down, v);
  const uint src = x.lane + delta;
  return delta < msl_emu::simd_width && src < msl_emu::simd_width ? x.at(src) : v;
}
template <class T> inline T simd_shuffle_up(T v, uint delta) {
  auto x = msl_emu::detail::exchange(msl_emu::detail::Op::simd_shuffle_up, v);
  return delta <= x.lane ? x.at(x.lane - delta) : v;
}
template <class T> inline T simd_broadcast(T v, uint lane) {
  auto x = msl_emu::detail::exchange(msl_emu::detail::Op::simd_broadcast, v);
  return lane < msl_emu::simd_width ? x.at(lane) : v;
}
// Every lane is active at a collective, so the first active lane is lane 0.
template <class T> inline T simd_broadcast_first(T v) {
  auto x = msl_emu::detail::exchange(msl_emu::detail::Op::simd_broadcast_first, v);
  return x.at(0);
}

inline bool simd_is_first() { return msl_emu::detail::current("simd_is_first").ids.lane == 0; }

// ---- simdgroup matrices ---------------------------------------------------------------------
//
// Every lane holds the whole 8x8 matrix (row-major, m.v[row][col]) and computes every
// operation itself; kernels only use the collective operations below with uniform arguments,
// so all copies stay equal. In strict launches this is checked: simdgroup_load/store compare
// pointer, stride, origin and transpose flag across the simdgroup, simdgroup_multiply(_
// accumulate) and simdgroup_store compare a digest of their matrix operands.
//
// simdgroup_load and simdgroup_store always synchronize the simdgroup (as lockstep execution
// does on the GPU); simdgroup_multiply(_accumulate) only in strict launches, for the check.
// simdgroup_store writes each element once: lane l the row-major elements l and l + 32.
//
// Products: for each element, acc = float(c[r][j]) (0 for simdgroup_multiply), then
// acc = acc + float(a[r][k]) * float(b[k][j]) for k = 0..7 in order (a float multiply and a
// float add; a compiler may contract them into an fma where the target has one), rounded to
// the destination type at the end. Chaining tiles along K therefore equals one sequential
// dot product in K order.

template <class T, int Cols, int Rows>
struct simdgroup_matrix {
  static_assert(Cols == 8 && Rows == 8, "the emulation supports 8x8 simdgroup matrices only");
  T v[Rows][Cols];

  simdgroup_matrix() : v{} {}  // zero (the GPU leaves it undefined)
  // MSL: a diagonal matrix with `diag` on the diagonal.
  explicit simdgroup_matrix(T diag) : v{} {
    for (int i = 0; i < Rows && i < Cols; ++i) v[i][i] = diag;
  }
};

typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;

template <class T, int Cols, int Rows>
inline simdgroup_matrix<T, Cols, Rows> make_filled_simdgroup_matrix(const T value) {
  simdgroup_matrix<T, Cols, Rows> m;
  for (int r = 0; r < Rows; ++r)
    for (int c = 0; c < Cols; ++c) m.v[r][c] = value;
  return m;
}

}  // namespace metal

namespace msl_emu {
namespace detail {

template <class T>
inline uint64_t digest(const metal::simdgroup_matrix<T, 8, 8>& m, uint64_t h = 1469598103934665603ull) {
  return fnv1a(m.v, sizeof(m.v), h);
}

// The synchronization (and, strict, the uniformity check) of a matrix operation.
inline void matrix_collective(Op op, const void* ptr, uint64_t elements_per_row, metal::ulong2 origin,
                              bool transpose, uint64_t hash) {
  MatrixArgs a{reinterpret_cast<uint64_t>(ptr), elements_per_row, origin.x, origin.y, uint64_t(transpose), hash};
  exchange(op, a);
}

inline bool strict_launch() {
  Lane* me = tls_current;
  return me && me->group->strict;
}

// d = a * b (+ c when c is not null). The whole product goes into a local accumulator before
// d is written, so d may alias an operand.
template <class TD, class TA, class TB, class TC>
inline void multiply_accumulate(metal::simdgroup_matrix<TD, 8, 8>& d, const metal::simdgroup_matrix<TA, 8, 8>& a,
                                const metal::simdgroup_matrix<TB, 8, 8>& b,
                                const metal::simdgroup_matrix<TC, 8, 8>* c) {
  float acc[8][8];
  for (int r = 0; r < 8; ++r)
    for (int j = 0; j < 8; ++j) acc[r][j] = c ? float(c->v[r][j]) : 0.0f;
  for (int r = 0; r < 8; ++r)
    for (int k = 0; k < 8; ++k) {
      const float ark = float(a.v[r][k]);
      for (int j = 0; j < 8; ++j) acc[r][j] = acc[r][j] + ark * float(b.v[k][j]);
    }
  for (int r = 0; r < 8; ++r)
    for (int j = 0; j < 8; ++j) d.v[r][j] = TD(acc[r][j]);
}

}  // namespace detail
}  // namespace msl_emu

namespace metal {

// Loads the 8x8 window at matrix_origin = (column, row) of a row-major matrix with
// elements_per_row elements per row: m[r][c] = src[(origin.y + r) * elements_per_row +
// origin.x + c], or with transpose_matrix m[r][c] = src[(origin.y + c) * elements_per_row +
// origin.x + r].
template <class T>
inline void simdgroup_load(simdgroup_matrix<T, 8, 8>& m, const msl_emu::detail::identity_t<T>* src,
                           ulong elements_per_row = 8, ulong2 matrix_origin = ulong2(0, 0),
                           bool transpose_matrix = false) {
  msl_emu::detail::matrix_collective(msl_emu::detail::Op::simdgroup_load, src, elements_per_row, matrix_origin,
                                     transpose_matrix, 0);
  const ulong ox = matrix_origin.x, oy = matrix_origin.y;
  for (ulong r = 0; r < 8; ++r)
    for (ulong c = 0; c < 8; ++c)
      m.v[r][c] = transpose_matrix ? src[(oy + c) * elements_per_row + ox + r]
                                   : src[(oy + r) * elements_per_row + ox + c];
}

// Stores m into the 8x8 window at matrix_origin (same conventions as simdgroup_load). Lane l
// writes the row-major elements l and l + 32.
template <class T>
inline void simdgroup_store(const simdgroup_matrix<T, 8, 8>& m, msl_emu::detail::identity_t<T>* dst,
                            ulong elements_per_row = 8, ulong2 matrix_origin = ulong2(0, 0),
                            bool transpose_matrix = false) {
  msl_emu::detail::matrix_collective(msl_emu::detail::Op::simdgroup_store, dst, elements_per_row, matrix_origin,
                                     transpose_matrix, msl_emu::detail::digest(m));
  const ulong ox = matrix_origin.x, oy = matrix_origin.y;
  const uint lane = msl_emu::detail::current("simdgroup_store").ids.lane;
  for (uint e = lane; e < 64; e += msl_emu::simd_width) {
    const ulong r = e / 8, c = e % 8;
    if (transpose_matrix) dst[(oy + c) * elements_per_row + ox + r] = m.v[r][c];
    else dst[(oy + r) * elements_per_row + ox + c] = m.v[r][c];
  }
}

// d = a * b + c. d may be the same object as a, b or c.
template <class TD, class TA, class TB, class TC>
inline void simdgroup_multiply_accumulate(simdgroup_matrix<TD, 8, 8>& d, const simdgroup_matrix<TA, 8, 8>& a,
                                          const simdgroup_matrix<TB, 8, 8>& b, const simdgroup_matrix<TC, 8, 8>& c) {
  using namespace msl_emu::detail;
  if (strict_launch())
    matrix_collective(Op::simdgroup_multiply_accumulate, nullptr, 0, ulong2(0, 0), false,
                      digest(c, digest(b, digest(a))));
  multiply_accumulate(d, a, b, &c);
}

// d = a * b. d may be the same object as a or b.
template <class TD, class TA, class TB>
inline void simdgroup_multiply(simdgroup_matrix<TD, 8, 8>& d, const simdgroup_matrix<TA, 8, 8>& a,
                               const simdgroup_matrix<TB, 8, 8>& b) {
  using namespace msl_emu::detail;
  if (strict_launch()) matrix_collective(Op::simdgroup_multiply, nullptr, 0, ulong2(0, 0), false, digest(b, digest(a)));
  multiply_accumulate(d, a, b, static_cast<const simdgroup_matrix<float, 8, 8>*>(nullptr));
}

}  // namespace metal

// MLX's names for the 16-bit float types.
typedef metal::half float16_t;
typedef metal::bfloat bfloat16_t;

// MSL address spaces and the kernel specifier: nothing to do on a CPU. Defined last, after
// every standard header (they would break names such as std::thread).
#define kernel
#define device
#define constant
#define thread

#endif  // !MSL_EMU_CORE_ONLY
