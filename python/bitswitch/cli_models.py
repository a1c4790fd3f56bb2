"""The model commands of ``bitswitch``: generate, chat, quantize, and ``info MODEL``.

A model is a local folder (Hugging Face safetensors, MLX 4/8-bit, AWQ, GPTQ or bitswitch's
saved planes) or a Hugging Face repo id; without ``--model`` the commands use the small
Qwen3 that ships with the package, so they work offline.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

PRECISIONS = ("8", "4", "full")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None,
                   help="model folder or Hugging Face repo id (default: the embedded tiny Qwen3)")
    p.add_argument("--bits", default=None, choices=PRECISIONS,
                   help="weight precision of every layer: 8, 4 or full (keeps the float weights; float checkpoints "
                        "only); default: each layer's most precise quantized view")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="activations and KV cache")
    p.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128),
                   help="quantization group of float checkpoints quantized at load")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--context", type=int, default=4096, help="KV-cache capacity in tokens")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=None, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--presence-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-think", action="store_true", help="chat with thinking disabled (enable_thinking=False)")


def open_model(a: argparse.Namespace):
    """(model, tokenizer, folder) for the command-line options."""
    import torch

    from . import ops
    from .models import Tokenizer, default_model_path, load, resolve_model_path

    if a.threads:
        torch.set_num_threads(a.threads)
        ops.set_num_threads(a.threads)
    path = default_model_path() if a.model is None else resolve_model_path(a.model)
    full = a.bits == "full"
    model = load(path, dtype=a.dtype, group_size=a.group_size, keep_float=full)
    if a.bits is not None:
        model.set_bits("full" if full else int(a.bits))
    model.reset(capacity=min(a.context, model.config.max_position_embeddings))
    return model, Tokenizer.from_dir(path), path


def sampling_params(a: argparse.Namespace, tok, thinking: Optional[bool]):
    """The model's (or Qwen's, for chat) defaults, overridden by the options given."""
    from .models import SamplingParams

    base = SamplingParams.qwen(thinking) if thinking is not None else tok.default_sampling()
    over = {k: getattr(a, k) for k in ("temperature", "top_k", "top_p", "min_p", "presence_penalty", "seed")
            if getattr(a, k) is not None}
    return base.replace(**over)


def _report(res) -> None:
    print(f"\n[{res.prompt_tokens} prompt tokens at {res.prefill_tps:.1f} tok/s, {res.generated_tokens} new "
          f"tokens at {res.decode_tps:.1f} tok/s; stop: {res.stop_reason}]", file=sys.stderr)


def generate(a: argparse.Namespace) -> int:
    from .models import stream

    model, tok, _ = open_model(a)
    if a.chat:
        thinking = not a.no_think
        ids = tok.encode_chat([{"role": "user", "content": a.prompt}], add_generation_prompt=True,
                              enable_thinking=thinking)
    else:
        thinking, ids = None, tok.encode(a.prompt)
    params = sampling_params(a, tok, thinking)
    if not a.chat:
        print(a.prompt, end="", flush=True)
    for ev in stream(model, tok, ids, params, max_new_tokens=a.max_new_tokens or 128):
        if ev.text:
            print(ev.text, end="", flush=True)
        if ev.result is not None:
            _report(ev.result)
    return 0


def chat(a: argparse.Namespace) -> int:
    from .models import ChatSession

    model, tok, path = open_model(a)
    session = ChatSession(model, tok, enable_thinking=not a.no_think, system=a.system)
    print(f"bitswitch chat: {path}. /reset clears the conversation, /bits 4|8 switches "
          "precision, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/reset":
            session.reset()
            continue
        if cmd.startswith("/bits"):
            arg = cmd.split()[1:] or [""]
            if arg[0] not in PRECISIONS:
                print(f"/bits takes one of {', '.join(PRECISIONS)}", file=sys.stderr)
                continue
            try:
                model.set_bits("full" if arg[0] == "full" else int(arg[0]))
            except ValueError as e:
                print(e, file=sys.stderr)
            continue
        params = sampling_params(a, tok, session.thinking_for(line))
        in_thought = False
        for ev in session.send(line, params, max_new_tokens=a.max_new_tokens):
            if ev.text:
                if ev.in_thinking and not in_thought:
                    print("\x1b[2m" if sys.stdout.isatty() else "", end="")
                if not ev.in_thinking and in_thought:
                    print("\x1b[0m" if sys.stdout.isatty() else "", end="")
                in_thought = ev.in_thinking
                print(ev.text, end="", flush=True)
            if ev.result is not None:
                _report(ev.result)
        if in_thought and sys.stdout.isatty():
            print("\x1b[0m", end="")
        print()


def quantize(a: argparse.Namespace) -> int:
    from .models import resolve_model_path, save_quantized

    t0 = time.perf_counter()
    save_quantized(resolve_model_path(a.src), a.dst, bits=a.bits, group_size=a.group_size)
    print(f"quantize: wrote {a.dst} ({a.bits}-bit planes, group {a.group_size}) in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)
    return 0


def info(a: argparse.Namespace) -> int:
    """What a model folder holds: architecture, format, per-view weight bytes."""
    from .models import default_model_path, load, resolve_model_path

    path = default_model_path() if a.model == "default" else resolve_model_path(a.model)
    model = load(path, dtype="float32", progress=False)
    c = model.config
    print(f"model: {path}")
    print(f"architecture: {c.model_type}, {c.num_hidden_layers} layers, hidden {c.hidden_size}, intermediate "
          f"{c.intermediate_size}, heads {c.num_attention_heads}/{c.num_key_value_heads} x {c.head_dim}, vocab "
          f"{c.vocab_size}, tied embeddings: {c.tie_word_embeddings}")
    views = {}
    for name, lin in model.linears().items():
        views.setdefault(lin.bits_available, []).append(name)
    for avail, names in sorted(views.items()):
        print(f"  {len(names)} projections with views {', '.join(map(str, avail))}")
    for bits in (4, 8):
        try:
            print(f"weight bytes read per token at {bits}-bit: {model.weight_bytes(bits) / 2**20:.1f} MiB")
        except ValueError:
            pass
    return 0
