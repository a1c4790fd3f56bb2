"""Shared test helpers. Inputs are fresh random draws every run (the seed is printed on
failure so a case can be replayed with BITSWITCH_TEST_SEED)."""

import os

import numpy as np
import pytest

import bitswitch as bs
from bitswitch import _C

VARIANTS = ("scalar", "avx2", "avxvnni", "avx512", "avx512bf16", "amx")


def variant_status(name: str) -> str:
    return _C.cpu_info()["variants"][name]


def available_variants() -> list:
    return [v for v in VARIANTS if variant_status(v) == "ok"]


@pytest.fixture
def rng(request):
    seed = int(os.environ.get("BITSWITCH_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    request.node.user_properties.append(("seed", seed))
    return np.random.default_rng(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for k, v in item.user_properties:
            if k == "seed":
                rep.sections.append(("random seed", f"BITSWITCH_TEST_SEED={v}"))


@pytest.fixture(params=VARIANTS)
def variant(request):
    """Runs a test once per CPU kernel variant; skips those this CPU cannot run."""
    name = request.param
    status = variant_status(name)
    if status != "ok":
        # avx512 runs emulated in tests/test_avx512_emulation.py; avx512bf16 and amx need the hardware
        where = "tests/test_avx512_emulation.py runs it emulated" if name == "avx512" else "needs a CPU with it"
        pytest.skip(f"{name}: {status} ({where})")
    with bs.ops.use_cpu_variant(name):
        yield name


def cast(a: np.ndarray, dtype: str) -> np.ndarray:
    from bitswitch import _arrays as A

    return a.astype(A.BFLOAT16 if dtype == "bfloat16" else dtype)


def rel_err(y, ref) -> float:
    """Largest absolute error over the largest reference magnitude."""
    y = np.asarray(y, dtype=np.float64)
    return float(np.max(np.abs(y - ref)) / max(np.max(np.abs(ref)), 1e-30))


# Bounds of qmatmul against the float64 reference on the same inputs, by activation dtype.
# float32: the kernels' own error (float32 accumulation; the GEMV path's 15-bit activations
# give ~3e-5). bfloat16 / float16: y is also rounded to that type (2^-9 / 2^-12 relative).
QMATMUL_TOL = {"float32": 3e-4, "bfloat16": 8e-3, "float16": 1.5e-3}
