"""Difference of class means: the ``diffmeans`` sweep kind."""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from probes.affine import AffineProbe, class_means, fit_calibration
from probes.base import POOLED, SweepKind, register_scorer

__all__ = ["DiffMeansProbe"]


@register_scorer
class DiffMeansProbe(AffineProbe):
    """Direction = mean(harmful) − mean(harmless); logit = w·x + b with b at the midpoint of the means.

    With ``calibrate=True`` (default) the logit is rescaled by a 1-D logistic fit on the projections so
    that ``predict_proba`` is calibrated on the training set. ``normalize=True`` uses the unit direction."""

    kind = "diff_means"
    view = POOLED
    sweep_kinds = (
        SweepKind(
            "diffmeans", lambda e: (DiffMeansProbe, {}), uses_C=False, description="difference of class means"
        ),
    )

    def __init__(self, calibrate: bool = True, normalize: bool = False) -> None:
        self.calibrate = calibrate
        self.normalize = normalize

    def _fit(self, X: Tensor, y: Float[Tensor, " n"], sample_weight: Float[Tensor, " n"] | None) -> None:
        dt = torch.float64 if X.dtype == torch.float64 else torch.float32
        X, y = X.to(dt), y.to(device=X.device, dtype=dt)
        s = None if sample_weight is None else sample_weight.to(device=X.device, dtype=dt)
        mu1, mu0, _, _ = class_means(X, y, s)
        w = mu1 - mu0
        if self.normalize:
            w = w / w.norm().clamp_min(1e-30)
        b = -(w @ (mu1 + mu0)) / 2
        if self.calibrate:
            a, c = fit_calibration(X @ w + b, y, torch.ones_like(y) if s is None else s)
            w, b = a * w, a * b + c
        self.coef_, self.intercept_ = w, b.reshape(())

    def get_config(self) -> dict[str, Any]:
        return {"calibrate": self.calibrate, "normalize": self.normalize}
