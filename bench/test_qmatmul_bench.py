"""qmatmul microbenchmarks on Qwen3 layer shapes, weights streamed from DRAM.

Each call uses the next of several weight copies totalling > 1 GB, for bitswitch and for
the anchors alike (bitswitch.bench.median_time does the same for `bitswitch bench`).
"""

import numpy as np
import pytest

import bitswitch as bs
from bitswitch import _C
from bitswitch import _arrays as A
from bitswitch.bench import LM_HEAD, SQUARE, VIEWS, Shape, _copies, _copy_qweight

torch = pytest.importorskip("torch")

SHAPES = [Shape("0.6b.gate_proj", 3072, 1024), SQUARE, Shape("8b.down_proj", 4096, 12288), LM_HEAD]
MS = [1, 16, 128]
STREAM_BYTES = 1_100_000_000


def _weight(shape):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((shape.n, shape.k), dtype=np.float32) * 0.02).astype(A.BFLOAT16)


def _cycle(fn, copies):
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % copies
        fn(state["i"])

    return call


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("view", ["w4", "w4a8", "w8"])
def test_bitswitch(benchmark, shape, m, view):
    bits, act_bits = VIEWS[view]
    benchmark.group = f"{shape.name} M={m}"
    benchmark.name = f"bitswitch_{view}"
    qw = bs.quantize(_weight(shape), group_size=64, bits=8)
    view = qw if bits == 8 else qw.int4_only()
    copies = _copies(view.nbytes(bits), STREAM_BYTES, True)
    qws = [_copy_qweight(view) for _ in range(copies)]
    x = np.random.default_rng(1).standard_normal((m, shape.k), dtype=np.float32).astype(A.BFLOAT16)
    y = np.empty((m, shape.n), dtype=A.BFLOAT16)

    def f(i):
        q = qws[i]
        _C.qmatmul(x, q.plane0, q.plane1 if bits == 8 else None, q.scales, q.biases, 64, bits, y, act_bits)

    benchmark.pedantic(_cycle(f, copies), rounds=max(5, min(50, 2 * copies)), warmup_rounds=1)
    benchmark.extra_info["GB/s"] = view.nbytes(bits) / benchmark.stats.stats.median / 1e9


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_torch(benchmark, shape, m, dtype):
    benchmark.group = f"{shape.name} M={m}"
    benchmark.name = f"torch_{dtype}"
    tdt = torch.bfloat16 if dtype == "bf16" else torch.float32
    w = torch.from_numpy(_weight(shape).view(np.int16)).view(torch.bfloat16).to(tdt)
    copies = _copies(w.numel() * w.element_size(), STREAM_BYTES, True)
    ws = [w.clone() for _ in range(copies)]
    x = torch.randn(m, shape.k, dtype=tdt)

    def f(i):
        with torch.inference_mode():
            torch.nn.functional.linear(x, ws[i])

    benchmark.pedantic(_cycle(f, copies), rounds=max(3, min(20, copies)), warmup_rounds=1)
