// Run-time CPU feature detection and the choice of kernel variant.
#pragma once

#include <string>

#include "kernels.h"

namespace bitswitch {
namespace cpu {

struct CpuFeatures {
  std::string vendor, brand;
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512dq = false, avx512vl = false, avx512vnni = false;
  bool avx512bf16 = false, avx_vnni = false;
  bool amx_tile = false, amx_bf16 = false, amx_int8 = false;
  bool os_ymm = false, os_zmm = false, os_amx = false;  // state enabled by the OS (XCR0)
};

const CpuFeatures& cpu_features();

// "scalar", "avx2", "avxvnni", "avx512", "avx512bf16", "amx".
const char* variant_name(Variant v);
// Parses a variant name; false if unknown.
bool parse_variant(const std::string& name, Variant* out);
// Whether this CPU (and build) can run v; if not, why.
bool variant_supported(Variant v, std::string* why = nullptr);
// Whether the AVX-512 unit was built on the portable emulation (a test build).
bool avx512_emulated();
// The best variant this CPU runs.
Variant best_variant();

// The variant kernels use now: set_variant() if called, else BITSWITCH_CPU if set, else
// best_variant(). Returns false (with a message) if the requested one cannot run here.
bool active_variant(Variant* out, std::string* why);
// Forces a variant (empty name: back to BITSWITCH_CPU / automatic). False if unknown or
// unsupported, with a message.
bool set_variant(const std::string& name, std::string* why);

}  // namespace cpu
}  // namespace bitswitch
