"""Two-stage cascades: a cheap first stage screens everything, an expensive second stage sees only what the
first stage escalates (*Cost-effective constitutional classifiers*; CC++ reports ~40× less compute).

Stage 1's score ``s1`` is compared with two thresholds ``lo ≤ hi``: ``s1 < lo`` passes (harmless),
``s1 ≥ hi`` blocks outright, anything between is escalated to stage 2. Thresholds are set from a reference
set of stage-1 scores (:func:`thresholds_for_rate`): the top ``block_rate`` share is blocked, the next
``escalation_rate`` share is escalated.

The cascade's **final score** (:func:`cascade_scores`) orders examples as the cascade decides them: passed
examples keep ``s1`` (all below ``lo``), blocked ones keep ``s1`` (all at or above ``hi``), and escalated
ones get stage 2's z-scored score (or an ensemble ``w·z1 + (1−w)·z2``) mapped monotonically into the open
interval ``(lo, hi)``. So with nothing escalated the final score *is* ``s1``, with everything escalated
(``lo = −∞, hi = +∞``) it is stage 2's z-score, and any threshold on it is a valid cascade decision rule.

Expected cost per token: ``c1 + r·c2`` with ``r`` the share of traffic escalated
(:func:`probes.cost.cascade_expected_flops`). :func:`cheapest_matching` finds the cheapest escalation rate
whose metric matches stage 2 alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from activations.pooling import Pooling
from probes.base import SCORES, SweepKind, register_scorer
from probes.cost import cascade_expected_flops
from probes.scorer import Scorer

__all__ = [
    "Cascade",
    "CascadeError",
    "ZRef",
    "cascade_scores",
    "cheapest_matching",
    "escalation_mask",
    "thresholds_for_rate",
]


class CascadeError(ValueError):
    """Bad cascade input (rates outside [0, 1], mismatched score arrays, ...)."""


@dataclass(frozen=True)
class ZRef:
    """Mean and standard deviation that put one stage's scores on a common scale."""

    mean: float
    std: float

    @classmethod
    def of(cls, scores: np.ndarray) -> ZRef:
        s = np.asarray(scores, dtype=np.float64)
        if len(s) < 2 or not np.isfinite(s).all():
            raise CascadeError("z-scoring needs at least two finite reference scores")
        return cls(float(s.mean()), float(max(s.std(), 1e-12)))

    def __call__(self, s: np.ndarray) -> np.ndarray:
        return (np.asarray(s, dtype=np.float64) - self.mean) / self.std


def thresholds_for_rate(
    reference: np.ndarray, escalation_rate: float, block_rate: float = 0.0
) -> tuple[float, float]:
    """``(lo, hi)`` so that on ``reference`` the top ``block_rate`` share of stage-1 scores is blocked and
    the next ``escalation_rate`` share escalated (rate 0: nothing escalated; rates summing to 1: lo = −∞)."""
    for name, r in (("escalation_rate", escalation_rate), ("block_rate", block_rate)):
        if not 0.0 <= r <= 1.0:
            raise CascadeError(f"{name} must be in [0, 1], got {r}")
    if escalation_rate + block_rate > 1.0 + 1e-12:
        raise CascadeError(f"escalation_rate + block_rate = {escalation_rate + block_rate} > 1")
    s = np.sort(np.asarray(reference, dtype=np.float64))[::-1]  # descending
    if len(s) == 0 or not np.isfinite(s).all():
        raise CascadeError("thresholds need a non-empty, finite reference set")
    n = len(s)
    n_block = math.ceil(block_rate * n - 1e-9)
    hi = math.inf if n_block == 0 else float(s[n_block - 1])
    if escalation_rate == 0.0:
        return hi, hi
    n_top = math.ceil((block_rate + escalation_rate) * n - 1e-9)
    if n_top <= n_block:  # a rate too small to escalate a single reference example
        return hi, hi
    lo = -math.inf if n_top >= n else float(s[n_top - 1])
    return min(lo, hi), hi


def escalation_mask(s1: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Which examples stage 1 escalates (``lo ≤ s1 < hi``)."""
    s = np.asarray(s1, dtype=np.float64)
    return (s >= lo) & (s < hi)


def _into_band(z: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """A strictly increasing map of ``z`` into the open interval ``(lo, hi)``."""
    z = np.clip(z, -30.0, 30.0)
    if math.isinf(lo) and math.isinf(hi):
        return z
    if math.isinf(hi):
        return lo + np.exp(z)
    if math.isinf(lo):
        return hi - np.exp(-z)
    return lo + (hi - lo) / (1.0 + np.exp(-z))


def cascade_scores(
    s1: np.ndarray,
    s2: np.ndarray,
    lo: float,
    hi: float,
    *,
    z1: ZRef,
    z2: ZRef,
    combine: str = "stage2",
    weight: float = 0.55,
) -> tuple[np.ndarray, np.ndarray]:
    """``(final score, escalated mask)`` of a cascade (see the module docstring).

    ``s2`` may be NaN where stage 2 was not run (only escalated examples are read). ``combine="ensemble"``
    scores escalated examples by ``weight·z1(s1) + (1−weight)·z2(s2)``.
    """
    a = np.asarray(s1, dtype=np.float64)
    b = np.asarray(s2, dtype=np.float64)
    if a.shape != b.shape:
        raise CascadeError(f"stage scores differ in shape: {a.shape} vs {b.shape}")
    if combine not in ("stage2", "ensemble"):
        raise CascadeError(f"combine must be 'stage2' or 'ensemble', got {combine!r}")
    if not 0.0 <= weight <= 1.0:
        raise CascadeError(f"weight must be in [0, 1], got {weight}")
    if lo > hi:
        raise CascadeError(f"lo={lo} > hi={hi}")
    esc = escalation_mask(a, lo, hi)
    if not np.isfinite(b[esc]).all():
        raise CascadeError("stage 2 has no finite score for some escalated examples")
    zc = z2(b[esc]) if combine == "stage2" else weight * z1(a[esc]) + (1 - weight) * z2(b[esc])
    out = a.copy()
    out[esc] = _into_band(zc, lo, hi)
    if esc.all() and math.isinf(lo) and math.isinf(hi):
        out = zc
    return out, esc


def expected_flops(c1: float, c2: float, escalation_rate: float) -> float:
    """``c1 + rate·c2`` per token (re-exported for symmetry with the module's vocabulary)."""
    return cascade_expected_flops(c1, c2, escalation_rate)


def cheapest_matching(
    curve: Sequence[Mapping[str, float]],
    target: float,
    metric: str = "tpr_at_1pct_fpr",
    cost: str = "flops_per_token",
    tol: float = 0.0,
) -> Mapping[str, float] | None:
    """The cheapest point of a cascade curve whose ``metric`` is at least ``target − tol`` (None if none)."""
    ok = [p for p in curve if np.isfinite(p[metric]) and p[metric] >= target - tol]
    return min(ok, key=lambda p: p[cost]) if ok else None


def _build(entry: Mapping[str, Any]) -> tuple[type[Any], dict[str, Any]]:
    p = entry.get("params") or {}
    return Cascade, {
        "block_rate": float(p.get("block_rate", 0.0)),
        "combine": str(p.get("combine", "stage2")),
        "weight": float(p.get("weight", 0.55)),
    }


@register_scorer
class Cascade(Scorer):
    """A two-stage cascade read from its stages' scores ``[s1, s2]``: fitted on a reference set's scores
    (thresholds for ``escalation_rate`` and ``block_rate``; each stage's z-scoring), it scores by
    :func:`cascade_scores`. Not saved: its stages are runs of their own."""

    kind = "cascade"
    view = SCORES
    layout = ""
    sweep_kinds = (
        SweepKind(
            "cascade",
            _build,
            per_layer=False,
            uses_C=False,
            params=frozenset(("stage1", "stage2", "rates", "block_rate", "combine", "weight", "label")),
            description="two-stage cascade: a cheap stage 1 escalates to an expensive stage 2",
        ),
    )

    def __init__(
        self,
        escalation_rate: float = 0.0,
        block_rate: float = 0.0,
        combine: str = "stage2",
        weight: float = 0.55,
    ) -> None:
        self.escalation_rate, self.block_rate = float(escalation_rate), float(block_rate)
        self.combine, self.weight = combine, float(weight)

    def fit(self, X: Sequence[np.ndarray], y: Any = None, **_: Any) -> Cascade:
        """Thresholds and z-scoring from the stages' scores of a reference set (``[s1, s2]``)."""
        s1, s2 = X
        self.z1_, self.z2_ = ZRef.of(s1), ZRef.of(s2)
        self.lo_, self.hi_ = thresholds_for_rate(s1, self.escalation_rate, self.block_rate)
        return self

    def scores_and_escalation(self, X: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """``(final score, escalated mask)`` of the stages' scores ``[s1, s2]``."""
        s1, s2 = X
        return cascade_scores(
            s1, s2, self.lo_, self.hi_, z1=self.z1_, z2=self.z2_, combine=self.combine, weight=self.weight
        )

    def decision_function(self, X: Sequence[np.ndarray]) -> np.ndarray:
        return self.scores_and_escalation(X)[0]

    def pooling_label(self, pooling: Pooling) -> str:
        return self.combine

    def get_config(self) -> dict[str, Any]:
        return {
            "escalation_rate": self.escalation_rate,
            "block_rate": self.block_rate,
            "combine": self.combine,
            "weight": self.weight,
        }
