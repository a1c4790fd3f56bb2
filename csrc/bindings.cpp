// pybind11 module bitswitch._C: thin declarations over the ops glue.
//
// Array arguments may be numpy arrays (ml_dtypes.bfloat16 included), torch CPU tensors
// or anything exporting DLPack (MLX arrays); each is turned into a TensorView without a
// copy. The GIL is released while kernels run.
#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>

#include <cstring>
#include <deque>
#include <memory>
#include <vector>

#include "bitswitch/format.h"
#include "cpu/cpu_features.h"
#include "cpu/thread_pool.h"
#include "decode_step.h"
#include "dlpack.h"
#include "ops.h"

namespace py = pybind11;
namespace bs = bitswitch;
namespace fmt = bitswitch::format;

#ifndef BITSWITCH_VERSION
#define BITSWITCH_VERSION "0.0.0"
#endif

namespace {

// A TensorView plus whatever keeps its memory alive while an op runs.
struct Arg {
  bs::TensorView v;
  py::object keep;
  bs::dlpack::ManagedTensor* managed = nullptr;
  Arg() = default;
  Arg(const Arg&) = delete;
  Arg& operator=(const Arg&) = delete;
  ~Arg() {
    if (managed && managed->deleter) managed->deleter(managed);  // runs with the GIL held
  }
};

// A weight's arrays, converted once.
struct PackedWeight {
  Arg plane0, plane1, scales, biases;
  bs::WeightViews w;
  // torch tensors can have their storage swapped (Tensor.set_, .data =); holding the
  // storages keeps every pointer above valid for as long as this object lives.
  std::vector<py::object> storages;
};

std::string type_name(py::handle obj) { return py::str(py::type::handle_of(obj).attr("__name__")); }

std::string arg_prefix(const char* op, const char* name) { return std::string(op) + ": " + name + " "; }

// torch is optional: its types are looked up once torch has been imported (a module in
// sys.modules), never imported from here.
struct TorchTypes {
  bool ready = false;
  py::object tensor, f32, bf16, f16, u32, i32;
};

TorchTypes& torch_types() {
  static TorchTypes* t = new TorchTypes();  // leaked: must outlive interpreter teardown
  if (!t->ready) {
    PyObject* torch = PyImport_GetModule(py::str("torch").ptr());  // new ref or null, no import
    if (torch == nullptr) {
      PyErr_Clear();
      return *t;
    }
    py::object mod = py::reinterpret_steal<py::object>(torch);
    if (py::hasattr(mod, "Tensor") && py::hasattr(mod, "uint32")) {
      t->tensor = mod.attr("Tensor");
      t->f32 = mod.attr("float32");
      t->bf16 = mod.attr("bfloat16");
      t->f16 = mod.attr("float16");
      t->u32 = mod.attr("uint32");
      t->i32 = mod.attr("int32");
      t->ready = true;
    }
  }
  return *t;
}

// The tensor attributes from_torch reads, as interned strings made once (leaked: they must
// outlive interpreter teardown). Looking them up through these rather than through
// py::object::attr(const char*) saves building a string per access: ~1 us per attention call
// (four tensors), a sizable part of a decode step's call.
struct TorchNames {
  PyObject *dtype, *is_cpu, *is_cuda, *shape, *stride, *data_ptr, *get_device;
};

const TorchNames& torch_names() {
  static const TorchNames* n = new TorchNames{
      PyUnicode_InternFromString("dtype"), PyUnicode_InternFromString("is_cpu"),
      PyUnicode_InternFromString("is_cuda"), PyUnicode_InternFromString("shape"),
      PyUnicode_InternFromString("stride"), PyUnicode_InternFromString("data_ptr"),
      PyUnicode_InternFromString("get_device")};
  return *n;
}

py::object get_attr(py::handle obj, PyObject* name) {
  PyObject* r = PyObject_GetAttr(obj.ptr(), name);
  if (!r) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(r);
}

py::object call_method(py::handle obj, PyObject* name) {
  PyObject* r = PyObject_CallMethodNoArgs(obj.ptr(), name);
  if (!r) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(r);
}

bool from_torch(py::handle obj, Arg& a, const char* op, const char* name) {
  TorchTypes& t = torch_types();
  if (!t.ready || !py::isinstance(obj, t.tensor)) return false;
  const TorchNames& n = torch_names();
  bs::TensorView& v = a.v;
  py::object dt = get_attr(obj, n.dtype);
  v.dtype_known = true;
  if (dt.is(t.f32)) v.dtype = bs::DType::kFloat32;
  else if (dt.is(t.bf16)) v.dtype = bs::DType::kBFloat16;
  else if (dt.is(t.f16)) v.dtype = bs::DType::kFloat16;
  else if (dt.is(t.u32)) v.dtype = bs::DType::kUInt32;
  else if (dt.is(t.i32)) v.dtype = bs::DType::kInt32;
  else {
    v.dtype_known = false;
    v.dtype_name = py::str(dt);
  }
  v.device = get_attr(obj, n.is_cpu).ptr() == Py_True    ? bs::Device::kCPU
             : get_attr(obj, n.is_cuda).ptr() == Py_True ? bs::Device::kCUDA
                                                         : bs::Device::kOther;
  if (v.device == bs::Device::kCUDA) v.device_index = int32_t(PyLong_AsLong(call_method(obj, n.get_device).ptr()));
  py::tuple sh = get_attr(obj, n.shape);
  if (sh.size() > size_t(bs::TensorView::kMaxDims))
    throw bs::ValueError(arg_prefix(op, name) + "has too many dimensions");
  v.ndim = int(sh.size());
  py::tuple st = call_method(obj, n.stride);
  for (int i = 0; i < v.ndim; ++i) {
    v.shape[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(sh.ptr(), i));
    v.strides[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(st.ptr(), i));
  }
  v.data = PyLong_AsVoidPtr(call_method(obj, n.data_ptr).ptr());
  v.writable = true;
  a.keep = py::reinterpret_borrow<py::object>(obj);
  return true;
}

// numpy type numbers of the accepted dtypes; bfloat16 comes from ml_dtypes (registered
// at run time, so its number is looked up once).
struct NumpyTypes {
  int f32, f16, u32, i32, bf16 = -1;
};

const NumpyTypes& numpy_types() {
  static const NumpyTypes t = [] {
    NumpyTypes r;
    r.f32 = py::dtype::of<float>().num();
    r.f16 = py::dtype("float16").num();
    r.u32 = py::dtype::of<uint32_t>().num();
    r.i32 = py::dtype::of<int32_t>().num();
    try {
      r.bf16 = py::dtype::from_args(py::module_::import("ml_dtypes").attr("bfloat16")).num();
    } catch (const py::error_already_set&) {
    }
    return r;
  }();
  return t;
}

bool from_numpy(py::handle obj, Arg& a, const char* op, const char* name) {
  if (!py::isinstance<py::array>(obj)) return false;
  py::array arr = py::reinterpret_borrow<py::array>(obj);
  bs::TensorView& v = a.v;
  const NumpyTypes& nt = numpy_types();
  py::dtype dt = arr.dtype();
  const int num = dt.num();
  const auto size = dt.itemsize();
  v.dtype_known = true;
  if (num == nt.f32) v.dtype = bs::DType::kFloat32;
  else if (num == nt.f16) v.dtype = bs::DType::kFloat16;
  else if (num == nt.u32) v.dtype = bs::DType::kUInt32;
  else if (num == nt.i32) v.dtype = bs::DType::kInt32;
  else if (num == nt.bf16) v.dtype = bs::DType::kBFloat16;
  else {
    v.dtype_known = false;
    v.dtype_name = py::str(dt);
  }
  if (arr.ndim() > bs::TensorView::kMaxDims) throw bs::ValueError(arg_prefix(op, name) + "has too many dimensions");
  v.ndim = int(arr.ndim());
  for (int i = 0; i < v.ndim; ++i) {
    v.shape[i] = arr.shape(i);
    // numpy strides are in bytes; a stride that is not a whole element is never contiguous.
    v.strides[i] = size > 0 && arr.strides(i) % size == 0 ? arr.strides(i) / size : -1;
  }
  v.data = const_cast<void*>(arr.data());
  v.writable = arr.writeable();
  v.device = bs::Device::kCPU;
  a.keep = arr;
  return true;
}

bool from_dlpack(py::handle obj, Arg& a, const char* op, const char* name) {
  if (!py::hasattr(obj, "__dlpack__")) return false;
  py::object cap = obj.attr("__dlpack__")();
  PyObject* c = cap.ptr();
  if (!PyCapsule_IsValid(c, "dltensor"))
    throw bs::TypeError(arg_prefix(op, name) + "exported an unsupported DLPack capsule");
  auto* mt = static_cast<bs::dlpack::ManagedTensor*>(PyCapsule_GetPointer(c, "dltensor"));
  PyCapsule_SetName(c, "used_dltensor");  // consumed: we call the deleter
  a.managed = mt;
  const bs::dlpack::Tensor& t = mt->dl_tensor;
  bs::TensorView& v = a.v;
  const auto& d = t.dtype;
  v.dtype_known = d.lanes == 1;
  if (d.code == bs::dlpack::kDLFloat && d.bits == 32) v.dtype = bs::DType::kFloat32, v.dtype_name = "float32";
  else if (d.code == bs::dlpack::kDLFloat && d.bits == 16) v.dtype = bs::DType::kFloat16, v.dtype_name = "float16";
  else if (d.code == bs::dlpack::kDLBfloat && d.bits == 16) v.dtype = bs::DType::kBFloat16, v.dtype_name = "bfloat16";
  else if (d.code == bs::dlpack::kDLUInt && d.bits == 32) v.dtype = bs::DType::kUInt32, v.dtype_name = "uint32";
  else if (d.code == bs::dlpack::kDLInt && d.bits == 32) v.dtype = bs::DType::kInt32, v.dtype_name = "int32";
  else {
    v.dtype_known = false;
    const char* kinds[] = {"int", "uint", "float", "?", "bfloat"};
    v.dtype_name = std::string(d.code <= 4 ? kinds[d.code] : "?") + std::to_string(d.bits);
  }
  if (t.ndim > bs::TensorView::kMaxDims || t.ndim < 0)
    throw bs::ValueError(arg_prefix(op, name) + "has too many dimensions");
  v.ndim = t.ndim;
  int64_t expect = 1;
  for (int i = v.ndim - 1; i >= 0; --i) {
    v.shape[i] = t.shape[i];
    v.strides[i] = t.strides ? t.strides[i] : expect;
    expect *= t.shape[i];
  }
  v.data = static_cast<char*>(t.data) + t.byte_offset;
  v.writable = false;  // DLPack producers here (MLX) treat their arrays as immutable
  v.device = t.device.device_type == bs::dlpack::kDLCPU ? bs::Device::kCPU
             : t.device.device_type == bs::dlpack::kDLCUDA ? bs::Device::kCUDA
                                                            : bs::Device::kOther;
  v.device_index = t.device.device_id;
  a.keep = std::move(cap);
  return true;
}

// Fills `a` from a numpy array, torch tensor or DLPack exporter.
void to_arg(py::handle obj, Arg& a, const char* op, const char* name) {
  if (from_numpy(obj, a, op, name) || from_torch(obj, a, op, name) || from_dlpack(obj, a, op, name)) return;
  throw bs::TypeError(arg_prefix(op, name) +
                      "must be a numpy array, a torch tensor or an array exporting DLPack (MLX), got " +
                      type_name(obj));
}

// A native decode step and the arrays it reads: each converted once, kept alive (with its
// storage, as for PackedWeight) for as long as the step lives.
struct DecodeStepHolder {
  std::deque<Arg> args;  // a deque: the Args never move
  std::vector<py::object> storages;
  std::unique_ptr<bs::DecodeStep> step;

  const bs::TensorView& keep(py::handle obj, const char* name) {
    args.emplace_back();
    to_arg(obj, args.back(), "DecodeStep", name);
    if (py::hasattr(obj, "untyped_storage")) storages.push_back(obj.attr("untyped_storage")());
    return args.back().v;
  }

  // (plane0, plane1 or None, scales, biases, group_size, bits, act_bits, bias or None)
  bs::DecodeLinear linear(py::handle spec, const char* name) {
    py::tuple t = py::reinterpret_borrow<py::tuple>(spec);
    if (!py::isinstance<py::tuple>(spec) || t.size() != 8)
      throw bs::ValueError(std::string("DecodeStep: ") + name +
                           " must be (plane0, plane1, scales, biases, group_size, bits, act_bits, bias)");
    bs::DecodeLinear l;
    l.w.plane0 = keep(t[0], name);
    l.w.has_plane1 = !t[1].is_none();
    if (l.w.has_plane1) l.w.plane1 = keep(t[1], name);
    l.w.scales = keep(t[2], name);
    l.w.biases = keep(t[3], name);
    l.w.group_size = t[4].cast<int64_t>();
    l.bits = t[5].cast<int64_t>();
    l.act_bits = t[6].cast<int64_t>();
    l.has_bias = !t[7].is_none();
    if (l.has_bias) l.bias = keep(t[7], name);
    return l;
  }

  // One linear spec, or a list of them (the parts of a fused projection).
  std::vector<bs::DecodeLinear> parts(py::handle spec, const char* name) {
    std::vector<bs::DecodeLinear> out;
    if (py::isinstance<py::list>(spec)) {
      for (py::handle s : spec) out.push_back(linear(s, name));
    } else {
      out.push_back(linear(spec, name));
    }
    return out;
  }
};

// A weight's four arrays (plane1 may be None) into pw's Args and views, unvalidated.
void to_weight(const char* op, py::handle plane0, py::handle plane1, py::handle scales, py::handle biases,
               int64_t group_size, PackedWeight& pw) {
  to_arg(plane0, pw.plane0, op, "plane0");
  pw.w.has_plane1 = !plane1.is_none();
  if (pw.w.has_plane1) to_arg(plane1, pw.plane1, op, "plane1");
  to_arg(scales, pw.scales, op, "scales");
  to_arg(biases, pw.biases, op, "biases");
  pw.w.plane0 = pw.plane0.v;
  pw.w.plane1 = pw.plane1.v;
  pw.w.scales = pw.scales.v;
  pw.w.biases = pw.biases.v;
  pw.w.group_size = group_size;
}

bs::CudaLaunch cuda_launch(uintptr_t stream, uintptr_t workspace, int64_t workspace_bytes) {
  if (workspace_bytes < 0 || (workspace == 0 && workspace_bytes != 0))
    throw bs::ValueError("workspace_bytes must be >= 0, and 0 when there is no workspace");
  bs::CudaLaunch l;
  l.stream = reinterpret_cast<void*>(stream);
  l.workspace = reinterpret_cast<void*>(workspace);
  l.workspace_bytes = workspace_bytes;
  return l;
}

py::dict cpu_info() {
  const auto& f = bs::cpu::cpu_features();
  py::dict d;
  d["vendor"] = f.vendor;
  d["brand"] = f.brand;
  py::dict feats;
  feats["avx2"] = f.avx2;
  feats["fma"] = f.fma;
  feats["f16c"] = f.f16c;
  feats["avx512f"] = f.avx512f;
  feats["avx512bw"] = f.avx512bw;
  feats["avx512dq"] = f.avx512dq;
  feats["avx512vl"] = f.avx512vl;
  feats["avx512vnni"] = f.avx512vnni;
  feats["avx512bf16"] = f.avx512bf16;
  feats["avx_vnni"] = f.avx_vnni;
  feats["amx_tile"] = f.amx_tile;
  feats["amx_bf16"] = f.amx_bf16;
  feats["amx_int8"] = f.amx_int8;
  feats["os_avx"] = f.os_ymm;
  feats["os_avx512"] = f.os_zmm;
  feats["os_amx"] = f.os_amx;
  d["features"] = feats;
  py::dict variants;
  for (auto v : bs::cpu::kAllVariants) {
    std::string why;
    const bool ok = bs::cpu::variant_supported(v, &why);
    variants[bs::cpu::variant_name(v)] = ok ? py::object(py::str("ok")) : py::object(py::str(why));
  }
  d["variants"] = variants;
  d["best"] = bs::cpu::variant_name(bs::cpu::best_variant());
  bs::cpu::Variant active;
  std::string why;
  d["active"] = bs::cpu::active_variant(&active, &why) ? py::object(py::str(bs::cpu::variant_name(active)))
                                                       : py::object(py::none());
  d["active_error"] = why;
  d["avx512_emulated"] = bs::cpu::avx512_emulated();
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "bitswitch native CPU kernels (framework-free; see bitswitch.ops for the Python API)";
  m.attr("__version__") = BITSWITCH_VERSION;

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const bs::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const bs::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    }
  });

  py::module_ f = m.def_submodule("format", "Constants of the nibble-plane format (csrc/include/bitswitch/format.h)");
  f.attr("PLANE_BITS") = fmt::kPlaneBits;
  f.attr("VALUES_PER_WORD") = fmt::kValuesPerWord;
  f.attr("CODE_MAX") = fmt::kCodeMax;
  f.attr("MAX_PLANES") = fmt::kMaxPlanes;
  f.attr("GROUP_SIZES") = py::make_tuple(fmt::kGroupSize32, fmt::kGroupSize64, fmt::kGroupSize128);
  f.attr("BITS") = py::make_tuple(fmt::kInt4Bits, fmt::kInt8Bits);
  f.attr("RESIDUAL_DIVISOR") = fmt::kResidualDivisor;
  f.attr("RESIDUAL_CENTER") = fmt::kResidualCenter;

  py::class_<PackedWeight>(m, "PackedWeight", R"doc(A weight's arrays resolved once for repeated qmatmul_packed calls.

Holds references to plane0, plane1 (or None), scales and biases and their validated
views, so a call converts only x and out. The arrays must not be resized or moved while
it is in use (build a new one if they are replaced).)doc")
      .def(py::init([](py::handle plane0, py::handle plane1, py::handle scales, py::handle biases,
                       int64_t group_size) {
             auto pw = std::make_unique<PackedWeight>();
             const char* op = "PackedWeight";
             to_weight(op, plane0, plane1, scales, biases, group_size, *pw);
             bs::validate_weight(op, pw->w);
             for (py::handle h : {plane0, plane1, scales, biases})
               if (!h.is_none() && py::hasattr(h, "untyped_storage"))
                 pw->storages.push_back(h.attr("untyped_storage")());
             return pw;
           }),
           py::arg("plane0"), py::arg("plane1"), py::arg("scales"), py::arg("biases"), py::arg("group_size"))
      .def_property_readonly("shape", [](const PackedWeight& p) {
        return py::make_tuple(p.w.plane0.shape[0], p.w.plane0.shape[1] * fmt::kValuesPerWord);
      })
      .def_property_readonly("has_plane1", [](const PackedWeight& p) { return p.w.has_plane1; });

  m.def(
      "qmatmul",
      [](py::handle x, py::handle plane0, py::handle plane1, py::handle scales, py::handle biases,
         int64_t group_size, int64_t bits, py::handle out, int64_t act_bits, uintptr_t stream,
         uintptr_t workspace, int64_t workspace_bytes) {
        const char* op = "qmatmul";
        Arg ax, ao;
        PackedWeight pw;
        to_arg(x, ax, op, "x");
        to_weight(op, plane0, plane1, scales, biases, group_size, pw);
        to_arg(out, ao, op, "out");
        const bs::CudaLaunch launch = cuda_launch(stream, workspace, workspace_bytes);
        py::gil_scoped_release nogil;
        bs::qmatmul(ax.v, pw.w, bits, ao.v, act_bits, &launch);
      },
      py::arg("x"), py::arg("plane0"), py::arg("plane1"), py::arg("scales"), py::arg("biases"),
      py::arg("group_size"), py::arg("bits"), py::arg("out"), py::arg("act_bits") = 16, py::arg("stream") = 0,
      py::arg("workspace") = 0, py::arg("workspace_bytes") = 0,
      R"doc(out[M, N] = x[M, K] @ W[N, K]^T for a nibble-plane weight W.

x: float32/bfloat16/float16 [M, K]; plane0, plane1: uint32 [N, K/8] (plane1 may be None,
then only bits=4 is possible); scales, biases: [N, K/group_size], one float dtype; out:
[M, N] of x's dtype, written in place. bits 4 reads plane 0 (w = s*q + b), bits 8 reads
both planes (w = s*q + b + s/16*(r - 7.5)). act_bits 16 quantizes x per group to 15 bits
(float-grade), 8 to int8 per group (faster, ~0.4% relative error). All arrays C-contiguous,
all in CPU memory or all on one CUDA device. For CUDA arrays (act_bits 16 only) the kernel
is queued on `stream` (a cudaStream_t as an integer, 0: the default stream) with
`workspace_bytes` of scratch at device address `workspace` (see
bitswitch._cuda.qmatmul_workspace_bytes); nothing waits for it to finish.)doc");

  m.def(
      "dequantize",
      [](py::handle plane0, py::handle plane1, py::handle scales, py::handle biases, int64_t group_size, int64_t bits,
         py::handle out, uintptr_t stream) {
        const char* op = "dequantize";
        Arg ao;
        PackedWeight pw;
        to_weight(op, plane0, plane1, scales, biases, group_size, pw);
        to_arg(out, ao, op, "out");
        const bs::CudaLaunch launch = cuda_launch(stream, 0, 0);
        py::gil_scoped_release nogil;
        bs::dequantize(pw.w, bits, ao.v, &launch);
      },
      py::arg("plane0"), py::arg("plane1"), py::arg("scales"), py::arg("biases"), py::arg("group_size"),
      py::arg("bits"), py::arg("out"), py::arg("stream") = 0,
      R"doc(out[N, K] = W, the nibble-plane weight read as `bits` (4: plane 0, 8: planes 0 and 1),
in out's float dtype (float32, bfloat16 or float16): each weight computed in float32 and
rounded once. Arrays as for qmatmul: all in CPU memory or all on one CUDA device (then the
kernel is queued on `stream`, nothing waits for it).)doc");

  py::class_<DecodeStepHolder>(m, "DecodeStep", R"doc(One decode step of a Qwen3 / Qwen2 model in one native call (CPU).

Built once from the model's arrays (bitswitch.models.qwen3 does it; rebuilt when the precision,
the cache or the RoPE tables change), then run() per token: embedding, every layer (norms,
projections, q/k norm + RoPE + cache write, dense or page-selected attention, SiLU) and the
lm_head, through the same kernels as the Python path, so the logits are the same bit for bit.

dims: (batch, hidden, heads, kv_heads, head_dim, intermediate, vocab). A linear is (plane0,
plane1 or None, scales, biases, group_size, bits, act_bits, bias or None); q|k|v and gate|up
are one fused linear or a list of their parts (outputs side by side along N). layers: (qkv,
o_proj, gate_up, down_proj, input_norm, post_norm, q_norm or None, k_norm or None, k_cache,
v_cache) per layer.)doc")
      .def(py::init([](py::tuple dims, double eps, py::handle embed, py::handle lm_head, py::handle final_norm,
                       py::handle cos, py::handle sin, py::list layers) {
             auto h = std::make_unique<DecodeStepHolder>();
             if (dims.size() != 7)
               throw bs::ValueError("DecodeStep: dims must be (batch, hidden, heads, kv_heads, head_dim, intermediate, vocab)");
             bs::DecodeModel dm;
             int64_t* d[] = {&dm.batch, &dm.hidden, &dm.heads, &dm.kv_heads, &dm.head_dim, &dm.intermediate, &dm.vocab};
             for (size_t i = 0; i < 7; ++i) *d[i] = dims[i].cast<int64_t>();
             dm.eps = eps;
             dm.embed = h->linear(embed, "embed");
             dm.lm_head = h->linear(lm_head, "lm_head");
             dm.final_norm = h->keep(final_norm, "final_norm");
             if (!dm.final_norm.dtype_known) throw bs::TypeError("DecodeStep: final_norm must be a float array");
             dm.dtype = dm.final_norm.dtype;
             dm.cos = h->keep(cos, "cos");
             dm.sin = h->keep(sin, "sin");
             for (py::handle layer : layers) {
               py::tuple t = py::reinterpret_borrow<py::tuple>(layer);
               if (!py::isinstance<py::tuple>(layer) || t.size() != 10)
                 throw bs::ValueError("DecodeStep: a layer must be (qkv, o_proj, gate_up, down_proj, input_norm, "
                                      "post_norm, q_norm, k_norm, k_cache, v_cache)");
               bs::DecodeLayer l;
               l.qkv = h->parts(t[0], "qkv");
               l.o = h->linear(t[1], "o_proj");
               l.gate_up = h->parts(t[2], "gate_up");
               l.down = h->linear(t[3], "down_proj");
               l.input_norm = h->keep(t[4], "input_norm");
               l.post_norm = h->keep(t[5], "post_norm");
               l.qk_norm = !t[6].is_none();
               if (l.qk_norm != !t[7].is_none())
                 throw bs::ValueError("DecodeStep: q_norm and k_norm must be given together or both be None");
               if (l.qk_norm) {
                 l.q_norm = h->keep(t[6], "q_norm");
                 l.k_norm = h->keep(t[7], "k_norm");
               }
               l.k_cache = h->keep(t[8], "k_cache");
               l.v_cache = h->keep(t[9], "v_cache");
               dm.layers.push_back(l);
             }
             h->step = std::make_unique<bs::DecodeStep>(std::move(dm));
             return h;
           }),
           py::arg("dims"), py::arg("eps"), py::arg("embed"), py::arg("lm_head"), py::arg("final_norm"), py::arg("cos"),
           py::arg("sin"), py::arg("layers"))
      .def(
          "run",
          [](DecodeStepHolder& h, py::list id_list, int64_t pos, py::list pages, py::handle logits) {
            std::vector<int64_t> ids;
            for (py::handle i : id_list) ids.push_back(i.cast<int64_t>());
            std::deque<Arg> keep;
            std::vector<bs::DecodePagesArg> pa;
            for (py::handle p : pages) {
              py::tuple t = py::reinterpret_borrow<py::tuple>(p);
              if (!py::isinstance<py::tuple>(p) || t.size() != 5)
                throw bs::ValueError("DecodeStep.run: pages must be (layer, kmin, kmax, n, block_k) tuples");
              bs::DecodePagesArg a;
              a.layer = t[0].cast<int64_t>();
              keep.emplace_back();
              to_arg(t[1], keep.back(), "DecodeStep", "kmin");
              a.kmin = keep.back().v;
              keep.emplace_back();
              to_arg(t[2], keep.back(), "DecodeStep", "kmax");
              a.kmax = keep.back().v;
              a.n = t[3].cast<int64_t>();
              a.block_k = t[4].cast<int64_t>();
              pa.push_back(a);
            }
            Arg al;
            to_arg(logits, al, "DecodeStep", "logits");
            py::gil_scoped_release nogil;
            h.step->run(ids, pos, pa, al.v);
          },
          py::arg("ids"), py::arg("pos"), py::arg("pages"), py::arg("logits"),
          R"doc(Logits [batch, 1, vocab] (written into `logits`) of one token per batch row at cache
position pos; pages: (layer, kmin, kmax, n, block_k) for each layer that selects pages this step
(bitswitch.torch.DecodePages' summaries, updated in place).)doc");

  m.def(
      "qmatmul_packed",
      [](py::handle x, const PackedWeight& pw, int64_t bits, py::handle out, int64_t act_bits) {
        const char* op = "qmatmul";
        Arg ax, ao;
        to_arg(x, ax, op, "x");
        to_arg(out, ao, op, "out");
        py::gil_scoped_release nogil;
        bs::qmatmul(ax.v, pw.w, bits, ao.v, act_bits);
      },
      py::arg("x"), py::arg("weight"), py::arg("bits"), py::arg("out"), py::arg("act_bits") = 16,
      "qmatmul with a PackedWeight: only x and out are converted per call.");

  m.def(
      "attention",
      [](py::handle q, py::handle k, py::handle v, py::handle indptr, py::handle indices, int64_t block_q,
         int64_t block_k, bool causal, double scale, int64_t q_offset, py::handle out, py::handle lse,
         uintptr_t stream, uintptr_t workspace, int64_t workspace_bytes, py::handle q_offsets) {
        const char* op = "attention";
        Arg aq, ak, av, ap, ai, ao, al, aqo;
        to_arg(q, aq, op, "q");
        to_arg(k, ak, op, "k");
        to_arg(v, av, op, "v");
        to_arg(out, ao, op, "out");
        bs::BlockMaskViews mask;
        mask.block_q = block_q;
        mask.block_k = block_k;
        if (indptr.is_none() != indices.is_none())
          throw bs::ValueError("attention: mask needs both indptr and indices, or neither");
        mask.has_mask = !indptr.is_none();
        if (mask.has_mask) {
          to_arg(indptr, ap, op, "mask.indptr");
          to_arg(indices, ai, op, "mask.indices");
          mask.indptr = ap.v;
          mask.indices = ai.v;
        }
        const bool has_lse = !lse.is_none();
        if (has_lse) to_arg(lse, al, op, "lse");
        const bool has_offsets = !q_offsets.is_none();
        if (has_offsets) to_arg(q_offsets, aqo, op, "q_offsets");
        const bs::CudaLaunch launch = cuda_launch(stream, workspace, workspace_bytes);
        py::gil_scoped_release nogil;
        bs::attention(aq.v, ak.v, av.v, mask, causal, scale, q_offset, ao.v, has_lse ? &al.v : nullptr, &launch,
                      has_offsets ? &aqo.v : nullptr);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("indptr"), py::arg("indices"), py::arg("block_q"),
      py::arg("block_k"), py::arg("causal"), py::arg("scale"), py::arg("q_offset"), py::arg("out"), py::arg("lse"),
      py::arg("stream") = 0, py::arg("workspace") = 0, py::arg("workspace_bytes") = 0,
      py::arg("q_offsets") = py::none(),
      R"doc(Block-sparse flash attention: out = softmax(scale q k^T) v over the visible keys.

q: [B, Hq, Lq, D], k and v: [B, Hkv, Lk, D] (Hq a multiple of Hkv, D 64 or 128, one float
dtype, unit stride on D). indptr int32 [B, Hkv, ceil(Lq/block_q)+1] and indices int32
[B, Hkv, n] select key blocks per query block (None, None: all). causal hides keys after
q_offset + i from query row i. scale NaN means D^-0.5. out: like q, written in place; lse:
None or float32 [B, Hq, Lq], the natural-log log-sum-exp of each row (-inf for a row that
sees no key, whose output is 0). CUDA arrays: as for qmatmul (stream, workspace from
bitswitch._cuda.attention_workspace_bytes); the mask's contents are not validated there.
q_offsets: None or int32 [B] on q's device, each batch row's q_offset (replacing q_offset):
a decode step captured in a CUDA graph reads its position from there.)doc");

  m.def(
      "select_pages_at",
      [](py::handle q, py::handle k, py::handle kmin, py::handle kmax, py::handle positions, py::handle indices,
         int64_t sinks, int64_t block_k, uintptr_t stream) {
        const char* op = "select_pages_at";
        Arg aq, ak, ac, ar, ap, ai;
        to_arg(q, aq, op, "q");
        to_arg(k, ak, op, "k");
        to_arg(kmin, ac, op, "kmin");
        to_arg(kmax, ar, op, "kmax");
        to_arg(positions, ap, op, "positions");
        to_arg(indices, ai, op, "indices");
        const bs::CudaLaunch launch = cuda_launch(stream, 0, 0);
        py::gil_scoped_release nogil;
        bs::select_pages_at(aq.v, ak.v, ac.v, ar.v, ap.v, ai.v, sinks, block_k, &launch);
      },
      py::arg("q"), py::arg("k"), py::arg("kmin"), py::arg("kmax"), py::arg("positions"), py::arg("indices"),
      py::arg("sinks"), py::arg("block_k"), py::arg("stream") = 0,
      R"doc(Quest-style page selection for one decode step, with its position in memory.

q: [B, Hq, 1, D] at positions (int32 [B]) over the key cache k [B, Hkv, capacity, D] (one float
dtype, unit stride on D) holding that position's key. kmin and kmax: float32
[B, Hkv, ceil(capacity / block_k), D], per-block key minimum and maximum summarizing keys
[0, position); the position's key is folded in, in place. indices: int32 [B, Hkv, n],
written with the n key blocks of highest bound max_g sum_d q c + |q| r (c, r the block's
midpoint and half-range; blocks below `sinks` and the position's own block first, ties to
the lower block), in increasing order. CUDA arrays: queued on `stream`; positions are
clamped, not checked.)doc");

  m.def(
      "_set_cuda_backend",
      [](py::handle capsule) {
        if (capsule.is_none()) return bs::set_cuda_backend(nullptr);
        if (!PyCapsule_IsValid(capsule.ptr(), "bitswitch.cuda_backend"))
          throw bs::TypeError("_set_cuda_backend: expected bitswitch._cuda.backend(), a 'bitswitch.cuda_backend' capsule");
        // The table is a static object of _cuda, which is never unloaded; keep the capsule anyway
        // (leaked: it must outlive interpreter teardown).
        static py::object* keep = new py::object();
        *keep = py::reinterpret_borrow<py::object>(capsule);
        bs::set_cuda_backend(static_cast<const bs::CudaBackend*>(PyCapsule_GetPointer(capsule.ptr(), "bitswitch.cuda_backend")));
      },
      py::arg("capsule"), "Installs the CUDA kernels' entry points (bitswitch._cuda.backend()); None removes them.");
  m.def("_has_cuda_backend", [] { return bs::cuda_backend() != nullptr; },
        "Whether CUDA arrays reach CUDA kernels (bitswitch._cuda is built and loaded).");

  m.def("_set_attention_kv_splits", &bs::set_attention_kv_splits, py::arg("n"),
        "Test hook: forces n key-block ranges per decode attention task (split-KV); 0 = automatic.");

  m.def(
      "rms_norm",
      [](py::handle x, py::handle delta, py::handle weight, double eps, py::handle out, uintptr_t stream) {
        const char* op = "rms_norm";
        Arg ax, ad, aw, ao;
        to_arg(x, ax, op, "x");
        const bool has_delta = !delta.is_none();
        if (has_delta) to_arg(delta, ad, op, "delta");
        to_arg(weight, aw, op, "weight");
        to_arg(out, ao, op, "out");
        const bs::CudaLaunch launch = cuda_launch(stream, 0, 0);
        py::gil_scoped_release nogil;
        bs::rms_norm(ax.v, has_delta ? &ad.v : nullptr, aw.v, eps, ao.v, &launch);
      },
      py::arg("x"), py::arg("delta"), py::arg("weight"), py::arg("eps"), py::arg("out"), py::arg("stream") = 0,
      R"doc(x += delta (in place, when delta is not None), then out = RMSNorm(x) * weight over the
last dimension, rounded as transformers rounds (see bitswitch.ops.rms_norm). out may be x.
CUDA arrays: queued on `stream` (a cudaStream_t as an integer, 0: the default stream).)doc");

  m.def(
      "rope_qkv",
      [](py::handle qkv, py::handle q_weight, py::handle k_weight, double eps, py::handle cos, py::handle sin,
         int64_t pos, py::handle q_out, py::handle k_cache, py::handle v_cache, uintptr_t stream,
         py::handle positions) {
        const char* op = "rope_qkv";
        Arg a_qkv, aqw, akw, acos, asin, aq, ak, av, apos;
        to_arg(qkv, a_qkv, op, "qkv");
        const bool norm = !q_weight.is_none() || !k_weight.is_none();
        if (norm) {
          if (q_weight.is_none() || k_weight.is_none())
            throw bs::ValueError("rope_qkv: q_weight and k_weight must be given together (q/k norm) or both be None");
          to_arg(q_weight, aqw, op, "q_weight");
          to_arg(k_weight, akw, op, "k_weight");
        }
        to_arg(cos, acos, op, "cos");
        to_arg(sin, asin, op, "sin");
        to_arg(q_out, aq, op, "q_out");
        to_arg(k_cache, ak, op, "k_cache");
        to_arg(v_cache, av, op, "v_cache");
        const bool has_positions = !positions.is_none();
        if (has_positions) to_arg(positions, apos, op, "positions");
        const bs::CudaLaunch launch = cuda_launch(stream, 0, 0);
        py::gil_scoped_release nogil;
        bs::rope_qkv(a_qkv.v, norm ? &aqw.v : nullptr, norm ? &akw.v : nullptr, eps, acos.v, asin.v, pos, aq.v, ak.v,
                     av.v, &launch, has_positions ? &apos.v : nullptr);
      },
      py::arg("qkv"), py::arg("q_weight"), py::arg("k_weight"), py::arg("eps"), py::arg("cos"), py::arg("sin"),
      py::arg("pos"), py::arg("q_out"), py::arg("k_cache"), py::arg("v_cache"), py::arg("stream") = 0,
      py::arg("positions") = py::none(),
      R"doc(q/k RMSNorm, RoPE and the KV-cache write of a fused q|k|v projection (see bitswitch.ops.rope_qkv).
positions: None or int32 [B] on qkv's device, each batch row's position (replacing pos).
CUDA arrays: queued on `stream`; positions are clamped to the cache and tables there.)doc");

  m.def(
      "silu_mul",
      [](py::handle gate_up, py::handle out, uintptr_t stream) {
        Arg ag, ao;
        to_arg(gate_up, ag, "silu_mul", "gate_up");
        to_arg(out, ao, "silu_mul", "out");
        const bs::CudaLaunch launch = cuda_launch(stream, 0, 0);
        py::gil_scoped_release nogil;
        bs::silu_mul(ag.v, ao.v, &launch);
      },
      py::arg("gate_up"), py::arg("out"), py::arg("stream") = 0,
      "out[..., I] = silu(gate_up[..., :I]) * gate_up[..., I:]. CUDA arrays: queued on `stream`.");

  m.def(
      "read_stream",
      [](py::handle buffer) {
        Arg a;
        to_arg(buffer, a, "read_stream", "buffer");
        py::gil_scoped_release nogil;
        return bs::read_stream(a.v);
      },
      py::arg("buffer"), "Reads the whole buffer on every pool thread (the read-bandwidth anchor); returns a checksum.");

  m.def("cpu_info", &cpu_info, "CPU vendor, brand, features, which kernel variants run here and the active one.");
  m.def(
      "set_cpu_variant",
      [](const std::string& name) {
        std::string why;
        if (!bs::cpu::set_variant(name, &why)) throw bs::ValueError("set_cpu_variant: " + why);
      },
      py::arg("name"),
      "Forces the kernel variant ('scalar', 'avx2', 'avxvnni', 'avx512', 'avx512bf16', 'amx'); '' returns to BITSWITCH_CPU or automatic.");
  m.def(
      "cpu_variant",
      []() {
        bs::cpu::Variant v;
        std::string why;
        if (!bs::cpu::active_variant(&v, &why)) throw bs::ValueError(why);
        return std::string(bs::cpu::variant_name(v));
      },
      "The kernel variant ops use now.");
  m.def("num_threads", &bs::cpu::num_threads_setting, "Threads the kernels use.");
  m.def(
      "set_num_threads",
      [](int n) {
        if (n < 0 || n > 4096) throw bs::ValueError("set_num_threads: n must be 0 (automatic) .. 4096, got " + std::to_string(n));
        bs::cpu::set_num_threads(n);
      },
      py::arg("n"), "Sets the kernel thread count (0: BITSWITCH_NUM_THREADS or all CPUs of this process).");
}
