"""The MSL emulation header (tests/metal/msl_emulation.h) on its own: its self-test
(emu_selftest.cpp) built with g++ three ways and run.

- plain -O2: every check, in Mode::fibers and Mode::threads;
- AddressSanitizer + UBSan: the same checks, with no sanitizer report (fiber switches are
  announced to ASan, so fiber stacks produce no false positives);
- ThreadSanitizer: the Mode::threads checks with no report, and a kernel that reads a
  neighbour's threadgroup slot without a barrier, which TSan must report as a data race.

The three builds are compiled in parallel once per module.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest

HERE = Path(__file__).resolve().parent
CXX = shutil.which("g++")

pytestmark = [
    pytest.mark.skipif(CXX is None, reason="g++ is needed to compile the MSL emulation"),
    # The emulation is built for Linux (ELF fiber switch, /proc, glibc's sanitizer runtimes);
    # on a Mac the same kernels run on the real GPU (test_metal_device.py).
    pytest.mark.skipif(sys.platform != "linux", reason="the MSL emulation runs on Linux"),
]

# The flags the kernel sources are compiled with, plus warnings for the header itself.
FLAGS = ["-std=c++17", "-O2", "-fno-strict-aliasing", "-Wno-attributes", "-Wall", "-Wextra", f"-I{HERE}"]
BUILDS = {
    "plain": [],
    "asan": ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"],
    "tsan": ["-fsanitize=thread"],
}
SANITIZER_REPORTS = ("AddressSanitizer", "LeakSanitizer", "runtime error:", "ThreadSanitizer", "UndefinedBehaviorSanitizer")
RUN_TIMEOUT = 180


class Build:
    """One g++ invocation started in the background; wait() returns the executable or None."""

    def __init__(self, name: str, out: Path):
        self.name = name
        self.exe = out / f"emu_selftest_{name}"
        cmd = [CXX, *FLAGS, *BUILDS[name], str(HERE / "emu_selftest.cpp"), "-o", str(self.exe), "-pthread"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.log: Optional[str] = None

    def wait(self) -> Optional[Path]:
        if self.log is None:
            self.log, _ = self.proc.communicate(timeout=600)
        return self.exe if self.proc.returncode == 0 else None


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> Dict[str, Build]:
    out = tmp_path_factory.mktemp("msl_emulation")
    started = {name: Build(name, out) for name in BUILDS}
    yield started
    for b in started.values():
        if b.proc.poll() is None:
            b.proc.kill()
            b.proc.wait()


def sanitizer_build(builds: Dict[str, Build], name: str) -> Path:
    """The executable of a sanitizer build, or a skip when this toolchain lacks the runtime."""
    exe = builds[name].wait()
    if exe is None:
        if builds["plain"].wait() is not None:  # the header compiles: the sanitizer is missing
            pytest.skip(f"g++ cannot build with {' '.join(BUILDS[name])}: {builds[name].log.strip()[-300:]}")
        pytest.fail(builds[name].log)
    return exe


def run(cmd: List[str], env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT, env={**os.environ, **(env or {})})


def run_tsan(exe: Path, *args: str) -> subprocess.CompletedProcess:
    """Runs a TSan executable; where TSan rejects the address-space layout (high ASLR entropy)
    retries without randomization, and skips when it still cannot start."""
    env = {"TSAN_OPTIONS": "halt_on_error=0"}
    r = run([str(exe), *args], env)
    if "FATAL: ThreadSanitizer" in r.stderr:
        setarch = shutil.which("setarch")
        if setarch is not None:
            r = run([setarch, platform.machine(), "-R", str(exe), *args], env)
        if "FATAL: ThreadSanitizer" in r.stderr or (setarch is not None and "setarch:" in r.stderr):
            reason = next((line for line in r.stderr.splitlines() if "ThreadSanitizer" in line or "setarch" in line),
                          r.stderr.strip()[:200])
            pytest.skip(f"ThreadSanitizer cannot run on this machine: {reason}")
    return r


def assert_all_ok(r: subprocess.CompletedProcess, name: str) -> None:
    failed = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
    assert r.returncode == 0 and "ALL OK" in r.stdout and not failed, (
        f"{name}: rc={r.returncode}\n" + "\n".join(failed) + "\n" + r.stdout[-3000:] + r.stderr[-3000:])


def assert_no_sanitizer_report(r: subprocess.CompletedProcess, name: str) -> None:
    reports = [line for line in (r.stdout + r.stderr).splitlines() if any(s in line for s in SANITIZER_REPORTS)]
    assert not reports, f"{name}: sanitizer report\n" + r.stderr[-6000:]


def test_selftest_plain(builds):
    exe = builds["plain"].wait()
    assert exe is not None, builds["plain"].log
    header_warnings = [line for line in builds["plain"].log.splitlines() if "msl_emulation.h" in line and "warning" in line]
    assert not header_warnings, "\n".join(header_warnings)
    r = run([str(exe)])
    assert_all_ok(r, "plain")
    assert "[fibers]" in r.stdout and "[threads]" in r.stdout
    print(next(line for line in r.stdout.splitlines() if "fiber timing" in line))


def test_selftest_asan_ubsan(builds):
    exe = sanitizer_build(builds, "asan")
    env = {"ASAN_OPTIONS": "detect_stack_use_after_return=1:detect_leaks=1",
           "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}
    r = run([str(exe)], env)
    if "LeakSanitizer has encountered a fatal error" in r.stderr:  # e.g. under ptrace
        r = run([str(exe)], {**env, "ASAN_OPTIONS": "detect_stack_use_after_return=1:detect_leaks=0"})
    assert_no_sanitizer_report(r, "asan")
    assert_all_ok(r, "asan")
    assert "[fibers]" in r.stdout  # fibers really ran under ASan


def test_selftest_tsan_threads_mode(builds):
    exe = sanitizer_build(builds, "tsan")
    r = run_tsan(exe, "--threads-only")
    assert_no_sanitizer_report(r, "tsan")
    assert_all_ok(r, "tsan")


def test_tsan_reports_a_missing_barrier(builds):
    exe = sanitizer_build(builds, "tsan")
    r = run_tsan(exe, "--race")
    assert "racy kernel ran" in r.stdout, r.stdout + r.stderr[-3000:]
    assert "ThreadSanitizer: data race" in r.stderr, r.stderr[-3000:]
    assert "racy(" in r.stderr, r.stderr[-3000:]  # the report names the kernel's threadgroup array
