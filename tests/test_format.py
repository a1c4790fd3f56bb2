"""The nibble-plane format in Python: constants, packing, quantization, dequantization."""

import numpy as np
import pytest

import bitswitch as bs
from bitswitch import _C, quant
from conftest import cast


def test_constants_come_from_the_native_header():
    f = _C.format
    assert (quant.PLANE_BITS, quant.VALUES_PER_WORD, quant.CODE_MAX) == (f.PLANE_BITS, f.VALUES_PER_WORD, f.CODE_MAX)
    assert quant.GROUP_SIZES == tuple(f.GROUP_SIZES) == (32, 64, 128)
    assert quant.BITS == (4, 8)
    assert quant.RESIDUAL_DIVISOR == 16 and quant.RESIDUAL_CENTER == 7.5


def test_pack_order_is_mlx_4bit(rng):
    codes = rng.integers(0, 16, size=(3, 64), dtype=np.uint8)
    plane = quant.pack_codes(codes)
    assert plane.dtype == np.uint32 and plane.shape == (3, 8)
    # element k sits in bits 4*(k % 8) of word k // 8
    for k in range(64):
        assert np.array_equal((plane[:, k // 8] >> (4 * (k % 8))) & 15, codes[:, k])
    assert np.array_equal(quant.unpack_codes(plane), codes)


def _bound_check(w, deq, codes_max_step, bias, half_step, slack):
    """|w - deq| <= half a step inside the view's grid range [b, b + codes*step]; outside
    it (MLX's quantizer makes 0.0 exact, which can shrink the range below the group's
    span) the error is the distance to the range plus half a step."""
    lo = np.minimum(bias, bias + codes_max_step)
    hi = np.maximum(bias, bias + codes_max_step)
    outside = np.maximum(lo - w, 0) + np.maximum(w - hi, 0)
    assert np.all(np.abs(w - deq) <= outside + half_step * (1 + slack) + 1e-12)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("wdtype", ["float32", "bfloat16", "float16"])
def test_quantize_error_bounds(rng, group_size, wdtype):
    n, k = 48, 4 * group_size
    w = cast((rng.standard_normal((n, k)) * rng.uniform(0.01, 3)).astype(np.float32), wdtype)
    wf = w.astype(np.float64)
    rep = lambda a: np.repeat(a.astype(np.float64), group_size, axis=1)  # noqa: E731

    qw = bs.quantize(w, group_size=group_size, bits=8)
    assert qw.bits_available == (4, 8) and qw.scales_dtype == wdtype
    s, b = rep(qw.scales), rep(qw.biases)
    d4, d8 = bs.dequantize_f64(qw, 4), bs.dequantize_f64(qw, 8)
    _bound_check(wf, d4, s * 15, b, np.abs(s) / 2, 1e-6)
    # INT8 view: 16q + r in steps of s/16 from b - 7.5*s/16, and the grid covers the group,
    # so every element is within half a step (no element is outside the range).
    _bound_check(wf, d8, s / 16 * 255, b - 7.5 * s / 16, np.abs(s) / 32, 1e-6)
    assert np.all(np.abs(d8 - wf) <= np.abs(s) / 32 * (1 + 1e-6) + 1e-12)
    assert np.abs(d8 - wf).mean() < np.abs(d4 - wf).mean() / 8

    # bits=4 follows MLX: codes against the unrounded grid, so 16-bit scales move the stored
    # grid by up to 2^-9 (bf16) of 15|s| + |b| <= 30|s|: 0.12 half-steps (f16: 0.015).
    q4 = bs.quantize(w, group_size=group_size, bits=4)
    assert q4.plane1 is None
    slack = {"float32": 1e-6, "bfloat16": 0.12, "float16": 0.015}[wdtype]
    s, b = rep(q4.scales), rep(q4.biases)
    _bound_check(wf, bs.dequantize_f64(q4, 4), s * 15, b, np.abs(s) / 2, slack)


def test_quantize_int4_only_has_one_plane(rng):
    qw = bs.quantize(rng.standard_normal((32, 128)).astype(np.float32), group_size=64, bits=4)
    assert qw.plane1 is None and qw.bits_available == (4,) and qw.default_bits == 4
    with pytest.raises(ValueError, match="plane 1"):
        bs.dequantize(qw, 8)


def test_constant_and_zero_groups(rng):
    w = np.zeros((8, 64), np.float32)
    w[1] = 3.0
    w[2, :32] = -1.0
    qw = bs.quantize(w, group_size=32, bits=8)
    np.testing.assert_allclose(bs.dequantize_f64(qw, 4), w, atol=1e-6)
    np.testing.assert_allclose(bs.dequantize_f64(qw, 8), w, atol=1e-6)


def test_negative_scales_are_kept(rng):
    # MLX makes the larger-magnitude endpoint exact, which flips the scale's sign when it is the max.
    w = np.abs(rng.standard_normal((16, 64))).astype(np.float32) + 0.1
    qw = bs.quantize(w, group_size=64, bits=8)
    assert (qw.scales < 0).any()
    assert np.abs(bs.dequantize_f64(qw, 8) - w).max() < 0.05


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_dequantize_matches_the_float64_reference(rng, dtype):
    qw = bs.quantize(rng.standard_normal((16, 128)).astype(np.float32), group_size=32, bits=8, scales_dtype=dtype)
    for bits in (4, 8):
        d = bs.dequantize(qw, bits, dtype="float32").astype(np.float64)
        ref = bs.dequantize_f64(qw, bits)
        assert np.abs(d - ref).max() <= 4e-7 * np.abs(ref).max()


def test_frameworks_round_trip(rng):
    torch = pytest.importorskip("torch")
    w = rng.standard_normal((16, 64)).astype(np.float32)
    qn = bs.quantize(w, 32, 8)
    qt = bs.quantize(torch.from_numpy(w), 32, 8)
    assert qt.framework == "torch" and qt.plane0.dtype == torch.uint32
    assert np.array_equal(qt.numpy().plane0, qn.plane0) and np.array_equal(qt.numpy().plane1, qn.plane1)
    assert np.array_equal(qn.torch().numpy().scales, qn.scales)


def test_nbytes():
    qw = bs.quantize(np.ones((64, 256), np.float32), 64, 8, scales_dtype="bfloat16")
    assert qw.nbytes(4) == 64 * 128 + 2 * 64 * 4 * 2
    assert qw.nbytes(8) == 2 * 64 * 128 + 2 * 64 * 4 * 2


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_quantize_activations(rng, group_size):
    x = (rng.standard_normal((3, 4 * group_size)) * rng.uniform(0.01, 100)).astype(np.float32)
    x[0, :group_size] = 0.0  # an all-zero group stays zero
    q = bs.quantize_activations(x, group_size)
    assert q.dtype == np.float32 and q.shape == x.shape
    g = x.reshape(3, 4, group_size)
    dx = np.abs(g).max(axis=-1, keepdims=True) / 127
    codes = q.reshape(3, 4, group_size) / np.where(dx > 0, dx, 1)
    assert np.allclose(codes, np.rint(codes), atol=1e-3) and np.abs(codes).max() <= 127.001
    assert np.all(np.abs(q.reshape(3, 4, group_size) - g) <= dx * 0.5 * (1 + 1e-5) + 1e-30)
    assert np.all(q[0, :group_size] == 0)
