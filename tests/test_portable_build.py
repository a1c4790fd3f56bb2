"""The configuration non-x86 CPUs build (arm64: Apple silicon, where the Metal kernels run;
Graviton): the scalar kernels only, x86_stubs.cpp in place of the ISA units, no cpuid.
-DBITSWITCH_PORTABLE=ON builds exactly that file set on this x86 machine; the package must
import, report every ISA variant unsupported with the reason, and pass the kernel tests on
the scalar variant."""

import subprocess
import sys

from conftest import VARIANTS
from native_build import ROOT, build_package


def test_scalar_only_build(tmp_path):
    pkg, env = build_package(tmp_path, "-DBITSWITCH_PORTABLE=ON")
    probe = subprocess.run([sys.executable, "-c", "import bitswitch as b; i = b._C.cpu_info(); "
                            "print(b.__file__); print(i['best']); print(i['variants'])"],
                           env=env, capture_output=True, text=True, check=True, cwd=tmp_path)
    lines = probe.stdout.splitlines()
    assert str(pkg) in lines[0] and lines[1] == "scalar", probe.stdout
    assert lines[2].count("not an x86 CPU") == len(VARIANTS) - 1, lines[2]  # all but scalar
    tests = [str(ROOT / "tests" / t) for t in ("test_qmatmul.py", "test_attention.py", "test_layer_ops.py")]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "scalar", *tests],
                         env=env, capture_output=True, text=True, cwd=tmp_path)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-2000:]
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "passed" in summary and "failed" not in summary, summary
