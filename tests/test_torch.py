"""torch.ops.bitswitch.qmatmul (torch.library) and the QLinear module."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import bitswitch as bs  # noqa: E402
from bitswitch.torch import QLinear  # noqa: E402
from conftest import rel_err  # noqa: E402


def make(rng, n=48, k=256, g=64, dtype=torch.float32, m=3):
    qw = bs.quantize(torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32)), group_size=g, bits=8)
    x = torch.from_numpy((rng.standard_normal((m, k)) / np.sqrt(k)).astype(np.float32)).to(dtype)
    return qw, x


def op(x, qw, bits):
    return torch.ops.bitswitch.qmatmul(x, qw.plane0, qw.plane1, qw.scales, qw.biases, qw.group_size, bits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [4, 8])
def test_op_matches_reference(rng, dtype, bits):
    qw, x = make(rng, dtype=dtype)
    y = op(x, qw, bits)
    assert y.dtype == dtype and y.shape == (3, 48)
    tol = {torch.float32: 3e-4, torch.bfloat16: 8e-3, torch.float16: 1.5e-3}[dtype]
    assert rel_err(y.float().numpy(), bs.qmatmul_f64(x.float().numpy(), qw, bits)) < tol


def test_opcheck(rng):
    for bits in (4, 8):
        for act_bits in (16, 8):
            qw, x = make(rng)
            torch.library.opcheck(torch.ops.bitswitch.qmatmul.default,
                                  (x, qw.plane0, qw.plane1, qw.scales, qw.biases, qw.group_size, bits, act_bits))
    qw, x = make(rng, dtype=torch.bfloat16, m=5)
    q4 = qw.int4_only()
    torch.library.opcheck(torch.ops.bitswitch.qmatmul.default,
                          (x.reshape(1, 5, -1), q4.plane0, None, q4.scales, q4.biases, q4.group_size, 4))


def test_compile_fullgraph(rng):
    qw, x = make(rng)

    def f(x):
        return torch.relu(op(x, qw, 8)) * 2 + op(x, qw, 4)

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x))


def test_qlinear_compile_fullgraph(rng):
    lin = torch.nn.Linear(256, 40)
    q = QLinear.from_linear(lin, group_size=32, bits=8)
    model = torch.nn.Sequential(q, torch.nn.GELU())
    x = torch.randn(4, 256)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.parametrize("bits", [4, 8])
def test_qlinear_from_linear(rng, bits):
    lin = torch.nn.Linear(384, 72, bias=True)
    q = QLinear.from_linear(lin, group_size=128, bits=bits)
    assert q.bits == bits and q.in_features == 384 and q.out_features == 72
    x = torch.randn(2, 5, 384)
    with torch.inference_mode():
        y = q(x)
        ref = bs.qmatmul_f64(x.numpy(), q.qweight, bits) + lin.bias.detach().numpy()
    assert y.shape == (2, 5, 72)
    assert rel_err(y.numpy(), ref) < 3e-4
    # Close to the float layer within the quantization error of the view.
    err = (y - lin(x).detach()).abs().max().item()
    assert err < (0.05 if bits == 8 else 0.5) * lin(x).detach().abs().max().item()


def test_qlinear_switches_bits_without_reallocation(rng):
    q = QLinear.from_linear(torch.nn.Linear(256, 64, bias=False), group_size=64, bits=8)
    ptrs = [t.data_ptr() for t in (q.plane0, q.plane1, q.scales, q.biases)]
    x = torch.randn(3, 256)
    y8 = q(x)
    q.bits = 4
    y4 = q(x)
    q.bits = 8
    torch.testing.assert_close(q(x), y8, rtol=0, atol=0)
    assert [t.data_ptr() for t in (q.plane0, q.plane1, q.scales, q.biases)] == ptrs
    assert rel_err(y4.numpy(), bs.qmatmul_f64(x.numpy(), q.qweight, 4)) < 3e-4
    assert not torch.equal(y4, y8)


def test_qlinear_eager_path_equals_op(rng):
    q = QLinear.from_linear(torch.nn.Linear(512, 96), group_size=64, bits=8)
    x = torch.randn(7, 512)
    qw = q.qweight
    with torch.no_grad():
        for bits in (4, 8):
            for act_bits in (16, 8):
                q.bits, q.act_bits = bits, act_bits
                y_fast = q(x)
                y_op = torch.ops.bitswitch.qmatmul(x, qw.plane0, qw.plane1, qw.scales, qw.biases, 64, bits,
                                                   act_bits) + q.bias
                torch.testing.assert_close(y_fast, y_op, rtol=0, atol=0)
                ref = bs.qmatmul_f64(x.numpy(), qw, bits, act_bits=act_bits) + q.bias.numpy()
                assert rel_err(y_fast.numpy(), ref) < 3e-4
    with pytest.raises(ValueError, match="act_bits must be 16"):
        q.act_bits = 4


def test_qlinear_state_dict_and_to(rng):
    q = QLinear.from_linear(torch.nn.Linear(128, 32), group_size=32, bits=8)
    x = torch.randn(2, 128)
    y = q(x).detach()
    q2 = QLinear.from_linear(torch.nn.Linear(128, 32), group_size=32, bits=8)
    q2(x)  # builds its cached packed weight, which load_state_dict must not leave stale
    q2.load_state_dict(q.state_dict())
    torch.testing.assert_close(q2(x).detach(), y, rtol=0, atol=0)
    q3 = q.to(torch.bfloat16)  # float buffers follow the module dtype; planes stay uint32
    assert q3.scales.dtype == torch.bfloat16 and q3.plane0.dtype == torch.uint32
    y3 = q3(x.bfloat16()).float()
    assert rel_err(y3.detach().numpy(), y.numpy().astype(np.float64)) < 2e-2


def test_qlinear_rejects_int8_on_int4_weight(rng):
    q = QLinear.from_linear(torch.nn.Linear(128, 32), group_size=32, bits=4)
    assert q.plane1 is None and q.bits == 4
    with pytest.raises(ValueError, match="plane 1"):
        q.bits = 8
    with pytest.raises(ValueError, match="bits must be 4"):
        q.bits = 6


def test_op_errors_are_clear(rng):
    qw, x = make(rng)
    with pytest.raises(ValueError, match="weight expects K"):
        op(x[:, :128].contiguous(), qw, 8)
    with pytest.raises(ValueError, match="C-contiguous"):
        op(torch.randn(256, 3).t(), qw, 8)
    with pytest.raises(ValueError, match="bits must be 4"):
        op(x, qw, 5)


def test_input_requiring_grad_goes_through_the_op(rng):
    q = QLinear.from_linear(torch.nn.Linear(128, 16), group_size=32, bits=8)
    x = torch.randn(2, 128, requires_grad=True)
    y = q(x)
    assert y.shape == (2, 16)
    assert rel_err(y.detach().numpy(), bs.qmatmul_f64(x.detach().numpy(), q.qweight, 8)
                   + q.bias.detach().numpy()) < 3e-4


def test_torch_threads_sets_and_restores_the_count():
    from bitswitch.torch import torch_threads

    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch_threads(1):
            inside = torch.get_num_threads()
        after = torch.get_num_threads()
        with pytest.raises(KeyError):  # restored when the block raises
            with torch_threads(1):
                raise KeyError("x")
        after_raise = torch.get_num_threads()
        with torch_threads(2):
            same = torch.get_num_threads()
    finally:
        torch.set_num_threads(old)
    assert (inside, after, after_raise, same) == (1, 2, 2, 2)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="torch_threads: n must be a positive integer"):
            with torch_threads(bad):
                pass


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dequant_gemm_path_matches_reference(rng, monkeypatch, bits, dtype):
    """The large-M path of CUDA qmatmul (W dequantized slice by slice, one dense matmul per
    slice into the output's columns), run on CPU tensors: slices of 64 rows over N = 200
    (the last one short), and one slice holding all of N."""
    import bitswitch.torch as bt

    dt = getattr(torch, dtype)
    w = rng.standard_normal((200, 256)).astype(np.float32)
    qw = bs.quantize(w, group_size=64, bits=8).to("torch")
    x = torch.from_numpy(rng.standard_normal((3, 5, 256)).astype(np.float32) / 16).to(dt)
    ref = x.double().numpy().reshape(15, 256) @ torch.from_numpy(
        bs.dequantize_f64(qw.to("numpy"), bits)).to(dt).double().numpy().T
    for slice_bytes in (64 * 2 * 256, 1 << 30):
        monkeypatch.setattr(bt, "_DEQUANT_SLICE_BYTES", slice_bytes)
        out = torch.full((3, 5, 200), float("nan"), dtype=dt)
        y = bt._qmatmul_dequant_gemm(x, qw.plane0, qw.plane1, qw.scales, qw.biases, 64, bits, out)
        assert y is out and not torch.isnan(out).any()
        assert rel_err(out.float().numpy().reshape(15, 200), ref) <= 1e-2


def test_native_dequantize_matches_float64_and_checks_its_arguments(rng):
    from bitswitch import _C

    w = rng.standard_normal((37, 256)).astype(np.float32)
    for sdtype in ("float32", "bfloat16"):
        qw = bs.quantize(w, group_size=64, bits=8, scales_dtype=sdtype).to("torch")
        for bits in (4, 8):
            ref = bs.dequantize_f64(qw.to("numpy"), bits)
            for dt, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2 ** -8), (torch.float16, 2 ** -11)):
                out = torch.full((37, 256), float("nan"), dtype=dt)
                _C.dequantize(qw.plane0, qw.plane1 if bits == 8 else None, qw.scales, qw.biases, 64, bits, out)
                err = (out.double().numpy() - ref).__abs__().max() / np.abs(ref).max()
                assert err <= tol, (sdtype, bits, dt, err)
    with pytest.raises(ValueError, match=r"dequantize: out must have shape \(37, 256\)"):
        _C.dequantize(qw.plane0, None, qw.scales, qw.biases, 64, 4, torch.zeros(37, 255))
    with pytest.raises(TypeError, match="dequantize: out must be float32, bfloat16 or float16"):
        _C.dequantize(qw.plane0, None, qw.scales, qw.biases, 64, 4, torch.zeros(37, 256, dtype=torch.int32))
    with pytest.raises(ValueError, match="dequantize: bits is 8 but the weight has no plane 1"):
        _C.dequantize(qw.plane0, None, qw.scales, qw.biases, 64, 8, torch.zeros(37, 256))
    with pytest.raises(ValueError, match="dequantize: group_size must be 32, 64 or 128"):
        _C.dequantize(qw.plane0, None, qw.scales, qw.biases, 48, 4, torch.zeros(37, 256))
