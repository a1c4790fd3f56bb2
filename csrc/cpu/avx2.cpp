// AVX2 + FMA + F16C variants of qmatmul and attention (x86_attention.h: the micro-kernel
// of avx2_isa.h serves both of its products).
//
// Small M (decode): an integer GEMV that streams the weights once at memory bandwidth.
// x is prepared once per call (x86_common.h) as 15-bit integers split into two int8
// halves, so each 32 plane bytes (64 weights) cost a shift, two nibble masks and four
// vpmaddubsw per x row. vpmaddubsw adds pairs of u8*s8 products in int16: with codes <= 15 and
// |x half| <= 128 a pair stays below 3840, and two pairs below 7680, so nothing
// saturates; the INT8 view must keep its planes apart because a whole 8-bit code
// (<= 255) would.
//
// Large M (prefill): dequantized float32 panels and a 6x16 FMA micro-kernel
// (x86_qmatmul.h), 12 accumulators + 2 panel rows + 1 broadcast of 16 ymm registers.
//
// The traits struct (Avx2) lives in avx2_isa.h, shared with the AVX-VNNI unit.
#include "avx2_isa.h"

namespace bitswitch {
namespace cpu {

Status qmatmul_avx2(const QMatmulArgs& a, ThreadPool& pool) { return qmatmul_x86<Avx2>(a, pool); }

Status attention_avx2(const AttentionArgs& a, ThreadPool& pool) { return attention_x86<Avx2>(a, pool); }

}  // namespace cpu
}  // namespace bitswitch
