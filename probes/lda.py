"""Linear discriminant analysis with a shrunk pooled covariance: the ``lda`` sweep kind."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from probes.affine import AffineProbe, class_means, fit_calibration
from probes.base import POOLED, SweepKind, register_scorer

__all__ = ["LDAProbe", "ledoit_wolf_shrinkage"]


def ledoit_wolf_shrinkage(Xc: Float[Tensor, "n d"]) -> float:
    """Ledoit–Wolf optimal shrinkage towards ``μ·I`` for already-centered data (Ledoit & Wolf, 2004)."""
    Xc = Xc.double()
    n, d = Xc.shape
    X2 = Xc * Xc
    emp_trace = X2.sum(0) / n
    mu = float(emp_trace.sum()) / d
    beta_ = float((X2.T @ X2).sum())
    delta_ = float(((Xc.T @ Xc) ** 2).sum()) / n**2
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2 * mu * float(emp_trace.sum()) + d * mu**2) / d
    beta = min(beta, delta)
    return 0.0 if beta <= 0 or delta <= 0 else beta / delta


@register_scorer
class LDAProbe(AffineProbe):
    """Linear discriminant analysis with a shrunk pooled covariance.

    ``shrinkage="auto"`` picks Ledoit–Wolf on standardized within-class residuals (as scikit-learn's
    ``LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto")``); a float in [0, 1] fixes it.
    Σ_s = (1 − α) Σ + α (tr Σ / d) I;  w = Σ_s⁻¹ (μ₁ − μ₀);  b = −w·(μ₁ + μ₀)/2 + log(π₁/π₀)."""

    kind = "lda"
    view = POOLED
    sweep_kinds = (
        SweepKind(
            "lda",
            lambda e: (LDAProbe, {"shrinkage": e["shrinkage"] if e.get("shrinkage") is not None else "auto"}),
            uses_C=False,
            description="LDA with (Ledoit-Wolf) shrinkage",
        ),
    )

    def __init__(self, shrinkage: float | Literal["auto"] = "auto", calibrate: bool = False) -> None:
        if not (shrinkage == "auto" or (isinstance(shrinkage, int | float) and 0.0 <= shrinkage <= 1.0)):
            raise ValueError(f"shrinkage must be 'auto' or a float in [0, 1], got {shrinkage!r}")
        self.shrinkage = shrinkage
        self.calibrate = calibrate
        self.shrinkage_: float | None = None

    def _fit(self, X: Tensor, y: Float[Tensor, " n"], sample_weight: Float[Tensor, " n"] | None) -> None:
        out_dt = torch.float64 if X.dtype == torch.float64 else torch.float32
        X64, y64 = X.double(), y.to(device=X.device, dtype=torch.float64)
        s = None if sample_weight is None else sample_weight.to(device=X.device, dtype=torch.float64)
        mu1, mu0, w1, w0 = class_means(X64, y64, s)
        # within-class residuals, each row weighted by its (soft) class memberships
        R = torch.cat([(X64 - mu1) * w1.sqrt()[:, None], (X64 - mu0) * w0.sqrt()[:, None]], 0)
        total = float(w1.sum() + w0.sum())
        cov = R.T @ R / total
        d = X.shape[1]
        if self.shrinkage == "auto":
            sd = cov.diagonal().clamp_min(1e-24).sqrt()
            keep = (w1 > 0) | (w0 > 0)
            Rk = torch.cat([((X64 - mu1) / sd)[(w1 > 0) & keep], ((X64 - mu0) / sd)[(w0 > 0) & keep]], 0)
            alpha = ledoit_wolf_shrinkage(Rk)
            corr = cov / sd[:, None] / sd[None, :]
            shrunk = (1 - alpha) * corr + alpha * (torch.trace(corr) / d) * torch.eye(d, dtype=torch.float64)
            cov_s = shrunk * sd[:, None] * sd[None, :]
        else:
            alpha = float(self.shrinkage)
            cov_s = (1 - alpha) * cov + alpha * (torch.trace(cov) / d) * torch.eye(d, dtype=torch.float64)
        self.shrinkage_ = alpha
        cov_s = cov_s + 1e-10 * (torch.trace(cov_s) / d) * torch.eye(d, dtype=torch.float64)
        Lc, info = torch.linalg.cholesky_ex(cov_s)
        if int(info) != 0:
            raise ValueError("the (shrunk) covariance is singular; use a larger shrinkage")
        w = torch.cholesky_solve((mu1 - mu0)[:, None], Lc)[:, 0]
        prior = math.log(float(w1.sum()) / float(w0.sum()))
        b = -(w @ (mu1 + mu0)) / 2 + prior
        if self.calibrate:
            a, c = fit_calibration(X64 @ w + b, y64, torch.ones_like(y64) if s is None else s)
            w, b = a * w, a * b + c
        self.coef_, self.intercept_ = w.to(out_dt), b.reshape(()).to(out_dt)

    def get_config(self) -> dict[str, Any]:
        return {"shrinkage": self.shrinkage, "calibrate": self.calibrate}
