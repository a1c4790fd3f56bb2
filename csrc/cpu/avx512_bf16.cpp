// AVX512-BF16 variant of qmatmul (`avx512bf16`): the AVX-512 kernels, except that bf16 x
// with more than kGemvMaxM rows multiplies by the weights dequantized once per call to bf16,
// with vdpbf16ps (two bf16 products summed into each float32 lane). (act_bits 8, and
// float16 x, go to the AVX-512 unit's int8 GEMM, avx512_int8_gemm.h.) The contract is the
// AMX tile GEMM's (amx.cpp, bf16_panels.h):
//     y[m, n] = bf16( sum_k x[m, k] * w[n, k] ),  w[n, k] = bf16( s*c + b )
// with the sum in float32. vdpbf16ps does twice the multiply-adds of a float32 FMA per
// instruction, so on CPUs with AVX512-BF16 and no AMX (AMD Zen 4 and 5, Intel Cooper Lake)
// prefill runs at about twice the float32 GEMM of the avx512 variant (bench/RESULTS.md).
//
// Data flow per task (outputs n0 .. n0 + nb - 1, x rows m0 .. m0 + mrows - 1), as in the
// AMX dense GEMM:
//   for each panel of ks inputs (all of K unless the panel would pass kPanelBytes):
//     dequantize the nb x ks weights once into the pair layout (bf16_panels.h);
//     for each block of kMR x rows:
//       for each chunk of kKC inputs:        the rows' chunk (kMR x 512 bytes) stays in L1
//         for each 32-output block:          kMR x 32 float32 sums in 2 * kMR registers,
//                                            its 16 KB of weights streaming from L2
//       round the block's results to bf16 into y (last panel only).
// x is read in place: a pair of bf16 inputs is one dword, broadcast to the 16 lanes.
//
// Built without compiler support for AVX512-BF16 this unit is a stub and the variant
// reports itself unsupported. Built with BITSWITCH_EMULATE_AVX512 (a test build) its
// intrinsics map onto portable code (avx512_emulation.h), as the AVX-512 unit's do.
#include "kernels.h"

#if defined(BITSWITCH_HAVE_AVX512BF16)
#if defined(BITSWITCH_EMULATE_AVX512)
#include "avx512_emulation.h"
#endif
#include <immintrin.h>

#include <array>
#include <cstring>
#include <utility>

#include "avx512_transpose.h"
#include "bf16_panels.h"
#include "panel_tasks.h"
#include "scratch.h"
#include "thread_pool.h"
#include "x86_attention.h"
#include "x86_common.h"
#endif

namespace bitswitch {
namespace cpu {

#if !defined(BITSWITCH_HAVE_AVX512BF16)

bool avx512bf16_built() { return false; }
Status qmatmul_avx512bf16(const QMatmulArgs&, ThreadPool&) { return Status::kUnsupported; }
Status attention_avx512bf16(const AttentionArgs&, ThreadPool&) { return Status::kUnsupported; }

#else

namespace {

// Largest M left to the AVX-512 GEMV (as in x86_qmatmul.h).
constexpr int64_t kBf16GemvMaxM = 8;
// x rows per register block: 2 * kMR accumulators + 2 weight rows + 1 broadcast of the 32
// zmm registers.
constexpr int kMR = 12;
// Dequantized panel bytes: 512 KB, half of a Zen 4 / 5 L2, next to the x chunks and the
// float32 sums.
constexpr int64_t kPanelBytes = 512 << 10;
static_assert(kPanelBytes % (kKC * 2 * kBlockN) == 0, "whole chunks");

// c[MR x 32] = (zero ? 0 : c) + x[MR rows] w[block] over `steps` steps of 32 inputs. x: the
// rows' first input, rows ldx apart; w: the block's tile pairs from the first step on;
// c: rows of ldc floats.
template <int MR>
__attribute__((noinline)) void dp_block(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t steps, float* c,
                                        int64_t ldc, bool zero) {
  __m512 acc[MR][2];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    acc[i][0] = zero ? _mm512_setzero_ps() : _mm512_loadu_ps(c + i * ldc);
    acc[i][1] = zero ? _mm512_setzero_ps() : _mm512_loadu_ps(c + i * ldc + kTileRows);
  }
  for (int64_t s = 0; s < steps; ++s, x += kTileK, w += kPairElems) {
#pragma GCC unroll 2
    for (int p = 0; p < kTileRows; ++p) {  // row p: inputs 2p, 2p + 1 of the step
      const __m512bh b0 = (__m512bh)_mm512_loadu_si512(w + p * kTileK);
      const __m512bh b1 = (__m512bh)_mm512_loadu_si512(w + kTileElems + p * kTileK);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        int32_t pair;
        std::memcpy(&pair, x + i * ldx + 2 * p, sizeof(pair));
        const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
        acc[i][0] = _mm512_dpbf16_ps(acc[i][0], xv, b0);
        acc[i][1] = _mm512_dpbf16_ps(acc[i][1], xv, b1);
      }
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    _mm512_storeu_ps(c + i * ldc, acc[i][0]);
    _mm512_storeu_ps(c + i * ldc + kTileRows, acc[i][1]);
  }
}

using DpBlockFn = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, float*, int64_t, bool);

template <int... R>
constexpr auto make_dp_blocks(std::integer_sequence<int, R...>) {
  return std::array<DpBlockFn, sizeof...(R)>{dp_block<R + 1>...};
}
// kDpBlocks[r - 1]: blocks of r rows (the last block of x may be short).
constexpr auto kDpBlocks = make_dp_blocks(std::make_integer_sequence<int, kMR>{});

struct Ctx : PanelSplit {
  const QMatmulArgs* a;
};

// One task: outputs [n0, n0 + nb) for x rows [m0, m0 + mrows). panel: nb x ks bf16; sb:
// [2 * ks / 32][nb] floats; acc: the float32 sums, [kMR][nb] when one panel covers K, else
// [mrows][nb] (kept across panels).
template <int BITS>
void task(const Ctx& ctx, uint16_t* panel, float* sb, float* acc, int64_t n0, int64_t m0, int64_t mrows) {
  const QMatmulArgs& a = *ctx.a;
  const int64_t nb = ctx.nb;
  const int64_t ncols = imin(nb, a.n - n0), nbv = round_up(ncols, kBlockN);  // whole blocks
  const int64_t mend = imin(m0 + mrows, a.m);
  const uint16_t* x = static_cast<const uint16_t*>(a.x);
  for (int64_t k0 = 0; k0 < a.k; k0 += ctx.ks) {
    const int64_t kl = imin(ctx.ks, a.k - k0);
    const bool first = k0 == 0, last = k0 + kl == a.k;
    PanelLayout layout{panel, kl / kTileK, nbv / kBlockN};
    dequant_panel<BITS>(a, n0, nb, nbv, k0, kl, sb, layout);
    for (int64_t m = m0; m < mend; m += kMR) {
      const int64_t rows = imin(kMR, mend - m);
      float* arow = ctx.ks == a.k ? acc : acc + (m - m0) * nb;
      const DpBlockFn block = kDpBlocks[rows - 1];
      for (int64_t c0 = 0; c0 < layout.steps; c0 += kKCSteps) {
        const int64_t cs = imin(kKCSteps, layout.steps - c0);
        const uint16_t* xc = x + m * a.k + k0 + c0 * kTileK;
        for (int64_t j = 0; j < nbv; j += kBlockN)
          block(xc, a.k, layout.block(j / kBlockN, c0), cs, arow + j, nb, first && c0 == 0);
      }
      if (last) dense_store_y(a, arow, nb, m, rows, n0, ncols);
    }
  }
}

template <int BITS>
Status dense_gemm(const QMatmulArgs& a, ThreadPool& pool) {
  Ctx ctx;
  ctx.a = &a;
  static_cast<PanelSplit&>(ctx) =
      split_panels(a.m, a.n, a.k, a.m * a.k * 2, pool.num_threads(), kBlockN, kMR, kKC, kPanelBytes, 2);
  const size_t panel_bytes = size_t(ctx.nb * ctx.ks) * 2;
  const size_t sb_bytes = size_t(2 * (ctx.ks / fmt::kMinGroupSize) * ctx.nb) * 4;
  const size_t acc_bytes = size_t((ctx.ks < a.k ? ctx.mrows : kMR) * ctx.nb) * 4;
  return run_panel_tasks(pool, ctx, a.m, panel_bytes + sb_bytes, acc_bytes,
                         [&](int64_t n0, int64_t m0, int64_t rows, char* buf, float* acc) {
                           task<BITS>(ctx, reinterpret_cast<uint16_t*>(buf),
                                      reinterpret_cast<float*>(buf + panel_bytes), acc, n0, m0, rows);
                         });
}


// ---- bf16 prefill attention ----------------------------------------------------------------
//
// The AVX-512 unit's tiled prefill (x86_attention.h: a task's rows in vector lanes, panels of
// 32 rows, both products transposed) with vdpbf16ps for both products, for bf16 inputs:
//   S^T[keys x 32] = K Q^T     K read in place (a pair of dims is one dword), Q^T packed once
//                              per task as pairs of dims, the scale applied to S in float32
//   softmax                    float32, down the keys (softmax_panel)
//   O^T[D x 32] += V^T P^T     V^T repacked once per key block as pairs of keys, P^T rounded
//                              to bf16 pairs of keys
// The contract is the AMX kernel's (amx_attention.h): bf16 inputs used as they are, the sums
// in float32, P rounded to bf16 (its float32 sum l is not). float16 and float32 inputs, and
// decode-sized tasks, keep the AVX-512 FMA kernels.

// Rows per panel (two zmm of float32 lanes) and keys or dims per micro-kernel tile.
constexpr int kAttnNR = 32;
constexpr int kAttnMR = 12;

// c[MRt x 32] += sum over p < pairs of x[i][2p, 2p + 1] . panel[p][0 .. 31] (pairs of bf16
// products in each float32 lane): x rows ldx bf16 apart, panel rows of 32 dwords.
template <int MRt>
void attn_micro(const uint16_t* x, int64_t ldx, const uint32_t* panel, int64_t pairs, float* c, int64_t ldc) {
  __m512 acc[MRt][2];
#pragma GCC unroll 16
  for (int i = 0; i < MRt; ++i) {
    acc[i][0] = _mm512_loadu_ps(c + i * ldc);
    acc[i][1] = _mm512_loadu_ps(c + i * ldc + 16);
  }
  for (int64_t p = 0; p < pairs; ++p, panel += kAttnNR) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(panel), b1 = (__m512bh)_mm512_loadu_si512(panel + 16);
#pragma GCC unroll 16
    for (int i = 0; i < MRt; ++i) {
      int32_t pair;
      std::memcpy(&pair, x + i * ldx + 2 * p, sizeof(pair));
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], xv, b0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], xv, b1);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MRt; ++i) {
    _mm512_storeu_ps(c + i * ldc, acc[i][0]);
    _mm512_storeu_ps(c + i * ldc + 16, acc[i][1]);
  }
}

template <int MRt>
inline void attn_micro_at_most(int mr, const uint16_t* x, int64_t ldx, const uint32_t* panel, int64_t pairs, float* c,
                               int64_t ldc) {
  if (mr == MRt) {
    attn_micro<MRt>(x, ldx, panel, pairs, c, ldc);
  } else if constexpr (MRt > 1) {
    attn_micro_at_most<MRt - 1>(mr, x, ldx, panel, pairs, c, ldc);
  }
}

// 16 dwords: bf16(lo[i]) in the low half of dword i, bf16(hi[i]) in the high half.
inline __m512i bf16_pairs(__m512 lo, __m512 hi) {
  return _mm512_or_si512(_mm512_cvtepu16_epi32(to_bf16(lo)), _mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16(hi)), 16));
}

// 16 bf16 from p as dwords, zero-extended.
inline __m512i load16_u16(const uint16_t* p) {
  return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

struct Bf16AttnScratch {
  static constexpr int NR = kAttnNR;
  uint32_t* qt;  // [panels][D / 2][NR]      pairs of dims of the task's queries (zero past its rows)
  float* ot;     // [panels][D][NR]          output accumulators
  float* st;     // [block_k][NR]            scores, then probabilities, of one panel
  uint32_t* pt;  // [block_k / 2][NR]        P^T as bf16 pairs of keys
  uint32_t* vt;  // [D][block_k / 2]         V^T as bf16 pairs of keys
  float* m;      // [panels * NR]            running max (log2 units)
  float* l;      // [panels * NR]            running sum
  float* row;    // [D]

  static int64_t kpairs(int64_t block_k) { return round_up(ceil_div(block_k, 2), 16); }
  static size_t floats(int64_t max_rows, int64_t d, int64_t block_k) {
    const int64_t panels = ceil_div(max_rows, NR), kp = kpairs(block_k);
    return size_t(panels * (d / 2) * NR + panels * d * NR + block_k * NR + kp * NR + d * kp + 2 * panels * NR + d);
  }
  Bf16AttnScratch(float* base, int64_t rows, int64_t d, int64_t block_k) {
    const int64_t panels = ceil_div(rows, NR), kp = kpairs(block_k);
    qt = reinterpret_cast<uint32_t*>(base);
    ot = base + panels * (d / 2) * NR;
    st = ot + panels * d * NR;
    pt = reinterpret_cast<uint32_t*>(st + block_k * NR);
    vt = pt + kp * NR;
    m = reinterpret_cast<float*>(vt + d * kp);
    l = m + panels * NR;
    row = l + panels * NR;
  }
};

// 2^x for 16 floats x <= 0 or -inf: 2^floor(x) * q(x - floor(x)), q = kExp2Poly4 (2.7e-6,
// below the bf16 rounding of P that follows); exactly 0 below -126 and for -inf (a masked
// key, or a row that has seen none: its l must stay 0).
inline __m512 exp2_neg(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_GE_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-126.0f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(kExp2Poly4[0]);
  for (int i = 1; i < 5; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly4[i]));
  return _mm512_maskz_scalef_ps(live, p, n);
}

// The online softmax of x86_attention.h's softmax_panel for a panel of 32 rows, on zmm:
// turns st[nk][32] (log2 units, -inf = masked) into probabilities, updates the rows' running
// max m and sum l, and rescales their accumulators ot[D][32]. A row that has seen no key
// keeps m = -inf; its scores are taken against -FLT_MAX instead, which gives 2^-inf = 0.
inline void softmax_panel32(float* st, int64_t nk, float* m, float* l, float* ot, int64_t d) {
  __m512 mx[2], sum[2], alpha[2];
  for (int v = 0; v < 2; ++v) mx[v] = _mm512_loadu_ps(m + 16 * v);
  for (int64_t j = 0; j < nk; ++j)
    for (int v = 0; v < 2; ++v) mx[v] = _mm512_max_ps(mx[v], _mm512_loadu_ps(st + j * kAttnNR + 16 * v));
  for (int v = 0; v < 2; ++v) {
    const __m512 m_use = _mm512_max_ps(mx[v], _mm512_set1_ps(-std::numeric_limits<float>::max()));
    alpha[v] = exp2_neg(_mm512_sub_ps(_mm512_loadu_ps(m + 16 * v), m_use));  // 0 while m was -inf
    _mm512_storeu_ps(m + 16 * v, mx[v]);
    mx[v] = m_use;
    sum[v] = _mm512_setzero_ps();
  }
  for (int64_t j = 0; j < nk; ++j)
    for (int v = 0; v < 2; ++v) {
      const __m512 p = exp2_neg(_mm512_sub_ps(_mm512_loadu_ps(st + j * kAttnNR + 16 * v), mx[v]));
      _mm512_storeu_ps(st + j * kAttnNR + 16 * v, p);
      sum[v] = _mm512_add_ps(sum[v], p);
    }
  for (int v = 0; v < 2; ++v)
    _mm512_storeu_ps(l + 16 * v, _mm512_fmadd_ps(_mm512_loadu_ps(l + 16 * v), alpha[v], sum[v]));
  for (int64_t i = 0; i < d; ++i)
    for (int v = 0; v < 2; ++v)
      _mm512_storeu_ps(ot + i * kAttnNR + 16 * v, _mm512_mul_ps(_mm512_loadu_ps(ot + i * kAttnNR + 16 * v), alpha[v]));
}

void attention_task_bf16(const AttentionArgs& a, const AttnTask& t, const BlockList& blocks, float* base) {
  constexpr int NR = kAttnNR, MR = kAttnMR;
  const int64_t D = a.d, panels = ceil_div(t.rows, NR);
  const float ninf = -std::numeric_limits<float>::infinity();
  Bf16AttnScratch w(base, t.rows, D, a.block_k);
  const uint16_t* q = static_cast<const uint16_t*>(a.q);
  const uint16_t* k = static_cast<const uint16_t*>(a.k);
  const uint16_t* v = static_cast<const uint16_t*>(a.v);
  for (int64_t r = 0; r < panels * NR; ++r) {
    uint32_t* dst = w.qt + (r / NR) * (D / 2) * NR + r % NR;
    if (r < t.rows) {
      const uint16_t* src = q + offset(a.q_strides, t.b, t.row_head(r), t.row_query(r));
      for (int64_t p = 0; p < D / 2; ++p) std::memcpy(dst + p * NR, src + 2 * p, 4);
    } else {
      for (int64_t p = 0; p < D / 2; ++p) dst[p * NR] = 0;
    }
    w.m[r] = ninf;
    w.l[r] = 0.0f;
  }
  for (int64_t i = 0; i < panels * D * NR; i += 16) _mm512_storeu_ps(w.ot + i, _mm512_setzero_ps());
  const __m512 qs = _mm512_set1_ps(a.scale * kLog2e);
  const int64_t all_see = key_limit(a, t.i0);
  const int64_t ldk = a.k_strides[2];
  for (int64_t bi = 0; bi < blocks.count; ++bi) {
    const int64_t j0 = blocks[bi] * a.block_k;
    const int64_t nk = imin(a.block_k, a.lk - j0);
    if (nk <= 0 || j0 >= key_limit(a, t.i0 + t.nq - 1)) continue;  // past the diagonal for every row
    const int64_t nk2 = ceil_div(nk, 2), kp = round_up(nk2, 16);
    const uint16_t* kb = k + offset(a.k_strides, t.b, t.hk, j0);
    // V^T as pairs of keys: vt[d][p] = (V[2p][d], V[2p + 1][d]), zero past the block; 16
    // pairs x 16 dims at a time through a dword transpose.
    const uint16_t* vb = v + offset(a.v_strides, t.b, t.hk, j0);
    const int64_t ldv = a.v_strides[2];
    for (int64_t p0 = 0; p0 < kp; p0 += 16) {
      for (int64_t d0 = 0; d0 < D; d0 += 16) {
        __m512i r[16];
        for (int i = 0; i < 16; ++i) {
          const int64_t j = 2 * (p0 + i);
          const __m512i lo = j < nk ? load16_u16(vb + j * ldv + d0) : _mm512_setzero_si512();
          const __m512i hi = j + 1 < nk ? load16_u16(vb + (j + 1) * ldv + d0) : _mm512_setzero_si512();
          r[i] = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
        }
        transpose16x16_epi32(r);
        for (int i = 0; i < 16; ++i) _mm512_storeu_si512(w.vt + (d0 + i) * kp + p0, r[i]);
      }
    }
    for (int64_t p = 0; p < panels; ++p) {
      const uint32_t* qt = w.qt + p * (D / 2) * NR;
      float* ot = w.ot + p * D * NR;
      for (int64_t i = 0; i < nk * NR; i += 16) _mm512_storeu_ps(w.st + i, _mm512_setzero_ps());
      for_tiles<MR>(nk, [&](int64_t j, int mr) {
        attn_micro_at_most<MR>(mr, kb + j * ldk, ldk, qt, D / 2, w.st + j * NR, NR);
      });
      for (int64_t i = 0; i < nk * NR; i += 16) _mm512_storeu_ps(w.st + i, _mm512_mul_ps(_mm512_loadu_ps(w.st + i), qs));
      if (a.causal && j0 + nk > all_see) {
        for (int64_t c = 0; c < NR; ++c) {
          const int64_t r = p * NR + c;
          const int64_t vis = r < t.rows ? imax(key_limit(a, t.row_query(r)) - j0, 0) : nk;
          for (int64_t j = vis; j < nk; ++j) w.st[j * NR + c] = ninf;
        }
      }
      softmax_panel32(w.st, nk, w.m + p * NR, w.l + p * NR, ot, D);
      // P^T as bf16 pairs of keys (a missing odd key is zero).
      for (int64_t pp = 0; pp < kp; ++pp) {
        for (int h = 0; h < 2; ++h) {
          const int64_t j = 2 * pp;
          const __m512 p0v = j < nk ? _mm512_loadu_ps(w.st + j * NR + 16 * h) : _mm512_setzero_ps();
          const __m512 p1v = j + 1 < nk ? _mm512_loadu_ps(w.st + (j + 1) * NR + 16 * h) : _mm512_setzero_ps();
          _mm512_storeu_si512(w.pt + pp * NR + 16 * h, bf16_pairs(p0v, p1v));
        }
      }
      for_tiles<MR>(D, [&](int64_t d, int mr) {
        attn_micro_at_most<MR>(mr, reinterpret_cast<const uint16_t*>(w.vt + d * kp), 2 * kp, w.pt, nk2,
                               ot + d * NR, NR);
      });
    }
  }
  write_tiled_rows<NR>(a, t, w.ot, w.m, w.l, w.row);
}

}  // namespace

bool avx512bf16_built() { return true; }

// bf16 inputs with more than kAttnDotRows rows per task: the vdpbf16ps prefill above; the
// rest (decode, float16, float32) on the AVX-512 unit. A call whose last query block has few
// rows runs it here too (its panel is padded with zero queries).
Status attention_avx512bf16(const AttentionArgs& a, ThreadPool& pool) {
  const int64_t group = a.hq / a.hkv;
  if (a.dtype != DType::kBFloat16 || group * imin(a.block_q, a.lq) <= kAttnDotRows || a.d % 16 != 0)
    return attention_avx512(a, pool);
  const int64_t nqb = ceil_div(a.lq, a.block_q);
  const size_t floats = Bf16AttnScratch::floats(group * imin(a.block_q, a.lq), a.d, a.block_k);
  bool oom = false;
  pool.parallel_for(a.b * a.hkv * nqb, [&](int64_t task, int) {
    float* base = static_cast<float*>(thread_scratch(kScratchAcc, floats * sizeof(float)));
    if (!base) {
      oom = true;
      return;
    }
    const AttnTask t = make_task(a, task);
    attention_task_bf16(a, t, key_blocks(a, t.b, t.hk, t.qb), base);
  });
  return oom ? Status::kOutOfMemory : Status::kOk;
}

Status qmatmul_avx512bf16(const QMatmulArgs& a, ThreadPool& pool) {
  if (a.m <= kBf16GemvMaxM) return qmatmul_avx512(a, pool);
  // act_bits 8, and float16 x: the AVX-512 unit's int8 GEMM (avx512_int8_gemm.h), for
  // float16 x on the GEMV's 15-bit x, whose error (~5e-5) is far below float16's own and
  // which runs at a median 1.9x the float32 GEMM on a Zen 5 (bench/RESULTS.md). float32 x keeps
  // the exact FMA GEMM (~1e-6): whoever passes float32 asks for it.
  if (a.x_dtype == DType::kFloat16 || a.act_bits == kActBitsInt8) return qmatmul_avx512_int8(a, pool);
  if (a.x_dtype != DType::kBFloat16) return qmatmul_avx512(a, pool);
  if (!fmt::is_supported_group_size(a.group_size) || !(a.bits == fmt::kInt4Bits || a.bits == fmt::kInt8Bits))
    return Status::kInvalidArgument;
  return a.bits == fmt::kInt8Bits ? dense_gemm<fmt::kInt8Bits>(a, pool) : dense_gemm<fmt::kInt4Bits>(a, pool);
}

#endif

}  // namespace cpu
}  // namespace bitswitch
