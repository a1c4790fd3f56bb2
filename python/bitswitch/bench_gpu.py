"""bitswitch's CUDA kernels against torch's, on one NVIDIA GPU, in one run.

    bitswitch bench gpu [--quick] [--no-qmatmul] [--no-attention] [--decode-only] [--e2e 0.6b,8b]
                        [--context N]
    python bench/gpu.py ...        (the same)

qmatmul: torch.ops.bitswitch.qmatmul (INT4 and INT8 views of one nibble-plane weight, group
64, bfloat16 scales and activations) on Qwen3-8B and Qwen3-32B layer shapes for M in
{1, 4, 16, 64, 256, 2048}, against torch bf16 F.linear (cuBLAS) and torch's INT4 tinygemm
(aten._weight_int4pack_mm, group 64) on the same shapes. Each layer cycles through enough
weight copies to exceed L2, so small-M timings stream weights from HBM as a model does;
GB/s is the bytes the view reads over time, and "% copy" compares it with a device-to-device
copy measured in the same run. From M = 64 each shape also runs the other side of
BITSWITCH_CUDA_DEQUANT_M (rows "kernel": bitswitch's GEMM where the op dequantizes; rows
"dequant+cuBLAS": the reverse), to place that switch on this GPU.

attention: bitswitch.torch.attention prefill (causal, B=1, 32 query / 8 kv heads, D=128) at
8K and 32K with block masks of density 1.0 (no mask), 0.25 and 0.1 of the causal blocks,
against SDPA's flash backend (dense causal) and flex_attention (compiled) with the same
block mask; decode (one token over the same cache) dense and with 64 pages selected on the
GPU (select_pages_at, included in the time), and a 64-token chunk over the cache (prefill
split-KV), against SDPA. --decode-only runs just the decode rows at 8K and 32K (with
BITSWITCH_CUDA_DECODE=simt: the SIMT rows kernel instead of the tensor-core one).

--e2e: Qwen3 decode tokens/s on random weights of the real shapes, bitswitch in performance
(INT8) and efficiency (INT4) modes, with the step captured in CUDA graphs and eager, against
transformers bf16 holding the same weights (INT8 view dequantized).

split-k: M = 1 at Qwen3-0.6B and 8B shapes inside a CUDA graph, the plan's split-K GEMV
(two launches: partials, then the reduce) against one launch without a workspace; "vs anchor
1" is the single launch's time over the split's.

Times are medians of CUDA-event timings after a warm-up. Prints a table last.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

QWEN3_SHAPES = {  # name: (N, K) of the fused projections a decode step runs
    "8b.qkv": (6144, 4096), "8b.o": (4096, 4096), "8b.gate_up": (24576, 4096), "8b.down": (4096, 12288),
    "32b.qkv": (10240, 5120), "32b.o": (5120, 8192), "32b.gate_up": (51200, 5120), "32b.down": (5120, 25600),
}
L2_BYTES = 60 << 20  # H100 / H200: 50 MiB; rotate through more than that


def cuda_time(fn, reps: int = 50, warmup: int = 5) -> float:
    """Median seconds of fn() by CUDA events."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return statistics.median(ts)


def copy_bandwidth() -> float:
    """Device-to-device copy GB/s (read + write bytes) of 1 GiB."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = cuda_time(lambda: dst.copy_(src), reps=20)
    return 2 * src.numel() / t / 1e9


class Rotating:
    """`copies` instances of something, handed out in turn."""

    def __init__(self, make, nbytes: int):
        self.items = [make(i) for i in range(max(1, -(-2 * L2_BYTES // max(nbytes, 1))))]
        self.i = 0

    def next(self):
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


def _random_qweight(n: int, k: int, seed: int):
    from .bench_e2e import random_qweight

    qw = random_qweight((n, k), 64, 2, seed)
    return type(qw)(*(t.cuda() for t in (qw.plane0, qw.plane1, qw.scales, qw.biases)), 64)


def _tinygemm_weight(n: int, k: int, seed: int):
    """torch's INT4 tinygemm layout of a random INT4 weight: packed codes + (scale, zero)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32, device="cuda", generator=g)
    packed = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
    w = torch.ops.aten._convert_weight_to_int4pack(packed, 8)
    sz = torch.randn(k // 64, n, 2, dtype=torch.bfloat16, device="cuda") * 0.01
    return w, sz


def bench_qmatmul(rows: list, quick: bool, copy_gbs: float) -> None:
    from . import torch as bt

    ms = (1, 16, 2048) if quick else (1, 4, 16, 64, 256, 2048)
    shapes = {k: v for k, v in QWEN3_SHAPES.items() if not quick or k.startswith("8b")}
    for si, (name, (n, k)) in enumerate(shapes.items()):
        qws = Rotating(lambda i: _random_qweight(n, k, 1000 * si + i), n * k)
        dense = Rotating(lambda i: torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02, 2 * n * k)
        try:
            tiny = Rotating(lambda i: _tinygemm_weight(n, k, 1000 * si + i), n * k // 2)
        except (RuntimeError, AttributeError) as e:  # no tinygemm in this torch build
            print(f"tinygemm unavailable: {e}", file=sys.stderr)
            tiny = None
        for m in ms:
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            t_cublas = cuda_time(lambda: F.linear(x, dense.next()))
            t_tiny = None
            if tiny is not None:
                def run_tiny():
                    w, sz = tiny.next()
                    return torch.ops.aten._weight_int4pack_mm(x, w, 64, sz)
                try:
                    t_tiny = cuda_time(run_tiny)
                except RuntimeError as e:
                    print(f"tinygemm failed at {name} M={m}: {e}", file=sys.stderr)
            # The op as configured, then for M >= 64 the other side of BITSWITCH_CUDA_DEQUANT_M
            # (bitswitch's GEMM kernel, or dequantize + cuBLAS), to place the switch.
            paths = [("", bt._DEQUANT_MIN_M)]
            if m >= 64:
                paths.append((" kernel", 0) if 0 < bt._DEQUANT_MIN_M <= m else (" dequant+cuBLAS", 1))
            for label, min_m in paths:
                for bits in (4, 8):
                    saved, bt._DEQUANT_MIN_M = bt._DEQUANT_MIN_M, min_m
                    try:
                        t = cuda_time(lambda: bt.qmatmul(x, qws.next(), bits))
                    finally:
                        bt._DEQUANT_MIN_M = saved
                    wbytes = n * k * bits / 8 + 2 * 2 * n * k / 64
                    gbs = (wbytes + 2 * m * (k + n)) / t / 1e9
                    flops = 2 * m * n * k / t / 1e12
                    rows.append(("qmatmul", f"{name} M={m} int{bits}{label}", t * 1e6, t_cublas / t,
                                 None if t_tiny is None else t_tiny / t,
                                 f"{gbs:.0f} GB/s ({100 * gbs / copy_gbs:.0f}% copy) {flops:.1f} TF/s"))


SPLIT_K_SHAPES = {  # M = 1 projections of a small and a large model
    "0.6b.qkv": (4096, 1024), "0.6b.o": (1024, 2048), "0.6b.gate_up": (6144, 1024), "0.6b.down": (1024, 3072),
    "8b.qkv": (6144, 4096), "8b.down": (4096, 12288),
}


def bench_split_k(rows: list, calls: int = 32) -> None:
    """M = 1 qmatmul inside a CUDA graph (as a captured decode step runs it), with the plan's
    split-K (the GEMV writing float32 partials, then the reduce: two launches) against the
    same GEMV without a workspace (one launch over every K, fewer blocks). `calls` calls over
    rotating weight copies are captured in one graph; the time is per call. Decides whether
    small layers should split at all (a split saves bandwidth time, a launch costs ~2 us)."""
    from . import _C
    from . import torch as bt

    cu = bt._cuda_module()
    dev = torch.cuda.current_device()
    for si, (name, (n, k)) in enumerate(SPLIT_K_SHAPES.items()):
        qws = Rotating(lambda i: _random_qweight(n, k, 5000 + 100 * si + i), n * k)
        x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
        for bits in (4, 8):
            per_call = {}
            for split in (True, False):
                nbytes = int(cu.qmatmul_workspace_bytes(1, n, k, 64, bits, 1, 1, dev)) if split else 0
                ws = torch.empty(max(nbytes, 1), dtype=torch.uint8, device="cuda")
                out = torch.empty(1, n, dtype=torch.bfloat16, device="cuda")

                def one(qw):
                    _C.qmatmul(x, qw.plane0, qw.plane1 if bits == 8 else None, qw.scales, qw.biases, 64, bits, out,
                               16, stream=torch.cuda.current_stream().cuda_stream,
                               workspace=ws.data_ptr() if nbytes else 0, workspace_bytes=nbytes)

                one(qws.next())  # first-launch set-up outside the capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for _ in range(calls):
                        one(qws.next())
                per_call[split] = cuda_time(graph.replay, reps=20) / calls
            rows.append(("split-k", f"{name} M=1 int{bits} (graph)", per_call[True] * 1e6,
                         per_call[False] / per_call[True], None,
                         f"one launch, no split: {per_call[False] * 1e6:.1f} us"))


def _density_mask(density: float, lq: int, block: int, hkv: int):
    """A block mask keeping `density` of the causal blocks (the diagonal and the first (sink)
    block always, the rest chosen at random per kv head), and its block table [1, Hkv, nb, nb]."""
    import numpy as np

    from . import attention as A

    nb = -(-lq // block)
    rng = np.random.default_rng(0)
    causal = np.tril(np.ones((nb, nb), bool))
    forced = np.zeros((nb, nb), bool)
    forced[np.arange(nb), np.arange(nb)] = True
    forced[:, 0] = True
    total, n_forced = int(causal.sum()), int(forced.sum())
    p = max(0.0, (density * total - n_forced) / max(1, total - n_forced))  # so the total is `density`
    table = np.zeros((1, hkv, nb, nb), bool)
    for h in range(hkv):
        table[0, h] = ((rng.random((nb, nb)) < p) & causal) | forced
    return A.BlockMask.from_block_table(table, block, block, lq, lq), table


def bench_attention(rows: list, quick: bool, decode_only: bool = False) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from . import torch as bt

    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention)
    except ImportError:
        flex = None
    hq, hkv, d, block = 32, 8, 128, 128
    if decode_only:
        for lq in (8192, 32768):
            bench_decode(rows, lq, hq, hkv, d)
        return
    for lq in ((8192,) if quick else (8192, 32768)):
        q = torch.randn(1, hq, lq, d, dtype=torch.bfloat16, device="cuda")
        k = torch.randn(1, hkv, lq, d, dtype=torch.bfloat16, device="cuda")
        v = torch.randn_like(k)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            t_sdpa = cuda_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                               reps=10)
        t_dense = None
        for density in (1.0, 0.25, 0.1):
            mask, blocks = (None, None) if density == 1.0 else _density_mask(density, lq, block, hkv)
            t = cuda_time(lambda: bt.attention(q, k, v, mask, causal=True), reps=10)
            t_dense = t if density == 1.0 else t_dense
            t_flex = None
            if flex is not None:
                table = None if blocks is None else torch.from_numpy(blocks).cuda()
                g = hq // hkv

                def mask_mod(b, h, qi, ki):
                    vis = qi >= ki
                    return vis if table is None else vis & table[b, h // g, qi // block, ki // block]
                bm = create_block_mask(mask_mod, 1, hq, lq, lq, device="cuda", BLOCK_SIZE=block)
                try:
                    t_flex = cuda_time(lambda: flex(q, k, v, block_mask=bm, enable_gqa=True), reps=10)
                except Exception as e:  # noqa: BLE001 - report and go on
                    print(f"flex_attention failed: {e}", file=sys.stderr)
            flops = 4 * hq * d * lq * lq / 2 * (1.0 if mask is None else mask.density()) / t / 1e12
            real = 1.0 if mask is None else mask.density()
            rows.append(("attention", f"prefill {lq // 1024}K density {real:.2f}", t * 1e6, t_sdpa / t,
                         None if t_flex is None else t_flex / t,
                         f"{flops:.0f} TF/s eff; {t_dense / t:.2f}x dense"))
        q = k = v = None
        torch.cuda.empty_cache()
        bench_decode(rows, lq, hq, hkv, d)


def bench_decode(rows: list, length: int, hq: int, hkv: int, d: int, pages: int = 64) -> None:
    """One decode token against a `length`-key cache: dense (split-KV) and with Quest page
    selection on the GPU (DecodePages: select_pages_at + attention over `pages` key blocks, as
    the CUDA-graph decode step runs it), against torch SDPA (its own backend choice) dense."""
    from . import torch as bt

    k = torch.randn(1, hkv, length, d, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    q = torch.randn(1, hq, 1, d, dtype=torch.bfloat16, device="cuda")
    t_sdpa = cuda_time(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    t_dense = cuda_time(lambda: bt.attention(q, k, v, None, causal=True, q_offset=length - 1))
    dec = bt.DecodePages(k)
    dec.rebuild(k, length - 1)
    positions = torch.full((1,), length - 1, dtype=torch.int32, device="cuda")

    def sparse():
        return bt.attention(q, k, v, dec.select(q, k, positions, pages), causal=True, q_offsets=positions)

    t_sparse = cuda_time(sparse)
    t_sel = cuda_time(lambda: dec.select(q, k, positions, pages))
    gbs = 2 * k.numel() * k.element_size() / t_dense / 1e9
    rows.append(("attention", f"decode {length // 1024}K dense", t_dense * 1e6, t_sdpa / t_dense, None,
                 f"{gbs:.0f} GB/s of K+V"))
    rows.append(("attention", f"decode {length // 1024}K {pages} pages", t_sparse * 1e6, t_sdpa / t_sparse, None,
                 f"selection {t_sel * 1e6:.1f} us; {t_dense / t_sparse:.2f}x dense"))
    # A 64-token chunk (a chat turn) over the same cache: prefill with split-KV. SDPA runs it
    # without a mask (the chunk's own causal triangle is 0.2% of the keys at 32K).
    qc = torch.randn(1, hq, 64, d, dtype=torch.bfloat16, device="cuda")
    t_sdpa_c = cuda_time(lambda: F.scaled_dot_product_attention(qc, k, v, enable_gqa=True))
    t_chunk = cuda_time(lambda: bt.attention(qc, k, v, None, causal=True, q_offset=length - 64))
    gbs = 2 * k.numel() * k.element_size() / t_chunk / 1e9
    rows.append(("attention", f"chunk 64 tokens @{length // 1024}K", t_chunk * 1e6, t_sdpa_c / t_chunk, None,
                 f"{gbs:.0f} GB/s of K+V"))


def bench_e2e(rows: list, models: list, new_tokens: int = 64, context: int = 128) -> None:
    """Decode tokens/s after a `context`-token prompt: bitswitch with the step captured in CUDA
    graphs (GraphDecoder), eager bitswitch, and transformers bf16 (eager, dynamic cache).
    Efficiency mode attends block-sparsely: past its page budget (64 pages of 64 keys) every
    step selects pages on the GPU, inside the graph."""
    from .bench_e2e import build_bitswitch, build_transformers, hf_forward
    from .models.cuda_graph import GraphDecoder

    def timed(step, tok):
        for _ in range(3):  # warm-up (and the graph capture)
            tok = step(tok)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(new_tokens):
            tok = step(tok)
        b.record()
        b.synchronize()
        return new_tokens / (a.elapsed_time(b) / 1e3)

    for name in models:
        prompt = torch.randint(0, 1000, (1, context))
        model = build_bitswitch(name, 8, 64, 0).cuda()
        for mode in ("performance", "efficiency"):
            model.set_precision(mode)
            for graphs in (True, False):
                model.reset(capacity=context + new_tokens + 8)
                tok = model(prompt, logits_to_keep=1)[:, -1:].argmax(-1)
                dec = GraphDecoder(model) if graphs else None
                step = (lambda t: dec.step(t).argmax(-1)) if graphs else (lambda t: model(t).argmax(-1))
                tps = timed(step, tok)
                how = "CUDA graph" if graphs else "eager"
                rows.append(("e2e", f"qwen3-{name} {mode} {how} @{context}", 1e6 / tps, None, None,
                             f"{tps:.1f} tok/s"))
        model = None
        torch.cuda.empty_cache()
        hf = build_transformers(name, 64, 0).cuda()
        with torch.no_grad():
            logits, cache = hf_forward(hf, prompt.cuda())
            state = {"cache": cache}

            def hf_step(t):
                out, state["cache"] = hf_forward(hf, t, state["cache"])
                return out[:, -1:].argmax(-1)
            tps = timed(hf_step, logits[:, -1:].argmax(-1))
        rows.append(("e2e", f"qwen3-{name} transformers bf16 @{context}", 1e6 / tps, None, None, f"{tps:.1f} tok/s"))
        hf = None
        torch.cuda.empty_cache()


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="bitswitch bench gpu", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes (8B only, M 1/16/2048, 8K attention)")
    ap.add_argument("--no-qmatmul", action="store_true")
    ap.add_argument("--no-attention", action="store_true")
    ap.add_argument("--decode-only", action="store_true", help="of attention, only decode (8K and 32K caches)")
    ap.add_argument("--e2e", default="", help="comma-separated model shapes for decode tokens/s (0.6b, 8b)")
    ap.add_argument("--context", type=int, default=128,
                    help="e2e prompt tokens before decoding (past 4096, efficiency mode selects pages)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bitswitch bench gpu: needs a CUDA GPU (torch sees none)", file=sys.stderr)
        return 2
    from . import __version__, info

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, bitswitch {__version__}, "
          f"cuda {info()['cuda']}")
    copy_gbs = copy_bandwidth()
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s")
    rows = _Rows()
    if not args.no_qmatmul:
        bench_qmatmul(rows, args.quick, copy_gbs)
        bench_split_k(rows)
    if not args.no_attention:
        bench_attention(rows, args.quick, args.decode_only)
    if args.e2e:
        bench_e2e(rows, [m.strip() for m in args.e2e.split(",") if m.strip()], context=args.context)
    print("\nratios: anchor time / bitswitch time (above 1: bitswitch faster). "
          "qmatmul anchors: cuBLAS bf16, tinygemm int4; attention: SDPA flash, flex_attention")
    print(f"| {'op':9} | {'case':34} | {'us':>9} | {'vs anchor 1':>11} | {'vs anchor 2':>11} | notes |")
    print(f"|{'-' * 11}|{'-' * 36}|{'-' * 11}|{'-' * 13}|{'-' * 13}|-------|")
    for row in rows:
        print(_row_line(row))
    return 0


def _row_line(row: tuple) -> str:
    op, case, us, r1, r2, note = row
    fmt = lambda v: "" if v is None else f"{v:.2f}x"  # noqa: E731
    return f"| {op:9} | {case:34} | {us:9.1f} | {fmt(r1):>11} | {fmt(r2):>11} | {note} |"


class _Rows(list):
    """The table's rows, each also printed as soon as it is measured (a run stopped by a time
    limit keeps what it measured)."""

    def append(self, row: tuple) -> None:
        print("  " + _row_line(row), flush=True)
        super().append(row)


if __name__ == "__main__":
    sys.exit(main())
