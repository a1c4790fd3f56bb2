// Flash-style block-sparse attention for the AVX2 and AVX-512 units, on the `Isa` traits
// of x86_qmatmul.h (its GEMM micro-kernel does both products).
//
// One task is one (batch, kv head, query block). Its rows are the query block of every
// query head sharing the kv head (GQA), so each key/value block is converted and packed
// once for all of them. For each key block the mask selects:
//   S = Q K^T          (Q pre-scaled by scale * log2(e), so the softmax uses exp2)
//   online softmax:    m' = max(m, rowmax S), P = 2^(S - m'), l = l 2^(m - m') + rowsum P
//   O = O 2^(m - m') + P V
// and at the end out = O / l, lse = (m + log2 l) ln 2. A row that never sees a key keeps
// l = 0 and writes zeros. Work is proportional to the number of selected blocks.
//
// With few rows (decode: one token times the GQA group) packing K^T would cost as much
// as the product itself, so such tasks take each unit's decode kernel instead.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

#include "attention_common.h"
#include "x86_qmatmul.h"

namespace bitswitch {
namespace cpu {
namespace {

// Tasks with at most this many rows use the dot-product (decode) path.
constexpr int64_t kAttnDotRows = 8;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// 2^x for 8 floats, relative error < 2e-7; exactly 0 below -126 (masked scores are -inf).
inline __m256 exp2_ps(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-126.0f);
  const __m256 dead = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);  // true for -inf too
  x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(127.0f));
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);  // [-0.5, 0.5]
  // Taylor series of e^(f ln 2) to degree 6: error < (0.5 ln 2)^7 / 7! ~ 1.2e-7.
  __m256 p = _mm256_set1_ps(1.5403530393381608e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291076284772e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504108664821580e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022650695910071e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718055994531e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(dead, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

// Rows of a task: the query block of each of the `group` query heads sharing kv head hk.
struct AttnTask {
  int64_t b, hk, qb, i0, nq, group, rows;
  int64_t row_query(int64_t r) const { return i0 + r % nq; }
  int64_t row_head(int64_t r) const { return hk * group + r / nq; }
};

inline void load_row(const void* base, DType t, int64_t off, int64_t d, float* dst) {
  const char* p = static_cast<const char*>(base) + off * dtype_size(t);
  for (int64_t i = 0; i < d; i += 8) _mm256_storeu_ps(dst + i, load8(p + i * dtype_size(t), t));
}

// Rows [j0, j0 + n) of one (batch, kv head) of k or v as float32 rows: float32 inputs are
// read in place, the others converted into buf. Returns the first row; *ld gets the stride.
inline const float* block_rows(const void* base, const int64_t* strides, DType t, int64_t b, int64_t h, int64_t j0,
                               int64_t n, int64_t d, float* buf, int64_t* ld) {
  if (t == DType::kFloat32) {
    *ld = strides[2];
    return static_cast<const float*>(base) + offset(strides, b, h, j0);
  }
  for (int64_t j = 0; j < n; ++j) load_row(base, t, offset(strides, b, h, j0 + j), d, buf + j * d);
  *ld = d;
  return buf;
}

// Splits n rows into micro-kernel tiles of at most MR rows; a remainder below 4 rows is
// avoided (such tiles have too few accumulators to hide the FMA latency).
template <int MR, class F>
inline void for_tiles(int64_t n, F&& f) {
  for (int64_t i = 0; i < n;) {
    const int64_t r = n - i, t = r <= MR ? r : (r < MR + 4 ? r - 4 : MR);
    f(i, int(t));
    i += t;
  }
}

// ---- Many rows (prefill): transposed tiles on the GEMM micro-kernel ---------------------
//
// The task's rows are cut into panels of NR rows (NR = the micro-kernel width) and every
// product is computed transposed, with the rows along the vector lanes:
//   S^T[keys x NR] = K[keys x D] Q^T[D x NR]        (x = key rows, panel = Q^T, packed once)
//   O^T[D x NR]   += V^T[D x keys] P^T[keys x NR]   (x = value columns, panel = P^T)
// so keys and values are read as they lie (float32 in place, other dtypes converted once
// per block) and nothing is transposed per block. The softmax runs down the key axis with
// the running max and sum of NR rows in vector lanes; a block shorter than block_k simply
// has fewer key rows, no padding.
template <class Isa>
struct TiledScratch {
  static constexpr int NR = Isa::kNR;
  float* qt;  // [panels][D][NR]   pre-scaled queries (zero past the task's rows)
  float* ot;  // [panels][D][NR]   output accumulators
  float* st;  // [block_k][NR]     scores, then probabilities, of one panel
  float* kf;  // [block_k][D]      a converted key block
  float* vf;  // [block_k][D]      a converted value block
  float* m;   // [panels * NR]     running max (log2 units)
  float* l;   // [panels * NR]     running sum
  float* row; // [D]

  static size_t floats(int64_t max_rows, int64_t d, int64_t block_k) {
    const int64_t panels = ceil_div(max_rows, NR);
    return size_t(2 * panels * d * NR + block_k * NR + 2 * block_k * d + 2 * panels * NR + d);
  }
  // Panels first: the micro-kernel loads them aligned (D, block_k and NR keep them so).
  TiledScratch(float* base, int64_t rows, int64_t d, int64_t block_k) {
    const int64_t panels = ceil_div(rows, NR);
    qt = base;
    ot = qt + panels * d * NR;
    st = ot + panels * d * NR;
    kf = st + block_k * NR;
    vf = kf + block_k * d;
    m = vf + block_k * d;
    l = m + panels * NR;
    row = l + panels * NR;
  }
};

// Online softmax of one panel of scores st[nk][NR] (log2 units, -inf = masked) down the key
// axis: turns st into probabilities, updates the lanes' running max m and sum l, and
// rescales the panel's accumulators ot[D][NR].
template <int NR>
inline void softmax_panel(float* st, int64_t nk, float* m, float* l, float* ot, int64_t d) {
  constexpr int V = NR / 8;
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 mx[V], sum[V], alpha[V];
  for (int v = 0; v < V; ++v) mx[v] = _mm256_loadu_ps(m + 8 * v);
  for (int64_t j = 0; j < nk; ++j)
    for (int v = 0; v < V; ++v) mx[v] = _mm256_max_ps(mx[v], _mm256_load_ps(st + j * NR + 8 * v));
  for (int v = 0; v < V; ++v) {
    // A lane that has seen no key keeps max -inf; subtracting 0 instead leaves its
    // probabilities 2^-inf = 0 rather than NaN.
    const __m256 m_old = _mm256_loadu_ps(m + 8 * v);
    const __m256 m_use = _mm256_andnot_ps(_mm256_cmp_ps(mx[v], ninf, _CMP_EQ_OQ), mx[v]);
    alpha[v] = exp2_ps(_mm256_sub_ps(m_old, m_use));  // 0 while m_old is -inf
    _mm256_storeu_ps(m + 8 * v, mx[v]);
    mx[v] = m_use;
    sum[v] = _mm256_setzero_ps();
  }
  for (int64_t j = 0; j < nk; ++j)
    for (int v = 0; v < V; ++v) {
      const __m256 p = exp2_ps(_mm256_sub_ps(_mm256_load_ps(st + j * NR + 8 * v), mx[v]));
      _mm256_store_ps(st + j * NR + 8 * v, p);
      sum[v] = _mm256_add_ps(sum[v], p);
    }
  for (int v = 0; v < V; ++v)
    _mm256_storeu_ps(l + 8 * v, _mm256_fmadd_ps(_mm256_loadu_ps(l + 8 * v), alpha[v], sum[v]));
  for (int64_t i = 0; i < d; ++i)
    for (int v = 0; v < V; ++v)
      _mm256_store_ps(ot + i * NR + 8 * v, _mm256_mul_ps(_mm256_load_ps(ot + i * NR + 8 * v), alpha[v]));
}

// out = O / l (zeros for a row that saw no key) and lse = (m + log2 l) ln 2 for the rows of a
// tiled task: O^T in panels ot[panels][D][NR], row r in lane r % NR of panel r / NR; row: D
// floats of scratch.
template <int NR>
inline void write_tiled_rows(const AttentionArgs& a, const AttnTask& t, const float* ot, const float* m,
                             const float* l, float* row) {
  const int64_t D = a.d, es = dtype_size(a.dtype);
  for (int64_t r = 0; r < t.rows; ++r) {
    const int64_t h = t.row_head(r), i = t.row_query(r);
    const float* o = ot + (r / NR) * D * NR + r % NR;
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
    for (int64_t d = 0; d < D; ++d) row[d] = o[d * NR] * inv;
    char* dst = static_cast<char*>(a.out) + offset(a.o_strides, t.b, h, i) * es;
    for (int64_t d = 0; d < D; d += 8) store8(dst + d * es, a.dtype, _mm256_loadu_ps(row + d));
    if (a.lse)
      a.lse[(t.b * a.hq + h) * a.lq + i] =
          l[r] > 0.0f ? (m[r] + std::log2(l[r])) * kLn2 : -std::numeric_limits<float>::infinity();
  }
}

template <class Isa>
void attention_task_tiled(const AttentionArgs& a, const AttnTask& t, const BlockList& blocks, float* base) {
  constexpr int NR = Isa::kNR, MR = Isa::kMR;
  const int64_t D = a.d, panels = ceil_div(t.rows, NR);
  const float ninf = -std::numeric_limits<float>::infinity();
  TiledScratch<Isa> w(base, t.rows, D, a.block_k);
  const float qs = a.scale * kLog2e;
  for (int64_t r = 0; r < panels * NR; ++r) {
    float* q = w.qt + (r / NR) * D * NR + r % NR;
    if (r < t.rows) load_row(a.q, a.dtype, offset(a.q_strides, t.b, t.row_head(r), t.row_query(r)), D, w.row);
    for (int64_t d = 0; d < D; ++d) q[d * NR] = r < t.rows ? w.row[d] * qs : 0.0f;
    w.m[r] = ninf;
    w.l[r] = 0.0f;
  }
  for (int64_t i = 0; i < panels * D * NR; i += 8) _mm256_store_ps(w.ot + i, _mm256_setzero_ps());
  // Rows whose causal limit may cut into a block: every row sees keys below key_limit(i0).
  const int64_t all_see = key_limit(a, t.i0);
  for (int64_t bi = 0; bi < blocks.count; ++bi) {
    const int64_t j0 = blocks[bi] * a.block_k;
    const int64_t nk = imin(a.block_k, a.lk - j0);
    if (nk <= 0 || j0 >= key_limit(a, t.i0 + t.nq - 1)) continue;  // past the diagonal for every row
    int64_t ldk, ldv;
    const float* kb = block_rows(a.k, a.k_strides, a.dtype, t.b, t.hk, j0, nk, D, w.kf, &ldk);
    const float* vb = block_rows(a.v, a.v_strides, a.dtype, t.b, t.hk, j0, nk, D, w.vf, &ldv);
    for (int64_t p = 0; p < panels; ++p) {
      const float* qt = w.qt + p * D * NR;
      float* ot = w.ot + p * D * NR;
      for (int64_t i = 0; i < nk * NR; i += 8) _mm256_store_ps(w.st + i, _mm256_setzero_ps());
      for_tiles<MR>(nk, [&](int64_t j, int mr) {
        micro_rows_at_most<Isa, MR>(mr, kb + j * ldk, ldk, 1, qt, D, w.st + j * NR, NR);
      });
      if (a.causal && j0 + nk > all_see) {
        for (int64_t c = 0; c < NR; ++c) {
          const int64_t r = p * NR + c;
          const int64_t vis = r < t.rows ? imax(key_limit(a, t.row_query(r)) - j0, 0) : nk;
          for (int64_t j = vis; j < nk; ++j) w.st[j * NR + c] = ninf;
        }
      }
      softmax_panel<NR>(w.st, nk, w.m + p * NR, w.l + p * NR, ot, D);
      for_tiles<MR>(D, [&](int64_t d, int mr) {
        micro_rows_at_most<Isa, MR>(mr, vb + d, 1, ldv, w.st, nk, ot + d * NR, NR);
      });
    }
  }
  write_tiled_rows<NR>(a, t, w.ot, w.m, w.l, w.row);
}

// ---- Few rows (decode) -----------------------------------------------------------------
//
// A decode task has one token (or a few) times the GQA group: at most kAttnDotRows rows,
// too few to tile. Its rows are run over a range of its key blocks by the unit's decode
// kernel (Isa::decode_rows: attention_task_dot below for AVX2, avx512_attention.h for
// AVX-512), which leaves each row's flash state: O unnormalized, m, l. With enough tasks
// for the threads that range is every block and the state is written out at once;
// otherwise (few batch x kv heads, long contexts) each task's blocks are split into
// ranges run as separate tasks and their states merged (flash-decoding split-KV).

// The flash state of a task's rows after a range of its key blocks.
struct DecodeRows {
  float* o;  // [rows][D]  sum of 2^(s - m) v over the keys seen, natural element order
  float* m;  // [rows]     running max of the scores (log2 units), -inf before any key
  float* l;  // [rows]     running sum of 2^(s - m)
  static size_t floats(int64_t rows, int64_t d) { return size_t(round_up(rows * (d + 2), 16)); }
  static DecodeRows at(float* base, int64_t rows, int64_t d) {
    return DecodeRows{base, base + rows * d, base + rows * (d + 1)};
  }
};

// out = O / l (zeros for a row that saw no key) and lse = (m + log2 l) ln 2.
inline void write_decode_rows(const AttentionArgs& a, const AttnTask& t, const DecodeRows& st) {
  const int64_t D = a.d;
  for (int64_t r = 0; r < t.rows; ++r) {
    const int64_t h = t.row_head(r), i = t.row_query(r);
    const float l = st.l[r];
    const __m256 iv = _mm256_set1_ps(l > 0.0f ? 1.0f / l : 0.0f);
    char* dst = static_cast<char*>(a.out) + offset(a.o_strides, t.b, h, i) * dtype_size(a.dtype);
    for (int64_t d = 0; d < D; d += 8)
      store8(dst + d * dtype_size(a.dtype), a.dtype, _mm256_mul_ps(_mm256_loadu_ps(st.o + r * D + d), iv));
    if (a.lse)
      a.lse[(t.b * a.hq + h) * a.lq + i] =
          l > 0.0f ? (st.m[r] + std::log2(l)) * kLn2 : -std::numeric_limits<float>::infinity();
  }
}

// Merges the states of n ranges of the same rows into the first: with M the largest m,
// O = sum 2^(m_s - M) O_s and l = sum 2^(m_s - M) l_s (a range that saw no key has l = 0
// and m = -inf, weight 0).
inline void merge_decode_rows(const DecodeRows* parts, int64_t n, int64_t rows, int64_t d) {
  const DecodeRows& dst = parts[0];
  for (int64_t r = 0; r < rows; ++r) {
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t s = 0; s < n; ++s) mx = std::max(mx, parts[s].m[r]);
    if (mx == -std::numeric_limits<float>::infinity()) continue;  // every range is empty: l = 0
    float* o = dst.o + r * d;
    const float w0 = std::exp2(dst.m[r] - mx);
    float l = dst.l[r] * w0;
    for (int64_t i = 0; i < d; i += 8) _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_loadu_ps(o + i), _mm256_set1_ps(w0)));
    for (int64_t s = 1; s < n; ++s) {
      const float w = std::exp2(parts[s].m[r] - mx);  // 0 for an empty range
      if (w == 0.0f) continue;
      l += parts[s].l[r] * w;
      const float* os = parts[s].o + r * d;
      const __m256 wv = _mm256_set1_ps(w);
      for (int64_t i = 0; i < d; i += 8)
        _mm256_storeu_ps(o + i, _mm256_fmadd_ps(_mm256_loadu_ps(os + i), wv, _mm256_loadu_ps(o + i)));
    }
    dst.m[r] = mx;
    dst.l[r] = l;
  }
}

// The AVX2 decode kernel: key and value rows are converted kDotKeys at a time and used by
// every row. Scores: one accumulator per key, so the kDotKeys dot products of a row are
// independent FMA chains (one chain per key left each key waiting D/8 FMA latencies), then
// one transpose-add per kDotKeys keys. P V: each 8-float slice of a row's O is loaded once
// per kDotKeys keys instead of once per key. One token over 640 keys (16 / 8 heads, D 128,
// bf16, 2 threads, AVX2 EPYC): 0.30 ms with one key at a time, 0.24 ms with 8; over 32768
// keys both read the cache at about the DRAM bandwidth (`bitswitch bench attention`).
constexpr int64_t kDotKeys = 8;

struct DotScratch {
  float* q;     // [rows][D]         pre-scaled queries
  float* s;     // [rows][ld]        scores, then probabilities, of one block
  float* rows;  // [kDotKeys][D]     converted key or value rows
  float* zero;  // [D]               zeros: the value rows past the block's end

  static size_t floats(int64_t rows, int64_t d, int64_t block_k) {
    return size_t(rows * (d + round_up(block_k, 8)) + (kDotKeys + 1) * d);
  }
  DotScratch(float* base, int64_t nrows, int64_t d, int64_t ld) {
    q = base;
    s = q + nrows * d;
    rows = s + nrows * ld;
    zero = rows + kDotKeys * d;
  }
};

// Online-softmax update of one row against n scores s[0..n) (log2 units, -inf = masked);
// turns s into probabilities and returns the factor the row's O must be scaled by.
inline float softmax_row(float* s, int64_t n, float& m, float& l) {
  __m256 mx = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t c = 0; c < n; c += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(s + c));
  const float bm = hmax(mx), m_new = bm > m ? bm : m;
  if (m_new == -std::numeric_limits<float>::infinity()) {  // nothing visible yet
    for (int64_t c = 0; c < n; c += 8) _mm256_storeu_ps(s + c, _mm256_setzero_ps());
    return 1.0f;
  }
  const __m256 mv = _mm256_set1_ps(m_new);
  __m256 sum = _mm256_setzero_ps();
  for (int64_t c = 0; c < n; c += 8) {
    const __m256 p = exp2_ps(_mm256_sub_ps(_mm256_loadu_ps(s + c), mv));
    _mm256_storeu_ps(s + c, p);
    sum = _mm256_add_ps(sum, p);
  }
  const float alpha = std::exp2(m - m_new);  // 0 when m was -inf
  l = l * alpha + hsum(sum);
  m = m_new;
  return alpha;
}

// Rows of task t over its key blocks [bi0, bi1) into st.
inline void attention_task_dot(const AttentionArgs& a, const AttnTask& t, const BlockList& blocks, int64_t bi0,
                               int64_t bi1, float* base, const DecodeRows& st) {
  const int64_t D = a.d, ld = round_up(a.block_k, 8);
  const float ninf = -std::numeric_limits<float>::infinity();
  DotScratch w(base, t.rows, D, ld);
  const float qs = a.scale * kLog2e;
  for (int64_t r = 0; r < t.rows; ++r) {
    load_row(a.q, a.dtype, offset(a.q_strides, t.b, t.row_head(r), t.row_query(r)), D, w.q + r * D);
    for (int64_t d = 0; d < D; ++d) w.q[r * D + d] *= qs;
    for (int64_t d = 0; d < D; ++d) st.o[r * D + d] = 0.0f;
    st.m[r] = ninf;
    st.l[r] = 0.0f;
  }
  for (int64_t d = 0; d < D; ++d) w.zero[d] = 0.0f;
  // Key or value rows [j, j + n) of the block into w.rows; the slots past n point at
  // `pad` (scores of such keys are overwritten with -inf; values are zeros).
  const float* kv[kDotKeys];
  auto convert = [&](const void* base_ptr, const int64_t* strides, int64_t j, int64_t n, const float* pad) {
    for (int64_t i = 0; i < kDotKeys; ++i) {
      if (i < n) {
        load_row(base_ptr, a.dtype, offset(strides, t.b, t.hk, j + i), D, w.rows + i * D);
        kv[i] = w.rows + i * D;
      } else {
        kv[i] = pad;
      }
    }
  };
  for (int64_t bi = bi0; bi < bi1; ++bi) {
    const int64_t j0 = blocks[bi] * a.block_k;
    const int64_t nk = imin(a.block_k, a.lk - j0);
    if (nk <= 0 || j0 >= key_limit(a, t.i0 + t.nq - 1)) continue;
    const int64_t ncols = round_up(nk, 8);  // kDotKeys == 8: the score columns written
    for (int64_t c = 0; c < nk; c += kDotKeys) {
      convert(a.k, a.k_strides, j0 + c, imin(kDotKeys, nk - c), w.zero);
      for (int64_t r = 0; r < t.rows; ++r) {
        const float* q = w.q + r * D;
        __m256 acc[kDotKeys];
        for (auto& v : acc) v = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) {
          const __m256 qv = _mm256_loadu_ps(q + d);
#pragma GCC unroll 8
          for (int i = 0; i < kDotKeys; ++i) acc[i] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kv[i] + d), acc[i]);
        }
        _mm_storeu_ps(w.s + r * ld + c, hsum4(acc[0], acc[1], acc[2], acc[3]));
        _mm_storeu_ps(w.s + r * ld + c + 4, hsum4(acc[4], acc[5], acc[6], acc[7]));
      }
    }
    // Columns past nk, and keys past each row's causal limit, are -inf.
    for (int64_t r = 0; r < t.rows; ++r) {
      const int64_t vis = imax(imin(nk, key_limit(a, t.row_query(r)) - j0), 0);
      for (int64_t c = vis; c < ncols; ++c) w.s[r * ld + c] = ninf;
    }
    for (int64_t r = 0; r < t.rows; ++r) {
      const float alpha = softmax_row(w.s + r * ld, ncols, st.m[r], st.l[r]);
      if (alpha == 1.0f) continue;
      const __m256 av = _mm256_set1_ps(alpha);
      float* o = st.o + r * D;
      for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_loadu_ps(o + d), av));
    }
    for (int64_t c = 0; c < nk; c += kDotKeys) {
      convert(a.v, a.v_strides, j0 + c, imin(kDotKeys, nk - c), w.zero);
      for (int64_t r = 0; r < t.rows; ++r) {
        const float* pr = w.s + r * ld + c;  // probabilities: 0 past nk (and past the causal limit)
        __m256 p[kDotKeys];
#pragma GCC unroll 8
        for (int i = 0; i < kDotKeys; ++i) p[i] = _mm256_set1_ps(pr[i]);
        float* o = st.o + r * D;
        for (int64_t d = 0; d < D; d += 8) {
          __m256 ov = _mm256_loadu_ps(o + d);
#pragma GCC unroll 8
          for (int i = 0; i < kDotKeys; ++i) ov = _mm256_fmadd_ps(p[i], _mm256_loadu_ps(kv[i] + d), ov);
          _mm256_storeu_ps(o + d, ov);
        }
      }
    }
  }
}

inline AttnTask make_task(const AttentionArgs& a, int64_t task) {
  const int64_t nqb = ceil_div(a.lq, a.block_q);
  AttnTask t;
  t.qb = task % nqb;
  t.hk = (task / nqb) % a.hkv;
  t.b = task / (nqb * a.hkv);
  t.i0 = t.qb * a.block_q;
  t.nq = imin(a.block_q, a.lq - t.i0);
  t.group = a.hq / a.hkv;
  t.rows = t.group * t.nq;
  return t;
}

// Split-KV: below this many tasks per thread a decode call splits each task's key blocks
// into ranges, so that dynamic claiming balances the threads to within a small part of the
// work (with one range per thread a worker that starts late leaves the caller doing it all:
// 1 kv head, 2 rows, 2048 keys, 2 threads measured 22 us with 2 ranges in some runs, 13-14
// with 4 to 8) ...
constexpr int64_t kDecodeTasksPerThread = 4;
// ... of at least this many keys (~3 us at 2 rows), so that the merge (reading the rows'
// D + 2 floats per range) and the extra dispatch stay small next to a range's own work.
constexpr int64_t kDecodeMinSplitKeys = 256;
// Upper bound of the ranges per task (the merge keeps their states on the stack).
constexpr int64_t kDecodeMaxSplits = 64;

// Ranges per decode task: a.kv_splits when set (tests), else as above.
inline int64_t decode_splits(const AttentionArgs& a, int64_t tasks, int threads) {
  const int64_t nqb = ceil_div(a.lq, a.block_q);
  int64_t max_blocks = ceil_div(a.lk, a.block_k);
  if (a.indptr) {
    max_blocks = 0;
    for (int64_t r = 0; r < a.b * a.hkv; ++r)
      for (int64_t qb = 0; qb < nqb; ++qb)
        max_blocks = imax(max_blocks, a.indptr[r * (nqb + 1) + qb + 1] - a.indptr[r * (nqb + 1) + qb]);
  }
  int64_t n = 1;
  if (a.kv_splits > 0)
    n = a.kv_splits;
  else if (threads > 1 && tasks < kDecodeTasksPerThread * threads)
    n = imin(ceil_div(kDecodeTasksPerThread * threads, tasks), max_blocks * a.block_k / kDecodeMinSplitKeys);
  return imax(1, imin(imin(n, max_blocks), kDecodeMaxSplits));
}

// Every task has at most kAttnDotRows rows.
template <class Isa>
Status attention_decode_x86(const AttentionArgs& a, ThreadPool& pool) {
  const int64_t nqb = ceil_div(a.lq, a.block_q), tasks = a.b * a.hkv * nqb;
  const int64_t max_rows = (a.hq / a.hkv) * imin(a.block_q, a.lq), D = a.d;
  const size_t work = Isa::decode_floats(max_rows, D, a.block_k);
  const size_t state = DecodeRows::floats(max_rows, D);
  const int64_t splits = decode_splits(a, tasks, pool.num_threads());
  bool oom = false;
  if (splits == 1) {
    pool.parallel_for(tasks, [&](int64_t task, int) {
      float* base = static_cast<float*>(thread_scratch(kScratchAcc, (state + work) * sizeof(float)));
      if (!base) {
        oom = true;
        return;
      }
      const AttnTask t = make_task(a, task);
      const BlockList blocks = key_blocks(a, t.b, t.hk, t.qb);
      const DecodeRows st = DecodeRows::at(base, t.rows, D);
      Isa::decode_rows(a, t, blocks, 0, blocks.count, base + state, st);
      write_decode_rows(a, t, st);
    });
    return oom ? Status::kOutOfMemory : Status::kOk;
  }
  // The ranges' states, [tasks][splits][state], in the calling thread's scratch (the
  // tasks below use another slot).
  float* parts = static_cast<float*>(thread_scratch(kScratchX, tasks * splits * state * sizeof(float)));
  if (!parts) return Status::kOutOfMemory;
  pool.parallel_for(tasks * splits, [&](int64_t job, int) {
    float* base = static_cast<float*>(thread_scratch(kScratchAcc, work * sizeof(float)));
    if (!base) {
      oom = true;
      return;
    }
    const int64_t task = job / splits, s = job % splits;
    const AttnTask t = make_task(a, task);
    const BlockList blocks = key_blocks(a, t.b, t.hk, t.qb);
    const DecodeRows st = DecodeRows::at(parts + job * state, t.rows, D);
    Isa::decode_rows(a, t, blocks, blocks.count * s / splits, blocks.count * (s + 1) / splits, base, st);
  });
  if (oom) return Status::kOutOfMemory;
  pool.parallel_for(tasks, [&](int64_t task, int) {
    const AttnTask t = make_task(a, task);
    DecodeRows st[kDecodeMaxSplits];
    for (int64_t s = 0; s < splits; ++s) st[s] = DecodeRows::at(parts + (task * splits + s) * state, t.rows, D);
    merge_decode_rows(st, splits, t.rows, D);
    write_decode_rows(a, t, st[0]);
  });
  return Status::kOk;
}

template <class Isa>
Status attention_x86(const AttentionArgs& a, ThreadPool& pool) {
  const int64_t nqb = ceil_div(a.lq, a.block_q), group = a.hq / a.hkv;
  const int64_t max_rows = group * imin(a.block_q, a.lq);
  if (max_rows <= kAttnDotRows) return attention_decode_x86<Isa>(a, pool);
  // A last query block may still have few rows: it takes the decode kernel, whole.
  const int64_t dot_rows = imin(max_rows, kAttnDotRows);
  const size_t dot_state = DecodeRows::floats(dot_rows, a.d);
  const size_t floats = std::max(TiledScratch<Isa>::floats(max_rows, a.d, a.block_k),
                                 dot_state + Isa::decode_floats(dot_rows, a.d, a.block_k));
  bool oom = false;
  pool.parallel_for(a.b * a.hkv * nqb, [&](int64_t task, int) {
    float* base = static_cast<float*>(thread_scratch(kScratchAcc, floats * sizeof(float)));
    if (!base) {
      oom = true;
      return;
    }
    const AttnTask t = make_task(a, task);
    const BlockList blocks = key_blocks(a, t.b, t.hk, t.qb);
    if (t.rows <= kAttnDotRows) {
      const DecodeRows st = DecodeRows::at(base, t.rows, a.d);
      Isa::decode_rows(a, t, blocks, 0, blocks.count, base + dot_state, st);
      write_decode_rows(a, t, st);
    } else {
      attention_task_tiled<Isa>(a, t, blocks, base);
    }
  });
  return oom ? Status::kOutOfMemory : Status::kOk;
}

}  // namespace
}  // namespace cpu
}  // namespace bitswitch
