"""Ridge regression read-out: a linear score fitted in closed form by least squares on the labels (the
``ridge`` sweep kind, on pooled activations; alpha chosen on validation through the usual selection rule).

The targets are ``t = 2y - 1`` (harmful +1, harmless -1; soft labels fall in between), features are
standardized with the training set's mean and standard deviation (``standardize``), each class carries
half the total weight (``class_weight="balanced"``, as the logistic probes), and the intercept is not
penalized:

    min_{w,b}  Σ_i s_i (t_i - x_i·w - b)² / Σ_i s_i  +  α ‖w‖²,     α = 1 / C,

solved as ``(Xcᵀ S Xc + α I) w = Xcᵀ S tc`` (``Xc``, ``tc``: weighted-centered) with a Cholesky
factorization in float64. ``C`` is the spec's grid (larger C, weaker regularization, as for the logistic
probes), so the sweep picks ``C`` (i.e. alpha) on validation. The score is a regression output, not a
calibrated logit: it ranks and thresholds like one (AUROC, TPR at a control-set FPR), but
``predict_proba`` is only monotone in it.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from probes.affine import AffineProbe
from probes.base import POOLED, SweepKind, register_scorer

__all__ = ["RidgeProbe"]


def _build(entry: Any) -> tuple[type[Any], dict[str, Any]]:
    return RidgeProbe, {"class_weight": entry.get("class_weight", "balanced")}


@register_scorer
class RidgeProbe(AffineProbe):
    """Closed-form ridge regression on ``t = 2y - 1`` (see the module docstring); ``alpha = 1 / C``."""

    kind = "ridge"
    view = POOLED
    sweep_kinds = (
        SweepKind(
            "ridge",
            _build,
            description="closed-form ridge regression read-out on pooled activations (alpha = 1/C)",
        ),
    )

    def __init__(
        self, C: float = 1.0, standardize: bool = True, class_weight: Literal["balanced"] | None = "balanced"
    ) -> None:
        if not (C > 0 and math.isfinite(C)):
            raise ValueError(f"C must be a positive finite float, got {C}")
        if class_weight not in ("balanced", None):
            raise ValueError(f"class_weight must be 'balanced' or None, got {class_weight!r}")
        self.C, self.standardize, self.class_weight = float(C), bool(standardize), class_weight

    @property
    def alpha(self) -> float:
        return 1.0 / self.C

    def _fit(self, X: Tensor, y: Float[Tensor, " n"], sample_weight: Float[Tensor, " n"] | None) -> None:
        out_dt = torch.float64 if X.dtype == torch.float64 else torch.float32
        X64, y64 = X.double(), y.to(device=X.device, dtype=torch.float64)
        s = torch.ones_like(y64) if sample_weight is None else sample_weight.to(X.device, torch.float64)
        if self.class_weight == "balanced":
            hard = y64 >= 0.5
            n, n_pos = float(len(y64)), float(hard.sum())
            s = s * torch.where(hard, n / (2 * n_pos), n / (2 * (n - n_pos)))
        s = s / s.sum()
        mean = (s[:, None] * X64).sum(0)
        scale = torch.ones_like(mean)
        if self.standardize:
            sd = (s[:, None] * (X64 - mean) ** 2).sum(0).sqrt()
            scale = torch.where(sd > 1e-12 * (1.0 + mean.abs()), sd, torch.ones_like(sd))
        Z = (X64 - mean) / scale
        t = 2.0 * y64 - 1.0
        tc = t - (s * t).sum()
        d = Z.shape[1]
        A = Z.T @ (s[:, None] * Z) + self.alpha * torch.eye(d, dtype=torch.float64, device=X.device)
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) != 0:  # pragma: no cover - A is positive definite for alpha > 0
            raise ValueError("ridge: the regularized Gram matrix is not positive definite")
        w_std = torch.cholesky_solve((Z.T @ (s * tc))[:, None], L)[:, 0]
        coef = w_std / scale
        intercept = (s * t).sum() - (mean * coef).sum()
        self.coef_, self.intercept_ = coef.to(out_dt), intercept.reshape(()).to(out_dt)

    def get_config(self) -> dict[str, Any]:
        return {"C": self.C, "standardize": self.standardize, "class_weight": self.class_weight}
