"""The runners of the sweep kinds: most kinds run through the generic runner (:mod:`.generic`); a family whose
sweep needs more (per-token streaming columns, SAE training, components of ensembles and cascades) has a
runner of its own, registered by sweep kind name or by view. A runner receives one
:class:`~experiments.sweep.context.RunGroup` and returns result rows (``finish_run``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from experiments.sweep.context import RunGroup
from experiments.sweep.spec import SpecError

__all__ = ["RUNNERS", "Runner", "register_runner", "runner_for"]

Runner = Callable[[RunGroup], list[dict[str, Any]]]

#: a sweep kind name or a view (:data:`probes.base.VIEWS`) -> its runner; ``"*"``: every other kind
RUNNERS: dict[str, Runner] = {}


def register_runner(*keys: str) -> Callable[[Runner], Runner]:
    """Decorator: run the sweep kinds named ``keys`` (or every kind whose family reads a view in ``keys``)
    with ``fn``."""

    def deco(fn: Runner) -> Runner:
        for k in keys:
            RUNNERS[k] = fn
        return fn

    return deco


def runner_for(g: RunGroup) -> Runner:
    """The runner of a group's kind: its own, its family's view's, or the generic one."""
    kind = g.kind
    if kind.name in RUNNERS:
        return RUNNERS[kind.name]
    try:
        cls, _ = kind.build(g.entry(g.runs[0]))
    except ValueError as e:  # a kind's builder judged the spec's params
        raise SpecError(str(e)) from None
    return RUNNERS.get(cls.view, RUNNERS["*"])
