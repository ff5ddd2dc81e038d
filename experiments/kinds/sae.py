"""The runner of SAE-feature probes (the ``sae_latents`` view; the kinds are declared in :mod:`sae.probe`):
``sae_k1``, ``sae_k8``, ``sae_k64``, ``sae_k512``, ``sae_dense`` and
``sae`` (with ``params: {k: N}``); the results' ``probe`` column is ``sae_k<N>`` or ``sae_dense``.

Where the SAE comes from (per run, i.e. per layer):

* ``params.sae`` names one: a local folder in sae-lens's format (``{layer}`` and ``{hook}`` are filled in,
  so one spec can name an SAE per layer) or ``pretrained:RELEASE/SAE_ID`` (online). Its hook must be the
  run's hook (checked: a mismatch is an error naming both).
* otherwise the kind trains one with sae-lens on the run's layer, on the *train* store's tokens (labels are
  not used) plus, with ``params.sae_data`` (a dataset path as in the spec's ``datasets``, e.g.
  ``shared:datasets/...``; ``sae_data_subsample`` prompts), more unlabelled prompts collected for the
  purpose (any prompt that repeats a validation or test prompt is dropped first). The SAE, its
  ``report.json`` (explained variance, L0, CE loss clean / spliced / zero-ablated on validation sequences)
  and the extra store are cached under ``OUT/saes/``, keyed by hook, training config and data, so every SAE
  kind of a sweep (and a rerun) shares one SAE per layer.

Training params: ``architecture`` (standard | topk), ``expansion_factor``, ``l1_coefficient``, ``topk``
(the SAE's k), ``train_tokens``, ``batch_size``, ``lr``, ``ce_sequences``; head: ``head_penalty`` (l2 | l1).
Kinds sharing these params share the SAE and its encoded latents (computed once per pooling set).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from activations.collect import HOOK_KINDS, collect
from activations.data import normalize_text
from activations.store import ActivationStore
from experiments.kinds.finish import finish_run
from experiments.kinds.registry import register_runner
from experiments.sweep.context import RunGroup, SweepContext, val_selection
from experiments.sweep.spec import DatasetSpec, SpecError
from probes.base import SAE_LATENTS
from sae.features import LatentEncoder, pooled_latents_multi
from sae.load import SAEHookMismatchError, SAELoadError, check_hook, load_sae
from sae.probe import SAE_PARAMS, SAEFeatureProbe, fit_heads, sae_probe_cost
from sae.train import SAETrainConfig, SAETrainError, ce_loss_metrics, reconstruction_metrics, train_sae_cached

__all__ = ["get_sae", "run_sae"]

_TRAIN_KEYS = {
    "architecture": "architecture",
    "expansion_factor": "expansion_factor",
    "l1_coefficient": "l1_coefficient",
    "topk": "k",
    "train_tokens": "n_tokens",
    "batch_size": "batch_size",
    "lr": "lr",
}
_REPORT_COLS = (
    "explained_variance",
    "l0",
    "dead_frac",
    "ce_loss_clean",
    "ce_loss_spliced",
    "ce_loss_zero",
    "ce_loss_recovered",
    "d_sae",
    "train_seconds",
)


def _sae_data_store(ctx: SweepContext, hook: str, params: dict[str, Any]) -> ActivationStore | None:
    ref = params.get("sae_data")
    if not ref:
        return None
    if ctx.model is None:
        raise SpecError("params.sae_data needs the model to collect activations")
    ds = DatasetSpec(path=str(ref), subsample=params.get("sae_data_subsample"), name="sae_data").load(None)
    held = {normalize_text(e.all_text()) for role in ("val", "control") for e in _role_data(ctx, role)}
    for t in ctx.data.tests.values():
        held |= {normalize_text(e.all_text()) for e in t}
    ds = ds.where(lambda e: normalize_text(e.all_text()) not in held)
    if len(ds) == 0:
        raise SpecError(f"params.sae_data {ref!r}: every prompt repeats an evaluation prompt")
    path = ctx.out / "saes" / "data" / f"{ds.fingerprint()[:16]}-{hook}"
    return collect(
        ctx.model,
        ds,
        path,
        hooks=[hook],
        layers=None,
        positions=ctx.spec.positions,
        max_len=min(ctx.spec.max_len, ctx.model.cfg.n_ctx),
        token_budget=ctx.spec.token_budget,
    )


def _role_data(ctx: SweepContext, role: str) -> Any:
    return {"train": ctx.data.train, "val": ctx.data.val, "control": ctx.data.control}[role]


def get_sae(
    ctx: SweepContext, hook: str, layer: int, params: dict[str, Any]
) -> tuple[Any, dict[str, Any], str]:
    """The run's SAE (named or trained and cached), its reconstruction report and its reference."""
    key = (
        "sae",
        hook,
        json.dumps({k: params.get(k) for k in SAE_PARAMS if k != "head_penalty"}, sort_keys=True),
    )
    cache = ctx.cache.other
    if key in cache:
        return cache[key]
    train_store, val_store = ctx.stores["train"], ctx.stores["val"]
    n_ce = int(params.get("ce_sequences", 16))
    if params.get("sae"):
        ref = str(params["sae"]).format(layer=layer, hook=hook)
        try:
            sae = load_sae(ref, hook=hook, store=train_store)
        except (SAELoadError, SAEHookMismatchError) as e:
            raise SpecError(f"params.sae: {e}") from e
        rep_file = Path(ref) / "report.json"
        if rep_file.is_file() and json.loads(rep_file.read_text()).get("eval_store") == str(val_store.path):
            report = json.loads(rep_file.read_text())
        else:
            report = {"d_sae": int(sae.cfg.d_sae), **reconstruction_metrics(sae, val_store, hook)}
            if ctx.model is not None:
                report.update(ce_loss_metrics(ctx.model, sae, val_store, hook, n_sequences=n_ce))
        out = (sae, report, ref)
    else:
        kw = {dst: params[src] for src, dst in _TRAIN_KEYS.items() if params.get(src) is not None}
        try:
            cfg = SAETrainConfig(**kw, seed=0)
        except (SAETrainError, TypeError) as e:
            raise SpecError(f"SAE training params: {e}") from e
        stores = [train_store]
        extra = _sae_data_store(ctx, hook, params)
        if extra is not None:
            stores.append(extra)
        sae, report, folder = train_sae_cached(
            ctx.out / "saes", stores, hook, cfg, eval_store=val_store, model=ctx.model, ce_sequences=n_ce
        )
        check_hook(sae, hook, train_store)
        out = (sae, report, str(folder))
    cache[key] = out
    return out


def _latents(
    ctx: SweepContext, sae: Any, ref: str, hook: str
) -> tuple[LatentEncoder, dict[str, dict[str, torch.Tensor]]]:
    """The SAE's full encoder and every role's pooled latents for every pooling of the spec (cached)."""
    key = ("latents", ref, hook)
    cache = ctx.cache.other
    if key not in cache:
        enc = LatentEncoder.from_sae(sae)
        pools = ctx.spec.pooling_objs()
        Z = {role: pooled_latents_multi(ctx.stores[role], hook, enc, pools) for role in ctx.roles}
        cache[key] = (enc, Z)
    return cache[key]


@register_runner(SAE_LATENTS)
def run_sae(g: RunGroup) -> list[dict[str, Any]]:
    """Per run (a layer): the SAE (named or trained and cached), its pooled latents, the top-``k`` latents by
    class-mean difference and a logistic head on them (every C in one solve, C chosen on validation)."""
    ctx = g.ctx
    rows: list[dict[str, Any]] = []
    for run in g.runs:
        params = dict(run.probe.params)
        _, kw = g.kind.build(g.entry(run, [run.layer]))
        k: int | None = kw["k"]
        if g.kind.name == "sae":
            if "k" not in params:
                raise SpecError("probe kind 'sae' needs params.k (a number of latents, or 'all')")
            k = None if str(params["k"]) == "all" else int(params["k"])
        hook = HOOK_KINDS[run.hook_kind].format(l=run.layer)
        sae, report, ref = get_sae(ctx, hook, run.layer, params)
        enc, Z = _latents(ctx, sae, ref, hook)
        if k is not None and k > enc.n_latents:
            raise SpecError(f"{run.probe.kind}: k={k} exceeds the SAE's {enc.n_latents} latents")
        name = g.pooling.name
        t0 = time.perf_counter()
        sel, grid = fit_heads(
            Z["train"][name],
            ctx.labels("train"),
            [k],
            ctx.spec.Cs,
            penalty=kw["penalty"],
            class_weight=kw["class_weight"],
        )[k]
        fit_s = time.perf_counter() - t0
        chosen = val_selection(ctx, list(grid.val_scores([Z["val"][name][:, sel]])[0]))
        head = grid.scorer(0, chosen.index)
        sub = enc.subset(sel)
        probe = SAEFeatureProbe.build(sub, head, k=k, pooling=g.pooling, hook=hook, sae_ref=ref)  # type: ignore[arg-type]
        scores = {role: probe.score(Z[role][name][:, sel]) for role in ctx.roles}
        extra: dict[str, Any] = {f"sae_{c}": float(report[c]) for c in _REPORT_COLS if c in report}
        extra.update(
            sae_path=ref,
            sae_architecture=str(sae.cfg.architecture()),
            sae_k=int(sub.n_latents),
            sae_latents=",".join(str(int(i)) for i in sub.ids[:64].tolist()),
        )
        rows += finish_run(
            g,
            run,
            probe,
            scores,
            layers=[run.layer],
            fit_seconds=fit_s,
            selection=chosen,
            C=ctx.spec.Cs[chosen.index],
            cost=(
                sae_probe_cost(ctx.cost, run.layer, sub, g.pooling, "marginal"),
                sae_probe_cost(ctx.cost, run.layer, sub, g.pooling, "standalone"),
            ),
            extra=extra,
            probe="sae_dense" if k is None else f"sae_k{k}",
        )
    return rows
