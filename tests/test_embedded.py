"""The model bundled in the package (bitswitch/data/qwen3-tiny) against transformers' own
Qwen3ForCausalLM reading the same folder: the shipped files are a complete, loadable Qwen3
checkpoint, and bitswitch computes what transformers computes on them."""

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

import bitswitch  # noqa: E402
from bitswitch.models import default_model_path  # noqa: E402

PROMPT = "Return the number of items in the"


@pytest.fixture(scope="module")
def folder():
    return default_model_path()


@pytest.fixture(scope="module")
def tokenizer(folder):
    return tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf(folder):
    model = transformers.Qwen3ForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_bundled_files(folder, tokenizer):
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "qwen3" and cfg["tie_word_embeddings"]
    for key in ("hidden_size", "intermediate_size", "vocab_size"):
        assert cfg[key] % 64 == 0, key
    assert cfg["head_dim"] in (64, 128)
    assert cfg["num_attention_heads"] % cfg["num_key_value_heads"] == 0
    names = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
    specials = {t: tokenizer.token_to_id(t) for t in names}
    assert None not in specials.values() and max(specials.values()) < cfg["vocab_size"]
    eos = [specials["<|im_end|>"], specials["<|endoftext|>"]]
    assert cfg["eos_token_id"] == eos
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == eos
    tcfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert tcfg["eos_token"] == "<|im_end|>" and "chat_template" not in tcfg
    assert tokenizer.decode(tokenizer.encode(PROMPT).ids) == PROMPT
    assert sum(f.stat().st_size for f in folder.iterdir()) <= 8 * 2**20


def test_int8_and_int4_views(folder, hf):
    """Both quantized views load and stay close to the float model on fresh random tokens."""
    ids = torch.randint(0, hf.config.vocab_size, (1, 48))
    with torch.no_grad():
        ref = hf(ids).logits
    model = bitswitch.load(folder, dtype="float32")
    out8 = model(ids)
    model.set_bits(4)
    model.reset()
    out4 = model(ids)
    assert torch.isfinite(out8).all() and torch.isfinite(out4).all()
    assert out8.shape == out4.shape == ref.shape
    err8, err4 = rel(out8, ref), rel(out4, ref)
    assert err8 <= 0.05
    assert err8 < err4 <= 0.5  # INT4 reads half the bits: further from the float model, still near it


def test_full_tier_matches_transformers(folder, hf, tokenizer):
    ids = torch.cat([torch.tensor([tokenizer.encode(PROMPT).ids]),
                     torch.randint(0, hf.config.vocab_size, (1, 24))], dim=1)
    with torch.no_grad():
        ref = hf(ids).logits
    model = bitswitch.load(folder, dtype="float32", keep_float=True)
    model.set_bits("full")
    assert rel(model(ids), ref) <= 1e-4


def test_greedy_decoding_matches_transformers(folder, hf, tokenizer):
    prompt = torch.tensor([tokenizer.encode(PROMPT).ids])
    n_new = 24
    with torch.no_grad():
        ref = hf.generate(prompt, do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new, temperature=None,
                          top_k=None, top_p=None, repetition_penalty=None, pad_token_id=hf.config.pad_token_id)
    ref_new = ref[0, prompt.shape[1]:].tolist()

    model = bitswitch.load(folder, dtype="float32", keep_float=True)
    model.set_bits("full")
    model.reset()
    logits = model(prompt)
    out = []
    for _ in range(n_new):
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        logits = model(torch.tensor([[nxt]]))
    assert out == ref_new
    assert tokenizer.decode(out).strip()  # the continuation is text, not only special tokens
