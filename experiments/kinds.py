"""Built-in probe kinds of the sweep (pool, then probe): logistic (L2/L1/elastic-net), difference of means,
LDA and the multi-layer (concatenated) probe. Plug-in families register more kinds from their own modules,
imported at the bottom of this file."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import torch

from activations.collect import parse_layers
from experiments.registry import register_kind
from experiments.run import (
    EMBED_HOOK,
    RunGroup,
    evaluate_scores,
    make_rows,
    score_roles,
    select_best,
    val_selection,
)
from experiments.spec import SpecError
from probes.base import Probe
from probes.linear import DiffMeansProbe, LDAProbe, MultiLayerProbe, Penalty, fit_logistic_batched


def _scorer(g: RunGroup, probe: Probe, layer: int) -> Callable[[str], np.ndarray]:
    """Scores of ``probe`` on one layer's pooled features, per dataset role."""

    def score(role: str) -> np.ndarray:
        return probe.decision_function(g.feats.layer(role, layer)).numpy()

    return score


_PENALTY = {"logistic_l2": "l2", "logistic_l1": "l1", "logistic_elasticnet": "elasticnet"}


def _logistic(g: RunGroup) -> list[dict[str, Any]]:
    """Every layer × every C of one logistic probe in one batched solve; C selected on validation."""
    ctx, ps = g.ctx, g.probe_spec
    layers = [r.layer for r in g.runs]
    t0 = time.perf_counter()
    path = fit_logistic_batched(
        g.feats.layers("train", layers),
        torch.as_tensor(ctx.labels("train")),
        ctx.spec.Cs,
        penalty=cast(Penalty, _PENALTY[ps.kind]),
        l1_ratio=ps.l1_ratio,
        class_weight=ps.class_weight,
        warn=False,
    )
    fit_s = (time.perf_counter() - t0) / len(g.runs)
    val_scores = path.decision_function(g.feats.layers("val", layers)).numpy()  # [p, c, n]
    rows = []
    for j, run in enumerate(g.runs):
        sel = val_selection(ctx, list(val_scores[j]))
        best = sel.index
        probe = path.probe(j, best)
        scores = score_roles(ctx, _scorer(g, probe, run.layer))
        metrics = evaluate_scores(ctx, scores, run.seed)
        rows += make_rows(
            ctx,
            run,
            [run.layer],
            probe,
            C=ctx.spec.Cs[best],
            val=sel.value,
            metrics=metrics,
            fit_seconds=fit_s,
            scores=scores,
            selection=sel,
        )
    return rows


for _name in _PENALTY:
    register_kind(_name, description=f"logistic regression ({_PENALTY[_name]}) on pooled activations")(
        _logistic
    )


def _simple(make: Any) -> Any:
    def runner(g: RunGroup) -> list[dict[str, Any]]:
        ctx = g.ctx
        rows = []
        for run in g.runs:
            t0 = time.perf_counter()
            probe: Probe = make(run.probe).fit(
                g.feats.layer("train", run.layer), torch.as_tensor(ctx.labels("train"))
            )
            fit_s = time.perf_counter() - t0
            scores = score_roles(ctx, _scorer(g, probe, run.layer))
            rows += make_rows(
                ctx,
                run,
                [run.layer],
                probe,
                C=None,
                val=select_best(ctx, [scores["val"]])[1][0],
                metrics=evaluate_scores(ctx, scores, run.seed),
                fit_seconds=fit_s,
                scores=scores,
            )
        return rows

    return runner


register_kind("diffmeans", uses_C=False, description="difference of class means")(
    _simple(lambda ps: DiffMeansProbe())
)
register_kind("lda", uses_C=False, description="LDA with (Ledoit-Wolf) shrinkage")(
    _simple(lambda ps: LDAProbe(shrinkage=ps.shrinkage if ps.shrinkage is not None else "auto"))
)


@register_kind("multilayer", per_layer=False, description="logistic probe on concatenated layers (CC++)")
def _multilayer(g: RunGroup) -> list[dict[str, Any]]:
    ctx = g.ctx
    rows = []
    for run in g.runs:
        ps = run.probe
        layers = parse_layers(ps.layers, ctx.cost.n_layers) if ps.layers is not None else ctx.layers
        missing = [la for la in layers if la not in ctx.layers]
        if missing:
            raise SpecError(
                f"probes.multilayer.layers: layers {missing} are not collected (spec layers: {ctx.layers})"
            )

        def flat(role: str, ls: list[int] = layers) -> torch.Tensor:
            x = g.feats.layers(role, ls)  # [L, n, d]
            return x.permute(1, 0, 2).reshape(x.shape[1], -1)

        t0 = time.perf_counter()
        path = fit_logistic_batched(
            flat("train")[None], torch.as_tensor(ctx.labels("train")), ctx.spec.Cs, penalty=ps.penalty,
            l1_ratio=ps.l1_ratio, class_weight=ps.class_weight, warn=False,
        )  # fmt: skip
        fit_s = time.perf_counter() - t0
        val_scores = path.decision_function(flat("val")[None]).numpy()[0]
        sel = val_selection(ctx, list(val_scores))
        best = sel.index
        base = path.probe(0, best)
        probe = MultiLayerProbe(base=base, layers=layers)
        probe.load_state_dict({f"base.{k}": v for k, v in base.state_dict().items()})

        def score(role: str, ls: list[int] = layers, p: Probe = probe) -> np.ndarray:
            return p.decision_function(g.feats.layers(role, ls).permute(1, 0, 2)).numpy()

        scores = score_roles(ctx, score)
        rows += make_rows(
            ctx,
            run,
            layers,
            probe,
            C=ctx.spec.Cs[best],
            val=sel.value,
            metrics=evaluate_scores(ctx, scores, run.seed),
            fit_seconds=fit_s,
            scores=scores,
            selection=sel,
        )
    return rows


@register_kind(
    "embedding",
    per_layer=False,
    description="surface baseline: logistic probe on the pooled token embeddings (layer-0 residual stream)",
)
def _embedding(g: RunGroup) -> list[dict[str, Any]]:
    """A logistic probe (C on validation) on the pooled token embeddings: what token identity alone gives.
    An eval set on which it (or TF-IDF) reaches AUROC >= 0.95 measures form, not harm (``confounded``)."""
    ctx = g.ctx

    def feats(role: str) -> torch.Tensor:
        return g.feats.hooked(role, EMBED_HOOK)

    rows = []
    for run in g.runs:
        ps = run.probe
        t0 = time.perf_counter()
        path = fit_logistic_batched(
            feats("train")[None], torch.as_tensor(ctx.labels("train")), ctx.spec.Cs, penalty=ps.penalty,
            l1_ratio=ps.l1_ratio, class_weight=ps.class_weight, warn=False,
        )  # fmt: skip
        fit_s = time.perf_counter() - t0
        sel = val_selection(ctx, list(path.decision_function(feats("val")[None]).numpy()[0]))
        probe = path.probe(0, sel.index)
        scores = score_roles(ctx, lambda role, p=probe: p.decision_function(feats(role)).numpy())
        d = ctx.cost.d_model
        c = ctx.cost.linear_probe_flops(d) / ctx.spec.context_len + ctx.cost.pooling_flops(run.pooling, d)
        new = make_rows(
            ctx,
            run,
            [],
            probe,
            C=ctx.spec.Cs[sel.index],
            val=sel.value,
            metrics=evaluate_scores(ctx, scores, run.seed),
            fit_seconds=fit_s,
            cost=ctx.cost.cost_views(c, c, 0.0, (), run.pooling.name),
            extra={"hook_names": EMBED_HOOK},
            scores=scores,
            selection=sel,
        )
        for row in new:
            row["hook"], row["layers"], row["n_layers_read"] = "embed", "embed", 1
        rows += new
    return rows


# ---- plug-in kinds: one import line per family -------------------------------------------------------
from experiments.registry import KIND_PLUGINS, import_plugins  # noqa: E402

import_plugins(KIND_PLUGINS)
