"""The thread pool: thread counts, fork safety, concurrent callers (GIL released)."""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import bitswitch as bs
from bitswitch import _C
from conftest import VARIANTS, rel_err, variant_status


def test_thread_count_setting():
    old = _C.num_threads()
    try:
        for n in (1, 3, 2):
            bs.ops.set_num_threads(n)
            assert bs.ops.num_threads() == n
    finally:
        bs.ops.set_num_threads(0)
    assert _C.num_threads() == old


def test_env_thread_count_and_variant():
    code = "import bitswitch as bs; print(bs.ops.num_threads(), bs.ops.cpu_variant())"
    env = dict(os.environ, BITSWITCH_NUM_THREADS="3", BITSWITCH_CPU="scalar")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["3", "scalar"]


def test_env_variant_that_cannot_run_is_a_clear_error():
    code = ("import numpy as np, bitswitch as bs\n"
            "qw = bs.quantize(np.ones((8, 64), np.float32), 64)\n"
            "try:\n    bs.qmatmul(np.ones((1, 64), np.float32), qw)\n"
            "except ValueError as e:\n    print('ValueError', e)\n")
    env = dict(os.environ, BITSWITCH_CPU="neon")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "ValueError" in out.stdout and "BITSWITCH_CPU='neon'" in out.stdout


def _qmatmul_error_with_env(variant: str) -> str:
    code = ("import numpy as np, bitswitch as bs\n"
            "qw = bs.quantize(np.ones((8, 64), np.float32), 64)\n"
            "try:\n    bs.qmatmul(np.ones((1, 64), np.float32), qw)\n    print('ran')\n"
            "except ValueError as e:\n    print('ValueError', e)\n")
    env = dict(os.environ, BITSWITCH_CPU=variant)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("variant", VARIANTS)
def test_env_variant_runs_or_says_why_not(variant):
    """BITSWITCH_CPU=<variant> either runs, or fails on first use with the reason cpu_info()
    reports (e.g. amx on a CPU or build without AMX; tests/test_avx512_emulation.py checks
    that case on a build without the AMX unit, whatever the CPU)."""
    status = variant_status(variant)
    out = _qmatmul_error_with_env(variant)
    if status == "ok":
        assert out.strip() == "ran"
    else:
        assert f"ValueError qmatmul: BITSWITCH_CPU={variant} cannot run here: {status}" in out


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_results_do_not_depend_on_thread_count(rng, threads):
    qw = bs.quantize(rng.standard_normal((301, 512)).astype(np.float32), 64, 8)
    x = rng.standard_normal((3, 512)).astype(np.float32)
    ref = bs.qmatmul(x, qw)
    try:
        bs.ops.set_num_threads(threads)
        np.testing.assert_array_equal(bs.qmatmul(x, qw), ref)
        x2 = rng.standard_normal((40, 512)).astype(np.float32)
        assert rel_err(bs.qmatmul(x2, qw), bs.qmatmul_f64(x2, qw)) < 3e-4
    finally:
        bs.ops.set_num_threads(0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_safety(rng):
    """The parent's pool threads do not exist in a forked child; the child gets a new pool."""
    qw = bs.quantize(rng.standard_normal((256, 512)).astype(np.float32), 64, 8)
    x = rng.standard_normal((2, 512)).astype(np.float32)
    ref = bs.qmatmul(x, qw)  # the parent's pool is running
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            ok = np.array_equal(bs.qmatmul(x, qw), ref) and np.array_equal(bs.qmatmul(x, qw, 4), bs.qmatmul(x, qw, 4))
            os.write(w, b"ok" if ok else b"bad")
        finally:
            os._exit(0)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    msg = os.read(r, 16)
    os.close(r)
    assert status == 0 and msg == b"ok"
    np.testing.assert_array_equal(bs.qmatmul(x, qw), ref)


def test_concurrent_python_threads(rng):
    """Kernels release the GIL; concurrent callers queue on the pool and stay correct."""
    qw = bs.quantize(rng.standard_normal((200, 1024)).astype(np.float32), 32, 8)
    xs = [rng.standard_normal((m, 1024)).astype(np.float32) for m in (1, 2, 9, 17)]
    refs = {(i, b): bs.qmatmul(x, qw, b) for i, x in enumerate(xs) for b in (4, 8)}
    errors = []

    def worker(i):
        for _ in range(25):
            for b in (4, 8):
                if not np.array_equal(bs.qmatmul(xs[i], qw, b), refs[(i, b)]):
                    errors.append((i, b))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
