"""bitswitch ops: one API over numpy arrays, torch tensors and MLX arrays.

Arrays reach the native kernels without a copy (numpy buffers, torch data pointers,
DLPack for MLX); results come back as the caller's kind of array.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator, Optional

import numpy as np

from . import _arrays as A
from . import _C
from .quant import QWeight, check_act_bits

if TYPE_CHECKING:
    from .attention import BlockMask

__all__ = ["qmatmul", "attention", "rms_norm", "rope_qkv", "silu_mul", "cpu_variant", "set_cpu_variant", "use_cpu_variant", "num_threads", "set_num_threads"]


def _torch_op():
    from . import torch as bt

    return bt


def _output(op: str, out: Any, shape: tuple, like: Any, like_name: str, kind: str) -> Any:
    """The result array: a new one of `like`'s kind and dtype, or the caller's `out`
    (checked to be the same kind; its shape and dtype are checked natively)."""
    if out is None:
        return A.empty(shape, like, kind)
    if kind == A.MLX:
        raise TypeError(f"{op}: out= is not supported for MLX arrays (they are immutable)")
    if A.framework(out) != kind:
        raise TypeError(f"{op}: out must be a {kind} array like {like_name}, got {A.framework(out)}")
    return out


def qmatmul(x: Any, qw: QWeight, bits: Optional[int] = None, out: Any = None, act_bits: int = 16) -> Any:
    """y[..., N] = x[..., K] @ W[N, K]^T for a packed weight, reading the `bits` view.

    x: float32, bfloat16 or float16, C-contiguous (numpy, torch or MLX); torch tensors on a
    CUDA (or MPS) device run there, on the current stream, through torch.ops.bitswitch.
    bits: 4 reads plane 0, 8 reads planes 0 and 1 (default: the most precise view qw holds).
    out: optional preallocated result [..., N] of x's dtype and framework (numpy or torch).
    act_bits: 16 (default) quantizes x per group to 15 bits, float-grade (~3e-5 relative);
    8 quantizes it to int8 per group (quantize_activations), ~0.4% relative error, small
    next to the INT4 view's own quantization error. It is faster where the CPU is
    compute-bound: the GEMV on AVX2 without VNNI, and prefill-sized x (more than 8 rows)
    on the 'avxvnni', 'avx512' and 'avx512bf16' variants, whose int8 GEMM (vpdpbusd on the
    codes) runs at ~1.5x their bf16 / float32 GEMMs ('avxvnni': 2.1-2.8x the 'avx2' FMA GEMM),
    and on 'avx2' with INT4 weights (vpmaddubsw on the codes, 1.5-1.6x its FMA GEMM).
    Returns y with x's dtype and framework; accumulation is float32.

    On the 'amx' and 'avx512bf16' CPU variants, bfloat16 x at act_bits 16 with more than 8 rows multiplies by
    the weights dequantized to bfloat16 (s*code + b in float32, rounded once per weight),
    as a bf16 model's linear layer does: y is within 2^-8 of the output scale of x @
    bf16(W)^T in float64, the weights' bf16 rounding (2^-9 relative) being of the order of
    y's own. float32 and float16 x, and act_bits 8, keep their contracts there (float-grade
    products of the exact codes; exact int8 products; on 'avx512bf16' float16 x runs the
    int8 GEMM on the GEMV's 15-bit x). On 'avxvnni', bfloat16 and float16 x at act_bits 16
    with more than 8 rows run that int8 GEMM too (the GEMV's own contract, ~3e-5 to 9e-5 of
    the output scale); float32 x keeps the float32 GEMM. BITSWITCH_CPU=avx512 keeps the
    float32 GEMM for act_bits 16 on any CPU.
    """
    if not isinstance(qw, QWeight):
        raise TypeError(f"qmatmul: qw must be a QWeight, got {type(qw).__name__}")
    bits = qw.default_bits if bits is None else bits
    qw.check_bits(bits, "qmatmul")
    check_act_bits(act_bits, "qmatmul")
    kind = A.framework(x)
    if qw.framework != kind and not (kind == A.MLX and qw.framework == A.NUMPY):
        raise TypeError(f"qmatmul: x is a {kind} array but the weight holds {qw.framework} arrays; "
                        f"convert one of them (QWeight.to('{kind}'))")
    shape = tuple(x.shape)
    if len(shape) < 1:
        raise ValueError("qmatmul: x must have at least one dimension [..., K]")
    n, k = qw.shape
    if shape[-1] != k:
        raise ValueError(f"qmatmul: x has {shape[-1]} inputs in its last dimension, the weight expects K = {k}")
    out_shape = shape[:-1] + (n,)
    if kind == A.TORCH and x.device.type != "cpu":
        # GPU tensors go through torch.ops.bitswitch (the current stream, torch's allocator).
        y = _torch_op().qmatmul(x, qw, bits, act_bits)
        return y if out is None else out.copy_(y)
    y = _output("qmatmul", out, out_shape, x, "x", kind)
    _C.qmatmul(x, qw.plane0, qw.plane1 if bits == 8 else None, qw.scales, qw.biases, qw.group_size, bits, y, act_bits)
    return y if out is not None else A.finish_output(y, kind)


# Without a mask the tile is free: 128 x 128 amortizes the per-block work (conversion,
# softmax) over the most rows and keys (~10% faster than 64 x 64 in `bitswitch bench attention`).
_DENSE_TILE = (128, 128)


def attention(q: Any, k: Any, v: Any, mask: Optional["BlockMask"] = None, causal: bool = True,
              scale: Optional[float] = None, q_offset: int = 0, out: Any = None, return_lse: bool = False) -> Any:
    """Block-sparse flash attention: softmax(scale q k^T) v over the keys each row sees.

    q: [B, Hq, Lq, D]; k, v: [B, Hkv, Lk, D] (Hq a multiple of Hkv: GQA; D 64 or 128), one
    float dtype, numpy / torch / MLX, any strides with a unit stride on D (a KV-cache slice
    works as is). Query row i sits at absolute position q_offset + i. mask: a
    bitswitch.attention.BlockMask of key blocks per query block (None: all); causal hides
    keys after each row's position. A row that sees no key returns zeros. Accumulation is
    float32; the cost is proportional to the number of blocks read.
    Returns out (like q), or (out, lse) with lse float32 [B, Hq, Lq] natural-log
    log-sum-exp (-inf for a row without keys) when return_lse.
    """
    kind = A.framework(q)
    for name, t in (("k", k), ("v", v)):
        if type(t) is not type(q) and A.framework(t) != kind:
            raise TypeError(f"attention: {name} is a {A.framework(t)} array but q is {kind}")
    shape = tuple(q.shape)
    if len(shape) != 4:
        raise ValueError(f"attention: q must be 4-D [batch, heads, length, head_dim], got shape {shape}")
    if kind == A.TORCH and q.device.type != "cpu":
        o, lse = _torch_op().attention(q, k, v, mask, causal, scale, q_offset, return_lse=True)
        if out is not None:
            o = out.copy_(o)
        return (o, lse) if return_lse else o
    o = _output("attention", out, shape, q, "q", kind)
    lse = np.empty(shape[:3], np.float32) if return_lse else None
    if mask is None:
        ip = ix = None
        bq, bk = _DENSE_TILE
    else:
        ip, ix, bq, bk = mask.indptr, mask.indices, mask.block_q, mask.block_k
    _C.attention(q, k, v, ip, ix, bq, bk, bool(causal), float("nan") if scale is None else float(scale),
                 int(q_offset), o, lse)
    res = o if out is not None else A.finish_output(o, kind)
    if not return_lse:
        return res
    return res, (A.from_numpy(lse, kind, q) if kind != A.NUMPY else lse)


def _stream(x: Any) -> int:
    """The current CUDA stream of a torch CUDA tensor's device (where the fused layer ops queue
    their kernels), else 0."""
    if A.framework(x) == A.TORCH and x.is_cuda:
        import torch

        return torch.cuda.current_stream(x.device).cuda_stream
    return 0


def rms_norm(x: Any, weight: Any, eps: float = 1e-6, delta: Any = None, out: Any = None) -> Any:
    """RMSNorm over the last dimension: weight * x / sqrt(mean(x^2) + eps), rounded as
    transformers' Qwen3/Llama RMSNorm rounds (float32 math, the normalized value rounded to
    x's dtype before the weight multiplies it).

    delta: when given, x is first replaced by x + delta in place (rounded to x's dtype), the
    residual add that precedes every norm of a transformer layer; x must then be writable
    (numpy or torch). out: optional result array (may be x itself). Arrays C-contiguous, one
    float dtype, last dimension at most 16384; torch CUDA tensors run bitswitch's CUDA kernel
    on the current stream.
    """
    kind = A.framework(x)
    if delta is not None and kind == A.MLX:
        raise TypeError("rms_norm: delta= updates x in place, which MLX arrays do not allow")
    y = _output("rms_norm", out, tuple(x.shape), x, "x", kind)
    _C.rms_norm(x, delta, weight, float(eps), y, stream=_stream(x))
    return y if out is not None else A.finish_output(y, kind)


def rope_qkv(qkv: Any, cos: Any, sin: Any, pos: int, k_cache: Any, v_cache: Any, num_q_heads: int,
             q_weight: Any = None, k_weight: Any = None, eps: float = 1e-6, out: Any = None) -> Any:
    """The attention inputs of a Qwen3 / Qwen2 layer from its fused q|k|v projection.

    qkv: [B, n, (Hq + 2 Hkv) * D], per token the q heads, then the k heads, then the v heads.
    q and k are RMS-normalized over D with q_weight / k_weight (Qwen3; None for Qwen2), then
    rotated: x * cos + rotate_half(x) * sin with cos and sin [P, D] rows of absolute
    positions, sin's first half negated (rotate_half as a roll; see the model), each product
    rounded as transformers rounds it. k and v are written to rows pos .. pos + n - 1 of
    k_cache and v_cache [B, Hkv, capacity, D] (numpy or torch, in place); q is returned as
    [B, Hq, n, D] (or written to out).
    """
    kind = A.framework(qkv)
    if kind == A.MLX:
        raise TypeError("rope_qkv: writes the KV cache in place, which MLX arrays do not allow")
    b, n = int(qkv.shape[0]), int(qkv.shape[1])
    d = int(k_cache.shape[-1])
    q = _output("rope_qkv", out, (b, int(num_q_heads), n, d), qkv, "qkv", kind)
    _C.rope_qkv(qkv, q_weight, k_weight, float(eps), cos, sin, int(pos), q, k_cache, v_cache, stream=_stream(qkv))
    return q


def silu_mul(gate_up: Any, out: Any = None) -> Any:
    """SwiGLU's activation: silu(gate) * up for gate_up = [gate | up] along the last
    dimension (a fused gate|up projection); the result has half the last dimension. Each
    op rounds to the input's dtype as torch's silu and multiply do."""
    kind = A.framework(gate_up)
    shape = tuple(int(s) for s in gate_up.shape)
    if not shape or shape[-1] % 2:
        raise ValueError(f"silu_mul: gate_up must have an even last dimension [gate | up], got shape {shape}")
    y = _output("silu_mul", out, shape[:-1] + (shape[-1] // 2,), gate_up, "gate_up", kind)
    _C.silu_mul(gate_up, y, stream=_stream(gate_up))
    return y if out is not None else A.finish_output(y, kind)


def cpu_variant() -> str:
    """The CPU kernel variant in use: 'scalar', 'avx2', 'avxvnni', 'avx512', 'avx512bf16' or 'amx'."""
    return _C.cpu_variant()


def set_cpu_variant(name: Optional[str]) -> None:
    """Forces a CPU kernel variant; None returns to BITSWITCH_CPU or automatic choice."""
    _C.set_cpu_variant(name or "")


@contextlib.contextmanager
def use_cpu_variant(name: str) -> Iterator[None]:
    """Runs a block with the given CPU kernel variant forced."""
    set_cpu_variant(name)
    try:
        yield
    finally:
        set_cpu_variant(None)


def num_threads() -> int:
    return _C.num_threads()


def set_num_threads(n: int) -> None:
    """Kernel threads (0: BITSWITCH_NUM_THREADS, else every CPU this process may use)."""
    _C.set_num_threads(int(n))
