"""bitswitch on MLX: qmatmul and attention on Apple GPUs through bitswitch's Metal kernels
(``mx.fast.metal_kernel``), and a ``QuantizedLinear`` drop-in for mlx.nn models (mlx-lm's
included) whose precision switches between INT8 and INT4 at run time.

On the GPU (``mx.default_device()`` is a Metal GPU) the kernels of metal/ run; anywhere else
(Linux, or the CPU device on a Mac) the same calls run bitswitch's native CPU kernels, so
models built with this module work everywhere MLX does.

    import mlx_lm, bitswitch.mlx as bsm
    model, tok = mlx_lm.load("Qwen/Qwen3-0.6B-MLX-8bit")
    bsm.quantize_model(model)               # every QuantizedLinear -> bitswitch's, INT8 view
    bsm.set_bits(model, 4, "*.mlp.*")       # MLPs read one plane from now on
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Dict, Optional, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map_with_path

from . import _arrays as A
from . import metal as M
from . import ops
from .quant import INT8, QWeight, quantize

__all__ = ["metal_available", "qmatmul", "attention", "QuantizedLinear", "quantize_model", "set_bits"]

_MX_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16, "int32": mx.int32}


def metal_available() -> bool:
    """True when MLX has a Metal GPU (an Apple-silicon Mac)."""
    try:
        return bool(mx.metal.is_available())
    except Exception:  # builds without the metal module
        return False


def _on_gpu() -> bool:
    return metal_available() and mx.default_device().type == mx.DeviceType.gpu


_KERNELS: Dict[str, Any] = {}


def _kernel(name: str):
    """One mx.fast.metal_kernel per kernel, built once per process; MLX compiles each
    template instance the first time it is launched and caches the pipeline."""
    k = _KERNELS.get(name)
    if k is None:
        if not metal_available() or not hasattr(mx.fast, "metal_kernel"):
            raise RuntimeError(f"bitswitch.mlx: the Metal kernels need MLX with a Metal GPU (an Apple-silicon Mac); "
                               f"this MLX {mx.__version__} reports none")
        spec = M.KERNELS[name]
        k = mx.fast.metal_kernel(name=f"bs_{name}", input_names=[a.name for a in spec.inputs],
                                 output_names=[a.name for a in spec.outputs], source=M.mlx_body(name),
                                 header="using namespace metal;\n" + M.library_source(), ensure_row_contiguous=True)
        _KERNELS[name] = k
    return k


def _run(plan: M.Plan, arrays: Dict[str, Any]) -> tuple:
    env = dict(arrays)
    env.update({n: mx.array(a) for n, a in plan.aux.items()})
    for launch in plan.launches:
        spec = M.KERNELS[launch.kernel]
        template = [(t, _MX_DTYPES[v] if isinstance(v, str) else int(v)) for t, v in launch.template.items()]
        outs = _kernel(launch.kernel)(
            inputs=[env[a.name] for a in spec.inputs], template=template,
            grid=(launch.groups * launch.threads, 1, 1), threadgroup=(launch.threads, 1, 1),
            output_shapes=[plan.alloc[a.name][0] for a in spec.outputs],
            output_dtypes=[_MX_DTYPES[plan.alloc[a.name][1]] for a in spec.outputs])
        env.update(zip((a.name for a in spec.outputs), outs))
    for name in plan.result:
        if name not in env:  # nothing to launch (an empty input)
            shape, dt = plan.alloc[name]
            env[name] = mx.zeros(shape, dtype=_MX_DTYPES[dt])
    return tuple(env[n] for n in plan.result)


def qmatmul(x: mx.array, qw: QWeight, bits: Optional[int] = None) -> mx.array:
    """y[..., N] = x[..., K] @ W^T reading the `bits` view of a packed weight (MLX arrays).
    On a Metal GPU: bitswitch's GEMV (<= 8 rows) or simdgroup-matrix GEMM; elsewhere the
    CPU kernels (bitswitch.ops.qmatmul)."""
    if not isinstance(qw, QWeight):
        raise TypeError(f"qmatmul: qw must be a QWeight, got {type(qw).__name__}")
    bits = qw.default_bits if bits is None else bits
    qw.check_bits(bits, "qmatmul")
    if not _on_gpu():
        return ops.qmatmul(x, qw, bits)
    if A.framework(x) != A.MLX or qw.framework != A.MLX:
        raise TypeError("qmatmul: on the Metal GPU x and the weight must be MLX arrays (QWeight.mlx())")
    n, k = qw.shape
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(f"qmatmul: x must be [..., K = {k}], got shape {tuple(x.shape)}")
    lead = tuple(x.shape[:-1])
    m = int(np.prod(lead)) if lead else 1
    plan = M.plan_qmatmul(m, n, k, bits, qw.group_size, A.dtype_name(x), qw.scales_dtype)
    (y,) = _run(plan, {"x": x.reshape(m, k), "p0": qw.plane0, "p1": qw.plane1 if bits == INT8 else qw.plane0,
                       "scales": qw.scales, "biases": qw.biases})
    return y.reshape(*lead, n)


def attention(q: mx.array, k: mx.array, v: mx.array, mask=None, causal: bool = True, scale: Optional[float] = None,
              q_offset: int = 0, return_lse: bool = False):
    """bitswitch.ops.attention for MLX arrays: block-sparse flash attention (or the split-KV
    decode kernel for few query rows) on a Metal GPU, the CPU kernels elsewhere."""
    if not _on_gpu():
        return ops.attention(q, k, v, mask=mask, causal=causal, scale=scale, q_offset=q_offset, return_lse=return_lse)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if A.framework(t) != A.MLX or t.ndim != 4:
            raise ValueError(f"attention: {name} must be a 4-D MLX array [batch, heads, length, head_dim]")
    dt = A.dtype_name(q)
    if A.dtype_name(k) != dt or A.dtype_name(v) != dt:
        raise TypeError(f"attention: q, k and v must share one dtype, got {dt}, {A.dtype_name(k)}, {A.dtype_name(v)}")
    b, hq, lq, d = (int(s) for s in q.shape)
    _, hkv, lk, dk = (int(s) for s in k.shape)
    if tuple(v.shape) != tuple(k.shape) or dk != d or int(k.shape[0]) != b:
        raise ValueError(f"attention: k and v must be [B={b}, Hkv, Lk, D={d}], got {tuple(k.shape)} and {tuple(v.shape)}")

    def strides(h, length):  # inputs are made row-contiguous by metal_kernel
        return (h * length * d, length * d, d)

    plan = M.plan_attention(b, hq, hkv, lq, lk, d, dt, strides(hq, lq), strides(hkv, lk), strides(hkv, lk),
                            mask=mask, causal=causal, scale=scale, q_offset=q_offset)
    out, lse = _run(plan, {"q": q, "k": k, "v": v})
    return (out, lse) if return_lse else out


class QuantizedLinear(nn.Module):
    """A linear layer on a nibble-plane weight: ``y = x W^T (+ bias)`` reading the INT8 view
    (planes 0 and 1) or the INT4 view (plane 0) as ``bits`` says, switchable at any time
    with no reload (``layer.bits = 4``). The packed arrays are frozen parameters, so
    ``model.parameters()`` and ``mx.save_safetensors`` see them."""

    def __init__(self, qw: QWeight, bias: Optional[mx.array] = None, bits: Optional[int] = None):
        super().__init__()
        qw = qw if qw.framework == A.MLX else qw.mlx()
        self.plane0 = qw.plane0
        if qw.plane1 is not None:
            self.plane1 = qw.plane1
        self.scales = qw.scales
        self.biases = qw.biases
        if bias is not None:
            self.bias = bias
        self.group_size = qw.group_size
        self._bits = qw.default_bits
        self.bits = qw.default_bits if bits is None else bits
        self.freeze()

    @property
    def qweight(self) -> QWeight:
        return QWeight(self["plane0"], self.get("plane1"), self["scales"], self["biases"], self.group_size)

    @property
    def bits(self) -> int:
        return self._bits

    @bits.setter
    def bits(self, bits: int) -> None:
        self.qweight.check_bits(bits, "QuantizedLinear.bits")
        self._bits = int(bits)

    def _extra_repr(self) -> str:
        n, k = self.qweight.shape
        return f"input_dims={k}, output_dims={n}, bias={'bias' in self}, group_size={self.group_size}, bits={self.bits}"

    def __call__(self, x: mx.array) -> mx.array:
        y = qmatmul(x, self.qweight, self.bits)
        if "bias" in self:
            y = y + self["bias"]
        return y

    @classmethod
    def from_linear(cls, layer: nn.Module, bits: int = 8, group_size: int = 64) -> "QuantizedLinear":
        """From an mlx.nn.Linear (quantized to both planes here: `bits` picks the view read
        first) or an affine mlx.nn.QuantizedLinear (4-bit: the INT4 view only; 8-bit: both,
        its own dequantization reproduced exactly by the INT8 view)."""
        bias = layer["bias"] if "bias" in layer else None
        if isinstance(layer, nn.QuantizedLinear):
            if getattr(layer, "mode", "affine") != "affine" or layer.bits not in (4, 8):
                raise ValueError(f"QuantizedLinear.from_linear: only affine 4- and 8-bit MLX layers map onto nibble "
                                 f"planes, got mode={getattr(layer, 'mode', 'affine')} bits={layer.bits}")
            qw = QWeight.from_mlx(layer["weight"], layer["scales"], layer["biases"], bits=layer.bits,
                                  group_size=layer.group_size)
            return cls(qw, bias, bits=min(bits, qw.default_bits))
        if isinstance(layer, nn.Linear):
            w = layer["weight"]
            sdt = A.dtype_name(w) if A.dtype_name(w) in A.FLOAT_DTYPES else "float32"
            qw = quantize(w, group_size=group_size, bits=8, scales_dtype=sdt)
            return cls(qw, bias, bits=bits)
        raise TypeError(f"QuantizedLinear.from_linear: expected mlx.nn.Linear or mlx.nn.QuantizedLinear, "
                        f"got {type(layer).__name__}")


def quantize_model(model: nn.Module, bits: int = 8, group_size: int = 64,
                   predicate: Optional[Callable[[str, nn.Module], bool]] = None) -> nn.Module:
    """Replaces (in place) every mlx.nn.Linear and affine QuantizedLinear for which
    `predicate(path, module)` holds (default: all) with bitswitch's QuantizedLinear reading
    the `bits` view (capped at 4 for 4-bit MLX layers). Returns the model."""
    pred = predicate or (lambda _p, _m: True)

    def swap(path: str, m: nn.Module):
        if isinstance(m, (nn.Linear, nn.QuantizedLinear)) and not isinstance(m, QuantizedLinear) and pred(path, m):
            return QuantizedLinear.from_linear(m, bits=bits, group_size=group_size)
        return m

    model.update_modules(tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module))
    return model


def set_bits(model: nn.Module, bits: Union[int, Dict[str, int]], pattern: str = "*") -> int:
    """Switches the view of bitswitch QuantizedLinear layers: `bits` for the layers whose
    path matches the glob `pattern`, or a dict {glob: bits} (the last matching glob wins).
    No reload, no copy. Returns how many layers changed view."""
    rules = list(bits.items()) if isinstance(bits, dict) else [(pattern, bits)]
    changed = 0
    for path, m in model.named_modules():
        if not isinstance(m, QuantizedLinear):
            continue
        want = None
        for glob, b in rules:
            if fnmatch.fnmatchcase(path, glob):
                want = b
        if want is not None and want != m.bits:
            m.bits = want
            changed += 1
    return changed
