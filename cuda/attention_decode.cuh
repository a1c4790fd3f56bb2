// Part of attention.cuh (included by it after AttentionParams and the attn:: helpers): the
// SIMT rows kernel and the split-KV combine.
//
// attention_rows_kernel: a CTA takes up to kRowsPerCta packed query rows of one query block
// and one range of that block's key sub-blocks. Decode has a handful of rows (Lq = 1 times
// the GQA group) and thousands of keys, so the work is reading K and V once at full
// bandwidth: every lane issues 16-byte loads, all rows of the CTA use each loaded key, and
// the key list is split over CTAs (split-KV) until the GPU is full. Each split writes its
// rows' normalized partial output and log2-sum-exp to the workspace; the combine kernel
// merges them. The same kernel with one split writes the result directly: that is the
// float32 path (no tensor cores for float32) and the path of 16-bit inputs whose rows are
// not 16-byte aligned (element loads). Aligned bf16/f16 decode runs on the tensor-core tile
// kernel unless BITSWITCH_CUDA_DECODE=simt (attention.cuh, decode_on_tensor_cores).
//
// Thread layout: 4 warps; a warp splits D over kLanes lanes (16 bytes each), so it reads
// kGroups = 32 / kLanes keys at a time; each 32-key sub-block gives every warp 8 keys
// (kSteps loads per lane). Every lane group keeps its own running max / sum / output per
// row (an online softmax over its keys); the 4 x kGroups partial states merge through
// shared memory at the end.
#pragma once

namespace bitswitch {
namespace cuda {
namespace attn {

template <class T, int D>
struct RowsConfig {
  static_assert(D == 64 || D == 128, "attention: head_dim must be 64 or 128");
  static_assert(sizeof(T) == 2 || sizeof(T) == 4, "attention: float32, bfloat16 or float16");
  static constexpr int kThreads = 128;
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kRows = kRowsPerCta;
  static constexpr int kVec = int(16 / sizeof(T));            // elements per 16-byte load
  static constexpr int kLanes = D / kVec;                      // lanes sharing one key row: 8..32
  static constexpr int kGroups = 32 / kLanes;                  // keys one warp load covers
  static constexpr int kKeysPerWarp = kSubBlock / kWarps;      // 8 keys of each sub-block
  static constexpr int kSteps = kKeysPerWarp / kGroups;        // loads per lane per sub-block
  static constexpr int kParts = kWarps * kGroups;              // partial softmax states per row
  static_assert(kSteps >= 1 && kKeysPerWarp % kGroups == 0, "a warp's keys of a sub-block in whole loads");
};

// p: the call (attention.cuh). Grid: one CTA per (batch, kv head, query block, row group,
// split), split fastest, flattened into blockIdx.x. Block: RowsConfig::kThreads.
// rgroups: row groups of kRows packed rows per query block, ceil(G * min(block_q, Lq) / kRows).
// splits: key ranges per row group; 1 writes out / lse directly.
// scale_log2: p.scale * log2(e), so scores are in base 2 (exp2f is one MUFU instruction).
// aligned: every row of q, k, v, out starts 16-byte aligned (vector loads allowed).
// part_o: [B, Hkv, G * Lq, splits, D] float32, each split's output normalized by its own sum
//         (0 where the split saw no key); null when splits == 1.
// part_lse: [B, Hkv, G * Lq, splits] float32 base-2 log-sum-exp of each split (-inf: no key).
template <class T, int D>
__global__ void __launch_bounds__(128, 1)
    attention_rows_kernel(const AttentionParams p, int rgroups, int splits, float scale_log2, bool aligned,
                          float* part_o, float* part_lse) {
  using C = RowsConfig<T, D>;
  constexpr int kRows = C::kRows, kVec = C::kVec;
  const int tid = int(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int grp = lane / C::kLanes;  // which of the warp's keys this lane works on
  const int sl = lane % C::kLanes;   // which 16 bytes of D: elements sl * kVec ...

  int64_t t = blockIdx.x;
  const int split = int(t % splits);
  t /= splits;
  const int rg = int(t % rgroups);
  t /= rgroups;
  const int64_t nqb = ceil_div(p.lq, p.block_q);
  const int64_t qb = t % nqb;
  t /= nqb;
  const int64_t kvh = t % p.hkv, b = t / p.hkv;
  const int64_t group = p.hq / p.hkv, q0 = qb * p.block_q;
  const int64_t packed = group * (p.lq - q0 < p.block_q ? p.lq - q0 : p.block_q);
  const int64_t r0 = int64_t(rg) * kRows;  // first packed row of this CTA
  if (r0 >= packed) return;                // uniform over the CTA, before any barrier
  const int nrows = int(packed - r0 < kRows ? packed - r0 : kRows);

  // q lives in shared memory (as float, pre-scaled): in registers it would cost 32 of them
  // per thread, and every lane group reads the same slices (broadcast reads).
  __shared__ float sq[kRows][D];
  const T* q = static_cast<const T*>(p.q);
  // Per row: the last visible key, and the running max m (base 2), sum l and output slice
  // of this lane group.
  int lim[kRows];
  float m[kRows], l[kRows], ov[kRows][kVec];
  int max_key = -1;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
    lim[r] = -1;
#pragma unroll
    for (int e = 0; e < kVec; ++e) ov[r][e] = 0.0f;
    if (r < nrows) {
      lim[r] = last_key(p, row0_position(p, b) + q0 + (r0 + r) / group);
      max_key = lim[r] > max_key ? lim[r] : max_key;
    }
  }
  for (int idx = tid; idx < kRows * D; idx += C::kThreads) {
    const int r = idx / D, d = idx % D;
    float x = 0.0f;
    if (r < nrows) {
      const int64_t pk = r0 + r, h = kvh * group + pk % group, i = q0 + pk / group;
      x = to_float(q[row_offset(p.q_strides, b, h, i) + d]) * scale_log2;
    }
    sq[r][d] = x;
  }
  __syncthreads();

  // This split's share of the (trimmed) key list; every split of a row group sees the same
  // list, so the ranges partition it. An empty range still writes its (empty) partial.
  const KeyList keys = key_list(p, b, kvh, qb, max_key);
  const int64_t per = ceil_div(keys.count, splits);
  const int64_t s_begin = split * per, s_end = keys.count < s_begin + per ? keys.count : s_begin + per;
  const T* kb = static_cast<const T*>(p.k) + b * p.k_strides[0] + kvh * p.k_strides[1] + sl * kVec;
  const T* vb = static_cast<const T*>(p.v) + b * p.v_strides[0] + kvh * p.v_strides[1] + sl * kVec;

  // The next sub-block's start (a read of the mask) is fetched one iteration ahead, so its
  // latency hides behind the current sub-block's math instead of delaying its K/V loads.
  int st_next = s_begin < s_end ? keys.start(s_begin) : -1;
  for (int64_t s = s_begin; s < s_end; ++s) {
    const int st = st_next;
    st_next = s + 1 < s_end ? keys.start(s + 1) : -1;
    if (st < 0) continue;  // a mask entry naming no block of k
    // All of this lane's loads of the sub-block are issued before any math, so kSteps x 2
    // 16-byte loads per lane are in flight at once.
    uint4 kc[C::kSteps], vc[C::kSteps];
    int key[C::kSteps];
#pragma unroll
    for (int j = 0; j < C::kSteps; ++j) {
      key[j] = st + warp * C::kKeysPerWarp + j * C::kGroups + grp;
      const bool ok = key[j] < p.lk;
      kc[j] = ok ? load_chunk(kb + key[j] * p.k_strides[2], aligned) : make_uint4(0, 0, 0, 0);
      vc[j] = ok ? load_chunk(vb + key[j] * p.v_strides[2], aligned) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r >= nrows) break;  // uniform: the shuffles below see every lane
      const float* qf = &sq[r][sl * kVec];
      float sc[C::kSteps], mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < C::kSteps; ++j) {
        float kf[kVec];
        chunk_to_float<T>(kc[j], kf);
        float dot = 0.0f;
#pragma unroll
        for (int e = 0; e < kVec; ++e) dot += qf[e] * kf[e];
#pragma unroll
        for (int off = C::kLanes / 2; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
        // key <= lim implies key < Lk (lim <= Lk - 1), so zero-filled keys never count.
        sc[j] = key[j] <= lim[r] ? dot : -INFINITY;
        mx = fmaxf(mx, sc[j]);
      }
      // Online softmax: rescale what this lane group has so far to the new max. While no
      // key was seen, m stays -inf and the exponent base is 0, so no inf - inf appears.
      const float m_new = fmaxf(m[r], mx);
      const float base = m_new == -INFINITY ? 0.0f : m_new;
      const float alpha = exp2f(m[r] - base);
      m[r] = m_new;
      l[r] *= alpha;
#pragma unroll
      for (int e = 0; e < kVec; ++e) ov[r][e] *= alpha;
#pragma unroll
      for (int j = 0; j < C::kSteps; ++j) {
        const float pr = exp2f(sc[j] - base);
        float vf[kVec];
        chunk_to_float<T>(vc[j], vf);
        l[r] += pr;
#pragma unroll
        for (int e = 0; e < kVec; ++e) ov[r][e] += pr * vf[e];
      }
    }
  }

  // Merge the kParts partial states of every row through shared memory.
  __shared__ float red_o[C::kParts][kRows][D];
  __shared__ float red_m[C::kParts][kRows];
  __shared__ float red_l[C::kParts][kRows];
  const int part = warp * C::kGroups + grp;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) red_o[part][r][sl * kVec + e] = ov[r][e];
    if (sl == 0) {
      red_m[part][r] = m[r];
      red_l[part][r] = l[r];
    }
  }
  __syncthreads();

  T* out = static_cast<T*>(p.out);
  const int64_t rows_total = group * p.lq;  // split mode: decode, one query block
  for (int idx = tid; idx < nrows * D; idx += C::kThreads) {
    const int r = idx / D, d = idx % D;
    float mx = -INFINITY;
#pragma unroll
    for (int g = 0; g < C::kParts; ++g) mx = fmaxf(mx, red_m[g][r]);
    float o = 0.0f, sum = 0.0f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int g = 0; g < C::kParts; ++g) {
        const float w = exp2f(red_m[g][r] - mx);
        o += w * red_o[g][r][d];
        sum += w * red_l[g][r];
      }
    }
    const float y = sum > 0.0f ? o / sum : 0.0f;
    const float lse2 = sum > 0.0f ? mx + log2f(sum) : -INFINITY;
    const int64_t pk = r0 + r;
    if (splits == 1) {
      const int64_t h = kvh * group + pk % group, i = q0 + pk / group;
      out[row_offset(p.o_strides, b, h, i) + d] = from_float<T>(y);
      if (d == 0 && p.lse) p.lse[(b * p.hq + h) * p.lq + i] = lse2 == -INFINITY ? -INFINITY : lse2 * kLn2;
    } else {
      const int64_t slot = ((b * p.hkv + kvh) * rows_total + pk) * splits + split;
      part_o[slot * D + d] = y;
      if (d == 0) part_lse[slot] = lse2;
    }
  }
}

// Merges the splits of one packed decode row: out = sum_s w_s o_s / sum_s w_s with
// w_s = 2^(lse_s - max lse); lse = max + log2(sum w) (in natural-log units on output).
// Grid: B * Hkv * (G * Lq) CTAs, one per packed row; block: D threads, one per element.
// splits, part_o, part_lse: as written by attention_rows_kernel.
template <class T, int D>
__global__ void __launch_bounds__(128)
    attention_combine_kernel(const AttentionParams p, int splits, const float* part_o, const float* part_lse) {
  const int d = int(threadIdx.x);
  const int64_t group = p.hq / p.hkv, rows_total = group * p.lq;
  const int64_t row = blockIdx.x;  // ((b * Hkv + kvh) * rows_total + packed row)
  const int64_t pk = row % rows_total, kvh = (row / rows_total) % p.hkv, b = row / (rows_total * p.hkv);
  const float* pl = part_lse + row * splits;
  const float* po = part_o + row * splits * D + d;
  float mx = -INFINITY;
  for (int s = 0; s < splits; ++s) mx = fmaxf(mx, pl[s]);
  float o = 0.0f, sum = 0.0f;
  if (mx != -INFINITY) {
    for (int s = 0; s < splits; ++s) {
      const float w = exp2f(pl[s] - mx);  // 0 for an empty split (lse -inf, o 0)
      o += w * po[int64_t(s) * D];
      sum += w;
    }
  }
  const int64_t h = kvh * group + pk % group, i = pk / group;
  static_cast<T*>(p.out)[row_offset(p.o_strides, b, h, i) + d] = from_float<T>(sum > 0.0f ? o / sum : 0.0f);
  if (d == 0 && p.lse) p.lse[(b * p.hq + h) * p.lq + i] = sum > 0.0f ? (mx + log2f(sum)) * kLn2 : -INFINITY;
}

}  // namespace attn
}  // namespace cuda
}  // namespace bitswitch
