// qmatmul for prefill-sized M on VNNI CPUs: int8 activations times the weights' integer
// codes with vpdpbusd, integer sums per group, the affine map per group in float32. The
// driver here is shared by the AVX-512 kernels (avx512_int8_gemm.h: 16 outputs a register)
// and the AVX-VNNI ones (avx_vnni.cpp: 8 outputs a register); each supplies a `Kern`
// traits struct with its register tile, its packers and its micro-kernel.
//
// The contract is the GEMV's (x86_common.h, act_quant.h): x is quantized per group with
// the same float32 operations as every other kernel, v = round(x / dx), and y is
// float-grade on those values. At act_bits 8, v is one int8; at act_bits 16, v is a 15-bit
// integer split as v = 256 hi + lo into two int8 halves, each multiplied by the codes, and
// the two integer sums combined exactly. With w = s*c + b (c the INT4 code 0..15, or the
// INT8 view's 16q + r 0..255 with s and b as format.h maps them):
//     y[m, n] = sum_g  dx[m, g] * s[n, g] * ( sum_{k in g} c[n, k] v[m, k] )
//                    + b[n, g] * xsum[m, g]
// with xsum the group's sum of v * dx (act_bits 8) or of x itself (act_bits 16). The inner
// sums are exact in int32 (|c v| <= 255 * 32767, at most 128 of them), so the only
// roundings are the float32 fold per group, as in the GEMV: results agree with it to
// float32 rounding, whatever M.
//
// vpdpbusd multiplies unsigned bytes (the codes) by signed bytes (x) and adds each lane's
// four products into int32: twice the multiply-adds per instruction of vdpbf16ps and four
// times a float32 FMA's. Per group the integer sums are folded into float32 (a convert and
// two FMAs per register of outputs and x row). act_bits 16 doubles the dot products (hi and
// lo halves) but not the fold.
//
// Layout. The weights of a call are packed once per task into a panel of bytes: per block
// of kBlockN outputs (two slices of one register each), one "step" of 4 inputs is
// kBlockN * 4 bytes, slice 0's dwords then slice 1's, dword o of a slice holding the codes
// of output o at those 4 inputs, i.e. exactly vpdpbusd's unsigned operand. A block's steps
// are consecutive, so a block is one sequential stream. Four consecutive int8 x values are
// one dword, broadcast to every lane. x is quantized once per call into [M][K] int8 (and
// [M][K] lo halves) with its per-group dx and xsum.
//
// Data flow per task (outputs n0 .. n0 + nb - 1, x rows m0 .. m0 + mrows - 1), as in the
// bf16 dense GEMMs (bf16_panels.h):
//   for each panel of ks inputs (all of K unless the panel would pass kPanelBytes):
//     pack the nb x ks codes, and the groups' scales and biases;
//     for each block of MR x rows:
//       for each chunk of kKC inputs:      the rows' chunk (MR x 256 bytes) stays in L1
//         for each kBlockN-output block:   MR x kBlockN int32 sums and as many float32
//                                          sums in registers, the block's chunk from L2
//       convert the block's results to x's dtype into y (last panel only).
//
// struct Kern {
//   static constexpr int kSlice;                      // outputs per register of sums
//   static constexpr int kBlockN = 2 * kSlice;        // outputs per block
//   static constexpr int64_t kStepBytes = kBlockN * kQuad;  // one 4-input step of a block
//   template <bool LO> static constexpr int mr();     // x rows per register block
//   template <int BITS>                               // codes of outputs [n0, n0 + kSlice)
//   static void pack_slice(a, n0, k0, kl, dst, half); // into slice `half` of a block's steps
//   template <int BITS>                               // scales / biases, see pack_affine below
//   static void pack_affine(a, n0, nbv, g0, groups, sb);
//   template <int MR, int G, bool LO>                 // c[MR x kBlockN] (+)= a block's groups
//   static void block(x, ldx, w, groups, sb, ldsb, dx, xs, ldg, c, ldc, zero);
// };
//
// Include after x86_common.h's unit flags are set (x86_qmatmul.h may come first).
#pragma once

#include <immintrin.h>

#include <array>
#include <cstring>
#include <utility>

#include "panel_tasks.h"
#include "x86_common.h"

namespace bitswitch {
namespace cpu {
namespace {
namespace i8gemm {

constexpr int kQuad = 4;  // inputs per vpdpbusd lane
// Inputs per chunk: a block's chunk (kBlockN x 256 bytes) is read from L2 once per block
// of x rows while the rows' chunk stays in L1.
constexpr int64_t kKC = 256;
// Packed panel bytes: half of a Zen 4 / 5 L2 (as the bf16 GEMMs' panels).
constexpr int64_t kPanelBytes = 512 << 10;
// Each packer prefetches a weight row's next line this many rows ahead (the next slices'
// rows): at M = 16, where packing is most of a call, 9728 x 2560 INT4 took 1.3-1.4 ms
// without and 1.2-1.3 with it on the AVX-512 kernels (32 rows ahead: in between), with no
// change at M = 512.
constexpr int64_t kPackPrefetchRows = 16;

static_assert(kKC % fmt::kMaxGroupSize == 0, "a chunk holds whole groups");
static_assert(fmt::kMinGroupSize % 32 == 0, "the packers pack whole 32-input units");

// For a packer reading byte `off` of weight row n's planes at input k: prefetches the same
// bytes kPackPrefetchRows rows further, once per 128 inputs (one line of a plane).
template <int BITS>
inline void prefetch_ahead(const QMatmulArgs& a, int64_t n, int64_t k, int64_t off, int64_t row_bytes) {
  if (n + kPackPrefetchRows < a.n && (k & 127) == 0) {
    _mm_prefetch(reinterpret_cast<const char*>(a.plane0) + off + kPackPrefetchRows * row_bytes, _MM_HINT_T0);
    if (BITS == fmt::kInt8Bits)
      _mm_prefetch(reinterpret_cast<const char*>(a.plane1) + off + kPackPrefetchRows * row_bytes, _MM_HINT_T0);
  }
}

// The INT8 view's affine map of 8 outputs' scales and biases (format.h: s / 16 and
// b - 7.5 * s / 16, the same float32 operations).
template <int BITS>
inline void view_affine8(__m256& s, __m256& b) {
  if (BITS == fmt::kInt8Bits) {
    const __m256 inv = _mm256_set1_ps(1.0f / float(fmt::kResidualDivisor));
    b = _mm256_sub_ps(b, _mm256_mul_ps(_mm256_mul_ps(s, _mm256_set1_ps(fmt::kResidualCenter)), inv));
    s = _mm256_mul_ps(s, inv);
  }
}

using BlockFn = void (*)(const int8_t*, int64_t, const uint8_t*, int64_t, const float*, int64_t, const float*,
                         const float*, int64_t, float*, int64_t, bool);

template <class Kern, int G, bool LO, int... R>
constexpr auto make_blocks(std::integer_sequence<int, R...>) {
  return std::array<BlockFn, sizeof...(R)>{&Kern::template block<R + 1, G, LO>...};
}
// kBlocks<Kern, G, LO>[r - 1]: blocks of r rows (the last block of x may be short).
template <class Kern, int G, bool LO>
constexpr auto kBlocks = make_blocks<Kern, G, LO>(std::make_integer_sequence<int, Kern::template mr<LO>()>{});

// x quantized once per call: row m's codes at q + m * k (act_bits 8), or its hi halves at
// q + m * 2k and lo halves k further (act_bits 16); its groups' dx and xsum at dx / xs + m * groups.
struct XInt8 {
  int8_t* q;
  float* dx;
  float* xs;
  int64_t groups;
};

// One row of x (k inputs of type t) quantized per group of g with the float32 operations
// of every other kernel (a multiply by 1/dx, round to nearest even): at act_bits 8 those of
// x_row_f32 and fake_quantize_int8, xs the sum of the values v * dx; at act_bits 16 (LO)
// those of prep_x_row, v = 256 hi + lo split into two int8 halves, xs the sum of x itself.
template <bool LO>
inline void quantize_row(const void* x, DType t, int64_t k, int g, int8_t* q, float* dx, float* xs) {
  const char* src = static_cast<const char*>(x);
  const int64_t es = dtype_size(t);
  const float qmax = LO ? kActMaxExact : kActMaxInt8;
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int64_t g0 = 0; g0 < k; g0 += g) {
    __m256 mx = _mm256_setzero_ps(), xsum = _mm256_setzero_ps();
    for (int j = 0; j < g; j += 8) {
      const __m256 v = load8(src + (g0 + j) * es, t);
      mx = _mm256_max_ps(mx, _mm256_and_ps(v, absmask));
      if (LO) xsum = _mm256_add_ps(xsum, v);
    }
    const float amax = hmax(mx);
    const __m256 inv = _mm256_set1_ps(act_inverse_step(amax, qmax));
    __m256i vsum = _mm256_setzero_si256();
    for (int j = 0; j < g; j += 32) {
      __m256i v[4], lo[4];
      for (int u = 0; u < 4; ++u) {
        v[u] = _mm256_cvtps_epi32(_mm256_mul_ps(load8(src + (g0 + j + 8 * u) * es, t), inv));
        if (LO) {
          const __m256i hi = _mm256_srai_epi32(_mm256_add_epi32(v[u], _mm256_set1_epi32(128)), 8);
          lo[u] = _mm256_sub_epi32(v[u], _mm256_slli_epi32(hi, 8));
          v[u] = hi;
        } else {
          vsum = _mm256_add_epi32(vsum, v[u]);
        }
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + g0 + j), pack_i32x32_to_i8(v[0], v[1], v[2], v[3]));
      if (LO)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k + g0 + j), pack_i32x32_to_i8(lo[0], lo[1], lo[2], lo[3]));
    }
    const float step = amax / qmax;
    dx[g0 / g] = step;
    xs[g0 / g] = LO ? hsum(xsum) : hsum(_mm256_cvtepi32_ps(vsum)) * step;  // exact int sum: |sum| < 2^24
  }
}

struct Ctx : PanelSplit {
  const QMatmulArgs* a;
  XInt8 x;
};

// float32 rows of c (ldc apart) into y rows [m, m + rows), outputs [n, n + cols).
inline void store_rows(const QMatmulArgs& a, const float* c, int64_t ldc, int64_t m, int64_t rows, int64_t n,
                       int64_t cols) {
  const int64_t es = dtype_size(a.x_dtype);
  for (int64_t r = 0; r < rows; ++r) {
    char* dst = static_cast<char*>(a.y) + ((m + r) * a.n + n) * es;
    const float* src = c + r * ldc;
    int64_t j = 0;
    for (; j + 8 <= cols; j += 8) store8(dst + j * es, a.x_dtype, _mm256_loadu_ps(src + j));
    for (; j < cols; ++j) store_f32(dst, a.x_dtype, j, src[j]);
  }
}

// One task: outputs [n0, n0 + nb) for x rows [m0, m0 + mrows). panel: nbv x ks bytes;
// sb: 2 * nbv floats per group of the panel (Kern::pack_affine: group g's scales at
// sb + g * 2 * nbv, its biases nbv further); acc: the float32 sums, [MR][nb] when one panel
// covers K, else [mrows][nb] (kept across panels).
template <class Kern, int BITS, int G, bool LO>
void task(const Ctx& ctx, uint8_t* panel, float* sb, float* acc, int64_t n0, int64_t m0, int64_t mrows) {
  constexpr int kBN = Kern::kBlockN, kRows = Kern::template mr<LO>();
  constexpr int64_t kSB = Kern::kStepBytes;
  const QMatmulArgs& a = *ctx.a;
  const XInt8& xq = ctx.x;
  const int64_t nb = ctx.nb;
  const int64_t ncols = imin(nb, a.n - n0), nbv = round_up(ncols, kBN);  // whole blocks
  const int64_t mend = imin(m0 + mrows, a.m), ldx = LO ? 2 * a.k : a.k;
  for (int64_t k0 = 0; k0 < a.k; k0 += ctx.ks) {
    const int64_t kl = imin(ctx.ks, a.k - k0);
    const bool first = k0 == 0, last = k0 + kl == a.k;
    const int64_t block_bytes = kl / kQuad * kSB;
    for (int64_t j = 0; j < nbv; j += kBN) {
      Kern::template pack_slice<BITS>(a, n0 + j, k0, kl, panel + (j / kBN) * block_bytes, 0);
      Kern::template pack_slice<BITS>(a, n0 + j + Kern::kSlice, k0, kl, panel + (j / kBN) * block_bytes, 1);
    }
    Kern::template pack_affine<BITS>(a, n0, nbv, k0 / G, kl / G, sb);
    for (int64_t m = m0; m < mend; m += kRows) {
      const int64_t rows = imin(kRows, mend - m);
      float* arow = ctx.ks == a.k ? acc : acc + (m - m0) * nb;
      const BlockFn fn = kBlocks<Kern, G, LO>[rows - 1];
      for (int64_t c0 = 0; c0 < kl; c0 += kKC) {
        const int64_t cl = imin(kKC, kl - c0), g = (k0 + c0) / G;
        const int8_t* xc = xq.q + m * ldx + k0 + c0;
        for (int64_t j = 0; j < nbv; j += kBN)
          fn(xc, ldx, panel + (j / kBN) * block_bytes + c0 / kQuad * kSB, cl / G, sb + (c0 / G) * 2 * nbv + j,
             2 * nbv, xq.dx + m * xq.groups + g, xq.xs + m * xq.groups + g, xq.groups, arow + j, nb,
             first && c0 == 0);
      }
      if (last) store_rows(a, arow, nb, m, rows, n0, ncols);
    }
  }
}

template <class Kern, int BITS, int G, bool LO>
Status gemm(const QMatmulArgs& a, ThreadPool& pool) {
  constexpr int kRows = Kern::template mr<LO>();
  Ctx ctx;
  ctx.a = &a;
  // x quantized once: [M][K] codes, then [M][groups] dx and xsum.
  ctx.x.groups = a.k / G;
  const size_t qbytes = size_t(round_up(a.m * a.k * (LO ? 2 : 1), 64)), fbytes = size_t(a.m * ctx.x.groups) * 4;
  char* xbuf = static_cast<char*>(thread_scratch(kScratchX, qbytes + 2 * fbytes));
  if (!xbuf) return Status::kOutOfMemory;
  ctx.x.q = reinterpret_cast<int8_t*>(xbuf);
  ctx.x.dx = reinterpret_cast<float*>(xbuf + qbytes);
  ctx.x.xs = reinterpret_cast<float*>(xbuf + qbytes + fbytes);
  const int64_t es = dtype_size(a.x_dtype);
  pool.parallel_for(a.m, [&](int64_t m, int) {
    quantize_row<LO>(static_cast<const char*>(a.x) + m * a.k * es, a.x_dtype, a.k, G, ctx.x.q + m * a.k * (LO ? 2 : 1),
                     ctx.x.dx + m * ctx.x.groups, ctx.x.xs + m * ctx.x.groups);
  });

  static_cast<PanelSplit&>(ctx) = split_panels(a.m, a.n, a.k, a.m * a.k * (LO ? 2 : 1), pool.num_threads(),
                                                Kern::kBlockN, kRows, kKC, kPanelBytes, 1);
  const size_t panel_bytes = size_t(ctx.nb * ctx.ks);
  const size_t sb_bytes = size_t(2 * (ctx.ks / G) * ctx.nb) * 4;
  const size_t acc_bytes = size_t((ctx.ks < a.k ? ctx.mrows : kRows) * ctx.nb) * 4;
  return run_panel_tasks(pool, ctx, a.m, panel_bytes + sb_bytes, acc_bytes,
                         [&](int64_t n0, int64_t m0, int64_t rows, char* buf, float* acc) {
                           task<Kern, BITS, G, LO>(ctx, reinterpret_cast<uint8_t*>(buf),
                                                   reinterpret_cast<float*>(buf + panel_bytes), acc, n0, m0, rows);
                         });
}

template <class Kern, int BITS, bool LO>
Status gemm_g(const QMatmulArgs& a, ThreadPool& pool) {
  switch (a.group_size) {
    case fmt::kGroupSize32: return gemm<Kern, BITS, fmt::kGroupSize32, LO>(a, pool);
    case fmt::kGroupSize64: return gemm<Kern, BITS, fmt::kGroupSize64, LO>(a, pool);
    case fmt::kGroupSize128: return gemm<Kern, BITS, fmt::kGroupSize128, LO>(a, pool);
    default: return Status::kInvalidArgument;
  }
}

template <class Kern, bool LO>
Status gemm_bits(const QMatmulArgs& a, ThreadPool& pool) {
  return a.bits == fmt::kInt8Bits ? gemm_g<Kern, fmt::kInt8Bits, LO>(a, pool)
                                  : gemm_g<Kern, fmt::kInt4Bits, LO>(a, pool);
}

// Any x dtype, M above the GEMV's rows; act_bits 16 multiplies both int8 halves of x.
template <class Kern>
Status run(const QMatmulArgs& a, ThreadPool& pool) {
  return a.act_bits == kActBitsInt8 ? gemm_bits<Kern, false>(a, pool) : gemm_bits<Kern, true>(a, pool);
}

}  // namespace i8gemm
}  // namespace
}  // namespace cpu
}  // namespace bitswitch
