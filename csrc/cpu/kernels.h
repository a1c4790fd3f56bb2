// CPU kernel interface: argument structs shared by the scalar reference and every
// ISA variant, and the entry points each translation unit defines.
//
// Kernels take raw pointers and sizes, run on the thread pool, and return a Status.
// They assume arguments were validated by the ops glue (csrc/ops_*.cpp).
#pragma once

#include <cstddef>
#include <cstdint>

namespace bitswitch {

// Element types that cross the kernel boundary.
enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kUInt32 = 3, kInt32 = 4 };

enum class Status : int32_t { kOk = 0, kInvalidArgument = 1, kOutOfMemory = 2, kUnsupported = 3 };

namespace cpu {

class ThreadPool;

// y[M, N] = x[M, K] @ W[N, K]^T for a nibble-plane weight W read as `bits` 4 or 8.
struct QMatmulArgs {
  const void* x;            // x: [M, K] row-major, x_dtype
  void* y;                  // y: [M, N] row-major, x_dtype
  const uint32_t* plane0;   // plane0: [N, K/8], the INT4 codes q
  const uint32_t* plane1;   // plane1: [N, K/8], the residuals r; read only when bits == 8
  const void* scales;       // scales: [N, K/G], scale_dtype, one per group of G inputs
  const void* biases;       // biases: [N, K/G], scale_dtype
  int64_t m;                // rows of x and y
  int64_t n;                // rows of W (outputs)
  int64_t k;                // inputs; a multiple of group_size
  int32_t group_size;       // G: 32, 64 or 128
  int32_t bits;             // 4 reads plane 0, 8 reads planes 0 and 1
  int32_t act_bits;         // 16: float-grade activations, 8: int8 per group (act_quant.h)
  DType x_dtype;            // float32, bfloat16 or float16 (y has the same)
  DType scale_dtype;        // float32, bfloat16 or float16
};

// out = softmax(scale * q k^T + mask) v, flash-style, for q [B, Hq, Lq, D] and k, v
// [B, Hkv, Lk, D] (GQA: query head h reads kv head h / (Hq / Hkv)). Key j is visible to
// query row i when the block mask selects key block j / block_k for query block
// i / block_q (all blocks when there is no mask) and, if causal, j <= q_offset + i.
struct AttentionArgs {
  const void* q;            // q: [B, Hq, Lq, D], dtype; strides below, unit stride on D
  const void* k;            // k: [B, Hkv, Lk, D]
  const void* v;            // v: [B, Hkv, Lk, D]
  void* out;                // out: [B, Hq, Lq, D], dtype
  float* lse;               // lse: [B, Hq, Lq] contiguous, natural-log log-sum-exp; may be null
  DType dtype;              // float32, bfloat16 or float16, shared by q, k, v and out
  int64_t b, hq, hkv, lq, lk, d;
  int64_t q_strides[3];     // element strides of the B, H and L dimensions
  int64_t k_strides[3];
  int64_t v_strides[3];
  int64_t o_strides[3];
  const int32_t* indptr;    // indptr: [B, Hkv, ceil(Lq / block_q) + 1] offsets into indices; null: dense
  const int32_t* indices;   // indices: [B, Hkv, nnz_cap] sorted key-block numbers of each query block
  int64_t nnz_cap;          // length of each (batch, kv head) row of indices
  int32_t block_q;          // query rows per mask block (also the kernel's tile height)
  int32_t block_k;          // keys per mask block
  bool causal;
  float scale;              // multiplies q k^T (usually D^-0.5)
  int64_t q_offset;         // absolute position of query row 0 (chunked prefill, decode)
  int64_t kv_splits = 0;    // decode: key-block ranges per task (split-KV); 0 = chosen by the kernel
  // [B] int32 in device memory: q_offset per batch row, read by the CUDA kernels (a decode
  // step captured in a CUDA graph advances it without re-capturing). The CPU kernels never
  // see it: the ops glue runs them once per batch row with that row's q_offset.
  const int32_t* q_offsets = nullptr;
};

// Quest-style page selection for one decode step (ops.h select_pages_at). Per (batch b,
// kv head h), with pos = positions[b] and last = pos / block_k:
//   1. key pos is folded into the summary of block `last`: kmin / kmax (per channel) become
//      the key itself when pos starts the block, else their min / max with it. The blocks
//      before `last`, and `last` up to pos - 1, must already summarize keys [0, pos).
//   2. block j <= last scores max over the kv head's query heads g of
//      sum_d q[g, d] c[j, d] + |q[g, d]| r[j, d], c = (kmax + kmin) / 2, r = (kmax - kmin) / 2
//      (an upper bound of q . k over the block's keys); blocks j < sinks and j == last score
//      +inf, blocks j > last -inf (as does a NaN score);
//   3. the n blocks of highest score (ties: the lower block number) are written to indices
//      in increasing order. With n > last + 1 the tail is the blocks after `last`, which
//      causal attention at position pos reads nothing of.
struct PageSelectArgs {
  const void* q;                // q: [B, Hq, 1, D], dtype; B and H strides below, unit stride on D
  const void* k;                // k: [B, Hkv, capacity, D], dtype; strides below, unit stride on D
  float* kmin;                  // kmin, kmax: [B, Hkv, nkb, D] float32, C-contiguous
  float* kmax;
  int32_t* indices;             // indices: [B, Hkv, n] C-contiguous
  const int32_t* positions;     // positions: [B], each in [0, capacity)
  DType dtype;                  // of q and k: float32, bfloat16 or float16
  int64_t b, hq, hkv, capacity, d;
  int64_t nkb;                  // ceil(capacity / block_k)
  int64_t n;                    // blocks kept per (batch, kv head): 1 <= n <= nkb
  int64_t q_strides[2];         // element strides of q's B and H dimensions
  int64_t k_strides[3];         // element strides of k's B, H and L dimensions
  int32_t block_k;              // keys per block: 32, 64 or 128
  int32_t sinks;                // leading blocks always kept
};

// The scalar kernel (the selection is a few thousand multiply-adds per kv head).
Status select_pages_scalar(const PageSelectArgs& a, ThreadPool& pool);

// -- fused layer ops (cpu/layer_ops.h has the kernels and the rounding contract) ------------

// x (+= delta), out = rms_norm(x) * weight, row by row.
//   s = round(x + delta)            (written back to x when delta is given)
//   r = 1 / sqrt(mean(s^2) + eps)   (float32)
//   out = round(round(s * r) * weight)
struct RmsNormArgs {
  void* x;              // x: [rows, h], dtype; updated in place when delta is not null
  const void* delta;    // delta: [rows, h] or null
  const void* weight;   // weight: [h]
  void* out;            // out: [rows, h]; may be x itself
  int64_t rows, h;
  int64_t x_stride, delta_stride, out_stride;  // elements between consecutive rows
  float eps;
  DType dtype;          // of x, delta, weight and out
};

// The attention inputs of a Qwen3/Qwen2 layer from its fused q|k|v projection:
//   q, k: per head, RMSNorm over head_dim (when weights are given; Qwen2 has none), then
//         RoPE: round(round(x * cos) + round(rot(x) * sin)), rot(x) = x rolled by d/2,
//         with sin's first half negated (rotate_half as a roll and a sign);
//   q goes to q_out, k and v to row pos + t of the caches.
struct RopeArgs {
  const void* qkv;      // qkv: [b, n, (hq + 2 hkv) * d]: q heads, k heads, v heads per token
  int64_t qkv_strides[2];  // elements between batches and tokens; heads are contiguous
  int64_t b, n, hq, hkv, d;
  const void* q_weight;  // q_weight, k_weight: [d] or both null
  const void* k_weight;
  float eps;
  const void* cos;      // cos: [>= pos + n, d] rows by absolute position
  const void* sin;      // sin: [>= pos + n, d], first half negated
  int64_t pos;          // absolute position of token 0
  // [b] in device memory: position of token 0 per batch row, replacing pos (a CUDA decode
  // step captured in a graph reads it there); the CPU glue runs one call per row instead.
  const int32_t* positions = nullptr;
  int64_t table_rows = 0;  // rows of cos / sin, and the caches' capacity: bounds the CUDA
  int64_t capacity = 0;    // kernel clamps positions to (the glue cannot read them)
  void* q_out;          // q_out: [b, hq, n, d]
  int64_t q_strides[3];
  void* k_cache;        // k_cache, v_cache: [b, hkv, capacity, d]; rows pos .. pos + n - 1 written
  void* v_cache;
  int64_t k_strides[3];
  int64_t v_strides[3];
  DType dtype;          // of every array
};

// out = round(round(silu(g)) * u) for each row [g | u] of gate_up.
struct SiluMulArgs {
  const void* gate_up;  // gate_up: [rows, 2 i]
  void* out;            // out: [rows, i]
  int64_t rows, i;
  int64_t gu_stride, out_stride;
  DType dtype;
};

// Largest row an RMSNorm takes (rows are held in float32 on the stack) and largest
// head_dim of the RoPE op; the glue rejects larger ones.
constexpr int64_t kMaxNormWidth = 16384;
constexpr int64_t kMaxHeadDim = 256;

// Which implementation runs a kernel (values are stable; kAvx512Bf16 came last).
enum class Variant : int32_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAmx = 3, kAvx512Bf16 = 4, kAvxVnni = 5 };
// Every variant, roughly each needing more of the CPU than the one before (for messages and
// listings; AVX-VNNI is on Intel's AVX-512 server cores from Sapphire Rapids on, and on
// AMD's from Zen 4, but not on the earlier AVX-512 ones).
constexpr Variant kAllVariants[] = {Variant::kScalar,     Variant::kAvx2, Variant::kAvxVnni, Variant::kAvx512,
                                    Variant::kAvx512Bf16, Variant::kAmx};

// The always-compiled scalar reference: float32 accumulation of dequantized weights.
Status qmatmul_scalar(const QMatmulArgs& a, ThreadPool& pool);
// AVX2 + FMA + F16C: int8x2 activations with maddubs for small M, dequantize + FMA for large M
// (the INT4 view at act_bits 8: the int8 GEMM with maddubs).
Status qmatmul_avx2(const QMatmulArgs& a, ThreadPool& pool);
// AVX2 + FMA + F16C + AVX-VNNI (ymm vpdpbusd, no AVX-512: Intel client cores from Alder
// Lake on): the AVX2 GEMV with dpbusd for small M; for large M the int8 GEMM on ymm at
// act_bits 8 and for bf16 / float16 x, the AVX2 FMA GEMM for float32 x at act_bits 16.
// Returns kUnsupported when the build has no such unit.
Status qmatmul_avxvnni(const QMatmulArgs& a, ThreadPool& pool);
// Whether this build compiled the AVX-VNNI unit (not whether the CPU can run it).
bool avxvnni_built();
// AVX-512 F/BW/DQ/VL + VNNI: dpbusd for small M; for large M, 512-bit dequantize + FMA at
// act_bits 16 and the int8 GEMM (qmatmul_avx512_int8) at act_bits 8.
Status qmatmul_avx512(const QMatmulArgs& a, ThreadPool& pool);
// The AVX-512 unit's int8 GEMM (avx512_int8_gemm.h) for M > 8, any x dtype: int8 x
// (act_bits 8) or both int8 halves of 15-bit x (act_bits 16) on the weights' codes.
Status qmatmul_avx512_int8(const QMatmulArgs& a, ThreadPool& pool);
// AVX-512 + AVX512-BF16, the automatic choice on AMD: the AVX-512 kernels, except for
// M > 8 bf16 x at act_bits 16, which multiplies by the weights dequantized to bf16 (the
// AMX bf16 contract below) with vdpbf16ps, and float16 x at act_bits 16, which runs the
// int8 GEMM on both halves (on Zen 4 / 5 vpdpbusd does four times the multiply-adds of an
// FMA; on Intel cores it issues at half the rate, so `avx512` keeps the FMA GEMM there).
// Returns kUnsupported when the build has no such unit.
Status qmatmul_avx512bf16(const QMatmulArgs& a, ThreadPool& pool);
// Whether this build compiled the AVX512-BF16 GEMM (not whether the CPU can run it).
bool avx512bf16_built();
// AVX-512 + AMX (tiles, bf16): the AVX-512 GEMV for small M; for large M, bf16 x at
// act_bits 16 runs a dense bf16 tile GEMM on the weights dequantized to bf16 (s*c + b in
// float32, rounded once), other x bf16 tile products of the exact weight codes
// (float-grade). Prefill attention on tiles (amx_attention.h), decode and float32 on the
// AVX-512 kernels. Returns kUnsupported when the build has no AMX unit (compiler without
// -mamx-tile), as does attention_amx.
Status qmatmul_amx(const QMatmulArgs& a, ThreadPool& pool);
// Whether this build compiled the AMX kernels (not whether the CPU can run them).
bool amx_built();

Status attention_scalar(const AttentionArgs& a, ThreadPool& pool);
Status attention_avx2(const AttentionArgs& a, ThreadPool& pool);
Status attention_avx512(const AttentionArgs& a, ThreadPool& pool);
// avx512bf16: bf16 prefill with vdpbf16ps (P rounded to bf16, the AMX contract); decode,
// float16 and float32 on attention_avx512. kUnsupported when the unit is a stub.
Status attention_avx512bf16(const AttentionArgs& a, ThreadPool& pool);
// Flash attention on bf16 tiles for tasks of many rows, bf16 and float16 inputs
// (amx_attention.h); attention_avx512 for decode (every task at most 8 rows) and float32.
Status attention_amx(const AttentionArgs& a, ThreadPool& pool);

// Read `bytes` bytes from `data` on every pool thread (disjoint slices) and return a
// checksum so the reads cannot be elided; the benchmark's read-bandwidth anchor.
double read_stream(const void* data, size_t bytes, ThreadPool& pool);

}  // namespace cpu
}  // namespace bitswitch
