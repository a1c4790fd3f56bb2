"""A checkpoint's tokenizer and chat template, without transformers.

`Tokenizer.from_dir` reads tokenizer.json (the `tokenizers` library), tokenizer_config.json
(special tokens, chat template), chat_template.jinja and additional_chat_templates/*.jinja
(where transformers 4.5x+ saves templates), generation_config.json (eos ids, sampling
defaults) and config.json (eos ids). Chat templates render the way transformers'
apply_chat_template renders them: a jinja2 sandbox with trim_blocks and lstrip_blocks, the
loopcontrols extension, the `generation` tag, a `tojson` that keeps non-ASCII text, the
globals raise_exception, strftime_now, dict and namespace, the special tokens (bos_token,
eos_token, ...) and every extra keyword (enable_thinking, ...) as variables. A checkpoint
without a template gets the bundled templates/qwen3.jinja (ChatML with Qwen3's thinking
conventions). Nothing read from the folder runs as Python: templates run in the sandbox.
"""

from __future__ import annotations

import json
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from .._json import read_json_object

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")

__all__ = ["StreamDecoder", "Tokenizer", "bundled_template", "render_chat_template"]


def bundled_template() -> str:
    """The fallback chat template shipped with bitswitch (templates/qwen3.jinja)."""
    return resources.files(__package__).joinpath("templates", "qwen3.jinja").read_text(encoding="utf-8")


def _read_json(path: Path) -> Optional[dict]:
    return read_json_object(path, "Tokenizer", missing_ok=True)


def _token_text(value: Any) -> Optional[str]:
    """A special token as tokenizer_config.json spells it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _id_list(value: Any) -> list:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


# -- chat templates ---------------------------------------------------------------------------

_ENVIRONMENT = None


def _environment():
    """The jinja2 sandbox chat templates run in (built once)."""
    global _ENVIRONMENT
    if _ENVIRONMENT is not None:
        return _ENVIRONMENT
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks the assistant's text for training
        masks; rendering keeps its body as is."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    class Namespace(jinja2.utils.Namespace):
        """jinja's namespace without underscore attributes, which could reach Python internals."""

        def __init__(*args, **kwargs):
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat template: namespace attribute {name!r} is not allowed")

    class PlainDict:
        """`dict(...)` and `dict.fromkeys(...)` for templates, without the type object itself."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args):
            return dict.fromkeys(*args)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, namespace=Namespace,
                       dict=PlainDict())
    _ENVIRONMENT = env
    return env


_COMPILED: dict = {}


def _compile(template: str):
    if template not in _COMPILED:
        import jinja2

        try:
            _COMPILED[template] = _environment().from_string(template)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"chat template: syntax error on line {e.lineno}: {e.message}") from None
    return _COMPILED[template]


def _plain(value: Any, where: str) -> Any:
    """A fresh copy of template input made of JSON types only (the sandbox then sees no
    methods of foreign objects)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {_plain(k, where): _plain(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    raise TypeError(f"chat template: {where} may hold only str, int, float, bool, None, lists and dicts, "
                    f"got {type(value).__name__}")


def render_chat_template(template: str, messages: Sequence[dict], add_generation_prompt: bool = False,
                         tools: Optional[Sequence[dict]] = None, documents: Optional[Sequence[dict]] = None,
                         **variables) -> str:
    """`template` rendered over `messages` as transformers' apply_chat_template renders it
    (tokenize=False): message keys whose value is None are dropped, a message's reasoning
    given as reasoning_content, thinking or reasoning is offered under the first two names,
    and `variables` (special tokens, enable_thinking, ...) become template variables."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("chat template: messages must be a non-empty list of dicts")
    chat = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TypeError(f"chat template: messages[{i}] must be a dict, got {type(m).__name__}")
        m = _plain({k: v for k, v in m.items() if v is not None}, f"messages[{i}]")
        reasoning = next((m[k] for k in _REASONING_KEYS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        chat.append(m)
    for name, seq in (("tools", tools), ("documents", documents)):
        if seq is not None and not (isinstance(seq, (list, tuple)) and all(isinstance(x, dict) for x in seq)):
            raise TypeError(f"chat template: {name} must be a list of dicts (JSON schemas / documents)")
    return _compile(template).render(messages=chat, tools=_plain(tools, "tools"),
                                     documents=_plain(documents, "documents"),
                                     add_generation_prompt=bool(add_generation_prompt),
                                     **_plain(variables, "keyword arguments"))


# -- incremental detokenization ------------------------------------------------------------------

class StreamDecoder:
    """Token ids in, text out, one piece per id as soon as the text is final.

    Each piece is the growth of decode(ids[prefix:]) over decode(ids[prefix:read]), where
    [prefix, read) is the span emitted last: decoding with one span of context keeps the
    spaces that decoders strip from a sequence's start. While the decoded text ends in the
    replacement character (an unfinished UTF-8 sequence split over byte-level tokens), nothing
    is emitted. The pieces of push() followed by flush() concatenate to decode(all ids)."""

    def __init__(self, tokenizer: "Tokenizer", skip_special_tokens: bool = True):
        self._tok, self._skip = tokenizer, skip_special_tokens
        self._ids: list = []
        self._prefix = self._read = 0

    def _window(self) -> tuple:
        return (self._tok.decode(self._ids[self._prefix:self._read], self._skip),
                self._tok.decode(self._ids[self._prefix:], self._skip))

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        done, text = self._window()
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(done):]

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character decodes as U+FFFD)."""
        done, text = self._window()
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(done):]


# -- the tokenizer --------------------------------------------------------------------------------

class Tokenizer:
    """tokenizers' Tokenizer plus what generation needs from a checkpoint folder.

    `chat_template` is a template string or a dict name -> template ("default" is used unless
    another name is asked for, "tool_use" when tools are given and it exists)."""

    def __init__(self, backend, chat_template: Union[str, dict, None] = None, special_tokens: Optional[dict] = None,
                 eos_token_ids: Sequence[int] = (), generation_config: Optional[dict] = None):
        self.backend = backend
        self.chat_template = chat_template if chat_template else bundled_template()
        self.special_tokens = dict(special_tokens or {})
        self.eos_token_ids = tuple(dict.fromkeys(eos_token_ids))
        self.generation_config = dict(generation_config or {})
        start, end = backend.token_to_id("<think>"), backend.token_to_id("</think>")
        self.think_ids = (start, end) if start is not None and end is not None else None

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise ValueError(f"Tokenizer.from_dir: {path} has no tokenizer.json")
        try:
            backend = Backend.from_file(str(tj))
        except Exception as e:  # tokenizers reports every parse failure as a plain Exception
            raise ValueError(f"Tokenizer.from_dir: {tj} could not be read ({e})") from None
        tcfg = _read_json(path / "tokenizer_config.json") or {}
        gcfg = _read_json(path / "generation_config.json") or {}
        mcfg = _read_json(path / "config.json") or {}

        special = {name: _token_text(tcfg.get(name)) for name in SPECIAL_TOKEN_NAMES}
        special = {k: v for k, v in special.items() if v is not None}

        templates: dict = {}
        raw = tcfg.get("chat_template")
        if isinstance(raw, str):
            templates["default"] = raw
        elif isinstance(raw, list):
            for entry in raw:
                if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                        and isinstance(entry.get("template"), str)):
                    raise ValueError(f"Tokenizer.from_dir: {path / 'tokenizer_config.json'}: chat_template entries "
                                     "must be {'name': str, 'template': str}")
                templates[entry["name"]] = entry["template"]
        elif raw is not None:
            raise ValueError(f"Tokenizer.from_dir: {path / 'tokenizer_config.json'}: chat_template must be a string "
                             f"or a list of named templates, got {type(raw).__name__}")
        if (path / "chat_template.jinja").is_file():
            templates["default"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
        extra = path / "additional_chat_templates"
        if extra.is_dir():
            for f in sorted(extra.glob("*.jinja")):
                templates[f.name[:-len(".jinja")]] = f.read_text(encoding="utf-8")
        template = templates["default"] if list(templates) == ["default"] else templates or None

        eos = _id_list(gcfg.get("eos_token_id")) + _id_list(mcfg.get("eos_token_id"))
        if "eos_token" in special and backend.token_to_id(special["eos_token"]) is not None:
            eos.append(backend.token_to_id(special["eos_token"]))
        return cls(backend, template, special, eos, gcfg)

    # -- text <-> ids ------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list:
        """Token ids of `text`; add_special_tokens applies the tokenizer's post-processor (a
        BOS for models that use one; Qwen adds none)."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode: text must be a string, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)

    # -- chat --------------------------------------------------------------------------------
    def get_chat_template(self, name: Optional[str] = None, tools=None) -> str:
        t = self.chat_template
        if isinstance(t, str):
            return t if name is None else name
        if name is not None:
            return t.get(name, name)
        if tools is not None and "tool_use" in t:
            return t["tool_use"]
        if "default" not in t:
            raise ValueError(f"Tokenizer: the checkpoint has several chat templates and no default; pass "
                             f"chat_template= one of {sorted(t)}")
        return t["default"]

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False,
                            tools: Optional[Sequence[dict]] = None, documents: Optional[Sequence[dict]] = None,
                            chat_template: Optional[str] = None, **kwargs) -> str:
        """The conversation as text (transformers' apply_chat_template with tokenize=False).
        `chat_template`: a template name or a template string (default: the checkpoint's);
        extra keywords such as enable_thinking=False reach the template."""
        template = self.get_chat_template(chat_template, tools)
        return render_chat_template(template, messages, add_generation_prompt, tools, documents,
                                    **{**self.special_tokens, **kwargs})

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False, **kwargs) -> list:
        """apply_chat_template's text as ids (the template writes every special token itself)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs),
                           add_special_tokens=False)

    def default_sampling(self):
        """The checkpoint's sampling defaults (generation_config.json; greedy without one)."""
        from .generate import SamplingParams

        return SamplingParams.from_generation_config(self.generation_config)
