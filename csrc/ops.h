// The ops glue: argument validation and dispatch, between the bindings and the kernels.
// Framework-free: arrays arrive as TensorViews (pointer, dtype, shape, strides).
// Every check happens before any kernel touches memory; a failed check throws
// ValueError or TypeError (translated to the Python exceptions of the same name) whose
// message names the op, the argument, what was given and what is allowed.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cpu/kernels.h"
#include "cuda_backend.h"

namespace bitswitch {

struct ValueError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct TypeError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class Device : int32_t { kCPU = 0, kCUDA = 1, kOther = 2 };

// A non-owning view of an array handed in from Python.
struct TensorView {
  static constexpr int kMaxDims = 8;
  void* data = nullptr;
  bool dtype_known = false;      // false: an element type no op accepts
  DType dtype = DType::kFloat32;
  std::string dtype_name;        // only when !dtype_known: as the caller's framework spells it
  int ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};  // in elements
  bool writable = true;
  Device device = Device::kCPU;
  int32_t device_index = -1;     // the CUDA device's number when device is kCUDA

  // The element type's name for messages.
  std::string type_str() const;
  int64_t numel() const;
  bool row_contiguous() const;
  std::string shape_str() const;
  bool is_float() const;  // float32, bfloat16 or float16
  // Whether the byte ranges the two arrays' elements span intersect (strides included).
  bool overlaps(const TensorView& other) const;
  // Where the array lives, for messages: "CPU memory", "cuda:1", "another device".
  std::string where() const;
  bool same_device(const TensorView& other) const {
    return device == other.device && (device != Device::kCUDA || device_index == other.device_index);
  }
};

// The CUDA backend's entry points (cuda_backend.h); null (the default) when bitswitch._cuda
// is not built or not loaded. Throws ValueError for a table of another ABI version.
void set_cuda_backend(const CudaBackend* backend);
const CudaBackend* cuda_backend();
// The table, or ValueError(op: `arg` is a CUDA array but ...) when there is none.
const CudaBackend& cuda_backend_or_throw(const char* op, const char* arg);
// Runs the backend entry pick(table) on `a` on the device of ref (the array named arg), with
// the caller's stream and scratch (cuda may be null: the default stream, no scratch). A
// failure becomes a RuntimeError naming the op and CUDA's message.
template <class Args, class Pick>
void run_cuda(const char* op, const char* arg, const TensorView& ref, const CudaLaunch* cuda, const Args& a,
              Pick pick) {
  const CudaBackend& backend = cuda_backend_or_throw(op, arg);
  CudaLaunch launch;
  if (cuda) launch = *cuda;
  launch.device = ref.device_index;
  char err[512] = {0};
  const int32_t rc = pick(backend)(&a, &launch, err, int32_t(sizeof(err)));
  if (rc != 0) throw std::runtime_error(std::string(op) + ": CUDA error " + std::to_string(rc) + ": " + err);
}

std::string dtype_str(DType t);

// The kernel variant to run, or ValueError(op: why) when the forced one cannot run here.
cpu::Variant variant_or_throw(const char* op);
// Turns a kernel's status into the exception the caller sees (bad_alloc, ValueError).
void check_status(const char* op, Status s);

// The arrays of a nibble-plane weight W[N, K].
struct WeightViews {
  TensorView plane0;   // uint32 [N, K/8]
  TensorView plane1;   // uint32 [N, K/8]; ignored unless has_plane1
  bool has_plane1 = false;
  TensorView scales;   // [N, K/G]
  TensorView biases;   // [N, K/G], dtype of scales
  int64_t group_size = 0;
};

// Checks a weight on its own: dtypes, shapes, group size, every array on plane0's device
// (CPU or CUDA). Throws like qmatmul.
void validate_weight(const char* op, const WeightViews& w);

// out[..., N] = x[..., K] @ W^T with W read as `bits` (4: plane 0, 8: planes 0 and 1) and x
// quantized per group at `act_bits` (16: float-grade, 8: int8; see cpu/act_quant.h).
// Every array on one device: CPU memory, or one CUDA device (then the CUDA kernels run on
// cuda->stream; act_bits must be 16 there).
void qmatmul(const TensorView& x, const WeightViews& w, int64_t bits, const TensorView& out,
             int64_t act_bits = 16, const CudaLaunch* cuda = nullptr);

// out[N, K] = W read as `bits`, in out's float dtype (each weight computed in float32 and
// rounded once). On CPU memory or on W's CUDA device (then on cuda->stream).
void dequantize(const WeightViews& w, int64_t bits, const TensorView& out, const CudaLaunch* cuda = nullptr);

// A block mask in BSR form per (batch, kv head); has_mask false means dense.
struct BlockMaskViews {
  bool has_mask = false;
  TensorView indptr;   // int32 [B, Hkv, ceil(Lq / block_q) + 1]
  TensorView indices;  // int32 [B, Hkv, capacity]
  int64_t block_q = 64;
  int64_t block_k = 64;
};

// out = softmax(scale q k^T [+ block mask] [+ causal]) v for q [B, Hq, Lq, D], k and v
// [B, Hkv, Lk, D] (unit stride on D, any other strides); lse, if given, float32 [B, Hq, Lq].
// scale NaN means D^-0.5. On CUDA the mask's shape and dtype are checked but not its
// contents (reading them would synchronize with the GPU): the kernels skip block numbers
// out of range instead.
// q_offsets, if given: int32 [B] on q's device, the q_offset of each batch row (replacing
// q_offset), so that a step captured in a CUDA graph reads its position from memory.
void attention(const TensorView& q, const TensorView& k, const TensorView& v, const BlockMaskViews& mask,
               bool causal, double scale, int64_t q_offset, const TensorView& out, const TensorView* lse,
               const CudaLaunch* cuda = nullptr, const TensorView* q_offsets = nullptr);
// Decode page selection (cpu/kernels.h PageSelectArgs has the exact contract): for q
// [B, Hq, 1, D] at positions[b] (int32 [B]) over the key cache k [B, Hkv, capacity, D],
// folds each position's key into the per-block key summaries (kmin, kmax: float32
// [B, Hkv, ceil(capacity / block_k), D], updated in place; they must summarize keys
// [0, position) already), then writes the n = indices.shape[2] best key blocks per (batch,
// kv head) into indices (int32 [B, Hkv, n]) in increasing order: a BSR mask row for
// attention with indptr [0, n]. Every array on q's device. On CUDA the positions are not
// read by the glue (that would synchronize): the kernel clamps them to [0, capacity).
void select_pages_at(const TensorView& q, const TensorView& k, const TensorView& kmin, const TensorView& kmax,
                     const TensorView& positions, const TensorView& indices, int64_t sinks, int64_t block_k,
                     const CudaLaunch* cuda = nullptr);
// Test hook: key-block ranges per decode task (split-KV) for every later call; 0 lets the
// kernel choose (it splits only when there are too few tasks for the threads).
void set_attention_kv_splits(int64_t n);

// Fused layer ops (cpu/layer_ops.h, cuda/layer_ops.cuh); every array C-contiguous, one
// float dtype, one device (CPU memory or one CUDA device: then queued on cuda->stream).
// x (+= delta, in place), out = RMSNorm(x) * weight over the last dimension; out may be x.
void rms_norm(const TensorView& x, const TensorView* delta, const TensorView& weight, double eps,
              const TensorView& out, const CudaLaunch* cuda = nullptr);
// From a fused projection qkv [B, n, (Hq + 2 Hkv) * D]: q (and k) RMSNorm over D when the
// weights are given, RoPE with rows pos.. of the cos/sin tables [P, D]; q to q_out
// [B, Hq, n, D], k and v to rows pos .. pos + n - 1 of the caches [B, Hkv, capacity, D].
// positions, if given: int32 [B] on qkv's device, each batch row's pos (replacing pos), so
// that a decode step captured in a CUDA graph reads its position from memory; on CUDA they
// are not read here (the kernel clamps them to the cache and the tables).
void rope_qkv(const TensorView& qkv, const TensorView* q_weight, const TensorView* k_weight, double eps,
              const TensorView& cos, const TensorView& sin, int64_t pos, const TensorView& q_out,
              const TensorView& k_cache, const TensorView& v_cache, const CudaLaunch* cuda = nullptr,
              const TensorView* positions = nullptr);
// out[..., I] = silu(gate_up[..., :I]) * gate_up[..., I:].
void silu_mul(const TensorView& gate_up, const TensorView& out, const CudaLaunch* cuda = nullptr);

// Reads a byte buffer on every pool thread; returns a checksum (the bandwidth anchor).
double read_stream(const TensorView& buffer);

}  // namespace bitswitch
