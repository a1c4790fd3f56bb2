// bitswitch qmatmul for Apple GPUs: y[M, N] = x[M, K] @ W[N, K]^T for a nibble-plane
// weight (csrc/include/bitswitch/format.h), reading plane 0 (BITS 4) or planes 0 and 1
// (BITS 8). Accumulation is float32; y has x's type T; scales and biases have type S.
//
// Two kernels, both templated on <T, S, BITS, GS> and launched on a 1-D grid of
// threadgroups (bitswitch/metal.py plans the launches and generates the entry points):
//   bs_qmv  M small (decode): simdgroups stream weight rows once per x row.
//   bs_qmm  M large (prefill): 32 x 32 output tiles from simdgroup-matrix products over
//           x and dequantized-W tiles staged in threadgroup memory.
// ip (int32) holds the sizes: ip[0] = M, ip[1] = N, ip[2] = K (K a multiple of GS).

#include "bitswitch/format.h"

// -- GEMV ---------------------------------------------------------------------------------
// A threadgroup is BS_QMV_SIMDGROUPS simdgroups; each simdgroup owns BS_QMV_ROWS output rows
// of one x row. A lane takes BS_QMV_VALUES consecutive inputs per step (four plane words,
// one 16-byte load per plane and row), so a simdgroup covers 32 * 32 = 1024 inputs a step.
#define BS_QMV_SIMDGROUPS 2
#define BS_QMV_ROWS 4
#define BS_QMV_VALUES 32
#define BS_QMV_THREADS (32 * BS_QMV_SIMDGROUPS)
#define BS_QMV_TG_ROWS (BS_QMV_ROWS * BS_QMV_SIMDGROUPS)

// sum_i xs[i] * (word & (15 << 4i)): the codes stay in place, in their nibbles, and xs
// carries the 16^-i that undoes their position (x * 2^-4i is exact in float32), so the
// unpack is one AND and one conversion per code.
inline float bs_dot_masked(uint32_t word, const thread float* xs) {
  return xs[0] * float(word & 0x0000000fu) + xs[1] * float(word & 0x000000f0u) +
         xs[2] * float(word & 0x00000f00u) + xs[3] * float(word & 0x0000f000u) +
         xs[4] * float(word & 0x000f0000u) + xs[5] * float(word & 0x00f00000u) +
         xs[6] * float(word & 0x0f000000u) + xs[7] * float(word & 0xf0000000u);
}

template <typename T, typename S, int BITS, int GS>
void bs_qmv(const device T* x, const device uint32_t* p0, const device uint32_t* p1,
            const device S* scales, const device S* biases, device T* y, const device int* ip,
            uint tg, uint lane, uint sg) {
  const int N = ip[1], K = ip[2];
  const int row_blocks = (N + BS_QMV_TG_ROWS - 1) / BS_QMV_TG_ROWS;
  const int m = int(tg) / row_blocks;
  const int n0 = (int(tg) % row_blocks) * BS_QMV_TG_ROWS + int(sg) * BS_QMV_ROWS;
  const long wpr = bitswitch::format::words_per_row(K);
  const long gpr = bitswitch::format::groups_per_row(K, GS);
  const device T* xr = x + long(m) * K;

  float acc[BS_QMV_ROWS];
  for (int r = 0; r < BS_QMV_ROWS; ++r) acc[r] = 0.0f;

  for (int k0 = int(lane) * BS_QMV_VALUES; k0 < K; k0 += 32 * BS_QMV_VALUES) {
    // K is a multiple of the group size (>= 32), so a lane's 32 inputs exist and lie in
    // one group.
    float xs[BS_QMV_VALUES];
    float xsum = 0.0f;
    for (int i = 0; i < BS_QMV_VALUES; i += 8) {
      float pos = 1.0f;
      for (int j = 0; j < 8; ++j) {
        const float v = static_cast<float>(xr[k0 + i + j]);
        xsum += v;
        xs[i + j] = v * pos;
        pos *= 0.0625f;
      }
    }
    const long g = k0 / GS;
    for (int r = 0; r < BS_QMV_ROWS; ++r) {
      // Rows past N recompute row N-1 (in bounds) and are never stored.
      const long n = min(n0 + r, N - 1);
      const device uint32_t* w0 = p0 + n * wpr + k0 / 8;
      float d0 = 0.0f;
      for (int i = 0; i < BS_QMV_VALUES / 8; ++i) d0 += bs_dot_masked(w0[i], xs + 8 * i);
      const float s = static_cast<float>(scales[n * gpr + g]);
      const float b = static_cast<float>(biases[n * gpr + g]);
      if (BITS == bitswitch::format::kInt8Bits) {
        // sum x * (s8 (16 q + r) + b8) = s * sum(x q) + s8 * sum(x r) + b8 * sum(x)
        const device uint32_t* w1 = p1 + n * wpr + k0 / 8;
        float d1 = 0.0f;
        for (int i = 0; i < BS_QMV_VALUES / 8; ++i) d1 += bs_dot_masked(w1[i], xs + 8 * i);
        acc[r] += s * d0 + bitswitch::format::int8_scale(s) * d1 + bitswitch::format::int8_bias(s, b) * xsum;
      } else {
        acc[r] += s * d0 + b * xsum;
      }
    }
  }
  for (int r = 0; r < BS_QMV_ROWS; ++r) {
    const float v = simd_sum(acc[r]);
    if (lane == 0 && n0 + r < N) y[long(m) * N + n0 + r] = static_cast<T>(v);
  }
}

// -- GEMM ---------------------------------------------------------------------------------
// A threadgroup computes a BS_QMM_BM x BS_QMM_BN tile of y with four simdgroups in a 2 x 2
// layout, each holding 2 x 2 accumulators of 8 x 8. Per BS_QMM_BK inputs the threadgroup
// stages x [BM][BK] and the dequantized weights transposed, w [BK][BN], in float: each
// thread converts 8 inputs of one x row and dequantizes one plane word of one weight row.
#define BS_QMM_BM 32
#define BS_QMM_BN 32
#define BS_QMM_BK 32
#define BS_QMM_THREADS 128
#define BS_QMM_XS (BS_QMM_BM * BS_QMM_BK)
#define BS_QMM_WS (BS_QMM_BK * BS_QMM_BN)

template <typename T, typename S, int BITS, int GS>
void bs_qmm(const device T* x, const device uint32_t* p0, const device uint32_t* p1,
            const device S* scales, const device S* biases, device T* y, const device int* ip,
            threadgroup float* xs, threadgroup float* ws, uint tg, uint lid, uint sg) {
  const int M = ip[0], N = ip[1], K = ip[2];
  const int col_tiles = (N + BS_QMM_BN - 1) / BS_QMM_BN;
  const int m0 = (int(tg) / col_tiles) * BS_QMM_BM;
  const int n0 = (int(tg) % col_tiles) * BS_QMM_BN;
  const long wpr = bitswitch::format::words_per_row(K);
  const long gpr = bitswitch::format::groups_per_row(K, GS);

  // This thread's staging duty: row lr of both tiles, inputs lk .. lk + 7 of the step.
  const int lr = int(lid) / 4;
  const int lk = (int(lid) % 4) * 8;
  const bool x_in = m0 + lr < M;
  const bool w_in = n0 + lr < N;
  const device T* xrow = x + long(min(m0 + lr, M - 1)) * K + lk;
  const long n = min(n0 + lr, N - 1);

  // This simdgroup's 16 x 16 corner of the tile.
  const int sm = (int(sg) / 2) * 16;
  const int sn = (int(sg) % 2) * 16;
  simdgroup_float8x8 acc[2][2];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) acc[i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);

  for (int k0 = 0; k0 < K; k0 += BS_QMM_BK) {
    for (int j = 0; j < 8; ++j) xs[lr * BS_QMM_BK + lk + j] = x_in ? static_cast<float>(xrow[k0 + j]) : 0.0f;
    const int kk = k0 + lk;
    const float s = static_cast<float>(scales[n * gpr + kk / GS]);
    const float b = static_cast<float>(biases[n * gpr + kk / GS]);
    const uint32_t q = p0[n * wpr + kk / 8];
    if (BITS == bitswitch::format::kInt8Bits) {
      const uint32_t r = p1[n * wpr + kk / 8];
      for (int j = 0; j < 8; ++j) {
        const float w = bitswitch::format::dequant_int8(bitswitch::format::unpack_code(q, j),
                                                        bitswitch::format::unpack_code(r, j), s, b);
        ws[(lk + j) * BS_QMM_BN + lr] = w_in ? w : 0.0f;
      }
    } else {
      for (int j = 0; j < 8; ++j) {
        const float w = bitswitch::format::dequant_int4(bitswitch::format::unpack_code(q, j), s, b);
        ws[(lk + j) * BS_QMM_BN + lr] = w_in ? w : 0.0f;
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int k8 = 0; k8 < BS_QMM_BK; k8 += 8) {
      simdgroup_float8x8 a[2];
      simdgroup_float8x8 w[2];
      for (int i = 0; i < 2; ++i) simdgroup_load(a[i], xs + (sm + 8 * i) * BS_QMM_BK + k8, BS_QMM_BK);
      for (int j = 0; j < 2; ++j) simdgroup_load(w[j], ws + k8 * BS_QMM_BN + sn + 8 * j, BS_QMM_BN);
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) simdgroup_multiply_accumulate(acc[i][j], a[i], w[j], acc[i][j]);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }

  // The tile goes out through threadgroup memory (xs is free now): converted to T, with
  // the rows and columns past M and N left alone.
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) simdgroup_store(acc[i][j], xs + (sm + 8 * i) * BS_QMM_BN + sn + 8 * j, BS_QMM_BN);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int e = int(lid); e < BS_QMM_BM * BS_QMM_BN; e += BS_QMM_THREADS) {
    const int r = e / BS_QMM_BN, c = e % BS_QMM_BN;
    if (m0 + r < M && n0 + c < N) y[long(m0 + r) * N + n0 + c] = static_cast<T>(xs[e]);
  }
}
