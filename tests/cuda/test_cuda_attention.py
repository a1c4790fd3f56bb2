"""The CUDA attention kernels (cuda/attention*.cuh) on the CPU: the instance files
attention_{bf16,f16,f32}.cu compiled by g++ under cuda_emulation.h and launched through
bitswitch::cuda::attention, against float64 dense attention with the block mask expanded
(bitswitch.attention.attention_reference), as tests/test_attention.py checks the CPU kernels.

Covered: bfloat16 / float16 (tensor-core prefill and decode; the SIMT rows kernel for decode
under BITSWITCH_CUDA_DECODE=simt and for unaligned rows) and float32 (SIMT), head dims
64 and 128, causal or not, GQA groups 1 to 8, q_offset (chunked prefill), every mask kind the
mask builders make (dense, causal, streaming, random, runtime-selected, Quest pages), rows that
see no key, strided q / k / v / out views, lengths off the tile and block grids, decode with
forced split-KV (1, 3, 13 ranges) and with too small a workspace, lse on and off, outputs
poisoned with NaN first, 16-bit rows that are not 16-byte aligned, and garbage masks (key
blocks out of range, indptr past the capacity) that must neither fail nor read out of bounds
(checked under AddressSanitizer).

What this cannot check is nvcc's code and the GPU itself (the real mma summation order,
timing, occupancy, shared-memory bank conflicts); tests/test_cuda.py runs on a GPU.
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # tests/: conftest helpers, test_attention's cases
import cuda_emulator as emulator  # noqa: E402  (tests/cuda/cuda_emulator.py)

from bitswitch import attention as A  # noqa: E402
from conftest import cast, rel_err  # noqa: E402
from test_attention import ATTN_TOL, SHAPES, decode_case, make_mask, make_qkv  # noqa: E402

pytestmark = pytest.mark.skipif(not emulator.available(),
                                reason="the CUDA emulation needs Linux and g++ (fiber switch, ELF, glibc)")

# The three instance files, as the CUDA build compiles them, and thunks that pass raw pointers.
SOURCE = r'''
#include "cuda_emulation.h"
#include "attention_bf16.cu"
#include "attention_f16.cu"
#include "attention_f32.cu"

using bitswitch::cuda::AttentionParams;
using bitswitch::cuda::DType;

// dims: b, hq, hkv, lq, lk, d; strides: q, k, v, out (batch, head, row each), in elements.
static AttentionParams params(int dtype, const int64_t* dims, const int64_t* strides, const int32_t* indptr,
                              const int32_t* indices, int64_t nnz_cap, int block_q, int block_k, int causal,
                              float scale, int64_t q_offset, int64_t kv_splits) {
  AttentionParams p{};
  p.dtype = DType(dtype);
  p.b = dims[0]; p.hq = dims[1]; p.hkv = dims[2]; p.lq = dims[3]; p.lk = dims[4]; p.d = dims[5];
  for (int i = 0; i < 3; ++i) {
    p.q_strides[i] = strides[i];
    p.k_strides[i] = strides[3 + i];
    p.v_strides[i] = strides[6 + i];
    p.o_strides[i] = strides[9 + i];
  }
  p.indptr = indptr;
  p.indices = indices;
  p.nnz_cap = nnz_cap;
  p.block_q = block_q;
  p.block_k = block_k;
  p.causal = causal != 0;
  p.scale = scale;
  p.q_offset = q_offset;
  p.kv_splits = kv_splits;
  return p;
}

extern "C" int bs_attention(const void* q, const void* k, const void* v, void* out, float* lse, int dtype,
                            const int64_t* dims, const int64_t* strides, const int32_t* indptr,
                            const int32_t* indices, int64_t nnz_cap, int block_q, int block_k, int causal,
                            float scale, int64_t q_offset, int64_t kv_splits, void* ws, uint64_t ws_bytes,
                            int num_sms, const int32_t* q_offsets) {
  AttentionParams p = params(dtype, dims, strides, indptr, indices, nnz_cap, block_q, block_k, causal, scale,
                             q_offset, kv_splits);
  p.q_offsets = q_offsets;
  p.q = q;
  p.k = k;
  p.v = v;
  p.out = out;
  p.lse = lse;
  return int(bitswitch::cuda::attention(p, ws, size_t(ws_bytes), num_sms, nullptr));
}

extern "C" uint64_t bs_attention_workspace(int dtype, const int64_t* dims, int block_q, int block_k,
                                           int64_t kv_splits, int num_sms) {
  const int64_t strides[12] = {};
  const AttentionParams p = params(dtype, dims, strides, nullptr, nullptr, 0, block_q, block_k, 1, 1.0f, 0,
                                   kv_splits);
  return bitswitch::cuda::attention_workspace_bytes(p, num_sms);
}

// 1 when the call takes the split-KV decode plan (tile or rows kernel + combine), else 0.
extern "C" int bs_attention_is_decode(const int64_t* dims, int block_q) {
  const int64_t strides[12] = {};
  const AttentionParams p = params(0, dims, strides, nullptr, nullptr, 0, block_q, 64, 1, 1.0f, 0, 0);
  return bitswitch::cuda::attn::plan(p, 1).decode ? 1 : 0;
}

// 1: bf16/f16 decode on the tensor-core kernel (the default); 0: BITSWITCH_CUDA_DECODE=simt's
// rows kernel; -1: the environment's choice.
extern "C" void bs_set_decode_tensor_cores(int on) { bitswitch::cuda::attn::decode_override() = on; }
'''

DTYPE_CODE = {"float32": 0, "bfloat16": 1, "float16": 2}
NUM_SMS = 4  # a small GPU: few automatic splits, so the emulation stays quick


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return _load(emulator.build("attention", SOURCE, tmp_path_factory.mktemp("cuda_attention")))


def _load(lib):
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.bs_attention.argtypes = [p, p, p, p, p, i32, p, p, p, p, i64, i32, i32, i32, ctypes.c_float, i64, i64, p,
                                 ctypes.c_uint64, i32, p]
    lib.bs_attention.restype = i32
    lib.bs_attention_workspace.argtypes = [i32, p, i32, i32, i64, i32]
    lib.bs_attention_workspace.restype = ctypes.c_uint64
    lib.bs_attention_is_decode.argtypes = [p, i32]
    lib.bs_attention_is_decode.restype = i32
    lib.bs_set_decode_tensor_cores.argtypes = [i32]
    return lib


@pytest.fixture(params=["tiles", "simt"])
def decode_kernel(request, lib):
    """Both bf16/f16 decode kernels: the tensor-core tile kernel (the default) and the SIMT
    rows kernel (BITSWITCH_CUDA_DECODE=simt)."""
    lib.bs_set_decode_tensor_cores(1 if request.param == "tiles" else 0)
    yield request.param
    lib.bs_set_decode_tensor_cores(-1)


def _dtype(a: np.ndarray) -> str:
    return str(a.dtype)  # float32, bfloat16 (conftest.cast's type) or float16


def _strides(a: np.ndarray) -> list:
    return [s // a.itemsize for s in a.strides[:3]]


def _dims(q, k):
    b, hq, lq, d = q.shape
    return np.array([b, hq, k.shape[1], lq, k.shape[2], d], np.int64)


def attention(lib, q, k, v, mask=None, causal=True, q_offset=0, *, out=None, with_lse=True, kv_splits=0,
              ws_bytes=None, num_sms=NUM_SMS, block_q=64, block_k=64, raw_mask=None, scale=None, q_offsets=None):
    """Runs bitswitch::cuda::attention on numpy arrays (any strides, unit stride on D). `out`
    (poisoned with NaN here when not given) and the lse (poisoned too) are returned.
    ws_bytes: the workspace handed over (default: what attention_workspace_bytes asks for).
    raw_mask: (indptr, indices, block_q, block_k) passed as is, for masks no builder makes.
    q_offsets: int32 [B], each batch row's q_offset read from memory (replacing q_offset)."""
    dtype = _dtype(q)
    dims = _dims(q, k)
    if out is None:
        out = cast(np.full(q.shape, np.nan, np.float32), dtype)
    lse = np.full(q.shape[:3], np.nan, np.float32) if with_lse else None
    if raw_mask is not None:
        indptr, indices, block_q, block_k = raw_mask
    elif mask is not None:
        indptr, indices, block_q, block_k = mask.indptr, mask.indices, mask.block_q, mask.block_k
    else:
        indptr = indices = None
    if ws_bytes is None:
        ws_bytes = lib.bs_attention_workspace(DTYPE_CODE[dtype], dims.ctypes.data, block_q, block_k, kv_splits,
                                              num_sms)
    ws = np.full(ws_bytes // 4 + 4, np.nan, np.float32)
    ws_ptr = ws.ctypes.data + (-ws.ctypes.data) % 16  # the caller's allocator gives 16-byte alignment
    strides = np.array(_strides(q) + _strides(k) + _strides(v) + _strides(out), np.int64)
    scale = q.shape[3] ** -0.5 if scale is None else scale
    rc = lib.bs_attention(q.ctypes.data, k.ctypes.data, v.ctypes.data, out.ctypes.data,
                          None if lse is None else lse.ctypes.data, DTYPE_CODE[dtype], dims.ctypes.data,
                          strides.ctypes.data, None if indptr is None else indptr.ctypes.data,
                          None if indices is None else indices.ctypes.data,
                          0 if indices is None else indices.shape[2], block_q, block_k, int(causal), scale,
                          q_offset, kv_splits, ws_ptr if ws_bytes else None, ws_bytes, num_sms,
                          None if q_offsets is None else q_offsets.ctypes.data)
    assert rc == 0, f"cudaError {rc}: {emulator.last_error(lib)}"
    return out, lse


def check(out, lse, ref, ref_lse, dtype, what):
    y = np.asarray(out, np.float64)
    assert not np.isnan(y).any(), f"{what}: NaN in the output"
    err = rel_err(y, ref)
    assert err <= ATTN_TOL[dtype], f"{what}: {err:.2e}"
    if lse is not None:
        assert np.array_equal(np.isneginf(lse), np.isinf(ref_lse)), f"{what}: lse -inf pattern"
        fin = np.isfinite(ref_lse)
        assert np.max(np.abs(lse[fin] - ref_lse[fin]), initial=0.0) <= 1e-4, f"{what}: lse"


# The CPU suite's shapes (GQA 1/2/8, lengths off the block grid, chunked prefill, decode), the
# 16-head 130-row one cut to 4 heads: the emulator runs every GPU thread.
CUDA_SHAPES = [(b, 4 if (hq, hkv) == (16, 2) else hq, hkv, *rest) for b, hq, hkv, *rest in SHAPES]
MASK_KINDS = ["none", "causal", "streaming", "random", "selected"]


@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64(rng, lib, shape):
    """Every mask kind, causal and not, each dtype in turn (a different one per mask kind and
    shape, so every dtype meets every kernel across the shapes)."""
    b, hq, hkv, lq, lk, d, qo, bq, bk = shape
    dtypes = ["bfloat16", "float16", "float32"]
    for i, kind in enumerate(MASK_KINDS):
        dtype = dtypes[(i + CUDA_SHAPES.index(shape)) % 3]
        q, k, v = make_qkv(rng, b, hq, hkv, lq, lk, d, dtype)
        mask = make_mask(kind, rng, q, k, qo, bq, bk)
        for causal in (True, False):
            ref, ref_lse = A.attention_reference(q, k, v, mask, causal=causal, q_offset=qo)
            out, lse = attention(lib, q, k, v, mask, causal, qo, block_q=bq, block_k=bk)
            check(out, lse, ref, ref_lse, dtype, f"{kind} {dtype} causal={causal}")


# Prefill shapes for the tile kernel: (GQA group, Lq, Lk, D, q_offset, block_q, block_k).
# 64-row tiles that hold 2 or 4 query heads of a 32-row query block, a query block split over
# two tiles, Lq and Lk off every grid, block_k 32 (tiles of two unrelated blocks) and 128
# (two tiles per block), long runs of keys (the running max moves across tiles).
TILE_SHAPES = [
    (1, 9, 9, 64, 0, 32, 32),
    (2, 40, 300, 128, 260, 32, 64),
    (4, 33, 77, 64, 44, 64, 128),
    (1, 100, 371, 128, 271, 128, 32),
    (4, 70, 200, 128, 130, 32, 128),
]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("shape", TILE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_prefill_tiles(rng, lib, shape, dtype):
    """The tensor-core kernel on awkward shapes into a poisoned strided out= view of a larger
    buffer; nothing outside the view is written."""
    group, lq, lk, d, qo, bq, bk = shape
    hkv = 2
    for kind in ["none", "random", "streaming"]:
        q, k, v = make_qkv(rng, 1, group * hkv, hkv, lq, lk, d, dtype)
        mask = make_mask(kind, rng, q, k, qo, bq, bk)
        big = cast(np.full((1, group * hkv, lq + 5, d), np.nan, np.float32), dtype)
        out = big[:, :, 3:3 + lq]  # row stride d, head stride (lq + 5) d
        for causal in (True, False):
            ref, ref_lse = A.attention_reference(q, k, v, mask, causal=causal, q_offset=qo)
            y, lse = attention(lib, q, k, v, mask, causal, qo, out=out, block_q=bq, block_k=bk)
            check(y, lse, ref, ref_lse, dtype, f"{kind} causal={causal}")
        assert np.isnan(np.asarray(big[:, :, :3], np.float32)).all(), "wrote outside out"
        assert np.isnan(np.asarray(big[:, :, 3 + lq:], np.float32)).all(), "wrote outside out"


# group, lq, lk, d, q_offset, block_q, block_k: short chunks against longer caches, the shapes
# whose prefill CTAs split their key lists; 5 x 4 = 20 packed rows (just past decode), a chunk
# with two query blocks, rows that see no key (q_offset 0, masks without early blocks).
SPLIT_SHAPES = [(4, 5, 700, 128, 695, 64, 64), (2, 40, 1000, 64, 960, 64, 32), (8, 70, 900, 128, 830, 64, 128),
                (1, 100, 700, 64, 0, 64, 64)]


@pytest.mark.parametrize("shape", SPLIT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_prefill_splits(rng, lib, shape):
    """Split-KV on the tensor-core prefill: automatic, 1, 3 and 11 key ranges per CTA (more
    than some CTAs have tiles: empty ranges), and workspaces too small for the splits asked
    (none: one range; room for two), into poisoned outputs and lse; the workspace asked for
    is whole splits of [B, Hkv, G * Lq] x (D + 1) floats."""
    group, lq, lk, d, qo, bq, bk = shape
    b, hkv = 2, 2
    dtype = "bfloat16" if d == 128 else "float16"
    q, k, v = make_qkv(rng, b, group * hkv, hkv, lq, lk, d, dtype)
    dims = _dims(q, k)
    assert lib.bs_attention_is_decode(dims.ctypes.data, bq) == 0
    per_split = b * hkv * group * lq * (d + 1) * 4
    for kind in ["none", "random"]:
        mask = make_mask(kind, rng, q, k, qo, bq, bk)
        for causal in (True, False):
            ref, ref_lse = A.attention_reference(q, k, v, mask, causal=causal, q_offset=qo)
            for splits, ws in [(0, None), (1, None), (3, None), (11, None), (11, 0), (11, 2 * per_split + 7)]:
                if ws is None and splits > 1:
                    assert lib.bs_attention_workspace(DTYPE_CODE[dtype], dims.ctypes.data, bq, bk, splits,
                                                      NUM_SMS) == splits * per_split
                out, lse = attention(lib, q, k, v, mask, causal, qo, kv_splits=splits, ws_bytes=ws, block_q=bq,
                                     block_k=bk)
                check(out, lse, ref, ref_lse, dtype, f"{kind} causal {causal} splits {splits} ws {ws}")


def test_prefill_split_plan(lib):
    """Which prefill shapes split on their own: a short chunk over a long cache on a big GPU
    does, a long prefill (enough CTAs) or a short cache (under four tiles per split) does not,
    and float32 (the SIMT kernel, one range) never asks for a workspace."""
    def ws(dtype, b, hq, hkv, lq, lk, sms=132):
        dims = np.array([b, hq, hkv, lq, lk, 128], np.int64)
        return lib.bs_attention_workspace(DTYPE_CODE[dtype], dims.ctypes.data, 64, 64, 0, sms)

    chunk = ws("bfloat16", 1, 32, 8, 64, 32768)  # 32 CTAs of 64 packed rows: 9 ranges fill 2 per SM
    assert chunk == 9 * 8 * (4 * 64) * 129 * 4
    assert ws("bfloat16", 1, 32, 8, 8192, 8192) == 0   # 1024 CTAs
    assert ws("bfloat16", 1, 32, 8, 64, 200) == 0      # 4 tiles of keys: no split
    assert ws("float32", 1, 32, 8, 64, 32768) == 0


def test_running_max_moves(rng, lib):
    """Scores that grow along the keys by far more than float can exponentiate: the running
    max moves tile after tile and everything accumulated is rescaled each time."""
    lq, lk, d = 40, 600, 64
    u = rng.standard_normal(d).astype(np.float32)
    for dtype in ("bfloat16", "float32"):
        q = cast(u + 0.1 * rng.standard_normal((1, 4, lq, d)).astype(np.float32), dtype)
        grow = np.linspace(0.2, 6.0, lk, dtype=np.float32)[:, None]
        k = cast(grow * u + rng.standard_normal((1, 2, lk, d)).astype(np.float32), dtype)
        v = cast(rng.standard_normal((1, 2, lk, d)).astype(np.float32), dtype)
        ref, ref_lse = A.attention_reference(q, k, v, None, causal=False, scale=0.5)
        out, lse = attention(lib, q, k, v, None, False, 0, scale=0.5)
        assert rel_err(out, ref) <= ATTN_TOL[dtype], dtype
        assert np.max(np.abs(lse - ref_lse)) <= 1e-4 * max(1.0, np.max(np.abs(ref_lse))), dtype


def _base_rounding(score: float, scale: float) -> float:
    """How far the kernels' base-2 max, float32(score * float32(scale * log2 e)), lies from the
    exact product, in units in the last place of the base."""
    c = np.float32(np.float32(scale) * np.float32(1.4426950408889634))
    base = np.float32(np.float32(score) * c)
    return abs(float(score) * float(c) - float(base)) / float(np.spacing(base))


def test_max_set_early_and_kept(rng, lib, decode_kernel):
    """One key scores far above all others (the running max is set on its tile and never
    moves) over 64 tiles of keys: every later tile's rescale must be exactly 1, or the sum and
    the lse drift by the base-2 max's rounding once per tile. The scale is picked so that this
    rounding is at least 0.4 units in the last place: a drifting kernel misses the lse by over
    0.4 * 62 ulp (~2e-3 here), a correct one stays within float32's reach of the value (~1200)."""
    lk, d = 4096, 64
    q = np.zeros((1, 8, 1, d), np.float32)
    q[..., 0] = 40.0
    k = rng.standard_normal((1, 2, lk, d)).astype(np.float32)
    k[..., 0] *= 0.5   # other keys score 40 * N(0, 0.25): far below key 3, whose score is 1200
    k[:, :, 3] = 0.0
    k[:, :, 3, 0] = 30.0
    q, k = cast(q, "bfloat16"), cast(k, "bfloat16")
    v = cast(rng.standard_normal((1, 2, lk, d)).astype(np.float32), "bfloat16")
    scale = max((1.0 + i / 64 for i in range(64)), key=lambda sc: _base_rounding(1200.0, sc))
    assert _base_rounding(1200.0, scale) >= 0.4
    ref, ref_lse = A.attention_reference(q, k, v, None, causal=True, scale=scale, q_offset=lk - 1)
    out, lse = attention(lib, q, k, v, None, True, lk - 1, scale=scale, kv_splits=1)
    check(out, None, ref, None, "bfloat16", f"scale {scale}")
    err = np.max(np.abs(lse - ref_lse))
    assert err <= 1e-4 + 4e-7 * np.max(np.abs(ref_lse)), (scale, err)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_negative_and_zero_scales(rng, lib, dtype):
    """The tensor-core kernel keeps its running max on raw scores and folds the scale into
    the exponent (flipping Q's signs for a negative scale): a negative scale must still take
    the max of the scaled scores, and a zero scale give uniform weights over the visible
    keys with masked ones still excluded. float32 covers the SIMT kernel the same way."""
    lq, lk, d, qo = 70, 300, 128, 230
    q, k, v = make_qkv(rng, 1, 4, 2, lq, lk, d, dtype)
    mask = make_mask("random", rng, q, k, qo, 64, 64)
    for scale in (-0.3, -1e-3, 0.0):
        for causal in (True, False):
            ref, ref_lse = A.attention_reference(q, k, v, mask, causal=causal, scale=scale, q_offset=qo)
            out, lse = attention(lib, q, k, v, mask, causal, qo, scale=scale)
            check(out, lse, ref, ref_lse, dtype, f"scale {scale} causal={causal}")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("d", [64, 128])
def test_strided_cache_views(rng, lib, dtype, d):
    """k and v narrow views of a larger KV cache (capacity > Lk), q with heads interleaved
    along the rows ([B, L, H, D] memory), lse off; prefill and decode."""
    b, hq, hkv, cap = 1, 4, 2, 200
    for lq, lk, qo in [(40, 150, 110), (1, 150, 149), (3, 97, 94)]:
        q = cast(rng.standard_normal((b, lq, hq, d)).astype(np.float32), dtype).transpose(0, 2, 1, 3)
        kc = cast(rng.standard_normal((b, hkv, cap, d)).astype(np.float32), dtype)
        vc = cast(rng.standard_normal((b, hkv, cap, d)).astype(np.float32), dtype)
        k, v = kc[:, :, :lk], vc[:, :, :lk]
        ref, ref_lse = A.attention_reference(q, k, v, None, causal=True, q_offset=qo)
        out, _ = attention(lib, q, k, v, None, True, qo, with_lse=False)
        check(out, None, ref, ref_lse, dtype, f"lq={lq}")


DECODE_ROWS = [(1, 1), (2, 3), (4, 1), (4, 2), (8, 1), (4, 4), (2, 7)]  # (GQA group, Lq): rows 1 .. 16


@pytest.mark.parametrize("d", [64, 128])
def test_decode_splits(rng, lib, d, decode_kernel):
    """The split-KV path for every row count it takes (one and two row groups): no mask, a
    subset of blocks, rows that see no key (and a kv head with no block at all); automatic,
    1, 3 and 13 splits (more than there are blocks), and workspaces too small for the splits
    asked (none at all, room for two)."""
    b, hkv = 2, 2
    for i, (group, lq) in enumerate(DECODE_ROWS):
        dtype = ["bfloat16", "float16", "float32"][i % 3]
        kind = ["none", "subset", "unseen"][i % 3]
        lk, bk = [(301, 32), (333, 64), (97, 128)][i % 3] if kind != "unseen" else (333, 32)
        q, k, v = make_qkv(rng, b, hkv * group, hkv, lq, lk, d, dtype)
        mask, qo = decode_case(rng, kind, b, hkv, lq, lk, bk, lk - lq)
        assert lib.bs_attention_is_decode(_dims(q, k).ctypes.data, 64) == 1
        dims = _dims(q, k)
        per_split = b * hkv * group * lq * (d + 1) * 4
        for causal in (True, False):
            ref, ref_lse = A.attention_reference(q, k, v, mask, causal=causal, q_offset=qo)
            for splits, ws in [(0, None), (1, None), (3, None), (13, None), (13, 0), (13, 2 * per_split + 7)]:
                if ws is None and splits > 1:
                    assert lib.bs_attention_workspace(DTYPE_CODE[dtype], dims.ctypes.data, 64, bk, splits,
                                                      NUM_SMS) == splits * per_split
                out, lse = attention(lib, q, k, v, mask, causal, qo, kv_splits=splits, ws_bytes=ws, block_q=64,
                                     block_k=bk)
                what = f"{dtype} group {group} lq {lq} {kind} causal {causal} splits {splits} ws {ws}"
                check(out, lse, ref, ref_lse, dtype, what)
                if kind == "unseen" and causal:
                    assert np.all(np.asarray(out[:, :, :4], np.float32) == 0), what


def test_decode_page_selection(rng, lib, decode_kernel):
    """Quest-style pages chosen from the key summaries (one query block, Lq = 1, GQA 4, as
    Qwen3-8B decodes) drive the split-KV kernel; automatic splits on a larger GPU."""
    b, hq, hkv, lk, d = 1, 8, 2, 700, 128
    q, k, v = make_qkv(rng, b, hq, hkv, 1, lk, d, "bfloat16")
    summary = A.KeyBlockSummary.from_keys(k, block_k=64)
    mask = A.select_pages(q, summary, budget=4, sinks=1)
    ref, ref_lse = A.attention_reference(q, k, v, mask, causal=True, q_offset=lk - 1)
    out, lse = attention(lib, q, k, v, mask, True, lk - 1, num_sms=16, block_q=mask.block_q, block_k=64)
    check(out, lse, ref, ref_lse, "bfloat16", "pages")


def test_rows_without_keys(rng, lib):
    """Query blocks whose mask lists nothing, and causal rows before every listed key: output
    0 and lse -inf, never NaN, in the tile kernel, the SIMT kernel and decode."""
    for dtype in ("bfloat16", "float32"):
        q, k, v = make_qkv(rng, 1, 4, 2, 96, 256, 64, dtype)
        table = np.zeros((1, 2, 3, 4), bool)
        table[:, :, 0, 3] = True   # only a block after every row of query block 0 (causal)
        table[:, 1, 2, :2] = True  # query block 1: nothing; block 2 of kv head 1: two blocks
        mask = A.BlockMask.from_block_table(table, 32, 64, 96, 256)
        out, lse = attention(lib, q, k, v, mask, True, 0, block_q=32, block_k=64)
        y = np.asarray(out, np.float32)
        assert np.all(y[:, :, :64] == 0) and np.all(np.isneginf(lse[:, :, :64])), dtype
        assert np.all(y[:, :2, 64:] == 0) and np.all(np.isneginf(lse[:, :2, 64:])), dtype
        ref, ref_lse = A.attention_reference(q, k, v, mask, causal=True)
        check(out, lse, ref, ref_lse, dtype, dtype)
        assert np.any(y[:, 2:, 64:] != 0)
        # decode: a mask row with no block at all, split or not
        qd = q[:, :, :1].copy()
        empty = A.BlockMask.from_block_table(np.zeros((1, 2, 1, 4), bool), 64, 64, 1, 256)
        for splits in (1, 3):
            out, lse = attention(lib, qd, k, v, empty, True, 255, kv_splits=splits)
            assert np.all(np.asarray(out, np.float32) == 0) and np.all(np.isneginf(lse)), (dtype, splits)


def test_unaligned_rows(rng, lib):
    """16-bit q, k, v, out whose rows are not 16-byte aligned (views starting one element
    into a buffer) cannot use cp.async or vector loads: the SIMT kernel runs them."""
    b, hq, hkv, lq, lk, d = 1, 4, 2, 40, 90, 64

    def shifted(shape, fill=None):
        n = int(np.prod(shape))
        buf = cast(rng.standard_normal(n + 1).astype(np.float32) if fill is None else np.full(n + 1, fill, np.float32),
                   "bfloat16")
        return buf[1:].reshape(shape)

    q, k, v = shifted((b, hq, lq, d)), shifted((b, hkv, lk, d)), shifted((b, hkv, lk, d))
    out = shifted((b, hq, lq, d), np.nan)
    assert q.ctypes.data % 16 != 0
    for lq_run, qo in ((lq, 50), (1, 89)):
        qq, oo = q[:, :, :lq_run], out[:, :, :lq_run]
        ref, ref_lse = A.attention_reference(qq, k, v, None, causal=True, q_offset=qo)
        y, lse = attention(lib, qq, k, v, None, True, qo, out=oo, kv_splits=2)
        check(y, lse, ref, ref_lse, "bfloat16", f"lq={lq_run}")


def test_threads_mode(rng, lib):
    """One OS thread per GPU thread (real concurrency between barriers) on a tile-kernel,
    a SIMT and a split decode case: the results still match."""
    emulator.set_threads_mode(lib, True)
    try:
        for dtype, lq, splits in (("bfloat16", 40, 0), ("float32", 20, 0), ("float16", 2, 3)):
            q, k, v = make_qkv(rng, 1, 4, 2, lq, 70, 64, dtype)
            ref, ref_lse = A.attention_reference(q, k, v, None, causal=True, q_offset=30)
            out, lse = attention(lib, q, k, v, None, True, 30, kv_splits=splits)
            check(out, lse, ref, ref_lse, dtype, f"threads {dtype} lq={lq}")
    finally:
        emulator.set_threads_mode(lib, False)


def test_rejects_what_it_cannot_run(rng, lib):
    """Arguments the ops glue validates still fail cleanly here (cudaErrorInvalidValue)."""
    q, k, v = make_qkv(rng, 1, 2, 1, 8, 8, 64)
    with pytest.raises(AssertionError, match="cudaError 1"):
        attention(lib, q, k, v, block_q=48)
    q96, k96, v96 = make_qkv(rng, 1, 2, 1, 8, 8, 96)
    with pytest.raises(AssertionError, match="cudaError 1"):
        attention(lib, q96, k96, v96)


def garbage_cases():
    """(name, q, k, v, indptr, indices, block_q, block_k, q_offset): masks the ops glue could
    not validate on a GPU. Arrays are exact-size allocations, so AddressSanitizer sees any
    read past them."""
    rng = np.random.default_rng(1)
    cases = []
    for dtype in ("bfloat16", "float32"):
        for lq in (64, 2):  # prefill (tile or SIMT kernel) and decode
            q, k, v = make_qkv(rng, 1, 4, 2, lq, 130, 64, dtype)
            nqb = -(-lq // 32)
            # key blocks out of range both ways, huge, unsorted, duplicated; indptr negative,
            # decreasing, past the capacity.
            indices = np.array([[[7, -3, 1, 99999, 0], [2, 2, 0, -2147483647, 2147483647]]], np.int32)
            rows = [[0, 5, 9][:nqb + 1], [-4, 2, 1][:nqb + 1]]
            indptr = np.array([rows], np.int32)
            cases.append((f"{dtype} lq={lq}", q, k, v, indptr, indices, 32, 32, 128 - lq))
            # indptr far past the capacity with a zero-capacity row
            indptr2 = np.array([[[0, 1 << 30, 1 << 30][:nqb + 1], [1 << 30, 0, -1][:nqb + 1]]], np.int32)
            cases.append((f"{dtype} lq={lq} cap 0", q, k, v, indptr2, np.zeros((1, 2, 0), np.int32), 32, 64,
                          128 - lq))
    return cases


def check_garbage_masks(lib):
    """Every garbage case runs without an error and gives finite outputs (values undefined)."""
    for name, q, k, v, indptr, indices, bq, bk, qo in garbage_cases():
        for causal in (True, False):
            for splits in (0, 3):
                out, lse = attention(lib, q, k, v, causal=causal, q_offset=qo, kv_splits=splits,
                                     raw_mask=(indptr, indices, bq, bk))
                assert np.isfinite(np.asarray(out, np.float32)).all(), name
                assert not np.isnan(lse).any(), name


def test_garbage_masks(lib):
    check_garbage_masks(lib)


def test_garbage_masks_under_asan(tmp_path_factory):
    """The garbage masks on an AddressSanitizer + UBSan build (in a subprocess with the runtime
    preloaded): not one byte read or written outside q, k, v, out, lse, the mask and the
    workspace."""
    flags, _ = emulator.SANITIZERS["address"]
    env = emulator.sanitizer_env("address")
    if env is None:
        pytest.skip("libasan is not installed")
    # -O1: a third of -O2's build time, and these cases are small.
    path = emulator.build_library("attention_asan", SOURCE, tmp_path_factory.mktemp("cuda_attention_asan"),
                                  (*flags, "-O1"))
    script = (f"import ctypes, sys; sys.path.insert(0, {str(HERE)!r}); import test_cuda_attention as t; "
              f"t.check_garbage_masks(t._load(ctypes.CDLL({str(path)!r}))); print('OK')")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600,
                       cwd=str(HERE.parent))
    if "unexpected memory mapping" in r.stderr:
        pytest.skip("libasan cannot run on this kernel's memory layout")
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "OK" in r.stdout, out[-6000:]
    for report in ("AddressSanitizer", "runtime error:"):
        assert report not in out, out[-6000:]


def test_workspace_and_paths(lib):
    """Workspace only for split decode; which shapes take the decode path."""
    def dims(b, hq, hkv, lq, lk, d=128):
        return np.array([b, hq, hkv, lq, lk, d], np.int64)

    decode = dims(1, 32, 8, 1, 4096)  # Qwen3-8B decode: 8 kv heads, GQA 4
    ws = lib.bs_attention_workspace(1, decode.ctypes.data, 64, 64, 0, 132)
    assert ws > 0 and ws % (8 * 4 * 129 * 4) == 0  # whole splits of [B, Hkv, rows, D + 1] floats
    # Automatic splits: two CTAs per SM over the 8 (b, kv head) pairs, 33 ranges; the tile
    # kernel keeps at least two 64-key tiles per range (32 of them at 4096 keys).
    for on, splits in ((1, 32), (0, 33)):
        lib.bs_set_decode_tensor_cores(on)
        try:
            assert lib.bs_attention_workspace(1, decode.ctypes.data, 64, 64, 0, 132) == splits * 8 * 4 * 129 * 4
        finally:
            lib.bs_set_decode_tensor_cores(-1)
    assert lib.bs_attention_workspace(1, decode.ctypes.data, 64, 64, 1, 132) == 0  # one split: none
    assert lib.bs_attention_workspace(1, decode.ctypes.data, 64, 64, 5, 132) == 5 * 8 * 4 * 129 * 4
    prefill = dims(1, 32, 8, 300, 300)
    assert lib.bs_attention_workspace(1, prefill.ctypes.data, 64, 64, 0, 132) == 0
    assert lib.bs_attention_is_decode(decode.ctypes.data, 64) == 1
    assert lib.bs_attention_is_decode(dims(1, 32, 8, 4, 4096).ctypes.data, 64) == 1   # 16 rows
    assert lib.bs_attention_is_decode(dims(1, 32, 8, 5, 4096).ctypes.data, 64) == 0   # 20 rows: tiles
    assert lib.bs_attention_is_decode(prefill.ctypes.data, 64) == 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("lq", [1, 40])
def test_q_offsets_from_memory(rng, lib, dtype, lq):
    """q_offsets (a CUDA-graph decode step's positions, read by the kernels): each batch row
    gets the result of a call with its own q_offset, on the decode path (lq 1) and the prefill
    path (lq 40), over a whole-capacity KV cache whose rows past the position are garbage."""
    b, hq, hkv, cap, d = 3, 8, 2, 260, 128
    q, k, v = make_qkv(rng, b, hq, hkv, lq, cap, d, dtype)
    offs = np.array([0, 97, cap - lq], np.int32)
    out, _ = attention(lib, q, k, v, None, True, 0, q_offsets=offs)
    for i in range(b):
        sl = slice(i, i + 1)
        ref, _ = A.attention_reference(q[sl], k[sl], v[sl], None, causal=True, q_offset=int(offs[i]))
        check(out[sl], None, ref, None, dtype, f"batch row {i} at {offs[i]}")
