// cuda_emulation.h - run bitswitch's CUDA kernels as C++17 on a CPU.
//
// Included before cuda/common.cuh, this header lets g++ compile the kernel headers
// (cuda/*.cuh) and run them: each thread block's threads run as fibers (or OS threads) on the
// launcher of tests/metal/msl_emulation.h, which this header reuses for everything that
// synchronizes GPU threads. A translation unit looks like
//
//     #include "cuda_emulation.h"
//     #include "common.cuh"
//     #include "qmatmul.cuh"
//     extern "C" int run(...) { return int(launch_something(..., /*stream=*/nullptr)); }
//
// What is provided: exactly what cuda/common.cuh's opening comment allows kernels to use.
//   - __global__ __device__ __host__ __constant__ __forceinline__ __launch_bounds__(...)
//     __align__(n); `__shared__` is `static`: a function-local static array is shared by the
//     block's threads because blocks run one after another in one process (the same trick as
//     the Metal emulation's threadgroup memory).
//   - threadIdx blockIdx blockDim gridDim warpSize, dim3, uint2/uint3/uint4, int2/int3/int4,
//     float2/float3/float4 with CUDA's alignment and make_* functions;
//   - __syncthreads, __syncwarp, __shfl_sync, __shfl_xor_sync, __shfl_down_sync,
//     __shfl_up_sync (full mask only; width = any power of two up to 32, PTX's shfl rules);
//   - __half (_Float16) and __nv_bfloat16 (msl_emu's bfloat16: round to nearest even) with
//     __float2half_rn __half2float __float2bfloat16_rn __bfloat162float, __ldg;
//   - float math: expf exp2f logf log2f fmaxf fminf fabsf sqrtf rsqrtf __expf __logf __log2f
//     __fdividef, integer and float min/max (CUDA's overload set), INFINITY;
//   - the CUDA runtime subset the launchers use: cudaError_t, cudaStream_t, cudaGetLastError,
//     cudaPeekAtLastError, cudaGetErrorString, cudaGetErrorName, cudaFuncSetAttribute,
//     cudaGetDevice (always device 0);
//   - bitswitch::cuda::ptx: mma_m16n8k16, ldmatrix_x4/_x4_trans/_x2/_x2_trans, cp_async16,
//     cp_async_commit, cp_async_wait<N>, ld_stream, ld_nc, and_or, fma2, ex2, with the PTX ISA's semantics and
//     the fragment layouts written in common.cuh;
//   - cuda_emu::launch_kernel (what BS_LAUNCH expands to), cuda_emu::dynamic_shared_memory
//     (BS_DYNAMIC_SMEM), cuda_emu::last_error(), cuda_emu::set_mode().
//
// What a kernel author should know:
//   - Blocks run one after another in x-fastest order, never concurrently; a block that waits
//     for another block hangs. Atomics, __ballot_sync and friends are not provided.
//   - The block size must be a multiple of 32 (CUDA allows a partial last warp; the kernels
//     here never use one, and the emulation rejects it with cudaErrorInvalidConfiguration).
//   - Warp collectives (shuffles, __syncwarp, mma, ldmatrix) must be reached by all 32 lanes
//     of a warp, in the same order. They are matched per warp by their order in each lane, not
//     by call site. Two different collectives meeting, a lane that never arrives, a barrier in
//     divergent code: each ends the launch with cudaErrorLaunchFailure and a message.
//   - Dynamic shared memory is filled with 0xff bytes (NaN in every float type) before every
//     block; static __shared__ arrays keep whatever the previous block or launch left.
//   - cp.async copies the 16 source bytes when it is issued and writes them to shared memory
//     only at the cp_async_wait<N> that retires its group: a kernel that reads the
//     destination earlier sees the old contents (the poison). A thread that returns with
//     copies not waited for is reported.
//   - mma_m16n8k16 multiplies exactly (16-bit products fit a float) and sums in float in k
//     order: d = ((c + a0*b0) + a1*b1) + ... + a15*b15. Tensor cores sum differently; compare
//     results with a tolerance, not bitwise.
//   - __CUDA_ARCH__ and __CUDACC__ are not defined; BITSWITCH_CUDA_EMULATION is.
//   - Function-local statics stand in for shared memory, so two launches of the same kernel
//     must not run at the same time (from different OS threads).
//
// After this header the identifiers threadIdx, blockIdx, blockDim and gridDim are macros and
// __shared__ means `static`: include standard headers before it, or at least before using
// such names in host code.

#pragma once

#ifndef BITSWITCH_CUDA_EMULATION
#define BITSWITCH_CUDA_EMULATION 1
#endif

#define MSL_EMU_CORE_ONLY 1
#include "msl_emulation.h"

#include <float.h>
#include <math.h>

#include <deque>
#include <map>
#include <tuple>

// ---------------------------------------------------------------------------------------------
// Vector types, dim3
// ---------------------------------------------------------------------------------------------

// CUDA's vector types are aggregates with the alignment of a whole vector for 2 and 4
// elements (what makes 8- and 16-byte loads of them single instructions) and of one element
// for 3.
#define CUDA_EMU_VECTORS(T, name)                                                                       \
  struct __attribute__((aligned(2 * sizeof(T)))) name##2 { T x, y; };                                  \
  struct name##3 { T x, y, z; };                                                                       \
  struct __attribute__((aligned(4 * sizeof(T)))) name##4 { T x, y, z, w; };                            \
  inline name##2 make_##name##2(T x, T y) { return name##2{x, y}; }                                    \
  inline name##3 make_##name##3(T x, T y, T z) { return name##3{x, y, z}; }                            \
  inline name##4 make_##name##4(T x, T y, T z, T w) { return name##4{x, y, z, w}; }                    \
  static_assert(sizeof(name##2) == 2 * sizeof(T) && alignof(name##2) == 2 * sizeof(T), #name "2 layout"); \
  static_assert(sizeof(name##4) == 4 * sizeof(T) && alignof(name##4) == 4 * sizeof(T), #name "4 layout");
CUDA_EMU_VECTORS(unsigned int, uint)
CUDA_EMU_VECTORS(int, int)
CUDA_EMU_VECTORS(float, float)
#undef CUDA_EMU_VECTORS

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------------
// Element types and math
// ---------------------------------------------------------------------------------------------

typedef msl_emu::detail::half_t __half;
typedef msl_emu::detail::bfloat16 __nv_bfloat16;
static_assert(sizeof(__half) == 2 && std::is_trivially_copyable<__half>::value, "__half layout");
static_assert(sizeof(__nv_bfloat16) == 2 && std::is_trivially_copyable<__nv_bfloat16>::value, "bfloat16 layout");

inline __half __float2half_rn(float v) { return __half(v); }
inline float __half2float(__half v) { return float(v); }
inline __nv_bfloat16 __float2bfloat16_rn(float v) { return __nv_bfloat16(v); }
inline float __bfloat162float(__nv_bfloat16 v) { return float(v); }

inline float __uint_as_float(unsigned int v) { return __builtin_bit_cast(float, v); }
inline unsigned int __float_as_uint(float v) { return __builtin_bit_cast(unsigned int, v); }
inline float __int_as_float(int v) { return __builtin_bit_cast(float, v); }
inline int __float_as_int(float v) { return __builtin_bit_cast(int, v); }

// The fast intrinsics are the C library's functions: the emulation checks a kernel's logic,
// not the last bits of its approximations.
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __fdividef(float a, float b) { return a / b; }

// min/max as CUDA declares them globally (crt/math_functions.hpp): a mix of a signed and an
// unsigned operand of the same width compares as unsigned; floats go through fminf/fmaxf.
#define CUDA_EMU_MINMAX(R, A, B)                                                    \
  inline R min(A a, B b) { return static_cast<R>(a) < static_cast<R>(b) ? static_cast<R>(a) : static_cast<R>(b); } \
  inline R max(A a, B b) { return static_cast<R>(a) > static_cast<R>(b) ? static_cast<R>(a) : static_cast<R>(b); }
CUDA_EMU_MINMAX(int, int, int)
CUDA_EMU_MINMAX(unsigned int, unsigned int, unsigned int)
CUDA_EMU_MINMAX(unsigned int, int, unsigned int)
CUDA_EMU_MINMAX(unsigned int, unsigned int, int)
CUDA_EMU_MINMAX(long, long, long)
CUDA_EMU_MINMAX(unsigned long, unsigned long, unsigned long)
CUDA_EMU_MINMAX(unsigned long, long, unsigned long)
CUDA_EMU_MINMAX(unsigned long, unsigned long, long)
CUDA_EMU_MINMAX(long long, long long, long long)
CUDA_EMU_MINMAX(unsigned long long, unsigned long long, unsigned long long)
CUDA_EMU_MINMAX(unsigned long long, long long, unsigned long long)
CUDA_EMU_MINMAX(unsigned long long, unsigned long long, long long)
#undef CUDA_EMU_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline double min(float a, double b) { return fmin(a, b); }
inline double max(float a, double b) { return fmax(a, b); }
inline double min(double a, float b) { return fmin(a, b); }
inline double max(double a, float b) { return fmax(a, b); }

// Read-only data cache load: a plain load on a CPU.
template <class T> inline T __ldg(const T* p) { return *p; }

// ---------------------------------------------------------------------------------------------
// CUDA runtime subset
// ---------------------------------------------------------------------------------------------

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorLaunchFailure = 719,
  cudaErrorInvalidConfiguration = 9,
};
typedef cudaError_t cudaError;

typedef struct CUstream_st* cudaStream_t;

enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};

inline const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
  }
  return "cudaErrorUnknown";
}
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
  }
  return "unknown error";
}

namespace cuda_emu {

using msl_emu::Mode;

// Shared memory limits of the GPUs the kernels target (sm_80 .. sm_90): a block may use 48 KiB
// of dynamic shared memory by default, up to 227 KiB after cudaFuncSetAttribute.
constexpr size_t kDefaultDynamicSmemBytes = 48 * 1024;
constexpr size_t kMaxDynamicSmemBytes = 227 * 1024;
// The byte dynamic shared memory is filled with before every block: 0xffff is a NaN as half
// and bfloat16, 0xffffffff as float.
constexpr unsigned char kSmemPoison = 0xff;

namespace detail {

// The error state of the host thread, like the CUDA runtime's: the code cudaGetLastError
// returns (and clears) and the message of the last failure.
inline thread_local cudaError_t tls_last_code = cudaSuccess;
inline thread_local std::string tls_last_message;

inline cudaError_t set_error(cudaError_t code, const std::string& message) {
  if (code != cudaSuccess) tls_last_code = code;
  tls_last_message = message;
  return code;
}

// cudaFuncAttributeMaxDynamicSharedMemorySize per kernel, process-wide as on a GPU.
inline std::mutex& attributes_mutex() {
  static std::mutex mu;
  return mu;
}
inline std::map<const void*, size_t>& max_dynamic_smem() {
  static std::map<const void*, size_t> m;
  return m;
}

inline std::atomic<int>& mode_setting() {
  // CUDA_EMU_MODE=threads runs every GPU thread as an OS thread (for ThreadSanitizer).
  static std::atomic<int> m{[] {
    const char* e = std::getenv("CUDA_EMU_MODE");
    return int(e && std::strcmp(e, "threads") == 0 ? Mode::threads : Mode::fibers);
  }()};
  return m;
}

}  // namespace detail

// The mode of later launches (default: fibers, or threads when CUDA_EMU_MODE=threads).
inline void set_mode(Mode m) { detail::mode_setting().store(int(m)); }
inline Mode mode() { return Mode(detail::mode_setting().load()); }

// The message of the most recent failed launch or runtime call, "" after a successful launch.
inline const std::string& last_error() { return detail::tls_last_message; }

}  // namespace cuda_emu

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = cuda_emu::detail::tls_last_code;
  cuda_emu::detail::tls_last_code = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return cuda_emu::detail::tls_last_code; }

// The emulation is one device, number 0.
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

template <class F> inline cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  using namespace cuda_emu;
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;  // hints: nothing to do
  if (value < 0 || size_t(value) > kMaxDynamicSmemBytes)
    return detail::set_error(cudaErrorInvalidValue, "cudaFuncSetAttribute: MaxDynamicSharedMemorySize = " +
                                                        std::to_string(value) + " is outside 0.." +
                                                        std::to_string(kMaxDynamicSmemBytes));
  std::lock_guard<std::mutex> lk(detail::attributes_mutex());
  detail::max_dynamic_smem()[reinterpret_cast<const void*>(kernel)] = size_t(value);
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------
// The launch
// ---------------------------------------------------------------------------------------------

namespace cuda_emu {
namespace detail {

using msl_emu::detail::Op;

inline constexpr msl_emu::Dialect cuda_dialect{"block", "warp", "warp collectives"};

// One cp.async: its destination and the 16 bytes it will write there.
struct AsyncCopy {
  void* dst;
  unsigned char bytes[16];
};

// The cp.async of one GPU thread that have not reached shared memory yet.
struct AsyncCopies {
  std::vector<AsyncCopy> open;                   // issued since the last commit
  std::deque<std::vector<AsyncCopy>> committed;  // committed groups, oldest first
  size_t pending() const {
    size_t n = open.size();
    for (const auto& g : committed) n += g.size();
    return n;
  }
  void clear() {
    open.clear();
    committed.clear();
  }
};

// What the built-ins of a running launch read.
struct LaunchState {
  dim3 grid, block;
  uint3 block_idx{0, 0, 0};      // of the running block
  std::vector<uint3> thread_idx;  // by linear thread index
  std::vector<AsyncCopies> copies;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;

  uint3 block_of(uint32_t g) const { return uint3{g % grid.x, g / grid.x % grid.y, g / grid.x / grid.y}; }
};

inline std::string coords(uint3 v) {
  return "(" + std::to_string(v.x) + ", " + std::to_string(v.y) + ", " + std::to_string(v.z) + ")";
}

inline msl_emu::detail::Lane& lane(const char* what) { return msl_emu::detail::current(what); }
inline LaunchState& state(const msl_emu::detail::Lane& me) {
  return *static_cast<LaunchState*>(me.group->opts->user);
}

// Ends the launch with a message naming the calling thread (the block is named by the core).
[[noreturn]] inline void fail(msl_emu::detail::Lane& me, const std::string& what) {
  me.group->fail("thread " + coords(state(me).thread_idx[me.ids.lid]) + " (warp " +
                 std::to_string(me.ids.simdgroup) + ", lane " + std::to_string(me.ids.lane) + "): " + what);
}

inline std::string hex(const void* p) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%p", p);
  return buf;
}

inline void check_aligned16(msl_emu::detail::Lane& me, const char* what, const char* which, const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0)
    fail(me, std::string(what) + ": " + which + " address " + hex(p) + " is not 16-byte aligned");
}

// The configuration checks of a launch on a GPU of compute capability 8.x / 9.0. "" if fine.
inline std::string check_config(const void* kernel, dim3 grid, dim3 block, size_t smem, cudaError_t& code) {
  code = cudaErrorInvalidConfiguration;
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 || block.y > 1024 || block.z > 64 ||
      threads > 1024)
    return "block " + coords(block) + ": each dimension must be at least 1 (x, y <= 1024, z <= 64) and the block "
           "at most 1024 threads";
  if (threads % 32 != 0)
    return "block " + coords(block) + " has " + std::to_string(threads) +
           " threads: the CUDA emulation runs whole warps only (a multiple of 32 threads)";
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535)
    return "grid " + coords(grid) + ": each dimension must be at least 1 (x < 2^31, y, z <= 65535)";
  if (uint64_t(grid.x) * grid.y * grid.z > 0xffffffffull)
    return "grid " + coords(grid) + " has more blocks than the emulation counts (2^32 - 1)";
  code = cudaErrorInvalidValue;
  if (smem > kMaxDynamicSmemBytes)
    return std::to_string(smem) + " bytes of dynamic shared memory requested; a block may have at most " +
           std::to_string(kMaxDynamicSmemBytes);
  if (smem > kDefaultDynamicSmemBytes) {
    std::lock_guard<std::mutex> lk(attributes_mutex());
    auto it = max_dynamic_smem().find(kernel);
    const size_t allowed = it == max_dynamic_smem().end() ? kDefaultDynamicSmemBytes : it->second;
    if (smem > allowed)
      return std::to_string(smem) + " bytes of dynamic shared memory requested, above the kernel's limit of " +
             std::to_string(allowed) + " (more than 48 KiB needs cudaFuncSetAttribute(kernel, "
             "cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) first)";
  }
  code = cudaSuccess;
  return "";
}

// Runs `thread_body` (one GPU thread's code) for every thread of every block.
inline cudaError_t run_launch(const void* kernel, dim3 grid, dim3 block, size_t smem_bytes,
                              const std::function<void()>& thread_body) {
  tls_last_message.clear();
  cudaError_t code;
  std::string err = check_config(kernel, grid, block, smem_bytes, code);
  if (!err.empty()) {
    set_error(code, "launch: " + err);
    return cudaGetLastError();
  }
  LaunchState st;
  st.grid = grid;
  st.block = block;
  const uint32_t threads = block.x * block.y * block.z, blocks = grid.x * grid.y * grid.z;
  st.thread_idx.resize(threads);
  for (uint32_t i = 0; i < threads; ++i) st.thread_idx[i] = uint3{i % block.x, i / block.x % block.y, i / block.x / block.y};
  st.copies.resize(threads);
  // Exactly the requested size, so that AddressSanitizer sees a read past its end.
  struct AlignedDelete {
    void operator()(unsigned char* p) const { ::operator delete[](p, std::align_val_t(128)); }
  };
  std::unique_ptr<unsigned char[], AlignedDelete> smem(
      static_cast<unsigned char*>(::operator new[](smem_bytes ? smem_bytes : 1, std::align_val_t(128))));
  st.smem = smem.get();
  st.smem_bytes = smem_bytes;

  msl_emu::LaunchOptions o;
  o.mode = mode();
  o.dialect = &cuda_dialect;
  o.user = &st;
  o.before_group = [&st](uint32_t g) {
    st.block_idx = st.block_of(g);
    std::memset(st.smem, kSmemPoison, st.smem_bytes);
  };
  o.group_label = [&st](uint32_t g) { return "block " + coords(st.block_of(g)); };
  err = msl_emu::launch(blocks, threads, [&](const msl_emu::ThreadIds& id) {
    AsyncCopies& mine = st.copies[id.lid];
    mine.clear();  // left over from a thread cancelled in an earlier block
    thread_body();
    if (const size_t n = mine.pending())
      fail(lane("kernel exit"), "returned with " + std::to_string(n) +
                                    " cp.async copies not waited for (cp_async_commit() and cp_async_wait<0>() "
                                    "before the kernel returns)");
  }, o);
  if (!err.empty()) set_error(cudaErrorLaunchFailure, err);
  // BS_LAUNCH on a GPU reads cudaGetLastError() after the launch: it returns (and clears) an
  // earlier runtime error too.
  return cudaGetLastError();
}

}  // namespace detail

// kernel<<<grid, block, dynamic_smem_bytes, stream>>>(args...): runs the grid's blocks one
// after another (x fastest) and returns the launch's status, as BS_LAUNCH does on a GPU. The
// arguments are converted to the kernel's parameter types once, as a launch copies them.
template <class... P, class... A>
inline cudaError_t launch_kernel(void (*kernel)(P...), dim3 grid, dim3 block, size_t dynamic_smem_bytes,
                                 cudaStream_t /*stream*/, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "launch_kernel: wrong number of kernel arguments");
  static_assert(!std::disjunction<std::is_reference<P>...>::value, "kernel parameters are passed by value");
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  return detail::run_launch(reinterpret_cast<const void*>(kernel), grid, block, dynamic_smem_bytes,
                            [&] { std::apply(kernel, params); });
}

// The running block's dynamic shared memory (BS_DYNAMIC_SMEM): 128-byte aligned, poisoned
// with kSmemPoison before the block starts.
inline void* dynamic_shared_memory() {
  return detail::state(detail::lane("dynamic shared memory")).smem;
}

}  // namespace cuda_emu

// ---------------------------------------------------------------------------------------------
// Built-in variables, barriers, warp collectives
// ---------------------------------------------------------------------------------------------

namespace cuda_emu {
namespace detail {

inline uint3 thread_index() {
  const msl_emu::detail::Lane& me = lane("threadIdx");
  return state(me).thread_idx[me.ids.lid];
}
inline uint3 block_index() { return state(lane("blockIdx")).block_idx; }
inline dim3 block_dim() { return state(lane("blockDim")).block; }
inline dim3 grid_dim() { return state(lane("gridDim")).grid; }

inline void check_full_mask(msl_emu::detail::Lane& me, Op op, unsigned mask) {
  if (mask != 0xffffffffu) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "%s with mask %#010x: the emulation supports only the full mask 0xffffffff",
                  msl_emu::detail::op_name(op), mask);
    fail(me, buf);
  }
}

// The shfl.sync rules of the PTX ISA for a segment of `width` lanes: `b` (the source lane,
// lane mask or delta) is read modulo 32; a source outside the caller's segment (below it for
// up, above it for down and xor) yields the caller's own value; idx wraps within the segment.
template <class T> inline T shuffle(Op op, unsigned mask, const T& v, int b, int width) {
  static_assert(std::is_trivially_copyable<T>::value && (sizeof(T) == 2 || sizeof(T) == 4 || sizeof(T) == 8),
                "shuffles move 2-, 4- or 8-byte values");
  msl_emu::detail::Lane& me = lane(msl_emu::detail::op_name(op));
  check_full_mask(me, op, mask);
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    fail(me, std::string(msl_emu::detail::op_name(op)) + " with width " + std::to_string(width) +
                 ": width must be a power of two between 1 and 32");
  const auto x = msl_emu::detail::exchange(op, v);
  const int lane_id = int(x.lane), bval = b & 31, segmask = ~(width - 1) & 31;
  const int first = lane_id & segmask, last = first | (31 & ~segmask);
  int src;
  bool ok;
  switch (op) {
    case Op::shfl_up_sync: src = lane_id - bval; ok = src >= first; break;
    case Op::shfl_down_sync: src = lane_id + bval; ok = src <= last; break;
    case Op::shfl_xor_sync: src = lane_id ^ bval; ok = src <= last; break;
    default: src = first | (bval & ~segmask); ok = true; break;
  }
  return ok ? x.at(uint32_t(src)) : v;
}

}  // namespace detail
}  // namespace cuda_emu

#define threadIdx (::cuda_emu::detail::thread_index())
#define blockIdx (::cuda_emu::detail::block_index())
#define blockDim (::cuda_emu::detail::block_dim())
#define gridDim (::cuda_emu::detail::grid_dim())

// Waits until every thread of the block has arrived; memory written before is visible after.
inline void __syncthreads() {
  msl_emu::detail::Lane& me = cuda_emu::detail::lane("__syncthreads");
  me.group->barrier(me, msl_emu::detail::Op::syncthreads);
}

// Waits until the 32 lanes of the warp have arrived.
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  msl_emu::detail::Lane& me = cuda_emu::detail::lane("__syncwarp");
  cuda_emu::detail::check_full_mask(me, msl_emu::detail::Op::syncwarp, mask);
  me.group->simd_exchange(me, msl_emu::detail::Op::syncwarp, nullptr, 0);
}

template <class T> inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = warpSize) {
  return cuda_emu::detail::shuffle(msl_emu::detail::Op::shfl_sync, mask, v, src_lane, width);
}
template <class T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize) {
  return cuda_emu::detail::shuffle(msl_emu::detail::Op::shfl_xor_sync, mask, v, lane_mask, width);
}
template <class T> inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  return cuda_emu::detail::shuffle(msl_emu::detail::Op::shfl_down_sync, mask, v, int(delta), width);
}
template <class T> inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  return cuda_emu::detail::shuffle(msl_emu::detail::Op::shfl_up_sync, mask, v, int(delta), width);
}

// ---------------------------------------------------------------------------------------------
// PTX: tensor-core mma, ldmatrix, cp.async, streaming loads (declared in cuda/common.cuh)
// ---------------------------------------------------------------------------------------------

namespace bitswitch {
namespace cuda {
namespace ptx {

namespace emu_detail {

using msl_emu::detail::Lane;
using msl_emu::detail::Op;

// The value of the 16-bit element `half` (0: low, 1: high) of a register.
template <class T> inline float element(uint32_t reg, int half) {
  const uint16_t bits = uint16_t(reg >> (16 * half));
  T v;
  std::memcpy(static_cast<void*>(&v), &bits, 2);
  return float(v);
}

// r rounded to T: once for __half (a direct double -> _Float16 conversion); for
// __nv_bfloat16 through float, which rounds twice only when r needs more than 24 bits.
template <class T> inline T round_to(double r) { return T(r); }
template <> inline __nv_bfloat16 round_to<__nv_bfloat16>(double r) { return __nv_bfloat16(float(r)); }

// What one lane contributes to an mma: its fragments of A, B and C (40 bytes: one exchange).
struct MmaFragments {
  uint32_t a[4];
  uint32_t b[2];
  float c[4];
};

// ldmatrix of `count` 8x8 matrices of 16-bit elements. Two exchanges: the first gives every
// lane the row addresses; every lane then reads its registers; the second keeps every lane
// from going on (and overwriting shared memory) before all have read, as the warp-wide
// instruction guarantees.
inline void ldmatrix(Op op, int count, bool trans, uint32_t* r, const void* row_addr) {
  Lane& me = cuda_emu::detail::lane(msl_emu::detail::op_name(op));
  const auto rows = msl_emu::detail::exchange(op, row_addr);
  const uint32_t l = rows.lane;
  uint32_t out[4];
  for (int i = 0; i < count; ++i) {
    // Matrix i's row j starts at the address lane 8i + j gave; for x2 only lanes 0..15 count.
    auto row = [&](uint32_t j) {
      const void* p = rows.at(8 * uint32_t(i) + j);
      if (reinterpret_cast<uintptr_t>(p) % 16 != 0)
        cuda_emu::detail::fail(me, std::string(msl_emu::detail::op_name(op)) + ": lane " +
                                       std::to_string(8 * i + int(j)) + " gave row address " +
                                       cuda_emu::detail::hex(p) + ", which is not 16-byte aligned");
      return static_cast<const unsigned char*>(p);
    };
    if (!trans) {
      // Row l/4, columns 2(l%4) and 2(l%4)+1: 4 contiguous bytes.
      std::memcpy(&out[i], row(l / 4) + 4 * (l % 4), 4);
    } else {
      // Column l/4 of rows 2(l%4) (low half) and 2(l%4)+1 (high half).
      uint16_t lo, hi;
      std::memcpy(&lo, row(2 * (l % 4)) + 2 * (l / 4), 2);
      std::memcpy(&hi, row(2 * (l % 4) + 1) + 2 * (l / 4), 2);
      out[i] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
  }
  me.group->simd_exchange(me, op, nullptr, 0);
  std::memcpy(r, out, sizeof(uint32_t) * size_t(count));
}

}  // namespace emu_detail

// D = A * B + C, m16n8k16, A row-major, B column-major, float accumulators; the fragment
// layout of common.cuh (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point
// type"). A warp collective. Every element of D is c + a0*b0 + ... + a15*b15 summed in float
// in k order (each product is exact in float); d may be the same array as c.
template <class T> inline void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value,
                "mma_m16n8k16: T is __half or __nv_bfloat16");
  using emu_detail::Op;
  emu_detail::MmaFragments mine;
  std::memcpy(mine.a, a, sizeof mine.a);
  std::memcpy(mine.b, b, sizeof mine.b);
  std::memcpy(mine.c, c, sizeof mine.c);
  const auto x = msl_emu::detail::exchange(
      std::is_same<T, __half>::value ? Op::mma_m16n8k16_f16 : Op::mma_m16n8k16_bf16, mine);
  // A[row][k] is held by lane 4*(row%8) + (k%8)/2 in register (row/8) + 2*(k/8);
  // B[k][col] by lane 4*col + (k%8)/2 in register k/8; the low half has the even index.
  auto reg = [&](uint32_t lane, size_t offset) {  // one register of another lane's fragments
    uint32_t r;
    std::memcpy(&r, x.row + size_t(lane) * msl_emu::detail::kSlotBytes + offset, 4);
    return r;
  };
  auto a_at = [&](uint32_t row, uint32_t k) {
    const size_t offset = offsetof(emu_detail::MmaFragments, a) + 4 * (row / 8 + 2 * (k / 8));
    return emu_detail::element<T>(reg(4 * (row % 8) + (k % 8) / 2, offset), int(k % 2));
  };
  auto b_at = [&](uint32_t k, uint32_t col) {
    const size_t offset = offsetof(emu_detail::MmaFragments, b) + 4 * (k / 8);
    return emu_detail::element<T>(reg(4 * col + (k % 8) / 2, offset), int(k % 2));
  };
  const uint32_t g = x.lane / 4, t = x.lane % 4;
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const uint32_t row = g + 8 * uint32_t(i / 2), col = 2 * t + uint32_t(i % 2);
    float acc = mine.c[i];
    for (uint32_t k = 0; k < 16; ++k) acc = acc + a_at(row, k) * b_at(k, col);
    out[i] = acc;
  }
  std::memcpy(d, out, sizeof out);
}

// ldmatrix.sync.aligned.m8n8.{x4,x2}[.trans].shared.b16 (layout in common.cuh).
inline void ldmatrix_x4(uint32_t r[4], const void* row_addr) {
  emu_detail::ldmatrix(emu_detail::Op::ldmatrix_x4, 4, false, r, row_addr);
}
inline void ldmatrix_x4_trans(uint32_t r[4], const void* row_addr) {
  emu_detail::ldmatrix(emu_detail::Op::ldmatrix_x4_trans, 4, true, r, row_addr);
}
inline void ldmatrix_x2(uint32_t r[2], const void* row_addr) {
  emu_detail::ldmatrix(emu_detail::Op::ldmatrix_x2, 2, false, r, row_addr);
}
inline void ldmatrix_x2_trans(uint32_t r[2], const void* row_addr) {
  emu_detail::ldmatrix(emu_detail::Op::ldmatrix_x2_trans, 2, true, r, row_addr);
}

// cp.async.cg, 16 bytes: the source is read now, shared memory is written at the
// cp_async_wait that retires the group (zeros when !pred).
inline void cp_async16(void* smem, const void* gmem, bool pred) {
  emu_detail::Lane& me = cuda_emu::detail::lane("cp_async16");
  cuda_emu::detail::check_aligned16(me, "cp_async16", "shared", smem);
  cuda_emu::detail::check_aligned16(me, "cp_async16", "global", gmem);
  cuda_emu::detail::AsyncCopy c;
  c.dst = smem;
  if (pred) std::memcpy(c.bytes, gmem, 16);
  else std::memset(c.bytes, 0, 16);
  cuda_emu::detail::state(me).copies[me.ids.lid].open.push_back(c);
}

// Closes the group of this thread's cp.async issued since the last commit (possibly empty).
inline void cp_async_commit() {
  emu_detail::Lane& me = cuda_emu::detail::lane("cp_async_commit");
  cuda_emu::detail::AsyncCopies& q = cuda_emu::detail::state(me).copies[me.ids.lid];
  q.committed.push_back(std::move(q.open));
  q.open.clear();
}

// Completes this thread's committed groups but the newest N (uncommitted copies stay pending).
template <int N> inline void cp_async_wait() {
  static_assert(N >= 0, "cp_async_wait<N>: N >= 0");
  emu_detail::Lane& me = cuda_emu::detail::lane("cp_async_wait");
  cuda_emu::detail::AsyncCopies& q = cuda_emu::detail::state(me).copies[me.ids.lid];
  while (q.committed.size() > size_t(N)) {
    for (const cuda_emu::detail::AsyncCopy& c : q.committed.front()) std::memcpy(c.dst, c.bytes, 16);
    q.committed.pop_front();
  }
}

// 16-byte global loads (the cache hints mean nothing on a CPU; the alignment rule stays).
inline uint4 ld_stream(const void* p) {
  cuda_emu::detail::check_aligned16(cuda_emu::detail::lane("ld_stream"), "ld_stream", "global", p);
  uint4 r;
  std::memcpy(&r, p, 16);
  return r;
}
inline uint4 ld_nc(const void* p) {
  cuda_emu::detail::check_aligned16(cuda_emu::detail::lane("ld_nc"), "ld_nc", "global", p);
  uint4 r;
  std::memcpy(&r, p, 16);
  return r;
}

inline uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) { return (a & b) | c; }

// Each half: the exact a*b + c (in double: 16-bit products and sums of these magnitudes are
// exact there) rounded once to T.
template <class T> inline uint32_t fma2(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d = 0;
  for (int half = 0; half < 2; ++half) {
    const double r = double(emu_detail::element<T>(a, half)) * double(emu_detail::element<T>(b, half)) +
                     double(emu_detail::element<T>(c, half));
    const T v = emu_detail::round_to<T>(r);
    uint16_t bits;
    std::memcpy(&bits, static_cast<const void*>(&v), 2);
    d |= uint32_t(bits) << (16 * half);
  }
  return d;
}

// ex2.approx.ftz.f32: subnormal inputs read as zero, subnormal results flush to +0.
inline float ex2(float x) {
  if (std::fabs(x) < FLT_MIN) x = 0.0f;
  const float y = std::exp2(x);
  return y < FLT_MIN ? 0.0f : y;
}

}  // namespace ptx
}  // namespace cuda
}  // namespace bitswitch

// ---------------------------------------------------------------------------------------------
// For ctypes: the emulation's state, from Python
// ---------------------------------------------------------------------------------------------

// `used` makes every translation unit emit them (inline functions are otherwise only emitted
// where called); inline keeps several translation units of one library from clashing.
extern "C" {
__attribute__((used, visibility("default"))) inline const char* cuda_emu_last_error() {
  return cuda_emu::last_error().c_str();
}
// 1: every GPU thread an OS thread (Mode::threads); 0: fibers.
__attribute__((used, visibility("default"))) inline void cuda_emu_set_threads_mode(int threads) {
  cuda_emu::set_mode(threads ? cuda_emu::Mode::threads : cuda_emu::Mode::fibers);
}
}

// ---------------------------------------------------------------------------------------------
// CUDA's declaration specifiers. Defined last, after every standard header.
// ---------------------------------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
