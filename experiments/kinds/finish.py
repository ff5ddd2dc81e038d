"""The one end of every run: score roles → evaluate every eval set → result rows → save."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from experiments.sweep.context import RunGroup, evaluate_scores, probe_metadata, val_selection
from experiments.sweep.results import ResultRow, save_run_scores
from experiments.sweep.spec import Run
from probes.cost import ProbeCost
from probes.scorer import Probe, Scorer
from probes.selection import Selection, val_metrics

__all__ = ["finish_run"]


def finish_run(
    g: RunGroup,
    run: Run,
    scorer: Scorer,
    scores: Mapping[str, np.ndarray],
    *,
    layers: Sequence[int],
    fit_seconds: float,
    selection: Selection | None = None,
    C: float | None = None,
    cost: tuple[ProbeCost, ProbeCost] | None = None,
    extra: Mapping[str, Any] | None = None,
    pooling: str | None = None,
    probe: str | None = None,
    hook: str | None = None,
    save: bool = True,
    keep_scores: bool = True,
    tail: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Result rows of a finished run, one per eval set; saves the scorer under ``OUT/probes/<run_id>``.

    ``scores``: every dataset role's scores of the chosen scorer: they are evaluated on every test set, give
    every validation metric of the selection rule and are kept in ``OUT/scores/<run_id>.npz`` with the
    run's costs (unless ``keep_scores`` is off), so ensembles and cascades can combine finished runs.
    ``selection``: the run's choice among candidates (e.g. its C; default: its one candidate). ``cost``
    (marginal, standalone): by default the scorer's own on ``layers``. ``pooling`` / ``probe`` / ``hook``
    replace what the row shows (the scorer's own read-out, an SAE probe's ``sae_k<k>``, ``embed``);
    ``tail``: per eval set, columns added after the others."""
    ctx = g.ctx
    extra = dict(extra or {})
    sel = selection or val_selection(ctx, [scores["val"]])
    val = sel.value
    vm = val_metrics(ctx.labels("val"), scores["val"])
    vm[ctx.spec.select_metric] = val
    marginal, standalone = cost or scorer.cost(ctx.cost, layers=layers, pooling=run.pooling)
    path = ctx.out / "probes" / run.run_id
    saved = save and bool(scorer.layout)
    if saved:
        meta = probe_metadata(ctx, run, layers, {"C": C, f"val_{ctx.spec.select_metric}": val, **extra})
        scorer.save(path, meta)
    if keep_scores:
        save_run_scores(
            ctx.out,
            run.run_id,
            dict(scores),
            {
                "probe": run.probe.kind,
                "variant": str(extra.get("variant", "")),
                "layers": list(layers),
                "pooling": run.pooling.name,
                "flops_per_token": marginal.flops_per_token,
                "standalone_flops_per_token": standalone.flops_per_token,
                "forward_flops": standalone.forward_flops,
                "val": val,
            },
        )
    layer = int(layers[0]) if len(layers) == 1 else -1
    n_model = int(ctx.cost.n_layers)
    rows = []
    for eval_set, m in evaluate_scores(ctx, scores, run.seed).items():
        row = ResultRow(
            run_id=run.run_id,
            sweep=ctx.spec.name,
            model=ctx.model_fp["model_id"],
            probe=probe or run.probe.kind,
            hook=hook or run.hook_kind,
            layer=layer,
            depth=layer / n_model if layer >= 0 else float("nan"),
            model_layers=n_model,
            layers=hook or ",".join(str(x) for x in layers),
            n_layers_read=1 if hook else len(layers),
            pooling=pooling or run.pooling.name,
            C=float("nan") if C is None else float(C),
            seed=run.seed,
            eval_set=eval_set,
            metrics=m,
            val=vm,
            select_metric=ctx.spec.select_metric,
            val_candidates=len(sel.metrics),
            val_ties=sel.n_tied,
            flops_per_token=marginal.flops_per_token,
            overhead_pct=marginal.overhead_pct,
            standalone_flops_per_token=standalone.flops_per_token,
            standalone_overhead_pct=standalone.overhead_pct,
            probe_path=str(path) if saved else "",
            fit_seconds=fit_seconds,
            n_train=len(ctx.data.train),
            n_features=scorer.n_features_in_ if isinstance(scorer, Probe) and scorer.n_features_in_ else -1,
            params=json.dumps(run.probe.params, sort_keys=True) if run.probe.params else "",
            extra=extra,
            tail=dict((tail or {}).get(eval_set, {})),
        )
        rows.append(row.to_dict())
    return rows
