"""End-to-end benchmark: Qwen3 prefill and decode on bitswitch (INT8, INT4) against
Hugging Face transformers in bfloat16 on the same weights, in the same run.

The weights are random but of the real shapes: every projection is built directly as
seeded nibble planes (no float copy of the model in a bitswitch process); the transformers
anchor gets the same weights, the INT8 view dequantized to bfloat16 tensor by tensor. Each
mode runs in a process of its own, so its peak resident memory (ru_maxrss) is its own.

Per (model, mode): a prompt of ``--prompt`` random tokens is prefilled, then greedy decoding
produces ``--new-tokens`` tokens (the first from the prefill's logits), each a forward of
one token over the KV cache. Reported: prefill and decode tokens/s; the weight bytes one
decode token reads over the decode time per token (GB/s) and as a fraction of the read
bandwidth measured in the same run (the roofline: weight bytes per token / bandwidth is
the least time a token can take); the speed-up over transformers; memory: RSS after
imports, peak RSS, their difference, the model's resident weight bytes and KV-cache bytes,
and the ratio difference / (weights + KV cache).

With ``--reps`` above 1 every time is the median over the repetitions.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Optional, Sequence

from . import _C
from .bench import MODELS, machine_description, read_bandwidth

# Real Qwen3 shapes (bench.MODELS plus the layer count); "smoke" is a tiny model for tests.
SHAPES = {
    "0.6b": dict(MODELS["0.6b"], layers=28),
    "4b": dict(MODELS["4b"], layers=36),
    "smoke": dict(hidden=256, inter=512, heads=4, kv_heads=2, head_dim=64, vocab=1024, layers=2),
}
# mode -> (weight bits, activation bits); hf_bf16 is transformers on bfloat16 weights.
MODES = {"int8": (8, 16), "int4": (4, 16), "int8a8": (8, 8), "int4a8": (4, 8), "hf_bf16": None}
ANCHOR = "hf_bf16"
PRESETS = {
    "default": dict(models="0.6b,4b", prompt=512, new_tokens=128),
    # Seconds: for tests and CI.
    "smoke": dict(models="smoke", prompt=32, new_tokens=8),
}
_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Weight std of the random models, about that of Qwen3's projections.
_WEIGHT_STD = 0.02


def model_config(name: str):
    from .models.config import Qwen3Config

    c = SHAPES[name]
    return Qwen3Config(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["inter"],
                       num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
                       num_key_value_heads=c["kv_heads"], head_dim=c["head_dim"], tie_word_embeddings=True)


def weight_names(cfg) -> dict:
    """Checkpoint name (without .weight) -> [N, K] of every quantized tensor, in a fixed order."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    shapes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
              "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    out = {"model.embed_tokens": (cfg.vocab_size, h)}
    for li in range(cfg.num_hidden_layers):
        for p in _PROJS:
            out[f"model.layers.{li}.{'mlp' if p in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{p}"] = shapes[p]
    return out


def random_qweight(shape: tuple, group_size: int, planes: int, seed: int):
    """Seeded random nibble planes of W[N, K] (codes uniform in 0..15) with bfloat16 scales
    and biases centring each view on 0 with about Qwen3's weight std."""
    import torch

    from .quant import QWeight

    n, k = shape
    g = torch.Generator().manual_seed(seed)
    words = lambda: torch.randint(-(1 << 31), 1 << 31, (n, k // 8), dtype=torch.int32,  # noqa: E731
                                  generator=g).view(torch.uint32)
    p0 = words()
    p1 = words() if planes == 2 else None
    # Uniform codes have std sqrt(255/12) ~ 4.6 steps of s.
    s = ((torch.rand(n, k // group_size, generator=g) + 0.5) * (_WEIGHT_STD / 4.6)).to(torch.bfloat16)
    # b = -7.5 s centres the INT4 view (codes 0..15) and the INT8 view (16q + r, 0..255) alike.
    b = (s.float() * -7.5).to(torch.bfloat16)
    return QWeight(p0, p1, s, b, group_size)


def build_bitswitch(name: str, bits: int, group_size: int, seed: int):
    """A bitswitch Qwen3 on random planes; with bits 4 only plane 0 is made (INT4 bytes)."""
    import torch

    from .models.qwen3 import Qwen3
    from .torch import QLinear

    from .models.qwen3 import fuse_layer

    cfg = model_config(name)
    linears = {}
    for idx, (path, shape) in enumerate(weight_names(cfg).items()):
        linears[path] = QLinear(random_qweight(shape, group_size, 2 if bits == 8 else 1, seed * 100003 + idx))
        if path.endswith(".mlp.down_proj"):
            fuse_layer(linears, int(path.split(".")[2]))
    linears["lm_head"] = linears["model.embed_tokens"]
    return Qwen3(cfg, linears, {}, torch.bfloat16)


def build_transformers(name: str, group_size: int, seed: int):
    """transformers' Qwen3ForCausalLM in bfloat16 holding the INT8 view of the same random
    planes, dequantized tensor by tensor (in row chunks, so no float64 copy of a whole tensor)."""
    import torch
    import transformers

    from .quant import dequantize

    cfg = model_config(name)
    hf_cfg = transformers.Qwen3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, tie_word_embeddings=True,
        rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps, hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings, attn_implementation="sdpa")
    with torch.device("meta"):
        model = transformers.Qwen3ForCausalLM(hf_cfg).to(torch.bfloat16)
    # Allocated, not initialized: every tensor is written below.
    model = model.to_empty(device="cpu").eval()
    model.model.rotary_emb = type(model.model.rotary_emb)(config=hf_cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.fill_(1.0)
        for idx, (path, shape) in enumerate(weight_names(cfg).items()):
            qw = random_qweight(shape, group_size, 2, seed * 100003 + idx)
            dst = model.get_parameter(path + ".weight")
            rows = max(1, (1 << 22) // shape[1])
            for r in range(0, shape[0], rows):
                part = type(qw)(qw.plane0[r:r + rows], qw.plane1[r:r + rows], qw.scales[r:r + rows],
                                qw.biases[r:r + rows], group_size)
                dst[r:r + rows] = dequantize(part, bits=8)
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def _rss_peak_bytes() -> int:
    """Peak resident bytes of this process so far. Linux: VmHWM, the high-water mark of this
    address space (ru_maxrss also survives fork and exec, so a fresh worker would report the
    parent's peak); elsewhere ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _resident_bytes(module) -> int:
    """Bytes of the distinct storages behind a module's parameters and buffers (fused
    projections are views of one storage: counted once)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def run_mode(spec: dict) -> dict:
    """One (model, mode) measurement, in this process: the body of a worker."""
    import torch

    threads = spec["threads"]
    torch.set_num_threads(threads)
    _C.set_num_threads(threads)
    if spec["mode"] == ANCHOR:
        import transformers  # noqa: F401  (imported before the baseline: not the model's memory)
    from .models.qwen3 import Qwen3  # noqa: F401
    rss_imports = _rss_peak_bytes()
    name, prompt, new = spec["model"], spec["prompt"], spec["new_tokens"]
    cfg = model_config(name)
    ids = torch.randint(0, cfg.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(spec["seed"]))
    kv_bytes = (2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (prompt + new) * cfg.head_dim
                * torch.bfloat16.itemsize)
    t0 = time.perf_counter()
    if spec["mode"] == ANCHOR:
        model = build_transformers(name, spec["group_size"], spec["seed"])
        read_bytes = sum(m.weight.numel() * m.weight.element_size() for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear))
        prefill, step = _hf_runner(model)
    else:
        bits, act_bits = MODES[spec["mode"]]
        model = build_bitswitch(name, bits, spec["group_size"], spec["seed"])
        model.set_bits(bits)
        for m in model.linears().values():
            m.act_bits = act_bits
        read_bytes = model.weight_bytes()
        model.reset(1, capacity=prompt + new)
        prefill, step = _bitswitch_runner(model)
    build_s = time.perf_counter() - t0
    weight_bytes = _resident_bytes(model)

    # Warm-up: a short prefill and a few steps (first-call allocations, thread start-up).
    tok = prefill(ids[:, :8])
    for _ in range(3):
        tok = step(tok)
    prefill_s, decode_s, tokens, layerwise_s = [], [], [], []
    layerwise = spec.get("layerwise") and spec["mode"] != ANCHOR
    for _ in range(spec["reps"]):
        t0 = time.perf_counter()
        tok = prefill(ids)
        t1 = time.perf_counter()
        out = [int(tok)]
        for _ in range(new - 1):
            tok = step(tok)
            out.append(int(tok))
        t2 = time.perf_counter()
        prefill_s.append(t1 - t0)
        decode_s.append(t2 - t1)
        tokens = out
        if layerwise:  # the same generation with the layer-by-layer decode path, right after
            model.native_decode = False
            tok = prefill(ids)
            t1 = time.perf_counter()
            again = [int(tok)]
            for _ in range(new - 1):
                tok = step(tok)
                again.append(int(tok))
            layerwise_s.append(time.perf_counter() - t1)
            model.native_decode = True
            if again != tokens:
                raise RuntimeError("bench e2e: the layer-by-layer decode path generated other tokens")
    peak = _rss_peak_bytes()
    p, d = statistics.median(prefill_s), statistics.median(decode_s)
    per_token = d / max(1, new - 1)
    layer_ms = statistics.median(layerwise_s) / max(1, new - 1) * 1e3 if layerwise_s else None
    return dict(layerwise_ms_per_token=layer_ms, x_layerwise=layer_ms / (per_token * 1e3) if layer_ms else None,
                model=name, mode=spec["mode"], prompt=prompt, new_tokens=new, build_s=build_s,
                prefill_s=p, decode_s=d, prefill_tps=prompt / p, decode_tps=1.0 / per_token,
                decode_ms_per_token=per_token * 1e3, read_bytes_per_token=read_bytes,
                gbs=read_bytes / per_token / 1e9, tokens=tokens,
                rss_imports=rss_imports, rss_peak=peak, rss_delta=peak - rss_imports,
                weight_bytes=weight_bytes, kv_bytes=kv_bytes,
                rss_ratio=(peak - rss_imports) / (weight_bytes + kv_bytes))


def _bitswitch_runner(model):
    """(prefill(ids) -> next token, step(token) -> next token), greedy, on the static cache,
    with torch on one thread around each call as in generation (torch_threads)."""
    import torch

    from .torch import torch_threads

    @torch.inference_mode()
    def prefill(ids):
        with torch_threads(1):
            model.reset()
            return model(ids, logits_to_keep=1)[:, -1].float().argmax(-1, keepdim=True)

    @torch.inference_mode()
    def step(tok):
        with torch_threads(1):
            return model(tok)[:, -1].float().argmax(-1, keepdim=True)

    return prefill, step


@functools.lru_cache(maxsize=None)
def _hf_cache_kwarg(cls) -> str:
    """The name a transformers model class's forward takes its KV cache by."""
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def hf_forward(model, ids, cache=None, **kwargs) -> tuple:
    """(logits, KV cache) of a transformers causal LM's forward over `ids` after `cache` (None:
    a new one). The cache argument and output are `cache` from transformers 5.x on and
    `past_key_values` before (the old name is deprecated, to be removed in 5.40)."""
    if cache is not None:
        kwargs[_hf_cache_kwarg(type(model))] = cache
    out = model(input_ids=ids, use_cache=True, **kwargs)
    new = getattr(out, "cache", None)
    return out.logits, new if new is not None else out.past_key_values


def _hf_runner(model):
    """The same for transformers: its own KV cache (what generate uses), logits of the last
    position only in prefill (as generate asks)."""
    import torch

    state = {}

    @torch.inference_mode()
    def prefill(ids):
        logits, state["cache"] = hf_forward(model, ids, logits_to_keep=1)
        return logits[:, -1].float().argmax(-1, keepdim=True)

    @torch.inference_mode()
    def step(tok):
        logits, state["cache"] = hf_forward(model, tok, state["cache"])
        return logits[:, -1].float().argmax(-1, keepdim=True)

    return prefill, step


def _worker(spec_json: str) -> int:
    res = run_mode(json.loads(spec_json))
    print("BITSWITCH_E2E_RESULT " + json.dumps(res), flush=True)
    return 0


def run_worker(spec: dict, log=print) -> dict:
    """run_mode(spec) in a fresh Python process (its own peak RSS); its stderr is passed on."""
    env = dict(os.environ, BITSWITCH_NUM_THREADS=str(spec["threads"]), OMP_NUM_THREADS=str(spec["threads"]))
    proc = subprocess.run([sys.executable, "-m", "bitswitch.bench_e2e", "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("BITSWITCH_E2E_RESULT "):
            return json.loads(line[len("BITSWITCH_E2E_RESULT "):])
    raise RuntimeError(f"bench e2e: the {spec['model']} {spec['mode']} worker failed (exit {proc.returncode}):\n"
                       f"{proc.stderr[-4000:]}")


def run(models: Sequence[str], modes: Sequence[str], prompt: int, new_tokens: int, threads: int,
        group_size: int, reps: int, seed: int = 0, bandwidth_bytes: int = 1 << 30, log=print,
        layerwise: bool = False) -> dict:
    """Every (model, mode) in its own process; the read bandwidth measured before each model.
    layerwise: each bitswitch generation is followed by the same one on the layer-by-layer
    decode path (Qwen3.native_decode off), timed in the same process."""
    rows, bws = [], []
    for name in models:
        bw = read_bandwidth(threads, bandwidth_bytes) * 1e9
        bws.append(bw)
        log(f"{name}: read bandwidth {bw / 1e9:.1f} GB/s ({threads} threads, {bandwidth_bytes / 2**30:.2f} GiB)")
        model_rows = []
        for mode in modes:
            r = run_worker(dict(model=name, mode=mode, prompt=prompt, new_tokens=new_tokens, threads=threads,
                                group_size=group_size, reps=reps, seed=seed, layerwise=layerwise))
            r["bandwidth_gbs"] = bw / 1e9
            r["roofline_ms_per_token"] = r["read_bytes_per_token"] / bw * 1e3
            r["roofline_frac"] = r["roofline_ms_per_token"] / r["decode_ms_per_token"]
            model_rows.append(r)
            log(format_detail(r))
        anchor = next((r for r in model_rows if r["mode"] == ANCHOR), None)
        for r in model_rows:
            r["x_hf_decode"] = anchor["decode_ms_per_token"] / r["decode_ms_per_token"] if anchor else None
            r["x_hf_prefill"] = r["prefill_tps"] / anchor["prefill_tps"] if anchor else None
        rows += model_rows
    return dict(machine=machine_description(), date=time.strftime("%Y-%m-%d"), threads=threads,
                group_size=group_size, prompt=prompt, new_tokens=new_tokens, reps=reps,
                read_bandwidth_gbs=[b / 1e9 for b in bws], cpu_variant=_C.cpu_variant(), rows=rows)


def _mb(b: float) -> str:
    return f"{b / 2**20:.0f}"


def format_detail(r: dict) -> str:
    return (f"  {r['model']:<6}{r['mode']:<8} prefill {r['prefill_s'] * 1e3:8.0f} ms ({r['prefill_tps']:7.1f} tok/s), "
            f"decode {r['decode_ms_per_token']:7.2f} ms/token ({r['decode_tps']:6.1f} tok/s, "
            f"{r['read_bytes_per_token'] / 2**20:.0f} MiB/token, {r['gbs']:.1f} GB/s, "
            f"{r['roofline_frac'] * 100:.0f}% of roofline); RSS MiB: imports {_mb(r['rss_imports'])}, "
            f"peak {_mb(r['rss_peak'])}, delta {_mb(r['rss_delta'])} = {r['rss_ratio']:.2f} x "
            f"(weights {_mb(r['weight_bytes'])} + KV {_mb(r['kv_bytes'])})")


def _x(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}"


COLUMNS = ("model", "mode", "prefill tok/s", "decode tok/s", "GB/s", "% roofline", "x HF decode",
           "x HF prefill", "peak RSS ratio", "x layerwise")


def _cells(r: dict) -> list:
    return [r["model"], r["mode"], f"{r['prefill_tps']:.1f}", f"{r['decode_tps']:.2f}", f"{r['gbs']:.1f}",
            f"{r['roofline_frac'] * 100:.0f}%", _x(r["x_hf_decode"]), _x(r["x_hf_prefill"]),
            f"{r['rss_ratio']:.2f}", _x(r.get("x_layerwise"))]


def table(rows: Sequence[dict]) -> str:
    widths = [7, 9, 14, 13, 7, 11, 12, 13, 15, 12]
    lines = ["".join(f"{c:>{w}}" if i > 1 else f"{c:<{w}}" for i, (c, w) in enumerate(zip(COLUMNS, widths)))]
    for r in rows:
        lines.append("".join(f"{c:>{w}}" if i > 1 else f"{c:<{w}}" for i, (c, w) in enumerate(zip(_cells(r), widths))))
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict]) -> str:
    lines = ["| " + " | ".join(c.replace("x ", "× ", 1) if c.startswith("x ") else c for c in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="bitswitch bench e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="defaults of --models, --prompt and --new-tokens (smoke: a tiny model, seconds)")
    p.add_argument("--models", type=str, help=f"comma-separated subset of {','.join(SHAPES)}")
    p.add_argument("--prompt", type=int, help="prompt tokens (default 512)")
    p.add_argument("--new-tokens", type=int, help="generated tokens (default 128)")
    p.add_argument("--modes", type=str, default="int8,int4,hf_bf16",
                   help=f"comma-separated subset of {','.join(MODES)} (a8: int8 activations)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128))
    p.add_argument("--reps", type=int, default=1, help="generations per mode (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bandwidth-bytes", type=float, default=float(1 << 30),
                   help="buffer read to measure the bandwidth (above the L3)")
    p.add_argument("--layerwise", action="store_true",
                   help="also time each bitswitch generation on the layer-by-layer decode path (Python, one "
                        "native call per op) in the same process: column 'x layerwise' is its decode time over "
                        "the native decode step's")
    p.add_argument("--json", type=str, help="write the report here")
    p.add_argument("--markdown", action="store_true", help="print a markdown table at the end")
    p.add_argument("--worker", type=str, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return _worker(a.worker)
    preset = PRESETS[a.preset]
    models = [m for m in (a.models or preset["models"]).split(",") if m]
    bad = [m for m in models if m not in SHAPES]
    if bad or not models:
        p.error(f"--models: unknown {bad}; choose from {tuple(SHAPES)}")
    modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        p.error(f"--modes: unknown {bad}; choose from {tuple(MODES)}")
    prompt = a.prompt if a.prompt is not None else preset["prompt"]
    new = a.new_tokens if a.new_tokens is not None else preset["new_tokens"]
    if prompt < 8 or new < 2:
        p.error("--prompt must be at least 8 and --new-tokens at least 2")
    if a.threads < 1 or a.reps < 1:
        p.error("--threads and --reps must be at least 1")
    try:
        import torch
    except ImportError:
        p.error("the end-to-end benchmark needs torch (pip install 'bitswitch[torch]')")
    if ANCHOR in modes:
        try:
            import transformers
        except ImportError:
            p.error(f"mode {ANCHOR} needs transformers (pip install transformers)")
    print(f"bitswitch {_C.__version__} end to end on {machine_description()}: {a.threads} threads, "
          f"group size {a.group_size}, bfloat16 activations and KV cache, prompt {prompt}, {new} new tokens "
          f"(greedy), torch {torch.__version__}" + (f", transformers {transformers.__version__}" if ANCHOR in modes
                                                     else ""), flush=True)
    report = run(models, modes, prompt, new, a.threads, a.group_size, a.reps, a.seed, int(a.bandwidth_bytes),
                 log=lambda s: print(s, flush=True), layerwise=a.layerwise)
    report["command"] = "bitswitch bench e2e " + " ".join(sys.argv[3:] if argv is None else argv)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    print("GB/s: weight bytes per decode token over the time per token; % roofline: of the read bandwidth; "
          "x HF: speed-up over transformers bf16; peak RSS ratio: (peak - after imports) / (weights + KV cache); "
          "x layerwise (--layerwise): the layer-by-layer decode path's time over the native decode step's")
    print(table(report["rows"]))
    if a.markdown:
        print(markdown_table(report["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
