"""Aggregation a few clients cannot steer: capped weights, clipped norms, and
coordinate-wise robust statistics over decoded updates.

FedAvg weighs each update by the number of examples its client claims, so one
client that claims 2**63 examples is the whole mean, and one update of norm
1e30 swamps all others. A server that cannot trust its clients bounds both:

- ``cap_shares``: no client holds more than a fraction of the round's
  total weight (the excess is cut, the others keep their proportions);
- ``clip_factor``: each update is scaled down to a maximum L2 norm over
  all its tensors (as in DP-FedAvg, McMahan et al. 2018);
- ``AggregationRule`` ``median`` / ``trimmed:F``: the coordinate-wise
  median, or the mean after dropping the F largest and F smallest values of
  each coordinate (Yin et al. 2018), which tolerate a minority of arbitrary
  updates but need every decoded update of the round in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

__all__ = ["AggregationRule", "cap_shares", "clip_factor", "update_norm", "robust_combine"]


@dataclass(frozen=True)
class AggregationRule:
    """``mean`` (weighted FedAvg, streamed), ``median`` or ``trimmed:F`` (0 <= F < 0.5,
    the fraction cut at each end of every coordinate; both unweighted)."""

    kind: str = "mean"
    trim: float = 0.0

    @classmethod
    def parse(cls, text: str) -> AggregationRule:
        text = str(text).strip()
        if text in ("mean", "median"):
            return cls(text)
        if text.startswith("trimmed:"):
            try:
                trim = float(text.split(":", 1)[1])
            except ValueError:
                trim = math.nan
            if not 0.0 <= trim < 0.5:
                raise ValueError(f"trimmed:F needs 0 <= F < 0.5 (the fraction cut at each end), got {text!r}")
            return cls("trimmed", trim)
        raise ValueError(f"unknown aggregation {text!r}: use mean, median or trimmed:F (e.g. trimmed:0.1)")

    @property
    def holds_updates(self) -> bool:
        """Whether the rule needs every decoded update of the round at once."""
        return self.kind != "mean"

    def __str__(self) -> str:
        return f"trimmed:{self.trim:g}" if self.kind == "trimmed" else self.kind


def cap_shares(weights: Sequence[float], max_share: float) -> list[float]:
    """The weights with none above ``max_share`` of their total: every weight is
    cut to a common ceiling t, the largest with t = max_share * sum(min(w, t)).
    With at most 1 / max_share positive weights no ceiling can satisfy it, and the
    positive weights all become the smallest of them (equal: the closest to it)."""
    if not 0.0 < max_share <= 1.0:
        raise ValueError(f"max_share must be in (0, 1], got {max_share!r}")
    w = [float(x) for x in weights]
    if any(not math.isfinite(x) or x < 0 for x in w):
        raise ValueError("weights must be finite and >= 0")
    positive = sorted((x for x in w if x > 0), reverse=True)
    if not positive or max_share * len(positive) <= 1.0:
        return [positive[-1] if x > 0 else 0.0 for x in w]
    # Cut the k largest to t: t = s * (k t + rest) -> t = s * rest / (1 - s k); the right k
    # is the first whose ceiling does not exceed the next weight down.
    # tails[k] = sum(positive[k:]), summed from the small end: subtracting a huge
    # weight from a running total would lose the small ones.
    tails = [0.0] * (len(positive) + 1)
    for k in range(len(positive) - 1, -1, -1):
        tails[k] = tails[k + 1] + positive[k]
    ceiling = math.inf
    for k, x in enumerate(positive):
        rest = tails[k]
        room = 1.0 - max_share * k
        if room <= 0:  # cannot happen when max_share * n > 1; kept so the loop never divides by 0
            return [positive[-1] if x > 0 else 0.0 for x in w]
        if x <= max_share * rest / room:
            ceiling = max_share * rest / room if k else math.inf
            break
    return [min(x, ceiling) for x in w]


def update_norm(update: Mapping[str, np.ndarray]) -> float:
    """L2 norm over all tensors of an update (float64 sums; inf when not finite)."""
    total = 0.0
    for value in update.values():
        v = np.asarray(value, dtype=np.float64).ravel()
        total += float(np.dot(v, v))
    return math.sqrt(total) if math.isfinite(total) else math.inf


def clip_factor(update: Mapping[str, np.ndarray], max_norm: float) -> float:
    """min(1, max_norm / ||update||): the scale that brings the update's norm to at
    most ``max_norm`` (0 for an update whose norm is not finite)."""
    norm = update_norm(update)
    if not math.isfinite(norm):
        return 0.0
    return 1.0 if norm <= max_norm else max_norm / norm


def robust_combine(rule: AggregationRule, updates: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The coordinate-wise median or trimmed mean of decoded updates (one dict of
    tensors each, the same names and shapes), in float32 (float64 for tensors that
    are not float32)."""
    if not updates:
        raise ValueError("no updates to combine")
    if rule.kind == "mean":
        raise ValueError("the mean is streamed by the Aggregator, not combined here")
    out = {}
    n = len(updates)
    cut = int(math.floor(rule.trim * n)) if rule.kind == "trimmed" else 0
    for name, first in updates[0].items():
        dtype = np.float32 if np.asarray(first).dtype == np.float32 else np.float64
        stack = np.stack([np.asarray(u[name], dtype=dtype) for u in updates])
        if rule.kind == "median":
            value = np.median(stack, axis=0)
        else:
            stack.sort(axis=0)
            value = stack[cut : n - cut].mean(axis=0, dtype=np.float64)
        out[name] = np.asarray(value, dtype=dtype)
    return out
