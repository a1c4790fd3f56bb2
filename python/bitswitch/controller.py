"""precision="auto": hold a decode speed by moving layers between INT8 and INT4.

The controller watches the time of every decode step. Every `window` tokens it compares
the median speed with the target:

- too slow: the next unit in sensitivity order (least sensitive first) drops to INT4;
- faster than the target with room to spare: the last unit dropped goes back to INT8, but
  only if the speed predicted after the move (decode time taken as proportional to the
  weight bytes a token reads) still clears the target by the hysteresis margin, so a
  setting that just meets the target is not undone one window later.

After a change it waits `cooldown` tokens before measuring again (the first tokens after a
switch pay for cold caches). Every change is logged. The order comes from a plan file
written by ``bitswitch plan`` (its measured per-unit sensitivities), from measured units,
or, without either, middle layers first: the first and last layers of transformers are
usually the most sensitive to quantization, and the lm_head last of all.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Callable, List, Optional

from . import precision as P
from ._json import read_json_object

__all__ = ["AutoPrecision", "default_order"]


def default_order(n_layers: int) -> List[str]:
    """Policy keys from the least to the most sensitive, without measurements: layers by
    distance from the nearer end of the stack (middle first), then the lm_head."""
    layers = sorted(range(n_layers), key=lambda i: (-min(i, n_layers - 1 - i), i))
    return [P.layer_path(i) for i in layers] + [P.LM_HEAD]


def _order_from(sensitivity) -> List[str]:
    if isinstance(sensitivity, (str, Path)):
        units = read_json_object(sensitivity, "AutoPrecision: plan file").get("units")
        if not units:
            raise ValueError(f"AutoPrecision: {sensitivity} holds no measured units (write it with `bitswitch plan`)")
        sensitivity = units
    units = [u if isinstance(u, dict) else vars(u) for u in sensitivity]
    return [u["key"] for u in sorted(units, key=lambda u: u["kl"] / max(u["saved_bytes"], 1))]


class AutoPrecision:
    """Moves units between INT8 and INT4 to hold `target_tps` decode tokens per second (or
    `target_latency` seconds per token). `sensitivity`: a plan file or the units of
    bitswitch.planner.measure_units (default: default_order). `changes` records
    (token index, units in INT4, tokens/s measured) of every move."""

    def __init__(self, model, target_tps: Optional[float] = None, target_latency: Optional[float] = None,
                 sensitivity=None, window: int = 8, cooldown: int = 4, hysteresis: float = 0.1,
                 log: Optional[Callable[[str], None]] = None):
        if (target_tps is None) == (target_latency is None):
            raise ValueError("AutoPrecision: give one of target_tps and target_latency")
        target = target_tps if target_tps is not None else 1.0 / target_latency if target_latency else 0.0
        if not target > 0:
            raise ValueError(f"AutoPrecision: the target must be positive, got {target_tps or target_latency!r}")
        for name, v in (("window", window), ("cooldown", cooldown)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"AutoPrecision: {name} must be an integer >= 1, got {v!r}")
        if not 0 <= hysteresis < 1:
            raise ValueError(f"AutoPrecision: hysteresis must be in [0, 1), got {hysteresis!r}")
        self.model = model
        self.target = float(target)
        self.order = _order_from(sensitivity) if sensitivity is not None else default_order(len(model.layers))
        self.window, self.cooldown, self.hysteresis = window, cooldown, hysteresis
        self.log = log or (lambda msg: None)
        self.k = 0  # units of `order` in INT4
        self.tokens = 0
        self._wait = cooldown
        self._times: List[float] = []
        self.changes: List[tuple] = []
        self._bytes = [self._bytes_at(k) for k in range(len(self.order) + 1)]
        self.model.set_precision(self._policy(0))

    def _policy(self, k: int) -> list:
        return [("*", {"bits": 8})] + [(key, {"bits": 4}) for key in self.order[:k]]

    def _bytes_at(self, k: int) -> int:
        return P.report(self.model, P.resolve(self.model, self._policy(k))).bytes_per_token

    def observe(self, seconds: float) -> None:
        """The duration of one decode step; may switch the model's precision (between tokens)."""
        self.tokens += 1
        if self._wait > 0:
            self._wait -= 1
            return
        self._times.append(seconds)
        if len(self._times) < self.window:
            return
        tps = 1.0 / statistics.median(self._times)
        self._times.clear()
        k = self.k
        if tps < self.target and k < len(self.order):
            k += 1
        elif k > 0:
            predicted = tps * self._bytes[k] / self._bytes[k - 1]
            if predicted >= self.target * (1 + self.hysteresis):
                k -= 1
        if k == self.k:
            return
        dropped = k > self.k
        unit = self.order[max(k, self.k) - 1]
        self.model.set_precision(self._policy(k))
        self.k = k
        self._wait = self.cooldown
        bpw = 8.0 * self._bytes[k] / max(1, P.report(self.model).weights)
        self.changes.append((self.tokens, k, tps))
        self.log(f"auto: {tps:.1f} tok/s against a target of {self.target:.1f}: {unit} -> INT{4 if dropped else 8} "
                 f"({k} of {len(self.order)} units in INT4, {bpw:.2f} bits per weight)")
