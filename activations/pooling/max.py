"""``max``: the element-wise maximum over the scored tokens (1 FLOP per element per token: a compare)."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from activations.pooling.base import Pooling, StreamState, register_pooling


@register_pooling
@dataclasses.dataclass(frozen=True)
class Max(Pooling):
    kind = "max"
    flops_per_element = 1.0

    def _pool(self, x: Tensor, lengths: Tensor, valid: Tensor) -> Tensor:
        return torch.where(valid, x, -torch.inf).amax(1)

    def _ragged(self, values: Tensor, off: Tensor, lengths: Tensor, seg: Tensor) -> Tensor:
        out = torch.full(
            (lengths.numel(), *values.shape[1:]), -torch.inf, dtype=values.dtype, device=values.device
        )
        idx = seg.view(-1, *([1] * (values.ndim - 1))).expand_as(values)
        return out.scatter_reduce(0, idx, values, reduce="amax", include_self=True)

    def _init(self, batch: int, device: torch.device, shape: tuple[int, ...]) -> StreamState:
        return {"max": self._ninf(batch, device, shape)}

    def step(self, state: StreamState, x: Tensor, n: Tensor, low: int = 0) -> StreamState:
        return {"max": torch.maximum(state["max"], x)}

    def read(self, state: StreamState, n: Tensor) -> Tensor:
        return state["max"]
