"""Bad input raises ValueError/TypeError naming the argument; it never crashes."""

import numpy as np
import pytest

import bitswitch as bs
from bitswitch import _C


@pytest.fixture
def case(rng):
    qw = bs.quantize(rng.standard_normal((32, 128)).astype(np.float32), group_size=64, bits=8)
    x = rng.standard_normal((2, 128)).astype(np.float32)
    return qw, x


def raw(x, qw, bits=8, out=None, **over):
    args = dict(plane0=qw.plane0, plane1=qw.plane1, scales=qw.scales, biases=qw.biases, group_size=qw.group_size)
    args.update(over)
    if out is None:
        out = np.empty(x.shape[:-1] + (qw.shape[0],), dtype=x.dtype)
    return _C.qmatmul(x, args["plane0"], args["plane1"], args["scales"], args["biases"], args["group_size"], bits, out)


def test_wrong_k(case):
    qw, x = case
    with pytest.raises(ValueError, match=r"x .*K = 96 inputs but the weight expects 128"):
        raw(x[:, :96].copy(), qw)
    with pytest.raises(ValueError, match="weight expects K = 128"):
        bs.qmatmul(x[:, :96].copy(), qw)


def test_k_not_multiple_of_group(rng):
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        bs.quantize(rng.standard_normal((8, 96)).astype(np.float32), group_size=64)
    p = np.zeros((8, 12), np.uint32)
    s = np.zeros((8, 1), np.float32)
    with pytest.raises(ValueError, match="not a multiple of group_size 64"):
        _C.qmatmul(np.zeros((1, 96), np.float32), p, None, s, s, 64, 4, np.zeros((1, 8), np.float32))


@pytest.mark.parametrize("bits", [0, 2, 3, 16, -4])
def test_unsupported_bits(case, bits):
    qw, x = case
    with pytest.raises(ValueError, match="bits must be 4"):
        raw(x, qw, bits=bits)
    with pytest.raises(ValueError, match="bits must be 4"):
        bs.qmatmul(x, qw, bits=bits)


@pytest.mark.parametrize("g", [0, 16, 48, 256])
def test_unsupported_group(case, g):
    qw, x = case
    with pytest.raises(ValueError, match="group_size must be"):
        raw(x, qw, group_size=g)
    with pytest.raises(ValueError, match="group_size must be"):
        bs.quantize(np.ones((8, 256), np.float32), group_size=g)


def test_int8_without_plane1(case):
    qw, x = case
    q4 = qw.int4_only()
    with pytest.raises(ValueError, match="no plane 1"):
        raw(x, q4, bits=8, plane1=None)
    with pytest.raises(ValueError, match="plane 1"):
        bs.qmatmul(x, q4, bits=8)


def test_non_contiguous(case):
    qw, x = case
    xt = np.asfortranarray(np.repeat(x, 2, axis=0))
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        raw(xt, qw)
    with pytest.raises(ValueError, match="plane0 must be C-contiguous"):
        raw(x, qw, plane0=np.asfortranarray(qw.plane0))
    with pytest.raises(ValueError, match="scales must be C-contiguous"):
        raw(x, qw, scales=np.asfortranarray(qw.scales))
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        bs.qmatmul(np.repeat(x, 2, axis=1)[:, ::2], qw)


def test_wrong_dtypes(case):
    qw, x = case
    with pytest.raises(TypeError, match="x must be float32, bfloat16 or float16, got float64"):
        raw(x.astype(np.float64), qw)
    with pytest.raises(TypeError, match="x must be float32, bfloat16 or float16, got int32"):
        bs.qmatmul(x.astype(np.int32), qw)
    with pytest.raises(TypeError, match="plane0 must be uint32"):
        raw(x, qw, plane0=qw.plane0.view(np.int32))
    with pytest.raises(TypeError, match="biases must have the dtype of scales"):
        raw(x, qw, biases=qw.biases.astype(np.float16))
    with pytest.raises(TypeError, match="out must have the dtype of x"):
        raw(x, qw, out=np.empty((2, 32), np.float16))
    with pytest.raises(TypeError, match="must be a numpy array, a torch tensor"):
        raw([[1.0] * 128], qw, out=np.empty((1, 32), np.float32))


def test_mismatched_scales_shape(case):
    qw, x = case
    with pytest.raises(ValueError, match=r"scales must have shape \(32, 2\)"):
        raw(x, qw, scales=np.ascontiguousarray(qw.scales[:, :1]))
    with pytest.raises(ValueError, match=r"biases must have shape \(32, 2\)"):
        raw(x, qw, biases=np.zeros((31, 2), np.float32))
    with pytest.raises(ValueError, match="plane1 must have shape"):
        raw(x, qw, plane1=np.zeros((31, 16), np.uint32))
    with pytest.raises(ValueError, match="scales must have shape"):
        bs.QWeight(qw.plane0, qw.plane1, qw.scales[:, :1], qw.biases, 64)


def test_empty_arrays(case):
    qw, x = case
    with pytest.raises(ValueError, match="x must not be empty"):
        raw(np.zeros((0, 128), np.float32), qw)
    with pytest.raises(ValueError, match="must not be empty"):
        bs.quantize(np.zeros((0, 64), np.float32), 64)
    with pytest.raises(ValueError, match="plane0 must not be empty"):
        _C.qmatmul(x, np.zeros((0, 16), np.uint32), None, np.zeros((0, 2), np.float32),
                   np.zeros((0, 2), np.float32), 64, 4, np.zeros((2, 0), np.float32))


def test_bad_out(case):
    qw, x = case
    with pytest.raises(ValueError, match=r"out must have shape \(2, 32\)"):
        raw(x, qw, out=np.empty((2, 31), np.float32))
    ro = np.empty((2, 32), np.float32)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="out is read-only"):
        raw(x, qw, out=ro)
    buf = np.zeros(64 + 256, np.float32)
    with pytest.raises(ValueError, match="overlaps an input"):
        raw(buf[:256].reshape(2, 128), qw, out=buf[:64].reshape(2, 32))


def test_wrong_dimensions(case):
    qw, x = case
    with pytest.raises(ValueError, match="plane0 must be 2-D"):
        raw(x, qw, plane0=qw.plane0.reshape(-1))
    with pytest.raises(ValueError, match="scalar"):
        raw(np.array(1.0, np.float32), qw, out=np.empty(32, np.float32))


def test_mixed_frameworks(case):
    torch = pytest.importorskip("torch")
    qw, x = case
    with pytest.raises(TypeError, match="convert one of them"):
        bs.qmatmul(torch.from_numpy(x), qw)


def test_bad_quantize_inputs(rng):
    with pytest.raises(ValueError, match="NaN or infinity"):
        bs.quantize(np.full((8, 64), np.nan, np.float32), 64)
    with pytest.raises(ValueError, match="must be 2-D"):
        bs.quantize(np.ones(64, np.float32), 64)
    with pytest.raises(TypeError, match="float array"):
        bs.quantize(np.ones((8, 64), np.int32), 64)
    with pytest.raises(TypeError, match="QWeight"):
        bs.qmatmul(np.ones((1, 64), np.float32), "not a weight")


def test_bad_variant_and_threads():
    with pytest.raises(ValueError, match="unknown CPU variant"):
        bs.ops.set_cpu_variant("sse9")
    with pytest.raises(ValueError, match="set_num_threads"):
        bs.ops.set_num_threads(-1)


@pytest.mark.parametrize("act_bits", [0, 4, 12, 32])
def test_unsupported_act_bits(case, act_bits):
    qw, x = case
    with pytest.raises(ValueError, match="act_bits must be 16"):
        _C.qmatmul(x, qw.plane0, qw.plane1, qw.scales, qw.biases, 64, 8, np.empty((2, 32), np.float32), act_bits)
    with pytest.raises(ValueError, match="act_bits must be 16"):
        bs.qmatmul(x, qw, act_bits=act_bits)
