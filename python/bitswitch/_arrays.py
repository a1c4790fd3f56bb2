"""Which framework an array belongs to, and moving arrays between numpy, torch and MLX.

torch and MLX are optional: they are only imported when an array of theirs shows up
(a module already in ``sys.modules`` is the proof), so ``import bitswitch`` stays light.
"""

from __future__ import annotations

import sys
from typing import Any

import ml_dtypes
import numpy as np

NUMPY, TORCH, MLX = "numpy", "torch", "mlx"
FLOAT_DTYPES = ("float32", "bfloat16", "float16")


def framework(a: Any) -> str:
    """'numpy', 'torch' or 'mlx' for an array; TypeError otherwise."""
    if isinstance(a, np.ndarray):
        return NUMPY
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(a, torch.Tensor):
        return TORCH
    mx = sys.modules.get("mlx.core")
    if mx is not None and isinstance(a, mx.array):
        return MLX
    raise TypeError(f"expected a numpy array, torch tensor or MLX array, got {type(a).__name__}")


def dtype_name(a: Any) -> str:
    """The element type as a plain name: 'float32', 'bfloat16', 'uint32', ..."""
    kind = framework(a)
    if kind == NUMPY:
        return str(a.dtype)
    return str(a.dtype).rsplit(".", 1)[-1]


# numpy has no bfloat16 of its own; ml_dtypes' is the one the ecosystem (JAX, MLX) uses.
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


def to_numpy(a: Any) -> np.ndarray:
    """A numpy view (or, for MLX, a copy) of any supported array; bfloat16 becomes
    ml_dtypes.bfloat16."""
    kind = framework(a)
    if kind == NUMPY:
        return a
    if kind == TORCH:
        t = a.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        torch = sys.modules["torch"]
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(BFLOAT16)
        return t.numpy()
    mx = sys.modules["mlx.core"]
    if a.dtype == mx.bfloat16:
        return np.array(a.view(mx.uint16)).view(BFLOAT16)
    return np.array(a)


def from_numpy(a: np.ndarray, kind: str, like: Any = None) -> Any:
    """`a` as an array of framework `kind` (zero-copy for torch), on `like`'s device."""
    if kind == NUMPY:
        return a
    is_bf16 = a.dtype == BFLOAT16
    if kind == TORCH:
        import torch

        t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if is_bf16 else torch.from_numpy(a)
        if like is not None and like.device.type != "cpu":
            t = t.to(like.device)
        return t
    import mlx.core as mx

    if is_bf16:
        return mx.array(a.view(np.uint16)).view(mx.bfloat16)
    return mx.array(a)


def convert(a: Any, kind: str, like: Any = None) -> Any:
    """Any supported array as framework `kind`."""
    return a if framework(a) == kind else from_numpy(to_numpy(a), kind, like)


def cast(a: Any, dtype: str) -> Any:
    """`a` with element type `dtype` ('float32', 'bfloat16', 'float16'), same framework."""
    if dtype_name(a) == dtype:
        return a
    kind = framework(a)
    if kind == TORCH:
        import torch

        return a.to(getattr(torch, dtype))
    if kind == MLX:
        import mlx.core as mx

        return a.astype(getattr(mx, dtype))
    return a.astype(BFLOAT16 if dtype == "bfloat16" else dtype)


def empty(shape: tuple, like: Any, kind: str) -> Any:
    """An uninitialized array of `like`'s element type (and device, for torch) for an op's
    output. MLX arrays are immutable, so MLX outputs are written into numpy and converted
    afterwards (see finish_output)."""
    if kind == TORCH:
        # like's own dtype object: no name round trip (a decode step's attention and GEMV
        # calls are each only a few microseconds long).
        return sys.modules["torch"].empty(shape, dtype=like.dtype, device=like.device)
    if kind == NUMPY:
        return np.empty(shape, dtype=like.dtype)
    dtype = dtype_name(like)
    return np.empty(shape, dtype=BFLOAT16 if dtype == "bfloat16" else dtype)


def finish_output(out: Any, kind: str) -> Any:
    """Converts an output allocated by empty() to the caller's framework."""
    return from_numpy(out, MLX) if kind == MLX else out
