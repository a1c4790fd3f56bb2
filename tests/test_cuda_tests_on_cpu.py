"""tests/test_cuda.py runs only where there is a GPU, which CI lacks: a mistake in a test itself
(a wrong reference call, a tolerance, a shape) would first show on a GPU. Here the file runs
with BITSWITCH_CUDA_TESTS_ON_CPU=1, on CPU tensors with the CPU kernels standing in, so its
logic is checked everywhere; only what a GPU alone has is skipped there."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from bitswitch import _C  # noqa: E402


@pytest.mark.skipif(not _C._has_cuda_backend(), reason="the file sizes workspaces through bitswitch._cuda")
def test_gpu_test_file_passes_on_the_cpu():
    here = Path(__file__).parent
    env = dict(os.environ, BITSWITCH_CUDA_TESTS_ON_CPU="1", PYTHONPATH=os.pathsep.join(sys.path))
    # -rfs: failures and skips in the summary, the tail kept below; no captured logs (a failing
    # torch.compile test's debug log would push the failure's name out of that tail)
    r = subprocess.run([sys.executable, "-m", "pytest", str(here / "test_cuda.py"), "-q", "-p", "no:cacheprovider",
                        "-rfs", "-p", "no:logging"], capture_output=True, text=True, env=env, cwd=here.parent,
                       timeout=1200)
    out = r.stdout[-6000:] + r.stderr[-2000:]
    assert r.returncode == 0, out
    passed = re.search(r"(\d+) passed", r.stdout)
    assert passed and int(passed.group(1)) >= 40, out  # the GPU-only tests are the only ones skipped
