"""Kernel benchmarks: bitswitch qmatmul against the best alternatives, in the same run.

Every timing is a median of repeated calls. "streamed" means the weights come from DRAM:
the call cycles through copies of the weight totalling more than ``--stream-bytes``
(default 1.1 GB, above any L3), and the anchors are measured the same way. "hot" repeats
one copy (cache-resident when it fits). The read-bandwidth anchor is the native
``read_stream`` over a 1 GiB buffer with the same threads.
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
from typing import Callable, Optional, Sequence

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

PRESETS = {
    # The default run: a representative shape per size, about two minutes on 2 cores.
    "default": dict(
        shapes=[Shape("0.6b.gate_proj", 3072, 1024), Shape("4b.down_proj", 2560, 9728), SQUARE,
                Shape("8b.gate_proj", 12288, 4096), LM_HEAD],
        ms=[1, 16, 128], mlx_max_m=16, hot=False),
    "full": dict(
        shapes=[s for m in MODELS for s in layer_shapes(m)] + [SQUARE, LM_HEAD],
        ms=[1, 4, 16, 128, 512], mlx_max_m=512, hot=True),
    # A smoke run for tests and CI: tiny, seconds.
    "smoke": dict(shapes=[Shape("smoke", 256, 512)], ms=[1, 16], mlx_max_m=1, hot=False),
}


def median_time(fn: Callable[[int], object], copies: int, min_time: float, min_calls: int,
                max_calls: int = 100000) -> float:
    """Median seconds per call of fn(i) with i cycling over `copies` copies."""
    fn(0)  # warm-up (first-call costs: allocation, dispatch caches)
    times: list = []
    start = time.perf_counter()
    i = 0
    while len(times) < max_calls and (len(times) < min_calls or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        fn(i % copies)
        times.append(time.perf_counter() - t0)
        i += 1
    return statistics.median(times)


def read_bandwidth(threads: int, nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Median GB/s of a multi-threaded sequential read of `nbytes`."""
    buf = np.ones(nbytes // 4, dtype=np.uint32)
    _C.read_stream(buf)
    t = median_time(lambda _: _C.read_stream(buf), 1, 0.0, reps)
    del buf
    return nbytes / t / 1e9


def _copies_for(nbytes: int, stream_bytes: int) -> int:
    return max(2, -(-stream_bytes // max(1, nbytes)))


def _copy_qweight(qw: QWeight) -> QWeight:
    cp = lambda a: None if a is None else a.copy()  # noqa: E731
    return QWeight(cp(qw.plane0), cp(qw.plane1), cp(qw.scales), cp(qw.biases), qw.group_size)


@dataclasses.dataclass
class Row:
    shape: str
    n: int
    k: int
    m: int
    bits: int
    mode: str
    us: float
    gbs: float
    bw_frac: float
    torch_bf16_us: Optional[float] = None
    mlx_us: Optional[float] = None

    @property
    def vs_torch(self) -> Optional[float]:
        return None if self.torch_bf16_us is None else self.torch_bf16_us / self.us

    @property
    def vs_mlx(self) -> Optional[float]:
        return None if self.mlx_us is None else self.mlx_us / self.us


def run_kernels(shapes: Sequence[Shape], ms: Sequence[int], bits_list: Sequence[int] = (4, 8),
                group_size: int = 64, threads: int = 2, modes: Sequence[str] = ("streamed",),
                anchors: Sequence[str] = ("torch", "mlx"), mlx_max_m: int = 16,
                stream_bytes: int = 1_100_000_000, min_time: float = 0.3, seed: int = 0,
                log: Callable[[str], None] = print) -> dict:
    """Times qmatmul and the anchors on every (shape, M, bits, mode); returns a report dict."""
    _C.set_num_threads(threads)
    torch = None
    if "torch" in anchors:
        try:
            import torch
            torch.set_num_threads(threads)
        except ImportError:
            log("torch not installed: no torch anchor")
    mx = None
    if "mlx" in anchors:
        try:
            import mlx.core as mx
        except ImportError:
            log("mlx not installed: no MLX anchor")
    rng = np.random.default_rng(seed)
    bw = read_bandwidth(threads)
    log(f"read bandwidth ({threads} threads, 1 GiB): {bw:.1f} GB/s")
    log(HEADER)
    rows = []
    for shape in shapes:
        w = (rng.standard_normal((shape.n, shape.k), dtype=np.float32) * 0.02).astype(A.BFLOAT16)
        qw = quantize(w, group_size=group_size, bits=8)
        for mode in modes:
            stream = mode == "streamed"
            # Anchor: torch bf16 F.linear (oneDNN), weights streamed the same way.
            t_torch = {}
            if torch is not None:
                wt = torch.from_numpy(w.view(np.int16)).view(torch.bfloat16)
                copies = _copies_for(wt.numel() * 2, stream_bytes) if stream else 1
                wts = [wt.clone() for _ in range(copies)]
                for m in ms:
                    xt = torch.randn(m, shape.k, dtype=torch.bfloat16)
                    with torch.inference_mode():
                        t_torch[m] = median_time(lambda i: torch.nn.functional.linear(xt, wts[i]), copies,
                                                 min_time, 3)
                del wts
                gc.collect()
            for bits in bits_list:
                view = qw if bits == 8 else qw.int4_only()
                nbytes = view.nbytes(bits)
                copies = _copies_for(nbytes, stream_bytes) if stream else 1
                qws = [_copy_qweight(view) for _ in range(copies)]
                t_mlx = {}
                if mx is not None:
                    wq, s, b = mx.quantize(mx.array(w.astype(np.float32)).astype(mx.bfloat16),
                                           group_size=group_size, bits=bits)
                    mx.eval(wq, s, b)
                for m in ms:
                    x = (rng.standard_normal((m, shape.k), dtype=np.float32)).astype(A.BFLOAT16)
                    y = np.empty((m, shape.n), dtype=A.BFLOAT16)
                    t = median_time(lambda i: _C.qmatmul(x, qws[i].plane0, qws[i].plane1 if bits == 8 else None,
                                                         qws[i].scales, qws[i].biases, group_size, bits, y),
                                    copies, min_time, 5)
                    if mx is not None and m <= mlx_max_m:
                        xm = mx.array(x.astype(np.float32)).astype(mx.bfloat16)
                        mx.eval(xm)
                        f = lambda _: mx.eval(mx.quantized_matmul(xm, wq, s, b, transpose=True,  # noqa: E731
                                                                  group_size=group_size, bits=bits))
                        t_mlx[m] = median_time(f, 1, min(min_time, 0.5), 1, max_calls=3)
                    row = Row(shape.name, shape.n, shape.k, m, bits, mode, t * 1e6, nbytes / t / 1e9,
                              nbytes / t / 1e9 / bw,
                              t_torch[m] * 1e6 if m in t_torch else None,
                              t_mlx[m] * 1e6 if m in t_mlx else None)
                    rows.append(row)
                    log(format_row(row))
                del qws
                gc.collect()
    return {
        "machine": machine_description(),
        "threads": threads,
        "group_size": group_size,
        "read_bandwidth_gbs": bw,
        "cpu_variant": _C.cpu_variant(),
        "rows": [dict(dataclasses.asdict(r), vs_torch=r.vs_torch, vs_mlx=r.vs_mlx) for r in rows],
    }


def machine_description() -> str:
    info = _C.cpu_info()
    return f"{info['brand'] or info['vendor']} ({platform.machine()}), variant {info['active']}"


HEADER = (f"{'shape':<16}{'N':>7}{'K':>6}{'M':>5}{'bits':>5} {'mode':<9}{'us':>10}{'GB/s':>7}{'%BW':>6}"
          f"{'torch bf16 us':>15}{'x torch':>9}{'mlx us':>11}{'x mlx':>8}")


def _fmt(v: Optional[float], spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_row(r: Row) -> str:
    return (f"{r.shape:<16}{r.n:>7}{r.k:>6}{r.m:>5}{r.bits:>5} {r.mode:<9}{r.us:>10.1f}{r.gbs:>7.1f}"
            f"{r.bw_frac * 100:>5.0f}%{_fmt(r.torch_bf16_us, '.1f'):>15}{_fmt(r.vs_torch, '.2f'):>9}"
            f"{_fmt(r.mlx_us, '.0f'):>11}{_fmt(r.vs_mlx, '.1f'):>8}")


def markdown_table(report: dict) -> str:
    lines = ["| shape | N | K | M | bits | mode | µs | GB/s | % read BW | torch bf16 µs | × torch | MLX µs | × MLX |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for d in report["rows"]:
        r = Row(**{f.name: d[f.name] for f in dataclasses.fields(Row)})
        lines.append(f"| {r.shape} | {r.n} | {r.k} | {r.m} | {r.bits} | {r.mode} | {r.us:.1f} | {r.gbs:.1f} | "
                     f"{r.bw_frac * 100:.0f}% | {_fmt(r.torch_bf16_us, '.1f')} | {_fmt(r.vs_torch, '.2f')} | "
                     f"{_fmt(r.mlx_us, '.0f')} | {_fmt(r.vs_mlx, '.1f')} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="bitswitch bench kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--m", type=str, help="comma-separated M values (overrides the preset)")
    p.add_argument("--bits", type=str, default="4,8")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mode", choices=["streamed", "hot", "both"], help="default: the preset's")
    p.add_argument("--no-torch", action="store_true", help="skip the torch bf16 anchor")
    p.add_argument("--no-mlx", action="store_true", help="skip the MLX anchor")
    p.add_argument("--stream-bytes", type=float, default=1.1e9)
    p.add_argument("--min-time", type=float, default=0.3, help="seconds of calls per measurement")
    p.add_argument("--json", type=str, help="write the report here")
    p.add_argument("--markdown", action="store_true", help="print a markdown table at the end")
    a = p.parse_args(argv)
    preset = PRESETS[a.preset]
    ms = [int(v) for v in a.m.split(",")] if a.m else preset["ms"]
    modes = {"streamed": ["streamed"], "hot": ["hot"], "both": ["streamed", "hot"]}[
        a.mode or ("both" if preset["hot"] else "streamed")]
    anchors = [n for n, off in (("torch", a.no_torch), ("mlx", a.no_mlx)) if not off]
    print(f"bitswitch {_C.__version__} kernels: {machine_description()}, {a.threads} threads, "
          f"group size {a.group_size}, x bfloat16; median per call")
    print("x torch / x mlx: speed-up over the anchor measured in this run (>1: bitswitch faster); "
          "%BW: weight bytes per second over the measured read bandwidth")
    report = run_kernels(preset["shapes"], ms, [int(b) for b in a.bits.split(",")], a.group_size, a.threads,
                         modes, anchors, preset["mlx_max_m"], int(a.stream_bytes), a.min_time,
                         log=lambda s: print(s, flush=True))
    report["command"] = "bitswitch bench kernels " + " ".join(sys.argv[3:] if argv is None else argv)
    report["date"] = time.strftime("%Y-%m-%d")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    if a.markdown:
        print(markdown_table(report))
    return 0
