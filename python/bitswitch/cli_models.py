"""The model commands of ``bitswitch``: generate, chat, quantize, and ``info MODEL``.

A model is a local folder (Hugging Face safetensors, MLX 4/8-bit, AWQ, GPTQ or bitswitch's
saved planes) or a Hugging Face repo id; without ``--model`` the commands use the small
Qwen3 that ships with the package, so they work offline.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional

PRECISIONS = ("8", "4", "full")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None,
                   help="model folder or Hugging Face repo id (default: the embedded tiny Qwen3)")
    p.add_argument("--mode", default=None, choices=("performance", "efficiency", "full"),
                   help="performance: INT8 weights (float where kept), dense attention; efficiency: INT4 weights, "
                        "block-sparse attention; full: the float weights (needs --keep-float)")
    p.add_argument("--precision", default=None,
                   help="a mode, a plan file from `bitswitch plan`, a JSON policy such as '{\"*\": 4, \"0\": 8}', or "
                        "'auto' (with --target-tps: layers move between INT4 and INT8 to hold the speed)")
    p.add_argument("--bits", default=None, choices=PRECISIONS,
                   help="every weight in one view: 8, 4 or full (shorthand for a policy)")
    p.add_argument("--act-bits", type=int, default=16, choices=(16, 8),
                   help="activation precision of every layer: 16 (float-grade) or 8 (int8 per group: faster "
                        "prefill on AVX-512 VNNI CPUs, ~0.5%% error per layer)")
    p.add_argument("--keep-float", action="store_true",
                   help="keep the float weights of a float checkpoint (the 'full' tier) next to the planes")
    p.add_argument("--target-tps", type=float, default=None, help="decode tokens/s that --precision auto holds")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="activations and KV cache")
    p.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128),
                   help="quantization group of float checkpoints quantized at load")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--context", type=int, default=4096, help="KV-cache capacity in tokens")
    p.add_argument("--device", default="cpu",
                   help="where the model runs: cpu, cuda, cuda:N (NVIDIA GPU: decode steps replayed as CUDA "
                        "graphs) or mps (Apple GPU)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="with --device cuda: eager decode steps")


def policy_arg(text: str):
    """A --precision / /precision value: a mode, a plan file or a JSON mapping."""
    from .precision import MODES

    t = text.strip()
    if t in MODES:
        return t
    if t.startswith("{") or t.startswith("["):
        try:
            return json.loads(t)
        except json.JSONDecodeError as e:
            raise ValueError(f"--precision: not valid JSON ({e})") from None
    return t  # a plan file path: set_precision checks it


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
    """(model, tokenizer, folder, controller or None) for the command-line options."""
    import torch

    from . import ops
    from .models import Tokenizer, default_model_path, load, resolve_model_path

    if a.threads:
        torch.set_num_threads(a.threads)
        ops.set_num_threads(a.threads)
    chosen = [x for x in (a.mode, a.precision, a.bits) if x is not None]
    if len(chosen) > 1:
        raise ValueError("give one of --mode, --precision and --bits")
    path = default_model_path() if a.model is None else resolve_model_path(a.model)
    full = a.keep_float or a.bits == "full" or a.mode == "full" or a.precision == "full"
    try:
        device = torch.device(a.device)
    except RuntimeError:
        raise ValueError(f"--device must be cpu, cuda[:N] or mps, got {a.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {a.device}: torch sees no CUDA device (torch {torch.__version__}, "
                         f"cuda {torch.version.cuda})")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device must be cpu, cuda[:N] or mps, got {a.device!r}")
    if a.act_bits != 16 and device.type != "cpu":
        raise ValueError(f"--act-bits {a.act_bits}: int8 activations are a CPU path; leave it at 16 with --device {a.device}")
    model = load(path, dtype=a.dtype, group_size=a.group_size, keep_float=full)
    if device.type != "cpu":
        model.to(device)
    model.reset(capacity=min(a.context, model.config.max_position_embeddings))
    if device.type == "cuda" and not a.no_cuda_graphs:
        from .models.cuda_graph import GraphDecoder

        model.graph_decoder = GraphDecoder(model)
    controller = None
    if a.precision == "auto":
        from .controller import AutoPrecision

        if a.target_tps is None:
            raise ValueError("--precision auto needs --target-tps (decode tokens/s to hold)")
        controller = AutoPrecision(model, target_tps=a.target_tps, log=lambda m: print(m, file=sys.stderr))
    elif chosen:
        pol = policy_arg(a.precision) if a.precision is not None else a.mode if a.mode else {
            "*": {"bits": "full" if a.bits == "full" else int(a.bits)}}
        model.set_precision(pol)
    elif a.target_tps is not None:
        raise ValueError("--target-tps goes with --precision auto")
    if a.act_bits != 16:
        model.set_act_bits(a.act_bits)
    return model, Tokenizer.from_dir(path), path, controller


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


def demo(a: argparse.Namespace, model, tok) -> int:
    """One model, two precisions: the same prompt and seed in INT8, then after a switch to
    the efficiency mode (INT4, block-sparse attention), with what each token read."""
    from .models import generate as run

    ids = tok.encode(a.prompt)
    base = tok.default_sampling() if a.temperature is None else sampling_params(a, tok, None)
    params = base.replace(seed=0 if a.seed is None else a.seed)
    for policy in ("performance", "efficiency"):
        rep = model.set_precision(policy)
        res = run(model, tok, ids, params, max_new_tokens=a.max_new_tokens or 48)
        print(f"--- {policy}: {rep.bits_per_weight:.2f} bits per weight, {rep.bytes_per_token / 2**20:.2f} MiB of "
              f"weights per token, {res.decode_tps:.0f} tokens/s (no reload between the two)")
        print(a.prompt + res.text)
    return 0


def generate(a: argparse.Namespace) -> int:
    from .models import stream

    model, tok, _, controller = open_model(a)
    if a.demo:
        return demo(a, model, tok)
    if a.chat:
        thinking = not a.no_think
        ids = tok.encode_chat([{"role": "user", "content": a.prompt}], add_generation_prompt=True,
                              enable_thinking=thinking)
    else:
        thinking, ids = None, tok.encode(a.prompt)
    params = sampling_params(a, tok, thinking)
    if not a.chat:
        print(a.prompt, end="", flush=True)
    for ev in stream(model, tok, ids, params, max_new_tokens=a.max_new_tokens or 128, controller=controller):
        if ev.text:
            print(ev.text, end="", flush=True)
        if ev.result is not None:
            _report(ev.result)
    return 0


CHAT_HELP = ("/mode performance|efficiency|full, /precision POLICY (a mode, plan file or JSON; no argument: show "
             "the current setting), /bits 4|8|full, /reset clears the conversation, /exit or Ctrl-D quits")


def _chat_command(cmd: str, model, session) -> bool:
    """Runs a /command between turns; False when the line is not one."""
    word, _, arg = cmd.partition(" ")
    arg = arg.strip()
    if word == "/reset":
        session.reset()
    elif word in ("/mode", "/precision", "/bits"):
        try:
            if word == "/precision" and not arg:
                print(model.precision(), file=sys.stderr)
                return True
            if word == "/bits":
                if arg not in PRECISIONS:
                    raise ValueError(f"/bits takes one of {', '.join(PRECISIONS)}")
                pol = {"*": {"bits": arg if arg == "full" else int(arg)}}
            elif word == "/mode":
                from .precision import MODES

                if arg not in MODES:
                    raise ValueError(f"/mode takes one of {', '.join(MODES)}")
                pol = arg
            else:
                pol = policy_arg(arg)
            rep = model.set_precision(pol)
            print(f"precision: {rep.bits_per_weight:.2f} bits per weight, {rep.bytes_per_token / 2**20:.1f} MiB of "
                  f"weights per token, {sum(l['attention'] == 'sparse' for l in rep.layers)} sparse layers",
                  file=sys.stderr)
        except (ValueError, FileNotFoundError, TypeError) as e:
            print(e, file=sys.stderr)
    elif word == "/help":
        print(CHAT_HELP, file=sys.stderr)
    else:
        return False
    return True


def chat(a: argparse.Namespace) -> int:
    from .models import ChatSession

    model, tok, path, controller = open_model(a)
    session = ChatSession(model, tok, enable_thinking=not a.no_think, system=a.system)
    print(f"bitswitch chat: {path}. {CHAT_HELP}.", file=sys.stderr)
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
        if cmd.startswith("/") and _chat_command(cmd, model, session):
            continue
        params = sampling_params(a, tok, session.thinking_for(line))
        in_thought = False
        for ev in session.send(line, params, max_new_tokens=a.max_new_tokens, controller=controller):
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


def plan(a: argparse.Namespace) -> int:
    import torch

    from . import ops, planner
    from .models import Tokenizer, default_model_path, load, resolve_model_path

    if a.threads:
        torch.set_num_threads(a.threads)
        ops.set_num_threads(a.threads)
    path = default_model_path() if a.model is None else resolve_model_path(a.model)
    model, tok = load(path, dtype=a.dtype, group_size=a.group_size), Tokenizer.from_dir(path)
    text = None
    if a.calibration:
        text = open(a.calibration, encoding="utf-8").read()
    model.reset(capacity=min(max(a.seq, 256), model.config.max_position_embeddings))
    ids = planner.calibration_ids(tok, text, a.tokens, a.seq)
    t0 = time.perf_counter()
    units, ref = planner.measure_units(model, ids, attention=a.attention, granularity=a.granularity,
                                       progress=lambda m: print(m, file=sys.stderr))
    print(f"plan: measured {len(units)} units on {ids.numel()} tokens in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)
    budget = dict(bits_per_weight=a.bits_per_weight, max_kl=a.max_kl,
                  bytes_per_token=int(a.bytes_per_token) if a.bytes_per_token is not None else None)
    if all(v is None for v in budget.values()):
        budget["bits_per_weight"] = 6.0
    rows = None
    if a.frontier:
        bits = [float(x) for x in a.frontier.split(",") if x.strip()]
        rows = planner.frontier(model, units, ids, ref, bits, a.method)
        print(f"{'budget bpw':>10} {'INT4 units':>10} {'bits/weight':>11} {'MiB/token':>10} {'KL vs INT8':>11} "
              f"{'top-1':>7} {'sum of unit KL':>15}")
        for r in rows:
            print(f"{r['budget_bits_per_weight']:>10.2f} {r['int4_units']:>10d} {r['bits_per_weight']:>11.3f} "
                  f"{r['bytes_per_token'] / 2**20:>10.1f} {r['kl']:>11.4g} {r['top1']:>7.3f} {r['predicted_kl']:>15.4g}")
    result = planner.make_plan(model, units, ids, ref, method=a.method, max_attention_kl=a.max_attention_kl, **budget)
    src = "python help() topics" if text is None else a.calibration
    out = planner.write_plan(a.output, result, str(path), {"source": src, "tokens": int(ids.numel()),
                                                           "sequences": int(ids.shape[0])}, rows)
    m = result.measured
    print(f"plan: {', '.join(result.int4) or 'nothing'} in INT4; {m['bits_per_weight']:.3f} bits per weight, "
          f"{m['bytes_per_token'] / 2**20:.1f} MiB per token, KL {m['kl']:.4g}, top-1 {m['top1']:.3f}; wrote {out}")
    if a.plot:
        if rows is None:
            raise ValueError("--plot draws the frontier: give --frontier budgets")
        planner.plot_frontier(rows, a.plot, f"bitswitch plan: {path.name}")
        print(f"plan: frontier plot {a.plot}", file=sys.stderr)
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
