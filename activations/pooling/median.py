"""``median``: the element-wise median of the scored tokens' values (the mean of the two middle values for
an even count), robust to a few extreme tokens.

Not streamable: the exact running median of a stream needs every past value (state that grows with the
stream and ``O(t)`` work per token), which is not the constant-cost update a streaming monitor runs on, and
an approximate one would break the rule that a stream's running value is the offline value of its prefix.
Costed at 3 FLOPs per element per token (expected linear-time selection: about three comparisons per
element).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from activations.pooling.base import Pooling, register_pooling


@register_pooling
@dataclasses.dataclass(frozen=True)
class Median(Pooling):
    kind = "median"
    flops_per_element = 3.0
    streamable = False

    def _pool(self, x: Tensor, lengths: Tensor, valid: Tensor) -> Tensor:
        srt = torch.sort(torch.where(valid, x, torch.inf), dim=1).values  # padding sorts last
        shape = (x.shape[0], 1, *x.shape[2:])
        lo = ((lengths - 1) // 2).view(-1, *((1,) * (x.ndim - 1))).expand(shape)
        hi = (lengths // 2).view(-1, *((1,) * (x.ndim - 1))).expand(shape)
        return ((srt.gather(1, lo) + srt.gather(1, hi)) / 2).squeeze(1)
