"""The attention probe (McKenzie et al.): ``H`` learned queries score every token (``a_{h,t} = q_h·x_t``),
each head reads ``Σ_t softmax_t(a_{h,t}) · (v_h·x_t)``; the logit is the sum over heads plus a bias. The
``attention`` sweep kind; streamed with an online softmax per head."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from einops import einsum
from jaxtyping import Float, Int
from torch import Tensor

from activations.pooling.softmax import online_softmax_step
from probes.base import register_scorer
from probes.io import FLOATS, TensorSpec, positive_int
from probes.token import HeadsProbe, HeadsStreamer, Streamer, heads_kind

__all__ = ["AttentionProbe"]


class _AttentionStreamer(HeadsStreamer):
    """Running attention read-out: per head an online softmax over the tokens so far."""

    def _init_state(self, batch: int) -> dict[str, Tensor]:
        shape = (batch, self.heads)
        return {
            "m": torch.full(shape, -math.inf, device=self.device),
            "S": torch.zeros(shape, device=self.device),
            "N": torch.zeros(shape, device=self.device),
        }

    def _step(
        self, state: dict[str, Tensor], x: Float[Tensor, "b d"], n: Int[Tensor, " b"], low: int
    ) -> tuple[dict[str, Tensor], Float[Tensor, " b"]]:
        p = self.p
        a = einsum(x, p["q"], "b d, h d -> b h")
        v = einsum(x, p["v"], "b d, h d -> b h") + p["bv"]
        m, S, N = online_softmax_step(state["m"], state["S"], state["N"], a, v)
        return {"m": m, "S": S, "N": N}, v.sum(1) + p["b"][0]

    def _score(self, state: dict[str, Tensor], n: Int[Tensor, " b"]) -> Float[Tensor, " b"]:
        return (state["N"] / state["S"]).sum(1) + self.p["b"][0]


@register_scorer
class AttentionProbe(HeadsProbe):
    """Learned attention pooling: per head a query scores tokens, softmax over tokens weights a value
    read-out ``v_h·x_t``; the logit is the sum over heads plus a bias (McKenzie et al.)."""

    kind = "token_attention"
    sweep_kinds = (
        heads_kind(
            "attention",
            lambda: AttentionProbe,
            "attention probe: learned queries over tokens, attention-weighted value read-out",
        ),
    )

    def _init_params(self, d: int, gen: torch.Generator) -> dict[str, Tensor]:
        return {
            "q": torch.randn(self.heads, d, generator=gen) * 0.01,
            "v": torch.randn(self.heads, d, generator=gen) * 0.01,
            "bv": torch.zeros(self.heads),
            "b": torch.zeros(()),
        }

    def _logits(self, p: dict[str, Tensor], X: Tensor, mask: Tensor) -> Tensor:
        a = einsum(X, p["q"], "b s d, h d -> b s h")
        v = einsum(X, p["v"], "b s d, h d -> b s h") + p["bv"]
        a = torch.where(mask[:, :, None], a, torch.tensor(-math.inf, dtype=a.dtype))
        att = torch.softmax(a, dim=1)
        return (att * torch.where(mask[:, :, None], v, torch.zeros((), dtype=v.dtype))).sum((1, 2)) + p[
            "b"
        ].reshape(())

    def _fold(self, p: dict[str, Tensor], mean: Tensor, scale: Tensor) -> dict[str, Tensor]:
        q, v = p["q"] / scale, p["v"] / scale
        # a constant shift of a head's attention scores cancels in its softmax: the query needs no bias
        return {"q": q, "v": v, "bv": p["bv"] - v @ mean, "b": p["b"].reshape(1)}

    def _n_features_from_state(self) -> int:
        return int(self.params_["q"].shape[1])

    def streamer(self) -> Streamer:
        self._check_fitted()
        return _AttentionStreamer(self.params_)

    def flops_per_token(self) -> float:
        self._check_fitted()
        assert self.n_features_in_ is not None
        # two dot products per head, the value bias, and an online-softmax update per head (≈ 8 FLOPs)
        return 4.0 * self.n_features_in_ * self.heads + 9.0 * self.heads + 1.0

    @classmethod
    def tensor_specs(
        cls, config: Mapping[str, Any], n_in: int, names: Sequence[str], file: Path
    ) -> dict[str, TensorSpec] | None:
        h = positive_int(config, "heads", 4, file)
        return {"q": ((h, n_in), FLOATS), "v": ((h, n_in), FLOATS), "bv": ((h,), FLOATS), "b": ((1,), FLOATS)}
