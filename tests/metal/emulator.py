"""Runs bitswitch's Metal kernels on the CPU: the .metal sources compiled as C++ under
msl_emulation.h, driven by the same launch plans (bitswitch.metal) the MLX and torch MPS
front ends execute.

The build: bitswitch.metal.library_source() plus a generated `kernel void` entry point per
instance (bitswitch.metal.entry_source, the text torch MPS compiles), passed through a
line-preserving filter for the one MSL keyword a macro cannot handle (`threadgroup`: a
storage class on arrays, a qualifier on pointers), then a table of thunks that cast a
`void*` buffer list to each entry's parameters. g++ builds it into a shared library that
ctypes calls.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from bitswitch import metal as M

HERE = Path(__file__).resolve().parent

# `threadgroup float t[64];` (a threadgroup array) -> `static float t[64];`: the emulator
# runs one threadgroup at a time, so a function-local static is exactly that memory.
_TG_ARRAY = re.compile(r"\bthreadgroup(?=\s+[A-Za-z_][\w:<>, ]*?\s+[A-Za-z_]\w*\s*\[)")
# Anywhere else (`threadgroup float* p`) it only names an address space: dropped.
_TG_OTHER = re.compile(r"\bthreadgroup\b")


def filter_msl(src: str) -> str:
    """The two `threadgroup` rewrites, line by line (line numbers stay those of the input)."""
    out = []
    for line in src.split("\n"):
        line = _TG_ARRAY.sub("static", line)
        out.append(_TG_OTHER.sub("", line))
    return "\n".join(out)


def _thunk(kernel: str, template: Dict[str, object]) -> Tuple[str, str, int]:
    k = M.KERNELS[kernel]
    name = M.instance_name(kernel, template)
    casts = []
    for i, a in enumerate(k.args):
        t = M._ctype(a, template)
        casts.append(f"({'' if a.output else 'const '}{t}*)b[{i}]")
    casts += ["t.group", "t.lid", "t.lane", "t.simdgroup"]
    body = f"static void run_{name}(void* const* b, const msl_emu::ThreadIds& t) {{ {name}({', '.join(casts)}); }}\n"
    return name, body, len(k.args)


def harness_source(instances: Sequence[Tuple[str, Dict[str, object]]]) -> str:
    # __METAL_VERSION__ (Metal 3.1) makes format.h take its MSL branch, as the GPU compilers do.
    parts = ['#include "msl_emulation.h"', "using namespace metal;", "#define __METAL_VERSION__ 310",
             "#line 1 \"bitswitch_metal_library\"",
             filter_msl(M.library_source()), "#line 1 \"bitswitch_metal_entries\""]
    parts += [filter_msl(M.entry_source(k, t)) for k, t in instances]
    table = []
    for k, t in instances:
        name, body, nargs = _thunk(k, t)
        parts.append(body)
        table.append(f'  {{"{name}", {nargs}, run_{name}}},')
    parts.append("struct BsEntry { const char* name; int nargs; void (*run)(void* const*, const msl_emu::ThreadIds&); };\n"
                 "static const BsEntry kBsEntries[] = {\n" + "\n".join(table) + "\n};\n")
    parts.append(r'''
extern "C" int bs_emu_launch(const char* name, void* const* bufs, int nbufs, unsigned groups, unsigned threads,
                             int threads_mode, char* err, int errlen) {
  const BsEntry* e = nullptr;
  for (const BsEntry& c : kBsEntries)
    if (std::strcmp(c.name, name) == 0) e = &c;
  std::string msg;
  if (e == nullptr) msg = std::string("no emulated instance ") + name;
  else if (e->nargs != nbufs) msg = std::string("wrong buffer count for ") + name;
  else msg = msl_emu::launch(groups, threads, [&](const msl_emu::ThreadIds& t) { e->run(bufs, t); },
                             threads_mode ? msl_emu::Mode::threads : msl_emu::Mode::fibers, true);
  std::snprintf(err, size_t(errlen), "%s", msg.c_str());
  return msg.empty() ? 0 : 1;
}
''')
    return "\n".join(parts)


def build(instances: Sequence[Tuple[str, Dict[str, object]]], out_dir: Path, sanitize: Optional[str] = None,
          opt: str = "-O2") -> Path:
    """Compiles the harness for `instances` into out_dir; returns the shared library."""
    gxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
    if gxx is None:
        raise FileNotFoundError("g++ is needed to build the Metal emulation")
    src = harness_source(instances)
    tag = hashlib.sha1((src + str(sanitize) + opt).encode()).hexdigest()[:12]
    out_dir.mkdir(parents=True, exist_ok=True)
    cpp = out_dir / f"metal_emu_{tag}.cpp"
    lib = out_dir / f"metal_emu_{tag}.so"
    if lib.exists():
        return lib
    cpp.write_text(src)
    cmd = [gxx, "-std=c++17", opt, "-g0", "-fno-strict-aliasing", "-Wno-attributes", "-fPIC", "-shared",
           f"-I{HERE}", str(cpp), "-o", str(lib), "-lpthread"]
    if sanitize:
        cmd[1:1] = [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"building the Metal emulation failed:\n{' '.join(cmd)}\n{r.stderr[-6000:]}")
    return lib


class Emulator:
    """Executes bitswitch.metal plans on numpy arrays through the emulated kernels."""

    def __init__(self, lib: Path, threads_mode: bool = False):
        self.lib = ctypes.CDLL(str(lib))
        self.lib.bs_emu_launch.restype = ctypes.c_int
        self.lib.bs_emu_launch.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int,
                                           ctypes.c_uint, ctypes.c_uint, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self.threads_mode = threads_mode
        self.launched: list = []

    def run(self, plan: M.Plan, arrays: Dict[str, np.ndarray]) -> Tuple[np.ndarray, ...]:
        env = dict(arrays)
        env.update(plan.aux)
        for name, (shape, dt) in plan.alloc.items():
            a = np.empty(shape, dtype=_np_dtype(dt))
            a.view(np.uint8)[...] = 0xFF  # NaN in every float type: unwritten outputs show
            env[name] = a
        for launch in plan.launches:
            self.launch(launch, [env[a.name].ctypes.data for a in M.KERNELS[launch.kernel].args])
        return tuple(env[n] for n in plan.result)

    def launch(self, launch: M.Launch, pointers: Sequence[int]) -> None:
        """One launch on raw buffer addresses (what a front end binds at [[buffer(i)]])."""
        bufs = (ctypes.c_void_p * len(pointers))(*pointers)
        err = ctypes.create_string_buffer(1024)
        rc = self.lib.bs_emu_launch(launch.name.encode(), bufs, len(pointers), launch.groups, launch.threads,
                                    int(self.threads_mode), err, len(err))
        if rc:
            raise RuntimeError(f"{launch.name}: {err.value.decode()}")
        self.launched.append(launch.name)


def _np_dtype(name: str) -> np.dtype:
    from bitswitch import _arrays as A
    return A.BFLOAT16 if name == "bfloat16" else np.dtype(name)
