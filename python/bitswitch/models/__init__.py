"""Transformer models built on the bitswitch kernels (torch)."""

from .embedded import default_model_path
from .generate import (ChatSession, GenerationResult, SamplingParams, TokenEvent, filter_logits, generate, sample,
                       split_thinking, stream)
from .load import load, resolve_model_path
from .qwen3 import KVCache, Qwen3, Qwen3Config
from .save import save_quantized
from .tokenizer import Tokenizer

__all__ = ["KVCache", "Qwen3", "Qwen3Config", "ChatSession", "GenerationResult", "SamplingParams", "TokenEvent",
           "Tokenizer", "filter_logits", "generate", "sample", "split_thinking", "stream", "default_model_path",
           "load", "resolve_model_path", "save_quantized"]
