"""bitswitch.torch.quantize_model on Hugging Face transformers models (tiny random Llama,
Mistral, Qwen2, Qwen3 causal LMs): the logits follow the chosen view, generate() keeps
working, precision policies switch layers, torch.compile traces the result."""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import bitswitch as bs  # noqa: E402
import bitswitch.torch as bt  # noqa: E402

VOCAB = 300


def make(family: str, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
    cfg = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config,
           "qwen3": transformers.Qwen3Config}[family](**common)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def oracle(model, quantized, bits):
    """The float model with every quantized layer's weight replaced by its dequantized view."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for path, m in quantized.named_modules():
            if isinstance(m, bt.QLinear):
                w = bs.dequantize_f64(m.qweight.numpy(), bits)
                ref.get_submodule(path).weight.copy_(torch.from_numpy(w.astype(np.float32)))
    return ref


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_logits_follow_the_view_and_generate_works(family):
    model = make(family)
    q = bt.quantize_model(copy.deepcopy(model), bits=8, group_size=64)
    linears = [p for p, m in q.named_modules() if isinstance(m, bt.QLinear)]
    assert len(linears) == 2 * 7 and "lm_head" not in linears  # q k v o gate up down per layer
    ids = torch.randint(0, VOCAB, (2, 17))
    with torch.no_grad():
        for bits in (8, 4):
            assert bt.set_precision(q, bits) == (0 if bits == 8 else len(linears))
            got = q(ids).logits
            ref = oracle(model, q, bits)(ids).logits
            # the kernels' activations are 15-bit per group (~3e-5 relative)
            assert rel(got, ref) <= 3e-4, (family, bits)
        out = q.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 11) and torch.equal(out[:, :5], ids[:1, :5])


def test_policies_keep_float_and_lm_head():
    model = make("qwen3", seed=1)
    q = bt.quantize_model(copy.deepcopy(model), bits=4, keep_float=True, lm_head=True,
                          policy={"*": "performance", "model.layers.0.mlp": 4, 1: 8})
    bits = {p: m.bits for p, m in q.named_modules() if isinstance(m, bt.QLinear)}
    assert bits["lm_head"] == "full" and bits["model.layers.0.self_attn.q_proj"] == "full"
    assert bits["model.layers.0.mlp.up_proj"] == 4 and bits["model.layers.1.mlp.down_proj"] == 8
    ids = torch.randint(0, VOCAB, (1, 9))
    bt.set_precision(q, "full")
    with torch.no_grad():
        assert rel(q(ids).logits, model(ids).logits) <= 1e-5  # the kept float weights
    assert bt.set_precision(q, "efficiency") == len(bits)
    assert all(m.bits == 4 for m in q.modules() if isinstance(m, bt.QLinear))


def test_policy_errors_change_nothing():
    q = bt.quantize_model(make("llama", seed=2), bits=4)  # INT4 only: plane 0
    with pytest.raises(ValueError, match="lack the requested view"):
        bt.set_precision(q, {"model.layers.1": 8})
    assert all(m.bits == 4 for m in q.modules() if isinstance(m, bt.QLinear))
    with pytest.raises(ValueError, match="apply to bitswitch's Qwen3 model only"):
        bt.set_precision(q, {"*": {"attention": "sparse"}})
    with pytest.raises(ValueError, match="keep_float=True"):
        bt.quantize_model(make("llama"), bits="full")
    with pytest.raises(ValueError, match="no QLinear layers"):
        bt.set_precision(torch.nn.Sequential(torch.nn.ReLU()), 8)
    # a layer whose in_features is not a multiple of the group stays float; skip globs too
    m = torch.nn.Sequential(torch.nn.Linear(96, 64), torch.nn.Linear(64, 8), torch.nn.Linear(64, 64))
    bt.quantize_model(m, group_size=64, skip=["2"])
    assert [type(x).__name__ for x in m] == ["Linear", "QLinear", "Linear"]


def test_torch_compile_of_a_quantized_hf_model():
    model = bt.quantize_model(make("qwen3", seed=3), bits=8)
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model)
        # inductor fuses the float ops around the layers (norms, softmax) in its own order
        assert rel(compiled(ids).logits, eager) <= 2e-4
        bt.set_precision(model, 4)  # a switch between calls: the compiled model reads the new view
        eager4 = model(ids).logits
        assert rel(compiled(ids).logits, eager4) <= 2e-4
        assert rel(eager4, eager) > 2e-3
