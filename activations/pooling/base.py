"""The pooling protocol: one small object per pooling, registered by its own module.

A :class:`Pooling` pools per-token values (activations -- pool, then probe -- or per-token probe scores --
probe, then pool) into one value per sequence, in three forms that share one definition:

* padded: ``pooling.padded(values [b s *d], mask [b s]) -> [b *d]`` (also ``pooling(values, mask)``); only
  positions where ``mask`` is true count, in order (masked positions are skipped, wherever they are);
* ragged: ``pooling.ragged(values [n_tokens *d], offsets [b+1]) -> [b *d]``: sequence ``i`` is
  ``values[offsets[i]:offsets[i+1]]`` (the on-disk layout of an :class:`~activations.store.ActivationStore`);
* streaming: ``state = pooling.init(batch)``, then ``state = pooling.step(state, x, n)`` for each new token
  ``x [b *d]`` (``n``: each stream's token count including it), ``pooling.read(state, n)`` the *running*
  value (the pooled value of the tokens so far, NaN-masked by the caller while a stream has fewer than
  :attr:`Pooling.min_stream_tokens` tokens) and ``pooling.finish(state, n)`` the *end-of-stream* value (the
  pooled value of the whole stream: the one whole-sequence window of a stream shorter than a window).

Each pooling also states its per-token cost (:attr:`Pooling.flops_per_element`, used by
:mod:`probes.cost`). A pooling module defines one frozen dataclass subclass decorated with
:func:`register_pooling`; :meth:`Pooling.parse` resolves a name (``mean``, ``ema0.5``, ``window16``,
``softmax2``, or a dict) once, through the registry. ``name`` and ``params()`` feed run ids and saved
metadata: they never change for an existing pooling.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterator
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from einops import rearrange
from jaxtyping import Bool, Float, Int, Shaped
from torch import Tensor

__all__ = [
    "POOLINGS",
    "Pooling",
    "PoolingError",
    "StreamState",
    "flatten_layers",
    "iter_sequence_chunks",
    "pool",
    "pool_kinds",
    "pool_ragged",
    "ragged_to_padded",
    "register_pooling",
    "rows_like",
]


class PoolingError(ValueError):
    pass


#: kind -> pooling class, filled by :func:`register_pooling` in each pooling module
POOLINGS: dict[str, type[Pooling]] = {}

#: the running state of a batch of streams (every tensor's first axis is the stream)
StreamState = dict[str, Tensor]

P = TypeVar("P", bound="type[Pooling]")


def register_pooling(cls: P) -> P:
    """Class decorator: register a pooling under its ``kind`` (unique)."""
    kind = cls.kind
    if not kind or (kind in POOLINGS and POOLINGS[kind].__qualname__ != cls.__qualname__):
        raise TypeError(f"{cls.__name__}: pooling kind {kind!r} is empty or already registered")
    POOLINGS[kind] = cls
    return cls


def pool_kinds() -> tuple[str, ...]:
    """Every registered pooling kind, in registration order."""
    return tuple(POOLINGS)


def rows_like(rows: Shaped[Tensor, " b"], v: Tensor) -> Tensor:
    """A per-stream ``[b]`` tensor viewed to broadcast against a ``[b, ...]`` tensor."""
    return rows.view(-1, *([1] * (v.ndim - 1)))


@dataclasses.dataclass(frozen=True)
class Pooling(abc.ABC):
    """A pooling of per-token values (see the module docstring). Subclasses are frozen dataclasses whose
    fields are the pooling's parameters; ``param`` names the one that a short name carries (``ema0.5``)."""

    kind: ClassVar[str] = ""
    #: the parameter a short name carries after the kind (``ema<alpha>``), and its type
    param: ClassVar[str | None] = None
    param_type: ClassVar[type] = float
    #: per-token FLOPs per pooled element (the cost model's figure)
    flops_per_element: ClassVar[float] = 0.0
    #: other names the cost model accepts for this pooling (``sliding_window``, ...)
    cost_aliases: ClassVar[tuple[str, ...]] = ()
    #: whether :meth:`init` / :meth:`step` exist (a running median, say, would need every past token)
    streamable: ClassVar[bool] = True

    # ------------------------------------------------------------------ naming
    @property
    def name(self) -> str:
        """A short stable name: ``mean``, ``ema0.5``, ``window16``, ``softmax1``."""
        if self.param is None:
            return self.kind
        v = getattr(self, self.param)
        return f"{self.kind}{v:g}" if self.param_type is float else f"{self.kind}{v}"

    def params(self) -> dict[str, Any]:
        """``{"kind": ..., <param>: ...}`` (run ids and saved metadata hash this)."""
        d: dict[str, Any] = {"kind": self.kind}
        if self.param is not None:
            d[self.param] = getattr(self, self.param)
        return d

    @staticmethod
    def make(kind: str, **params: Any) -> Pooling:
        """The registered pooling ``kind`` with ``params`` (parameters of other kinds are ignored)."""
        cls = POOLINGS.get(kind)
        if cls is None:
            raise PoolingError(f"unknown pooling {kind!r}; expected one of {pool_kinds()}")
        own = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in own})

    @classmethod
    def parse(cls, spec: str | dict[str, Any] | Pooling, *, aliases: bool = False) -> Pooling:
        """From ``"mean"``, ``"ema0.5"``, ``"ema:0.5"``, ``"window16"``, ``"softmax2"`` or a dict
        (``{"kind": "ema", "alpha": 0.5}``). ``aliases`` also accepts the cost model's other names."""
        if isinstance(spec, Pooling):
            return spec
        if isinstance(spec, dict):
            d = dict(spec)
            kind = d.pop("kind", None)
            if kind is None:
                raise PoolingError(f"pooling spec {spec!r} needs a 'kind'")
            known = {p.param for p in POOLINGS.values() if p.param is not None}
            unknown = set(d) - known
            if unknown:
                raise PoolingError(f"pooling spec {spec!r}: unknown key(s) {sorted(unknown)}")
            return cls.make(str(kind), **d)
        s = str(spec).strip().lower().replace(":", "")
        if aliases:
            s = next((k for k, c in POOLINGS.items() if s in c.cost_aliases), s)
        if s in POOLINGS:
            return cls.make(s)
        for kind, pcls in sorted(POOLINGS.items(), key=lambda kv: -len(kv[0])):
            if pcls.param is not None and s.startswith(kind):
                try:
                    return pcls(**{pcls.param: pcls.param_type(s[len(kind) :])})
                except ValueError as e:
                    raise PoolingError(f"cannot parse pooling {spec!r}") from e
        return cls.make(s)

    # ------------------------------------------------------------------ padded
    def __call__(
        self, values: Float[Tensor, "b s *d"], mask: Bool[Tensor, "b s"] | None = None
    ) -> Float[Tensor, " b *d"]:
        return self.padded(values, mask)

    def padded(
        self, values: Float[Tensor, "b s *d"], mask: Bool[Tensor, "b s"] | None = None
    ) -> Float[Tensor, " b *d"]:
        """Pool padded ``values``; positions where ``mask`` is false are skipped (default: none)."""
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
        return self.left_aligned(values, lengths)

    def left_aligned(self, x: Float[Tensor, "b s *d"], lengths: Int[Tensor, " b"]) -> Float[Tensor, " b *d"]:
        """Pool ``x`` whose first ``lengths[i]`` positions of row ``i`` are valid."""
        b, s = x.shape[:2]
        ar = torch.arange(s, device=x.device)
        valid = (ar[None, :] < lengths[:, None]).view(b, s, *((1,) * (x.ndim - 2)))
        return self._pool(x, lengths, valid)

    @abc.abstractmethod
    def _pool(self, x: Tensor, lengths: Tensor, valid: Tensor) -> Tensor:
        """The masked kernel: ``x [b s *d]`` left-aligned, ``valid [b s 1..]`` broadcastable to it."""

    # ------------------------------------------------------------------ ragged
    def ragged(
        self, values: Float[Tensor, " n *d"], offsets: Int[Tensor, " b1"] | Int[np.ndarray, " b1"]
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
        seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=values.device), lengths)
        return self._ragged(values, off, lengths, seg)

    def _ragged(self, values: Tensor, off: Tensor, lengths: Tensor, seg: Tensor) -> Tensor:
        """The ragged kernel (default: scatter into a left-aligned padded block and :meth:`_pool`)."""
        nb = lengths.numel()
        pos = torch.arange(values.shape[0], device=values.device) - off[:-1][seg]
        s = int(lengths.max())
        padded = torch.zeros((nb, s, *values.shape[1:]), dtype=values.dtype, device=values.device)
        padded[seg, pos] = values
        return self.left_aligned(padded, lengths)

    # ------------------------------------------------------------------ streaming
    @property
    def min_stream_tokens(self) -> int:
        """Tokens a stream needs before it has a running value (``M`` for ``window<M>``, else 1)."""
        return 1

    def init(
        self, batch: int, device: torch.device | str | None = None, shape: tuple[int, ...] = ()
    ) -> StreamState:
        """The state of ``batch`` empty streams of ``shape``-shaped values."""
        self._check_streamable()
        return self._init(batch, torch.device(device if device is not None else "cpu"), shape)

    def _init(self, batch: int, device: torch.device, shape: tuple[int, ...]) -> StreamState:
        raise NotImplementedError  # pragma: no cover - every streamable pooling defines it

    def step(
        self, state: StreamState, x: Float[Tensor, " b *d"], n: Int[Tensor, " b"], low: int = 0
    ) -> StreamState:
        """The state after one more token ``x`` per stream. ``n``: each stream's count including it;
        ``low``: a lower bound of every stream's count before it (enables fast paths; 0 is always safe)."""
        raise NotImplementedError  # pragma: no cover - every streamable pooling defines it

    def read(self, state: StreamState, n: Int[Tensor, " b"]) -> Float[Tensor, " b *d"]:
        """The running value: the pooled value of each stream's tokens so far."""
        raise NotImplementedError  # pragma: no cover - every streamable pooling defines it

    def finish(self, state: StreamState, n: Int[Tensor, " b"]) -> Float[Tensor, " b *d"]:
        """The end-of-stream value (the running value, unless the pooling says otherwise)."""
        return self.read(state, n)

    def _check_streamable(self) -> None:
        if not self.streamable:
            raise PoolingError(f"{self.name} pooling has no streaming form")

    def _zeros(self, batch: int, device: torch.device, shape: tuple[int, ...]) -> Tensor:
        return torch.zeros((batch, *shape), device=device)

    def _ninf(self, batch: int, device: torch.device, shape: tuple[int, ...]) -> Tensor:
        return torch.full((batch, *shape), -torch.inf, device=device)


def _is_left_aligned(mask: Tensor, lengths: Tensor) -> bool:
    ar = torch.arange(mask.shape[1], device=mask.device)
    return bool((mask == (ar[None, :] < lengths[:, None])).all())


def pool(
    values: Float[Tensor, "b s *d"], mask: Bool[Tensor, "b s"] | None, pooling: Pooling | str
) -> Float[Tensor, " b *d"]:
    """Functional form of :meth:`Pooling.padded`."""
    return Pooling.parse(pooling).padded(values, mask)


def pool_ragged(
    values: Float[Tensor, " n *d"] | np.ndarray | Any,
    offsets: Int[Tensor, " b1"] | Int[np.ndarray, " b1"],
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


def iter_sequence_chunks(offsets: Int[np.ndarray, " b1"], chunk_tokens: int) -> Iterator[tuple[int, int]]:
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
    values: Shaped[Tensor, " n *d"],
    offsets: Int[Tensor, " b1"] | Int[np.ndarray, " b1"],
    pad_value: float = 0.0,
) -> tuple[Shaped[Tensor, "b s *d"], Bool[Tensor, "b s"]]:
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
