// AMX prefill attention, the amx variant's attention for tasks of many rows: the two
// products of flash attention on bf16 tiles (tdpbf16ps), the online softmax in float32 on
// AVX-512. Decode (every task at most kAttnDotRows rows) and float32 inputs keep the
// AVX-512 kernels (attention_prefill_amx at the end).
//
// Included by amx.cpp after its tile configuration (TileScope: palette 1, every tile 16
// rows of 64 bytes), which this file shares. A task is one (batch, kv head, query block)
// with the query block of every head of the GQA group as its rows, as in x86_attention.h,
// so each key unit is repacked once for all of them; without a mask, query blocks are
// merged up to kAttnTaskRows rows. Keys come in units of 32 (the selected blocks, in
// order; causal limits cut whole units), 8 units to a chunk; rows in groups of 32. Both
// products are computed transposed, the rows along the tiles' columns:
//   S^T = K q^T       A: K as it lies (copied per unit), B: q^T (pairs of dims, once per task)
//   softmax           down the keys, 16 rows per vector: no reductions across lanes
//   O^T += V^T P^T    A: V^T (pairs of keys, transposed once per unit), B: P^T (two vectors
//                     of P interleaved), O^T in float32 memory, in and out once per chunk
// Each (group, unit) step's softmax runs beside the tiles of the next step (attention_task_amx).
//
// Where the time goes (2048-token causal prefill, 16 / 8 heads, head_dim 128, bf16, one
// thread of the measuring VM, 18.3 ms in all against 110 ms for the AVX-512 kernel): tile
// work ~8.3 ms for 1.1 M tdpbf16ps, 7.5 ns each where one alone takes 4.3 (a K or V^T
// tile, every second product, comes from L2: tile loads run at 3.4 ns per KB from L1 and
// 5.9 from L2); softmax ~5 ms (2.2 M vectors at ~8.5 cycles: 9 uops of 2^x, sum and max on
// two FMA ports, and the bf16 pairing); repack ~2 ms; q, output and bookkeeping ~2 ms.
// Interleaving hides ~2 ms of the softmax (12.6 against 14.6 ms without the repack).
//
// Precision: bf16 inputs are used as they are and P is rounded to bf16 (its float32 sum l
// is not). float16 inputs are split into hi = bf16(x) and lo = bf16(x - hi), which holds
// every float16 value exactly, and P likewise (16 bits); each product takes three tile
// products (hi hi, hi lo, lo hi; lo lo is below 2^-16 relative): 38 ms against 111 for the
// AVX-512 kernel on the shape above. float32 inputs would need a third part to stay within
// the tests' 1e-5 of the scalar reference (two parts gave up to 1.2e-5: 16 bits of q, k
// and P) and six products per product, so they keep the FMA path.
#pragma once

#include <cmath>
#include <limits>

#include "avx512_attention.h"
#include "avx512_transpose.h"

namespace bitswitch {
namespace cpu {
namespace {

// Keys of one unit: one tdpbf16ps step along the keys for P V (16 pairs of keys per B
// row) and two 16-key A tiles for S.
constexpr int kAttnUnit = 2 * kTileRows;
// Units per chunk: O's tiles are loaded and stored once per chunk, a 16 x 16 float32 tile
// costing about one tdpbf16ps each way, so a chunk of 8 units puts 8 products between a
// load and a store.
constexpr int kAttnChunkUnits = 8;
// Rows processed together: two 16-row slabs, the B tiles of one tdpbf16ps pair.
constexpr int kAttnGroupRows = 2 * kTileRows;
// Rows per task without a mask (query blocks merged up to it): 256 -> 512 rows took a
// 2048-token causal prefill (16 / 8 heads, one thread) from 19.6 to 18.3 ms, 1024 rows to
// 17.8-18.5 for twice the scratch.
constexpr int64_t kAttnTaskRows = 512;
// How far (log2 units) a score may pass its row's running max m before m moves: P stays
// below 2^16, far inside bf16 and float32 range, and a row whose first keys hold its
// largest scores (the usual attention sink) never rescales at all.
constexpr float kMaxExcess = 16.0f;

// Parts of each input in bf16: 1 for bf16, hi + lo for float16.
template <DType T>
constexpr int attn_parts() {
  return T == DType::kBFloat16 ? 1 : 2;
}

// 2^x for 16 floats, x <= kMaxExcess: 2^floor(x) * q(x - floor(x)) with q the minimax
// polynomial of degree 4 on [0, 1] (kExp2Poly4), relative error 2.7e-6 (P is rounded to 8
// or 16 bits after it, and the lse bound is 1e-4). vreduceps gives
// x - floor(x) in one uop (vrndscaleps takes two, plus a subtraction) and vscalefps
// applies 2^floor(x) itself; for x = -inf (a masked key) vreduceps returns 0 and vscalefps
// 0, so no mask is needed. (x in (-150, -126) gives a float32 denormal: harmless, as the
// bf16 conversion flushes it and l hardly notices; such a key is 2^-126 below its row's max.)
inline __m512 exp2_poly(__m512 x) {
  const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 p = _mm512_set1_ps(kExp2Poly4[0]);
  for (int i = 1; i < 5; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly4[i]));
  return _mm512_scalef_ps(p, x);
}

// 32 bf16 of hi (and lo = bf16(v - hi) when P = 2) from 32 floats.
template <int P>
inline void split32(__m512 v0, __m512 v1, __m512i& hi, __m512i& lo) {
  hi = (__m512i)_mm512_cvtne2ps_pbh(v1, v0);  // elements of v0 in the low half
  if (P == 2) {
    const __m512 h0 = from_bf16(_mm512_castsi512_si256(hi)), h1 = from_bf16(_mm512_extracti64x4_epi64(hi, 1));
    lo = (__m512i)_mm512_cvtne2ps_pbh(_mm512_sub_ps(v1, h1), _mm512_sub_ps(v0, h0));
  }
}

// Elements 0..31 of a row of type T as bf16 (hi, and lo when split), natural order.
template <DType T>
inline void load_bf16x32(const void* row, __m512i& hi, __m512i& lo) {
  if (T == DType::kBFloat16) {
    hi = _mm512_loadu_si512(row);
  } else {
    static_assert(T == DType::kBFloat16 || T == DType::kFloat16, "bf16 or float16 inputs");
    const __m256i* p = static_cast<const __m256i*>(row);
    split32<2>(_mm512_cvtph_ps(_mm256_loadu_si256(p)), _mm512_cvtph_ps(_mm256_loadu_si256(p + 1)), hi, lo);
  }
}

// One unit of keys in a chunk: keys [start, start + valid) of the (batch, kv head).
struct AttnUnit {
  int64_t start, valid;
};

// The rows of one group of a chunk.
struct AttnGroup {
  int64_t r0;       // first row (task-local)
  int mt;           // 16-row slabs: 1 or 2
  int nu;           // units any of its rows sees: a prefix of the chunk's (keys ascend)
  uint32_t masked;  // bit u: some row sees only part of unit u
};

// Per-task scratch: tiles are kept whole (1 KB, rows of 64 bytes), so no tile load or
// store strides across a few L1 sets.
template <DType T, int D>
struct AmxAttnScratch {
  static constexpr int P = attn_parts<T>();
  static constexpr int kSteps = D / kTileK;                          // 32-dim steps of q . k
  static constexpr int kDimTiles = D / kTileRows;                    // 16-dim column tiles of O
  static constexpr int64_t kUnitElems = int64_t(P) * kAttnUnit * D;  // bf16 of one unit's K (or V) tiles
  static constexpr int64_t kUnitP = int64_t(P) * 2 * kTileElems;     // bf16 of one unit's P tiles (2 slabs)
  static constexpr int64_t kGroupP = kAttnChunkUnits * kUnitP;       // bf16 of a group's P for a chunk
  static constexpr int64_t kGroupO = int64_t(D) * kAttnGroupRows;    // floats of a group's O
  uint16_t* qt;  // [P][rows16 / 16][kSteps][512]   q^T tiles: pairs of dims x 16 rows
  float* ot;     // [rows16 / 32][D][32]            O^T of each group, unnormalized
  float* m;      // [rows16]   running max, log2 units (-inf before any key)
  float* l;      // [rows16]   running sum
  int32_t* lim;  // [rows16]   keys each row may see (key_limit; lk for padding rows)
  AttnGroup* gs; // [rows16 / 16]   the row groups that see a chunk
  uint16_t* kt;  // [units][P][2][kSteps][512]   K tiles: 16 keys x 32 dims
  uint16_t* vt;  // [units][P][kDimTiles][512]   V^T tiles: 16 dims x 32 keys (pairs)
  float* s;      // [2][32 keys][32 rows]        S^T of one (group, unit)
  uint16_t* pt;  // [2][units][P][2][512]        P^T tiles: 16 pairs of keys x 16 rows

  static size_t bytes(int64_t rows16) {
    const int64_t groups = ceil_div(rows16, kAttnGroupRows);
    return size_t(P * rows16 * D * 2 + groups * kGroupO * 4 + rows16 * 4 * 3) +
           size_t(rows16 / kTileRows) * sizeof(AttnGroup) +
           size_t(2 * kAttnChunkUnits * kUnitElems * 2 + 2 * kAttnUnit * kAttnGroupRows * 4 + 2 * kGroupP * 2) +
           11 * 64;
  }
  AmxAttnScratch(void* base, int64_t rows16) {
    char* c = static_cast<char*>(base);
    auto take = [&](size_t n) {
      char* r = c;
      c += (n + 63) & ~size_t(63);
      return r;
    };
    const int64_t groups = ceil_div(rows16, kAttnGroupRows);
    qt = reinterpret_cast<uint16_t*>(take(size_t(P * rows16 * D * 2)));
    ot = reinterpret_cast<float*>(take(size_t(groups * kGroupO * 4)));
    m = reinterpret_cast<float*>(take(size_t(rows16 * 4)));
    l = reinterpret_cast<float*>(take(size_t(rows16 * 4)));
    lim = reinterpret_cast<int32_t*>(take(size_t(rows16 * 4)));
    gs = reinterpret_cast<AttnGroup*>(take(size_t(rows16 / kTileRows) * sizeof(AttnGroup)));
    kt = reinterpret_cast<uint16_t*>(take(size_t(kAttnChunkUnits * kUnitElems * 2)));
    vt = reinterpret_cast<uint16_t*>(take(size_t(kAttnChunkUnits * kUnitElems * 2)));
    s = reinterpret_cast<float*>(take(size_t(2 * kAttnUnit * kAttnGroupRows * 4)));
    pt = reinterpret_cast<uint16_t*>(take(size_t(2 * kGroupP * 2)));
  }
};

// The permutex2var index that interleaves 16-bit lanes first .. first + 15 of a and b:
// (a[first], b[first], a[first + 1], b[first + 1], ...).
inline __m512i pair_index(int first) {
  alignas(64) int16_t idx[32];
  for (int i = 0; i < 16; ++i) {
    idx[2 * i] = int16_t(first + i);
    idx[2 * i + 1] = int16_t(32 + first + i);
  }
  return _mm512_load_si512(idx);
}

// K and V of one unit into tiles. K tile (part, h, step): keys 16h .. 16h + 15 of the unit,
// dims 32 step .. + 31, as they lie in a row (the A operand of S^T = K q^T needs no
// transpose). V^T tile (part, c): row d holds dim 16c + d of the unit's 32 keys, in order
// (pairs of keys are the VNNI pairs the A operand of O^T += V^T P^T wants): two key rows
// interleaved, then a 16 x 16 dword transpose. Keys past `valid` are zero (their
// probabilities are 0, and 0 * 0 keeps garbage from turning into NaN).
template <DType T, int D>
void repack_unit(const AttentionArgs& a, int64_t b, int64_t hk, const AttnUnit& u, uint16_t* kt, uint16_t* vt) {
  using W = AmxAttnScratch<T, D>;
  constexpr int P = W::P, steps = W::kSteps, ctiles = W::kDimTiles;
  const int64_t esz = dtype_size(T);
  const char* kb = static_cast<const char*>(a.k) + offset(a.k_strides, b, hk, u.start) * esz;
  const char* vb = static_cast<const char*>(a.v) + offset(a.v_strides, b, hk, u.start) * esz;
  const int64_t ldk = a.k_strides[2] * esz, ldv = a.v_strides[2] * esz;
  for (int j = 0; j < kAttnUnit; ++j)
    for (int st = 0; st < steps; ++st) {
      __m512i hi = _mm512_setzero_si512(), lo = hi;
      if (j < u.valid) load_bf16x32<T>(kb + j * ldk + st * kTileK * esz, hi, lo);
      uint16_t* row = kt + ((j / kTileRows) * steps + st) * kTileElems + (j % kTileRows) * kTileK;
      _mm512_store_si512(row, hi);
      if (P == 2) _mm512_store_si512(row + 2 * steps * kTileElems, lo);
    }
  const __m512i lo_idx = pair_index(0), hi_idx = pair_index(16);
  for (int part = 0; part < P; ++part)
    for (int e = 0; e < D; e += 32) {
      __m512i r0[16], r1[16];  // dims e .. e+15 and e+16 .. e+31: row i = keys 2i, 2i+1 interleaved
      for (int i = 0; i < 16; ++i) {
        __m512i h0 = _mm512_setzero_si512(), l0 = h0, h1 = h0, l1 = h0;
        if (2 * i < u.valid) load_bf16x32<T>(vb + 2 * i * ldv + e * esz, h0, l0);
        if (2 * i + 1 < u.valid) load_bf16x32<T>(vb + (2 * i + 1) * ldv + e * esz, h1, l1);
        const __m512i x0 = part ? l0 : h0, x1 = part ? l1 : h1;
        r0[i] = _mm512_permutex2var_epi16(x0, lo_idx, x1);
        r1[i] = _mm512_permutex2var_epi16(x0, hi_idx, x1);
      }
      transpose16x16_epi32(r0);
      transpose16x16_epi32(r1);
      uint16_t* tile = vt + (part * ctiles + e / kTileRows) * kTileElems;
      for (int i = 0; i < 16; ++i) {
        _mm512_store_si512(tile + i * kTileK, r0[i]);
        _mm512_store_si512(tile + kTileElems + i * kTileK, r1[i]);
      }
    }
}

// bf16 pairs (even key, odd key) per row from the probabilities of two keys, 16 rows each.
inline __m512i pair_rows(__m512 even, __m512 odd) {
  const __m512i inter = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,  //
                                         23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(inter, (__m512i)_mm512_cvtne2ps_pbh(odd, even));
}

// The vector half of the pipeline: the online softmax of one (group, unit), with the rows
// in the lanes (S^T[key][row]): per 16-row slab, one pass for the max (vertical: no
// horizontal reductions) and one for P, each slab's pass for P cut in four quarters of 8
// keys. The pieces are handed out in even shares between the steps of the tile work it
// runs beside (tick), the rest at the end (finish).
//
// The first unit a row sees sets its m to that unit's max, so the row's largest P there is
// 1, exact in bf16 (a row of few keys, early in a causal block, keeps its dominant value
// unrounded: with m = ceil(max) instead, the error of bf16 outputs grew from 2.5e-3 to
// 3.8e-3 on average, 5.8e-3 at worst). Then m moves only when a score passes it by more
// than kMaxExcess, which rescales O, l and the P already written for the chunk's units.
template <DType T, int D>
struct SoftmaxFeed {
  using W = AmxAttnScratch<T, D>;
  static constexpr int P = W::P, kQuarters = 4, kPieces = 1 + kQuarters;
  const W* w = nullptr;
  const AttnGroup* g = nullptr;
  const AttnUnit* unit = nullptr;
  int u = 0;                 // the unit's place in the chunk
  const float* s = nullptr;  // S^T of the unit [32 keys][32 rows]
  uint16_t* pt = nullptr;    // the group's P^T tiles
  float* ot = nullptr;       // the group's O^T
  float c = 0.0f;
  int piece = 0, pieces = 0, ticks = 1, done = 0;
  __m512 mu, lv;   // the slab's m (0 where -inf) and l
  __m512i lim;     // the slab's keys seen, at most the unit's end (masked units)

  void start(const W& w_, const AttnGroup& g_, const AttnUnit& unit_, int u_, const float* s_, uint16_t* pt_,
             float* ot_, float c_) {
    w = &w_;
    g = &g_;
    unit = &unit_;
    u = u_;
    s = s_;
    pt = pt_;
    ot = ot_;
    c = c_;
    piece = done = 0;
    pieces = g->mt * kPieces;
  }

  template <bool MASKED>
  inline __m512 load(int slab, int j) const {
    const float* p = s + j * kAttnGroupRows + slab * kTileRows;
    if (!MASKED) return _mm512_loadu_ps(p);
    const __mmask16 vis = _mm512_cmpgt_epi32_mask(lim, _mm512_set1_epi32(int32_t(unit->start + j)));
    return _mm512_mask_loadu_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), vis, p);
  }

  template <bool MASKED>
  void max_pass(int slab) {
    const int64_t r0 = g->r0 + slab * kTileRows;
    if (MASKED)
      lim = _mm512_min_epi32(_mm512_loadu_si512(w->lim + r0), _mm512_set1_epi32(int32_t(unit->start + unit->valid)));
    __m512 m0 = load<MASKED>(slab, 0), m1 = load<MASKED>(slab, 1);  // two chains of dependent maxes
    for (int j = 2; j < kAttnUnit; j += 2) {
      m0 = _mm512_max_ps(m0, load<MASKED>(slab, j));
      m1 = _mm512_max_ps(m1, load<MASKED>(slab, j + 1));
    }
    const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    const __m512 bm = _mm512_mul_ps(_mm512_max_ps(m0, m1), _mm512_set1_ps(c));  // -inf where the row sees no key here
    __m512 mv = _mm512_loadu_ps(w->m + r0);
    lv = _mm512_loadu_ps(w->l + r0);
    const __mmask16 fresh = _mm512_cmp_ps_mask(mv, ninf, _CMP_EQ_OQ);
    mv = _mm512_mask_mov_ps(mv, fresh, bm);
    const __mmask16 over =
        _mm512_mask_cmp_ps_mask(~fresh, bm, _mm512_add_ps(mv, _mm512_set1_ps(kMaxExcess)), _CMP_GT_OQ);
    if (__builtin_expect(over != 0, 0)) rescale(slab, over, bm, mv);
    _mm512_storeu_ps(w->m + r0, mv);
    mu = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(mv, ninf, _CMP_EQ_OQ), mv, _mm512_setzero_ps());
  }

  // Rows `over` of the slab: m = bm, and O, l and the chunk's P so far by 2^(m - bm).
  __attribute__((noinline)) void rescale(int slab, __mmask16 over, __m512 bm, __m512& mv) {
    const __m512 sc = exp2_poly(_mm512_maskz_sub_ps(over, mv, bm));
    mv = _mm512_mask_mov_ps(mv, over, bm);
    lv = _mm512_mul_ps(lv, sc);
    for (int d = 0; d < D; ++d) {
      float* o = ot + d * kAttnGroupRows + slab * kTileRows;
      _mm512_storeu_ps(o, _mm512_mul_ps(_mm512_loadu_ps(o), sc));
    }
    const __m512i hi_mask = _mm512_set1_epi32(int(0xFFFF0000u));
    for (int v = 0; v < u; ++v)
      for (int part = 0; part < P; ++part) {
        uint16_t* tile = pt + v * W::kUnitP + (part * 2 + slab) * kTileElems;
        for (int i = 0; i < kTileRows; ++i) {
          const __m512i x = _mm512_load_si512(tile + i * kTileK);
          const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
          const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(x, hi_mask));
          _mm512_store_si512(tile + i * kTileK, pair_rows(_mm512_mul_ps(even, sc), _mm512_mul_ps(odd, sc)));
        }
      }
  }

  template <bool MASKED>
  void p_pass(int slab, int quarter) {
    constexpr int kPairs = kAttnUnit / 2 / kQuarters;
    const __m512 cv = _mm512_set1_ps(c), mloc = mu;
    __m512 se = lv, so = _mm512_setzero_ps();
    for (int i = quarter * kPairs; i < (quarter + 1) * kPairs; ++i) {
      const __m512 e = exp2_poly(_mm512_fmsub_ps(load<MASKED>(slab, 2 * i), cv, mloc));
      const __m512 o = exp2_poly(_mm512_fmsub_ps(load<MASKED>(slab, 2 * i + 1), cv, mloc));
      se = _mm512_add_ps(se, e);
      so = _mm512_add_ps(so, o);
      uint16_t* row = pt + u * W::kUnitP + slab * kTileElems + i * kTileK;
      const __m512i hi = pair_rows(e, o);
      _mm512_store_si512(row, hi);
      if (P == 2) {
        const __m512i hm = _mm512_set1_epi32(int(0xFFFF0000u));
        const __m512 he = _mm512_castsi512_ps(_mm512_slli_epi32(hi, 16)), ho = _mm512_castsi512_ps(_mm512_and_si512(hi, hm));
        _mm512_store_si512(row + 2 * kTileElems, pair_rows(_mm512_sub_ps(e, he), _mm512_sub_ps(o, ho)));
      }
    }
    lv = _mm512_add_ps(se, so);
    if (quarter == kQuarters - 1) _mm512_storeu_ps(w->l + g->r0 + slab * kTileRows, lv);
  }

  void run_piece() {
    const int slab = piece / kPieces, ph = piece % kPieces;
    const bool masked = g->masked >> u & 1;
    if (ph == 0) {
      if (masked)
        max_pass<true>(slab);
      else
        max_pass<false>(slab);
    } else if (masked) {
      p_pass<true>(slab, ph - 1);
    } else {
      p_pass<false>(slab, ph - 1);
    }
    ++piece;
  }
  inline void tick() {
    if (!g) return;
    const int target = int((int64_t(++done) * pieces + ticks - 1) / ticks);
    while (piece < target && piece < pieces) run_piece();
  }
  void finish() {
    while (g && piece < pieces) run_piece();
  }
};

// A pair of accumulator tiles (2h, 2h + 1) whose store is held back: a tile store waits for
// the product it stores, and the tile instructions behind it wait with it (4 products then
// stores of the same 4 tiles: 30.6 ns; products on one pair while the other pair is
// stored: 18.4 ns, the products alone 17.1). Stored one step into the other pair's work,
// the store finds its products done (2048-token prefill: 18.3 ms, 19.2 storing at once).
struct HeldStore {
  int h = -1;  // the pair, or -1
  int mt = 0;  // tiles in it (slabs)
  float* dst = nullptr;  // tile 2h's rows (32 floats apart); tile 2h + 1 at dst + 16

  void hold(int h_, int mt_, float* dst_) {
    h = h_;
    mt = mt_;
    dst = dst_;
  }
  inline void flush() {
    constexpr int stride = kAttnGroupRows * 4;
    if (h == 0) {
      tile_store<0>(dst, stride);
      if (mt == 2) tile_store<1>(dst + kTileRows, stride);
    } else if (h == 1) {
      tile_store<2>(dst, stride);
      if (mt == 2) tile_store<3>(dst + kTileRows, stride);
    }
    h = -1;
  }
};

// S^T of one unit for one group: the unit's 16-key half H (A tile 6 + H) against the q^T
// tiles of slabs 0, 1 (B tiles 4, 5), accumulating in tiles 2H, 2H + 1, to be stored to s
// [32 keys][32 rows]. The halves alternate between the two pairs of accumulators, each
// pair's store held until the other pair's first step.
template <int P, int D, int MT, int H, class Feed>
inline void score_half(const uint16_t* qt, int64_t qt_part, const uint16_t* k, float* s, HeldStore& held,
                       Feed& feed) {
  constexpr int steps = D / kTileK, c0 = 2 * H, c1 = 2 * H + 1, at = 6 + H;
  constexpr int64_t lo_off = 2 * steps * kTileElems, slab1 = steps * kTileElems;
  if (held.h == H) held.flush();
  tile_zero<c0>();
  if (MT == 2) tile_zero<c1>();
  for (int st = 0; st < steps; ++st) {
    const uint16_t* q = qt + st * kTileElems;
    tile_load<4>(q, kTileBytes);
    if (MT == 2) tile_load<5>(q + slab1, kTileBytes);
    tile_load<at>(k + st * kTileElems, kTileBytes);
    tile_dp<c0, at, 4>();
    if (MT == 2) tile_dp<c1, at, 5>();
    if (P == 2) {
      tile_load<at>(k + lo_off + st * kTileElems, kTileBytes);
      tile_dp<c0, at, 4>();
      if (MT == 2) tile_dp<c1, at, 5>();
      tile_load<4>(q + qt_part, kTileBytes);
      if (MT == 2) tile_load<5>(q + qt_part + slab1, kTileBytes);
      tile_load<at>(k + st * kTileElems, kTileBytes);
      tile_dp<c0, at, 4>();
      if (MT == 2) tile_dp<c1, at, 5>();
    }
    if (st == 0) held.flush();
    feed.tick();
  }
  held.hold(H, MT, s + H * kTileRows * kAttnGroupRows);
}

template <int P, int D, int MT, class Feed>
inline void score_unit(const uint16_t* qt, int64_t qt_part, const uint16_t* k, float* s, HeldStore& held,
                       Feed& feed) {
  score_half<P, D, MT, 0>(qt, qt_part, k, s, held, feed);
  score_half<P, D, MT, 1>(qt, qt_part, k + (D / kTileK) * kTileElems, s, held, feed);
}

// O^T (column tile c: dims 16c .. + 15) += V^T P^T for one group: V^T of each unit (A tile
// 6 + H) against its P^T tiles of slabs 0, 1 (B tiles 4, 5), accumulators 2H, 2H + 1;
// column tiles alternate H as score_half's halves do, for the same reason.
template <int P, int D, int MT, int H, class Feed>
inline void pv_column(const uint16_t* pt, const uint16_t* v, int nu, float* o, HeldStore& held, Feed& feed) {
  constexpr int c0 = 2 * H, c1 = 2 * H + 1, at = 6 + H;
  constexpr int64_t unit_v = int64_t(P) * kAttnUnit * D, v_lo = (D / kTileRows) * kTileElems;
  constexpr int64_t unit_p = int64_t(P) * 2 * kTileElems, p_lo = 2 * kTileElems;
  constexpr int ob = kAttnGroupRows * 4;
  if (held.h == H) held.flush();
  tile_load<c0>(o, ob);
  if (MT == 2) tile_load<c1>(o + kTileRows, ob);
  for (int u = 0; u < nu; ++u, v += unit_v, pt += unit_p) {
    tile_load<4>(pt, kTileBytes);
    if (MT == 2) tile_load<5>(pt + kTileElems, kTileBytes);
    tile_load<at>(v, kTileBytes);
    tile_dp<c0, at, 4>();
    if (MT == 2) tile_dp<c1, at, 5>();
    if (P == 2) {
      tile_load<at>(v + v_lo, kTileBytes);
      tile_dp<c0, at, 4>();
      if (MT == 2) tile_dp<c1, at, 5>();
      tile_load<4>(pt + p_lo, kTileBytes);
      if (MT == 2) tile_load<5>(pt + p_lo + kTileElems, kTileBytes);
      tile_load<at>(v, kTileBytes);
      tile_dp<c0, at, 4>();
      if (MT == 2) tile_dp<c1, at, 5>();
    }
    if (u == 0) held.flush();
    feed.tick();
  }
  held.hold(H, MT, o);
}

// Column tiles [c0, c1) of one group's P V.
template <int P, int D, int MT, class Feed>
inline void pv_columns(const uint16_t* pt, const uint16_t* vt, int nu, float* ot, int c0, int c1, HeldStore& held,
                       Feed& feed) {
  for (int c = c0; c < c1; ++c) {
    float* o = ot + c * kTileRows * kAttnGroupRows;
    if (c & 1)
      pv_column<P, D, MT, 1>(pt, vt + c * kTileElems, nu, o, held, feed);
    else
      pv_column<P, D, MT, 0>(pt, vt + c * kTileElems, nu, o, held, feed);
  }
}

// One task: the rows of t over its key blocks, written to out (and lse).
//
// Both products are computed transposed, with the task's rows along the columns of the
// tiles (and so along the lanes of S^T's vectors):
//   S^T = K q^T      A = K as it lies (16 keys x 32 dims), B = q^T, transposed once per task
//   O^T += V^T P^T   A = V^T (16 dims x 32 keys, transposed once per unit), B = P^T, whose
//                    VNNI pairs are two keys of one row: two vectors of P interleaved
// so the softmax runs down the keys with 16 rows per vector: its max, sum, rescale tests
// and m updates are vertical, with no reduction across lanes.
//
// The work of a chunk is a software pipeline over (group, unit) steps: while the tiles
// compute S^T of a step (and a share of the previous group's P V), the vector units run the
// softmax of the step before, a piece between every two tile products. Tiles and vectors
// are separate units: so interleaved, 4 tdpbf16ps and 96 independent zmm FMAs take the time
// of the 4 products alone, where one after the other they take the sum. S^T of a step is
// 4 KB, still in L1 when the softmax reads it.
template <DType T, int D>
void attention_task_amx(const AttentionArgs& a, const AttnTask& t, const BlockList& blocks, void* base) {
  using W = AmxAttnScratch<T, D>;
  constexpr int P = W::P, steps = W::kSteps, ctiles = W::kDimTiles;
  const int64_t rows16 = round_up(t.rows, kTileRows), slabs = rows16 / kTileRows, esz = dtype_size(T);
  const int64_t groups = ceil_div(rows16, kAttnGroupRows);
  W w(base, rows16);
  const float ninf = -std::numeric_limits<float>::infinity();
  // Scores are used as s c with c > 0; a negative scale flips the sign of q instead (exact).
  const float c = std::fabs(a.scale) * kLog2e;
  const __m512i sign = _mm512_set1_epi16(a.scale < 0 ? int16_t(0x8000) : 0);
  const int64_t qt_part = slabs * steps * kTileElems;
  for (int64_t sl = 0; sl < slabs; ++sl)
    for (int st = 0; st < steps; ++st) {
      __m512i hi[16], lo[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t r = sl * kTileRows + i;
        hi[i] = lo[i] = _mm512_setzero_si512();
        if (r < t.rows) {
          const char* src = static_cast<const char*>(a.q) + offset(a.q_strides, t.b, t.row_head(r), t.row_query(r)) * esz;
          load_bf16x32<T>(src + st * kTileK * esz, hi[i], lo[i]);
          hi[i] = _mm512_xor_si512(hi[i], sign);
          lo[i] = _mm512_xor_si512(lo[i], sign);
        }
      }
      for (int part = 0; part < P; ++part) {
        __m512i(&x)[16] = part ? lo : hi;
        transpose16x16_epi32(x);
        uint16_t* tile = w.qt + part * qt_part + (sl * steps + st) * kTileElems;
        for (int i = 0; i < 16; ++i) _mm512_store_si512(tile + i * kTileK, x[i]);
      }
    }
  for (int64_t r = 0; r < rows16; ++r) {
    w.lim[r] = int32_t(r < t.rows ? key_limit(a, t.row_query(r)) : a.lk);
    w.m[r] = ninf;
    w.l[r] = 0.0f;
  }
  for (int64_t i = 0; i < groups * W::kGroupO; i += 16) _mm512_store_ps(w.ot + i, _mm512_setzero_ps());

  TileScope tiles;
  const int64_t last_limit = key_limit(a, t.i0 + t.nq - 1);  // the last query row sees the most keys
  int64_t bi = 0, next = 0;                                   // next block, next key within it
  AttnUnit units[kAttnChunkUnits];
  for (;;) {
    int nu = 0;
    while (nu < kAttnChunkUnits && bi < blocks.count) {
      const int64_t j0 = blocks[bi] * a.block_k;
      const int64_t nk = imin(imin(a.block_k, a.lk - j0), last_limit - j0);  // keys any row sees
      if (next >= nk) {
        ++bi;
        next = 0;
        continue;
      }
      units[nu].start = j0 + next;
      units[nu].valid = imin(kAttnUnit, nk - next);
      next += kAttnUnit;
      ++nu;
    }
    if (nu == 0) break;
    for (int u = 0; u < nu; ++u)
      repack_unit<T, D>(a, t.b, t.hk, units[u], w.kt + u * W::kUnitElems, w.vt + u * W::kUnitElems);

    // The groups that see any key of the chunk.
    int ng = 0;
    for (int64_t k = 0; k < groups; ++k) {
      AttnGroup& g = w.gs[ng];
      g.r0 = k * kAttnGroupRows;
      g.mt = int(imin(kAttnGroupRows, rows16 - g.r0) / kTileRows);
      const int64_t real = imin(kAttnGroupRows, t.rows - g.r0);
      int64_t lo_lim = w.lim[g.r0], hi_lim = w.lim[g.r0];
      for (int64_t r = g.r0; r < g.r0 + real; ++r) {
        lo_lim = imin(lo_lim, w.lim[r]);
        hi_lim = imax(hi_lim, w.lim[r]);
      }
      g.nu = 0;
      while (g.nu < nu && units[g.nu].start < hi_lim) ++g.nu;
      g.masked = 0;
      for (int u = 0; u < g.nu; ++u)
        if (units[u].valid < kAttnUnit || lo_lim < units[u].start + kAttnUnit) g.masked |= 1u << u;
      if (g.nu > 0) ++ng;
    }

    // Steps (group i, unit u) in order. The softmax of a step runs beside the tiles of the
    // next; P V of group i - 1 is spread over the steps after group i's first (whose
    // softmax completes group i - 1's P) up to group i + 1's first (whose softmax, beside
    // the following step, reuses group i - 1's P buffer).
    SoftmaxFeed<T, D> prev;                 // the softmax of the previous step
    HeldStore held;
    int pv = -1, pv_col = 0, pv_steps = 0;  // pending P V: group, next column tile, steps left
    auto pv_cols = [&] { return int((ctiles - pv_col + imax(1, pv_steps) - 1) / imax(1, pv_steps)); };
    auto pv_share = [&](SoftmaxFeed<T, D>& feed) {
      if (pv < 0) return;
      const int cols = pv_cols();
      const AttnGroup& g = w.gs[pv];
      const uint16_t* pt = w.pt + (pv & 1) * W::kGroupP;
      float* ot = w.ot + (g.r0 / kAttnGroupRows) * W::kGroupO;
      if (g.mt == 2)
        pv_columns<P, D, 2>(pt, w.vt, g.nu, ot, pv_col, pv_col + cols, held, feed);
      else
        pv_columns<P, D, 1>(pt, w.vt, g.nu, ot, pv_col, pv_col + cols, held, feed);
      pv_col += cols;
      pv_steps = int(imax(0, pv_steps - 1));
      if (pv_col == ctiles) pv = -1;
    };
    int step = 0;
    for (int i = 0; i < ng; ++i) {
      const AttnGroup& g = w.gs[i];
      const uint16_t* qt = w.qt + (g.r0 / kTileRows) * steps * kTileElems;
      for (int u = 0; u < g.nu; ++u, ++step) {
        float* s = w.s + (step & 1) * kAttnUnit * kAttnGroupRows;
        prev.ticks = 2 * steps + (pv >= 0 ? w.gs[pv].nu * pv_cols() : 0);
        const uint16_t* k = w.kt + u * W::kUnitElems;
        if (g.mt == 2)
          score_unit<P, D, 2>(qt, qt_part, k, s, held, prev);
        else
          score_unit<P, D, 1>(qt, qt_part, k, s, held, prev);
        pv_share(prev);
        prev.finish();
        if (u == 0 && i > 0) {
          pv = i - 1;
          pv_col = 0;
          pv_steps = g.nu - 1 + (i + 1 < ng ? 1 : 0);
        }
        prev.start(w, g, units[u], u, s, w.pt + (i & 1) * W::kGroupP, w.ot + (g.r0 / kAttnGroupRows) * W::kGroupO, c);
      }
    }
    held.flush();
    prev.finish();
    SoftmaxFeed<T, D> none;
    while (pv >= 0) pv_share(none);
    if (ng > 0) {  // the last group's P V
      pv = ng - 1;
      pv_col = 0;
      pv_steps = 1;
      pv_share(none);
    }
    held.flush();
  }

  // out = O / l, a 16 x 16 transpose of O^T per slab and column tile.
  for (int64_t sl = 0; sl < slabs; ++sl) {
    const int64_t r0 = sl * kTileRows;
    const float* og = w.ot + (r0 / kAttnGroupRows) * W::kGroupO + (sl % 2) * kTileRows;
    alignas(64) float inv[16];
    for (int i = 0; i < 16; ++i) inv[i] = w.l[r0 + i] > 0.0f ? 1.0f / w.l[r0 + i] : 0.0f;
    for (int cb = 0; cb < ctiles; ++cb) {
      __m512i x[16];
      for (int d = 0; d < 16; ++d) x[d] = _mm512_loadu_si512(og + (cb * kTileRows + d) * kAttnGroupRows);
      transpose16x16_epi32(x);
      for (int i = 0; i < 16 && r0 + i < t.rows; ++i) {
        const int64_t r = r0 + i;
        char* dst = static_cast<char*>(a.out) + offset(a.o_strides, t.b, t.row_head(r), t.row_query(r)) * esz;
        store16(dst + cb * kTileRows * esz, T, _mm512_mul_ps(_mm512_castsi512_ps(x[i]), _mm512_set1_ps(inv[i])),
                __mmask16(0xFFFF));
      }
    }
  }
  if (a.lse)
    for (int64_t r = 0; r < t.rows; ++r) {
      const float l = w.l[r];
      a.lse[(t.b * a.hq + t.row_head(r)) * a.lq + t.row_query(r)] = l > 0.0f ? (w.m[r] + std::log2(l)) * kLn2 : ninf;
    }
}

template <DType T, int D>
Status attention_amx_tiles(const AttentionArgs& a, ThreadPool& pool) {
  const int64_t nqb = ceil_div(a.lq, a.block_q), pairs = a.b * a.hkv;
  const int64_t rows16 = round_up((a.hq / a.hkv) * imin(a.block_q, a.lq), kTileRows);
  const size_t bytes = AmxAttnScratch<T, D>::bytes(rows16);
  bool oom = false;
  // The tasks of one (batch, kv head) run one after another, so its keys and values stay
  // in L2 from one query block to the next; within it the last (largest, when causal)
  // query blocks come first, so the short ones fill in at the end.
  pool.parallel_for(pairs * nqb, [&](int64_t task, int) {
    void* base = thread_scratch(kScratchAcc, bytes);
    if (!base) {
      oom = true;
      return;
    }
    const int64_t qb = nqb - 1 - task % nqb;
    const AttnTask t = make_task(a, (task / nqb) * nqb + qb);
    attention_task_amx<T, D>(a, t, key_blocks(a, t.b, t.hk, t.qb), base);
  });
  return oom ? Status::kOutOfMemory : Status::kOk;
}

// Few rows per task (decode) keep the AVX-512 kernel: packing a key block for the tiles
// costs more than the dot products of 8 rows with it. float32 inputs keep the FMA path
// too (see the top of this file).
inline Status attention_prefill_amx(const AttentionArgs& a_in, ThreadPool& pool) {
  if (a_in.dtype == DType::kFloat32 || (a_in.hq / a_in.hkv) * imin(a_in.block_q, a_in.lq) <= kAttnDotRows)
    return attention_avx512(a_in, pool);
  // Without a mask the query block is only a tile size: larger ones share each repacked
  // key unit among more rows, while at least 4 tasks per thread keep the threads balanced.
  AttentionArgs a = a_in;
  if (!a.indptr) {
    const int64_t group = a.hq / a.hkv;
    int64_t bq = a.block_q;
    while (group * bq * 2 <= kAttnTaskRows && a.b * a.hkv * ceil_div(a.lq, bq * 2) >= 4 * pool.num_threads()) bq *= 2;
    a.block_q = int32_t(bq);
  }
  const bool d64 = a.d == 64;
  if (a.dtype == DType::kBFloat16)
    return d64 ? attention_amx_tiles<DType::kBFloat16, 64>(a, pool) : attention_amx_tiles<DType::kBFloat16, 128>(a, pool);
  return d64 ? attention_amx_tiles<DType::kFloat16, 64>(a, pool) : attention_amx_tiles<DType::kFloat16, 128>(a, pool);
}

}  // namespace
}  // namespace cpu
}  // namespace bitswitch
