"""Decode page selection with the position in memory (select_pages_at, DecodePages): the CPU
kernel against the oracle of tests/pages_oracle.py, the torch op (eager and compiled), the
device-side summaries against bitswitch.attention's KeyBlockSummary + select_pages, the
Qwen3 step that uses them (forward_at with sparse layers) against ordinary decoding, and the
argument errors. The CUDA kernel runs the same oracle in tests/cuda/test_cuda_page_select.py
(emulated) and tests/test_cuda.py (on a GPU)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import pages_oracle as oracle  # noqa: E402
from bitswitch import _C  # noqa: E402
from bitswitch import attention as attn  # noqa: E402
from bitswitch import torch as bt  # noqa: E402
from conftest import cast  # noqa: E402


def make(rng, b, hq, hkv, cap, d, dtype, block_k, positions):
    """q, k (numpy, dtype) and float32 summaries of keys [0, positions[b]) per row."""
    q = cast(rng.standard_normal((b, hq, 1, d)).astype(np.float32), dtype)
    k = cast(rng.standard_normal((b, hkv, cap, d)).astype(np.float32), dtype)
    nkb = -(-cap // block_k)
    kmin = np.full((b, hkv, nkb, d), np.nan, np.float32)
    kmax = np.full((b, hkv, nkb, d), np.nan, np.float32)
    for bi, pos in enumerate(positions):
        lo, hi = oracle.summaries(k[bi:bi + 1], int(pos), block_k, nkb)
        kmin[bi], kmax[bi] = lo[0], hi[0]
    return q, k, kmin, kmax


def run(q, k, kmin, kmax, positions, n, sinks, block_k):
    indices = np.full((q.shape[0], k.shape[1], n), -7, np.int32)
    _C.select_pages_at(q, k, kmin, kmax, np.asarray(positions, np.int32), indices, sinks, block_k)
    return indices


SHAPES = [  # b, hq, hkv, capacity, d, block_k
    (1, 4, 4, 1000, 128, 64),
    (2, 8, 2, 4100, 128, 64),
    (1, 16, 1, 2048, 64, 32),
    (3, 6, 3, 5000, 64, 128),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_cpu_kernel_matches_oracle(rng, shape, dtype):
    b, hq, hkv, cap, d, bk = shape
    nkb = -(-cap // bk)
    positions = rng.integers(0, cap, size=b)
    positions[0] = (positions[0] // bk) * bk  # a step that starts a block
    q, k, kmin, kmax = make(rng, b, hq, hkv, cap, d, dtype, bk, positions)
    for n, sinks in ((1, 0), (4, 1), (min(nkb, 33), 3), (nkb, 1)):
        lo, hi = kmin.copy(), kmax.copy()
        want_lo, want_hi = oracle.fold(k, lo, hi, positions, bk)
        idx = run(q, k, lo, hi, positions, n, sinks, bk)
        np.testing.assert_array_equal(lo, want_lo)
        np.testing.assert_array_equal(hi, want_hi)
        oracle.check(idx, oracle.scores(q, lo, hi, positions, sinks, bk), n, what=f"n={n} sinks={sinks}")


def test_ties_nan_and_fill(rng):
    """All-equal bounds go to the lower blocks; NaN bounds rank with -inf; more pages than
    visible blocks fill with the blocks right after the position."""
    q, k, kmin, kmax = make(rng, 1, 4, 1, 1024, 128, "float32", 64, [900])
    q[:] = 0
    assert run(q, k, kmin.copy(), kmax.copy(), [900], 5, 1, 64)[0, 0].tolist() == [0, 1, 2, 3, 14]
    q[:] = np.nan
    assert run(q, k, kmin.copy(), kmax.copy(), [900], 5, 2, 64)[0, 0].tolist() == [0, 1, 2, 3, 14]
    q, k, kmin, kmax = make(rng, 1, 4, 1, 1024, 128, "float32", 64, [130])
    assert run(q, k, kmin, kmax, [130], 6, 1, 64)[0, 0].tolist() == [0, 1, 2, 3, 4, 5]


def test_decode_pages_follow_key_block_summary(rng):
    """DecodePages over a growing cache (rebuilt once, then folding one key per step) keeps
    the summaries of KeyBlockSummary and picks the pages select_pages picks, step after step
    across block boundaries, with strided q as the model passes it."""
    b, hq, hkv, cap, d = 2, 8, 2, 1200, 64
    k = torch.from_numpy(rng.standard_normal((b, hkv, cap, d)).astype(np.float32)).to(torch.bfloat16)
    pages = bt.DecodePages(k, block_k=64)
    start = 700
    pages.rebuild(k, start)
    ref = attn.KeyBlockSummary.from_keys(k[:, :, :start].float().numpy(), capacity=cap)
    np.testing.assert_array_equal(pages.kmin[:, :, :11].numpy(), ref.kmin[:, :, :11])
    np.testing.assert_array_equal(pages.kmax[:, :, :11].numpy(), ref.kmax[:, :, :11])
    for pos in range(start, start + 90):
        qkv = torch.from_numpy(rng.standard_normal((b, 1, hq + 3, d)).astype(np.float32)).to(torch.bfloat16)
        q = qkv.transpose(1, 2)[:, :hq]  # [B, Hq, 1, D], not contiguous
        positions = torch.full((b,), pos, dtype=torch.int32)
        ip, ix, bq, bk = pages.select(q, k, positions, 8)
        pages.covered(pos + 1)
        ref.append(k[:, :, pos:pos + 1].float().numpy())
        assert pages.length == ref.length == pos + 1
        mask = attn.select_pages(q.float().numpy(), ref, budget=8)
        score = oracle.scores(q.float().numpy(), ref.kmin, ref.kmax, [pos] * b, 1, 64)
        assert np.array_equal(ip.numpy(), mask.indptr) and (bq, bk) == (64, 64)
        oracle.check(ix.numpy(), score, 8, what=f"step {pos}")


def test_attention_with_device_mask(rng):
    """The (indptr, indices, block_q, block_k) mask select returns drives attention like the
    BlockMask select_pages builds, with the position in memory."""
    b, hq, hkv, cap, d, pos = 1, 4, 2, 900, 128, 777
    k = torch.from_numpy(rng.standard_normal((b, hkv, cap, d)).astype(np.float32))
    v = torch.from_numpy(rng.standard_normal((b, hkv, cap, d)).astype(np.float32))
    q = torch.from_numpy(rng.standard_normal((b, hq, 1, d)).astype(np.float32))
    pages = bt.DecodePages(k)
    pages.rebuild(k, pos)
    positions = torch.tensor([pos], dtype=torch.int32)
    mask = pages.select(q, k, positions, 4)
    got = bt.attention(q, k, v, mask, q_offsets=positions)
    summary = attn.KeyBlockSummary.from_keys(k[:, :, :pos + 1].numpy(), capacity=cap)
    ref_mask = attn.select_pages(q.numpy(), summary, budget=4)
    ref = bt.attention(q, k[:, :, :pos + 1], v[:, :, :pos + 1], ref_mask, q_offset=pos)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_compiled_step(rng):
    """torch.compile(fullgraph=True) of a decode step that selects pages and attends: the op
    mutates the summaries in place there too, and gives the eager result."""
    b, hq, hkv, cap, d, pos = 1, 4, 2, 640, 64, 500
    k = torch.from_numpy(rng.standard_normal((b, hkv, cap, d)).astype(np.float32))
    v = torch.from_numpy(rng.standard_normal((b, hkv, cap, d)).astype(np.float32))
    q = torch.from_numpy(rng.standard_normal((b, hq, 1, d)).astype(np.float32))
    positions = torch.tensor([pos], dtype=torch.int32)
    indptr = torch.tensor([[[0, 3]] * hkv], dtype=torch.int32)

    def step(q, k, v, kmin, kmax, positions):
        ix = torch.ops.bitswitch.select_pages_at(q, k, kmin, kmax, positions, 3, 1, 64)
        out, _ = torch.ops.bitswitch.attention(q, k, v, indptr, ix, 64, 64, True, None, 0, positions)
        return out, ix

    eager, compiled = bt.DecodePages(k), bt.DecodePages(k)
    for p in (eager, compiled):
        p.rebuild(k, pos)
    want = step(q, k, v, eager.kmin, eager.kmax, positions)
    got = torch.compile(step, fullgraph=True)(q, k, v, compiled.kmin, compiled.kmax, positions)
    assert torch.equal(got[1], want[1]) and torch.allclose(got[0], want[0])
    assert torch.equal(compiled.kmin, eager.kmin) and torch.equal(compiled.kmax, eager.kmax)


def test_errors(rng):
    q, k, kmin, kmax = make(rng, 2, 4, 2, 640, 64, "float32", 64, [100, 100])
    pos = np.array([100, 100], np.int32)
    idx = np.zeros((2, 2, 3), np.int32)
    ok = dict(q=q, k=k, kmin=kmin, kmax=kmax, positions=pos, indices=idx, sinks=1, block_k=64)
    cases = [
        (dict(q=q[:, :, :0]), ValueError, "q has an empty"),
        (dict(q=np.concatenate([q, q], 2)), ValueError, r"one query per batch row"),
        (dict(q=q.astype(np.float64)), TypeError, "q must be float32, bfloat16 or float16"),
        (dict(k=cast(k, "bfloat16")), TypeError, "k must have q's dtype"),
        (dict(k=k[:1]), ValueError, "k must have q's batch"),
        (dict(q=q[:, :3]), ValueError, "must be a multiple of k's heads"),
        (dict(kmin=kmin[:, :, :5]), ValueError, r"kmin must have shape \(2, 2, 10, 64\)"),
        (dict(kmax=kmax.astype(np.float16)), TypeError, "kmax must be float32"),
        (dict(kmin=kmin.transpose(0, 1, 3, 2).copy().transpose(0, 1, 3, 2)), ValueError, "kmin must be C-contiguous"),
        (dict(positions=pos.astype(np.int64)), TypeError, "positions must be int32"),
        (dict(positions=np.array([100, 640], np.int32)), ValueError, r"positions must be in \[0, 640\)"),
        (dict(positions=np.array([-1, 0], np.int32)), ValueError, "positions must be in"),
        (dict(indices=np.zeros((2, 2, 0), np.int32)), ValueError, "1 <= n <= 10"),
        (dict(indices=np.zeros((2, 2, 11), np.int32)), ValueError, "1 <= n <= 10"),
        (dict(indices=np.zeros((2, 2, 3), np.int64)), TypeError, "indices must be int32"),
        (dict(kmax=kmin), ValueError, "must not overlap"),
        (dict(block_k=48), ValueError, "block_k must be 32, 64 or 128"),
        (dict(sinks=-1), ValueError, "sinks must be >= 0"),
    ]
    for change, err, match in cases:
        args = dict(ok, **change)
        with pytest.raises(err, match=match):
            _C.select_pages_at(**args)
    ro = idx.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="indices must be writable"):
        _C.select_pages_at(**dict(ok, indices=ro))
    _C.select_pages_at(**ok)  # the unchanged arguments run
    with pytest.raises(ValueError, match="DecodePages: block_k"):
        bt.DecodePages(torch.zeros(1, 1, 64, 64), block_k=16)
    with pytest.raises(ValueError, match="DecodePages.rebuild: length"):
        bt.DecodePages(torch.zeros(1, 1, 64, 64)).rebuild(torch.zeros(1, 1, 64, 64), 65)
