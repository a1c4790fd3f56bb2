"""torch adapter: the ``torch.ops.bitswitch.*`` custom ops and the QLinear module.

The ops are declared with ``torch.library`` (schema + CPU kernel + fake kernel), so they
trace under ``torch.compile(fullgraph=True)`` without graph breaks and other frameworks can
call them as ``torch.ops.bitswitch.qmatmul``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import _C
from . import _arrays as A
from .ops import _DENSE_TILE
from .quant import BITS, GROUP_SIZES, INT4, INT8, VALUES_PER_WORD, QWeight, check_act_bits, quantize

__all__ = ["FULL", "DecodePages", "QLinear", "attention", "qmatmul", "quantize_model", "rms_norm", "rope_qkv",
           "rope_qkv_at", "select_pages_at", "set_precision", "silu_mul", "torch_threads"]

_is_compiling = torch.compiler.is_compiling

_lib = torch.library.Library("bitswitch", "DEF")
_lib.define(
    "qmatmul(Tensor x, Tensor plane0, Tensor? plane1, Tensor scales, Tensor biases, int group_size, int bits, "
    "int act_bits=16) -> Tensor"
)
_lib.define(
    "attention(Tensor q, Tensor k, Tensor v, Tensor? indptr, Tensor? indices, int block_q, int block_k, "
    "bool causal=True, float? scale=None, int q_offset=0, Tensor? q_offsets=None) -> (Tensor, Tensor)"
)
_lib.define(
    "select_pages_at(Tensor q, Tensor k, Tensor(a!) kmin, Tensor(b!) kmax, Tensor positions, int n, "
    "int sinks=1, int block_k=64) -> Tensor"
)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to `n` inside the block, the caller's restored after.

    bitswitch's CPU kernels run on bitswitch's own thread pool. After every parallel torch op
    on the CPU, torch's OpenMP workers keep spinning for a while (libgomp's default wait
    policy), on the cores that pool needs: a torch argmax over the logits between two decode
    steps then slows the next step down. Generation (bitswitch.models.generate) runs each
    step and its sampling under ``torch_threads(1)`` on a CPU model; on 2 cores that made
    a 0.6B INT4 decode step 1.5x faster. Wrap a hand-written decode loop the same way."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"torch_threads: n must be a positive integer, got {n!r}")
    old = torch.get_num_threads()
    if old == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _out_shape(x: torch.Tensor, plane0: torch.Tensor) -> tuple:
    if x.dim() < 1:
        raise ValueError("qmatmul: x must have at least one dimension [..., K]")
    if plane0.dim() != 2:
        raise ValueError(f"qmatmul: plane0 must be 2-D [N, K/8], got shape {tuple(plane0.shape)}")
    k = plane0.shape[1] * VALUES_PER_WORD
    if x.shape[-1] != k:
        raise ValueError(f"qmatmul: x has {x.shape[-1]} inputs in its last dimension, the weight expects K = {k}")
    return tuple(x.shape[:-1]) + (plane0.shape[0],)


def _qmatmul_cpu(x, plane0, plane1, scales, biases, group_size, bits, act_bits=16):
    out = x.new_empty(_out_shape(x, plane0))
    # The native op validates everything else (dtypes, contiguity, scales' shape) before
    # touching memory and raises ValueError/TypeError naming the argument.
    _C.qmatmul(x, plane0, plane1 if bits == INT8 else None, scales, biases, group_size, bits, out, act_bits)
    return out


_lib.impl("qmatmul", _qmatmul_cpu, "CPU")


@torch.library.register_fake("bitswitch::qmatmul")
def _qmatmul_fake(x, plane0, plane1, scales, biases, group_size, bits, act_bits=16):
    if bits not in BITS:
        raise ValueError(f"qmatmul: bits must be 4 or 8, got {bits}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"qmatmul: group_size must be one of {GROUP_SIZES}, got {group_size}")
    if bits == INT8 and plane1 is None:
        raise ValueError("qmatmul: bits is 8 but the weight has no plane 1; use bits=4")
    check_act_bits(act_bits, "qmatmul")
    return x.new_empty(_out_shape(x, plane0))


def _attention_cpu(q, k, v, indptr, indices, block_q, block_k, causal=True, scale=None, q_offset=0, q_offsets=None):
    if q.dim() != 4:
        raise ValueError(f"attention: q must be 4-D [batch, heads, length, head_dim], got shape {tuple(q.shape)}")
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(q.shape[:3], dtype=torch.float32)
    _C.attention(q, k, v, indptr, indices, block_q, block_k, causal, float("nan") if scale is None else scale,
                 q_offset, out, lse, q_offsets=q_offsets)
    return out, lse


_lib.impl("attention", _attention_cpu, "CPU")


@torch.library.register_fake("bitswitch::attention")
def _attention_fake(q, k, v, indptr, indices, block_q, block_k, causal=True, scale=None, q_offset=0, q_offsets=None):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("attention: q, k and v must be 4-D [batch, heads, length, head_dim]")
    if (indptr is None) != (indices is None):
        raise ValueError("attention: mask needs both indptr and indices, or neither")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"attention: q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(q.shape[:3], dtype=torch.float32))


def _select_pages_at_cpu(q, k, kmin, kmax, positions, n, sinks=1, block_k=64):
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError("select_pages_at: q and k must be 4-D [batch, heads, length, head_dim]")
    indices = torch.empty((q.shape[0], k.shape[1], n), dtype=torch.int32)
    _C.select_pages_at(q, k, kmin, kmax, positions, indices, sinks, block_k)
    return indices


_lib.impl("select_pages_at", _select_pages_at_cpu, "CPU")


@torch.library.register_fake("bitswitch::select_pages_at")
def _select_pages_at_fake(q, k, kmin, kmax, positions, n, sinks=1, block_k=64):
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError("select_pages_at: q and k must be 4-D [batch, heads, length, head_dim]")
    return q.new_empty((q.shape[0], k.shape[1], n), dtype=torch.int32)


# -- NVIDIA GPUs: the same ops on CUDA tensors, through bitswitch._cuda --------------------
#
# _C validates the arguments exactly as for CPU tensors and launches the CUDA kernels on the
# current torch stream of the tensors' device. Scratch (split-K / split-KV partials) comes
# from torch's caching allocator, so there is no host synchronization and no allocation
# outside torch: the ops work under CUDA graph capture and torch.compile(mode="reduce-overhead").
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_WORKSPACE_BYTES: dict = {}  # (op, sizes...) -> bytes, a pure function of its key


def _cuda_module():
    if not _C._has_cuda_backend():
        raise ValueError("bitswitch: CUDA tensors need bitswitch._cuda, which this build does not have "
                         "(it is built when nvcc is found at install time; see `bitswitch info`)")
    from . import _cuda

    return _cuda


def _workspace(key: tuple, size_fn, device: torch.device) -> tuple:
    """(tensor or None, address, bytes): scratch of the size the kernels ask for."""
    nbytes = _WORKSPACE_BYTES.get(key)
    if nbytes is None:
        nbytes = _WORKSPACE_BYTES[key] = int(size_fn())
    if nbytes == 0:
        return None, 0, 0
    ws = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return ws, ws.data_ptr(), nbytes


# 16-bit x with at least this many rows takes qmatmul on CUDA as W dequantized to x's dtype
# (bitswitch._C.dequantize, in slices of at most _DEQUANT_SLICE_BYTES) and one dense GEMM
# (cuBLAS, through torch.matmul): for prefill the dequantization streams each weight once and
# costs a few percent of the GEMM, where the mma.sync GEMM kernel is bound by its issue slots
# (bench/RESULTS.md). The default 512 is where that issue-slot count and cuBLAS's ~600 TF/s
# on an H100 cross (near M = 256, from the SASS: not yet measured; `bitswitch bench gpu` times
# both sides). BITSWITCH_CUDA_DEQUANT_M=0 turns it off (every M on bitswitch's kernels).
_DEQUANT_MIN_M = int(os.environ.get("BITSWITCH_CUDA_DEQUANT_M", "512") or 0)
_DEQUANT_SLICE_BYTES = 64 << 20


def _qmatmul_dequant_gemm(x, plane0, plane1, scales, biases, group_size, bits, out):
    n, k = plane0.shape[0], x.shape[-1]
    x2, y2 = x.reshape(-1, k), out.view(-1, n)
    rows = max(8, min(n, _DEQUANT_SLICE_BYTES // (2 * k)))
    stream = torch.cuda.current_stream(x.device).cuda_stream if x.is_cuda else 0
    p1 = plane1 if bits == INT8 else None
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        w = torch.empty((n1 - n0, k), dtype=x.dtype, device=x.device)
        _C.dequantize(plane0[n0:n1], None if p1 is None else p1[n0:n1], scales[n0:n1], biases[n0:n1], group_size,
                      bits, w, stream=stream)
        if n1 - n0 == n:
            torch.matmul(x2, w.t(), out=y2)
        else:
            y2[:, n0:n1] = x2 @ w.t()
    return out


def _qmatmul_cuda(x, plane0, plane1, scales, biases, group_size, bits, act_bits=16):
    out = x.new_empty(_out_shape(x, plane0))
    if not x.is_cuda:  # CUDA weights with CPU activations: _C raises the device error
        return _qmatmul_cpu(x, plane0, plane1, scales, biases, group_size, bits, act_bits)
    cu = _cuda_module()
    k = x.shape[-1]
    m = x.numel() // k if k else 0
    if (0 < _DEQUANT_MIN_M <= m and act_bits == 16 and x.dtype in (torch.bfloat16, torch.float16)
            and x.is_contiguous() and plane0.device == x.device and k == plane0.shape[-1] * VALUES_PER_WORD
            and (bits != INT8 or plane1 is not None)):
        # (anything else takes the kernels' path, whose glue raises the usual errors)
        return _qmatmul_dequant_gemm(x, plane0, plane1, scales, biases, group_size, bits, out)
    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    key = ("qmatmul", m, plane0.shape[0], k, group_size, bits, x.dtype, scales.dtype, dev)
    ws, ptr, nbytes = _workspace(key, lambda: cu.qmatmul_workspace_bytes(
        m, plane0.shape[0], k, group_size, bits, _DTYPE_CODES.get(x.dtype, 0), _DTYPE_CODES.get(scales.dtype, 0),
        dev), x.device)
    _C.qmatmul(x, plane0, plane1 if bits == INT8 else None, scales, biases, group_size, bits, out, act_bits,
               stream=torch.cuda.current_stream(x.device).cuda_stream, workspace=ptr, workspace_bytes=nbytes)
    return out


def _attention_cuda(q, k, v, indptr, indices, block_q, block_k, causal=True, scale=None, q_offset=0, q_offsets=None):
    if not q.is_cuda:  # a CUDA cache with CPU queries: _C raises the device error
        return _attention_cpu(q, k, v, indptr, indices, block_q, block_k, causal, scale, q_offset, q_offsets)
    if q.dim() != 4:
        raise ValueError(f"attention: q must be 4-D [batch, heads, length, head_dim], got shape {tuple(q.shape)}")
    cu = _cuda_module()
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    b, hq, lq, d = q.shape
    hkv, lk = (k.shape[1], k.shape[2]) if k.dim() == 4 else (1, 0)
    dev = q.device.index if q.device.index is not None else torch.cuda.current_device()
    key = ("attention", b, hq, hkv, lq, lk, d, q.dtype, block_q, block_k, indptr is not None, causal, dev)
    ws, ptr, nbytes = _workspace(key, lambda: cu.attention_workspace_bytes(
        b, hq, hkv, lq, lk, d, _DTYPE_CODES.get(q.dtype, 0), block_q, block_k, indptr is not None, causal, dev),
        q.device)
    _C.attention(q, k, v, indptr, indices, block_q, block_k, causal, float("nan") if scale is None else scale,
                 q_offset, out, lse, stream=torch.cuda.current_stream(q.device).cuda_stream, workspace=ptr,
                 workspace_bytes=nbytes, q_offsets=q_offsets)
    return out, lse


def _select_pages_at_cuda(q, k, kmin, kmax, positions, n, sinks=1, block_k=64):
    _cuda_module()
    indices = torch.empty((q.shape[0], k.shape[1] if k.dim() == 4 else 0, n), dtype=torch.int32, device=q.device)
    _C.select_pages_at(q, k, kmin, kmax, positions, indices, sinks, block_k,
                       stream=torch.cuda.current_stream(q.device).cuda_stream)
    return indices


_lib.impl("qmatmul", _qmatmul_cuda, "CUDA")
_lib.impl("select_pages_at", _select_pages_at_cuda, "CUDA")
_lib.impl("attention", _attention_cuda, "CUDA")


# -- Apple GPUs: the same ops on MPS tensors, through bitswitch's Metal kernels -------------
#
# torch.mps.compile_shader builds each kernel instance once per process (the .metal sources
# plus its generated entry point, bitswitch.metal.entry_source); bitswitch.metal plans the
# launches, which run on torch's MPS stream in order, with outputs from torch's allocator.
_MPS_LIBS: dict = {}
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _mps_launch(launch, tensors: Sequence[torch.Tensor]) -> None:
    fn = _MPS_LIBS.get(launch.name)
    if fn is None:
        from . import metal as M

        if not hasattr(torch, "mps") or not hasattr(torch.mps, "compile_shader"):
            raise RuntimeError(f"bitswitch: MPS tensors need torch.mps.compile_shader (torch >= 2.6 on macOS); "
                               f"this torch {torch.__version__} has none")
        if not torch.backends.mps.is_available():
            raise RuntimeError("bitswitch: no Metal GPU is available to torch (torch.backends.mps.is_available() "
                               "is False)")

        src = "#include <metal_stdlib>\nusing namespace metal;\n" + M.library_source() + "\n" + \
            M.entry_source(launch.kernel, launch.template)
        fn = getattr(torch.mps.compile_shader(src), launch.name)
        _MPS_LIBS[launch.name] = fn
    fn(*tensors, threads=[launch.groups * launch.threads, 1, 1], group_size=[launch.threads, 1, 1])


# The launcher the MPS ops use; tests swap in the MSL emulator to run this marshalling on CPUs.
_METAL_LAUNCH = _mps_launch


def _metal_run(plan, arrays: dict, device: torch.device) -> tuple:
    from . import metal as M

    env = dict(arrays)
    env.update({n: torch.from_numpy(a).to(device) for n, a in plan.aux.items()})
    for name, (shape, dt) in plan.alloc.items():
        env[name] = torch.empty(shape, dtype=_TORCH_DTYPES[dt], device=device)
    for launch in plan.launches:
        _METAL_LAUNCH(launch, [env[a.name] for a in M.KERNELS[launch.kernel].args])
    return tuple(env[n] for n in plan.result)


def _same_device(op: str, device: torch.device, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but x/q is on {device}; move the weight or cache "
                             f"(e.g. QLinear.to('{device.type}'))")


def _qmatmul_metal(x, plane0, plane1, scales, biases, group_size, bits, act_bits=16):
    from . import metal as M

    op = "qmatmul"
    _same_device(op, x.device, plane0=plane0, plane1=plane1, scales=scales, biases=biases)
    if act_bits != 16:
        raise ValueError(f"{op}: act_bits must be 16 on Apple GPUs (int8 activations are a CPU path), got {act_bits}")
    if bits == INT8 and plane1 is None:
        raise ValueError(f"{op}: bits is 8 but the weight has no plane 1; use bits=4")
    for name, t in (("x", x), ("plane0", plane0), ("plane1", plane1), ("scales", scales), ("biases", biases)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous on Apple GPUs")
    for name, t in (("plane0", plane0), ("plane1", plane1)):
        if t is not None and t.dtype not in (torch.uint32, torch.int32):
            raise TypeError(f"{op}: {name} must be uint32 (or its int32 view), got {t.dtype}")
    if scales.dtype != biases.dtype:
        raise TypeError(f"{op}: scales ({scales.dtype}) and biases ({biases.dtype}) must share a dtype")
    out_shape = _out_shape(x, plane0)
    n, k = plane0.shape[0], x.shape[-1]
    if tuple(scales.shape) != (n, k // group_size) or tuple(biases.shape) != (n, k // group_size):
        raise ValueError(f"{op}: scales and biases must be [N, K/group_size] = {(n, k // group_size)}, got "
                         f"{tuple(scales.shape)} and {tuple(biases.shape)}")
    m = x.numel() // k if k else 0
    plan = M.plan_qmatmul(m, n, k, bits, group_size, str(x.dtype).rsplit(".", 1)[-1],
                          str(scales.dtype).rsplit(".", 1)[-1])
    (y,) = _metal_run(plan, {"x": x.reshape(m, k), "p0": plane0, "p1": plane1 if bits == INT8 else plane0,
                             "scales": scales, "biases": biases}, x.device)
    return y.reshape(out_shape)


class _MaskView:
    """The BlockMask fields bitswitch.metal needs, from the op's tensors."""

    def __init__(self, indptr, indices, block_q, block_k):
        self.indptr = indptr.detach().cpu().numpy()
        self.indices = indices.detach().cpu().numpy()
        self.block_q, self.block_k = block_q, block_k


def _attention_metal(q, k, v, indptr, indices, block_q, block_k, causal=True, scale=None, q_offset=0, q_offsets=None):
    from . import metal as M

    op = "attention"
    if q_offsets is not None:
        raise ValueError(f"{op}: q_offsets (positions in device memory) is supported on CPU and CUDA tensors, not MPS")
    _same_device(op, q.device, k=k, v=v)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("attention: q, k and v must be 4-D [batch, heads, length, head_dim]")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"attention: q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if (indptr is None) != (indices is None):
        raise ValueError("attention: mask needs both indptr and indices, or neither")
    b, hq, lq, d = q.shape
    _, hkv, lk, _ = k.shape
    if tuple(v.shape) != tuple(k.shape) or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"attention: k and v must be [B={b}, Hkv, Lk, D={d}], got {tuple(k.shape)} and {tuple(v.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(3) != 1:
            raise ValueError(f"attention: {name} must have a unit stride along head_dim")
    mask = None if indptr is None else _MaskView(indptr, indices, block_q, block_k)
    plan = M.plan_attention(b, hq, hkv, lq, lk, d, str(q.dtype).rsplit(".", 1)[-1], q.stride()[:3], k.stride()[:3],
                            v.stride()[:3], mask=mask, causal=causal, scale=scale, q_offset=q_offset)
    return _metal_run(plan, {"q": q, "k": k, "v": v}, q.device)


_lib.impl("qmatmul", _qmatmul_metal, "MPS")
_lib.impl("attention", _attention_metal, "MPS")


def _select_pages_at_metal(q, k, kmin, kmax, positions, n, sinks=1, block_k=64):
    raise ValueError("select_pages_at: runs on CPU and CUDA tensors, not MPS; on Apple GPUs decode selects pages "
                     "on the host (bitswitch.attention.select_pages)")


_lib.impl("select_pages_at", _select_pages_at_metal, "MPS")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None, causal: bool = True,
              scale: Optional[float] = None, q_offset: int = 0, return_lse: bool = False,
              q_offsets: Optional[torch.Tensor] = None):
    """torch.ops.bitswitch.attention with a bitswitch.attention.BlockMask (None: dense) or
    a mask already on q's device as (indptr, indices, block_q, block_k) tensors and ints
    (DecodePages.select); the semantics of bitswitch.ops.attention. Traceable by
    torch.compile. q_offsets: an int32 [B] tensor on q's device holding each batch row's
    q_offset (replacing q_offset), for steps captured in a CUDA graph, whose positions must
    come from memory."""
    if mask is None:
        ip = ix = None
        bq, bk = _DENSE_TILE
    elif isinstance(mask, tuple):
        ip, ix, bq, bk = mask
    else:
        ip, ix = mask.torch_tensors(q.device)
        bq, bk = mask.block_q, mask.block_k
    out, lse = torch.ops.bitswitch.attention(q, k, v, ip, ix, bq, bk, causal, scale, q_offset, q_offsets)
    return (out, lse) if return_lse else out


def select_pages_at(q: torch.Tensor, k: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor,
                    positions: torch.Tensor, n: int, sinks: int = 1, block_k: int = 64) -> torch.Tensor:
    """torch.ops.bitswitch.select_pages_at: Quest-style page selection for one decode step
    whose position is held in memory, so that it can be captured in a CUDA graph.

    q [B, Hq, 1, D] sits at positions (int32 [B]) and k [B, Hkv, capacity, D] is the key cache
    with that position's key written. kmin / kmax (float32 [B, Hkv, ceil(capacity / block_k),
    D]) hold each key block's per-channel minimum and maximum over keys [0, position); the op
    folds the position's key in, in place (DecodePages keeps them current). Returns indices
    int32 [B, Hkv, n]: per kv head, the n blocks with the highest bound max over its query
    heads of sum_d q c + |q| r (c, r: the block's midpoint and half-range, the score of
    bitswitch.attention.select_pages), the first `sinks` blocks and the position's own block
    always among them, ties to the lower block, in increasing order. Blocks after the
    position rank last, so with fewer blocks than n the tail holds blocks that causal
    attention reads nothing of. With indptr [0, n] this is a BSR mask row for attention (see
    DecodePages.select)."""
    return torch.ops.bitswitch.select_pages_at(q, k, kmin, kmax, positions, n, sinks, block_k)


class DecodePages:
    """Decode page selection on the KV cache's device: per-block key summaries of one
    layer's cache kept as tensors, and the mask of a step computed from them without
    reading anything back to the host (so a decode step with block-sparse attention can be
    captured in a CUDA graph). The device counterpart of bitswitch.attention's
    KeyBlockSummary + select_pages, with the same scores.

        pages = DecodePages(k_cache)                  # [B, Hkv, capacity, D]
        pages.rebuild(k_cache, length)                # summaries of keys [0, length)
        mask = pages.select(q, k_cache, positions, n) # key at positions[b] already written
        out = bitswitch.torch.attention(q, k_cache, v_cache, mask, q_offsets=positions)

    `length` (host side) is how many keys the summaries cover: select at position p needs
    exactly keys [0, p) covered (or [0, p], running the same step again) and covers p + 1
    afterwards; positions live on the device, so the caller records it (covered()).
    """

    def __init__(self, k_cache: torch.Tensor, block_k: int = 64):
        if k_cache.dim() != 4:
            raise ValueError(f"DecodePages: k_cache must be [B, Hkv, capacity, D], got shape {tuple(k_cache.shape)}")
        if block_k not in (32, 64, 128):
            raise ValueError(f"DecodePages: block_k must be 32, 64 or 128, got {block_k!r}")
        b, hkv, cap, d = k_cache.shape
        self.block_k = block_k
        self.capacity = cap
        self.nkb = -(-cap // block_k)
        self.kmin = torch.zeros((b, hkv, self.nkb, d), dtype=torch.float32, device=k_cache.device)
        self.kmax = torch.zeros_like(self.kmin)
        self.length = 0
        self._indptr: dict = {}  # n -> int32 [B, Hkv, 2] rows [0, n]

    def rebuild(self, k_cache: torch.Tensor, length: int) -> None:
        """Recomputes the summaries of every block holding keys [0, length) (torch ops on the
        cache's device, nothing read back)."""
        if not 0 <= length <= self.capacity:
            raise ValueError(f"DecodePages.rebuild: length must be in [0, {self.capacity}], got {length!r}")
        nb = -(-length // self.block_k)
        if nb:
            span = nb * self.block_k
            k = k_cache.narrow(2, 0, min(span, self.capacity)).float()
            if k.shape[2] < span:
                k = F.pad(k, (0, 0, 0, span - k.shape[2]))
            b, hkv, _, d = k.shape
            k = k.view(b, hkv, nb, self.block_k, d)
            valid = (torch.arange(span, device=k.device) < length).view(1, 1, nb, self.block_k, 1)
            self.kmax[:, :, :nb] = torch.where(valid, k, float("-inf")).amax(3)
            self.kmin[:, :, :nb] = torch.where(valid, k, float("inf")).amin(3)
        self.length = length

    def invalidate(self) -> None:
        """Marks the summaries stale (the cached keys changed): the next rebuild refills the
        same tensors, so CUDA graphs captured on them stay valid."""
        self.length = -1

    def covered(self, length: int) -> None:
        """Records that the summaries now cover keys [0, length) (after select steps)."""
        self.length = length

    def select(self, q: torch.Tensor, k_cache: torch.Tensor, positions: torch.Tensor, n: int, sinks: int = 1) -> tuple:
        """The mask of one decode step: (indptr, indices, block_q, block_k), for
        bitswitch.torch.attention's mask argument; see select_pages_at."""
        n = max(1, min(int(n), self.nkb))
        indices = select_pages_at(q, k_cache, self.kmin, self.kmax, positions, n, sinks, self.block_k)
        indptr = self._indptr.get(n)
        if indptr is None:
            row = torch.tensor([0, n], dtype=torch.int32, device=q.device)
            indptr = self._indptr[n] = row.expand(q.shape[0], k_cache.shape[1], 2).contiguous()
        return indptr, indices, 64, self.block_k


def qmatmul(x: torch.Tensor, qw: QWeight, bits: Optional[int] = None, act_bits: int = 16) -> torch.Tensor:
    """torch.ops.bitswitch.qmatmul on a QWeight of torch tensors."""
    bits = qw.default_bits if bits is None else bits
    qw.check_bits(bits, "qmatmul")
    return torch.ops.bitswitch.qmatmul(x, qw.plane0, qw.plane1, qw.scales, qw.biases, qw.group_size, bits, act_bits)


# -- fused layer ops ---------------------------------------------------------------------
#
# Each runs the native kernel on CPU tensors, and bitswitch's CUDA kernel on CUDA tensors,
# in eager mode (a decode step then makes a few native calls or launches per layer instead
# of dozens of small torch ops) and the same computation as torch ops otherwise (under
# torch.compile, on other devices, with autograd): the torch
# code is the reference the native kernels are tested against, and it follows Hugging Face
# transformers' Qwen3 op for op, so both round where transformers rounds.

def _native(x: torch.Tensor) -> bool:
    return x.is_cpu and not _is_compiling() and not x.requires_grad


def _cuda_stream(x: torch.Tensor) -> Optional[int]:
    """The current stream of x's device when the fused op runs bitswitch's CUDA kernel on x
    (eager, no autograd, bitswitch._cuda loaded), else None."""
    if x.is_cuda and not _is_compiling() and not x.requires_grad and _C._has_cuda_backend():
        return torch.cuda.current_stream(x.device).cuda_stream
    return None


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x * rsqrt(mean(x^2) + eps)): the normalization in float32, cast to x's
    dtype before the weight multiplies it."""
    x32 = x.float()
    return weight * (x32 * x32.square().mean(-1, keepdim=True).add_(eps).rsqrt_()).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, delta: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RMSNorm over the last dimension; with delta, x += delta (in place) first: the
    residual add before each norm of a transformer layer."""
    stream = None if _native(x) else _cuda_stream(x)
    if stream is not None or _native(x):
        out = torch.empty_like(x)
        _C.rms_norm(x, delta, weight, eps, out, stream=stream or 0)
        return out
    if delta is not None:
        x.add_(delta)
    return rms_norm_reference(x, weight, eps)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Non-interleaved RoPE, x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1]
    written as roll(x) = [x2, x1] times a sin whose first half is negated (exact: a sign)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


def rope_qkv(qkv: torch.Tensor, num_q_heads: int, q_weight: Optional[torch.Tensor], k_weight: Optional[torch.Tensor],
             eps: float, cos: torch.Tensor, sin: torch.Tensor, pos: int, k_cache: torch.Tensor,
             v_cache: torch.Tensor) -> torch.Tensor:
    """q [B, Hq, n, D] from a fused projection qkv [B, n, (Hq + 2 Hkv) * D]: q and k
    RMS-normalized over D (when the weights are given) and rotated with rows pos .. pos + n - 1
    of cos / signed sin [P, D]; k and v are written to those rows of the caches [B, Hkv, cap, D]."""
    b, n, _ = qkv.shape
    hkv, d = k_cache.shape[1], k_cache.shape[3]
    stream = None if _native(qkv) else _cuda_stream(qkv)
    if stream is not None or _native(qkv):
        q = qkv.new_empty((b, num_q_heads, n, d))
        _C.rope_qkv(qkv, q_weight, k_weight, eps, cos, sin, pos, q, k_cache, v_cache, stream=stream or 0)
        return q
    x = qkv.view(b, n, num_q_heads + 2 * hkv, d)
    qk, v = x[:, :, : num_q_heads + hkv], x[:, :, num_q_heads + hkv:]
    if q_weight is not None:
        qk = rms_norm_reference(qk, torch.cat((q_weight.expand(num_q_heads, -1), k_weight.expand(hkv, -1))), eps)
    qk = rope_reference(qk, cos[pos:pos + n, None], sin[pos:pos + n, None]).transpose(1, 2)
    k_cache.narrow(2, pos, n).copy_(qk[:, num_q_heads:])
    v_cache.narrow(2, pos, n).copy_(v.transpose(1, 2))
    return qk[:, :num_q_heads]


def rope_qkv_at(qkv: torch.Tensor, num_q_heads: int, q_weight: Optional[torch.Tensor],
                k_weight: Optional[torch.Tensor], eps: float, cos: torch.Tensor, sin: torch.Tensor,
                positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """rope_qkv at a position held in memory: positions int32 [B] (every row the same, the
    cache's length) on qkv's device. The fused kernel reads the position where it lives (CPU,
    CUDA); elsewhere torch ops on the device. Nothing is read back to the host, so a decode
    step built from it can be captured once in a CUDA graph and replayed at every position."""
    b, n, _ = qkv.shape
    hkv, d = k_cache.shape[1], k_cache.shape[3]
    stream = None if _native(qkv) else _cuda_stream(qkv)
    if stream is not None or _native(qkv):
        q = qkv.new_empty((b, num_q_heads, n, d))
        _C.rope_qkv(qkv, q_weight, k_weight, eps, cos, sin, 0, q, k_cache, v_cache, stream=stream or 0,
                    positions=positions)
        return q
    idx = positions[:1].long() + torch.arange(n, device=qkv.device)  # the rows this step writes
    x = qkv.view(b, n, num_q_heads + 2 * hkv, d)
    qk, v = x[:, :, : num_q_heads + hkv], x[:, :, num_q_heads + hkv:]
    if q_weight is not None:
        qk = rms_norm_reference(qk, torch.cat((q_weight.expand(num_q_heads, -1), k_weight.expand(hkv, -1))), eps)
    qk = rope_reference(qk, cos.index_select(0, idx)[:, None], sin.index_select(0, idx)[:, None]).transpose(1, 2)
    k_cache.index_copy_(2, idx, qk[:, num_q_heads:])
    v_cache.index_copy_(2, idx, v.transpose(1, 2))
    return qk[:, :num_q_heads]


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] along the last dimension."""
    i = gate_up.shape[-1] // 2
    stream = None if _native(gate_up) else _cuda_stream(gate_up)
    if stream is not None or _native(gate_up):
        out = gate_up.new_empty(gate_up.shape[:-1] + (i,))
        _C.silu_mul(gate_up, out, stream=stream or 0)
        return out
    return F.silu(gate_up[..., :i]) * gate_up[..., i:]


def _concat_rows(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    """torch.cat along dim 0, or, when the tensors already lie back to back in one storage
    (contiguous, same dtype and row length), the view spanning them: no copy."""
    first = ts[0]
    adjacent = all(t.is_contiguous() and t.dtype == first.dtype and t.shape[1:] == first.shape[1:] for t in ts)
    if adjacent:
        st = first.untyped_storage().data_ptr()
        off = first.storage_offset()
        for t in ts:
            if t.untyped_storage().data_ptr() != st or t.storage_offset() != off:
                adjacent = False
                break
            off += t.numel()
    if not adjacent:
        return torch.cat(ts)
    rows = sum(t.shape[0] for t in ts)
    return first.as_strided((rows,) + tuple(first.shape[1:]), first.stride(), first.storage_offset())


FULL = "full"  # the bits of the kept float weight


class QLinear(nn.Module):
    """A drop-in for nn.Linear over a nibble-plane weight whose precision is chosen per call.

    ``bits`` (4 or 8, or "full" when a float weight is kept) may be changed between calls: it
    selects which planes (or the float weight) the next forward reads, with no reallocation
    or re-quantization. ``act_bits`` (16 or 8) selects the activation precision the same way
    (see bitswitch.ops.qmatmul). ``weight``: an optional float copy [N, K] kept next to the
    planes for the "full" tier.
    """

    # Bumped by every change of any QLinear's bits or act_bits: what a model's native decode
    # step (bitswitch.models.qwen3) compares to know its baked-in settings are current.
    settings_version = 0

    def __init__(self, qweight: QWeight, bias: Optional[torch.Tensor] = None, bits=None,
                 act_bits: int = 16, weight: Optional[torch.Tensor] = None):
        super().__init__()
        if not isinstance(qweight, QWeight):
            raise TypeError(f"QLinear: qweight must be a QWeight, got {type(qweight).__name__}")
        qw = qweight.to(A.TORCH)
        self.out_features, self.in_features = qw.shape
        self.group_size = qw.group_size
        self.register_buffer("plane0", qw.plane0)
        self.register_buffer("plane1", qw.plane1)
        self.register_buffer("scales", qw.scales)
        self.register_buffer("biases", qw.biases)
        if weight is not None and tuple(weight.shape) != tuple(qw.shape):
            raise ValueError(f"QLinear: weight must have shape {tuple(qw.shape)}, got {tuple(weight.shape)}")
        self.register_buffer("weight_full", None if weight is None else weight.detach())
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"QLinear: bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.bias = None
        self._bits = INT4
        self.bits = qw.default_bits if bits is None else bits
        self._act_bits = 16
        self.act_bits = act_bits
        self._packed = None  # (_C.PackedWeight, the tensors it was built from)

    @property
    def bits(self):
        return self._bits

    @bits.setter
    def bits(self, value) -> None:
        if value == FULL:
            if self.weight_full is None:
                raise ValueError("QLinear.bits: 'full' asked of a layer without a kept float weight "
                                 "(load with keep_float=True)")
            self._bits = FULL
            QLinear.settings_version += 1
            return
        if isinstance(value, bool) or value not in self.bits_available:
            self.qweight.check_bits(value, "QLinear.bits")  # raises with the reason
        self._bits = int(value)
        QLinear.settings_version += 1

    @property
    def bits_available(self) -> tuple:
        b = self._buffers  # direct: a precision switch asks this of every layer
        return ((INT4, INT8) if b["plane1"] is not None else (INT4,)) + ((FULL,) if b["weight_full"] is not None else ())

    @property
    def act_bits(self) -> int:
        return self._act_bits

    @act_bits.setter
    def act_bits(self, value: int) -> None:
        check_act_bits(value, "QLinear.act_bits")
        self._act_bits = int(value)
        QLinear.settings_version += 1

    @property
    def qweight(self) -> QWeight:
        return QWeight(self.plane0, self.plane1, self.scales, self.biases, self.group_size)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 64, bits: int = INT8,
                    scales_dtype: Optional[str] = None) -> "QLinear":
        """Quantizes an nn.Linear: bits=8 keeps both planes (switchable to 4 later),
        bits=4 keeps plane 0 only."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QLinear.from_linear: expected nn.Linear, got {type(linear).__name__}")
        qw = quantize(linear.weight.detach(), group_size=group_size, bits=bits, scales_dtype=scales_dtype)
        return cls(qw, linear.bias, bits=bits)

    @classmethod
    def fuse(cls, parts: Sequence["QLinear"]) -> "QLinear":
        """One QLinear computing the parts' outputs side by side (out_features N1 + N2 + ...)
        from one call, over one copy of their weights: the fused buffers are the parts'
        concatenated along N, and each part's buffers become row views of them (no memory
        is added once the originals are released; parts that already are adjacent row views
        of one storage, such as the parts of an earlier fuse, are fused without a copy).
        Used for q|k|v and gate|up, which share
        their input: one GEMV streams all three weights with one activation prep and one
        thread-pool dispatch. The fused module reads whatever bits it is set to; callers
        use it only while every part reads the same view (see bitswitch.models.qwen3).

        Parts must share in_features, group_size, the scales' dtype and which planes (and
        kept float weights) they hold."""
        parts = list(parts)
        if len(parts) < 2 or not all(isinstance(p, QLinear) for p in parts):
            raise TypeError("QLinear.fuse: parts must be at least two QLinear modules")
        first = parts[0]
        for p in parts[1:]:
            same = (p.in_features == first.in_features and p.group_size == first.group_size
                    and p.scales.dtype == first.scales.dtype and (p.plane1 is None) == (first.plane1 is None)
                    and (p.weight_full is None) == (first.weight_full is None))
            if not same:
                raise ValueError("QLinear.fuse: parts must share in_features, group_size, the scales' dtype and "
                                 f"which planes / float weights they hold; got {first.extra_repr()} and {p.extra_repr()}")
        cat = {n: None if getattr(first, n) is None else _concat_rows([getattr(p, n) for p in parts])
               for n in cls._FUSED_BUFFERS}
        bias = None
        if any(p.bias is not None for p in parts):
            bias = torch.cat([p.bias if p.bias is not None else p.scales.new_zeros(p.out_features) for p in parts])
        fused = cls(QWeight(cat["plane0"], cat["plane1"], cat["scales"], cat["biases"], first.group_size), bias,
                    weight=cat["weight_full"])
        fused.view_parts(parts)
        return fused

    _FUSED_BUFFERS = ("plane0", "plane1", "scales", "biases", "weight_full")

    def view_parts(self, parts: Sequence["QLinear"]) -> None:
        """Makes the parts' weight buffers row views of this fused module's, in order (what
        fuse leaves, and what a fused module moved or converted by .to() restores)."""
        row = 0
        for p in parts:
            for n in self._FUSED_BUFFERS:
                t = getattr(self, n)
                if t is not None:
                    setattr(p, n, t[row:row + p.out_features])
            p._packed = None
            row += p.out_features

    def _packed_weight(self):
        """The weight resolved once for the eager fast path, rebuilt when a buffer is
        replaced (.to(), load_state_dict(assign=True), ...) or its storage moves."""
        b = self._buffers  # direct: nn.Module.__getattr__ costs ~1 us per buffer
        src = (b["plane0"], b["plane1"], b["scales"], b["biases"])
        cached = self._packed
        if cached is not None:
            old = cached[1]
            if (old[0] is src[0] and old[1] is src[1] and old[2] is src[2] and old[3] is src[3]
                    and cached[2] == src[0].data_ptr()):
                return cached[0]
        self._packed = (_C.PackedWeight(*src, self.group_size), src, src[0].data_ptr())
        return self._packed[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bits, bias = self._bits, self._parameters.get("bias")
        if bits == FULL:
            w = self.weight_full
            return F.linear(x, w if w.dtype == x.dtype else w.to(x.dtype), None if bias is None else bias.to(x.dtype))
        if x.is_cpu and not x.requires_grad and not _is_compiling():
            # Eager CPU: the same kernel without the dispatcher, and the weight's four tensors
            # resolved once; at decode sizes the per-call cost is most of the call.
            y = x.new_empty(x.shape[:-1] + (self.out_features,))
            _C.qmatmul_packed(x, self._packed_weight(), bits, y, self._act_bits)
        else:
            y = torch.ops.bitswitch.qmatmul(x, self.plane0, self.plane1, self.scales, self.biases,
                                            self.group_size, bits, self._act_bits)
        if bias is None:
            return y
        return y.add_(bias) if bias.dtype == y.dtype and not y.requires_grad else y + bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self._bits}, "
                f"act_bits={self._act_bits}, "
                f"available={self.bits_available}, group_size={self.group_size}, "
                f"scales={A.dtype_name(self.scales)}, bias={self.bias is not None}")


# -- any torch model: quantize its nn.Linear layers, switch their precision -----------------
def quantize_model(model: nn.Module, bits=INT8, group_size: int = 64, policy=None, keep_float: bool = False,
                   lm_head: bool = False, skip: Sequence[str] = (), scales_dtype: Optional[str] = None) -> nn.Module:
    """Replaces, in place, the nn.Linear layers of any torch model (Hugging Face causal LMs
    included: ``model.generate()`` keeps working) with QLinear and returns the model.

    bits: the view read first, 8 or 4; with 8 (or keep_float) both planes are stored and
    every layer can later switch to 4 (and to "full" with keep_float, which also keeps the
    float weight). group_size: 32, 64 or 128; a layer whose in_features is not a multiple
    of it stays nn.Linear. lm_head: also quantize the output projection
    (``model.get_output_embeddings()``, or a module named lm_head), left float by default.
    skip: globs of module paths to leave alone. policy: a precision policy applied at the end
    (see set_precision). Scales have the weight's dtype unless scales_dtype says otherwise.
    """
    if bits not in (INT4, INT8, FULL):
        raise ValueError(f"quantize_model: bits must be 4, 8 or 'full', got {bits!r}")
    if bits == FULL and not keep_float:
        raise ValueError("quantize_model: bits='full' reads the kept float weights: pass keep_float=True")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"quantize_model: group_size must be one of {GROUP_SIZES}, got {group_size}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_model: model must be a torch.nn.Module, got {type(model).__name__}")
    from .precision import _matches

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    store = INT4 if bits == INT4 and not keep_float else INT8
    for parent_path, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            path = f"{parent_path}.{name}" if parent_path else name
            if type(child) is not nn.Linear or any(_matches(g, path) for g in skip):
                continue
            if not lm_head and (child is head or name == "lm_head"):
                continue
            if child.in_features % group_size:
                continue
            w = child.weight.detach()
            qw = quantize(w, group_size=group_size, bits=store, scales_dtype=scales_dtype)
            q = QLinear(qw, child.bias, bits=store, weight=w.clone() if keep_float else None)
            q.bits = bits
            setattr(parent, name, q)
    if policy is not None:
        set_precision(model, policy)
    return model


def set_precision(model: nn.Module, policy) -> int:
    """Switches the QLinear layers of any torch model: `policy` is bits for every layer
    (4, 8 or "full"), a mode ("performance": 8, or "full" where kept; "efficiency": 4),
    or a mapping / list of pairs from module-path globs or layer indices to bits or modes
    (later entries override earlier ones; a glob covers a module's descendants, as in
    bitswitch.precision), or a plan file. Every requested view is checked first: one
    ValueError names the layers that lack it, and nothing changes. No tensor is touched.
    Returns the number of layers whose view changed."""
    from . import precision as P

    layers = {p: m for p, m in model.named_modules() if isinstance(m, QLinear)}
    if not layers:
        raise ValueError("set_precision: the model has no QLinear layers (run quantize_model first)")
    if policy in BITS or policy == FULL:
        policy = {"*": policy}
    cfg = getattr(model, "config", None)
    n_layers = int(getattr(cfg, "num_hidden_layers", 0) or 0)
    entries = P._entries(policy, n_layers)
    want = {p: m.bits for p, m in layers.items()}
    for glob, setting in entries:
        extra = sorted(set(setting) - {"bits", "mode"})
        if extra:
            raise ValueError(f"set_precision: {extra} settings apply to bitswitch's Qwen3 model only; "
                             "a torch model's layers take bits or a mode")
        for p, m in layers.items():
            if P._matches(glob, p):
                want[p] = setting["bits"] if "bits" in setting else P._mode_setting(setting["mode"], m.bits_available)["bits"]
    missing = [f"{p} ({b})" for p, b in want.items() if b not in layers[p].bits_available]
    if missing:
        raise ValueError(f"set_precision: {len(missing)} layer(s) lack the requested view: "
                         f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    changed = 0
    for p, b in want.items():
        if layers[p].bits != b:
            layers[p].bits = b
            changed += 1
    return changed
