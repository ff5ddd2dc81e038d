"""``mean``: the average of the scored tokens' values (1 FLOP per element per token: an add)."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from activations.pooling.base import Pooling, StreamState, register_pooling, rows_like


@register_pooling
@dataclasses.dataclass(frozen=True)
class Mean(Pooling):
    kind = "mean"
    flops_per_element = 1.0

    def _pool(self, x: Tensor, lengths: Tensor, valid: Tensor) -> Tensor:
        return torch.where(valid, x, 0).sum(1) / lengths.view(-1, *((1,) * (x.ndim - 2))).to(x.dtype)

    def _ragged(self, values: Tensor, off: Tensor, lengths: Tensor, seg: Tensor) -> Tensor:
        out = torch.zeros((lengths.numel(), *values.shape[1:]), dtype=values.dtype, device=values.device)
        out.index_add_(0, seg, values)
        return out / lengths.view(-1, *([1] * (values.ndim - 1))).to(values.dtype)

    def _init(self, batch: int, device: torch.device, shape: tuple[int, ...]) -> StreamState:
        return {"sum": self._zeros(batch, device, shape)}

    def step(self, state: StreamState, x: Tensor, n: Tensor, low: int = 0) -> StreamState:
        return {"sum": state["sum"] + x}

    def read(self, state: StreamState, n: Tensor) -> Tensor:
        return state["sum"] / rows_like(n.clamp(min=1), state["sum"])
