"""The small Qwen3 that ships inside the package (bitswitch/data/qwen3-tiny).

A 3.8M-parameter model trained on CPython's own documentation text by
tools/train_tiny_qwen3.py; it lets every command run offline on a fresh machine. Its model
card (README.md in the folder) says how it was made.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["default_model_path"]

DEFAULT_MODEL = "qwen3-tiny"
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


def default_model_path() -> Path:
    """The folder of the bundled model (config.json, model.safetensors, tokenizer.json, ...),
    ready for `bitswitch.load`. Raises FileNotFoundError when the package was installed
    without its data files."""
    folder = resources.files("bitswitch").joinpath("data", DEFAULT_MODEL)
    if not isinstance(folder, Path):
        raise FileNotFoundError(f"default_model_path: bitswitch is installed in a {type(folder).__name__} "
                                "(a zip archive?), not a folder; install it as a regular package to use "
                                "the bundled model")
    missing = [name for name in _REQUIRED if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"default_model_path: the bundled model in {folder} lacks {', '.join(missing)}; "
                                "reinstall bitswitch with its package data, or recreate it with "
                                "tools/train_tiny_qwen3.py")
    return folder
