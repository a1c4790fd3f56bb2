"""Block masks for bitswitch attention: the BSR format, builders, runtime selection, decode.

A BlockMask selects, for every (batch, kv head) and every query block of ``block_q`` rows,
the key blocks of ``block_k`` keys that query block reads, in BSR form:

    indptr   int32 [B, Hkv, n_query_blocks + 1]   row offsets into indices
    indices  int32 [B, Hkv, capacity]             sorted key-block numbers

Query blocks count the rows of the call (row i is at absolute position q_offset + i);
key blocks count the keys of k. Causality is applied by the kernel on top of the mask, so
a mask may list blocks past the diagonal (they cost nothing). All query heads sharing a kv
head (GQA) share its mask row.

Plan once, run many times: build the mask once per forward with :func:`plan` and pass it
to every layer's :func:`bitswitch.ops.attention`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import numpy as np

from . import _arrays as A

BLOCK_SIZES = (32, 64, 128)
HEAD_DIMS = (64, 128)


def _check_block(name: str, v: int) -> None:
    if v not in BLOCK_SIZES:
        raise ValueError(f"{name} must be one of {BLOCK_SIZES}, got {v!r}")


@dataclasses.dataclass
class BlockMask:
    """Key blocks selected per (batch, kv head, query block); see the module docstring."""

    indptr: np.ndarray
    indices: np.ndarray
    block_q: int = 64
    block_k: int = 64
    lq: int = 0
    lk: int = 0
    q_offset: int = 0  # absolute position of query row 0 the mask was built for (density())

    def __post_init__(self) -> None:
        _check_block("block_q", self.block_q)
        _check_block("block_k", self.block_k)
        self.indptr = np.ascontiguousarray(self.indptr, dtype=np.int32)
        self.indices = np.ascontiguousarray(self.indices, dtype=np.int32)
        if self.indptr.ndim != 3 or self.indices.ndim != 3 or self.indptr.shape[:2] != self.indices.shape[:2]:
            raise ValueError(f"BlockMask: indptr must be [B, Hkv, n_query_blocks + 1] and indices [B, Hkv, n] "
                             f"with the same B, Hkv; got {self.indptr.shape} and {self.indices.shape}")

    @property
    def n_query_blocks(self) -> int:
        return self.indptr.shape[2] - 1

    @property
    def n_key_blocks(self) -> int:
        return -(-self.lk // self.block_k)

    def nnz(self) -> np.ndarray:
        """Selected blocks per (batch, kv head)."""
        return self.indptr[:, :, -1].astype(np.int64)

    def density(self, causal: bool = True, q_offset: Optional[int] = None) -> float:
        """Selected blocks over the blocks a dense (causal) attention would read; q_offset
        defaults to the one the mask was built for."""
        q_offset = self.q_offset if q_offset is None else q_offset
        full = causal_mask(self.indptr.shape[0], self.indptr.shape[1], self.lq, self.lk, self.block_q,
                           self.block_k, q_offset) if causal else None
        total = full.nnz().sum() if full is not None else self.n_query_blocks * self.n_key_blocks * self.nnz().size
        return float(self.nnz().sum()) / max(1, int(total))

    def torch_tensors(self, device=None) -> tuple:
        """(indptr, indices) as torch int32 tensors: sharing this mask's memory on the CPU,
        copied once per device elsewhere (the copy is kept: every layer reuses the mask)."""
        import torch
        if device is None or torch.device(device).type == "cpu":
            return torch.from_numpy(self.indptr), torch.from_numpy(self.indices)
        device = torch.device(device)
        cache = self.__dict__.setdefault("_device_tensors", {})
        if device not in cache:
            cache[device] = (torch.from_numpy(self.indptr).to(device), torch.from_numpy(self.indices).to(device))
        return cache[device]

    def to_dense(self) -> np.ndarray:
        """bool [B, Hkv, lq, lk]: True where the mask lets a query row see a key (before causality)."""
        b, h, _ = self.indptr.shape
        out = np.zeros((b, h, self.n_query_blocks, self.n_key_blocks), dtype=bool)
        for bi in range(b):
            for hi in range(h):
                for qb in range(self.n_query_blocks):
                    sel = self.indices[bi, hi, self.indptr[bi, hi, qb]:self.indptr[bi, hi, qb + 1]]
                    out[bi, hi, qb, sel] = True
        out = np.repeat(np.repeat(out, self.block_q, axis=2), self.block_k, axis=3)
        return out[:, :, :self.lq, :self.lk]

    @classmethod
    def from_block_table(cls, table: np.ndarray, block_q: int, block_k: int, lq: int, lk: int,
                         q_offset: int = 0) -> "BlockMask":
        """A mask from a boolean table [B, Hkv, n_query_blocks, n_key_blocks]."""
        table = np.asarray(table, dtype=bool)
        if table.ndim != 4:
            raise ValueError(f"BlockMask.from_block_table: table must be 4-D, got shape {table.shape}")
        b, h, nqb, nkb = table.shape
        if nqb != -(-lq // block_q) or nkb != -(-lk // block_k):
            raise ValueError(f"BlockMask.from_block_table: table shape {table.shape} does not match lq={lq}, "
                             f"lk={lk} in blocks of {block_q} x {block_k}")
        counts = table.sum(axis=3)
        indptr = np.zeros((b, h, nqb + 1), dtype=np.int32)
        np.cumsum(counts, axis=2, out=indptr[:, :, 1:])
        cap = max(1, int(indptr[:, :, -1].max()) if indptr.size else 1)
        indices = np.zeros((b, h, cap), dtype=np.int32)
        bi, hi, _, kb = np.nonzero(table)  # C order: sorted by (b, h, query block, key block)
        row = bi * h + hi
        pos = np.arange(row.size) - np.searchsorted(row, row, side="left")
        indices[bi, hi, pos] = kb
        return cls(indptr, indices, block_q, block_k, lq, lk, q_offset)


# -- static masks ---------------------------------------------------------------------------
def _diagonal(lq: int, block_q: int, block_k: int, q_offset: int, n_key_blocks: int):
    """First and last key block touched by each query block's absolute positions."""
    nqb = -(-lq // block_q)
    first_row = np.arange(nqb) * block_q
    last_row = np.minimum(first_row + block_q, lq) - 1
    lo = np.minimum((first_row + q_offset) // block_k, n_key_blocks - 1)
    hi = np.minimum((last_row + q_offset) // block_k, n_key_blocks - 1)
    return lo, hi


def dense_mask(b: int, hkv: int, lq: int, lk: int, block_q: int = 64, block_k: int = 64) -> BlockMask:
    """Every key block for every query block (the same as passing no mask)."""
    nqb, nkb = -(-lq // block_q), -(-lk // block_k)
    return BlockMask.from_block_table(np.ones((b, hkv, nqb, nkb), bool), block_q, block_k, lq, lk)


def causal_mask(b: int, hkv: int, lq: int, lk: int, block_q: int = 64, block_k: int = 64,
                q_offset: int = 0) -> BlockMask:
    """The key blocks at or before each query block's last position."""
    nqb, nkb = -(-lq // block_q), -(-lk // block_k)
    _, hi = _diagonal(lq, block_q, block_k, q_offset, nkb)
    table = np.arange(nkb)[None, :] <= hi[:, None]
    return BlockMask.from_block_table(np.broadcast_to(table, (b, hkv, nqb, nkb)), block_q, block_k, lq, lk,
                                      q_offset)


def streaming_mask(b: int, hkv: int, lq: int, lk: int, sinks: int = 1, window: int = 4, block_q: int = 64,
                   block_k: int = 64, q_offset: int = 0) -> BlockMask:
    """StreamingLLM: the first `sinks` key blocks plus a local window: the `window` blocks
    before a query block's first diagonal block, through its last (the middle of a long
    context is not visible)."""
    if sinks < 0 or window < 1:
        raise ValueError(f"streaming_mask: sinks must be >= 0 and window >= 1, got {sinks}, {window}")
    nqb, nkb = -(-lq // block_q), -(-lk // block_k)
    lo, hi = _diagonal(lq, block_q, block_k, q_offset, nkb)
    kb = np.arange(nkb)[None, :]
    table = ((kb < sinks) | (kb > lo[:, None] - window)) & (kb <= hi[:, None])
    return BlockMask.from_block_table(np.broadcast_to(table, (b, hkv, nqb, nkb)), block_q, block_k, lq, lk,
                                      q_offset)


# -- runtime selection (prefill) ------------------------------------------------------------
def _pool(x: np.ndarray, block: int) -> np.ndarray:
    """Mean over blocks of `block` rows along axis -2 (the last block may be shorter)."""
    length = x.shape[-2]
    nb = -(-length // block)
    pad = nb * block - length
    if pad:
        x = np.concatenate([x, np.zeros(x.shape[:-2] + (pad, x.shape[-1]), x.dtype)], axis=-2)
    sums = x.reshape(x.shape[:-2] + (nb, block, x.shape[-1])).sum(axis=-2)
    counts = np.full(nb, block, dtype=np.float32)
    counts[-1] = block - pad
    return sums / counts[:, None]


def select_blocks(q: Any, k: Any, tau: float = 0.9, block_q: int = 64, block_k: int = 64, sinks: int = 1,
                  q_offset: int = 0, causal: bool = True, scale: Optional[float] = None,
                  density: Optional[float] = None) -> BlockMask:
    """Runtime block selection from block-pooled scores (XAttention / FlexPrefill style).

    q and k are mean-pooled per block; the pooled scores of each query block (averaged over
    the query heads sharing a kv head) go through a softmax over the visible key blocks, and
    the smallest set of key blocks holding at least `tau` of that mass is kept, plus the
    first `sinks` blocks and the diagonal blocks, which are always kept. With `density`
    instead, each query block keeps its best-scoring ceil(density * visible) blocks (a fixed
    budget; forced blocks count towards it).
    """
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"select_blocks: tau must be in (0, 1], got {tau}")
    if density is not None and not 0.0 < density <= 1.0:
        raise ValueError(f"select_blocks: density must be in (0, 1], got {density}")
    _check_block("block_q", block_q)
    _check_block("block_k", block_k)
    qn, kn = A.to_numpy(q).astype(np.float32), A.to_numpy(k).astype(np.float32)
    if qn.ndim != 4 or kn.ndim != 4 or qn.shape[0] != kn.shape[0] or qn.shape[3] != kn.shape[3] \
            or qn.shape[1] % kn.shape[1]:
        raise ValueError(f"select_blocks: q must be [B, Hq, Lq, D] and k [B, Hkv, Lk, D] with Hq a multiple "
                         f"of Hkv, got {qn.shape} and {kn.shape}")
    b, hq, lq, d = qn.shape
    hkv, lk = kn.shape[1], kn.shape[2]
    scale = d ** -0.5 if scale is None else scale
    pq = _pool(qn, block_q).reshape(b, hkv, hq // hkv, -1, d).mean(axis=2)  # [B, Hkv, nqb, D]
    pk = _pool(kn, block_k)                                                   # [B, Hkv, nkb, D]
    scores = np.einsum("bhqd,bhkd->bhqk", pq, pk) * scale
    nqb, nkb = scores.shape[2], scores.shape[3]
    lo, hi = _diagonal(lq, block_q, block_k, q_offset, nkb)
    kb = np.arange(nkb)[None, :]
    visible = kb <= hi[:, None] if causal else np.ones((nqb, nkb), bool)
    scores = np.where(visible, scores, -np.inf)
    scores -= scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    forced = (kb < sinks) | ((kb >= lo[:, None]) & (kb <= hi[:, None]))
    if density is not None:
        p = np.where(forced & visible, np.inf, p)  # forced blocks rank first
    order = np.argsort(-p, axis=-1, kind="stable")
    if density is None:
        ps = np.take_along_axis(p, order, axis=-1)
        before = np.cumsum(ps, axis=-1) - ps      # mass of the blocks ranked above
        keep_sorted = before < tau                # the minimal prefix that reaches tau
    else:
        budget = np.ceil(density * visible.sum(axis=-1))[:, None]   # per query block
        keep_sorted = np.broadcast_to(np.arange(nkb) < budget, order.shape)
    keep = np.zeros(order.shape, bool)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    keep = (keep | forced) & visible
    return BlockMask.from_block_table(keep, block_q, block_k, lq, lk, q_offset)


# -- decode: per-block key summaries and page selection (Quest) ------------------------------
class KeyBlockSummary:
    """Per key block and channel minimum and maximum of the keys of a KV cache, kept up to
    date as keys are appended; the input of :func:`select_pages`."""

    DEFAULT_BLOCK_K = 64  # keys per page

    def __init__(self, batch: int, kv_heads: int, capacity: int, head_dim: int, block_k: int = DEFAULT_BLOCK_K):
        _check_block("block_k", block_k)
        self.block_k = block_k
        nkb = -(-capacity // block_k)
        self.kmin = np.full((batch, kv_heads, nkb, head_dim), np.inf, np.float32)
        self.kmax = np.full((batch, kv_heads, nkb, head_dim), -np.inf, np.float32)
        # The bound max(q kmin, q kmax) = q center + |q| radius, summed over channels, is two
        # matrix products over these (kept up to date for the blocks append touches).
        self.center = np.zeros((batch, kv_heads, nkb, head_dim), np.float32)
        self.radius = np.zeros((batch, kv_heads, nkb, head_dim), np.float32)
        self.length = 0

    @classmethod
    def from_keys(cls, k: Any, block_k: int = 64, capacity: Optional[int] = None) -> "KeyBlockSummary":
        kn = A.to_numpy(k)
        s = cls(kn.shape[0], kn.shape[1], capacity or kn.shape[2], kn.shape[3], block_k)
        s.append(kn)
        return s

    def append(self, k_new: Any) -> None:
        """Adds keys [B, Hkv, L, D] at positions length .. length + L."""
        kn = A.to_numpy(k_new).astype(np.float32)
        n = kn.shape[2]
        if kn.shape[:2] != self.kmin.shape[:2] or kn.shape[3] != self.kmin.shape[3]:
            raise ValueError(f"KeyBlockSummary.append: keys must be [B, Hkv, L, D] = "
                             f"[{self.kmin.shape[0]}, {self.kmin.shape[1]}, L, {self.kmin.shape[3]}], got {kn.shape}")
        if self.length + n > self.kmin.shape[2] * self.block_k:
            raise ValueError("KeyBlockSummary.append: the cache capacity is exceeded")
        pos = self.length
        while pos < self.length + n:
            blk = pos // self.block_k
            end = min((blk + 1) * self.block_k, self.length + n)
            chunk = kn[:, :, pos - self.length:end - self.length]
            np.minimum(self.kmin[:, :, blk], chunk.min(axis=2), out=self.kmin[:, :, blk])
            np.maximum(self.kmax[:, :, blk], chunk.max(axis=2), out=self.kmax[:, :, blk])
            self.center[:, :, blk] = 0.5 * (self.kmax[:, :, blk] + self.kmin[:, :, blk])
            self.radius[:, :, blk] = 0.5 * (self.kmax[:, :, blk] - self.kmin[:, :, blk])
            pos = end
        self.length += n


def select_pages(q: Any, summary: KeyBlockSummary, budget: Optional[int] = None, density: Optional[float] = None,
                 sinks: int = 1, block_q: int = 64) -> BlockMask:
    """Quest-style page selection for decode: q [B, Hq, Lq, D] (Lq small, usually 1)
    against the cache's block summaries. A block's score is the upper bound
    sum_d max(q_d min_d, q_d max_d) of q . k over its keys (max over query rows and over
    the heads sharing a kv head); the `budget` best blocks (or `density` of them) are kept,
    plus the first `sinks` blocks and the last block, always."""
    qn = A.to_numpy(q).astype(np.float32)
    b, hq, lq, d = qn.shape
    hkv = summary.kmin.shape[1]
    if hq % hkv or d != summary.kmin.shape[3] or b != summary.kmin.shape[0]:
        raise ValueError(f"select_pages: q {qn.shape} does not match the summary's [B, Hkv, ., D] = "
                         f"{summary.kmin.shape}")
    nkb = -(-summary.length // summary.block_k)
    if nkb == 0:
        raise ValueError("select_pages: the cache is empty")
    if budget is None:
        if density is None:
            raise ValueError("select_pages: give a budget (blocks) or a density")
        budget = math.ceil(density * nkb)
    budget = max(1, min(int(budget), nkb))
    qg = qn.reshape(b, hkv, hq // hkv * lq, d)
    bound = qg @ summary.center[:, :, :nkb].transpose(0, 1, 3, 2) \
        + np.abs(qg) @ summary.radius[:, :, :nkb].transpose(0, 1, 3, 2)   # [B, Hkv, rows, nkb]
    score = bound.max(axis=2)
    kb = np.arange(nkb)
    forced = (kb < sinks) | (kb == nkb - 1)
    score = np.where(forced, np.inf, score)
    n = max(budget, int(forced.sum()))
    top = np.argpartition(-score, n - 1, axis=-1)[:, :, :n] if n < nkb else np.broadcast_to(kb, score.shape)
    keep = np.zeros((b, hkv, nkb), bool)
    np.put_along_axis(keep, top, True, axis=-1)
    nqb = -(-lq // block_q)
    table = np.broadcast_to(keep[:, :, None, :], (b, hkv, nqb, nkb))
    return BlockMask.from_block_table(table, block_q, summary.block_k, lq, summary.length, summary.length - lq)


# -- plan -------------------------------------------------------------------------------------
PLAN_METHODS = ("dense", "causal", "streaming", "select")


def plan(q: Any, k: Any, method: str = "causal", block_q: int = 64, block_k: int = 64, q_offset: int = 0,
         **options: Any) -> Optional[BlockMask]:
    """Builds the mask of one forward pass, to be reused by every layer.

    method "dense" returns None (attention reads every key), "causal" the causal block
    mask, "streaming" a sink + window mask (options sinks, window) and "select" the runtime
    selection of select_blocks (options tau, sinks, scale), computed from this q and k.
    """
    if method not in PLAN_METHODS:
        raise ValueError(f"plan: method must be one of {PLAN_METHODS}, got {method!r}")
    if method == "dense":
        return None
    b, hkv, lk = int(k.shape[0]), int(k.shape[1]), int(k.shape[2])
    lq = int(q.shape[2])
    if method == "causal":
        return causal_mask(b, hkv, lq, lk, block_q, block_k, q_offset)
    if method == "streaming":
        return streaming_mask(b, hkv, lq, lk, block_q=block_q, block_k=block_k, q_offset=q_offset, **options)
    return select_blocks(q, k, block_q=block_q, block_k=block_k, q_offset=q_offset, **options)


def expand(mask: Optional[BlockMask], b: int, hkv: int, lq: int, lk: int, causal: bool, q_offset: int = 0) -> np.ndarray:
    """bool [B, Hkv, lq, lk]: which keys each query row sees (mask and causality); the
    reference semantics of attention, used by the tests."""
    vis = np.ones((b, hkv, lq, lk), bool) if mask is None else mask.to_dense()
    if causal:
        vis = vis & (np.arange(lk)[None, :] <= (np.arange(lq) + q_offset)[:, None])
    return vis


def attention_reference(q: Any, k: Any, v: Any, mask: Optional[BlockMask] = None, causal: bool = True, *,
                        scale: Optional[float] = None, q_offset: int = 0) -> tuple:
    """float64 dense attention with the block mask expanded: (out [B, Hq, Lq, D], lse [B, Hq, Lq]).
    Rows that see no key give 0 and -inf."""
    qn, kn, vn = (A.to_numpy(t).astype(np.float64) for t in (q, k, v))
    b, hq, lq, d = qn.shape
    hkv, lk = kn.shape[1], kn.shape[2]
    scale = d ** -0.5 if scale is None else scale
    vis = np.repeat(expand(mask, b, hkv, lq, lk, causal, q_offset), hq // hkv, axis=1)
    kr, vr = np.repeat(kn, hq // hkv, axis=1), np.repeat(vn, hq // hkv, axis=1)
    s = np.einsum("bhqd,bhkd->bhqk", qn, kr) * scale
    s = np.where(vis, s, -np.inf)
    mx = s.max(axis=-1, keepdims=True)
    any_key = np.isfinite(mx)
    p = np.where(vis, np.exp(s - np.where(any_key, mx, 0)), 0.0)
    l = p.sum(axis=-1, keepdims=True)
    out = np.einsum("bhqk,bhkd->bhqd", p, vr) / np.where(l > 0, l, 1)
    lse = np.where(any_key[..., 0], (mx + np.log(np.where(l > 0, l, 1)))[..., 0], -np.inf)
    return out, lse
