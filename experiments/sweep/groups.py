"""The unit of work of a sweep: a *group* of runs sharing (seed, hook kind, pooling), and how one group is
run (kind by kind, each by its runner). Backends decide where groups run."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

from rich.console import Console

import experiments.kinds  # noqa: F401  (registers every kind's runner)
from activations.pooling import Pooling
from experiments.kinds.registry import runner_for
from experiments.sweep.context import FeatureCache, RunGroup, SweepContext
from experiments.sweep.spec import Run, expand

__all__ = ["GroupKey", "groups_of", "run_group"]

console = Console(stderr=True)

#: what a group shares: (seed, hook kind, pooling)
GroupKey = tuple[int, str, Pooling]


def groups_of(ctx: SweepContext) -> dict[GroupKey, list[Run]]:
    """The runs still to do, by (seed, hook kind, pooling)."""
    runs = list(expand(ctx.spec, ctx.layers, ctx.data.key()))
    todo = [r for r in runs if r.run_id not in ctx.done]
    done = len(runs) - len(todo)
    console.print(f"[bold]{ctx.spec.name}[/]: {len(runs)} runs, {done} already done, {len(todo)} to fit")
    groups: dict[GroupKey, list[Run]] = defaultdict(list)
    for r in todo:
        groups[(r.seed, r.hook_kind, r.pooling)].append(r)
    return groups


def run_group(
    ctx: SweepContext,
    hook_kind: str,
    pooling: Pooling,
    group: list[Run],
    sink: Callable[[list[dict[str, Any]]], object] | None = None,
) -> list[dict[str, Any]]:
    """Fit and evaluate every run of one (seed, hook, pooling) group, kind by kind.

    ``sink`` receives each probe spec's rows as soon as they are done (the local backend appends them to
    ``results.parquet`` there, so a killed sweep keeps every finished kind); all rows are also returned."""
    feats = FeatureCache(ctx, hook_kind, pooling)
    rows: list[dict[str, Any]] = []
    by_spec: dict[str, list[Run]] = defaultdict(list)
    for r in group:
        by_spec[r.probe.model_dump_json()].append(r)
    for runs in by_spec.values():
        runs = [r for r in runs if r.run_id not in ctx.done]  # a component of an ensemble may have run it
        if not runs:
            continue
        g = RunGroup(ctx, runs, hook_kind, pooling, feats)
        new = runner_for(g)(g)
        if sink is not None and new:
            sink(new)
        ctx.done |= {r.run_id for r in runs}
        rows += new
    return rows
