// pybind11 module bitswitch._cuda: the CUDA runtime as this build sees it.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

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
  m.def("driver_status", [] {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    cudaGetLastError();
    return std::string(e == cudaSuccess ? "ok" : cudaGetErrorString(e));
  }, "Why no device is visible, or 'ok'.");
}
