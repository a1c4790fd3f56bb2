"""Transformer models built on the bitswitch kernels (torch)."""

from .qwen3 import KVCache, Qwen3, Qwen3Config

__all__ = ["KVCache", "Qwen3", "Qwen3Config"]
