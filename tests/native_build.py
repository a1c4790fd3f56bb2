"""Builds bitswitch's native module with extra CMake options into a throw-away copy of the
package, for the tests that run the suite on a special build (emulated AVX-512, sanitizers,
the non-x86 configuration)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Settings of the developer's environment that would change what the build or the run does.
_DROPPED_ENV = ("BITSWITCH_CUDA", "BITSWITCH_EMULATE_AVX512", "BITSWITCH_CPU")


def build_package(tmp_path: Path, *cmake_args: str) -> tuple:
    """(package root for PYTHONPATH, environment) with _C built from this tree with
    `cmake_args` (Release, no CUDA). Skips when cmake or pybind11 is missing."""
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    pybind11 = pytest.importorskip("pybind11")
    build = tmp_path / "build"
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV}
    configure = [cmake, "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DBITSWITCH_CUDA=OFF",
                 *cmake_args, f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DPython_EXECUTABLE={sys.executable}"]
    subprocess.run(configure, check=True, capture_output=True, env=env)
    subprocess.run([cmake, "--build", str(build), "--target", "_C", "-j", str(os.cpu_count() or 2)],
                   check=True, capture_output=True, env=env)
    pkg = tmp_path / "pkg"
    shutil.copytree(ROOT / "python" / "bitswitch", pkg / "bitswitch",
                    ignore=shutil.ignore_patterns("_C*.so", "_cuda*.so", "__pycache__"))
    (so,) = build.glob("_C*.so")
    shutil.copy(so, pkg / "bitswitch")
    env["PYTHONPATH"] = str(pkg)
    return pkg, env
