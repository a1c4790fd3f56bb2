// The x86 ISA units' entry points on other CPUs (arm64: Apple silicon, Graviton): the
// build compiles this file instead of avx2.cpp, avx_vnni.cpp, avx512*.cpp and amx.cpp, and
// variant_supported() reports every non-scalar variant unsupported, so nothing here is
// reached through the dispatcher; each entry still answers kUnsupported if called.
#include "kernels.h"

namespace bitswitch {
namespace cpu {

struct LayerOps;  // layer_ops.h
const LayerOps& layer_ops_scalar();
const LayerOps& layer_ops_avx2();
const LayerOps& layer_ops_avx512();

Status qmatmul_avx2(const QMatmulArgs&, ThreadPool&) { return Status::kUnsupported; }
Status qmatmul_avxvnni(const QMatmulArgs&, ThreadPool&) { return Status::kUnsupported; }
Status qmatmul_avx512(const QMatmulArgs&, ThreadPool&) { return Status::kUnsupported; }
Status qmatmul_avx512_int8(const QMatmulArgs&, ThreadPool&) { return Status::kUnsupported; }
Status qmatmul_avx512bf16(const QMatmulArgs&, ThreadPool&) { return Status::kUnsupported; }
Status qmatmul_amx(const QMatmulArgs&, ThreadPool&) { return Status::kUnsupported; }
bool avxvnni_built() { return false; }
bool avx512bf16_built() { return false; }
bool amx_built() { return false; }

Status attention_avx2(const AttentionArgs&, ThreadPool&) { return Status::kUnsupported; }
Status attention_avx512(const AttentionArgs&, ThreadPool&) { return Status::kUnsupported; }
Status attention_avx512bf16(const AttentionArgs&, ThreadPool&) { return Status::kUnsupported; }
Status attention_amx(const AttentionArgs&, ThreadPool&) { return Status::kUnsupported; }

const LayerOps& layer_ops_avx2() { return layer_ops_scalar(); }
const LayerOps& layer_ops_avx512() { return layer_ops_scalar(); }

}  // namespace cpu
}  // namespace bitswitch
