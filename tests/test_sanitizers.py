"""The native code under AddressSanitizer + UndefinedBehaviorSanitizer: _C built with
-DBITSWITCH_SANITIZE=address,undefined (-O1, every error fatal) and the native-facing tests
(qmatmul, attention, layer ops, bad input, threads and fork) run on it, with the sanitizer
runtime preloaded into the (uninstrumented) Python interpreter. Zero reports allowed.

The same by hand:

    cmake -S . -B build/asan -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS_RELEASE=-O1 \\
          -DBITSWITCH_CUDA=OFF -DBITSWITCH_SANITIZE=address,undefined && ninja -C build/asan _C
    LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" \\
    ASAN_OPTIONS=detect_leaks=0 PYTHONPATH=<a copy of python/ with that _C> python -m pytest tests/test_qmatmul.py ...
"""

import os
import shutil
import subprocess
import sys

import pytest
from native_build import ROOT, build_package

NATIVE_TESTS = ["test_qmatmul.py", "test_attention.py", "test_layer_ops.py", "test_errors.py", "test_threads.py"]
REPORTS = ("ERROR: AddressSanitizer", "runtime error:", "UndefinedBehaviorSanitizer", "AddressSanitizer: CHECK failed")


def _runtime(name: str) -> str:
    gxx = shutil.which("g++")
    out = subprocess.run([gxx, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip() if gxx else ""
    return out if os.path.isabs(out) and os.path.exists(out) else ""


def test_native_tests_under_asan_and_ubsan(tmp_path):
    asan, stdcxx = _runtime("libasan.so"), _runtime("libstdc++.so")
    if not asan or not stdcxx:
        pytest.skip("g++'s libasan / libstdc++ are not installed")
    pkg, env = build_package(tmp_path, "-DCMAKE_CXX_FLAGS_RELEASE=-O1", "-DBITSWITCH_SANITIZE=address,undefined")
    env.update(LD_PRELOAD=f"{asan} {stdcxx}", ASAN_OPTIONS="detect_leaks=0:abort_on_error=0",
               UBSAN_OPTIONS="print_stacktrace=1")
    probe = subprocess.run([sys.executable, "-c", "import bitswitch; print(bitswitch.__file__)"], env=env,
                           capture_output=True, text=True, cwd=tmp_path)
    assert str(pkg) in probe.stdout, probe.stdout + probe.stderr
    tests = [str(ROOT / "tests" / t) for t in NATIVE_TESTS]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], env=env,
                         capture_output=True, text=True, cwd=tmp_path)
    out = run.stdout + run.stderr
    for report in REPORTS:
        assert report not in out, out[-8000:]
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else out[-2000:]
    assert run.returncode == 0, out[-8000:]
    assert "passed" in summary and "failed" not in summary, summary
