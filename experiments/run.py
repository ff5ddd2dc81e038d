"""Execute a sweep: collect what is missing, fit, select C on validation, evaluate, append results.

Work is grouped by what shares pooled features: one *group* is (seed, hook kind, pooling), and within it the
batched logistic solver fits every layer × every C at once. Each finished group appends its rows to
``DIR/results.parquet`` (atomically); runs already in the table are skipped, so a killed sweep resumes.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from jaxtyping import Float
from rich.console import Console
from transformer_lens import HookedTransformer

from activations.collect import HOOK_KINDS, collect, default_store_dir, model_fingerprint, parse_layers
from activations.data import PromptDataset
from activations.decontam import Reference, decontaminate
from activations.pooling import Pooling
from activations.store import ActivationStore, StoreKey
from experiments.registry import kinds
from experiments.selection import CONFOUND_AUROC, annotate, selection_summary
from experiments.spec import Run, SpecError, SweepSpec, expand
from probes.base import Probe
from probes.cost import CostModel, ProbeCost
from probes.metrics import conservative_threshold, evaluate, fpr_key
from probes.selection import SELECTION_METRICS, Selection, select_scores, val_metrics

console = Console(stderr=True)

RESULTS = "results.parquet"
SWEEP_JSON = "sweep.json"
SPLITS_JSON = "splits.json"
SELECTION_JSON = "selection.json"
#: the columns :func:`finalize_results` derives from the whole table
ANNOTATIONS = ("selected", "selected_by", "surface_auroc", "confounded")
#: the residual stream before the first block: the token (and position) embeddings
EMBED_HOOK = "blocks.0.hook_resid_pre"
#: every finished run's scores, one ``<run_id>.npz`` per run (what ensembles and cascades combine)
SCORES_DIR = "scores"


class SweepError(RuntimeError):
    pass


# ---------------------------------------------------------------------- datasets
@dataclass
class SweepData:
    """The sweep's datasets, loaded, mixed, decontaminated and checked; ``splits`` is ``OUT/splits.json``."""

    train: PromptDataset
    val: PromptDataset
    tests: dict[str, PromptDataset]
    control: PromptDataset
    heldout: PromptDataset | None = None
    splits: dict[str, Any] = field(default_factory=dict)

    def all(self) -> dict[str, PromptDataset]:
        d = {"train": self.train, "val": self.val, "control": self.control}
        d.update({f"test:{k}": v for k, v in self.tests.items()})
        if self.heldout is not None:
            d["heldout"] = self.heldout
        return d

    def key(self) -> str:
        return "|".join(f"{k}={v.fingerprint()}" for k, v in sorted(self.all().items()))


def _counts(ds: PromptDataset) -> dict[str, Any]:
    """Counts of a role by source and label (``splits.json``)."""
    by: dict[str, dict[str, int]] = defaultdict(lambda: {"harmful": 0, "harmless": 0})
    for e in ds:
        by[e.source or "?"]["harmful" if e.label >= 0.5 else "harmless"] += 1
    n1 = int((ds.labels >= 0.5).sum()) if len(ds) else 0
    return {"n": len(ds), "harmful": n1, "harmless": len(ds) - n1, "by_source": dict(sorted(by.items()))}


def load_sweep_data(spec: SweepSpec, base: Path | None) -> SweepData:
    """Load every role; decontaminate evaluation sets against train ∪ val (text, group, near-duplicate),
    the benign control also against every test set and the held-out benign set against all of those; and
    record what was kept and removed, per role, in ``SweepData.splits``."""
    ds = spec.datasets
    cfg = spec.decontam.config()
    splits: dict[str, Any] = {"decontamination": asdict(cfg), "roles": {}}
    train, train_mix = ds.train.load(base, default_name="train")
    splits["roles"]["train"] = {**_counts(train), "mixture": train_mix["components"]}
    if ds.val is not None:
        val, val_mix = ds.val.load(base, default_name="val")
        val, rep = decontaminate(val, Reference([train], cfg))
        splits["roles"]["val"] = {
            **_counts(val),
            "mixture": val_mix["components"],
            "decontamination": rep.to_json(),
        }
    else:  # carve a group-respecting validation split out of train
        split = PromptDataset([replace(e, split=None) for e in train], name="train")
        split = split.with_splits({"train": 0.8, "val": 0.2}, seed=0)
        train, val = split.filter(split="train", name="train"), split.filter(split="val", name="val")
        splits["roles"]["train"].update(_counts(train))
        splits["roles"]["val"] = {**_counts(val), "carved_from": "train (80/20, whole groups)"}
    try:
        train.require_two_classes("train")
        val.require_two_classes("val")
    except ValueError as e:
        raise SpecError(str(e)) from e
    fit_ref = Reference([train, val], cfg)
    tests: dict[str, PromptDataset] = {}
    for name, t in ds.test.items():
        raw = t.load_with_negatives(base, default_name=name)
        clean, rep = decontaminate(raw, fit_ref, anchors=t.anchors(base))
        if len(clean) == 0:
            raise SpecError(f"dataset {name!r}: every example repeats the training or validation data")
        if (clean.labels >= 0.5).any() and not (raw.labels >= 0.5).all() and (clean.labels >= 0.5).all():
            raise SpecError(f"dataset {name!r}: decontamination removed every harmless example")
        tests[name] = clean
        splits["roles"][f"test:{name}"] = {**_counts(clean), "decontamination": rep.to_json()}
        _say(name, rep)
    if ds.benign_control is not None:
        control = ds.benign_control.load(base, default_name="benign_control")
        _require_benign(control, "benign_control")
        control, rep = decontaminate(control, Reference([train, val, *tests.values()], cfg))
        splits["roles"]["control"] = {**_counts(control), "decontamination": rep.to_json()}
        _say("benign_control", rep)
    else:
        control = val.filter(label=0.0, name="benign_control")
        splits["roles"]["control"] = {
            **_counts(control),
            "note": "no benign_control given: the validation negatives",
        }
    heldout = None
    if ds.benign_heldout is not None:
        heldout = ds.benign_heldout.load(base, default_name="benign_heldout")
        _require_benign(heldout, "benign_heldout")
        heldout, rep = decontaminate(heldout, Reference([train, val, *tests.values(), control], cfg))
        if len(heldout) == 0:
            raise SpecError("dataset 'benign_heldout': every example repeats another role's data")
        splits["roles"]["heldout"] = {**_counts(heldout), "decontamination": rep.to_json()}
        _say("benign_heldout", rep)
    if len(control) == 0:
        raise SpecError("dataset 'benign_control': every example repeats another role's data")
    return SweepData(train=train, val=val, tests=tests, control=control, heldout=heldout, splits=splits)


def _require_benign(ds: PromptDataset, role: str) -> None:
    if (ds.labels >= 0.5).any():
        n_bad = int((ds.labels >= 0.5).sum())
        raise SpecError(f"datasets.{role}: {n_bad} examples are labelled harmful; a {role} set is benign")


def _say(name: str, rep: Any) -> None:
    gone = {k: v for k, v in rep.removed.items() if v}
    if gone:
        console.print(
            f"[yellow]{name}: decontaminated against {'+'.join(rep.against)}: "
            f"removed {rep.n_before - rep.n_after} of {rep.n_before} ({gone})"
        )


def write_splits(out: Path, data: SweepData) -> Path:
    """``OUT/splits.json``: per role, counts by source and label, mixture components, and what
    decontamination removed and why (written atomically)."""
    p = out / SPLITS_JSON
    tmp = out / f".{SPLITS_JSON}.tmp"
    tmp.write_text(json.dumps(data.splits, indent=1, sort_keys=False, default=str))
    os.replace(tmp, p)
    return p


# ---------------------------------------------------------------------- results table
def read_results(out: Path) -> pd.DataFrame:
    p = out / RESULTS
    if not p.exists():
        return pd.DataFrame()
    return pd.read_parquet(p)


def finalize_results(out: Path) -> pd.DataFrame:
    """Annotate the finished table (``selected``, ``selected_by``, ``surface_auroc``, ``confounded``:
    :func:`experiments.selection.annotate`), rewrite it atomically and write ``OUT/selection.json`` (how
    often validation tied). Returns the annotated table."""
    df = read_results(out)
    if len(df) == 0:
        return df
    df = annotate(df.drop(columns=[c for c in ANNOTATIONS if c in df.columns]))
    tmp = out / f".tmp-{RESULTS}"
    df.to_parquet(tmp, index=False)
    os.replace(tmp, out / RESULTS)
    summary = selection_summary(df)
    (out / SELECTION_JSON).write_text(json.dumps(summary, indent=1))
    n_conf = sorted(df.loc[df["confounded"], "eval_set"].unique())
    if n_conf:
        console.print(
            f"[yellow]confounded[/] (a surface baseline reaches AUROC >= {CONFOUND_AUROC}): "
            + ", ".join(n_conf)
        )
    return df


def append_results(out: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    old = read_results(out)
    new = pd.DataFrame(rows)
    df = pd.concat([old, new], ignore_index=True) if len(old) else new
    tmp = out / f".tmp-{RESULTS}"
    df.to_parquet(tmp, index=False)
    os.replace(tmp, out / RESULTS)


def check_sweep_dir(out: Path, spec: SweepSpec) -> None:
    """A results folder belongs to one spec: refuse to mix another spec's rows into it."""
    out.mkdir(parents=True, exist_ok=True)
    sj = out / SWEEP_JSON
    fp = spec.fingerprint()
    if sj.exists():
        have = json.loads(sj.read_text())
        if have.get("spec_fingerprint") != fp:
            raise SweepError(
                f"{out / RESULTS}: this results folder was written by another spec "
                f"({have.get('name')!r}, fingerprint {have.get('spec_fingerprint')}); use a new --out folder"
            )
    else:
        sj.write_text(json.dumps({"name": spec.name, "spec_fingerprint": fp}, indent=1))
        (out / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))


# ---------------------------------------------------------------------- evaluation
@dataclass
class SweepContext:
    spec: SweepSpec
    out: Path
    model_fp: dict[str, str]
    cost: CostModel
    data: SweepData
    stores: dict[str, ActivationStore]
    hook_names: dict[str, list[str]]  # hook kind -> full names (one per layer)
    layers: list[int]
    done: set[str] = field(default_factory=set)
    model: HookedTransformer | None = None

    @property
    def roles(self) -> list[str]:
        return list(self.stores)

    def labels(self, role: str) -> np.ndarray:
        return np.array(self.stores[role].labels)


class FeatureCache:
    """Pooled features of every dataset role for one (hook, pooling), computed once per layer."""

    def __init__(self, ctx: SweepContext, hook_kind: str, pooling: Pooling) -> None:
        self.ctx, self.hook_kind, self.pooling = ctx, hook_kind, pooling
        self._cache: dict[tuple[str, int | str], torch.Tensor] = {}

    def hook(self, layer: int) -> str:
        return HOOK_KINDS[self.hook_kind].format(l=layer)

    def layer(self, role: str, layer: int) -> Float[torch.Tensor, "n d"]:
        key = (role, layer)
        if key not in self._cache:
            self._cache[key] = self.ctx.stores[role].pooled(self.hook(layer), self.pooling)
        return self._cache[key]

    def layers(self, role: str, layers: Sequence[int]) -> Float[torch.Tensor, "l n d"]:
        return torch.stack([self.layer(role, layer) for layer in layers])

    def hooked(self, role: str, hook: str) -> Float[torch.Tensor, "n d"]:
        """Pooled features of a full hook name (e.g. the embeddings), computed once."""
        key = (role, hook)
        if key not in self._cache:
            self._cache[key] = self.ctx.stores[role].pooled(hook, self.pooling)
        return self._cache[key]


@dataclass
class RunGroup:
    """The runs of one probe spec that share seed, hook and pooling (what a kind's runner receives)."""

    ctx: SweepContext
    runs: list[Run]
    hook_kind: str
    pooling: Pooling
    feats: FeatureCache

    @property
    def spec(self) -> SweepSpec:
        return self.ctx.spec

    @property
    def probe_spec(self) -> Any:
        return self.runs[0].probe

    @property
    def first_pooling(self) -> bool:
        """Whether this is the spec's first pooling group: kinds that pool by themselves (per-token probes,
        fine-tuned layers, standalone classifiers, ...) run there only, once per sweep."""
        return self.pooling == self.ctx.spec.pooling_objs()[0]


def evaluate_scores(
    ctx: SweepContext, scores: dict[str, np.ndarray], seed: int
) -> dict[str, dict[str, float]]:
    """Metrics of one probe's scores (one array per dataset role) on every test set.

    Thresholds come from the benign control set and hold out of sample (:mod:`probes.metrics`); with a
    held-out benign set the FPR they realize there is reported too (``realized_fpr_at_*``). A test set with
    both classes (e.g. a harmful set with matched ``negatives``) is scored against its own negatives; a
    harmful-only set against the control set; a benign-only one (e.g. contrast prompts) gets NaN detection
    metrics and its over-refusal rate (``benign_flag_rate_at_*``: share flagged at the control threshold).
    """
    control = scores["control"]
    heldout = scores.get("heldout")
    n_boot = ctx.spec.bootstrap
    out = {}
    for name in ctx.data.tests:
        s = scores[f"test:{name}"]
        harmful = ctx.labels(f"test:{name}") >= 0.5
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kw = {"benign_control_scores": control, "benign_heldout_scores": heldout, "n_boot": n_boot}
            if harmful.all():
                yy = np.concatenate([np.ones(len(s), int), np.zeros(len(control), int)])
                m = evaluate(yy, np.concatenate([s, control]), seed=seed, **kw)
            elif harmful.any():
                m = evaluate(harmful.astype(int), s, seed=seed, **kw)
            else:
                m = {
                    "auroc": float("nan"),
                    "tpr_at_1pct_fpr": float("nan"),
                    "tpr_at_0.1pct_fpr": float("nan"),
                    "n_benign_control": len(control),
                }
            for fpr in (0.01, 0.001):
                key = fpr_key(fpr)
                info = conservative_threshold(control, fpr, warn=False)
                benign = s[~harmful]
                m[f"benign_flag_rate_at_{key}_fpr"] = (
                    float((benign > info.threshold).mean())
                    if len(benign) and not info.limited_by_n
                    else float("nan")
                )
        m["negatives"] = "control" if harmful.all() else ("own" if harmful.any() else "")
        m["n_eval"] = len(s)
        out[name] = m
    return out


def val_selection(ctx: SweepContext, val_scores: Sequence[np.ndarray]) -> Selection:
    """The candidate (e.g. a C value, in grid order) chosen on validation by the one rule of
    :mod:`probes.selection` with the spec's primary metric."""
    return select_scores(ctx.labels("val"), [np.asarray(v) for v in val_scores], ctx.spec.select_metric)


def select_best(ctx: SweepContext, val_scores: Sequence[np.ndarray]) -> tuple[int, list[float]]:
    """Index of the candidate chosen on validation (:func:`val_selection`), and every candidate's primary
    validation metric."""
    sel = val_selection(ctx, val_scores)
    return sel.index, [m[ctx.spec.select_metric] for m in sel.metrics]


def probe_metadata(
    ctx: SweepContext, run: Run, layers: Sequence[int], extra: dict[str, Any]
) -> dict[str, Any]:
    """What a saved probe records: model fingerprint and reference, hooks, pooling, positions, data."""
    st = ctx.stores["train"]
    return {
        **ctx.model_fp,
        "model_ref": ctx.spec.model,
        "hook": run.hook_kind,
        "hook_names": [HOOK_KINDS[run.hook_kind].format(l=layer) for layer in layers],
        "layers": list(layers),
        "pooling": run.pooling.params(),
        "positions": st.key["positions"],
        "max_len": st.key["max_len"],
        "chat_template": st.key["chat_template"],
        "train_dataset": st.key["dataset_name"],
        "train_fingerprint": st.key["dataset_fingerprint"],
        "run_id": run.run_id,
        "sweep": ctx.spec.name,
        **extra,
    }


def make_rows(
    ctx: SweepContext,
    run: Run,
    layers: Sequence[int],
    probe: Probe | None,
    *,
    C: float | None,
    val: float,
    metrics: dict[str, dict[str, float]],
    fit_seconds: float,
    cost: tuple[ProbeCost, ProbeCost] | None = None,
    extra: dict[str, Any] | None = None,
    scores: dict[str, np.ndarray] | None = None,
    save: Any = None,
    selection: Selection | None = None,
    keep_scores: bool = True,
) -> list[dict[str, Any]]:
    """One results row per eval set for a finished run; saves ``probe`` under ``OUT/probes/<run_id>``.

    ``cost`` is (marginal, standalone); by default a pooled linear read-out of ``layers``. ``scores`` (every
    dataset role's scores of the chosen probe) give every validation metric of the selection rule
    (``val_tpr_at_1pct_fpr``, ``val_log_auroc``, ``val_auroc``; :mod:`probes.selection`) and are kept in
    ``OUT/scores/<run_id>.npz`` with the run's costs (unless ``keep_scores`` is off), so ensembles and
    cascades can combine finished runs.
    ``selection`` (the run's choice among candidates, e.g. its C) adds ``val_candidates`` and ``val_ties``
    (how many candidates tied on the primary validation metric). ``save(path, metadata)`` replaces
    ``probe.save``
    for scorers that are not :class:`~probes.base.Probe` (fine-tuned layers, standalone classifiers).
    """
    vm = {m: float("nan") for m in SELECTION_METRICS}
    if scores is not None:
        vm = val_metrics(ctx.labels("val"), scores["val"])
    vm[ctx.spec.select_metric] = val
    d = ctx.cost.d_model
    if cost is None:
        marginal = ctx.cost.probe_cost(list(layers), d, run.pooling, view="marginal", order="pool_then_probe")
        standalone = ctx.cost.probe_cost(
            list(layers), d, run.pooling, view="standalone", order="pool_then_probe"
        )
    else:
        marginal, standalone = cost
    path = ctx.out / "probes" / run.run_id
    meta = probe_metadata(ctx, run, layers, {"C": C, f"val_{ctx.spec.select_metric}": val, **(extra or {})})
    if save is not None:
        save(path, meta)
    elif probe is not None:
        probe.save(path, meta)
    if scores is not None and keep_scores:
        save_run_scores(
            ctx.out,
            run.run_id,
            scores,
            {
                "probe": run.probe.kind,
                "variant": str((extra or {}).get("variant", "")),
                "layers": list(layers),
                "pooling": run.pooling.name,
                "flops_per_token": marginal.flops_per_token,
                "standalone_flops_per_token": standalone.flops_per_token,
                "forward_flops": standalone.forward_flops,
                "val": val,
            },
        )
    rows = []
    for eval_set, m in metrics.items():
        rows.append(
            {
                "run_id": run.run_id,
                "sweep": ctx.spec.name,
                "model": ctx.model_fp["model_id"],
                "probe": run.probe.kind,
                "hook": run.hook_kind,
                "layer": int(layers[0]) if len(layers) == 1 else -1,
                "layers": ",".join(str(x) for x in layers),
                "n_layers_read": len(layers),
                "pooling": run.pooling.name,
                "C": float("nan") if C is None else float(C),
                "seed": run.seed,
                "eval_set": eval_set,
                **m,
                **{f"val_{k}": v for k, v in vm.items()},
                "select_metric": ctx.spec.select_metric,
                "val_candidates": len(selection.metrics) if selection is not None else 1,
                "val_ties": selection.n_tied if selection is not None else 1,
                "flops_per_token": marginal.flops_per_token,
                "overhead_pct": marginal.overhead_pct,
                "standalone_flops_per_token": standalone.flops_per_token,
                "standalone_overhead_pct": standalone.overhead_pct,
                "probe_path": str(path) if probe is not None or save is not None else "",
                "fit_seconds": fit_seconds,
                "n_train": len(ctx.data.train),
                "n_features": probe.n_features_in_ if probe is not None else -1,
                "params": json.dumps(run.probe.params, sort_keys=True) if run.probe.params else "",
                **{k: v for k, v in (extra or {}).items() if isinstance(v, (int, float, str))},
            }
        )
    return rows


def save_run_scores(out: Path, run_id: str, scores: dict[str, np.ndarray], info: dict[str, Any]) -> Path:
    """Write one run's scores (a float64 array per dataset role) and ``info`` (JSON) to
    ``OUT/scores/<run_id>.npz``, atomically; no pickled objects."""
    d = out / SCORES_DIR
    d.mkdir(parents=True, exist_ok=True)
    arrays = {f"role:{k}": np.asarray(v, dtype=np.float64) for k, v in scores.items()}
    arrays["info"] = np.array(json.dumps(info, sort_keys=True, default=float))
    tmp = d / f".{run_id}.{os.getpid()}.tmp.npz"
    np.savez(tmp, **arrays)  # type: ignore[arg-type]
    os.replace(tmp, d / f"{run_id}.npz")
    return d / f"{run_id}.npz"


def load_run_scores(out: Path, run_id: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """A finished run's ``(scores by role, info)`` from ``OUT/scores``, or None if it has none."""
    f = out / SCORES_DIR / f"{run_id}.npz"
    if not f.exists():
        return None
    with np.load(f, allow_pickle=False) as z:
        scores = {k.split(":", 1)[1]: z[k] for k in z.files if k.startswith("role:")}
        info = json.loads(str(z["info"]))
    return scores, info


def score_roles(ctx: SweepContext, fn: Callable[[str], np.ndarray]) -> dict[str, np.ndarray]:
    """``{role: fn(role)}`` over every dataset role of the sweep."""
    return {role: np.asarray(fn(role)) for role in ctx.roles}


# ---------------------------------------------------------------------- driver
def prepare(
    spec: SweepSpec,
    out: Path,
    *,
    base: Path | None = None,
    model: HookedTransformer | None = None,
    model_loader: Callable[[str], HookedTransformer] | None = None,
    store_root: Path | None = None,
    progress: bool = True,
    collect_fn: Callable[..., ActivationStore] | None = None,
) -> SweepContext:
    """Check the folder, load data, collect missing stores; everything a sweep needs before fitting.

    ``collect_fn`` replaces :func:`activations.collect.collect` (same signature), e.g. the Ray backend's
    sharded collection."""
    check_sweep_dir(out, spec)
    data = load_sweep_data(spec, base)
    write_splits(out, data)
    if model is None:
        from activations.models import load_model

        console.print(f"[bold]loading model[/] {spec.model}")
        model = (model_loader or load_model)(spec.model)
    layers = parse_layers(spec.layers, model.cfg.n_layers)
    hook_names = {h: [HOOK_KINDS[h].format(l=layer) for layer in layers] for h in spec.hooks}
    for h in spec.hooks:
        if h not in HOOK_KINDS:
            raise SpecError(f"hooks: unknown hook {h!r}; expected one of {sorted(HOOK_KINDS)}")
    all_hooks = [n for names in hook_names.values() for n in names]
    if spec.surface_baselines and EMBED_HOOK not in all_hooks:
        all_hooks.append(EMBED_HOOK)  # the token embeddings, for the surface-baseline probe
    store_root = store_root or out / "stores"
    stores = {}
    fp = model_fingerprint(model)
    for role, ds in data.all().items():
        key = StoreKey(
            **fp,
            dataset_name=ds.name,
            dataset_fingerprint=ds.fingerprint(),
            hooks=tuple(all_hooks),
            positions=spec.positions,
            keep=spec.keep or spec.positions,
            max_len=min(spec.max_len, model.cfg.n_ctx),
            chat_template=bool(getattr(model.tokenizer, "chat_template", None)),
        )
        path = default_store_dir(store_root, key)
        stores[role] = (collect_fn or collect)(
            model,
            ds,
            path,
            hooks=all_hooks,
            layers=None,
            positions=spec.positions,
            keep=spec.keep or spec.positions,
            max_len=min(spec.max_len, model.cfg.n_ctx),
            token_budget=spec.token_budget,
            progress=progress,
        )
    cost = CostModel.from_config(model.cfg, context_len=spec.context_len)
    ctx = SweepContext(spec, out, fp, cost, data, stores, hook_names, layers, model=model)
    done = read_results(out)
    ctx.done = set(done["run_id"]) if len(done) else set()
    return ctx


def run_sweep(
    spec: SweepSpec,
    out: str | Path,
    *,
    base: Path | None = None,
    model: HookedTransformer | None = None,
    store_root: Path | None = None,
    progress: bool = True,
    backend: str = "local",
    address: str | None = None,
) -> pd.DataFrame:
    """Run (or resume) a sweep; returns the full results table."""
    out = Path(out)
    if backend == "ray":  # Ray is imported only for this backend
        from experiments.ray_backend import run_sweep_ray

        return run_sweep_ray(
            spec, out, base=base, model=model, store_root=store_root, progress=progress, address=address
        )
    if backend != "local":
        raise SweepError(f"unknown backend {backend!r} (available: local, ray)")
    t_start = time.perf_counter()
    ctx = prepare(spec, out, base=base, model=model, store_root=store_root, progress=progress)
    runs = list(expand(spec, ctx.layers, ctx.data.key()))
    todo = [r for r in runs if r.run_id not in ctx.done]
    console.print(
        f"[bold]{spec.name}[/]: {len(runs)} runs, {len(runs) - len(todo)} already done, {len(todo)} to fit"
    )
    groups: dict[tuple[int, str, Pooling], list[Run]] = defaultdict(list)
    for r in todo:
        groups[(r.seed, r.hook_kind, r.pooling)].append(r)
    from tqdm.auto import tqdm

    for (_seed, hook_kind, pooling), group in tqdm(
        list(groups.items()), desc="fit groups", disable=not progress
    ):
        run_group(ctx, hook_kind, pooling, group, sink=lambda rows: append_results(out, rows))
    df = finalize_results(out)
    console.print(
        f"[green]done[/] in {time.perf_counter() - t_start:.1f}s: {len(df)} rows in {out / RESULTS}"
    )
    return df


def run_group(
    ctx: SweepContext,
    hook_kind: str,
    pooling: Pooling,
    group: list[Run],
    sink: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Fit and evaluate every run of one (seed, hook, pooling) group, kind by kind.

    ``sink`` receives each probe spec's rows as soon as they are done (the local sweep appends them to
    ``results.parquet`` there, so a killed sweep keeps every finished kind); all rows are also returned."""
    registry = kinds()
    feats = FeatureCache(ctx, hook_kind, pooling)
    rows: list[dict[str, Any]] = []
    by_spec: dict[str, list[Run]] = defaultdict(list)
    for r in group:
        by_spec[r.probe.model_dump_json()].append(r)
    for runs in by_spec.values():
        runs = [r for r in runs if r.run_id not in ctx.done]  # a component of an ensemble may have run it
        if not runs:
            continue
        info = registry[runs[0].probe.kind]
        new = info.runner(RunGroup(ctx, runs, hook_kind, pooling, feats))
        for row in new:
            for k, v in list(row.items()):
                if isinstance(v, float) and math.isinf(v):
                    row[k] = float("nan")
        if sink is not None and new:
            sink(new)
        ctx.done |= {r.run_id for r in runs}
        rows += new
    return rows
