"""The CUDA qmatmul kernels (cuda/qmatmul.cuh) on the CPU: the instance files
qmatmul_{f32,bf16,f16}.cu compiled by g++ under cuda_emulation.h and launched through
bitswitch::cuda::qmatmul, against float64 dequantize-then-matmul (bitswitch.quant), as
tests/test_qmatmul.py checks the CPU kernels.

Covered: both views, group sizes 32 / 64 / 128, x float32 / bfloat16 / float16, every scale
dtype, negative scales (MLX's quantizer makes them), M on both sides of every switch of the
plan (16-bit x: the tensor-core GEMV for M <= 64 in tiles of 8, 16 and 32 rows, the
tensor-core GEMM's 128-row tiles above; and with BITSWITCH_CUDA_SMALL_M=simt's choice, the
FFMA GEMV for M <= 2 and the GEMM's 16-, 32- and 64-row tiles up to 64) and past
one GEMV launch tile for float32 x, N and K off every tile (N = 1, 7, 200, 300; K = 96 to
2304), split-K on (num_sms large enough to want it), off (no workspace), and narrowed (a
workspace smaller than asked for), with the plan's path, tile and split count asserted, x rows
that are not 16-byte aligned, outputs and workspace poisoned with NaN first and a guard zone
after y that must stay untouched.

What this cannot check is nvcc's code and the GPU itself (the real mma summation order,
timing, occupancy, shared-memory bank conflicts, register spills).
"""

from __future__ import annotations

import ctypes
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # tests/: conftest helpers
import cuda_emulator as emulator  # noqa: E402  (tests/cuda/cuda_emulator.py)

import bitswitch as bs  # noqa: E402
from conftest import cast, rel_err  # noqa: E402

pytestmark = pytest.mark.skipif(not emulator.available(),
                                reason="the CUDA emulation needs Linux and g++ (fiber switch, ELF, glibc)")

# The three instance files, as the CUDA build compiles them, and thunks that pass raw pointers.
SOURCE = r'''
#include "cuda_emulation.h"
#include "qmatmul_f32.cu"
#include "qmatmul_bf16.cu"
#include "qmatmul_f16.cu"

using bitswitch::cuda::DType;
using bitswitch::cuda::QMatmulParams;

static QMatmulParams params(const void* x, void* y, const uint32_t* p0, const uint32_t* p1, const void* s,
                            const void* b, int64_t m, int64_t n, int64_t k, int group_size, int bits, int x_dtype,
                            int scale_dtype) {
  QMatmulParams p{};
  p.x = x; p.y = y; p.plane0 = p0; p.plane1 = p1; p.scales = s; p.biases = b;
  p.m = m; p.n = n; p.k = k;
  p.group_size = group_size;
  p.bits = bits;
  p.x_dtype = DType(x_dtype);
  p.scale_dtype = DType(scale_dtype);
  return p;
}

extern "C" int bs_qmatmul(const void* x, void* y, const uint32_t* p0, const uint32_t* p1, const void* s,
                          const void* b, int64_t m, int64_t n, int64_t k, int group_size, int bits, int x_dtype,
                          int scale_dtype, void* ws, uint64_t ws_bytes, int num_sms) {
  const QMatmulParams p = params(x, y, p0, p1, s, b, m, n, k, group_size, bits, x_dtype, scale_dtype);
  return int(bitswitch::cuda::qmatmul(p, ws, size_t(ws_bytes), num_sms, nullptr));
}

extern "C" int bs_dequantize(void* w, const uint32_t* p0, const uint32_t* p1, const void* s, const void* b,
                             int64_t n, int64_t k, int group_size, int bits, int w_dtype, int scale_dtype, int num_sms) {
  const QMatmulParams p = params(nullptr, w, p0, p1, s, b, 0, n, k, group_size, bits, w_dtype, scale_dtype);
  return int(bitswitch::cuda::dequantize(p, nullptr, 0, num_sms, nullptr));
}

// 1: 16-bit x with M <= 16 takes qmv_tc_kernel (the default); 0: BITSWITCH_CUDA_SMALL_M=simt's choice.
extern "C" void bs_set_small_m_tensor_cores(int on) { bitswitch::cuda::qmm::small_m_override() = on; }

extern "C" uint64_t bs_qmatmul_workspace(const void* x, int64_t m, int64_t n, int64_t k, int group_size, int bits,
                                         int x_dtype, int scale_dtype, int num_sms) {
  const QMatmulParams p = params(x, nullptr, nullptr, nullptr, nullptr, nullptr, m, n, k, group_size, bits,
                                 x_dtype, scale_dtype);
  return bitswitch::cuda::qmatmul_workspace_bytes(p, num_sms);
}

// The launch a call gets: path (0 GEMV, 1 tensor-core GEMM, 2 tensor-core GEMV) * 1000000 + rows of x per M tile
// * 1000 + K splits.
extern "C" int bs_qmatmul_plan(const void* x, int64_t m, int64_t n, int64_t k, int group_size, int bits, int x_dtype,
                               int num_sms, uint64_t ws_bytes) {
  const QMatmulParams p = params(x, nullptr, nullptr, nullptr, nullptr, nullptr, m, n, k, group_size, bits,
                                 x_dtype, 0);
  const auto pl = bitswitch::cuda::qmm::plan_qmatmul(p, num_sms, size_t(ws_bytes));
  return int(pl.path) * 1000000 + pl.mt * 1000 + pl.splits;
}
'''

DTYPE_CODE = {"float32": 0, "bfloat16": 1, "float16": 2}
GEMV, GEMM, GEMV_TC = 0, 1, 2
SUCCESS, INVALID_VALUE = 0, 1
# Against float64 on the same rounded inputs, relative to the largest output (as
# tests/metal/test_metal_kernels.py): float32 accumulation in another order, and for 16-bit
# x the rounding of y itself. The tensor-core paths multiply W dequantized to x's type, so their
# reference rounds W likewise: that rounding, not the kernel's, dominates where outputs cancel
# (|y| << |x| |w|, e.g. M = 3, N = 1). The tensor-core GEMV rounds each weight twice (its
# affine map is two packed FMAs and an add in x's type): up to one unit in the last place of W
# where the reference has half, so twice the tolerance.
QTOL = {"float32": 2e-5, "bfloat16": 8e-3, "float16": 1.5e-3}
QTOL_GEMV_TC = {"bfloat16": 1.6e-2, "float16": 3e-3}
GUARD = 64  # elements after y that no launch may write
# What plan_qmatmul chose: path (GEMV / GEMM), rows of x per M tile, K splits.
Plan = namedtuple("Plan", "path rows splits")


def decode_plan(code):
    path, rest = divmod(code, 1000000)
    return Plan(path, *divmod(rest, 1000))


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    lib = emulator.build("qmatmul", SOURCE, tmp_path_factory.mktemp("cuda_qmatmul"))
    p, i64, i32, u64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_uint64
    lib.bs_qmatmul.argtypes = [p, p, p, p, p, p, i64, i64, i64, i32, i32, i32, i32, p, u64, i32]
    lib.bs_qmatmul.restype = i32
    lib.bs_qmatmul_workspace.argtypes = [p, i64, i64, i64, i32, i32, i32, i32, i32]
    lib.bs_qmatmul_workspace.restype = u64
    lib.bs_qmatmul_plan.argtypes = [p, i64, i64, i64, i32, i32, i32, i32, u64]
    lib.bs_qmatmul_plan.restype = i32
    lib.bs_dequantize.argtypes = [p, p, p, p, p, i64, i64, i32, i32, i32, i32, i32]
    lib.bs_dequantize.restype = i32
    lib.bs_set_small_m_tensor_cores.argtypes = [i32]
    lib.bs_set_small_m_tensor_cores.restype = None
    return lib


@pytest.fixture
def simt_small_m(lib):
    """BITSWITCH_CUDA_SMALL_M=simt's plans for the test, the default after it."""
    lib.bs_set_small_m_tensor_cores(0)
    yield
    lib.bs_set_small_m_tensor_cores(-1)


def make_case(rng, m, n, k, group_size, sdtype, xdtype, misaligned=False):
    """A weight quantized with both planes (scales of either sign) and x [m, k] scaled by
    1/sqrt(k); `misaligned` puts x's first element 2 or 4 bytes past a 16-byte boundary."""
    w = (rng.standard_normal((n, k)) * rng.uniform(0.02, 2)).astype(np.float32)
    qw = bs.quantize(w, group_size=group_size, bits=8, scales_dtype=sdtype)
    x = cast((rng.standard_normal((m, k)) / np.sqrt(k)).astype(np.float32), xdtype)
    if misaligned:
        buf = np.zeros(m * k + 8, x.dtype)
        x2 = buf[1:1 + m * k].reshape(m, k)
        x2[...] = x
        assert x2.ctypes.data % 16 != 0
        x = x2
    return qw, x


def launch(lib, x, qw, bits, num_sms, ws="full"):
    """qmatmul(x, qw) through the emulated launcher: (rc, y, Plan). ws: "full" (the
    bytes qmatmul_workspace_bytes asks for), "none" (null) or "small" (one partial too few)."""
    m, k = x.shape
    n = qw.plane0.shape[0]
    xd, sd = DTYPE_CODE[str(x.dtype)], DTYPE_CODE[str(qw.scales.dtype)]
    xp = emulator.ptr(x)
    want = lib.bs_qmatmul_workspace(xp, m, n, k, qw.group_size, bits, xd, sd, num_sms)
    nbytes = {"full": want, "none": 0, "small": max(0, want - m * n * 4)}[ws]
    wsbuf = np.full(max(1, nbytes // 4), np.nan, np.float32)  # poisoned partials
    ybuf = np.full(m * n + GUARD, np.nan, np.float32).astype(x.dtype)
    p1 = qw.plane1 if bits == 8 else qw.plane0
    rc = lib.bs_qmatmul(xp, emulator.ptr(ybuf), emulator.ptr(qw.plane0), emulator.ptr(p1), emulator.ptr(qw.scales),
                        emulator.ptr(qw.biases), m, n, k, qw.group_size, bits, xd, sd,
                        emulator.ptr(wsbuf) if nbytes else None, nbytes, num_sms)
    plan = lib.bs_qmatmul_plan(xp, m, n, k, qw.group_size, bits, xd, num_sms, nbytes)
    assert np.isnan(ybuf[m * n:].astype(np.float32)).all(), "a launch wrote past the end of y"
    return rc, ybuf[:m * n].reshape(m, n), decode_plan(plan)


def check(lib, rng, m, n, k, gs, bits, xdtype, sdtype, num_sms, ws="full", misaligned=False):
    """Runs one case against float64; returns the Plan it took."""
    qw, x = make_case(rng, m, n, k, gs, sdtype, xdtype, misaligned)
    rc, y, plan = launch(lib, x, qw, bits, num_sms, ws)
    what = f"M={m} N={n} K={k} G={gs} bits={bits} x={xdtype} scales={sdtype} sms={num_sms} ws={ws} plan={plan}"
    assert rc == SUCCESS, f"{what}: cudaError {rc}: {emulator.last_error(lib)}"
    y = y.astype(np.float64)
    assert not np.isnan(y).any(), f"{what}: outputs left unwritten"
    w = bs.dequantize_f64(qw, bits)
    if plan.path in (GEMM, GEMV_TC):
        w = cast(w, xdtype).astype(np.float64)
    xd = np.asarray(x, np.float64)
    ref = xd @ w.T
    err = rel_err(y, ref)
    if plan.path == GEMV_TC:
        # Its second rounding of W adds per-weight errors whose sum grows with the products'
        # root-sum-square, not with |y|: where a row cancels (N = 1) the largest output can be
        # far below that, so the scale here is the larger of the two.
        scale = max(np.abs(ref).max(), np.sqrt((xd ** 2) @ (w ** 2).T).max())
        err = np.abs(y - ref).max() / scale
    assert err <= (QTOL_GEMV_TC if plan.path == GEMV_TC else QTOL)[xdtype], f"{what}: {err:.2e}"
    return plan


# (M, N, K): M across the GEMV and GEMM paths and each GEMV tile (1, 2, 4, 8, 16 rows: all for
# float32 x; 16-bit x takes the tensor-core GEMV's 8-, 16- and 32-row tiles up to 64, the GEMM above);
# N = 1 and 7 (one partial row group), 200 (past a 128-column GEMM tile, not a multiple of 32);
# K of one or three groups, 640 (5 GEMM k-tiles per 128-input group, 20 GEMV chunks); M = 65
# over K = 2048: a split 128-row GEMM tile, M = 70 over K = 128 an unsplit one.
SHAPES = [(1, 7, 128), (1, 200, 640), (2, 33, 256), (3, 1, 640), (8, 40, 384), (16, 33, 256), (17, 7, 640),
          (33, 200, 256), (65, 30, 2048), (70, 7, 128)]


@pytest.mark.parametrize("xdtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("gs", [32, 64, 128])
def test_matches_float64(lib, rng, xdtype, bits, gs):
    """Every shape with the automatic split-K of a 1-SM and of a 132-SM GPU; scales of x's
    dtype. Both kernels run for 16-bit x, and both split and unsplit launches happen."""
    seen = set()
    for m, n, k in SHAPES:
        for sms in (1, 132):
            path, _, splits = check(lib, rng, m, n, k, gs, bits, xdtype, xdtype, sms)
            seen.add((path, splits > 1))
    assert seen == ({(GEMV, False), (GEMV, True)} if xdtype == "float32" else
                    {(GEMV_TC, False), (GEMV_TC, True), (GEMM, False), (GEMM, True)})


@pytest.mark.parametrize("xdtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("bits", [4, 8])
def test_matches_float64_simt_small_m(lib, rng, simt_small_m, xdtype, bits):
    """BITSWITCH_CUDA_SMALL_M=simt: the FFMA GEMV (M <= 2) and the 16-row GEMM tile instead."""
    seen = set()
    for i, (m, n, k) in enumerate(SHAPES[:6]):
        path, rows, _ = check(lib, rng, m, n, k, (32, 64, 128)[i % 3], bits, xdtype, xdtype, 132)
        seen.add((path, rows))
    assert seen == {(GEMV, 1), (GEMV, 2), (GEMM, 16)}


@pytest.mark.parametrize("xdtype,sdtype", [("float32", "bfloat16"), ("float32", "float16"), ("bfloat16", "float32"),
                                           ("bfloat16", "float16"), ("float16", "float32"), ("float16", "bfloat16")])
def test_scale_dtypes(lib, rng, xdtype, sdtype):
    for m in (1, 5, 40):
        for bits in (4, 8):
            check(lib, rng, m, 24, 320, 32, bits, xdtype, sdtype, 132)


# 16-bit x on both sides of every switch of plan_qmatmul: the tensor-core GEMV's tiles of 8
# (M <= 8), 16 (<= 16) and 32 rows (<= 32, and two of them to 64), then the GEMM's 128 rows.
# N = 7 (one partial n8 tile), 200 and 300 (past a 128- or 256-column tile, not a multiple of
# 32); K from 128 to 2304, every one a multiple of 128 so any group size fits. Each with the
# Plan a 132-SM GPU gets with all the workspace it asks for: (M, N, K, Plan).
SMALL_BATCH_CASES = [
    (2, 200, 640, Plan(GEMV_TC, 8, 2)),     # 20 chunks: 2 splits of 3 steps of 4 chunks
    (3, 7, 1024, Plan(GEMV_TC, 8, 4)),      # split-K: 32 chunks in splits of >= 8
    (5, 300, 1152, Plan(GEMV_TC, 8, 4)),
    (8, 7, 640, Plan(GEMV_TC, 8, 2)),
    (13, 200, 384, Plan(GEMV_TC, 16, 1)),   # 12 chunks: too few to split
    (16, 300, 1280, Plan(GEMV_TC, 16, 5)),
    (17, 7, 1024, Plan(GEMV_TC, 32, 4)),
    (31, 300, 640, Plan(GEMV_TC, 32, 2)),
    (33, 200, 2304, Plan(GEMV_TC, 32, 9)),  # two M tiles of 32 rows
    (64, 300, 128, Plan(GEMV_TC, 32, 1)),
    (65, 200, 640, Plan(GEMM, 128, 5)),   # splits of >= 4 k-tiles
]
# The first ten under BITSWITCH_CUDA_SMALL_M=simt: the FFMA GEMV to M = 2, then the GEMM's
# 16-row (splits of >= 8 k-tiles), 32-row (>= 16) and 64-row tiles (>= 32, 128 columns).
SIMT_SMALL_BATCH_PLANS = [Plan(GEMV, 2, 2), Plan(GEMM, 16, 4), Plan(GEMM, 16, 4), Plan(GEMM, 16, 2),
                          Plan(GEMM, 16, 1), Plan(GEMM, 16, 5), Plan(GEMM, 32, 2), Plan(GEMM, 32, 1),
                          Plan(GEMM, 64, 2), Plan(GEMM, 64, 1)]


@pytest.mark.parametrize("xdtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("small_m", ["tensor cores", "simt"])
def test_small_batch_tiles(lib, rng, xdtype, bits, small_m):
    """Each case with split-K as planned, off (no workspace) and narrowed (one partial too
    few); group sizes and scale dtypes rotate over the cases."""
    sdtypes = ("float32", "bfloat16", "float16")
    cases = SMALL_BATCH_CASES
    if small_m == "simt":
        cases = [(m, n, k, want) for (m, n, k, _), want in zip(cases, SIMT_SMALL_BATCH_PLANS)]
    lib.bs_set_small_m_tensor_cores(small_m != "simt")
    try:
        run_small_batch_cases(lib, rng, xdtype, bits, cases, sdtypes)
    finally:
        lib.bs_set_small_m_tensor_cores(-1)


def run_small_batch_cases(lib, rng, xdtype, bits, cases, sdtypes):
    for i, (m, n, k, want) in enumerate(cases):
        gs, sdtype = (32, 64, 128)[i % 3], sdtypes[(i + bits) % 3]
        for ws in ("full", "none", "small"):
            if ws == "small" and want.splits <= 2:
                continue
            plan = check(lib, rng, m, n, k, gs, bits, xdtype, sdtype, 132, ws=ws)
            assert plan == want._replace(splits={"full": want.splits, "none": 1, "small": want.splits - 1}[ws])


def test_small_batch_pipeline_with_threads(lib, rng, simt_small_m):
    """The 16-row tile over 40 k-tiles without split-K, each GPU thread an OS thread: the
    cp.async waits and the one barrier per tile must order the dequantization's writes of one
    Bd half against other warps' ldmatrix reads of it, which fibers, switching only at warp
    collectives, would not expose."""
    emulator.set_threads_mode(lib, True)
    try:
        assert check(lib, rng, 12, 300, 1280, 64, 8, "bfloat16", "bfloat16", 1, ws="none") == (GEMM, 16, 1)
    finally:
        emulator.set_threads_mode(lib, False)


@pytest.mark.parametrize("xdtype", ["float32", "bfloat16"])
def test_float32_rows_past_one_gemv_tile_and_tall_gemm(lib, rng, xdtype):
    """float32 x has no tensor-core path: M = 40 runs 3 GEMV launch tiles of 16 rows. For
    bfloat16, M = 130 crosses a 128-row GEMM tile."""
    for bits in (4, 8):
        plan = check(lib, rng, 40 if xdtype == "float32" else 130, 20, 96, 32, bits, xdtype, "float32", 8)
        assert plan[:2] == ((GEMV, 16) if xdtype == "float32" else (GEMM, 128))


@pytest.mark.parametrize("ws", ["none", "small"])
@pytest.mark.parametrize("m,k", [(1, 1024), (12, 1024), (20, 2048), (70, 1024)])
def test_less_workspace_than_asked(lib, rng, ws, m, k):
    """No workspace turns split-K off; too little narrows it to the partials that fit. For
    bfloat16 x: the tensor-core GEMV's tiles of 8, 16 and 32 rows and the GEMM's 128-row tile
    (K long enough for more than two splits of each one's shortest split)."""
    for xdtype in ("float32", "bfloat16"):
        qw, x = make_case(rng, m, 30, k, 64, "bfloat16", xdtype)
        want = decode_plan(lib.bs_qmatmul_plan(emulator.ptr(x), m, 30, k, 64, 8, DTYPE_CODE[xdtype], 132, 2**62))
        assert want.splits > 2
        plan = check(lib, rng, m, 30, k, 64, 8, xdtype, "bfloat16", 132, ws=ws)
        assert plan == want._replace(splits=1 if ws == "none" else want.splits - 1)


@pytest.mark.parametrize("m,k", [(9, 2304), (2, 4352)])
def test_k_longer_than_the_staged_x(lib, rng, m, k):
    """Without split-K a GEMV block walks K in slices of x staged in shared memory (1024
    inputs at 16 rows, 2048 at 4, 4096 at 2): each row group restages them, so the barrier
    before overwriting a slice other warps still read matters. Several row groups per block.
    float16 x at M = 9 takes the GEMV only when its rows are not 16-byte aligned (4-row tiles);
    at M = 2 it takes the tensor-core GEMV, which stages 4096 inputs of its 8 rows at once.
    Run with an OS thread per GPU thread: as fibers, the staging's shuffles let every warp
    finish the old slice before any overwrites it, which would hide a missing barrier."""
    emulator.set_threads_mode(lib, True)
    try:
        for xdtype, bits in (("float32", 4), ("float16", 8)):
            misaligned = xdtype == "float16" and m > 2
            plan = check(lib, rng, m, 300, k, 128, bits, xdtype, "float32", 1, ws="none", misaligned=misaligned)
            want = (GEMV, 4 if misaligned else 16, 1) if m > 2 else (GEMV_TC, 8, 1) if xdtype == "float16" else (GEMV, m, 1)
            assert plan == want
    finally:
        emulator.set_threads_mode(lib, False)


@pytest.mark.parametrize("xdtype", ["bfloat16", "float16", "float32"])
def test_unaligned_x(lib, rng, xdtype):
    """x rows not 16-byte aligned: the GEMV stages x element by element and the tensor-core
    path (whose cp.async needs 16-byte rows) hands M > 2 to the GEMV, in tiles of 4 rows for
    16-bit x (the 8- and 16-row GEMV tiles are built for float32 only)."""
    for m in (1, 20):
        plan = check(lib, rng, m, 40, 256, 64, 4, xdtype, "float32", 132, misaligned=True)
        assert plan[:2] == (GEMV, 1 if m == 1 else 16 if xdtype == "float32" else 4)


def test_unaligned_planes_are_refused(lib, rng):
    qw, x = make_case(rng, 2, 8, 64, 32, "float32", "bfloat16")
    buf = np.zeros(qw.plane0.size + 1, np.uint32)
    buf[1:] = qw.plane0.ravel()
    plane = buf[1:]
    y = np.zeros((2, 8), x.dtype)
    rc = lib.bs_qmatmul(emulator.ptr(x), emulator.ptr(y), emulator.ptr(plane), emulator.ptr(plane),
                        emulator.ptr(qw.scales), emulator.ptr(qw.biases), 2, 8, 64, 32, 4, 1, 0, None, 0, 4)
    assert rc == INVALID_VALUE


def test_matches_the_cpu_reference(lib, rng):
    """The same call on the CPU's scalar reference: two implementations of the format agree to
    float32 accumulation order (the oracle of DESIGN.md)."""
    qw, x = make_case(rng, 20, 48, 512, 64, "float32", "float32")
    for m in (1, 3, 20):
        for bits in (4, 8):
            rc, y, _ = launch(lib, np.ascontiguousarray(x[:m]), qw, bits, 132)
            assert rc == SUCCESS, emulator.last_error(lib)
            with bs.ops.use_cpu_variant("scalar"):
                ref = bs.qmatmul(np.ascontiguousarray(x[:m]), qw, bits)
            assert rel_err(y, ref.astype(np.float64)) <= 1e-5


def test_workspace_bytes(lib):
    """Nothing for shapes that fill the GPU; [splits, M, N] float32 partials for those that don't."""
    x = np.zeros((1, 4096), np.float32)
    ws = lambda m, n, k, sms: lib.bs_qmatmul_workspace(emulator.ptr(x), m, n, k, 64, 4, 1, 1, sms)  # noqa: E731
    assert ws(1, 151936, 4096, 132) == 0           # an lm_head: 4748 row groups
    assert ws(2048, 4096, 4096, 132) == 0          # prefill: 512 GEMM tiles
    small = ws(1, 4096, 4096, 132)                 # 128 row groups < 4 x 132 blocks
    assert small > 0 and small % (4096 * 4) == 0
    assert ws(1, 4096, 4096, 1) == 0


@pytest.mark.parametrize("wdtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("bits", [4, 8])
def test_dequantize_kernel(lib, rng, wdtype, bits):
    """dequantize_kernel (bitswitch.torch's large-M path): W [N, K] in the requested dtype, each
    weight the float64 value rounded once, but for the float32 arithmetic before that
    rounding; grid-stride with fewer blocks than chunks; every scale dtype and group size."""
    for i, (n, k) in enumerate([(7, 128), (300, 640), (33, 2304)]):
        gs, sdtype = (32, 64, 128)[i], ("float32", "bfloat16", "float16")[(i + bits) % 3]
        qw, _ = make_case(rng, 1, n, k, gs, sdtype, "float32")
        out = np.full(n * k + GUARD, np.nan, np.float32).astype(cast(np.zeros(1, np.float32), wdtype).dtype)
        p1 = qw.plane1 if bits == 8 else qw.plane0
        rc = lib.bs_dequantize(emulator.ptr(out), emulator.ptr(qw.plane0), emulator.ptr(p1), emulator.ptr(qw.scales),
                               emulator.ptr(qw.biases), n, k, gs, bits, DTYPE_CODE[wdtype], DTYPE_CODE[sdtype], 1)
        assert rc == SUCCESS, emulator.last_error(lib)
        assert np.isnan(out[n * k:].astype(np.float32)).all(), "the kernel wrote past W"
        got = out[:n * k].reshape(n, k).astype(np.float64)
        ref = bs.dequantize_f64(qw, bits)
        want = cast(ref.astype(np.float32), wdtype).astype(np.float64)
        # The float32 map w = A f + B (code_affine, as the GEMM's tiles) cancels A f against B:
        # a few float32 units of the group's range off the exact value, which can also move a
        # 16-bit rounding by one unit of that type.
        ulp = {"float32": 0.0, "bfloat16": 2.0 ** -7, "float16": 2.0 ** -10}[wdtype]
        tol = ulp * np.abs(want) + 2.0 ** -20 * np.abs(ref).max(axis=1, keepdims=True)
        assert np.all(np.abs(got - want) <= tol), f"N={n} K={k} G={gs} {wdtype}/{sdtype}"
        if wdtype != "float32":
            assert (got == want).mean() > 0.99
