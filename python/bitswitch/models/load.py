"""Loading Qwen3 / Qwen2 checkpoints: detection of the format, validation, dispatch.

One `load` reads every supported checkpoint (safetensors, single or sharded): Hugging Face
float weights (quantized at load to INT8 nested planes, both views), MLX affine 4/8-bit
(mixed per module), AWQ (GEMM), GPTQ and bitswitch's saved planes; the per-format readers
live in formats.py. Every tensor is checked against the config (name, shape, dtype) before
any is read. A path may also be a Hugging Face repo id (see resolve_model_path). safetensors
only: no pickle is ever read and no code from the checkpoint runs.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from .._json import read_json_object
from ..torch import QLinear
from . import formats as F
from .config import Qwen3Config
from .qwen3 import Qwen3, build_linear, fuse_layer

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# What a repo download fetches: weights, configs and tokenizer files; never pickles.
HUB_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.txt", "*.jinja"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def resolve_model_path(path_or_repo_id: Any) -> Path:
    """A local model folder: an existing folder as is; a string "org/name" that is not a
    folder is a Hugging Face repo id, taken from the local cache when there, else
    downloaded (safetensors, json and tokenizer files only) unless HF_HUB_OFFLINE is set."""
    if not isinstance(path_or_repo_id, (str, os.PathLike)):
        raise TypeError(f"load: path must be a folder or a Hugging Face repo id, got {type(path_or_repo_id).__name__}")
    p = Path(path_or_repo_id)
    if p.is_dir():
        return p
    if p.exists():
        raise FileNotFoundError(f"load: {p} is a file, not a model folder")
    repo = str(path_or_repo_id)
    if not _REPO_ID.match(repo):
        raise FileNotFoundError(f"load: {p} is not a folder (nor a Hugging Face repo id of the form 'org/name')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    if _offline():
        raise FileNotFoundError(f"load: {repo!r} is not a local folder and not in the Hugging Face cache, and "
                                "HF_HUB_OFFLINE is set, so it cannot be downloaded; unset HF_HUB_OFFLINE or "
                                f"download it first (hf download {repo})") from None
    try:
        return Path(snapshot_download(repo, allow_patterns=HUB_PATTERNS))
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise FileNotFoundError(f"load: {repo!r} is not a local folder, and the Hugging Face Hub has no repo "
                                f"by that name that this account may read ({e.__class__.__name__})") from None
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise FileNotFoundError(f"load: {repo!r} is not a local folder or cached, and downloading it failed "
                                f"(offline? {e.__class__.__name__}: {e})") from None


def _shards(path: Path) -> list:
    index = path / "model.safetensors.index.json"
    if index.exists():
        wm = read_json_object(index, "load").get("weight_map")
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise ValueError(f"load: {index} is not a valid safetensors index (no 'weight_map' of tensor -> file)")
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

    def formats(self) -> set:
        """The "format" each file's safetensors metadata names (None where it names none)."""
        return {(h.metadata() or {}).get("format") for h in self.handles}


def read_config(p: Path) -> dict:
    """The raw config.json of a model folder, as a dict."""
    return read_json_object(p / "config.json", "config")


def detect_format(raw: dict, have: set):
    """The checkpoint format a config.json (and the tensor names present) describe."""
    if "bitswitch" in raw:
        return F.BitswitchFormat(raw["bitswitch"])
    qc = raw.get("quantization_config")
    if isinstance(qc, dict) and "quant_method" in qc:
        method = qc["quant_method"]
        if method == "awq":
            return F.AwqFormat(qc, have)
        if method == "gptq":
            return F.GptqFormat(qc, have)
        if "quantization" not in raw:
            raise ValueError(f"load: quantization_config quant_method {method!r} is not supported; "
                             "supported: 'awq' (GEMM), 'gptq', MLX affine, bitswitch, or float weights")
    if "quantization" in raw:
        return F.MlxFormat(raw["quantization"], have)
    if qc is not None:
        raise ValueError(f"load: config quantization_config {qc!r} names no quant_method; supported: 'awq', 'gptq'")
    return F.FloatFormat()


def _listing(names: list) -> str:
    return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")


def _validate(fmt, cfg: Qwen3Config, reader: _Reader, where: Path) -> dict:
    """Checks every tensor's name, shape and dtype against the config; returns the expected
    name -> (shape, dtypes)."""
    want = {}
    for path, (n, k) in F.projections(cfg).items():
        want.update(fmt.tensors(path, n, k))
    want.update({name: (shape, F.FLOAT) for name, shape in F.float_tensors(cfg).items()})
    have = set(reader.where)
    missing = sorted(set(want) - have)
    ignored = {n for n in have if n.endswith("rotary_emb.inv_freq")
               or (cfg.tie_word_embeddings and n.startswith("lm_head."))}
    extra = sorted(have - set(want) - ignored)
    if missing:
        raise ValueError(f"load: {len(missing)} tensors missing from {where} ({fmt.name} checkpoint of this "
                         f"config): {_listing(missing)}")
    if extra:
        raise ValueError(f"load: {len(extra)} unexpected tensors in {where} (not {fmt.name} {cfg.model_type} "
                         f"weights? the format is detected from config.json): {_listing(extra)}")
    for name, (shape, dtypes) in want.items():
        got, st = reader.shape_dtype(name)
        if got != shape:
            raise ValueError(f"load: {name} has shape {got}, the config implies {shape} ({fmt.name} checkpoint)")
        if st not in dtypes:
            raise ValueError(f"load: {name} has dtype {st}; {fmt.name} checkpoints hold {'/'.join(dtypes)} there")
    return want


def load(path: Any, dtype: Any = "bfloat16", group_size: int = 64, keep_float: bool = False,
         progress: Optional[bool] = None) -> Qwen3:
    """A Qwen3 / Qwen2 model from a folder (or Hugging Face repo id) with config.json and
    safetensors weights in any supported format (see the module docstring).

    dtype: activations, norms, KV cache (and kept float weights). group_size: of the INT8
    planes that float weights are quantized to (already quantized weights keep their own).
    keep_float: also keep those float weights, for `set_bits("full")`. progress: a counter on
    stderr (default: when stderr is a terminal). The model starts in each projection's most
    precise view.
    """
    p = resolve_model_path(path)
    tdt = _DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if tdt not in _FLOAT_DTYPES:
        raise ValueError(f"load: dtype must be one of {tuple(_DTYPES)}, got {dtype!r}")
    if group_size not in (32, 64, 128):
        raise ValueError(f"load: group_size must be 32, 64 or 128, got {group_size}")
    raw = read_config(p)
    cfg = Qwen3Config.from_dict(raw)
    if cfg.head_dim not in (64, 128):
        raise ValueError(f"load: head_dim {cfg.head_dim} is not supported by the attention kernels (64 or 128)")
    reader = _Reader(_shards(p))
    fmt = detect_format(raw, set(reader.where))
    if isinstance(fmt, F.BitswitchFormat) and reader.formats() != {F.BITSWITCH_FORMAT}:
        raise ValueError(f"load: config.json describes a bitswitch checkpoint but the safetensors metadata of {p} "
                         f"names format {sorted(map(str, reader.formats()))}")
    mods = F.projections(cfg)
    for mod, (_, k) in mods.items():
        if fmt.is_float(mod) and k % group_size:
            raise ValueError(f"load: the input size {k} of {mod} is not a multiple of group_size {group_size}")
    want = _validate(fmt, cfg, reader, p)
    show = sys.stderr.isatty() if progress is None else progress
    linears = {}
    for done, (mod, (n, k)) in enumerate(mods.items(), 1):
        bias = reader.get(mod + ".bias").to(tdt) if (mod + ".bias") in want else None
        w = fmt.read(mod, n, k, reader.get)
        if isinstance(w, torch.Tensor):
            linears[mod] = build_linear(w, bias, group_size, keep_float, tdt)
        else:
            linears[mod] = QLinear(w, bias)
        del w
        if mod.endswith(".mlp.down_proj"):  # the layer's last projection
            fuse_layer(linears, int(mod.split(".")[2]))
        if show:
            print(f"\rload: {done}/{len(mods)} weights ({fmt.name})", end="", file=sys.stderr, flush=True)
    if show:
        print(file=sys.stderr)
    if cfg.tie_word_embeddings:
        linears["lm_head"] = linears["model.embed_tokens"]
    norms = {name[len("model."):] if name.startswith("model.") else name: reader.get(name).to(tdt)
             for name in F.float_tensors(cfg) if name.endswith("norm.weight")}
    return Qwen3(cfg, linears, norms, tdt)
