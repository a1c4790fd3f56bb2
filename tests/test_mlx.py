"""MLX is the format and numerics reference: planes built from mx.quantize dequantize to
exactly what mx.dequantize gives, and qmatmul agrees with mx.quantized_matmul."""

import numpy as np
import pytest

import bitswitch as bs
from bitswitch import _arrays as A

mx = pytest.importorskip("mlx.core")

MX_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def mx_weight(rng, n, k, dtype):
    w = mx.array((rng.standard_normal((n, k)) * 0.05).astype(np.float32))
    return w.astype(getattr(mx, dtype))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_from_mlx_dequantizes_exactly(rng, bits, group_size, dtype):
    w = mx_weight(rng, 64, 384, dtype)
    wq, s, b = mx.quantize(w, group_size=group_size, bits=bits)
    ref = A.to_numpy(mx.dequantize(wq, s, b, group_size=group_size, bits=bits)).astype(np.float64)
    qw = bs.QWeight.from_mlx(wq, s, b, bits=bits, group_size=group_size)
    assert qw.framework == "mlx"
    assert qw.bits_available == ((4,) if bits == 4 else (4, 8))
    got = bs.dequantize(qw, bits, dtype=dtype)
    assert isinstance(got, mx.array)
    got = A.to_numpy(got).astype(np.float64)
    if bits == 8 and dtype == "float32":
        # b = b8 + 7.5*s8 needs more than float32's 24 bits when s8 and b8 are float32
        # themselves, so the stored bias can be 1 ulp off: exact up to that rounding.
        assert np.abs(got - ref).max() <= 2 ** -22 * np.abs(ref).max()
    else:
        assert np.array_equal(got, ref)
    # The float64 reference of the same view is MLX's arithmetic without the roundings.
    exact = bs.dequantize_f64(qw, bits)
    assert np.abs(exact - ref).max() <= 2 ** -7 * np.abs(ref).max()


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_mlx_4bit_plane_is_our_quantizer(rng, group_size, dtype):
    w = mx_weight(rng, 32, 256, dtype)
    wq, s, b = mx.quantize(w, group_size=group_size, bits=4)
    qw = bs.quantize(A.to_numpy(w), group_size=group_size, bits=4)
    assert np.array_equal(qw.plane0, A.to_numpy(wq))
    assert np.array_equal(qw.scales.astype(np.float64), A.to_numpy(s).astype(np.float64))
    assert np.array_equal(qw.biases.astype(np.float64), A.to_numpy(b).astype(np.float64))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_to_mlx_round_trip(rng, bits, group_size):
    w = mx_weight(rng, 32, 256, "bfloat16")
    wq, s, b = mx.quantize(w, group_size=group_size, bits=bits)
    qw = bs.QWeight.from_mlx(wq, s, b, bits=bits, group_size=group_size)
    wq2, s2, b2 = qw.to_mlx(bits, dtype="bfloat16")
    assert np.array_equal(A.to_numpy(wq2), A.to_numpy(wq))
    assert np.array_equal(A.to_numpy(s2), A.to_numpy(s)) and np.array_equal(A.to_numpy(b2), A.to_numpy(b))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("m", [1, 5, 33])
def test_qmatmul_agrees_with_mlx_quantized_matmul(rng, bits, group_size, m):
    n, k = 96, 512
    w = mx_weight(rng, n, k, "float32")
    wq, s, b = mx.quantize(w, group_size=group_size, bits=bits)
    x = mx.array((rng.standard_normal((m, k)) / np.sqrt(k)).astype(np.float32))
    want = A.to_numpy(mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=group_size, bits=bits))
    qw = bs.QWeight.from_mlx(wq, s, b, bits=bits, group_size=group_size)
    got = bs.qmatmul(x, qw, bits=bits)
    assert isinstance(got, mx.array) and got.shape == (m, n) and got.dtype == mx.float32
    got = A.to_numpy(got)
    assert np.abs(got - want).max() <= 3e-4 * np.abs(want).max()


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_view_of_mlx_8bit_is_as_good_as_mlx_4bit(rng, group_size):
    """Plane 0 of an MLX 8-bit weight (q8 >> 4) is a free INT4 view; on average over
    random matrices its error is no larger than MLX's own 4-bit quantization."""
    ours, theirs = [], []
    for _ in range(6):
        w = mx_weight(rng, 64, 512, "float32")
        wf = A.to_numpy(w).astype(np.float64)
        q8 = bs.QWeight.from_mlx(*mx.quantize(w, group_size=group_size, bits=8), bits=8, group_size=group_size)
        ours.append(np.mean((bs.dequantize_f64(q8, 4) - wf) ** 2))
        wq4, s4, b4 = mx.quantize(w, group_size=group_size, bits=4)
        deq4 = A.to_numpy(mx.dequantize(wq4, s4, b4, group_size=group_size, bits=4)).astype(np.float64)
        theirs.append(np.mean((deq4 - wf) ** 2))
    assert np.mean(ours) <= np.mean(theirs) * 1.02


def test_mlx_bfloat16_activations(rng):
    w = mx_weight(rng, 64, 256, "bfloat16")
    wq, s, b = mx.quantize(w, group_size=64, bits=8)
    qw = bs.QWeight.from_mlx(wq, s, b, bits=8, group_size=64)
    x = mx.array(rng.standard_normal((3, 256)).astype(np.float32) / 16).astype(mx.bfloat16)
    y = bs.qmatmul(x, qw)
    assert y.dtype == mx.bfloat16 and y.shape == (3, 64)
    ref = bs.qmatmul_f64(x, qw, 8)
    assert np.abs(A.to_numpy(y).astype(np.float64) - ref).max() <= 8e-3 * np.abs(ref).max()


def test_from_mlx_rejects_bad_shapes(rng):
    w = mx_weight(rng, 32, 256, "float32")
    wq, s, b = mx.quantize(w, group_size=64, bits=4)
    with pytest.raises(ValueError, match="scales must have shape"):
        bs.QWeight.from_mlx(wq, s[:, :2], b, bits=4, group_size=64)
    with pytest.raises(ValueError, match="group_size"):
        bs.QWeight.from_mlx(wq, s, b, bits=4, group_size=16)
    with pytest.raises(ValueError, match="bits"):
        bs.QWeight.from_mlx(wq, s, b, bits=3, group_size=64)
