"""`bitswitch bench e2e` on the smoke preset: the command runs end to end (every mode in its
own process) and its report has the promised structure. No timing is asserted."""

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import bitswitch as bs  # noqa: E402
from bitswitch import bench_e2e, cli  # noqa: E402


def test_smoke_report(tmp_path, capsys):
    report = tmp_path / "e2e.json"
    rc = cli.main(["bench", "e2e", "--preset", "smoke", "--modes", "int8,int4,hf_bf16", "--bandwidth-bytes", "4e6",
                   "--json", str(report), "--markdown", "--layerwise"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "read bandwidth" in out and "| model | mode | prefill tok/s |" in out
    d = json.loads(report.read_text())
    assert (d["prompt"], d["new_tokens"], d["threads"]) == (32, 8, 2)
    rows = {r["mode"]: r for r in d["rows"]}
    assert list(rows) == ["int8", "int4", "hf_bf16"] and all(r["model"] == "smoke" for r in d["rows"])
    for r in d["rows"]:
        assert r["prefill_tps"] > 0 and r["decode_tps"] > 0 and 0 < r["roofline_frac"]
        assert len(r["tokens"]) == 8 and all(0 <= t < bench_e2e.SHAPES["smoke"]["vocab"] for t in r["tokens"])
        assert r["rss_peak"] >= r["rss_imports"] > 0 and r["rss_delta"] == r["rss_peak"] - r["rss_imports"]
        assert r["rss_ratio"] == pytest.approx(r["rss_delta"] / (r["weight_bytes"] + r["kv_bytes"]))
    assert rows["hf_bf16"]["x_hf_decode"] == pytest.approx(1.0)
    # --layerwise: the layer-by-layer path timed too (it generated the same tokens, or the run fails)
    assert rows["hf_bf16"]["x_layerwise"] is None and rows["int4"]["x_layerwise"] > 0
    assert "| × layerwise |" in out
    # INT4 holds plane 0 only: its resident weights and the bytes a token reads are ~half of INT8's.
    assert 0.45 < rows["int4"]["weight_bytes"] / rows["int8"]["weight_bytes"] < 0.6
    assert 0.45 < rows["int4"]["read_bytes_per_token"] / rows["int8"]["read_bytes_per_token"] < 0.6
    # transformers reads the bf16 weights: 2 bytes per weight against INT8's 1 + scales.
    assert 1.6 < rows["hf_bf16"]["read_bytes_per_token"] / rows["int8"]["read_bytes_per_token"] < 2.0


def test_transformers_anchor_holds_the_int8_view():
    """The anchor's weights are the bitswitch model's INT8 view, and both models agree on the
    logits (transformers in bf16 on the dequantized weights is the independent oracle)."""
    hf = bench_e2e.build_transformers("smoke", 64, seed=3)
    ours = bench_e2e.build_bitswitch("smoke", 8, 64, seed=3)
    for name, lin in ours.linears().items():
        path = "model.embed_tokens" if name == "embed_tokens.lin" else "model." + name
        assert torch.equal(hf.get_submodule(path).weight, bs.dequantize(lin.qweight, bits=8)), name
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    ids = torch.randint(0, bench_e2e.SHAPES["smoke"]["vocab"], (1, 24))
    with torch.inference_mode():
        ref = hf(ids).logits.float()
        got = ours(ids).float()
    assert float((got - ref).abs().max() / ref.abs().max()) < 0.05  # ~0.015 seen


def test_bad_arguments():
    with pytest.raises(SystemExit):
        bench_e2e.main(["--models", "7b"])
    with pytest.raises(SystemExit):
        bench_e2e.main(["--modes", "int2"])
    with pytest.raises(SystemExit):
        bench_e2e.main(["--new-tokens", "1"])
