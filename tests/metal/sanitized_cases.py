"""Run by test_metal_kernels.py in a subprocess with a sanitizer runtime preloaded: a few
cases of every kernel through an emulator library built with -fsanitize, checked against
the float64 references. Prints OK at the end; the parent looks for sanitizer reports.

    python sanitized_cases.py LIB [--threads]
"""

import sys

import numpy as np

import bitswitch as bs
import emulator
from bitswitch import attention as A
from bitswitch import metal as M

INSTANCES = [("qmv", {"T": "float16", "S": "float32", "BITS": 8, "GS": 32}),
             ("qmm", {"T": "float32", "S": "float32", "BITS": 4, "GS": 64}),
             ("attention", {"T": "float32", "D": 64}), ("attention_decode", {"T": "float32", "D": 64}),
             ("attention_combine", {"T": "float32", "D": 64})]


def rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def main(lib: str, threads: bool) -> None:
    emu = emulator.Emulator(lib, threads_mode=threads)
    rng = np.random.default_rng(0)
    # Edges: N not a multiple of the tiles, the last row and column of every buffer read.
    for m, k, bits, gs, dt in [(3, 1056, 8, 32, "float16"), (35, 192, 4, 64, "float32")]:
        qw = bs.quantize((rng.standard_normal((37, k)) * 0.05).astype(np.float32), group_size=gs, bits=8)
        x = rng.standard_normal((m, k)).astype(dt)
        (y,) = emu.run(M.plan_qmatmul(m, 37, k, bits, gs, dt, "float32"),
                       {"x": x, "p0": qw.plane0, "p1": qw.plane1, "scales": qw.scales, "biases": qw.biases})
        assert rel(y, x.astype(np.float64) @ bs.dequantize_f64(qw, bits).T) < 2e-3
    for lq, lk, qo in [(37, 70, 33), (2, 70, 68)]:
        q = rng.standard_normal((1, 4, lq, 64)).astype(np.float32)
        kc = rng.standard_normal((1, 2, 80, 64)).astype(np.float32)
        k, v = kc[:, :, :lk], kc[:, :, 80 - lk:]  # strided views that end at the buffer's end
        mask = A.streaming_mask(1, 2, lq, lk, sinks=1, window=1, block_q=32, block_k=32, q_offset=qo)
        st = lambda a: tuple(s // 4 for s in a.strides[:3])  # noqa: E731
        plan = M.plan_attention(1, 4, 2, lq, lk, 64, "float32", st(q), st(k), st(v), mask=mask, q_offset=qo)
        out, lse = emu.run(plan, {"q": q, "k": k, "v": v})
        ref, _ = A.attention_reference(q, k, v, mask, q_offset=qo)
        assert rel(out, ref) < 1e-4, (lq, lk)
    print("OK", emu.launched)


if __name__ == "__main__":
    main(sys.argv[1], "--threads" in sys.argv[2:])
