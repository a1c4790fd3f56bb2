"""The nibble-plane weight format in Python: QWeight, quantize, dequantize, MLX interop.

A weight W[N, K] is stored as 4-bit planes along K with one affine (scale, bias) per group
of ``group_size`` inputs (see csrc/include/bitswitch/format.h, the single source of truth;
its constants reach Python through ``bitswitch._C.format``):

- plane 0 (uint32 [N, K/8]) holds the INT4 code q, MLX's 4-bit bit order;
- plane 1 (optional, same shape) holds a 4-bit residual r;
- INT4 view (bits=4): ``w = s*q + b``;
- INT8 view (bits=8): ``w = s*q + b + (s/16)*(r - 7.5)``.

So one stored copy serves both precisions and a layer switches by reading one plane or two.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from . import _arrays as A
from . import _C

_F = _C.format
PLANE_BITS: int = _F.PLANE_BITS
VALUES_PER_WORD: int = _F.VALUES_PER_WORD
CODE_MAX: int = _F.CODE_MAX
GROUP_SIZES: tuple = tuple(_F.GROUP_SIZES)
BITS: tuple = tuple(_F.BITS)
INT4, INT8 = BITS
RESIDUAL_DIVISOR: int = _F.RESIDUAL_DIVISOR
RESIDUAL_CENTER: float = float(_F.RESIDUAL_CENTER)
# Activation precision of qmatmul: 16 = x quantized per group to 15 bits (float-grade),
# 8 = int8 per group (csrc/cpu/act_quant.h).
ACT_BITS: tuple = (16, 8)

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("bitswitch's packed format assumes a little-endian host")


def _check_group_size(group_size: int, where: str) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"{where}: group_size must be one of {GROUP_SIZES}, got {group_size!r}")


def _check_bits(bits: int, where: str) -> None:
    if bits not in BITS:
        raise ValueError(f"{where}: bits must be {INT4} (plane 0) or {INT8} (planes 0 and 1), got {bits!r}")


def check_act_bits(act_bits: int, where: str) -> None:
    if act_bits not in ACT_BITS:
        raise ValueError(f"{where}: act_bits must be 16 (float-grade activations) or 8 (int8 per group), "
                         f"got {act_bits!r}")


def _check_float_dtype(dtype: str, where: str, arg: str) -> None:
    if dtype not in A.FLOAT_DTYPES:
        raise TypeError(f"{where}: {arg} must be one of {A.FLOAT_DTYPES}, got {dtype}")


@dataclass
class QWeight:
    """A packed weight W[N, K]: planes, per-group scales and biases, all of one framework
    (numpy, torch or MLX). ``plane1`` is None for a weight that only has the INT4 view."""

    plane0: Any
    plane1: Optional[Any]
    scales: Any
    biases: Any
    group_size: int

    def __post_init__(self) -> None:
        self.validate()

    # -- shape and metadata ------------------------------------------------------------
    @property
    def shape(self) -> tuple:
        """(N, K) of the weight it stores."""
        n, words = self.plane0.shape
        return (int(n), int(words) * VALUES_PER_WORD)

    @property
    def bits_available(self) -> tuple:
        return (INT4, INT8) if self.plane1 is not None else (INT4,)

    @property
    def default_bits(self) -> int:
        """The most precise view it holds."""
        return self.bits_available[-1]

    @property
    def framework(self) -> str:
        return A.framework(self.plane0)

    @property
    def scales_dtype(self) -> str:
        return A.dtype_name(self.scales)

    def nbytes(self, bits: Optional[int] = None) -> int:
        """Bytes a matmul reads for the view: its planes plus scales and biases."""
        bits = self.default_bits if bits is None else bits
        self.check_bits(bits)
        n, k = self.shape
        plane = n * k // 2
        per = 4 if self.scales_dtype == "float32" else 2
        return plane * (bits // PLANE_BITS) + 2 * n * (k // self.group_size) * per

    def check_bits(self, bits: int, where: str = "QWeight") -> None:
        _check_bits(bits, where)
        if bits == INT8 and self.plane1 is None:
            raise ValueError(
                f"{where}: bits=8 asked of a weight without plane 1 (it holds only the INT4 view, "
                "e.g. it came from an MLX 4-bit or AWQ checkpoint); use bits=4"
            )

    def validate(self) -> None:
        """Raises ValueError/TypeError if the arrays do not form a valid packed weight."""
        where = "QWeight"
        _check_group_size(self.group_size, where)
        kind = A.framework(self.plane0)
        arrays = {"plane0": self.plane0, "plane1": self.plane1, "scales": self.scales, "biases": self.biases}
        for name, arr in arrays.items():
            if arr is None:
                continue
            if A.framework(arr) != kind:
                raise TypeError(f"{where}: {name} is a {A.framework(arr)} array but plane0 is {kind}")
            if len(arr.shape) != 2:
                raise ValueError(f"{where}: {name} must be 2-D, got shape {tuple(arr.shape)}")
        for name in ("plane0", "plane1"):
            arr = arrays[name]
            if arr is not None and A.dtype_name(arr) != "uint32":
                raise TypeError(f"{where}: {name} must be uint32, got {A.dtype_name(arr)}")
        n, k = self.shape
        if self.plane1 is not None and tuple(self.plane1.shape) != tuple(self.plane0.shape):
            raise ValueError(f"{where}: plane1 shape {tuple(self.plane1.shape)} != plane0 shape {tuple(self.plane0.shape)}")
        if k % self.group_size:
            raise ValueError(f"{where}: K = {k} is not a multiple of group_size {self.group_size}")
        want = (n, k // self.group_size)
        for name in ("scales", "biases"):
            arr = arrays[name]
            _check_float_dtype(A.dtype_name(arr), where, name)
            if tuple(arr.shape) != want:
                raise ValueError(f"{where}: {name} must have shape {want} for W of shape {(n, k)} "
                                 f"and group_size {self.group_size}, got {tuple(arr.shape)}")
        if A.dtype_name(self.scales) != A.dtype_name(self.biases):
            raise TypeError(f"{where}: scales ({A.dtype_name(self.scales)}) and biases "
                            f"({A.dtype_name(self.biases)}) must share a dtype")

    # -- conversions ----------------------------------------------------------------------
    def to(self, kind: str, like: Any = None) -> "QWeight":
        """The same weight with arrays of framework `kind` ('numpy', 'torch', 'mlx')."""
        conv = lambda a: None if a is None else A.convert(a, kind, like)  # noqa: E731
        return QWeight(conv(self.plane0), conv(self.plane1), conv(self.scales), conv(self.biases), self.group_size)

    def numpy(self) -> "QWeight":
        return self.to(A.NUMPY)

    def torch(self) -> "QWeight":
        return self.to(A.TORCH)

    def mlx(self) -> "QWeight":
        return self.to(A.MLX)

    def int4_only(self) -> "QWeight":
        """The same weight without plane 1 (halves the memory, keeps the INT4 view)."""
        return QWeight(self.plane0, None, self.scales, self.biases, self.group_size)

    @classmethod
    def from_mlx(cls, wq: Any, scales: Any, biases: Any, bits: int, group_size: int,
                 scales_dtype: Optional[str] = None) -> "QWeight":
        """Wraps an MLX affine-quantized weight (``mx.quantize`` output or an mlx-lm
        checkpoint's ``weight``/``scales``/``biases``).

        4-bit: plane 0 *is* MLX's packed weight, used as is. 8-bit: each 8-bit code c8
        splits into plane 0 = c8 >> 4 and plane 1 = c8 & 15, with s = 16*s8 and
        b = b8 + 7.5*s8, so the INT8 view reproduces MLX's dequantization exactly and the
        INT4 view comes for free. b needs more precision than s8 and b8 had, so 8-bit scales
        are stored as float32 unless `scales_dtype` says otherwise (which may round b): for
        bfloat16/float16 MLX weights (every mlx-lm checkpoint) b is then exact, for float32
        ones it is rounded to float32 (1 ulp).
        """
        where = "QWeight.from_mlx"
        _check_bits(bits, where)
        _check_group_size(group_size, where)
        kind = A.framework(wq)
        if A.dtype_name(wq) != "uint32":
            raise TypeError(f"{where}: wq must be uint32 (MLX packs codes in uint32), got {A.dtype_name(wq)}")
        if len(wq.shape) != 2:
            raise ValueError(f"{where}: wq must be 2-D [N, K*bits/32], got shape {tuple(wq.shape)}")
        n, words = (int(d) for d in wq.shape)
        k = words * 32 // bits
        for name, arr in (("scales", scales), ("biases", biases)):
            _check_float_dtype(A.dtype_name(arr), where, name)
            if tuple(arr.shape) != (n, k // group_size) or k % group_size:
                raise ValueError(f"{where}: {name} must have shape {(n, k // group_size)} for wq of shape "
                                 f"{(n, words)} at {bits} bits and group_size {group_size}, got {tuple(arr.shape)}")
        if bits == INT4:
            if scales_dtype is not None:
                scales, biases = A.cast(scales, scales_dtype), A.cast(biases, scales_dtype)
            return cls(wq, None, scales, biases, group_size)
        codes = np.ascontiguousarray(A.to_numpy(wq)).view(np.uint8).reshape(n, k)
        p0 = pack_codes(codes >> PLANE_BITS)
        p1 = pack_codes(codes & CODE_MAX)
        s8 = A.to_numpy(scales).astype(np.float64)
        b8 = A.to_numpy(biases).astype(np.float64)
        out_dtype = scales_dtype or "float32"
        _check_float_dtype(out_dtype, where, "scales_dtype")
        s = _np_cast(s8 * RESIDUAL_DIVISOR, out_dtype)
        b = _np_cast(b8 + RESIDUAL_CENTER * s8, out_dtype)
        return cls(*(A.from_numpy(a, kind, wq) for a in (p0, p1, s, b)), group_size=group_size)

    def to_mlx(self, bits: Optional[int] = None, dtype: Optional[str] = None, strict: bool = True) -> tuple:
        """(wq, scales, biases) in MLX's affine layout for the `bits` view, arrays of this
        weight's framework. With `strict`, raises ValueError if `dtype` (default: the scales
        dtype) cannot hold the MLX scales/biases exactly."""
        where = "QWeight.to_mlx"
        bits = self.default_bits if bits is None else bits
        self.check_bits(bits, where)
        dtype = dtype or self.scales_dtype
        _check_float_dtype(dtype, where, "dtype")
        kind = self.framework
        s = A.to_numpy(self.scales).astype(np.float64)
        b = A.to_numpy(self.biases).astype(np.float64)
        if bits == INT4:
            wq = self.plane0
            s_out, b_out = s, b
        else:
            n, k = self.shape
            codes = unpack_codes(A.to_numpy(self.plane0)) * RESIDUAL_DIVISOR + unpack_codes(A.to_numpy(self.plane1))
            wq = A.from_numpy(np.ascontiguousarray(codes.astype(np.uint8)).view(np.uint32).reshape(n, k // 4), kind, self.plane0)
            s_out = s / RESIDUAL_DIVISOR
            b_out = b - RESIDUAL_CENTER * s / RESIDUAL_DIVISOR
        res = []
        for name, v in (("scales", s_out), ("biases", b_out)):
            cast = _np_cast(v, dtype)
            if strict and not np.array_equal(cast.astype(np.float64), v):
                raise ValueError(f"{where}: the MLX {name} are not exactly representable in {dtype}; "
                                 "pass another dtype or strict=False to round")
            res.append(A.from_numpy(cast, kind, self.plane0))
        return (wq, res[0], res[1])


# -- packing ------------------------------------------------------------------------------
def pack_codes(codes: np.ndarray) -> np.ndarray:
    """uint8 codes [N, K] (0..15) -> a plane uint32 [N, K/8], element k at bits 4*(k%8)."""
    codes = np.asarray(codes, dtype=np.uint8)
    n, k = codes.shape
    if k % VALUES_PER_WORD:
        raise ValueError(f"pack_codes: K = {k} is not a multiple of {VALUES_PER_WORD}")
    packed = codes[:, 0::2] | (codes[:, 1::2] << PLANE_BITS)
    return np.ascontiguousarray(packed).view(np.uint32).reshape(n, k // VALUES_PER_WORD)


def unpack_codes(plane: np.ndarray) -> np.ndarray:
    """A plane uint32 [N, K/8] -> uint8 codes [N, K]."""
    plane = np.ascontiguousarray(plane, dtype=np.uint32)
    n, words = plane.shape
    b = plane.view(np.uint8).reshape(n, words * 4)
    out = np.empty((n, words * VALUES_PER_WORD), dtype=np.uint8)
    out[:, 0::2] = b & CODE_MAX
    out[:, 1::2] = b >> PLANE_BITS
    return out


def _np_cast(a: np.ndarray, dtype: str) -> np.ndarray:
    return a.astype(A.BFLOAT16 if dtype == "bfloat16" else dtype)


# -- quantization -------------------------------------------------------------------------
def quantize(w: Any, group_size: int = 64, bits: int = 8, scales_dtype: Optional[str] = None) -> QWeight:
    """Quantizes a float weight W[N, K] (numpy, torch or MLX) to nibble planes.

    Scales and biases are min-max per group, computed exactly as MLX's affine quantizer
    does (float32 arithmetic; 0.0 is made exactly representable, so scales may be
    negative). With bits=4 the codes are MLX's too: the result equals
    ``mx.quantize(w, bits=4)``. With bits=8 the 15 INT4 steps span each group's
    [min, max] exactly (no zero-exact adjustment) and both planes are rounded against the
    stored scale and bias (which are rounded to `scales_dtype`): plane 0 is the nearest INT4
    code and plane 1 the residual w - (s*q + b) in steps of s/16 around 7.5, so the INT8
    view is round-to-nearest with step s/16 and |error| <= |s|/32 for every element. Scales and biases have w's dtype (float32 for
    float64 input) unless `scales_dtype` is given.
    """
    where = "quantize"
    _check_group_size(group_size, where)
    _check_bits(bits, where)
    kind = A.framework(w)
    if len(w.shape) != 2:
        raise ValueError(f"{where}: w must be 2-D [N, K] (nn.Linear layout), got shape {tuple(w.shape)}")
    n, k = (int(d) for d in w.shape)
    if n == 0 or k == 0:
        raise ValueError(f"{where}: w must not be empty, got shape {(n, k)}")
    if k % group_size:
        raise ValueError(f"{where}: K = {k} (w.shape[1]) is not a multiple of group_size {group_size}")
    wdtype = A.dtype_name(w)
    if wdtype not in A.FLOAT_DTYPES + ("float64",):
        raise TypeError(f"{where}: w must be a float array, got {wdtype}")
    sdtype = scales_dtype or (wdtype if wdtype in A.FLOAT_DTYPES else "float32")
    _check_float_dtype(sdtype, where, "scales_dtype")
    wf = A.to_numpy(w).astype(np.float32)
    if not np.isfinite(wf).all():
        raise ValueError(f"{where}: w contains NaN or infinity")

    g = wf.reshape(n, k // group_size, group_size)
    w_max, w_min = g.max(axis=-1), g.min(axis=-1)
    neg = np.abs(w_min) > np.abs(w_max)
    scale = np.maximum((w_max - w_min) / np.float32(CODE_MAX), np.float32(1e-7))
    scale = np.where(neg, scale, -scale)
    edge = np.where(neg, w_min, w_max)
    if bits == INT4:
        # MLX's grid: the larger-magnitude endpoint stays exact and so does 0.0, which can
        # leave the other endpoint up to half a step outside the 15 steps.
        with np.errstate(divide="ignore", invalid="ignore"):
            q0 = np.rint(edge / scale)
            scale = np.where(q0 != 0, edge / q0, scale).astype(np.float32)
        bias = np.where(q0 != 0, edge, np.float32(0)).astype(np.float32)
    else:
        # Both planes: the 15 steps span the group exactly (from the same endpoint, with the
        # same sign convention), so the INT8 view's 255 steps of s/16, which reach 7.5/16 of
        # a step past either end, cover every element: |error| <= |s|/32 everywhere. With
        # MLX's zero-exact grid the elements beyond a shrunk range would keep an INT4-sized
        # error in the INT8 view.
        scale = scale.astype(np.float32)
        bias = edge.astype(np.float32)
    s_st, b_st = _np_cast(scale, sdtype), _np_cast(bias, sdtype)
    p1 = None
    if bits == INT4:
        # Codes against the unrounded float32 grid, as MLX computes them.
        q = np.clip(np.rint((g - bias[..., None]) / scale[..., None]), 0, CODE_MAX)
    else:
        # Both codes against the stored (rounded) grid, so the INT8 view is a true
        # round-to-nearest code of step s/16 even when scales are 16-bit.
        s64, b64 = s_st.astype(np.float64)[..., None], b_st.astype(np.float64)[..., None]
        gd = g.astype(np.float64)
        q = np.clip(np.rint((gd - b64) / s64), 0, CODE_MAX)
        r = np.clip(np.rint((gd - (s64 * q + b64)) * RESIDUAL_DIVISOR / s64 + RESIDUAL_CENTER), 0, CODE_MAX)
        p1 = pack_codes(r.reshape(n, k).astype(np.uint8))
    p0 = pack_codes(q.reshape(n, k).astype(np.uint8))
    conv = lambda a: None if a is None else A.from_numpy(a, kind, w)  # noqa: E731
    return QWeight(conv(p0), conv(p1), conv(s_st), conv(b_st), group_size)


def _codes_and_affine(qw: QWeight, bits: int):
    """Float64 codes [N, K] and per-group (scale, bias) of the view, each [N, K/G]."""
    s = A.to_numpy(qw.scales).astype(np.float64)
    b = A.to_numpy(qw.biases).astype(np.float64)
    q = unpack_codes(A.to_numpy(qw.plane0)).astype(np.float64)
    if bits == INT4:
        return q, s, b
    r = unpack_codes(A.to_numpy(qw.plane1)).astype(np.float64)
    return q * RESIDUAL_DIVISOR + r, s / RESIDUAL_DIVISOR, b - RESIDUAL_CENTER * s / RESIDUAL_DIVISOR


def dequantize(qw: QWeight, bits: Optional[int] = None, dtype: Optional[str] = None) -> Any:
    """W[N, K] of the `bits` view (default: the most precise held), in qw's framework.

    Computed in `dtype` (default: the scales dtype) as an affine code: ``scale*code``
    rounded to dtype, then ``+ bias`` rounded to dtype, where the INT8 view's code is
    16q + r with scale s/16 and bias b - 7.5*s/16. This is how MLX dequantizes, so an
    MLX weight converted with QWeight.from_mlx dequantizes to exactly mx.dequantize's result.
    """
    bits = qw.default_bits if bits is None else bits
    qw.check_bits(bits, "dequantize")
    dtype = dtype or qw.scales_dtype
    _check_float_dtype(dtype, "dequantize", "dtype")
    codes, s, b = _codes_and_affine(qw, bits)
    n, k = qw.shape
    rep = lambda a: np.repeat(_np_cast(a, dtype), qw.group_size, axis=1)  # noqa: E731
    c = _np_cast(codes, dtype)
    w = (rep(s) * c).astype(c.dtype) + rep(b)
    return A.from_numpy(np.ascontiguousarray(w.astype(c.dtype)), qw.framework, qw.plane0)


def dequantize_f64(qw: QWeight, bits: Optional[int] = None) -> np.ndarray:
    """The float64 reference: W[N, K] of the view, exactly, as a numpy array."""
    bits = qw.default_bits if bits is None else bits
    qw.check_bits(bits, "dequantize_f64")
    codes, s, b = _codes_and_affine(qw, bits)
    return codes * np.repeat(s, qw.group_size, axis=1) + np.repeat(b, qw.group_size, axis=1)


def quantize_activations(x: Any, group_size: int) -> np.ndarray:
    """x[..., K] as qmatmul sees it at act_bits=8: per group of `group_size` inputs,
    v = round(x / dx) with dx = max|x| / 127, returned as float32 v * dx. The float32
    operations are the kernels' own, so the int8 codes agree exactly."""
    _check_group_size(group_size, "quantize_activations")
    xf = A.to_numpy(x).astype(np.float32)
    k = xf.shape[-1]
    if k % group_size:
        raise ValueError(f"quantize_activations: K = {k} is not a multiple of group_size {group_size}")
    g = xf.reshape(xf.shape[:-1] + (k // group_size, group_size))
    amax = np.abs(g).max(axis=-1, keepdims=True)
    qmax = np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, qmax / amax, np.float32(0)).astype(np.float32)
    dx = (amax / qmax).astype(np.float32)
    return (np.rint(g * inv) * dx).astype(np.float32).reshape(xf.shape)


def qmatmul_f64(x: Any, qw: QWeight, bits: Optional[int] = None, act_bits: int = 16) -> np.ndarray:
    """The float64 reference of ops.qmatmul: x[..., K] @ W^T as numpy float64 (with x
    replaced by quantize_activations(x) at act_bits=8)."""
    check_act_bits(act_bits, "qmatmul_f64")
    xf = quantize_activations(x, qw.group_size) if act_bits == 8 else A.to_numpy(x)
    return xf.astype(np.float64) @ dequantize_f64(qw, bits).T
