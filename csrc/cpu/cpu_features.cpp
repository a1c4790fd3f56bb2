#include "cpu_features.h"

#include <cpuid.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace bitswitch {
namespace cpu {
namespace {

uint64_t read_xcr0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}

CpuFeatures detect() {
  CpuFeatures f;
  unsigned a, b, c, d;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return f;
  const unsigned max_leaf = a;
  char vendor[13] = {};
  std::memcpy(vendor, &b, 4);
  std::memcpy(vendor + 4, &d, 4);
  std::memcpy(vendor + 8, &c, 4);
  f.vendor = vendor;

  __get_cpuid(1, &a, &b, &c, &d);
  const bool osxsave = c & (1u << 27);
  const bool avx = c & (1u << 28);
  f.fma = c & (1u << 12);
  f.f16c = c & (1u << 29);
  if (osxsave) {
    const uint64_t xcr0 = read_xcr0();
    f.os_ymm = avx && (xcr0 & 0x6) == 0x6;
    f.os_zmm = f.os_ymm && (xcr0 & 0xE0) == 0xE0;
    f.os_amx = (xcr0 & 0x60000) == 0x60000;
  }
  if (max_leaf >= 7) {
    __cpuid_count(7, 0, a, b, c, d);
    f.avx2 = b & (1u << 5);
    f.avx512f = b & (1u << 16);
    f.avx512dq = b & (1u << 17);
    f.avx512bw = b & (1u << 30);
    f.avx512vl = b & (1u << 31);
    f.avx512vnni = c & (1u << 11);
    f.amx_bf16 = d & (1u << 22);
    f.amx_tile = d & (1u << 24);
    f.amx_int8 = d & (1u << 25);
    __cpuid_count(7, 1, a, b, c, d);
    f.avx_vnni = a & (1u << 4);
    f.avx512bf16 = a & (1u << 5);
  }
  unsigned ext = __get_cpuid_max(0x80000000u, nullptr);
  if (ext >= 0x80000004u) {
    char brand[49] = {};
    for (unsigned i = 0; i < 3; ++i) {
      __get_cpuid(0x80000002u + i, &a, &b, &c, &d);
      std::memcpy(brand + 16 * i, &a, 4);
      std::memcpy(brand + 16 * i + 4, &b, 4);
      std::memcpy(brand + 16 * i + 8, &c, 4);
      std::memcpy(brand + 16 * i + 12, &d, 4);
    }
    f.brand = brand;
    while (!f.brand.empty() && f.brand.back() == ' ') f.brand.pop_back();
    while (!f.brand.empty() && f.brand.front() == ' ') f.brand.erase(f.brand.begin());
  }
  return f;
}

std::mutex g_mu;
bool g_forced = false;
Variant g_forced_variant = Variant::kScalar;

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

const char* variant_name(Variant v) {
  switch (v) {
    case Variant::kAvx2: return "avx2";
    case Variant::kAvx512: return "avx512";
    default: return "scalar";
  }
}

bool parse_variant(const std::string& name, Variant* out) {
  for (Variant v : {Variant::kScalar, Variant::kAvx2, Variant::kAvx512})
    if (name == variant_name(v)) {
      *out = v;
      return true;
    }
  return false;
}

bool avx512_emulated() {
#if defined(BITSWITCH_EMULATE_AVX512)
  return true;
#else
  return false;
#endif
}

bool variant_supported(Variant v, std::string* why) {
  const CpuFeatures& f = cpu_features();
  auto missing = [&](const char* what) {
    if (why) *why = std::string("this CPU lacks ") + what;
    return false;
  };
  const bool avx2_ok = f.avx2 && f.fma && f.f16c && f.os_ymm;
  switch (v) {
    case Variant::kScalar:
      return true;
    case Variant::kAvx2:
      return avx2_ok ? true : missing("AVX2, FMA or F16C (or the OS does not enable AVX state)");
    case Variant::kAvx512:
      if (avx512_emulated()) return avx2_ok ? true : missing("AVX2, needed by the AVX-512 emulation");
      if (!(avx2_ok && f.avx512f && f.avx512bw && f.avx512dq && f.avx512vl && f.os_zmm))
        return missing("AVX-512 F/BW/DQ/VL (or the OS does not enable AVX-512 state)");
      return f.avx512vnni ? true : missing("AVX-512 VNNI");
  }
  return false;
}

Variant best_variant() {
  // The emulated AVX-512 unit is for tests only: never chosen automatically.
  if (!avx512_emulated() && variant_supported(Variant::kAvx512)) return Variant::kAvx512;
  if (variant_supported(Variant::kAvx2)) return Variant::kAvx2;
  return Variant::kScalar;
}

bool active_variant(Variant* out, std::string* why) {
  {
    std::lock_guard<std::mutex> lk(g_mu);
    if (g_forced) {
      *out = g_forced_variant;
      return true;
    }
  }
  const char* env = std::getenv("BITSWITCH_CPU");
  if (env && *env) {
    Variant v;
    if (!parse_variant(env, &v)) {
      if (why) *why = std::string("BITSWITCH_CPU='") + env + "' is not one of scalar, avx2, avx512";
      return false;
    }
    std::string reason;
    if (!variant_supported(v, &reason)) {
      if (why) *why = std::string("BITSWITCH_CPU=") + env + " cannot run here: " + reason;
      return false;
    }
    *out = v;
    return true;
  }
  *out = best_variant();
  return true;
}

bool set_variant(const std::string& name, std::string* why) {
  std::lock_guard<std::mutex> lk(g_mu);
  if (name.empty()) {
    g_forced = false;
    return true;
  }
  Variant v;
  if (!parse_variant(name, &v)) {
    if (why) *why = "unknown CPU variant '" + name + "': expected one of scalar, avx2, avx512";
    return false;
  }
  std::string reason;
  if (!variant_supported(v, &reason)) {
    if (why) *why = "CPU variant '" + name + "' cannot run here: " + reason;
    return false;
  }
  g_forced = true;
  g_forced_variant = v;
  return true;
}

}  // namespace cpu
}  // namespace bitswitch
