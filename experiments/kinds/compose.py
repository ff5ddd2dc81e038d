"""The runners of scorers that combine other runs' scores (the ``scores`` view): ensembles and two-stage
cascades (:mod:`probes.ensemble`, :mod:`probes.cascade`). Each runs once per sweep (in the first pooling
group) and writes ordinary result rows.

* ``ensemble`` -- ``members``: a list of components (below), ``weights`` and ``method`` (zscore | stack).
* ``cascade`` -- ``stage1`` and ``stage2`` components, ``rates`` (escalation rates; one row per rate and eval
  set), ``block_rate``, ``combine`` (stage2 | ensemble), ``weight`` (stage 1's weight in the ensemble).

A *component* is a probe spec of any kind (``kind``, ``params``, ``layers``, ...) plus ``pooling`` (default:
the spec's first) and, for per-layer kinds, ``layer`` (an int, or ``best``: the layer with the best
validation metric). A component that is also one of the spec's probes reuses that run's saved scores
(``OUT/scores/<run_id>.npz``); otherwise it is run first and its rows are added to the results too.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from activations.pooling import Pooling
from experiments.kinds.finish import finish_run
from experiments.kinds.registry import register_runner, runner_for
from experiments.sweep.context import FeatureCache, RunGroup, val_selection
from experiments.sweep.results import append_results, load_run_scores
from experiments.sweep.spec import ProbeSpec, Run, SpecError
from probes.base import SWEEP_KINDS
from probes.cascade import Cascade
from probes.ensemble import Ensemble, ensemble_cost

__all__ = ["component_scores", "run_cascade", "run_ensemble"]


def component_scores(
    g: RunGroup, comp: dict[str, Any], where: str
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The scores (per dataset role) and info of a component, running it first if it has not run."""
    ctx = g.ctx
    if not isinstance(comp, dict) or "kind" not in comp:
        raise SpecError(f"{where}: a component is a mapping with a `kind`")
    comp = dict(comp)
    pooling = Pooling.parse(comp.pop("pooling", ctx.spec.poolings[0]))
    layer = comp.pop("layer", "best")
    try:
        ps = ProbeSpec(**comp)
    except Exception as e:  # pydantic's message names the bad key
        raise SpecError(f"{where}: {e}") from None
    if ps.kind in ("ensemble", "cascade"):
        raise SpecError(f"{where}: a component cannot itself be an {ps.kind}")
    info = SWEEP_KINDS[ps.kind]
    if info.per_layer:
        if layer == "best":
            layers = list(ctx.layers)
        elif int(layer) in ctx.layers:
            layers = [int(layer)]
        else:
            raise SpecError(f"{where}: layer {layer} is not collected (spec layers: {ctx.layers})")
    else:
        layers = [-1]
    first = ctx.spec.pooling_objs()[0]
    if not info.per_layer:
        pooling = first  # such kinds run in the first pooling group only
    runs = [Run(ps, g.hook_kind, la, pooling, g.runs[0].seed, g.runs[0].spec_key) for la in layers]
    todo = [r for r in runs if load_run_scores(ctx.out, r.run_id) is None]
    if todo:
        feats = g.feats if pooling == g.pooling else FeatureCache(ctx, g.hook_kind, pooling)
        sub = RunGroup(ctx, todo, g.hook_kind, pooling, feats)
        append_results(ctx.out, runner_for(sub)(sub))
        ctx.done |= {r.run_id for r in todo}
    loaded = []
    for r in runs:
        got = load_run_scores(ctx.out, r.run_id)
        if got is None:
            raise SpecError(f"{where}: the {ps.kind} run {r.run_id} saved no scores")
        loaded.append((got[0], {**got[1], "run_id": r.run_id}))
    if len(loaded) == 1:
        return loaded[0]
    sel = val_selection(ctx, [sc["val"] for sc, _ in loaded])  # `layer: best`: chosen on validation
    return loaded[sel.index]


def _label(info: dict[str, Any]) -> str:
    if info.get("variant"):
        return f"{info['probe']} {info['variant']}"
    lay = info.get("layers") or []
    where = f" L{lay[0]}" if len(lay) == 1 and lay[0] >= 0 else ""
    return f"{info['probe']}{where} {info.get('pooling', '')}".strip()


@register_runner("ensemble")
def run_ensemble(g: RunGroup) -> list[dict[str, Any]]:
    """Fit each ensemble on its members' validation scores; score every role; cost: the members' sum."""
    if not g.first_pooling:
        return []
    ctx, rows = g.ctx, []
    for run in g.runs:
        p = run.probe.params
        members = p.get("members") or []
        if len(members) < 2:
            raise SpecError("probes.ensemble.params.members: give at least two components")
        got = [component_scores(g, c, f"probes.ensemble.members[{i}]") for i, c in enumerate(members)]
        infos = [i for _, i in got]
        labels = [_label(i) for i in infos]
        _, kw = g.kind.build(g.entry(run))
        ens = Ensemble(**kw, members=[i["run_id"] for i in infos], labels=labels)
        t0 = time.perf_counter()
        val_list = [s["val"] for s, _ in got]
        ens.fit(val_list, ctx.labels("val"))
        scores = {role: ens.decision_function([s[role] for s, _ in got]) for role in ctx.roles}
        scores["val"] = ens.fitted_scores(val_list)  # stacking: cross-fitted, as it was fitted there
        fit_s = time.perf_counter() - t0
        cost = ensemble_cost(
            ctx.cost,
            [(i["flops_per_token"], i["standalone_flops_per_token"], i["forward_flops"]) for i in infos],
        )
        label = str(p.get("label") or " + ".join(labels))
        rows += finish_run(
            g,
            run,
            ens,
            scores,
            layers=[],
            fit_seconds=fit_s,
            cost=cost,
            extra={"variant": label, "members": json.dumps(labels)},
            pooling=ens.pooling_label(run.pooling),
        )
    return rows


@register_runner("cascade")
def run_cascade(g: RunGroup) -> list[dict[str, Any]]:
    """One row set per escalation rate: thresholds on stage 1's validation scores, costed ``c1 + r·c2``."""
    if not g.first_pooling:
        return []
    ctx, rows = g.ctx, []
    for run in g.runs:
        p = run.probe.params
        if "stage1" not in p or "stage2" not in p:
            raise SpecError("probes.cascade.params: give stage1 and stage2 components")
        s1, i1 = component_scores(g, p["stage1"], "probes.cascade.stage1")
        s2, i2 = component_scores(g, p["stage2"], "probes.cascade.stage2")
        rates = [float(r) for r in p.get("rates", [0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0])]
        _, kw = g.kind.build(g.entry(run))
        shared = min(i1["forward_flops"], i2["forward_flops"])
        label = str(p.get("label") or f"{_label(i1)} → {_label(i2)}")
        for rate in rates:
            t0 = time.perf_counter()
            cascade = Cascade(escalation_rate=rate, **kw).fit([s1["val"], s2["val"]])
            out = {role: cascade.scores_and_escalation([s1[role], s2[role]]) for role in ctx.roles}
            scores = {role: v[0] for role, v in out.items()}
            esc = {role: v[1] for role, v in out.items()}
            fit_s = time.perf_counter() - t0
            marginal = i1["flops_per_token"] + rate * i2["flops_per_token"]
            standalone = i1["standalone_flops_per_token"] + rate * (i2["standalone_flops_per_token"] - shared)
            fwd = max(i1["forward_flops"], i2["forward_flops"])
            rows += finish_run(
                g,
                run,
                cascade,
                scores,
                layers=[],
                fit_seconds=fit_s,
                cost=ctx.cost.cost_views(marginal, standalone, fwd, (), "cascade"),
                extra={
                    "variant": f"{label} r={rate:g}",
                    "escalation_rate": rate,
                    "escalation_rate_control": float(esc["control"].mean()),
                    "block_rate": kw["block_rate"],
                    "stage1_run_id": i1["run_id"],
                    "stage2_run_id": i2["run_id"],
                    "stage1_flops_per_token": i1["flops_per_token"],
                    "stage2_flops_per_token": i2["flops_per_token"],
                },
                pooling=cascade.pooling_label(run.pooling),
                keep_scores=False,
                tail={
                    name: {"escalation_rate_eval": float(esc[f"test:{name}"].mean())}
                    for name in ctx.data.tests
                },
            )
    return rows
