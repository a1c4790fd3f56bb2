"""bitswitch plan and precision="auto" on the embedded trained model: measured plans follow
their budgets, KL falls as the budget grows, a mixed plan beats uniform INT4; the knapsack
is exact against brute force; the controller settles without oscillating."""

import itertools
import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tokenizers")

from bitswitch import cli, planner  # noqa: E402
from bitswitch import precision as P  # noqa: E402
from bitswitch.controller import AutoPrecision, default_order  # noqa: E402
from bitswitch.models import SamplingParams, Tokenizer, default_model_path, generate, load  # noqa: E402

BUDGETS = [4.5, 5.0, 5.5, 6.0, 7.0, 8.5]


@pytest.fixture(scope="module")
def embedded():
    path = default_model_path()
    model, tok = load(path, dtype="float32"), Tokenizer.from_dir(path)
    model.reset(capacity=256)
    ids = planner.calibration_ids(tok, tokens=512, seq=128)
    units, ref = planner.measure_units(model, ids, granularity="block")
    return model, tok, ids, units, ref


@pytest.mark.parametrize("method", planner.METHODS)
def test_frontier_follows_budgets_and_kl_falls_with_them(embedded, method):
    model, _, ids, units, ref = embedded
    rows = planner.frontier(model, units, ids, ref, BUDGETS, method)
    kls = [r["kl"] for r in rows]
    assert all(a >= b for a, b in zip(kls, kls[1:])), kls  # monotone in the budget
    for r in rows:
        assert r["bits_per_weight"] <= r["budget_bits_per_weight"] + 1e-9
        assert 0 <= r["kl"] and 0 < r["top1"] <= 1
    assert rows[0]["bits_per_weight"] == pytest.approx(4.5) and rows[-1]["kl"] == 0 and rows[-1]["top1"] == 1
    uniform4 = planner.evaluate(model, ids, ref, {"*": {"bits": 4}})
    mixed6 = planner.make_plan(model, units, ids, ref, bits_per_weight=6.0, method=method)
    assert mixed6.measured["kl"] < uniform4["kl"] / 2  # a mixed plan at 6 bits per weight beats uniform INT4
    assert 0 < len(mixed6.int4) < len(units)


def brute_force(units, need):
    best = None
    for r in range(len(units) + 1):
        for combo in itertools.combinations(units, r):
            if sum(u.saved_bytes for u in combo) >= need:
                kl = sum(u.kl for u in combo)
                best = kl if best is None else min(best, kl)
    return best


def test_knapsack_is_exact_and_greedy_covers_the_budget(rng):
    for _ in range(20):
        n = int(rng.integers(3, 11))
        units = [planner.Unit(f"u{i}", f"model.layers.{i}", int(rng.integers(1, 50)) * 4096, float(rng.random()))
                 for i in range(n)]
        total = sum(u.saved_bytes for u in units)
        need = int(rng.integers(1, total + 1))
        by_name = {u.name: u for u in units}
        for method in planner.METHODS:
            chosen = planner.choose(units, need_bytes=need, method=method)
            assert sum(by_name[c].saved_bytes for c in chosen) >= need
        exact = brute_force(units, need)
        got = sum(by_name[c].kl for c in planner.choose(units, need_bytes=need, method="knapsack"))
        assert got == pytest.approx(exact, abs=1e-12)
        max_kl = float(rng.random()) * sum(u.kl for u in units)
        for method in planner.METHODS:
            chosen = planner.choose(units, max_kl=max_kl, method=method)
            assert sum(by_name[c].kl for c in chosen) <= max_kl + 1e-12
    with pytest.raises(ValueError, match="method must be one of"):
        planner.choose(units, need_bytes=1, method="anneal")


def test_plan_command_writes_a_usable_plan(tmp_path, capsys):
    out, png = tmp_path / "plan.json", tmp_path / "frontier.png"
    pytest.importorskip("matplotlib")
    assert cli.main(["plan", "--bits-per-weight", "6", "--granularity", "block", "-o", str(out),
                     "--plot", str(png), "--frontier", "4.5,6,8.5"]) == 0
    table = capsys.readouterr().out
    assert "KL vs INT8" in table and table.count("\n") >= 4
    data = json.loads(out.read_text())
    assert data["format"] == P.PLAN_FORMAT and data["measured"]["bits_per_weight"] <= 6.0
    assert len(data["units"]) == 2 * 4 + 1 and len(data["frontier"]) == 3
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = load(default_model_path(), dtype="float32")
    rep = model.set_precision(out)
    assert rep.bits_per_weight == pytest.approx(data["measured"]["bits_per_weight"])
    assert cli.main(["generate", "x", "--precision", str(out), "--max-new-tokens", "3", "--temperature", "0"]) == 0
    with pytest.raises(SystemExit):
        cli.main(["plan", "--bits-per-weight", "6", "--max-kl", "0.1"])
    assert cli.main(["plan", "--bits-per-weight", "3", "-o", str(tmp_path / "x.json"), "--frontier", ""]) == 1
    assert "below every weight in INT4" in capsys.readouterr().err


def test_auto_precision_settles_without_oscillating():
    """Decode time modelled as proportional to the weight bytes a token reads: the target
    lies between two settings, so the controller must drop units until it is met and then
    stay put (the next move back would miss the target)."""
    model = load(default_model_path(), dtype="float32")
    logs = []
    ctl = AutoPrecision(model, target_tps=100.0, window=4, cooldown=2, log=logs.append)
    assert ctl.order == default_order(4) and ctl.k == 0
    bytes_at = ctl._bytes
    bandwidth = bytes_at[0] * 80.0  # INT8 everywhere: 80 tokens/s; all INT4: ~170
    for _ in range(400):
        ctl.observe(bytes_at[ctl.k] / bandwidth)
    settled = ctl.k
    assert 0 < settled < len(ctl.order)
    assert bandwidth / bytes_at[settled] >= 100.0 > bandwidth / bytes_at[settled - 1]
    assert len(ctl.changes) == settled and all("-> INT4" in m for m in logs)  # straight down, never back
    # Faster hardware (or a shorter context): the controller climbs back to INT8 step by step.
    for _ in range(400):
        ctl.observe(bytes_at[ctl.k] / (bandwidth * 3))
    assert ctl.k == 0 and any("-> INT8" in m for m in logs)
    assert model.precision().by_path["model.layers.0.mlp.up_proj"] == 8
    with pytest.raises(ValueError, match="one of target_tps and target_latency"):
        AutoPrecision(model)


def test_auto_precision_in_generation(tmp_path, capsys):
    path = default_model_path()
    model, tok = load(path, dtype="float32"), Tokenizer.from_dir(path)
    model.reset(capacity=256)
    ctl = AutoPrecision(model, target_tps=1e9, window=2, cooldown=1)  # unreachable: drops every unit
    res = generate(model, tok, tok.encode("The list"), SamplingParams(temperature=0), max_new_tokens=40,
                   controller=ctl)
    assert res.generated_tokens == 40 and ctl.k == len(ctl.order)
    assert set(model.precision().by_path.values()) - {8} == {4}
    assert cli.main(["generate", "x", "--precision", "auto", "--target-tps", "1e9", "--max-new-tokens", "30",
                     "--temperature", "0"]) == 0
    assert "auto:" in capsys.readouterr().err
    assert cli.main(["generate", "x", "--precision", "auto"]) == 1
    assert "needs --target-tps" in capsys.readouterr().err


def test_bench_precision_smoke(tmp_path, capsys):
    """`bitswitch bench precision` runs end to end and reports every setting (no timing asserted)."""
    report = tmp_path / "p.json"
    assert cli.main(["bench", "precision", "--preset", "smoke", "--json", str(report), "--markdown"]) == 0
    assert "| embedded | efficiency |" in capsys.readouterr().out
    d = json.loads(report.read_text())
    rows = {r["setting"]: r for r in d["models"][0]["rows"]}
    assert list(rows) == ["performance", "efficiency", "plan 4.5 bpw", "plan 5 bpw", "plan 6 bpw"]
    assert rows["performance"]["kl"] == 0 and rows["efficiency"]["bits_per_weight"] == pytest.approx(4.5)
    assert all(r["decode_tps"] > 0 for r in rows.values())
    assert rows["plan 6 bpw"]["bits_per_weight"] <= 6.0 < rows["performance"]["bits_per_weight"]
    assert d["models"][0]["switch"]["apply_ms"] > 0
