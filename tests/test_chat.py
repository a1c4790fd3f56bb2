"""Chat templates against transformers' apply_chat_template (the bundled Qwen3-style template
and a different one from tokenizer_config.json), the bundled template's thinking rules, and
ChatSession's KV-cache reuse against a fresh prefill on a tiny random Qwen3."""

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("jinja2")

from test_generate import build_tokenizer, checkpoint, seed  # noqa: E402,F401 (seed: a fixture)

from bitswitch import attention as attn  # noqa: E402
from bitswitch.models import ChatSession, SamplingParams, Tokenizer, generate, split_thinking  # noqa: E402
from bitswitch.models.generate import soft_switch  # noqa: E402
from bitswitch.models.tokenizer import bundled_template  # noqa: E402

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Météo d'une ville",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]

CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!", "reasoning_content": "Greet back."},
     {"role": "user", "content": "2+2? /no_think"}],
    [{"role": "user", "content": "中文?"}, {"role": "assistant", "content": "<think>\nhm\n</think>\n\nYes, 中文."},
     {"role": "user", "content": "And now? /no_think"}, {"role": "assistant", "content": "Fine."},
     {"role": "user", "content": "Think again /think"}],
    [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Paris?"},
     {"role": "assistant", "content": "", "reasoning_content": "Call the tool.",
      "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                     {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Nice\"}"}}]},
     {"role": "tool", "content": "21 °C"}, {"role": "tool", "content": {"temp": 19}},
     {"role": "assistant", "content": "<think>Both known.</think>Paris 21 °C, Nice 19 °C.", "tool_calls": None}],
]

# A second template, unlike ChatML: BOS, named headers, a namespace, tojson with an indent, loop
# controls, strftime_now and raise_exception.
OTHER_TEMPLATE = (
    "{{- bos_token }}{%- set ns = namespace(n=0) -%}"
    "{%- if tools %}[TOOLS]{{ tools | tojson(indent=2) }}[/TOOLS]\n{% endif -%}"
    "{%- for m in messages -%}"
    "{%- if m.role not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('bad role ' + m.role) }}{% endif -%}"
    "{%- if m.role == 'tool' and m.content is not string %}{% continue %}{% endif -%}"
    "{%- set ns.n = ns.n + 1 -%}"
    "<|{{ m.role }}|>#{{ ns.n }} {{ m.content }}\n"
    "{%- if m.reasoning_content is defined %}  (thought: {{ m.reasoning_content | trim }})\n{% endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}<|assistant|>{{ strftime_now('%Y') }}"
    "{% if enable_thinking is defined and not enable_thinking %} quick{% endif %}{% endif %}")


@pytest.mark.parametrize("enable_thinking", [None, True, False])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_bundled_template_renders_as_transformers(tmp_path, enable_thinking, add_generation_prompt):
    hf = build_tokenizer(tmp_path, chat_template=bundled_template())
    assert (tmp_path / "chat_template.jinja").exists()
    tok = Tokenizer.from_dir(tmp_path)
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    for conv in CONVERSATIONS:
        tools = TOOLS if conv[0]["content"] == "Use tools." else None
        ref = hf.apply_chat_template(conv, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False,
                                     **extra)
        assert tok.apply_chat_template(conv, add_generation_prompt, tools=tools, **extra) == ref
        ids = hf.apply_chat_template(conv, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=True,
                                     return_dict=False, **extra)
        assert tok.encode_chat(conv, add_generation_prompt, tools=tools, **extra) == list(ids)


def test_template_from_tokenizer_config_renders_as_transformers(tmp_path):
    build_tokenizer(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.update(chat_template=OTHER_TEMPLATE, bos_token="<|endoftext|>")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.chat_template == OTHER_TEMPLATE
    for conv in CONVERSATIONS:
        for kwargs in ({"add_generation_prompt": True}, {"add_generation_prompt": True, "enable_thinking": False},
                       {"tools": TOOLS}):
            assert tok.apply_chat_template(conv, **kwargs) == hf.apply_chat_template(conv, tokenize=False, **kwargs)
    with pytest.raises(Exception, match="bad role robot"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])

    # named templates: "tool_use" is chosen when tools are given, "default" otherwise
    cfg["chat_template"] = [{"name": "default", "template": OTHER_TEMPLATE},
                            {"name": "tool_use", "template": bundled_template()}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    for tools in (None, TOOLS):
        assert (tok.apply_chat_template(CONVERSATIONS[2], tools=tools)
                == hf.apply_chat_template(CONVERSATIONS[2], tools=tools, tokenize=False))


def test_template_sandbox_and_generation_blocks(tmp_path):
    import jinja2

    from bitswitch.models.tokenizer import render_chat_template

    marked = ("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}A: {{ m.content }}\n"
              "{% endgeneration %}{% else %}U: {{ m.content }}\n{% endif %}{% endfor %}")
    hf = build_tokenizer(tmp_path, chat_template=marked)
    conv = CONVERSATIONS[0]
    assert Tokenizer.from_dir(tmp_path).apply_chat_template(conv) == hf.apply_chat_template(conv, tokenize=False)
    msgs = [{"role": "user", "content": "x"}]
    for escape in ("{{ messages.__class__.__mro__ }}", "{% set ns = namespace() %}{% set ns._x = 1 %}",
                   "{{ namespace(_y=2) }}"):
        with pytest.raises(jinja2.exceptions.SecurityError):
            render_chat_template(escape, msgs)
    with pytest.raises(ValueError, match="syntax error on line 1"):
        render_chat_template("{% for %}", msgs)
    with pytest.raises(TypeError, match="messages\\[0\\] may hold only"):
        render_chat_template("{{ messages }}", [{"role": "user", "content": object()}])


def test_bundled_template_thinking_rules():
    tok_template = bundled_template()
    from bitswitch.models.tokenizer import render_chat_template

    def render(messages, **kw):
        return render_chat_template(tok_template, messages, add_generation_prompt=True, **kw)

    empty = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    user = [{"role": "user", "content": "Hi"}]
    assert render(user) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert render(user, enable_thinking=False).endswith("<|im_end|>\n" + empty)
    # past reasoning is dropped, whether given apart or inline
    for past in ({"role": "assistant", "content": "Yo", "reasoning_content": "r"},
                 {"role": "assistant", "content": "<think>\nr\n</think>\n\nYo"}):
        out = render(user + [past] + [{"role": "user", "content": "Again"}])
        assert out == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"
                       "<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\n")
    # after the latest user message (a tool exchange) the reasoning stays
    out = render(user + [{"role": "assistant", "content": "", "reasoning_content": "need data",
                          "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]},
                         {"role": "tool", "content": "42"}])
    assert ('<|im_start|>assistant\n<think>\nneed data\n</think>\n\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}'
            '\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n') in out
    # soft switches: the latest wins; they never enable thinking that enable_thinking=False disabled
    sys_off = [{"role": "system", "content": "Be brief /no_think"}]
    assert render(sys_off + user).endswith(empty)
    assert not render(sys_off + [{"role": "user", "content": "Hi /think"}]).endswith(empty)
    assert render([{"role": "user", "content": "/think then /no_think"}]).endswith(empty)
    assert render([{"role": "user", "content": "Hi /think"}], enable_thinking=False).endswith(empty)
    with pytest.raises(Exception, match="roles are system, user, assistant and tool"):
        render([{"role": "robot", "content": "x"}])


def test_split_thinking_and_soft_switch():
    assert split_thinking("<think>\na\n</think>\n\nb") == ("a", "b")
    assert split_thinking("a</think>b</think>\nc") == ("a</think>b", "c")
    assert split_thinking("\nplain\n") == ("", "plain")
    assert soft_switch(["x /no_think", "y"], True) is False
    assert soft_switch(["x /no_think", "y /think"], True) is True
    assert soft_switch(["/think /no_think"], True) is False
    assert soft_switch(["nothing"], False) is False


def test_chat_session_reuses_the_cache(tmp_path, seed):
    _, model, tok = checkpoint(tmp_path, seed)
    greedy = SamplingParams(temperature=0)
    chat = ChatSession(model, tok, system="Be brief.", params=greedy, max_new_tokens=12)
    first = list(chat.send("Hi there"))[-1].result
    assert first.cached_tokens == 0
    assert chat.messages[-1] == {"role": "assistant", "content": first.answer}

    prompt1 = tok.encode_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
                              add_generation_prompt=True)
    cached = prompt1 + first.tokens[:-1]
    prompt2 = tok.encode_chat(chat.messages + [{"role": "user", "content": "And then?"}], add_generation_prompt=True)
    common = next(i for i, (a, b) in enumerate(zip(cached + [-1], prompt2 + [-2])) if a != b)
    assert common >= len(prompt1)

    sizes, logits = [], []

    def record(module, args, out):
        sizes.append(args[0].shape[-1])
        logits.append(out)

    hook = model.register_forward_hook(record)
    try:
        second = list(chat.send("And then?"))[-1].result
    finally:
        hook.remove()
    assert second.cached_tokens == common and second.prompt_tokens == len(prompt2)
    assert sizes[0] == len(prompt2) - common  # one prefill chunk: only the new tokens
    assert sizes[1:] == [1] * (second.generated_tokens - 1)

    model.reset()
    fresh = model(torch.tensor([prompt2]))[0, -1]
    assert torch.allclose(logits[0][0, -1], fresh, rtol=1e-5, atol=1e-5)
    model.reset()
    assert generate(model, tok, prompt2, greedy, max_new_tokens=12).tokens == second.tokens

    # the cache was emptied elsewhere in between: the session prefills the whole prompt
    model.reset()
    third = list(chat.send("Thanks"))[-1].result
    assert third.cached_tokens == 0


def test_chat_session_thinking_and_reset(tmp_path, seed):
    _, model, tok = checkpoint(tmp_path, seed)
    chat = ChatSession(model, tok, max_new_tokens=4)
    assert chat.thinking_for("hello") is True
    assert chat.thinking_for("hello /no_think") is False
    events = list(chat.send("hello /no_think"))
    assert chat.thinking_for("next") is False  # the switch in the history still holds
    assert chat.thinking_for("next /think") is True
    assert chat.prompt_ids("x")[-len(tok.encode("<think>\n\n</think>\n\n")):] == tok.encode("<think>\n\n</think>\n\n")
    assert len(events) == events[-1].result.generated_tokens
    chat.reset()
    assert chat.messages == [] and chat.thinking_for("next") is True
    model.reset(capacity=len(chat.prompt_ids("hi")) + 2)  # room for 3 new tokens
    res = list(chat.send("hi", max_new_tokens=10))[-1].result
    assert (res.stop_reason, res.generated_tokens) == ("length", 3) or res.stop_reason == "eos"
    with pytest.raises(ValueError, match="does not fit the model's cache"):
        chat.send("a much longer message that cannot fit")
    off = ChatSession(model, tok, enable_thinking=False)
    assert off.thinking_for("go /think") is False
    with pytest.raises(TypeError, match="enable_thinking must be a bool"):
        ChatSession(model, tok, enable_thinking="no")
    with pytest.raises(TypeError, match="text must be a string"):
        chat.send(None)


def test_truncate_keeps_sparse_summaries_consistent(tmp_path, seed):
    _, model, tok = checkpoint(tmp_path, seed)
    for layer in model.layers:
        layer.self_attn.sparse = {"pages": 1}  # decode reads the sink, the best and the last page
    model.prefill_plan = {"method": "select", "tau": 1.0}
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, tok.vocab_size, (1, 300), generator=g)
    model.reset()
    model(ids)
    model.truncate(230)
    # The summaries of the dropped keys are gone; the next sparse step rebuilds them from the
    # 230 kept keys.
    assert all(s is None for s in model.cache.summaries)
    for i in range(len(model.layers)):
        s = model.cache.summary(i, 230)
        ref = attn.KeyBlockSummary.from_keys(model.cache.k[i, :, :, :230], capacity=model.cache.capacity)
        assert s.length == 230 and (s.kmin == ref.kmin).all() and (s.kmax == ref.kmax).all()
    after = torch.cat([model(ids[:, 230 + j:231 + j]) for j in range(5)], 1)
    model.reset()
    model(ids[:, :230])
    fresh = torch.cat([model(ids[:, 230 + j:231 + j]) for j in range(5)], 1)
    assert torch.equal(after, fresh)
