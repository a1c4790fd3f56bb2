"""The CUDA layer ops (cuda/layer_ops.cuh: rms_norm, rope_qkv, silu_mul) on the CPU, under
cuda_emulation.h, against the torch reference the model runs elsewhere (transformers' ops,
tests/test_layer_ops.py's tolerances) and against the CPU kernels: the residual add written
back exactly, the in-place norm, RoPE with the position per batch row read from memory
(clamped to the cache when out of range), head dims that are not a multiple of 32, q/k norm
on and off, v copied as is, only the position's cache rows written, outputs poisoned."""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import cuda_emulator as emulator  # noqa: E402
from bitswitch import _C  # noqa: E402
from bitswitch import torch as bt  # noqa: E402
from test_layer_ops import DTYPES, close, poisoned, reference_rope, rope_tables  # noqa: E402

pytestmark = pytest.mark.skipif(not emulator.available(),
                                reason="the CUDA emulation needs Linux and g++ (fiber switch, ELF, glibc)")

SOURCE = r'''
#include "cuda_emulation.h"
#include "layer_ops.cuh"

using namespace bitswitch::cuda;

extern "C" int bs_rms_norm(void* x, const void* delta, const void* weight, void* out, int64_t rows, int64_t h,
                           float eps, int dtype) {
  RmsNormParams p{};
  p.x = x; p.delta = delta; p.weight = weight; p.out = out; p.rows = rows; p.h = h;
  p.x_stride = p.delta_stride = p.out_stride = h;
  p.eps = eps;
  p.dtype = DType(dtype);
  return int(rms_norm(p, nullptr));
}

// dims: b, n, hq, hkv, d, table_rows, capacity, pos
extern "C" int bs_rope(const void* qkv, const void* qw, const void* kw, float eps, const void* cos, const void* sin,
                       const int32_t* positions, void* q_out, void* k_cache, void* v_cache, const int64_t* dims,
                       int dtype) {
  RopeParams p{};
  p.qkv = qkv;
  p.b = dims[0]; p.n = dims[1]; p.hq = dims[2]; p.hkv = dims[3]; p.d = dims[4];
  p.table_rows = dims[5]; p.capacity = dims[6]; p.pos = dims[7];
  p.qkv_strides[0] = p.n * (p.hq + 2 * p.hkv) * p.d;
  p.qkv_strides[1] = (p.hq + 2 * p.hkv) * p.d;
  p.q_weight = qw; p.k_weight = kw; p.eps = eps; p.cos = cos; p.sin = sin; p.positions = positions;
  p.q_out = q_out; p.k_cache = k_cache; p.v_cache = v_cache;
  p.q_strides[0] = p.hq * p.n * p.d; p.q_strides[1] = p.n * p.d; p.q_strides[2] = p.d;
  p.k_strides[0] = p.v_strides[0] = p.hkv * p.capacity * p.d;
  p.k_strides[1] = p.v_strides[1] = p.capacity * p.d;
  p.k_strides[2] = p.v_strides[2] = p.d;
  p.dtype = DType(dtype);
  return int(rope(p, nullptr));
}

extern "C" int bs_silu_mul(const void* gu, void* out, int64_t rows, int64_t i, int dtype) {
  SiluMulParams p{};
  p.gate_up = gu; p.out = out; p.rows = rows; p.i = i; p.gu_stride = 2 * i; p.out_stride = i;
  p.dtype = DType(dtype);
  return int(silu_mul(p, nullptr));
}
'''

CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    lib = emulator.build("layer_ops", SOURCE, tmp_path_factory.mktemp("cuda_layer_ops"))
    p, i64, i32, f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.bs_rms_norm.argtypes = [p, p, p, p, i64, i64, f, i32]
    lib.bs_rope.argtypes = [p, p, p, f, p, p, p, p, p, p, p, i32]
    lib.bs_silu_mul.argtypes = [p, p, i64, i64, i32]
    for fn in (lib.bs_rms_norm, lib.bs_rope, lib.bs_silu_mul):
        fn.restype = i32
    return lib


def ptr(t):
    return None if t is None else t.data_ptr()


def ok(lib, rc):
    assert rc == 0, f"cudaError {rc}: {emulator.last_error(lib)}"


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("rows,h", [(1, 1), (1, 7), (3, 64), (1, 1024), (5, 1000), (2, 16384)])
def test_rms_norm(rng, lib, dtype, rows, h):
    t = DTYPES[dtype]
    x = torch.from_numpy(rng.standard_normal((rows, h)).astype(np.float32) * 3).to(t)
    d = torch.from_numpy(rng.standard_normal((rows, h)).astype(np.float32)).to(t)
    w = torch.from_numpy(rng.standard_normal(h).astype(np.float32)).to(t)
    out, x1 = poisoned((rows, h), t), x.clone()
    ok(lib, lib.bs_rms_norm(ptr(x1), None, ptr(w), ptr(out), rows, h, 1e-6, CODE[t]))
    assert torch.equal(x1, x)  # no delta: x untouched
    close(out, bt.rms_norm_reference(x, w, 1e-6), dtype)
    close(out, bt.rms_norm(x.clone(), w, 1e-6), dtype)  # the CPU kernel
    # With the residual add: x becomes round(x + delta) exactly.
    x2, out2 = x.clone(), poisoned((rows, h), t)
    ok(lib, lib.bs_rms_norm(ptr(x2), ptr(d), ptr(w), ptr(out2), rows, h, 1e-5, CODE[t]))
    assert torch.equal(x2, x + d)
    close(out2, bt.rms_norm_reference(x + d, w, 1e-5), dtype)
    # In place (out is x), with the add.
    x3 = x.clone()
    ok(lib, lib.bs_rms_norm(ptr(x3), ptr(d), ptr(w), ptr(x3), rows, h, 1e-5, CODE[t]))
    close(x3, bt.rms_norm_reference(x + d, w, 1e-5), dtype)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("b,n,hq,hkv,d,norm", [(1, 1, 4, 2, 64, True), (2, 5, 4, 4, 128, True),
                                                (1, 3, 6, 2, 64, False), (2, 1, 16, 8, 128, True),
                                                (3, 2, 2, 1, 6, True), (1, 2, 2, 1, 80, False)])
def test_rope(rng, lib, dtype, b, n, hq, hkv, d, norm):
    t = DTYPES[dtype]
    cap = n + 12
    qkv = torch.from_numpy(rng.standard_normal((b, n, (hq + 2 * hkv) * d)).astype(np.float32)).to(t)
    qw = torch.from_numpy(rng.standard_normal(d).astype(np.float32)).to(t) if norm else None
    kw = torch.from_numpy(rng.standard_normal(d).astype(np.float32)).to(t) if norm else None
    cos, sin = rope_tables(cap + 3, d, t)
    positions = torch.from_numpy(rng.integers(0, cap - n + 1, size=b).astype(np.int32))
    q = poisoned((b, hq, n, d), t)
    kc, vc = poisoned((b, hkv, cap, d), t), poisoned((b, hkv, cap, d), t)
    dims = np.array([b, n, hq, hkv, d, cos.shape[0], cap, 0], np.int64)
    ok(lib, lib.bs_rope(ptr(qkv), ptr(qw), ptr(kw), 1e-6, ptr(cos), ptr(sin), ptr(positions), ptr(q), ptr(kc), ptr(vc),
                        dims.ctypes.data, CODE[t]))
    for bi in range(b):  # the reference, one batch row at its own position
        pos = int(positions[bi])
        kr, vr = poisoned((1, hkv, cap, d), t), poisoned((1, hkv, cap, d), t)
        qr = reference_rope(qkv[bi:bi + 1], hq, qw, kw, cos, sin, pos, kr, vr)
        close(q[bi:bi + 1], qr, dtype, scale=2)
        close(kc[bi:bi + 1, :, pos:pos + n], kr[:, :, pos:pos + n], dtype, scale=2)
        assert torch.equal(vc[bi:bi + 1, :, pos:pos + n], vr[:, :, pos:pos + n])
        for c in (kc, vc):  # only the position's rows are written
            assert torch.isnan(c[bi, :, :pos]).all() and torch.isnan(c[bi, :, pos + n:]).all()
    # The CPU kernel with the same positions in memory: the same values up to rounding.
    q2, kc2, vc2 = poisoned((b, hq, n, d), t), poisoned((b, hkv, cap, d), t), poisoned((b, hkv, cap, d), t)
    _C.rope_qkv(qkv, qw, kw, 1e-6, cos, sin, 0, q2, kc2, vc2, positions=positions)
    close(q, q2, dtype, scale=2)
    close(torch.nan_to_num(kc), torch.nan_to_num(kc2), dtype, scale=2)
    assert torch.equal(torch.nan_to_num(vc), torch.nan_to_num(vc2))


def test_rope_clamps_positions(rng, lib):
    """Positions the glue cannot check on a GPU (past the cache, negative) land on the last /
    first row instead of writing outside the cache."""
    t = torch.bfloat16
    b, n, hq, hkv, d, cap = 2, 1, 4, 2, 64, 16
    qkv = torch.from_numpy(rng.standard_normal((b, n, (hq + 2 * hkv) * d)).astype(np.float32)).to(t)
    cos, sin = rope_tables(cap, d, t)
    q = poisoned((b, hq, n, d), t)
    big_k, big_v = poisoned((b + 1, hkv, cap, d), t), poisoned((b + 1, hkv, cap, d), t)
    kc, vc = big_k[:b], big_v[:b]
    positions = torch.tensor([cap + 100, -5], dtype=torch.int32)
    dims = np.array([b, n, hq, hkv, d, cos.shape[0], cap, 0], np.int64)
    ok(lib, lib.bs_rope(ptr(qkv), None, None, 1e-6, ptr(cos), ptr(sin), ptr(positions), ptr(q), ptr(kc), ptr(vc),
                        dims.ctypes.data, CODE[t]))
    assert not torch.isnan(kc[0, :, cap - 1]).any() and not torch.isnan(kc[1, :, 0]).any()
    assert torch.isnan(big_k[b]).all() and torch.isnan(big_v[b]).all()


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("rows,i", [(1, 1), (1, 3072), (7, 100), (64, 1024)])
def test_silu_mul(rng, lib, dtype, rows, i):
    t = DTYPES[dtype]
    gu = torch.from_numpy(rng.standard_normal((rows, 2 * i)).astype(np.float32) * 4).to(t)
    gu[0, 0] = -100.0
    out = poisoned((rows, i), t)
    ok(lib, lib.bs_silu_mul(ptr(gu), ptr(out), rows, i, CODE[t]))
    close(out, torch.nn.functional.silu(gu[:, :i]) * gu[:, i:], dtype, scale=2)
    close(out, bt.silu_mul(gu), dtype)  # the CPU kernel


def test_threads_mode(rng, lib):
    """One OS thread per GPU thread: the reductions and the RoPE half exchange still agree."""
    emulator.set_threads_mode(lib, True)
    try:
        test_rms_norm(rng, lib, "bfloat16", 2, 1000)
        test_rope(rng, lib, "float32", 2, 2, 4, 2, 64, True)
    finally:
        emulator.set_threads_mode(lib, False)
