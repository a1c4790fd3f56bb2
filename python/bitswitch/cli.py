"""The bitswitch command.

    bitswitch info                 version, CPU features, kernel variant, backends
    bitswitch bench [kernels ...]  qmatmul benchmarks against torch and MLX (see --help)
    bitswitch bench attention      block-sparse attention against torch SDPA
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
        print(f"cuda: built (runtime {cuda['runtime_version']}, archs {cuda['compiled_archs']}), "
              f"{cuda['device_count']} device(s) visible ({cuda['driver_status']})")
    else:
        print(f"cuda: {cuda['why']}")
    print(f"metal: {'built' if d['metal']['built'] else d['metal']['why']}")
    return 0


BENCH_TARGETS = ("kernels", "attention")


def _bench(a: argparse.Namespace, rest: Sequence[str]) -> int:
    if a.target == "kernels":
        from . import bench

        return bench.main(list(rest))
    if a.target == "attention":
        from . import bench_attention

        return bench_attention.main(list(rest))
    return 2  # unreachable: argparse restricts the choices


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="bitswitch", description="bitswitch: INT4/INT8 nibble-plane inference kernels")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, CPU features, kernel variant, backends")
    b = sub.add_parser("bench", help="benchmarks against the best alternatives, measured in the same run; "
                                     "options after the target go to it (bitswitch bench kernels --help)",
                       add_help=False)
    b.add_argument("target", nargs="?", default="kernels", choices=BENCH_TARGETS,
                   help="what to benchmark (default: kernels)")
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["bench"] and (len(args) == 1 or (args[1].startswith("-") and args[1] not in ("-h", "--help"))):
        args.insert(1, "kernels")  # `bitswitch bench --preset full` means the default target
    a, rest = p.parse_known_args(args)
    if a.command == "info":
        if rest:
            p.error(f"unrecognized arguments: {' '.join(rest)}")
        return _info(a)
    return _bench(a, rest)


if __name__ == "__main__":
    sys.exit(main())
