"""The generic runner: any registered scorer family whose view the sweep context provides runs through here,
so a new family in ``probes/`` (or any package below) runs in a sweep with no file in ``experiments/``.

* pooled views (``pooled``: one layer or the kind's fixed hook; ``pooled_layers``): every run of the group
  (one per layer) × every C of the spec's grid (``uses_C`` kinds) is fitted by the family's
  :meth:`~probes.scorer.Scorer.fit_grid` (the logistic family: one batched solve), C is chosen on
  validation, and the chosen scorer scores every role;
* other views (``text``, ``token_ids``, ``residual``): one scorer per run, fitted with the validation set
  (families that choose something, e.g. an epoch, choose it there); they run once per sweep, in the first
  pooling group, and name their own read-out in the ``pooling`` column.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from experiments.kinds.finish import finish_run
from experiments.kinds.registry import register_runner
from experiments.sweep.context import RunGroup, val_selection
from experiments.sweep.spec import Run, SpecError
from probes.base import POOLED, POOLED_LAYERS, RESIDUAL, TEXT, TOKEN_IDS

__all__ = ["run_generic"]


@register_runner("*")
def run_generic(g: RunGroup) -> list[dict[str, Any]]:
    """Run one group of any family whose view the context provides (see the module docstring)."""
    cls, _ = g.kind.build(g.entry(g.runs[0]))
    if cls.view in (POOLED, POOLED_LAYERS):
        return _run_pooled(g, cls.view)
    if not g.first_pooling:
        return []  # scorers with their own read-out: fitted once, in the first pooling group
    return [row for run in g.runs for row in _run_own_view(g, run)]


def _pooled_view(g: RunGroup, view: str, layers: list[int]) -> Callable[[str], torch.Tensor]:
    kind = g.kind
    if kind.hook is not None:
        return lambda role: g.feats.hooked(role, kind.hook)  # type: ignore[arg-type]
    if view == POOLED_LAYERS:
        return lambda role: g.feats.layers(role, layers).permute(1, 0, 2)
    return lambda role: g.feats.layer(role, layers[0])


def _run_pooled(g: RunGroup, view: str) -> list[dict[str, Any]]:
    ctx, kind = g.ctx, g.kind
    layers = [g.layers_of(run, view) for run in g.runs]
    cls, config = kind.build(g.entry(g.runs[0], layers[0]))
    X = [_pooled_view(g, view, la) for la in layers]
    t0 = time.perf_counter()
    grid = cls.fit_grid(
        [x("train") for x in X], ctx.labels("train"), ctx.spec.Cs if kind.uses_C else None, **config
    )
    fit_s = (time.perf_counter() - t0) / len(g.runs)
    val_scores = grid.val_scores([x("val") for x in X]) if kind.uses_C else None
    rows = []
    for i, run in enumerate(g.runs):
        sel = val_selection(ctx, list(val_scores[i])) if val_scores is not None else None
        scorer = grid.scorer(i, sel.index if sel is not None else 0)
        scores = {role: scorer.score(X[i](role)) for role in ctx.roles}
        rows += finish_run(
            g,
            run,
            scorer,
            scores,
            layers=layers[i],
            fit_seconds=fit_s,
            selection=sel,
            C=ctx.spec.Cs[sel.index] if sel is not None else None,
            extra={"hook_names": kind.hook} if kind.hook is not None else None,
            hook=kind.hook_label,
        )
    return rows


def _own_view(g: RunGroup, scorer: Any) -> Callable[[str], Any]:
    ctx = g.ctx
    if scorer.view == TEXT:
        return ctx.texts
    if scorer.view == TOKEN_IDS:
        return ctx.token_ids
    if scorer.view == RESIDUAL:
        hook = scorer.input_hook()
        return lambda role: ctx.residual(role, hook)
    raise SpecError(f"probes.{g.kind.name}: no runner reads the {scorer.view!r} view")


def _run_own_view(g: RunGroup, run: Run) -> list[dict[str, Any]]:
    ctx, kind = g.ctx, g.kind
    cls, kw = kind.build(g.entry(run))
    if cls.needs_model:
        kw["model"] = ctx.require_model()
    try:
        scorer = cls(**kw)
    except ValueError as e:  # the family judged the spec's params
        raise SpecError(f"probes.{kind.name}: {e}") from None
    view = _own_view(g, scorer)
    opts: dict[str, Any] = {"progress": True, "select_metric": ctx.spec.select_metric}
    if scorer.needs_fit:  # zero-shot scorers learn nothing: no validation set, no training scores
        opts.update(val=view("val"), val_y=ctx.labels("val"))
    t0 = time.perf_counter()
    scorer.fit(view("train"), ctx.labels("train"), **opts)
    fit_s = time.perf_counter() - t0
    scores = {
        role: scorer.score(view(role))
        if scorer.needs_fit or role != "train"
        else np.full(len(ctx.data.train), np.nan)
        for role in ctx.roles
    }
    return finish_run(
        g,
        run,
        scorer,
        scores,
        layers=scorer.row_layers(ctx.cost.n_layers) or [],
        fit_seconds=fit_s,
        extra=scorer.row_extras(str(ctx.spec.model), ctx.cost.n_layers),
        pooling=scorer.pooling_label(run.pooling),
    )
