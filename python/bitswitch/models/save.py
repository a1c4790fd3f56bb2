"""bitswitch's own checkpoint format: the nibble planes as loaded, saved so that loading
needs no re-quantization and gives the same planes (and logits) bit for bit.

A saved folder holds config.json (the source's config with a "bitswitch" entry: format,
version, default bits and group_size, per-module overrides), model.safetensors (metadata
``format: bitswitch``) with per projection ``<path>.plane0`` U32 [N, K/8], ``<path>.plane1``
(INT8 modules), ``<path>.scales`` and ``<path>.biases`` [N, K/G], the float norms and
q/k/v biases, and the source's tokenizer files.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

from ..quant import INT4, INT8
from . import formats as F
from .config import Qwen3Config
from .load import load, read_config, resolve_model_path
from .qwen3 import Qwen3

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")


def config_dict(cfg: Qwen3Config) -> dict:
    """A config.json for `cfg` (transformers 4.x RoPE spelling) that Qwen3Config reads back equal."""
    d = {"model_type": cfg.model_type, "architectures": ["Qwen3ForCausalLM" if cfg.model_type == "qwen3"
                                                          else "Qwen2ForCausalLM"]}
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
                  "tie_word_embeddings", "attention_bias"):
        d[field] = getattr(cfg, field)
    if cfg.rope_scaling:
        d["rope_scaling"] = dict(cfg.rope_scaling)
    if cfg.eos_token_id:
        d["eos_token_id"] = list(cfg.eos_token_id)
    return d


def _linear(model: Qwen3, path: str):
    if path == "model.embed_tokens":
        return model.embed_tokens.lin
    return model.get_submodule(path[len("model."):] if path.startswith("model.") else path)


def save_quantized(src: Any, dst: Any, bits: int = 8, group_size: int = 64, progress: Optional[bool] = None) -> Path:
    """Writes a bitswitch checkpoint of `src` to the new folder `dst` and returns its path.

    src: a model folder (or Hugging Face repo id) of any format bitswitch.load reads, or a
    loaded Qwen3. bits: 8 stores both planes where the source has them (INT4-only weights
    stay INT4), 4 stores plane 0 only. group_size: of the planes that float weights are
    quantized to (weights already quantized keep their own). The tokenizer files of a source
    folder are copied.
    """
    if isinstance(bits, bool) or bits not in (INT4, INT8):
        raise ValueError(f"save_quantized: bits must be 4 (plane 0 only) or 8 (both planes), got {bits!r}")
    out = Path(dst)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"save_quantized: dst {out} exists and is not an empty folder")
    if isinstance(src, Qwen3):
        model, folder, raw = src, None, config_dict(src.config)
    else:
        folder = resolve_model_path(src)
        raw = read_config(folder)
        model = load(folder, dtype="float32", group_size=group_size, progress=progress)
    tensors, modules = {}, {}
    for path in F.projections(model.config):
        lin = _linear(model, path)
        tensors[path + ".plane0"] = lin.plane0
        stored = INT8 if bits == INT8 and lin.plane1 is not None else INT4
        if stored == INT8:
            tensors[path + ".plane1"] = lin.plane1
        tensors[path + ".scales"], tensors[path + ".biases"] = lin.scales, lin.biases
        if (stored, lin.group_size) != (bits, group_size):
            modules[path] = {"bits": stored, "group_size": lin.group_size}
    for name in F.float_tensors(model.config):
        if name.endswith(".bias"):
            tensors[name] = _linear(model, name[: -len(".bias")]).bias
        else:
            tensors[name] = model.get_parameter(name[len("model."):] if name.startswith("model.") else name)
    raw = {k: v for k, v in raw.items() if k not in ("quantization", "quantization_config", "bitswitch")}
    raw["bitswitch"] = {"format": F.BITSWITCH_FORMAT, "version": F.BITSWITCH_VERSION, "bits": bits,
                        "group_size": group_size, "modules": modules}
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: t.detach().contiguous() for k, t in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": F.BITSWITCH_FORMAT, "bitswitch_version": str(F.BITSWITCH_VERSION)})
    (out / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True))
    if folder is not None:
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, out / name)
    if progress if progress is not None else sys.stderr.isatty():
        print(f"save_quantized: wrote {len(tensors)} tensors to {out}", file=sys.stderr)
    return out
