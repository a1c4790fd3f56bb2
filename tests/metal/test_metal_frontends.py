"""The MLX and torch MPS front ends' side of a Metal launch (argument checks, buffer order,
template arguments, grid and threadgroup sizes, output shapes and dtypes, strided views)
run on CPUs: each front end's launcher is swapped for the MSL emulator, which runs the very
entry points torch compiles and the bodies MLX generates around the same impl functions.
"""

import shutil
import sys

import numpy as np
import pytest

import bitswitch as bs
from bitswitch import attention as A
from bitswitch import metal as M
from conftest import rel_err

pytestmark = [
    pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is needed to compile the MSL emulation"),
    # The emulation is built for Linux (ELF fiber switch, /proc, glibc's sanitizer runtimes);
    # on a Mac the same kernels run on the real GPU (test_metal_device.py).
    pytest.mark.skipif(sys.platform != "linux", reason="the MSL emulation runs on Linux"),
]

import emulator  # noqa: E402

INSTANCES = [("qmv", {"T": t, "S": s, "BITS": b, "GS": 64}) for t, s in (("float32", "float32"), ("bfloat16", "float32"),
                                                                       ("float16", "float16")) for b in (4, 8)]
INSTANCES += [("qmm", {"T": "float32", "S": "float32", "BITS": b, "GS": 64}) for b in (4, 8)]
INSTANCES += [(k, {"T": t, "D": 64}) for k in ("attention", "attention_decode", "attention_combine")
              for t in ("float32", "float16")]


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return emulator.Emulator(emulator.build(INSTANCES, tmp_path_factory.mktemp("metal_emu_fe")))


# -- torch MPS ------------------------------------------------------------------------------
@pytest.fixture
def torch_on_emulator(emu, monkeypatch):
    torch = pytest.importorskip("torch")
    import bitswitch.torch as bt

    def launch(launch, tensors):
        for t in tensors:
            assert isinstance(t, torch.Tensor)
        emu.launch(launch, [t.data_ptr() for t in tensors])

    monkeypatch.setattr(bt, "_METAL_LAUNCH", launch)
    return bt


def test_torch_ops_have_mps_kernels():
    torch = pytest.importorskip("torch")
    import bitswitch.torch as bt

    assert bt._lib is not None
    for op in ("qmatmul", "attention"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bitswitch::{op}", "MPS"), op


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_torch_qmatmul_marshalling(rng, emu, torch_on_emulator, dtype):
    import torch

    bt = torch_on_emulator
    w = (rng.standard_normal((40, 256)) * 0.05).astype(np.float32)
    sdt = "float16" if dtype == "float16" else "float32"
    qw = bs.quantize(w, group_size=64, bits=8, scales_dtype=sdt).torch()
    for shape in [(3, 256), (2, 2, 256)] + ([(20, 256)] if dtype == "float32" else []):
        x = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(getattr(torch, dtype))
        for bits in (4, 8):
            y = bt._qmatmul_metal(x, qw.plane0, qw.plane1, qw.scales, qw.biases, 64, bits)
            assert y.shape == shape[:-1] + (40,) and y.dtype == x.dtype
            ref = x.double().numpy().reshape(-1, 256) @ bs.dequantize_f64(qw, bits).T
            assert rel_err(y.float().numpy().reshape(-1, 40), ref) <= {"float32": 2e-5, "bfloat16": 8e-3,
                                                                         "float16": 1.5e-3}[dtype]


def test_torch_attention_marshalling(rng, emu, torch_on_emulator):
    """A KV-cache narrow (row stride of the capacity), a mask from the op's tensors, both kernels."""
    import torch

    bt = torch_on_emulator
    b, hq, hkv, cap, d = 1, 4, 2, 160, 64
    kc = torch.randn(b, hkv, cap, d)
    vc = torch.randn(b, hkv, cap, d)
    for lq, lk in [(1, 130), (33, 130)]:
        q = torch.randn(b, hq, lq, d)
        k, v = kc[:, :, :lk], vc[:, :, :lk]
        mask = A.streaming_mask(b, hkv, lq, lk, sinks=1, window=1, block_q=32, block_k=32, q_offset=lk - lq)
        ip, ix = mask.torch_tensors()
        out, lse = bt._attention_metal(q, k, v, ip, ix, 32, 32, True, None, lk - lq)
        ref, ref_lse = A.attention_reference(q.numpy(), k.numpy(), v.numpy(), mask, q_offset=lk - lq)
        assert rel_err(out.numpy(), ref) <= 2e-5
        assert np.max(np.abs(lse.numpy() - ref_lse)) <= 1e-4


def test_clear_errors_without_metal():
    """Asking for a Metal kernel where there is none names what is missing."""
    torch = pytest.importorskip("torch")
    import bitswitch.torch as bt

    launch = M.Launch("qmv", {"T": "float32", "S": "float32", "BITS": 4, "GS": 64}, 1, 64)
    if not (hasattr(torch.mps, "compile_shader") and torch.backends.mps.is_available()):
        with pytest.raises(RuntimeError, match="compile_shader|no Metal GPU"):
            bt._mps_launch(launch, [])
    mx = pytest.importorskip("mlx.core")
    import bitswitch.mlx as bsm

    if not bsm.metal_available():
        with pytest.raises(RuntimeError, match="need MLX with a Metal GPU"):
            bsm._kernel("qmv")
    assert mx is not None


def test_torch_metal_ops_reject_bad_input(rng, torch_on_emulator):
    import torch

    bt = torch_on_emulator
    qw = bs.quantize((rng.standard_normal((16, 64)) * 0.05).astype(np.float32), group_size=64, bits=8).torch()
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="plane0 is on meta but x/q is on cpu"):
        bt._qmatmul_metal(x, qw.plane0.to("meta"), qw.plane1, qw.scales, qw.biases, 64, 8)
    with pytest.raises(ValueError, match="act_bits must be 16 on Apple GPUs"):
        bt._qmatmul_metal(x, qw.plane0, qw.plane1, qw.scales, qw.biases, 64, 8, 8)
    with pytest.raises(ValueError, match="x must be contiguous"):
        bt._qmatmul_metal(torch.randn(64, 2).t(), qw.plane0, qw.plane1, qw.scales, qw.biases, 64, 8)
    with pytest.raises(ValueError, match="the weight expects K = 64"):
        bt._qmatmul_metal(torch.randn(2, 32), qw.plane0, qw.plane1, qw.scales, qw.biases, 64, 8)
    with pytest.raises(ValueError, match="no plane 1"):
        bt._qmatmul_metal(x, qw.plane0, None, qw.scales, qw.biases, 64, 8)
    q = torch.randn(1, 2, 4, 64)
    with pytest.raises(ValueError, match="unit stride along head_dim"):
        bt._attention_metal(q, torch.randn(1, 1, 64, 8).transpose(2, 3), torch.randn(1, 1, 8, 64), None, None,
                            64, 64)
    with pytest.raises(TypeError, match="share one dtype"):
        bt._attention_metal(q, q.half(), q, None, None, 64, 64)


# -- MLX ------------------------------------------------------------------------------------
class _FakeMetalKernel:
    """Stands in for an mx.fast.metal_kernel: takes its call arguments, runs the instance
    through the emulator, returns MLX arrays."""

    def __init__(self, emu, name):
        self.emu, self.name = emu, name

    def __call__(self, *, inputs, template, grid, threadgroup, output_shapes, output_dtypes):
        import mlx.core as mx

        from bitswitch import _arrays as AR

        spec = M.KERNELS[self.name]
        tmpl = {}
        for key, val in template:
            tmpl[key] = str(val).rsplit(".", 1)[-1] if isinstance(val, mx.Dtype) else val
        assert [t for t, _ in template] == list(spec.template)
        assert grid[1:] == (1, 1) and threadgroup[1:] == (1, 1) and grid[0] % threadgroup[0] == 0
        assert len(inputs) == len(spec.inputs) and len(output_shapes) == len(spec.outputs)
        ins = [np.ascontiguousarray(AR.to_numpy(a)) for a in inputs]
        outs = [np.full(shape, np.nan, dtype=AR.BFLOAT16 if dt == mx.bfloat16 else
                        np.dtype(str(dt).rsplit(".", 1)[-1])) for shape, dt in zip(output_shapes, output_dtypes)]
        bufs = dict(zip([a.name for a in spec.inputs], ins))
        bufs.update(zip([a.name for a in spec.outputs], outs))
        launch = M.Launch(self.name, tmpl, grid[0] // threadgroup[0], threadgroup[0])
        self.emu.launch(launch, [bufs[a.name].ctypes.data for a in spec.args])
        return [AR.from_numpy(o, AR.MLX) for o in outs]


@pytest.fixture
def mlx_on_emulator(emu, monkeypatch):
    pytest.importorskip("mlx.core")
    import bitswitch.mlx as bsm

    monkeypatch.setattr(bsm, "_on_gpu", lambda: True)
    monkeypatch.setattr(bsm, "_kernel", lambda name: _FakeMetalKernel(emu, name))
    return bsm


def test_mlx_kernel_bodies_compile_for_mlx_template_names():
    """mx.fast.metal_kernel makes T, S, BITS, GS, D template parameters and the thread ids
    parameters of the generated function; the bodies use exactly those names."""
    for name in M.KERNELS:
        body = M.mlx_body(name)
        assert "threadgroup_position_in_grid.x" in body
        for t in M.KERNELS[name].template:
            assert f"{t}" in body.split("<", 1)[1].split(">", 1)[0]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_mlx_qmatmul_and_quantized_linear(rng, mlx_on_emulator, dtype):
    import mlx.core as mx
    import mlx.nn as nn

    bsm = mlx_on_emulator
    sdt = "float16" if dtype == "float16" else "float32"
    w = (rng.standard_normal((24, 192)) * 0.05).astype(np.float32)
    qw = bs.quantize(w, group_size=64, bits=8, scales_dtype=sdt).mlx()
    x = mx.array(rng.standard_normal((2, 3, 192)).astype(np.float32)).astype(getattr(mx, dtype))
    xn = np.asarray(bs._arrays.to_numpy(x), np.float64).reshape(-1, 192)
    tol = {"float32": 2e-5, "bfloat16": 8e-3, "float16": 1.5e-3}[dtype]
    for bits in (4, 8):
        y = bsm.qmatmul(x, qw, bits)
        assert y.shape == (2, 3, 24) and y.dtype == x.dtype
        ref = xn @ bs.dequantize_f64(qw, bits).T
        assert rel_err(bs._arrays.to_numpy(y).astype(np.float64).reshape(-1, 24), ref) <= tol
    layer = bsm.QuantizedLinear(qw, bias=mx.ones((24,), dtype=getattr(mx, dtype)), bits=4)
    y4 = layer(x)
    layer.bits = 8
    y8 = layer(x)
    assert not np.array_equal(bs._arrays.to_numpy(y4), bs._arrays.to_numpy(y8))
    assert isinstance(layer, nn.Module)


def test_mlx_attention_both_kernels(rng, mlx_on_emulator):
    import mlx.core as mx

    bsm = mlx_on_emulator
    b, hq, hkv, lk, d = 1, 4, 2, 100, 64
    k = mx.array(rng.standard_normal((b, hkv, lk, d)).astype(np.float32))
    v = mx.array(rng.standard_normal((b, hkv, lk, d)).astype(np.float32))
    for lq in (1, 40):
        q = mx.array(rng.standard_normal((b, hq, lq, d)).astype(np.float32))
        mask = A.causal_mask(b, hkv, lq, lk, 32, 32, lk - lq)
        out, lse = bsm.attention(q, k, v, mask=mask, q_offset=lk - lq, return_lse=True)
        ref, ref_lse = A.attention_reference(q, k, v, mask, q_offset=lk - lq)
        assert rel_err(np.array(out), ref) <= 2e-5
        assert np.max(np.abs(np.array(lse) - ref_lse)) <= 1e-4
