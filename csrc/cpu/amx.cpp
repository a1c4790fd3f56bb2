// AMX variant of qmatmul for prefill-sized M (the AVX-512 VNNI GEMV of avx512.cpp below
// that), with two tile GEMMs chosen by the activations:
//
// bf16 x at act_bits 16: dequantized weights (dense_gemm). The contract:
//     y[m, n] = bf16( sum_k x[m, k] * w[n, k] ),  w[n, k] = bf16( s*c + b )
// with s*c + b one float32 FMA per element, rounded once to nearest-even bf16 (INT8 view:
// c = 16q + r with s/16 and b - 7.5*s/16 computed as format.h does), and the sum in float32
// over the whole of K. This is what a bf16 model multiplies by: the weight's bf16 rounding
// (2^-9 relative) is of the order of the output's own bf16 rounding, far below the INT4
// view's quantization error and about the INT8 view's step near the top of a group's range.
// Each weight is dequantized once per call, straight into the tile layout, and reused by
// every row of x, so its cost (~0.1 ns per weight for INT4, ~0.13 for INT8, one core) shrinks
// with M (a third of the call at M = 128, 3% at M = 2048); the tiles then
// accumulate with no per-group work at all.
//
// float32 and float16 x, and act_bits 8: exact codes (the rest of this file), float-grade:
// a code q (0..15) or c = 16q + r (0..255) is an integer of at most 8 significant bits, so
// it is exact in bf16, and so is every x the tiles see (float32 and float16 x as hi + lo
// bf16 halves; int8 activations as integers). tdpbf16ps then sums exact products in
// float32, and only the per-group affine map is applied in float32 outside the tiles:
//     y[m, n] = sum_g  s[n, g] * T_g[m, n]  +  b[n, g] * xsum[m, g]
// with T_g = sum over the group's k of x[m, k] * code[n, k]. Dequantized weights in bf16
// would round every weight to 8 bits (~2e-3 relative), far from float-grade; an exact
// hi + lo split of them would double the tile work instead.
//
// The price is that a tile accumulator holds one group at a time: per group, each 16 x 16
// product tile is stored and folded into the float32 result with the group's scales. The
// bias half is a product of its own (xsum x b^T, see task_affine) done once per block with
// tiles, not per group with vector FMAs. Measured on this unit's target (Sapphire Rapids,
// one core, L1-resident data), per 16 x 16 x 32 tile product (one tdpbf16ps; 4.4 ns alone,
// its 16-cycle throughput): 5.5 ns with its tile loads, 8.4 ns with the 4 tile stores of a
// G = 64 group, 11.6 ns with the fold; at G = 128 8.1 ns, at G = 32 18 ns. The bf16 path's
// tile blocks take ~9 ns per product with their accumulator loads and stores (3072 x 1024,
// M = 512; see dense_task), with no fold at all.
//
// Layout (C = x W^T, rows m, columns n): tiles 0, 1 hold x rows (32 rows, one 32-input
// step), tiles 2, 3 hold the codes of 32 outputs in the VNNI pair layout, tiles 4..7 the
// 32 x 32 products. x is prepared once per call (split into bf16 parts, blocked into
// tiles); the codes are expanded per 128-output panel and 256-input chunk, and reused by
// every block of x rows.
//
// Built without AMX support in the compiler (CMake's check failed, or BITSWITCH_AMX=OFF)
// this unit is a stub and the variant reports itself unsupported.
#include "kernels.h"

#if defined(BITSWITCH_HAVE_AMX)
#include <immintrin.h>

#include "x86_common.h"
#include "bf16_panels.h"
#include "panel_tasks.h"

#include "scratch.h"
#include "thread_pool.h"
#endif

namespace bitswitch {
namespace cpu {

#if !defined(BITSWITCH_HAVE_AMX)

bool amx_built() { return false; }
Status qmatmul_amx(const QMatmulArgs&, ThreadPool&) { return Status::kUnsupported; }
Status attention_amx(const AttentionArgs&, ThreadPool&) { return Status::kUnsupported; }

#else

namespace {

// Tile instructions on registers given as template arguments (gcc's _tile_* macros paste
// their register numbers into the asm text, so they take only literals). Loads carry a
// memory clobber too, unlike gcc 12's _tile_loadd: stores that fill a buffer (the GEMM's
// dequantized codes, attention's P) must not sink past the tile loads that read it.
template <int T>
inline void tile_load(const void* base, int64_t stride) {
  __asm__ volatile("tileloadd (%0,%1,1), %%tmm%c2" ::"r"(base), "r"(stride), "i"(T) : "memory");
}
template <int T>
inline void tile_store(void* base, int64_t stride) {
  __asm__ volatile("tilestored %%tmm%c2, (%0,%1,1)" ::"r"(base), "r"(stride), "i"(T) : "memory");
}
template <int T>
inline void tile_zero() {
  __asm__ volatile("tilezero %%tmm%c0" ::"i"(T));
}
template <int C, int A, int B>
inline void tile_dp() {  // C += A B
  __asm__ volatile("tdpbf16ps %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"i"(C), "i"(A), "i"(B));
}


// Largest M served by the AVX-512 GEMV. The tile path costs about the same for any M up to
// 16 (one 16-row block; code expansion dominates), the GEMV grows per row. Measured on one
// core (3072x1024, 1024x3072, 2560x9728, G = 64): the GEMV wins up to M = 5-6 for INT4 and
// 8-9 for INT8, the tile path from M = 6-8 and 9-10; 8 stays within ~15% of the better of
// the two at every M for both views.
constexpr int64_t kAmxGemvMaxM = 8;

// Tile geometry (kTileRows, kTileK, kTileElems, kBlockN: bf16_panels.h): every tile
// register is configured as 16 rows of 64 bytes, palette 1's maximum, so one tdpbf16ps is a
// 16 x 16 x 32 product; tiles 2, 3 hold a block's two 16-output slices.
constexpr int kTileFloats = kTileRows * kTileRows;
constexpr int kBlockM = 2 * kTileRows;           // x rows per block (tiles 0, 1)
constexpr int kBlockFloats = kBlockM * kBlockN;  // one group's 32 x 32 products
// Outputs per task: a 128 x 256 code panel is 64 KB, resident in L2 while all of x's
// chunk streams past it; each x chunk is then read N / 128 times per call.
constexpr int64_t kPanelN = 128;
// Inputs per chunk: 256 keeps the 32-output slice of the panel that the inner loop reads
// (16 KB) in L1 next to the block's x tiles. (At 2048 x 1024, M = 512, one core: chunks of
// 128, 256 or 512 inputs, 64- or 128-output panels and either block loop order all
// measured within the noise of 5%.)
constexpr int64_t kChunkK = 256;
// Groups whose products are folded into the result together: the result rows are loaded
// and stored once per batch instead of once per group. 4 groups' products are 16 KB; 8
// (all of a chunk at G = 32) measured 15% slower, as they no longer stay in L1.
constexpr int kMaxBatch = 4;
// x rows per task: bounds a task's float32 result block (512 x 128 x 4 = 256 KB) and x
// chunk (512 x 256 x 2 x parts) so both stay in L2 for any M.
constexpr int64_t kTaskRows = 512;

static_assert(kChunkK % fmt::kMaxGroupSize == 0, "a chunk holds whole groups");
static_assert(kPanelN % kBlockN == 0 && kTaskRows % kBlockM == 0, "panels hold whole blocks");

// Palette 1, tiles 0..7 all 16 x 64 bytes. Kept in static read-only storage: gcc 12 can
// drop the stores that fill a stack copy before ldtilecfg reads it (seen in llama.cpp as
// SIGILL), which a constant object cannot suffer.
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
static_assert(sizeof(TileConfig) == 64, "ldtilecfg reads exactly 64 bytes");
alignas(64) constexpr TileConfig kTileConfig = {
    1, 0, {}, {kTileBytes, kTileBytes, kTileBytes, kTileBytes, kTileBytes, kTileBytes, kTileBytes, kTileBytes},
    {kTileRows, kTileRows, kTileRows, kTileRows, kTileRows, kTileRows, kTileRows, kTileRows}};

// Tile state is per thread: each task configures the tiles on the thread that runs it and
// releases them at the end, so a pool thread that later runs AVX-512 work (or sleeps)
// carries no tile state through context switches.
struct TileScope {
  TileScope() { _tile_loadconfig(&kTileConfig); }
  ~TileScope() { _tile_release(); }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
};

// Stores the lanes of v selected by mask to p[0..15] as type t, rounding to nearest even
// (the bf16 conversion, like the tiles, treats float32 denormals as zero).
inline void store16(void* p, DType t, __m512 v, __mmask16 mask) {
  switch (t) {
    case DType::kBFloat16:
      _mm256_mask_storeu_epi16(p, mask, (__m256i)_mm512_cvtneps_pbh(v));
      break;
    case DType::kFloat16:
      _mm256_mask_storeu_epi16(p, mask, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      break;
    default:
      _mm512_mask_storeu_ps(p, mask, v);
  }
}

// ---------------------------------------------------------------------------------------
// x prepared for the tiles, once per call.

struct XTiles {
  uint16_t* tiles = nullptr;  // [m_pad / 16][steps][parts][16][32] bf16, rows past M zero
  uint16_t* sums = nullptr;   // [m_pad / 16][bias_steps][16][32] bf16: the bias tiles (below)
  float* dx = nullptr;        // [m_pad][groups] int8 step per group (act_bits 8 only)
  int64_t steps = 0, parts = 0, groups = 0, bias_steps = 0, m_pad = 0;

  // The tile of x rows 16*mt .. 16*mt + 15, step s, part p.
  uint16_t* tile(int64_t mt, int64_t s, int p) const { return tiles + ((mt * steps + s) * parts + p) * kTileElems; }
  uint16_t* sum_tile(int64_t mt, int64_t s) const { return sums + (mt * bias_steps + s) * kTileElems; }
  size_t tile_bytes() const { return size_t(m_pad * steps * parts * kTileElems) * 2; }
  size_t sum_bytes() const { return size_t(m_pad * bias_steps * kTileK) * 2; }
  size_t bytes() const { return tile_bytes() + sum_bytes() + size_t(m_pad * groups) * 4; }
};

// The bias half of y, sum_g b[n, g] * xsum[m, g], is a product too: of xsum [M, groups] and
// b^T [groups, N], with xsum = hi + lo and b = hi + lo in bf16 (each pair within 2^-18 of
// the float32 value) and all four cross products exact in the tiles. Each group takes two
// pairs of one tile row: x side (xsum_hi, xsum_lo) twice, code side (b_hi, b_hi) and
// (b_lo, b_lo). Done once per output block, it initializes the float32 result; in the
// per-group fold it would double the vector work that the tile stores already slow down.
constexpr int kSumSlotsPerGroup = 4;

inline void split_bf16(float v, uint16_t& hi, uint16_t& lo) {
  hi = f32_to_bf16(v);
  lo = f32_to_bf16(v - bf16_to_f32(hi));
}

// Parts of x: act_bits 16 with bf16 x, and act_bits 8 (integers up to 127), are exact in
// one bf16 part; float32 and float16 x are hi + lo, hi = bf16(x), lo = bf16(x - hi): the
// pair carries 16 significant bits (~2^-17 relative, float16 x exactly), and the two
// products with the same codes accumulate into the same tiles.
inline int x_parts(const QMatmulArgs& a) {
  return a.act_bits == kActBitsInt8 || a.x_dtype == DType::kBFloat16 ? 1 : 2;
}

// Rows 16*mt .. 16*mt + 15 of x into tiles, sums and steps.
void prep_x_tile(const QMatmulArgs& a, const XTiles& xt, int64_t mt) {
  const int64_t K = a.k, G = a.group_size, es = dtype_size(a.x_dtype);
  for (int r = 0; r < kTileRows; ++r) {
    const int64_t m = mt * kTileRows + r;
    float* dx = xt.dx ? xt.dx + m * xt.groups : nullptr;
    uint16_t* row[2];
    // Sum slots of this row, zero past the last group.
    auto sum_slot = [&](int64_t j) -> uint16_t& { return xt.sum_tile(mt, j / kTileK)[r * kTileK + j % kTileK]; };
    for (int64_t j = xt.groups * kSumSlotsPerGroup; j < xt.bias_steps * kTileK; ++j) sum_slot(j) = 0;
    if (m >= a.m) {
      for (int64_t s = 0; s < xt.steps; ++s)
        for (int p = 0; p < xt.parts; ++p)
          std::memset(xt.tile(mt, s, p) + r * kTileK, 0, kTileBytes);
      for (int64_t j = 0; j < xt.groups * kSumSlotsPerGroup; ++j) sum_slot(j) = 0;
      if (dx)
        for (int64_t g = 0; g < xt.groups; ++g) dx[g] = 0.0f;
      continue;
    }
    auto set_sum = [&](int64_t g, float v) {
      uint16_t hi, lo;
      split_bf16(v, hi, lo);
      for (int j = 0; j < kSumSlotsPerGroup; ++j) sum_slot(g * kSumSlotsPerGroup + j) = j % 2 ? lo : hi;
    };
    const char* src = static_cast<const char*>(a.x) + m * K * es;
    for (int64_t g = 0; g < xt.groups; ++g) {
      const int64_t k0 = g * G;
      if (a.act_bits == kActBitsInt8) {
        // act_quant.h's definition: v = nearbyint(x * (127 / amax)), dx = amax / 127.
        __m512 mx = _mm512_setzero_ps();
        for (int64_t k = k0; k < k0 + G; k += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(load16(src + k * es, a.x_dtype)));
        const float amax = _mm512_reduce_max_ps(mx);
        const __m512 inv = _mm512_set1_ps(act_inverse_step(amax, kActMaxInt8));
        __m512i vsum = _mm512_setzero_si512();
        for (int64_t k = k0; k < k0 + G; k += kTileK) {
          row[0] = xt.tile(mt, k / kTileK, 0) + r * kTileK;
          for (int h = 0; h < 2; ++h) {
            const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(load16(src + (k + 16 * h) * es, a.x_dtype), inv));
            vsum = _mm512_add_epi32(vsum, v);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(row[0] + 16 * h), to_bf16(_mm512_cvtepi32_ps(v)));
          }
        }
        dx[g] = amax / kActMaxInt8;
        set_sum(g, float(_mm512_reduce_add_epi32(vsum)) * dx[g]);  // |sum| <= 127 * 128: exact
        continue;
      }
      __m512 sum = _mm512_setzero_ps();
      for (int64_t k = k0; k < k0 + G; k += kTileK) {
        for (int p = 0; p < xt.parts; ++p) row[p] = xt.tile(mt, k / kTileK, p) + r * kTileK;
        for (int h = 0; h < 2; ++h) {
          const __m512 v = load16(src + (k + 16 * h) * es, a.x_dtype);
          sum = _mm512_add_ps(sum, v);
          const __m256i hi = to_bf16(v);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(row[0] + 16 * h), hi);
          if (xt.parts == 2)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(row[1] + 16 * h), to_bf16(_mm512_sub_ps(v, from_bf16(hi))));
        }
      }
      set_sum(g, _mm512_reduce_add_ps(sum));
    }
  }
}

// ---------------------------------------------------------------------------------------
// Code tiles. Tile (s, slice) holds, for 16 outputs n and the 32 inputs of step s, row p =
// the pair (k = 32s + 2p, 32s + 2p + 1) of each n as two bf16 in one dword (tdpbf16ps's
// VNNI layout). A plane byte holds exactly such a pair (low nibble k even, high nibble k
// odd), so a tile is a 16 x 16 byte transpose of 16 bytes of 16 rows followed by a
// per-byte widening; no permutation of x is needed.

// bf16 of 0..15, indexed by the low 5 bits of each 16-bit lane (vpermw).
inline __m512i bf16_of_nibble_table() {
  return _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,  //
                          0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100,
                          0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000);
}

// The 16 dwords of one tile row from byte p of 16 rows of plane 0 (and plane 1).
template <int BITS>
inline __m512i code_pairs(__m128i q, __m128i r, __m512i table) {
  const __m512i vq = _mm512_cvtepu8_epi32(q);
  if (BITS == fmt::kInt4Bits) {
    // Low nibble to bits 0..3, high nibble to bits 16..19, then a 16-entry lookup per lane.
    const __m512i t = _mm512_ternarylogic_epi32(_mm512_set1_epi32(0xF), vq, _mm512_slli_epi32(vq, 12), 0xCA);
    return _mm512_permutexvar_epi16(_mm512_and_si512(t, _mm512_set1_epi32(0x000F000F)), table);
  }
  // INT8 view: c = 16q + r for the even (low nibbles) and odd (high nibbles) input; the
  // bit selects below take the nibbles straight to their place in c.
  const __m512i vr = _mm512_cvtepu8_epi32(r), hi4 = _mm512_set1_epi32(0xF0);
  const __m512i e = _mm512_ternarylogic_epi32(hi4, _mm512_slli_epi32(vq, 4), vr, 0xCA);
  const __m512i o = _mm512_ternarylogic_epi32(hi4, vq, _mm512_srli_epi32(vr, 4), 0xCA);
  // Integers below 256 convert to float32 with zero low 16 bits: the bf16 is the top half.
  const __m512i fe = _mm512_srli_epi32(_mm512_castps_si512(_mm512_cvtepi32_ps(e)), 16);
  const __m512i fo = _mm512_castps_si512(_mm512_cvtepi32_ps(o));
  return _mm512_ternarylogic_epi32(_mm512_set1_epi32(int(0xFFFF0000u)), fo, fe, 0xCA);
}

// Code tiles of one 16-output slice for `steps` steps from plane word w0; rows[i] (and
// rows1[i]) point at output i's plane row (rows past N repeat row N - 1; their scales are
// zero). Tile s goes to out + s * stride.
template <int BITS>
void expand_codes(const uint32_t* const (&rows0)[kTileRows], const uint32_t* const (&rows1)[kTileRows], int64_t w0,
                  int64_t steps, uint16_t* out, int64_t stride) {
  const __m512i table = bf16_of_nibble_table();
  constexpr int kWordsPerStep = kTileK / fmt::kValuesPerWord;
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t w = w0 + s * kWordsPerStep;
    __m128i in[kTileRows], q[kTileRows], r[kTileRows];
    for (int i = 0; i < kTileRows; ++i) in[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows0[i] + w));
    transpose16x16(in, q);
    if (BITS == fmt::kInt8Bits) {
      for (int i = 0; i < kTileRows; ++i) in[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows1[i] + w));
      transpose16x16(in, r);
    }
    uint16_t* tile = out + s * stride;
    for (int p = 0; p < kTileRows; ++p)
      _mm512_store_si512(tile + p * kTileK, code_pairs<BITS>(q[p], BITS == fmt::kInt8Bits ? r[p] : q[p], table));
  }
}

// ---------------------------------------------------------------------------------------
// One task: outputs [n0, n0 + nb) for x rows [m0, m0 + mrows).

struct Ctx {
  const QMatmulArgs* a;
  XTiles xt;
  int64_t nb;          // outputs per task (a multiple of kBlockN)
  int64_t n_blocks;    // tasks along N
  int64_t mrows;       // x rows per task (a multiple of kBlockM; the last task's may end in a 16-row block)
  int64_t m_splits;    // tasks along M
};

// Per-task scratch, carved from one buffer.
struct TaskBuffers {
  uint16_t* bias;   // [nb / 16][bias_steps][512] bias tiles (b_hi / b_lo pairs)
  uint16_t* panel;  // [nb / 32][steps of the chunk][2][512] code tiles
  float* sv;        // [groups][nb] effective scales (0 past N)
  float* prod;      // [kMaxBatch][32 x 32] tile products of one block
  float* acc;       // [mrows][nb] float32 result
};

// One block's batch of group products, to be folded into acc.
struct Fold {
  float* acc;          // acc + block row * nb + block column
  const float* prod;   // [ng][32 x 32]
  const float* sv;     // sv + first group * nb + block column
  const float* dx;     // dx + first row * groups + first group (act_bits 8 only)
  int ng;              // groups in the batch, 1..kMaxBatch
  int rows;            // x rows of the block, 16 or 32
};

// acc[r] += sum over the batch's groups of s * T_g[r] (* dx[r, g]) for the block's rows:
// each acc row is loaded and stored once per batch.
template <int NG, bool ACT8>
void fold_rows(const Fold& u, int64_t nb, int64_t groups) {
  __m512 s[NG][2];
#pragma GCC unroll 4
  for (int g = 0; g < NG; ++g) {
    s[g][0] = _mm512_loadu_ps(u.sv + g * nb);
    s[g][1] = _mm512_loadu_ps(u.sv + g * nb + 16);
  }
  for (int r = 0; r < u.rows; ++r) {
    float* acc = u.acc + r * nb;
    __m512 y0 = _mm512_loadu_ps(acc), y1 = _mm512_loadu_ps(acc + 16);
#pragma GCC unroll 4
    for (int g = 0; g < NG; ++g) {
      const float* t = u.prod + g * kBlockFloats + r * kBlockN;
      if (ACT8) {
        const __m512 d = _mm512_set1_ps(u.dx[r * groups + g]);
        y0 = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_load_ps(t), s[g][0]), d, y0);
        y1 = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_load_ps(t + 16), s[g][1]), d, y1);
      } else {
        y0 = _mm512_fmadd_ps(_mm512_load_ps(t), s[g][0], y0);
        y1 = _mm512_fmadd_ps(_mm512_load_ps(t + 16), s[g][1], y1);
      }
    }
    _mm512_storeu_ps(acc, y0);
    _mm512_storeu_ps(acc + 16, y1);
  }
}

template <bool ACT8>
void fold(const Fold& u, int64_t nb, int64_t groups) {
  switch (u.ng) {
    case 1: return fold_rows<1, ACT8>(u, nb, groups);
    case 2: return fold_rows<2, ACT8>(u, nb, groups);
    case 3: return fold_rows<3, ACT8>(u, nb, groups);
    default: return fold_rows<4, ACT8>(u, nb, groups);
  }
}

// The products of x rows (16 * MT of them) and 32 outputs for ng consecutive groups of
// `steps` steps each, into prod[g] (rows of 32 floats). xa, xb: x tiles of rows 0..15 and
// 16..31 at the first step (P parts per step; xb unused when MT = 1); codes: 2 code tiles
// per step. Tiles 0, 1 hold x, 2, 3 codes, 4..7 the products. Kept free of ordinary
// stores (see run_task): out of line, so the caller's live values cannot make the
// compiler spill inside the group loop.
template <int P, int MT>
__attribute__((noinline)) void batch_products(const uint16_t* xa, const uint16_t* xb, const uint16_t* codes,
                                              int64_t steps, int ng, float* prod) {
  static_assert(MT == 1 || MT == 2, "blocks of 16 or 32 x rows");
  constexpr int ld = kBlockN * 4;  // bytes per row of a block
  for (int g = 0; g < ng; ++g, prod += kBlockFloats) {
    tile_zero<4>();
    tile_zero<5>();
    if (MT == 2) {
      tile_zero<6>();
      tile_zero<7>();
    }
    for (int64_t j = 0; j < steps; ++j, codes += 2 * kTileElems, xa += P * kTileElems, xb += P * kTileElems) {
      tile_load<2>(codes, kTileBytes);
      tile_load<3>(codes + kTileElems, kTileBytes);
      for (int p = 0; p < P; ++p) {
        tile_load<0>(xa + p * kTileElems, kTileBytes);
        if (MT == 2) tile_load<1>(xb + p * kTileElems, kTileBytes);
        tile_dp<4, 0, 2>();
        tile_dp<5, 0, 3>();
        if (MT == 2) {
          tile_dp<6, 1, 2>();
          tile_dp<7, 1, 3>();
        }
      }
    }
    tile_store<4>(prod, ld);
    tile_store<5>(prod + kTileRows, ld);
    if (MT == 2) {
      tile_store<6>(prod + kTileRows * kBlockN, ld);
      tile_store<7>(prod + kTileRows * kBlockN + kTileRows, ld);
    }
  }
}

// acc (rows of ld floats) = the bias half of y for the block: the products of the x rows'
// sum tiles (xa, xb as above) and the bias tiles of its two 16-output slices (b0, b1).
template <int MT>
void bias_block(const uint16_t* xa, const uint16_t* xb, const uint16_t* b0, const uint16_t* b1, int64_t steps,
                float* acc, int64_t ld) {
  tile_zero<4>();
  tile_zero<5>();
  if (MT == 2) {
    tile_zero<6>();
    tile_zero<7>();
  }
  for (int64_t j = 0; j < steps; ++j) {
    tile_load<0>(xa + j * kTileElems, kTileBytes);
    tile_load<2>(b0 + j * kTileElems, kTileBytes);
    tile_load<3>(b1 + j * kTileElems, kTileBytes);
    tile_dp<4, 0, 2>();
    tile_dp<5, 0, 3>();
    if (MT == 2) {
      tile_load<1>(xb + j * kTileElems, kTileBytes);
      tile_dp<6, 1, 2>();
      tile_dp<7, 1, 3>();
    }
  }
  const int ldb = int(ld * 4);
  tile_store<4>(acc, ldb);
  tile_store<5>(acc + kTileRows, ldb);
  if (MT == 2) {
    tile_store<6>(acc + kTileRows * ld, ldb);
    tile_store<7>(acc + kTileRows * ld + kTileRows, ldb);
  }
}

// The effective scales of outputs n0 .. n0 + nb - 1 for every group (sv [groups][nb], zero
// past N) and their bias tiles: tile (slice, step) row p, column i holds pair q = 16 * step
// + p of output 16 * slice + i, i.e. (b_hi, b_hi) of group q / 2 for even q and (b_lo, b_lo)
// for odd q (zero past the last group and past N). Vectorized along the groups of a row,
// with scatters, since one output's scales are contiguous.
template <int BITS>
void task_affine(const QMatmulArgs& a, int64_t n0, int64_t nb, int64_t bias_steps, float* sv, uint16_t* bias) {
  const int64_t groups = fmt::groups_per_row(a.k, a.group_size), es = dtype_size(a.scale_dtype);
  std::memset(bias, 0, size_t(nb * bias_steps * kTileK) * 2);
  // Dword offsets of group g's hi pair within the tiles of a slice, for g = 0..15 of a
  // 16-group run (two pairs per group, 16 pairs per tile).
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i pair_off = _mm512_add_epi32(_mm512_mullo_epi32(_mm512_srli_epi32(lane, 3), _mm512_set1_epi32(kTileFloats)),
                                            _mm512_slli_epi32(_mm512_and_si512(lane, _mm512_set1_epi32(7)), 5));
  const __m512i sv_off = _mm512_mullo_epi32(lane, _mm512_set1_epi32(int(nb)));
  uint32_t* bias32 = reinterpret_cast<uint32_t*>(bias);
  for (int64_t j = 0; j < nb; ++j) {
    const int64_t n = n0 + j;
    uint32_t* slice = bias32 + (j / kTileRows) * bias_steps * kTileFloats + j % kTileRows;
    for (int64_t g0 = 0; g0 < groups; g0 += 16) {
      const __mmask16 mask = groups - g0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (groups - g0)) - 1);
      __m512 sc = _mm512_setzero_ps(), bi = _mm512_setzero_ps();
      if (n < a.n) {
        sc = load16_masked(static_cast<const char*>(a.scales) + (n * groups + g0) * es, a.scale_dtype, mask);
        bi = load16_masked(static_cast<const char*>(a.biases) + (n * groups + g0) * es, a.scale_dtype, mask);
        if (BITS == fmt::kInt8Bits) {  // fmt::int8_scale / int8_bias, operation for operation
          const __m512 inv_div = _mm512_set1_ps(1.0f / fmt::kResidualDivisor);
          bi = _mm512_sub_ps(bi, _mm512_mul_ps(_mm512_mul_ps(sc, _mm512_set1_ps(fmt::kResidualCenter)), inv_div));
          sc = _mm512_mul_ps(sc, inv_div);
        }
      }
      _mm512_mask_i32scatter_ps(sv + g0 * nb + j, mask, sv_off, sc, 4);
      const __m512i hi = _mm512_cvtepu16_epi32(to_bf16(bi));
      const __m512i lo = _mm512_cvtepu16_epi32(to_bf16(_mm512_sub_ps(bi, from_bf16(to_bf16(bi)))));
      uint32_t* base = slice + (g0 / 8) * kTileFloats;  // 16 groups = 32 pairs = 2 tiles
      _mm512_mask_i32scatter_epi32(base, mask, pair_off, _mm512_or_si512(hi, _mm512_slli_epi32(hi, 16)), 4);
      _mm512_mask_i32scatter_epi32(base + kTileRows, mask, pair_off, _mm512_or_si512(lo, _mm512_slli_epi32(lo, 16)), 4);
    }
  }
}

template <int BITS, int P, bool ACT8>
void run_task(const Ctx& ctx, const TaskBuffers& tb, int64_t n0, int64_t m0, int64_t mrows) {
  const QMatmulArgs& a = *ctx.a;
  const XTiles& xt = ctx.xt;
  const int64_t nb = ctx.nb, G = a.group_size, groups = xt.groups;
  const int64_t words = fmt::words_per_row(a.k), steps_per_group = G / kTileK;

  task_affine<BITS>(a, n0, nb, xt.bias_steps, tb.sv, tb.bias);

  TileScope tiles;
  // The float32 result starts as the bias half of y. Blocks are 32 x rows, the last one
  // of a task 16 when M is (x is padded to whole tiles of 16 rows only).
  for (int64_t bc = 0; bc < nb / kBlockN; ++bc)
    for (int64_t bm = 0; bm < mrows; bm += kBlockM) {
      const int64_t mt = (m0 + bm) / kTileRows;
      const uint16_t* b0 = tb.bias + 2 * bc * xt.bias_steps * kTileElems;
      const uint16_t* b1 = b0 + xt.bias_steps * kTileElems;
      float* acc = tb.acc + bm * nb + bc * kBlockN;
      if (mrows - bm >= kBlockM)
        bias_block<2>(xt.sum_tile(mt, 0), xt.sum_tile(mt + 1, 0), b0, b1, xt.bias_steps, acc, nb);
      else
        bias_block<1>(xt.sum_tile(mt, 0), nullptr, b0, b1, xt.bias_steps, acc, nb);
    }

  for (int64_t k0 = 0; k0 < a.k; k0 += kChunkK) {
    const int64_t kc = imin(kChunkK, a.k - k0), csteps = kc / kTileK, cgroups = kc / G, g0 = k0 / G;
    // Code tiles of every 16-output slice (rows past N repeat row N - 1, scale 0).
    for (int64_t sl = 0; sl < nb / kTileRows; ++sl) {
      const uint32_t* r0[kTileRows];
      const uint32_t* r1[kTileRows];
      for (int i = 0; i < kTileRows; ++i) {
        const int64_t n = imin(n0 + sl * kTileRows + i, a.n - 1);
        r0[i] = a.plane0 + n * words;
        r1[i] = BITS == fmt::kInt8Bits ? a.plane1 + n * words : r0[i];
      }
      // Slice sl is tile (sl & 1) of block column sl / 2: [block col][step][2][tile].
      uint16_t* out = tb.panel + ((sl / 2) * csteps * 2 + (sl & 1)) * kTileElems;
      expand_codes<BITS>(r0, r1, k0 / fmt::kValuesPerWord, csteps, out, 2 * kTileElems);
    }
    // Blocks: for each 32-output column of the panel (its codes stay in L1), every 32-row
    // block of x; per block, the tile products of a batch of up to kMaxBatch groups, then
    // their fold into acc. No ordinary store may sit between one group's tile stores and
    // the next group's tile loads: measured here, a single one (even a register spill)
    // halves the tile throughput, and interleaving the fold of the previous block between
    // the groups (to overlap vector and tile work) was slower than folding after them.
    for (int64_t bc = 0; bc < nb / kBlockN; ++bc) {
      const uint16_t* codes = tb.panel + bc * csteps * 2 * kTileElems;
      for (int64_t bm = 0; bm < mrows; bm += kBlockM) {
        const int64_t mt = (m0 + bm) / kTileRows;
        for (int64_t gb = 0; gb < cgroups; gb += kMaxBatch) {
          const int ng = int(imin(kMaxBatch, cgroups - gb));
          const int64_t s0 = gb * steps_per_group;  // first step of the batch within the chunk
          const uint16_t* xa = xt.tile(mt, k0 / kTileK + s0, 0);
          const int rows = int(imin(kBlockM, mrows - bm));
          if (rows == kBlockM)
            batch_products<P, 2>(xa, xt.tile(mt + 1, k0 / kTileK + s0, 0), codes + s0 * 2 * kTileElems,
                                 steps_per_group, ng, tb.prod);
          else
            batch_products<P, 1>(xa, xa, codes + s0 * 2 * kTileElems, steps_per_group, ng, tb.prod);
          Fold f;
          f.acc = tb.acc + bm * nb + bc * kBlockN;
          f.prod = tb.prod;
          f.sv = tb.sv + (g0 + gb) * nb + bc * kBlockN;
          f.dx = ACT8 ? xt.dx + (m0 + bm) * groups + g0 + gb : nullptr;
          f.ng = ng;
          f.rows = rows;
          fold<ACT8>(f, nb, groups);
        }
      }
    }
  }

  const int64_t cols = imin(nb, a.n - n0), ex = dtype_size(a.x_dtype);
  for (int64_t m = m0; m < imin(m0 + mrows, a.m); ++m) {
    const float* src = tb.acc + (m - m0) * nb;
    char* dst = static_cast<char*>(a.y) + (m * a.n + n0) * ex;
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 mask = cols - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (cols - j)) - 1);
      store16(dst + j * ex, a.x_dtype, _mm512_loadu_ps(src + j), mask);
    }
  }
}

template <int BITS, int P, bool ACT8>
Status gemm(const QMatmulArgs& a, ThreadPool& pool, Ctx& ctx) {
  bool oom = false;
  const size_t panel_bytes = size_t(ctx.nb * kChunkK) * 2, vec_bytes = size_t(ctx.xt.groups * ctx.nb) * 4;
  const size_t prod_bytes = size_t(kMaxBatch * kBlockFloats) * 4;
  const size_t bias_bytes = size_t(ctx.nb * ctx.xt.bias_steps * kTileK) * 2;
  pool.parallel_for(ctx.n_blocks * ctx.m_splits, [&](int64_t task, int) {
    const int64_t n0 = (task / ctx.m_splits) * ctx.nb, m0 = (task % ctx.m_splits) * ctx.mrows;
    const int64_t mrows = imin(ctx.mrows, ctx.xt.m_pad - m0);
    char* buf = static_cast<char*>(thread_scratch(kScratchPanel, panel_bytes + vec_bytes + prod_bytes + bias_bytes));
    float* acc = static_cast<float*>(thread_scratch(kScratchAcc, size_t(ctx.mrows * ctx.nb) * 4));
    if (!buf || !acc) {
      oom = true;
      return;
    }
    TaskBuffers tb;
    tb.panel = reinterpret_cast<uint16_t*>(buf);
    tb.prod = reinterpret_cast<float*>(buf + panel_bytes);
    tb.sv = reinterpret_cast<float*>(buf + panel_bytes + prod_bytes);
    tb.bias = reinterpret_cast<uint16_t*>(buf + panel_bytes + prod_bytes + vec_bytes);
    tb.acc = acc;
    run_task<BITS, P, ACT8>(ctx, tb, n0, m0, mrows);
  });
  return oom ? Status::kOutOfMemory : Status::kOk;
}

// bits -> x parts -> activation precision: one nested chain; the glue validated each value.
template <int BITS>
Status gemm_parts(const QMatmulArgs& a, ThreadPool& pool, Ctx& ctx) {
  if (a.act_bits == kActBitsInt8) return gemm<BITS, 1, true>(a, pool, ctx);
  return ctx.xt.parts == 1 ? gemm<BITS, 1, false>(a, pool, ctx) : gemm<BITS, 2, false>(a, pool, ctx);
}

// ---------------------------------------------------------------------------------------
// bf16 x: dense tile GEMM on dequantized weight panels (see the contract at the top).
//
// Data flow per task (outputs n0 .. n0 + nb - 1, x rows m0 .. m0 + mrows - 1):
//   for each panel of ks inputs (all of K unless the panel would pass kPanelBytes):
//     dequantize the nb x ks weights once, straight into tile layout (dense_dequant);
//     for each 32-row block of x:
//       for each chunk of kKC inputs:          its x (32 rows x kKC: 16 KB) stays in L1
//         for each 32-output block of the panel: one dense_block, C from / to acc
//       round the block's 32 x nb results to bf16 into y (last panel only).
// Tile arithmetic per 32 x 32 x 32 step (4 tdpbf16ps, 4 tile loads), measured on one core:
// 17.6 ns with no loads (the tdp throughput, 16 cycles each), 19.7-21.7 ns with the 4 KB of
// operands in L1 (tile loads pipeline at 8 cycles but each 1 KB one must land before its
// tdp), 26-30 ns with both operands streaming from L2. Storing the 4 accumulator tiles
// ends the pipeline: ~25-45 ns per block while the operands come from L1 or a short L2
// stream, but ~300 ns when a block streams more than L1 holds (a whole K = 1024 of both
// operands): one store per 32-step block then costs a quarter of the time. Hence blocks of
// kKC = 256 inputs with the x chunk in L1, reused by every output block of the panel, and
// only the weights streaming from L2; the accumulators go through a float32 row buffer
// between chunks (tile load + store: ~10% of an 8-step block). At 3072 x 1024, M = 512,
// one core, blocks of 128 / 256 / 512 / 1024 inputs took 79 / 76 / 92 / 95 Mcycles.
// (On 2 threads, blocks of 4 / 8 / 12 / 16 steps: 8 fastest by 3-15%.) Software prefetch of
// the next block's tiles (into L1 or L2) slowed every variant tried by 10-25%: the loads
// compete with the tile loads for the load ports. Dequantizing the next panel between tile
// blocks, to overlap vector and tile work, overlapped nothing (256 tiles: 10 us interleaved,
// 8 us on their own); packing each x chunk within the tasks instead of once per call
// measured the same as the pass over x below.

// Dequantized panel bytes (outputs x inputs x 2): 1 MB sits in the 2 MB L2 next to the x
// chunks and the accumulators. (1024 x 3072, M = 2048: panels of 1 / 2 / 4 MB ran at 1402 /
// 995 / 785 GFLOP/s on one core.)
constexpr int64_t kPanelBytes = 1 << 20;
static_assert(kKC % fmt::kMaxGroupSize == 0 && kPanelBytes % (kKC * 2 * kBlockN) == 0, "whole chunks");

struct DenseCtx : PanelSplit {
  const QMatmulArgs* a;
  const uint16_t* xt;  // x tiles [m_pad / 32][K / 32][2][16][32] bf16, rows past M zero
  int64_t steps;       // K / 32
};

// Rows 32 * mb .. 32 * mb + 31 of bf16 x into tile pairs.
void dense_prep_x(const QMatmulArgs& a, uint16_t* xt, int64_t steps, int64_t mb) {
  const uint16_t* x = static_cast<const uint16_t*>(a.x);
  uint16_t* block = xt + mb * steps * kPairElems;
  for (int r = 0; r < kBlockM; ++r) {
    const int64_t m = mb * kBlockM + r;
    uint16_t* dst = block + (r / kTileRows) * kTileElems + (r % kTileRows) * kTileK;
    if (m >= a.m) {
      for (int64_t s = 0; s < steps; ++s) _mm512_store_si512(dst + s * kPairElems, _mm512_setzero_si512());
      continue;
    }
    const uint16_t* src = x + m * a.k;
    for (int64_t s = 0; s < steps; ++s) _mm512_store_si512(dst + s * kPairElems, _mm512_loadu_si512(src + s * kTileK));
  }
}

// One block of 16 * MT x rows by 16 * NT outputs over `steps` steps, accumulated in the
// tiles: c = cin (or 0) + x w^T, stored to cout. x: the block's tile pairs from the first
// step on; w: the weights' tile pairs; cin, cout: rows of ld floats. Tiles 0, 1 hold x,
// 2, 3 weights, 4..7 the block.
template <int MT, int NT>
__attribute__((noinline)) void dense_block(const uint16_t* x, const uint16_t* w, int64_t steps, const float* cin,
                                           float* cout, int64_t ld) {
  static_assert((MT == 1 || MT == 2) && (NT == 1 || NT == 2), "blocks of 16 or 32 rows and outputs");
  const int ldb = int(ld * 4);
  if (cin) {
    tile_load<4>(cin, ldb);
    if (NT == 2) tile_load<5>(cin + kTileRows, ldb);
    if (MT == 2) tile_load<6>(cin + kTileRows * ld, ldb);
    if (MT == 2 && NT == 2) tile_load<7>(cin + kTileRows * ld + kTileRows, ldb);
  } else {
    tile_zero<4>();
    if (NT == 2) tile_zero<5>();
    if (MT == 2) tile_zero<6>();
    if (MT == 2 && NT == 2) tile_zero<7>();
  }
  for (int64_t s = 0; s < steps; ++s, x += kPairElems, w += kPairElems) {
    tile_load<0>(x, kTileBytes);
    tile_load<2>(w, kTileBytes);
    tile_dp<4, 0, 2>();
    if (NT == 2) {
      tile_load<3>(w + kTileElems, kTileBytes);
      tile_dp<5, 0, 3>();
    }
    if (MT == 2) {
      tile_load<1>(x + kTileElems, kTileBytes);
      tile_dp<6, 1, 2>();
      if (NT == 2) tile_dp<7, 1, 3>();
    }
  }
  tile_store<4>(cout, ldb);
  if (NT == 2) tile_store<5>(cout + kTileRows, ldb);
  if (MT == 2) tile_store<6>(cout + kTileRows * ld, ldb);
  if (MT == 2 && NT == 2) tile_store<7>(cout + kTileRows * ld + kTileRows, ldb);
}

using DenseBlockFn = void (*)(const uint16_t*, const uint16_t*, int64_t, const float*, float*, int64_t);
// [MT - 1][NT - 1]
constexpr DenseBlockFn kDenseBlocks[2][2] = {{dense_block<1, 1>, dense_block<1, 2>},
                                            {dense_block<2, 1>, dense_block<2, 2>}};

// One task: outputs [n0, n0 + nb) for x rows [m0, m0 + mrows). panel: nb x ks bf16; sb:
// [2 * ks / 32][nb] floats; acc: the float32 results, [32][nb] when one panel covers K,
// else [mrows][nb] (kept across panels).
template <int BITS>
void dense_task(const DenseCtx& ctx, uint16_t* panel, float* sb, float* acc, int64_t n0, int64_t m0,
                int64_t mrows) {
  const QMatmulArgs& a = *ctx.a;
  const int64_t nb = ctx.nb;
  const int64_t ncols = imin(nb, a.n - n0), nbv = round_up(ncols, kTileRows);  // outputs with weights
  const int64_t mend = imin(m0 + mrows, a.m);
  TileScope tiles;
  for (int64_t k0 = 0; k0 < a.k; k0 += ctx.ks) {
    const int64_t kl = imin(ctx.ks, a.k - k0);
    const bool first = k0 == 0, last = k0 + kl == a.k;
    PanelLayout layout{panel, kl / kTileK, (nbv + kBlockN - 1) / kBlockN};
    dequant_panel<BITS>(a, n0, nb, nbv, k0, kl, sb, layout);
    for (int64_t m = m0; m < mend; m += kBlockM) {
      const int mt = mend - m > kTileRows ? 2 : 1;
      float* arow = ctx.ks == a.k ? acc : acc + (m - m0) * nb;
      const uint16_t* x = ctx.xt + ((m / kBlockM) * ctx.steps + k0 / kTileK) * kPairElems;
      for (int64_t c0 = 0; c0 < layout.steps; c0 += kKCSteps) {
        const int64_t cs = imin(kKCSteps, layout.steps - c0);
        const bool zero = first && c0 == 0;
        for (int64_t j = 0; j < nbv; j += kBlockN) {
          const int nt = nbv - j > kTileRows ? 2 : 1;
          kDenseBlocks[mt - 1][nt - 1](x + c0 * kPairElems, layout.block(j / kBlockN, c0), cs,
                                       zero ? nullptr : arow + j, arow + j, nb);
        }
      }
      if (last) dense_store_y(a, arow, nb, m, imin(kBlockM, mend - m), n0, ncols);
    }
  }
}

template <int BITS>
Status dense_gemm(const QMatmulArgs& a, ThreadPool& pool) {
  DenseCtx ctx;
  ctx.a = &a;
  ctx.steps = a.k / kTileK;
  const int64_t m_pad = round_up(a.m, kBlockM);
  uint16_t* xt = static_cast<uint16_t*>(thread_scratch(kScratchX, size_t(m_pad * a.k) * 2));
  if (!xt) return Status::kOutOfMemory;
  ctx.xt = xt;
  pool.parallel_for(m_pad / kBlockM, [&](int64_t mb, int) { dense_prep_x(a, xt, ctx.steps, mb); });

  static_cast<PanelSplit&>(ctx) =
      split_panels(m_pad, a.n, a.k, m_pad * a.k * 2, pool.num_threads(), kBlockN, kBlockM, kKC, kPanelBytes, 2);
  const size_t panel_bytes = size_t(round_up(ctx.nb, kBlockN) * ctx.ks) * 2;
  const size_t sb_bytes = size_t(2 * (ctx.ks / fmt::kMinGroupSize) * ctx.nb) * 4;
  const size_t acc_bytes = size_t((ctx.ks < a.k ? ctx.mrows : kBlockM) * ctx.nb) * 4;
  return run_panel_tasks(pool, ctx, m_pad, panel_bytes + sb_bytes, acc_bytes,
                         [&](int64_t n0, int64_t m0, int64_t rows, char* buf, float* acc) {
                           dense_task<BITS>(ctx, reinterpret_cast<uint16_t*>(buf),
                                            reinterpret_cast<float*>(buf + panel_bytes), acc, n0, m0, rows);
                         });
}

}  // namespace

bool amx_built() { return true; }

Status qmatmul_amx(const QMatmulArgs& a, ThreadPool& pool) {
  if (a.m <= kAmxGemvMaxM) return qmatmul_avx512(a, pool);
  if (!fmt::is_supported_group_size(a.group_size) || !(a.bits == fmt::kInt4Bits || a.bits == fmt::kInt8Bits))
    return Status::kInvalidArgument;
  if (a.x_dtype == DType::kBFloat16 && a.act_bits != kActBitsInt8)
    return a.bits == fmt::kInt8Bits ? dense_gemm<fmt::kInt8Bits>(a, pool) : dense_gemm<fmt::kInt4Bits>(a, pool);

  Ctx ctx;
  ctx.a = &a;
  XTiles& xt = ctx.xt;
  xt.steps = a.k / kTileK;
  xt.parts = x_parts(a);
  xt.groups = fmt::groups_per_row(a.k, a.group_size);
  xt.bias_steps = (xt.groups * kSumSlotsPerGroup + kTileK - 1) / kTileK;
  xt.m_pad = round_up(a.m, kTileRows);
  char* xbuf = static_cast<char*>(thread_scratch(kScratchX, xt.bytes()));
  if (!xbuf) return Status::kOutOfMemory;
  xt.tiles = reinterpret_cast<uint16_t*>(xbuf);
  xt.sums = reinterpret_cast<uint16_t*>(xbuf + xt.tile_bytes());
  xt.dx = a.act_bits == kActBitsInt8 ? reinterpret_cast<float*>(xbuf + xt.tile_bytes() + xt.sum_bytes()) : nullptr;
  pool.parallel_for(xt.m_pad / kTileRows, [&](int64_t mt, int) { prep_x_tile(a, xt, mt); });

  // Tasks: 128-output panels while there are at least two per thread, else narrower ones;
  // x rows split into kTaskRows pieces, and further when there are still fewer tasks than
  // threads (every piece of a panel expands its codes again, so only then).
  const int64_t T = pool.num_threads();
  ctx.nb = kPanelN;
  // Narrower panels while the threads would get unequal shares (at most 10% idle) or fewer than
  // two panels each.
  auto uneven = [&](int64_t nb) {
    const int64_t blocks = (a.n + nb - 1) / nb;
    return blocks < 2 * T || double((blocks + T - 1) / T * T) * nb > 1.1 * double(a.n);
  };
  while (ctx.nb > kBlockN && uneven(ctx.nb)) ctx.nb /= 2;
  ctx.n_blocks = (a.n + ctx.nb - 1) / ctx.nb;
  ctx.m_splits = (xt.m_pad + kTaskRows - 1) / kTaskRows;
  if (ctx.n_blocks * ctx.m_splits < T)
    ctx.m_splits = imin((xt.m_pad + kBlockM - 1) / kBlockM, (T + ctx.n_blocks - 1) / ctx.n_blocks);
  ctx.mrows = round_up((xt.m_pad + ctx.m_splits - 1) / ctx.m_splits, kBlockM);
  ctx.m_splits = (xt.m_pad + ctx.mrows - 1) / ctx.mrows;

  return a.bits == fmt::kInt8Bits ? gemm_parts<fmt::kInt8Bits>(a, pool, ctx) : gemm_parts<fmt::kInt4Bits>(a, pool, ctx);
}

#endif  // BITSWITCH_HAVE_AMX

}  // namespace cpu
}  // namespace bitswitch

#if defined(BITSWITCH_HAVE_AMX)
// Attention: prefill on the tiles (sharing TileScope above), decode on the AVX-512 kernel.
#include "amx_attention.h"

namespace bitswitch {
namespace cpu {
Status attention_amx(const AttentionArgs& a, ThreadPool& pool) { return attention_prefill_amx(a, pool); }
}  // namespace cpu
}  // namespace bitswitch
#endif
