"""The AVX-512 and AVX512-BF16 units' logic, on any x86 CPU: build _C with their
intrinsics mapped onto portable code (csrc/cpu/avx512_emulation.h) and run the qmatmul and
attention variant tests on it.

On CPUs with AVX-512 the same tests also run natively (the `variant` fixture); this one
makes sure the unit is exercised on every machine, CI included.
"""

import subprocess
import sys

from native_build import ROOT, build_package


def test_avx512_unit_on_emulation(tmp_path):
    pkg, env = build_package(tmp_path, "-DBITSWITCH_EMULATE_AVX512=ON")
    probe = subprocess.run([sys.executable, "-c", "import bitswitch as b; i = b._C.cpu_info(); "
                            "print(b.__file__, i['avx512_emulated'], i['variants']['avx512'], i['variants']['avx512bf16'], i['best'])"],
                           env=env, capture_output=True, text=True, check=True, cwd=tmp_path)
    assert str(pkg) in probe.stdout and "True ok ok" in probe.stdout
    # An emulated unit is never chosen by default.
    assert probe.stdout.split()[-1] in ("avxvnni", "avx2", "scalar"), probe.stdout
    # This build has no AMX unit (it is a stub next to an emulated AVX-512 unit): the amx
    # variant reports why, and forcing it is a clear error, never a crash.
    amx = subprocess.run([sys.executable, "-c", "import bitswitch as b, numpy as np\n"
                          "print(b._C.cpu_info()['variants']['amx'])\n"
                          "qw = b.quantize(np.ones((8, 64), np.float32), 64)\n"
                          "try:\n    b.qmatmul(np.ones((20, 64), np.float32), qw)\n"
                          "except ValueError as e:\n    print('ValueError', e)\n"],
                         env=dict(env, BITSWITCH_CPU="amx"), capture_output=True, text=True, check=True, cwd=tmp_path)
    assert "emulation" in amx.stdout
    assert "ValueError qmatmul: BITSWITCH_CPU=amx cannot run here:" in amx.stdout
    tests = ROOT / "tests"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "avx512",
                          str(tests / "test_qmatmul.py"), str(tests / "test_attention.py")],
                         env=env, capture_output=True, text=True, cwd=tmp_path)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "passed" in summary and "skipped" not in summary and "failed" not in summary, summary
