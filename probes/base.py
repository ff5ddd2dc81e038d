"""The floor of ``probes/``: what a scorer family declares, the one registry of families, and input
validation.

Everything that scores a sequence is a *scorer* (:class:`probes.scorer.Scorer`): it fits on a training view,
scores a view, states its cost under a :class:`~probes.cost.CostModel` and is saved and loaded through
:mod:`probes.io`. A family is one class in its own module, decorated with :func:`register_scorer`:

* ``kind`` -- the name saved in its folder (``probe.json`` / ``classifier.json``), the registry key;
* ``view`` -- what it reads (:data:`VIEWS`): pooled activations of one hook (``pooled``) or of several layers
  (``pooled_layers``), per-token activations (``tokens``), every token's residual stream at one layer
  (``residual``), the model's input token ids (``token_ids``), the raw text (``text``), pooled SAE latents
  (``sae_latents``) or other scorers' scores (``scores``);
* ``sweep_kinds`` -- the names a sweep spec may use for it (:class:`SweepKind`: per layer or not, whether it
  uses the spec's C grid, the ``params`` it accepts, and how a spec entry becomes constructor arguments).

The sweep reads these declarations; it has no per-family switch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

__all__ = [
    "POOLED",
    "POOLED_LAYERS",
    "POOLING_VIEWS",
    "RESIDUAL",
    "SAE_LATENTS",
    "SCORERS",
    "SCORES",
    "SWEEP_KINDS",
    "TEXT",
    "TOKENS",
    "TOKEN_IDS",
    "VIEWS",
    "ArrayLike",
    "SweepKind",
    "as_tensor",
    "check_X",
    "check_Xy",
    "check_sample_weight",
    "check_y",
    "register_scorer",
    "scorer_class",
    "sweep_kind",
]

ArrayLike = Tensor | np.ndarray

# ----------------------------------------------------------------------------------------------------------
# views: what a scorer reads
# ----------------------------------------------------------------------------------------------------------

POOLED = "pooled"  #: ``[n, d]`` pooled activations of one hook (a layer, or the token embeddings)
POOLED_LAYERS = "pooled_layers"  #: ``[n, layers, d]`` pooled activations of several layers
TOKENS = "tokens"  #: per-token activations of one or several layers (:class:`probes.ragged.Ragged`)
RESIDUAL = "residual"  #: every token's residual stream at one layer (:class:`probes.finetune.Sequences`)
TOKEN_IDS = "token_ids"  #: the model's whole input, token ids (:class:`probes.finetune.Sequences`)
TEXT = "text"  #: the raw text of each example
SAE_LATENTS = "sae_latents"  #: pooled SAE latents of one layer
SCORES = "scores"  #: other scorers' scores (ensembles, cascades)
VIEWS: tuple[str, ...] = (POOLED, POOLED_LAYERS, TOKENS, RESIDUAL, TOKEN_IDS, TEXT, SAE_LATENTS, SCORES)
#: the views that depend on the sweep's pooling: other scorers bring their own read-out and run once
POOLING_VIEWS: frozenset[str] = frozenset({POOLED, POOLED_LAYERS, SAE_LATENTS})


# ----------------------------------------------------------------------------------------------------------
# the registry
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepKind:
    """A name a sweep spec may use (the ``probe`` column of the results) for a scorer family.

    ``build(entry)`` turns the spec's probe entry (``kind``, ``params``, ``class_weight``, ``penalty``,
    ``l1_ratio``, ``shrinkage``, ``layers``, and ``seed``) into ``(scorer class, constructor keyword
    arguments)``; ``per_layer`` kinds run once per collected layer, the others once; ``uses_C`` kinds are
    fitted for every C of the spec's grid (``C`` is passed to the constructor) and the C is chosen on
    validation; ``params`` are the keys of ``params`` the kind accepts. ``hook`` fixes the hook it reads
    (the token embeddings of the surface baseline) and ``hook_label`` names it in the results."""

    name: str
    build: Callable[[Mapping[str, Any]], tuple[type[Any], dict[str, Any]]]
    per_layer: bool = True
    uses_C: bool = True
    params: frozenset[str] = field(default_factory=frozenset)
    description: str = ""
    hook: str | None = None
    hook_label: str | None = None

    def make(self, entry: Mapping[str, Any], **extra: Any) -> Any:
        """An unfitted scorer for a spec entry (``extra``: e.g. ``C``)."""
        cls, kw = self.build(entry)
        return cls(**kw, **extra)


#: saved kind -> scorer class, filled by :func:`register_scorer`
SCORERS: dict[str, type[Any]] = {}
#: sweep kind name -> :class:`SweepKind`, filled by :func:`register_scorer` from each class's ``sweep_kinds``
SWEEP_KINDS: dict[str, SweepKind] = {}

C = TypeVar("C", bound=type)


def register_scorer(cls: C) -> C:
    """Class decorator: register a scorer family under its ``kind`` (unique) and its ``sweep_kinds``."""
    kind = getattr(cls, "kind", None)
    if not isinstance(kind, str) or not kind:
        raise TypeError(f"{cls.__name__} must define a non-empty class attribute `kind`")
    existing = SCORERS.get(kind)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"probe kind {kind!r} is already registered by {existing.__qualname__}")
    SCORERS[kind] = cls
    for sk in cls.__dict__.get("sweep_kinds", ()):
        other = SWEEP_KINDS.get(sk.name)
        if other is not None and other.build.__qualname__ != sk.build.__qualname__:
            raise ValueError(f"sweep kind {sk.name!r} is already registered")
        SWEEP_KINDS[sk.name] = sk
    return cls


def scorer_class(kind: str) -> type[Any]:
    """The registered class of a saved ``kind`` (only ever a key of :data:`SCORERS`: nothing is imported by
    a name read from a file). Families register when their module is imported: ``import probes`` imports
    every family of this package, ``import sae`` the SAE-feature probe."""
    if not isinstance(kind, str):
        raise ValueError(f"a probe kind is a string, got {type(kind).__name__}")
    try:
        return SCORERS[kind]
    except KeyError:
        known = ", ".join(sorted(SCORERS)) or "none"
        raise ValueError(f"unknown probe kind {kind!r} (registered kinds: {known})") from None


def sweep_kind(name: str) -> SweepKind:
    """The registered sweep kind ``name``."""
    try:
        return SWEEP_KINDS[name]
    except KeyError:
        raise ValueError(f"unknown probe kind {name!r}; known kinds: {sorted(SWEEP_KINDS)}") from None


# ----------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------


def as_tensor(x: ArrayLike | Any, *, name: str = "X") -> Tensor:
    """Convert numpy arrays (and nested sequences) to a tensor, without copying where possible.

    Integer and boolean inputs become float32; half precision floats are kept (callers upcast)."""
    if isinstance(x, Tensor):
        t = x
    elif isinstance(x, np.ndarray):
        arr = x if x.flags.writeable else np.array(x)  # torch.from_numpy warns on read-only memmaps
        try:
            t = torch.from_numpy(np.ascontiguousarray(arr))
        except TypeError as exc:  # strings, objects
            raise ValueError(f"{name} must hold numbers, got dtype {arr.dtype}") from exc
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} must be a tensor or array, got {type(x).__name__}") from exc
    if not (t.is_floating_point()):
        if t.is_complex():
            raise ValueError(f"{name} must be real-valued")
        t = t.to(torch.float32)
    return t


def _check_finite(X: Tensor, name: str) -> None:
    finite = torch.isfinite(X)
    if not bool(finite.all()):
        bad = (~finite).reshape(X.shape[0], -1).any(dim=1).nonzero()
        i = int(bad[0, 0]) if bad.numel() else -1
        raise ValueError(f"{name} contains NaN or inf at row {i}")


def check_X(X: ArrayLike, *, ndim: int = 2, n_features: int | None = None, name: str = "X") -> Tensor:
    """Validate a feature matrix: right rank, non-empty, finite, and (if given) ``n_features`` columns."""
    t = as_tensor(X, name=name)
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 rows)")
    if any(s == 0 for s in t.shape[1:]):
        raise ValueError(f"{name} has an empty feature dimension, shape {tuple(t.shape)}")
    if n_features is not None and int(np.prod(t.shape[1:])) != n_features:
        raise ValueError(
            f"{name} has {int(np.prod(t.shape[1:]))} features (shape {tuple(t.shape)}), but the probe was "
            f"fitted with {n_features}"
        )
    _check_finite(t, name)
    return t


def check_y(
    y: ArrayLike | Sequence[float], n: int, *, name: str = "y", rows: str = "X", unit: str = "rows"
) -> Float[Tensor, " n"]:
    """Validate labels: length ``n`` (of ``rows``, counted in ``unit``, for the error), values in [0, 1]
    (hard or soft), both classes present."""
    t = as_tensor(y, name=name)
    if t.ndim == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {tuple(t.shape)}")
    if t.shape[0] != n:
        raise ValueError(f"{rows} and {name} have different lengths: {n} {unit} vs {t.shape[0]} labels")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf")
    if bool((t < 0).any()) or bool((t > 1).any()):
        raise ValueError(f"{name} must hold labels in [0, 1] (0 = harmless, 1 = harmful)")
    hard = t >= 0.5
    if bool(hard.all()) or not bool(hard.any()):
        raise ValueError(f"only one class present in {name} (all labels are {int(hard[0])}); need both")
    return t


def check_sample_weight(sample_weight: ArrayLike | None, n: int) -> Float[Tensor, " n"] | None:
    if sample_weight is None:
        return None
    w = as_tensor(sample_weight, name="sample_weight")
    if w.ndim != 1 or w.shape[0] != n:
        raise ValueError(f"sample_weight must have shape ({n},), got {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not bool((w > 0).any()):
        raise ValueError("sample_weight must be finite, non-negative and not all zero")
    return w


def check_Xy(
    X: ArrayLike, y: ArrayLike, sample_weight: ArrayLike | None = None, *, ndim: int = 2
) -> tuple[Tensor, Float[Tensor, " n"], Float[Tensor, " n"] | None]:
    """Validate a training set; returns tensors ``(X, y, sample_weight)``."""
    Xt = as_tensor(X)
    if Xt.ndim >= 1 and Xt.shape[0] == 0:
        raise ValueError("X is empty (0 rows)")
    yt = as_tensor(y, name="y")
    if Xt.ndim >= 1 and yt.ndim >= 1 and Xt.shape[0] != yt.shape[0]:
        raise ValueError(f"X and y have different lengths: {Xt.shape[0]} rows vs {yt.shape[0]} labels")
    Xt = check_X(Xt, ndim=ndim)
    yt = check_y(yt, Xt.shape[0])
    return Xt, yt, check_sample_weight(sample_weight, Xt.shape[0])
