"""The Metal kernels on a real Apple GPU, through both front ends: MLX arrays on the GPU device
(mx.fast.metal_kernel) and torch MPS tensors (torch.mps.compile_shader behind
torch.ops.bitswitch.*). Skipped where there is no Metal GPU; .github/workflows/metal.yml runs
them on a macOS runner. The cases mirror test_metal_kernels.py (which runs the same sources
under the MSL emulator everywhere)."""

import numpy as np
import pytest

import bitswitch as bs
from bitswitch import _arrays as AR
from bitswitch import attention as A
from conftest import rel_err
from test_attention import SHAPES, decode_case, make_mask, make_qkv


def _mlx_gpu():
    try:
        import bitswitch.mlx as bsm
    except ImportError:
        return None
    return bsm if bsm.metal_available() else None


def _mps():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.backends.mps.is_available() else None


BSM, TORCH = _mlx_gpu(), _mps()
needs_mlx = pytest.mark.skipif(BSM is None, reason="needs MLX with a Metal GPU (an Apple-silicon Mac)")
needs_mps = pytest.mark.skipif(TORCH is None, reason="needs torch with the MPS backend (an Apple-silicon Mac)")
QTOL = {"float32": 2e-5, "bfloat16": 8e-3, "float16": 1.5e-3}
MNK = [(1, 13, 1), (3, 40, 8), (8, 8, 2), (9, 33, 4), (40, 72, 1), (300, 200, 3)]  # K in groups


def _weights(rng, n, k, gs, sdt):
    return bs.quantize((rng.standard_normal((n, k)) * 0.05).astype(np.float32), group_size=gs, bits=8, scales_dtype=sdt)


@needs_mlx
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_mlx_qmatmul_on_gpu(rng, bits, gs, dtype):
    import mlx.core as mx

    with mx.stream(mx.gpu):
        for m, n, kg in MNK:
            k = kg * gs
            qw = _weights(rng, n, k, gs, "float32" if dtype == "float32" else dtype)
            x = mx.array(rng.standard_normal((m, k)).astype(np.float32)).astype(getattr(mx, dtype))
            y = BSM.qmatmul(x, qw.mlx(), bits)
            ref = AR.to_numpy(x).astype(np.float64) @ bs.dequantize_f64(qw, bits).T
            assert rel_err(AR.to_numpy(y).astype(np.float64), ref) <= QTOL[dtype], (m, n, k)


@needs_mlx
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask_kind", ["none", "causal", "streaming", "random", "selected"])
def test_mlx_attention_on_gpu(rng, shape, mask_kind):
    import mlx.core as mx

    b, hq, hkv, lq, lk, d, qo, bq, bk = shape
    q, k, v = make_qkv(rng, b, hq, hkv, lq, lk, d)
    mask = make_mask(mask_kind, rng, q, k, qo, bq, bk)
    for causal in (True, False):
        ref, ref_lse = A.attention_reference(q, k, v, mask, causal=causal, q_offset=qo)
        with mx.stream(mx.gpu):
            out, lse = BSM.attention(mx.array(q), mx.array(k), mx.array(v), mask=mask, causal=causal, q_offset=qo,
                                     return_lse=True)
        assert rel_err(np.array(out), ref) <= 2e-5
        fin = np.isfinite(ref_lse)
        assert np.array_equal(np.isinf(np.array(lse)), ~fin)
        assert np.max(np.abs(np.array(lse)[fin] - ref_lse[fin]), initial=0.0) <= 1e-4


@needs_mlx
@pytest.mark.parametrize("d", [64, 128])
def test_mlx_decode_on_gpu(rng, d):
    import mlx.core as mx

    for i, (group, lq) in enumerate([(1, 1), (2, 1), (4, 2), (8, 1)]):
        kind = ["none", "subset", "unseen"][i % 3]
        lk, bk = (333, 64) if kind != "unseen" else (333, 32)
        q, k, v = make_qkv(rng, 2, 2 * group, 2, lq, lk, d)
        mask, qo = decode_case(rng, kind, 2, 2, lq, lk, bk, lk - lq)
        ref, _ = A.attention_reference(q, k, v, mask, causal=True, q_offset=qo)
        with mx.stream(mx.gpu):
            out = BSM.attention(mx.array(q), mx.array(k), mx.array(v), mask=mask, q_offset=qo)
        assert rel_err(np.array(out), ref) <= 2e-5, (group, lq, kind)


@needs_mps
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_mps_ops(rng, bits, dtype):
    torch = TORCH
    import bitswitch.torch as bt

    for m, n, kg in MNK:
        k = kg * 64
        qw = _weights(rng, n, k, 64, "float32")
        x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32)).to(getattr(torch, dtype))
        t = qw.torch()
        on_mps = bs.QWeight(*(a.to("mps") for a in (t.plane0, t.plane1, t.scales, t.biases)), group_size=64)
        y = bt.qmatmul(x.to("mps"), on_mps, bits)
        ref = x.double().numpy() @ bs.dequantize_f64(qw, bits).T
        assert rel_err(y.float().cpu().numpy(), ref) <= QTOL[dtype], (m, n, k)
    q, k, v = make_qkv(rng, 1, 4, 2, 70, 133, 128)
    mask = A.causal_mask(1, 2, 70, 133, 64, 64, 63)
    ref, _ = A.attention_reference(q, k, v, mask, q_offset=63)
    out = bt.attention(*(torch.from_numpy(t).to("mps") for t in (q, k, v)), mask=mask, q_offset=63)
    assert rel_err(out.cpu().numpy(), ref) <= 2e-5


@needs_mps
def test_qwen3_model_on_mps(tmp_path, rng):
    """The Qwen3 model moved to MPS gives the CPU's logits (both views)."""
    torch = TORCH
    pytest.importorskip("transformers")
    from test_qwen3 import VOCAB, make_hf

    from bitswitch.models.load import load

    make_hf("qwen3", tied=False).save_pretrained(tmp_path)
    ids = torch.from_numpy(rng.integers(0, VOCAB, (1, 12)))
    cpu = load(tmp_path, dtype="float32", group_size=64)
    mps = load(tmp_path, dtype="float32", group_size=64).to("mps")
    for bits in (8, 4):
        cpu.set_bits(bits)
        mps.set_bits(bits)
        ref = cpu(ids)
        got = mps(ids.to("mps")).cpu()
        assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-3, bits
