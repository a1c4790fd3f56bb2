#include "cpu_features.h"

// BITSWITCH_NO_X86 (the BITSWITCH_PORTABLE test build) takes the non-x86 path on x86 too.
#if (defined(__x86_64__) || defined(__i386__)) && !defined(BITSWITCH_NO_X86)
#define BITSWITCH_X86 1
#include <cpuid.h>
#endif
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace bitswitch {
namespace cpu {
namespace {

#if defined(BITSWITCH_X86)
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
#else
// Not x86: no ISA variant is built (only the scalar kernels), so there is nothing to detect.
CpuFeatures detect() {
  CpuFeatures f;
#if defined(__aarch64__)
  f.vendor = "arm64";
#else
  f.vendor = "unknown";
#endif
  return f;
}
#endif

// Linux keeps the 8 KB of AMX tile data out of every thread's saved state until the
// process asks for it (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA); a tile
// instruction before that raises SIGILL. The permission is per process and inherited
// by fork(), so one successful request covers every pool thread, now and later.
constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;

bool request_amx_permission(std::string* why) {
  static const int err = [] {
#if defined(__linux__) && defined(SYS_arch_prctl)
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0 ? 0 : errno;
#else
    return -1;
#endif
  }();
  if (err != 0 && why)
    *why = err < 0 ? "AMX tile state needs Linux's arch_prctl permission, which this OS lacks"
                   : std::string("the OS refused AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM: ") +
                         std::strerror(err) + ")";
  return err == 0;
}

std::string variant_list() {
  std::string s;
  for (Variant v : kAllVariants) s += std::string(s.empty() ? "" : ", ") + variant_name(v);
  return s;
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
    case Variant::kAvxVnni: return "avxvnni";
    case Variant::kAvx512: return "avx512";
    case Variant::kAvx512Bf16: return "avx512bf16";
    case Variant::kAmx: return "amx";
    default: return "scalar";
  }
}

bool parse_variant(const std::string& name, Variant* out) {
  for (Variant v : kAllVariants)
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
#if !defined(BITSWITCH_X86)
  if (v != Variant::kScalar) {
    if (why) *why = "not an x86 CPU: this build has the scalar kernels only";
    return false;
  }
#endif
  switch (v) {
    case Variant::kScalar:
      return true;
    case Variant::kAvx2:
      return avx2_ok ? true : missing("AVX2, FMA or F16C (or the OS does not enable AVX state)");
    case Variant::kAvxVnni:
      if (!avx2_ok) return missing("AVX2, FMA or F16C (or the OS does not enable AVX state)");
      if (!f.avx_vnni) return missing("AVX-VNNI");
      if (!avxvnni_built()) {
        if (why) *why = "this build has no AVX-VNNI kernels (the compiler lacks -mavxvnni)";
        return false;
      }
      return true;
    case Variant::kAvx512:
      if (avx512_emulated()) return avx2_ok ? true : missing("AVX2, needed by the AVX-512 emulation");
      if (!(avx2_ok && f.avx512f && f.avx512bw && f.avx512dq && f.avx512vl && f.os_zmm))
        return missing("AVX-512 F/BW/DQ/VL (or the OS does not enable AVX-512 state)");
      return f.avx512vnni ? true : missing("AVX-512 VNNI");
    case Variant::kAvx512Bf16:
      if (!variant_supported(Variant::kAvx512, why)) return false;
      if (!avx512_emulated() && !f.avx512bf16) return missing("AVX512_BF16");
      if (!avx512bf16_built()) {
        if (why) *why = "this build has no AVX512-BF16 kernels (the compiler lacks -mavx512bf16)";
        return false;
      }
      return true;
    case Variant::kAmx:
      // The AMX unit also runs the AVX-512 GEMV and attention, natively.
      if (avx512_emulated()) {
        if (why) *why = "this build runs the AVX-512 unit on emulation (a test build), which AMX cannot use";
        return false;
      }
      if (!variant_supported(Variant::kAvx512, why)) return false;
      if (!(f.amx_tile && f.amx_bf16)) return missing("AMX (amx-tile, amx-bf16)");
      if (!f.avx512bf16) return missing("AVX512_BF16");
      if (!f.os_amx) {
        if (why) *why = "the OS does not enable AMX tile state (XCR0 bits 17-18)";
        return false;
      }
      if (!amx_built()) {
        if (why) *why = "this build has no AMX kernels (configured with BITSWITCH_AMX=OFF, or the compiler lacks AMX/AVX512-BF16 flags)";
        return false;
      }
      return request_amx_permission(why);
  }
  return false;
}

Variant best_variant() {
  // The emulated AVX-512 unit is for tests only: never chosen automatically.
  if (variant_supported(Variant::kAmx)) return Variant::kAmx;
  if (!avx512_emulated()) {
    // vdpbf16ps pays on AMD (Zen 4/5: twice the float32 GEMM's rate, measured); on Intel
    // CPUs without AMX (AMX masked off by a hypervisor, say) it issues at half the FMA rate
    // and the float32 GEMM is 1.3-1.9x faster (bench/RESULTS.md), so there it is opt-in.
    if (variant_supported(Variant::kAvx512Bf16) && cpu_features().vendor == "AuthenticAMD")
      return Variant::kAvx512Bf16;
    if (variant_supported(Variant::kAvx512)) return Variant::kAvx512;
  }
  // AVX-VNNI without AVX-512 (Intel client cores): the ymm vpdpbusd GEMV and int8 GEMM.
  if (variant_supported(Variant::kAvxVnni)) return Variant::kAvxVnni;
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
      if (why) *why = std::string("BITSWITCH_CPU='") + env + "' is not one of " + variant_list();
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
    if (why) *why = "unknown CPU variant '" + name + "': expected one of " + variant_list();
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
