"""``last``: the last scored token's value (no FLOPs)."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from activations.pooling.base import Pooling, StreamState, register_pooling


@register_pooling
@dataclasses.dataclass(frozen=True)
class Last(Pooling):
    kind = "last"
    flops_per_element = 0.0

    def _pool(self, x: Tensor, lengths: Tensor, valid: Tensor) -> Tensor:
        return x[torch.arange(x.shape[0], device=x.device), lengths - 1]

    def _ragged(self, values: Tensor, off: Tensor, lengths: Tensor, seg: Tensor) -> Tensor:
        return values[off[1:] - 1]

    def _init(self, batch: int, device: torch.device, shape: tuple[int, ...]) -> StreamState:
        return {"last": self._zeros(batch, device, shape)}

    def step(self, state: StreamState, x: Tensor, n: Tensor, low: int = 0) -> StreamState:
        return {"last": x}

    def read(self, state: StreamState, n: Tensor) -> Tensor:
        return state["last"]
