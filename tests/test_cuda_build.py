"""The CUDA module as CI sees it (built by nvcc, no GPU): it imports without a driver, hands
its entry points to _C, and answers the host-side questions (scratch sizes) the torch ops ask
before a launch. Skipped where the build has no CUDA module."""

import pytest

import bitswitch as bs
from bitswitch import _C

cu = pytest.importorskip("bitswitch._cuda", reason="this build has no CUDA module (nvcc was not found)")


def test_backend_is_loaded_and_reported():
    assert _C._has_cuda_backend()
    info = bs.info()["cuda"]
    assert info["built"] and info["loaded"]
    assert info["runtime_version"] >= 12000
    archs = info["compiled_archs"].split(",")  # e.g. "80,86,89,90"
    assert archs and all(a.rstrip("a").isdigit() and int(a.rstrip("a")) >= 80 for a in archs), archs
    if info["device_count"] == 0:
        assert info["driver_status"] != "ok"
        assert cu.num_sms() == 0


def test_the_backend_table_round_trips():
    _C._set_cuda_backend(None)
    try:
        assert not _C._has_cuda_backend()
        with pytest.raises(TypeError, match="expected bitswitch._cuda.backend"):
            _C._set_cuda_backend(object())
    finally:
        _C._set_cuda_backend(cu.backend())
    assert _C._has_cuda_backend()


def test_workspace_sizes_are_host_side_and_bounded():
    """Scratch sizes are plain host arithmetic (no device needed); decode attention asks for
    split-KV partials, bounded by the shapes."""
    for m, n, k in ((1, 1024, 4096), (16, 4096, 12288), (2048, 4096, 4096)):
        nbytes = cu.qmatmul_workspace_bytes(m, n, k, 64, 8, 1, 1)
        assert 0 <= nbytes <= 64 * m * n * 4 + (1 << 20)
    b, hq, hkv, lk, d = 1, 32, 8, 32768, 128
    nbytes = cu.attention_workspace_bytes(b, hq, hkv, 1, lk, d, 1, 64, 64, False, True)
    assert 0 <= nbytes <= b * hq * (-(-lk // 64)) * (d + 2) * 4
