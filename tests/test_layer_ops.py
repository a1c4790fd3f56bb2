"""The fused layer ops (rms_norm, rope_qkv, silu_mul) on every CPU variant against the torch
reference the model runs elsewhere (transformers' Qwen3 op for op), and against float64 for
float32 inputs; outputs poisoned first; bad arguments."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import bitswitch as bs  # noqa: E402
from bitswitch import torch as bt  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Relative tolerance per dtype. float32: the sums of squares are added in another order than
# torch's (~1e-6 at 16K elements). 16-bit types: one rounding step; the native kernels sum in
# another order than torch, so a value next to a rounding boundary may round the other way.
ULP = {"float32": 1e-5, "bfloat16": 2 ** -7, "float16": 2 ** -10}


def poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def close(a, b, dtype, scale=1.0):
    a, b = a.double(), b.double()
    assert not torch.isnan(a).any()
    tol = ULP[dtype] * scale * (b.abs() + 1e-3)
    bad = ((a - b).abs() > tol).sum().item()
    # A handful of elements may sit on the other side of a rounding boundary.
    assert bad <= max(1, a.numel() // 500), f"{bad} of {a.numel()} elements differ: max {(a - b).abs().max()}"


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("rows,h", [(1, 1), (1, 7), (3, 64), (1, 1024), (5, 1000), (40, 2048), (2, 16384)])
def test_rms_norm(variant, rng, dtype, rows, h):
    t = DTYPES[dtype]
    x = torch.from_numpy(rng.standard_normal((rows, h)).astype(np.float32) * 3).to(t)
    d = torch.from_numpy(rng.standard_normal((rows, h)).astype(np.float32)).to(t)
    w = torch.from_numpy(rng.standard_normal(h).astype(np.float32)).to(t)
    out = poisoned((rows, h), t)
    got = bs.ops.rms_norm(x, w, 1e-6, out=out)
    assert got is out
    close(out, bt.rms_norm_reference(x, w, 1e-6), dtype)
    if dtype == "float32":
        x64 = x.double()
        ref = w.double() * x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + 1e-6)
        assert float((out.double() - ref).abs().max() / ref.abs().max()) < 1e-5

    # With the residual add: x becomes round(x + delta) exactly (one rounding, as torch's add).
    x2 = x.clone()
    out2 = bs.ops.rms_norm(x2, w, 1e-5, delta=d)
    assert torch.equal(x2, x + d)
    close(out2, bt.rms_norm_reference(x + d, w, 1e-5), dtype)
    # In place: out is x.
    x3 = x.clone()
    bs.ops.rms_norm(x3, w, 1e-5, out=x3)
    close(x3, bt.rms_norm_reference(x, w, 1e-5), dtype)


def rope_tables(positions, d, dtype):
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    f = torch.arange(positions, dtype=torch.float32)[:, None] * inv[None]
    emb = torch.cat((f, f), -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    sin[:, : d // 2].neg_()
    return cos, sin


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("b,n,hq,hkv,d,norm", [(1, 1, 4, 2, 64, True), (2, 5, 4, 4, 128, True),
                                                (1, 3, 6, 2, 64, False), (1, 70, 16, 8, 128, True),
                                                (3, 2, 2, 1, 6, True)])
def test_rope_qkv(variant, rng, dtype, b, n, hq, hkv, d, norm):
    t = DTYPES[dtype]
    cap, pos = n + 9, 4
    qkv = torch.from_numpy(rng.standard_normal((b, n, (hq + 2 * hkv) * d)).astype(np.float32)).to(t)
    qw = torch.from_numpy(rng.standard_normal(d).astype(np.float32)).to(t) if norm else None
    kw = torch.from_numpy(rng.standard_normal(d).astype(np.float32)).to(t) if norm else None
    cos, sin = rope_tables(cap + 3, d, t)
    kc, vc = poisoned((b, hkv, cap, d), t), poisoned((b, hkv, cap, d), t)
    kr, vr = poisoned((b, hkv, cap, d), t), poisoned((b, hkv, cap, d), t)
    q = bs.ops.rope_qkv(qkv, cos, sin, pos, kc, vc, hq, qw, kw, eps=1e-6)
    qr = reference_rope(qkv, hq, qw, kw, cos, sin, pos, kr, vr)
    assert q.shape == (b, hq, n, d)
    # RMSNorm then RoPE: two ops' roundings.
    close(q, qr, dtype, scale=2)
    close(kc[:, :, pos:pos + n], kr[:, :, pos:pos + n], dtype, scale=2)
    assert torch.equal(vc[:, :, pos:pos + n], vr[:, :, pos:pos + n])  # v is copied as is
    # Only rows pos .. pos + n - 1 are written.
    for c in (kc, vc):
        assert torch.isnan(c[:, :, :pos]).all() and torch.isnan(c[:, :, pos + n:]).all()


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_rope_qkv_with_positions_in_memory(variant, rng, dtype):
    """rope_qkv_at (the decode step captured in CUDA graphs; on the CPU the same native kernel
    reading positions from a tensor): per batch row, rope_qkv at that row's position; and the
    torch ops it replaces elsewhere give the same values."""
    t = DTYPES[dtype]
    b, hq, hkv, d, cap = 3, 4, 2, 64, 40
    qkv = torch.from_numpy(rng.standard_normal((b, 1, (hq + 2 * hkv) * d)).astype(np.float32)).to(t)
    qw, kw = (torch.from_numpy(rng.standard_normal(d).astype(np.float32)).to(t) for _ in range(2))
    cos, sin = rope_tables(cap, d, t)
    positions = torch.tensor([5, 39, 0], dtype=torch.int32)
    kc, vc = poisoned((b, hkv, cap, d), t), poisoned((b, hkv, cap, d), t)
    q = bt.rope_qkv_at(qkv, hq, qw, kw, 1e-6, cos, sin, positions, kc, vc)
    for bi, pos in enumerate(positions.tolist()):
        kr, vr = poisoned((1, hkv, cap, d), t), poisoned((1, hkv, cap, d), t)
        qr = bt.rope_qkv(qkv[bi:bi + 1], hq, qw, kw, 1e-6, cos, sin, pos, kr, vr)
        assert torch.equal(q[bi:bi + 1], qr)  # the same kernel, one row at a time
        assert torch.equal(kc[bi:bi + 1, :, pos], kr[:, :, pos]) and torch.equal(vc[bi:bi + 1, :, pos], vr[:, :, pos])
    same = torch.full((b,), 17, dtype=torch.int32)  # the torch-ops path takes one position for all rows
    kc2, vc2, kr2, vr2 = (poisoned((b, hkv, cap, d), t) for _ in range(4))
    got = bt.rope_qkv_at(qkv, hq, qw, kw, 1e-6, cos, sin, same, kc2, vc2)
    saved = bt._native
    bt._native = lambda x: False
    try:
        ref = bt.rope_qkv_at(qkv, hq, qw, kw, 1e-6, cos, sin, same, kr2, vr2)
    finally:
        bt._native = saved
    close(got, ref, dtype, scale=2)
    close(kc2[:, :, 17], kr2[:, :, 17], dtype, scale=2)
    for bad, err, match in [(torch.tensor([5, 40, 0], dtype=torch.int32), ValueError, "positions plus the 1 new"),
                            (torch.tensor([5, -1, 0], dtype=torch.int32), ValueError, "positions must be >= 0"),
                            (torch.tensor([5, 1], dtype=torch.int32), ValueError, r"positions must be a contiguous int32 array of shape \(3,\)"),
                            (torch.tensor([5, 1, 0]), ValueError, "positions must be a contiguous int32")]:
        with pytest.raises(err, match=match):
            bt.rope_qkv_at(qkv, hq, qw, kw, 1e-6, cos, sin, bad, kc, vc)


def reference_rope(qkv, hq, qw, kw, cos, sin, pos, kc, vc):
    """bitswitch.torch.rope_qkv with the native path switched off."""
    saved = bt._native
    bt._native = lambda x: False
    try:
        return bt.rope_qkv(qkv, hq, qw, kw, 1e-6, cos, sin, pos, kc, vc)
    finally:
        bt._native = saved


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("rows,i", [(1, 1), (1, 3072), (7, 100), (64, 1024)])
def test_silu_mul(variant, rng, dtype, rows, i):
    t = DTYPES[dtype]
    gu = torch.from_numpy(rng.standard_normal((rows, 2 * i)).astype(np.float32) * 4).to(t)
    gu[0, 0] = -100.0  # far in the tail: silu is -0 to float32 precision
    out = poisoned((rows, i), t)
    bs.ops.silu_mul(gu, out=out)
    ref = torch.nn.functional.silu(gu[:, :i]) * gu[:, i:]
    close(out, ref, dtype, scale=2)
    if dtype == "float32":
        g, u = gu[:, :i].double(), gu[:, i:].double()
        ref64 = g / (1 + torch.exp(-g)) * u
        # Relative to each element (the far tail's value is ~1e-42: 1e-30 absolute there).
        assert ((out.double() - ref64).abs() <= 1e-6 * ref64.abs() + 1e-30).all()
    # numpy in, numpy out, same values.
    y = bs.ops.silu_mul(gu.float().numpy())
    assert isinstance(y, np.ndarray) and y.shape == (rows, i)


def test_layer_ops_reject_bad_arguments():
    x = torch.randn(2, 8)
    w = torch.randn(8)
    with pytest.raises(TypeError, match="rms_norm: weight must have the dtype"):
        bs.ops.rms_norm(x, w.half())
    with pytest.raises(ValueError, match=r"rms_norm: weight must have shape \(8,\)"):
        bs.ops.rms_norm(x, torch.randn(7))
    with pytest.raises(ValueError, match="rms_norm: x must be C-contiguous"):
        bs.ops.rms_norm(torch.randn(8, 2).T, w)
    with pytest.raises(ValueError, match="rms_norm: delta must have x's shape"):
        bs.ops.rms_norm(x, w, delta=torch.randn(2, 4))
    base = torch.randn(3, 8)
    with pytest.raises(ValueError, match="rms_norm: out overlaps x"):
        bs.ops.rms_norm(base[:2], w, out=base[1:])
    with pytest.raises(ValueError, match="rms_norm: eps must be finite"):
        bs.ops.rms_norm(x, w, eps=float("nan"))
    with pytest.raises(ValueError, match="at most|1 .. 16384"):
        bs.ops.rms_norm(torch.randn(1, 16385), torch.randn(16385))

    qkv = torch.randn(1, 2, 4 * 64)
    cos, sin = rope_tables(16, 64, torch.float32)
    kc, vc = torch.zeros(1, 1, 8, 64), torch.zeros(1, 1, 8, 64)
    with pytest.raises(ValueError, match="rope_qkv: pos plus the 2 new tokens must fit"):
        bs.ops.rope_qkv(qkv, cos, sin, 7, kc, vc, 2)
    with pytest.raises(ValueError, match=r"rope_qkv: qkv must have shape \(1, 2, 320\)"):
        bs.ops.rope_qkv(qkv, cos, sin, 0, kc, vc, 3)
    with pytest.raises(ValueError, match="q_weight and k_weight must be given together"):
        bs.ops.rope_qkv(qkv, cos, sin, 0, kc, vc, 2, q_weight=torch.ones(64))
    with pytest.raises(ValueError, match="rope_qkv: cos must have shape"):
        bs.ops.rope_qkv(qkv, cos[:1], sin[:1], 0, kc, vc, 2)
    with pytest.raises(ValueError, match="rope_qkv: v_cache overlaps|k_cache overlaps"):
        bs.ops.rope_qkv(qkv, cos, sin, 0, kc, kc, 2)
    with pytest.raises(TypeError, match="rope_qkv: k_cache must have the dtype"):
        bs.ops.rope_qkv(qkv, cos, sin, 0, kc.half(), vc, 2)

    with pytest.raises(ValueError, match="silu_mul: gate_up must have an even last dimension"):
        bs.ops.silu_mul(torch.randn(2, 5))
    with pytest.raises(ValueError, match="silu_mul: out must have gate_up's shape"):
        bs.ops.silu_mul(torch.randn(2, 6), out=torch.empty(2, 6))
    frozen = np.ones((2, 3), np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="silu_mul: out must be writable"):
        bs.ops.silu_mul(np.ones((2, 6), np.float32), out=frozen)


def test_mlx_in_place_ops_are_refused():
    mx = pytest.importorskip("mlx.core")
    x = mx.ones((2, 8))
    with pytest.raises(TypeError, match="MLX"):
        bs.ops.rms_norm(x, mx.ones((8,)), delta=mx.ones((2, 8)))
    y = bs.ops.rms_norm(x, mx.ones((8,)))
    assert isinstance(y, mx.array) and np.allclose(np.array(y), 1.0, atol=1e-5)
