"""``softmax<tau>``: the softmax-weighted mean ``Σ_t softmax_t(x_t/τ)·x_t`` element-wise (τ→∞: mean, τ→0:
max; McKenzie et al.). ≈ 4 FLOPs per element per token (exp, multiply, two running sums); streamed with an
online softmax."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from activations.pooling.base import Pooling, PoolingError, StreamState, register_pooling


def online_softmax_step(
    m: Tensor, S: Tensor, N: Tensor, a: Tensor, v: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One token of a running ``Σ_t softmax_t(a_t)·v_t = N / S`` (max-shifted by ``m``; ``m = -inf`` and
    ``S = N = 0`` before the first token), element-wise."""
    m_new = torch.maximum(m, a)
    r_old, r_new = torch.exp(m - m_new), torch.exp(a - m_new)
    return m_new, S * r_old + r_new, N * r_old + r_new * v


@register_pooling
@dataclasses.dataclass(frozen=True)
class Softmax(Pooling):
    temperature: float = 1.0

    kind = "softmax"
    param = "temperature"
    flops_per_element = 4.0
    cost_aliases = ("attention",)

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise PoolingError(f"softmax temperature must be > 0, got {self.temperature}")

    def _pool(self, x: Tensor, lengths: Tensor, valid: Tensor) -> Tensor:
        z = torch.where(valid, x / self.temperature, -torch.inf)
        w_ = torch.softmax(z, dim=1)
        return (w_ * torch.where(valid, x, 0)).sum(1)

    def _init(self, batch: int, device: torch.device, shape: tuple[int, ...]) -> StreamState:
        z = self._zeros(batch, device, shape)
        return {"m": self._ninf(batch, device, shape), "S": z, "N": z.clone()}

    def step(self, state: StreamState, x: Tensor, n: Tensor, low: int = 0) -> StreamState:
        m, S, N = online_softmax_step(state["m"], state["S"], state["N"], x / self.temperature, x)
        return {"m": m, "S": S, "N": N}

    def read(self, state: StreamState, n: Tensor) -> Tensor:
        return state["N"] / state["S"]
