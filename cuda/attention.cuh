// Block-sparse flash attention for NVIDIA GPUs: softmax(scale q k^T) v over the key blocks a
// BSR BlockMask lists (python/bitswitch/attention.py), causal on top, GQA, head_dim 64 or 128,
// float32 accumulation; a query row that sees no key gets output 0 and lse -inf. The
// semantics are exactly those of the CPU reference (csrc/cpu/kernels.h, AttentionArgs).
//
// Kernels (all launched by attention() below; templates in the two headers it includes):
//   attention_prefill_kernel  (attention_prefill.cuh) bf16/f16 flash-attention-2 on tensor
//                             cores: 64 query rows x 64-key tiles, 4 warps. Prefill, and
//                             bf16/f16 decode split over key ranges (see decode_on_tensor_cores).
//   attention_rows_kernel     (attention_decode.cuh) SIMT, up to 8 query rows per CTA against
//                             one range of the key list: float32 (decode split-KV), 16-bit
//                             inputs whose addresses are not 16-byte aligned, and 16-bit decode
//                             under BITSWITCH_CUDA_DECODE=simt.
//   attention_combine_kernel  (attention_decode.cuh) merges the split-KV partials (of either
//                             kernel: decode, or a short query chunk over a long cache that
//                             leaves the GPU underfilled).
//
// Query rows are "packed" per kv head: the mask is per (batch, kv head, query block), so the
// G = Hq / Hkv query heads that share a kv head also share its mask row and its K/V. Packed
// row p of query block qb is query row qb * block_q + p / G of query head kvh * G + p % G; a
// CTA takes consecutive packed rows of one query block, so K/V loaded once serve all G heads
// (for Lq = 1 decode with G = 4, the four heads' rows share every K/V load).
//
// Keys are visited in sub-blocks of 32 (kSubBlock), the largest size dividing every mask
// block_k (32, 64, 128): sub-block s of a query block's list is keys
// [start, start + 32) of mask block indices[s / (block_k / 32)]. A 64-key tile is two
// sub-blocks, adjacent or not, so a tile never straddles two unrelated mask blocks and
// block_k = 32 masks still fill whole tiles.
//
// Untrusted masks: the mask lives in GPU memory, where the ops glue cannot validate it
// without a synchronization. The kernels clamp indptr to [0, nnz_cap] and skip key-block
// numbers outside [0, ceil(Lk / block_k)), so no mask content makes them read or write out
// of bounds; unsorted or duplicate entries give finite (but meaningless) results.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "common.cuh"

namespace bitswitch {
namespace cuda {

struct AttentionParams {
  const void* q;            // q: [B, Hq, Lq, D], dtype; strides below, unit stride on D
  const void* k;            // k: [B, Hkv, Lk, D]
  const void* v;            // v: [B, Hkv, Lk, D]
  void* out;                // out: [B, Hq, Lq, D], dtype, strides o_strides
  float* lse;               // lse: [B, Hq, Lq] contiguous, natural-log log-sum-exp; may be null
  DType dtype;              // float32, bfloat16 or float16, shared by q, k, v and out
  int64_t b, hq, hkv, lq, lk, d;  // d is 64 or 128; hq a multiple of hkv (GQA)
  int64_t q_strides[3];     // element strides of the B, H and L dimensions
  int64_t k_strides[3];
  int64_t v_strides[3];
  int64_t o_strides[3];
  const int32_t* indptr;    // indptr: [B, Hkv, ceil(Lq / block_q) + 1] BSR row offsets; null: dense
  const int32_t* indices;   // indices: [B, Hkv, nnz_cap] key-block numbers per query block (sorted)
  int64_t nnz_cap;          // length of each (batch, kv head) row of indices
  int32_t block_q, block_k; // 32, 64 or 128 each: the mask's block sizes
  bool causal;              // key j visible to query row i only if j <= q_offset + i
  float scale;              // multiplies q k^T
  int64_t q_offset;         // absolute position of query row 0 (chunked prefill, decode)
  const int32_t* q_offsets; // [B] in device memory: q_offset per batch row (a decode step
                            // captured in a CUDA graph reads its position here); null: q_offset
  int64_t kv_splits;        // decode: forced number of key ranges (split-KV), 0 = choose
};

// Bytes of scratch the split-KV paths (decode, and bf16/f16 prefill with too few CTAs to
// fill the GPU) want for p on a GPU with num_sms SMs (0 when p takes no split path).
// Depends only on shapes, dtype, block sizes and kv_splits.
inline size_t attention_workspace_bytes(const AttentionParams& p, int num_sms);

// Launches attention on `stream`. `workspace` (workspace_bytes of device memory, 16-byte
// aligned, may be null) holds the split-KV partials; with less than
// attention_workspace_bytes the decode path uses fewer splits (down to one, which needs
// none). No allocation, no host synchronization: capturable in a CUDA graph.
inline cudaError_t attention(const AttentionParams& p, void* workspace, size_t workspace_bytes, int num_sms,
                             cudaStream_t stream);

namespace attn {

constexpr int kSubBlock = 32;              // keys per sub-block (divides every mask block_k)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// Decode: at most this many packed rows (Lq * Hq / Hkv) in one query block take the split-KV
// decode plan (many key ranges, see plan()); more rows fill tensor-core tiles well enough.
constexpr int kDecodeMaxRows = 16;
constexpr int kMaxSplits = 256;           // automatic split-KV never goes beyond this
// Packed query rows per CTA of the rows kernel: every lane keeps an output slice, running
// max and sum per row in registers; 8 rows keep the kernel near 210 registers (two CTAs per SM).
constexpr int kRowsPerCta = 8;

BS_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Element offset of row l of head h of batch b.
BS_DEVICE int64_t row_offset(const int64_t* strides, int64_t b, int64_t h, int64_t l) {
  return b * strides[0] + h * strides[1] + l * strides[2];
}

// Absolute position of query row 0 of batch row b.
BS_DEVICE int64_t row0_position(const AttentionParams& p, int64_t b) {
  return p.q_offsets ? int64_t(p.q_offsets[b]) : p.q_offset;
}

// Last key a query at absolute position `pos` may see (causal), else the last key; -1: none.
BS_DEVICE int last_key(const AttentionParams& p, int64_t pos) {
  if (!p.causal) return int(p.lk - 1);
  return int(pos < -1 ? -1 : (pos < p.lk - 1 ? pos : p.lk - 1));
}

// The key sub-blocks one (batch, kv head, query block) reads, in mask order.
struct KeyList {
  const int32_t* list;  // the mask row's key-block numbers (indices + clamped indptr[qb]); null: dense
  int64_t count;        // sub-blocks in the list (after trimming, see key_list)
  int spb_log2;         // log2(block_k / kSubBlock): sub-blocks per mask block
  int block_k;
  int nkb;              // key blocks of k: ceil(Lk / block_k)
  int lk;

  // First key of sub-block s, or -1 when its mask entry names no block of k or it starts
  // past Lk (a garbage mask entry, or the missing tail of the last, partial block).
  BS_DEVICE int start(int64_t s) const { return start_from(s, entry(s)); }
  // The two halves of start(): the mask entry of sub-block s (a global load; 0 for a dense
  // list), and the first key given that entry. A loop can issue the load early and use the
  // value later, so the load's latency does not stall the warp.
  BS_DEVICE int32_t entry(int64_t s) const { return list ? list[s >> spb_log2] : 0; }
  BS_DEVICE int start_from(int64_t s, int32_t blk) const {
    int st;
    if (!list) {
      st = int(s) * kSubBlock;
    } else {
      if (blk < 0 || blk >= nkb) return -1;
      st = blk * block_k + int(s & ((1 << spb_log2) - 1)) * kSubBlock;
    }
    return st < lk ? st : -1;
  }
};

// The key list of query block qb of (b, kvh), with trailing sub-blocks that no row up to
// key `max_key` can see (past the causal diagonal, or invalid) dropped, so CTAs never load
// them. Every thread computes the same list (the reads are broadcasts).
BS_DEVICE KeyList key_list(const AttentionParams& p, int64_t b, int64_t kvh, int64_t qb, int max_key) {
  KeyList kl;
  kl.block_k = p.block_k;
  kl.spb_log2 = p.block_k == 128 ? 2 : (p.block_k == 64 ? 1 : 0);
  kl.nkb = int(ceil_div(p.lk, p.block_k));
  kl.lk = int(p.lk);
  if (!p.indptr) {
    kl.list = nullptr;
    kl.count = max_key < 0 ? 0 : max_key / kSubBlock + 1;
    return kl;
  }
  const int64_t nqb = ceil_div(p.lq, p.block_q);
  const int32_t* ip = p.indptr + (b * p.hkv + kvh) * (nqb + 1) + qb;
  const int64_t cap = p.nnz_cap;
  int64_t first = ip[0], last = ip[1];
  first = first < 0 ? 0 : (first > cap ? cap : first);
  last = last < first ? first : (last > cap ? cap : last);
  kl.list = p.indices + (b * p.hkv + kvh) * cap + first;
  kl.count = (last - first) << kl.spb_log2;
  while (kl.count > 0) {
    const int st = kl.start(kl.count - 1);
    if (st >= 0 && st <= max_key) break;
    --kl.count;
  }
  return kl;
}

// A 16-byte chunk of T as floats (4 float32 or 8 half/bfloat16 values).
template <class T> BS_DEVICE void chunk_to_float(const uint4& c, float* f) {
  const uint32_t w[4] = {c.x, c.y, c.z, c.w};
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int i = 0; i < 4; ++i) __builtin_memcpy(&f[i], &w[i], 4);  // a register move
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 v = unpack2<T>(w[i]);
      f[2 * i] = v.x;
      f[2 * i + 1] = v.y;
    }
  }
}

// 16 bytes of T at src: one vector load through the read-only path when the caller knows
// the address is 16-byte aligned, else element by element.
template <class T> BS_DEVICE uint4 load_chunk(const T* src, bool aligned) {
  if (aligned) return ptx::ld_nc(src);
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (sizeof(T) == 4) {
      __builtin_memcpy(&w[i], &src[i], 4);
    } else {
      w[i] = uint32_t(bits16(src[2 * i])) | (uint32_t(bits16(src[2 * i + 1])) << 16);
    }
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

}  // namespace attn
}  // namespace cuda
}  // namespace bitswitch

#include "attention_decode.cuh"
#include "attention_prefill.cuh"

namespace bitswitch {
namespace cuda {
namespace attn {

// Whether bf16/f16 decode runs on the tensor-core kernel (the default) or on the SIMT rows
// kernel: BITSWITCH_CUDA_DECODE=simt (read once per process) says the rows kernel, to compare
// the two on a GPU; tests set decode_override() (-1: the environment's choice).
//
// Why tensor cores for a handful of rows: the rows kernel converts and multiplies every key
// on the FMA pipe for each query row, ~7 lane-instructions per byte of K/V at GQA 4 (an
// estimate from the source and its SASS: the loop holds both load paths and unrolled rows),
// which is about what an H200 can issue per byte of its bandwidth, and it loads the next
// key range only after the current one's math. The tile kernel wastes most of its 16-row
// mma tiles on 4 rows, but issues ~0.7 lane-instructions per byte and double-buffers its
// key tiles with cp.async.
inline int& decode_override() {
  static int v = -1;
  return v;
}
inline bool decode_on_tensor_cores() {
  static const bool env = env_not_simt("BITSWITCH_CUDA_DECODE");
  return ab_switch_on(decode_override(), env);
}

// How a call runs, decided from shapes (and decode_on_tensor_cores) alone, so
// attention_workspace_bytes, which sees no pointers, agrees with the launch.
struct Plan {
  bool decode = false;  // one query block of <= kDecodeMaxRows packed rows: split-KV decode
  bool decode_tiles = false;  // ... on the tensor-core kernel (16-bit dtypes; rows kernel otherwise)
  int64_t rows = 0;     // packed rows Lq * G (every query block's)
  int64_t splits = 1;   // key ranges wanted per CTA (decode, and bf16/f16 prefill)
  size_t split_bytes = 0;  // workspace per split: [B, Hkv, rows] x (D + 1) floats
};

// Packed rows of one CTA of the tensor-core prefill kernel (PrefillConfig::kRows).
constexpr int kPrefillRows = 64;

inline Plan plan(const AttentionParams& p, int num_sms) {
  Plan pl;
  const int64_t group = p.hq / p.hkv, nqb = ceil_div(p.lq, p.block_q);
  pl.decode = nqb == 1 && group * p.lq <= kDecodeMaxRows;
  pl.decode_tiles = pl.decode && p.dtype != DType::kFloat32 && decode_on_tensor_cores();
  pl.rows = group * p.lq;
  pl.split_bytes = size_t(p.b * p.hkv * pl.rows) * size_t(p.d + 1) * sizeof(float);
  const int64_t sms = num_sms > 0 ? num_sms : 100;
  if (pl.decode) {
    if (p.kv_splits > 0) {
      pl.splits = p.kv_splits;
    } else if (pl.decode_tiles) {
      // Two CTAs per SM (the tile kernel's shared memory allows two at D = 128 on sm_80 and
      // sm_90), each range at least two 64-key tiles so the pipeline's fill and the combine
      // stay small against the range.
      const int64_t ctas = p.b * p.hkv;
      const int64_t want = ceil_div(2 * sms, ctas), most = ceil_div(ceil_div(p.lk, 2 * kSubBlock), 2);
      pl.splits = want < most ? want : most;
    } else {
      // Two CTAs per SM (what the rows kernel's registers allow) hide one key range's load
      // latency behind the other's math; each split keeps at least two sub-blocks (64 keys)
      // so the combine stays a small fraction of the work.
      const int64_t ctas = p.b * p.hkv * ceil_div(pl.rows, kRowsPerCta);
      const int64_t want = ceil_div(2 * sms, ctas), most = ceil_div(ceil_div(p.lk, kSubBlock), 2);
      pl.splits = want < most ? want : most;
    }
  } else if (p.dtype != DType::kFloat32) {
    // Prefill on tensor cores: a short chunk against a long cache (a chat turn, speculative
    // tokens) has few CTAs, each walking every key; split their key lists until the GPU
    // holds two CTAs per SM, each split keeping at least four 64-key tiles.
    if (p.kv_splits > 0) {
      pl.splits = p.kv_splits;
    } else {
      const int64_t tiles = ceil_div(group * (p.lq < p.block_q ? p.lq : p.block_q), kPrefillRows);
      const int64_t ctas = p.b * p.hkv * nqb * tiles;
      const int64_t want = ceil_div(2 * sms, ctas), most = ceil_div(p.lk, 2 * kSubBlock) / 4;
      pl.splits = want < most ? want : most;
    }
  }
  if (pl.splits > kMaxSplits) pl.splits = kMaxSplits;
  if (pl.splits < 1) pl.splits = 1;
  return pl;
}

// Whether a tensor's base and its strides (over dims longer than one) keep every row
// 16-byte aligned, as cp.async and vector loads need.
inline bool rows_aligned(const void* ptr, const int64_t* strides, const int64_t* shape, size_t elem) {
  if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
  for (int i = 0; i < 3; ++i)
    if (shape[i] > 1 && (strides[i] * int64_t(elem)) % 16 != 0) return false;
  return true;
}

// Runs attention for element type T and head dim D (explicitly instantiated by
// attention_{f32,bf16,f16}.cu).
template <class T, int D>
cudaError_t attention_run(const AttentionParams& p, void* workspace, size_t workspace_bytes, int num_sms,
                          cudaStream_t stream) {
  if (p.b == 0 || p.hq == 0 || p.lq == 0) return cudaSuccess;
  if (p.hkv <= 0 || p.hq % p.hkv != 0 || p.lk <= 0 || p.d != D) return cudaErrorInvalidValue;
  for (const int32_t blk : {p.block_q, p.block_k})
    if (blk != 32 && blk != 64 && blk != 128) return cudaErrorInvalidValue;  // the mask's block sizes
  const float scale_log2 = p.scale * kLog2e;
  const int64_t group = p.hq / p.hkv, nqb = ceil_div(p.lq, p.block_q);
  const int64_t q_shape[3] = {p.b, p.hq, p.lq}, kv_shape[3] = {p.b, p.hkv, p.lk};
  const bool aligned = rows_aligned(p.q, p.q_strides, q_shape, sizeof(T)) &&
                       rows_aligned(p.k, p.k_strides, kv_shape, sizeof(T)) &&
                       rows_aligned(p.v, p.v_strides, kv_shape, sizeof(T)) &&
                       rows_aligned(p.out, p.o_strides, q_shape, sizeof(T));
  const Plan pl = plan(p, num_sms);
  constexpr int kRows = kRowsPerCta;
  constexpr int kRowsThreads = RowsConfig<T, D>::kThreads;

  if constexpr (sizeof(T) == 2) {
    // Prefill, and decode unless BITSWITCH_CUDA_DECODE=simt: the tensor-core kernel.
    if (aligned && (!pl.decode || pl.decode_tiles)) {
      using C = PrefillConfig<T, D>;
      static_assert(C::kRows == kPrefillRows, "plan() sizes prefill CTAs by kPrefillRows");
      const int64_t tiles = ceil_div(group * (p.lq < p.block_q ? p.lq : p.block_q), C::kRows);
      int64_t splits = pl.splits;
      const int64_t fit = int64_t(workspace ? workspace_bytes / pl.split_bytes : 0);
      if (splits > fit) splits = fit;
      if (splits < 1) splits = 1;
      const int64_t grid = p.b * p.hkv * nqb * tiles * splits;
      if (grid > 0x7fffffff) return cudaErrorInvalidConfiguration;
      const auto kernel = splits > 1 ? attention_prefill_kernel<T, D, true> : attention_prefill_kernel<T, D, false>;
      if (C::kSmemBytes > 48 * 1024) {
        // Above 48 KiB a kernel must opt in to dynamic shared memory; the attribute is per
        // function and per device, cheap to set, and not a stream operation (graph-safe).
        const cudaError_t e =
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(C::kSmemBytes));
        if (e != cudaSuccess) return e;
      }
      float* part_o = nullptr;
      float* part_lse = nullptr;
      if (splits > 1) {
        part_o = static_cast<float*>(workspace);
        part_lse = part_o + p.b * p.hkv * pl.rows * splits * D;
      }
      const cudaError_t e = BS_LAUNCH(kernel, grid, C::kThreads, C::kSmemBytes, stream, p, int(tiles), int(splits),
                                      scale_log2, part_o, part_lse);
      if (e != cudaSuccess || splits == 1) return e;
      return BS_LAUNCH((attention_combine_kernel<T, D>), p.b * p.hkv * pl.rows, D, 0, stream, p, int(splits),
                       static_cast<const float*>(part_o), static_cast<const float*>(part_lse));
    }
  }

  // Decode in float32, on unaligned 16-bit rows or under BITSWITCH_CUDA_DECODE=simt: the
  // rows kernel over pl.splits key ranges.
  if (pl.decode) {
    int64_t splits = pl.splits;
    const int64_t fit = pl.split_bytes ? int64_t(workspace ? workspace_bytes / pl.split_bytes : 0) : 0;
    if (splits > fit) splits = fit;
    if (splits < 1) splits = 1;
    const int64_t rgroups = ceil_div(pl.rows, kRows);
    const int64_t grid = p.b * p.hkv * rgroups * splits;
    if (grid > 0x7fffffff) return cudaErrorInvalidConfiguration;
    float* part_o = nullptr;
    float* part_lse = nullptr;
    if (splits > 1) {
      part_o = static_cast<float*>(workspace);
      part_lse = part_o + p.b * p.hkv * pl.rows * splits * D;
    }
    cudaError_t e = BS_LAUNCH((attention_rows_kernel<T, D>), grid, kRowsThreads, 0, stream, p,
                              int(rgroups), int(splits), scale_log2, aligned, part_o, part_lse);
    if (e != cudaSuccess || splits == 1) return e;
    return BS_LAUNCH((attention_combine_kernel<T, D>), p.b * p.hkv * pl.rows, D, 0, stream, p, int(splits),
                     static_cast<const float*>(part_o), static_cast<const float*>(part_lse));
  }

  // float32, or 16-bit rows that cp.async cannot copy: the SIMT kernel, one key range.
  const int64_t rgroups = ceil_div(group * (p.lq < p.block_q ? p.lq : p.block_q), kRows);
  const int64_t grid = p.b * p.hkv * nqb * rgroups;
  if (grid > 0x7fffffff) return cudaErrorInvalidConfiguration;
  return BS_LAUNCH((attention_rows_kernel<T, D>), grid, kRowsThreads, 0, stream, p, int(rgroups), 1,
                   scale_log2, aligned, static_cast<float*>(nullptr), static_cast<float*>(nullptr));
}

// The compiled instances live in attention_{f32,bf16,f16}.cu.
#define BS_ATTENTION_INSTANCE(EXTERN, T, D)                                                              \
  EXTERN template cudaError_t attention_run<T, D>(const AttentionParams&, void*, size_t, int, cudaStream_t);
BS_ATTENTION_INSTANCE(extern, float, 64)
BS_ATTENTION_INSTANCE(extern, float, 128)
BS_ATTENTION_INSTANCE(extern, __nv_bfloat16, 64)
BS_ATTENTION_INSTANCE(extern, __nv_bfloat16, 128)
BS_ATTENTION_INSTANCE(extern, __half, 64)
BS_ATTENTION_INSTANCE(extern, __half, 128)

template <class T>
cudaError_t attention_dispatch_d(const AttentionParams& p, void* ws, size_t ws_bytes, int num_sms, cudaStream_t s) {
  switch (p.d) {
    case 64: return attention_run<T, 64>(p, ws, ws_bytes, num_sms, s);
    case 128: return attention_run<T, 128>(p, ws, ws_bytes, num_sms, s);
    default: return cudaErrorInvalidValue;  // head_dim must be 64 or 128
  }
}

}  // namespace attn

inline size_t attention_workspace_bytes(const AttentionParams& p, int num_sms) {
  if (p.b <= 0 || p.hq <= 0 || p.hkv <= 0 || p.lq <= 0 || p.lk <= 0 || p.block_q <= 0 || p.d <= 0) return 0;
  const attn::Plan pl = attn::plan(p, num_sms);
  return pl.splits > 1 ? size_t(pl.splits) * pl.split_bytes : 0;
}

inline cudaError_t attention(const AttentionParams& p, void* workspace, size_t workspace_bytes, int num_sms,
                             cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kBFloat16:
      return attn::attention_dispatch_d<__nv_bfloat16>(p, workspace, workspace_bytes, num_sms, stream);
    case DType::kFloat16: return attn::attention_dispatch_d<__half>(p, workspace, workspace_bytes, num_sms, stream);
    case DType::kFloat32: return attn::attention_dispatch_d<float>(p, workspace, workspace_bytes, num_sms, stream);
    default: return cudaErrorInvalidValue;  // dtype must be float32, bfloat16 or float16
  }
}

}  // namespace cuda
}  // namespace bitswitch
