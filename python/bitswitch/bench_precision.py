"""``bitswitch bench precision``: what each precision setting of one loaded model buys.

Per model (Qwen3-0.6B and 4B shapes with random weights built as nibble planes, and the
embedded trained model), one process loads the model once and then, for every setting:

- ``performance`` (INT8, dense attention), ``efficiency`` (INT4, block-sparse attention)
  and the planner's plans at 4.5, 5 and 6 bits per weight (layer units, knapsack),
- decode tokens/s (a prompt of ``--prompt`` tokens, then ``--new-tokens`` greedy steps,
  median step time), the weight bytes a token reads, bits per weight, and the KL
  divergence and top-1 agreement of the next-token distributions against INT8 on the
  calibration tokens (text for the embedded model; random ids for random weights, where
  only the relative size of the numbers means anything);
- the time of a whole-model switch: set_precision alternating between performance and
  efficiency (policy resolution included), and the bare attribute writes of an already
  resolved assignment (what a switch costs at a token boundary).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Optional, Sequence

from . import _C
from . import precision as P
from .bench import machine_description

MODELS = ("0.6b", "4b", "embedded")
PRESETS = {
    "default": dict(models="0.6b,4b,embedded", prompt=128, new_tokens=48, tokens=256, seq=128),
    "smoke": dict(models="embedded", prompt=16, new_tokens=8, tokens=128, seq=64),
}
PLAN_BITS = (4.5, 5.0, 6.0)


def _build(name: str, group_size: int, seed: int):
    from .models import Tokenizer, default_model_path, load

    if name == "embedded":
        path = default_model_path()
        model = load(path, dtype="bfloat16", group_size=group_size)
        return model, Tokenizer.from_dir(path)
    from .bench_e2e import build_bitswitch

    model = build_bitswitch(name, 8, group_size, seed)
    model.set_precision("performance")
    return model, None


def _calibration(model, tok, tokens: int, seq: int, seed: int):
    import torch

    from . import planner

    if tok is not None:
        return planner.calibration_ids(tok, tokens=tokens, seq=seq)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (tokens // seq, seq), generator=g)


def _decode_tps(model, prompt: int, new: int, seed: int) -> float:
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=g)
    with torch.inference_mode():
        model.reset()
        tok = model(ids, logits_to_keep=1)[:, -1].argmax(-1, keepdim=True)
        steps = []
        for _ in range(new):
            t0 = time.perf_counter()
            tok = model(tok)[:, -1].argmax(-1, keepdim=True)
            steps.append(time.perf_counter() - t0)
    return 1.0 / statistics.median(steps[2:] if len(steps) > 4 else steps)


def _switch_times(model, reps: int = 50) -> dict:
    a_perf, a_eff = P.resolve(model, "performance"), P.resolve(model, "efficiency")
    full, bare = [], []
    for i in range(reps):
        t0 = time.perf_counter()
        model.set_precision("efficiency" if i % 2 else "performance")
        full.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        P.apply(model, a_eff if i % 2 else a_perf)
        bare.append(time.perf_counter() - t0)
    return {"set_precision_ms": statistics.median(full) * 1e3, "apply_ms": statistics.median(bare) * 1e3}


def run_model(name: str, prompt: int, new: int, tokens: int, seq: int, threads: int, group_size: int, seed: int,
              log=print) -> dict:
    import torch

    from . import planner

    torch.set_num_threads(threads)
    _C.set_num_threads(threads)
    t0 = time.perf_counter()
    model, tok = _build(name, group_size, seed)
    model.reset(capacity=max(prompt + new + 8, seq))
    log(f"{name}: built in {time.perf_counter() - t0:.1f} s, {len(model.layers)} layers")
    ids = _calibration(model, tok, tokens, seq, seed)
    t0 = time.perf_counter()
    units, ref = planner.measure_units(model, ids)
    log(f"{name}: sensitivity of {len(units)} units on {ids.numel()} tokens in {time.perf_counter() - t0:.1f} s")
    settings = {"performance": "performance", "efficiency": "efficiency"}
    for b in PLAN_BITS:
        settings[f"plan {b:g} bpw"] = planner.make_plan(model, units, ids, ref, bits_per_weight=b,
                                                        method="knapsack").policy
    rows = []
    for label, policy in settings.items():
        m = planner.evaluate(model, ids, ref, policy)
        model.reset(capacity=model.cache.capacity)
        tps = _decode_tps(model, prompt, new, seed)
        row = {"model": name, "setting": label, "decode_tps": tps, **m}
        rows.append(row)
        log(f"  {label:<16} {tps:7.2f} tok/s, {m['bytes_per_token'] / 2**20:7.1f} MiB/token, "
            f"{m['bits_per_weight']:.2f} bits/weight, KL {m['kl']:.4g}, top-1 {m['top1']:.3f}")
    sw = _switch_times(model)
    log(f"  whole-model switch: set_precision {sw['set_precision_ms']:.3f} ms, bare apply {sw['apply_ms']:.3f} ms")
    return {"model": name, "layers": len(model.layers), "rows": rows, "switch": sw}


def markdown(report: dict) -> str:
    lines = ["| model | setting | decode tok/s | × performance | MiB/token | bits/weight | KL vs INT8 | top-1 |",
             "|---|---|---|---|---|---|---|---|"]
    for m in report["models"]:
        base = m["rows"][0]["decode_tps"]
        for r in m["rows"]:
            lines.append(f"| {r['model']} | {r['setting']} | {r['decode_tps']:.2f} | {r['decode_tps'] / base:.2f} | "
                         f"{r['bytes_per_token'] / 2**20:.1f} | {r['bits_per_weight']:.2f} | {r['kl']:.4g} | "
                         f"{r['top1']:.3f} |")
    lines += ["", "| model | layers | set_precision (whole model) ms | attribute writes ms |", "|---|---|---|---|"]
    for m in report["models"]:
        lines.append(f"| {m['model']} | {m['layers']} | {m['switch']['set_precision_ms']:.3f} | "
                     f"{m['switch']['apply_ms']:.3f} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="bitswitch bench precision", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--models", type=str, help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--prompt", type=int, help="prompt tokens before the decode steps")
    p.add_argument("--new-tokens", type=int, help="decode steps timed per setting")
    p.add_argument("--tokens", type=int, help="calibration tokens (sensitivity and KL)")
    p.add_argument("--seq", type=int, help="tokens per calibration sequence")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=str)
    p.add_argument("--markdown", action="store_true")
    a = p.parse_args(argv)
    preset = PRESETS[a.preset]
    models = [m for m in (a.models or preset["models"]).split(",") if m]
    bad = [m for m in models if m not in MODELS]
    if bad or not models:
        p.error(f"--models: unknown {bad}; choose from {MODELS}")
    opts = {k: getattr(a, k) if getattr(a, k) is not None else preset[k] for k in ("prompt", "new_tokens", "tokens", "seq")}
    if opts["new_tokens"] < 2 or opts["prompt"] < 1 or opts["tokens"] < opts["seq"] or opts["seq"] < 2:
        p.error("--new-tokens >= 2, --prompt >= 1, --seq >= 2 and --tokens >= --seq are required")
    try:
        import torch
    except ImportError:
        p.error("bench precision needs torch (pip install 'bitswitch[torch,models]')")
    print(f"bitswitch {_C.__version__} precision settings on {machine_description()}: {a.threads} threads, "
          f"group size {a.group_size}, bfloat16, prompt {opts['prompt']}, {opts['new_tokens']} decode steps, "
          f"{opts['tokens']} calibration tokens, torch {torch.__version__}", flush=True)
    report = {"machine": machine_description(), "date": time.strftime("%Y-%m-%d"), "threads": a.threads,
              "group_size": a.group_size, **opts, "cpu_variant": _C.cpu_variant(), "models": []}
    for name in models:
        report["models"].append(run_model(name, opts["prompt"], opts["new_tokens"], opts["tokens"], opts["seq"],
                                          a.threads, a.group_size, a.seed, log=lambda s: print(s, flush=True)))
    report["command"] = "bitswitch bench precision " + " ".join(sys.argv[3:] if argv is None else argv)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    print(markdown(report) if a.markdown else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
