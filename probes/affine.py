"""Affine read-outs shared by the linear families: the :class:`AffineProbe` base (``logit = X @ coef_ +
intercept_`` on raw features, saved as ``coef`` / ``intercept``), weighted class means, and the 1-D logistic
calibration of a direction's projections."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from probes.io import TensorSpec, affine_specs
from probes.scorer import Probe

__all__ = ["AffineProbe", "class_means", "fit_calibration"]


class AffineProbe(Probe):
    """A probe whose logit is ``X @ coef_ + intercept_`` on raw features."""

    coef_: Tensor | None = None
    intercept_: Tensor | None = None

    def _decision_function(self, X: Tensor) -> Float[Tensor, " n"]:
        assert self.coef_ is not None and self.intercept_ is not None
        X = X.to(device=self.coef_.device, dtype=torch.promote_types(X.dtype, self.coef_.dtype))
        return X @ self.coef_.to(X.dtype) + self.intercept_.to(X.dtype)

    def state_dict(self) -> dict[str, Tensor]:
        self._check_fitted()
        assert self.coef_ is not None and self.intercept_ is not None
        return {
            "coef": self.coef_.detach().cpu().contiguous(),
            "intercept": self.intercept_.detach().cpu().reshape(1).contiguous(),
        }

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.coef_ = state["coef"].clone()
        self.intercept_ = state["intercept"].reshape(()).clone()
        self.n_features_in_ = int(self.coef_.shape[0])

    @property
    def direction(self) -> Float[Tensor, " d"]:
        """Unit vector along ``coef_``."""
        self._check_fitted()
        assert self.coef_ is not None
        return self.coef_ / self.coef_.norm().clamp_min(1e-30)

    @classmethod
    def tensor_specs(
        cls, config: Mapping[str, Any], n_in: int, names: Sequence[str], file: Path
    ) -> dict[str, TensorSpec] | None:
        return affine_specs(n_in, [])


def fit_calibration(
    t: Float[Tensor, " n"], y: Float[Tensor, " n"], s: Float[Tensor, " n"], ridge: float = 1e-4
) -> tuple[float, float]:
    """1-D logistic fit ``logit = a·t + c`` (Newton, float64) on standardized projections ``t``.

    A small ridge on ``a`` keeps it finite on separable data."""
    t, y, s = t.double(), y.double(), s.double() / s.double().sum()
    sd = float(t.std(correction=0).clamp_min(1e-12))
    u = t / sd
    theta = torch.zeros(2, dtype=torch.float64)
    A = torch.stack([u, torch.ones_like(u)], 1)
    reg = torch.tensor([ridge, 0.0], dtype=torch.float64)
    for _ in range(100):
        z = A @ theta
        p = torch.sigmoid(z)
        g = A.T @ (s * (p - y)) + reg * theta
        H = (A.T * (s * p * (1 - p))) @ A + torch.diag(reg) + 1e-12 * torch.eye(2, dtype=torch.float64)
        step = torch.linalg.solve(H, g)
        theta = theta - step
        if float(g.abs().max()) < 1e-10:
            break
    return float(theta[0]) / sd, float(theta[1])


def class_means(
    X: Tensor, y: Tensor, s: Tensor | None
) -> tuple[Float[Tensor, " d"], Float[Tensor, " d"], Tensor, Tensor]:
    """Weighted means of the positive and negative class (soft labels weight both)."""
    s = torch.ones_like(y) if s is None else s.to(y.dtype)
    w1, w0 = s * y, s * (1 - y)
    mu1 = (w1[:, None] * X).sum(0) / w1.sum()
    mu0 = (w0[:, None] * X).sum(0) / w0.sum()
    return mu1, mu0, w1, w0
