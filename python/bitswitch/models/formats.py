"""Checkpoint formats: which tensors each holds per projection, and how they become planes.

A format answers two questions for every projection (the seven per layer, the embedding and
an untied lm_head), given its path and its weight shape [N, K]:

- ``tensors(path, n, k)``: the tensor names it must find, each with its shape and allowed
  safetensors dtypes, so the loader can check the whole checkpoint before reading any data;
- ``read(path, n, k, get)``: a QWeight (already quantized: no re-quantization) or a float
  weight [N, K] that the loader quantizes to INT8 planes (``is_float(path)`` says which).

Formats: Hugging Face float, MLX affine 4/8-bit (per-module overrides), AWQ (GEMM layout),
GPTQ (v1 and v2 zero points) and bitswitch's own saved planes. Every quantized source maps to
the nibble planes exactly (see csrc/include/bitswitch/format.h): an MLX 4-bit, AWQ or GPTQ
weight is a plane 0 (INT4 view only), an MLX 8-bit weight splits into both planes.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import numpy as np
import torch

from ..quant import GROUP_SIZES, INT4, INT8, QWeight, pack_codes, unpack_codes
from .config import Qwen3Config

FLOAT = ("F32", "BF16", "F16")
U32 = ("U32",)
I32 = ("I32",)

BITSWITCH_FORMAT = "bitswitch"
BITSWITCH_VERSION = 1

# Nibble i of an AWQ (GEMM) word holds column 8c + _AWQ_ORDER[i] of its group of 8.
_AWQ_ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])
_AWQ_NATURAL = np.argsort(_AWQ_ORDER)  # position of column j among the nibbles

Spec = dict  # tensor name -> (shape, allowed safetensors dtypes)
Getter = Callable[[str], torch.Tensor]

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def projections(cfg: Qwen3Config) -> dict:
    """path -> (N, K) of every weight that becomes a QLinear, the embedding first."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    out = {"model.embed_tokens": (cfg.vocab_size, h)}
    shapes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
              "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    for li in range(cfg.num_hidden_layers):
        for name in _ATTN + _MLP:
            out[f"model.layers.{li}.{'self_attn' if name in _ATTN else 'mlp'}.{name}"] = shapes[name]
    if not cfg.tie_word_embeddings:
        out["lm_head"] = (cfg.vocab_size, h)
    return out


def float_tensors(cfg: Qwen3Config) -> dict:
    """name -> shape of the tensors every format keeps in float: norms and q/k/v biases."""
    h, d = cfg.hidden_size, cfg.head_dim
    out = {"model.norm.weight": (h,)}
    for li in range(cfg.num_hidden_layers):
        p = f"model.layers.{li}."
        out.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
        if cfg.qk_norm:
            out.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
        if cfg.attention_bias:
            out.update({p + "self_attn.q_proj.bias": (cfg.num_attention_heads * d,),
                        p + "self_attn.k_proj.bias": (cfg.num_key_value_heads * d,),
                        p + "self_attn.v_proj.bias": (cfg.num_key_value_heads * d,)})
    return out


def _check_params(bits, group_size, where: str, allowed_bits: tuple) -> None:
    if isinstance(bits, bool) or bits not in allowed_bits:
        raise ValueError(f"{where}: {bits!r}-bit weights are not supported; supported: "
                         f"{', '.join(map(str, allowed_bits))} bits")
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise ValueError(f"{where}: group_size {group_size!r} is not supported by the kernels; "
                         f"supported: {', '.join(map(str, GROUP_SIZES))}")


def _groups(path: str, k: int, group_size: int, what: str) -> int:
    if k % group_size:
        raise ValueError(f"load: {path} has {k} inputs, not a multiple of the {what} group_size {group_size}")
    return k // group_size


def _u32(t: torch.Tensor) -> np.ndarray:
    """The bits of an int32 / uint32 tensor as numpy uint32."""
    return np.ascontiguousarray(t.numpy()).view(np.uint32)


def _same_dtype(path: str, scales: torch.Tensor, biases: torch.Tensor) -> None:
    if scales.dtype != biases.dtype:
        raise ValueError(f"load: {path}.scales ({scales.dtype}) and {path}.biases ({biases.dtype}) must share a dtype")


class FloatFormat:
    """Hugging Face float safetensors: ``<path>.weight`` [N, K], quantized at load."""

    name = "float"

    def tensors(self, path: str, n: int, k: int) -> Spec:
        return {path + ".weight": ((n, k), FLOAT)}

    def is_float(self, path: str) -> bool:
        return True

    def read(self, path: str, n: int, k: int, get: Getter) -> Union[QWeight, torch.Tensor]:
        return get(path + ".weight")


class MlxFormat(FloatFormat):
    """mlx-lm affine checkpoints: ``weight`` U32 [N, K*bits/32], ``scales``/``biases``
    [N, K/G]. config.json "quantization" holds the default {group_size, bits, mode} and
    per-module overrides keyed by path (a dict, or false for a float module); a module
    neither named there nor holding ``scales``/``biases`` is float."""

    name = "MLX affine"

    def __init__(self, quantization: dict, have: set):
        if not isinstance(quantization, dict):
            raise ValueError(f"load: config 'quantization' must be an object, got {quantization!r}")
        self.config = quantization
        self.default = self._params(quantization, "config 'quantization'")
        self.have = have

    @staticmethod
    def _params(entry: dict, where: str) -> tuple:
        mode = entry.get("mode", "affine")
        if mode != "affine":
            raise ValueError(f"load: {where}: MLX quantization mode {mode!r} is not supported; bitswitch reads "
                             "'affine' 4- and 8-bit weights (mxfp4, nvfp4 and mxfp8 have no affine biases)")
        bits, gs = entry.get("bits"), entry.get("group_size")
        _check_params(bits, gs, f"load: {where}", (INT4, INT8))
        return bits, gs

    def params(self, path: str) -> Optional[tuple]:
        """(bits, group_size) of a quantized module, None for a float one."""
        entry = self.config.get(path)
        if isinstance(entry, dict):
            return self._params(entry, f"config 'quantization' entry {path!r}")
        if entry is False:
            return None
        if entry is not None and entry is not True:
            raise ValueError(f"load: config 'quantization' entry {path!r} must be an object or a boolean, "
                             f"got {entry!r}")
        if entry is True or (path + ".scales") in self.have or (path + ".biases") in self.have:
            return self.default
        return None

    def is_float(self, path: str) -> bool:
        return self.params(path) is None

    def tensors(self, path: str, n: int, k: int) -> Spec:
        p = self.params(path)
        if p is None:
            return super().tensors(path, n, k)
        bits, gs = p
        g = _groups(path, k, gs, "MLX")
        return {path + ".weight": ((n, k * bits // 32), U32), path + ".scales": ((n, g), FLOAT),
                path + ".biases": ((n, g), FLOAT)}

    def read(self, path: str, n: int, k: int, get: Getter) -> Union[QWeight, torch.Tensor]:
        p = self.params(path)
        if p is None:
            return super().read(path, n, k, get)
        s, b = get(path + ".scales"), get(path + ".biases")
        _same_dtype(path, s, b)
        return QWeight.from_mlx(get(path + ".weight"), s, b, bits=p[0], group_size=p[1])


class _Int4Format(FloatFormat):
    """AWQ and GPTQ: 4-bit codes and zero points in int32 words, scales [K/G, N]; a module
    without ``qweight`` is float. Converted exactly to a plane 0 with b = -zero*scale (float32
    scales and biases: -zero*scale of a 16-bit scale is exact in float32)."""

    method = ""

    def __init__(self, qc: dict, have: set):
        self.have = have
        bits = qc.get("bits", qc.get("w_bit"))
        self.group_size = qc.get("group_size", qc.get("q_group_size"))
        _check_params(bits, self.group_size, f"load: {self.method} quantization_config", (INT4,))

    def is_float(self, path: str) -> bool:
        return (path + ".qweight") not in self.have

    def _plane(self, codes_nk: np.ndarray, zeros_ng: np.ndarray, scales: torch.Tensor) -> QWeight:
        s = scales.float().T.contiguous()
        b = -torch.from_numpy(np.ascontiguousarray(zeros_ng, dtype=np.float32)) * s
        p0 = torch.from_numpy(pack_codes(codes_nk))
        return QWeight(p0, None, s, b, self.group_size)


class AwqFormat(_Int4Format):
    """AutoAWQ GEMM: ``qweight`` int32 [K, N/8] and ``qzeros`` int32 [K/G, N/8] packed along
    N in AWQ's nibble order, ``scales`` [K/G, N]; w = (q - z) * s."""

    method = "awq"
    name = "AWQ"

    def __init__(self, qc: dict, have: set):
        super().__init__(qc, have)
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"load: AWQ version {qc.get('version')!r} is not supported; only the GEMM layout is")
        if qc.get("zero_point", True) is not True:
            raise ValueError("load: AWQ without zero points (zero_point: false) is not supported")

    def tensors(self, path: str, n: int, k: int) -> Spec:
        if self.is_float(path):
            return super().tensors(path, n, k)
        if n % 8:
            raise ValueError(f"load: {path} has {n} outputs; AWQ packs outputs by 8")
        g = _groups(path, k, self.group_size, "AWQ")
        return {path + ".qweight": ((k, n // 8), I32), path + ".qzeros": ((g, n // 8), I32),
                path + ".scales": ((g, n), FLOAT)}

    @staticmethod
    def _unpack(words: torch.Tensor) -> np.ndarray:
        """int32 [R, N/8] in AWQ order -> codes [R, N] in column order."""
        nib = unpack_codes(_u32(words))
        r, n = nib.shape
        return nib.reshape(r, n // 8, 8)[:, :, _AWQ_NATURAL].reshape(r, n)

    def read(self, path: str, n: int, k: int, get: Getter) -> Union[QWeight, torch.Tensor]:
        if self.is_float(path):
            return super().read(path, n, k, get)
        codes = self._unpack(get(path + ".qweight")).T          # [N, K]
        zeros = self._unpack(get(path + ".qzeros")).T           # [N, K/G]
        return self._plane(codes, zeros, get(path + ".scales"))


class GptqFormat(_Int4Format):
    """AutoGPTQ / GPTQModel: ``qweight`` int32 [K/8, N] packed along K (input 8r+j in bits
    4j of row r), ``qzeros`` int32 [K/G, N/8] packed along N in order, stored as zero - 1
    (checkpoint_format "gptq", v1) or as the zero ("gptq_v2"), ``scales`` [K/G, N],
    optional ``g_idx`` [K] that must be i // G: act-order (desc_act) permutations are
    rejected. W[k, n] = s[k/G, n] * (q[k, n] - zero[k/G, n])."""

    method = "gptq"
    name = "GPTQ"

    def __init__(self, qc: dict, have: set):
        super().__init__(qc, have)
        fmt = qc.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"load: GPTQ checkpoint_format {fmt!r} is not supported; supported: 'gptq', 'gptq_v2'")
        self.zero_offset = 1 if fmt == "gptq" else 0

    def tensors(self, path: str, n: int, k: int) -> Spec:
        if self.is_float(path):
            return super().tensors(path, n, k)
        if n % 8 or k % 8:
            raise ValueError(f"load: {path} has shape {(n, k)}; GPTQ packs inputs and outputs by 8")
        g = _groups(path, k, self.group_size, "GPTQ")
        out = {path + ".qweight": ((k // 8, n), I32), path + ".qzeros": ((g, n // 8), I32),
               path + ".scales": ((g, n), FLOAT)}
        if (path + ".g_idx") in self.have:
            out[path + ".g_idx"] = ((k,), I32)
        return out

    def read(self, path: str, n: int, k: int, get: Getter) -> Union[QWeight, torch.Tensor]:
        if self.is_float(path):
            return super().read(path, n, k, get)
        if (path + ".g_idx") in self.have:
            g_idx = get(path + ".g_idx").numpy()
            if not np.array_equal(g_idx, np.arange(k) // self.group_size):
                raise ValueError(f"load: {path}.g_idx is not i // group_size: act-order (desc_act) GPTQ checkpoints "
                                 "permute the groups, which the kernels do not support; use one quantized "
                                 "without desc_act (or with static_groups)")
        codes = unpack_codes(_u32(get(path + ".qweight")).T)                    # [N, K]
        zeros = unpack_codes(_u32(get(path + ".qzeros"))).T + self.zero_offset  # [N, K/G]: v1 zeros span 1..16
        return self._plane(codes, zeros, get(path + ".scales"))


class BitswitchFormat(FloatFormat):
    """bitswitch's saved planes (see save.py): ``plane0`` U32 [N, K/8], ``plane1`` (INT8
    modules), ``scales``/``biases`` [N, K/G]; config.json "bitswitch" holds the default bits
    and group_size and per-module overrides."""

    name = "bitswitch"

    def __init__(self, entry: dict):
        if not isinstance(entry, dict):
            raise ValueError(f"load: config 'bitswitch' must be an object, got {entry!r}")
        if entry.get("format") != BITSWITCH_FORMAT or entry.get("version") != BITSWITCH_VERSION:
            raise ValueError(f"load: config 'bitswitch' names format {entry.get('format')!r} version "
                             f"{entry.get('version')!r}; this bitswitch reads {BITSWITCH_FORMAT!r} version "
                             f"{BITSWITCH_VERSION}")
        self.default = (entry.get("bits"), entry.get("group_size"))
        _check_params(*self.default, "load: config 'bitswitch'", (INT4, INT8))
        modules = entry.get("modules", {})
        if not isinstance(modules, dict):
            raise ValueError(f"load: config 'bitswitch' modules must be an object, got {modules!r}")
        self.modules = {}
        for path, m in modules.items():
            if not isinstance(m, dict):
                raise ValueError(f"load: config 'bitswitch' entry {path!r} must be an object, got {m!r}")
            p = (m.get("bits", self.default[0]), m.get("group_size", self.default[1]))
            _check_params(*p, f"load: config 'bitswitch' entry {path!r}", (INT4, INT8))
            self.modules[path] = p

    def is_float(self, path: str) -> bool:
        return False

    def tensors(self, path: str, n: int, k: int) -> Spec:
        bits, gs = self.modules.get(path, self.default)
        g = _groups(path, k, gs, "bitswitch")
        out = {path + ".plane0": ((n, k // 8), U32)}
        if bits == INT8:
            out[path + ".plane1"] = ((n, k // 8), U32)
        out.update({path + ".scales": ((n, g), FLOAT), path + ".biases": ((n, g), FLOAT)})
        return out

    def read(self, path: str, n: int, k: int, get: Getter) -> Union[QWeight, torch.Tensor]:
        bits, gs = self.modules.get(path, self.default)
        s, b = get(path + ".scales"), get(path + ".biases")
        _same_dtype(path, s, b)
        p1 = get(path + ".plane1") if bits == INT8 else None
        return QWeight(get(path + ".plane0"), p1, s, b, gs)
