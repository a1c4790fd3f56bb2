// Part of attention.cuh (included by it after AttentionParams and the attn:: helpers): the
// bf16/f16 tensor-core prefill kernel, flash-attention-2 style.
//
// A CTA of 4 warps owns 64 packed query rows (16 per warp, the M of mma.m16n8k16) of one
// query block and walks that block's key list in tiles of 64 keys (two 32-key sub-blocks).
// Per tile, each warp computes S = Q K^T for its 16 rows in registers, masks it (only on
// tiles that cross the causal diagonal or hold invalid/out-of-range keys), updates its rows'
// running max and sum (online softmax, base 2), and adds P V into its 16 x D float32
// accumulators. K and V tiles are double-buffered in shared memory with cp.async: the copy
// of tile n + 1 is in flight while tile n is multiplied, and V(n) may still be landing while
// S(n) is computed.
//
// Registers per thread at D = 128: Q fragments 32, O accumulators 64, S 32 (+ addressing);
// shared memory: Q, 2 x K, 2 x V tiles of 64 x D elements = 80 KiB at D = 128 (two CTAs per
// SM on sm_80 and sm_90, one on sm_86/sm_89's 100 KiB), 40 KiB at D = 64.
#pragma once

namespace bitswitch {
namespace cuda {
namespace attn {

template <class T, int D>
struct PrefillConfig {
  static_assert(D == 64 || D == 128, "attention: head_dim must be 64 or 128");
  static_assert(sizeof(T) == 2, "attention: the tensor-core kernel takes bfloat16 or float16");
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kRows = 16 * kWarps;  // packed query rows per CTA
  static constexpr int kKeys = 2 * kSubBlock;  // keys per tile
  static constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static constexpr int kTileElems = kRows * D;  // kRows == kKeys: Q, K and V tiles alike
  static constexpr size_t kSmemBytes = size_t(5) * kTileElems * sizeof(T);  // Q, K x 2, V x 2
  static_assert(kRows == kKeys, "Q, K and V tiles share one size");

  // Element offset of 16-byte chunk `chunk` of tile row `row`. Tiles are [64][D] without
  // padding and chunk c of row r is stored at chunk c ^ (r % 8): an ldmatrix phase reads one
  // chunk of 8 consecutive rows, which unswizzled would all sit in the same 4 of the 32 banks
  // (a row is 128 or 256 bytes); swizzled they cover all 32. The cp.async writes (8 chunks
  // of one row) and the output staging stay conflict-free too. No padding keeps two CTAs
  // within the 164 KiB of an sm_80 SM at D = 128.
  static BS_DEVICE int at(int row, int chunk) { return row * D + ((chunk ^ (row & 7)) << 3); }
};

// Copies a 64-key tile of K or V into shared memory with cp.async: rows 0..31 from the
// sub-block starting at key s0, rows 32..63 from s1 (-1: no keys). Rows past Lk or of a
// missing sub-block are zero-filled, so the math on them stays finite.
// src: this (batch, kv head)'s K or V, row stride `stride` elements; dst: a [64][D] tile.
// Thread tid copies the 16-byte chunk tid % kChunks of rows tid / kChunks + i * kRowStep.
// One 64-bit multiply per sub-block, then the source pointer advances by a fixed step: the
// copies cost a pointer add, a compare and a select each (the destination offsets and the
// swizzle, which depends on the row only modulo 8, are compile-time constants).
template <class T, int D>
BS_DEVICE void load_kv_tile(T* dst, const T* src, int64_t stride, int s0, int s1, int lk, int tid) {
  using C = PrefillConfig<T, D>;
  constexpr int kRowStep = C::kThreads / C::kChunks;  // 8 (D = 128) or 16 (D = 64)
  constexpr int kPerHalf = kSubBlock / kRowStep;       // rows per thread per sub-block
  const int r0 = tid / C::kChunks, ch = tid % C::kChunks;
  const int64_t step = kRowStep * stride;
  T* d = dst + C::at(r0, ch);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int st = half ? s1 : s0;
    // Rows of this sub-block this thread may read: row r0 + i * kRowStep for i < n.
    const int rows = st < 0 ? 0 : lk - (st + r0);
    const T* row = src + int64_t(st < 0 ? 0 : st + r0) * stride + ch * 8;
#pragma unroll
    for (int i = 0; i < kPerHalf; ++i, row += step) {
      const bool ok = i * kRowStep < rows;
      ptx::cp_async16(d + (half * kSubBlock + i * kRowStep) * D, ok ? row : src, ok);
    }
  }
}

// p: the call (attention.cuh). Grid: one CTA per (batch, kv head, query block, tile of 64
// packed rows), flattened into blockIdx.x; later query blocks get lower CTA numbers, so under
// causal masking the CTAs with the most keys start first. Block: 128 threads; dynamic shared
// memory PrefillConfig::kSmemBytes.
// tiles: CTAs per query block, ceil(G * min(block_q, Lq) / 64).
// splits: key ranges per CTA (split-KV, the split fastest in blockIdx.x); 1 writes out and
//         lse directly, more write each range's normalized output and base-2 log-sum-exp to
//         part_o [B, Hkv, G * Lq, splits, D] / part_lse [B, Hkv, G * Lq, splits] (packed row
//         q * G + head), which attention_combine_kernel merges.
// scale_log2: p.scale * log2(e). The softmax runs in base 2 on raw scores: the tile's max is
// taken unscaled and each probability is ex2(s * c - max * c), one FFMA and one MUFU, with
// c = |scale_log2| (Q's signs are flipped for a negative scale, which is exact) and at least
// FLT_MIN, so that a masked score (-inf) never meets a zero scale.
// Requires every row of q, k, v and out to start 16-byte aligned (cp.async, 16-byte stores).
// kSplit: compiled twice, so the common unsplit launch carries none of the split path's
// registers (the kernel sits at the 255-register limit at D = 128).
template <class T, int D, bool kSplit>
__global__ void __launch_bounds__(128) attention_prefill_kernel(const AttentionParams p, int tiles, int splits_arg,
                                                                float scale_log2, float* part_o, float* part_lse) {
  using C = PrefillConfig<T, D>;
  BS_DYNAMIC_SMEM(T, smem);
  T* sq = smem;                      // [64][D] Q tile (swizzled, PrefillConfig::at), later the output
  T* sk = smem + C::kTileElems;      // [2][64][D] K tiles (double buffer)
  T* sv = sk + 2 * C::kTileElems;    // [2][64][D] V tiles

  const int tid = int(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, tq = lane % 4;  // mma fragment coordinates: row g (and g + 8), column pair tq

  const int splits = kSplit ? splits_arg : 1;
  const uint32_t q_sign = scale_log2 < 0.0f ? 0x80008000u : 0u;
  const float c2 = fmaxf(fabsf(scale_log2), 1.17549435e-38f);
  int64_t t = blockIdx.x / splits;  // the split (blockIdx.x % splits) is recomputed where needed
  const int tile = int(t % tiles);
  t /= tiles;
  const int64_t nqb = ceil_div(p.lq, p.block_q);
  const int64_t qb = nqb - 1 - t % nqb;
  t /= nqb;
  const int64_t kvh = t % p.hkv, b = t / p.hkv;
  const int64_t group = p.hq / p.hkv, q0 = qb * p.block_q;
  const int64_t packed = group * (p.lq - q0 < p.block_q ? p.lq - q0 : p.block_q);
  const int64_t p0 = int64_t(tile) * C::kRows;  // first packed row of this CTA
  if (p0 >= packed) return;  // uniform over the CTA, before any barrier
  const int nrows = int(packed - p0 < C::kRows ? packed - p0 : C::kRows);

  // Last visible key of CTA row r (-1 for rows past the end, which see nothing).
  auto row_limit = [&](int r) -> int {
    return r < nrows ? last_key(p, row0_position(p, b) + q0 + (p0 + r) / group) : -1;
  };
  const int lim0 = row_limit(warp * 16 + g), lim1 = row_limit(warp * 16 + g + 8);
  // Warp-wide bounds: packed rows grow with the query position, so the first and last
  // valid rows of the warp hold its smallest and largest limit.
  const int warp_rows = nrows - warp * 16;  // may be <= 0: the warp only helps with copies
  const int warp_lo = row_limit(warp * 16);
  const int warp_hi = warp_rows > 0 ? row_limit(warp * 16 + (warp_rows < 16 ? warp_rows : 16) - 1) : -1;

  const KeyList keys = key_list(p, b, kvh, qb, row_limit(nrows - 1));
  // This split's tiles [n_begin, n_end) of the list's ceil(count / 2); every split of a CTA
  // sees the same list, so the ranges partition it (an empty range writes an empty partial).
  const int ntiles_all = int(ceil_div(keys.count, 2)), per = (ntiles_all + splits - 1) / splits;
  const int split0 = int(blockIdx.x % splits) * per;
  const int n_begin = split0 < ntiles_all ? split0 : ntiles_all;
  const int n_end = n_begin + per < ntiles_all ? n_begin + per : ntiles_all;
  const int lk = int(p.lk);
  auto sub_start = [&](int64_t s) -> int { return s < keys.count ? keys.start(s) : -1; };
  auto sub_entry = [&](int64_t s) -> int32_t { return s < keys.count ? keys.entry(s) : -1; };
  auto sub_start_from = [&](int64_t s, int32_t e) -> int { return s < keys.count ? keys.start_from(s, e) : -1; };

  const T* kbase = static_cast<const T*>(p.k) + b * p.k_strides[0] + kvh * p.k_strides[1];
  const T* vbase = static_cast<const T*>(p.v) + b * p.v_strides[0] + kvh * p.v_strides[1];
  const int64_t kstride = p.k_strides[2], vstride = p.v_strides[2];

  // Prologue: Q with K(0) in one cp.async group, V(0) in the next.
  {
    const T* q = static_cast<const T*>(p.q);
#pragma unroll
    for (int i = 0; i < C::kRows * C::kChunks / C::kThreads; ++i) {
      const int c = tid + i * C::kThreads;
      const int r = c / C::kChunks, ch = c % C::kChunks;
      const bool ok = r < nrows;
      const int64_t pk = p0 + r;
      const T* src = ok ? q + row_offset(p.q_strides, b, kvh * group + pk % group, q0 + pk / group) + ch * 8 : q;
      ptx::cp_async16(sq + C::at(r, ch), src, ok);
    }
  }
  // Sub-block starts of the current tile (cur) and the next one (nxt). The mask entries of
  // tile n + 2 are loaded at the top of iteration n and turned into starts at its end, so
  // the loads' latency hides behind the tile's math.
  int cur0 = sub_start(2 * n_begin), cur1 = sub_start(2 * n_begin + 1);
  int nxt0 = sub_start(2 * n_begin + 2), nxt1 = sub_start(2 * n_begin + 3);
  if (n_end > n_begin) load_kv_tile<T, D>(sk, kbase, kstride, cur0, cur1, lk, tid);
  ptx::cp_async_commit();
  if (n_end > n_begin) load_kv_tile<T, D>(sv, vbase, vstride, cur0, cur1, lk, tid);
  ptx::cp_async_commit();

  // Element offsets within a K / V tile of this lane's ldmatrix row for k step (K) or column
  // pair (V) j = 0..3: PrefillConfig::at's swizzle touches only the low three chunk bits and
  // the lane's row is fixed modulo 8, so steps j + 4 and the other 16-row groups are these
  // plus constants (immediate offsets of the ldmatrix instructions).
  int koff[4], voff[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int r7 = lane % 8;
    koff[j] = ((lane / 16) * 8 + r7) * D + (((2 * j + (lane / 8) % 2) ^ r7) << 3);
    voff[j] = (((lane / 8) % 2) * 8 + r7) * D + (((2 * j + lane / 16) ^ r7) << 3);
  }

  uint32_t qf[D / 16][4];   // A fragments of this warp's 16 Q rows, one per 16-wide k step
  float o[D / 8][4];        // O accumulators: 16 rows x D, n-tiles of 8 columns
#pragma unroll
  for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
  // Running max of rows g and g + 8 in base 2: the raw max times c2, rounded, which is also
  // the exponent base of every probability computed against it (so alpha is exactly 1 while
  // the max stays).
  float m0 = -INFINITY, m1 = -INFINITY;
  float l0 = 0.0f, l1 = 0.0f;            // this thread's part of their running sums

  int stage = 0;
  for (int n = n_begin; n < n_end; ++n, stage ^= 1) {
    T* ks = sk + stage * C::kTileElems;
    T* vs = sv + stage * C::kTileElems;
    ptx::cp_async_wait<1>();  // Q and K(n) have landed; V(n) may still be in flight
    __syncthreads();          // ... for every thread's copies, and tile n - 1 is done by all
    if (n == n_begin) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
        ptx::ldmatrix_x4(qf[kk], sq + C::at(warp * 16 + ((lane / 8) % 2) * 8 + lane % 8, 2 * kk + lane / 16));
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
        for (int r = 0; r < 4; ++r) qf[kk][r] ^= q_sign;
    }
    // Tile n + 1 into the other buffer, which held tile n - 1 (finished: barrier above).
    if (n + 1 < n_end) load_kv_tile<T, D>(sk + (stage ^ 1) * C::kTileElems, kbase, kstride, nxt0, nxt1, lk, tid);
    ptx::cp_async_commit();
    if (n + 1 < n_end) load_kv_tile<T, D>(sv + (stage ^ 1) * C::kTileElems, vbase, vstride, nxt0, nxt1, lk, tid);
    ptx::cp_async_commit();
    const int32_t en0 = sub_entry(2 * n + 4), en1 = sub_entry(2 * n + 5);

    // Key range of the tile: which warps see any of it, and whether it needs a mask.
    const bool v0 = cur0 >= 0, v1 = cur1 >= 0;
    const int tmin = v0 ? cur0 : (v1 ? cur1 : lk);
    const int e0 = v0 ? (cur0 + kSubBlock - 1 < lk ? cur0 + kSubBlock - 1 : lk - 1) : -1;
    const int e1 = v1 ? (cur1 + kSubBlock - 1 < lk ? cur1 + kSubBlock - 1 : lk - 1) : -1;
    const int tmax = e0 > e1 ? e0 : e1;
    const bool active = warp_rows > 0 && tmin <= warp_hi;
    // No mask: both sub-blocks are whole and inside Lk, and every key is visible to every
    // row of the warp (the warp's smallest limit covers the tile's last key).
    const bool full = v0 && v1 && e0 == cur0 + kSubBlock - 1 && e1 == cur1 + kSubBlock - 1 && tmax <= warp_lo;

    float s[kSubBlock * 2 / 8][4];  // S: 16 rows x 64 keys, n-tiles of 8 keys
    if (active) {
#pragma unroll
      for (int j = 0; j < 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
        for (int np = 0; np < 4; ++np) {
          // Matrices: keys +0/+8 (lane / 16) x columns +0/+8 ((lane / 8) % 2): B fragments
          // of key n-tiles 2np and 2np + 1 (K rows are B's columns: no transpose).
          uint32_t kf[4];
          // = C::at(np * 16 + (lane / 16) * 8 + lane % 8, 2 * kk + (lane / 8) % 2)
          ptx::ldmatrix_x4(kf, ks + koff[kk % 4] + np * 16 * D + (kk / 4) * 64);
          ptx::mma_m16n8k16<T>(s[2 * np], qf[kk], kf, s[2 * np]);
          ptx::mma_m16n8k16<T>(s[2 * np + 1], qf[kk], kf + 2, s[2 * np + 1]);
        }
      }
      // Mask (only tiles that need it), then the tile's row maxima of the raw scores.
      if (!full) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const int st = j < 4 ? cur0 : cur1;
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int key = st + (j % 4) * 8 + 2 * tq + (c & 1);
            // key <= limit implies key < Lk; st < 0 marks a missing sub-block.
            if (st < 0 || key > (c < 2 ? lim0 : lim1)) s[j][c] = -INFINITY;
          }
        }
      }
      float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        mx0 = fmaxf(mx0, fmaxf(s[j][0], s[j][1]));
        mx1 = fmaxf(mx1, fmaxf(s[j][2], s[j][3]));
      }
      // A row's 64 scores live in the 4 lanes of its quad.
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
      // c2 > 0: scaling keeps the order (and -inf stays -inf).
      const float mn0 = fmaxf(m0, mx0 * c2), mn1 = fmaxf(m1, mx1 * c2);
      // While a row has seen no key its max stays -inf; exponentiating against 0 instead
      // keeps inf - inf (NaN) out: alpha and every p are then exactly 0.
      const float base0 = mn0 == -INFINITY ? 0.0f : mn0, base1 = mn1 == -INFINITY ? 0.0f : mn1;
      // Rescale what was accumulated only where a row's max moved: otherwise alpha is exactly
      // 1 (or the row has seen nothing and its O and sum are 0), and once a long key list
      // has set the max most tiles skip the D / 2 multiplies (a branch, not predication: the
      // warp takes it when any of its rows moved).
      if (mn0 != m0 || mn1 != m1) {
        const float alpha0 = ptx::ex2(m0 - base0), alpha1 = ptx::ex2(m1 - base1);
        l0 *= alpha0;
        l1 *= alpha1;
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
          o[j][0] *= alpha0;
          o[j][1] *= alpha0;
          o[j][2] *= alpha1;
          o[j][3] *= alpha1;
        }
      }
      m0 = mn0;
      m1 = mn1;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        s[j][0] = ptx::ex2(fmaf(s[j][0], c2, -base0));
        s[j][1] = ptx::ex2(fmaf(s[j][1], c2, -base0));
        s[j][2] = ptx::ex2(fmaf(s[j][2], c2, -base1));
        s[j][3] = ptx::ex2(fmaf(s[j][3], c2, -base1));
        l0 += s[j][0] + s[j][1];
        l1 += s[j][2] + s[j][3];
      }
    }

    ptx::cp_async_wait<2>();  // V(n) has landed (K(n + 1), V(n + 1) may be in flight)
    __syncthreads();
    if (active) {
#pragma unroll
      for (int kj = 0; kj < 4; ++kj) {
        // P's accumulator layout is already the A fragment layout of keys 16kj .. 16kj + 15.
        uint32_t pa[4];
        pa[0] = pack2<T>(s[2 * kj][0], s[2 * kj][1]);
        pa[1] = pack2<T>(s[2 * kj][2], s[2 * kj][3]);
        pa[2] = pack2<T>(s[2 * kj + 1][0], s[2 * kj + 1][1]);
        pa[3] = pack2<T>(s[2 * kj + 1][2], s[2 * kj + 1][3]);
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          // V is [key][d] in memory but B[k = key][n = d] must be column-major: the .trans
          // form gives each lane two consecutive keys of one column. Matrices: keys +0/+8
          // ((lane / 8) % 2) x columns +0/+8 (lane / 16).
          uint32_t vf[4];
          // = C::at(kj * 16 + ((lane / 8) % 2) * 8 + lane % 8, 2 * dp + lane / 16)
          ptx::ldmatrix_x4_trans(vf, vs + voff[dp % 4] + kj * 16 * D + (dp / 4) * 64);
          ptx::mma_m16n8k16<T>(o[2 * dp], pa, vf, o[2 * dp]);
          ptx::mma_m16n8k16<T>(o[2 * dp + 1], pa, vf + 2, o[2 * dp + 1]);
        }
      }
    }
    cur0 = nxt0;
    cur1 = nxt1;
    nxt0 = sub_start_from(2 * n + 4, en0);
    nxt1 = sub_start_from(2 * n + 5, en1);
  }

  // Epilogue. No copy may still be landing in the Q tile (with no key tile, nobody waited).
  ptx::cp_async_wait<0>();
  __syncthreads();
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  const float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
  if constexpr (kSplit) {
    // This split's partial: rows normalized by their own sums, in float32, and the base-2
    // log-sum-exp (-inf for a row that saw no key in this range, whose partial is 0).
    const int64_t rows_total = group * p.lq;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = warp * 16 + g + 8 * half;
      if (r - warp * 16 >= warp_rows) continue;
      const int64_t slot = ((b * p.hkv + kvh) * rows_total + q0 * group + p0 + r) * splits + blockIdx.x % splits;
      const float inv = half ? inv1 : inv0;
#pragma unroll
      for (int j = 0; j < D / 8; ++j)
        *reinterpret_cast<float2*>(part_o + slot * D + j * 8 + 2 * tq) =
            make_float2(o[j][2 * half] * inv, o[j][2 * half + 1] * inv);
      if (tq == 0) {
        const float l = half ? l1 : l0, mm = half ? m1 : m0;
        part_lse[slot] = l > 0.0f ? mm + log2f(l) : -INFINITY;
      }
    }
  } else {
    // Stage the warp's 16 output rows in its own rows of the Q tile, then write whole 16-byte
    // chunks: a row's D elements are contiguous in out, 4-byte fragment stores are not.
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      *reinterpret_cast<uint32_t*>(sq + C::at(warp * 16 + g, j) + 2 * tq) = pack2<T>(o[j][0] * inv0, o[j][1] * inv0);
      *reinterpret_cast<uint32_t*>(sq + C::at(warp * 16 + g + 8, j) + 2 * tq) = pack2<T>(o[j][2] * inv1, o[j][3] * inv1);
    }
    __syncwarp();
    T* out = static_cast<T*>(p.out);
#pragma unroll
    for (int i = 0; i < 16 * C::kChunks / 32; ++i) {
      const int c = lane + i * 32;
      const int r = c / C::kChunks, ch = c % C::kChunks;
      if (r < warp_rows) {
        const int64_t pk = p0 + warp * 16 + r;
        T* dst = out + row_offset(p.o_strides, b, kvh * group + pk % group, q0 + pk / group) + ch * 8;
        *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(sq + C::at(warp * 16 + r, ch));
      }
    }
    if (p.lse && tq == 0) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = g + 8 * half;
        if (r < warp_rows) {
          const float l = half ? l1 : l0, mm = half ? m1 : m0;
          const int64_t pk = p0 + warp * 16 + r, h = kvh * group + pk % group, i = q0 + pk / group;
          p.lse[(b * p.hq + h) * p.lq + i] = l > 0.0f ? (mm + log2f(l)) * kLn2 : -INFINITY;
        }
      }
    }
  }
}

}  // namespace attn
}  // namespace cuda
}  // namespace bitswitch
