"""The oracle of select_pages_at (decode page selection with the position in memory), shared by
tests/test_select_pages_at.py (CPU kernel, torch op, model) and tests/cuda/ (the CUDA kernel
under the emulation): the contract of csrc/cpu/kernels.h PageSelectArgs in numpy, scores in
float64, and a check that accepts any top-n that float32 rounding could produce."""

from __future__ import annotations

import numpy as np


def fold(k: np.ndarray, kmin: np.ndarray, kmax: np.ndarray, positions, block_k: int) -> tuple:
    """kmin, kmax after key positions[b] is folded into its block (copies)."""
    kmin, kmax = kmin.copy(), kmax.copy()
    kf = np.asarray(k, np.float32)
    for b, pos in enumerate(np.asarray(positions)):
        blk = int(pos) // block_k
        key = kf[b, :, int(pos)]
        if pos % block_k == 0:
            kmin[b, :, blk], kmax[b, :, blk] = key, key
        else:
            kmin[b, :, blk] = np.minimum(kmin[b, :, blk], key)
            kmax[b, :, blk] = np.maximum(kmax[b, :, blk], key)
    return kmin, kmax


def summaries(k: np.ndarray, length: int, block_k: int, capacity_blocks: int) -> tuple:
    """kmin, kmax [B, Hkv, capacity_blocks, D] float32 over keys [0, length) (blocks past them +-inf)."""
    b, h, _, d = k.shape
    kmin = np.full((b, h, capacity_blocks, d), np.inf, np.float32)
    kmax = np.full((b, h, capacity_blocks, d), -np.inf, np.float32)
    kf = np.asarray(k, np.float32)
    for blk in range(-(-length // block_k)):
        part = kf[:, :, blk * block_k:min((blk + 1) * block_k, length)]
        kmin[:, :, blk], kmax[:, :, blk] = part.min(axis=2), part.max(axis=2)
    return kmin, kmax


def scores(q: np.ndarray, kmin: np.ndarray, kmax: np.ndarray, positions, sinks: int, block_k: int) -> np.ndarray:
    """float64 [B, Hkv, nkb]: the bound of every block (+inf forced, -inf after the position)."""
    qf = np.asarray(q, np.float64)
    b, hq, _, d = qf.shape
    hkv, nkb = kmin.shape[1], kmin.shape[2]
    known = np.isfinite(kmin) & np.isfinite(kmax)  # blocks past the position are never read
    lo, hi = np.where(known, kmin, 0).astype(np.float64), np.where(known, kmax, 0).astype(np.float64)
    c, r = 0.5 * (hi + lo), 0.5 * (hi - lo)
    qg = qf.reshape(b, hkv, hq // hkv, d)
    bound = qg @ c.transpose(0, 1, 3, 2) + np.abs(qg) @ r.transpose(0, 1, 3, 2)
    s = bound.max(axis=2)
    kb = np.arange(nkb)
    for bi, pos in enumerate(np.asarray(positions)):
        last = int(pos) // block_k
        s[bi, :, kb > last] = -np.inf
        s[bi, :, (kb < sinks) & (kb <= last)] = np.inf
        s[bi, :, last] = np.inf
    return s


def select(score: np.ndarray, n: int) -> np.ndarray:
    """int32 [B, Hkv, n]: the n best blocks of each row (ties to the lower block), increasing."""
    order = np.argsort(-score, axis=-1, kind="stable")[..., :n]
    return np.sort(order, axis=-1).astype(np.int32)


def check(indices: np.ndarray, score: np.ndarray, n: int, rel_tol: float = 1e-5, what: str = "") -> None:
    """indices is a valid top-n of score up to float32 rounding: n distinct increasing blocks,
    every block it leaves out scores at most (within tol) the lowest one it keeps, forced
    blocks (+inf) all kept, blocks after the position (-inf) only as the lowest-numbered fill.
    Where the n-th and (n+1)-th scores are clearly apart, indices equals the exact top-n."""
    b, h, nkb = score.shape
    assert indices.shape == (b, h, n), f"{what}: shape {indices.shape}"
    finite = score[np.isfinite(score)]
    tol = rel_tol * (np.abs(finite).max() if finite.size else 1.0) + 1e-30
    exact = select(score, n)
    for bi in range(b):
        for hi in range(h):
            row, s = indices[bi, hi], score[bi, hi]
            where = f"{what} (batch {bi}, kv head {hi}): {row.tolist()} vs exact {exact[bi, hi].tolist()}"
            assert np.all((row >= 0) & (row < nkb)) and np.all(np.diff(row) > 0), where
            kept = np.zeros(nkb, bool)
            kept[row] = True
            assert kept[s == np.inf].all() or kept.sum() == n and (s[kept] == np.inf).all(), where
            lo = s[kept].min()
            hi_out = s[~kept].max(initial=-np.inf)
            assert hi_out <= lo + tol or (hi_out == -np.inf), where
            if np.isneginf(lo):  # fill after the position: every finite block kept, lowest numbers first
                assert kept[s > -np.inf].all(), where
                fill = np.flatnonzero(kept & np.isneginf(s))
                assert np.array_equal(fill, np.flatnonzero(np.isneginf(s))[:fill.size]), where
            ss = np.sort(s)[::-1]
            if n < nkb and np.isfinite(ss[n - 1]) and ss[n - 1] - ss[n] > 4 * tol:
                assert np.array_equal(row, exact[bi, hi]), where
