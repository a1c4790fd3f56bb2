"""Tokenizer, sampling and generation: the tokenizer against transformers' on a tiny byte-level
BPE with Qwen's special tokens, each sampling filter against transformers' logits processors
and a float64 computation, greedy generation against transformers' generate on a tiny random
Qwen3, and streaming text against decoding all tokens at once."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")
pytest.importorskip("safetensors")

from bitswitch.models import SamplingParams, Tokenizer, filter_logits, generate, sample, stream  # noqa: E402
from bitswitch.models.load import load  # noqa: E402

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ADDED = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
CORPUS = ["the quick brown fox jumps over the lazy dog, said the user to the assistant",
          "héllo wörld, ünïcode façade", "中文 字符 测试 模型 你好", "emoji 🙂🚀 and text", "def f(x):\n    return x + 1"]


def build_tokenizer(path, chat_template=None, **config):
    """A byte-level BPE (~300 ids) with Qwen's special tokens, saved by transformers at `path`
    (chat_template.jinja when a template is given); returns the transformers tokenizer."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=290, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=SPECIAL)
    tok.train_from_iterator(CORPUS * 10, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED])
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                              pad_token="<|endoftext|>", chat_template=chat_template, **config)
    hf.save_pretrained(path)
    return hf


def make_hf_qwen3(vocab: int, seed: int):
    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
                                   hidden_act="silu", rope_theta=10000.0, max_position_embeddings=4096)
    model = transformers.Qwen3ForCausalLM(cfg)
    model.config._attn_implementation = "eager"
    model = model.float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def checkpoint(path, seed: int):
    """A tiny Qwen3 folder (weights, tokenizer) and (transformers model, bitswitch model, Tokenizer)."""
    hf_tok = build_tokenizer(path)
    hf = make_hf_qwen3(len(hf_tok), seed)
    hf.save_pretrained(path)
    model = load(path, dtype="float32", keep_float=True)
    model.set_bits("full")
    return hf, model, Tokenizer.from_dir(path)


@pytest.fixture
def seed(rng):
    return int(rng.integers(1 << 31))


# -- tokenizer -----------------------------------------------------------------------------------

def test_tokenizer_matches_transformers(tmp_path, rng):
    hf = build_tokenizer(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [2, 0], "do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 1}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.eos_token_ids == (2, 0, 1)  # generation_config, then config.json, then the eos token (2 again)
    assert tok.think_ids == (hf.convert_tokens_to_ids("<think>"), hf.convert_tokens_to_ids("</think>"))
    assert tok.default_sampling() == SamplingParams(temperature=0.6, top_k=20, top_p=0.95)
    alphabet = list("abc xyz,.éü中文字🙂\n") + ["<think>", "</think>", "<|im_end|>"]
    for _ in range(5):
        text = "".join(rng.choice(alphabet, size=40))
        ids = tok.encode(text)
        assert ids == hf.encode(text)
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids) == text

    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert Tokenizer.from_dir(tmp_path).default_sampling().greedy
    (tmp_path / "generation_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="generation_config.json is not valid JSON"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        Tokenizer.from_dir(tmp_path / "nowhere")


def test_stream_decoder_never_splits_characters(tmp_path, rng):
    build_tokenizer(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    alphabet = list("ab éü中文字🙂🚀ß\n")
    for _ in range(5):
        text = "".join(rng.choice(alphabet, size=30)) + "ß"  # not in the corpus: two byte-level tokens
        ids = tok.encode(text)
        dec = tok.stream_decoder()
        pieces = [dec.push(i) for i in ids] + [dec.flush()]
        assert all("\ufffd" not in p for p in pieces)
        assert "".join(pieces) == text
        assert sum(p != "" for p in pieces) < len(ids)  # some byte tokens waited for the rest of a character
    # Arbitrary id sequences (invalid UTF-8 included) still concatenate to the one-shot decoding.
    for _ in range(5):
        ids = rng.integers(0, tok.vocab_size, size=50).tolist()
        dec = tok.stream_decoder()
        assert "".join([dec.push(i) for i in ids] + [dec.flush()]) == tok.decode(ids)


# -- sampling -------------------------------------------------------------------------------------

def kept_by_transformers(logits: torch.Tensor, p: SamplingParams) -> set:
    from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    procs = LogitsProcessorList([TemperatureLogitsWarper(p.temperature)])
    if p.top_k:
        procs.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1:
        procs.append(TopPLogitsWarper(p.top_p))
    if p.min_p:
        procs.append(MinPLogitsWarper(p.min_p))
    out = procs(torch.zeros(1, 1, dtype=torch.long), logits[None].clone())[0]
    return set(torch.nonzero(torch.isfinite(out)).flatten().tolist())


def test_filters_match_references(rng):
    v = 500
    for _ in range(4):
        logits = torch.from_numpy(rng.standard_normal(v) * 3).float()
        x = logits.double().numpy()
        probs = np.exp(x - x.max())
        probs /= probs.sum()
        order = np.argsort(-probs)

        ids, vals = filter_logits(logits, SamplingParams(temperature=0.5))
        assert ids.tolist() == list(range(v)) and torch.allclose(vals, logits / 0.5)

        k = int(rng.integers(1, 50))
        ids, _ = filter_logits(logits, SamplingParams(top_k=k))
        assert set(ids.tolist()) == set(order[:k].tolist())

        top_p = float(rng.uniform(0.3, 0.95))
        ids, _ = filter_logits(logits, SamplingParams(top_p=top_p))
        n = int(np.searchsorted(np.cumsum(probs[order]), top_p) + 1)  # the smallest prefix reaching top_p
        assert set(ids.tolist()) == set(order[:n].tolist())
        assert probs[ids.numpy()].sum() >= top_p > probs[ids.numpy()].sum() - probs[ids.numpy()].min()

        min_p = float(rng.uniform(0.01, 0.3))
        ids, _ = filter_logits(logits, SamplingParams(min_p=min_p))
        assert set(ids.tolist()) == set(np.nonzero(probs >= min_p * probs.max())[0].tolist())

        for p in (SamplingParams(temperature=0.7, top_k=20, top_p=0.8), SamplingParams(temperature=1.3, top_p=0.9,
                                                                                       min_p=0.05),
                  SamplingParams(temperature=0.6, top_k=40, top_p=0.95, min_p=0.02)):
            assert set(filter_logits(logits, p)[0].tolist()) == kept_by_transformers(logits, p)

        generated = rng.integers(0, v, size=30).tolist() * 2  # repeats are penalized once
        ids, vals = filter_logits(logits, SamplingParams(presence_penalty=1.5), generated)
        expect = x - 1.5 * np.isin(np.arange(v), generated)
        assert np.allclose(vals.double().numpy(), expect, atol=1e-5)
        assert sample(logits, SamplingParams(temperature=0)) == int(np.argmax(x))
        assert sample(logits, SamplingParams(temperature=0, presence_penalty=2.0), generated) == int(np.argmax(expect))


def test_top_p_over_a_large_vocabulary(rng, monkeypatch):
    """Top-p on a 151936-token row: decided by the 1024 most likely tokens when the nucleus ends
    among them (peaked logits), by the whole sorted row otherwise (flat logits); either way the
    kept tokens are the most likely ones and their float64 mass is the smallest reaching top_p."""
    import importlib

    gen = importlib.import_module("bitswitch.models.generate")
    passes = []
    size = gen._nucleus_size
    monkeypatch.setattr(gen, "_nucleus_size", lambda *a, whole: passes.append(whole) or size(*a, whole=whole))
    v = 151936
    for scale, top_p, expect_passes in ((10.0, 0.9, [False]), (3.0, 0.5, [False]), (1.0, 0.8, [False, True])):
        passes.clear()
        logits = torch.from_numpy(rng.standard_normal(v) * scale).float()
        ids, vals = filter_logits(logits, SamplingParams(top_p=top_p, top_k=0))
        assert passes == expect_passes
        x = logits.double().numpy()
        assert np.array_equal(np.sort(vals.double().numpy())[::-1], np.sort(x)[::-1][:ids.numel()])  # a prefix
        assert torch.equal(logits[ids], vals)
        probs = np.exp(x - x.max())
        probs /= probs.sum()
        mass, least = probs[ids.numpy()].sum(), probs[ids.numpy()].min()
        assert mass >= top_p - 1e-6 and mass - least < top_p + 1e-6


def test_sampling_draws_from_the_filtered_softmax(rng):
    logits = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0, -5.0])
    p = SamplingParams(temperature=0.8, top_k=4)
    g = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    counts = np.bincount([sample(logits, p, generator=g) for _ in range(4000)], minlength=6)
    expect = torch.softmax(logits[:4] / 0.8, 0).numpy()
    assert counts[4:].sum() == 0
    assert np.abs(counts[:4] / 4000 - expect).max() < 0.03


def test_sampling_params_validation():
    for kwargs, match in [(dict(temperature=-0.1), "temperature"), (dict(temperature=float("inf")), "temperature"),
                          (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_k=True), "top_k"),
                          (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(min_p=1.0), "min_p"),
                          (dict(presence_penalty=float("nan")), "presence_penalty"),
                          (dict(presence_penalty=3.0), "presence_penalty"), (dict(seed=-1), "seed"),
                          (dict(seed="7"), "seed")]:
        with pytest.raises(ValueError, match=match):
            SamplingParams(**kwargs)
    with pytest.raises(ValueError, match="unknown fields"):
        SamplingParams().replace(temprature=1.0)
    assert SamplingParams().replace(top_k=5).top_k == 5
    assert SamplingParams.qwen(thinking=True) == SamplingParams(temperature=0.6, top_k=20, top_p=0.95)
    assert SamplingParams.qwen(thinking=False) == SamplingParams(temperature=0.7, top_k=20, top_p=0.8)
    with pytest.raises(TypeError, match="thinking must be a bool"):
        SamplingParams.qwen("yes")


# -- generation --------------------------------------------------------------------------------------

def test_greedy_matches_transformers_generate(tmp_path, seed):
    hf, model, tok = checkpoint(tmp_path, seed)
    g = torch.Generator().manual_seed(seed)
    # A random tiny model's logits can nearly tie (top-2 gaps of 1e-4 occur), and two correct
    # float32 implementations may then pick different tokens: take the first prompt whose
    # greedy path keeps every step's top-2 gap above 1e-3, far above their rounding differences.
    for _ in range(20):
        prompt = torch.randint(0, tok.vocab_size, (1, 23), generator=g)
        with torch.no_grad():
            out = hf.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0,
                              output_scores=True, return_dict_in_generate=True)
        gaps = [float(-torch.diff(torch.topk(sc[0], 2).values)) for sc in out.scores]
        if min(gaps) > 1e-3:
            break
    assert min(gaps) > 1e-3, "no prompt without near-ties in 20 draws"
    ref = out.sequences
    res = generate(model, tok, prompt, SamplingParams(temperature=0), max_new_tokens=16, eos_ids=[], chunk_size=7)
    assert res.tokens == ref[0, 23:].tolist()
    assert (res.stop_reason, res.prompt_tokens, res.generated_tokens, res.cached_tokens) == ("length", 23, 16, 0)
    assert model.cache.length == 23 + 16 - 1  # the last token is never fed back

    # eos: the first position where a chosen id appears ends the generation there
    k = int(torch.randint(2, 12, (1,), generator=g))
    eos = res.tokens[k]
    first = res.tokens.index(eos)
    res2 = generate(model, tok, prompt[0].tolist(), SamplingParams(temperature=0), max_new_tokens=16, eos_ids=[eos])
    assert res2.tokens == res.tokens[:first + 1] and res2.stop_reason == "eos"
    assert res2.text == tok.decode(res.tokens[:first])


def test_seed_and_streaming_text(tmp_path, seed):
    _, model, tok = checkpoint(tmp_path, seed)
    prompt = tok.encode("héllo 中文 🙂 the quick brown fox")
    p = SamplingParams(temperature=1.5, seed=seed)
    runs = []
    for params in (p, p, p.replace(seed=(seed + 1) % (1 << 31))):
        events = list(stream(model, tok, prompt, params, max_new_tokens=24, eos_ids=[]))
        tokens = [e.token for e in events]
        assert [e.result is not None for e in events] == [False] * 23 + [True]
        assert "".join(e.text for e in events) == tok.decode(tokens) == events[-1].result.text
        runs.append(tokens)
    assert runs[0] == runs[1] and runs[0] != runs[2]


class ScriptedModel:
    """A stand-in for Qwen3 whose logits pick the ids of `script` in turn: generation is
    checked on exact token sequences (multi-byte text, think blocks, eos)."""

    def __init__(self, vocab: int, script: list, prompt_len: int, capacity: int = 64):
        self.config = SimpleNamespace(vocab_size=vocab)
        self.script, self.prompt_len, self.capacity, self.cache, self.fed = script, prompt_len, capacity, None, []

    def reset(self, batch=1, capacity=None):
        self.cache = SimpleNamespace(length=0, capacity=capacity or self.capacity, k=torch.zeros(1, batch))

    def truncate(self, n):
        self.cache.length = n
        self.fed = self.fed[:n]

    def __call__(self, ids, logits_to_keep=0):
        self.fed += ids[0].tolist()
        self.cache.length += ids.shape[1]
        step = len(self.fed) - self.prompt_len
        logits = torch.zeros(1, 1, self.config.vocab_size)
        logits[0, 0, self.script[step]] = 10.0
        return logits


def test_stream_events_multibyte_thinking_and_eos(tmp_path):
    build_tokenizer(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    think, end = tok.think_ids
    im_end = tok.token_to_id("<|im_end|>")
    answer = tok.encode("中文🙂 façade")
    script = [think] + tok.encode("ü字\n") + [end] + answer + [im_end, 5, 5]
    prompt = tok.encode("<|im_start|>assistant\n")
    model = ScriptedModel(tok.vocab_size, script, len(prompt))
    events = list(stream(model, tok, prompt, SamplingParams(temperature=0), max_new_tokens=40))
    assert [e.token for e in events] == script[:-2]
    res = events[-1].result
    assert res.stop_reason == "eos" and res.text == "<think>ü字\n</think>中文🙂 façade"
    assert all("\ufffd" not in e.text for e in events)
    assert "".join(e.text for e in events if e.in_thinking) == "<think>ü字\n</think>"
    assert (res.thinking, res.answer) == ("ü字", "中文🙂 façade")
    assert model.fed == prompt + script[:len(script) - 3]  # the eos is not fed back

    # a prompt that opens the think block: its reply starts inside it
    model = ScriptedModel(tok.vocab_size, script[1:], len(prompt) + 1)
    events = list(stream(model, tok, prompt + [think], SamplingParams(temperature=0), max_new_tokens=40))
    assert "".join(e.text for e in events if e.in_thinking) == "ü字\n</think>"


def test_cpu_steps_run_torch_on_one_thread(tmp_path):
    """Every prefill chunk and decode step of a CPU model runs with torch on one thread
    (bitswitch.torch.torch_threads: torch's idle OpenMP workers would spin on the cores of
    bitswitch's pool); the caller's thread count holds between the events and after."""

    class ThreadCounting(ScriptedModel):
        def __call__(self, ids, logits_to_keep=0):
            self.threads.append(torch.get_num_threads())
            return super().__call__(ids, logits_to_keep)

    build_tokenizer(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    prompt = tok.encode("the quick brown fox")
    model = ThreadCounting(tok.vocab_size, [5] * 64, len(prompt))
    model.threads = []
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        between = [torch.get_num_threads() for _ in stream(model, tok, prompt, SamplingParams(temperature=0.5, seed=1),
                                                            max_new_tokens=6, eos_ids=[], chunk_size=2)]
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(old)
    assert model.threads == [1] * (len(range(0, len(prompt), 2)) + 5)
    assert between == [2] * 6 and after == 2


def test_stream_rejects_bad_arguments(tmp_path, seed):
    _, model, tok = checkpoint(tmp_path, seed)
    model.reset(capacity=64)
    for kwargs, err, match in [
        (dict(prompt_ids=[]), ValueError, "prompt_ids is empty"),
        (dict(prompt_ids=[1, tok.vocab_size + 5]), ValueError, "must lie in"),
        (dict(prompt_ids=torch.ones(2, 3, dtype=torch.long)), ValueError, "1-D integer tensor"),
        (dict(max_new_tokens=0), ValueError, "max_new_tokens must be an integer >= 1"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(max_new_tokens=60), ValueError, "need 69 cache positions, the model's cache holds 64"),
        (dict(cached_tokens=3), ValueError, "cached_tokens must be an integer in"),
        (dict(params=dict(temperature=0)), TypeError, "params must be a SamplingParams"),
        (dict(eos_ids=["x"]), ValueError, "eos_ids"),
    ]:
        args = dict(prompt_ids=list(range(10)), params=None, max_new_tokens=4) | kwargs
        with pytest.raises(err, match=match):
            stream(model, tok, **args)
    with pytest.raises(ValueError, match="truncate: length must be an integer in"):
        model.truncate(1)


def test_decode_steps_go_through_an_attached_graph_decoder(tmp_path, seed):
    """With model.graph_decoder set (GraphDecoder on CUDA), generation feeds every decode step
    through its step(); here a recorder running forward_at (the captured step) on the CPU:
    the tokens are those of eager decoding."""
    _, model, tok = checkpoint(tmp_path, seed)
    prompt = list(range(3, 20))
    ref = generate(model, tok, prompt, SamplingParams(temperature=0), max_new_tokens=9, eos_ids=[])

    class Recorder:
        calls = 0

        def step(self, ids):
            Recorder.calls += 1
            pos = torch.full((ids.shape[0],), model.cache.length, dtype=torch.int32)
            logits = model.forward_at(ids, pos)
            model.cache.length += 1
            return logits

    model.graph_decoder = Recorder()
    try:
        res = generate(model, tok, prompt, SamplingParams(temperature=0), max_new_tokens=9, eos_ids=[])
    finally:
        model.graph_decoder = None
    assert Recorder.calls == 8
    assert res.tokens == ref.tokens
