"""The bitswitch command.

    bitswitch generate [PROMPT]    text from a model (default: the embedded tiny Qwen3)
    bitswitch chat                 interactive multi-turn chat, thinking on or off
    bitswitch quantize SRC DST     a checkpoint saved as nibble planes (no re-quantization at load)
    bitswitch plan                 INT4/INT8 per layer from measured sensitivity, under a budget
    bitswitch info [MODEL]         version, CPU features, kernel variant, backends; or a model's layout
    bitswitch bench [kernels ...]  qmatmul benchmarks against torch and MLX (see --help)
    bitswitch bench attention      block-sparse attention against torch SDPA
    bitswitch bench e2e            Qwen3 prefill and decode (INT8, INT4) against transformers bf16
    bitswitch bench precision      one model's precision settings: speed, bytes, KL, switch time
    bitswitch bench gpu            CUDA kernels against cuBLAS, tinygemm, SDPA, flex_attention
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _info(_: argparse.Namespace) -> int:
    import bitswitch

    d = bitswitch.info()
    cpu = d["cpu"]
    print(f"bitswitch {d['version']}")
    print(f"cpu: {cpu['brand'] or '?'} ({cpu['vendor']})")
    feats = [k for k, v in cpu["features"].items() if v]
    print(f"cpu features: {' '.join(feats) or 'none of interest'}")
    for name, status in cpu["variants"].items():
        print(f"  kernel variant {name:<7} {'available' if status == 'ok' else 'unavailable: ' + status}")
    if cpu["avx512_emulated"]:
        print("  (test build: the avx512 variant runs on portable emulation)")
    if cpu["active"]:
        print(f"kernel variant selected: {cpu['active']} (best here: {cpu['best']}; force one with BITSWITCH_CPU)")
    else:
        print(f"kernel variant selected: none: {cpu['active_error']}")
    print(f"threads: {d['num_threads']} (BITSWITCH_NUM_THREADS)")
    cuda = d["cuda"]
    if cuda["built"]:
        print(f"cuda: kernels built (runtime {cuda['runtime_version']}, archs {cuda['compiled_archs']}, "
              f"{'loaded' if cuda['loaded'] else 'not loaded'}), {cuda['device_count']} device(s) visible "
              f"({cuda['driver_status']})")
    else:
        print(f"cuda: {cuda['why']}")
    m = d["metal"]
    print(f"metal: kernel sources in {m['sources']}; MLX: {m['mlx']}; torch: {m['torch_mps']}" if m["built"]
          else f"metal: {m['why']}")
    return 0


BENCH_TARGETS = ("kernels", "attention", "e2e", "precision", "gpu")


def _bench(a: argparse.Namespace, rest: Sequence[str]) -> int:
    if a.target == "kernels":
        from . import bench

        return bench.main(list(rest))
    if a.target == "attention":
        from . import bench_attention

        return bench_attention.main(list(rest))
    if a.target == "e2e":
        from . import bench_e2e

        return bench_e2e.main(list(rest))
    if a.target == "precision":
        from . import bench_precision

        return bench_precision.main(list(rest))
    if a.target == "gpu":
        from . import bench_gpu

        return bench_gpu.main(list(rest))
    return 2  # unreachable: argparse restricts the choices


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="bitswitch", description="bitswitch: INT4/INT8 nibble-plane inference kernels")
    sub = p.add_subparsers(dest="command", required=True)
    from . import cli_models as cm

    i = sub.add_parser("info", help="version, CPU features, kernel variant, backends; with MODEL, its layout")
    i.add_argument("model", nargs="?", default=None, help="a model folder or repo id ('default': the embedded one)")
    g = sub.add_parser("generate", help="generate text from a prompt (default model: the embedded tiny Qwen3)")
    g.add_argument("prompt", nargs="?", default="The Python language", help="the prompt")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--demo", action="store_true",
                   help="generate twice from one loaded model: in INT8, then switched to INT4 (and efficiency mode)")
    cm.add_model_args(g)
    cm.add_sampling_args(g)
    c = sub.add_parser("chat", help="interactive chat; the KV cache is kept between turns")
    c.add_argument("--system", default=None, help="a system message")
    cm.add_model_args(c)
    cm.add_sampling_args(c)
    q = sub.add_parser("quantize", help="save a checkpoint as nibble planes (loads without re-quantization)")
    q.add_argument("src", help="model folder or repo id (HF safetensors, MLX, AWQ, GPTQ, bitswitch)")
    q.add_argument("dst", help="output folder")
    q.add_argument("--bits", type=int, default=8, choices=(4, 8), help="8: planes 0 and 1 (both views); 4: plane 0")
    q.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128))
    pl = sub.add_parser("plan", help="choose INT4/INT8 per layer from measured sensitivity under a budget; "
                                     "writes a plan file for --precision / set_precision")
    pl.add_argument("-m", "--model", default=None, help="model folder or repo id (default: the embedded tiny Qwen3)")
    budget = pl.add_mutually_exclusive_group()
    budget.add_argument("--bits-per-weight", type=float, default=None,
                        help="weight bits a decode token reads per weight, scales included (INT4 g64: 4.5, INT8: 8.5)")
    budget.add_argument("--bytes-per-token", type=float, default=None, help="weight bytes a decode token may read")
    budget.add_argument("--max-kl", type=float, default=None,
                        help="the most INT4 whose summed per-unit KL from INT8 stays under this (nats per token)")
    pl.add_argument("--method", default="knapsack", choices=("greedy", "knapsack"))
    pl.add_argument("--granularity", default="layer", choices=("layer", "block"),
                    help="units that drop to INT4 alone: whole layers, or attention and MLP blocks separately")
    pl.add_argument("--calibration", default=None, help="a text file (default: Python's help() topics)")
    pl.add_argument("--tokens", type=int, default=512, help="calibration tokens")
    pl.add_argument("--seq", type=int, default=128, help="tokens per calibration sequence")
    pl.add_argument("--attention", action="store_true",
                    help="also measure each layer with block-sparse attention (needs long --seq)")
    pl.add_argument("--max-attention-kl", type=float, default=None,
                    help="with --attention: layers whose sparse-attention KL is at most this attend sparsely")
    pl.add_argument("--frontier", default="4.5,5,5.5,6,7,8.5",
                    help="bits-per-weight budgets of the frontier table ('' for none)")
    pl.add_argument("-o", "--output", default="plan.json", help="plan file to write")
    pl.add_argument("--plot", default=None, help="also draw the frontier to this PNG (needs matplotlib)")
    pl.add_argument("--dtype", default="float32", choices=("bfloat16", "float16", "float32"))
    pl.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128))
    pl.add_argument("--threads", type=int, default=None)
    b = sub.add_parser("bench", help="benchmarks against the best alternatives, measured in the same run; "
                                     "options after the target go to it (bitswitch bench kernels --help)",
                       add_help=False)
    b.add_argument("target", nargs="?", default="kernels", choices=BENCH_TARGETS,
                   help="what to benchmark (default: kernels)")
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["bench"] and (len(args) == 1 or (args[1].startswith("-") and args[1] not in ("-h", "--help"))):
        args.insert(1, "kernels")  # `bitswitch bench --preset full` means the default target
    a, rest = p.parse_known_args(args)
    if a.command != "bench" and rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if a.command == "info":
            return cm.info(a) if a.model else _info(a)
        if a.command in ("generate", "chat", "quantize", "plan"):
            return getattr(cm, a.command)(a)
    except (ValueError, FileNotFoundError) as e:
        print(f"bitswitch {a.command}: {e}", file=sys.stderr)
        return 1
    return _bench(a, rest)


if __name__ == "__main__":
    sys.exit(main())
