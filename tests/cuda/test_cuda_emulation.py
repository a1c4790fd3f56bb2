"""The CUDA emulation (cuda_emulation.h) on its own: the kernels of emulation_cases.cpp run
through emulator.build and checked against numpy and the PTX ISA's documented layouts.

The kernel authors rely most on the ldmatrix -> mma identities (test_ldmatrix_feeds_mma):
ldmatrix_x4 of a row-major A tile is mma's A fragment, ldmatrix_x2 of an [n][k] tile and
ldmatrix_x2_trans / x4_trans of a [k][n] tile are its B fragment.

Each check_* function raises AssertionError on a mismatch; the tests call them on the plain
library, in threads mode, and (test_cases_under_asan_and_ubsan) on an AddressSanitizer build
in a subprocess.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import cuda_emulator as emulator  # noqa: E402  (tests/cuda/cuda_emulator.py)

pytestmark = pytest.mark.skipif(not emulator.available(),
                                reason="the CUDA emulation needs Linux and g++ (fiber switch, ELF, glibc)")

CASES = HERE / "emulation_cases.cpp"
SUCCESS, INVALID_VALUE, INVALID_CONFIGURATION, LAUNCH_FAILURE = 0, 1, 9, 719
POISON32 = 0xFFFFFFFF

P = emulator.ptr


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return emulator.build("emulation_cases", CASES.read_text(), tmp_path_factory.mktemp("cuda_emu"))


def launch(lib, name, *args):
    """Calls the thunk `name`; returns (cudaError_t, message)."""
    rc = getattr(lib, name)(*args)
    return rc, emulator.last_error(lib)


def ok(lib, name, *args):
    rc, msg = launch(lib, name, *args)
    assert rc == SUCCESS, f"{name}: cudaError {rc}: {msg}"


# ---- 16-bit operands ------------------------------------------------------------------------

def operands(rng, shape, bf16: bool):
    """Random values exactly representable in the type: (raw 16-bit array, float64 values)."""
    x = rng.standard_normal(shape).astype(np.float32)
    if bf16:
        bits = (x.view(np.uint32) >> 16).astype(np.uint16)
        return bits, (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    h = x.astype(np.float16)
    return h.view(np.uint16), h.astype(np.float64)


def mma_reference(a, b, c):
    """The emulation's documented order: d = c + a[:,0]*b[0,:] + ... in float32, k in order.
    Each 16-bit product is exact in float32, so this is bit-exact."""
    acc = c.astype(np.float32)
    for k in range(a.shape[1]):
        acc = (acc + np.outer(a[:, k], b[k, :]).astype(np.float32)).astype(np.float32)
    return acc


def assert_mma(d, a, b, c, what):
    exact = a @ b + c
    bound = 4e-6 * (np.abs(a) @ np.abs(b) + np.abs(c)) + 1e-30
    assert np.all(np.abs(d - exact) <= bound), f"{what}: max error {np.abs(d - exact).max()}"
    np.testing.assert_array_equal(d, mma_reference(a, b, c), err_msg=f"{what}: not the documented summation order")


def check_mma_by_layout(lib):
    rng = np.random.default_rng(1)
    for bf16 in (0, 1):
        a_bits, a = operands(rng, (16, 16), bf16)
        b_bits, b = operands(rng, (16, 8), bf16)
        c = rng.standard_normal((16, 8)).astype(np.float32)
        d = np.full((16, 8), np.nan, np.float32)
        ok(lib, "run_mma_by_layout", bf16, P(a_bits), P(b_bits), P(c), P(d))
        assert_mma(d, a, b, c.astype(np.float64), "bf16" if bf16 else "f16")


def check_ldmatrix_layouts(lib):
    rng = np.random.default_rng(2)
    tile = rng.permutation(1 << 16)[:256].astype(np.uint16).reshape(32, 8)  # distinct values
    rows = rng.permutation(32).astype(np.int32)  # lane l points at tile row rows[l]
    out = np.zeros((4, 32, 4), np.uint32)
    ok(lib, "run_ldmatrix_dump", P(tile), P(rows), P(out))
    pair = lambda lo, hi: np.uint32(lo) | (np.uint32(hi) << np.uint32(16))  # noqa: E731
    for form, (count, trans) in enumerate([(4, False), (4, True), (2, False), (2, True)]):
        for lane in range(32):
            g, t = lane // 4, lane % 4
            for i in range(count):
                mat = tile[rows[8 * i:8 * i + 8]]  # matrix i: rows from lanes 8i..8i+7
                want = pair(mat[2 * t, g], mat[2 * t + 1, g]) if trans else pair(mat[g, 2 * t], mat[g, 2 * t + 1])
                assert out[form, lane, i] == want, (form, lane, i, hex(out[form, lane, i]), hex(want))


def check_ldmatrix_feeds_mma(lib):
    rng = np.random.default_rng(3)
    for bf16 in (0, 1):
        a_bits, a = operands(rng, (16, 16), bf16)
        b_bits, b = operands(rng, (16, 16), bf16)  # B[k][n]
        c = rng.standard_normal((16, 16)).astype(np.float32)
        bnk = np.ascontiguousarray(b_bits.T)  # B as [n][k]
        d = [np.full((16, 16), np.nan, np.float32) for _ in range(3)]
        ok(lib, "run_ldmatrix_mma", bf16, P(a_bits), P(bnk), P(b_bits), P(c), *(P(x) for x in d))
        for name, x in zip(["ldmatrix_x2 on [n][k]", "ldmatrix_x2_trans on [k][n]", "ldmatrix_x4_trans on [k][n]"], d):
            assert_mma(x, a, b, c.astype(np.float64), f"{name} ({'bf16' if bf16 else 'f16'})")


def check_cp_async(lib):
    src = np.zeros((128, 4), np.uint32)
    src[:, 0] = 0x1000 + np.arange(128)
    src[:, 1:] = 7
    out = np.zeros((64, 6), np.uint32)
    ok(lib, "run_cp_async_stages", P(src), P(out))
    i = np.arange(64)
    nxt = (i + 1) % 64
    group1 = lambda j: np.where(j % 3 != 0, 0x1000 + 64 + j, 0)  # noqa: E731  (pred false: zero-filled)
    np.testing.assert_array_equal(out[:, 0], POISON32, "read before any wait must see the poison")
    np.testing.assert_array_equal(out[:, 1], 0x1000 + i, "wait<1> completes the older group")
    np.testing.assert_array_equal(out[:, 2], POISON32, "wait<1> leaves the newest group pending")
    np.testing.assert_array_equal(out[:, 3], 0x1000 + nxt, "after wait<0> + __syncthreads")
    np.testing.assert_array_equal(out[:, 4], group1(nxt), "after wait<0> + __syncthreads (group 1)")
    np.testing.assert_array_equal(out[:, 5], group1(i), "wait<0>")


def check_shuffles(lib):
    out = np.full((64, 13), np.nan, np.float32)
    ok(lib, "run_shuffles", P(out))
    for gid in range(64):
        lane, w = gid % 32, gid - gid % 32
        v = lambda src: 100.0 * (w + src) + 1.5  # noqa: E731
        own, seg = v(lane), lane - lane % 8
        want = [v(lane ^ 5), v(lane + 3) if lane + 3 < 32 else own, v(lane - 2) if lane >= 2 else own,
                v(31 - lane), v((lane + 33) % 32),
                v(lane ^ 4), v(lane + 2) if lane + 2 < seg + 8 else own, v(lane - 3) if lane - 3 >= seg else own,
                v(seg + 5),
                float(int(v(lane ^ 16))), v(lane + 1) if lane < 31 else own, float(w + (lane ^ 1)), float(w + 7)]
        np.testing.assert_array_equal(out[gid], np.float32(want), f"thread {gid}")


def check_grid3d(lib, grid=(3, 2, 2), block=(8, 4, 2)):
    nb, nt = int(np.prod(grid)), int(np.prod(block))
    out = np.full((nb, nt, 14), -1, np.int32)
    ok(lib, "run_grid3d", P(out), *grid, *block)
    for b in range(nb):
        bidx = (b % grid[0], b // grid[0] % grid[1], b // grid[0] // grid[1])
        for t in range(nt):
            tidx = (t % block[0], t // block[0] % block[1], t // block[0] // block[1])
            want = [1000 * b + (t + 1) % nt + 1, 1000 * b + (t + 2) % nt + 2, *tidx, *bidx, *block, *grid]
            np.testing.assert_array_equal(out[b, t], want, f"block {bidx} thread {tidx}")


# ---- tests ----------------------------------------------------------------------------------

def test_mma_fragment_layout(lib):
    """mma_m16n8k16 for __half and __nv_bfloat16 with fragments gathered by common.cuh's
    layout: A @ B + C exactly as float64 within float rounding, and bit-exact in the
    documented summation order."""
    check_mma_by_layout(lib)


def test_ldmatrix_layouts(lib):
    """All four ldmatrix forms against the PTX layout, with row addresses given by the lanes
    in a shuffled order (rows need not be contiguous)."""
    check_ldmatrix_layouts(lib)


def test_ldmatrix_feeds_mma(lib):
    check_ldmatrix_feeds_mma(lib)


def test_cp_async(lib):
    """Shared memory is written at the wait that retires a group, not at the copy."""
    check_cp_async(lib)


def test_cp_async_misuse_is_reported(lib):
    src = np.zeros(64, np.uint32)
    rc, msg = launch(lib, "run_cp_async_misuse", P(src), 0)
    assert rc == LAUNCH_FAILURE and "cp.async copies not waited for" in msg, msg
    rc, msg = launch(lib, "run_cp_async_misuse", P(src), 1)
    assert rc == LAUNCH_FAILURE and "not 16-byte aligned" in msg, msg


def test_shuffles(lib):
    """xor / down / up / idx with CUDA's rules past the warp's (or the width's) end, and
    int, double, __half, __nv_bfloat16 values."""
    check_shuffles(lib)


@pytest.mark.parametrize("mode, want", [
    (0, ["block (0, 0, 0): deadlock", "threads 0-31 at __syncthreads", "threads 32-63 returned",
         "__syncthreads must be reached by every thread of the block"]),
    (1, ["warp 0: lanes reached different warp collectives", "__shfl_xor_sync", "__syncwarp"]),
    (2, ["__shfl_xor_sync with mask 0x0000ffff", "full mask"]),
    (3, ["deadlock", "in mma_m16n8k16<__half>", "warp 0 is split"]),
    (4, ["ldmatrix_x4: lane 9 gave row address", "not 16-byte aligned"]),
    (5, ["block (0, 0, 0): thread 40: exception: bad index 40"]),
])
def test_misuse_is_reported(lib, mode, want):
    """A divergent barrier or collective ends the launch with a message instead of hanging."""
    out = np.zeros(64, np.float32)
    rc, msg = launch(lib, "run_misuse", P(out), mode)
    assert rc == LAUNCH_FAILURE, (rc, msg)
    for w in want:
        assert w in msg, msg
    check_grid3d(lib, grid=(1, 1, 1), block=(32, 1, 1))  # the next launch is clean
    assert emulator.last_error(lib) == ""


def test_dynamic_shared_memory_limits(lib):
    out = np.zeros(2, np.uint32)
    words = 64 * 1024 // 4
    rc, msg = launch(lib, "run_dynamic_smem", P(out), 64 * 1024, -1)
    assert rc == INVALID_VALUE and "cudaFuncSetAttribute" in msg, msg
    rc, msg = launch(lib, "run_dynamic_smem", P(out), 64 * 1024, 0)  # an attribute below the request
    assert rc == INVALID_VALUE, msg
    ok(lib, "run_dynamic_smem", P(out), 64 * 1024, 64 * 1024)
    assert out[0] == POISON32, "dynamic shared memory is poisoned before the block"
    assert out[1] == (words * (words - 1) // 2) % (1 << 32)
    ok(lib, "run_dynamic_smem", P(out), 48 * 1024, -1)  # 48 KiB needs no attribute
    rc, _ = launch(lib, "run_dynamic_smem", P(out), 64 * 1024, 228 * 1024)
    assert rc == 1000 + INVALID_VALUE, "cudaFuncSetAttribute above 227 KiB fails"


def test_static_shared_memory_and_3d_grids(lib):
    check_grid3d(lib)
    check_grid3d(lib, grid=(2, 1, 3), block=(4, 8, 4))
    check_grid3d(lib, grid=(1, 1, 1), block=(1024, 1, 1))


@pytest.mark.parametrize("grid, block", [((1, 1, 1), (48, 1, 1)), ((1, 1, 1), (1024, 2, 1)), ((1, 1, 1), (32, 1, 65)),
                                         ((1, 70000, 1), (32, 1, 1)), ((0, 1, 1), (32, 1, 1))])
def test_bad_configurations_are_rejected(lib, grid, block):
    rc, msg = launch(lib, "run_noop", *grid, *block)
    assert rc == INVALID_CONFIGURATION and msg.startswith("launch: "), (rc, msg)


def test_element_types_and_math(lib):
    x = np.array([1.0, 1.00390625, 1.01171875, -2.5e-3, 65504.0, 7e4, 1e-8, np.inf, np.nan, -0.0,
                  *np.random.default_rng(4).standard_normal(200)], np.float32)
    bf, f16 = np.zeros(len(x), np.uint16), np.zeros(len(x), np.uint16)
    lib.convert(P(x), ctypes.c_int(len(x)), P(bf), P(f16))
    with np.errstate(over="ignore"):  # 7e4 rounds to inf in half, as it should
        np.testing.assert_array_equal(f16, x.astype(np.float16).view(np.uint16))
    u = x.view(np.uint32).astype(np.uint64)
    want = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
    nan = np.isnan(x)
    want[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    np.testing.assert_array_equal(bf, want)
    assert np.isnan((bf[nan].astype(np.uint32) << 16).view(np.float32)).all()
    assert lib.minmax_ok() == 1


def test_threads_mode(lib):
    """Every GPU thread an OS thread (the mode ThreadSanitizer needs): same results."""
    emulator.set_threads_mode(lib, True)
    try:
        check_grid3d(lib, grid=(2, 1, 1), block=(8, 4, 2))
        check_shuffles(lib)
        check_ldmatrix_feeds_mma(lib)
        check_cp_async(lib)
        out = np.zeros(64, np.float32)
        rc, msg = launch(lib, "run_misuse", P(out), 0)
        assert rc == LAUNCH_FAILURE and "at __syncthreads" in msg, msg
    finally:
        emulator.set_threads_mode(lib, False)


SANITIZED_CHECKS = "check_mma_by_layout check_ldmatrix_layouts check_ldmatrix_feeds_mma check_cp_async " \
                   "check_shuffles check_grid3d".split()


def sanitized_library(tmp_path_factory, sanitizer: str) -> Path:
    flags, _ = emulator.SANITIZERS[sanitizer]
    return emulator.build_library(f"emulation_cases_{sanitizer}", CASES.read_text(),
                                  tmp_path_factory.mktemp(f"cuda_emu_{sanitizer}"), flags)


def test_cases_under_asan_and_ubsan(tmp_path_factory):
    """The checks above on an AddressSanitizer + UBSan build (fibers: every fiber switch is
    announced to ASan, so fiber stacks raise no false reports)."""
    emulator.run_sanitized("address", sanitized_library(tmp_path_factory, "address"), "test_cuda_emulation",
                           f"[getattr(m, c)(lib) for c in {SANITIZED_CHECKS!r}]")


def test_threads_mode_under_tsan(tmp_path_factory):
    """Threads mode under ThreadSanitizer: the checks above raise no report (the emulation's
    own state is race-free, and so are these kernels), and a kernel that reads a neighbour's
    __shared__ slot without __syncthreads is reported as a data race."""
    path = sanitized_library(tmp_path_factory, "thread")
    emulator.run_sanitized("thread", path, "test_cuda_emulation", f"[getattr(m, c)(lib) for c in {SANITIZED_CHECKS!r}]")
    with pytest.raises(AssertionError, match="ThreadSanitizer: data race"):
        emulator.run_sanitized("thread", path, "test_cuda_emulation",
                               "out = m.np.zeros(64, m.np.int32); lib.run_racy(m.P(out))")
