"""Choosing INT4 or INT8 per layer from measured sensitivity (``bitswitch plan``).

1. Calibration: a few hundred tokens of text, cut into sequences, run as prefills with
   every weight in its INT8 view: the reference next-token distributions.
2. Sensitivity: for each unit (a decoder layer's seven projections, or the lm_head) alone
   dropped to INT4, the KL divergence of the final distributions from the reference, mean
   over the calibration tokens; the bytes a decode token saves by it. Optionally, for each
   layer alone switched to block-sparse attention, the same KL (which needs calibration
   sequences of several key blocks to mean anything).
3. Choice: the units to drop so that the weights a token reads fit a budget (bits per
   weight or bytes per token), at the least total sensitivity: greedily by KL per byte
   saved, or exactly as a 0/1 knapsack over the bytes saved (in 1/2000 steps of the
   model's weight bytes). Or, with a KL budget, the most bytes saved whose summed
   sensitivities stay under it. Summing per-unit KLs is an approximation; every chosen
   plan is therefore measured as a whole: its KL and top-1 agreement against INT8.
4. A plan file (JSON): the policy (bitswitch.precision) with the measurements behind it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from . import precision as P

__all__ = ["Unit", "PlanResult", "calibration_ids", "default_calibration_text", "measure_units", "choose",
           "plan_policy", "evaluate", "make_plan", "frontier", "write_plan", "plot_frontier"]

METHODS = ("greedy", "knapsack")
KNAPSACK_STEPS = 2000


def default_calibration_text() -> str:
    """Text every CPython install carries: the language reference topics behind help()."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # a few trimmed Python builds drop pydoc_data
        raise FileNotFoundError("plan: this Python has no pydoc_data to calibrate on; give --calibration FILE") from e
    return "\n\n".join(topics[k] for k in sorted(topics))


def calibration_ids(tokenizer, text: Optional[str] = None, tokens: int = 512, seq: int = 128,
                    offset: int = 0) -> torch.Tensor:
    """[n, seq] token ids: the first `tokens` tokens of `text` (after `offset` tokens) cut
    into n = tokens // seq sequences."""
    if tokens < seq or seq < 2:
        raise ValueError(f"plan: tokens ({tokens}) must be at least one sequence of seq ({seq}) >= 2 tokens")
    ids = tokenizer.encode(default_calibration_text() if text is None else text, add_special_tokens=False)
    n = tokens // seq
    if len(ids) < offset + n * seq:
        raise ValueError(f"plan: the calibration text has {len(ids)} tokens, {offset + n * seq} are needed; "
                         "give a longer text or fewer --tokens")
    return torch.tensor(ids[offset:offset + n * seq]).view(n, seq)


@torch.no_grad()
def log_probs(model, ids: torch.Tensor) -> torch.Tensor:
    """float32 log-softmax of the next-token logits at every position, [n * seq, vocab]."""
    out = []
    for row in ids:
        model.reset()
        out.append(torch.log_softmax(model(row[None]).float()[0], dim=-1))
    return torch.cat(out)


def kl_top1(ref: torch.Tensor, lp: torch.Tensor) -> tuple:
    """(mean KL(ref || lp) in nats, share of positions where the argmax agrees)."""
    kl = (ref.exp() * (ref - lp)).sum(-1).mean()
    return float(kl), float((ref.argmax(-1) == lp.argmax(-1)).float().mean())


@dataclass
class Unit:
    """What can drop to INT4 on its own: its policy key, the weight bytes a decode token
    saves by dropping it, and the measured sensitivities."""

    name: str
    key: str
    saved_bytes: int
    kl: float = 0.0
    top1: float = 1.0
    attention_kl: Optional[float] = None


def _bytes(model, a: P.Assignment) -> int:
    return P.report(model, a).bytes_per_token


GRANULARITIES = ("layer", "block")


def units_of(model, granularity: str = "layer") -> List[Unit]:
    """What may drop to INT4 alone: every decoder layer ("layer"), or its attention
    projections and its MLP projections separately ("block"); and the lm_head (a tied one is
    also the embedding table)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"plan: granularity must be one of {GRANULARITIES}, got {granularity!r}")
    base = P.resolve(model, {"*": {"bits": 8}})
    full8 = _bytes(model, base)

    def unit(name: str, key: str) -> Unit:
        return Unit(name, key, full8 - _bytes(model, P.resolve(model, {key: {"bits": 4}}, base=base)))

    out = []
    for i in range(len(model.layers)):
        key = P.layer_path(i)
        if granularity == "layer":
            out.append(unit(f"layer {i}", key))
        else:
            out += [unit(f"layer {i} attention", key + ".self_attn"), unit(f"layer {i} mlp", key + ".mlp")]
    out.append(unit("lm_head", P.LM_HEAD))
    return out


def measure_units(model, ids: torch.Tensor, attention: bool = False, granularity: str = "layer",
                  progress: Optional[Callable[[str], None]] = None) -> tuple:
    """(units with their sensitivities, the INT8 reference log-probs). Leaves the model in
    INT8 with dense attention."""
    base = {"*": {"bits": 8, "attention": "dense"}}
    model.set_precision(base)
    ref = log_probs(model, ids)
    units = units_of(model, granularity)
    for u in units:
        model.set_precision([("*", {"bits": 8, "attention": "dense"}), (u.key, {"bits": 4})])
        u.kl, u.top1 = kl_top1(ref, log_probs(model, ids))
        if progress:
            progress(f"{u.name}: INT4 KL {u.kl:.3g}, top-1 {u.top1:.3f}")
    if attention:
        for i in range(len(model.layers)):
            model.set_precision([("*", {"bits": 8, "attention": "dense"}), (i, {"attention": "sparse"})])
            akl = kl_top1(ref, log_probs(model, ids))[0]
            for u in units:
                if u.key in (P.layer_path(i), P.layer_path(i) + ".self_attn"):
                    u.attention_kl = akl
            if progress:
                progress(f"layer {i}: sparse attention KL {akl:.3g}")
    model.set_precision(base)
    return units, ref


def choose(units: Sequence[Unit], need_bytes: int = 0, max_kl: Optional[float] = None,
           method: str = "greedy") -> List[str]:
    """Names of the units to drop to INT4: saving at least need_bytes at the least summed
    KL, or (max_kl) the most bytes whose summed KL stays under max_kl."""
    if method not in METHODS:
        raise ValueError(f"plan: method must be one of {METHODS}, got {method!r}")
    order = sorted(units, key=lambda u: (u.kl / max(u.saved_bytes, 1), u.name))
    if max_kl is not None:
        if method == "greedy":
            chosen, total = [], 0.0
            for u in order:
                if total + u.kl <= max_kl:
                    chosen.append(u.name)
                    total += u.kl
            return chosen
        return _knapsack_max_bytes(units, max_kl)
    if need_bytes <= 0:
        return []
    if sum(u.saved_bytes for u in units) < need_bytes:
        raise ValueError("plan: the budget is below every weight in INT4")
    if method == "greedy":
        chosen, saved = [], 0
        for u in order:
            if saved >= need_bytes:
                break
            chosen.append(u.name)
            saved += u.saved_bytes
        return chosen
    return _knapsack_min_kl(units, need_bytes)


def _steps(units: Sequence[Unit]) -> tuple:
    """(bytes per step, each unit's saved bytes in steps). The greatest common divisor of
    the units' bytes when it keeps the table small (exact: layers' byte counts share large
    powers of two), else 1/KNAPSACK_STEPS of the total, rounded down (a cover in steps is
    then a cover in bytes, completed in _knapsack_min_kl if rounding left it short)."""
    total = sum(u.saved_bytes for u in units)
    step = math.gcd(*[u.saved_bytes for u in units]) if units else 1
    if step < 1 or total // step > 20 * KNAPSACK_STEPS:
        step = max(1, total // KNAPSACK_STEPS)
    return step, [u.saved_bytes // step for u in units]


def _knapsack_min_kl(units: Sequence[Unit], need_bytes: int) -> List[str]:
    """Least summed KL whose saved bytes reach need_bytes (0/1 knapsack, min-cost cover)."""
    step, w = _steps(units)
    need = min(math.ceil(need_bytes / step), sum(w))
    inf = float("inf")
    best = [0.0] + [inf] * need  # best[j]: least KL saving >= j steps
    pick: List[List[bool]] = []
    for u, wu in zip(units, w):
        took = [False] * (need + 1)
        for j in range(need, -1, -1):
            cand = best[max(0, j - wu)] + u.kl
            if cand < best[j]:
                best[j], took[j] = cand, True
        pick.append(took)
    if best[need] == inf:
        raise ValueError("plan: the budget is below every weight in INT4")
    chosen, j = [], need
    for u, wu, took in zip(reversed(units), reversed(w), reversed(pick)):
        if took[j]:
            chosen.append(u.name)
            j = max(0, j - wu)
    # Steps round each unit's bytes down; near the all-INT4 edge that can leave the cover a
    # few bytes short: complete it with the cheapest units per byte.
    saved = sum(u.saved_bytes for u in units if u.name in chosen)
    for u in sorted(units, key=lambda u: u.kl / max(u.saved_bytes, 1)):
        if saved >= need_bytes:
            break
        if u.name not in chosen:
            chosen.append(u.name)
            saved += u.saved_bytes
    return sorted(chosen, key=[u.name for u in units].index)


def _knapsack_max_bytes(units: Sequence[Unit], max_kl: float) -> List[str]:
    """Most bytes saved with summed KL <= max_kl (KL in 1/KNAPSACK_STEPS of max_kl)."""
    q = max_kl / KNAPSACK_STEPS if max_kl > 0 else 0.0
    cost = [math.ceil(u.kl / q) if q > 0 else (0 if u.kl == 0 else KNAPSACK_STEPS + 1) for u in units]
    cap = KNAPSACK_STEPS
    best = [0] * (cap + 1)
    pick = []
    for u, c in zip(units, cost):
        took = [False] * (cap + 1)
        for j in range(cap, c - 1, -1):
            if best[j - c] + u.saved_bytes > best[j]:
                best[j], took[j] = best[j - c] + u.saved_bytes, True
        pick.append(took)
    chosen, j = [], cap
    for u, c, took in zip(reversed(units), reversed(cost), reversed(pick)):
        if took[j]:
            chosen.append(u.name)
            j -= c
    return sorted(chosen, key=[u.name for u in units].index)


def plan_policy(units: Sequence[Unit], int4: Sequence[str], sparse_layers: Sequence[int] = ()) -> dict:
    """The policy of a plan: everything INT8 and dense, then the INT4 units and sparse layers."""
    pol: Dict[str, Any] = {"*": {"bits": 8, "attention": "dense"}}
    by_name = {u.name: u for u in units}
    for name in int4:
        pol[by_name[name].key] = {"bits": 4}
    for i in sparse_layers:
        key = f"{P.layer_path(i)}.self_attn"
        pol[key] = dict(pol.get(key, {}), attention="sparse")
    return pol


def evaluate(model, ids: torch.Tensor, ref: torch.Tensor, policy) -> dict:
    """A policy measured as a whole against the INT8 reference."""
    rep = model.set_precision(policy)
    kl, top1 = kl_top1(ref, log_probs(model, ids))
    return {"kl": kl, "top1": top1, "bits_per_weight": rep.bits_per_weight, "bytes_per_token": rep.bytes_per_token}


@dataclass
class PlanResult:
    budget: dict
    method: str
    int4: List[str]
    sparse_layers: List[int]
    policy: dict
    measured: dict
    predicted_kl: float
    units: List[Unit] = field(default_factory=list)


def _budget_bytes(model, bits_per_weight: Optional[float], bytes_per_token: Optional[int]) -> tuple:
    """(bytes a token may read, bytes with everything INT8, INT4) of the budget asked."""
    all8 = P.report(model, P.resolve(model, {"*": {"bits": 8}}))
    all4 = P.report(model, P.resolve(model, {"*": {"bits": 4}}))
    if bits_per_weight is not None:
        if not all4.bits_per_weight - 1e-9 <= bits_per_weight:
            raise ValueError(f"plan: --bits-per-weight {bits_per_weight} is below every weight in INT4 "
                             f"({all4.bits_per_weight:.3f} bits per weight on this model)")
        return int(bits_per_weight * all8.weights / 8), all8.bytes_per_token, all4.bytes_per_token
    if bytes_per_token is not None:
        if bytes_per_token < all4.bytes_per_token:
            raise ValueError(f"plan: --bytes-per-token {bytes_per_token} is below every weight in INT4 "
                             f"({all4.bytes_per_token} bytes per token on this model)")
        return int(bytes_per_token), all8.bytes_per_token, all4.bytes_per_token
    return all8.bytes_per_token, all8.bytes_per_token, all4.bytes_per_token


def make_plan(model, units: Sequence[Unit], ids: torch.Tensor, ref: torch.Tensor,
              bits_per_weight: Optional[float] = None, bytes_per_token: Optional[int] = None,
              max_kl: Optional[float] = None, method: str = "greedy",
              max_attention_kl: Optional[float] = None) -> PlanResult:
    """One plan for one budget (exactly one of bits_per_weight, bytes_per_token, max_kl),
    measured as a whole. With max_attention_kl, layers whose sparse-attention KL is at
    most that attend sparsely."""
    given = [x is not None for x in (bits_per_weight, bytes_per_token, max_kl)]
    if sum(given) != 1:
        raise ValueError("plan: give exactly one budget: bits_per_weight, bytes_per_token or max_kl")
    if max_kl is not None and (not math.isfinite(max_kl) or max_kl < 0):
        raise ValueError(f"plan: max_kl must be a finite number >= 0, got {max_kl}")
    allowed, all8, _ = _budget_bytes(model, bits_per_weight, bytes_per_token)
    int4 = choose(units, need_bytes=all8 - allowed, max_kl=max_kl, method=method)
    sparse = []
    if max_attention_kl is not None:
        sparse = sorted({int(u.key.split(".")[2]) for u in units if u.attention_kl is not None
                         and u.attention_kl <= max_attention_kl})
    policy = plan_policy(units, int4, sparse)
    measured = evaluate(model, ids, ref, policy)
    budget = {"bits_per_weight": bits_per_weight, "bytes_per_token": bytes_per_token, "max_kl": max_kl}
    predicted = sum(u.kl for u in units if u.name in int4)
    return PlanResult({k: v for k, v in budget.items() if v is not None}, method, int4, sparse, policy, measured,
                      predicted, list(units))


def frontier(model, units: Sequence[Unit], ids: torch.Tensor, ref: torch.Tensor, bits: Sequence[float],
             method: str = "greedy") -> List[dict]:
    """Plans at several bits-per-weight budgets, measured: the quality / bandwidth frontier."""
    rows = []
    for b in bits:
        r = make_plan(model, units, ids, ref, bits_per_weight=b, method=method)
        rows.append({"budget_bits_per_weight": b, "int4_units": len(r.int4), **r.measured,
                     "predicted_kl": r.predicted_kl})
    return rows


def write_plan(path, result: PlanResult, model_path: str, calibration: dict, frontier_rows=None) -> Path:
    data = {
        "format": P.PLAN_FORMAT, "version": 1, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model": model_path, "budget": result.budget, "method": result.method, "policy": result.policy,
        "measured": result.measured, "predicted_kl": result.predicted_kl, "int4": result.int4,
        "sparse_layers": result.sparse_layers, "calibration": calibration,
        "units": [asdict(u) for u in result.units],
    }
    if frontier_rows is not None:
        data["frontier"] = frontier_rows
    p = Path(path)
    p.write_text(json.dumps(data, indent=1))
    return p


def plot_frontier(rows: Sequence[dict], path, title: str = "") -> Path:
    """KL against INT8 over bits per weight, one point per plan (PNG; needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plan: --plot needs matplotlib (pip install matplotlib)") from None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    xs = [r["bits_per_weight"] for r in rows]
    ax.plot(xs, [r["kl"] for r in rows], "o-", label="measured KL vs INT8")
    ax.plot(xs, [r["predicted_kl"] for r in rows], "x--", alpha=0.6, label="sum of per-unit KL")
    for r in rows:
        ax.annotate(f"{r['top1'] * 100:.0f}%", (r["bits_per_weight"], r["kl"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
    ax.set_xlabel("bits per weight read per token (scales included)")
    ax.set_ylabel("KL divergence from INT8 (nats/token)")
    ax.set_title(title or "bitswitch plan: quality / bandwidth frontier (labels: top-1 agreement)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p)
    plt.close(fig)
    return p
