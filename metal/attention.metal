// bitswitch block-sparse attention for Apple GPUs: softmax(scale q k^T) v over the key
// blocks a BSR BlockMask selects (python/bitswitch/attention.py), causal on top, GQA,
// head_dim D in {64, 128}, float32 accumulation, a row with no key gives 0 (lse -inf).
//
// q [B, Hq, Lq, D], k and v [B, Hkv, Lk, D] of type T with any row, head and batch strides
// (unit stride along D); out [B, Hq, Lq, D] contiguous; lse float32 [B, Hq, Lq] natural log.
// Kernels (1-D grids, planned by bitswitch/metal.py):
//   bs_attention         flash forward: a threadgroup per 16 query rows of one head.
//   bs_attention_decode  few query rows (decode): all rows of the Hq/Hkv heads sharing a kv
//                        head, keys split over threadgroups; bs_attention_combine merges
//                        the splits.
//
// ip (int32):
#define BS_IP_B 0
#define BS_IP_HQ 1
#define BS_IP_HKV 2
#define BS_IP_LQ 3
#define BS_IP_LK 4
#define BS_IP_QOFF 5     // absolute position of query row 0
#define BS_IP_CAUSAL 6
#define BS_IP_MASK 7     // 1: indptr/indices hold a BlockMask, 0: dense
#define BS_IP_BQ 8       // mask query block
#define BS_IP_BK 9       // mask key block
#define BS_IP_NQB 10     // mask query blocks (indptr rows hold NQB + 1 entries)
#define BS_IP_CAP 11     // mask capacity (indices per row)
#define BS_IP_QS 12      // q strides: batch, head, row (elements)
#define BS_IP_KS 15      // k strides
#define BS_IP_VS 18      // v strides
#define BS_IP_SPLITS 21  // decode: key splits per (batch, kv head)
#define BS_IP_COUNT 22
// fp (float32): fp[0] = scale * log2(e) (scores are kept in base 2).

#define BS_LN2 0.69314718055994530942f
// The running max of a row that has seen no key: below any real score, and finite, so no
// arithmetic here meets an infinity (Metal may compile with fast math, which assumes none).
// exp2(BS_NO_SCORE - m) is 0 for every real m.
#define BS_NO_SCORE (-1.0e30f)

// -- forward --------------------------------------------------------------------------------
// 16 query rows x chunks of 32 keys, four simdgroups. Per chunk: S = Q K^T by simdgroup
// matrices (each simdgroup 8 keys), the online softmax on S (8 threads per row, shuffles
// within the 8), then O = diag(alpha) O + P V (each simdgroup a quarter of D). Q, the K or
// V chunk, S and the diag(alpha) matrices live in threadgroup memory (26.6 KB at D = 128).
#define BS_ATT_BQ 16
#define BS_ATT_BC 32
#define BS_ATT_THREADS 128
#define BS_ATT_DENSE_BLOCK 32  // key block of the dense iteration

template <typename T, int D>
void bs_attention(const device T* q, const device T* k, const device T* v, const device int* indptr,
                  const device int* indices, device T* out, device float* lse, const device int* ip,
                  const device float* fp, threadgroup float* qs, threadgroup float* kvs, threadgroup float* ss,
                  threadgroup float* diag, threadgroup float* rows, uint tg, uint lid, uint sg) {
  const int Hq = ip[BS_IP_HQ], Hkv = ip[BS_IP_HKV], Lq = ip[BS_IP_LQ], Lk = ip[BS_IP_LK];
  const int q_offset = ip[BS_IP_QOFF];
  const bool causal = ip[BS_IP_CAUSAL] != 0, masked = ip[BS_IP_MASK] != 0;
  const float scale = fp[0];
  const int tiles = (Lq + BS_ATT_BQ - 1) / BS_ATT_BQ;
  const int qt = int(tg) % tiles;
  const int h = (int(tg) / tiles) % Hq;
  const int b = int(tg) / (tiles * Hq);
  const int kvh = h / (Hq / Hkv);
  const int q0 = qt * BS_ATT_BQ;

  const device T* qb = q + long(b) * ip[BS_IP_QS] + long(h) * ip[BS_IP_QS + 1];
  const device T* kb = k + long(b) * ip[BS_IP_KS] + long(kvh) * ip[BS_IP_KS + 1];
  const device T* vb = v + long(b) * ip[BS_IP_VS] + long(kvh) * ip[BS_IP_VS + 1];
  for (int e = int(lid); e < BS_ATT_BQ * D; e += BS_ATT_THREADS) {
    const int r = e / D, d = e % D;
    qs[e] = q0 + r < Lq ? static_cast<float>(qb[long(q0 + r) * ip[BS_IP_QS + 2] + d]) : 0.0f;
  }
  // Two 8 x 8 diagonal matrices (rows 0-7 and 8-15) carry each chunk's rescale factors.
  for (int e = int(lid); e < 2 * 64; e += BS_ATT_THREADS) diag[e] = 0.0f;

  // Softmax duty: row sr, scores 4 sub .. 4 sub + 3 of each chunk. m and l are kept by all
  // eight threads of the row (they compute the same reductions).
  const int sr = int(lid) / 8, sub = int(lid) % 8;
  const int sr_pos = q_offset + q0 + sr;
  float m_i = BS_NO_SCORE, l_i = 0.0f;

  simdgroup_float8x8 o[2][D / 32];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < D / 32; ++j) o[i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  const int oc = int(sg) * (D / 4);  // this simdgroup's columns of O

  // The key blocks this tile reads: the mask row of its query block, or all of them.
  int first = 0, last = (Lk + BS_ATT_DENSE_BLOCK - 1) / BS_ATT_DENSE_BLOCK, block = BS_ATT_DENSE_BLOCK;
  long mask_row = 0;
  if (masked) {
    mask_row = long(b) * Hkv + kvh;
    const long p = mask_row * (ip[BS_IP_NQB] + 1) + q0 / ip[BS_IP_BQ];
    first = indptr[p];
    last = indptr[p + 1];
    block = ip[BS_IP_BK];
  }
  const int last_pos = q_offset + min(q0 + BS_ATT_BQ, Lq) - 1;  // the tile's last query position

  for (int ei = first; ei < last; ++ei) {
    const int kblock = masked ? indices[mask_row * ip[BS_IP_CAP] + ei] : ei;
    const int kend = min((kblock + 1) * block, Lk);
    for (int c0 = kblock * block; c0 < kend; c0 += BS_ATT_BC) {
      if (causal && c0 > last_pos) break;
      threadgroup_barrier(mem_flags::mem_threadgroup);  // the previous chunk's P V is done
      for (int e = int(lid); e < BS_ATT_BC * D; e += BS_ATT_THREADS) {
        const int j = e / D, d = e % D;
        kvs[e] = c0 + j < kend ? static_cast<float>(kb[long(c0 + j) * ip[BS_IP_KS + 2] + d]) : 0.0f;
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);

      // S[16][32] = Q K^T: this simdgroup's 8 keys for both row halves.
      for (int rh = 0; rh < 2; ++rh) {
        simdgroup_float8x8 s = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
        for (int d8 = 0; d8 < D; d8 += 8) {
          simdgroup_float8x8 qm, km;
          simdgroup_load(qm, qs + rh * 8 * D + d8, D);
          simdgroup_load(km, kvs + int(sg) * 8 * D + d8, D, ulong2(0, 0), true);
          simdgroup_multiply_accumulate(s, qm, km, s);
        }
        simdgroup_store(s, ss + rh * 8 * BS_ATT_BC + int(sg) * 8, BS_ATT_BC);
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);

      // Online softmax over the chunk; P replaces S.
      float t[4];
      bool seen[4];
      float cmax = BS_NO_SCORE;
      for (int jj = 0; jj < 4; ++jj) {
        const int j = sub * 4 + jj;
        const int pos = c0 + j;
        seen[jj] = pos < kend && (!causal || pos <= sr_pos);
        t[jj] = ss[sr * BS_ATT_BC + j] * scale;
        if (seen[jj]) cmax = max(cmax, t[jj]);
      }
      cmax = max(cmax, simd_shuffle_xor(cmax, ushort(1)));
      cmax = max(cmax, simd_shuffle_xor(cmax, ushort(2)));
      cmax = max(cmax, simd_shuffle_xor(cmax, ushort(4)));
      const float m_new = max(m_i, cmax);
      const bool none = m_new == BS_NO_SCORE;  // no key of this row seen yet
      const float alpha = none ? 1.0f : exp2(m_i - m_new);
      float psum = 0.0f;
      for (int jj = 0; jj < 4; ++jj) {
        const float p = seen[jj] ? exp2(t[jj] - m_new) : 0.0f;
        psum += p;
        ss[sr * BS_ATT_BC + sub * 4 + jj] = p;
      }
      psum += simd_shuffle_xor(psum, ushort(1));
      psum += simd_shuffle_xor(psum, ushort(2));
      psum += simd_shuffle_xor(psum, ushort(4));
      l_i = l_i * alpha + psum;
      m_i = m_new;
      if (sub == 0) diag[(sr / 8) * 64 + (sr % 8) * 9] = alpha;

      // The V chunk replaces K (S is complete, so K is no longer read).
      for (int e = int(lid); e < BS_ATT_BC * D; e += BS_ATT_THREADS) {
        const int j = e / D, d = e % D;
        kvs[e] = c0 + j < kend ? static_cast<float>(vb[long(c0 + j) * ip[BS_IP_VS + 2] + d]) : 0.0f;
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);

      // O = diag(alpha) O + P V on this simdgroup's columns.
      for (int rh = 0; rh < 2; ++rh) {
        simdgroup_float8x8 am;
        simdgroup_load(am, diag + rh * 64, 8);
        simdgroup_float8x8 pm[BS_ATT_BC / 8];
        for (int k8 = 0; k8 < BS_ATT_BC / 8; ++k8) simdgroup_load(pm[k8], ss + rh * 8 * BS_ATT_BC + k8 * 8, BS_ATT_BC);
        for (int j = 0; j < D / 32; ++j) {
          simdgroup_float8x8 acc;
          simdgroup_multiply(acc, am, o[rh][j]);
          for (int k8 = 0; k8 < BS_ATT_BC / 8; ++k8) {
            simdgroup_float8x8 vm;
            simdgroup_load(vm, kvs + k8 * 8 * D + oc + 8 * j, D);
            simdgroup_multiply_accumulate(acc, pm[k8], vm, acc);
          }
          o[rh][j] = acc;
        }
      }
    }
  }

  // O / l through threadgroup memory (kvs holds 32 x D floats, O needs 16 x D).
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int rh = 0; rh < 2; ++rh)
    for (int j = 0; j < D / 32; ++j) simdgroup_store(o[rh][j], kvs + rh * 8 * D + oc + 8 * j, D);
  if (sub == 0) {
    rows[sr] = l_i;
    rows[BS_ATT_BQ + sr] = m_i;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const long out_row = (long(b) * Hq + h) * Lq + q0;
  for (int e = int(lid); e < BS_ATT_BQ * D; e += BS_ATT_THREADS) {
    const int r = e / D;
    if (q0 + r >= Lq) continue;
    const float l = rows[r];
    out[out_row * D + e] = static_cast<T>(l > 0.0f ? kvs[e] / l : 0.0f);
  }
  if (int(lid) < BS_ATT_BQ && q0 + int(lid) < Lq) {
    const float l = rows[lid];
    lse[out_row + lid] = l > 0.0f ? (rows[BS_ATT_BQ + lid] + log2(l)) * BS_LN2 : -INFINITY;
  }
}

// -- decode ---------------------------------------------------------------------------------
// R = (Hq / Hkv) * Lq <= BS_DEC_MAXR query rows (every head that shares the kv head, every
// query row) against the keys of one split: the split's share of the selected key blocks
// (the mask row of query block 0, which holds all Lq rows) or of all keys. Lanes split D;
// the four simdgroups take every fourth key; each row keeps a running max, sum and output.
// A split writes its unnormalized output and (max, sum) per row; bs_attention_combine
// merges the splits.
#define BS_DEC_THREADS 128
#define BS_DEC_MAXR 8
#define BS_DEC_DENSE_BLOCK 64

template <typename T, int D>
void bs_attention_decode(const device T* q, const device T* k, const device T* v, const device int* indptr,
                         const device int* indices, device float* part_o, device float* part_ml,
                         const device int* ip, const device float* fp, threadgroup float* red_o,
                         threadgroup float* red_ml, uint tg, uint lid, uint lane, uint sg) {
  constexpr int E = D / 32;  // elements of D per lane
  const int Hq = ip[BS_IP_HQ], Hkv = ip[BS_IP_HKV], Lq = ip[BS_IP_LQ], Lk = ip[BS_IP_LK];
  const int q_offset = ip[BS_IP_QOFF], splits = ip[BS_IP_SPLITS];
  const bool causal = ip[BS_IP_CAUSAL] != 0, masked = ip[BS_IP_MASK] != 0;
  const int G = Hq / Hkv, R = G * Lq;
  const int split = int(tg) % splits;
  const int kvh = (int(tg) / splits) % Hkv;
  const int b = int(tg) / (splits * Hkv);
  const int d0 = int(lane) * E;

  float qv[BS_DEC_MAXR][E], ov[BS_DEC_MAXR][E], m[BS_DEC_MAXR], l[BS_DEC_MAXR];
  for (int r = 0; r < BS_DEC_MAXR; ++r) {
    m[r] = BS_NO_SCORE;
    l[r] = 0.0f;
    const int h = kvh * G + min(r, R - 1) / Lq, i = min(r, R - 1) % Lq;
    const device T* qr = q + long(b) * ip[BS_IP_QS] + long(h) * ip[BS_IP_QS + 1] + long(i) * ip[BS_IP_QS + 2];
    for (int e = 0; e < E; ++e) {
      qv[r][e] = static_cast<float>(qr[d0 + e]) * fp[0];
      ov[r][e] = 0.0f;
    }
  }

  int first = 0, last = (Lk + BS_DEC_DENSE_BLOCK - 1) / BS_DEC_DENSE_BLOCK, block = BS_DEC_DENSE_BLOCK;
  long mask_row = 0;
  if (masked) {
    mask_row = long(b) * Hkv + kvh;
    first = indptr[mask_row * (ip[BS_IP_NQB] + 1)];
    last = indptr[mask_row * (ip[BS_IP_NQB] + 1) + 1];
    block = ip[BS_IP_BK];
  }
  const int per = (last - first + splits - 1) / splits;
  const int e_begin = first + split * per, e_end = min(last, e_begin + per);
  const int last_pos = q_offset + Lq - 1;
  const device T* kb = k + long(b) * ip[BS_IP_KS] + long(kvh) * ip[BS_IP_KS + 1];
  const device T* vb = v + long(b) * ip[BS_IP_VS] + long(kvh) * ip[BS_IP_VS + 1];

  for (int ei = e_begin; ei < e_end; ++ei) {
    const int kblock = masked ? indices[mask_row * ip[BS_IP_CAP] + ei] : ei;
    const int kend = min((kblock + 1) * block, Lk);
    for (int j = kblock * block + int(sg); j < kend; j += BS_DEC_THREADS / 32) {
      if (causal && j > last_pos) break;
      float kv[E], vv[E];
      const device T* kr = kb + long(j) * ip[BS_IP_KS + 2] + d0;
      const device T* vr = vb + long(j) * ip[BS_IP_VS + 2] + d0;
      for (int e = 0; e < E; ++e) {
        kv[e] = static_cast<float>(kr[e]);
        vv[e] = static_cast<float>(vr[e]);
      }
      for (int r = 0; r < BS_DEC_MAXR; ++r) {
        if (r >= R) break;
        float dot = 0.0f;
        for (int e = 0; e < E; ++e) dot += qv[r][e] * kv[e];
        const float s = simd_sum(dot);
        if (causal && j > q_offset + r % Lq) continue;
        const float m_new = max(m[r], s);
        const float alpha = exp2(m[r] - m_new);  // 0 while no key was seen
        const float p = exp2(s - m_new);
        l[r] = l[r] * alpha + p;
        for (int e = 0; e < E; ++e) ov[r][e] = ov[r][e] * alpha + p * vv[e];
        m[r] = m_new;
      }
    }
  }

  // Merge the four simdgroups, then write this split's rows.
  for (int r = 0; r < R; ++r) {
    for (int e = 0; e < E; ++e) red_o[(int(sg) * BS_DEC_MAXR + r) * D + d0 + e] = ov[r][e];
    if (lane == 0) {
      red_ml[(int(sg) * BS_DEC_MAXR + r) * 2] = m[r];
      red_ml[(int(sg) * BS_DEC_MAXR + r) * 2 + 1] = l[r];
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const long part = (long(b) * Hkv + kvh) * splits + split;
  for (int e = int(lid); e < R * D; e += BS_DEC_THREADS) {
    const int r = e / D, d = e % D;
    float mx = BS_NO_SCORE;
    for (int g = 0; g < BS_DEC_THREADS / 32; ++g) mx = max(mx, red_ml[(g * BS_DEC_MAXR + r) * 2]);
    float acc = 0.0f, lsum = 0.0f;
    if (mx != BS_NO_SCORE) {
      for (int g = 0; g < BS_DEC_THREADS / 32; ++g) {
        const float w = exp2(red_ml[(g * BS_DEC_MAXR + r) * 2] - mx);
        acc += w * red_o[(g * BS_DEC_MAXR + r) * D + d];
        lsum += w * red_ml[(g * BS_DEC_MAXR + r) * 2 + 1];
      }
    }
    part_o[(part * R + r) * D + d] = acc;
    if (d == 0) {
      part_ml[(part * R + r) * 2] = mx;
      part_ml[(part * R + r) * 2 + 1] = lsum;
    }
  }
}

// One threadgroup of D threads per (batch, kv head, row): out = sum_s w_s o_s / sum_s w_s l_s
// with w_s = 2^(m_s - max m).
template <typename T, int D>
void bs_attention_combine(const device float* part_o, const device float* part_ml, device T* out,
                          device float* lse, const device int* ip, uint tg, uint lid) {
  const int Hq = ip[BS_IP_HQ], Hkv = ip[BS_IP_HKV], Lq = ip[BS_IP_LQ], splits = ip[BS_IP_SPLITS];
  const int G = Hq / Hkv, R = G * Lq;
  const int r = int(tg) % R;
  const long bh = int(tg) / R;  // b * Hkv + kvh
  const int d = int(lid);
  float mx = BS_NO_SCORE;
  for (int s = 0; s < splits; ++s) mx = max(mx, part_ml[((bh * splits + s) * R + r) * 2]);
  float acc = 0.0f, lsum = 0.0f;
  if (mx != BS_NO_SCORE) {
    for (int s = 0; s < splits; ++s) {
      const long p = (bh * splits + s) * R + r;
      const float w = exp2(part_ml[p * 2] - mx);
      acc += w * part_o[p * D + d];
      lsum += w * part_ml[p * 2 + 1];
    }
  }
  const long b = bh / Hkv;
  const int h = int(bh % Hkv) * G + r / Lq, i = r % Lq;
  const long row = (b * Hq + h) * Lq + i;
  out[row * D + d] = static_cast<T>(lsum > 0.0f ? acc / lsum : 0.0f);
  if (d == 0) lse[row] = lsum > 0.0f ? (mx + log2(lsum)) * BS_LN2 : -INFINITY;
}
