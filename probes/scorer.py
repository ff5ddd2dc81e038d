"""The one scorer protocol, and :class:`Probe`, its form for probes on activation tensors.

A :class:`Scorer` is anything that scores a sequence: a probe on pooled activations, a per-token probe with
its aggregation, an SAE-feature probe, fine-tuned layers, a text classifier, an ensemble, a cascade. It

* fits on a training view: ``fit(X, y, *, val=None, val_y=None, select_metric=..., progress=False)`` (the
  view is the family's ``view``, see :mod:`probes.base`; families that choose something on validation, such
  as an epoch or their own C, use ``val``);
* scores a view: ``decision_function(X)`` (one logit per sequence; ``score(X)`` as a numpy array);
* states its per-token cost: ``cost(cost_model, layers=..., pooling=...)`` -> ``(marginal, standalone)``
  :class:`~probes.cost.ProbeCost`;
* is saved and loaded through :mod:`probes.io` (``save(path, metadata)``, ``Scorer.load(path, ...)``); the
  family's ``layout`` says which folder layout it writes.

``fit_grid`` fits one family on several problems (layers) × the spec's C grid; the default loops, the
logistic family solves every problem × C in one batched call.

A :class:`Probe` reads ``[n, d]`` tensors (``[n, layers, d]`` for multi-layer probes): the public methods
validate inputs, subclasses implement ``_fit`` / ``_decision_function``, and saving is split into
:meth:`Probe.get_config` (JSON-able hyper-parameters) and :meth:`Probe.state_dict` (tensors). No pickle.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from activations.pooling import Pooling
from probes.base import (
    POOLED,
    ArrayLike,
    SweepKind,
    check_X,
    check_Xy,
    scorer_class,
)
from probes.cost import CostModel, ProbeCost
from probes.io import ProbeLoadError, TensorSpec, check_config, load_scorer, save_scorer

__all__ = ["Grid", "Probe", "Scorer"]

S = TypeVar("S", bound="Scorer")
P = TypeVar("P", bound="Probe")


class Grid:
    """A family fitted on ``p`` problems (e.g. layers) × its candidates (e.g. C values): ``scorer(i, j)``,
    and every candidate's scores on each problem's validation view."""

    def __init__(self, scorers: Sequence[Sequence[Scorer]]) -> None:
        self.scorers = [list(row) for row in scorers]

    def scorer(self, problem: int, candidate: int) -> Scorer:
        return self.scorers[problem][candidate]

    def val_scores(self, X: Sequence[Any]) -> list[np.ndarray]:
        """Per problem, ``[candidates, n]`` scores of every candidate on that problem's ``X``."""
        return [np.stack([s.score(x) for s in row]) for row, x in zip(self.scorers, X, strict=True)]


class Scorer(abc.ABC):
    """Everything that scores a sequence (see the module docstring)."""

    #: the saved kind (the registry key, written in the folder)
    kind: ClassVar[str] = ""
    #: what ``fit`` and ``decision_function`` read (a view of :mod:`probes.base`)
    view: ClassVar[str] = POOLED
    #: how :mod:`probes.io` saves it: ``probe`` (probe.json), ``classifier`` (a text classifier's
    #: classifier.json), ``sequence`` (fine-tuned layers' classifier.json) or ``ensemble`` (ensemble.json)
    layout: ClassVar[str] = "probe"
    #: the names a sweep spec may use for this family
    sweep_kinds: ClassVar[tuple[SweepKind, ...]] = ()
    #: whether the constructor takes the policy ``model`` (fine-tuned layers, the prompted classifier)
    needs_model: ClassVar[bool] = False
    #: False for zero-shot scorers: they learn nothing (no validation set; their training scores are NaN)
    needs_fit: ClassVar[bool] = True

    #: input features per token (None where the scorer does not read activation vectors)
    n_features_in_: int | None = None

    # -- the protocol --------------------------------------------------------------------------------------
    @abc.abstractmethod
    def fit(self: S, X: Any, y: Any, *args: Any, **kwargs: Any) -> S:
        """Fit on the training view ``X`` and labels ``y`` in [0, 1] (``val`` / ``val_y``: the validation
        view and labels, for families that choose something on validation)."""

    @abc.abstractmethod
    def decision_function(self, X: Any) -> Any:
        """One logit per sequence of the view ``X`` (higher = more harmful)."""

    def score(self, X: Any) -> np.ndarray:
        """:meth:`decision_function` as a numpy array (its dtype kept)."""
        out = self.decision_function(X)
        return out.detach().cpu().numpy() if isinstance(out, Tensor) else np.asarray(out)

    def cost(
        self, cm: CostModel, *, layers: Sequence[int] = (), pooling: Pooling | None = None
    ) -> tuple[ProbeCost, ProbeCost]:
        """``(marginal, standalone)`` per-token cost when reading ``layers`` pooled by ``pooling``."""
        raise NotImplementedError(f"{type(self).__name__} states no cost")

    def pooling_label(self, pooling: Pooling) -> str:
        """What the results' ``pooling`` column shows for this scorer run in the ``pooling`` group (a
        scorer with its own read-out names it)."""
        return pooling.name

    def row_extras(self, model_name: str, n_layers: int) -> dict[str, Any]:
        """Extra result columns of a finished run (``variant``, sizes, the chosen epoch, ...)."""
        return {}

    def row_layers(self, n_layers: int) -> list[int] | None:
        """The layers the results name for this scorer (None: the layers the sweep gave it)."""
        return None

    @classmethod
    def input_hooks(cls, entry: Mapping[str, Any], n_layers: int) -> list[str]:
        """Hooks a spec entry of this family reads from stores that keep every token (``residual`` view)."""
        return []

    @abc.abstractmethod
    def get_config(self) -> dict[str, Any]:
        """JSON-able constructor arguments (``type(self)(**get_config())`` rebuilds an unfitted twin)."""

    @classmethod
    def fit_grid(cls, X: Sequence[Any], y: Any, Cs: Sequence[float] | None, **config: Any) -> Grid:
        """Fit on every problem's ``X`` × every ``C`` (``Cs=None``: one candidate, no ``C``)."""
        grid = [None] if Cs is None else list(Cs)
        return Grid([[cls(**config, **({} if c is None else {"C": c})).fit(x, y) for c in grid] for x in X])

    # -- persistence ---------------------------------------------------------------------------------------
    def save(self, path: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
        """Write to folder ``path`` atomically (:func:`probes.io.save_scorer`)."""
        return save_scorer(self, path, dict(metadata or {}))

    @classmethod
    def load(cls, path: str | Path, *, expect: Mapping[str, Any] | None = None, **context: Any) -> Any:
        """Rebuild a saved scorer (:func:`probes.io.load_scorer`; ``context``: ``model=``, ``device=``);
        it must be a ``cls``."""
        obj = load_scorer(path, expect=expect, **context)
        if not isinstance(obj, cls):
            raise ValueError(f"probe at {path} is a {type(obj).__name__}, not a {cls.__name__}")
        return obj

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class Probe(Scorer):
    """A binary classifier on activation tensors. Subclasses implement ``_fit``, ``_decision_function``,
    ``get_config``, ``state_dict`` and ``load_state_dict``; the public methods validate inputs."""

    #: number of input dimensions per example (2 for ``[n, d]``; multi-layer probes use 3)
    input_ndim: ClassVar[int] = 2

    # -- fitting / scoring ---------------------------------------------------------------------------------

    def fit(
        self: P,
        X: ArrayLike,
        y: ArrayLike,
        sample_weight: ArrayLike | None = None,
    ) -> P:
        """Fit on features ``X`` (``[n, d]``) and labels ``y`` in {0, 1} (soft labels allowed). A probe
        chooses nothing on validation: the sweep picks its C (:meth:`Scorer.fit_grid`)."""
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

    def cost(
        self, cm: CostModel, *, layers: Sequence[int] = (), pooling: Pooling | None = None
    ) -> tuple[ProbeCost, ProbeCost]:
        """Pool, then probe: the pooling of ``d_model`` values per read layer per token and the linear
        read-out once per sequence (amortized over the context). With no layers (the token embeddings: no
        forward pass is needed to read them) both views are that cost."""
        pool = pooling if pooling is not None else Pooling.parse("mean")
        if not layers:
            c = cm.linear_probe_flops(cm.d_model) / cm.context_len + cm.pooling_flops(pool, cm.d_model)
            return cm.cost_views(c, c, 0.0, (), pool.name)
        marginal, standalone = (
            cm.probe_cost(list(layers), cm.d_model, pool, view=view, order="pool_then_probe")
            for view in ("marginal", "standalone")
        )
        return marginal, standalone

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
    def state_dict(self) -> dict[str, Tensor]:
        """The fitted tensors (contiguous, CPU)."""

    @abc.abstractmethod
    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore the fitted tensors written by :meth:`state_dict` (sets ``n_features_in_``)."""

    @classmethod
    def from_config(cls: type[P], config: Mapping[str, Any], state: Mapping[str, Tensor] | None = None) -> P:
        probe = cls(**dict(config))
        if state is not None:
            probe.load_state_dict(state)
        return probe

    # -- what a saved folder must hold (probes.io checks it before anything is built) ------------------------

    @classmethod
    def check_saved_config(cls, config: Any, file: Path) -> dict[str, Any]:
        """``probe.json``'s ``config`` against the constructor's parameters and their types."""
        return check_config(cls, config, file)

    @classmethod
    def tensor_specs(
        cls, config: Mapping[str, Any], n_in: int, names: Sequence[str], file: Path
    ) -> dict[str, TensorSpec] | None:
        """The tensors a saved probe must hold, from its config and ``n_features_in`` (None: only the generic
        checks apply)."""
        return None

    @classmethod
    def check_state(cls, config: Mapping[str, Any], state: Mapping[str, Tensor], file: Path) -> None:
        """Checks of the loaded tensors' values (indices in range, ...)."""


def sub_probe_class(kind: Any, file: Path, allowed: Sequence[str]) -> type[Probe]:
    """A registered probe class among ``allowed`` kinds (for a probe that holds another, e.g. a multi-layer
    probe's base)."""
    if kind not in allowed:
        raise ProbeLoadError(f"{file}: config.base_kind must be one of {', '.join(allowed)}, got {kind!r}")
    return scorer_class(kind)  # type: ignore[no-any-return]
