"""Precision policies: which view every projection of a model reads and how every layer
attends, switched at run time without touching the weights.

A policy is one of

- a mode: ``"performance"`` (INT8 weights, or the float weights where they were kept; dense
  attention), ``"efficiency"`` (INT4 weights; block-sparse attention: runtime block
  selection in prefill, page selection in decode) or ``"full"`` (the kept float weights);
- a mapping (or a list of pairs) from module paths to settings, applied in order on top of
  the model's current setting, later entries overriding earlier ones. A key is a layer
  index (``3``, ``-1``, ``"3"``) or a glob over module paths as a checkpoint names them
  (``"model.layers.*.mlp"``, ``"model.layers.1?.self_attn.q_proj"``, ``"lm_head"``); a key
  matches a module when it matches its path or one of its ancestors' (``"model.layers.3"``
  covers every projection of layer 3 and its attention). A setting is a mode name, a bits
  value (``4``, ``8``, ``"full"``) or a dict with any of ``bits``, ``attention``
  (``"dense"`` / ``"sparse"``) and the sparse options ``tau`` (prefill: keep the key
  blocks holding this share of the attention mass), ``density`` (prefill: or this share
  of the blocks) and ``pages`` (decode: key blocks read per token);
- a plan file written by ``bitswitch plan`` (JSON; its ``policy`` is such a mapping).

Start a mapping with a mode to set everything: ``{"*": "efficiency", 0: {"bits": 8}}``.
``"model.embed_tokens"`` is the embedding lookup (one row per token); ``"lm_head"`` the
output projection, which a tied model computes from the same planes.

Resolving a policy checks every requested view against the planes each layer holds and
raises one ValueError naming the layers that lack it. Applying a resolved policy only sets
attributes: no tensor is allocated, copied or re-quantized (see Qwen3.set_precision for
switching while another thread generates).
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from ._json import read_json_object

__all__ = ["MODES", "ATTENTION", "SPARSE_DEFAULTS", "Assignment", "PrecisionReport", "resolve", "apply", "report",
           "load_plan_policy", "PLAN_FORMAT"]

FULL = "full"
BITS = (4, 8, FULL)
MODES = ("performance", "efficiency", "full")
ATTENTION = ("dense", "sparse")
# Sparse attention options and their defaults: prefill keeps the key blocks holding 90% of
# the pooled attention mass (XAttention / FlexPrefill's usual setting); decode reads 64
# key blocks per token (Quest's budget at 32K keys: 4K keys).
SPARSE_DEFAULTS = {"tau": 0.9, "pages": 64}
_SPARSE_KEYS = ("tau", "density", "pages")
_SETTING_KEYS = ("bits", "attention") + _SPARSE_KEYS
PLAN_FORMAT = "bitswitch-plan"

_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
EMBED, LM_HEAD = "model.embed_tokens", "lm_head"


def layer_path(i: int) -> str:
    return f"model.layers.{i}"


def projection_paths(n_layers: int) -> List[str]:
    """Every switchable weight of a model, as its checkpoint names it: the seven projections
    of each layer, then the lm_head and the embedding."""
    paths = [f"{layer_path(i)}.{p}" for i in range(n_layers) for p in _PROJECTIONS]
    return paths + [LM_HEAD, EMBED]


@dataclass
class Assignment:
    """A resolved policy: the view of every weight path and the attention of every layer
    (None: dense; a dict of sparse options: block-sparse)."""

    bits: Dict[str, Union[int, str]]
    attention: List[Optional[dict]]

    def copy(self) -> "Assignment":
        return Assignment(dict(self.bits), [None if a is None else dict(a) for a in self.attention])

    def to_policy(self) -> dict:
        """A mapping that resolves back to this assignment on the same model."""
        out: Dict[str, Any] = {}
        for path, b in self.bits.items():
            out[path] = {"bits": b}
        for i, a in enumerate(self.attention):
            key = f"{layer_path(i)}.self_attn"
            out.setdefault(key, {})
            out[key]["attention"] = "dense" if a is None else "sparse"
            if a is not None:
                out[key].update(a)
        return out


# -- parsing ------------------------------------------------------------------------------

def _check_setting(value: Any, where: str) -> dict:
    """A policy entry's value as a dict of checked fields (mode names expand later)."""
    if isinstance(value, str) and value in MODES:
        return {"mode": value}
    if isinstance(value, bool):
        raise ValueError(f"set_precision: {where}: a setting must be a mode {MODES}, bits 4/8/'full' or a dict, "
                         f"got {value!r}")
    if value in BITS:
        return {"bits": value}
    if not isinstance(value, dict):
        raise ValueError(f"set_precision: {where}: a setting must be a mode {MODES}, bits 4/8/'full' or a dict "
                         f"with keys {_SETTING_KEYS}, got {value!r}")
    unknown = sorted(set(value) - set(_SETTING_KEYS))
    if unknown:
        raise ValueError(f"set_precision: {where}: unknown keys {unknown}; allowed: {list(_SETTING_KEYS)}")
    out = dict(value)
    if "bits" in out and (isinstance(out["bits"], bool) or out["bits"] not in BITS):
        raise ValueError(f"set_precision: {where}: bits must be 4, 8 or 'full', got {out['bits']!r}")
    if "attention" in out and out["attention"] not in ATTENTION:
        raise ValueError(f"set_precision: {where}: attention must be 'dense' or 'sparse', got {out['attention']!r}")
    for k in ("tau", "density"):
        if k in out:
            v = out[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise ValueError(f"set_precision: {where}: {k} must be a number in (0, 1], got {v!r}")
    if "pages" in out:
        v = out["pages"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"set_precision: {where}: pages must be an integer >= 1, got {v!r}")
    if "tau" in out and "density" in out:
        raise ValueError(f"set_precision: {where}: give tau or density for the prefill selection, not both")
    return out


def _key_glob(key: Any, n_layers: int) -> str:
    """A policy key as a glob over module paths."""
    if isinstance(key, bool):
        raise ValueError(f"set_precision: policy key {key!r} is not a layer index or a module path glob")
    if isinstance(key, str) and key.lstrip("-").isdigit():
        key = int(key)
    if isinstance(key, int):
        i = key + n_layers if key < 0 else key
        if not 0 <= i < n_layers:
            raise ValueError(f"set_precision: layer index {key} is out of range for a model of {n_layers} layers")
        return layer_path(i)
    if not isinstance(key, str) or not key:
        raise ValueError(f"set_precision: policy key {key!r} is not a layer index or a module path glob")
    return key


def _matches(glob: str, path: str) -> bool:
    """The glob matches the path or one of its ancestors."""
    parts = path.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:n]), glob) for n in range(len(parts), 0, -1))


def load_plan_policy(path: Union[str, os.PathLike]) -> dict:
    """The policy mapping of a plan file written by `bitswitch plan`."""
    p = Path(path)
    data = read_json_object(p, "set_precision: plan file")
    if data.get("format") != PLAN_FORMAT or not isinstance(data.get("policy"), dict):
        raise ValueError(f"set_precision: {p} is not a bitswitch plan (a JSON object with format "
                         f"{PLAN_FORMAT!r} and a 'policy' mapping)")
    return data["policy"]


def _entries(policy: Any, n_layers: int) -> List[Tuple[str, dict]]:
    """(glob, setting) pairs of any policy form, in order."""
    if isinstance(policy, str) and policy in MODES:
        return [("*", {"mode": policy})]
    if isinstance(policy, (str, os.PathLike)):
        if isinstance(policy, str) and not policy.endswith(".json") and not Path(policy).exists():
            raise ValueError(f"set_precision: {policy!r} is not a mode {MODES} nor a plan file")
        return _entries(load_plan_policy(policy), n_layers)
    if isinstance(policy, dict):
        items = list(policy.items())
    elif isinstance(policy, (list, tuple)) and all(isinstance(e, (list, tuple)) and len(e) == 2 for e in policy):
        items = [tuple(e) for e in policy]
    else:
        raise TypeError(f"set_precision: policy must be a mode {MODES}, a mapping of module globs / layer indices to "
                        f"settings, a list of (key, setting) pairs or a plan file path; got {type(policy).__name__}")
    return [(_key_glob(k, n_layers), _check_setting(v, f"entry {k!r}")) for k, v in items]


# -- resolution -----------------------------------------------------------------------------

def _mode_setting(mode: str, available: tuple) -> dict:
    if mode == "performance":
        return {"bits": FULL if FULL in available else 8, "attention": "dense"}
    if mode == "efficiency":
        return {"bits": 4, "attention": "sparse"}
    return {"bits": FULL, "attention": "dense"}


def current(model) -> Assignment:
    """The model's effective setting now."""
    lins = model.projection_modules()
    bits = {p: (m.bits if p != EMBED else model.embed_tokens.bits) for p, m in lins.items()}
    att = [None if layer.self_attn.sparse is None else dict(layer.self_attn.sparse) for layer in model.layers]
    return Assignment(bits, att)


def resolve(model, policy: Any, base: Optional[Assignment] = None) -> Assignment:
    """The assignment a policy gives on `model`, starting from `base` (default: the model's
    current setting). Raises ValueError naming the layers that lack a requested view, or
    the entry that matches no module."""
    if isinstance(policy, Assignment):
        out = policy.copy()
        _check_views(model, out)
        return out
    if isinstance(policy, str) and policy in MODES:
        # A mode sets everything: its assignment does not depend on the base (cached per model).
        cache = model.__dict__.setdefault("_precision_modes", {})
        if policy not in cache:
            cache[policy] = resolve(model, [("*", policy)], base=current(model))
        return cache[policy]
    n = model.config.num_hidden_layers
    lins = model.projection_modules()
    out = (base or current(model)).copy()
    att_paths = [f"{layer_path(i)}.self_attn" for i in range(n)]
    for glob, setting in _entries(policy, n):
        hit = False
        for path, m in lins.items():
            if not _matches(glob, path):
                continue
            hit = True
            s = _mode_setting(setting["mode"], m.bits_available) if "mode" in setting else setting
            if "bits" in s:
                out.bits[path] = s["bits"]
        for i, path in enumerate(att_paths):
            if not _matches(glob, path):
                continue
            hit = True
            s = _mode_setting(setting["mode"], ()) if "mode" in setting else setting
            mode_att = s.get("attention")
            opts = {k: s[k] for k in _SPARSE_KEYS if k in s}
            if mode_att == "dense":
                out.attention[i] = None
            elif mode_att == "sparse" or (opts and out.attention[i] is not None):
                merged = dict(SPARSE_DEFAULTS) if out.attention[i] is None else dict(out.attention[i])
                if "density" in opts:
                    merged.pop("tau", None)
                if "tau" in opts:
                    merged.pop("density", None)
                merged.update(opts)
                out.attention[i] = merged
            elif opts:
                raise ValueError(f"set_precision: entry {glob!r} gives sparse options {sorted(opts)} to layer {i}, "
                                 "whose attention is dense; add 'attention': 'sparse'")
        if not hit:
            raise ValueError(f"set_precision: policy key {glob!r} matches no module; paths look like "
                             f"'model.layers.0.self_attn.q_proj', 'model.layers.0.mlp', 'lm_head', "
                             f"'model.embed_tokens' (or give a layer index)")
    _check_views(model, out)
    return out


def _check_views(model, a: Assignment) -> None:
    lins = model.projection_modules()
    lacking: Dict[Any, List[str]] = {}
    for path, b in a.bits.items():
        if path not in lins:
            raise ValueError(f"set_precision: {path!r} is not a weight of this model")
        if b not in lins[path].bits_available:
            lacking.setdefault(b, []).append(path)
    if len(a.attention) != len(model.layers):
        raise ValueError(f"set_precision: the assignment has {len(a.attention)} layers, the model {len(model.layers)}")
    if lacking:
        msgs = []
        for b, paths in lacking.items():
            what = ("plane 1 (they hold only the INT4 view: an INT4 checkpoint)" if b == 8 else
                    "a kept float weight (load with keep_float=True)" if b == FULL else "that view")
            shown = ", ".join(paths[:6]) + (f" and {len(paths) - 6} more" if len(paths) > 6 else "")
            msgs.append(f"bits={b!r} asked of {len(paths)} weights that lack {what}: {shown}")
        raise ValueError("set_precision: " + "; ".join(msgs))


def apply(model, a: Assignment) -> None:
    """Sets the model to an assignment already checked by resolve: attribute writes only,
    straight into the modules' __dict__ (nn.Module.__setattr__ costs ~1 us per call, and a
    36-layer model has 254 weights to set)."""
    lins = model.projection_modules()
    for path, b in a.bits.items():
        if path == EMBED:
            model.embed_tokens.__dict__["bits"] = b
            if model.embed_tokens.lin is not model.lm_head:  # untied: the table's own view, kept in step
                model.embed_tokens.lin.__dict__["_bits"] = b
        else:
            lins[path].__dict__["_bits"] = b
    for layer, att in zip(model.layers, a.attention):
        layer.self_attn.__dict__["sparse"] = att
    from .torch import QLinear

    QLinear.settings_version += 1  # as the bits setter does: the native decode step rebuilds


# -- reporting ----------------------------------------------------------------------------

def _weight_bytes(m, b) -> int:
    if b == FULL:
        return m.weight_full.numel() * m.weight_full.element_size()
    planes = 1 if b == 4 else 2
    return m.plane0.numel() * 4 * planes + m.scales.numel() * m.scales.element_size() * 2


def _byte_table(model) -> dict:
    """path -> ({view: bytes a token reads}, weights) of every weight a token reads (the
    embedding lookup excluded), computed once per model."""
    table = model.__dict__.get("_precision_bytes")
    if table is None:
        table = {path: ({b: _weight_bytes(m, b) for b in m.bits_available}, m.out_features * m.in_features)
                 for path, m in model.projection_modules().items() if path != EMBED}
        model.__dict__["_precision_bytes"] = table
    return table


@dataclass
class PrecisionReport:
    """The effective setting of every layer and what one decode token reads."""

    layers: List[dict]              # per layer: {"layer", "bits": {projection: view}, "attention", "options"}
    lm_head: Union[int, str]
    embed_tokens: Union[int, str]
    bytes_per_token: int            # weight bytes one decode token reads (projections and lm_head)
    weights: int                    # weights those bytes hold
    pending: bool = False           # a switch waits for the token in progress to finish
    by_path: Dict[str, Union[int, str]] = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        """Stored bits read per weight, scales and biases included (INT4 at group 64 with
        16-bit scales: 4.5; INT8: 8.5)."""
        return 8.0 * self.bytes_per_token / max(1, self.weights)

    def __str__(self) -> str:
        lines = [f"{'layer':>5}  {'q k v o':<12} {'gate up down':<14} attention"]
        for d in self.layers:
            b = d["bits"]
            qkvo = " ".join(str(b[p]) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
            mlp = " ".join(str(b[p]) for p in ("gate_proj", "up_proj", "down_proj"))
            att = d["attention"] + ("" if not d["options"] else " " + ", ".join(f"{k}={v}" for k, v in d["options"].items()))
            lines.append(f"{d['layer']:>5}  {qkvo:<12} {mlp:<14} {att}")
        lines.append(f"lm_head {self.lm_head}, embedding {self.embed_tokens}; {self.bytes_per_token / 2**20:.1f} MiB of "
                     f"weights per token, {self.bits_per_weight:.2f} bits per weight"
                     + (" (a switch is pending)" if self.pending else ""))
        return "\n".join(lines)


def report(model, a: Optional[Assignment] = None, pending: bool = False) -> PrecisionReport:
    a = a or current(model)
    layers = []
    for i in range(len(model.layers)):
        bits = {p.split(".")[-1]: a.bits[f"{layer_path(i)}.{p}"] for p in _PROJECTIONS}
        att = a.attention[i]
        layers.append({"layer": i, "bits": bits, "attention": "dense" if att is None else "sparse",
                       "options": {} if att is None else dict(att)})
    total = weights = 0
    for path, (views, n) in _byte_table(model).items():  # the embedding: one row per token (a tied
        total += views[a.bits[path]]                     # table is counted as the lm_head)
        weights += n
    return PrecisionReport(layers, a.bits[LM_HEAD], a.bits[EMBED], total, weights, pending, dict(a.bits))
