#include <atomic>
#include <sstream>

#include "bitswitch/format.h"
#include "cpu/convert.h"
#include "cpu/cpu_features.h"
#include "cpu/thread_pool.h"
#include "ops.h"

namespace bitswitch {

namespace fmt = bitswitch::format;

std::string TensorView::type_str() const { return dtype_known ? dtype_str(dtype) : dtype_name; }

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

bool TensorView::row_contiguous() const {
  int64_t expect = 1;
  for (int i = ndim - 1; i >= 0; --i) {
    if (shape[i] != 1 && strides[i] != expect) return false;
    expect *= shape[i];
  }
  return true;
}

std::string TensorView::shape_str() const {
  std::ostringstream s;
  s << "(";
  for (int i = 0; i < ndim; ++i) s << (i ? ", " : "") << shape[i];
  s << (ndim == 1 ? ",)" : ")");
  return s.str();
}

bool TensorView::is_float() const {
  return dtype_known && (dtype == DType::kFloat32 || dtype == DType::kBFloat16 || dtype == DType::kFloat16);
}

bool TensorView::overlaps(const TensorView& other) const {
  auto span = [](const TensorView& t, const char** lo, const char** hi) {
    int64_t last = 0;
    for (int i = 0; i < t.ndim; ++i) last += (t.shape[i] - 1) * t.strides[i];
    *lo = static_cast<const char*>(t.data);
    *hi = *lo + (last + 1) * cpu::dtype_size(t.dtype);
  };
  const char *a0, *a1, *b0, *b1;
  span(*this, &a0, &a1);
  span(other, &b0, &b1);
  return a0 < b1 && b0 < a1;
}

std::string TensorView::where() const {
  switch (device) {
    case Device::kCPU: return "CPU memory";
    case Device::kCUDA: return "cuda:" + std::to_string(device_index);
    default: return "another device";
  }
}

namespace {
std::atomic<const CudaBackend*> g_cuda_backend{nullptr};
}  // namespace

void set_cuda_backend(const CudaBackend* backend) {
  if (backend && backend->abi != kCudaBackendAbi)
    throw ValueError("bitswitch._cuda was built for backend ABI " + std::to_string(backend->abi) + ", _C expects " +
                     std::to_string(kCudaBackendAbi) + ": rebuild the package");
  g_cuda_backend.store(backend);
}

const CudaBackend* cuda_backend() { return g_cuda_backend.load(); }

const CudaBackend& cuda_backend_or_throw(const char* op, const char* arg) {
  const CudaBackend* b = g_cuda_backend.load();
  if (b == nullptr)
    throw ValueError(std::string(op) + ": " + arg + " is a CUDA array, but this build of bitswitch has no CUDA "
                     "kernels (bitswitch._cuda is built when nvcc is found at install time; see `bitswitch info`)");
  return *b;
}

void check_status(const char* op, Status s) {
  switch (s) {
    case Status::kOk: return;
    case Status::kOutOfMemory: throw std::bad_alloc();
    default: throw ValueError(std::string(op) + ": the kernel rejected its arguments (status " +
                              std::to_string(int(s)) + ")");
  }
}

cpu::Variant variant_or_throw(const char* op) {
  cpu::Variant v;
  std::string why;
  if (!cpu::active_variant(&v, &why)) throw ValueError(std::string(op) + ": " + why);
  return v;
}

std::string dtype_str(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat16: return "float16";
    case DType::kUInt32: return "uint32";
    case DType::kInt32: return "int32";
  }
  return "?";
}

namespace {

constexpr int64_t kMaxDim = int64_t(1) << 31;

std::string prefix(const char* op, const char* arg) { return std::string(op) + ": " + arg + " "; }

// The arrays of one call live on one device: `ref` (named ref_arg)'s, CPU or CUDA.
void check_device(const char* op, const char* arg, const TensorView& t, const char* ref_arg, const TensorView& ref) {
  if (ref.device == Device::kOther)
    throw ValueError(prefix(op, ref_arg) + "must be in CPU memory or on a CUDA device (this op has no kernel for its "
                     "device)");
  if (!t.same_device(ref))
    throw ValueError(prefix(op, arg) + "is in " + t.where() + " but " + ref_arg + " is in " + ref.where() +
                     "; put the weight and the activations on one device (e.g. QLinear.to(x.device))");
}

// Common checks for an array argument: 2-D, row-contiguous, non-empty.
void check_matrix(const char* op, const char* arg, const TensorView& t) {
  if (t.ndim != 2)
    throw ValueError(prefix(op, arg) + "must be 2-D, got " + std::to_string(t.ndim) + "-D with shape " +
                     t.shape_str());
  for (int i = 0; i < 2; ++i) {
    if (t.shape[i] <= 0)
      throw ValueError(prefix(op, arg) + "must not be empty, got shape " + t.shape_str());
    if (t.shape[i] >= kMaxDim)
      throw ValueError(prefix(op, arg) + "dimension too large: shape " + t.shape_str());
  }
  if (!t.row_contiguous())
    throw ValueError(prefix(op, arg) + "must be C-contiguous (row-major without gaps); make a contiguous copy first");
  if (t.data == nullptr) throw ValueError(prefix(op, arg) + "has no data");
}

// An array of rows [..., D]: at least 1-D, non-empty, row-contiguous.
void check_rows(const char* op, const char* arg, const TensorView& t) {
  if (t.ndim < 1) throw ValueError(prefix(op, arg) + "must have at least one dimension, got a scalar");
  for (int i = 0; i < t.ndim; ++i) {
    if (t.shape[i] <= 0) throw ValueError(prefix(op, arg) + "must not be empty, got shape " + t.shape_str());
    if (t.shape[i] >= kMaxDim) throw ValueError(prefix(op, arg) + "dimension too large: shape " + t.shape_str());
  }
  if (t.numel() >= (int64_t(1) << 40)) throw ValueError(prefix(op, arg) + "is too large: shape " + t.shape_str());
  if (!t.row_contiguous())
    throw ValueError(prefix(op, arg) + "must be C-contiguous (row-major without gaps); make a contiguous copy first");
  if (t.data == nullptr) throw ValueError(prefix(op, arg) + "has no data");
}

void check_dtype_float(const char* op, const char* arg, const TensorView& t) {
  if (!t.is_float())
    throw TypeError(prefix(op, arg) + "must be float32, bfloat16 or float16, got " + t.type_str());
}

void check_shape(const char* op, const char* arg, const TensorView& t, int64_t r, int64_t c, const char* why) {
  if (t.shape[0] != r || t.shape[1] != c) {
    std::ostringstream s;
    s << prefix(op, arg) << "must have shape (" << r << ", " << c << ") " << why << ", got " << t.shape_str();
    throw ValueError(s.str());
  }
}


}  // namespace

void validate_weight(const char* op, const WeightViews& w) {
  if (!fmt::is_supported_group_size(int(w.group_size)))
    throw ValueError(prefix(op, "group_size") + "must be 32, 64 or 128, got " + std::to_string(w.group_size));
  const TensorView& plane0 = w.plane0;
  check_device(op, "plane0", plane0, "plane0", plane0);
  check_matrix(op, "plane0", plane0);
  if (!plane0.dtype_known || plane0.dtype != DType::kUInt32)
    throw TypeError(prefix(op, "plane0") + "must be uint32 (8 codes per word), got " + plane0.type_str());
  const int64_t N = plane0.shape[0], K = plane0.shape[1] * fmt::kValuesPerWord;
  if (K % w.group_size != 0)
    throw ValueError(prefix(op, "plane0") + "holds K = " + std::to_string(K) + " inputs, not a multiple of group_size " +
                     std::to_string(w.group_size));
  if (w.has_plane1) {
    check_device(op, "plane1", w.plane1, "plane0", plane0);
    check_matrix(op, "plane1", w.plane1);
    if (!w.plane1.dtype_known || w.plane1.dtype != DType::kUInt32)
      throw TypeError(prefix(op, "plane1") + "must be uint32, got " + w.plane1.type_str());
    check_shape(op, "plane1", w.plane1, N, K / fmt::kValuesPerWord, "like plane0");
  }
  check_device(op, "scales", w.scales, "plane0", plane0);
  check_device(op, "biases", w.biases, "plane0", plane0);
  check_matrix(op, "scales", w.scales);
  check_matrix(op, "biases", w.biases);
  check_dtype_float(op, "scales", w.scales);
  check_dtype_float(op, "biases", w.biases);
  if (w.scales.dtype != w.biases.dtype)
    throw TypeError(prefix(op, "biases") + "must have the dtype of scales (" + w.scales.type_str() + "), got " +
                    w.biases.type_str());
  check_shape(op, "scales", w.scales, N, K / w.group_size, "(one per group of group_size inputs)");
  check_shape(op, "biases", w.biases, N, K / w.group_size, "(one per group of group_size inputs)");
}

void qmatmul(const TensorView& x, const WeightViews& w, int64_t bits, const TensorView& out, int64_t act_bits,
             const CudaLaunch* cuda) {
  const char* op = "qmatmul";
  if (!fmt::is_supported_bits(int(bits)))
    throw ValueError(prefix(op, "bits") + "must be 4 (plane 0) or 8 (planes 0 and 1), got " + std::to_string(bits));
  if (act_bits != 16 && act_bits != 8)
    throw ValueError(prefix(op, "act_bits") + "must be 16 (float-grade activations) or 8 (int8 per group), got " +
                     std::to_string(act_bits));
  validate_weight(op, w);
  if (bits == fmt::kInt8Bits && !w.has_plane1)
    throw ValueError(prefix(op, "bits") + "is 8 but the weight has no plane 1 (it holds only the INT4 view); use bits=4");
  // x [..., K] and out [..., N]: leading dimensions are rows.
  check_device(op, "x", x, "x", x);
  check_device(op, "plane0", w.plane0, "x", x);
  if (x.device == Device::kCUDA && act_bits != 16)
    throw ValueError(prefix(op, "act_bits") + "must be 16 for CUDA arrays (int8 activations are a CPU path), got " +
                     std::to_string(act_bits));
  check_rows(op, "x", x);
  check_dtype_float(op, "x", x);
  const int64_t K = x.shape[x.ndim - 1], M = x.numel() / K, N = w.plane0.shape[0];
  if (K != w.plane0.shape[1] * fmt::kValuesPerWord)
    throw ValueError(prefix(op, "x") + "has K = " + std::to_string(K) + " inputs but the weight expects " +
                     std::to_string(w.plane0.shape[1] * fmt::kValuesPerWord) + " (plane0 shape " +
                     w.plane0.shape_str() + ")");
  check_device(op, "out", out, "x", x);
  check_rows(op, "out", out);
  if (!out.dtype_known || out.dtype != x.dtype)
    throw TypeError(prefix(op, "out") + "must have the dtype of x (" + x.type_str() + "), got " + out.type_str());
  bool same_rows = out.ndim == x.ndim && out.shape[out.ndim - 1] == N;
  for (int i = 0; same_rows && i + 1 < x.ndim; ++i) same_rows = out.shape[i] == x.shape[i];
  if (!same_rows) {
    std::string want = x.shape_str();
    want = want.substr(0, want.rfind(std::to_string(K))) + std::to_string(N) + (x.ndim == 1 ? ",)" : ")");
    throw ValueError(prefix(op, "out") + "must have shape " + want + " (x's rows, N outputs), got " + out.shape_str());
  }
  if (!out.writable) throw ValueError(prefix(op, "out") + "is read-only");
  const TensorView* plane1 = w.has_plane1 ? &w.plane1 : nullptr;
  for (const TensorView* in : {&x, &w.plane0, plane1, &w.scales, &w.biases})
    if (in && out.overlaps(*in)) throw ValueError(prefix(op, "out") + "overlaps an input array");

  cpu::QMatmulArgs a;
  a.x = x.data;
  a.y = out.data;
  a.plane0 = static_cast<const uint32_t*>(w.plane0.data);
  a.plane1 = plane1 ? static_cast<const uint32_t*>(plane1->data) : nullptr;
  a.scales = w.scales.data;
  a.biases = w.biases.data;
  a.m = M;
  a.n = N;
  a.k = K;
  a.group_size = int32_t(w.group_size);
  a.bits = int32_t(bits);
  a.act_bits = int32_t(act_bits);
  a.x_dtype = x.dtype;
  a.scale_dtype = w.scales.dtype;

  if (x.device == Device::kCUDA) {
    // The CUDA kernels read plane rows with 16-byte loads (every allocator aligns that much;
    // a view starting mid-row would not be).
    for (const TensorView* t : {&w.plane0, plane1})
      if (t && (reinterpret_cast<uintptr_t>(t->data) & 15))
        throw ValueError(prefix(op, t == plane1 ? "plane1" : "plane0") +
                         "must start at a 16-byte aligned address on CUDA (a view that does not start at a row "
                         "boundary is not); make a contiguous copy");
    return run_cuda(op, "x", x, cuda, a, [](const CudaBackend& b) { return b.qmatmul; });
  }
  const cpu::Variant v = variant_or_throw(op);
  auto pool = cpu::pool();
  Status s;
  switch (v) {
    case cpu::Variant::kAmx: s = cpu::qmatmul_amx(a, *pool); break;
    case cpu::Variant::kAvx512Bf16: s = cpu::qmatmul_avx512bf16(a, *pool); break;
    case cpu::Variant::kAvx512: s = cpu::qmatmul_avx512(a, *pool); break;
    case cpu::Variant::kAvxVnni: s = cpu::qmatmul_avxvnni(a, *pool); break;
    case cpu::Variant::kAvx2: s = cpu::qmatmul_avx2(a, *pool); break;
    default: s = cpu::qmatmul_scalar(a, *pool); break;
  }
  check_status(op, s);
}

void dequantize(const WeightViews& w, int64_t bits, const TensorView& out, const CudaLaunch* cuda) {
  const char* op = "dequantize";
  if (!fmt::is_supported_bits(int(bits)))
    throw ValueError(prefix(op, "bits") + "must be 4 (plane 0) or 8 (planes 0 and 1), got " + std::to_string(bits));
  validate_weight(op, w);
  if (bits == fmt::kInt8Bits && !w.has_plane1)
    throw ValueError(prefix(op, "bits") + "is 8 but the weight has no plane 1 (it holds only the INT4 view); use bits=4");
  const int64_t N = w.plane0.shape[0], K = w.plane0.shape[1] * fmt::kValuesPerWord;
  check_device(op, "out", out, "plane0", w.plane0);
  check_matrix(op, "out", out);
  check_dtype_float(op, "out", out);
  check_shape(op, "out", out, N, K, "(the weight's rows by its inputs)");
  if (!out.writable) throw ValueError(prefix(op, "out") + "is read-only");
  const TensorView* plane1 = w.has_plane1 ? &w.plane1 : nullptr;
  for (const TensorView* in : {&w.plane0, plane1, &w.scales, &w.biases})
    if (in && out.overlaps(*in)) throw ValueError(prefix(op, "out") + "overlaps an input array");

  cpu::QMatmulArgs a{};
  a.y = out.data;
  a.plane0 = static_cast<const uint32_t*>(w.plane0.data);
  a.plane1 = bits == fmt::kInt8Bits ? static_cast<const uint32_t*>(plane1->data) : nullptr;
  a.scales = w.scales.data;
  a.biases = w.biases.data;
  a.n = N;
  a.k = K;
  a.group_size = int32_t(w.group_size);
  a.bits = int32_t(bits);
  a.act_bits = 16;
  a.x_dtype = out.dtype;
  a.scale_dtype = w.scales.dtype;
  if (out.device == Device::kCUDA) {
    for (const TensorView* t : {&w.plane0, a.plane1 ? plane1 : nullptr, &out})
      if (t && (reinterpret_cast<uintptr_t>(t->data) & 15))
        throw ValueError(prefix(op, t == &out ? "out" : t == plane1 ? "plane1" : "plane0") +
                         "must start at a 16-byte aligned address on CUDA; make a contiguous copy");
    return run_cuda(op, "out", out, cuda, a, [](const CudaBackend& b) { return b.dequantize; });
  }
  // CPU: rows in parallel, each weight as the scalar reference computes it.
  const int64_t groups = K / w.group_size, words = K / fmt::kValuesPerWord;
  auto scale = [&](const void* p, int64_t i) {
    switch (a.scale_dtype) {
      case DType::kBFloat16: return cpu::bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
      case DType::kFloat16: return cpu::f16_to_f32(static_cast<const uint16_t*>(p)[i]);
      default: return static_cast<const float*>(p)[i];
    }
  };
  auto pool = cpu::pool();
  pool->parallel_for(N, [&](int64_t n, int) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t g = n * groups + k / w.group_size;
      const float s = scale(a.scales, g), b = scale(a.biases, g);
      const uint32_t q = fmt::unpack_code(a.plane0[n * words + k / fmt::kValuesPerWord], int(k % fmt::kValuesPerWord));
      const float v = a.plane1 ? fmt::dequant_int8(q, fmt::unpack_code(a.plane1[n * words + k / fmt::kValuesPerWord],
                                                                   int(k % fmt::kValuesPerWord)), s, b)
                               : fmt::dequant_int4(q, s, b);
      switch (out.dtype) {
        case DType::kBFloat16: static_cast<uint16_t*>(out.data)[n * K + k] = cpu::f32_to_bf16(v); break;
        case DType::kFloat16: static_cast<uint16_t*>(out.data)[n * K + k] = cpu::f32_to_f16(v); break;
        default: static_cast<float*>(out.data)[n * K + k] = v;
      }
    }
  });
}

double read_stream(const TensorView& buffer) {
  if (buffer.device != Device::kCPU) throw ValueError("read_stream: buffer must be in CPU memory");
  if (!buffer.row_contiguous()) throw ValueError("read_stream: buffer must be contiguous");
  if (!buffer.dtype_known) throw TypeError("read_stream: buffer must be float32, bfloat16, float16 or uint32");
  auto pool = cpu::pool();
  return cpu::read_stream(buffer.data, size_t(buffer.numel() * cpu::dtype_size(buffer.dtype)), *pool);
}

}  // namespace bitswitch
