"""Pooling of per-token values (activations or per-token probe scores) into one value per sequence.

Two equivalent forms:

* padded: ``pool(values [b s *d], mask [b s]) -> [b *d]``; only positions where ``mask`` is true count, in
  order (masked positions are skipped, wherever they are);
* ragged: ``pool_ragged(values [n_tokens *d], offsets [b+1]) -> [b *d]``: sequence ``i`` is
  ``values[offsets[i]:offsets[i+1]]`` (the on-disk layout of an :class:`~activations.store.ActivationStore`).

Kinds (the same objects pool activations — pool then probe — and per-token scores — probe then pool):

* ``mean``, ``max`` (element-wise), ``last``;
* ``ema``: ``e_1 = x_1``, ``e_t = a·x_t + (1-a)·e_{t-1}``, read out by max over t (Cost-effective CC);
* ``window``: sliding-window mean of width ``w``, read out by max over windows (CC++); only full windows
  count, and a sequence shorter than ``w`` has one window, its mean (the one definition of partial windows,
  shared by training and streaming: see :mod:`probes.token`);
* ``softmax``: ``Σ_t softmax_t(x_t/τ)·x_t`` element-wise (τ→∞: mean, τ→0: max; McKenzie et al.).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from einops import rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor

PoolKind = Literal["mean", "max", "last", "ema", "window", "softmax"]
POOL_KINDS: tuple[str, ...] = ("mean", "max", "last", "ema", "window", "softmax")


class PoolingError(ValueError):
    pass


@dataclass(frozen=True)
class Pooling:
    """A pooling of per-token values; call it on padded values or use :meth:`ragged`."""

    kind: str = "mean"
    alpha: float = 0.5
    window: int = 16
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in POOL_KINDS:
            raise PoolingError(f"unknown pooling {self.kind!r}; expected one of {POOL_KINDS}")
        if not 0.0 < self.alpha <= 1.0:
            raise PoolingError(f"EMA alpha must be in (0, 1], got {self.alpha}")
        if self.window < 1:
            raise PoolingError(f"window must be >= 1, got {self.window}")
        if self.temperature <= 0:
            raise PoolingError(f"softmax temperature must be > 0, got {self.temperature}")

    # ------------------------------------------------------------------ naming
    @property
    def name(self) -> str:
        """A short stable name: ``mean``, ``ema0.5``, ``window16``, ``softmax1``."""
        if self.kind == "ema":
            return f"ema{self.alpha:g}"
        if self.kind == "window":
            return f"window{self.window}"
        if self.kind == "softmax":
            return f"softmax{self.temperature:g}"
        return self.kind

    def params(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind}
        if self.kind == "ema":
            d["alpha"] = self.alpha
        elif self.kind == "window":
            d["window"] = self.window
        elif self.kind == "softmax":
            d["temperature"] = self.temperature
        return d

    @classmethod
    def parse(cls, spec: str | dict[str, Any] | Pooling) -> Pooling:
        """From ``"mean"``, ``"ema0.5"``, ``"ema:0.5"``, ``"window16"``, ``"softmax2"`` or a dict."""
        if isinstance(spec, Pooling):
            return spec
        if isinstance(spec, dict):
            d = dict(spec)
            kind = d.pop("kind", None)
            if kind is None:
                raise PoolingError(f"pooling spec {spec!r} needs a 'kind'")
            unknown = set(d) - {"alpha", "window", "temperature"}
            if unknown:
                raise PoolingError(f"pooling spec {spec!r}: unknown key(s) {sorted(unknown)}")
            return cls(kind=str(kind), **d)
        s = str(spec).strip().lower().replace(":", "")
        for kind, field_name, conv in (
            ("ema", "alpha", float),
            ("window", "window", int),
            ("softmax", "temperature", float),
        ):
            if s.startswith(kind):
                rest = s[len(kind) :]
                if not rest:
                    return cls(kind=kind)
                try:
                    return cls(kind=kind, **{field_name: conv(rest)})  # type: ignore[arg-type]
                except ValueError as e:
                    raise PoolingError(f"cannot parse pooling {spec!r}") from e
        return cls(kind=s)

    # ------------------------------------------------------------------ padded
    def __call__(
        self, values: Float[Tensor, "b s *d"], mask: Bool[Tensor, "b s"] | None = None
    ) -> Float[Tensor, " b *d"]:
        if values.ndim < 2:
            raise PoolingError(f"values must be [batch, seq, ...], got shape {tuple(values.shape)}")
        b, s = values.shape[:2]
        if mask is None:
            mask = torch.ones(b, s, dtype=torch.bool, device=values.device)
        if mask.shape != (b, s):
            raise PoolingError(
                f"mask shape {tuple(mask.shape)} does not match values {tuple(values.shape[:2])}"
            )
        mask = mask.to(torch.bool)
        lengths = mask.sum(1)
        if bool((lengths == 0).any()):
            bad = int(torch.nonzero(lengths == 0)[0, 0])
            raise PoolingError(f"sequence {bad} has no scored tokens (its mask is all false)")
        # Left-align the valid positions (stable), so masked positions anywhere are skipped in order.
        if not _is_left_aligned(mask, lengths):
            order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
            idx = order.view(b, s, *([1] * (values.ndim - 2))).expand_as(values)
            values = torch.gather(values, 1, idx)
        return _pool_left_aligned(self, values, lengths)

    # ------------------------------------------------------------------ ragged
    def ragged(
        self, values: Float[Tensor, " n *d"], offsets: Int[Tensor, " b1"] | np.ndarray
    ) -> Float[Tensor, " b *d"]:
        """Pool ragged ``values`` (sequence i is ``values[offsets[i]:offsets[i+1]]``)."""
        off = torch.as_tensor(np.asarray(offsets), dtype=torch.long, device=values.device)
        if off.ndim != 1 or off.numel() < 2:
            raise PoolingError("offsets must be 1-D with at least 2 entries")
        if int(off[0]) != 0 or int(off[-1]) != values.shape[0]:
            raise PoolingError(
                f"offsets must run from 0 to n_tokens={values.shape[0]}, got {int(off[0])}..{int(off[-1])}"
            )
        lengths = off[1:] - off[:-1]
        if bool((lengths < 0).any()):
            raise PoolingError("offsets must be non-decreasing")
        if bool((lengths == 0).any()):
            bad = int(torch.nonzero(lengths == 0)[0, 0])
            raise PoolingError(f"sequence {bad} has no scored tokens")
        nb = lengths.numel()
        seg = torch.repeat_interleave(torch.arange(nb, device=values.device), lengths)
        if self.kind == "mean":
            out = torch.zeros((nb, *values.shape[1:]), dtype=values.dtype, device=values.device)
            out.index_add_(0, seg, values)
            return out / lengths.view(-1, *([1] * (values.ndim - 1))).to(values.dtype)
        if self.kind == "max":
            out = torch.full((nb, *values.shape[1:]), -torch.inf, dtype=values.dtype, device=values.device)
            idx = seg.view(-1, *([1] * (values.ndim - 1))).expand_as(values)
            return out.scatter_reduce(0, idx, values, reduce="amax", include_self=True)
        if self.kind == "last":
            return values[off[1:] - 1]
        # General case: scatter into a left-aligned padded block.
        pos = torch.arange(values.shape[0], device=values.device) - off[:-1][seg]
        s = int(lengths.max())
        padded = torch.zeros((nb, s, *values.shape[1:]), dtype=values.dtype, device=values.device)
        padded[seg, pos] = values
        return _pool_left_aligned(self, padded, lengths)


def _is_left_aligned(mask: Tensor, lengths: Tensor) -> bool:
    ar = torch.arange(mask.shape[1], device=mask.device)
    return bool((mask == (ar[None, :] < lengths[:, None])).all())


def _pool_left_aligned(p: Pooling, x: Tensor, lengths: Tensor) -> Tensor:
    """Pool ``x [b s *d]`` whose first ``lengths[i]`` positions are valid."""
    b, s = x.shape[:2]
    extra = (1,) * (x.ndim - 2)
    ar = torch.arange(s, device=x.device)
    valid = (ar[None, :] < lengths[:, None]).view(b, s, *extra)
    if p.kind == "mean":
        return torch.where(valid, x, 0).sum(1) / lengths.view(b, *extra).to(x.dtype)
    if p.kind == "max":
        return torch.where(valid, x, -torch.inf).amax(1)
    if p.kind == "last":
        return x[torch.arange(b, device=x.device), lengths - 1]
    if p.kind == "ema":
        a = p.alpha
        e = x[:, 0]
        best = e.clone()
        for t in range(1, s):
            e_new = a * x[:, t] + (1 - a) * e
            v = valid[:, t]
            e = torch.where(v, e_new, e)
            best = torch.where(v, torch.maximum(best, e), best)
        return best
    if p.kind == "window":
        c = torch.cumsum(
            torch.where(valid, x, 0).to(torch.float64 if x.dtype == torch.float64 else torch.float32), 1
        )
        c = torch.cat([torch.zeros_like(c[:, :1]), c], 1)  # c[:, t] = sum of x[:, :t]
        w = p.window
        t_idx = ar  # window ends at t (inclusive)
        start = (t_idx - w + 1).clamp(min=0)
        sums = c[:, t_idx + 1] - c[:, start]
        count = (t_idx - start + 1).to(sums.dtype).view(1, s, *extra)
        means = sums / count
        # a window is read if it ends inside the sequence and is full (or spans the whole short sequence)
        need = torch.minimum(lengths, torch.full_like(lengths, w))
        ok = (ar[None, :] < lengths[:, None]) & (ar[None, :] + 1 >= need[:, None])
        ok = ok.view(b, s, *extra)
        return torch.where(ok, means, -torch.inf).amax(1).to(x.dtype)
    if p.kind == "softmax":
        z = torch.where(valid, x / p.temperature, -torch.inf)
        w_ = torch.softmax(z, dim=1)
        return (w_ * torch.where(valid, x, 0)).sum(1)
    raise PoolingError(f"unknown pooling {p.kind!r}")  # pragma: no cover


def pool(
    values: Float[Tensor, "b s *d"], mask: Bool[Tensor, "b s"] | None, pooling: Pooling | str
) -> Float[Tensor, " b *d"]:
    """Functional form of :meth:`Pooling.__call__`."""
    return Pooling.parse(pooling)(values, mask)


def pool_ragged(
    values: Float[Tensor, " n *d"] | np.ndarray | Any,
    offsets: Int[Tensor, " b1"] | np.ndarray,
    pooling: Pooling | str,
    *,
    chunk_tokens: int = 1 << 18,
    dtype: torch.dtype = torch.float32,
) -> Float[Tensor, " b *d"]:
    """Pool ragged values in chunks of whole sequences (bounded memory).

    ``values`` is a tensor, an array, a memmap, or anything sliced by rows like one.
    """
    p = Pooling.parse(pooling)
    off = np.asarray(offsets, dtype=np.int64)
    outs = []
    for lo, hi in iter_sequence_chunks(off, chunk_tokens):
        block = values[off[lo] : off[hi]]
        if isinstance(block, np.ndarray):  # a memmap slice: copy out as float32 (writable, fp16 -> fp32)
            t = torch.from_numpy(np.array(block, dtype=np.float32)).to(dtype)
        else:
            t = block.to(dtype)
        outs.append(p.ragged(t, off[lo : hi + 1] - off[lo]))
    if not outs:
        raise PoolingError("no sequences to pool")
    return torch.cat(outs)


def iter_sequence_chunks(offsets: np.ndarray, chunk_tokens: int) -> Iterator[tuple[int, int]]:
    """Yield ``(lo, hi)`` sequence ranges whose tokens total at most ``chunk_tokens`` (at least one seq)."""
    n = len(offsets) - 1
    lo = 0
    while lo < n:
        limit = offsets[lo] + chunk_tokens
        hi = int(np.searchsorted(offsets, limit, side="right")) - 1
        hi = max(hi, lo + 1)
        hi = min(hi, n)
        yield lo, hi
        lo = hi


def ragged_to_padded(
    values: Float[Tensor, " n *d"], offsets: Int[Tensor, " b1"] | np.ndarray, pad_value: float = 0.0
) -> tuple[Float[Tensor, "b s *d"], Bool[Tensor, "b s"]]:
    """Right-padded copy of ragged values and its mask."""
    off = torch.as_tensor(np.asarray(offsets), dtype=torch.long, device=values.device)
    lengths = off[1:] - off[:-1]
    nb, s = lengths.numel(), int(lengths.max()) if lengths.numel() else 0
    seg = torch.repeat_interleave(torch.arange(nb, device=values.device), lengths)
    pos = torch.arange(values.shape[0], device=values.device) - off[:-1][seg]
    padded = torch.full((nb, s, *values.shape[1:]), pad_value, dtype=values.dtype, device=values.device)
    padded[seg, pos] = values
    mask = torch.zeros(nb, s, dtype=torch.bool, device=values.device)
    mask[seg, pos] = True
    return padded, mask


def flatten_layers(x: Float[Tensor, "n layers d"]) -> Float[Tensor, "n layers_d"]:
    """Concatenate per-layer features (multi-layer probes)."""
    return rearrange(x, "n l d -> n (l d)")
