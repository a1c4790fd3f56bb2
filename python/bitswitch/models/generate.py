"""Sampling, streaming generation and multi-turn chat over a Qwen3 model's static KV cache.

    tok = Tokenizer.from_dir(path)
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    for ev in stream(model, tok, ids, SamplingParams.qwen(thinking=True), max_new_tokens=512):
        print(ev.text, end="")            # the last event also carries ev.result (counts, timings)

    chat = ChatSession(model, tok)        # keeps the KV cache between turns
    for ev in chat.send("Hello /no_think"):
        ...

Generation is split as in gpt-fast: a chunked prefill of the prompt (only the last position's
logits are computed), then one decode forward per new token. The token that ends generation
(an eos id, or the last one allowed) is never fed back, so afterwards the cache holds the
prompt and every generated token but the last.

Sampling, on the last logits row in float32, in transformers' order: presence penalty,
temperature (0: greedy argmax of the penalized logits), top-k, top-p, min-p, then a draw from
the softmax of what is left (a torch.Generator seeded with `seed` when one is given).

Thinking (Qwen3): the reply's reasoning is the text before the last ``</think>``. With
``enable_thinking=True`` a ``/think`` or ``/no_think`` in a user or system message switches
the mode, the latest occurrence in the conversation winning; ``/no_think`` makes the bundled
template append the empty think block after the assistant prompt, as ``enable_thinking=False``
does (a checkpoint's own Qwen3 template leaves the model to write that block itself: the
tokens are the same), and ChatSession then samples with Qwen's non-thinking settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator, Optional, Sequence

import torch

from ..torch import torch_threads

if TYPE_CHECKING:
    from .qwen3 import Qwen3
    from .tokenizer import Tokenizer

__all__ = ["ChatSession", "GenerationResult", "SamplingParams", "TokenEvent", "filter_logits", "generate", "sample",
           "soft_switch", "split_thinking", "stream"]

THINK_START, THINK_END = "<think>", "</think>"
STOP_EOS, STOP_LENGTH = "eos", "length"


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. temperature 0 is greedy; top_k 0, top_p 1 and min_p 0
    switch those filters off; presence_penalty is subtracted once from the logit of every
    distinct token generated so far (the prompt does not count)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    seed: Optional[int] = None

    def __post_init__(self):
        if not _is_real(self.temperature) or self.temperature < 0:
            raise ValueError(f"SamplingParams: temperature must be a finite number >= 0 (0: greedy), "
                             f"got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"SamplingParams: top_k must be an integer >= 0 (0: off), got {self.top_k!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams: top_p must be in (0, 1] (1: off), got {self.top_p!r}")
        if not _is_real(self.min_p) or not 0 <= self.min_p < 1:
            raise ValueError(f"SamplingParams: min_p must be in [0, 1) (0: off), got {self.min_p!r}")
        if not _is_real(self.presence_penalty) or not -2 <= self.presence_penalty <= 2:
            raise ValueError(f"SamplingParams: presence_penalty must be in [-2, 2], got {self.presence_penalty!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2 ** 63):
            raise ValueError(f"SamplingParams: seed must be None or an integer in [0, 2**63), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def replace(self, **changes) -> "SamplingParams":
        """A copy with `changes` applied (and validated)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"SamplingParams.replace: unknown fields {sorted(unknown)}; allowed: "
                             f"{[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def qwen(cls, thinking: bool) -> "SamplingParams":
        """Qwen3's recommended settings: thinking T 0.6, top-p 0.95; otherwise T 0.7, top-p
        0.8; top-k 20 and min-p 0 in both (greedy is discouraged: it loops)."""
        if not isinstance(thinking, bool):
            raise TypeError(f"SamplingParams.qwen: thinking must be a bool, got {thinking!r}")
        if thinking:
            return cls(temperature=0.6, top_k=20, top_p=0.95, min_p=0.0)
        return cls(temperature=0.7, top_k=20, top_p=0.8, min_p=0.0)

    @classmethod
    def from_generation_config(cls, cfg: dict) -> "SamplingParams":
        """A checkpoint's generation_config.json read as transformers' generate reads it:
        greedy unless do_sample is true; missing values take transformers' defaults
        (temperature 1, top_k 50, top_p 1)."""
        if not cfg.get("do_sample", False):
            return cls(temperature=0.0)
        return cls(temperature=float(cfg.get("temperature", 1.0)), top_k=int(cfg.get("top_k", 50) or 0),
                   top_p=float(cfg.get("top_p", 1.0)), min_p=float(cfg.get("min_p") or 0.0))


def _penalized(logits: torch.Tensor, params: SamplingParams, generated: Iterable[int]) -> torch.Tensor:
    x = logits.detach().float().reshape(-1).cpu()  # sampling runs on the host (a GPU row comes over once)
    if params.presence_penalty:
        seen = sorted(set(generated))
        if seen:
            x = x.clone()
            x[torch.tensor(seen, dtype=torch.long)] -= params.presence_penalty
    return x


# Top-p looks at this many most likely tokens first and sorts the whole row only when their
# mass falls short of top_p: a float32 sort of a 152K vocabulary takes ~10 ms on one core.
_NUCLEUS_HEAD = 1024


def _nucleus(ids: torch.Tensor, x: torch.Tensor, top_p: float) -> tuple:
    """(ids, x) of the smallest set of most likely tokens whose probability reaches top_p,
    most likely first: a token is kept while the mass of the tokens before it is < top_p."""
    logz = torch.logsumexp(x, dim=0)
    if x.numel() > _NUCLEUS_HEAD:
        xs, order = torch.topk(x, _NUCLEUS_HEAD)  # the head of the sorted row, in order
        n = _nucleus_size(xs, logz, top_p, whole=False)
        if n is not None:
            return ids[order[:n]], xs[:n]
    xs, order = torch.sort(x, descending=True)
    n = _nucleus_size(xs, logz, top_p, whole=True)
    return ids[order[:n]], xs[:n]


def _nucleus_size(xs: torch.Tensor, logz: torch.Tensor, top_p: float, whole: bool) -> Optional[int]:
    """How many of the sorted logits xs (the row, or its head when not `whole`) the nucleus
    keeps; None when it may extend past the head."""
    p = torch.exp((xs - logz).double())  # float64 sums: a 152K-token tail in float32 drifts
    before = torch.cumsum(p, dim=0) - p  # the mass of the tokens before each
    if not whole and float(before[-1]) < top_p:
        return None
    return max(1, int((before < top_p).sum()))


def filter_logits(logits: torch.Tensor, params: SamplingParams, generated: Iterable[int] = ()):
    """The tokens sampling may draw and their final logits: ``(ids, values)``, both 1-D, for a
    logits row of the vocabulary. Penalty, temperature, then top-k (ties with the k-th value
    kept), top-p (the smallest set of most likely tokens whose probability reaches top_p),
    min-p (probability at least min_p times the largest). With temperature 0 the one id is
    the argmax of the penalized logits."""
    x = _penalized(logits, params, generated)
    if params.greedy:
        i = int(torch.argmax(x))
        return torch.tensor([i]), x[i:i + 1]
    x = x / params.temperature
    ids = torch.arange(x.numel())
    if 0 < params.top_k < x.numel():
        kth = torch.topk(x, params.top_k).values[-1]
        keep = x >= kth
        ids, x = ids[keep], x[keep]
    if params.top_p < 1:
        ids, x = _nucleus(ids, x, params.top_p)
    if params.min_p > 0:
        keep = x >= x.max() + math.log(params.min_p)  # p_i >= min_p * p_max, in logits
        ids, x = ids[keep], x[keep]
    return ids, x


def sample(logits: torch.Tensor, params: SamplingParams, generated: Iterable[int] = (),
           generator: Optional[torch.Generator] = None) -> int:
    """One token id from a logits row (see filter_logits)."""
    if params.greedy and not params.presence_penalty:
        # The argmax where the logits live: from a GPU one id comes over, not the whole row.
        # On the CPU in float32: torch's bfloat16 argmax takes ~0.6 ms over a 152K vocabulary,
        # the conversion and a float32 argmax ~0.1 ms (the same id: the conversion is exact).
        row = logits.detach().reshape(-1)
        return int(torch.argmax(row.float() if row.is_cpu else row))
    ids, x = filter_logits(logits, params, generated)
    if ids.numel() == 1:
        return int(ids[0])
    return int(ids[torch.multinomial(torch.softmax(x, dim=0), 1, generator=generator)])


def split_thinking(text: str) -> tuple:
    """(thinking, answer): the text before the last ``</think>`` (its ``<think>`` tag removed)
    and the text after it, each without surrounding newlines; ("", text) when there is none."""
    cut = text.rfind(THINK_END)
    if cut < 0:
        return "", text.strip("\n")
    thinking = text[:cut].lstrip("\n")
    if thinking.startswith(THINK_START):
        thinking = thinking[len(THINK_START):]
    return thinking.strip("\n"), text[cut + len(THINK_END):].strip("\n")


def soft_switch(texts: Iterable[str], default: bool) -> bool:
    """Whether thinking is on after the ``/think`` and ``/no_think`` switches in `texts` (user
    and system messages, oldest first): the latest occurrence wins; `default` when none."""
    on = default
    for t in texts:
        if isinstance(t, str):
            on_at, off_at = t.rfind("/think"), t.rfind("/no_think")
            if on_at >= 0 or off_at >= 0:
                on = on_at > off_at
    return on


@dataclass
class GenerationResult:
    """One generation. `tokens` are the new ids (ending with the eos id when stop_reason is
    "eos"); `text` their decoded text without the eos. Timings: prefill covers the prompt's
    forward passes and the first token, decode every later token."""

    tokens: list
    text: str
    stop_reason: str  # "eos" or "length"
    prompt_tokens: int
    cached_tokens: int  # prompt tokens already in the KV cache (not recomputed)
    generated_tokens: int
    prefill_seconds: float
    decode_seconds: float

    @property
    def prefill_tps(self) -> float:
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        n = self.generated_tokens - 1
        return n / self.decode_seconds if self.decode_seconds > 0 and n > 0 else 0.0

    @property
    def thinking(self) -> str:
        return split_thinking(self.text)[0]

    @property
    def answer(self) -> str:
        return split_thinking(self.text)[1]


@dataclass(frozen=True)
class TokenEvent:
    """One generated token: its id, the text it completes (may be empty while a multi-byte
    character is unfinished), whether that text lies inside a think block, and, on the last
    event only, the result."""

    token: int
    text: str
    in_thinking: bool
    result: Optional[GenerationResult] = None


def _prompt_list(prompt_ids, vocab: int) -> list:
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() == 2 and prompt_ids.shape[0] == 1:
            prompt_ids = prompt_ids[0]
        if prompt_ids.dim() != 1 or prompt_ids.dtype.is_floating_point or prompt_ids.dtype == torch.bool:
            raise ValueError(f"stream: prompt_ids must be a 1-D integer tensor (or [1, n]), got "
                             f"{tuple(prompt_ids.shape)} {prompt_ids.dtype}")
        ids = prompt_ids.tolist()
    else:
        ids = list(prompt_ids)
        if not all(_is_int(i) for i in ids):
            raise ValueError("stream: prompt_ids must be integers")
    if not ids:
        raise ValueError("stream: prompt_ids is empty; give at least one token")
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"stream: prompt_ids must lie in [0, {vocab}) (the vocabulary), got {bad[:5]}")
    return ids


def stream(model: "Qwen3", tokenizer: "Tokenizer", prompt_ids, params: Optional[SamplingParams] = None,
           max_new_tokens: int = 256, eos_ids: Optional[Sequence[int]] = None, chunk_size: int = 512,
           cached_tokens: int = 0, precision=None, controller=None) -> Iterator[TokenEvent]:
    """Generates up to `max_new_tokens` tokens after `prompt_ids`, one TokenEvent each; stops
    after an id in `eos_ids` (default: the tokenizer's eos ids; [] never stops early).

    The prompt is prefilled `chunk_size` tokens at a time. `cached_tokens`: the first that
    many prompt ids are already in the model's KV cache (from an earlier call with the same
    ids), so only the rest is computed; 0 starts from an empty cache. `precision`: a policy
    (bitswitch.precision) set before the prefill; `controller`: a
    bitswitch.controller.AutoPrecision that sees the time of every decode step and may
    switch layers between tokens. Arguments and the cache capacity are checked here,
    before anything runs."""
    params = SamplingParams() if params is None else params
    if not isinstance(params, SamplingParams):
        raise TypeError(f"stream: params must be a SamplingParams, got {type(params).__name__}")
    ids = _prompt_list(prompt_ids, model.config.vocab_size)
    for name, v in (("max_new_tokens", max_new_tokens), ("chunk_size", chunk_size)):
        if not _is_int(v) or v < 1:
            raise ValueError(f"stream: {name} must be an integer >= 1, got {v!r}")
    eos = tuple(tokenizer.eos_token_ids if eos_ids is None else eos_ids)
    if not all(_is_int(e) for e in eos):
        raise ValueError(f"stream: eos_ids must be integers, got {eos!r}")
    cached = model.cache.length if model.cache is not None and model.cache.k.shape[1] == 1 else 0
    if not _is_int(cached_tokens) or not 0 <= cached_tokens <= cached:
        raise ValueError(f"stream: cached_tokens must be an integer in [0, {cached}] (the cached length), "
                         f"got {cached_tokens!r}")
    if model.cache is None or model.cache.k.shape[1] != 1:
        model.reset(1)
    need = len(ids) + max_new_tokens - 1
    if need > model.cache.capacity:
        raise ValueError(f"stream: the prompt ({len(ids)} tokens) and max_new_tokens={max_new_tokens} need "
                         f"{need} cache positions, the model's cache holds {model.cache.capacity}; call "
                         f"model.reset(capacity=...) or ask for fewer tokens")
    if controller is not None and not callable(getattr(controller, "observe", None)):
        raise TypeError(f"stream: controller must have an observe(seconds) method, got {type(controller).__name__}")
    if precision is not None:
        model.set_precision(precision)
    return _run(model, tokenizer, ids, params, max_new_tokens, eos, chunk_size, min(cached_tokens, len(ids) - 1),
                controller)


def _run(model, tokenizer, ids, params, max_new_tokens, eos, chunk_size, cached, controller) -> Iterator[TokenEvent]:
    generator = None if params.seed is None else torch.Generator().manual_seed(params.seed)
    # On the CPU the model's kernels run on bitswitch's thread pool; the torch ops of each
    # step (sampling) run on one thread, or torch's idle OpenMP workers would spin on the
    # pool's cores into the next step (bitswitch.torch.torch_threads).
    quiet = (lambda: torch_threads(1)) if model.cache.k.device.type == "cpu" else contextlib.nullcontext
    think = tokenizer.think_ids
    in_thinking = False
    if think is not None:  # a prompt that ends inside an open think block (a template may open it)
        last = {t: max((i for i, x in enumerate(ids) if x == t), default=-1) for t in think}
        in_thinking = last[think[0]] > last[think[1]]
    detok = tokenizer.stream_decoder()

    t0 = time.perf_counter()
    model.truncate(cached)
    tokens: list = []
    with quiet():
        for start in range(cached, len(ids), chunk_size):
            chunk = torch.tensor([ids[start:start + chunk_size]], dtype=torch.long)
            logits = model(chunk, logits_to_keep=1)
        tok = sample(logits[0, -1], params, tokens, generator)
    # One decode step: the model, or its CUDA-graph decoder when one is attached (same logits).
    decode = model.graph_decoder.step if getattr(model, "graph_decoder", None) is not None else model
    prefill_s, decode_s = time.perf_counter() - t0, 0.0
    pieces: list = []
    while True:
        tokens.append(tok)
        stop = STOP_EOS if tok in eos else STOP_LENGTH if len(tokens) == max_new_tokens else None
        if think is not None and tok == think[0]:
            in_thinking = True
        text = "" if stop == STOP_EOS else detok.push(tok)
        if stop is not None:
            text += detok.flush()
        pieces.append(text)
        ev = TokenEvent(tok, text, in_thinking)
        if think is not None and tok == think[1]:
            in_thinking = False
        if stop is not None:
            result = GenerationResult(tokens, "".join(pieces), stop, len(ids), cached, len(tokens), prefill_s,
                                      decode_s)
            yield dataclasses.replace(ev, result=result)
            return
        yield ev
        t0 = time.perf_counter()
        with quiet():
            logits = decode(torch.tensor([[tok]], dtype=torch.long))
            tok = sample(logits[0, -1], params, tokens, generator)
        step = time.perf_counter() - t0
        decode_s += step
        if controller is not None:
            controller.observe(step)


def generate(model: "Qwen3", tokenizer: "Tokenizer", prompt_ids, params: Optional[SamplingParams] = None,
             max_new_tokens: int = 256, eos_ids: Optional[Sequence[int]] = None, chunk_size: int = 512,
             cached_tokens: int = 0, precision=None, controller=None) -> GenerationResult:
    """stream(...) run to the end: the GenerationResult."""
    for ev in stream(model, tokenizer, prompt_ids, params, max_new_tokens, eos_ids, chunk_size, cached_tokens,
                     precision, controller):
        pass
    return ev.result


class ChatSession:
    """A multi-turn conversation that keeps the model's KV cache between turns.

    Each send renders the whole conversation with the chat template, keeps the cached
    positions that agree with the new prompt's ids (their longest common prefix), drops the
    rest (model.truncate) and prefills only what follows. A finished reply is added to the
    history as its answer alone: the template drops past reasoning anyway. A reply whose
    iteration is abandoned leaves the history unchanged. The session assumes it is the only
    user of the model's cache between its turns (otherwise it starts over from an empty one
    when the cached length no longer matches).

    Thinking: enable_thinking=False turns it off for every turn. Otherwise each turn thinks
    unless the latest /think or /no_think switch in the system and user messages is
    /no_think (thinking_for); without explicit params a turn samples with Qwen's settings
    for its mode (SamplingParams.qwen).
    """

    def __init__(self, model: "Qwen3", tokenizer: "Tokenizer", enable_thinking: bool = True,
                 system: Optional[str] = None, params: Optional[SamplingParams] = None, max_new_tokens: int = 2048,
                 chunk_size: int = 512):
        if not isinstance(enable_thinking, bool):
            raise TypeError(f"ChatSession: enable_thinking must be a bool, got {enable_thinking!r}")
        if system is not None and not isinstance(system, str):
            raise TypeError(f"ChatSession: system must be a string or None, got {type(system).__name__}")
        if params is not None and not isinstance(params, SamplingParams):
            raise TypeError(f"ChatSession: params must be a SamplingParams or None, got {type(params).__name__}")
        self.model, self.tokenizer = model, tokenizer
        self.enable_thinking, self.system, self.params = enable_thinking, system, params
        self.max_new_tokens, self.chunk_size = max_new_tokens, chunk_size
        self.messages: list = []
        self.last: Optional[GenerationResult] = None
        self._cache_ids: list = []  # the ids whose K/V the model's cache holds
        self.reset()

    def reset(self) -> None:
        """Forgets the conversation (the system message stays); the cache is reused from 0."""
        self.messages = [{"role": "system", "content": self.system}] if self.system is not None else []
        self.last = None
        self._cache_ids = []

    def thinking_for(self, text: str) -> bool:
        """Whether the turn that sends `text` next thinks."""
        if not self.enable_thinking:
            return False
        return soft_switch([m["content"] for m in self.messages if m["role"] in ("system", "user")] + [text], True)

    def prompt_ids(self, text: str) -> list:
        """The ids of the whole conversation with `text` as the next user message, ready for
        the assistant's reply."""
        messages = self.messages + [{"role": "user", "content": text}]
        return self.tokenizer.encode_chat(messages, add_generation_prompt=True, enable_thinking=self.enable_thinking)

    def send(self, text: str, params: Optional[SamplingParams] = None, max_new_tokens: Optional[int] = None,
             precision=None, controller=None) -> Iterator[TokenEvent]:
        """Streams the reply to `text` (TokenEvents; the last carries the result). A reply is
        cut (stop_reason "length") where the model's cache is full. precision, controller:
        as for stream (the cached turns keep the K/V computed under earlier settings)."""
        if not isinstance(text, str):
            raise TypeError(f"ChatSession.send: text must be a string, got {type(text).__name__}")
        params = params or self.params or SamplingParams.qwen(self.thinking_for(text))
        ids = self.prompt_ids(text)
        cache = self.model.cache
        held = self._cache_ids if cache is not None and cache.length == len(self._cache_ids) else []
        common = 0
        for a, b in zip(held, ids):
            if a != b:
                break
            common += 1
        if self.model.cache is None:
            self.model.reset()
        room = self.model.cache.capacity - len(ids) + 1
        if room < 1:
            raise ValueError(f"ChatSession.send: the conversation ({len(ids)} tokens) does not fit the model's cache "
                             f"({self.model.cache.capacity} positions); reset() the session or call "
                             f"model.reset(capacity=...)")
        events = stream(self.model, self.tokenizer, ids, params, min(max_new_tokens or self.max_new_tokens, room),
                        chunk_size=self.chunk_size, cached_tokens=common, precision=precision, controller=controller)
        return self._turn(text, ids, events)

    def _turn(self, text: str, ids: list, events: Iterator[TokenEvent]) -> Iterator[TokenEvent]:
        tokens: list = []
        self._cache_ids = []  # unknown until the prefill is done
        for ev in events:
            tokens.append(ev.token)
            self._cache_ids = ids + tokens[:-1]
            if ev.result is not None:
                self.last = ev.result
                self.messages += [{"role": "user", "content": text},
                                  {"role": "assistant", "content": ev.result.answer}]
            yield ev
