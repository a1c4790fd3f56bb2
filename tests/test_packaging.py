"""The package as users get it: an sdist built from this tree, a wheel built from that sdist
(so a source file the sdist forgets fails here), installed into a fresh virtual
environment and used from outside the source tree (so a package-data file the wheel
forgets fails here: the Metal sources and format.h, the embedded model)."""

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SMOKE = r"""
import sys, numpy as np
import bitswitch as bs
from bitswitch import metal
from importlib import resources
assert "site-packages" in bs.__file__, bs.__file__
rng = np.random.default_rng(0)
qw = bs.quantize(rng.standard_normal((64, 256)).astype(np.float32), group_size=64, bits=8)
x = rng.standard_normal((3, 256)).astype(np.float32)
ref = bs.qmatmul_f64(x, qw, 8)
err = np.abs(bs.qmatmul(x, qw, 8) - ref).max() / np.abs(ref).max()
assert err < 1e-4, err
src = metal.library_source()
assert "bs_qmm" in src and "bs_attention_decode" in src and "kPlaneBits" in src
tiny = resources.files("bitswitch").joinpath("data", "qwen3-tiny")  # the embedded model (no torch here)
assert tiny.joinpath("config.json").is_file() and tiny.joinpath("model.safetensors").is_file()
print("smoke ok", bs.__file__)
"""


def _run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def test_sdist_wheel_install_and_smoke(tmp_path):
    pytest.importorskip("build")
    dist = tmp_path / "dist"
    env = dict(os.environ, BITSWITCH_CUDA="OFF")  # the CUDA build is covered by the main install
    env.pop("PYTHONPATH", None)
    _run([sys.executable, "-m", "build", "--sdist", "--outdir", str(dist), str(ROOT)], env=env)
    (sdist,) = dist.glob("bitswitch-*.tar.gz")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dist), str(sdist)], env=env)
    (wheel,) = dist.glob("bitswitch-*.whl")
    fresh = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(fresh)
    py = fresh / "bin" / "python"
    _run([str(py), "-m", "pip", "install", "-q", str(wheel)], env=env)
    out = tmp_path / "elsewhere"
    out.mkdir()
    r = _run([str(py), "-c", SMOKE], env=env, cwd=out)
    assert "smoke ok" in r.stdout
    info = _run([str(fresh / "bin" / "bitswitch"), "info"], env=env, cwd=out).stdout
    assert "kernel variant selected:" in info and "metal: kernel sources in" in info, info
    shutil.rmtree(fresh)
