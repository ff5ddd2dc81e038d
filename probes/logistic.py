"""L2 / L1 / elastic-net logistic regression with scikit-learn's objective, fitted by the batched solver
(:mod:`probes.solver`): the ``logistic_l2`` / ``logistic_l1`` / ``logistic_elasticnet`` sweep kinds (every
layer × C in one solve, C chosen on validation) and the ``embedding`` surface baseline (the same probe on the
pooled token embeddings)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from probes.affine import AffineProbe
from probes.base import POOLED, SweepKind, register_scorer
from probes.io import TensorSpec, affine_specs
from probes.scorer import Grid
from probes.solver import ClassWeight, ConvergenceWarning, LogisticPathResult, Penalty, fit_logistic_batched

__all__ = ["EMBED_HOOK", "LogisticProbe"]

#: the residual stream before the first block: the token (and position) embeddings
EMBED_HOOK = "blocks.0.hook_resid_pre"
#: the fit options a path's probes carry into their config
_PROBE_OPTIONS = ("class_weight", "standardize", "fit_intercept", "max_iter", "tol")


def _logistic(penalty: str | None) -> Any:
    """A sweep kind's builder: the spec entry's regularization options (``penalty`` fixed by the kind, or
    the entry's own)."""

    def build(entry: Mapping[str, Any]) -> tuple[type[Any], dict[str, Any]]:
        return LogisticProbe, {
            "penalty": penalty or entry.get("penalty", "l2"),
            "l1_ratio": entry.get("l1_ratio", 0.5),
            "class_weight": entry.get("class_weight", "balanced"),
        }

    return build


class _PathGrid(Grid):
    """Every problem × C of one batched solve."""

    def __init__(self, path: LogisticPathResult) -> None:
        self.path = path

    def scorer(self, problem: int, candidate: int) -> LogisticProbe:
        return LogisticProbe.from_path(self.path, problem, candidate)

    def val_scores(self, X: Sequence[Any]) -> list[np.ndarray]:
        return list(self.path.decision_function(torch.stack(list(X))).numpy())


@register_scorer
class LogisticProbe(AffineProbe):
    """L2 / L1 / elastic-net logistic regression with scikit-learn's objective (see the module docstring).

    ``coef_`` and ``intercept_`` act on raw features (standardization is folded back); ``mean_`` and
    ``scale_`` keep the train-set statistics."""

    kind = "logistic"
    view = POOLED
    sweep_kinds = (
        *(
            SweepKind(
                f"logistic_{pen}",
                _logistic(pen),
                description=f"logistic regression ({pen}) on pooled activations",
            )
            for pen in ("l2", "l1", "elasticnet")
        ),
        SweepKind(
            "embedding",
            _logistic(None),
            per_layer=False,
            description="surface baseline: logistic probe on the pooled token embeddings (layer-0 residual "
            "stream)",
            hook=EMBED_HOOK,
            hook_label="embed",
        ),
    )

    def __init__(
        self,
        C: float = 1.0,
        penalty: Penalty = "l2",
        l1_ratio: float = 0.5,
        class_weight: ClassWeight = None,
        standardize: bool = True,
        fit_intercept: bool = True,
        max_iter: int | None = None,
        tol: float = 1e-4,
        dtype: str | None = None,
    ) -> None:
        if penalty not in ("l2", "l1", "elasticnet"):
            raise ValueError(f"penalty must be 'l2', 'l1' or 'elasticnet', got {penalty!r}")
        if not (C > 0 and math.isfinite(C)):
            raise ValueError(f"C must be a positive finite float, got {C}")
        self.C = float(C)
        self.penalty = penalty
        self.l1_ratio = float(l1_ratio)
        self.class_weight = class_weight
        self.standardize = standardize
        self.fit_intercept = fit_intercept
        self.max_iter = max_iter
        self.tol = tol
        self.dtype = dtype  # "float32" | "float64" | None (float64 inputs → float64, others float32)
        self.mean_: Tensor | None = None
        self.scale_: Tensor | None = None
        self.n_iter_: int | None = None
        self.converged_: bool | None = None

    def _fit(self, X: Tensor, y: Float[Tensor, " n"], sample_weight: Float[Tensor, " n"] | None) -> None:
        res = fit_logistic_batched(
            X[None],
            y,
            [self.C],
            penalty=self.penalty,
            l1_ratio=self.l1_ratio,
            sample_weight=sample_weight,
            class_weight=self.class_weight,
            standardize=self.standardize,
            fit_intercept=self.fit_intercept,
            max_iter=self.max_iter,
            tol=self.tol,
            dtype=getattr(torch, self.dtype) if self.dtype else None,
            warn=False,
        )
        self._set_fitted(
            res.coef[0, 0],
            res.intercept[0, 0],
            res.mean[0],
            res.scale[0],
            int(res.n_iter[0, 0]),
            bool(res.converged[0, 0]),
        )
        if not self.converged_:
            warnings.warn(
                f"LogisticProbe(C={self.C}, penalty={self.penalty!r}) did not converge in {self.n_iter_} "
                "iterations",
                ConvergenceWarning,
                stacklevel=3,
            )

    def _set_fitted(
        self, coef: Tensor, intercept: Tensor, mean: Tensor, scale: Tensor, n_iter: int, converged: bool
    ) -> None:
        self.coef_, self.intercept_ = coef.clone(), intercept.reshape(()).clone()
        self.mean_, self.scale_ = mean.clone(), scale.clone()
        self.n_iter_, self.converged_ = n_iter, converged
        self.n_features_in_ = int(coef.shape[0])

    def get_config(self) -> dict[str, Any]:
        cw = self.class_weight
        if isinstance(cw, Mapping):
            cw = {str(k): float(v) for k, v in cw.items()}
        return {
            "C": self.C,
            "penalty": self.penalty,
            "l1_ratio": self.l1_ratio,
            "class_weight": cw,
            "standardize": self.standardize,
            "fit_intercept": self.fit_intercept,
            "max_iter": self.max_iter,
            "tol": self.tol,
            "dtype": self.dtype,
        }

    def state_dict(self) -> dict[str, Tensor]:
        out = super().state_dict()
        if self.mean_ is not None and self.scale_ is not None:
            out["mean"] = self.mean_.detach().cpu().contiguous()
            out["scale"] = self.scale_.detach().cpu().contiguous()
        return out

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        super().load_state_dict(state)
        self.mean_ = state["mean"].clone() if "mean" in state else None
        self.scale_ = state["scale"].clone() if "scale" in state else None

    @classmethod
    def from_path(cls, path: LogisticPathResult, problem: int, c_index: int) -> LogisticProbe:
        """One fit of a batched solve as a fitted probe."""
        opts = {k: v for k, v in path.fit_options.items() if k in _PROBE_OPTIONS}
        probe = cls(C=path.Cs[c_index], penalty=path.penalty, l1_ratio=path.l1_ratio, **opts)  # type: ignore[arg-type]
        probe._set_fitted(
            path.coef[problem, c_index],
            path.intercept[problem, c_index],
            path.mean[problem],
            path.scale[problem],
            int(path.n_iter[problem, c_index]),
            bool(path.converged[problem, c_index]),
        )
        return probe

    @classmethod
    def fit_grid(cls, X: Sequence[Any], y: Any, Cs: Sequence[float] | None, **config: Any) -> Grid:
        """Every problem × C in one batched solve (:func:`~probes.solver.fit_logistic_batched`)."""
        path = fit_logistic_batched(
            torch.stack([torch.as_tensor(x) for x in X]),
            torch.as_tensor(np.asarray(y)),
            [1.0] if Cs is None else Cs,
            penalty=config.get("penalty", "l2"),
            l1_ratio=config.get("l1_ratio", 0.5),
            class_weight=config.get("class_weight"),
            warn=False,
        )
        return _PathGrid(path)

    @classmethod
    def tensor_specs(
        cls, config: Mapping[str, Any], n_in: int, names: Sequence[str], file: Path
    ) -> dict[str, TensorSpec] | None:
        return affine_specs(n_in, names)
