"""The Metal kernels (metal/*.metal) as launches: sources, kernel signatures, launch plans.

This module knows no GPU. It assembles the MSL source (the .metal files with format.h
inlined), describes each kernel's arguments once, and turns an op call into a list of
launches (kernel instance, buffers, threadgroups). Three executors run those plans:
``bitswitch.mlx`` (``mx.fast.metal_kernel``), the torch MPS ops in ``bitswitch.torch``
(``torch.mps.compile_shader``) and, in the test suite, the same sources compiled as C++
under an MSL emulation header. So every executor launches exactly what the tests ran.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .quant import BITS, GROUP_SIZES, INT8, VALUES_PER_WORD

__all__ = ["Arg", "Kernel", "Launch", "Plan", "KERNELS", "library_source", "entry_source", "mlx_body",
           "plan_qmatmul", "plan_attention", "instance_name", "source_dir"]

SOURCES = ("qmatmul.metal", "attention.metal")
DTYPES = ("float32", "bfloat16", "float16")
# MSL spellings of the element types, for the generated entry points (Metal 3.1 bfloat).
MSL_TYPES = {"float32": "float", "bfloat16": "bfloat", "float16": "half", "uint32": "uint32_t",
             "int32": "int", "float": "float"}
_SHORT = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}

# Launch geometry: these mirror the #defines of the .metal sources (checked by the tests
# that compile them).
QMV_THREADS, QMV_TG_ROWS, QMV_MAX_M = 64, 8, 8
QMM_THREADS, QMM_BM, QMM_BN = 128, 32, 32
ATT_THREADS, ATT_BQ = 128, 16
DEC_THREADS, DEC_MAXR, DEC_KEYS_PER_SPLIT, DEC_MAX_SPLITS = 128, 8, 256, 128
HEAD_DIMS = (64, 128)
IP_COUNT = 22


@functools.lru_cache(maxsize=None)
def source_dir() -> Path:
    """The directory holding the .metal sources and bitswitch/format.h: package data in an
    installed bitswitch, the repository's metal/ and csrc/include/ in a source checkout."""
    pkg = Path(__file__).resolve().parent / "metal"
    if (pkg / SOURCES[0]).exists():
        return pkg
    repo = Path(__file__).resolve().parents[2]
    if (repo / "metal" / SOURCES[0]).exists():
        return repo / "metal"
    raise FileNotFoundError("bitswitch: the Metal kernel sources are missing from this installation "
                            f"(looked in {pkg} and {repo / 'metal'})")


def _format_header() -> Path:
    d = source_dir()
    for p in (d / "bitswitch" / "format.h", d.parent / "csrc" / "include" / "bitswitch" / "format.h"):
        if p.exists():
            return p
    raise FileNotFoundError(f"bitswitch: format.h is missing next to the Metal sources in {d}")


_INCLUDE = re.compile(r'^\s*#\s*include\s+"bitswitch/format\.h"\s*$', re.M)


@functools.lru_cache(maxsize=None)
def library_source() -> str:
    """The .metal sources as one MSL text, format.h inlined once (the run-time compilers
    have no include path). It has no ``#include <metal_stdlib>``: executors prepend it."""
    header = _format_header().read_text()
    parts = [f"// ---- bitswitch/format.h\n{header}"]
    for name in SOURCES:
        parts.append(f"// ---- {name}\n" + _INCLUDE.sub("", (source_dir() / name).read_text()))
    return "\n".join(parts)


# -- kernel signatures --------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Arg:
    name: str
    ctype: str           # element type: a template parameter ('T', 'S') or a fixed type name
    output: bool = False


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One templated kernel: its implementation function, template parameters, buffer
    arguments (in order), threadgroup arrays and the thread ids it takes."""
    name: str
    impl: str
    template: Tuple[str, ...]
    args: Tuple[Arg, ...]
    shared: Tuple[Tuple[str, str], ...]   # (name, element count expression) of float arrays
    ids: Tuple[str, ...]                  # subset of tg, lid, lane, sg, in the impl's order

    @property
    def inputs(self) -> Tuple[Arg, ...]:
        return tuple(a for a in self.args if not a.output)

    @property
    def outputs(self) -> Tuple[Arg, ...]:
        return tuple(a for a in self.args if a.output)


_QARGS = (Arg("x", "T"), Arg("p0", "uint32"), Arg("p1", "uint32"), Arg("scales", "S"), Arg("biases", "S"),
          Arg("ip", "int32"), Arg("y", "T", True))
_AARGS = (Arg("q", "T"), Arg("k", "T"), Arg("v", "T"), Arg("indptr", "int32"), Arg("indices", "int32"),
          Arg("ip", "int32"), Arg("fp", "float32"))

KERNELS: Dict[str, Kernel] = {k.name: k for k in (
    Kernel("qmv", "bs_qmv", ("T", "S", "BITS", "GS"), _QARGS, (), ("tg", "lane", "sg")),
    Kernel("qmm", "bs_qmm", ("T", "S", "BITS", "GS"), _QARGS, (("xs", "BS_QMM_XS"), ("ws", "BS_QMM_WS")),
           ("tg", "lid", "sg")),
    Kernel("attention", "bs_attention", ("T", "D"), _AARGS + (Arg("out", "T", True), Arg("lse", "float32", True)),
           (("qs", "BS_ATT_BQ * D"), ("kvs", "BS_ATT_BC * D"), ("ss", "BS_ATT_BQ * BS_ATT_BC"), ("diag", "128"),
            ("rows", "2 * BS_ATT_BQ")), ("tg", "lid", "sg")),
    Kernel("attention_decode", "bs_attention_decode", ("T", "D"),
           _AARGS + (Arg("part_o", "float32", True), Arg("part_ml", "float32", True)),
           (("red_o", "4 * BS_DEC_MAXR * D"), ("red_ml", "8 * BS_DEC_MAXR")), ("tg", "lid", "lane", "sg")),
    Kernel("attention_combine", "bs_attention_combine", ("T", "D"),
           (Arg("part_o", "float32"), Arg("part_ml", "float32"), Arg("ip", "int32"), Arg("out", "T", True),
            Arg("lse", "float32", True)), (), ("tg", "lid")),
)}

# The MSL attribute of each thread id, and the name mx.fast.metal_kernel gives it.
_ID_ATTR = {"tg": "threadgroup_position_in_grid", "lid": "thread_index_in_threadgroup",
            "lane": "thread_index_in_simdgroup", "sg": "simdgroup_index_in_threadgroup"}
_ID_NAMES = {i: i for i in _ID_ATTR}
_ID_MLX = {"tg": "threadgroup_position_in_grid.x", "lid": "thread_index_in_threadgroup",
           "lane": "thread_index_in_simdgroup", "sg": "simdgroup_index_in_threadgroup"}


def instance_name(kernel: str, template: Dict[str, object]) -> str:
    """bs_<kernel>_<template values>, e.g. bs_qmv_f16_f32_4_64 (MLX's naming style)."""
    parts = [_SHORT.get(str(v), str(v)) for v in (template[t] for t in KERNELS[kernel].template)]
    return "_".join(["bs", kernel] + parts)


def _msl_value(v: object) -> str:
    return MSL_TYPES.get(str(v), str(v))


def _ctype(arg: Arg, template: Dict[str, object]) -> str:
    return _msl_value(template[arg.ctype]) if arg.ctype in template else MSL_TYPES[arg.ctype]


def entry_source(kernel: str, template: Dict[str, object]) -> str:
    """A `kernel void` entry point for one instance: buffers in argument order at
    [[buffer(i)]], the threadgroup arrays declared at kernel scope, then the impl call."""
    k = KERNELS[kernel]
    params = []
    for i, a in enumerate(k.args):
        const = "" if a.output else "const "
        params.append(f"{const}device {_ctype(a, template)}* {a.name} [[buffer({i})]]")
    params += [f"uint {i} [[{_ID_ATTR[i]}]]" for i in ("tg", "lid", "lane", "sg")]
    targs = ", ".join(_msl_value(template[t]) for t in k.template)
    body = [f"  {decl}" for decl in _shared_decls(k, template)]
    body.append(f"  {k.impl}<{targs}>({', '.join(_impl_args(k, _ID_NAMES))});")
    name = instance_name(kernel, template)
    return f"kernel void {name}(\n    " + ",\n    ".join(params) + ") {\n" + "\n".join(body) + "\n}\n"


def _shared_decls(k: Kernel, template: Dict[str, object]) -> List[str]:
    decls = []
    for name, size in k.shared:
        for t, v in template.items():
            size = re.sub(rf"\b{t}\b", str(v), size)
        decls.append(f"threadgroup float {name}[{size}];")
    return decls


def _impl_args(k: Kernel, ids: Dict[str, str]) -> List[str]:
    """The impl's arguments: its buffers in its own order, the threadgroup arrays, then
    the thread ids under the names `ids` gives them."""
    return list(_IMPL_ORDER[k.name]) + [s for s, _ in k.shared] + [ids[i] for i in k.ids]


# The buffer parameters of each impl function in its own order (the Arg order above is
# the binding order: inputs first, then outputs, as mx.fast.metal_kernel binds them).
_IMPL_ORDER = {
    "qmv": ("x", "p0", "p1", "scales", "biases", "y", "ip"),
    "qmm": ("x", "p0", "p1", "scales", "biases", "y", "ip"),
    "attention": ("q", "k", "v", "indptr", "indices", "out", "lse", "ip", "fp"),
    "attention_decode": ("q", "k", "v", "indptr", "indices", "part_o", "part_ml", "ip", "fp"),
    "attention_combine": ("part_o", "part_ml", "out", "lse", "ip"),
}


def mlx_body(kernel: str) -> str:
    """The body of an mx.fast.metal_kernel: threadgroup arrays, then the impl call with
    MLX's template names and thread-id names (which MLX turns into parameters)."""
    k = KERNELS[kernel]
    body = [f"threadgroup float {name}[{size}];" for name, size in k.shared]
    body.append(f"{k.impl}<{', '.join(k.template)}>({', '.join(_impl_args(k, _ID_MLX))});")
    return "\n".join(body)


# -- launch plans ---------------------------------------------------------------------------
@dataclasses.dataclass
class Launch:
    kernel: str
    template: Dict[str, object]
    groups: int
    threads: int

    @property
    def name(self) -> str:
        return instance_name(self.kernel, self.template)


@dataclasses.dataclass
class Plan:
    """Launches in order; `aux` are small host arrays every launch may read (ip, fp, the
    mask or a 1-element stand-in), `alloc` the buffers the plan writes: name -> (shape,
    dtype name). The caller's arrays keep their argument names (x, p0, q, ...)."""
    launches: List[Launch]
    aux: Dict[str, np.ndarray]
    alloc: Dict[str, Tuple[Tuple[int, ...], str]]
    result: Tuple[str, ...]


def _check_dtype(op: str, name: str, dtype: str, allowed: Sequence[str]) -> None:
    if dtype not in allowed:
        raise TypeError(f"{op}: {name} must be one of {', '.join(allowed)}, got {dtype}")


def plan_qmatmul(m: int, n: int, k: int, bits: int, group_size: int, x_dtype: str, s_dtype: str) -> Plan:
    """y[m, n] = x[m, k] W^T: bs_qmv for m <= 8 (one x row per threadgroup column), bs_qmm
    (32 x 32 tiles) above."""
    op = "qmatmul"
    _check_dtype(op, "x", x_dtype, DTYPES)
    _check_dtype(op, "scales", s_dtype, DTYPES)
    if bits not in BITS:
        raise ValueError(f"{op}: bits must be one of {BITS}, got {bits}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"{op}: group_size must be one of {GROUP_SIZES}, got {group_size}")
    if k <= 0 or k % group_size:
        raise ValueError(f"{op}: K = {k} must be a positive multiple of the group size {group_size}")
    if m < 0 or n <= 0:
        raise ValueError(f"{op}: x must have rows >= 0 and the weight N > 0, got M = {m}, N = {n}")
    if max(m, n) * k >= 2 ** 31:
        raise ValueError(f"{op}: M*K and N*K must stay below 2^31 elements on Metal, got M={m}, N={n}, K={k}")
    template = {"T": x_dtype, "S": s_dtype, "BITS": bits, "GS": group_size}
    ip = np.array([m, n, k], dtype=np.int32)
    if m == 0:
        launches = []
    elif m <= QMV_MAX_M:
        launches = [Launch("qmv", template, m * -(-n // QMV_TG_ROWS), QMV_THREADS)]
    else:
        launches = [Launch("qmm", template, -(-m // QMM_BM) * -(-n // QMM_BN), QMM_THREADS)]
    return Plan(launches, {"ip": ip}, {"y": ((m, n), x_dtype)}, ("y",))


def plan_attention(b: int, hq: int, hkv: int, lq: int, lk: int, d: int, dtype: str,
                   q_strides: Sequence[int], k_strides: Sequence[int], v_strides: Sequence[int],
                   mask=None, causal: bool = True, scale: Optional[float] = None, q_offset: int = 0,
                   splits: Optional[int] = None) -> Plan:
    """Block-sparse attention: the decode kernel (key splits + combine) when every query row
    of the heads sharing a kv head fits in one threadgroup (Hq/Hkv * Lq <= 8) and in the
    mask's first query block; the flash forward kernel otherwise. Strides are in elements
    (batch, head, row); the last dimension must be contiguous. `splits` forces the decode
    kernel's key splits per (batch, kv head) (default: one per 256 keys, at most 128)."""
    op = "attention"
    _check_dtype(op, "q", dtype, DTYPES)
    if d not in HEAD_DIMS:
        raise ValueError(f"{op}: head_dim must be one of {HEAD_DIMS}, got {d}")
    if min(b, hq, hkv) <= 0 or hq % hkv:
        raise ValueError(f"{op}: q heads ({hq}) must be a positive multiple of k/v heads ({hkv})")
    if lq < 0 or lk < 0 or q_offset < 0:
        raise ValueError(f"{op}: lengths and q_offset must be >= 0, got Lq={lq}, Lk={lk}, q_offset={q_offset}")
    for name, st in (("q", q_strides), ("k", k_strides), ("v", v_strides)):
        if len(st) != 3 or any(int(s) < 0 or int(s) >= 2 ** 31 for s in st):
            raise ValueError(f"{op}: {name} strides (batch, head, row) must be 3 values in [0, 2^31), got {tuple(st)}")
    g = hq // hkv
    ip = np.zeros(IP_COUNT, dtype=np.int32)
    ip[:6] = (b, hq, hkv, lq, lk, q_offset)
    ip[6] = int(bool(causal))
    if mask is not None:
        indptr, indices = np.ascontiguousarray(mask.indptr, np.int32), np.ascontiguousarray(mask.indices, np.int32)
        nqb = indptr.shape[2] - 1
        if indptr.shape[:2] != (b, hkv) or indices.shape[:2] != (b, hkv):
            raise ValueError(f"{op}: the mask is for [B, Hkv] = {tuple(indptr.shape[:2])}, the call has {(b, hkv)}")
        if nqb < -(-lq // mask.block_q):
            raise ValueError(f"{op}: the mask has {nqb} query blocks of {mask.block_q}, Lq = {lq} needs "
                             f"{-(-lq // mask.block_q)}")
        nkb = -(-lk // mask.block_k)
        if indices.size and (indices.min() < 0 or indices.max() >= max(nkb, 1)):
            raise ValueError(f"{op}: mask indices must lie in [0, {nkb}) for Lk = {lk} in blocks of {mask.block_k}")
        if np.any(np.diff(indptr, axis=2) < 0) or indptr[..., 0].min() < 0 or indptr[..., -1].max() > indices.shape[2]:
            raise ValueError(f"{op}: mask indptr must be non-decreasing within [0, {indices.shape[2]}]")
        ip[7:12] = (1, mask.block_q, mask.block_k, nqb, indices.shape[2])
    else:
        indptr = indices = np.zeros(1, np.int32)
        ip[7:12] = (0, 64, 64, 0, 0)
    ip[12:15], ip[15:18], ip[18:21] = q_strides, k_strides, v_strides
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    fp = np.array([scale * math.log2(math.e)], dtype=np.float32)
    template = {"T": dtype, "D": d}
    aux = {"indptr": indptr, "indices": indices, "ip": ip, "fp": fp}
    out = {"out": ((b, hq, lq, d), dtype), "lse": ((b, hq, lq), "float32")}
    if lq == 0:
        return Plan([], aux, out, ("out", "lse"))
    decode = g * lq <= DEC_MAXR and (mask is None or lq <= mask.block_q)
    if not decode:
        launch = Launch("attention", template, b * hq * -(-lq // ATT_BQ), ATT_THREADS)
        return Plan([launch], aux, out, ("out", "lse"))
    if mask is None:
        keys = lk
    else:
        keys = int(np.diff(indptr[:, :, :2], axis=2).max(initial=0)) * mask.block_k
    if splits is None:
        splits = max(1, min(DEC_MAX_SPLITS, -(-keys // DEC_KEYS_PER_SPLIT)))
    elif not 1 <= splits <= 4096:
        raise ValueError(f"{op}: splits must be in [1, 4096], got {splits}")
    ip[21] = splits
    r = g * lq
    alloc = dict(out, part_o=((b * hkv * splits * r * d,), "float32"), part_ml=((b * hkv * splits * r * 2,), "float32"))
    return Plan([Launch("attention_decode", template, b * hkv * splits, DEC_THREADS),
                 Launch("attention_combine", template, b * hkv * r, d)], aux, alloc, ("out", "lse"))


def instances() -> List[Tuple[str, Dict[str, object]]]:
    """Every instance the planners can ask for: (kernel, template)."""
    out = []
    for kname in ("qmv", "qmm"):
        for t in DTYPES:
            for s in DTYPES:
                for bits in BITS:
                    for gs in GROUP_SIZES:
                        out.append((kname, {"T": t, "S": s, "BITS": bits, "GS": gs}))
    for kname in ("attention", "attention_decode", "attention_combine"):
        for t in DTYPES:
            for d in HEAD_DIMS:
                out.append((kname, {"T": t, "D": d}))
    return out


assert VALUES_PER_WORD == 8 and INT8 == 8  # the kernels' word and view arithmetic
