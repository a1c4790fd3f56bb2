"""Kernel benchmarks: bitswitch qmatmul against the best alternatives, in the same run.

Every timing is a median of repeated calls. "streamed" means the weights come from DRAM:
each call uses the next of several copies of the weight totalling more than
``--stream-bytes`` (default 1.1 GB, above any L3), and the anchors are measured the same
way. "hot" repeats one copy (cache-resident when it fits). The read-bandwidth anchor is
the native ``read_stream`` over a 1 GiB buffer with the same number of threads.

Anchors: torch ``F.linear`` on bfloat16 weights (what a bf16 checkpoint runs on; oneDNN,
AMX where the CPU has it) and on float32 weights, and MLX ``quantized_matmul`` with the
same bits and group size (MLX's CPU kernel is not built for speed: its time grows by
~0.14 s per row of x at 4096x4096 here, so it is measured only up to ``mlx_max_m``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import statistics
import sys
import time
from typing import Callable, Dict, Optional, Sequence

import numpy as np

from . import _C
from . import _arrays as A
from .quant import QWeight, quantize

# Qwen3 dimensions (config.json of each checkpoint).
MODELS = {
    "0.6b": dict(hidden=1024, inter=3072, heads=16, kv_heads=8, head_dim=128, vocab=151936),
    "4b": dict(hidden=2560, inter=9728, heads=32, kv_heads=8, head_dim=128, vocab=151936),
    "8b": dict(hidden=4096, inter=12288, heads=32, kv_heads=8, head_dim=128, vocab=151936),
}


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    n: int  # outputs
    k: int  # inputs


def layer_shapes(model: str) -> list:
    c = MODELS[model]
    h, q, kv = c["hidden"], c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"]
    return [
        Shape(f"{model}.q_proj", q, h),
        Shape(f"{model}.k_proj", kv, h),
        Shape(f"{model}.o_proj", h, q),
        Shape(f"{model}.gate_proj", c["inter"], h),
        Shape(f"{model}.down_proj", h, c["inter"]),
    ]


SQUARE = Shape("4096x4096", 4096, 4096)
LM_HEAD = Shape("0.6b.lm_head", 151936, 1024)

# A view is the weight bits plus the activation precision: w4 / w8 read one / two planes
# with float-grade activations (act_bits 16), w4a8 / w8a8 with int8 activations.
X_DTYPES = {"bfloat16": A.BFLOAT16, "float16": np.float16, "float32": np.float32}
VIEWS = {"w4": (4, 16), "w4a8": (4, 8), "w8": (8, 16), "w8a8": (8, 8)}

PRESETS = {
    # The default run: a representative shape per model size, a few minutes on 2 cores.
    "default": dict(
        shapes=[Shape("0.6b.gate_proj", 3072, 1024), Shape("4b.down_proj", 2560, 9728), SQUARE,
                Shape("8b.gate_proj", 12288, 4096), LM_HEAD],
        ms=[1, 16, 128], views=["w4", "w4a8", "w8"], mlx_max_m=1, modes=["streamed"]),
    "full": dict(
        shapes=[s for m in MODELS for s in layer_shapes(m)] + [SQUARE, LM_HEAD],
        ms=[1, 4, 16, 128, 512], views=["w4", "w4a8", "w8"], mlx_max_m=16, modes=["streamed", "hot"]),
    # Prefill sizes on the Qwen3 0.6B and 4B layers (v_proj = k_proj, up_proj = gate_proj):
    # the bf16 GEMMs against the FMA GEMM with --variants avx512,avx512bf16 (or amx), up to a
    # 2048-token prompt.
    "prefill": dict(shapes=layer_shapes("0.6b") + layer_shapes("4b"), ms=[16, 64, 128, 512, 2048],
                    views=["w4", "w8"], mlx_max_m=0, modes=["streamed"]),
    # Seconds: for tests and CI.
    "smoke": dict(shapes=[Shape("smoke", 256, 512)], ms=[1, 16], views=["w4", "w4a8", "w8"], mlx_max_m=1,
                  modes=["streamed"]),
}

ANCHORS = ("torch_bf16", "torch_f32", "mlx")


def median_time(fn: Callable[[int], object], copies: int, min_time: float, min_calls: int,
                max_calls: int = 100000) -> float:
    """Median seconds per call of fn(i), i cycling over `copies` weight copies. The first
    call is a warm-up, unless a single call already takes longer than `min_time`."""
    t0 = time.perf_counter()
    fn(0)
    first = time.perf_counter() - t0
    times: list = [first] if first > min_time else []
    start = time.perf_counter()
    i = 1
    while len(times) < max_calls and (len(times) < min_calls or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        fn(i % copies)
        times.append(time.perf_counter() - t0)
        i += 1
    return statistics.median(times)


def read_bandwidth(threads: int, nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Median GB/s of a multi-threaded sequential read of `nbytes`."""
    _C.set_num_threads(threads)
    buf = np.ones(nbytes // 4, dtype=np.uint32)
    t = median_time(lambda _: _C.read_stream(buf), 1, 0.0, reps)
    del buf
    return nbytes / t / 1e9


def _copies(nbytes: int, stream_bytes: int, stream: bool) -> int:
    return max(2, -(-stream_bytes // max(1, nbytes))) if stream else 1


def _copy_qweight(qw: QWeight) -> QWeight:
    cp = lambda a: None if a is None else a.copy()  # noqa: E731
    return QWeight(cp(qw.plane0), cp(qw.plane1), cp(qw.scales), cp(qw.biases), qw.group_size)


@dataclasses.dataclass
class Row:
    shape: str
    n: int
    k: int
    m: int
    view: str
    bits: int
    act_bits: int
    mode: str
    us: float
    gbs: float
    bw_frac: float  # gbs over the read bandwidth measured just before this shape
    anchors_us: Dict[str, float] = dataclasses.field(default_factory=dict)
    variant: str = ""  # the CPU kernel variant timed

    @property
    def gflops(self) -> float:  # prefill sizes are compute-bound: the GEMM's rate
        return 2.0 * self.m * self.n * self.k / self.us / 1e3

    def speedup(self, anchor: str) -> Optional[float]:
        t = self.anchors_us.get(anchor)
        return None if t is None else t / self.us


class _Anchors:
    """The alternatives, set up per (shape, mode) and timed per (bits, M)."""

    def __init__(self, names: Sequence[str], threads: int, log: Callable[[str], None]):
        self.torch = self.mx = None
        if any(n.startswith("torch") for n in names):
            try:
                import torch

                torch.set_num_threads(threads)
                self.torch = torch
            except ImportError:
                log("torch is not installed: no torch anchors")
        if "mlx" in names:
            try:
                import mlx.core as mx

                self.mx = mx
            except ImportError:
                log("mlx is not installed: no MLX anchor")
        self.names = [n for n in names if (n == "mlx" and self.mx) or (n.startswith("torch") and self.torch)]

    def time_torch(self, name: str, w: np.ndarray, ms: Sequence[int], stream: bool, stream_bytes: int,
                   min_time: float) -> Dict[int, float]:
        torch = self.torch
        dtype = torch.bfloat16 if name == "torch_bf16" else torch.float32
        wt = torch.from_numpy(w.view(np.int16)).view(torch.bfloat16).to(dtype)
        copies = _copies(wt.numel() * wt.element_size(), stream_bytes, stream)
        wts = [wt.clone() for _ in range(copies)]
        out = {}
        with torch.inference_mode():
            for m in ms:
                x = torch.randn(m, w.shape[1], dtype=dtype)
                out[m] = median_time(lambda i: torch.nn.functional.linear(x, wts[i]), copies, min_time, 3)
        del wts
        gc.collect()
        return out

    def time_mlx(self, w: np.ndarray, bits: int, group_size: int, ms: Sequence[int], min_time: float) -> Dict[int, float]:
        mx = self.mx
        wq, s, b = mx.quantize(mx.array(w.astype(np.float32)).astype(mx.bfloat16), group_size=group_size, bits=bits)
        mx.eval(wq, s, b)
        out = {}
        for m in ms:
            x = mx.random.normal((m, w.shape[1])).astype(mx.bfloat16)
            mx.eval(x)
            f = lambda _: mx.eval(mx.quantized_matmul(x, wq, s, b, transpose=True,  # noqa: E731
                                                      group_size=group_size, bits=bits))
            out[m] = median_time(f, 1, min_time, 1, max_calls=5)
        return out


def run_kernels(shapes: Sequence[Shape], ms: Sequence[int], views: Sequence[str] = ("w4", "w4a8", "w8"),
                group_size: int = 64, threads: int = 2, modes: Sequence[str] = ("streamed",),
                anchors: Sequence[str] = ANCHORS, mlx_max_m: int = 16,
                stream_bytes: int = 1_100_000_000, min_time: float = 0.3, seed: int = 0,
                log: Callable[[str], None] = print, variants: Sequence[str] = (),
                x_dtype: str = "bfloat16") -> dict:
    """Times qmatmul and the anchors on every (shape, mode, bits, M); returns a report.
    `variants`: CPU kernel variants to time one after the other against the same anchors
    (default: the active one). `x_dtype`: x and y of bitswitch's calls (the torch anchors
    keep their own dtypes)."""
    from .ops import use_cpu_variant

    xdt = X_DTYPES[x_dtype]
    anc = _Anchors(anchors, threads, log)
    timed = list(variants) or [_C.cpu_variant()]
    rng = np.random.default_rng(seed)
    bws = [read_bandwidth(threads)]
    log(f"read bandwidth ({threads} threads, 1 GiB): {bws[0]:.1f} GB/s (measured again before every shape)")
    log(header(anc.names))
    rows = []
    for shape in shapes:
        w = (rng.standard_normal((shape.n, shape.k), dtype=np.float32) * 0.02).astype(A.BFLOAT16)
        qw = quantize(w, group_size=group_size, bits=8)
        # The denominator of % BW, measured next to the rows that use it: on a shared
        # machine the available bandwidth drifts over a long run.
        bw = read_bandwidth(threads)
        bws.append(bw)
        _C.set_num_threads(threads)
        for mode in modes:
            stream = mode == "streamed"
            t_anchor = {name: anc.time_torch(name, w, ms, stream, stream_bytes, min_time)
                        for name in anc.names if name.startswith("torch")}
            mlx_times: Dict[int, Dict[int, float]] = {}
            for view_name in views:
                bits, act_bits = VIEWS[view_name]
                view = qw if bits == 8 else qw.int4_only()
                nbytes = view.nbytes(bits)
                copies = _copies(nbytes, stream_bytes, stream)
                qws = [_copy_qweight(view) for _ in range(copies)]
                # MLX is compute-bound here and has one activation precision: timed once per bits.
                if "mlx" in anc.names and mode == modes[0] and bits not in mlx_times:
                    mlx_times[bits] = anc.time_mlx(w, bits, group_size, [m for m in ms if m <= mlx_max_m],
                                                   min(min_time, 0.5))
                if bits in mlx_times:
                    t_anchor["mlx"] = mlx_times[bits]
                for m in ms:
                    x = rng.standard_normal((m, shape.k), dtype=np.float32).astype(xdt)
                    y = np.empty((m, shape.n), dtype=xdt)
                    for variant in timed:
                        with use_cpu_variant(variant):
                            t = median_time(lambda i: _C.qmatmul(x, qws[i].plane0,
                                                                 qws[i].plane1 if bits == 8 else None, qws[i].scales,
                                                                 qws[i].biases, group_size, bits, y, act_bits),
                                            copies, min_time, 5)
                        row = Row(shape.name, shape.n, shape.k, m, view_name, bits, act_bits, mode, t * 1e6,
                                  nbytes / t / 1e9, nbytes / t / 1e9 / bw,
                                  {a: v[m] * 1e6 for a, v in t_anchor.items() if m in v}, variant)
                        rows.append(row)
                        log(format_row(row, anc.names))
                del qws
                gc.collect()
    return {
        "machine": machine_description(),
        "threads": threads,
        "group_size": group_size,
        "x_dtype": x_dtype,
        "read_bandwidth_gbs": statistics.median(bws),
        "read_bandwidth_range_gbs": [min(bws), max(bws)],
        "cpu_variant": _C.cpu_variant(),
        "anchors": anc.names,
        "rows": [dict(dataclasses.asdict(r), speedups={a: r.speedup(a) for a in r.anchors_us}) for r in rows],
    }


def machine_description() -> str:
    info = _C.cpu_info()
    return f"{info['brand'] or info['vendor']} ({platform.machine()}), kernel variant {info['active']}"


_LABEL = {"torch_bf16": "torch bf16", "torch_f32": "torch f32", "mlx": "mlx"}


def header(anchors: Sequence[str]) -> str:
    h = f"{'shape':<16}{'N':>7}{'K':>6}{'M':>5} {'view':<5} {'mode':<9}{'variant':<8}{'us':>10}{'GB/s':>7}{'%BW':>6}{'GFLOP/s':>9}"
    for a in anchors:
        h += f"{_LABEL[a] + ' us':>15}{'x':>7}"
    return h


def _fmt(v: Optional[float], spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_row(r: Row, anchors: Sequence[str]) -> str:
    s = (f"{r.shape:<16}{r.n:>7}{r.k:>6}{r.m:>5} {r.view:<5} {r.mode:<9}{r.variant:<8}{r.us:>10.1f}{r.gbs:>7.1f}"
         f"{r.bw_frac * 100:>5.0f}%{r.gflops:>9.0f}")
    for a in anchors:
        s += f"{_fmt(r.anchors_us.get(a), '.1f'):>15}{_fmt(r.speedup(a), '.2f'):>7}"
    return s


def markdown_table(report: dict) -> str:
    anchors = report["anchors"]
    head = "| shape | N | K | M | view | mode | variant | µs | GB/s | % read BW | GFLOP/s |" + "".join(
        f" {_LABEL[a]} µs | × {_LABEL[a]} |" for a in anchors)
    lines = [head, "|" + "---|" * (11 + 2 * len(anchors))]
    for d in report["rows"]:
        line = (f"| {d['shape']} | {d['n']} | {d['k']} | {d['m']} | {d['view']} | {d['mode']} | "
                f"{d.get('variant', '')} | {d['us']:.1f} | "
                f"{d['gbs']:.1f} | {d['bw_frac'] * 100:.0f}% | {2 * d['m'] * d['n'] * d['k'] / d['us'] / 1e3:.0f} |")
        for a in anchors:
            line += f" {_fmt(d['anchors_us'].get(a), '.1f')} | {_fmt(d['speedups'].get(a), '.2f')} |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="bitswitch bench kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--m", type=str, help="comma-separated M values (overrides the preset)")
    p.add_argument("--views", type=str, help="comma-separated subset of " + ",".join(VIEWS) +
                   " (w4/w8: INT4/INT8 weights, a8: int8 activations; default: the preset's)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--x-dtype", choices=sorted(X_DTYPES), default="bfloat16",
                   help="dtype of x and y in bitswitch's calls (default bfloat16, as a bf16 model's layers)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mode", choices=["streamed", "hot", "both"], help="default: the preset's")
    p.add_argument("--anchors", type=str, default=",".join(ANCHORS),
                   help=f"comma-separated subset of {','.join(ANCHORS)} ('' for none)")
    p.add_argument("--mlx-max-m", type=int, help="largest M timed for MLX (default: the preset's)")
    p.add_argument("--variants", type=str, default="",
                   help="comma-separated CPU kernel variants to time in the same run, e.g. avx512,amx "
                        "(default: the active one)")
    p.add_argument("--stream-bytes", type=float, default=1.1e9)
    p.add_argument("--min-time", type=float, default=0.3, help="seconds of calls per measurement")
    p.add_argument("--json", type=str, help="write the report here")
    p.add_argument("--markdown", action="store_true", help="print a markdown table at the end")
    a = p.parse_args(argv)
    preset = PRESETS[a.preset]
    ms = [int(v) for v in a.m.split(",")] if a.m else preset["ms"]
    modes = {"streamed": ["streamed"], "hot": ["hot"], "both": ["streamed", "hot"]}.get(a.mode, preset["modes"])
    anchors = [n for n in a.anchors.split(",") if n]
    bad = [n for n in anchors if n not in ANCHORS]
    if bad:
        p.error(f"unknown anchors {bad}; choose from {ANCHORS}")
    views = a.views.split(",") if a.views else preset["views"]
    bad = [v for v in views if v not in VIEWS]
    if bad:
        p.error(f"unknown views {bad}; choose from {tuple(VIEWS)}")
    print(f"bitswitch {_C.__version__} kernels on {machine_description()}: {a.threads} threads, "
          f"group size {a.group_size}, x {a.x_dtype}, median per call")
    print("x: speed-up over the anchor measured in this run (>1: bitswitch is faster); "
          "%BW: weight bytes per second over the measured read bandwidth")
    variants = [v for v in a.variants.split(",") if v]
    status = _C.cpu_info()["variants"]
    bad = [v for v in variants if status.get(v) != "ok"]
    if bad:
        p.error("variants that cannot run here: " + ", ".join(f"{v} ({status.get(v, 'unknown')})" for v in bad))
    report = run_kernels(preset["shapes"], ms, views, a.group_size, a.threads,
                         modes, anchors, a.mlx_max_m if a.mlx_max_m is not None else preset["mlx_max_m"],
                         int(a.stream_bytes), a.min_time, log=lambda s: print(s, flush=True), variants=variants,
                         x_dtype=a.x_dtype)
    report["command"] = "bitswitch bench kernels " + " ".join(sys.argv[3:] if argv is None else argv)
    report["date"] = time.strftime("%Y-%m-%d")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    if a.markdown:
        print(markdown_table(report))
    return 0
