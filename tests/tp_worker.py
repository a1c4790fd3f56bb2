"""Run by test_tensor_parallel.py under torchrun: one rank of a tensor-parallel Qwen3. Writes
rank 0's logits (prefill, then two decode steps) for each precision to OUT.npz."""

import sys

import numpy as np
import torch
import torch.distributed as dist

from bitswitch.models import tp
from bitswitch.models.load import load


def main(folder: str, out: str) -> None:
    dist.init_process_group("gloo")
    model = tp.shard_model(load(folder, dtype="float32", group_size=64))
    rank = dist.get_rank()
    ids = torch.tensor([[5, 17, 42, 9, 100, 3, 77]])
    res = {}
    # rank 0 names the policy, the others pass None: the broadcast makes them agree
    for name, policy in (("int8", "performance"), ("mixed", {"*": 8, "model.layers.0.mlp": 4}), ("int4", {"*": 4})):
        tp.set_precision(model, policy if rank == 0 else None)
        model.reset()
        logits = [model(ids)[:, -1]]
        for tok in (11, 12):
            logits.append(model(torch.tensor([[tok]]))[:, -1])
        res[name] = torch.cat(logits).numpy()
    if rank == 0:
        np.savez(out, **res)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
