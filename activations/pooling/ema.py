"""``ema<alpha>``: an exponential moving average ``e_1 = x_1, e_t = a·x_t + (1-a)·e_{t-1}``, read out by its
maximum over t (Cost-effective CC). 3 FLOPs per element per token (two multiplies and an add); the running
max's compare is not counted."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from activations.pooling.base import Pooling, PoolingError, StreamState, register_pooling, rows_like


@register_pooling
@dataclasses.dataclass(frozen=True)
class Ema(Pooling):
    alpha: float = 0.5

    kind = "ema"
    param = "alpha"
    flops_per_element = 3.0
    cost_aliases = ("exp",)

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha <= 1.0:
            raise PoolingError(f"EMA alpha must be in (0, 1], got {self.alpha}")

    def _pool(self, x: Tensor, lengths: Tensor, valid: Tensor) -> Tensor:
        a = self.alpha
        e = x[:, 0]
        best = e.clone()
        for t in range(1, x.shape[1]):
            e_new = a * x[:, t] + (1 - a) * e
            v = valid[:, t]
            e = torch.where(v, e_new, e)
            best = torch.where(v, torch.maximum(best, e), best)
        return best

    def _init(self, batch: int, device: torch.device, shape: tuple[int, ...]) -> StreamState:
        return {"e": self._zeros(batch, device, shape), "best": self._ninf(batch, device, shape)}

    def step(self, state: StreamState, x: Tensor, n: Tensor, low: int = 0) -> StreamState:
        if low >= 1:
            e = torch.lerp(state["e"], x, self.alpha)
        else:  # a stream's first token starts its average
            e = torch.where(rows_like(n == 1, x), x, torch.lerp(state["e"], x, self.alpha))
        return {"e": e, "best": torch.maximum(state["best"], e)}

    def read(self, state: StreamState, n: Tensor) -> Tensor:
        return state["best"]
