"""Tensor parallelism for the Qwen3 / Qwen2 model over torch.distributed (gloo on CPUs, NCCL
on GPUs), started with torchrun:

    torchrun --nproc_per_node 2 -m bitswitch.models.tp MODEL_DIR "The prompt"

Megatron's split, without re-quantizing anything: q/k/v and gate/up are sharded column-wise
(each rank keeps Hq/P query heads, Hkv/P kv heads and I/P MLP channels: plane rows, scales,
biases), o_proj and down_proj row-wise on group boundaries (plane words, scale and bias
columns) followed by an all-reduce of their outputs; norms, embedding and lm_head are
replicated. Each rank keeps its own KV cache of Hkv/P heads. Precision switches per rank;
``set_precision`` broadcasts rank 0's policy so every rank reads the same views.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..quant import QWeight
from ..torch import QLinear
from .qwen3 import Fused, Qwen3

__all__ = ["shard_qlinear", "shard_model", "set_precision", "RowParallelQLinear"]


class RowParallelQLinear(QLinear):
    """A QLinear holding a slice of the inputs (K) of a row-parallel projection: its forward
    sums the ranks' partial outputs with an all-reduce (the bias lives on rank 0 only)."""

    group: Optional[Any] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        dist.all_reduce(y, group=self.group)
        return y


def _rows(t, sl):
    return None if t is None else t[sl].contiguous()


def shard_qlinear(lin: QLinear, dim: str, rank: int, world: int, group=None) -> QLinear:
    """Rank `rank`'s share of a QLinear: dim "column" keeps out_features/world output rows,
    dim "row" keeps in_features/world inputs (a whole number of groups) and returns a
    RowParallelQLinear. The codes, scales and biases are sliced, never re-quantized."""
    n, k, g = lin.out_features, lin.in_features, lin.group_size
    if dim == "column":
        if n % world:
            raise ValueError(f"shard_qlinear: {n} outputs do not split over {world} ranks")
        sl = slice(rank * n // world, (rank + 1) * n // world)
        qw = QWeight(_rows(lin.plane0, sl), _rows(lin.plane1, sl), _rows(lin.scales, sl), _rows(lin.biases, sl), g)
        out = QLinear(qw, _rows(lin.bias, sl), weight=_rows(lin.weight_full, sl))
    elif dim == "row":
        per = k // world
        if k % world or per % g:
            raise ValueError(f"shard_qlinear: {k} inputs do not split over {world} ranks on groups of {g}")
        words, groups, cols = (slice(rank * per // d, (rank + 1) * per // d) for d in (8, g, 1))
        cut = lambda t, s: None if t is None else t[:, s].contiguous()  # noqa: E731
        qw = QWeight(cut(lin.plane0, words), cut(lin.plane1, words), cut(lin.scales, groups), cut(lin.biases, groups), g)
        out = RowParallelQLinear(qw, lin.bias if rank == 0 else None, weight=cut(lin.weight_full, cols))
        out.group = group
    else:
        raise ValueError(f"shard_qlinear: dim must be 'column' or 'row', got {dim!r}")
    out.bits, out.act_bits = lin.bits, lin.act_bits
    return out


def shard_model(model: Qwen3, group=None) -> Qwen3:
    """Shards a loaded model in place for this process's rank of `group` (default: the whole
    world). Every rank must have loaded the same checkpoint with the same settings."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    cfg = model.config
    inter_per = cfg.intermediate_size // world
    for what, total in (("num_attention_heads", cfg.num_attention_heads), ("num_key_value_heads", cfg.num_key_value_heads),
                        ("intermediate_size", cfg.intermediate_size)):
        if total % world:
            raise ValueError(f"shard_model: {what} = {total} does not split over {world} ranks")
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, name, shard_qlinear(getattr(attn, name), "column", rank, world, group))
        attn.o_proj = shard_qlinear(attn.o_proj, "row", rank, world, group)
        attn.hq, attn.hkv = cfg.num_attention_heads // world, cfg.num_key_value_heads // world
        attn.qkv = Fused([attn.q_proj, attn.k_proj, attn.v_proj])
        for name in ("gate_proj", "up_proj"):
            setattr(mlp, name, shard_qlinear(getattr(mlp, name), "column", rank, world, group))
        mlp.down_proj = shard_qlinear(mlp.down_proj, "row", rank, world, group)
        mlp.gate_up = Fused([mlp.gate_proj, mlp.up_proj])
    # The rank's view of the shapes: the KV cache holds Hkv/P heads.
    model.config = dataclasses.replace(cfg, num_attention_heads=cfg.num_attention_heads // world,
                                       num_key_value_heads=cfg.num_key_value_heads // world,
                                       intermediate_size=inter_per)
    model.tp = (rank, world, group)
    model._projections = None
    model.cache = None
    return model


def set_precision(model: Qwen3, policy=None, src: int = 0):
    """model.set_precision with rank `src`'s policy (the other ranks pass anything, e.g.
    None): every rank reads the same views. Returns this rank's report."""
    group = getattr(model, "tp", (0, 1, None))[2]
    box = [policy]
    dist.broadcast_object_list(box, src=src, group=group)
    return model.set_precision(box[0])


def main(argv=None) -> int:
    """torchrun entry point: greedy text from MODEL_DIR across the ranks (rank 0 prints)."""
    import argparse

    from .generate import SamplingParams, generate
    from .load import load, resolve_model_path
    from .tokenizer import Tokenizer

    ap = argparse.ArgumentParser(description="Tensor-parallel generation (run under torchrun)")
    ap.add_argument("model")
    ap.add_argument("prompt")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--precision", default="performance")
    args = ap.parse_args(argv)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        model = shard_model(load(args.model, dtype="float32"))
        set_precision(model, args.precision)
        tok = Tokenizer.from_dir(resolve_model_path(args.model))
        ids = tok.encode(args.prompt)
        res = generate(model, tok, ids, SamplingParams(temperature=0.0), max_new_tokens=args.max_new_tokens)
        if dist.get_rank() == 0:
            print(tok.decode(res.tokens))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
