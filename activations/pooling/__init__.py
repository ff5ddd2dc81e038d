"""Poolings of per-token values into one value per sequence: one small object per pooling.

:class:`Pooling` (:mod:`activations.pooling.base`) is the protocol: padded, ragged and streaming forms of one
definition, and the pooling's cost per element. Every other module of this package defines one pooling and
registers it (:func:`register_pooling`); they are all imported here, so ``Pooling.parse("ema0.5")`` finds
every registered kind. A new pooling is one new module in this folder.
"""

from __future__ import annotations

import importlib
import pkgutil

from activations.pooling.base import (
    POOLINGS,
    Pooling,
    PoolingError,
    StreamState,
    flatten_layers,
    iter_sequence_chunks,
    pool,
    pool_kinds,
    pool_ragged,
    ragged_to_padded,
    register_pooling,
    rows_like,
)

for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")  # each registers its pooling

#: every registered pooling kind
POOL_KINDS: tuple[str, ...] = pool_kinds()

__all__ = [
    "POOLINGS",
    "POOL_KINDS",
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
