"""The CUDA page-selection kernel (cuda/page_select.cuh) on the CPU, under cuda_emulation.h,
against the oracle of tests/pages_oracle.py (the contract of csrc/cpu/kernels.h
PageSelectArgs): the fold of the step's key into its block's kmin / kmax bit for bit, and a
top-n that float32 rounding allows (the exact one wherever the scores are clearly apart).

Covered: float32 / bfloat16 / float16, head dims 64 and 128, GQA groups 1 to 16 (one and two
passes of the kernel's 16-head accumulators), block_k 32 / 64 / 128, capacities off the block
grid, key-block counts below and above the CTA's 256 threads, n from 1 to every block,
sinks 0 to past the position, positions at a block's first key, at 0 and at the last slot,
per-row positions, out-of-range positions (clamped), all-equal scores (ties to the lower
block) and NaN queries (NaN bounds rank with -inf), strided q and k views, outputs poisoned.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import cuda_emulator as emulator  # noqa: E402
import pages_oracle as oracle  # noqa: E402
from conftest import cast  # noqa: E402

pytestmark = pytest.mark.skipif(not emulator.available(),
                                reason="the CUDA emulation needs Linux and g++ (fiber switch, ELF, glibc)")

SOURCE = r'''
#include "cuda_emulation.h"
#include "page_select.cuh"

// dims: b, hq, hkv, capacity, d, nkb, n; strides: q (batch, head), k (batch, head, row).
extern "C" int bs_select_pages(const void* q, const void* k, float* kmin, float* kmax, int32_t* indices,
                               const int32_t* positions, int dtype, const int64_t* dims, const int64_t* strides,
                               int block_k, int sinks) {
  bitswitch::cuda::PageSelectParams p{};
  p.q = q;
  p.k = k;
  p.kmin = kmin;
  p.kmax = kmax;
  p.indices = indices;
  p.positions = positions;
  p.dtype = bitswitch::cuda::DType(dtype);
  p.b = dims[0]; p.hq = dims[1]; p.hkv = dims[2]; p.capacity = dims[3]; p.d = dims[4]; p.nkb = dims[5];
  p.n = dims[6];
  p.q_strides[0] = strides[0];
  p.q_strides[1] = strides[1];
  for (int i = 0; i < 3; ++i) p.k_strides[i] = strides[2 + i];
  p.block_k = block_k;
  p.sinks = sinks;
  return int(bitswitch::cuda::select_pages(p, nullptr));
}
'''

DTYPE_CODE = {"float32": 0, "bfloat16": 1, "float16": 2}


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return _load(emulator.build("page_select", SOURCE, tmp_path_factory.mktemp("cuda_pages")))


def _load(lib):
    p = ctypes.c_void_p
    lib.bs_select_pages.argtypes = [p, p, p, p, p, p, ctypes.c_int, p, p, ctypes.c_int, ctypes.c_int]
    lib.bs_select_pages.restype = ctypes.c_int
    return lib


def run(lib, q, k, kmin, kmax, positions, n, sinks, block_k):
    """Launches the kernel on numpy arrays (q, k any strides with a unit stride on D); kmin /
    kmax are updated in place; returns indices (poisoned with -7 first)."""
    b, hq, _, d = q.shape
    hkv, cap = k.shape[1], k.shape[2]
    nkb = kmin.shape[2]
    indices = np.full((b, hkv, n), -7, np.int32)
    positions = np.ascontiguousarray(positions, np.int32)
    dims = np.array([b, hq, hkv, cap, d, nkb, n], np.int64)
    strides = np.array([s // q.itemsize for s in q.strides[:2]] + [s // k.itemsize for s in k.strides[:3]], np.int64)
    rc = lib.bs_select_pages(q.ctypes.data, k.ctypes.data, kmin.ctypes.data, kmax.ctypes.data, indices.ctypes.data,
                             positions.ctypes.data, DTYPE_CODE[str(q.dtype)], dims.ctypes.data, strides.ctypes.data,
                             block_k, sinks)
    assert rc == 0, f"cudaError {rc}: {emulator.last_error(lib)}"
    return indices


def case(rng, b, hq, hkv, cap, d, dtype, block_k, positions):
    """q, k (dtype), summaries of keys [0, positions[b]) per batch row (blocks past them poisoned
    with NaN: the kernel must not read them)."""
    q = cast(rng.standard_normal((b, hq, 1, d)).astype(np.float32), dtype)
    k = cast(rng.standard_normal((b, hkv, cap, d)).astype(np.float32), dtype)
    nkb = -(-cap // block_k)
    kmin = np.full((b, hkv, nkb, d), np.nan, np.float32)
    kmax = np.full((b, hkv, nkb, d), np.nan, np.float32)
    for bi, pos in enumerate(positions):
        lo, hi = oracle.summaries(k[bi:bi + 1], int(pos), block_k, nkb)
        full = -(-int(pos) // block_k)
        kmin[bi, :, :full], kmax[bi, :, :full] = lo[0, :, :full], hi[0, :, :full]
    return q, k, kmin, kmax


def check_call(lib, q, k, kmin, kmax, positions, n, sinks, block_k, what):
    want_min, want_max = oracle.fold(k, kmin, kmax, np.minimum(positions, k.shape[2] - 1), block_k)
    indices = run(lib, q, k, kmin, kmax, positions, n, sinks, block_k)
    np.testing.assert_array_equal(kmin, want_min, err_msg=f"{what}: kmin after the fold")
    np.testing.assert_array_equal(kmax, want_max, err_msg=f"{what}: kmax after the fold")
    score = oracle.scores(q, kmin, kmax, np.minimum(positions, k.shape[2] - 1), sinks, block_k)
    oracle.check(indices, score, n, what=what)
    return indices, score


SHAPES = [  # b, hq, hkv, capacity, d, block_k
    (1, 4, 4, 1000, 128, 64),    # G 1, 16 blocks
    (2, 8, 2, 4100, 128, 64),    # G 4, 65 blocks (capacity off the grid)
    (1, 16, 1, 2048, 128, 32),   # G 16, 64 blocks of 32
    (1, 24, 1, 5000, 64, 128),   # G 24: two accumulator passes; D 64
    (1, 2, 1, 20000, 64, 64),    # 313 blocks: more blocks than threads
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_matches_oracle(rng, lib, shape, dtype):
    b, hq, hkv, cap, d, bk = shape
    nkb = -(-cap // bk)
    positions = rng.integers(bk, cap, size=b)
    positions[0] = (positions[0] // bk) * bk  # one row at a block's first key (the fold restarts)
    q, k, kmin, kmax = case(rng, b, hq, hkv, cap, d, dtype, bk, positions)
    for n, sinks in ((1, 0), (5, 1), (min(nkb, 40), 4), (nkb, 1)):
        check_call(lib, q, k, kmin.copy(), kmax.copy(), positions, n, sinks, bk, f"{shape} {dtype} n={n} sinks={sinks}")


def test_edges(rng, lib):
    """Position 0, the last slot, past the capacity (clamped), sinks past the position, n larger
    than the visible blocks (the tail is the blocks after the position, lowest first)."""
    cap, bk = 640, 64
    for positions, n, sinks in (([0], 3, 1), ([cap - 1], 4, 2), ([cap + 50], 4, 1), ([130], 10, 1),
                                ([200], 6, 9), ([70], 1, 0)):
        q, k, kmin, kmax = case(rng, 1, 4, 2, cap, 128, "bfloat16", bk, np.minimum(positions, cap - 1))
        idx, _ = check_call(lib, q, k, kmin, kmax, np.array(positions), n, sinks, bk, f"{positions} n={n}")
        last = min(positions[0], cap - 1) // bk
        assert last in idx[0, 0] or n < min(sinks, last + 1) + 1


def test_ties_and_nan(rng, lib):
    """q = 0 makes every bound 0: ties go to the lower blocks. A NaN query makes every bound NaN,
    ranked with -inf: only the forced blocks (sinks, the position's) and then the lowest."""
    cap, bk = 1024, 64
    pos = np.array([900])
    q, k, kmin, kmax = case(rng, 1, 4, 1, cap, 128, "float32", bk, pos)
    q[:] = 0
    idx = run(lib, q, k, kmin.copy(), kmax.copy(), pos, 5, 1, bk)
    assert idx[0, 0].tolist() == [0, 1, 2, 3, 14]
    q[:] = np.nan
    idx = run(lib, q, k, kmin.copy(), kmax.copy(), pos, 5, 2, bk)
    assert idx[0, 0].tolist() == [0, 1, 2, 3, 14]


def test_strided_views(rng, lib):
    """q as the model passes it (a slice of a transposed projection) and k as a slice of a larger
    cache along the head and row dimensions."""
    b, hq, hkv, d, bk = 2, 8, 2, 128, 64
    big = cast(rng.standard_normal((b, 1, hq + 4, d)).astype(np.float32), "bfloat16")
    q = big.transpose(0, 2, 1, 3)[:, :hq]
    kbig = cast(rng.standard_normal((b, hkv + 1, 1500, d)).astype(np.float32), "bfloat16")
    k = kbig[:, 1:, :1200]
    positions = np.array([1100, 777])
    _, _, kmin, kmax = case(rng, b, hq, hkv, 1200, d, "bfloat16", bk, positions)
    for bi, pos in enumerate(positions):  # summaries of the view's keys
        lo, hi = oracle.summaries(np.ascontiguousarray(k[bi:bi + 1]), int(pos), bk, kmin.shape[2])
        full = -(-int(pos) // bk)
        kmin[bi, :, :full], kmax[bi, :, :full] = lo[0, :, :full], hi[0, :, :full]
    check_call(lib, q, k, kmin, kmax, positions, 7, 1, bk, "strided")


def test_decode_sequence(rng, lib):
    """Steps at consecutive positions across block boundaries: each fold keeps the summaries
    equal to the oracle's from scratch, and every step's pages are a valid top-n."""
    b, hq, hkv, cap, d, bk = 1, 4, 2, 700, 64, 32
    q0, k, kmin, kmax = case(rng, b, hq, hkv, cap, d, "float16", bk, [300])
    for pos in range(300, 300 + 70):
        q = cast(rng.standard_normal(q0.shape).astype(np.float32), "float16")
        idx, _ = check_call(lib, q, k, kmin, kmax, np.array([pos]), 6, 1, bk, f"step {pos}")
        lo, hi = oracle.summaries(k, pos + 1, bk, kmin.shape[2])
        full = pos // bk + 1
        np.testing.assert_array_equal(kmin[:, :, :full], lo[:, :, :full])
        np.testing.assert_array_equal(kmax[:, :, :full], hi[:, :, :full])


def test_rejects_what_it_cannot_run(rng, lib):
    """The launcher's own checks (the ops glue checks first, with messages): n out of range,
    too many blocks or query heads for shared memory, a head_dim or block size it has no code for."""
    q, k, kmin, kmax = case(rng, 1, 4, 1, 640, 128, "bfloat16", 64, [100])
    positions = np.array([100], np.int32)
    dims_ok = [1, 4, 1, 640, 128, 10, 3]
    strides = np.array([s // 2 for s in q.strides[:2]] + [s // 2 for s in k.strides[:3]], np.int64)
    out = np.zeros((1, 1, 16), np.int32)
    for change in ({6: 0}, {6: 11}, {5: 9000}, {1: 64}, {4: 96}):
        dims = list(dims_ok)
        for i, v in change.items():
            dims[i] = v
        dims = np.array(dims, np.int64)
        rc = lib.bs_select_pages(q.ctypes.data, k.ctypes.data, kmin.ctypes.data, kmax.ctypes.data, out.ctypes.data,
                                 positions.ctypes.data, 1, dims.ctypes.data, strides.ctypes.data, 64, 1)
        assert rc != 0, change
    dims = np.array(dims_ok, np.int64)
    rc = lib.bs_select_pages(q.ctypes.data, k.ctypes.data, kmin.ctypes.data, kmax.ctypes.data, out.ctypes.data,
                             positions.ctypes.data, 1, dims.ctypes.data, strides.ctypes.data, 48, 1)
    assert rc != 0


def check_small(lib):
    """A few small selections (more key blocks than threads in one, GQA 4, ties), for the
    threads-mode runs."""
    rng = np.random.default_rng(7)
    for b, hq, hkv, cap, d, bk, dtype in ((1, 8, 2, 640, 64, 32, "bfloat16"), (1, 4, 1, 20000, 64, 64, "float32")):
        positions = rng.integers(bk, cap, size=b)
        q, k, kmin, kmax = case(rng, b, hq, hkv, cap, d, dtype, bk, positions)
        check_call(lib, q, k, kmin, kmax, positions, 7, 1, bk, f"threads {cap}")


def test_threads_mode(lib):
    """One OS thread per GPU thread (real concurrency between the barriers)."""
    emulator.set_threads_mode(lib, True)
    try:
        check_small(lib)
    finally:
        emulator.set_threads_mode(lib, False)


def test_threads_mode_under_tsan(tmp_path_factory):
    """The same under ThreadSanitizer: the kernel's shared-memory reductions, scans and
    threshold search are free of data races."""
    flags, _ = emulator.SANITIZERS["thread"]
    path = emulator.build_library("page_select_tsan", SOURCE, tmp_path_factory.mktemp("cuda_pages_tsan"), flags)
    emulator.run_sanitized("thread", path, "test_cuda_page_select", "m.check_small(m._load(lib))")
