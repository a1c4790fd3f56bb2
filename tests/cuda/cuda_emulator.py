"""Runs bitswitch's CUDA kernels on the CPU: C++ sources that include cuda_emulation.h,
cuda/common.cuh and the kernel headers, compiled by g++ into a shared library that ctypes
calls.

    lib = emulator.build("qmatmul", SOURCE, tmp_path)       # SOURCE defines extern "C" thunks
    rc = lib.run_qmatmul(emulator.ptr(x), emulator.ptr(y), ...)
    assert rc == 0, emulator.last_error(lib)

A thunk launches through the kernel's launcher (BS_LAUNCH) and returns its cudaError_t; the
message of a failed launch (a deadlock, a divergent warp collective, a bad configuration)
is `last_error(lib)`. GPU threads run as fibers by default; `set_threads_mode(lib, True)` (or
CUDA_EMU_MODE=threads in the environment) runs each as an OS thread, for ThreadSanitizer.

Libraries are cached in the given directory under a hash of the source, the flags and every
header the source could include, so editing a kernel rebuilds it. A sanitizer build
(build_library(..., SANITIZERS["address"][0])) runs in a subprocess with its runtime preloaded:
run_sanitized("address", path, "test_module", "m.check_something(lib)").
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# cuda/ (common.cuh, kernels), csrc/include/ (bitswitch/format.h), this directory
# (cuda_emulation.h) and tests/metal/ (msl_emulation.h, the launcher it builds on).
INCLUDE_DIRS = (ROOT / "cuda", ROOT / "csrc" / "include", HERE, ROOT / "tests" / "metal")
# -Wno-unknown-pragmas: CUDA's `#pragma unroll` means nothing to g++.
FLAGS = ("-std=c++17", "-O2", "-g0", "-fno-strict-aliasing", "-Wno-unknown-pragmas", "-fPIC", "-shared", "-pthread")
_HEADER_SUFFIXES = {".h", ".hpp", ".cuh", ".cu", ".inc"}
# Flags of the sanitizer builds and the runtime a Python process must preload to load them.
SANITIZERS = {"address": (("-fsanitize=address,undefined", "-fno-omit-frame-pointer"), "libasan"),
              "thread": (("-fsanitize=thread",), "libtsan")}
# Lines that start a sanitizer's report.
_REPORT_MARKS = ("AddressSanitizer", "LeakSanitizer", "runtime error:", "ThreadSanitizer")


def compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")


def available() -> bool:
    """True where the emulation can be built and run (Linux with g++)."""
    return sys.platform == "linux" and compiler() is not None


def _headers_digest() -> bytes:
    h = hashlib.sha256()
    for d in INCLUDE_DIRS:
        for p in sorted(d.rglob("*")):
            if p.suffix in _HEADER_SUFFIXES and p.is_file():
                h.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.digest()


def build(name: str, source: str, tmpdir: Path, flags: Sequence[str] = ()) -> ctypes.CDLL:
    """Compiles `source` (C++17 that includes cuda_emulation.h first) into a shared library in
    `tmpdir` and loads it. Extra `flags` go to g++ after the defaults (-O2 ...): e.g.
    SANITIZERS["address"][0] (such a library loads only into a process with the sanitizer
    runtime preloaded: see run_sanitized)."""
    return ctypes.CDLL(str(build_library(name, source, tmpdir, flags)))


def build_library(name: str, source: str, tmpdir: Path, flags: Sequence[str] = ()) -> Path:
    """build() without loading: the path of the shared library."""
    gxx = compiler()
    if gxx is None:
        raise FileNotFoundError("g++ is needed to build the CUDA emulation")
    flags = tuple(flags)
    key = hashlib.sha256(repr((source, flags, gxx)).encode() + _headers_digest()).hexdigest()[:16]
    tmpdir = Path(tmpdir)
    tmpdir.mkdir(parents=True, exist_ok=True)
    lib = tmpdir / f"{name}_{key}.so"
    if lib.exists():
        return lib
    cpp = tmpdir / f"{name}_{key}.cpp"
    cpp.write_text(source)
    partial = tmpdir / f"{name}_{key}.{os.getpid()}.so"  # renamed when complete: safe for parallel builds
    cmd = [gxx, *FLAGS, *flags, *(f"-I{d}" for d in INCLUDE_DIRS), str(cpp), "-o", str(partial)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"building {name} for the CUDA emulation failed:\n{' '.join(cmd)}\n{r.stderr[-8000:]}")
    os.replace(partial, lib)
    return lib


def last_error(lib: ctypes.CDLL) -> str:
    """The message of the most recent failed launch in `lib` ("" after a successful one)."""
    f = lib.cuda_emu_last_error
    f.restype = ctypes.c_char_p
    return f().decode()


def set_threads_mode(lib: ctypes.CDLL, threads: bool) -> None:
    """Runs later launches of `lib` with an OS thread per GPU thread (True) or as fibers."""
    lib.cuda_emu_set_threads_mode(ctypes.c_int(int(threads)))


def ptr(a: np.ndarray) -> ctypes.c_void_p:
    """A numpy array's data as a kernel pointer argument (the array must stay alive)."""
    return ctypes.c_void_p(a.ctypes.data)


def sanitizer_env(sanitizer: str, base: Optional[Dict[str, str]] = None) -> Optional[Dict[str, str]]:
    """The environment of a Python subprocess that loads a library built with
    SANITIZERS[sanitizer][0], or None where the runtime is not installed."""
    runtime = SANITIZERS[sanitizer][1]
    rt = subprocess.run([compiler() or "g++", f"-print-file-name={runtime}.so"], capture_output=True,
                        text=True).stdout.strip()
    if not os.path.isabs(rt):
        return None
    env = dict(os.environ if base is None else base)
    env.update(LD_PRELOAD=rt, ASAN_OPTIONS="detect_leaks=0:halt_on_error=1",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1", TSAN_OPTIONS="halt_on_error=1")
    return env


def run_sanitized(sanitizer: str, library: Path, module: str, code: str, timeout: float = 600) -> str:
    """Runs `code` in a Python subprocess with the sanitizer's runtime preloaded, where `lib`
    is `library` (built with SANITIZERS[sanitizer][0]) loaded by ctypes and `m` is the module
    `module` of this directory (the interpreter itself is not instrumented). Skips where the
    runtime is missing or cannot run here; fails on a sanitizer report or an exception.
    Returns the subprocess's stdout."""
    import pytest

    env = sanitizer_env(sanitizer)
    if env is None:
        pytest.skip(f"{SANITIZERS[sanitizer][1]} is not installed")
    if sanitizer == "thread":
        env["CUDA_EMU_MODE"] = "threads"  # what ThreadSanitizer can follow (the header forces it too)
    script = (f"import ctypes, importlib, sys; sys.path.insert(0, {str(HERE)!r}); "
              f"m = importlib.import_module({module!r}); lib = ctypes.CDLL({str(library)!r}); "
              f"{code}; print('SANITIZED RUN OK')")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=timeout)
    if "unexpected memory mapping" in r.stderr or "FATAL: ThreadSanitizer" in r.stderr:
        pytest.skip(f"{SANITIZERS[sanitizer][1]} cannot run on this machine's memory layout")
    out = r.stdout + r.stderr
    reports = [line for line in out.splitlines() if any(s in line for s in _REPORT_MARKS)]
    assert r.returncode == 0 and "SANITIZED RUN OK" in r.stdout and not reports, \
        "\n".join(reports[:8]) + "\n...\n" + out[-6000:]
    return r.stdout
