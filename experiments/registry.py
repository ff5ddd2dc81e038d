"""The registry of probe kinds a sweep can run.

A kind is a name (the ``probe`` column of ``results.parquet``) and a *runner*: a function that receives one
:class:`~experiments.run.RunGroup` (the runs of one probe spec sharing seed, hook and pooling; one run per
layer for per-layer kinds, a single run with layer -1 otherwise) and returns result rows. Built-in kinds are
registered in :mod:`experiments.kinds`; a new family adds a module that calls :func:`register_kind` and one
import line there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class KindInfo:
    name: str
    runner: Callable[[Any], list[dict[str, Any]]]
    per_layer: bool = True
    uses_C: bool = True
    params: frozenset[str] = field(default_factory=frozenset)
    description: str = ""


PROBE_KINDS: dict[str, KindInfo] = {}


def register_kind(
    name: str,
    *,
    per_layer: bool = True,
    uses_C: bool = True,
    params: tuple[str, ...] = (),
    description: str = "",
) -> Callable[[Callable[[Any], list[dict[str, Any]]]], Callable[[Any], list[dict[str, Any]]]]:
    """Decorator: register ``fn(group) -> rows`` as the runner of probe kind ``name``."""

    def deco(fn: Callable[[Any], list[dict[str, Any]]]) -> Callable[[Any], list[dict[str, Any]]]:
        PROBE_KINDS[name] = KindInfo(name, fn, per_layer, uses_C, frozenset(params), description)
        return fn

    return deco


def kinds() -> dict[str, KindInfo]:
    """Every registered kind (importing the built-in and plug-in kind modules first)."""
    import experiments.kinds  # noqa: F401  (registers)

    return PROBE_KINDS


def import_plugins(modules: list[str]) -> None:
    """Import each plug-in module that exists (its import registers kinds or commands); errors propagate."""
    import importlib
    import importlib.util

    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # the parent package does not exist
            found = False
        if found:
            importlib.import_module(name)


#: modules that register more probe kinds (imported by :func:`kinds`)
KIND_PLUGINS = ["experiments.kinds_token", "experiments.kinds_sae", "experiments.kinds_frontier"]
#: modules that add commands to the CLI: each defines ``register(app: typer.Typer) -> None``
CLI_PLUGINS = [
    "experiments.cli_stream",
    "experiments.cli_sae",
    "experiments.cli_robustness",
    "experiments.cli_frontier",
    "experiments.cli_report",
    "experiments.cli_verify",
]
