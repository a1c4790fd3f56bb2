"""Attention benchmarks: bitswitch block-sparse attention against torch
``scaled_dot_product_attention`` (CPU, the same dtype and threads), in the same run.

Prefill: Lq = Lk, causal, Qwen3 heads (16 query heads, 8 kv heads, head_dim 128). Our
dense run takes no mask; the sparse runs take a mask of the given density built by the
runtime selection (``select_blocks(density=...)``: each query block keeps its best
ceil(density * visible) key blocks by pooled score, the sink and diagonal blocks always),
so the density is of the causal blocks and the printed one is the mask's actual density.
The time to build the mask (the plan, once per forward for all layers) is shown apart.

Decode: one token against a cache of ``--decode-len`` keys, dense against Quest-style page
selection (``select_pages`` over the cache's block summaries, ``--pages`` blocks kept); the
sparse time includes the selection. The "decode-at" row is the same selection as a decode
step captured in a CUDA graph runs it (``bitswitch.torch.DecodePages``: summaries kept as
tensors, the position in memory, the mask handed to attention as tensors).

Every timing is the median of repeated calls (at least ``--reps``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional, Sequence


from . import _C
from . import attention as attn
from . import ops
from .bench import machine_description, median_time

LENGTHS = (2048, 8192, 16384)
DENSITIES = (1.0, 0.5, 0.25, 0.1)


def _time(fn, reps: int) -> float:
    return median_time(lambda _: fn(), 1, 0.5, reps)


def run_prefill(lengths: Sequence[int], densities: Sequence[float], heads: int, kv_heads: int, head_dim: int,
                dtype: str, reps: int, log=print) -> list:
    import torch
    import torch.nn.functional as F

    tdt = getattr(torch, dtype)
    rows = []
    for L in lengths:
        g = torch.Generator().manual_seed(L)
        q = torch.randn(1, heads, L, head_dim, generator=g).to(tdt)
        k = torch.randn(1, kv_heads, L, head_dim, generator=g).to(tdt)
        v = torch.randn(1, kv_heads, L, head_dim, generator=g).to(tdt)
        sdpa = _time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), reps)
        dense = None
        for d in densities:
            if d >= 1.0:
                mask, plan_s, actual = None, 0.0, 1.0
            else:
                mask = attn.select_blocks(q, k, density=d)
                plan_s = _time(lambda: attn.select_blocks(q, k, density=d), reps)
                actual = mask.density(causal=True)
            t = _time(lambda: ops.attention(q, k, v, mask=mask, causal=True), reps)
            if dense is None and d >= 1.0:
                dense = t
            row = dict(kind="prefill", L=L, density=d, actual_density=actual, ms=t * 1e3, plan_ms=plan_s * 1e3,
                       sdpa_ms=sdpa * 1e3, x_sdpa=sdpa / t, x_dense=(dense / t) if dense else None)
            rows.append(row)
            log(format_row(row))
    return rows


def run_decode(length: int, pages: int, heads: int, kv_heads: int, head_dim: int, dtype: str, reps: int,
               log=print) -> list:
    import torch
    import torch.nn.functional as F

    tdt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(length)
    k = torch.randn(1, kv_heads, length, head_dim, generator=g).to(tdt)
    v = torch.randn(1, kv_heads, length, head_dim, generator=g).to(tdt)
    q = torch.randn(1, heads, 1, head_dim, generator=g).to(tdt)
    summary = attn.KeyBlockSummary.from_keys(k)
    sdpa = _time(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), reps)
    dense = _time(lambda: ops.attention(q, k, v, q_offset=length - 1), reps)

    def sparse():
        mask = attn.select_pages(q, summary, budget=pages)
        return ops.attention(q, k, v, mask=mask, q_offset=length - 1)

    t = _time(sparse, reps)
    sel = _time(lambda: attn.select_pages(q, summary, budget=pages), reps)
    # The same step as a decode captured in a CUDA graph runs it: the position in a tensor,
    # pages from DecodePages (select_pages_at: the summaries kept as tensors, the step's key
    # folded in), attention over the whole cache with the (indptr, indices) mask.
    from . import torch as bt

    dev_pages = bt.DecodePages(k)
    dev_pages.rebuild(k, length - 1)
    positions = torch.tensor([length - 1], dtype=torch.int32)
    kept = max(pages, 2)

    def sparse_at():
        mask = dev_pages.select(q, k, positions, kept)
        return bt.attention(q, k, v, mask, q_offsets=positions)

    t_at = _time(sparse_at, reps)
    sel_at = _time(lambda: dev_pages.select(q, k, positions, kept), reps)
    nkb = -(-length // summary.block_k)
    rows = [dict(kind="decode", L=length, density=1.0, actual_density=1.0, ms=dense * 1e3, plan_ms=0.0,
                 sdpa_ms=sdpa * 1e3, x_sdpa=sdpa / dense, x_dense=1.0),
            dict(kind="decode", L=length, density=pages / nkb, actual_density=pages / nkb, ms=t * 1e3,
                 plan_ms=sel * 1e3, sdpa_ms=sdpa * 1e3, x_sdpa=sdpa / t, x_dense=dense / t),
            dict(kind="decode-at", L=length, density=kept / nkb, actual_density=kept / nkb, ms=t_at * 1e3,
                 plan_ms=sel_at * 1e3, sdpa_ms=sdpa * 1e3, x_sdpa=sdpa / t_at, x_dense=dense / t_at)]
    for r in rows:
        log(format_row(r))
    return rows


HEADER = (f"{'kind':<10}{'L':>7}{'density':>9}{'actual':>8}{'ms':>11}{'plan ms':>9}{'sdpa ms':>11}"
          f"{'x sdpa':>8}{'x dense':>9}")


def format_row(r: dict) -> str:
    xd = "-" if r["x_dense"] is None else f"{r['x_dense']:.2f}"
    return (f"{r['kind']:<10}{r['L']:>7}{r['density']:>9.3f}{r['actual_density']:>8.3f}{r['ms']:>11.2f}"
            f"{r['plan_ms']:>9.2f}{r['sdpa_ms']:>11.2f}{r['x_sdpa']:>8.2f}{xd:>9}")


def markdown_table(rows: Sequence[dict]) -> str:
    lines = ["| kind | L | density | actual density | ms | plan ms | torch SDPA ms | × SDPA | × our dense |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        xd = "-" if r["x_dense"] is None else f"{r['x_dense']:.2f}"
        lines.append(f"| {r['kind']} | {r['L']} | {r['density']:.3f} | {r['actual_density']:.3f} | {r['ms']:.2f} | "
                     f"{r['plan_ms']:.2f} | {r['sdpa_ms']:.2f} | {r['x_sdpa']:.2f} | {xd} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="bitswitch bench attention", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=str, default=",".join(map(str, LENGTHS)),
                   help="comma-separated prefill lengths ('' for none)")
    p.add_argument("--densities", type=str, default=",".join(map(str, DENSITIES)))
    p.add_argument("--decode-len", type=int, default=32768, help="decode cache length (0: no decode rows)")
    p.add_argument("--pages", type=int, default=64, help="key blocks kept by decode page selection")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128, choices=attn.HEAD_DIMS)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3, help="calls per measurement (median)")
    p.add_argument("--json", type=str, help="write the rows here")
    p.add_argument("--markdown", action="store_true", help="print a markdown table at the end")
    a = p.parse_args(argv)
    try:
        import torch
    except ImportError:
        p.error("the attention benchmark needs torch (pip install 'bitswitch[torch]')")
    lengths = [int(x) for x in a.lengths.split(",") if x]
    densities = [float(x) for x in a.densities.split(",") if x]
    if any(not 0.0 < d <= 1.0 for d in densities):
        p.error("densities must be in (0, 1]")
    torch.set_num_threads(a.threads)
    ops.set_num_threads(a.threads)
    print(f"bitswitch {_C.__version__} attention on {machine_description()}: {a.threads} threads, "
          f"{a.heads}/{a.kv_heads} heads, head_dim {a.head_dim}, {a.dtype}, causal, torch {torch.__version__}")
    print("x sdpa: torch SDPA time over ours (>1: bitswitch is faster); x dense: our dense time over this row's")
    print(HEADER)
    rows = run_prefill(lengths, densities, a.heads, a.kv_heads, a.head_dim, a.dtype, a.reps)
    if a.decode_len:
        rows += run_decode(a.decode_len, a.pages, a.heads, a.kv_heads, a.head_dim, a.dtype, max(a.reps, 10))
    report = dict(machine=machine_description(), date=time.strftime("%Y-%m-%d"), threads=a.threads,
                  command="bitswitch bench attention " + " ".join(sys.argv[3:] if argv is None else argv), rows=rows)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    if a.markdown:
        print(markdown_table(rows))
    return 0
