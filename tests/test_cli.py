"""The bitswitch command."""

import json
import subprocess
import sys

import pytest

import bitswitch as bs
from bitswitch import cli


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"bitswitch {bs.__version__}" in out
    assert "kernel variant selected:" in out and "cuda:" in out and "metal:" in out
    assert bs.ops.cpu_variant() in out


def test_info_as_a_command():
    out = subprocess.run([sys.executable, "-m", "bitswitch.cli", "info"], capture_output=True, text=True, check=True)
    assert "kernel variant selected" in out.stdout


def test_bench_smoke(tmp_path, capsys):
    report = tmp_path / "r.json"
    rc = cli.main(["bench", "kernels", "--preset", "smoke", "--anchors", "torch_bf16", "--stream-bytes", "2e6",
                   "--min-time", "0.01", "--json", str(report), "--markdown"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "read bandwidth" in out and "| shape |" in out
    d = json.loads(report.read_text())
    assert {(r["m"], r["view"]) for r in d["rows"]} == {(m, v) for m in (1, 16) for v in ("w4", "w4a8", "w8")}
    assert {(r["bits"], r["act_bits"]) for r in d["rows"]} == {(4, 16), (4, 8), (8, 16)}
    assert all(r["us"] > 0 and r["anchors_us"]["torch_bf16"] > 0 and r["speedups"]["torch_bf16"] > 0
               for r in d["rows"])


def test_bench_variants_in_one_run(tmp_path, capsys):
    from conftest import available_variants

    variants = available_variants()[-2:]
    report = tmp_path / "r.json"
    rc = cli.main(["bench", "kernels", "--preset", "smoke", "--anchors", "", "--m", "33", "--views", "w4",
                   "--stream-bytes", "2e6", "--min-time", "0.01", "--variants", ",".join(variants),
                   "--x-dtype", "float32", "--json", str(report)])
    assert rc == 0
    d = json.loads(report.read_text())
    assert [r["variant"] for r in d["rows"]] == variants and d["x_dtype"] == "float32"
    assert "x float32" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["bench", "kernels", "--preset", "smoke", "--variants", "sse9"])


def test_bench_attention_smoke(tmp_path, capsys):
    pytest.importorskip("torch")
    report = tmp_path / "a.json"
    rc = cli.main(["bench", "attention", "--lengths", "256", "--densities", "1,0.5", "--decode-len", "1024",
                   "--pages", "4", "--heads", "4", "--kv-heads", "2", "--reps", "1", "--json", str(report),
                   "--markdown"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| kind | L |" in out
    rows = json.loads(report.read_text())["rows"]
    assert [(r["kind"], r["density"]) for r in rows] == [("prefill", 1.0), ("prefill", 0.5), ("decode", 1.0),
                                                        ("decode", 4 / 16), ("decode-at", 4 / 16)]
    assert all(r["ms"] > 0 and r["sdpa_ms"] > 0 for r in rows)
    assert 0.5 <= rows[1]["actual_density"] < 1.0


def test_bench_gpu_without_a_gpu(capsys):
    """`bitswitch bench gpu` (and bench/gpu.py) needs a CUDA GPU: without one it says so and
    returns 2 instead of failing somewhere inside."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: tests/test_cuda.py and bench/gpu_check.sh run the benchmark there")
    assert cli.main(["bench", "gpu", "--quick"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
