"""pytest-benchmark suite: `python -m pytest bench --benchmark-only`.

Each group times bitswitch and its anchors on the same shape in the same run; at the end
a summary prints every bitswitch time as a speed-up over each anchor of its group.
"""

import os

import pytest


def pytest_configure(config):
    # One thread count for every library measured (the CPU targets are for 2 threads).
    threads = int(os.environ.get("BITSWITCH_BENCH_THREADS", "2"))
    config._bitswitch_threads = threads
    import bitswitch

    bitswitch.ops.set_num_threads(threads)
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass


@pytest.fixture
def threads(request):
    return request.config._bitswitch_threads


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups = {}
    for b in session.benchmarks:
        groups.setdefault(b.group, {})[b.name.split("[")[0].replace("test_", "")] = b.stats.median
    terminalreporter.write_sep("-", "speed-up of bitswitch over each anchor (median, same run)")
    for group, times in sorted(groups.items()):
        ours = {k: v for k, v in times.items() if k.startswith("bitswitch")}
        others = {k: v for k, v in times.items() if not k.startswith("bitswitch")}
        for name, t in sorted(ours.items()):
            ratios = "  ".join(f"x{o}={ot / t:.2f}" for o, ot in sorted(others.items()))
            terminalreporter.write_line(f"{group:<34} {name:<14} {t * 1e6:10.1f} us  {ratios}")
