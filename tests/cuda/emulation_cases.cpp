// Kernels that exercise cuda_emulation.h, each behind an extern "C" thunk that
// test_cuda_emulation.py calls through ctypes and checks against numpy. Every thunk returns
// the launch's cudaError_t; emulator.last_error() has the message of a failed one.

#include "cuda_emulation.h"
#include "common.cuh"

namespace {

using namespace bitswitch::cuda;

// ---- mma from fragments built by hand ----------------------------------------------------
//
// One warp. a: A[16][16] row-major, b: B[16][8] row-major ([k][n]), both as raw 16-bit
// values of T; c, d: [16][8] float. The fragments are gathered from shared memory with the
// layout written in common.cuh, independently of ldmatrix.
template <class T>
__global__ void mma_by_layout(const uint16_t* a, const uint16_t* b, const float* c, float* d) {
  __shared__ __align__(16) uint16_t as[16 * 16];
  __shared__ __align__(16) uint16_t bs[16 * 8];
  const int lane = threadIdx.x;
  for (int i = lane; i < 16 * 16; i += 32) as[i] = a[i];
  for (int i = lane; i < 16 * 8; i += 32) bs[i] = b[i];
  __syncthreads();
  const int g = lane / 4, t = lane % 4;
  auto a2 = [&](int row, int col) { return uint32_t(as[row * 16 + col]) | (uint32_t(as[row * 16 + col + 1]) << 16); };
  auto b2 = [&](int k, int n) { return uint32_t(bs[k * 8 + n]) | (uint32_t(bs[(k + 1) * 8 + n]) << 16); };
  const uint32_t af[4] = {a2(g, 2 * t), a2(g + 8, 2 * t), a2(g, 2 * t + 8), a2(g + 8, 2 * t + 8)};
  const uint32_t bf[2] = {b2(2 * t, g), b2(2 * t + 8, g)};
  float acc[4] = {c[g * 8 + 2 * t], c[g * 8 + 2 * t + 1], c[(g + 8) * 8 + 2 * t], c[(g + 8) * 8 + 2 * t + 1]};
  ptx::mma_m16n8k16<T>(acc, af, bf, acc);  // d aliasing c, as kernels accumulate
  d[g * 8 + 2 * t] = acc[0];
  d[g * 8 + 2 * t + 1] = acc[1];
  d[(g + 8) * 8 + 2 * t] = acc[2];
  d[(g + 8) * 8 + 2 * t + 1] = acc[3];
}

// ---- ldmatrix register contents ------------------------------------------------------------
//
// One warp. tile: 32 rows of 8 16-bit values (4 matrices of 8 rows); lane l passes the
// address of row rows[l]. out[form][lane][i] receives register i of ldmatrix form
// 0: x4, 1: x4_trans, 2: x2, 3: x2_trans (x2 forms fill i = 0, 1).
__global__ void ldmatrix_dump(const uint16_t* tile, const int* rows, uint32_t* out) {
  __shared__ __align__(16) uint16_t ts[32 * 8];
  const int lane = threadIdx.x;
  for (int i = lane; i < 32 * 8; i += 32) ts[i] = tile[i];
  __syncwarp();
  const uint16_t* row = ts + rows[lane] * 8;
  uint32_t r[4];
  ptx::ldmatrix_x4(r, row);
  for (int i = 0; i < 4; ++i) out[(0 * 32 + lane) * 4 + i] = r[i];
  ptx::ldmatrix_x4_trans(r, row);
  for (int i = 0; i < 4; ++i) out[(1 * 32 + lane) * 4 + i] = r[i];
  ptx::ldmatrix_x2(r, row);
  for (int i = 0; i < 2; ++i) out[(2 * 32 + lane) * 4 + i] = r[i];
  ptx::ldmatrix_x2_trans(r, row);
  for (int i = 0; i < 2; ++i) out[(3 * 32 + lane) * 4 + i] = r[i];
}

// ---- ldmatrix feeding mma: the identities kernels rely on ------------------------------------
//
// One warp. a: A[16][16] row-major; bnk: B as [n][k] = [16][16] row-major (B column-major);
// bkn: B as [k][n] = [16][16] row-major; c: [16][16] float. Writes three [16][16] results,
// each A @ B + C computed with the fragments taken three ways:
//   d0: a from ldmatrix_x4(A), b from ldmatrix_x2 on [n][k] (one n-tile of 8 at a time);
//   d1: a from ldmatrix_x4(A), b from ldmatrix_x2_trans on [k][n];
//   d2: a from ldmatrix_x4(A), b for both n-tiles from one ldmatrix_x4_trans on [k][n].
// A row pitch of 24 elements (48 bytes) keeps the rows 16-byte aligned but not contiguous.
template <class T>
__global__ void ldmatrix_mma(const uint16_t* a, const uint16_t* bnk, const uint16_t* bkn, const float* c, float* d0,
                             float* d1, float* d2) {
  constexpr int P = 24;
  __shared__ __align__(16) uint16_t as[16 * P], bns[16 * P], bks[16 * P];
  const int lane = threadIdx.x;
  for (int i = lane; i < 256; i += 32) {
    as[(i / 16) * P + i % 16] = a[i];
    bns[(i / 16) * P + i % 16] = bnk[i];
    bks[(i / 16) * P + i % 16] = bkn[i];
  }
  __syncthreads();
  uint32_t af[4];
  // Lanes 0-15 give rows 0-15 at k = 0, lanes 16-31 the same rows at k = 8: matrices
  // (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15) = a[0..3].
  ptx::ldmatrix_x4(af, as + (lane % 16) * P + 8 * (lane / 16));
  const int g = lane / 4, t = lane % 4;
  auto store = [&](float* d, int n0, const float* acc) {
    d[g * 16 + n0 + 2 * t] = acc[0];
    d[g * 16 + n0 + 2 * t + 1] = acc[1];
    d[(g + 8) * 16 + n0 + 2 * t] = acc[2];
    d[(g + 8) * 16 + n0 + 2 * t + 1] = acc[3];
  };
  auto c_frag = [&](int n0, float* acc) {
    acc[0] = c[g * 16 + n0 + 2 * t];
    acc[1] = c[g * 16 + n0 + 2 * t + 1];
    acc[2] = c[(g + 8) * 16 + n0 + 2 * t];
    acc[3] = c[(g + 8) * 16 + n0 + 2 * t + 1];
  };
  for (int n0 = 0; n0 < 16; n0 += 8) {
    float acc[4];
    uint32_t bf[2];
    // [n][k]: lanes 0-7 give rows n0..n0+7 at k = 0, lanes 8-15 the same rows at k = 8.
    ptx::ldmatrix_x2(bf, bns + (n0 + lane % 8) * P + 8 * ((lane / 8) % 2));
    c_frag(n0, acc);
    ptx::mma_m16n8k16<T>(acc, af, bf, acc);
    store(d0, n0, acc);
    // [k][n]: lanes 0-15 give rows k = 0..15 at column n0.
    ptx::ldmatrix_x2_trans(bf, bks + (lane % 16) * P + n0);
    c_frag(n0, acc);
    ptx::mma_m16n8k16<T>(acc, af, bf, acc);
    store(d1, n0, acc);
  }
  // [k][n], both n-tiles at once: lanes 0-15 at column 0, lanes 16-31 at column 8.
  uint32_t b4[4];
  ptx::ldmatrix_x4_trans(b4, bks + (lane % 16) * P + 8 * (lane / 16));
  for (int j = 0; j < 2; ++j) {
    float acc[4];
    c_frag(8 * j, acc);
    ptx::mma_m16n8k16<T>(acc, af, b4 + 2 * j, acc);
    store(d2, 8 * j, acc);
  }
}

// ---- cp.async ------------------------------------------------------------------------------
//
// 64 threads, dynamic shared memory of 128 chunks of 16 bytes; src: 128 chunks. Thread i
// copies chunk i (group 0) and chunk 64 + i (group 1, predicated on i % 3 != 0, else
// zero-filled). out[i][0..5] = first word of: chunk i before any wait, chunk i after wait<1>,
// chunk 64 + i after wait<1>, chunk (i + 1) % 64 and chunk 64 + (i + 1) % 64 after wait<0>
// and __syncthreads, chunk 64 + i after wait<0>.
__global__ void cp_async_stages(const uint4* src, uint32_t* out) {
  BS_DYNAMIC_SMEM(uint4, smem);
  const int i = threadIdx.x;
  ptx::cp_async16(smem + i, src + i, true);
  ptx::cp_async_commit();
  ptx::cp_async16(smem + 64 + i, src + 64 + i, i % 3 != 0);
  ptx::cp_async_commit();
  uint32_t* o = out + i * 6;
  o[0] = smem[i].x;
  ptx::cp_async_wait<1>();
  o[1] = smem[i].x;
  o[2] = smem[64 + i].x;
  ptx::cp_async_wait<0>();
  __syncthreads();
  o[3] = smem[(i + 1) % 64].x;
  o[4] = smem[64 + (i + 1) % 64].x;
  o[5] = smem[64 + i].x;
}

// Returns with a copy never waited for (mode 0) or issues a misaligned one (mode 1).
__global__ void cp_async_misuse(const uint4* src, int mode) {
  BS_DYNAMIC_SMEM(unsigned char, smem);
  if (mode == 0) {
    ptx::cp_async16(smem + 16 * threadIdx.x, src, true);
    ptx::cp_async_commit();
  } else {
    ptx::cp_async16(smem + 8, src, true);
    ptx::cp_async_commit();
    ptx::cp_async_wait<0>();
  }
}

// ---- shuffles ------------------------------------------------------------------------------
//
// 64 threads; v = 100 * gid + 1.5. out[gid][0..12] (float):
//   xor 5, down 3, up 2, idx 31 - lane, idx lane + 33 (wraps), xor 4 width 8, down 2 width 8,
//   up 3 width 8, idx 5 width 8, xor 16 of an int, down 1 of a double, xor 1 of a __half,
//   idx 7 of an __nv_bfloat16.
constexpr int kShuffleCols = 13;
__global__ void shuffles(float* out) {
  const unsigned full = 0xffffffffu;
  const int gid = threadIdx.x, lane = gid % 32;
  const float v = 100.0f * float(gid) + 1.5f;
  float* o = out + gid * kShuffleCols;
  o[0] = __shfl_xor_sync(full, v, 5);
  o[1] = __shfl_down_sync(full, v, 3);
  o[2] = __shfl_up_sync(full, v, 2);
  o[3] = __shfl_sync(full, v, 31 - lane);
  o[4] = __shfl_sync(full, v, lane + 33);
  o[5] = __shfl_xor_sync(full, v, 4, 8);
  o[6] = __shfl_down_sync(full, v, 2, 8);
  o[7] = __shfl_up_sync(full, v, 3, 8);
  o[8] = __shfl_sync(full, v, 5, 8);
  o[9] = float(__shfl_xor_sync(full, int(v), 16));
  o[10] = float(__shfl_down_sync(full, double(v), 1));
  o[11] = __half2float(__shfl_xor_sync(full, __float2half_rn(float(gid)), 1));
  o[12] = __bfloat162float(__shfl_sync(full, __float2bfloat16_rn(float(gid)), 7));
}

// ---- misuse that must be reported, not hang ------------------------------------------------

// mode 0: __syncthreads inside `if (threadIdx.x < 32)`; 1: half a warp shuffles, the other
// half calls __syncwarp; 2: a partial shuffle mask; 3: half a warp in mma, the other half
// never arrives (returns); 4: a misaligned ldmatrix row; 5: an exception.
__global__ void misuse(float* out, int mode) {
  const int tid = threadIdx.x, lane = tid % 32;
  float v = float(tid);
  if (mode == 0) {
    if (tid < 32) __syncthreads();
  } else if (mode == 1) {
    if (lane < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
    else __syncwarp();
  } else if (mode == 2) {
    v = __shfl_xor_sync(0x0000ffffu, v, 1);
  } else if (mode == 3) {
    if (lane < 16) {
      uint32_t a[4] = {}, b[2] = {};
      float c[4] = {};
      ptx::mma_m16n8k16<__half>(c, a, b, c);
      v = c[0];
    }
  } else if (mode == 4) {
    __shared__ __align__(16) uint16_t tile[16 * 16 + 8];
    uint32_t r[4];
    ptx::ldmatrix_x4(r, tile + (lane % 16) * 16 + (lane == 9 ? 4 : 0));
    v = float(r[0]);
  } else if (mode == 5) {
    if (tid == 40) throw std::runtime_error("bad index 40");
  }
  out[tid] = v;
}

// ---- dynamic shared memory, static shared memory, 3-D grids ----------------------------------

// Reads its dynamic shared memory before writing it (out[0] = the last word: the poison),
// then fills and sums it. One block of 64 threads, `words` 32-bit words of dynamic memory.
// Two instances: 0 gets cudaFuncSetAttribute calls, 1 never does.
template <int Instance>
__global__ void dynamic_smem(uint32_t* out, int words) {
  BS_DYNAMIC_SMEM(uint32_t, s);
  const int tid = threadIdx.x;
  if (tid == 0) out[0] = s[words - 1];
  __syncthreads();
  for (int i = tid; i < words; i += 64) s[i] = uint32_t(i);
  __syncthreads();
  if (tid == 0) {
    uint32_t sum = 0;
    for (int i = 0; i < words; ++i) sum += s[i];
    out[1] = sum;
  }
}

// Every thread writes its linear index in the block into a static __shared__ array, waits,
// and reads its neighbour's, twice (a missing barrier would show in either round).
// out[block][thread][0..12]: the neighbour values of both rounds, threadIdx, blockIdx,
// blockDim, gridDim (x, y, z each... only the ones that vary are checked in Python).
constexpr int kGridCols = 14;
__global__ void grid3d(int* out) {
  __shared__ int tile[1024];
  const int n = int(blockDim.x * blockDim.y * blockDim.z);
  const int tid = int(threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y);
  const int block = int(blockIdx.x + blockIdx.y * gridDim.x + blockIdx.z * gridDim.x * gridDim.y);
  int* o = out + (block * n + tid) * kGridCols;
  int v = 1000 * block + tid;
  for (int round = 0; round < 2; ++round) {
    tile[tid] = v;
    __syncthreads();
    v = tile[(tid + 1) % n] + 1;
    __syncthreads();
    o[round] = v;
  }
  const uint3 t = threadIdx, b = blockIdx;
  const dim3 bd = blockDim, gd = gridDim;
  const int vals[12] = {int(t.x), int(t.y), int(t.z), int(b.x), int(b.y), int(b.z),
                        int(bd.x), int(bd.y), int(bd.z), int(gd.x), int(gd.y), int(gd.z)};
  for (int i = 0; i < 12; ++i) o[2 + i] = vals[i];
}

__global__ void noop(int*) {}

// Reads a neighbour's slot without the __syncthreads a GPU needs: ThreadSanitizer (threads
// mode) must report a data race.
__global__ void racy(int* out) {
  __shared__ int slots[64];
  const int tid = threadIdx.x;
  slots[tid] = tid;
  out[tid] = slots[(tid + 1) % 64];
}

}  // namespace

extern "C" {

int run_mma_by_layout(int bf16, const void* a, const void* b, const void* c, void* d) {
  auto args = [&](auto kernel) {
    return BS_LAUNCH(kernel, 1, 32, 0, nullptr, static_cast<const uint16_t*>(a), static_cast<const uint16_t*>(b),
                     static_cast<const float*>(c), static_cast<float*>(d));
  };
  return int(bf16 ? args(mma_by_layout<__nv_bfloat16>) : args(mma_by_layout<__half>));
}

int run_ldmatrix_dump(const void* tile, const void* rows, void* out) {
  return int(BS_LAUNCH(ldmatrix_dump, 1, 32, 0, nullptr, static_cast<const uint16_t*>(tile),
                       static_cast<const int*>(rows), static_cast<uint32_t*>(out)));
}

int run_ldmatrix_mma(int bf16, const void* a, const void* bnk, const void* bkn, const void* c, void* d0, void* d1,
                     void* d2) {
  auto args = [&](auto kernel) {
    return BS_LAUNCH(kernel, 1, 32, 0, nullptr, static_cast<const uint16_t*>(a), static_cast<const uint16_t*>(bnk),
                     static_cast<const uint16_t*>(bkn), static_cast<const float*>(c), static_cast<float*>(d0),
                     static_cast<float*>(d1), static_cast<float*>(d2));
  };
  return int(bf16 ? args(ldmatrix_mma<__nv_bfloat16>) : args(ldmatrix_mma<__half>));
}

int run_cp_async_stages(const void* src, void* out) {
  return int(BS_LAUNCH(cp_async_stages, 1, 64, 128 * 16, nullptr, static_cast<const uint4*>(src),
                       static_cast<uint32_t*>(out)));
}

int run_cp_async_misuse(const void* src, int mode) {
  return int(BS_LAUNCH(cp_async_misuse, 1, 32, 1024, nullptr, static_cast<const uint4*>(src), mode));
}

int run_shuffles(void* out) { return int(BS_LAUNCH(shuffles, 1, 64, 0, nullptr, static_cast<float*>(out))); }

int run_misuse(void* out, int mode) {
  return int(BS_LAUNCH(misuse, dim3(2), dim3(64), 0, nullptr, static_cast<float*>(out), mode));
}

// limit < 0: launch the instance that never had its attribute set; else set the other's to
// `limit` first (returning 1000 + the error when that fails).
int run_dynamic_smem(void* out, int bytes, int limit) {
  uint32_t* o = static_cast<uint32_t*>(out);
  if (limit < 0) return int(BS_LAUNCH(dynamic_smem<1>, 1, 64, bytes, nullptr, o, bytes / 4));
  const cudaError_t e = cudaFuncSetAttribute(dynamic_smem<0>, cudaFuncAttributeMaxDynamicSharedMemorySize, limit);
  if (e != cudaSuccess) return 1000 + int(cudaGetLastError());
  return int(BS_LAUNCH(dynamic_smem<0>, 1, 64, bytes, nullptr, o, bytes / 4));
}

int run_grid3d(void* out, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz) {
  return int(BS_LAUNCH(grid3d, dim3(gx, gy, gz), dim3(bx, by, bz), 0, nullptr, static_cast<int*>(out)));
}

int run_noop(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz) {
  return int(BS_LAUNCH(noop, dim3(gx, gy, gz), dim3(bx, by, bz), 0, nullptr, static_cast<int*>(nullptr)));
}

int run_racy(void* out) { return int(BS_LAUNCH(racy, 1, 64, 0, nullptr, static_cast<int*>(out))); }

// Host-side checks: float -> bf16 / half bits; CUDA's min/max, math and runtime shims.
void convert(const float* x, int n, uint16_t* bf16, uint16_t* f16) {
  for (int i = 0; i < n; ++i) {
    bf16[i] = bits16(__float2bfloat16_rn(x[i]));
    f16[i] = bits16(__float2half_rn(x[i]));
  }
}

int minmax_ok() {
  int device = -1;
  static_assert(std::is_same<decltype(min(-1, 2u)), unsigned>::value, "int, unsigned -> unsigned");
  static_assert(std::is_same<decltype(max(int64_t(1), int64_t(2))), int64_t>::value, "int64");
  static_assert(alignof(uint4) == 16 && alignof(float2) == 8 && sizeof(float4) == 16, "vector alignment");
  return min(3, 4) == 3 && max(3u, 4u) == 4u && min(-1, 2u) == 2u && max(int64_t(-5), int64_t(7)) == 7 &&
         min(1.5f, 2.5f) == 1.5f && rsqrtf(4.0f) == 0.5f && __fdividef(1.0f, 4.0f) == 0.25f &&
         to_float(from_float<__nv_bfloat16>(1.0f)) == 1.0f && __ldg(&kShuffleCols) == 13 &&
         cudaGetDevice(&device) == cudaSuccess && device == 0;
}

}  // extern "C"
