"""Where a sweep runs: a :class:`Backend` opens a session around the sweep, which may replace how stores are
collected (``collect_fn``, the signature of :func:`activations.collect.collect`) and decides where the fit
groups run (``run_groups``). Backends register by name (:func:`register_backend`); ``run_sweep(...,
backend="ray")`` looks them up."""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, TypeVar

from transformer_lens import HookedTransformer

from activations.store import ActivationStore
from experiments.sweep.context import SweepContext
from experiments.sweep.groups import GroupKey
from experiments.sweep.results import SweepError
from experiments.sweep.spec import Run, SweepSpec

__all__ = ["BACKENDS", "Backend", "Session", "get_backend", "register_backend"]


class Session(abc.ABC):
    """One sweep on a backend: the model the driver holds (None: the sweep loads it), how stores are
    collected (None: in this process), and where the groups run."""

    model: HookedTransformer | None = None
    collect_fn: Callable[..., ActivationStore] | None = None

    @abc.abstractmethod
    def run_groups(
        self, ctx: SweepContext, groups: Mapping[GroupKey, Sequence[Run]], *, progress: bool = True
    ) -> None:
        """Run every group; each finished group's (or kind's) rows are appended to ``results.parquet``."""


class Backend(abc.ABC):
    name: ClassVar[str] = ""

    @abc.abstractmethod
    @contextmanager
    def session(self, spec: SweepSpec, model: HookedTransformer | None) -> Iterator[Session]:
        """A session for one sweep of ``spec`` (``model``: the driver's, if the caller has one)."""


#: backend name -> class, filled by :func:`register_backend`
BACKENDS: dict[str, type[Backend]] = {}

B = TypeVar("B", bound=type[Backend])


def register_backend(cls: B) -> B:
    BACKENDS[cls.name] = cls
    return cls


def get_backend(backend: str | Backend, **options: Any) -> Backend:
    """A backend by name (``options`` go to its constructor; ``None`` values are dropped), or as given."""
    if isinstance(backend, Backend):
        return backend
    if backend not in BACKENDS:
        raise SweepError(f"unknown backend {backend!r} (available: {', '.join(sorted(BACKENDS))})")
    return BACKENDS[backend](**{k: v for k, v in options.items() if v is not None})
