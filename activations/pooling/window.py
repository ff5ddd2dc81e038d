"""``window<M>``: the sliding-window mean of width ``M``, read out by its maximum over windows (CC++).

**Partial windows, one definition** (training, offline scoring and streaming alike): a window counts only
when it is full, or, for a sequence shorter than ``M``, as the single whole-sequence window. A stream has no
running value before its ``M``-th token, and the whole window of a stream that ends sooner is its
end-of-stream value (:meth:`Window.finish`). 2 FLOPs per element per token (add the new value, subtract the
one leaving the window); the running max's compare is not counted.
"""

from __future__ import annotations

import dataclasses

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from activations.pooling.base import Pooling, PoolingError, StreamState, register_pooling, rows_like


@register_pooling
@dataclasses.dataclass(frozen=True)
class Window(Pooling):
    window: int = 16

    kind = "window"
    param = "window"
    param_type = int
    flops_per_element = 2.0
    cost_aliases = ("sliding_window", "sliding")

    def __post_init__(self) -> None:
        if self.window < 1:
            raise PoolingError(f"window must be >= 1, got {self.window}")

    def window_means(
        self, x: Float[Tensor, "b s *d"], lengths: Int[Tensor, " b"]
    ) -> tuple[Float[Tensor, "b s *d"], Bool[Tensor, "b s ..."]]:
        """Sliding-window means of left-aligned ``x`` (``means[:, t]``: the mean of the up to ``M`` values
        ending at ``t``) and which windows count (full ones, or the whole of a sequence shorter than ``M``).
        Computed in float32 (float64 for float64 inputs)."""
        b, s = x.shape[:2]
        extra = (1,) * (x.ndim - 2)
        ar = torch.arange(s, device=x.device)
        valid = (ar[None, :] < lengths[:, None]).view(b, s, *extra)
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        c = torch.cumsum(torch.where(valid, x, 0).to(dt), 1)
        c = torch.cat([torch.zeros_like(c[:, :1]), c], 1)  # c[:, t] = sum of x[:, :t]
        start = (ar - self.window + 1).clamp(min=0)
        means = (c[:, ar + 1] - c[:, start]) / (ar - start + 1).to(dt).view(1, s, *extra)
        need = torch.minimum(lengths, torch.full_like(lengths, self.window))
        ok = (ar[None, :] < lengths[:, None]) & (ar[None, :] + 1 >= need[:, None])
        return means, ok.view(b, s, *extra)

    def _pool(self, x: Tensor, lengths: Tensor, valid: Tensor) -> Tensor:
        means, ok = self.window_means(x, lengths)
        return torch.where(ok, means, -torch.inf).amax(1).to(x.dtype)

    @property
    def min_stream_tokens(self) -> int:
        return self.window

    def _init(self, batch: int, device: torch.device, shape: tuple[int, ...]) -> StreamState:
        # a ring buffer of the last M values; a full window updates the best mean
        buf = torch.zeros((batch, self.window, *shape), device=device)
        return {"buf": buf, "best": self._ninf(batch, device, shape)}

    def step(self, state: StreamState, x: Tensor, n: Tensor, low: int = 0) -> StreamState:
        w = self.window
        idx = rows_like((n - 1) % w, x.unsqueeze(1)).expand(-1, 1, *x.shape[1:])
        buf = state["buf"].scatter(1, idx, x.unsqueeze(1))
        mean = buf.sum(1) / w
        best = torch.maximum(state["best"], mean)
        if low + 1 < w:  # some window may not be full yet
            best = torch.where(rows_like(n >= w, best), best, state["best"])
        return {"buf": buf, "best": best}

    def read(self, state: StreamState, n: Tensor) -> Tensor:
        return state["best"]

    def finish(self, state: StreamState, n: Tensor) -> Tensor:
        """A stream shorter than the window: its one whole-sequence window."""
        whole = state["buf"].sum(1) / rows_like(n.clamp(min=1), state["best"])
        return torch.where(rows_like(n < self.window, whole), whole, state["best"])
