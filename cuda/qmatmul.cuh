// qmatmul on NVIDIA GPUs: y[M, N] = x[M, K] @ W[N, K]^T for a nibble-plane weight W
// (csrc/include/bitswitch/format.h) read as INT4 (plane 0) or INT8 (planes 0 and 1).
//
// Three kernels, chosen per call by plan_qmatmul():
//   qmv_tc_kernel (bfloat16 / float16 x, M <= 64: decode and small batches): weights streamed
//               once with evict-first 16-byte loads straight into mma.sync fragments (W as the
//               16-row operand, x as the 8-column one), codes turned into packed 16-bit pairs
//               by one LOP3 against a magic number, the affine map in packed FMAs.
//   qmv_kernel  (float32 x, which has no tensor-core path, every M; 16-bit x rows that are not
//               16-byte aligned): a bandwidth kernel. Each weight byte is read once, with
//               evict-first 16-byte loads, and dequantization is folded into the dot product
//               (MLX's trick, below), so the per-element work is two integer ops and one FFMA
//               per row of x.
//   qmm_kernel  (M > 64, bfloat16 / float16 x): a tensor-core GEMM. A 4-stage cp.async pipeline
//               brings the x tile and the packed plane tiles to shared memory, the block
//               dequantizes each W tile once to x's type in shared memory, and every warp reads
//               both operands with ldmatrix into mma.sync m16n8k16, in 128 x 128 block tiles.
// (BITSWITCH_CUDA_SMALL_M=simt sends 16-bit x with M <= 64 to qmv_kernel, M <= 2, and to
// qmm_kernel's 16 x 256, 32 x 256 and 64 x 128 tiles instead, for comparisons.) dequantize_kernel writes W as a dense
// matrix, for prefill through a dense GEMM (bitswitch.torch, M >= BITSWITCH_CUDA_DEQUANT_M).
// All three split K across blocks through the caller's workspace when the M x N tiles alone cannot
// fill the GPU (float32 partials [S, M, N], then qmm_splitk_reduce_kernel sums them in a fixed
// order: deterministic, no atomics, graph-capturable).
//
// The code-to-float trick of qmv_kernel and qmm_kernel: OR-ing a 4-bit code q into mantissa bits 19..22 of
// 1.0f gives the float 1 + q/16 exactly, in one LOP3 after a shift (an I2F conversion runs at a
// quarter of the FMA rate on sm_80/sm_90 and would be the bottleneck of the GEMV). With
// f = 1 + q/16 every view is one affine map of f:
//   INT4:  w = s*q + b                      = (16 s) * f + (b - 16 s)
//   INT8:  fc = 16 f0 + f1 = 17 + c/16,  c = 16 q + r (exact: 10 significant bits)
//          w = (s/16) c + b - 7.5 s/16      = s * fc + (b - 7.5 s/16 - 17 s)
// so w = A*f + B with per-group constants A, B (code_affine()). For a dot product over a chunk
// of one group, sum_k x_k w_k = A * sum_k x_k f_k + B * sum_k x_k: the sum of x per chunk is
// computed once per row of x when x is staged, not once per output row.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <algorithm>

#include "common.cuh"

namespace bitswitch {
namespace cuda {

// ---- The contract ------------------------------------------------------------------------------

struct QMatmulParams {
  const void* x;          // x: [M, K] row-major, x_dtype (float32, bfloat16 or float16)
  void* y;                // y: [M, N] row-major, x_dtype
  const uint32_t* plane0; // [N, K/8] INT4 codes q (format.h order: element k in bits 4*(k%8) of word k/8)
  const uint32_t* plane1; // [N, K/8] residuals r; read only when bits == 8
  const void* scales;     // [N, K/G], scale_dtype
  const void* biases;     // [N, K/G], scale_dtype
  int64_t m, n, k;        // k a multiple of group_size; m, n >= 1
  int32_t group_size;     // 32, 64 or 128
  int32_t bits;           // 4: w = s*q + b ; 8: w = s*q + b + (s/16)*(r - 7.5)
  DType x_dtype, scale_dtype;
};

// Bytes of scratch the launcher can use for this call (split-K partials); 0 if none. It runs
// with less or none (split-K off or narrower), more slowly when the GPU is then underfilled.
inline size_t qmatmul_workspace_bytes(const QMatmulParams& p, int num_sms);
// Launches on `stream` without allocating or synchronizing (capturable in a CUDA graph).
inline cudaError_t qmatmul(const QMatmulParams& p, void* workspace, size_t workspace_bytes, int num_sms,
                    cudaStream_t stream);

// W[N, K] dequantized into p.y (dtype p.x_dtype; p.x and p.m unused), each weight computed as
// the tensor-core GEMM's tiles compute it (w = A f + B in float, rounded once). For prefill the
// caller can run a dense GEMM on it (bitswitch.torch does, through cuBLAS, from M >=
// BITSWITCH_CUDA_DEQUANT_M rows). Same signature as qmatmul (the workspace is unused).
inline cudaError_t dequantize(const QMatmulParams& p, void* workspace, size_t workspace_bytes, int num_sms,
                              cudaStream_t stream);

// One per activation dtype, each defined in its own instance file (qmatmul_<dtype>.cu) so the
// three compile in parallel; qmatmul() / dequantize() pick one.
cudaError_t qmatmul_f32(const QMatmulParams& p, void* ws, size_t ws_bytes, int num_sms, cudaStream_t stream);
cudaError_t qmatmul_bf16(const QMatmulParams& p, void* ws, size_t ws_bytes, int num_sms, cudaStream_t stream);
cudaError_t qmatmul_f16(const QMatmulParams& p, void* ws, size_t ws_bytes, int num_sms, cudaStream_t stream);
cudaError_t dequantize_f32(const QMatmulParams& p, int num_sms, cudaStream_t stream);
cudaError_t dequantize_bf16(const QMatmulParams& p, int num_sms, cudaStream_t stream);
cudaError_t dequantize_f16(const QMatmulParams& p, int num_sms, cudaStream_t stream);

// ---- Dequantization ----------------------------------------------------------------------------
namespace qmm {

namespace fmt = bitswitch::format;

// Codes per 16-byte load of one plane: a "chunk". Group sizes are multiples of it, so a chunk
// (and a GEMM k-tile, which is one chunk long) never straddles two groups.
constexpr int kChunk = 4 * fmt::kValuesPerWord;
static_assert(kChunk == 32 && fmt::kMinGroupSize % kChunk == 0, "a 16-byte chunk of a plane lies in one group");
// The code-to-float trick puts a code at mantissa bits kMagicShift.. of 1.0f: f = 1 + q / kMagicDiv.
constexpr int kMagicShift = 23 - fmt::kPlaneBits;
constexpr float kMagicDiv = float(1 << fmt::kPlaneBits);
static_assert(fmt::kResidualDivisor == (1 << fmt::kPlaneBits), "fc = 16 f0 + f1 = 17 + c/16 needs step s/16");

BS_DEVICE float as_float(uint32_t u) {
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

// 1 + (code i of `word`) / 16, exactly. `i` is a constant after unrolling, so this is one
// shift and one LOP3.
BS_DEVICE float code_f(uint32_t word, int i) {
  const int at = fmt::kPlaneBits * i;
  const uint32_t moved = at <= kMagicShift ? word << (kMagicShift - at) : word >> (at - kMagicShift);
  return as_float((moved & (uint32_t(fmt::kCodeMax) << kMagicShift)) | 0x3F800000u);
}

// The float f of element i of a word pair: 1 + q/16 (INT4) or 17 + (16q + r)/16 (INT8).
template <int kPlanes> BS_DEVICE float view_f(uint32_t w0, uint32_t w1, int i) {
  const float f0 = code_f(w0, i);
  return kPlanes == 1 ? f0 : fmaf(f0, kMagicDiv, code_f(w1, i));
}

// (A, B) with w = A * view_f + B for a group of scale s and bias b (derivation at the top).
template <int kPlanes> BS_DEVICE float2 code_affine(float s, float b) {
  if (kPlanes == 1) return make_float2(kMagicDiv * s, fmaf(-kMagicDiv, s, b));
  constexpr float kOffset = kMagicDiv + 1.0f + fmt::kResidualCenter / float(fmt::kResidualDivisor);  // 17 + 7.5/16
  return make_float2(s, fmaf(-kOffset, s, b));
}

BS_DEVICE uint32_t word_of(const uint4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

// ---- GEMV: qmv_kernel --------------------------------------------------------------------------
//
// Block: 8 warps. A block owns a K range (its split) and loops over groups of 8*4 output rows
// (4 rows per warp), so the x slice it stages in shared memory is reused for every row group it
// visits. Within a warp, lane l reads chunks l, l+32, ... of each of its 4 rows with 16-byte
// evict-first loads, all of a step's loads (64-128 bytes per lane) issued before any math, plus
// each chunk's scale and bias. Registers per ptxas: <= 128 for MT <= 4 (2 blocks = 16 warps per
// SM); MT 8 and 16 use up to 255 (one block per SM), which is fine for them: they are bound by
// FMAs, not by bytes in flight.
//
// Shared memory (float): x staged as float, row m, chunk c at xs[(m*stage_chunks + c)*36 ..]:
// each 32-float chunk is padded to 36 because the 8 lanes of one LDS.128 phase read 8
// consecutive chunks; 144 bytes apart they land on 8 distinct 16-byte bank groups (36 l mod 32
// = 4 l), where 128 bytes apart all 8 would hit the same banks. Then xsum[m*stage_chunks + c],
// the sum of each staged chunk.
constexpr int kQmvThreads = 256;
constexpr int kQmvWarps = kQmvThreads / 32;
constexpr int kQmvChunkStride = kChunk + 4;
// Splits are at least this many chunks long (256 inputs): shorter ones would leave most lanes idle.
constexpr int kQmvMinSplitChunks = 8;

// Output rows per warp. 4 rows share each x value a lane reads from shared memory: with fewer,
// the LDS.128 traffic (4 bytes per FMA per row of W) would outrun the FMA pipe at MT >= 8.
constexpr int kQmvRowsPerWarp = 4;
// Chunks of x staged at once: 37 KiB of x for MT <= 8 (several blocks can share an SM's shared
// memory), 74 KiB for MT = 16 (one lane step of 1024 inputs; fewer would idle lanes).
BS_HOST_DEVICE constexpr int qmv_max_stage_chunks(int mt) { return mt >= 8 ? 32 : 256 / mt; }

// x as float (36 per chunk) and the chunk sums, for mt rows and `chunks` chunks.
BS_HOST_DEVICE constexpr size_t qmv_smem_bytes(int mt, int chunks) {
  return size_t(mt) * size_t(chunks) * (kQmvChunkStride + 1) * sizeof(float);
}

// The block's shape of the work, computed on the host by plan_qmatmul().
struct QmvShape {
  int64_t split_chunks;  // chunks (32 inputs) of K per split; blockIdx.x is the split
  int32_t stage_chunks;  // chunks of x staged in shared memory at once (<= split_chunks)
  int32_t row_groups;    // groups of 8*R output rows; blockIdx.y starts at one, strides gridDim.y
};

// y[m0 + m, n] (or partials[split, m0 + m, n] when split-K) for the M tile m0 = blockIdx.z * MT.
//   T: x and y's type; MT: rows of x per launch tile (1, 2, 4, 8, 16; rows past M are zero);
//   kPlanes: 1 (INT4 view) or 2 (INT8 view).
// p: the call (pointers and shapes as documented on QMatmulParams).
// shape: the split and staging sizes.
// partials: [gridDim.x, M, N] float32 when gridDim.x > 1 (split-K), else unused (y written).
template <class T, int MT, int kPlanes>
__global__ void __launch_bounds__(kQmvThreads, MT >= 8 ? 1 : 2) qmv_kernel(const QMatmulParams p, const QmvShape shape,
                                                                  float* partials) {
  constexpr int R = kQmvRowsPerWarp;
  // Chunks per lane per step: at MT <= 2 the kernel is bound by the weight stream and a second
  // INT4 chunk doubles the bytes each lane keeps in flight to 128 (the INT8 view's two planes
  // already give that); past MT = 2 it is bound by FMAs.
  constexpr int U = MT <= 2 && kPlanes == 1 ? 2 : 1;
  // MT <= 4: MLX's fold (two FMAs per chunk apply the group's affine map: 2 integer ops + MT
  // FMAs per element and row). MT >= 8: dequantize each element once (one FMA, shared by the
  // MT rows of x), which saves the [MT][R] chunk partials' registers.
  constexpr bool kFold = MT <= 4;
  constexpr int kEpv = 16 / int(sizeof(T));   // x elements per 16-byte load
  constexpr int kLanesPerChunk = kChunk / kEpv;
  BS_DYNAMIC_SMEM(float, smem);
  float* xs = smem;                                                     // [MT][stage_chunks][36]
  float* xsum = smem + MT * shape.stage_chunks * kQmvChunkStride;       // [MT][stage_chunks]

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t M = p.m, N = p.n, K = p.k;
  const int64_t words = fmt::words_per_row(K), groups = fmt::groups_per_row(K, p.group_size);
  const int64_t c_begin = int64_t(blockIdx.x) * shape.split_chunks;
  const int64_t c_end = c_begin + shape.split_chunks < K / kChunk ? c_begin + shape.split_chunks : K / kChunk;
  const int64_t m0 = int64_t(blockIdx.z) * MT;
  int group_shift = 0;  // chunk -> group index: G / 32 is 1, 2 or 4
  while ((kChunk << group_shift) < p.group_size) ++group_shift;
  const T* x = static_cast<const T*>(p.x);
  const bool x_vec = (reinterpret_cast<uintptr_t>(x) & 15) == 0;  // rows are 64-byte multiples

  int64_t staged = -1;  // first chunk of the x slice now in shared memory
  for (int64_t rg = blockIdx.y; rg < shape.row_groups; rg += gridDim.y) {
    const int64_t n0 = (rg * kQmvWarps + warp) * R;
    float acc[MT][R];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int r = 0; r < R; ++r) acc[m][r] = 0.0f;

    for (int64_t cs = c_begin; cs < c_end; cs += shape.stage_chunks) {
      const int nch = int(c_end - cs < shape.stage_chunks ? c_end - cs : shape.stage_chunks);
      if (cs != staged) {  // block-uniform: the whole block walks the same slices
        if (staged >= 0) __syncthreads();  // every warp is done reading the previous slice
        // x[m0.., cs*32 ..] as float, and each chunk's sum: kLanesPerChunk consecutive lanes
        // load one chunk and reduce its sum with shuffles (v % kLanesPerChunk == lane % ...).
        const int total = MT * nch * kLanesPerChunk;
        for (int base = 0; base < total; base += kQmvThreads) {
          const int v = base + tid;
          const int m = v / (nch * kLanesPerChunk), rem = v % (nch * kLanesPerChunk);
          const int c = rem / kLanesPerChunk, j = rem % kLanesPerChunk;
          float vals[kEpv];
#pragma unroll
          for (int e = 0; e < kEpv; ++e) vals[e] = 0.0f;
          if (v < total && m0 + m < M) {
            const T* src = x + (m0 + m) * K + (cs + c) * kChunk + j * kEpv;
            if (x_vec) {
              const uint4 raw = ptx::ld_nc(src);
              T t[kEpv];
              __builtin_memcpy(t, &raw, 16);
#pragma unroll
              for (int e = 0; e < kEpv; ++e) vals[e] = to_float(t[e]);
            } else {
#pragma unroll
              for (int e = 0; e < kEpv; ++e) vals[e] = to_float(src[e]);
            }
          }
          float sum = 0.0f;
#pragma unroll
          for (int e = 0; e < kEpv; ++e) sum += vals[e];
#pragma unroll
          for (int o = 1; o < kLanesPerChunk; o <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
          if (v < total) {
            float* dst = xs + (m * shape.stage_chunks + c) * kQmvChunkStride + j * kEpv;
#pragma unroll
            for (int e = 0; e < kEpv; e += 4) *reinterpret_cast<float4*>(dst + e) = make_float4(vals[e], vals[e + 1], vals[e + 2], vals[e + 3]);
            if (j == 0) xsum[m * shape.stage_chunks + c] = sum;
          }
        }
        __syncthreads();
        staged = cs;
      }
      if (n0 >= N) continue;  // a warp past the last row still joins the block's barriers

      for (int64_t c = cs + lane; c < cs + nch; c += 32 * U) {
        // Every load of the step first: U*R*kPlanes 16-byte streams plus scales in flight
        // before any math (the compiler keeps volatile loads in program order).
        uint4 w0[U][R], w1[U][R];
        float s[U][R], b[U][R];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t cu = c + 32 * u;
#pragma unroll
          for (int r = 0; r < R; ++r) {
            const int64_t n = n0 + r;
            w0[u][r] = w1[u][r] = make_uint4(0, 0, 0, 0);
            s[u][r] = b[u][r] = 0.0f;
            if (n < N && cu < cs + nch) {
              w0[u][r] = ptx::ld_stream(p.plane0 + n * words + cu * 4);
              if (kPlanes == 2) w1[u][r] = ptx::ld_stream(p.plane1 + n * words + cu * 4);
              s[u][r] = load_scale(p.scales, n * groups + (cu >> group_shift), p.scale_dtype);
              b[u][r] = load_scale(p.biases, n * groups + (cu >> group_shift), p.scale_dtype);
            }
          }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int lc = int(c - cs) + 32 * u;
          if (u > 0 && lc >= nch) break;  // (its staged x would be stale)
          float2 ab[R];
#pragma unroll
          for (int r = 0; r < R; ++r) ab[r] = code_affine<kPlanes>(s[u][r], b[u][r]);
          float part[MT][R];
#pragma unroll
          for (int m = 0; m < MT; ++m)
#pragma unroll
            for (int r = 0; r < R; ++r) part[m][r] = 0.0f;
#pragma unroll
          for (int i = 0; i < 4; ++i) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              // Four elements (8i + 4h ..) of R rows, shared by every row of x: f (folded)
              // or w = A f + B.
              float f[R][4];
#pragma unroll
              for (int r = 0; r < R; ++r)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                  f[r][e] = view_f<kPlanes>(word_of(w0[u][r], i), word_of(w1[u][r], i), 4 * h + e);
                  if (!kFold) f[r][e] = fmaf(ab[r].x, f[r][e], ab[r].y);
                }
#pragma unroll
              for (int m = 0; m < MT; ++m) {
                const float4 xv =
                    *reinterpret_cast<const float4*>(xs + (m * shape.stage_chunks + lc) * kQmvChunkStride + 8 * i + 4 * h);
#pragma unroll
                for (int r = 0; r < R; ++r) {
                  float a = kFold ? part[m][r] : acc[m][r];
                  a = fmaf(xv.x, f[r][0], a);
                  a = fmaf(xv.y, f[r][1], a);
                  a = fmaf(xv.z, f[r][2], a);
                  a = fmaf(xv.w, f[r][3], a);
                  (kFold ? part[m][r] : acc[m][r]) = a;
                }
              }
            }
          }
          if (kFold) {
            // sum x*w over the chunk = A * sum x*f + B * sum x (one group: one A, B per row).
#pragma unroll
            for (int m = 0; m < MT; ++m) {
              const float xsm = xsum[m * shape.stage_chunks + lc];
#pragma unroll
              for (int r = 0; r < R; ++r) acc[m][r] = fmaf(part[m][r], ab[r].x, fmaf(xsm, ab[r].y, acc[m][r]));
            }
          }
        }
      }
    }
    if (n0 >= N) continue;

    // Lane sums -> warp sums (every lane ends with all of them); lane (m*R + r) % 32 stores one.
#pragma unroll
    for (int m = 0; m < MT; ++m) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float v = acc[m][r];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        const int64_t mm = m0 + m, n = n0 + r;
        if (lane == (m * R + r) % 32 && mm < M && n < N) {
          if (gridDim.x > 1)
            partials[(int64_t(blockIdx.x) * M + mm) * N + n] = v;
          else
            static_cast<T*>(p.y)[mm * N + n] = from_float<T>(v);
        }
      }
    }
  }
}

// ---- Small batches on tensor cores: qmv_tc_kernel ----------------------------------------------
//
// 16-bit x with M <= 64 rows (33-64 as two tiles). The FFMA GEMV above spends ~3 issue slots
// per weight and row of x on the code-to-float trick and the FMA (its inner loop issues ~12
// lane-instructions per byte of INT4 weights at M = 1 by ptxas's SASS, where an H200 streams a
// byte per ~7), and the tensor-core GEMM below pays a shared-memory round trip and a barrier
// per 32 inputs for dequantized tiles that only one warp reads when M <= 16 (~32 per byte).
// This kernel takes weights from global memory straight into mma.sync fragments, W as the
// m16 operand and x as the n8 one (y^T = W x^T: no zero rows to pad at M <= 8):
//
// Block: 8 warps; a warp owns 16 rows of W and the block's K range (its split), and the block
// loops over groups of 8 * 16 rows so the x slice it stages is reused. Lane l = 4g + t takes,
// per step of 4 chunks (128 inputs), chunk (c + t) of W rows g and g + 8: one 16-byte
// evict-first load per row and plane, the 4 lanes of a row reading 64 contiguous bytes. Every
// chunk lies in one group, so a lane needs one scale and bias per load. A word (8 codes) then
// feeds two m16n8k16 steps per 8 rows of x: LOP3 against a magic number turns codes (i, i + 4)
// into the packed 16-bit pair P = M + q (M = 128 in bfloat16, 1024 in float16; exact). The
// affine map w = S q + B = S P + (B - M S) is applied in T with S and B' = B - M S each split
// into a T part and a T remainder (so the rounding of the scales to T costs nothing): three
// packed FMAs, w = (S_hi P + B'_hi) + (S_lo P + B'_lo), within about one unit in the last place
// of w. The INT8 view first joins the exact c = 16 q + r (c <= 255 needs 8 significant bits)
// and maps c the same way with M = 0. About 3 issue slots per weight whatever M (by the SASS,
// 6 lane-instructions per INT4 byte with stored scales, 7 per INT8 byte: bench/cuda_resources.py).
//
// mma needs A's and B's k indices to match, not to be in order: lane t's registers hold k slots
// (2t, 2t+1) and (2t+8, 2t+9), which here are codes (2i, 2i+4) and (2i+1, 2i+5) of word w of its
// own chunk. So x is staged in shared memory in that order: per row, word and chunk one uint4
// of the pairs (0,4) (1,5) (2,6) (3,7), which is b[0], b[1] of the steps i = 0 and 1, laid out
// [row][word][chunk] so the 4 lanes of a row read 64 contiguous bytes (a row pitch of 4 mod 8
// uint4 puts rows g and g + 1 on other banks). Rows of x past M are zero.
constexpr int kTcThreads = 256;
constexpr int kTcWarps = kTcThreads / 32;
constexpr int kTcRowsPerGroup = kTcWarps * 16;
constexpr int kTcQuad = 4;  // chunks per warp step (one per lane of a row)
// Splits are at least this many chunks (2 steps of every lane) long.
constexpr int kTcMinSplitChunks = 2 * kTcQuad;

// Chunks of x staged at once (a multiple of 8, two steps of every lane): 64 KiB for any MT.
BS_HOST_DEVICE constexpr int qmv_tc_max_stage_chunks(int mt) { return 1024 / mt; }
// uint4 per staged row of x: 4 per chunk, padded to 4 mod 8.
BS_HOST_DEVICE constexpr int qmv_tc_row_pitch(int stage_chunks) {
  return 4 * stage_chunks + ((stage_chunks & 1) ? 0 : 4);
}
BS_HOST_DEVICE constexpr size_t qmv_tc_smem_bytes(int mt, int stage_chunks) {
  return size_t(mt) * size_t(qmv_tc_row_pitch(stage_chunks)) * 16;
}

// Packed-pair constants of T: M + q for a 4-bit q OR-ed into the mantissa, -M, 1 and 16; T's DType.
template <class T> struct TcMagic;
template <> struct TcMagic<__nv_bfloat16> {
  static constexpr uint32_t kMagic = 0x43004300u, kNegMagic = 0xC300C300u, kOne = 0x3F803F80u, kSixteen = 0x41804180u;
  static constexpr DType kDType = DType::kBFloat16;
};
template <> struct TcMagic<__half> {
  static constexpr uint32_t kMagic = 0x64006400u, kNegMagic = 0xE400E400u, kOne = 0x3C003C00u, kSixteen = 0x4C004C00u;
  static constexpr DType kDType = DType::kFloat16;
};

// Codes (i, i + 4) of `word` as the exact packed pair of T.
template <class T> BS_DEVICE uint32_t code_pair(uint32_t word, int i) {
  using K = TcMagic<T>;
  return ptx::fma2<T>(ptx::and_or(word >> (fmt::kPlaneBits * i), 0x000F000Fu, K::kMagic), K::kOne, K::kNegMagic);
}

// A lane's affine map of one group as packed pairs of T: w = (hi.x P + hi.y) + (lo.x P + lo.y).
struct TcAffine {
  uint2 hi, lo;
};
// (S, B) of the view for P (INT4: P = M + q; INT8: P = c): S and B - M S split into T parts.
template <class T, int kPlanes> BS_DEVICE TcAffine tc_affine(float s, float b) {
  float S = s, B = b;
  if (kPlanes == 2) {
    B = fmt::int8_bias(s, b);
    S = fmt::int8_scale(s);
  } else {
    B = fmaf(-unpack2<T>(TcMagic<T>::kMagic).x, S, B);  // B - M S (M a power of two: exact product)
  }
  const float sh = unpack2<T>(pack2<T>(S, S)).x, bh = unpack2<T>(pack2<T>(B, B)).x;
  TcAffine a;
  a.hi = make_uint2(pack2<T>(sh, sh), pack2<T>(bh, bh));
  a.lo = make_uint2(pack2<T>(S - sh, S - sh), pack2<T>(B - bh, B - bh));
  return a;
}

// INT4 with scales and biases stored in T (the common case: MLX checkpoints, bitswitch.quantize
// with scales_dtype of x's): w = s q + b is one packed FMA on the exact q, rounded once like
// the reference, and S, B need no split: hi = (s, b) as stored, lo unused.
template <class T> BS_DEVICE TcAffine tc_affine_stored(uint16_t s, uint16_t b) {
  TcAffine a;
  a.hi = make_uint2(uint32_t(s) | (uint32_t(s) << 16), uint32_t(b) | (uint32_t(b) << 16));
  a.lo = make_uint2(0u, 0u);
  return a;
}

// The packed weights (w of codes i, i + 4) of one word pair; kStored: tc_affine_stored's map.
template <class T, int kPlanes, bool kStored>
BS_DEVICE uint32_t weight_pair(uint32_t w0, uint32_t w1, int i, const TcAffine& f) {
  using K = TcMagic<T>;
  if (kStored) return ptx::fma2<T>(code_pair<T>(w0, i), f.hi.x, f.hi.y);
  uint32_t p2;
  if (kPlanes == 1) {
    p2 = ptx::and_or(w0 >> (fmt::kPlaneBits * i), 0x000F000Fu, K::kMagic);
  } else {
    p2 = ptx::fma2<T>(code_pair<T>(w0, i), K::kSixteen, code_pair<T>(w1, i));
  }
  const uint32_t v = ptx::fma2<T>(p2, f.hi.x, f.hi.y), u = ptx::fma2<T>(p2, f.lo.x, f.lo.y);
  return ptx::fma2<T>(v, K::kOne, u);
}

// y[m0 + m, n] (or partials[split, m0 + m, n] when split-K) for the M tile m0 = blockIdx.z * MT.
//   T: __nv_bfloat16 or __half; MT: 8, 16 or 32 rows of x per tile; kPlanes: 1 (INT4) or 2 (INT8);
//   kStored: INT4 with scales of dtype T (tc_affine_stored), else any view and scale dtype.
// p: the call; x 16-byte aligned (the planner sends other x to qmv_kernel).
// shape: the split and staging sizes.
// partials: [gridDim.x, M, N] float32 when gridDim.x > 1 (split-K), else unused (y written).
template <class T, int MT, int kPlanes, bool kStored>
__global__ void __launch_bounds__(kTcThreads, 2) qmv_tc_kernel(const QMatmulParams p, const QmvShape shape,
                                                             float* partials) {
  static_assert(MT == 8 || MT == 16 || MT == 32, "qmv_tc_kernel tiles: 8, 16 or 32 rows of x");
  static_assert(!kStored || kPlanes == 1, "the stored-scale map is INT4's");
  constexpr int kXTiles = MT / 8;  // n8 tiles of x
  // Steps whose loads are in flight at once: 64 bytes per lane for either view.
  constexpr int U = kPlanes == 1 ? 2 : 1;
  BS_DYNAMIC_SMEM(uint4, xs);  // [MT][row pitch]: x permuted as described above
  const int pitch = qmv_tc_row_pitch(shape.stage_chunks);

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, t = lane % 4;
  const int64_t M = p.m, N = p.n, K = p.k;
  const int64_t words = fmt::words_per_row(K), groups = fmt::groups_per_row(K, p.group_size);
  const int64_t c_begin = int64_t(blockIdx.x) * shape.split_chunks;
  const int64_t c_end = c_begin + shape.split_chunks < K / kChunk ? c_begin + shape.split_chunks : K / kChunk;
  const int64_t m0 = int64_t(blockIdx.z) * MT;
  int group_shift = 0;  // chunk -> group index: G / 32 is 1, 2 or 4
  while ((kChunk << group_shift) < p.group_size) ++group_shift;
  const T* x = static_cast<const T*>(p.x);

  int64_t staged = -1;
  for (int64_t rg = blockIdx.y; rg < shape.row_groups; rg += gridDim.y) {
    const int64_t n0 = (rg * kTcWarps + warp) * 16;
    // This lane's two W rows (g, g + 8): plane rows as uint4 (one per chunk) and the rows of
    // scales, so the loop indexes them with 32-bit chunk and group numbers (one wide
    // multiply-add per load, no 64-bit arithmetic); a bias sits bias_delta bytes after its
    // scale (one pointer pair less: the 32-row tile is at the 128-register cap). Rows past N
    // read row 0 (S = B = 0).
    const int64_t scale_bytes = p.scale_dtype == DType::kFloat32 ? 4 : 2;
    const int64_t bias_delta = static_cast<const char*>(p.biases) - static_cast<const char*>(p.scales);
    const uint4* prow0[2];
    const uint4* prow1[2];
    const char* srow[2];
    bool rok[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t n = n0 + 8 * r + g;
      rok[r] = n < N;
      const int64_t nn = rok[r] ? n : 0;
      prow0[r] = reinterpret_cast<const uint4*>(p.plane0 + nn * words);
      prow1[r] = reinterpret_cast<const uint4*>((kPlanes == 2 ? p.plane1 : p.plane0) + nn * words);
      srow[r] = static_cast<const char*>(p.scales) + nn * groups * scale_bytes;
    }
    float acc[kXTiles][4];
#pragma unroll
    for (int i = 0; i < kXTiles; ++i)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][c] = 0.0f;

    for (int64_t cs = c_begin; cs < c_end; cs += shape.stage_chunks) {
      const int nch = int(c_end - cs < shape.stage_chunks ? c_end - cs : shape.stage_chunks);
      if (cs != staged) {  // block-uniform
        if (staged >= 0) __syncthreads();
        // One uint4 per (row, word, chunk): x[m0 + m, (cs + c) * 32 + 8 w ..] reordered to the
        // pairs (0,4) (1,5) (2,6) (3,7); rows past M, and chunks from nch up to whole steps of
        // every lane (npad), are zero, so the loop below reads x unpredicated.
        const int npad = (nch + kTcQuad * U - 1) / (kTcQuad * U) * (kTcQuad * U);
        const int total = MT * kTcQuad * npad;
        for (int v = tid; v < total; v += kTcThreads) {
          const int m = v / (kTcQuad * npad), rem = v % (kTcQuad * npad), w = rem / npad, c = rem % npad;
          uint4 out = make_uint4(0, 0, 0, 0);
          if (m0 + m < M && c < nch) {
            const uint4 r = ptx::ld_nc(x + (m0 + m) * K + (cs + c) * kChunk + 8 * w);
            out.x = (r.x & 0xffffu) | (r.z << 16);
            out.y = (r.x >> 16) | (r.z & 0xffff0000u);
            out.z = (r.y & 0xffffu) | (r.w << 16);
            out.w = (r.y >> 16) | (r.w & 0xffff0000u);
          }
          xs[m * pitch + w * shape.stage_chunks + c] = out;
        }
        __syncthreads();
        staged = cs;
      }
      if (n0 >= N) continue;  // a warp past the last row still joins the block's barriers

      for (int q = 0; q < nch; q += kTcQuad * U) {
        // Every load of the U steps first (2 rows x kPlanes 16-byte streams each, and the
        // scales), then the math. Lanes past the slice or N read a valid chunk (row 0 or the
        // slice's first) and get S = B = 0: their weights are exactly 0, their x is 0.
        uint4 w0[U][2], w1[U][2];
        TcAffine f[U][2];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int lc = q + kTcQuad * u + t;  // this lane's chunk in the slice
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const bool ok = rok[r] && lc < nch;
            const int c = int(cs) + (lc < nch ? lc : 0);  // chunk index in the row (K / 32 < 2^31)
            const int gi = c >> group_shift;
            w0[u][r] = ptx::ld_stream(prow0[r] + c);
            w1[u][r] = kPlanes == 2 ? ptx::ld_stream(prow1[r] + c) : make_uint4(0, 0, 0, 0);
            if (kStored) {
              const uint16_t* sp = reinterpret_cast<const uint16_t*>(srow[r]) + gi;
              const uint16_t s = *sp, b = *reinterpret_cast<const uint16_t*>(reinterpret_cast<const char*>(sp) + bias_delta);
              f[u][r] = tc_affine_stored<T>(ok ? s : uint16_t(0), ok ? b : uint16_t(0));
            } else {
              const float s = load_scale(srow[r], gi, p.scale_dtype), b = load_scale(srow[r] + bias_delta, gi, p.scale_dtype);
              f[u][r] = tc_affine<T, kPlanes>(ok ? s : 0.0f, ok ? b : 0.0f);
            }
          }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (u > 0 && q + kTcQuad * u >= nch) break;  // warp-uniform: the whole step is past the slice
          const int lc = q + kTcQuad * u + t;
#pragma unroll
          for (int wi = 0; wi < 4; ++wi) {
            // a[h]: W rows g, g + 8 at codes (2h, 2h+4) [k slots 2t, 2t+1] and (2h+1, 2h+5)
            // [2t+8, 2t+9] of word wi; then every n8 tile of x takes both steps.
            uint32_t a[2][4];
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
              for (int e = 0; e < 2; ++e)
#pragma unroll
                for (int r = 0; r < 2; ++r)
                  a[h][2 * e + r] = weight_pair<T, kPlanes, kStored>(word_of(w0[u][r], wi), word_of(w1[u][r], wi),
                                                                      2 * h + e, f[u][r]);
#pragma unroll
            for (int i = 0; i < kXTiles; ++i) {
              const uint4 xv = xs[(8 * i + g) * pitch + wi * shape.stage_chunks + lc];
              const uint32_t b0[2] = {xv.x, xv.y}, b1[2] = {xv.z, xv.w};
              ptx::mma_m16n8k16<T>(acc[i], a[0], b0, acc[i]);
              ptx::mma_m16n8k16<T>(acc[i], a[1], b1, acc[i]);
            }
          }
        }
      }
    }
    if (n0 >= N) continue;

    // acc[i]: c[0], c[1] = W row g, x rows 8i + 2t, + 1; c[2], c[3] = W row g + 8, same x rows.
#pragma unroll
    for (int i = 0; i < kXTiles; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t mm = m0 + 8 * i + 2 * t + (e % 2), n = n0 + g + 8 * (e / 2);
        if (mm < M && n < N) {
          if (gridDim.x > 1)
            partials[(int64_t(blockIdx.x) * M + mm) * N + n] = acc[i][e];
          else
            static_cast<T*>(p.y)[mm * N + n] = from_float<T>(acc[i][e]);
        }
      }
    }
  }
}

// y = sum over splits of partials, rounded once to T.
// partials: [splits, M*N] float32; y: [M*N] T.
template <class T>
__global__ void __launch_bounds__(256, 1) qmm_splitk_reduce_kernel(const float* partials, T* y, int32_t splits,
                                                                        int64_t mn) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < mn; i += int64_t(gridDim.x) * blockDim.x) {
    float v = 0.0f;
    for (int s = 0; s < splits; ++s) v += partials[s * mn + i];
    y[i] = from_float<T>(v);
  }
}

// ---- GEMM: qmm_kernel --------------------------------------------------------------------------
//
// One kernel, four block tiles (kBM rows of x by kBN rows of W by 32 inputs), 8 warps:
//   kBM = 16, 32: kBM x 256, the 8 warps side by side along N, each warp kBM x 32 (Marlin's
//              shape for small batches). Every warp multiplies the same x fragments (one
//              ldmatrix address per row, broadcast by shared memory) by its own 32 columns of W,
//              so however few rows x has, a block streams 256 rows of W at full width: 4 KiB per
//              k-tile for INT4, 12 KiB in flight with 3 tiles ahead.
//   kBM = 64, 128: kBM x 128, warps 2 (M) x 4 (N), each warp kBM/2 x 32. At 128 rows (prefill)
//              4 A fragments are reused over 4 B fragments, 16 mma per k16 step and warp. A
//              64 x 256 tile of 1 x 8 warps would need 64 accumulators plus 4 words of W per
//              thread, past the 128 registers of 2 blocks per SM (ptxas spills ~260 bytes).
// Per k16 step a warp loads kMi = (its rows) / 16 A fragments and two ldmatrix.x4 of B (4 n8
// tiles), for kMi x 4 mma.m16n8k16 (16 kMi float accumulators per thread).
// The k-tile is one 32-input chunk: one 16-byte cp.async per W row and plane, and one group per
// tile (G >= 32), so a tile needs one scale and bias per row.
//
// Dequantizing W once per block in shared memory, rather than per warp in registers, does the
// ALU work once for all the block's rows of x (the two M warps of the 128-row tile would each
// redo it) and lets B fragments come from ldmatrix like A. The pipeline runs one tile ahead:
// while the warps multiply tile t, they also dequantize tile t+1 into the other half of a double
// buffer, so the dequantization's integer and FMA work overlaps other warps' mma and one
// __syncthreads per tile suffices.
//
// Shared memory (16-byte units), all rows of 64 bytes = 4 chunks of 8 halves:
//   As: [kStages][kBM][4]            x tiles, chunk c of row r stored at c ^ ((r >> 1) & 3)
//   Ws: [kStages][kPlanes][kBN]      raw plane words, 16 bytes per W row per plane
//   Bd: [2][kBN][4]                  dequantized W tile (row = n, k contiguous), same swizzle
// The XOR swizzle makes the 8 rows of each ldmatrix 8x8 matrix (64 bytes apart) hit 8 distinct
// 16-byte bank groups: rows 2j and 2j+1 share the 128-byte bank cycle, and j picks the chunk.
constexpr int kQmmBK = kChunk;
constexpr int kQmmThreads = 256;
constexpr int kQmmWarps = kQmmThreads / 32;
constexpr int kQmmStages = 4;
constexpr int kQmmWarpN = 32;                       // W rows (output columns) per warp: 4 n8 tiles
constexpr int kQmmRowChunks = kQmmBK * 2 / 16;      // 4
// Split-K gives every split of the 128-row tile at least this many k-tiles (128 inputs) to
// amortize the epilogue.
constexpr int kQmmMinSplitTiles = 4;
static_assert(kQmmStages >= 3, "the dequantization runs one tile ahead of the mma");

// Warps along M: 2 from 64 rows on, 1 (every warp holds all rows) below.
BS_HOST_DEVICE constexpr int qmm_warps_m(int bm) { return bm >= 64 ? 2 : 1; }
// W rows per block tile: 128 (2 x 4 warps) or 256 (1 x 8 warps).
BS_HOST_DEVICE constexpr int qmm_bn(int bm) { return kQmmWarps / qmm_warps_m(bm) * kQmmWarpN; }
BS_HOST_DEVICE constexpr size_t qmm_smem_bytes(int bm, int planes) {
  return size_t(16) * (kQmmStages * bm * kQmmRowChunks + kQmmStages * planes * qmm_bn(bm) +
                       2 * qmm_bn(bm) * kQmmRowChunks);
}
// Fewest k-tiles per split. The small tiles exist for the weight stream, and a split writes
// kBM x kBN float partials that the reduce reads back, against kBN x 16 bytes of INT4 W per
// k-tile: kBM / 2 tiles keep the partials within half the split's W bytes.
inline constexpr int qmm_min_split_tiles(int bm) { return bm == 128 ? kQmmMinSplitTiles : bm / 2; }

BS_DEVICE int swz(int row, int chunk) { return chunk ^ ((row >> 1) & 3); }

// y[m0.., n0..] (or partials[split, .., ..]) for block tile (blockIdx.y, blockIdx.x), split blockIdx.z.
//   T: __nv_bfloat16 or __half (x, y and the mma operands); kPlanes: 1 (INT4) or 2 (INT8);
//   kBM: rows of x per block tile (16, 32: 256 W rows per tile; 64, 128: 128 W rows).
// p: the call (QMatmulParams); x 16-byte aligned (the launcher checks).
// tiles_per_split: k-tiles (32 inputs) per split.
// partials: [gridDim.z, M, N] float32 when gridDim.z > 1, else unused (y written).
template <class T, int kPlanes, int kBM>
__global__ void __launch_bounds__(kQmmThreads, 2) qmm_kernel(const QMatmulParams p, int32_t tiles_per_split,
                                                                  float* partials) {
  static_assert(kBM == 16 || kBM == 32 || kBM == 64 || kBM == 128, "qmm_kernel tiles: 16, 32, 64 or 128 rows of x");
  constexpr int kBN = qmm_bn(kBM), kWarpsN = kQmmWarps / qmm_warps_m(kBM);
  constexpr int kMi = kBM / qmm_warps_m(kBM) / 16, kNj = kQmmWarpN / 8;  // mma tiles per warp
  constexpr int kXCopies = (kBM * kQmmRowChunks + kQmmThreads - 1) / kQmmThreads;  // x chunks per thread per stage
  constexpr int kWCopies = (kPlanes * kBN + kQmmThreads - 1) / kQmmThreads;        // plane rows per thread per stage
  constexpr int kDq = kBN * kQmmRowChunks / kQmmThreads;  // plane words dequantized per thread per tile
  static_assert(kDq * kQmmThreads == kBN * kQmmRowChunks && kNj % 2 == 0, "whole words per thread, n8 tiles in pairs");
  BS_DYNAMIC_SMEM(uint4, smem);
  uint4* As = smem;
  uint4* Ws = As + kQmmStages * kBM * kQmmRowChunks;
  uint4* Bd = Ws + kQmmStages * kPlanes * kBN;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int warp_m = warp / kWarpsN, warp_n = warp % kWarpsN;
  const int64_t M = p.m, N = p.n, K = p.k;
  const int64_t words = fmt::words_per_row(K), groups = fmt::groups_per_row(K, p.group_size);
  const int64_t m0 = int64_t(blockIdx.y) * kBM, n0 = int64_t(blockIdx.x) * kBN;
  const int64_t k_tiles = K / kQmmBK;
  const int64_t t_begin = int64_t(blockIdx.z) * tiles_per_split;
  const int nt = int(k_tiles - t_begin < tiles_per_split ? k_tiles - t_begin : tiles_per_split);
  const T* x = static_cast<const T*>(p.x);

  // cp.async of tile t (relative to the split) into stage st: the kBM x 4 chunks of x and the
  // kPlanes x kBN plane rows, spread over the threads. Rows past M or N are zero-filled, reading
  // nothing.
  auto issue = [&](int t, int st) {
    const int64_t k0 = (t_begin + t) * kQmmBK;
#pragma unroll
    for (int j = 0; j < kXCopies; ++j) {
      const int i = tid + j * kQmmThreads, row = i / kQmmRowChunks, ck = i % kQmmRowChunks;
      if (kBM * kQmmRowChunks % kQmmThreads && i >= kBM * kQmmRowChunks) break;  // 16 rows: threads 0..63
      const bool ok = m0 + row < M;
      const T* src = x + (ok ? m0 + row : 0) * K + k0 + ck * 8;
      ptx::cp_async16(As + (st * kBM + row) * kQmmRowChunks + swz(row, ck), src, ok);
    }
#pragma unroll
    for (int j = 0; j < kWCopies; ++j) {
      const int i = tid + j * kQmmThreads, pl = i / kBN, row = i % kBN;
      if (kPlanes * kBN % kQmmThreads && i >= kPlanes * kBN) break;  // 128 x INT4: threads 0..127
      const bool ok = n0 + row < N;
      const uint32_t* src = (pl == 0 ? p.plane0 : p.plane1) + (ok ? n0 + row : 0) * words + k0 / fmt::kValuesPerWord;
      ptx::cp_async16(Ws + (st * kPlanes + pl) * kBN + row, src, ok);
    }
  };
  // (A, B) of this thread's dequantization rows (tid/4 + 64 j) for tile t.
  auto coeffs = [&](int t, float2 ab[kDq]) {
    // k-tile -> group: G / 32 is 1, 2 or 4. Recomputed from the parameter each time: a
    // division here was a 64-bit division call per k-tile, a shift kept in a register made
    // the 128-row tile spill.
    const int64_t g = (t_begin + t) >> ((p.group_size > 32) + (p.group_size > 64));
#pragma unroll
    for (int j = 0; j < kDq; ++j) {
      const int64_t n = n0 + (tid + j * kQmmThreads) / kQmmRowChunks;
      float s = 0.0f, b = 0.0f;
      if (n < N && t < nt) {
        s = load_scale(p.scales, n * groups + g, p.scale_dtype);
        b = load_scale(p.biases, n * groups + g, p.scale_dtype);
      }
      ab[j] = code_affine<kPlanes>(s, b);
    }
  };
  // Raw words of stage st -> T in Bd[buf]: each thread kDq words (8 elements, one 16-byte store each).
  auto dequant = [&](int st, int buf, const float2 ab[kDq]) {
#pragma unroll
    for (int j = 0; j < kDq; ++j) {
      const int i = tid + j * kQmmThreads, row = i / kQmmRowChunks, wi = i % kQmmRowChunks;
      const uint32_t w0 = reinterpret_cast<const uint32_t*>(Ws + (st * kPlanes + 0) * kBN + row)[wi];
      const uint32_t w1 = kPlanes == 2 ? reinterpret_cast<const uint32_t*>(Ws + (st * kPlanes + 1) * kBN + row)[wi] : 0u;
      uint32_t out[4];
#pragma unroll
      for (int e = 0; e < 4; ++e)
        out[e] = pack2<T>(fmaf(ab[j].x, view_f<kPlanes>(w0, w1, 2 * e), ab[j].y),
                          fmaf(ab[j].x, view_f<kPlanes>(w0, w1, 2 * e + 1), ab[j].y));
      Bd[(buf * kBN + row) * kQmmRowChunks + swz(row, wi)] = make_uint4(out[0], out[1], out[2], out[3]);
    }
  };

  float acc[kMi][kNj][4];
#pragma unroll
  for (int i = 0; i < kMi; ++i)
#pragma unroll
    for (int j = 0; j < kNj; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.0f;

  // Prologue: tiles 0 .. kStages-2 in flight (one commit group each, empty past the end so the
  // group count stays uniform), then tile 0 dequantized.
#pragma unroll
  for (int s = 0; s < kQmmStages - 1; ++s) {
    if (s < nt) issue(s, s);
    ptx::cp_async_commit();
  }
  float2 ab_cur[kDq], ab_next[kDq];
  coeffs(0, ab_cur);
  coeffs(1, ab_next);
  ptx::cp_async_wait<kQmmStages - 2>();
  __syncthreads();
  dequant(0, 0, ab_cur);
#pragma unroll
  for (int j = 0; j < kDq; ++j) ab_cur[j] = ab_next[j];
  coeffs(2, ab_next);

  for (int t = 0; t < nt; ++t) {
    // Groups committed: kStages-1 + t; tiles 0..t+1 must have landed.
    ptx::cp_async_wait<kQmmStages - 3>();
    // After this barrier: tile t+1's raw words and tile t's dequantized W are visible, and every
    // warp has finished tile t-1 (its A stage and Bd half are free).
    __syncthreads();
    if (t + kQmmStages - 1 < nt) issue(t + kQmmStages - 1, (t + kQmmStages - 1) % kQmmStages);
    ptx::cp_async_commit();
    if (t + 1 < nt) dequant((t + 1) % kQmmStages, (t + 1) & 1, ab_cur);
#pragma unroll
    for (int j = 0; j < kDq; ++j) ab_cur[j] = ab_next[j];
    coeffs(t + 3, ab_next);  // a cached global load, consumed two tiles later: its latency hides

    const uint4* a_tile = As + (t % kQmmStages) * kBM * kQmmRowChunks;
    const uint4* b_tile = Bd + (t & 1) * kBN * kQmmRowChunks;
#pragma unroll
    for (int ks = 0; ks < kQmmBK / 16; ++ks) {
      // B: ldmatrix.x4 per pair of n8 tiles: matrices (n 0-7, k 0-7), (n 0-7, k 8-15),
      // (n 8-15, k 0-7), (n 8-15, k 8-15) are b[0], b[1] of the two tiles (W row-major = mma's "col").
      uint32_t bf[kNj][2];
#pragma unroll
      for (int pr = 0; pr < kNj / 2; ++pr) {
        const int row = warp_n * kQmmWarpN + pr * 16 + ((lane >> 4) & 1) * 8 + (lane & 7);
        const int ck = ks * 2 + ((lane >> 3) & 1);
        uint32_t r[4];
        ptx::ldmatrix_x4(r, b_tile + row * kQmmRowChunks + swz(row, ck));
        bf[2 * pr][0] = r[0];
        bf[2 * pr][1] = r[1];
        bf[2 * pr + 1][0] = r[2];
        bf[2 * pr + 1][1] = r[3];
      }
      // A: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15) = a[0..3].
#pragma unroll
      for (int mi = 0; mi < kMi; ++mi) {
        const int row = (warp_m * kMi + mi) * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
        const int ck = ks * 2 + ((lane >> 4) & 1);
        uint32_t af[4];
        ptx::ldmatrix_x4(af, a_tile + row * kQmmRowChunks + swz(row, ck));
#pragma unroll
        for (int nj = 0; nj < kNj; ++nj) ptx::mma_m16n8k16<T>(acc[mi][nj], af, bf[nj], acc[mi][nj]);
      }
    }
  }
  ptx::cp_async_wait<0>();  // no copy may outlive the block (only empty groups remain)

  // c[0], c[1] = C[g][2t..2t+1], c[2], c[3] = C[g+8][2t..2t+1]; pairs are stored as one 32-bit
  // word where y's row pitch and base allow it.
  const int g = lane / 4, t4 = lane % 4;
  const bool split = gridDim.z > 1;
  const bool pairs = (N % 2 == 0) && (reinterpret_cast<uintptr_t>(p.y) & 3) == 0;
#pragma unroll
  for (int mi = 0; mi < kMi; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = m0 + (warp_m * kMi + mi) * 16 + g + 8 * h;
      if (row >= M) continue;
#pragma unroll
      for (int nj = 0; nj < kNj; ++nj) {
        const int64_t col = n0 + warp_n * kQmmWarpN + nj * 8 + 2 * t4;
        const float v0 = acc[mi][nj][2 * h], v1 = acc[mi][nj][2 * h + 1];
        if (split) {
          float* dst = partials + (int64_t(blockIdx.z) * M + row) * N + col;
          if (col < N) dst[0] = v0;
          if (col + 1 < N) dst[1] = v1;
        } else {
          T* dst = static_cast<T*>(p.y) + row * N + col;
          if (pairs && col + 1 < N) {
            *reinterpret_cast<uint32_t*>(dst) = pack2<T>(v0, v1);
          } else {
            if (col < N) dst[0] = from_float<T>(v0);
            if (col + 1 < N) dst[1] = from_float<T>(v1);
          }
        }
      }
    }
  }
}

// ---- Dense W: dequantize_kernel -----------------------------------------------------------------
//
// One thread per chunk (32 codes of one row: 16 bytes per plane in, 32 values out), grid-stride;
// consecutive threads take consecutive chunks of a row, so loads and stores are contiguous.
// W[n, k] = A f + B in float (code_affine), rounded once to T: the values the GEMM's shared-memory
// tiles hold.
template <class T, int kPlanes>
__global__ void __launch_bounds__(256) dequantize_kernel(const QMatmulParams p) {
  const int64_t per_row = p.k / kChunk, total = p.n * per_row;
  const int64_t words = fmt::words_per_row(p.k), groups = fmt::groups_per_row(p.k, p.group_size);
  int group_shift = 0;
  while ((kChunk << group_shift) < p.group_size) ++group_shift;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t n = i / per_row, c = i - n * per_row;
    const uint4 v0 = ptx::ld_stream(p.plane0 + n * words + c * 4);
    const uint4 v1 = kPlanes == 2 ? ptx::ld_stream(p.plane1 + n * words + c * 4) : make_uint4(0, 0, 0, 0);
    const int64_t g = n * groups + (c >> group_shift);
    const float2 ab = code_affine<kPlanes>(load_scale(p.scales, g, p.scale_dtype), load_scale(p.biases, g, p.scale_dtype));
    T* dst = static_cast<T*>(p.y) + n * p.k + c * kChunk;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float f[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) f[e] = fmaf(ab.x, view_f<kPlanes>(word_of(v0, j), word_of(v1, j), e), ab.y);
      if constexpr (sizeof(T) == 4) {
        reinterpret_cast<float4*>(dst + 8 * j)[0] = make_float4(f[0], f[1], f[2], f[3]);
        reinterpret_cast<float4*>(dst + 8 * j)[1] = make_float4(f[4], f[5], f[6], f[7]);
      } else {
        *reinterpret_cast<uint4*>(dst + 8 * j) =
            make_uint4(pack2<T>(f[0], f[1]), pack2<T>(f[2], f[3]), pack2<T>(f[4], f[5]), pack2<T>(f[6], f[7]));
      }
    }
  }
}

// The launcher of one output dtype: 256-thread blocks, at most 16 per SM (grid-stride past that).
template <class T> cudaError_t dequantize_typed(const QMatmulParams& p, int num_sms, cudaStream_t stream) {
  if ((reinterpret_cast<uintptr_t>(p.plane0) & 15) ||
      (p.bits == fmt::kInt8Bits && (reinterpret_cast<uintptr_t>(p.plane1) & 15)) ||
      (reinterpret_cast<uintptr_t>(p.y) & 15))
    return cudaErrorInvalidValue;
  if (p.n <= 0 || p.k <= 0) return cudaErrorInvalidValue;
  const int64_t chunks = p.n * (p.k / kChunk);
  const int64_t blocks = std::min<int64_t>((chunks + 255) / 256, int64_t(num_sms > 0 ? num_sms : 1) * 16);
  if (p.bits == fmt::kInt8Bits) {
    auto* kernel = dequantize_kernel<T, 2>;
    return BS_LAUNCH(kernel, unsigned(blocks), 256, 0, stream, p);
  }
  auto* kernel = dequantize_kernel<T, 1>;
  return BS_LAUNCH(kernel, unsigned(blocks), 256, 0, stream, p);
}

// ---- Planning (host) ---------------------------------------------------------------------------

enum class Path : int32_t { kGemv = 0, kGemm = 1, kTensorGemv = 2 };

struct Plan {
  Path path;
  int32_t mt;            // rows of x per M tile: GEMV 1, 2, 4, 8, 16; GEMM 16, 32, 64, 128; tensor GEMV 8, 16
  int32_t splits;        // K splits (1: y written directly, no workspace)
  int64_t split_len;     // chunks (GEMV) or k-tiles (GEMM) per split
  QmvShape qmv;          // GEMV, tensor GEMV: the rest of the block's shape
  dim3 grid;
  size_t smem;           // dynamic shared memory bytes
  size_t ws_bytes;       // workspace the split needs
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks per SM the launcher aims at before it splits K. GEMV: 2 are resident at MT <= 4 (<= 128
// registers, 16 warps with 64-128 bytes in flight per lane, ~32-64 KiB per SM: enough for HBM
// latency); aiming at 4 gives two short waves, so the last wave's tail costs less. GEMM: 2
// resident on sm_80/sm_90 (40-72 KiB of shared memory, 128 registers); for the 256-column tiles
// that is 24 KiB of INT4 W in flight per SM, about what HBM3e needs (4.8 TB/s x ~600 ns / 132 SMs).
constexpr int kQmvBlocksPerSm = 4;
constexpr int kQmmBlocksPerSm = 2;

// Which kernel and tile, by rows of x. Per SM and clock: HBM delivers 13 bytes on an A100
// (sm_80: 2.0 TB/s, 108 SMs, 1.41 GHz), 14.5 on an H100 and 21 on an H200 (sm_90: 3.35 / 4.8
// TB/s, 132 SMs, ~1.75 GHz): 26 / 29 / 42 INT4 weights (half as many INT8). An SM issues 128
// lane-instructions per clock (FFMA: 64 on sm_80, 128 on sm_90; LOP3 / shifts: 64), and
// mma.sync bf16 does ~2048 flops (sm_80) or ~2900 (sm_90, ~2/3 of the wgmma peak).
//   GEMV, MT rows per tile: per weight 2 integer ops (code_f) + MT FFMAs (+1 at MT >= 8) + the
//     x loads: ~4.3 issue slots at MT = 2 (30 weights/clock), 6.4 at MT = 4 (20), 20 at MT =
//     16 (6.4: 4.5x below the H100 roofline, 6.5x below the H200's; M = 16 measures ~5x). Only
//     M <= 2 keeps up.
//   Tensor cores, kBM <= 32: per weight, once per block whatever M: 2 integer ops + 1 FFMA + half
//     an F2FP pack + an eighth of an LDS and an STS.128 + ldmatrix / mma issue: ~4.4 slots, ~29
//     weights/clock; the mma's 2 kBM flops per weight cost 1/90 (kBM 16) or 1/45 (kBM 32) of a
//     clock on sm_90, under the integer work. So 16-bit x with M >= 3 goes to the tensor cores
//     (the GEMV's 4-row tile is 1.5x slower there, 2x on sm_80 where FFMA is 64 wide).
//   Tile rows: the smallest of 16, 32, 64 that holds M, so past 16 rows no more than half of the
//     mma is spent on zero rows (kBM 64 is mma-bound at 22 weights/clock on sm_90, 16 on sm_80,
//     where INT4 at M ~ 35-50 turns compute-bound anyway). Past 64 rows the 128 x 128 tile: a
//     64-row tile would dequantize and read W twice for the same mma work.
//   16-bit x whose rows are not 16-byte aligned (cp.async cannot load them) takes the GEMV in
//     tiles of at most 4 rows: the 8- and 16-row GEMV tiles, FFMA-bound and the slowest
//     instances to compile, are built for float32 x only.
constexpr int64_t kGemvMaxRows16 = 2;  // 16-bit x: the GEMV takes M <= this
//   qmv_tc_kernel replaces both for 16-bit x with M <= 64 (kTensorGemvMaxRows): ~3 issue slots
//     per weight whatever M (the estimates above undercount: by ptxas's SASS the GEMV's inner
//     loop issues ~12 lane-instructions per INT4 byte at M = 1, the 16-row GEMM's ~32;
//     bench/cuda_resources.py prints them). BITSWITCH_CUDA_SMALL_M=simt restores the older
//     choice, to compare the two on a GPU.
//     Tiles of 8, 16 and 32 rows of x (the dequantization is shared by every row); 33-64 rows
//     run two 32-row tiles, each reading W (the second mostly from L2): a 64-row tile's 32
//     accumulators spill at the 128-register cap (ptxas), and two tiles still issue ~2.5x
//     fewer instructions per weight than qmm_kernel's 64-row tile.
constexpr int64_t kTensorGemvMaxRows = 64;

// Whether 16-bit x with M <= 64 takes qmv_tc_kernel: BITSWITCH_CUDA_SMALL_M (read once per
// process) "simt" says no; tests set small_m_override() (-1: the environment's choice).
inline int& small_m_override() {
  static int v = -1;
  return v;
}
inline bool small_m_on_tensor_cores() {
  static const bool env = env_not_simt("BITSWITCH_CUDA_SMALL_M");
  return ab_switch_on(small_m_override(), env);
}
inline constexpr int qmm_tile_rows(int64_t m) { return m <= 16 ? 16 : m <= 32 ? 32 : m <= 64 ? 64 : 128; }

// pl.split_len / pl.splits for `len` units of K (chunks or k-tiles) over `tiles` output tiles:
// enough splits to give `target` blocks, each at least `min_len` long, at most 64, and no more
// than `fit` partials (the workspace) hold.
inline void plan_splits(Plan& pl, int64_t tiles, int64_t target, int64_t len, int64_t min_len, int64_t fit) {
  int64_t s = 1;
  if (tiles < target) s = std::min(ceil_div(target, tiles), std::max<int64_t>(1, len / min_len));
  s = std::min<int64_t>(s, 64);
  if (s > 1 && fit < s) s = fit >= 2 ? fit : 1;
  pl.split_len = ceil_div(len, s);
  pl.splits = int32_t(ceil_div(len, pl.split_len));
}

// The GEMVs' grid: splits x row-group blocks x M tiles, persistent over row groups: each block
// visits `iters` of them (so its staged x is reused), with the count balanced so no block does
// one more than the others.
inline void plan_gemv_grid(Plan& pl, int64_t row_groups, int64_t m_tiles, int64_t target) {
  const int64_t cap = std::max<int64_t>(1, target / (int64_t(pl.splits) * m_tiles));
  const int64_t iters = ceil_div(row_groups, cap);
  pl.qmv.split_chunks = pl.split_len;
  pl.qmv.row_groups = int32_t(row_groups);
  pl.grid = dim3(unsigned(pl.splits), unsigned(ceil_div(row_groups, iters)), unsigned(m_tiles));
}

// The launch for p with `ws_bytes` of workspace (SIZE_MAX: as much as it wants).
inline Plan plan_qmatmul(const QMatmulParams& p, int num_sms, size_t ws_bytes) {
  Plan pl{};
  num_sms = num_sms > 0 ? num_sms : 1;
  const int64_t M = p.m, N = p.n, K = p.k;
  const size_t partial_bytes = size_t(M) * size_t(N) * sizeof(float);
  // Largest split count the workspace allows (1 when it holds fewer than two partials).
  const int64_t fit = int64_t(partial_bytes ? ws_bytes / partial_bytes : 1);
  const bool tc_ok = p.x_dtype != DType::kFloat32 && (reinterpret_cast<uintptr_t>(p.x) & 15) == 0;
  if (tc_ok && M <= kTensorGemvMaxRows && small_m_on_tensor_cores()) {
    pl.path = Path::kTensorGemv;
    pl.mt = M <= 8 ? 8 : M <= 16 ? 16 : 32;
    const int64_t chunks = K / kChunk;
    const int64_t m_tiles = ceil_div(M, pl.mt);
    const int64_t row_groups = ceil_div(N, kTcRowsPerGroup);
    const int64_t target = int64_t(num_sms) * kQmvBlocksPerSm;
    plan_splits(pl, row_groups * m_tiles, target, chunks, kTcMinSplitChunks, fit);
    plan_gemv_grid(pl, row_groups, m_tiles, target);
    // Staged slices hold whole steps of every lane (8 chunks; the kernel zero-fills the tail).
    pl.qmv.stage_chunks = int32_t(std::min<int64_t>(ceil_div(pl.split_len, 2 * kTcQuad) * 2 * kTcQuad,
                                                    qmv_tc_max_stage_chunks(pl.mt)));
    pl.smem = qmv_tc_smem_bytes(pl.mt, pl.qmv.stage_chunks);
  } else if (tc_ok && M > kGemvMaxRows16) {
    pl.path = Path::kGemm;
    pl.mt = qmm_tile_rows(M);
    const int64_t bn = qmm_bn(pl.mt);
    const int64_t k_tiles = K / kQmmBK;
    const int64_t tiles_mn = ceil_div(M, pl.mt) * ceil_div(N, bn);
    plan_splits(pl, tiles_mn, int64_t(num_sms) * kQmmBlocksPerSm, k_tiles, qmm_min_split_tiles(pl.mt), fit);
    pl.grid = dim3(unsigned(ceil_div(N, bn)), unsigned(ceil_div(M, pl.mt)), unsigned(pl.splits));
    pl.smem = qmm_smem_bytes(pl.mt, fmt::planes_for_bits(p.bits));
  } else {
    pl.path = Path::kGemv;
    pl.mt = M <= 1 ? 1 : M <= 2 ? 2 : M <= 4 || p.x_dtype != DType::kFloat32 ? 4 : M <= 8 ? 8 : 16;
    const int64_t chunks = K / kChunk;
    const int64_t m_tiles = ceil_div(M, pl.mt);
    const int64_t row_groups = ceil_div(N, int64_t(kQmvWarps) * kQmvRowsPerWarp);
    const int64_t target = int64_t(num_sms) * kQmvBlocksPerSm;
    plan_splits(pl, row_groups * m_tiles, target, chunks, kQmvMinSplitChunks, fit);
    plan_gemv_grid(pl, row_groups, m_tiles, target);
    pl.qmv.stage_chunks = int32_t(std::min<int64_t>(pl.split_len, qmv_max_stage_chunks(pl.mt)));
    pl.smem = qmv_smem_bytes(pl.mt, pl.qmv.stage_chunks);
  }
  pl.ws_bytes = pl.splits > 1 ? size_t(pl.splits) * partial_bytes : 0;
  return pl;
}

// Raises the dynamic shared memory limit of kKernel to kMaxBytes, the most any of its launches
// asks for, once per process and device (the attribute belongs to the device's context). The
// call is host-side only, so it is capturable; the flags make later calls free.
template <auto kKernel, size_t kMaxBytes> cudaError_t allow_smem() {
  if (kMaxBytes <= 48 * 1024) return cudaSuccess;
  constexpr int kMaxDevices = 64;
  static volatile bool done[kMaxDevices] = {};  // a benign race only sets the attribute twice
  int dev = 0;
  const cudaError_t de = cudaGetDevice(&dev);
  if (de != cudaSuccess) return de;
  const bool cached = dev >= 0 && dev < kMaxDevices;
  if (cached && done[dev]) return cudaSuccess;
  const cudaError_t e = cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kMaxBytes));
  if (e == cudaSuccess && cached) done[dev] = true;
  return e;
}

// kKernel(p, shape, partials) on the plan's grid and shared memory; kMaxSmem: the most shared
// memory any launch of kKernel asks for.
template <auto kKernel, size_t kMaxSmem, class Shape>
cudaError_t launch(const QMatmulParams& p, const Plan& pl, int threads, Shape shape, float* partials,
                   cudaStream_t stream) {
  const cudaError_t e = allow_smem<kKernel, kMaxSmem>();
  if (e != cudaSuccess) return e;
  return BS_LAUNCH(kKernel, pl.grid, threads, pl.smem, stream, p, shape, partials);
}

// The GEMV with MT rows of x per tile, for the call's view (planes 2: INT8, 1: INT4).
template <class T, int MT>
cudaError_t launch_qmv(const QMatmulParams& p, const Plan& pl, float* partials, cudaStream_t stream) {
  constexpr size_t kSmem = qmv_smem_bytes(MT, qmv_max_stage_chunks(MT));
  return p.bits == fmt::kInt8Bits ? launch<qmv_kernel<T, MT, 2>, kSmem>(p, pl, kQmvThreads, pl.qmv, partials, stream)
                                  : launch<qmv_kernel<T, MT, 1>, kSmem>(p, pl, kQmvThreads, pl.qmv, partials, stream);
}

// The tensor-core GEMV with MT rows of x, for the call's view.
template <class T, int MT>
cudaError_t launch_qmv_tc(const QMatmulParams& p, const Plan& pl, float* partials, cudaStream_t stream) {
  constexpr size_t kSmem = qmv_tc_smem_bytes(MT, qmv_tc_max_stage_chunks(MT));
  return p.bits == fmt::kInt8Bits
             ? launch<qmv_tc_kernel<T, MT, 2, false>, kSmem>(p, pl, kTcThreads, pl.qmv, partials, stream)
         : p.scale_dtype == TcMagic<T>::kDType
             ? launch<qmv_tc_kernel<T, MT, 1, true>, kSmem>(p, pl, kTcThreads, pl.qmv, partials, stream)
             : launch<qmv_tc_kernel<T, MT, 1, false>, kSmem>(p, pl, kTcThreads, pl.qmv, partials, stream);
}

// The GEMM with kBM rows of x per block tile, for the call's view.
template <class T, int kBM>
cudaError_t launch_qmm(const QMatmulParams& p, const Plan& pl, float* partials, cudaStream_t stream) {
  const int32_t tiles_per_split = int32_t(pl.split_len);
  return p.bits == fmt::kInt8Bits
             ? launch<qmm_kernel<T, 2, kBM>, qmm_smem_bytes(kBM, 2)>(p, pl, kQmmThreads, tiles_per_split, partials, stream)
             : launch<qmm_kernel<T, 1, kBM>, qmm_smem_bytes(kBM, 1)>(p, pl, kQmmThreads, tiles_per_split, partials, stream);
}

// The launcher of one activation dtype T. The GEMM is instantiated only where kTensorCores
// (the 16-bit types); float32 x always takes the GEMV.
template <class T, bool kTensorCores>
cudaError_t qmatmul_typed(const QMatmulParams& p, void* ws, size_t ws_bytes, int num_sms, cudaStream_t stream) {
  // 16-byte loads and cp.async of plane rows need 16-byte aligned planes (every allocator's are;
  // a row-sliced plane stays aligned since a row is K/2 bytes, a multiple of 16).
  if ((reinterpret_cast<uintptr_t>(p.plane0) & 15) ||
      (p.bits == fmt::kInt8Bits && (reinterpret_cast<uintptr_t>(p.plane1) & 15)))
    return cudaErrorInvalidValue;
  // Grid limits: 65535 blocks in y and z (M tiles, row groups) are beyond any real layer.
  if (p.m <= 0 || p.n <= 0 || p.k <= 0) return cudaErrorInvalidValue;
  const Plan pl = plan_qmatmul(p, num_sms, ws ? ws_bytes : 0);
  if (pl.grid.y > 65535u || pl.grid.z > 65535u) return cudaErrorInvalidValue;
  float* partials = pl.splits > 1 ? static_cast<float*>(ws) : nullptr;
  cudaError_t e = cudaSuccess;
  if (pl.path == Path::kTensorGemv) {
    if constexpr (kTensorCores)
      switch (pl.mt) {
        case 8: e = launch_qmv_tc<T, 8>(p, pl, partials, stream); break;
        case 16: e = launch_qmv_tc<T, 16>(p, pl, partials, stream); break;
        default: e = launch_qmv_tc<T, 32>(p, pl, partials, stream); break;
      }
    else
      return cudaErrorInvalidValue;  // unreachable: plan_qmatmul keeps float32 on the GEMV
  } else if (pl.path == Path::kGemm) {
    if constexpr (kTensorCores) {
      switch (pl.mt) {
        case 16: e = launch_qmm<T, 16>(p, pl, partials, stream); break;
        case 32: e = launch_qmm<T, 32>(p, pl, partials, stream); break;
        case 64: e = launch_qmm<T, 64>(p, pl, partials, stream); break;
        default: e = launch_qmm<T, 128>(p, pl, partials, stream); break;
      }
    } else {
      return cudaErrorInvalidValue;  // unreachable: plan_qmatmul keeps float32 on the GEMV
    }
  } else {
    switch (pl.mt) {
      case 1: e = launch_qmv<T, 1>(p, pl, partials, stream); break;
      case 2: e = launch_qmv<T, 2>(p, pl, partials, stream); break;
      case 4: e = launch_qmv<T, 4>(p, pl, partials, stream); break;
      default:
        if constexpr (kTensorCores)
          return cudaErrorInvalidValue;  // unreachable: plan_qmatmul gives 16-bit x GEMV tiles of <= 4 rows
        else
          e = pl.mt == 8 ? launch_qmv<T, 8>(p, pl, partials, stream) : launch_qmv<T, 16>(p, pl, partials, stream);
    }
  }
  if (e != cudaSuccess || pl.splits == 1) return e;
  const int64_t mn = p.m * p.n;
  const int64_t blocks = std::min<int64_t>(ceil_div(mn, 256), int64_t(num_sms > 0 ? num_sms : 1) * 8);
  auto* reduce = qmm_splitk_reduce_kernel<T>;
  return BS_LAUNCH(reduce, unsigned(blocks), 256, 0, stream, partials, static_cast<T*>(p.y),
                   pl.splits, mn);
}

}  // namespace qmm

inline size_t qmatmul_workspace_bytes(const QMatmulParams& p, int num_sms) {
  if (p.m <= 0 || p.n <= 0 || p.k <= 0) return 0;
  return qmm::plan_qmatmul(p, num_sms, ~size_t(0)).ws_bytes;
}

inline cudaError_t dequantize(const QMatmulParams& p, void*, size_t, int num_sms, cudaStream_t stream) {
  switch (p.x_dtype) {
    case DType::kFloat32: return dequantize_f32(p, num_sms, stream);
    case DType::kBFloat16: return dequantize_bf16(p, num_sms, stream);
    case DType::kFloat16: return dequantize_f16(p, num_sms, stream);
  }
  return cudaErrorInvalidValue;  // a dtype the ops glue should have refused
}

inline cudaError_t qmatmul(const QMatmulParams& p, void* workspace, size_t workspace_bytes, int num_sms,
                           cudaStream_t stream) {
  switch (p.x_dtype) {
    case DType::kFloat32: return qmatmul_f32(p, workspace, workspace_bytes, num_sms, stream);
    case DType::kBFloat16: return qmatmul_bf16(p, workspace, workspace_bytes, num_sms, stream);
    case DType::kFloat16: return qmatmul_f16(p, workspace, workspace_bytes, num_sms, stream);
  }
  return cudaErrorInvalidValue;  // a dtype the ops glue should have refused
}

}  // namespace cuda
}  // namespace bitswitch
