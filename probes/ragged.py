"""Ragged per-token inputs: sequence ``i`` is ``values[offsets[i]:offsets[i+1]]`` (an activation store's rows
and offsets), what per-token probes read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from activations.pooling import ragged_to_padded
from probes.base import ArrayLike, as_tensor

__all__ = ["Ragged", "ragged_from_store"]


@dataclass(frozen=True)
class Ragged:
    """Per-token features of ``b`` sequences: sequence ``i`` is ``values[offsets[i]:offsets[i+1]]``."""

    values: Float[Tensor, "n d"]
    offsets: np.ndarray

    def __post_init__(self) -> None:
        v, off = self.values, np.asarray(self.offsets)
        if not isinstance(v, Tensor) or v.ndim != 2:
            raise ValueError(
                f"Ragged.values must be a 2-D tensor [n_tokens, d], got {getattr(v, 'shape', v)}"
            )
        if off.ndim != 1 or len(off) < 2:
            raise ValueError("Ragged.offsets must be 1-D with at least 2 entries (one sequence)")
        if int(off[0]) != 0 or int(off[-1]) != v.shape[0]:
            raise ValueError(
                f"Ragged.offsets must run from 0 to n_tokens={v.shape[0]}, got {off[0]}..{off[-1]}"
            )
        lengths = np.diff(off)
        if (lengths <= 0).any():
            bad = int(np.nonzero(lengths <= 0)[0][0])
            raise ValueError(f"Ragged: sequence {bad} has no tokens")
        if not bool(torch.isfinite(v).all()):
            row = int((~torch.isfinite(v)).any(1).nonzero()[0, 0])
            raise ValueError(f"Ragged.values contains NaN or inf at token row {row}")

    @classmethod
    def of(cls, X: Ragged | tuple[Any, Any] | Sequence[ArrayLike]) -> Ragged:
        """From a :class:`Ragged`, a ``(values, offsets)`` pair or a list of ``[s_i, d]`` sequences."""
        if isinstance(X, Ragged):
            return X
        if (
            isinstance(X, tuple)
            and len(X) == 2
            and np.asarray(X[1]).ndim == 1
            and np.asarray(X[1]).dtype.kind in "iu"
        ):
            return cls(as_tensor(X[0]).to(torch.float32), np.asarray(X[1], dtype=np.int64))
        if isinstance(X, (list, tuple)):
            seqs = [as_tensor(s).to(torch.float32) for s in X]
            if not seqs or any(s.ndim != 2 for s in seqs):
                raise ValueError("a list of sequences must hold 2-D [tokens, d] arrays")
            off = np.concatenate([[0], np.cumsum([s.shape[0] for s in seqs])]).astype(np.int64)
            return cls(torch.cat(seqs), off)
        raise ValueError(
            f"per-token probes take Ragged, (values, offsets) or a list of [tokens, d] arrays, got {type(X)}"
        )

    @property
    def n_sequences(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(np.asarray(self.offsets))

    def sequence(self, i: int) -> Float[Tensor, "s d"]:
        return self.values[int(self.offsets[i]) : int(self.offsets[i + 1])]

    def subset(self, seqs: np.ndarray | Sequence[int]) -> Ragged:
        idx = np.asarray(seqs, dtype=np.int64)
        parts = [self.sequence(int(i)) for i in idx]
        off = np.concatenate([[0], np.cumsum([p.shape[0] for p in parts])]).astype(np.int64)
        return Ragged(torch.cat(parts), off)

    def padded(self) -> tuple[Float[Tensor, "b s d"], Bool[Tensor, "b s"]]:
        """Right-padded (left-aligned) copy and its mask."""
        return ragged_to_padded(self.values, self.offsets)


def ragged_from_store(
    store: Any,
    hooks: str | Sequence[str],
    *,
    select: str = "scored",
    sequences: np.ndarray | None = None,
    dtype: torch.dtype = torch.float32,
) -> Ragged:
    """The selected per-token rows of ``hooks`` (concatenated along features when several) as a Ragged."""
    names = [hooks] if isinstance(hooks, str) else list(hooks)
    if not names:
        raise ValueError("ragged_from_store: give at least one hook")
    rows, off = store.selection(select)
    if sequences is not None:
        seqs = np.asarray(sequences, dtype=np.int64)
        all_rows = np.arange(int(off[-1])) if rows is None else rows
        rows = np.concatenate([all_rows[off[s] : off[s + 1]] for s in seqs]) if len(seqs) else all_rows[:0]
        off = np.concatenate([[0], np.cumsum(off[seqs + 1] - off[seqs])]).astype(np.int64)
    parts = []
    for h in names:
        arr = store.activations(h)
        block = np.asarray(arr if rows is None else arr[rows], dtype=np.float32)
        parts.append(torch.from_numpy(block).to(dtype))
    values = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return Ragged(values, np.array(off, dtype=np.int64))
