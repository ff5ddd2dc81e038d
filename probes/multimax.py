"""MultiMax (Kramár et al.): ``H`` per-head linear scores ``s_{h,t} = w_h·x_t + c_h``, a hard max over tokens
per head, and a learned weighted sum ``Σ_h u_h · max_t s_{h,t} + b``. The ``multimax`` sweep kind."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from einops import einsum
from jaxtyping import Float, Int
from torch import Tensor

from probes.base import register_scorer
from probes.io import FLOATS, TensorSpec, positive_int
from probes.token import HeadsProbe, HeadsStreamer, Streamer, heads_kind

__all__ = ["MultiMaxProbe"]


class _MultiMaxStreamer(HeadsStreamer):
    """Running MultiMax read-out: per head the max of its scores so far, then the learned weighted sum."""

    _heads_key: ClassVar[str] = "W"

    def _init_state(self, batch: int) -> dict[str, Tensor]:
        return {"m": torch.full((batch, self.heads), -math.inf, device=self.device)}

    def _step(
        self, state: dict[str, Tensor], x: Float[Tensor, "b d"], n: Int[Tensor, " b"], low: int
    ) -> tuple[dict[str, Tensor], Float[Tensor, " b"]]:
        p = self.p
        s = einsum(x, p["W"], "b d, h d -> b h") + p["c"]
        return {"m": torch.maximum(state["m"], s)}, s @ p["u"] + p["b"][0]

    def _score(self, state: dict[str, Tensor], n: Int[Tensor, " b"]) -> Float[Tensor, " b"]:
        return state["m"] @ self.p["u"] + self.p["b"][0]


@register_scorer
class MultiMaxProbe(HeadsProbe):
    """MultiMax (Kramár et al.): per-head linear scores, a hard max over tokens per head, a learned weighted
    sum of the heads' maxima plus a bias."""

    kind = "token_multimax"
    sweep_kinds = (
        heads_kind(
            "multimax",
            lambda: MultiMaxProbe,
            "MultiMax: per-head max over tokens of per-head scores, learned weighted sum",
        ),
    )

    def _init_params(self, d: int, gen: torch.Generator) -> dict[str, Tensor]:
        return {
            "W": torch.randn(self.heads, d, generator=gen) * 0.01,
            "c": torch.zeros(self.heads),
            "u": torch.full((self.heads,), 1.0 / self.heads),
            "b": torch.zeros(()),
        }

    def _logits(self, p: dict[str, Tensor], X: Tensor, mask: Tensor) -> Tensor:
        s = einsum(X, p["W"], "b s d, h d -> b s h") + p["c"]
        m = torch.where(mask[:, :, None], s, torch.tensor(-math.inf, dtype=s.dtype)).amax(1)
        b = p["b"].reshape(())
        return m @ p["u"] + b

    def _fold(self, p: dict[str, Tensor], mean: Tensor, scale: Tensor) -> dict[str, Tensor]:
        W = p["W"] / scale
        return {"W": W, "c": p["c"] - W @ mean, "u": p["u"], "b": p["b"].reshape(1)}

    def _n_features_from_state(self) -> int:
        return int(self.params_["W"].shape[1])

    def streamer(self) -> Streamer:
        self._check_fitted()
        return _MultiMaxStreamer(self.params_)

    def flops_per_token(self) -> float:
        self._check_fitted()
        assert self.n_features_in_ is not None
        # per head: dot product + bias, running max, weighted sum; plus the final bias
        return 2.0 * self.n_features_in_ * self.heads + 4.0 * self.heads + 1.0

    @classmethod
    def tensor_specs(
        cls, config: Mapping[str, Any], n_in: int, names: Sequence[str], file: Path
    ) -> dict[str, TensorSpec] | None:
        h = positive_int(config, "heads", 4, file)
        return {"W": ((h, n_in), FLOATS), "c": ((h,), FLOATS), "u": ((h,), FLOATS), "b": ((1,), FLOATS)}
