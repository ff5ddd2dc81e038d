"""The transfer atlas: how far a probe's signal carries to sources it never saw.

``probe-atlas transfer SPEC --out DIR`` (:func:`run_transfer`) loads the spec's named sources
(:mod:`activations.shared_sources`) as one corpus with every cross-source repeat owned once, collects each
source's activations **once** (one store per source, keyed by its examples), and then, per *fold*:

* ``loso`` (the default): every source in ``held_out`` is held out in turn; the probes train on every other
  source (:func:`~activations.shared_sources.leave_one_source_out`: the pool is decontaminated against the
  held-out set by text, group and near-duplicate), choose C on a validation split carved from the *training*
  sources by whole groups (never on the held-out source), and are scored on the held-out source;
* ``train_on_one``: train on one source (plus harmless ``negatives`` where it has none), evaluate on every
  other (:func:`~activations.shared_sources.train_on_one_source`).

Where an evaluation source has no harmless prompts of its own, it is scored against harmless prompts of
the same form: plain harmful requests against a reserve of the ``negatives`` source (Alpaca) that no fold
ever trains on; wrapped harmful requests (GPTFuzz templates) against those harmless requests placed in the
very same wrappers (:func:`activations.matched.wrap_like`); harmless-only sets (look-alikes) against the
fold's in-source harmful test prompts (their AUROC is "look-alike vs plainly harmful", and ``flag_rate`` is
the share flagged at the validation threshold for 1% FPR). Every fold also carves an **in-source** test
split from its training pool (by whole groups; never fitted or validated on): the ``in_source`` rows,
against which the generalization gap is measured.

``OUT/transfer.parquet`` has one row per fold × evaluation set × probe × layer × pooling: ``mode``,
``train_source``, ``eval_source``, ``probe``, ``layer``, ``pooling``, ``auroc``, ``tpr_at_1pct_fpr`` (TPR at
the threshold that flags 1% of the set's own harmless prompts, out of sample; NaN with < 100 of them),
``flag_rate`` (harmless flagged at the validation 1%-FPR threshold), ``in_source``, ``n_pos``, ``n_neg``,
``negatives`` (where the harmless side came from), ``C``, ``val_*`` (the validation figures C and the layer
were chosen on), ``selected`` (the layer chosen on validation for that fold, probe and pooling) and
``surface_auroc`` (TF-IDF on the same fold and set: what form alone gives). ``OUT/transfer.json`` records the
corpus report and every fold's split counts; the CLI writes the figures to ``OUT/figures``
(:mod:`experiments.viz.transfer`).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import yaml
from jaxtyping import Float
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from rich.console import Console
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from activations.collect import (
    HOOK_KINDS,
    collect,
    default_store_dir,
    model_fingerprint,
    parse_layers,
    resolve_store_dtype,
)
from activations.data import DataError, Example, PromptDataset
from activations.matched import wrap_like
from activations.pooling import Pooling
from activations.shared_sources import (
    SOURCES,
    Corpus,
    build_corpus,
    carve,
    get_source,
    leave_one_source_out,
    train_on_one_source,
)
from activations.store import ActivationStore, StoreKey
from experiments.sweep.spec import check_poolings
from probes.base import POOLED, SWEEP_KINDS, TEXT
from probes.metrics import auroc, conservative_threshold
from probes.scorer import Scorer
from probes.selection import DEFAULT_SELECT, SELECTION_METRICS, select_best, val_metrics
from probes.text import example_text

__all__ = [
    "TRANSFER_COLUMNS",
    "Fold",
    "TransferError",
    "TransferSpec",
    "generalization_gap",
    "layer_profile",
    "load_transfer_spec",
    "plan_folds",
    "read_transfer",
    "run_transfer",
]

console = Console(stderr=True)
Mode = Literal["loso", "train_on_one"]
TRANSFER = "transfer.parquet"
#: the columns every atlas row has (besides the validation figures)
TRANSFER_COLUMNS: tuple[str, ...] = (
    "mode",
    "train_source",
    "eval_source",
    "probe",
    "layer",
    "pooling",
    "auroc",
    "tpr_at_1pct_fpr",
    "flag_rate",
    "in_source",
    "n_pos",
    "n_neg",
    "negatives",
    "C",
    "selected",
    "surface_auroc",
)
IN_SOURCE = "in-source"
SURFACE = "tfidf"


class TransferError(ValueError):
    """A bad transfer spec or an atlas that cannot be built from it."""


class TransferSpec(BaseModel):
    """What ``probe-atlas transfer`` runs (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "transfer"
    model: str = "smollm2"
    max_len: int = Field(default=256, gt=0)
    token_budget: int = Field(default=4096, gt=0)
    #: registered source names (:data:`activations.shared_sources.SOURCES`)
    sources: list[str] = Field(min_length=2)
    #: per-source caps (over each source's default cap)
    caps: dict[str, int] = Field(default_factory=dict)
    modes: list[Mode] = Field(default_factory=lambda: list[Mode](["loso"]), min_length=1)
    #: loso: the sources held out in turn (default: every source with harmful prompts or look-alikes)
    held_out: list[str] | None = None
    #: train_on_one: the training sources (default: every source with harmful prompts)
    train_sources: list[str] | None = None
    #: harmless plain prompts for sets that have none (a reserve of it is never trained on)
    negatives: str = "alpaca"
    negatives_reserve: int = Field(default=200, gt=0)
    hook: str = "resid_post"
    layers: str | list[int] = "all"
    poolings: list[str] = Field(default_factory=lambda: ["mean"], min_length=1)
    probes: list[str] = Field(default_factory=lambda: ["logistic_l2", "diffmeans"], min_length=1)
    surface_baseline: bool = True
    Cs: list[float] = Field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0], min_length=1)
    val_fraction: float = Field(default=0.2, gt=0, lt=0.5)
    in_source_fraction: float = Field(default=0.15, gt=0, lt=0.5)
    select_metric: Literal["auroc", "log_auroc", "tpr_at_1pct_fpr"] = DEFAULT_SELECT  # type: ignore[assignment]
    seed: int = 0

    @field_validator("sources")
    @classmethod
    def _known_sources(cls, v: list[str]) -> list[str]:
        bad = [n for n in v if n not in SOURCES]
        if bad:
            raise ValueError(f"unknown source(s) {bad}; known sources: {sorted(SOURCES)}")
        if len(set(v)) != len(v):
            raise ValueError("sources: a source is named twice")
        return v

    @field_validator("probes")
    @classmethod
    def _known_probes(cls, v: list[str]) -> list[str]:
        for k in v:
            if k not in SWEEP_KINDS:
                raise ValueError(f"unknown probe kind {k!r}; known kinds: {sorted(SWEEP_KINDS)}")
            cls_ = _scorer_class(k, {"kind": k, "params": {}, "seed": 0, "layers": [0], "hooks": []})
            if cls_.view != POOLED or SWEEP_KINDS[k].hook is not None:
                raise ValueError(
                    f"probe kind {k!r} reads the {cls_.view!r} view; the atlas runs families on one pooled "
                    "layer (e.g. logistic_l2, diffmeans, lda, ridge)"
                )
        return v

    @field_validator("poolings")
    @classmethod
    def _poolings(cls, v: list[str]) -> list[str]:
        return check_poolings(v)

    @field_validator("hook")
    @classmethod
    def _hook(cls, v: str) -> str:
        if v not in HOOK_KINDS:
            raise ValueError(f"hook: unknown hook {v!r}; expected one of {sorted(HOOK_KINDS)}")
        return v

    def check(self) -> None:
        """Cross-field checks (raise :class:`TransferError`)."""
        if self.negatives in self.sources:
            raise TransferError(
                f"negatives {self.negatives!r} is also a source; name it only as negatives (its reserve "
                "pairs harmful-only sets and the rest joins training)"
            )
        for role, names in (("held_out", self.held_out), ("train_sources", self.train_sources)):
            bad = [n for n in names or [] if n not in self.sources]
            if bad:
                raise TransferError(f"{role}: {bad} not among the spec's sources {self.sources}")
        for n in self.caps:
            if n not in self.sources and n != self.negatives:
                raise TransferError(f"caps: {n!r} is not a source of the spec")


def _scorer_class(kind: str, entry: dict[str, Any]) -> type[Scorer]:
    cls, _ = SWEEP_KINDS[kind].build(entry)
    assert issubclass(cls, Scorer)
    return cls


def load_transfer_spec(path: str | Path) -> TransferSpec:
    """A transfer spec from YAML (a path, or a name in ``experiments/configs``)."""
    p = Path(path)
    if not p.exists() and not p.suffix:
        cand = Path(__file__).resolve().parents[1] / "configs" / f"{p}.yaml"
        if cand.exists():
            p = cand
    if not p.exists():
        raise TransferError(f"{path}: no such spec file")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise TransferError(f"{p}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise TransferError(f"{p}: a transfer spec is a mapping, got {type(raw).__name__}")
    try:
        spec = TransferSpec(**raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "spec"
        raise TransferError(f"{p}: {where}: {err['msg']}") from None
    spec.check()
    return spec


# ---------------------------------------------------------------------- folds
@dataclass
class Fold:
    """One row block of the atlas: what is trained, validated, and evaluated."""

    mode: str
    train_source: str
    train: PromptDataset
    val: PromptDataset
    in_test: PromptDataset
    #: evaluation set name -> (dataset with both labels, where its harmless side came from)
    evals: dict[str, tuple[PromptDataset, str]]
    report: dict[str, Any] = field(default_factory=dict)


def _labels(ds: PromptDataset) -> tuple[bool, bool]:
    y = ds.labels >= 0.5
    return bool(y.any()), bool((~y).any())


def _concat(parts: Sequence[PromptDataset], name: str) -> PromptDataset:
    seen: set[str] = set()
    out: list[Example] = []
    for p in parts:
        for e in p:
            if e.id not in seen:
                out.append(e)
                seen.add(e.id)
    return PromptDataset(out, name=name)


def _wrapped(ds: PromptDataset) -> bool:
    """Whether a harmful-only set's prompts are wrapped requests (they record the request they wrap)."""
    hits = sum(1 for e in ds if isinstance(e.meta_dict().get("request"), str))
    return hits >= max(1, len(ds) // 2)


@dataclass
class _Negatives:
    """The harmless reserve no fold trains on, and its forms per wrapped source (built once)."""

    plain: PromptDataset
    wrapped: dict[str, PromptDataset]

    def all(self) -> dict[str, PromptDataset]:
        return {"negatives": self.plain, **{f"negatives@{k}": v for k, v in self.wrapped.items()}}

    def for_set(self, name: str, ds: PromptDataset, seed: int) -> tuple[PromptDataset, str]:
        n = max(int((ds.labels >= 0.5).sum()), 1)
        if name in self.wrapped:
            neg = self.wrapped[name]
            return neg.subsample_groups(
                min(n, len(neg)), seed=seed
            ), f"{self.plain.name} in {name}'s wrappers"
        return self.plain.subsample_groups(min(n, len(self.plain)), seed=seed), self.plain.name


def _prepare_sources(spec: TransferSpec, root: str | Path | None) -> tuple[Corpus, _Negatives]:
    names = [*spec.sources, spec.negatives]
    caps = {n: v for n, v in spec.caps.items()}
    corpus = build_corpus(names, root, seed=spec.seed, caps=caps)
    neg_all = corpus[spec.negatives].where(lambda e: e.label < 0.5)
    if len(neg_all) < 2:
        raise TransferError(
            f"negatives {spec.negatives!r}: fewer than 2 harmless prompts after de-duplication"
        )
    frac = min(0.9, spec.negatives_reserve / len(neg_all))
    rest, reserve = carve(neg_all, frac, spec.seed)
    reserve = PromptDataset(reserve.examples, name=spec.negatives)
    corpus.sources[spec.negatives] = PromptDataset(rest.examples, name=spec.negatives)
    wrapped: dict[str, PromptDataset] = {}
    for n in spec.sources:
        ds = corpus[n]
        pos, neg = _labels(ds)
        if pos and not neg and _wrapped(ds):
            try:
                wrapped[n] = wrap_like(reserve, ds, name=f"{spec.negatives}@{n}")
            except DataError:
                continue
    return corpus, _Negatives(reserve, wrapped)


def _pair(
    name: str,
    ds: PromptDataset,
    negs: _Negatives,
    in_test: PromptDataset,
    seed: int,
    negatives_label: str | None = None,
) -> tuple[PromptDataset, str] | None:
    """``ds`` with a harmless side of the same form (or harmful prompts for a harmless-only set)."""
    pos, neg = _labels(ds)
    if pos and neg:
        return ds, negatives_label or "own"
    if pos:
        n, label = negs.for_set(name, ds, seed)
        return _concat([ds, n], name), label
    if neg:
        harm = in_test.where(lambda e: e.label >= 0.5)
        if len(harm) == 0:
            return None
        return _concat([ds, harm], name), "in-source harmful (positives)"
    return None


def plan_folds(spec: TransferSpec, corpus: Corpus, negs: _Negatives) -> list[Fold]:
    """Every fold of the spec's modes (datasets only; nothing is collected or fitted)."""
    sources = {n: corpus[n] for n in [*spec.sources, spec.negatives]}
    folds: list[Fold] = []
    if "loso" in spec.modes:
        held = spec.held_out or [
            n for n in spec.sources if get_source(n).kind in ("harmful", "jailbreak", "contrast", "mixed")
        ]
        for h in held:
            if len(sources[h]) == 0:
                continue
            sp = leave_one_source_out(sources, h, val_fraction=spec.val_fraction, seed=spec.seed)
            train, in_test = carve(sp.train, spec.in_source_fraction, spec.seed + 1)
            train = PromptDataset(train.examples, name=f"train[-{h}]")
            in_test = PromptDataset(in_test.examples, name=IN_SOURCE)
            evals: dict[str, tuple[PromptDataset, str]] = {}
            paired = _pair(h, sp.eval, negs, in_test, spec.seed)
            if paired is not None:
                evals[h] = paired
            if _labels(in_test) == (True, True):
                evals[IN_SOURCE] = (in_test, "own")
            folds.append(Fold("loso", f"-{h}", train, sp.val, in_test, evals, sp.report))
    if "train_on_one" in spec.modes:
        trains = spec.train_sources or [
            n for n in spec.sources if get_source(n).kind in ("harmful", "jailbreak", "mixed")
        ]
        for t in trains:
            base = {n: ds for n, ds in sources.items() if n != spec.negatives}
            tr = sources[t]
            if not _labels(tr)[1]:  # harmful-only: add harmless plain prompts to learn against
                extra = sources[spec.negatives].subsample_groups(len(tr), seed=spec.seed)
                base[t] = _concat([tr, extra], t)
            if len(base[t]) == 0:
                continue
            sp2 = train_on_one_source(base, t, val_fraction=spec.val_fraction, seed=spec.seed)
            train, in_test = carve(sp2.train, spec.in_source_fraction, spec.seed + 1)
            in_test = PromptDataset(in_test.examples, name=IN_SOURCE)
            evals = {}
            for n, ds in sp2.evals.items():
                if len(ds) == 0:
                    continue
                paired = _pair(n, ds, negs, in_test, spec.seed)
                if paired is not None:
                    evals[n] = paired
            if _labels(in_test) == (True, True):
                evals[IN_SOURCE] = (in_test, "own")
            folds.append(
                Fold("train_on_one", t, PromptDataset(train.examples, name=f"train[{t}]"), sp2.val, in_test,
                     evals, sp2.report)
            )  # fmt: skip
    for f in folds:
        for role, ds in (("train", f.train), ("val", f.val)):
            if _labels(ds) != (True, True):
                raise TransferError(
                    f"fold {f.mode}:{f.train_source}: the {role} split needs harmful and harmless prompts "
                    f"(it has {len(ds)} examples, {int((ds.labels >= 0.5).sum())} harmful)"
                )
    if not folds:
        raise TransferError("the spec gives no fold (no held-out or training source has prompts)")
    return folds


# ---------------------------------------------------------------------- features
class _Features:
    """Pooled features of every example of the corpus (and the negatives), by id, from one store per
    source."""

    def __init__(self, stores: Mapping[str, ActivationStore], hook_names: Mapping[int, str]) -> None:
        self.stores = stores
        self.hook_names = hook_names
        self.where: dict[str, tuple[str, int]] = {}
        for name, st in stores.items():
            for i, e in enumerate(st.examples()):
                self.where.setdefault(e["id"], (name, i))
        self._cache: dict[tuple[str, str, int], torch.Tensor] = {}

    def _block(self, src: str, pooling: Pooling, layer: int) -> torch.Tensor:
        key = (src, pooling.name, layer)
        if key not in self._cache:
            self._cache[key] = self.stores[src].pooled(self.hook_names[layer], pooling)
        return self._cache[key]

    def get(self, ds: PromptDataset, pooling: Pooling, layer: int) -> Float[torch.Tensor, "n d"]:
        rows = []
        for e in ds:
            if e.id not in self.where:
                raise TransferError(f"example {e.id!r} of {ds.name} has no collected activations")
            rows.append(self.where[e.id])
        out = torch.empty(0)
        parts: list[torch.Tensor] = []
        order: list[int] = []
        by_src: dict[str, list[tuple[int, int]]] = {}
        for k, (src, i) in enumerate(rows):
            by_src.setdefault(src, []).append((k, i))
        for src, pairs in by_src.items():
            block = self._block(src, pooling, layer)
            parts.append(block[[i for _, i in pairs]])
            order += [k for k, _ in pairs]
        out = torch.cat(parts)
        inv = torch.empty(len(order), dtype=torch.long)
        inv[torch.tensor(order)] = torch.arange(len(order))
        return out[inv]


def _collect_all(
    spec: TransferSpec,
    datasets: Mapping[str, PromptDataset],
    model: HookedTransformer,
    store_root: Path,
    progress: bool,
) -> tuple[dict[str, ActivationStore], dict[int, str], list[int]]:
    layers = parse_layers(spec.layers, model.cfg.n_layers)
    hook_names = {la: HOOK_KINDS[spec.hook].format(l=la) for la in layers}
    hooks = list(hook_names.values())
    fp = model_fingerprint(model)
    max_len = min(spec.max_len, model.cfg.n_ctx)
    dtype = resolve_store_dtype(model)
    stores: dict[str, ActivationStore] = {}
    for name, ds in datasets.items():
        if len(ds) == 0:
            continue
        key = StoreKey(
            **fp,
            dataset_name=ds.name,
            dataset_fingerprint=ds.fingerprint(),
            hooks=tuple(hooks),
            positions="auto",
            keep="auto",
            max_len=max_len,
            chat_template=bool(getattr(model.tokenizer, "chat_template", None)),
            dtype=dtype,
        )
        stores[name] = collect(
            model,
            ds,
            default_store_dir(store_root, key),
            hooks=hooks,
            layers=None,
            positions="auto",
            keep="auto",
            max_len=max_len,
            token_budget=spec.token_budget,
            store_dtype=dtype,
            progress=progress,
        )
    return stores, hook_names, layers


# ---------------------------------------------------------------------- metrics
def _set_metrics(y: np.ndarray, s: np.ndarray, val_thr: float) -> dict[str, float]:
    pos, neg = s[y >= 0.5], s[y < 0.5]
    out = {"auroc": math.nan, "tpr_at_1pct_fpr": math.nan, "flag_rate": math.nan}
    if len(pos) and len(neg):
        out["auroc"] = auroc((y >= 0.5).astype(int), s)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            info = conservative_threshold(neg, 0.01)
        if not info.limited_by_n:
            out["tpr_at_1pct_fpr"] = float(np.count_nonzero(pos > info.threshold)) / len(pos)
    if len(neg) and math.isfinite(val_thr):
        out["flag_rate"] = float(np.count_nonzero(neg > val_thr)) / len(neg)
    return out


def _val_threshold(y: np.ndarray, s: np.ndarray) -> float:
    neg = s[y < 0.5]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = conservative_threshold(neg, 0.01)
    return math.nan if info.limited_by_n else info.threshold


def _fold_rows(
    spec: TransferSpec,
    fold: Fold,
    feats: _Features,
    layers: Sequence[int],
    poolings: Sequence[Pooling],
) -> list[dict[str, Any]]:
    y_tr, y_val = fold.train.labels, fold.val.labels
    rows: list[dict[str, Any]] = []
    base = {"mode": fold.mode, "train_source": fold.train_source}

    def emit(probe: str, layer: int, pooling: str, C: float | None, vm: Mapping[str, float],
             score: Callable[[PromptDataset], np.ndarray], val_s: np.ndarray) -> None:  # fmt: skip
        thr = _val_threshold(y_val, val_s)
        for name, (ds, neg_label) in fold.evals.items():
            y = ds.labels
            m = _set_metrics(y, score(ds), thr)
            rows.append(
                {
                    **base,
                    "eval_source": name,
                    "probe": probe,
                    "layer": layer,
                    "pooling": pooling,
                    **m,
                    "in_source": name == IN_SOURCE,
                    "n_pos": int((y >= 0.5).sum()),
                    "n_neg": int((y < 0.5).sum()),
                    "negatives": neg_label,
                    "C": math.nan if C is None else C,
                    **{f"val_{k}": float(v) for k, v in vm.items()},
                }
            )

    for kind in spec.probes:
        sk = SWEEP_KINDS[kind]
        for pooling in poolings:
            entry = {"kind": kind, "params": {}, "seed": spec.seed, "class_weight": "balanced",
                     "penalty": "l2", "l1_ratio": 0.5, "shrinkage": None}  # fmt: skip
            cls, config = sk.build({**entry, "layers": [layers[0]], "hooks": [feats.hook_names[layers[0]]]})
            assert issubclass(cls, Scorer)
            X_tr = [feats.get(fold.train, pooling, la) for la in layers]
            X_val = [feats.get(fold.val, pooling, la) for la in layers]
            Cs = list(spec.Cs) if sk.uses_C else None
            grid = cls.fit_grid(X_tr, y_tr, Cs, **config)
            val_scores = grid.val_scores(X_val)
            for i, la in enumerate(layers):
                sel = select_best([val_metrics(y_val, s) for s in val_scores[i]], spec.select_metric)
                scorer = grid.scorer(i, sel.index)
                emit(
                    kind,
                    la,
                    pooling.name,
                    Cs[sel.index] if Cs is not None else None,
                    sel.metrics[sel.index],
                    _layer_scorer(scorer, feats, pooling, la),
                    np.asarray(val_scores[i][sel.index], float),
                )
    if spec.surface_baseline:
        sk = SWEEP_KINDS[SURFACE]
        cls, kw = sk.build({"kind": SURFACE, "params": {}, "seed": spec.seed, "layers": [], "hooks": []})
        assert issubclass(cls, Scorer)
        if cls.view != TEXT:
            raise TransferError(f"surface baseline {SURFACE!r} does not read text")
        texts: dict[str, list[str]] = {}

        def text(ds: PromptDataset) -> list[str]:
            if ds.name not in texts:
                texts[ds.name] = [example_text(e) for e in ds]
            return texts[ds.name]

        scorer = cls(**kw).fit(text(fold.train), y_tr, val=text(fold.val), val_y=y_val)
        val_s = np.asarray(scorer.score(text(fold.val)), float)
        emit(SURFACE, -1, "text", None, val_metrics(y_val, val_s),
             lambda ds: np.asarray(scorer.score([example_text(e) for e in ds]), float), val_s)  # fmt: skip
    return rows


def _layer_scorer(
    scorer: Scorer, feats: _Features, pooling: Pooling, layer: int
) -> Callable[[PromptDataset], np.ndarray]:
    def score(ds: PromptDataset) -> np.ndarray:
        return np.asarray(scorer.score(feats.get(ds, pooling, layer)), float)

    return score


def _mark_selected(df: pd.DataFrame, primary: str) -> pd.DataFrame:
    """``selected``: per (mode, train source, probe, pooling), the layer chosen on validation."""
    df = df.copy()
    df["selected"] = False
    vcols = [f"val_{m}" for m in SELECTION_METRICS]
    for _, g in df.groupby(["mode", "train_source", "probe", "pooling"], sort=False):
        layers = g.drop_duplicates("layer")
        sel = select_best(layers[vcols].rename(columns=lambda c: c[4:]).to_dict("records"), primary)
        best = layers.iloc[sel.index]["layer"]
        df.loc[g.index[g["layer"] == best], "selected"] = True
    return df


def _add_surface(df: pd.DataFrame) -> pd.DataFrame:
    s = df[df["probe"] == SURFACE][["mode", "train_source", "eval_source", "auroc"]]
    s = s.rename(columns={"auroc": "surface_auroc"})
    return df.merge(s, on=["mode", "train_source", "eval_source"], how="left")


# ---------------------------------------------------------------------- the run
def _atomic_parquet(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_suffix(".parquet.tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def _atomic_json(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def run_transfer(
    spec: TransferSpec,
    out: str | Path,
    *,
    root: str | Path | None = None,
    model: HookedTransformer | None = None,
    store_root: Path | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Build the atlas (see the module docstring); returns the table written to ``OUT/transfer.parquet``."""
    spec.check()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TransferError(f"--out {out}: exists and is not a folder")
    t0 = time.perf_counter()
    corpus, negs = _prepare_sources(spec, root)
    folds = plan_folds(spec, corpus, negs)
    if model is None:
        from activations.models import load_model

        console.print(f"[bold]loading model[/] {spec.model}")
        model = load_model(spec.model)
    datasets = {**{n: corpus[n] for n in [*spec.sources, spec.negatives]}, **negs.all()}
    out.mkdir(parents=True, exist_ok=True)
    t_c = time.perf_counter()
    stores, hook_names, layers = _collect_all(spec, datasets, model, store_root or out / "stores", progress)
    collect_s = time.perf_counter() - t_c
    feats = _Features(stores, hook_names)
    poolings = [Pooling.parse(p) for p in spec.poolings]
    rows: list[dict[str, Any]] = []
    t_f = time.perf_counter()
    for fold in tqdm(folds, desc="transfer folds", disable=not progress):
        rows += _fold_rows(spec, fold, feats, layers, poolings)
    fit_s = time.perf_counter() - t_f
    df = _add_surface(_mark_selected(pd.DataFrame(rows), spec.select_metric))
    lead = [c for c in TRANSFER_COLUMNS if c in df.columns]
    df = df[lead + [c for c in df.columns if c not in lead]]
    _atomic_parquet(df, out / TRANSFER)
    report = {
        "spec": spec.model_dump(),
        "layers": layers,
        "corpus": corpus.report,
        "negatives": {k: len(v) for k, v in negs.all().items()},
        "folds": [
            {
                "mode": f.mode,
                "train_source": f.train_source,
                "n_train": len(f.train),
                "n_val": len(f.val),
                "n_in_source_test": len(f.in_test),
                "evals": {n: {"n": len(d), "negatives": lab} for n, (d, lab) in f.evals.items()},
                "split": f.report,
            }
            for f in folds
        ],
        "seconds": {"collect": collect_s, "fit_and_evaluate": fit_s, "total": time.perf_counter() - t0},
    }
    _atomic_json(report, out / "transfer.json")
    took = time.perf_counter() - t0
    console.print(f"[green]done[/] in {took:.0f}s ({len(folds)} folds, {len(df)} rows): {out / TRANSFER}")
    return df


def read_transfer(path: str | Path) -> pd.DataFrame:
    """``transfer.parquet`` of a folder (or the file); :class:`TransferError` when absent or foreign."""
    p = Path(path)
    p = p / TRANSFER if p.is_dir() else p
    if not p.exists():
        raise TransferError(f"{path}: no {TRANSFER}")
    try:
        df = pd.read_parquet(p)
    except Exception as e:
        raise TransferError(f"{p}: unreadable ({type(e).__name__}: {e})") from None
    missing = [c for c in TRANSFER_COLUMNS if c not in df.columns]
    if missing:
        raise TransferError(f"{p}: not a transfer atlas (missing columns {missing})")
    return df


# ---------------------------------------------------------------------- summaries
def generalization_gap(df: pd.DataFrame) -> pd.DataFrame:
    """Per mode × train source × probe × layer × pooling: in-source AUROC minus each out-of-source AUROC."""
    keys = ["mode", "train_source", "probe", "layer", "pooling"]
    ins = df[df["in_source"]][[*keys, "auroc"]].rename(columns={"auroc": "in_source_auroc"})
    outs = df[~df["in_source"]]
    m = outs.merge(ins, on=keys, how="inner")
    m["gap"] = m["in_source_auroc"] - m["auroc"]
    return m[[*keys, "eval_source", "in_source_auroc", "auroc", "gap"]]


def layer_profile(df: pd.DataFrame, mode: str = "loso") -> pd.DataFrame:
    """Mean AUROC by probe × pooling × layer, in-source beside out-of-source (one fold mode)."""
    d = df[(df["mode"] == mode) & (df["layer"] >= 0)]
    g = d.groupby(["probe", "pooling", "layer", "in_source"])["auroc"].mean().unstack("in_source")
    g = g.rename(columns={True: "in_source_auroc", False: "out_of_source_auroc"}).reset_index()
    for c in ("in_source_auroc", "out_of_source_auroc"):
        if c not in g.columns:
            g[c] = math.nan
    g["gap"] = g["in_source_auroc"] - g["out_of_source_auroc"]
    return g
