"""Run-time precision switching: policies resolve as documented, a switch changes which
planes the next forward reads (bit-identical to a model saved and loaded in that precision),
allocates nothing, refuses views a layer lacks, and takes effect only between tokens when
another thread is generating."""

import json
import random
import threading
import time

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from bitswitch import precision as P  # noqa: E402
from bitswitch.models import load, save_quantized  # noqa: E402

VOCAB, LAYERS = 256, 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3")
    torch.manual_seed(1)
    cfg = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=LAYERS,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=False,
                                   hidden_act="silu", rope_theta=10000.0, max_position_embeddings=4096)
    hf = transformers.Qwen3ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.05)
    hf.save_pretrained(path)
    return path


def storages(model):
    return sorted(t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers()))


def test_modes_and_views_are_bit_identical_to_saved_models(folder, tmp_path, rng):
    ids = torch.from_numpy(rng.integers(0, VOCAB, (1, 40)))
    model = load(folder, dtype="float32", keep_float=True)
    before = storages(model)
    ref8 = model(ids)
    rep = model.set_precision({"*": {"bits": 4}})
    scale_bits = 8 * model.lm_head.scales.element_size()
    assert rep.bits_per_weight == pytest.approx(4 + 2 * scale_bits / 64)  # codes + a scale and a bias per 64
    model.reset()
    out4 = model(ids)
    model.set_precision({"*": {"bits": 8}})
    model.reset()
    assert torch.equal(model(ids), ref8)  # back to INT8: the same logits, bit for bit
    model.set_precision("full")
    model.reset()
    full = model(ids)
    assert storages(model) == before  # switching allocated and replaced nothing

    # A model saved with plane 0 only and loaded again computes the INT4 logits exactly.
    save_quantized(folder, tmp_path / "int4", bits=4)
    int4 = load(tmp_path / "int4", dtype="float32")
    assert torch.equal(int4(ids), out4)
    assert not torch.equal(out4, ref8) and not torch.equal(full, ref8)


def test_policy_globs_and_layer_indices_resolve_as_documented(folder):
    model = load(folder, dtype="float32")
    rep = model.set_precision([("*", "efficiency"), (0, {"bits": 8}), ("model.layers.*.mlp.down_proj", 8),
                               ("model.layers.2.self_attn", {"attention": "dense"}), (-1, {"pages": 16}),
                               ("lm_head", 8)])
    b = rep.by_path
    assert all(b[f"model.layers.0.{p}"] == 8 for p in P._PROJECTIONS)       # a layer index covers the layer
    assert [b[f"model.layers.{i}.mlp.down_proj"] for i in range(LAYERS)] == [8] * LAYERS
    assert [b[f"model.layers.{i}.mlp.up_proj"] for i in range(LAYERS)] == [8, 4, 4, 4]
    assert b["lm_head"] == 8 and b["model.embed_tokens"] == 4
    assert [layer["attention"] for layer in rep.layers] == ["sparse", "sparse", "dense", "sparse"]
    assert rep.layers[3]["options"] == {"tau": 0.9, "pages": 16}
    assert rep.layers[0]["options"] == dict(P.SPARSE_DEFAULTS)
    # Entries apply on top of the current setting; a mode resets everything it covers.
    model.set_precision({"model.layers.1.mlp": {"bits": 8}})
    assert model.precision().by_path["model.layers.1.mlp.gate_proj"] == 8
    assert model.precision().by_path["model.layers.1.self_attn.q_proj"] == 4
    model.set_precision("performance")
    rep = model.precision()
    assert set(rep.by_path.values()) == {8} and all(layer["attention"] == "dense" for layer in rep.layers)
    assert "MiB of weights per token" in str(rep)


def test_plan_files_and_bad_policies(folder, tmp_path):
    model = load(folder, dtype="float32")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"format": P.PLAN_FORMAT, "version": 1, "policy": {"*": {"bits": 4}, "1": {"bits": 8}}}))
    rep = model.set_precision(str(plan))
    assert rep.by_path["model.layers.1.mlp.up_proj"] == 8 and rep.by_path["model.layers.2.mlp.up_proj"] == 4
    model.set_precision(plan)  # a Path works too
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"policy": {}}))
    with pytest.raises(ValueError, match="is not a bitswitch plan"):
        model.set_precision(bad)
    with pytest.raises(ValueError, match="not a mode"):
        model.set_precision("turbo")
    with pytest.raises(ValueError, match="matches no module"):
        model.set_precision({"model.layers.9": 4})
    with pytest.raises(ValueError, match="layer index 7 is out of range"):
        model.set_precision({7: 4})
    with pytest.raises(ValueError, match="bits must be 4, 8 or 'full'"):
        model.set_precision({"*": {"bits": 3}})
    with pytest.raises(ValueError, match="unknown keys"):
        model.set_precision({"*": {"bitz": 4}})
    with pytest.raises(ValueError, match="add 'attention': 'sparse'"):
        model.set_precision({"*": "performance", 0: {"pages": 8}})
    with pytest.raises(ValueError, match="lack a kept float weight .*model.layers.0.self_attn.q_proj"):
        model.set_precision("full")
    assert set(model.precision().by_path.values()) == {4, 8}  # every failed call changed nothing


def test_int4_checkpoint_refuses_int8_naming_the_layers(folder, tmp_path):
    save_quantized(folder, tmp_path / "q4", bits=4)
    model = load(tmp_path / "q4", dtype="float32")
    with pytest.raises(ValueError, match=r"bits=8 asked of \d+ weights that lack plane 1 .*model.layers.0"):
        model.set_precision("performance")
    model.set_precision({"*": {"attention": "sparse"}})  # attention switches on any checkpoint


def test_switching_while_generating_keeps_each_token_consistent(folder, rng):
    """A thread generates (teacher-forced, so replayable) while another flips the whole model
    between INT8 and INT4 as fast as it can. Afterwards every step is replayed in one thread
    under the setting that step reported: the logits must match bit for bit, which a token
    computed with some layers in one setting and some in the other would not."""
    ids = rng.integers(0, VOCAB, 64).tolist()
    model = load(folder, dtype="float32")
    policies = [{"*": {"bits": 8}}, {"*": {"bits": 4}}]
    stop = threading.Event()
    switches = [0]

    def switcher():
        # A random setting each time, not alternating: with a steady rhythm the setting in
        # place when a step starts can be the same every time (the native decode step holds
        # the GIL at regular points), and the check below needs both.
        pick = random.Random(int(rng.integers(1 << 31)))
        while not stop.is_set():
            model.set_precision(policies[pick.randrange(2)])
            switches[0] += 1

    model.set_precision(policies[0])
    model.reset()
    t = threading.Thread(target=switcher)
    t.start()
    steps = []
    def after_a_switch():  # the switcher has moved on since the last step (a decode step can be
        n = switches[0]    # shorter than one set_precision call: without this, a fast generation
        while switches[0] == n and t.is_alive():  # may see a single setting)
            time.sleep(0)

    try:
        steps.append((model(torch.tensor([ids[:8]])), model.forward_precision))
        for tok in ids[8:]:
            after_a_switch()
            steps.append((model(torch.tensor([[tok]])), model.forward_precision))
    finally:
        stop.set()
        t.join()
    seen = [4 if set(a.bits.values()) == {4} else 8 if set(a.bits.values()) == {8} else None for _, a in steps]
    assert None not in seen and set(seen) == {4, 8}  # both settings were used, never a mixture
    model.reset()
    for i, ((logits, _), bits) in enumerate(zip(steps, seen)):
        model.set_precision({"*": {"bits": bits}})
        chunk = ids[:8] if i == 0 else [ids[7 + i]]
        assert torch.equal(model(torch.tensor([chunk])), logits), f"step {i} mixed two settings"
    assert switches[0] > len(steps)  # the switcher really ran during generation


def test_fused_projections_share_one_copy(folder):
    """q|k|v and gate|up are fused at load into one buffer each; the model's fused QLinear
    and the parts (which policies address) are views of it."""
    model = load(folder, dtype="float32")
    att = model.layers[1].self_attn
    fused = att.qkv.qlinear
    ptr = fused.plane0.untyped_storage().data_ptr()
    for p in (att.q_proj, att.k_proj, att.v_proj):
        assert p.plane0.untyped_storage().data_ptr() == ptr and p.plane1.untyped_storage().data_ptr() == \
            fused.plane1.untyped_storage().data_ptr()
    assert fused.out_features == sum(p.out_features for p in (att.q_proj, att.k_proj, att.v_proj))
    assert torch.equal(fused.plane0[att.q_proj.out_features:][:att.k_proj.out_features], att.k_proj.plane0)
