"""bitswitch's Metal kernels against MLX's own, on an Apple-silicon Mac, in one run.

    python bench/metal.py [--quick]

qmatmul: bitswitch.mlx.qmatmul (INT4 and INT8 views of one nibble-plane weight) against
mx.quantized_matmul on MLX 4- and 8-bit weights of the same shapes (Qwen3-8B layers), M in
{1, 4, 16, 64, 512}, bfloat16 activations. attention: bitswitch.mlx.attention dense and
block-sparse (densities 0.25, 0.1 by streaming masks) against
mx.fast.scaled_dot_product_attention, prefill 4K and decode over 16K/32K keys. Each time is
the median of repeated runs after a warm-up, mx.eval included; the ratio column is
MLX time / bitswitch time (above 1: bitswitch faster). Prints a table last.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np


def _time(fn, reps: int) -> float:
    import mlx.core as mx

    mx.eval(fn())
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval(fn())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench_qmatmul(rows: list, quick: bool) -> None:
    import mlx.core as mx

    import bitswitch as bs
    import bitswitch.mlx as bsm

    shapes = {"8b.qkv": (6144, 4096), "8b.o": (4096, 4096), "8b.gate_up": (24576, 4096), "8b.down": (4096, 12288)}
    ms = (1, 16, 512) if quick else (1, 4, 16, 64, 512)
    rng = np.random.default_rng(0)
    for name, (n, k) in shapes.items():
        w = mx.array((rng.standard_normal((n, k)) * 0.02).astype(np.float32)).astype(mx.bfloat16)
        mlx_w = {b: mx.quantize(w, group_size=64, bits=b) for b in (4, 8)}
        qw = bs.QWeight.from_mlx(*mlx_w[8], bits=8, group_size=64).mlx()
        for m in ms:
            x = mx.array(rng.standard_normal((m, k)).astype(np.float32)).astype(mx.bfloat16)
            for bits in (4, 8):
                wq, s, b = mlx_w[bits]
                t_mlx = _time(lambda: mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=64, bits=bits), 20)
                t_bs = _time(lambda: bsm.qmatmul(x, qw, bits), 20)
                gbs = qw.nbytes(bits) / t_bs / 1e9
                rows.append(("qmatmul", f"{name} M={m} int{bits}", t_bs * 1e6, t_mlx * 1e6, t_mlx / t_bs, f"{gbs:.0f} GB/s"))


def bench_attention(rows: list, quick: bool) -> None:
    import mlx.core as mx

    import bitswitch.attention as A
    import bitswitch.mlx as bsm

    rng = np.random.default_rng(1)
    hq, hkv, d = 32, 8, 128
    cases = [("prefill", 4096, 4096)] + ([] if quick else [("decode", 1, 16384)]) + [("decode", 1, 32768)]
    for kind, lq, lk in cases:
        q, k, v = (mx.array(rng.standard_normal(s).astype(np.float32)).astype(mx.bfloat16)
                   for s in ((1, hq, lq, d), (1, hkv, lk, d), (1, hkv, lk, d)))
        sdpa_mask = "causal" if lq > 1 else None
        t_ref = _time(lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=d ** -0.5, mask=sdpa_mask), 10)
        for density in (1.0, 0.25, 0.1):
            if density == 1.0:
                mask = None
            else:
                nkb = lk // 64
                window = max(1, int(density * nkb) - 1)
                mask = A.streaming_mask(1, hkv, lq, lk, sinks=1, window=window, block_q=64, block_k=64,
                                        q_offset=lk - lq)
            t_bs = _time(lambda: bsm.attention(q, k, v, mask=mask, q_offset=lk - lq), 10)
            dens = 1.0 if mask is None else mask.density()
            rows.append(("attention", f"{kind} Lq={lq} Lk={lk} density {dens:.2f}", t_bs * 1e6, t_ref * 1e6,
                         t_ref / t_bs, ""))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    args = ap.parse_args(argv)
    try:
        import mlx.core as mx

        import bitswitch.mlx as bsm
    except ImportError as e:
        print(f"bench/metal.py needs MLX: {e}")
        return 1
    if not bsm.metal_available():
        print("bench/metal.py needs a Metal GPU (an Apple-silicon Mac); MLX reports none here")
        return 1
    mx.set_default_device(mx.gpu)
    rows: list = []
    bench_qmatmul(rows, args.quick)
    bench_attention(rows, args.quick)
    info = mx.metal.device_info() if hasattr(mx.metal, "device_info") else {}
    print(f"\n{info.get('architecture', 'Apple GPU')}, MLX {mx.__version__}, {time.strftime('%Y-%m-%d')}, "
          f"command: python bench/metal.py{' --quick' if args.quick else ''}")
    print("| op | case | bitswitch us | MLX us | MLX / bitswitch | |\n|---|---|---|---|---|---|")
    for op, case, t_bs, t_ref, ratio, extra in rows:
        print(f"| {op} | {case} | {t_bs:.1f} | {t_ref:.1f} | {ratio:.2f} | {extra} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
