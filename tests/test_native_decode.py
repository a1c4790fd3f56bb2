"""The native decode step (_C.DecodeStep): one native call per token on the CPU must give the
layer-by-layer path's logits bit for bit (the same kernels on the same inputs), keep the
cache and the page summaries as that path does, follow precision switches, and fall back to
that path wherever it does not apply."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from bitswitch import _C  # noqa: E402
from bitswitch.models.load import load  # noqa: E402
from test_qwen3 import VOCAB, make_hf  # noqa: E402


def decode(model, ids, prompt: int, native: bool, switch=None, capacity: int = 320):
    """Logits of decode steps ids[:, prompt:] after a prefill of ids[:, :prompt]; `switch`
    (step index -> callable) changes settings between steps, switch["init"] first."""
    model.native_decode = native
    if switch and "init" in switch:
        switch["init"](model)
    model.reset(batch=ids.shape[0], capacity=capacity)
    model(ids[:, :prompt])
    out = []
    for i in range(prompt, ids.shape[1]):
        if switch and i in switch:
            switch[i](model)
        out.append(model(ids[:, i:i + 1]))
    return torch.cat(out, 1), model.cache.k[:, :, :, :ids.shape[1]].clone()


def assert_same_as_python(model, ids, prompt, switch=None, capacity=320):
    got, k_got = decode(model, ids, prompt, True, switch, capacity)
    assert model._native is not None and model._native[2] is not None  # the native step ran
    ref, k_ref = decode(model, ids, prompt, False, switch, capacity)
    assert torch.equal(got, ref)
    assert torch.equal(k_got, k_ref)


@pytest.mark.parametrize("kind,tied,dtype", [("qwen3", True, "bfloat16"), ("qwen3", False, "float32"),
                                             ("qwen2", False, "bfloat16"), ("qwen2", True, "float16")])
def test_equals_python_path(tmp_path, kind, tied, dtype):
    """Both views, batch 1 and 2, Qwen2's q/k/v biases, three dtypes; k and v in the cache too."""
    make_hf(kind, tied).save_pretrained(tmp_path)
    model = load(tmp_path, dtype=dtype, group_size=32)
    for bits in (4, 8):
        model.set_bits(bits)
        for batch in (1, 2):
            ids = torch.randint(0, VOCAB, (batch, 40))
            assert_same_as_python(model, ids, 25)


def test_precision_switches_and_int8_activations(tmp_path):
    """Per-layer views and int8 activations, switched mid-decode (the step is rebuilt), and
    q|k|v and gate|up parts reading different views (computed part by part, as torch.cat of
    the parts' outputs)."""
    make_hf("qwen3", tied=False).save_pretrained(tmp_path)
    model = load(tmp_path, dtype="bfloat16", group_size=64)
    ids = torch.randint(0, VOCAB, (1, 60))
    switch = {
        "init": lambda m: (m.set_precision({"*": {"bits": 8}, "model.layers.1.*": {"bits": 4}}),
                           [setattr(q, "act_bits", 16) for q in m.linears().values()]),
        30: lambda m: m.set_bits(4),
        35: lambda m: [setattr(p, "act_bits", 8) for p in (m.layers[0].mlp.gate_proj, m.layers[0].mlp.up_proj,
                                                           m.layers[0].mlp.down_proj, m.lm_head)],
        38: lambda m: m.set_precision({"model.layers.0.mlp.*": {"bits": 8}, "lm_head": {"bits": 8}}),
        40: lambda m: m.set_precision({"model.layers.0.self_attn.v_proj": {"bits": 4}}),
        45: lambda m: m.set_precision({"model.layers.1.self_attn.k_proj": {"bits": 8},
                                       "model.layers.0.mlp.up_proj": {"bits": 4}}),
        50: lambda m: setattr(m.layers[1].self_attn.q_proj, "act_bits", 8),
    }
    assert_same_as_python(model, ids, 20, switch)
    # a setting seen before reuses its step (a controller switching back and forth builds none)
    model.native_decode = True
    seen = {}
    for bits in (4, 8, 4, 8):
        model.set_bits(bits)
        model(ids[:, :1])
        assert seen.setdefault(bits, model._native[2]) is model._native[2]
    assert seen[4] is not seen[8]
    # parts that could not be fused at load (an MLX checkpoint quantizing them differently)
    model.layers[1].self_attn.qkv.qlinear = None
    model.layers[0].mlp.gate_up.qlinear = None
    assert_same_as_python(model, ids, 20, {"init": lambda m: m.set_bits(8), 30: lambda m: m.set_bits(4)})


def test_sparse_pages(tmp_path):
    """Layers past their page budget select pages natively from DecodePages summaries across
    block boundaries; a layer turned sparse mid-decode; truncate marks summaries stale."""
    make_hf("qwen3", tied=False).save_pretrained(tmp_path)
    model = load(tmp_path, dtype="float32", group_size=32)
    model.set_bits(4)
    model.prefill_plan = {"method": "causal"}
    model.layers[0].self_attn.sparse = {"pages": 2}
    model.layers[1].self_attn.sparse = None
    ids = torch.randint(0, VOCAB, (2, 300))

    def sparse_1(m):
        m.layers[1].self_attn.sparse = {"pages": 3}

    def dense_1(m):
        m.layers[1].self_attn.sparse = None

    assert_same_as_python(model, ids, 100, {"init": dense_1, 200: sparse_1})
    assert model.cache.pages[0].length == 300 and model.cache.pages[1].length == 300
    dense_1(model)
    # the pages mattered: the same steps with dense attention differ
    model.layers[0].self_attn.sparse = None
    dense, _ = decode(model, ids, 100, True)
    model.layers[0].self_attn.sparse = {"pages": 2}
    sparse, _ = decode(model, ids, 100, True)
    assert not torch.equal(dense[:, 60:], sparse[:, 60:])
    model.truncate(150)
    assert model.cache.pages[0].length == -1
    tail = torch.cat([model(ids[:, i:i + 1]) for i in range(150, 160)], 1)
    assert torch.equal(tail, sparse[:, 50:60])


@pytest.mark.parametrize("variant", [v for v, why in _C.cpu_info()["variants"].items() if why == "ok"])
def test_every_kernel_variant(tmp_path, variant):
    make_hf("qwen3", tied=True).save_pretrained(tmp_path)
    model = load(tmp_path, dtype="bfloat16", group_size=64)
    model.set_bits(4)
    _C.set_cpu_variant(variant)
    try:
        assert_same_as_python(model, torch.randint(0, VOCAB, (1, 30)), 20)
    finally:
        _C.set_cpu_variant("")


def test_fallbacks(tmp_path):
    """Float weights and hooks under the model take the layer-by-layer path (hooks run); a
    hook on the model itself does not stop the native step; reset with another capacity and
    .to() rebuild it."""
    make_hf("qwen3", tied=True).save_pretrained(tmp_path)
    model = load(tmp_path, dtype="float32", group_size=32, keep_float=True)
    ids = torch.randint(0, VOCAB, (1, 12))
    model.set_bits("full")
    model.reset()
    model(ids[:, :10])
    model(ids[:, 10:11])
    assert model._native[2] is None
    model.set_bits(8)
    seen = []
    h = model.layers[1].mlp.register_forward_hook(lambda mod, args, out: seen.append(1))
    model(ids[:, 11:12])
    assert seen == [1]
    h.remove()
    top = model.register_forward_hook(lambda mod, args, out: seen.append(2))
    model.truncate(10)
    model(ids[:, 10:11])
    assert seen == [1, 2] and model._native[2] is not None
    top.remove()
    step = model._native[2]
    model.reset(capacity=64)  # a new cache: a new step
    model(ids[:, :10])
    model(ids[:, 10:11])
    assert model._native[2] is not step
    step = model._native[2]
    assert model.to("cpu") is model and model._native is None  # nn.Module.to reaches Qwen3._apply
    model(ids[:, 11:12])
    assert model._native[2] is not step


def test_errors(tmp_path):
    make_hf("qwen3", tied=True).save_pretrained(tmp_path)
    model = load(tmp_path, dtype="bfloat16", group_size=32)
    model.set_bits(4)
    ids = torch.randint(0, VOCAB, (1, 8))
    model.reset(capacity=16)
    model(ids)
    with pytest.raises(ValueError, match=r"ids must be token ids in \[0, 300\), got 300"):
        model(torch.tensor([[VOCAB]]))
    assert model.cache.length == 8  # nothing happened
    step = model._native[2]
    logits = torch.empty((1, 1, VOCAB), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"pos must be in \[0, 16\)"):
        step.run([1], 16, [], logits)
    with pytest.raises(TypeError, match="logits must have the model's dtype bfloat16, got float32"):
        step.run([1], 8, [], logits.float())
    with pytest.raises(ValueError, match=r"logits must have shape \(1, 1, 300\)"):
        step.run([1], 8, [], logits[:, :, :10])
    with pytest.raises(ValueError, match="ids must hold one token per batch row"):
        step.run([1, 2], 8, [], logits)
    kmin = torch.zeros((1, 2, 1, 64))
    with pytest.raises(ValueError, match="pages must name distinct layers"):
        step.run([1], 8, [(5, kmin, kmin, 1, 64)], logits)
    with pytest.raises(ValueError, match=r"pages n must be in \[1, 1\]"):
        step.run([1], 8, [(0, kmin, kmin, 2, 64)], logits)
    with pytest.raises(ValueError, match="select_pages_at: kmin"):
        step.run([1], 8, [(0, kmin[..., :8], kmin, 1, 64)], logits)
    lin = model.lm_head
    spec = (lin.plane0, lin.plane1, lin.scales, lin.biases, 32, 4, 16, None)
    norm = model.norm.weight
    with pytest.raises(ValueError, match=r"DecodeStep: embed must be a \[300, 64\] weight, got plane0 of shape \(300, 16\)"):
        _C.DecodeStep((1, 64, 2, 1, 32, 128, VOCAB), 1e-6, spec, spec, norm, norm, norm, [])
    with pytest.raises(ValueError, match="DecodeStep: layers must not be empty"):
        _C.DecodeStep((1, lin.in_features, 2, 1, 32, 128, VOCAB), 1e-6, spec, spec, norm, norm, norm, [])
    with pytest.raises(ValueError, match="DecodeStep: lm_head bits must be 4 or 8"):
        _C.DecodeStep((1, lin.in_features, 2, 1, 32, 128, VOCAB), 1e-6, spec, spec[:5] + (6, 16, None), norm,
                      norm, norm, [])
