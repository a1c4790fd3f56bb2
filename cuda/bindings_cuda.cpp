// pybind11 module bitswitch._cuda: the CUDA kernels' entry points for _C's ops glue, the
// scratch sizes callers allocate, and the CUDA runtime as this build sees it.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include "backend.h"

namespace py = pybind11;

#ifndef BITSWITCH_CUDA_ARCHS
#define BITSWITCH_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "bitswitch CUDA backend (built with nvcc; the runtime is linked statically)";
  m.attr("compiled_archs") = BITSWITCH_CUDA_ARCHS;
  m.def("runtime_version", [] {
    int v = 0;
    cudaRuntimeGetVersion(&v);
    return v;
  }, "CUDA runtime version this module was built with (e.g. 13000).");
  m.def("device_count", [] {
    int n = 0;
    // No driver or no GPU is not an error here: there are simply no devices.
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    return n;
  }, "Number of CUDA devices visible (0 without a driver or GPU).");
  m.def("backend", [] {
    return py::capsule(const_cast<bitswitch::CudaBackend*>(bitswitch::cuda::backend_table()), "bitswitch.cuda_backend");
  }, "The table of CUDA entry points, for bitswitch._C._set_cuda_backend.");
  m.def("num_sms", &bitswitch::cuda::num_sms, py::arg("device") = -1,
        "Streaming multiprocessors of a CUDA device (-1: the current one); 0 if it cannot be queried.");
  m.def("qmatmul_workspace_bytes", &bitswitch::cuda::qmatmul_workspace, py::arg("m"), py::arg("n"), py::arg("k"),
        py::arg("group_size"), py::arg("bits"), py::arg("x_dtype"), py::arg("scale_dtype"), py::arg("device") = -1,
        "Scratch bytes qmatmul can use for these sizes (dtypes as bitswitch DType codes: 0 float32, 1 bfloat16, "
        "2 float16); it runs with less, more slowly.");
  m.def("attention_workspace_bytes", &bitswitch::cuda::attention_workspace, py::arg("b"), py::arg("hq"),
        py::arg("hkv"), py::arg("lq"), py::arg("lk"), py::arg("d"), py::arg("dtype"), py::arg("block_q"),
        py::arg("block_k"), py::arg("has_mask"), py::arg("causal"), py::arg("device") = -1,
        "Scratch bytes attention can use (split-KV partials for decode); it runs with less, more slowly.");
  m.def("driver_status", [] {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    cudaGetLastError();
    return std::string(e == cudaSuccess ? "ok" : cudaGetErrorString(e));
  }, "Why no device is visible, or 'ok'.");
}
