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

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from probes.cost import CostModel, ProbeCost

__all__ = ["EnsembleError", "StackingEnsemble", "ZScoreEnsemble", "ensemble_cost"]


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
        from probes.linear import LogisticProbe

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
