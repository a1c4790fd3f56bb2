// CPU kernel interface: argument structs shared by the scalar reference and every
// ISA variant, and the entry points each translation unit defines.
//
// Kernels take raw pointers and sizes, run on the thread pool, and return a Status.
// They assume arguments were validated by the ops glue (csrc/ops_qmatmul.cpp).
#pragma once

#include <cstddef>
#include <cstdint>

namespace bitswitch {

// Element types that cross the kernel boundary.
enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kUInt32 = 3 };

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

// Which implementation runs a kernel. Order matters: a larger value needs more of the CPU.
enum class Variant : int32_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// The always-compiled scalar reference: float32 accumulation of dequantized weights.
Status qmatmul_scalar(const QMatmulArgs& a, ThreadPool& pool);
// AVX2 + FMA + F16C: int8x2 activations with maddubs for small M, dequantize + FMA for large M.
Status qmatmul_avx2(const QMatmulArgs& a, ThreadPool& pool);
// AVX-512 F/BW/DQ/VL + VNNI: dpbusd for small M, 512-bit dequantize + FMA for large M.
Status qmatmul_avx512(const QMatmulArgs& a, ThreadPool& pool);

// Read `bytes` bytes from `data` on every pool thread (disjoint slices) and return a
// checksum so the reads cannot be elided; the benchmark's read-bandwidth anchor.
double read_stream(const void* data, size_t bytes, ThreadPool& pool);

}  // namespace cpu
}  // namespace bitswitch
