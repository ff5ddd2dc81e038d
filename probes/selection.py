"""One selection rule, on validation only.

Every choice probe-atlas makes (a C on the regularization path, a layer, a seed, a training epoch, a component
of an ensemble or cascade, the point a plot shows, the row a table reports) is made by :func:`select_best`
from validation metrics, never from test metrics.

The rule
--------
Candidates are ranked by their *primary* validation metric (``tpr_at_1pct_fpr`` by default: it does not
saturate the way AUROC does on an easy validation set), then, to break ties, by the other validation
metrics in the fixed order ``tpr_at_1pct_fpr`` → ``log_auroc`` → ``auroc`` (the primary one skipped), then by
the lower cost (when costs are given), and finally by the earlier candidate (on a C path ordered from strong
to weak regularization, the stronger one). Values within ``1e-12`` are ties; NaN (a metric the validation
set cannot resolve, e.g. TPR at 1% FPR with fewer than 100 validation negatives) ranks below every number.

:func:`val_metrics` computes the three metrics of one candidate's validation scores: AUROC, log-space AUROC
over FPR in [1e-3, 1e-1], and the TPR at the threshold that holds 1% FPR out of sample on the validation
negatives (:func:`probes.metrics.conservative_threshold`). :class:`Selection` records how often the primary
metric tied (``n_tied``), so a sweep can report how often validation could not discriminate.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from probes.metrics import auroc, conservative_threshold, log_auroc

__all__ = [
    "DEFAULT_SELECT",
    "SELECTION_METRICS",
    "Selection",
    "select_best",
    "select_scores",
    "selection_key",
    "tie_order",
    "val_metrics",
]

#: the validation metrics, in tie-break order
SELECTION_METRICS: tuple[str, ...] = ("tpr_at_1pct_fpr", "log_auroc", "auroc")
#: the default primary metric
DEFAULT_SELECT = "tpr_at_1pct_fpr"
_TOL = 1e-12


def _check_metric(primary: str) -> None:
    if primary not in SELECTION_METRICS:
        raise ValueError(f"unknown selection metric {primary!r}; expected one of {SELECTION_METRICS}")


def tie_order(primary: str = DEFAULT_SELECT) -> tuple[str, ...]:
    """The metrics in the order they rank candidates: the primary first, then the rest of
    :data:`SELECTION_METRICS` in its order."""
    _check_metric(primary)
    return (primary, *(m for m in SELECTION_METRICS if m != primary))


def val_metrics(y: Any, scores: Any) -> dict[str, float]:
    """AUROC, log-space AUROC and TPR at 1% FPR (out-of-sample threshold on the negatives) of validation
    scores; NaN where the validation set cannot give a figure (one class, or < 100 negatives for the TPR)."""
    yy = (np.asarray(y, dtype=np.float64) >= 0.5).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    out = {m: math.nan for m in SELECTION_METRICS}
    if yy.size == 0 or yy.min() == yy.max() or not np.isfinite(s).all():
        return out
    out["auroc"] = auroc(yy, s)
    out["log_auroc"] = log_auroc(yy, s)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = conservative_threshold(s[yy == 0], 0.01)
    if not info.limited_by_n:
        out["tpr_at_1pct_fpr"] = float(np.count_nonzero(s[yy == 1] > info.threshold)) / int(yy.sum())
    return out


def _num(v: Any) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return -math.inf
    return -math.inf if math.isnan(x) else x


def selection_key(
    metrics: Mapping[str, Any], primary: str = DEFAULT_SELECT, cost: float | None = None
) -> tuple[float, ...]:
    """A sort key (larger is better) of one candidate: its metrics in :func:`tie_order`, then ``-cost``."""
    key = tuple(_num(metrics.get(m)) for m in tie_order(primary))
    return (*key, -_num(cost) if cost is not None and not math.isnan(float(cost)) else 0.0)


@dataclass(frozen=True)
class Selection:
    """The chosen candidate of a selection and what the rule saw."""

    index: int
    metrics: tuple[dict[str, float], ...]  # every candidate's validation metrics
    primary: str
    n_tied: int  # candidates tied with the winner on the primary metric (1 = no tie)
    n_tied_all: int  # candidates tied on every metric and cost (resolved by order)

    @property
    def value(self) -> float:
        """The winner's primary validation metric."""
        return float(self.metrics[self.index][self.primary])


def _close(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(x == y or abs(x - y) <= _TOL for x, y in zip(a, b, strict=True))


def select_best(
    metrics: Sequence[Mapping[str, Any]], primary: str = DEFAULT_SELECT, costs: Sequence[float] | None = None
) -> Selection:
    """The best candidate by the rule of this module (see the module docstring)."""
    if len(metrics) == 0:
        raise ValueError("select_best: no candidates")
    if costs is not None and len(costs) != len(metrics):
        raise ValueError(f"select_best: {len(costs)} costs for {len(metrics)} candidates")
    keys = [selection_key(m, primary, None if costs is None else costs[i]) for i, m in enumerate(metrics)]
    best = 0
    for i in range(1, len(keys)):
        # strictly better beyond the tolerance on the first metric that differs
        for a, b in zip(keys[i], keys[best], strict=True):
            if a == b or abs(a - b) <= _TOL:
                continue
            if a > b:
                best = i
            break
    top = keys[best]
    n_tied = sum(1 for k in keys if k[0] == top[0] or abs(k[0] - top[0]) <= _TOL)
    n_all = sum(1 for k in keys if _close(k, top))
    return Selection(
        best,
        tuple({m: _num(d.get(m)) if _num(d.get(m)) > -math.inf else math.nan for m in SELECTION_METRICS}
              for d in metrics),
        primary,
        n_tied,
        n_all,
    )  # fmt: skip


def select_scores(
    y: Any,
    candidates: Sequence[Any],
    primary: str = DEFAULT_SELECT,
    costs: Sequence[float] | None = None,
) -> Selection:
    """:func:`select_best` over candidates given as validation scores (one array each) for labels ``y``."""
    return select_best([val_metrics(y, s) for s in candidates], primary, costs)
