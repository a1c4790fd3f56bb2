"""Tensor parallelism (bitswitch.models.tp): 2 CPU processes with gloo, started by torchrun,
reproduce the single-process logits of the same checkpoint (prefill and decode, INT8, a
mixed policy broadcast from rank 0, INT4), and QLinear shards without re-quantizing."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import bitswitch as bs  # noqa: E402
from bitswitch.models import tp  # noqa: E402
from bitswitch.models.load import load  # noqa: E402
from bitswitch.torch import QLinear  # noqa: E402

HERE = Path(__file__).resolve().parent


def test_qlinear_shards_sum_to_the_whole(rng):
    qw = bs.quantize((rng.standard_normal((48, 256)) * 0.05).astype(np.float32), group_size=64, bits=8)
    lin = QLinear(qw, torch.from_numpy(rng.standard_normal(48).astype(np.float32)))
    x = torch.from_numpy(rng.standard_normal((3, 256)).astype(np.float32))
    for bits in (8, 4):
        lin.bits = bits
        whole = lin(x)
        cols = [tp.shard_qlinear(lin, "column", r, 2) for r in range(2)]
        assert torch.equal(torch.cat([c(x) for c in cols], -1), whole)
        rows = [tp.shard_qlinear(lin, "row", r, 2) for r in range(2)]
        parts = [QLinear.forward(r, x[:, i * 128:(i + 1) * 128].contiguous()) for i, r in enumerate(rows)]  # no all-reduce
        assert float((parts[0] + parts[1] - whole).abs().max()) <= 1e-5 * float(whole.abs().max())
    with pytest.raises(ValueError, match="on groups of 64"):
        tp.shard_qlinear(lin, "row", 0, 3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_tp")
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=False,
                                   max_position_embeddings=512)
    hf = transformers.Qwen3ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.05)
    hf.save_pretrained(path)
    return path


def test_two_gloo_ranks_reproduce_one_process(folder, tmp_path):
    out = tmp_path / "tp.npz"
    env = dict(os.environ, OMP_NUM_THREADS="1", BITSWITCH_NUM_THREADS="1")
    # the bitswitch this test imported (a source tree or an installation), and tp_worker.py
    pkg_root = str(Path(bs.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, str(HERE), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "tp_worker.py"), str(folder), str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    got = np.load(out)
    model = load(folder, dtype="float32", group_size=64)
    ids = torch.tensor([[5, 17, 42, 9, 100, 3, 77]])
    for name, policy in (("int8", "performance"), ("mixed", {"*": 8, "model.layers.0.mlp": 4}), ("int4", {"*": 4})):
        model.set_precision(policy)
        model.reset()
        ref = [model(ids)[:, -1]]
        for tok in (11, 12):
            ref.append(model(torch.tensor([[tok]]))[:, -1])
        ref = torch.cat(ref).detach().numpy()
        err = np.abs(got[name] - ref).max() / np.abs(ref).max()
        assert err <= 1e-4, (name, err)
    assert not np.allclose(got["int8"], got["int4"])
