"""Registers, spills and shared memory of every CUDA kernel, from ptxas, without a GPU.

    python bench/cuda_resources.py                     # sm_80 and sm_90, every instance file
    python bench/cuda_resources.py --arch 90 --files qmatmul_bf16.cu

Compiles the instance files in cuda/ with `nvcc -Xptxas -v` (device code only) and prints one
row per kernel and architecture: registers per thread, spill stores / loads (bytes per thread)
and the stack frame. A spill in a kernel that streams weights or feeds tensor cores is a
performance bug even though the results stay right, and only ptxas can show it on a machine
without a GPU. Exits 1 when a kernel spills (tests/test_cuda_resources.py checks the same).

With cuobjdump and nvdisasm (the CUDA toolkit's, or
`pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm`), each kernel's hot
loop is read from the SASS too: the innermost loop that holds its work instruction, its length,
and the instructions it issues per unit of work, which is what bounds a kernel whose issue
slots run out before its memory or tensor pipe does:
  - `qmv_kernel` (GEMV): loop instructions per byte of weights (16-byte evict-first loads);
  - `qmm_kernel`, `attention_prefill_kernel`: loop instructions per `HMMA` (mma.sync).
The counts are static (every instruction of the loop body once, untaken branches included).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "cuda"
DEFAULT_FILES = ("qmatmul_bf16.cu", "qmatmul_f16.cu", "qmatmul_f32.cu", "attention_bf16.cu",
                 "attention_f16.cu", "attention_f32.cu", "backend.cu")
DEFAULT_ARCHS = ("80", "90")


@dataclass
class Kernel:
    file: str
    arch: str
    mangled: str
    registers: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    loop: "LoopStats | None" = None

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


@dataclass
class LoopStats:
    instructions: int     # in the loop body, each once
    hmma: int             # mma.sync in the body
    weight_bytes: float   # bytes of W one lane's pass over the body accounts for (0: no W)

    def cell(self) -> str:
        parts = [f"{self.instructions:>5} insn"]
        if self.weight_bytes:
            parts.append(f"{self.instructions / self.weight_bytes:5.2f}/B")
        if self.hmma:
            parts.append(f"{self.instructions / self.hmma:6.2f}/mma")
        return ", ".join(parts)


_ENTRY = re.compile(r"Compiling entry function '(\S+)' for 'sm_(\w+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")


def parse_ptxas(log: str, file: str) -> list[Kernel]:
    """The kernels of one `ptxas -v` log (only entry functions: device functions are inlined)."""
    kernels: list[Kernel] = []
    current = None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = Kernel(file, m.group(2), m.group(1))
            kernels.append(current)
            continue
        if current is None:
            continue
        m = _PROPS.search(line)
        if m:
            current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
            continue
        m = _USED.search(line)
        if m:
            current.registers = int(m.group(1))
    return kernels


_SASS_INSN = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BACK_BRANCH = re.compile(r"\bBRA\s+0x([0-9a-f]+)")


def opcode(insn: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", insn).split()[0]


def qmm_weight_bytes_per_lane(pretty: str) -> float:
    """W bytes per k-tile of qmm_kernel<T, planes, BM> over its 256 threads (every thread runs
    the loop once per k-tile): BN rows of 16 bytes per plane, BN 256 for BM <= 32 else 128."""
    m = re.search(r"qmm_kernel<[^,]+, (\d+), (\d+)>", pretty)
    planes, bm = int(m.group(1)), int(m.group(2))
    return (256 if bm <= 32 else 128) * 16 * planes / 256


def hot_loops(sass: str, kernels: list[Kernel]) -> None:
    """Fills Kernel.loop from `cuobjdump -sass` output: the innermost loop holding the kernel's
    work (16-byte evict-first weight loads for the GEMVs, mma for the others)."""
    by_name = {k.mangled: k for k in kernels}
    pretty = demangle(list(by_name))
    for part in re.split(r"\n\s*Function : ", sass)[1:]:
        name = part.split("\n", 1)[0].strip()
        kernel = by_name.get(name)
        if kernel is None:
            continue
        full = pretty.get(name, name)
        gemv = "qmm::qmv_" in full
        if not (gemv or "qmm_kernel" in full or "attention_prefill_kernel" in full):
            continue
        insns = [(int(m.group(1), 16), m.group(2)) for m in map(_SASS_INSN.match, part.splitlines()) if m]
        best = None
        for addr, text in insns:
            m = _BACK_BRANCH.search(text)
            if not m or int(m.group(1), 16) >= addr:
                continue
            ops = [opcode(t) for a, t in insns if int(m.group(1), 16) <= a <= addr]
            hmma = sum(op.startswith("HMMA") for op in ops)
            loads = sum(op.startswith("LDG") and ".EF" in op and op.endswith(".128") for op in ops)
            if (gemv and not loads) or (not gemv and not hmma):
                continue
            if best is None or len(ops) < best.instructions:
                wbytes = 16.0 * loads if gemv else (qmm_weight_bytes_per_lane(full) if "qmm_kernel" in full else 0.0)
                best = LoopStats(len(ops), hmma, wbytes)
        kernel.loop = best


def find_cuobjdump() -> str | None:
    tool = shutil.which("cuobjdump")
    if tool:
        return tool
    for base in sys.path:
        cand = Path(base) / "nvidia" / "cu13" / "bin" / "cuobjdump"
        if cand.is_file():
            return str(cand)
    cand = Path("/usr/local/cuda/bin/cuobjdump")
    return str(cand) if cand.exists() else None


def find_nvcc() -> str | None:
    nvcc = os.environ.get("CUDACXX") or shutil.which("nvcc")
    if nvcc is None and Path("/usr/local/cuda/bin/nvcc").exists():
        nvcc = "/usr/local/cuda/bin/nvcc"
    return nvcc


def compile_file(nvcc: str, file: str, arch: str, workdir: str, cuobjdump: str | None = None) -> list[Kernel]:
    """Device code of one instance file for one architecture, with ptxas's report."""
    import sysconfig

    cmd = [nvcc, "-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "-cubin",
           f"-arch=sm_{arch}", "-Xptxas", "-v",
           "-I", str(ROOT / "csrc" / "include"), "-I", str(ROOT / "csrc"), "-I", str(CUDA_DIR),
           "-I", sysconfig.get_paths()["include"]]
    try:
        import pybind11
        cmd += ["-I", pybind11.get_include()]
    except ImportError:
        pass
    out = os.path.join(workdir, f"{file}.{arch}.cubin")
    proc = subprocess.run(cmd + [str(CUDA_DIR / file), "-o", out], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed on {file} for sm_{arch}:\n{proc.stderr[-4000:]}")
    kernels = parse_ptxas(proc.stderr, file)
    if cuobjdump:
        env = dict(os.environ, PATH=f"{Path(cuobjdump).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        sass = subprocess.run([cuobjdump, "-sass", out], capture_output=True, text=True, check=True, env=env).stdout
        hot_loops(sass, kernels)
    return kernels


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if tool is None:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short_name(pretty: str) -> str:
    """`void bitswitch::cuda::qmm::qmv_kernel<__nv_bfloat16, 4, 1>(...)` -> `qmv_kernel<bf16, 4, 1>`."""
    s = pretty.removeprefix("void ")
    s = s.split("(", 1)[0] if "(" in s else s
    s = re.sub(r"bitswitch::cuda::(\w+::)?", "", s)
    s = s.replace("__nv_bfloat16", "bf16").replace("__half", "f16")
    return s


def collect(files, archs, jobs: int, sass: bool = True) -> list[Kernel]:
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDACXX or put nvcc on PATH)")
    cuobjdump = find_cuobjdump() if sass else None
    with tempfile.TemporaryDirectory() as workdir, ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(compile_file, nvcc, f, a, workdir, cuobjdump) for f in files for a in archs]
        kernels = [k for fut in futures for k in fut.result()]
    return kernels


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", action="append", help="sm number (80, 86, 89, 90); repeatable; default 80 and 90")
    ap.add_argument("--files", nargs="+", default=list(DEFAULT_FILES), help="instance files in cuda/")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel nvcc runs")
    ap.add_argument("--no-sass", action="store_true", help="skip the hot-loop columns (no cuobjdump run)")
    args = ap.parse_args(argv)
    archs = args.arch or list(DEFAULT_ARCHS)
    for f in args.files:
        if not (CUDA_DIR / f).is_file():
            ap.error(f"--files: no {f} in cuda/")
    kernels = collect(args.files, archs, max(1, args.jobs), sass=not args.no_sass)
    names = demangle(sorted({k.mangled for k in kernels}))
    rows = sorted(kernels, key=lambda k: (short_name(names[k.mangled]), k.arch))
    width = max(len(short_name(names[k.mangled])) for k in rows)
    print(f"{'kernel':<{width}}  sm  regs  stack  spill st/ld  hot loop: lane-insn per W byte / per mma  file")
    for k in rows:
        flag = "  <- spills" if k.spills else ""
        loop = k.loop.cell() if k.loop else ""
        print(f"{short_name(names[k.mangled]):<{width}}  {k.arch:>2}  {k.registers:>4}  {k.stack:>5}  "
              f"{k.spill_stores:>5}/{k.spill_loads:<5}  {loop:<41}  {k.file}{flag}")
    spilling = [k for k in rows if k.spills]
    print(f"\n{len(rows)} kernels x architectures, {len(spilling)} with spills")
    return 1 if spilling else 0


if __name__ == "__main__":
    sys.exit(main())
