#!/usr/bin/env bash
# Everything the CUDA backend needs checked on a machine with one NVIDIA GPU, in one command:
# build _C and _cuda for this GPU's architecture only (fast), run the GPU tests (every kernel
# against float64, CUDA graphs, torch.compile, GraphDecoder, compute-sanitizer memcheck, the
# error messages), then print the benchmark table (bitswitch bench gpu) last.
#
#   bash bench/gpu_check.sh [--quick] [--e2e 0.6b]      (arguments go to bench/gpu.py)
#
# The tests, the compute-sanitizer run and the benchmark each run under a time limit
# (TEST_TIMEOUT, SANITIZER_TIMEOUT, BENCH_TIMEOUT seconds; 200, 120 and 180 by default), so
# that one command fits a 10-minute device call with the build, and a hang or a slow first
# run of one part still leaves the others' output.
#
# SMALL_M_AB=1 adds, last, the qmatmul table of --quick with BITSWITCH_CUDA_SMALL_M=simt (the
# FFMA GEMV and the 16-row GEMM tile in place of qmv_tc_kernel for 16-bit x with M <= 16), and
# the decode attention rows with BITSWITCH_CUDA_DECODE=simt (the SIMT rows kernel in place of
# the tensor-core one), to compare the paths on this GPU (AB_TIMEOUT, 90 s each by default).
#
# Uses the python3 that holds torch; needs cmake, pybind11, numpy, ml_dtypes, safetensors,
# tokenizers and pytest there (no network access is needed).
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
arch=$($py -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}{b}')") || exit 1
echo "== build for sm_$arch"
cmake -S . -B build/gpu -DCMAKE_BUILD_TYPE=Release -DBITSWITCH_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$arch" \
  -Dpybind11_DIR="$($py -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v $py)" >/dev/null || exit 1
cmake --build build/gpu -j "$(nproc)" >/dev/null || exit 1
cp build/gpu/_C*.so build/gpu/cuda/_cuda*.so python/bitswitch/ || exit 1
export PYTHONPATH=$PWD/python PYTHONUNBUFFERED=1
$py -c "import bitswitch as bs; print(bs.info()['cuda'])"
echo "== GPU tests"
timeout "${TEST_TIMEOUT:-200}" $py -m pytest tests/test_cuda.py tests/test_cuda_build.py -q -p no:cacheprovider -rs \
  --durations=10 -k "not compute_sanitizer"
tests_rc=$?
[ $tests_rc -eq 124 ] && echo "tests: stopped after ${TEST_TIMEOUT:-200} s (TEST_TIMEOUT)"
echo "== compute-sanitizer memcheck"
timeout "${SANITIZER_TIMEOUT:-120}" $py -m pytest tests/test_cuda.py -q -p no:cacheprovider -rs -k compute_sanitizer
san_rc=$?
[ $san_rc -eq 124 ] && echo "compute-sanitizer: stopped after ${SANITIZER_TIMEOUT:-120} s (SANITIZER_TIMEOUT)"
echo "== benchmark"
timeout "${BENCH_TIMEOUT:-180}" $py bench/gpu.py "$@"
bench_rc=$?
[ $bench_rc -eq 124 ] && echo "benchmark: stopped after ${BENCH_TIMEOUT:-180} s (BENCH_TIMEOUT)"
if [ "${SMALL_M_AB:-0}" = 1 ]; then
  echo "== benchmark, BITSWITCH_CUDA_SMALL_M=simt"
  BITSWITCH_CUDA_SMALL_M=simt timeout "${AB_TIMEOUT:-90}" $py bench/gpu.py --quick --no-attention
  echo "== decode attention, tensor-core kernel (default) then BITSWITCH_CUDA_DECODE=simt"
  timeout "${AB_TIMEOUT:-90}" $py bench/gpu.py --no-qmatmul --decode-only
  BITSWITCH_CUDA_DECODE=simt timeout "${AB_TIMEOUT:-90}" $py bench/gpu.py --no-qmatmul --decode-only
fi
echo "tests rc=$tests_rc sanitizer rc=$san_rc bench rc=$bench_rc"
exit $(( tests_rc || san_rc || bench_rc ))
