// Self-test of msl_emulation.h: MSL-style kernels run through msl_emu::launch in both modes and
// checked against plain C++ results, plus the error paths (deadlocks, split collectives,
// non-uniform matrix arguments, exceptions) that must end a launch with a message.
//
//   emu_selftest                 all checks (fibers and threads)
//   emu_selftest --threads-only  only Mode::threads checks (for ThreadSanitizer builds)
//   emu_selftest --race          run a kernel with a missing barrier in Mode::threads: a
//                                ThreadSanitizer build must report a data race
//
// Prints one line per check and "ALL OK" at the end; exits nonzero on a failure.

#include <cfenv>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "msl_emulation.h"

using namespace metal;

// ---------------------------------------------------------------------------------------------
// Kernels, written as MSL (`threadgroup float tile[N];` appears as the filter's `static`).
// ---------------------------------------------------------------------------------------------

// Each lane writes the results of the simd collectives into its row of `out`.
constexpr int kSimdCols = 16;
kernel void simd_ops(device float* out [[buffer(0)]], device int* iout [[buffer(1)]],
                     uint lid [[thread_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]],
                     uint tg [[threadgroup_position_in_grid]], uint tpg [[threads_per_threadgroup]]) {
  const uint gid = tg * tpg + lid;
  const float v = float((gid * 7) % 13) - 4.5f + 0.25f * float(lane);
  device float* o = out + gid * kSimdCols;
  o[0] = simd_sum(v);
  o[1] = simd_max(v);
  o[2] = simd_min(v);
  o[3] = simd_shuffle_xor(v, 5);
  o[4] = simd_shuffle_down(v, 3);
  o[5] = simd_shuffle_up(v, 2);
  o[6] = simd_broadcast(v, 7);
  o[7] = simd_broadcast_first(v);
  o[8] = simd_shuffle(v, 31 - lane);
  const half h = simd_shuffle_xor(half(v), 1);
  o[9] = float(h);
  const float4 f4 = simd_shuffle_down(float4(v, 2 * v, 3 * v, 4 * v), 1);
  o[10] = f4.x + f4.y + f4.z + f4.w;
  o[11] = simd_prefix_exclusive_sum(v);
  o[12] = simd_any(lane == 17) ? 1.0f : 0.0f;
  o[13] = simd_all(lane < 31) ? 1.0f : 0.0f;
  simdgroup_barrier(mem_flags::mem_none);
  const int iv = int(gid % 11) - 5;
  iout[gid * 3 + 0] = simd_sum(iv);
  iout[gid * 3 + 1] = simd_max(iv);
  iout[gid * 3 + 2] = int(simd_min(uint(gid)));
}

// Threads write the tile, wait, read their neighbours; repeated so that a missing second
// barrier (write-after-read) would also show.
kernel void neighbours(device float* out [[buffer(0)]], uint lid [[thread_index_in_threadgroup]],
                       uint tg [[threadgroup_position_in_grid]], uint tpg [[threads_per_threadgroup]]) {
  static float tile[128];  // threadgroup float tile[128];
  float v = float(tg * 1000 + lid);
  for (int round = 0; round < 4; ++round) {
    tile[lid] = v;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    v = tile[(lid + 1) % tpg] + 0.5f * tile[(lid + tpg - 1) % tpg];
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  out[tg * tpg + lid] = v;
}

// C = A * B for 16x16 matrices with 4 simdgroups, one 8x8 tile of C each. A is staged in
// threadgroup memory; B is given transposed (bt[n][k] = B[k][n]) and loaded with
// transpose_matrix; C is stored twice: as is and transposed.
template <class T>
kernel void gemm16(device const float* a [[buffer(0)]], device const T* bt [[buffer(1)]],
                   device float* c [[buffer(2)]], device float* ct [[buffer(3)]],
                   uint lid [[thread_index_in_threadgroup]], uint sg [[simdgroup_index_in_threadgroup]]) {
  static T as[16 * 16];  // threadgroup T as[256];
  as[lid] = T(a[lid]);
  as[lid + 128] = T(a[lid + 128]);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const uint tr = sg / 2, tc = sg % 2;  // tile row and column of C
  simdgroup_matrix<float, 8, 8> acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  for (uint k0 = 0; k0 < 16; k0 += 8) {
    simdgroup_matrix<T, 8, 8> ma, mb;
    simdgroup_load(ma, as, 16, ulong2(k0, tr * 8));
    simdgroup_load(mb, bt, 16, ulong2(k0, tc * 8), true);
    simdgroup_multiply_accumulate(acc, ma, mb, acc);
  }
  simdgroup_store(acc, c, 16, ulong2(tc * 8, tr * 8));
  simdgroup_store(acc, ct, 16, ulong2(tr * 8, tc * 8), true);
}

// simdgroup_multiply with aliasing and a diagonal matrix: d = (2 I) * a, then d = d * d.
kernel void matrix_misc(device const float* a [[buffer(0)]], device float* out [[buffer(1)]]) {
  simdgroup_float8x8 m, two(2.0f), d;
  simdgroup_load(m, a);
  simdgroup_multiply(d, two, m);
  simdgroup_multiply(d, d, d);
  simdgroup_store(d, out);
}

// Broken kernels for the error paths.
kernel void divergent_barrier(device float* out [[buffer(0)]], uint lid [[thread_index_in_threadgroup]]) {
  float v = float(lid);
  if (lid < 32) threadgroup_barrier(mem_flags::mem_threadgroup);  // threads 32.. never arrive
  out[lid] = v;
}

kernel void early_return(device float* out [[buffer(0)]], uint lid [[thread_index_in_threadgroup]]) {
  if (lid == 5) return;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[lid] = 1.0f;
}

kernel void split_simd(device float* out [[buffer(0)]], uint lid [[thread_index_in_threadgroup]],
                       uint lane [[thread_index_in_simdgroup]]) {
  float v = 1.0f;
  if (lane < 16) v = simd_sum(v);  // half the lanes
  out[lid] = v;
}

kernel void simd_vs_barrier(device float* out [[buffer(0)]], uint lid [[thread_index_in_threadgroup]],
                            uint lane [[thread_index_in_simdgroup]]) {
  float v = 1.0f;
  if (lane < 16) v = simd_sum(v);
  else threadgroup_barrier(mem_flags::mem_threadgroup);
  out[lid] = v;
}

kernel void mixed_collectives(device float* out [[buffer(0)]], uint lid [[thread_index_in_threadgroup]],
                              uint lane [[thread_index_in_simdgroup]]) {
  const float v = float(lane);
  out[lid] = lane < 16 ? simd_sum(v) : simd_max(v);
}

kernel void nonuniform_load(device const float* a [[buffer(0)]], device float* out [[buffer(1)]],
                            uint lane [[thread_index_in_simdgroup]]) {
  simdgroup_float8x8 m;
  simdgroup_load(m, a, 16, ulong2(lane % 2 == 0 ? 0 : 8, 0));  // origin depends on the lane
  simdgroup_store(m, out, 8);
}

kernel void nonuniform_fill(device float* out [[buffer(0)]], uint lane [[thread_index_in_simdgroup]]) {
  simdgroup_float8x8 m = make_filled_simdgroup_matrix<float, 8, 8>(float(lane));
  simdgroup_multiply(m, m, m);
  simdgroup_store(m, out);
}

kernel void throws(device float* out [[buffer(0)]], uint lid [[thread_index_in_threadgroup]]) {
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (lid == 40) throw std::runtime_error("bad index 40");
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[lid] = 1.0f;
}

// The missing barrier: threads read a neighbour's slot that it may not have written yet.
kernel void racy(device float* out [[buffer(0)]], uint lid [[thread_index_in_threadgroup]]) {
  static float tile[64];
  tile[lid] = float(lid);
  out[lid] = tile[(lid + 1) % 64];  // needs threadgroup_barrier(mem_flags::mem_threadgroup) before
}

// The timing workload: 100 barriers and 100 simd_sum per thread. The tile is double-buffered:
// iteration i + 1 writes the other half, so one barrier per iteration suffices.
kernel void busy(device float* out [[buffer(0)]], uint lid [[thread_index_in_threadgroup]],
                 uint tg [[threadgroup_position_in_grid]], uint tpg [[threads_per_threadgroup]]) {
  static float tile[2][128];
  float v = float(lid);
  for (int i = 0; i < 100; ++i) {
    tile[i & 1][lid] = v;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    v = simd_sum(tile[i & 1][(lid + 1) % tpg]) * (1.0f / 32.0f);
  }
  out[tg * tpg + lid] = v;
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

namespace {

int failures = 0;

void report(bool ok, const std::string& name, const std::string& detail = "") {
  std::printf("%s %s%s%s\n", ok ? "ok  " : "FAIL", name.c_str(), detail.empty() ? "" : ": ", detail.c_str());
  std::fflush(stdout);
  if (!ok) ++failures;
}

const char* mode_name(msl_emu::Mode m) { return m == msl_emu::Mode::fibers ? "fibers" : "threads"; }

// Runs a kernel taking the standard ids; returns launch's message.
template <class F>
std::string run(uint32_t groups, uint32_t tpg, msl_emu::Mode mode, F f, bool strict = true) {
  return msl_emu::launch(groups, tpg, [&](const msl_emu::ThreadIds& id) { f(id, tpg); }, mode, strict);
}

void check_simd(msl_emu::Mode mode) {
  const uint32_t groups = 2, tpg = 64, n = groups * tpg;
  std::vector<float> out(n * kSimdCols, -1.0f);
  std::vector<int> iout(n * 3, -1);
  std::string err = run(groups, tpg, mode, [&](const msl_emu::ThreadIds& id, uint32_t t) {
    simd_ops(out.data(), iout.data(), id.lid, id.lane, id.group, t);
  });
  std::string bad;
  auto expect = [&](uint32_t gid, int col, float want) {
    const float got = out[gid * kSimdCols + col];
    if (got != want && bad.empty())
      bad = "thread " + std::to_string(gid) + " column " + std::to_string(col) + ": got " + std::to_string(got) +
            ", want " + std::to_string(want);
  };
  for (uint32_t s = 0; s < n / 32; ++s) {
    float v[32];
    int iv[32];
    for (uint32_t l = 0; l < 32; ++l) {
      const uint32_t gid = s * 32 + l;
      v[l] = float((gid * 7) % 13) - 4.5f + 0.25f * float(l);
      iv[l] = int(gid % 11) - 5;
    }
    // The documented reduction order: pairs (i, i + 16), then (i, i + 8), ...
    float t[32];
    std::memcpy(t, v, sizeof t);
    for (int w = 16; w >= 1; w /= 2)
      for (int i = 0; i < w; ++i) t[i] = t[i] + t[i + w];
    float mx = v[0], mn = v[0];
    int isum = 0, imax = iv[0];
    for (int l = 0; l < 32; ++l) {
      mx = std::max(mx, v[l]);
      mn = std::min(mn, v[l]);
      isum += iv[l];
      imax = std::max(imax, iv[l]);
    }
    float prefix = 0.0f;
    for (uint32_t l = 0; l < 32; ++l) {
      const uint32_t gid = s * 32 + l;
      expect(gid, 0, t[0]);
      expect(gid, 1, mx);
      expect(gid, 2, mn);
      expect(gid, 3, v[l ^ 5]);
      expect(gid, 4, l + 3 < 32 ? v[l + 3] : v[l]);
      expect(gid, 5, l >= 2 ? v[l - 2] : v[l]);
      expect(gid, 6, v[7]);
      expect(gid, 7, v[0]);
      expect(gid, 8, v[31 - l]);
      expect(gid, 9, float(half(v[l ^ 1])));
      const float w = l + 1 < 32 ? v[l + 1] : v[l];
      expect(gid, 10, w + 2 * w + 3 * w + 4 * w);
      expect(gid, 11, prefix);
      prefix += v[l];
      expect(gid, 12, 1.0f);
      expect(gid, 13, 0.0f);
      if (bad.empty() && (iout[gid * 3] != isum || iout[gid * 3 + 1] != imax || iout[gid * 3 + 2] != int(s * 32)))
        bad = "integer collectives of thread " + std::to_string(gid);
    }
  }
  report(err.empty() && bad.empty(), std::string("simd collectives [") + mode_name(mode) + "]", err + bad);
}

void check_barrier(msl_emu::Mode mode) {
  const uint32_t groups = 3, tpg = 128;
  std::vector<float> out(groups * tpg);
  std::string err = run(groups, tpg, mode, [&](const msl_emu::ThreadIds& id, uint32_t t) {
    neighbours(out.data(), id.lid, id.group, t);
  });
  std::string bad;
  for (uint32_t g = 0; g < groups && bad.empty(); ++g) {
    std::vector<float> v(tpg), next(tpg);
    for (uint32_t i = 0; i < tpg; ++i) v[i] = float(g * 1000 + i);
    for (int round = 0; round < 4; ++round) {
      for (uint32_t i = 0; i < tpg; ++i) next[i] = v[(i + 1) % tpg] + 0.5f * v[(i + tpg - 1) % tpg];
      v = next;
    }
    for (uint32_t i = 0; i < tpg; ++i)
      if (out[g * tpg + i] != v[i]) {
        bad = "group " + std::to_string(g) + " thread " + std::to_string(i);
        break;
      }
  }
  report(err.empty() && bad.empty(), std::string("threadgroup_barrier ordering [") + mode_name(mode) + "]", err + bad);
}

template <class T>
void check_gemm(msl_emu::Mode mode, const char* type) {
  std::vector<float> a(256), b(256), c(256, -1.0f), ct(256, -1.0f);
  std::vector<T> bt(256);
  uint32_t seed = 12345;
  auto rnd = [&] {
    seed = seed * 1664525u + 1013904223u;
    return float(int(seed >> 20) % 17 - 8) * 0.125f + float(int(seed >> 8) % 101) * 0.0009765625f;
  };
  for (auto& x : a) x = rnd();
  for (auto& x : b) x = float(T(rnd()));
  for (int k = 0; k < 16; ++k)
    for (int n = 0; n < 16; ++n) bt[n * 16 + k] = T(b[k * 16 + n]);
  std::string err = run(1, 128, mode, [&](const msl_emu::ThreadIds& id, uint32_t) {
    gemm16<T>(a.data(), bt.data(), c.data(), ct.data(), id.lid, id.simdgroup);
  });
  // Scalar reference in the documented order: acc = 0, then acc + a*b for k = 0..15.
  float max_err = 0.0f;
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float acc = 0.0f;
      for (int k = 0; k < 16; ++k) acc = acc + float(T(a[m * 16 + k])) * b[k * 16 + n];
      max_err = std::max(max_err, std::fabs(c[m * 16 + n] - acc));
      max_err = std::max(max_err, std::fabs(ct[n * 16 + m] - acc));
    }
#if defined(__x86_64__) && !defined(__FMA__)
  const float tol = 0.0f;  // no fma to contract into: bit-exact
#else
  const float tol = 1e-4f;
#endif
  report(err.empty() && max_err <= tol,
         std::string("simdgroup matrix 16x16x16, ") + type + " operands, transposed load/store [" + mode_name(mode) + "]",
         err + (max_err > tol ? "max error " + std::to_string(max_err) : ""));
}

void check_matrix_misc(msl_emu::Mode mode) {
  std::vector<float> a(64), out(64);
  for (int i = 0; i < 64; ++i) a[i] = float(i % 7 - 3);
  std::string err = run(1, 32, mode, [&](const msl_emu::ThreadIds&, uint32_t) { matrix_misc(a.data(), out.data()); });
  bool ok = err.empty();
  for (int r = 0; r < 8 && ok; ++r)
    for (int c = 0; c < 8; ++c) {
      float s = 0.0f;
      for (int k = 0; k < 8; ++k) s = s + (2 * a[r * 8 + k]) * (2 * a[k * 8 + c]);
      if (out[r * 8 + c] != s) ok = false;
    }
  report(ok, std::string("simdgroup_multiply aliasing, diagonal matrix [") + mode_name(mode) + "]", err);
}

void check_conversions() {
  bool ok = true;
  std::string bad;
  auto expect = [&](bool cond, const char* what) {
    if (!cond && ok) {
      ok = false;
      bad = what;
    }
  };
  // bfloat: round to nearest, ties to even.
  expect(float(bfloat(1.0f + 0x1p-8f)) == 1.0f, "1 + 2^-8 -> 1 (tie, even)");
  expect(float(bfloat(1.0f + 3 * 0x1p-9f)) == 1.0f + 0x1p-7f, "1 + 3*2^-9 -> 1 + 2^-7");
  expect(float(bfloat(1.0f + 0x1p-7f + 0x1p-8f)) == 1.0f + 0x1p-6f, "1 + 2^-7 + 2^-8 -> 1 + 2^-6 (tie, odd)");
  expect(float(bfloat(1.0f + 0x1p-8f + 0x1p-20f)) == 1.0f + 0x1p-7f, "just above a tie rounds up");
  expect(float(static_cast<bfloat>(-2.5f)) == -2.5f, "exact value");
  expect(std::isnan(float(bfloat(NAN))), "NaN stays NaN");
  expect(std::isnan(float(bfloat(-NAN))), "-NaN stays NaN");
  expect(bfloat(__builtin_nanf("0x1")).bits != 0x7f80 && std::isnan(float(bfloat(__builtin_nanf("0x1")))),
         "NaN with a low payload does not become inf");
  expect(float(bfloat(3.4e38f)) == INFINITY, "overflow to inf");
  expect(float(bfloat(-INFINITY)) == -INFINITY, "-inf");
  expect(bfloat(1.0f).bits == 0x3f80, "bits of 1");
  bfloat16_t b = 3.0f;
  b += 1.0f;
  float f = b * 2.0f;  // arithmetic through float
  expect(f == 8.0f, "bfloat arithmetic");
  expect(float(bfloat(half(1.5f))) == 1.5f, "bfloat from half");
  expect(float(half(bfloat(0.75f))) == 0.75f, "half from bfloat");
  // half: round to nearest even at 11 bits.
  expect(float(half(1.0f + 0x1p-11f)) == 1.0f, "half tie to even");
  expect(float(half(1.0f + 3 * 0x1p-12f)) == 1.0f + 0x1p-10f, "half round up");
  expect(float(half(70000.0f)) == INFINITY, "half overflow");
  float16_t h = 2.0f;
  expect(float(h * h) == 4.0f, "float16_t");
  expect(float(numeric_limits<half>::max()) == 65504.0f, "numeric_limits<half>::max");
  expect(float(numeric_limits<bfloat>::lowest()) == -0x1.fep127f, "numeric_limits<bfloat>::lowest");
  // Vectors.
  half4 h4(half(1.0f), half(2.0f), half(-3.0f), half(0.5f));
  float4 f4 = float4(h4);
  expect(f4.x == 1 && f4.y == 2 && f4.z == -3 && f4.w == 0.5f, "float4(half4)");
  float4 g4 = 2.0f * f4 + 1.0f;
  g4 -= float4(1.0f);
  g4 *= 0.5f;
  expect(g4[0] == 1 && g4[1] == 2 && g4[2] == -3 && g4[3] == 0.5f, "vector arithmetic");
  expect(dot(f4, float4(1.0f)) == 0.5f, "dot");
  bfloat4 b4 = bfloat4(f4 / 2.0f);
  expect(float(b4.z) == -1.5f, "bfloat4(float4)");
  int2 i2 = int2(float2(2.7f, -1.2f));
  expect(i2.x == 2 && i2.y == -1, "int2(float2)");
  uint3 u3(1u, 2u, 3u);
  expect(sizeof(u3) == 16 && sizeof(float3) == 16 && alignof(float4) == 16 && sizeof(half2) == 4, "vector layout");
  ulong2 o = ulong2(3, 4);
  expect(o.x + o.y == 7, "ulong2");
  ushort2 s2(ushort(65535), ushort(1));
  expect(s2[0] == 65535, "ushort2");
  float4 m4 = max(float4(1, -2, 3, -4), 0.0f);
  expect(m4.y == 0 && m4.z == 3, "max(float4, float)");
  // Math overloads as a kernel sees them through `using namespace metal;`.
  float x = -1.5f;
  int i = -3;
  uint u = 7;
  expect(max(x, 0.0f) == 0.0f && min(i, 2) == -3 && max(u, 9u) == 9u && min(2, 5) == 2, "max/min overloads");
  expect(max(NAN, 1.0f) == 1.0f, "max returns the non-NaN operand");
  expect(abs(x) == 1.5f && abs(i) == 3 && fabs(x) == 1.5f && float(abs(half(-2.0f))) == 2.0f, "abs");
  expect(clamp(x, -1.0f, 1.0f) == -1.0f && clamp(5, 0, 3) == 3, "clamp");
  expect(select(1.0f, 2.0f, true) == 2.0f && select(1, 2, false) == 1, "select");
  expect(std::fabs(exp(1.0f) - 2.7182817f) < 1e-6f && exp2(3.0f) == 8.0f && log2(8.0f) == 3.0f, "exp exp2 log2");
  expect(std::fabs(fast::exp(1.0f) - precise::exp(1.0f)) < 1e-6f && precise::log2(4.0f) == 2.0f, "fast/precise");
  expect(rsqrt(4.0f) == 0.5f && sqrt(9.0f) == 3.0f && fma(2.0f, 3.0f, 1.0f) == 7.0f, "rsqrt sqrt fma");
  expect(isinf(INFINITY) && isinf(HUGE_VALF) && isnan(NAN) && !isnan(x) && isinf(half(INFINITY)), "isinf isnan");
  expect(float(exp(half(0.0f))) == 1.0f && float(max(half(1.0f), half(2.0f))) == 2.0f, "half math");
  expect(as_type<uint>(1.0f) == 0x3f800000u && as_type<float>(0x40000000u) == 2.0f, "as_type");
  expect(as_type<ushort>(half(1.0f)) == 0x3c00 && as_type<uint>(half2(half(1.0f), half(0.0f))) == 0x3c00u, "as_type half");
  expect((mem_flags::mem_device | mem_flags::mem_threadgroup) != mem_flags::mem_none, "mem_flags");
  report(ok, "half/bfloat conversions, vectors, math", bad);
}

// A launch that must fail with a message containing `want`.
template <class F>
void expect_error(const std::string& name, msl_emu::Mode mode, const char* want, F launch_it) {
  const auto t0 = std::chrono::steady_clock::now();
  const std::string err = launch_it();
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  const bool ok = !err.empty() && err.find(want) != std::string::npos;
  char timing[32];
  std::snprintf(timing, sizeof timing, " (%.1f ms)", ms);
  report(ok, name + " [" + mode_name(mode) + "]", (err.empty() ? std::string("no error reported") : err) + timing);
}

void check_errors(msl_emu::Mode mode) {
  std::vector<float> out(1024), a(256, 1.0f);
  expect_error("barrier in divergent control flow", mode, "threadgroup 1: deadlock", [&] {
    return run(3, 64, mode, [&](const msl_emu::ThreadIds& id, uint32_t) {
      if (id.group == 1) divergent_barrier(out.data(), id.lid);
      else threadgroup_barrier(mem_flags::mem_threadgroup);
    });
  });
  expect_error("thread returns before a barrier", mode, "thread 5 returned", [&] {
    return run(1, 64, mode, [&](const msl_emu::ThreadIds& id, uint32_t) { early_return(out.data(), id.lid); });
  });
  expect_error("simd collective reached by half the lanes", mode, "threads 0-15 in simd_sum", [&] {
    return run(1, 64, mode, [&](const msl_emu::ThreadIds& id, uint32_t) { split_simd(out.data(), id.lid, id.lane); });
  });
  expect_error("lanes split between simd_sum and a barrier", mode, "deadlock", [&] {
    return run(1, 64, mode,
               [&](const msl_emu::ThreadIds& id, uint32_t) { simd_vs_barrier(out.data(), id.lid, id.lane); });
  });
  expect_error("lanes in different collectives", mode, "different simd collectives", [&] {
    return run(1, 32, mode,
               [&](const msl_emu::ThreadIds& id, uint32_t) { mixed_collectives(out.data(), id.lid, id.lane); });
  });
  expect_error("non-uniform simdgroup_load arguments", mode, "simdgroup_load called with non-uniform arguments", [&] {
    return run(1, 64, mode,
               [&](const msl_emu::ThreadIds& id, uint32_t) { nonuniform_load(a.data(), out.data(), id.lane); });
  });
  expect_error("non-uniform simdgroup_multiply operands", mode, "simdgroup_multiply called with non-uniform", [&] {
    return run(1, 32, mode, [&](const msl_emu::ThreadIds& id, uint32_t) { nonuniform_fill(out.data(), id.lane); });
  });
  {
    // Not strict: the same kernel runs (lanes keep their own copies; each stores its part).
    const std::string err = run(1, 32, mode,
                                [&](const msl_emu::ThreadIds& id, uint32_t) { nonuniform_fill(out.data(), id.lane); },
                                /*strict=*/false);
    report(err.empty(), std::string("non-strict launch skips the uniformity check [") + mode_name(mode) + "]", err);
  }
  expect_error("exception in a kernel", mode, "thread 40: exception: bad index 40", [&] {
    return run(2, 64, mode, [&](const msl_emu::ThreadIds& id, uint32_t) { throws(out.data(), id.lid); });
  });
  expect_error("threads_per_group not a multiple of 32", mode, "multiple of 32", [&] {
    return run(1, 48, mode, [&](const msl_emu::ThreadIds&, uint32_t) {});
  });
  expect_error("threads_per_group above 1024", mode, "multiple of 32", [&] {
    return run(1, 2048, mode, [&](const msl_emu::ThreadIds&, uint32_t) {});
  });
  expect_error("nested launch", mode, "nested", [&] {
    std::string inner;
    std::string outer = run(1, 32, mode, [&](const msl_emu::ThreadIds& id, uint32_t) {
      if (id.lid == 0) inner = msl_emu::launch(1, 32, [](const msl_emu::ThreadIds&) {}, mode);
    });
    return outer.empty() ? inner : outer;
  });
  {
    // A launch after failed ones starts clean, and 1024-thread groups work.
    std::vector<float> big(2 * 1024);
    std::string err = run(2, 1024, mode, [&](const msl_emu::ThreadIds& id, uint32_t t) {
      static float tile[1024];
      tile[id.lid] = float(id.lid);
      threadgroup_barrier(mem_flags::mem_threadgroup);
      big[id.group * t + id.lid] = simd_sum(tile[t - 1 - id.lid]);
    });
    bool ok = err.empty();
    for (uint32_t i = 0; i < 2048 && ok; ++i) {
      const uint32_t lid = i % 1024, base = 1023 - (lid / 32) * 32 - 31;
      float s = 0.0f;
      for (uint32_t l = 0; l < 32; ++l) s += float(base + l);
      ok = big[i] == s;
    }
    report(ok, std::string("clean launch after failures, 1024 threads [") + mode_name(mode) + "]", err);
  }
}

// Each GPU thread has its own floating-point control state (rounding mode, MXCSR / FPCR), as
// separate OS threads would: a fiber that changes it does not change it for the others.
void check_fp_env(msl_emu::Mode mode) {
  const int before = std::fegetround();
  std::vector<int> seen(64, -1), rounded_up(64, -1);
  std::string err = run(1, 64, mode, [&](const msl_emu::ThreadIds& id, uint32_t) {
    if (id.lid == 3) std::fesetround(FE_UPWARD);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    (void)simd_sum(1.0f);
    seen[id.lid] = std::fegetround();  // x87 control word on x86-64
    volatile float one = 1.0f, tiny = 0x1p-30f;
    rounded_up[id.lid] = one + tiny != 1.0f;  // SSE (MXCSR) / FPCR rounding
    if (id.lid == 3) std::fesetround(FE_TONEAREST);
  });
  bool ok = err.empty() && std::fegetround() == before;
  for (uint32_t i = 0; i < 64 && ok; ++i)
    ok = seen[i] == (i == 3 ? FE_UPWARD : before) && rounded_up[i] == (i == 3 ? 1 : 0);
  report(ok, std::string("per-thread floating-point control state [") + mode_name(mode) + "]", err);
}

void check_timing() {
  const uint32_t groups = 8, tpg = 128;
  std::vector<float> out(groups * tpg);
  const auto t0 = std::chrono::steady_clock::now();
  std::string err = run(groups, tpg, msl_emu::Mode::fibers, [&](const msl_emu::ThreadIds& id, uint32_t t) {
    busy(out.data(), id.lid, id.group, t);
  });
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  char buf[160];
  std::snprintf(buf, sizeof buf, "8 groups x 128 threads x (100 barriers + 100 simd_sum): %.1f ms (%.0f ns per wait)",
                s * 1e3, s * 1e9 / (groups * tpg * 200.0));
  report(err.empty(), "fiber timing", err.empty() ? buf : err);
}

void check_threads_timing() {
  const uint32_t groups = 2, tpg = 128;
  std::vector<float> out(groups * tpg);
  const auto t0 = std::chrono::steady_clock::now();
  std::string err = run(groups, tpg, msl_emu::Mode::threads, [&](const msl_emu::ThreadIds& id, uint32_t t) {
    busy(out.data(), id.lid, id.group, t);
  });
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  char buf[160];
  std::snprintf(buf, sizeof buf, "2 groups x 128 threads x (100 barriers + 100 simd_sum): %.1f ms", s * 1e3);
  report(err.empty(), "threads timing", err.empty() ? buf : err);
}

}  // namespace

int main(int argc, char** argv) {
  bool threads_only = false, race = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--threads-only") == 0) threads_only = true;
    else if (std::strcmp(argv[i], "--race") == 0) race = true;
    else {
      std::fprintf(stderr, "usage: %s [--threads-only | --race]\n", argv[0]);
      return 2;
    }
  }
  if (race) {
    std::vector<float> out(64);
    const std::string err = run(1, 64, msl_emu::Mode::threads,
                                [&](const msl_emu::ThreadIds& id, uint32_t) { racy(out.data(), id.lid); });
    std::printf("racy kernel ran: %s\n", err.empty() ? "no launch error" : err.c_str());
    return 0;
  }
  std::vector<msl_emu::Mode> modes = {msl_emu::Mode::threads};
  if (!threads_only) modes.insert(modes.begin(), msl_emu::Mode::fibers);
  if (!threads_only) check_conversions();
  for (msl_emu::Mode m : modes) {
    check_simd(m);
    check_barrier(m);
    check_gemm<float>(m, "float");
    check_gemm<half>(m, "half");
    check_gemm<bfloat>(m, "bfloat");
    check_matrix_misc(m);
    check_fp_env(m);
    check_errors(m);
  }
  if (!threads_only) check_timing();
  check_threads_timing();
  if (failures) {
    std::printf("%d FAILED\n", failures);
    return 1;
  }
  std::printf("ALL OK\n");
  return 0;
}
