"""The :class:`Probe` base type, input validation and the registry of probe families.

A probe maps activations ``X`` (``[n, d]`` for single-layer probes) to one logit per row. Every family
subclasses :class:`Probe`, sets a unique ``kind`` and decorates itself with :func:`register_probe` so that
:func:`probes.io.load_probe` can rebuild it from the ``kind`` written in ``probe.json``.

Saving is split in two: :meth:`Probe.get_config` (JSON-able hyper-parameters, enough to call the
constructor) and :meth:`Probe.state_dict` (named tensors, written with safetensors). No pickle.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Self, TypeVar

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

__all__ = [
    "PROBE_REGISTRY",
    "ArrayLike",
    "Probe",
    "as_tensor",
    "check_X",
    "check_Xy",
    "get_probe_class",
    "register_probe",
]

ArrayLike = Tensor | np.ndarray

PROBE_REGISTRY: dict[str, type[Probe]] = {}

P = TypeVar("P", bound="type[Probe]")


#: modules whose import registers probe families (searched in order by :func:`get_probe_class`)
PROBE_MODULES: list[str] = [
    "probes.linear",
    "probes.token",
    "sae.probe",
    "probes.finetune",
    "probes.ensemble",
    "probes.cascade",
    "probes.baselines",
]


def register_probe(cls: P) -> P:
    """Class decorator: register a probe family under its ``kind`` (must be unique)."""
    kind = getattr(cls, "kind", None)
    if not isinstance(kind, str) or not kind:
        raise TypeError(f"{cls.__name__} must define a non-empty class attribute `kind`")
    existing = PROBE_REGISTRY.get(kind)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"probe kind {kind!r} is already registered by {existing.__qualname__}")
    PROBE_REGISTRY[kind] = cls
    return cls


def get_probe_class(kind: str) -> type[Probe]:
    """The registered class for ``kind`` (importing the built-in and plug-in families first).

    ``kind`` comes from a saved file and is only ever a key of :data:`PROBE_REGISTRY`: the modules imported
    are the fixed list :data:`PROBE_MODULES`, never a name taken from the file."""
    if not isinstance(kind, str):
        raise ValueError(f"a probe kind is a string, got {type(kind).__name__}")
    if kind not in PROBE_REGISTRY:
        import importlib
        import importlib.util

        for module in PROBE_MODULES:
            if kind in PROBE_REGISTRY:
                break
            if importlib.util.find_spec(module.split(".")[0]) and importlib.util.find_spec(module):
                importlib.import_module(module)  # registers its families
    try:
        return PROBE_REGISTRY[kind]
    except KeyError:
        known = ", ".join(sorted(PROBE_REGISTRY)) or "none"
        raise ValueError(f"unknown probe kind {kind!r} (registered kinds: {known})") from None


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


# ----------------------------------------------------------------------------------------------------------
# the base class
# ----------------------------------------------------------------------------------------------------------


class Probe(abc.ABC):
    """A binary classifier on activations. Subclasses implement ``_fit``, ``_decision_function``,
    ``get_config``, ``state_dict`` and ``load_state_dict``; the public methods validate inputs."""

    kind: ClassVar[str] = ""
    #: number of input dimensions per example (2 for ``[n, d]``; multi-layer probes use 3)
    input_ndim: ClassVar[int] = 2

    n_features_in_: int | None = None

    # -- fitting / scoring ---------------------------------------------------------------------------------

    def fit(self, X: ArrayLike, y: ArrayLike, sample_weight: ArrayLike | None = None) -> Self:
        """Fit on features ``X`` (``[n, d]``) and labels ``y`` in {0, 1} (soft labels allowed)."""
        Xt, yt, wt = check_Xy(X, y, sample_weight, ndim=self.input_ndim)
        self.n_features_in_ = int(np.prod(Xt.shape[1:]))
        self._fit(Xt, yt, wt)
        return self

    def decision_function(self, X: ArrayLike) -> Float[Tensor, " n"]:
        """Logits, one per row of ``X``."""
        self._check_fitted()
        Xt = check_X(X, ndim=self.input_ndim, n_features=self.n_features_in_)
        return self._decision_function(Xt)

    def predict_proba(self, X: ArrayLike) -> Float[Tensor, " n"]:
        """P(harmful | x) = sigmoid(logit)."""
        return torch.sigmoid(self.decision_function(X))

    def predict(self, X: ArrayLike, threshold: float = 0.5) -> Float[Tensor, " n"]:
        """Hard 0/1 predictions at a probability threshold."""
        return (self.predict_proba(X) >= threshold).to(torch.float32)

    def flops_per_token(self) -> float:
        """FLOPs to score one token's activation: a dot product (2·d_in) plus the bias add."""
        self._check_fitted()
        assert self.n_features_in_ is not None
        return 2.0 * self.n_features_in_ + 1.0

    @property
    def is_fitted(self) -> bool:
        return self.n_features_in_ is not None

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise RuntimeError(f"this {type(self).__name__} is not fitted yet; call fit() first")

    @abc.abstractmethod
    def _fit(self, X: Tensor, y: Float[Tensor, " n"], sample_weight: Float[Tensor, " n"] | None) -> None: ...

    @abc.abstractmethod
    def _decision_function(self, X: Tensor) -> Float[Tensor, " n"]: ...

    # -- persistence ---------------------------------------------------------------------------------------

    @abc.abstractmethod
    def get_config(self) -> dict[str, Any]:
        """JSON-able constructor arguments (``type(self)(**get_config())`` rebuilds an unfitted twin)."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Tensor]:
        """The fitted tensors (contiguous, CPU)."""

    @abc.abstractmethod
    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore the fitted tensors written by :meth:`state_dict` (sets ``n_features_in_``)."""

    @classmethod
    def from_config(cls, config: Mapping[str, Any], state: Mapping[str, Tensor] | None = None) -> Self:
        probe = cls(**dict(config))
        if state is not None:
            probe.load_state_dict(state)
        return probe

    def save(self, path: Any, metadata: Mapping[str, Any] | None = None) -> None:
        from probes.io import save_probe

        save_probe(self, path, dict(metadata or {}))

    @classmethod
    def load(cls, path: Any, *, expect: Mapping[str, Any] | None = None) -> Probe:
        from probes.io import load_probe

        probe = load_probe(path, expect=dict(expect) if expect is not None else None)
        if not isinstance(probe, cls):
            raise ValueError(f"probe at {path} is a {type(probe).__name__}, not a {cls.__name__}")
        return probe

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


ProbeFactory = Callable[..., Probe]
