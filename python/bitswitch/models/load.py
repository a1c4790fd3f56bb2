"""Loading Qwen3 / Qwen2 checkpoints: Hugging Face safetensors (single or sharded).

Every tensor is checked against the config (name, shape, dtype) before use; float weights
are quantized at load to INT8 nested planes (both views: switchable to INT4) with the
given group size, and optionally kept as float for the "full" tier. safetensors only: no
pickle is ever read and no code from the checkpoint runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from .config import Qwen3Config
from .qwen3 import Qwen3, build_linear

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def expected_tensors(cfg: Qwen3Config) -> dict:
    """name -> shape of every tensor a float checkpoint of this config holds."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    out = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, h)
    for li in range(cfg.num_hidden_layers):
        p = f"model.layers.{li}."
        out.update({p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                    p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                    p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                    p + "post_attention_layernorm.weight": (h,)})
        if cfg.qk_norm:
            out.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
        if cfg.attention_bias:
            out.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                        p + "self_attn.v_proj.bias": (kv,)})
    return out


def _shards(path: Path) -> list:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"load: {index} is not a valid safetensors index ({e})") from None
        files = sorted(set(wm.values()))
        for f in files:
            if "/" in f or "\\" in f or f.startswith("."):
                raise ValueError(f"load: {index} names a shard outside the folder: {f!r}")
        return [path / f for f in files]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    if list(path.glob("*.bin")) or list(path.glob("*.pt")) or list(path.glob("*.pth")):
        raise ValueError(f"load: {path} holds only pickle checkpoints (.bin/.pt); bitswitch reads safetensors only")
    raise FileNotFoundError(f"load: no model.safetensors or model.safetensors.index.json in {path}")


class _Reader:
    """Tensors by name across shards, opened lazily with safetensors (no pickle)."""

    def __init__(self, files: list):
        from safetensors import safe_open

        self.where: dict = {}
        self.handles = []
        for f in files:
            if not f.exists():
                raise FileNotFoundError(f"load: shard {f} is missing")
            try:
                h = safe_open(str(f), framework="pt")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise ValueError(f"load: {f} is not a valid safetensors file ({e})") from None
            self.handles.append(h)
            for name in h.keys():
                if name in self.where:
                    raise ValueError(f"load: tensor {name!r} appears in more than one shard")
                self.where[name] = (h, f)

    def get(self, name: str) -> torch.Tensor:
        h, f = self.where[name]
        try:
            return h.get_tensor(name)
        except Exception as e:
            raise ValueError(f"load: cannot read {name!r} from {f} (truncated or corrupt file? {e})") from None

    def shape_dtype(self, name: str):
        h, f = self.where[name]
        sl = h.get_slice(name)
        return tuple(sl.get_shape()), sl.get_dtype()


_ST_FLOAT = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def load(path: Any, dtype: Any = "bfloat16", group_size: int = 64, keep_float: bool = False,
         progress: Optional[bool] = None) -> Qwen3:
    """A Qwen3 / Qwen2 model from a folder with config.json and safetensors weights.

    dtype: activations, norms, KV cache (and kept float weights). group_size: of the INT8
    planes the float weights are quantized to. keep_float: also keep the float weights, for
    `set_bits("full")`. The model starts in its most precise tier.
    """
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"load: {p} is not a folder")
    tdt = _DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if tdt not in _FLOAT_DTYPES:
        raise ValueError(f"load: dtype must be one of {tuple(_DTYPES)}, got {dtype!r}")
    if group_size not in (32, 64, 128):
        raise ValueError(f"load: group_size must be 32, 64 or 128, got {group_size}")
    cfg = Qwen3Config.from_file(p / "config.json")
    for k in (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim):
        if k % group_size:
            raise ValueError(f"load: the input size {k} of a projection is not a multiple of group_size {group_size}")
    if cfg.head_dim not in (64, 128):
        raise ValueError(f"load: head_dim {cfg.head_dim} is not supported by the attention kernels (64 or 128)")
    reader = _Reader(_shards(p))
    want = expected_tensors(cfg)
    have = set(reader.where)
    optional = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    missing = sorted(set(want) - have)
    extra = sorted(have - set(want) - optional - {n for n in have if n.endswith("rotary_emb.inv_freq")})
    if missing:
        raise ValueError(f"load: {len(missing)} tensors missing from {p}: {', '.join(missing[:5])}"
                         + (" ..." if len(missing) > 5 else ""))
    if extra:
        raise ValueError(f"load: {len(extra)} unexpected tensors in {p} (not a {cfg.model_type} float checkpoint? "
                         f"quantized checkpoints load through their own format): {', '.join(extra[:5])}")
    for name, shape in want.items():
        got, st = reader.shape_dtype(name)
        if got != shape:
            raise ValueError(f"load: {name} has shape {got}, the config implies {shape}")
        if st not in _ST_FLOAT:
            raise ValueError(f"load: {name} has dtype {st}; a float checkpoint holds F32/BF16/F16")
    show = sys.stderr.isatty() if progress is None else progress
    linears, norms = {}, {}
    names = [n for n in want if n.endswith("proj.weight")] + ["model.embed_tokens.weight"] + (
        [] if cfg.tie_word_embeddings else ["lm_head.weight"])
    for done, name in enumerate(names, 1):
        w = reader.get(name)
        mod = name[: -len(".weight")]
        bias = reader.get(mod + ".bias").to(tdt) if (mod + ".bias") in want else None
        linears[mod] = build_linear(w, bias, group_size, keep_float, tdt)
        if show:
            print(f"\rload: quantizing {done}/{len(names)} weights", end="", file=sys.stderr, flush=True)
    if show:
        print(file=sys.stderr)
    if cfg.tie_word_embeddings:
        linears["lm_head"] = linears["model.embed_tokens"]
    for name in want:
        if name.endswith("norm.weight"):
            key = name[len("model."):] if name.startswith("model.") else name
            norms[key] = reader.get(name).to(tdt)
    return Qwen3(cfg, linears, norms, tdt)
