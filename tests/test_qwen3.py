"""The Qwen3 / Qwen2 model against transformers on tiny random checkpoints written by
transformers itself (fp32, eager attention, silu)."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import bitswitch as bs  # noqa: E402
from bitswitch.models.config import Qwen3Config, rope_inv_freq  # noqa: E402
from bitswitch.models.load import load  # noqa: E402
from bitswitch import torch as bt  # noqa: E402

VOCAB = 300


def make_hf(kind: str, tied: bool, rope_scaling=None, seed: int = 0):
    """A random transformers model; Hq * head_dim != hidden for Qwen3, Hkv < Hq in both."""
    torch.manual_seed(seed)
    if kind == "qwen3":
        cfg = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                       tie_word_embeddings=tied, hidden_act="silu", rope_theta=10000.0,
                                       max_position_embeddings=4096, rope_scaling=rope_scaling)
        model = transformers.Qwen3ForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied,
                                       hidden_act="silu")
        model = transformers.Qwen2ForCausalLM(cfg)
    model.config._attn_implementation = "eager"
    model = model.float().eval()
    with torch.no_grad():
        for p in model.parameters():  # norms and biases random too
            p.normal_(0, 0.05)
    return model


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


CASES = [("qwen3", True), ("qwen3", False), ("qwen2", False), ("qwen2", True)]


@pytest.fixture(params=["native", "torch"])
def layer_ops(request, monkeypatch):
    """The model's fused layer ops on the native kernels (eager CPU) or as the torch ops
    they replace (torch.compile, other devices)."""
    if request.param == "torch":
        monkeypatch.setattr("bitswitch.torch._native", lambda x: False)
    return request.param


@pytest.mark.parametrize("kind,tied", CASES)
def test_logits_match_transformers(tmp_path, kind, tied, layer_ops):
    hf = make_hf(kind, tied)
    hf.save_pretrained(tmp_path)
    ids = torch.randint(0, VOCAB, (2, 37))
    with torch.no_grad():
        ref = hf(ids).logits
    model = load(tmp_path, dtype="float32", keep_float=True, group_size=64)
    model.set_bits("full")
    assert rel(model(ids), ref) <= 1e-4

    # INT8: transformers with every projection and the embedding replaced by the dequantized
    # INT8 view is the oracle; the kernels' activations are 15-bit per group (~3e-5).
    deq = {}
    for name, lin in model.linears().items():
        deq[name] = torch.from_numpy(np.asarray(bs.dequantize(lin.qweight, bits=8), np.float32))
    with torch.no_grad():
        for name, w in deq.items():
            path = "model.embed_tokens" if name == "embed_tokens.lin" else ("model." + name if name != "lm_head" else name)
            hf.get_submodule(path).weight.copy_(w)
    with torch.no_grad():
        ref8 = hf(ids).logits
    model.set_bits(8)
    model.reset(2)
    out8 = model(ids)
    assert rel(out8, ref8) <= 2e-4
    assert rel(out8, ref) <= 0.1  # and INT8 stays near the float model


@pytest.mark.parametrize("kind", ["qwen3", "qwen2"])
def test_prefill_then_decode_equals_one_forward(tmp_path, kind, layer_ops):
    """Float weights: equal to rounding. INT8: decode steps take the GEMV path (activations
    quantized to 15 bits per group) where the prompt takes the float GEMM, so ~3e-5 apart."""
    make_hf(kind, tied=True).save_pretrained(tmp_path)
    model = load(tmp_path, dtype="float32", group_size=32, keep_float=True)
    ids = torch.randint(0, VOCAB, (1, 30))
    for bits, tol in (("full", 1e-5), (8, 3e-4), (4, 3e-4)):
        model.set_bits(bits)
        model.reset()
        full = model(ids)
        model.reset()
        parts = [model(ids[:, :17])] + [model(ids[:, i:i + 1]) for i in range(17, 25)] + [model(ids[:, 25:])]
        assert rel(torch.cat(parts, dim=1), full) <= tol, bits
        assert model.cache.length == 30


def test_yarn_matches_transformers(tmp_path):
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}
    hf = make_hf("qwen3", tied=True, rope_scaling=scaling)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_ref, att_ref = ROPE_INIT_FUNCTIONS["yarn"](hf.config, "cpu")
    hf.save_pretrained(tmp_path)
    cfg = Qwen3Config.from_file(tmp_path / "config.json")
    inv, att = rope_inv_freq(cfg)
    assert cfg.rope_scaling["factor"] == 4.0
    assert torch.allclose(inv, inv_ref, rtol=1e-6) and att == pytest.approx(att_ref)
    ids = torch.randint(0, VOCAB, (1, 50))
    with torch.no_grad():
        ref = hf(ids).logits
    model = load(tmp_path, dtype="float32", keep_float=True)
    model.set_bits("full")
    assert rel(model(ids), ref) <= 1e-4


def test_config_spellings_agree():
    base = dict(model_type="qwen3", vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=128, max_position_embeddings=40960)
    v4 = Qwen3Config.from_dict(dict(base, rope_theta=1e6, rope_scaling={"type": "yarn", "factor": 4.0,
                                                                          "original_max_position_embeddings": 32768}))
    v5 = Qwen3Config.from_dict(dict(base, rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                                           "original_max_position_embeddings": 32768}))
    assert v4.rope_theta == v5.rope_theta == 1e6
    assert torch.equal(rope_inv_freq(v4)[0], rope_inv_freq(v5)[0])
    plain = Qwen3Config.from_dict(dict(base, rope_parameters={"rope_type": "default", "rope_theta": 5e5}))
    assert plain.rope_scaling is None and plain.rope_theta == 5e5


def test_bad_configs_and_checkpoints(tmp_path):
    base = dict(model_type="qwen3", vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=128)
    with pytest.raises(ValueError, match="num_hidden_layers must be an integer"):
        Qwen3Config.from_dict(dict(base, num_hidden_layers=10 ** 9))
    with pytest.raises(ValueError, match="missing 'vocab_size'"):
        Qwen3Config.from_dict({k: v for k, v in base.items() if k != "vocab_size"})
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        Qwen3Config.from_dict(dict(base, num_key_value_heads=3))
    with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
        Qwen3Config.from_dict(dict(base, model_type="llama"))
    with pytest.raises(ValueError, match="rope_scaling type 'dynamic'"):
        Qwen3Config.from_dict(dict(base, rope_scaling={"type": "dynamic", "factor": 2.0}))

    good = tmp_path / "good"
    make_hf("qwen3", tied=False).save_pretrained(good)
    from safetensors.torch import load_file, save_file

    tensors = load_file(good / "model.safetensors")
    config = (good / "config.json").read_text()

    def variant(name, mutate):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(config)
        t = dict(tensors)
        mutate(t)
        save_file(t, d / "model.safetensors")
        return d

    d = variant("missing", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match="missing .*model.layers.1.mlp.up_proj.weight"):
        load(d)
    d = variant("shape", lambda t: t.__setitem__("model.norm.weight", torch.ones(64)))
    with pytest.raises(ValueError, match=r"model.norm.weight has shape \(64,\), the config implies \(128,\)"):
        load(d)
    d = variant("extra", lambda t: t.__setitem__("model.layers.0.mlp.up_proj.scales", torch.ones(2)))
    with pytest.raises(ValueError, match="unexpected tensors"):
        load(d)
    d = variant("dtype", lambda t: t.__setitem__("model.norm.weight", torch.ones(128, dtype=torch.int32)))
    with pytest.raises(ValueError, match="dtype I32"):
        load(d)
    trunc = tmp_path / "truncated"
    trunc.mkdir()
    (trunc / "config.json").write_text(config)
    blob = (good / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        load(trunc)
    bad = tmp_path / "badconfig"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load(bad)
    pick = tmp_path / "pickle"
    pick.mkdir()
    (pick / "config.json").write_text(config)
    (pick / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="safetensors only"):
        load(pick)
    d = tmp_path / "cfg_mismatch"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(dict(json.loads(config), intermediate_size=512)))
    (d / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="has shape"):
        load(d)


def test_sparse_attention_layers(tmp_path):
    """Sparse layers: a selection that keeps every block (tau 1) and a page budget covering
    the cache reproduce dense attention; a small budget reads fewer pages and stays finite."""
    make_hf("qwen3", tied=True).save_pretrained(tmp_path)
    model = load(tmp_path, dtype="float32", keep_float=True)
    model.set_bits("full")
    ids = torch.randint(0, VOCAB, (1, 300))
    dense = [model(ids[:, :290])] + [model(ids[:, i:i + 1]) for i in range(290, 300)]
    for layer in model.layers:
        layer.self_attn.sparse = {"pages": 100}
    model.prefill_plan = {"method": "select", "tau": 1.0}
    model.reset()
    assert model.cache.summaries is not None
    sparse = [model(ids[:, :290])] + [model(ids[:, i:i + 1]) for i in range(290, 300)]
    assert rel(torch.cat(sparse, 1), torch.cat(dense, 1)) <= 1e-5
    for layer in model.layers:
        layer.self_attn.sparse = {"pages": 1, "prefill": {"method": "streaming", "sinks": 1, "window": 1}}
    model.reset()
    out = [model(ids[:, :290])] + [model(ids[:, i:i + 1]) for i in range(290, 300)]
    out = torch.cat(out, 1)
    assert torch.isfinite(out).all() and rel(out, torch.cat(dense, 1)) > 1e-4


@pytest.mark.parametrize("kind", ["qwen3", "qwen2"])
def test_forward_at_equals_decode_steps(tmp_path, kind):
    """forward_at (the step CUDA graphs capture: position from a tensor, whole-cache causal
    attention, batch 2) gives the logits of ordinary decode steps, in every view, and writes
    the same cache rows."""
    make_hf(kind, tied=False).save_pretrained(tmp_path)
    model = load(tmp_path, dtype="float32", group_size=32)
    ids = torch.randint(0, VOCAB, (2, 20))
    for bits in (8, 4):
        model.set_bits(bits)
        model.reset(batch=2, capacity=48)
        model(ids[:, :12])
        steps = [model(ids[:, i:i + 1]) for i in range(12, 20)]
        k_ref = model.cache.k[:, :, :, :20].clone()
        model.truncate(12)
        for i, ref in zip(range(12, 20), steps):
            got = model.forward_at(ids[:, i:i + 1], torch.full((2,), i, dtype=torch.int32))
            model.cache.length += 1
            assert rel(got, ref) <= 3e-4, (bits, i)
        assert rel(model.cache.k[:, :, :, :20], k_ref) <= 1e-5
    assert model.decode_is_dense()


def test_forward_at_selects_pages_like_decode(tmp_path):
    """Sparse layers past their page budget: forward_at (pages chosen by select_pages_at from
    summaries kept on the cache's device) gives the logits of ordinary decode steps (pages
    from select_pages on the host), across block boundaries, after a precision switch that
    makes a layer sparse mid-decode (its summaries rebuilt), and after truncate (dropped)."""
    make_hf("qwen3", tied=False).save_pretrained(tmp_path)
    model = load(tmp_path, dtype="float32", group_size=32)
    model.set_bits(8)
    ids = torch.randint(0, VOCAB, (1, 420))
    model.layers[0].self_attn.sparse = {"pages": 3}
    model.prefill_plan = {"method": "causal"}
    model.reset(capacity=512)

    def run(stepper):
        model.truncate(0)
        model.layers[1].self_attn.sparse = None
        model(ids[:, :300])
        out = []
        for i in range(300, 420):
            if i == 360:
                model.layers[1].self_attn.sparse = {"pages": 4}
            out.append(stepper(ids[:, i:i + 1]))
        return torch.cat(out, 1)

    def at(x):
        logits = model.forward_at(x, torch.full((1,), model.cache.length, dtype=torch.int32))
        model.cache.length += 1
        model.mark_decoded()
        return logits

    ref = run(model)
    assert not model.decode_is_dense()
    got = run(at)
    assert rel(got, ref) <= 3e-4
    assert model.cache.pages[1] is not None and model.cache.pages[1].length == 420
    dense = [layer.self_attn.sparse for layer in model.layers]
    for layer in model.layers:
        layer.self_attn.sparse = None
    model.truncate(300)
    full = torch.cat([model(ids[:, i:i + 1]) for i in range(300, 310)], 1)
    assert rel(full, ref[:, :10]) > 1e-3  # pages mattered: the check above compares sparse steps
    for layer, sp in zip(model.layers, dense):
        layer.self_attn.sparse = sp
    model.truncate(300)  # summaries stale but kept in place (captured graphs hold their addresses)
    assert all(p is None or p.length == -1 for p in model.cache.pages)
    kept = [(p, p.kmin.data_ptr()) for p in model.cache.pages]
    model.layers[1].self_attn.sparse = None  # as in the first 60 steps
    got = torch.cat([at(ids[:, i:i + 1]) for i in range(300, 310)], 1)
    assert rel(got, ref[:, :10]) <= 3e-4
    assert all(p is q and p.kmin.data_ptr() == ptr for (q, ptr), p in zip(kept, model.cache.pages))


def test_device_pages_in_eager_decode(tmp_path, monkeypatch):
    """Eager decode selects pages with DecodePages (select_pages_at where the cache lives);
    it gives the logits of host-side selection (KeyBlockSummary + select_pages, the path of
    MPS) and keeps the summaries current step after step (no rebuild once past the budget)."""
    make_hf("qwen3", tied=False).save_pretrained(tmp_path)
    model = load(tmp_path, dtype="float32", group_size=32)
    model.set_bits(4)
    for layer in model.layers:
        layer.self_attn.sparse = {"pages": 2}
    model.prefill_plan = {"method": "causal"}
    ids = torch.randint(0, VOCAB, (1, 260))
    model.reset(capacity=300)

    def run():
        model.truncate(0)
        model(ids[:, :100])
        return torch.cat([model(ids[:, i:i + 1]) for i in range(100, 260)], 1)

    rebuilds = []
    orig = bt.DecodePages.rebuild
    monkeypatch.setattr(bt.DecodePages, "rebuild", lambda self, k, n: (rebuilds.append(n), orig(self, k, n)))
    got = run()
    assert rebuilds == [128, 128]  # each layer once, at the first step past 2 pages (position 128)
    assert all(p.length == 260 for p in model.cache.pages)
    monkeypatch.setattr("bitswitch.models.qwen3._pages_on_device", lambda q: False)
    ref = run()
    assert all(p.length == -1 for p in model.cache.pages)  # truncate marked them stale; host path since
    assert rel(got, ref) <= 3e-4


def test_to_moves_and_converts_the_fused_weights(tmp_path):
    """model.to(dtype / device) converts q|k|v and gate|up once, leaving the parts row views of
    the fused copy (no fused copy left behind, no copy per part); a new dtype becomes the
    model's (activations, cache, logits)."""
    make_hf("qwen3", tied=True).save_pretrained(tmp_path)
    model = load(tmp_path, dtype="float32", group_size=32)
    ids = torch.randint(0, VOCAB, (1, 20))
    ref = model(ids)

    def views(model, dtype, device):
        for layer in model.layers:
            for f in (layer.self_attn.qkv, layer.mlp.gate_up):
                q = f.qlinear
                assert q.scales.dtype == dtype and q.plane0.device.type == device
                row = 0
                for p in f.parts:
                    for n in ("plane0", "scales", "biases"):
                        assert getattr(p, n).data_ptr() == getattr(q, n)[row:].data_ptr(), n
                    row += p.out_features

    assert model.to(torch.float16) is model
    views(model, torch.float16, "cpu")
    out = model(ids)
    assert out.dtype == torch.float16 and model.cache.k.dtype == torch.float16
    assert rel(out.float(), ref) <= 1e-2
    model.to("meta")  # what .to("cuda") does to every buffer, without a GPU
    views(model, torch.float16, "meta")
    assert model.norm.weight.device.type == "meta" and model.lm_head.plane0.device.type == "meta"
