"""Sweep kinds for the cost frontier (issue: beyond one probe): fine-tuned final layers, standalone classifier
baselines, ensembles and two-stage cascades. Each runs once per sweep (in the first pooling group) and
writes ordinary result rows, so they sit beside the linear and per-token probes on the AUROC-vs-FLOPs plots.

* ``finetune`` -- :class:`probes.finetune.FinetunedLayers`: the model's last ``k`` blocks fine-tuned from
  the cached ``blocks.{L-k-1}.hook_resid_post``. params: ``k``, ``mode`` (full | lora | head), ``rank``,
  ``alpha``, ``head_pooling`` (mean | last | max), ``epochs``, ``lr``, ``head_lr``, ``weight_decay``,
  ``token_budget``, ``head_C``. Needs every token of each sequence: when the sweep's stores do not keep
  them (``keep: all`` in the spec), a ``keep: all`` store of just the needed layers is collected once.
* ``standalone`` -- a separate classifier with its own forward pass: ``model: policy`` (the first
  ``n_layers`` blocks of the sweep's model + head, :class:`probes.finetune.TruncatedModelClassifier`, same
  training params as ``finetune``) or ``model: minilm`` (all-MiniLM-L6-v2 fine-tuned,
  :class:`probes.baselines.MiniLMClassifier`; its params pass through).
* ``tfidf`` -- TF-IDF n-grams + logistic regression on the raw text
  (:class:`probes.baselines.TfidfClassifier`).
* ``prompted`` -- the sweep's model asked whether the text is harmful, scored by its yes/no logit
  (:class:`probes.baselines.PromptedClassifier`), zero-shot.
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
from pathlib import Path
from typing import Any

import numpy as np

from activations.collect import collect, default_store_dir
from activations.pooling import Pooling
from activations.store import ActivationStore, StoreKey
from experiments.registry import kinds, register_kind
from experiments.run import (
    FeatureCache,
    RunGroup,
    SweepContext,
    append_results,
    evaluate_scores,
    load_run_scores,
    make_rows,
    select_best,
    val_selection,
)
from experiments.spec import ProbeSpec, Run, SpecError
from probes.cascade import ZRef, cascade_scores, thresholds_for_rate
from probes.cost import ProbeCost
from probes.ensemble import StackingEnsemble, ZScoreEnsemble, ensemble_cost
from probes.finetune import (
    FinetunedLayers,
    FinetuneError,
    SequenceClassifier,
    Sequences,
    TruncatedModelClassifier,
    finetune_input_hook,
    sequences_from_store,
    token_sequences_from_store,
)

TRAIN_PARAMS = (
    "mode",
    "rank",
    "alpha",
    "head_pooling",
    "epochs",
    "lr",
    "head_lr",
    "weight_decay",
    "token_budget",
    "head_C",
)
MINILM_PARAMS = ("train_layers", "batch_size", "max_len", "warmup_frac", "normalize", "Cs", "C")


def _cache(ctx: SweepContext) -> dict[Any, Any]:
    return ctx.__dict__.setdefault("_frontier_cache", {})


def _train_kw(p: dict[str, Any], seed: int) -> dict[str, Any]:
    kw: dict[str, Any] = {k: p[k] for k in TRAIN_PARAMS if k in p and k != "head_pooling"}
    if "head_pooling" in p:
        kw["pooling"] = p["head_pooling"]
    return {**kw, "seed": seed}


def _model(ctx: SweepContext) -> Any:
    if ctx.model is None:
        raise SpecError("this probe kind needs the sweep's model (it was not loaded)")
    return ctx.model


# ---------------------------------------------------------------------------------------------- inputs
def _full_store(ctx: SweepContext, role: str, hooks: list[str]) -> ActivationStore:
    """A store of ``role`` that keeps every token and has ``hooks``: the sweep's own, or one collected."""
    st = ctx.stores[role]
    if st.key.get("keep") == "all" and all(h in st.hooks for h in hooks):
        return st
    needed = sorted(
        {
            finetune_input_hook(int(p.params.get("k", 1)), ctx.cost.n_layers)
            for p in ctx.spec.probes
            if p.kind == "finetune"
        }
        | set(hooks),
        key=lambda h: int(h.split(".")[1]),
    )
    key = ("store", role, tuple(needed))
    cache = _cache(ctx)
    if key not in cache:
        ds = ctx.data.all()[role]
        fields = {f: st.key[f] for f in StoreKey.__dataclass_fields__}
        path = default_store_dir(
            ctx.out / "stores", StoreKey(**{**fields, "hooks": tuple(needed), "keep": "all"})
        )
        cache[key] = collect(
            _model(ctx),
            ds,
            path,
            hooks=needed,
            layers=None,
            positions=ctx.spec.positions,
            keep="all",
            max_len=st.key["max_len"],
            token_budget=ctx.spec.token_budget,
        )
    return cache[key]


def _resid(ctx: SweepContext, role: str, hook: str) -> Sequences:
    key = ("resid", role, hook)
    cache = _cache(ctx)
    if key not in cache:
        cache[key] = sequences_from_store(_full_store(ctx, role, [hook]), hook)
    return cache[key]


def _tokens(ctx: SweepContext, role: str) -> Sequences:
    cache = _cache(ctx)
    if ("tokens", role) not in cache:
        cache["tokens", role] = token_sequences_from_store(ctx.stores[role])
    return cache["tokens", role]


def _texts(ctx: SweepContext, role: str) -> list[str]:
    """The texts of one role, in store order (read and checked once per sweep)."""
    from probes.baselines import example_text

    cache = _cache(ctx)
    if ("texts", role) not in cache:
        ds = ctx.data.all()[role]
        ids = [e["id"] for e in ctx.stores[role].examples()]
        if ids != [ex.id for ex in ds]:
            raise SpecError(f"{role}: the store's examples are not the dataset's (order or ids differ)")
        cache["texts", role] = [example_text(ex) for ex in ds]
    return cache["texts", role]


# ------------------------------------------------------------------------------------------------ rows
def _finish(
    g: RunGroup,
    run: Run,
    scores: dict[str, np.ndarray],
    cost: tuple[ProbeCost, ProbeCost],
    fit_s: float,
    *,
    layers: list[int],
    pooling: str,
    extra: dict[str, Any],
    save: Any = None,
    keep_scores: bool = True,
) -> list[dict[str, Any]]:
    """Result rows of one finished scorer (its scores kept under ``OUT/scores`` unless ``keep_scores`` is
    off), with the ``pooling`` column naming how it reads the sequence."""
    ctx = g.ctx
    rows = make_rows(
        ctx,
        run,
        layers,
        None,
        C=None,
        val=select_best(ctx, [scores["val"]])[1][0],
        metrics=evaluate_scores(ctx, scores, run.seed),
        fit_seconds=fit_s,
        cost=cost,
        extra=extra,
        scores=scores,
        save=save,
        keep_scores=keep_scores,
    )
    for row in rows:
        row["pooling"] = pooling
    return rows


def _fit_sequence(
    g: RunGroup, run: Run, clf: SequenceClassifier, inputs: Any
) -> tuple[dict[str, Any], float]:
    ctx = g.ctx
    t0 = time.perf_counter()
    clf.fit(
        _model(ctx),
        inputs("train"),
        ctx.labels("train"),
        val=inputs("val"),
        val_y=ctx.labels("val"),
        progress=True,
        select_metric=ctx.spec.select_metric,
    )
    fit_s = time.perf_counter() - t0
    return {role: clf.decision_function(inputs(role)) for role in ctx.roles}, fit_s


@register_kind(
    "finetune",
    per_layer=False,
    uses_C=False,
    params=("k", *TRAIN_PARAMS),
    description="fine-tuned last k layers",
)
def _finetune(g: RunGroup) -> list[dict[str, Any]]:
    if not g.first_pooling:
        return []
    ctx, rows = g.ctx, []
    for run in g.runs:
        p = dict(run.probe.params)
        k = int(p.get("k", 1))
        clf = FinetunedLayers(k=k, **_train_kw(p, run.seed))
        try:
            hook = finetune_input_hook(k, ctx.cost.n_layers)
        except FinetuneError as e:
            raise SpecError(f"probes.finetune: {e}") from None
        layer = ctx.cost.n_layers - k - 1
        scores, fit_s = _fit_sequence(g, run, clf, lambda role, h=hook: _resid(ctx, role, h))
        rows += _finish(
            g,
            run,
            scores,
            clf.cost(ctx.cost),
            fit_s,
            layers=[layer],
            pooling=clf.pooling,
            extra={
                "variant": f"k={k} {clf.mode}",
                "k": k,
                "mode": clf.mode,
                "n_trainable": clf.n_trainable(),
                "clf_params": clf.n_params(),
                "best_epoch": getattr(clf, "best_epoch_", -1),
            },
            save=clf.save,
        )
    return rows


@register_kind(
    "standalone",
    per_layer=False,
    uses_C=False,
    params=("model", "n_layers", *TRAIN_PARAMS, *MINILM_PARAMS),
    description="a separate classifier (first layers of the model, or MiniLM)",
)
def _standalone(g: RunGroup) -> list[dict[str, Any]]:
    if not g.first_pooling:
        return []
    ctx, rows = g.ctx, []
    for run in g.runs:
        p = dict(run.probe.params)
        which = str(p.pop("model", "policy"))
        if which == "policy":
            m = int(p.pop("n_layers", max(1, ctx.cost.n_layers // 4)))
            bad = set(p) - set(TRAIN_PARAMS)
            if bad:
                raise SpecError(f"probes.standalone (model: policy): unknown params {sorted(bad)}")
            clf = TruncatedModelClassifier(n_layers=m, **_train_kw(p, run.seed))
            scores, fit_s = _fit_sequence(g, run, clf, lambda role: _tokens(ctx, role))
            rows += _finish(
                g,
                run,
                scores,
                clf.cost(ctx.cost),
                fit_s,
                layers=[m - 1],
                pooling=clf.pooling,
                extra={
                    "variant": f"{ctx.spec.model}[:{m}]",
                    "n_layers_model": ctx.cost.n_layers,
                    "n_trainable": clf.n_trainable(),
                    "clf_params": clf.n_params(),
                    "best_epoch": getattr(clf, "best_epoch_", -1),
                },
                save=clf.save,
            )
        elif which == "minilm":
            from probes.baselines import MiniLMClassifier

            clf2 = MiniLMClassifier(**p, seed=run.seed)
            rows += _text_run(g, run, clf2, "minilm")
        else:
            raise SpecError(f"probes.standalone: model must be 'policy' or 'minilm', got {which!r}")
    return rows


def _text_run(
    g: RunGroup, run: Run, clf: Any, variant: str, score_train: bool = True
) -> list[dict[str, Any]]:
    """Fit a text classifier on the train texts (validation for its own model selection), score every role
    (the train role is left NaN for zero-shot scorers, ``score_train=False``)."""
    ctx = g.ctx
    t0 = time.perf_counter()
    val = {"val_texts": _texts(ctx, "val"), "val_y": ctx.labels("val")} if score_train else {}
    clf.fit(
        _texts(ctx, "train"), ctx.labels("train"), progress=True, select_metric=ctx.spec.select_metric, **val
    )
    fit_s = time.perf_counter() - t0
    scores = {
        role: np.asarray(clf.decision_function(_texts(ctx, role)), dtype=np.float64)
        if score_train or role != "train"
        else np.full(len(ctx.data.train), np.nan)
        for role in ctx.roles
    }
    return _finish(
        g,
        run,
        scores,
        ctx.cost.cost_views(c := float(clf.flops_per_token(ctx.cost)), c, 0.0, (), "own"),
        fit_s,
        layers=[],
        pooling="text",
        extra={"variant": variant, "clf_params": int(clf.n_params())},
        save=lambda path, meta: clf.save(path),
    )


@register_kind(
    "tfidf",
    per_layer=False,
    uses_C=False,
    params=("ngram_range", "char_ngrams", "min_df", "max_features", "Cs", "class_weight"),
    description="TF-IDF n-grams + logistic regression on the text",
)
def _tfidf(g: RunGroup) -> list[dict[str, Any]]:
    if not g.first_pooling:
        return []
    from probes.baselines import TfidfClassifier

    return [row for run in g.runs for row in _text_run(g, run, TfidfClassifier(**run.probe.params), "tfidf")]


@register_kind(
    "prompted",
    per_layer=False,
    uses_C=False,
    params=("template", "system_prompt", "batch_size", "max_len"),
    description="the model asked whether the text is harmful (yes/no logit)",
)
def _prompted(g: RunGroup) -> list[dict[str, Any]]:
    if not g.first_pooling:
        return []
    from probes.baselines import PromptedClassifier

    ctx = g.ctx
    return [
        row
        for run in g.runs
        for row in _text_run(
            g,
            run,
            PromptedClassifier(_model(ctx), **run.probe.params),
            f"prompted {ctx.spec.model}",
            score_train=False,
        )
    ]


# ------------------------------------------------------------------------------------------ components
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
    info = kinds()[ps.kind]
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
        new = info.runner(sub)
        append_results(ctx.out, new)
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


@register_kind(
    "ensemble",
    per_layer=False,
    uses_C=False,
    params=("members", "weights", "method", "C", "label"),
    description="z-scored logit average (or stacking) of components",
)
def _ensemble(g: RunGroup) -> list[dict[str, Any]]:
    if not g.first_pooling:
        return []
    ctx, rows = g.ctx, []
    for run in g.runs:
        p = run.probe.params
        members = p.get("members") or []
        if len(members) < 2:
            raise SpecError("probes.ensemble.params.members: give at least two components")
        got = [component_scores(g, c, f"probes.ensemble.members[{i}]") for i, c in enumerate(members)]
        method = str(p.get("method", "zscore"))
        t0 = time.perf_counter()
        val_list = [s["val"] for s, _ in got]
        if method == "zscore":
            ens: Any = ZScoreEnsemble(p.get("weights")).fit(val_list)
            scores = {role: ens.combine([s[role] for s, _ in got]) for role in ctx.roles}
            state = {"mean": ens.mean_.tolist(), "std": ens.std_.tolist(), "weights": ens.weights_.tolist()}
        elif method == "stack":
            ens = StackingEnsemble(C=float(p.get("C", 1.0)), seed=run.seed).fit(val_list, ctx.labels("val"))
            scores = {role: ens.combine([s[role] for s, _ in got]) for role in ctx.roles}
            scores["val"] = ens.oof_scores_  # cross-fitted: the stacker was fitted on validation scores
            state = {"coef": ens.coef_.tolist(), "intercept": ens.intercept_}
        else:
            raise SpecError(f"probes.ensemble.params.method: 'zscore' or 'stack', got {method!r}")
        fit_s = time.perf_counter() - t0
        infos = [i for _, i in got]
        cost = ensemble_cost(
            ctx.cost,
            [(i["flops_per_token"], i["standalone_flops_per_token"], i["forward_flops"]) for i in infos],
        )
        label = str(p.get("label") or " + ".join(_label(i) for i in infos))
        desc = {
            "method": method,
            "members": [i["run_id"] for i in infos],
            "labels": [_label(i) for i in infos],
        }

        saved = {**desc, **state}

        def save(path: Path, meta: dict[str, Any], d: dict[str, Any] = saved) -> None:
            path.mkdir(parents=True, exist_ok=True)
            (path / "ensemble.json").write_text(json.dumps({**d, "metadata": meta}, indent=1, default=str))

        rows += _finish(
            g,
            run,
            scores,
            cost,
            fit_s,
            layers=[],
            pooling=method,
            extra={"variant": label, "members": json.dumps(desc["labels"])},
            save=save,
        )
    return rows


@register_kind(
    "cascade",
    per_layer=False,
    uses_C=False,
    params=("stage1", "stage2", "rates", "block_rate", "combine", "weight", "label"),
    description="two-stage cascade: a cheap stage 1 escalates to an expensive stage 2",
)
def _cascade(g: RunGroup) -> list[dict[str, Any]]:
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
        block = float(p.get("block_rate", 0.0))
        combine = str(p.get("combine", "stage2"))
        weight = float(p.get("weight", 0.55))
        z1, z2 = ZRef.of(s1["val"]), ZRef.of(s2["val"])
        shared = min(i1["forward_flops"], i2["forward_flops"])
        label = str(p.get("label") or f"{_label(i1)} → {_label(i2)}")
        for rate in rates:
            t0 = time.perf_counter()
            lo, hi = thresholds_for_rate(s1["val"], rate, block)
            out = {
                role: cascade_scores(s1[role], s2[role], lo, hi, z1=z1, z2=z2, combine=combine, weight=weight)
                for role in ctx.roles
            }
            scores = {role: v[0] for role, v in out.items()}
            esc = {role: v[1] for role, v in out.items()}
            fit_s = time.perf_counter() - t0
            marginal = i1["flops_per_token"] + rate * i2["flops_per_token"]
            standalone = i1["standalone_flops_per_token"] + rate * (i2["standalone_flops_per_token"] - shared)
            fwd = max(i1["forward_flops"], i2["forward_flops"])
            cost = ctx.cost.cost_views(marginal, standalone, fwd, (), "cascade")
            new = _finish(
                g,
                run,
                scores,
                cost,
                fit_s,
                layers=[],
                pooling=combine,
                extra={
                    "variant": f"{label} r={rate:g}",
                    "escalation_rate": rate,
                    "escalation_rate_control": float(esc["control"].mean()),
                    "block_rate": block,
                    "stage1_run_id": i1["run_id"],
                    "stage2_run_id": i2["run_id"],
                    "stage1_flops_per_token": i1["flops_per_token"],
                    "stage2_flops_per_token": i2["flops_per_token"],
                },
                keep_scores=False,
            )
            for row in new:
                role = f"test:{row['eval_set']}"
                row["escalation_rate_eval"] = float(esc[role].mean()) if role in esc else float("nan")
            rows += new
    return rows
