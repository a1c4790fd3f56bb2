"""Qwen3 / Qwen2 configuration from a checkpoint's config.json.

Both spellings of RoPE are read: transformers 4.x (``rope_theta`` and ``rope_scaling``) and
5.x (``rope_parameters``). Sizes are checked before anything is allocated.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

from .._json import read_json_object

MODEL_TYPES = ("qwen3", "qwen2")
ROPE_TYPES = ("default", "yarn")

# Far above any released Qwen model; a config beyond these is corrupt, not large.
_LIMITS = dict(vocab_size=1 << 22, hidden_size=1 << 16, intermediate_size=1 << 18, num_hidden_layers=1024,
               num_attention_heads=1024, num_key_value_heads=1024, head_dim=1024, max_position_embeddings=1 << 24)


@dataclasses.dataclass
class Qwen3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    rope_scaling: Optional[dict] = None   # {"rope_type": "yarn", "factor", "original_max_position_embeddings", ...}
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    model_type: str = "qwen3"
    attention_bias: bool = False          # q/k/v biases (Qwen2: always)
    qk_norm: bool = True                  # RMSNorm of q and k over head_dim before RoPE (Qwen3)
    eos_token_id: tuple = ()
    quantization: Optional[dict] = None   # MLX: {"group_size", "bits", per-module overrides}

    @classmethod
    def from_dict(cls, d: dict) -> "Qwen3Config":
        if not isinstance(d, dict):
            raise ValueError(f"config: expected a JSON object, got {type(d).__name__}")
        mt = d.get("model_type", "qwen3")
        if mt not in MODEL_TYPES:
            raise ValueError(f"config: model_type {mt!r} is not supported; supported: {MODEL_TYPES}")

        def req(name: str) -> int:
            if name not in d:
                raise ValueError(f"config: missing {name!r}")
            v = d[name]
            if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= _LIMITS[name]:
                raise ValueError(f"config: {name} must be an integer in 1..{_LIMITS[name]}, got {v!r}")
            return v

        hidden, heads = req("hidden_size"), req("num_attention_heads")
        kv = req("num_key_value_heads") if "num_key_value_heads" in d else heads
        head_dim = d.get("head_dim") or hidden // heads
        if not isinstance(head_dim, int) or isinstance(head_dim, bool) or not 0 < head_dim <= _LIMITS["head_dim"] \
                or head_dim % 2:
            raise ValueError(f"config: head_dim must be a positive even integer, got {head_dim!r}")
        if heads % kv:
            raise ValueError(f"config: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv})")
        rope = d.get("rope_parameters")
        if isinstance(rope, dict) and "rope_theta" in rope:          # transformers 5.x
            theta = rope["rope_theta"]
            scaling = None if rope.get("rope_type", "default") == "default" else dict(rope)
        else:                                                        # transformers 4.x
            theta = d.get("rope_theta", 1e6 if mt == "qwen3" else 1e4)
            scaling = d.get("rope_scaling")
            scaling = dict(scaling) if scaling else None
        if not isinstance(theta, (int, float)) or not theta > 1:
            raise ValueError(f"config: rope_theta must be a number > 1, got {theta!r}")
        if scaling is not None:
            rt = scaling.get("rope_type", scaling.get("type", "default"))
            if rt not in ROPE_TYPES:
                raise ValueError(f"config: rope_scaling type {rt!r} is not supported; supported: {ROPE_TYPES}")
            if rt == "default":
                scaling = None
            else:
                scaling["rope_type"] = rt
                for key in ("factor", "original_max_position_embeddings"):
                    if not isinstance(scaling.get(key), (int, float)) or not scaling[key] > 0:
                        raise ValueError(f"config: yarn rope_scaling needs a positive {key!r}, got {scaling.get(key)!r}")
        eps = d.get("rms_norm_eps", 1e-6)
        if not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise ValueError(f"config: rms_norm_eps must be in (0, 1), got {eps!r}")
        eos = d.get("eos_token_id", ())
        eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        if not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in eos):
            raise ValueError(f"config: eos_token_id must be a token id or a list of them, got {d.get('eos_token_id')!r}")
        max_pos = d.get("max_position_embeddings", 40960)
        if not isinstance(max_pos, int) or isinstance(max_pos, bool) or not 0 < max_pos <= 1 << 24:
            raise ValueError(f"config: max_position_embeddings must be an integer in 1..{1 << 24}, got {max_pos!r}")
        return cls(
            vocab_size=req("vocab_size"), hidden_size=hidden, intermediate_size=req("intermediate_size"),
            num_hidden_layers=req("num_hidden_layers"), num_attention_heads=heads, num_key_value_heads=kv,
            head_dim=head_dim, rms_norm_eps=float(eps), rope_theta=float(theta), rope_scaling=scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), model_type=mt,
            attention_bias=True if mt == "qwen2" else bool(d.get("attention_bias", False)),
            qk_norm=mt == "qwen3", eos_token_id=eos, quantization=d.get("quantization"))

    @classmethod
    def from_file(cls, path: Any) -> "Qwen3Config":
        return cls.from_dict(read_json_object(path, "config"))

    @property
    def n_rep(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


def rope_inv_freq(cfg: Qwen3Config):
    """(inv_freq float32 [head_dim / 2], attention scaling) as transformers computes them:
    the default RoPE, or YaRN with the configured factor."""
    import torch

    d, base = cfg.head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, d, 2, dtype=torch.int64).to(torch.float32) / d)
    extrapolation = 1.0 / pos_freqs
    s = cfg.rope_scaling
    if s is None:
        return extrapolation, 1.0
    factor = float(s["factor"])
    original = float(s["original_max_position_embeddings"])
    attention = s.get("attention_factor")
    if attention is None:
        mscale, mscale_all = s.get("mscale"), s.get("mscale_all_dim")
        ms = (lambda scale, m=1.0: 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0)
        attention = ms(factor, mscale) / ms(factor, mscale_all) if mscale and mscale_all else ms(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def corr(rot: float) -> float:
        return d * math.log(original / (rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = corr(beta_fast), corr(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    interpolation = 1.0 / (factor * pos_freqs)
    return interpolation * ramp + extrapolation * (1 - ramp), float(attention)
