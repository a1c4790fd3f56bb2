"""bitswitch: INT4/INT8 nibble-plane weight kernels with run-time precision switching.

    import bitswitch as bs
    qw = bs.quantize(w, group_size=64, bits=8)   # one copy, both views
    y8 = bs.ops.qmatmul(x, qw, bits=8)           # reads planes 0 and 1
    y4 = bs.ops.qmatmul(x, qw, bits=4)           # reads plane 0 only

Arrays may be numpy, torch (CPU) or MLX; results come back as the same kind.
``bitswitch.torch`` registers ``torch.ops.bitswitch.*`` and provides ``QLinear``.
"""

import sys

from . import _C
from . import attention  # the module: masks, selection, plan (the op is ops.attention)
from . import ops
from .quant import (
    ACT_BITS,
    BITS,
    GROUP_SIZES,
    INT4,
    INT8,
    QWeight,
    dequantize,
    dequantize_f64,
    qmatmul_f64,
    quantize,
    quantize_activations,
)
from .ops import qmatmul

__version__ = _C.__version__


def _load_cuda_backend() -> None:
    """Hands _C the CUDA kernels' entry points when bitswitch._cuda is built (it imports
    without a GPU or driver: the CUDA runtime is linked statically and finds the driver lazily)."""
    try:
        from . import _cuda
    except ImportError:
        return
    _C._set_cuda_backend(_cuda.backend())


_load_cuda_backend()

__all__ = [
    "ACT_BITS", "quantize_activations", "BITS", "GROUP_SIZES", "INT4", "INT8", "QWeight", "quantize", "dequantize", "dequantize_f64",
    "qmatmul_f64", "qmatmul", "attention", "ops", "info", "load", "__version__",
]


def load(path, dtype="bfloat16", group_size: int = 64, keep_float: bool = False, progress=None):
    """A Qwen3 / Qwen2 model (torch) from a checkpoint folder or Hugging Face repo id (float,
    MLX affine, AWQ, GPTQ or bitswitch safetensors); see bitswitch.models.load.load."""
    from .models.load import load as _load

    return _load(path, dtype=dtype, group_size=group_size, keep_float=keep_float, progress=progress)


def cuda_info() -> dict:
    """Whether this build has the CUDA backend, and what it sees."""
    try:
        from . import _cuda
    except ImportError as e:
        return {"built": False, "why": "not built: nvcc was not found at build time or BITSWITCH_CUDA=OFF "
                                        f"({e.__class__.__name__})"}
    return {
        "built": True,
        "loaded": _C._has_cuda_backend(),
        "runtime_version": _cuda.runtime_version(),
        "compiled_archs": _cuda.compiled_archs,
        "device_count": _cuda.device_count(),
        "driver_status": _cuda.driver_status(),
    }


def metal_info() -> dict:
    """Whether this installation has the Metal kernel sources, and whether MLX or torch can
    run them here (an Apple-silicon GPU)."""
    import importlib.util

    from . import metal

    try:
        where = str(metal.source_dir())
    except FileNotFoundError as e:
        return {"built": False, "why": str(e)}
    out = {"built": True, "sources": where}
    if importlib.util.find_spec("mlx") is None:
        out["mlx"] = "MLX is not installed"
    else:
        from .mlx import metal_available

        out["mlx"] = "Metal GPU available" if metal_available() else "MLX reports no Metal GPU"
    torch = sys.modules.get("torch")
    if torch is None:
        out["torch_mps"] = "torch is not imported"
    else:
        out["torch_mps"] = "MPS available" if torch.backends.mps.is_available() else "torch reports no MPS device"
    return out


def info() -> dict:
    """Version, CPU features, kernel variants, threads and backends of this build."""
    return {
        "version": __version__,
        "cpu": _C.cpu_info(),
        "num_threads": _C.num_threads(),
        "cuda": cuda_info(),
        "metal": metal_info(),
    }
