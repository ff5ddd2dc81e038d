"""Ensembles of scorers: z-scored logit averaging and stacking, costed as the sum of their parts.

*Constitutional Classifiers++* averages a probe's and a classifier's logits after putting them on one scale
(0.55·probe + 0.45·classifier). :class:`ZScoreEnsemble` z-scores each member's logits with the mean and
standard deviation of a reference set (the validation scores) and takes their weighted sum;
:class:`StackingEnsemble` fits an L2 logistic regression on the members' z-scored logits (on held-out
scores, never the members' own training scores) and reports cross-fitted scores for that same set, so its
own validation metric is not in-sample. Members can be any scorers: probes on different layers, poolings or
kinds, fine-tuned layers, standalone classifiers.

Cost (:func:`ensemble_cost`): every member runs, so per-token FLOPs add up; in the standalone view the
policy model's forward pass is shared, so it counts once (the deepest member's) on top of the members' own
work.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from activations.pooling import Pooling
from probes.base import SCORES, SweepKind, register_scorer
from probes.cost import CostModel, ProbeCost
from probes.io import ProbeLoadError
from probes.logistic import LogisticProbe
from probes.scorer import Scorer

__all__ = ["Ensemble", "EnsembleError", "StackingEnsemble", "ZScoreEnsemble", "ensemble_cost"]


class EnsembleError(ValueError):
    """Bad ensemble input (no members, mismatched lengths, weights that do not fit)."""


def _stack(scores: Sequence[np.ndarray], n_members: int | None = None) -> np.ndarray:
    if len(scores) == 0:
        raise EnsembleError("an ensemble needs at least one member")
    arrs = [np.asarray(s, dtype=np.float64).reshape(-1) for s in scores]
    if len({len(a) for a in arrs}) != 1:
        raise EnsembleError(f"members scored different numbers of examples: {[len(a) for a in arrs]}")
    if n_members is not None and len(arrs) != n_members:
        raise EnsembleError(f"the ensemble has {n_members} members, got {len(arrs)} score arrays")
    X = np.stack(arrs, axis=1)
    if not np.isfinite(X).all():
        raise EnsembleError("member scores contain NaN or infinite values")
    return X


@dataclass
class ZScoreEnsemble:
    """``Σ w_i·(s_i − μ_i)/σ_i`` with ``μ, σ`` from reference scores; weights default to equal."""

    weights: Sequence[float] | None = None

    def fit(self, reference: Sequence[np.ndarray]) -> ZScoreEnsemble:
        X = _stack(reference)
        if len(X) < 2:
            raise EnsembleError("z-scoring needs at least two reference examples")
        self.mean_ = X.mean(0)
        self.std_ = np.maximum(X.std(0), 1e-12)
        w = np.ones(X.shape[1]) if self.weights is None else np.asarray(self.weights, dtype=np.float64)
        if w.shape != (X.shape[1],):
            raise EnsembleError(f"{len(w)} weights for {X.shape[1]} members")
        if (w < 0).any() or w.sum() <= 0:
            raise EnsembleError("weights must be non-negative with a positive sum")
        self.weights_ = w / w.sum()
        return self

    def zscores(self, scores: Sequence[np.ndarray]) -> np.ndarray:
        return (_stack(scores, len(self.mean_)) - self.mean_) / self.std_

    def combine(self, scores: Sequence[np.ndarray]) -> np.ndarray:
        """The ensemble's score for each example."""
        return self.zscores(scores) @ self.weights_


@dataclass
class StackingEnsemble:
    """A logistic regression on the members' z-scored logits (fit on held-out scores)."""

    C: float = 1.0
    folds: int = 5
    seed: int = 0

    def _fit_lr(self, Z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
        lp = LogisticProbe(C=self.C, class_weight="balanced", standardize=False).fit(
            torch.as_tensor(Z), torch.as_tensor(y)
        )
        assert lp.coef_ is not None and lp.intercept_ is not None
        return lp.coef_.double().numpy(), float(lp.intercept_)

    def fit(self, scores: Sequence[np.ndarray], y: np.ndarray) -> StackingEnsemble:
        yy = (np.asarray(y, dtype=np.float64).reshape(-1) >= 0.5).astype(int)
        self._z = ZScoreEnsemble().fit(scores)
        Z = self._z.zscores(scores)
        if len(yy) != len(Z):
            raise EnsembleError(f"{len(Z)} scored examples but {len(yy)} labels")
        if yy.min() == yy.max():
            raise EnsembleError("stacking needs both classes in its fitting set")
        self.coef_, self.intercept_ = self._fit_lr(Z, yy)
        # cross-fitted scores of the fitting set (stratified folds), for an honest validation metric
        rng = np.random.default_rng(self.seed)
        fold = np.empty(len(yy), dtype=int)
        for c in (0, 1):
            idx = np.nonzero(yy == c)[0]
            fold[rng.permutation(idx)] = np.arange(len(idx)) % self.folds
        oof = np.empty(len(yy))
        for f in range(self.folds):
            tr, te = fold != f, fold == f
            if not te.any():
                continue
            if yy[tr].min() == yy[tr].max():
                oof[te] = Z[te] @ self.coef_ + self.intercept_
                continue
            w, b = self._fit_lr(Z[tr], yy[tr])
            oof[te] = Z[te] @ w + b
        self.oof_scores_ = oof
        return self

    def combine(self, scores: Sequence[np.ndarray]) -> np.ndarray:
        if not hasattr(self, "_z"):
            raise EnsembleError("this stacking ensemble was saved without its z-scoring reference")
        return self._z.zscores(scores) @ self.coef_ + self.intercept_


def ensemble_cost(
    cm: CostModel, members: Sequence[tuple[float, float, float]]
) -> tuple[ProbeCost, ProbeCost]:
    """(marginal, standalone) cost of running every member.

    ``members``: ``(marginal_flops, standalone_flops, forward_flops)`` per member per token, where
    ``forward_flops`` is the part of its standalone cost that is the policy model's own forward pass
    (shared between members, so counted once: the deepest).
    """
    if not members:
        raise EnsembleError("an ensemble needs at least one member")
    marginal = float(sum(m[0] for m in members))
    shared = max(float(m[2]) for m in members)
    own = float(sum(m[1] - m[2] for m in members))
    return cm.cost_views(marginal, own + shared, shared, (), "ensemble")


def _build(entry: Mapping[str, Any]) -> tuple[type[Any], dict[str, Any]]:
    p = entry.get("params") or {}
    return Ensemble, {
        "method": str(p.get("method", "zscore")),
        "weights": p.get("weights"),
        "C": float(p.get("C", 1.0)),
        "seed": int(entry.get("seed", 0)),
    }


@register_scorer
class Ensemble(Scorer):
    """An ensemble of scorers, read from their scores (one array per member): ``method="zscore"``
    (:class:`ZScoreEnsemble`: ``weights`` of z-scored logits, z-scored on the fitting scores) or ``"stack"``
    (:class:`StackingEnsemble`, ``C``, with cross-fitted scores of its own fitting set in ``oof_scores_``).
    ``members`` / ``labels`` record what it combines (run ids and names); saved as ``ensemble.json``."""

    kind = "ensemble"
    view = SCORES
    layout = "ensemble"
    sweep_kinds = (
        SweepKind(
            "ensemble",
            _build,
            per_layer=False,
            uses_C=False,
            params=frozenset(("members", "weights", "method", "C", "label")),
            description="z-scored logit average (or stacking) of components",
        ),
    )

    def __init__(
        self,
        method: str = "zscore",
        weights: Sequence[float] | None = None,
        C: float = 1.0,
        seed: int = 0,
        members: Sequence[str] = (),
        labels: Sequence[str] = (),
    ) -> None:
        if method not in ("zscore", "stack"):
            raise EnsembleError(f"method: 'zscore' or 'stack', got {method!r}")
        self.method, self.weights, self.C, self.seed = method, weights, float(C), int(seed)
        self.members, self.labels = list(members), list(labels)
        self.combiner_: ZScoreEnsemble | StackingEnsemble | None = None

    def fit(self, X: Sequence[np.ndarray], y: Any = None, **_: Any) -> Ensemble:
        """Fit on the members' scores of one set (the validation set in a sweep)."""
        if self.method == "zscore":
            self.combiner_ = ZScoreEnsemble(self.weights).fit(X)
        else:
            self.combiner_ = StackingEnsemble(C=self.C, seed=self.seed).fit(X, np.asarray(y))
        return self

    def decision_function(self, X: Sequence[np.ndarray]) -> np.ndarray:
        if self.combiner_ is None:
            raise EnsembleError("fit the ensemble first")
        return self.combiner_.combine(X)

    def fitted_scores(self, X: Sequence[np.ndarray]) -> np.ndarray:
        """Scores of the fitting set: cross-fitted for stacking (its own validation metric is then not
        in-sample), else :meth:`decision_function`."""
        if isinstance(self.combiner_, StackingEnsemble):
            return self.combiner_.oof_scores_
        return self.decision_function(X)

    def pooling_label(self, pooling: Pooling) -> str:
        return self.method

    def get_config(self) -> dict[str, Any]:
        return {"method": self.method, "weights": self.weights, "C": self.C, "seed": self.seed}

    def saved_state(self) -> dict[str, Any]:
        """``ensemble.json``: method, members, labels and the fitted combination."""
        c = self.combiner_
        state: dict[str, Any]
        if isinstance(c, ZScoreEnsemble):
            state = {"mean": c.mean_.tolist(), "std": c.std_.tolist(), "weights": c.weights_.tolist()}
        elif isinstance(c, StackingEnsemble):
            state = {
                "coef": c.coef_.tolist(),
                "intercept": c.intercept_,
                "z_mean": c._z.mean_.tolist(),
                "z_std": c._z.std_.tolist(),
            }
        else:
            raise EnsembleError("fit the ensemble before saving it")
        return {"method": self.method, "members": self.members, "labels": self.labels, **state}

    @classmethod
    def from_saved(cls, doc: Mapping[str, Any], file: Path) -> Ensemble:
        """Rebuild from a saved ``ensemble.json`` (checked: its method, member lists and numbers)."""
        method = doc.get("method")
        members, labels = doc.get("members"), doc.get("labels")
        if method not in ("zscore", "stack"):
            raise ProbeLoadError(f"{file}: method must be zscore or stack, got {str(method)[:40]!r}")
        for key, v in (("members", members), ("labels", labels)):
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise ProbeLoadError(f"{file}: {key} must be a list of strings")
        keys = ("mean", "std", "weights") if method == "zscore" else ("coef",)
        arrays = {}
        for key in keys:
            v = doc.get(key)
            if not isinstance(v, list) or len(v) != len(members or []) or not all(_number(x) for x in v):
                raise ProbeLoadError(f"{file}: {key} must be one number per member")
            arrays[key] = np.asarray(v, dtype=np.float64)
        ens = cls(method=method, members=members or [], labels=labels or [])
        if method == "zscore":
            z = ZScoreEnsemble(arrays["weights"].tolist())
            z.mean_, z.std_, z.weights_ = arrays["mean"], arrays["std"], arrays["weights"]
            ens.combiner_ = z
        else:
            if not _number(doc.get("intercept")):
                raise ProbeLoadError(f"{file}: intercept must be a number")
            st = StackingEnsemble()
            st.coef_, st.intercept_ = arrays["coef"], float(doc["intercept"])
            zs = doc.get("z_mean"), doc.get("z_std")
            if all(isinstance(v, list) and len(v) == len(members or []) and all(map(_number, v)) for v in zs):
                st._z = ZScoreEnsemble()
                st._z.mean_, st._z.std_ = np.asarray(zs[0], np.float64), np.asarray(zs[1], np.float64)
            ens.combiner_ = st
        return ens


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)
