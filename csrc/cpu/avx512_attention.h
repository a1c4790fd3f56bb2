// The AVX-512 decode attention kernel (Isa::decode_rows of the AVX-512 unit): the rows of
// one decode task (one token, or a few, times the GQA group: at most kAttnDotRows) over a
// range of its key blocks, leaving their flash state (x86_attention.h).
//
// Decode reads every key and value once and does 2 * rows multiply-adds per element, so
// the kernel keeps the FMA port busy and touches each byte once:
//
// - Scores, 16 keys at a time: per key and row one zmm of partial sums (D/16 FMAs), then
//   the 16 partial-sum vectors reduce to one vector of 16 scores with a transpose-add tree
//   (15 adds + 30 shuffles per 16 keys, where one horizontal sum per key costs ~6 ops and
//   a dependency chain). The query row stays in registers across the 16 keys.
// - bfloat16 K and V are converted with one byte shuffle per 16 elements: a 64-byte load
//   holds 32 elements, and dword i of the result takes element 2i (or 2i + 1) as its high
//   half. Rows are therefore kept in an even/odd order within each 32 elements (q, the
//   keys and the O accumulators alike: a dot product does not care about the order) and O
//   is put back in natural order once at the end.
// - P V: the rows' O accumulators for a slice of D stay in registers over all the block's
//   keys (rows x slice <= 16 zmm), each value slice is loaded and converted once, and the
//   probabilities come in as broadcasts.
//
// Where the time goes (Qwen3 decode shapes, 2 rows per task, bfloat16, the measuring VM:
// one 512-bit FMA unit per core): with K/V in L2 a key costs ~11.5 ns per thread, the
// 32 FMAs it needs at one per cycle; from L3 or DRAM the kernel runs at the bandwidth the
// two cores get (45-55 GB/s from L3, 25-35 GB/s from DRAM). Tried and dropped: vdpbf16ps
// for the bfloat16 scores (exact products of bf16 q and k, D/32 instructions per key:
// 52 multiply-adds per ns against 41 for zmm FMAs in a loop of them alone, yet no faster
// end to end) and software prefetch of the next block (3x slower on scattered
// page-selection blocks, 1.3x on dense ones).
#pragma once

#include <limits>

#include "x86_attention.h"

namespace bitswitch {
namespace cpu {
namespace {

// 2^x for 16 floats (as exp2_ps); exactly 0 below -126, so masked (-inf) scores give 0 and
// no denormal ever reaches an FMA (denormal operands take a slow microcode path on Intel).
inline __m512 exp2_512(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_GE_OQ);  // false for -inf
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-127.0f)), _mm512_set1_ps(127.0f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);  // [-0.5, 0.5]
  __m512 p = _mm512_set1_ps(1.5403530393381608e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(live, p, n);  // p 2^n
}

inline float hmax512(__m512 v) { return hmax(_mm256_max_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1))); }
inline float hsum512(__m512 v) { return hsum(_mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1))); }

// Elements e .. e + 31 of a row of type T as two float32 vectors: for bfloat16 the even
// elements, then the odd ones; for the other types in order. e is a multiple of 32.
template <DType T>
inline void load32(const void* row, int64_t e, __m512& lo, __m512& hi) {
  if (T == DType::kBFloat16) {
    // Byte shuffles put bfloat16 element 2i (4i + 1 for the odd half) in the high half of
    // dword i and zero its low half. They run on port 5 while the FMAs hold port 0: on the
    // measuring machine (one 512-bit FMA unit) they were ~10% faster than the shift and mask
    // that compete with the FMAs for port 0.
    const __m512i x = _mm512_loadu_si512(static_cast<const uint16_t*>(row) + e);
    const __m512i even = _mm512_set4_epi32(0x0d0c8080, 0x09088080, 0x05048080, 0x01008080);
    const __m512i odd = _mm512_set4_epi32(0x0f0e8080, 0x0b0a8080, 0x07068080, 0x03028080);
    lo = _mm512_castsi512_ps(_mm512_shuffle_epi8(x, even));
    hi = _mm512_castsi512_ps(_mm512_shuffle_epi8(x, odd));
  } else if (T == DType::kFloat16) {
    const uint16_t* p = static_cast<const uint16_t*>(row) + e;
    lo = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    hi = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16)));
  } else {
    const float* p = static_cast<const float*>(row) + e;
    lo = _mm512_loadu_ps(p);
    hi = _mm512_loadu_ps(p + 16);
  }
}

// Scores of one row against n <= 16 float32 key rows k[j * ldk] (same element order as q):
// lane j of the result is q . k_j (0 for j >= n). q: the row in D/16 registers.
template <DType T, int D>
inline __m512 dot16(const __m512 (&q)[D / 16], const void* k, int64_t ldk, int n) {
  constexpr int C = D / 16;
  __m512 quad[4];
  for (int g = 0; g < 4; ++g) {
    __m512 t[4];
    for (int i = 0; i < 4; ++i) {
      const int j = 4 * g + i;
      if (j >= n) {
        t[i] = _mm512_setzero_ps();
        continue;
      }
      // Two chains halve the FMA latency each key waits for.
      const char* kr = static_cast<const char*>(k) + j * ldk * (T == DType::kFloat32 ? 4 : 2);
      __m512 x0, x1;
      load32<T>(kr, 0, x0, x1);
      __m512 a0 = _mm512_mul_ps(q[0], x0), a1 = _mm512_mul_ps(q[1], x1);
      for (int c = 2; c < C; c += 2) {
        load32<T>(kr, 16 * c, x0, x1);
        a0 = _mm512_fmadd_ps(q[c], x0, a0);
        a1 = _mm512_fmadd_ps(q[c + 1], x1, a1);
      }
      t[i] = _mm512_add_ps(a0, a1);
    }
    // In each 128-bit lane: [t0 t1 t0 t1] pair sums, then [t0 t1 t2 t3] sums of its 4 floats.
    const __m512 c0 = _mm512_add_ps(_mm512_unpacklo_ps(t[0], t[1]), _mm512_unpackhi_ps(t[0], t[1]));
    const __m512 c1 = _mm512_add_ps(_mm512_unpacklo_ps(t[2], t[3]), _mm512_unpackhi_ps(t[2], t[3]));
    quad[g] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(c0), _mm512_castps_pd(c1))),
                            _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(c0), _mm512_castps_pd(c1))));
  }
  // quad[g] lane l holds key 4g + l % 4 summed over 128-bit lane l / 4; add the lanes in pairs.
  const __m512 e0 = _mm512_add_ps(_mm512_shuffle_f32x4(quad[0], quad[1], 0x88), _mm512_shuffle_f32x4(quad[0], quad[1], 0xDD));
  const __m512 e1 = _mm512_add_ps(_mm512_shuffle_f32x4(quad[2], quad[3], 0x88), _mm512_shuffle_f32x4(quad[2], quad[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(e0, e1, 0x88), _mm512_shuffle_f32x4(e0, e1, 0xDD));
}

// Online-softmax update of one row against its block scores s[0..n) (n a multiple of 16,
// log2 units, -inf = not visible): s becomes 2^(s - m), m and l are updated; returns the
// factor the row's O must be scaled by.
inline float softmax_row512(float* s, int64_t n, float& m, float& l) {
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t c = 0; c < n; c += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + c));
  const float bm = hmax512(mx), m_new = bm > m ? bm : m;
  if (m_new == -std::numeric_limits<float>::infinity()) {  // nothing visible yet
    for (int64_t c = 0; c < n; c += 16) _mm512_storeu_ps(s + c, _mm512_setzero_ps());
    return 1.0f;
  }
  const __m512 mv = _mm512_set1_ps(m_new);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t c = 0; c < n; c += 16) {
    const __m512 p = exp2_512(_mm512_sub_ps(_mm512_loadu_ps(s + c), mv));
    _mm512_storeu_ps(s + c, p);
    sum = _mm512_add_ps(sum, p);
  }
  const float alpha = std::exp2(m - m_new);  // 0 when m was -inf
  l = l * alpha + hsum512(sum);
  m = m_new;
  return alpha;
}

// o[r] = alpha[r] o[r] + sum_j p[r][j] v_j for R rows and n value rows v + j * ldv (type T,
// in elements), W zmm of each row's D at a time held in registers.
template <DType T, int D, int R>
inline void pv_rows(const float* p, int64_t ldp, int64_t n, const void* v, int64_t ldv, float* o,
                    const float* alpha) {
  constexpr int C = D / 16;
  constexpr int W0 = R <= 2 ? 8 : R <= 4 ? 4 : 2;  // R x W <= 16 accumulators
  constexpr int W = W0 < C ? W0 : C;
  const int64_t esz = T == DType::kFloat32 ? 4 : 2;
  for (int c0 = 0; c0 < C; c0 += W) {
    __m512 acc[R][W];
    for (int r = 0; r < R; ++r) {
      const __m512 al = _mm512_set1_ps(alpha[r]);
      for (int w = 0; w < W; ++w) acc[r][w] = _mm512_mul_ps(_mm512_loadu_ps(o + r * D + 16 * (c0 + w)), al);
    }
    const char* vr = static_cast<const char*>(v);
    for (int64_t j = 0; j < n; ++j, vr += ldv * esz) {
      __m512 x[W];
      for (int w = 0; w < W; w += 2) load32<T>(vr, 16 * (c0 + w), x[w], x[w + 1]);
      for (int r = 0; r < R; ++r) {
        const __m512 pj = _mm512_set1_ps(p[r * ldp + j]);
        for (int w = 0; w < W; ++w) acc[r][w] = _mm512_fmadd_ps(x[w], pj, acc[r][w]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int w = 0; w < W; ++w) _mm512_storeu_ps(o + r * D + 16 * (c0 + w), acc[r][w]);
  }
}

// Every row count a decode task can have. (At 6 to 8 rows this kernel is 3-4x faster than
// the tiled path, which pads the rows to a 32-lane panel: 37 against 129 ns per key at 8
// rows, 256 keys, one thread; a larger kAttnDotRows would need row tiles here.)
static_assert(kAttnDotRows == 8, "pv_dispatch instantiates 1..8 rows");
template <DType T, int D>
inline void pv_dispatch(int64_t rows, const float* p, int64_t ldp, int64_t n, const void* v, int64_t ldv, float* o,
                        const float* alpha) {
  switch (rows) {
    case 1: return pv_rows<T, D, 1>(p, ldp, n, v, ldv, o, alpha);
    case 2: return pv_rows<T, D, 2>(p, ldp, n, v, ldv, o, alpha);
    case 3: return pv_rows<T, D, 3>(p, ldp, n, v, ldv, o, alpha);
    case 4: return pv_rows<T, D, 4>(p, ldp, n, v, ldv, o, alpha);
    case 5: return pv_rows<T, D, 5>(p, ldp, n, v, ldv, o, alpha);
    case 6: return pv_rows<T, D, 6>(p, ldp, n, v, ldv, o, alpha);
    case 7: return pv_rows<T, D, 7>(p, ldp, n, v, ldv, o, alpha);
    default: return pv_rows<T, D, 8>(p, ldp, n, v, ldv, o, alpha);
  }
}

// Up to this many rows, each row converts the 16-bit keys it reads itself; more rows
// convert each group of 16 keys once into float32 (stores, then loads per row). Measured
// per key at 256 keys (hot, one thread, bfloat16): 1 row 8.4 ns inline / 10.9 ns
// converted once, 2 rows 13.2 / 14.4, 3 rows 19.2 / 19.3, 4 rows 24.5 / 23.2.
constexpr int64_t kDecodeInlineRows = 2;

// Scratch of one task (offsets in floats, each a multiple of 16).
struct Decode512Scratch {
  float* q;      // [rows][D]      pre-scaled queries, kernel element order
  float* s;      // [rows][ld]     scores, then probabilities, of one block (ld = block_k)
  float* kf;     // [16][D]        a converted group of 16 keys
  float* alpha;  // [16]           per row: the factor its O is rescaled by for this block
  static size_t floats(int64_t rows, int64_t d, int64_t block_k) {
    return size_t(rows * d + rows * round_up(block_k, 16) + 16 * d + 16);
  }
  Decode512Scratch(float* base, int64_t rows, int64_t d, int64_t block_k) {
    q = base;
    s = q + rows * d;
    kf = s + rows * round_up(block_k, 16);
    alpha = kf + 16 * d;
  }
};

template <DType T, int D>
void decode_rows_512(const AttentionArgs& a, const AttnTask& t, const BlockList& blocks, int64_t bi0, int64_t bi1,
                     float* base, const DecodeRows& st) {
  static_assert(D == 64 || D == 128, "decode attention supports head_dim 64 and 128");
  constexpr int C = D / 16;
  const int64_t R = t.rows, ld = round_up(a.block_k, 16), esz = dtype_size(T);
  const float ninf = -std::numeric_limits<float>::infinity();
  Decode512Scratch w(base, R, D, a.block_k);
  const __m512 qs = _mm512_set1_ps(a.scale * kLog2e);
  for (int64_t r = 0; r < R; ++r) {
    const char* qr = static_cast<const char*>(a.q) + offset(a.q_strides, t.b, t.row_head(r), t.row_query(r)) * esz;
    for (int64_t e = 0; e < D; e += 32) {
      __m512 lo, hi;
      load32<T>(qr, e, lo, hi);
      _mm512_storeu_ps(w.q + r * D + e, _mm512_mul_ps(lo, qs));
      _mm512_storeu_ps(w.q + r * D + e + 16, _mm512_mul_ps(hi, qs));
    }
    for (int64_t e = 0; e < D; e += 16) _mm512_storeu_ps(st.o + r * D + e, _mm512_setzero_ps());
    st.m[r] = ninf;
    st.l[r] = 0.0f;
  }
  const int64_t last_limit = key_limit(a, t.i0 + t.nq - 1);  // the last query row sees the most keys
  for (int64_t bi = bi0; bi < bi1; ++bi) {
    const int64_t j0 = blocks[bi] * a.block_k;
    const int64_t nk = imin(imin(a.block_k, a.lk - j0), last_limit - j0);  // keys any row sees
    if (nk <= 0) continue;
    const char* kb = static_cast<const char*>(a.k) + offset(a.k_strides, t.b, t.hk, j0) * esz;
    const char* vb = static_cast<const char*>(a.v) + offset(a.v_strides, t.b, t.hk, j0) * esz;
    for (int64_t g = 0; g < nk; g += 16) {
      const int n = int(imin(16, nk - g));
      const char* kg = kb + g * a.k_strides[2] * esz;
      if (T == DType::kFloat32 || R <= kDecodeInlineRows) {
        for (int64_t r = 0; r < R; ++r) {
          __m512 q[C];
          for (int c = 0; c < C; ++c) q[c] = _mm512_loadu_ps(w.q + r * D + 16 * c);
          const __m512 sc = dot16<T, D>(q, kg, a.k_strides[2], n);
          _mm512_storeu_ps(w.s + r * ld + g, sc);
        }
        continue;
      }
      for (int j = 0; j < n; ++j)
        for (int64_t e = 0; e < D; e += 32) {
          __m512 lo, hi;
          load32<T>(kg + j * a.k_strides[2] * esz, e, lo, hi);
          _mm512_storeu_ps(w.kf + j * D + e, lo);
          _mm512_storeu_ps(w.kf + j * D + e + 16, hi);
        }
      for (int64_t r = 0; r < R; ++r) {
        __m512 q[C];
        for (int c = 0; c < C; ++c) q[c] = _mm512_loadu_ps(w.q + r * D + 16 * c);
        const __m512 sc = dot16<DType::kFloat32, D>(q, w.kf, D, n);
        _mm512_storeu_ps(w.s + r * ld + g, sc);
      }
    }
    // Columns past nk, and keys past each row's causal limit, are -inf.
    const int64_t ncols = round_up(nk, 16);
    for (int64_t r = 0; r < R; ++r) {
      const int64_t vis = imax(imin(nk, key_limit(a, t.row_query(r)) - j0), 0);
      for (int64_t c = vis; c < ncols; ++c) w.s[r * ld + c] = ninf;
      w.alpha[r] = softmax_row512(w.s + r * ld, ncols, st.m[r], st.l[r]);
    }
    pv_dispatch<T, D>(R, w.s, ld, nk, vb, a.v_strides[2], st.o, w.alpha);
  }
  if (T == DType::kBFloat16) {
    // Back to natural order: element 2i of a 32-element chunk is lane i of its even half,
    // element 2i + 1 lane i of its odd half.
    const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t e = 0; e < D; e += 32) {
        float* o = st.o + r * D + e;
        const __m512 ev = _mm512_loadu_ps(o), od = _mm512_loadu_ps(o + 16);
        _mm512_storeu_ps(o, _mm512_permutex2var_ps(ev, lo_idx, od));
        _mm512_storeu_ps(o + 16, _mm512_permutex2var_ps(ev, hi_idx, od));
      }
  }
}

// The dtype x head_dim instances (every combination the op accepts).
inline void decode_rows_avx512(const AttentionArgs& a, const AttnTask& t, const BlockList& blocks, int64_t bi0,
                               int64_t bi1, float* base, const DecodeRows& st) {
  const bool d64 = a.d == 64;
  switch (a.dtype) {
    case DType::kBFloat16:
      return d64 ? decode_rows_512<DType::kBFloat16, 64>(a, t, blocks, bi0, bi1, base, st)
                 : decode_rows_512<DType::kBFloat16, 128>(a, t, blocks, bi0, bi1, base, st);
    case DType::kFloat16:
      return d64 ? decode_rows_512<DType::kFloat16, 64>(a, t, blocks, bi0, bi1, base, st)
                 : decode_rows_512<DType::kFloat16, 128>(a, t, blocks, bi0, bi1, base, st);
    default:
      return d64 ? decode_rows_512<DType::kFloat32, 64>(a, t, blocks, bi0, bi1, base, st)
                 : decode_rows_512<DType::kFloat32, 128>(a, t, blocks, bi0, bi1, base, st);
  }
}

}  // namespace
}  // namespace cpu
}  // namespace bitswitch
