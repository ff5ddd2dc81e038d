"""Sweep specifications (YAML): model, datasets, hooks × layers × poolings × probe kinds × C grid × seeds.

A spec expands to hashed runs (:class:`Run`); each run is one probe kind on one hook/layer (or layer set) and
pooling with one seed, its C chosen on the validation set. Unknown keys, empty grids and dataset filters that
select nothing (or one class where two are needed) are errors that name the key or dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import sae  # noqa: F401  (registers the SAE-feature sweep kinds, and every family of probes, for validation)
from activations.augment import augment_dataset, get_transform
from activations.collect import parse_layers
from activations.data import DataError, PromptDataset, load_dataset, normalize_text, with_canonical_groups
from activations.decontam import DecontamConfig
from activations.matched import rewrap
from activations.pooling import Pooling, PoolingError
from activations.shared_sources import default_shared_root
from probes.base import SWEEP_KINDS
from probes.selection import DEFAULT_SELECT

__all__ = [
    "CONFIG_DIR",
    "SURFACE_KINDS",
    "DatasetSpec",
    "DatasetsSpec",
    "DecontamSpec",
    "MixtureSpec",
    "ProbeSpec",
    "Run",
    "SpecError",
    "SweepSpec",
    "check_poolings",
    "expand",
    "load_spec",
    "parse_spec",
    "shared_root",
]

#: the surface baselines (probe kinds) run beside every sweep, which flag form-confounded eval sets
SURFACE_KINDS: tuple[str, ...] = ("tfidf", "embedding")

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def check_poolings(v: list[Any]) -> list[Any]:
    """A spec's ``poolings`` (names or mappings), each parsed once to check it; a bad one is a ``ValueError``
    naming it (pydantic validators of every spec kind call this)."""
    for p in v:
        try:
            Pooling.parse(p)
        except PoolingError as e:
            raise ValueError(f"poolings: {e}") from e
    return v


class SpecError(ValueError):
    pass


def shared_root() -> Path:
    """Where ``shared:`` paths point: ``$PROBE_ATLAS_SHARED``, else ``../shared`` near the repo or cwd
    (:func:`activations.shared_sources.default_shared_root`)."""
    return default_shared_root()


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetSpec(_Frozen):
    """One dataset: a JSONL path (relative to the spec file; ``shared:`` = the shared data folder),
    ``builtin`` or ``hf:NAME``, with optional filters, de-duplication, seeded subsamples and transforms.

    Loading runs, in order: cross-source groups (:func:`~activations.data.with_canonical_groups`), the
    filters, ``dedup``, ``rewrap``, ``max_per_class``, ``subsample`` (class-stratified), ``cap`` (whole
    groups), ``augment``. ``negatives`` (test sets only) adds harmless prompts of the same form to a
    harmful set; ``weight`` is this dataset's share of a mixture with a ``size``.
    """

    path: str
    name: str | None = None
    split: str | list[str] | None = None
    kind: str | list[str] | None = None
    source: str | list[str] | None = None
    category: str | list[str] | None = None
    label: float | None = None
    soft_labels: bool = False
    dedup: bool = True
    subsample: int | None = Field(default=None, gt=0)
    max_per_class: int | None = Field(default=None, gt=0)
    cap: int | None = Field(default=None, gt=0)
    weight: float | None = Field(default=None, gt=0)
    seed: int = 0
    rewrap: RewrapSpec | None = None
    augment: list[str] | None = None
    augment_copies: int = Field(default=1, gt=0)
    augment_keep_original: bool = True
    negatives: list[DatasetSpec] | None = None

    @field_validator("augment")
    @classmethod
    def _known_transforms(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        for name in v:
            try:
                get_transform(name)
            except (KeyError, ValueError) as e:
                raise ValueError(f"augment: {e}") from e
        return v

    @field_validator("negatives", mode="before")
    @classmethod
    def _negatives_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, dict) else v

    def resolve_path(self, base: Path | None) -> str:
        p = self.path
        if p == "builtin" or p.startswith(("builtin:", "hf:")):
            return p
        if p.startswith("shared:"):
            return str(shared_root() / p[len("shared:") :].lstrip("/"))
        path = Path(os.path.expandvars(p)).expanduser()
        if not path.is_absolute() and base is not None and (base / path).exists():
            return str(base / path)
        return str(path)

    def load(self, base: Path | None = None, *, default_name: str = "data") -> PromptDataset:
        """The dataset with every option of this spec applied (``negatives`` excepted: see
        :meth:`load_with_negatives`)."""
        ref = self.resolve_path(base)
        name = self.name or default_name
        try:
            ds = load_dataset(ref, **({"soft_labels": True} if self.soft_labels else {}))
        except DataError as e:
            raise SpecError(f"dataset {name!r}: {e}") from e
        ds = with_canonical_groups(ds)
        ds = ds.filter(
            split=self.split,
            kind=self.kind,
            source=self.source,
            category=self.category,
            label=self.label,
            name=name,
        )
        if len(ds) == 0:
            raise SpecError(
                f"dataset {name!r} ({self.path}): the filter "
                f"{self.model_dump(exclude_none=True, include=_FILTERS)} selects nothing"
            )
        if self.dedup:
            ds = ds.dedup()
        if self.rewrap is not None:
            try:
                ds = rewrap(
                    ds,
                    self.rewrap.wrapped.load(base, default_name=f"{name}.rewrap.wrapped"),
                    self.rewrap.goals.load(base, default_name=f"{name}.rewrap.goals"),
                )
            except DataError as e:
                raise SpecError(f"dataset {name!r}: {e}") from e
        if self.max_per_class is not None:
            harmful = ds.filter(label=1.0)
            keep = {e.id for e in harmful.subsample(self.max_per_class, seed=self.seed, stratify=False)}
            harmless = ds.where(lambda e: e.label < 0.5)
            keep |= {e.id for e in harmless.subsample(self.max_per_class, seed=self.seed, stratify=False)}
            keep |= {e.id for e in ds if 0.0 < e.label < 1.0}
            ds = ds.where(lambda e: e.id in keep)
        if self.subsample is not None:
            ds = ds.subsample(self.subsample, seed=self.seed)
        if self.cap is not None:
            ds = ds.subsample_groups(self.cap, seed=self.seed)
        if self.augment:
            ds = augment_dataset(
                ds,
                self.augment,
                seed=self.seed,
                copies=self.augment_copies,
                include_original=self.augment_keep_original,
            )
        return PromptDataset(ds.examples, name=name)

    def anchors(self, base: Path | None = None) -> list[PromptDataset]:
        """Datasets that name the cross-source groups of this one (the goals behind rewrapped negatives):
        decontamination drops a whole group when one of its anchors repeats the training data."""
        out: list[PromptDataset] = []
        for sub in [self, *(self.negatives or [])]:
            if sub.rewrap is not None:
                out.append(sub.rewrap.goals.load(base, default_name="goals"))
        return out

    def load_with_negatives(self, base: Path | None = None, *, default_name: str = "data") -> PromptDataset:
        """The dataset plus its ``negatives`` (harmless prompts of the same form), as one evaluation set."""
        ds = self.load(base, default_name=default_name)
        if not self.negatives:
            return ds
        exs = list(ds)
        seen = {e.id for e in exs}
        for i, neg in enumerate(self.negatives):
            nds = neg.load(base, default_name=f"{ds.name}.negatives[{i}]")
            if (nds.labels >= 0.5).any():
                raise SpecError(
                    f"dataset {ds.name!r}: negatives[{i}] ({neg.path}) holds "
                    f"{int((nds.labels >= 0.5).sum())} harmful examples; negatives must be harmless "
                    "(filter with label: 0)"
                )
            exs += [e for e in nds if e.id not in seen]
            seen |= {e.id for e in nds}
        return PromptDataset(exs, name=ds.name)


class RewrapSpec(_Frozen):
    """Harmless requests placed in the wrappers of a wrapped harmful set (:func:`activations.matched.rewrap`):
    ``wrapped`` (e.g. JBB jailbreak artifacts) and ``goals`` (the original harmful requests, aligned by
    cross-source group, e.g. JailbreakBench's harmful goals)."""

    wrapped: DatasetSpec
    goals: DatasetSpec


_FILTERS = {"split", "kind", "source", "category", "label"}
DatasetSpec.model_rebuild()


class MixtureSpec(_Frozen):
    """Several datasets mixed into one role (train or val): ``mix`` (each with its own filters, caps and an
    optional ``weight``), ``size`` (the total; split between components by weight, each subsampled by whole
    groups) and ``seed``. Components are concatenated in order; an example whose normalized text (or id)
    repeats an *earlier component's* is dropped (within a component, its own ``dedup`` decides). A YAML list
    of datasets is a mixture without ``size``."""

    mix: list[DatasetSpec] = Field(min_length=1)
    size: int | None = Field(default=None, gt=0)
    seed: int = 0

    def load(
        self, base: Path | None = None, *, default_name: str = "data"
    ) -> tuple[PromptDataset, dict[str, Any]]:
        """The mixed dataset and a report (per component: what it loaded and kept, by label)."""
        one = len(self.mix) == 1
        parts = [
            c.load(base, default_name=c.name or (default_name if one else f"{default_name}[{i}]"))
            for i, c in enumerate(self.mix)
        ]
        if self.size is not None:
            w = np.asarray([c.weight if c.weight is not None else 1.0 for c in self.mix], dtype=float)
            quota = np.floor(self.size * w / w.sum()).astype(int)
            quota[: self.size - int(quota.sum())] += 1  # the remainder, one each, in order
            parts = [
                p.subsample_groups(int(q), seed=self.seed + i)
                for i, (p, q) in enumerate(zip(parts, quota, strict=True))
            ]
        seen_text: set[str] = set()
        seen_id: set[str] = set()
        out = []
        report: list[dict[str, Any]] = []
        for comp, part in zip(self.mix, parts, strict=True):
            kept = [e for e in part if normalize_text(e.all_text()) not in seen_text and e.id not in seen_id]
            out += kept
            seen_text |= {normalize_text(e.all_text()) for e in kept}
            seen_id |= {e.id for e in kept}
            report.append(
                {"name": part.name, "path": comp.path, "n_loaded": len(part), "n_kept": len(kept),
                 "duplicates_dropped": len(part) - len(kept)}
            )  # fmt: skip
        if len(self.mix) == 1:
            return PromptDataset(out, name=parts[0].name), {"components": report}
        return PromptDataset(out, name=default_name), {"components": report}


def _as_mixture(v: Any) -> Any:
    if isinstance(v, list):
        return {"mix": v}
    if isinstance(v, dict) and "mix" not in v:
        return {"mix": [v]}
    if isinstance(v, DatasetSpec):
        return MixtureSpec(mix=[v])
    return v


class DatasetsSpec(_Frozen):
    """The dataset roles of a sweep: ``train`` and ``val`` (a dataset or a mixture) choose everything;
    ``test`` sets are evaluated only; ``benign_control`` sets every threshold; ``benign_heldout`` (a second
    benign set, disjoint from the control) reports the FPR those thresholds realize out of sample."""

    train: MixtureSpec
    val: MixtureSpec | None = None
    test: dict[str, DatasetSpec] = Field(default_factory=dict)
    benign_control: DatasetSpec | None = None
    benign_heldout: DatasetSpec | None = None

    @field_validator("train", "val", mode="before")
    @classmethod
    def _mixture(cls, v: Any) -> Any:
        return _as_mixture(v)

    @model_validator(mode="after")
    def _has_tests(self) -> DatasetsSpec:
        if not self.test:
            raise ValueError("datasets.test: give at least one test set")
        for role, spec in (("train", self.train), ("val", self.val)):
            if spec is not None and any(c.negatives for c in spec.mix):
                raise ValueError(f"datasets.{role}: `negatives` is for test sets (mix the datasets instead)")
        return self


class DecontamSpec(_Frozen):
    """Decontamination of evaluation sets against train ∪ val (see :mod:`activations.decontam`)."""

    jaccard: float = Field(default=0.8, gt=0, le=1)
    containment: float = Field(default=0.9, gt=0, le=1)
    min_shingles: int = Field(default=40, ge=1)
    by_group: bool = True

    def config(self) -> DecontamConfig:
        return DecontamConfig(
            jaccard=self.jaccard,
            containment=self.containment,
            min_shingles=self.min_shingles,
            by_group=self.by_group,
        )


class ProbeSpec(_Frozen):
    """A probe kind (a sweep kind of :mod:`probes.base`; ``probe-atlas kinds`` lists them) and its options.

    ``layers``: the layers a multi-layer kind reads, or the layers a per-layer kind runs at (default: every
    collected layer). ``params``: options
    of plug-in kinds (each kind declares the keys it accepts).
    """

    kind: str
    class_weight: Literal["balanced"] | None = "balanced"
    l1_ratio: float = 0.5
    shrinkage: float | None = None
    layers: str | list[int] | None = None
    penalty: Literal["l2", "l1", "elasticnet"] = "l2"
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        if v not in SWEEP_KINDS:
            raise ValueError(f"unknown probe kind {v!r}; known kinds: {sorted(SWEEP_KINDS)}")
        return v

    @model_validator(mode="after")
    def _known_params(self) -> ProbeSpec:
        allowed = SWEEP_KINDS[self.kind].params
        bad = sorted(set(self.params) - allowed)
        if bad:
            raise ValueError(
                f"probe kind {self.kind!r} has no parameter(s) {bad}; it takes {sorted(allowed)}"
            )
        return self

    @property
    def uses_C(self) -> bool:
        return SWEEP_KINDS[self.kind].uses_C

    def label(self) -> str:
        return self.kind


class SweepSpec(_Frozen):
    name: str
    #: one model or several (a model axis: the sweep runs once per model into one results table); each is a
    #: bundled name, a TransformerLens official name (online) or a local HF folder
    model: str | list[str] = "smollm2"
    max_len: int = Field(default=256, gt=0)
    token_budget: int = Field(default=4096, gt=0)
    positions: Literal["auto", "prompt", "response", "prompt+response", "all"] = "auto"
    #: the tokens the stores keep (default: the scored ``positions``); ``all`` keeps every rendered token,
    #: which fine-tuned final layers need (they re-run attention over the whole sequence)
    keep: Literal["auto", "prompt", "response", "prompt+response", "all"] | None = None
    #: the dtype of the activation stores: ``auto`` is each model's registry preference (float32 for
    #: Gemma-3-270m, whose residual stream leaves the fp16 range; float16 otherwise)
    store_dtype: Literal["auto", "float16", "float32"] = "auto"
    datasets: DatasetsSpec
    hooks: list[str] = Field(default_factory=lambda: ["resid_post"])
    layers: str | list[int] = "all"
    #: layers as fractions of each model's depth (``"0.25,0.5,0.75"``, a list, or ``all``), instead of
    #: ``layers``: fraction f reads layer floor(f * n_layers + 0.5), capped at the last one, so models line up
    depth: str | list[float] | None = None
    poolings: list[str | dict[str, Any]] = Field(default_factory=lambda: list[str | dict[str, Any]](["mean"]))
    probes: list[ProbeSpec]
    Cs: list[float] = Field(default_factory=lambda: [1e-3, 1e-2, 1e-1, 1.0])
    seeds: list[int] = Field(default_factory=lambda: [0])
    #: the primary validation metric of every selection (ties: :mod:`probes.selection`)
    select_metric: Literal["auroc", "log_auroc", "tpr_at_1pct_fpr"] = DEFAULT_SELECT  # type: ignore[assignment]
    #: surface baselines beside every probe: TF-IDF on the text and a probe on the token embeddings
    surface_baselines: bool = True
    decontam: DecontamSpec = Field(default_factory=DecontamSpec)
    bootstrap: int = Field(default=500, ge=0)
    context_len: int = Field(default=512, gt=0)

    @field_validator("hooks", "poolings", "probes", "Cs", "seeds")
    @classmethod
    def _nonempty(cls, v: list[Any], info: Any) -> list[Any]:
        if not v:
            raise ValueError(f"{info.field_name}: the grid is empty")
        return v

    @field_validator("model")
    @classmethod
    def _models(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list):
            if not v:
                raise ValueError("model: the list of models is empty")
            if len(set(v)) != len(v):
                raise ValueError(f"model: a model is listed twice ({v})")
            return v[0] if len(v) == 1 else v
        return v

    @field_validator("depth")
    @classmethod
    def _depth(cls, v: str | list[float] | None) -> str | list[float] | None:
        if v is not None:
            _fractions(v)
        return v

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: str | list[int]) -> str | list[int]:
        if isinstance(v, str) and "." in v:
            _fractions(v)
        return v

    @field_validator("Cs")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(c <= 0 for c in v):
            raise ValueError("Cs: every C must be > 0")
        return sorted(v)

    @field_validator("poolings")
    @classmethod
    def _poolings(cls, v: list[Any]) -> list[Any]:
        return check_poolings(v)

    @model_validator(mode="after")
    def _one_layer_choice(self) -> SweepSpec:
        if self.depth is not None and self.layers != "all":
            raise ValueError("give either `layers` or `depth` (fractions of depth), not both")
        return self

    # ------------------------------------------------------------------ helpers
    def models(self) -> list[str]:
        """The spec's models, in order (one for a single-model spec)."""
        return list(self.model) if isinstance(self.model, list) else [self.model]

    def for_model(self, model: str) -> SweepSpec:
        """The single-model spec of one of this spec's models (what one model's part of a sweep runs)."""
        if model not in self.models():
            raise SpecError(f"model {model!r} is not one of the spec's models {self.models()}")
        return self.model_copy(update={"model": model})

    def resolve_layers(self, n_layers: int) -> list[int]:
        """The layer indices of a model with ``n_layers`` layers: ``depth`` fractions (or fractions in
        ``layers``, e.g. ``"0.25,0.5"``) map to floor(f * n_layers + 0.5), capped at the last layer."""
        from activations.collect import parse_layers

        frac = (
            self.depth
            if self.depth is not None
            else (self.layers if isinstance(self.layers, str) and "." in self.layers else None)
        )
        if frac is None:
            return parse_layers(self.layers, n_layers)
        fr = _fractions(frac)
        if fr is None:
            return list(range(n_layers))
        out: list[int] = []
        for f in fr:
            layer = min(n_layers - 1, int(np.floor(f * n_layers + 0.5)))
            if layer not in out:
                out.append(layer)
        return out

    def pooling_objs(self) -> list[Pooling]:
        return [Pooling.parse(p) for p in self.poolings]

    def all_probes(self) -> list[ProbeSpec]:
        """The spec's probes plus, with ``surface_baselines``, the surface baselines it does not already
        list: TF-IDF on the text (``tfidf``) and a logistic probe on the token embeddings (``embedding``)."""
        out = list(self.probes)
        if self.surface_baselines:
            have = {p.kind for p in out}
            out += [ProbeSpec(kind=k) for k in SURFACE_KINDS if k not in have]
        return out

    def fingerprint(self) -> str:
        d = self.model_dump(mode="json")
        for k in ("keep", "depth"):  # specs written before these keys existed keep their fingerprint
            if d.get(k) is None:
                d.pop(k, None)
        if d.get("store_dtype") == "auto":
            d.pop("store_dtype")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _fractions(v: str | list[float]) -> list[float] | None:
    """Depth fractions in [0, 1] (None for ``all``: every layer); an error names the bad entry."""
    if isinstance(v, str):
        if v.strip().lower() == "all":
            return None
        items: list[Any] = [x.strip() for x in v.split(",") if x.strip()]
    else:
        items = list(v)
    if not items:
        raise ValueError("depth: no fractions given")
    out = []
    for x in items:
        try:
            f = float(x)
        except (TypeError, ValueError):
            raise ValueError(f"depth: {x!r} is not a fraction of depth (e.g. 0.25,0.5,0.75 or all)") from None
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"depth: {x!r} is outside [0, 1] (a fraction of the model's depth)")
        out.append(f)
    return out


def _read_yaml(p: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"{p}: not valid YAML ({e})") from e
    if not isinstance(raw, dict):
        raise SpecError(f"{p}: a spec must be a mapping")
    return raw


def _find(path: str | Path, near: Path | None = None) -> Path:
    p = Path(path)
    for cand in (p, *((near / p,) if near is not None else ()), CONFIG_DIR / p.name):
        if cand.exists():
            return cand
    raise SpecError(f"{path}: no such spec file")


def _include_datasets(raw: dict[str, Any], here: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """``datasets: {include: other.yaml, <role>: ...}``: the ``datasets`` block of another spec (relative to
    this one, or a shipped config), with the roles given here replacing its own. Paths inside the included
    block resolve as if written here (keep both specs in one folder, or use ``shared:`` paths)."""
    ds = raw.get("datasets")
    if not (isinstance(ds, dict) and "include" in ds):
        return raw
    other = _find(str(ds["include"]), here.parent)
    if other.resolve() in seen:
        raise SpecError(f"{here}: datasets.include forms a cycle through {other}")
    inner = _include_datasets(_read_yaml(other), other, (*seen, other.resolve()))
    base = dict(inner.get("datasets") or {})
    base.update({k: v for k, v in ds.items() if k != "include"})
    return {**raw, "datasets": base}


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> tuple[SweepSpec, Path]:
    """Parse and validate a YAML spec; returns the spec and the folder relative paths resolve against.

    ``datasets: {include: OTHER.yaml}`` takes another spec's datasets (e.g. the shared-benchmark protocol),
    roles given beside ``include`` replacing its own."""
    p = _find(path)
    raw = _include_datasets(_read_yaml(p), p, (p.resolve(),))
    raw.update(overrides or {})
    return parse_spec(raw, where=str(p)), p.parent


def _user_loc(raw: dict[str, Any], loc: tuple[Any, ...]) -> str:
    """An error location as the user wrote the spec: a single dataset given for ``train`` / ``val`` is
    wrapped in a one-component mixture internally (``train.mix.0``), which the message does not show; a
    list shows as ``train[i]``."""
    parts = [str(x) for x in loc]
    if len(parts) >= 4 and parts[0] == "datasets" and parts[1] in ("train", "val") and parts[2] == "mix":
        given = (raw.get("datasets") or {}).get(parts[1])
        if isinstance(given, dict) and "mix" not in given:
            parts = parts[:2] + parts[4:]
        elif isinstance(given, list):
            parts = [parts[0], f"{parts[1]}[{parts[3]}]", *parts[4:]]
    return ".".join(parts)


def parse_spec(raw: dict[str, Any], where: str = "spec") -> SweepSpec:
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            loc = _user_loc(raw, tuple(err["loc"]))
            if err["type"] == "extra_forbidden":
                msgs.append(f"unknown key {loc!r}")
            else:
                msgs.append(f"{loc}: {err['msg']}")
        raise SpecError(f"{where}: " + "; ".join(msgs)) from None


@dataclass(frozen=True)
class Run:
    """One probe fit: kind × hook × layer (or layer set) × pooling × seed (C chosen on validation)."""

    probe: ProbeSpec
    hook_kind: str
    layer: int  # -1 for multi-layer probes
    pooling: Pooling
    seed: int
    spec_key: str

    @property
    def run_id(self) -> str:
        d = {
            "probe": self.probe.model_dump(mode="json"),
            "hook": self.hook_kind,
            "layer": self.layer,
            "pooling": self.pooling.params(),
            "seed": self.seed,
            "spec": self.spec_key,
        }
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _probe_layers(probe: ProbeSpec, layers: list[int]) -> list[int]:
    """The layers a per-layer kind runs at: its own ``layers`` (a subset of the collected ones), else all."""
    if probe.layers is None:
        return layers
    if isinstance(probe.layers, list):
        own = [int(la) for la in probe.layers]
    else:
        try:
            own = parse_layers(probe.layers, max(layers) + 1) if layers else []
        except ValueError as e:
            raise SpecError(f"probes.{probe.kind}.layers: {e}") from None
    missing = [la for la in own if la not in layers]
    if missing:
        raise SpecError(
            f"probes.{probe.kind}.layers: layers {missing} are not collected (spec layers: {layers})"
        )
    return [la for la in layers if la in own]


def expand(spec: SweepSpec, layers: list[int], data_key: str) -> Iterator[Run]:
    """All runs of a spec over resolved ``layers``; ``data_key`` ties run ids to the data's fingerprints."""
    common = {
        k: v
        for k, v in spec.model_dump(mode="json").items()
        if k in ("model", "max_len", "positions", "Cs", "select_metric", "context_len")
    }
    spec_key = hashlib.sha256(json.dumps({**common, "data": data_key}, sort_keys=True).encode()).hexdigest()[
        :16
    ]
    for seed in spec.seeds:
        for hook in spec.hooks:
            for pooling in spec.pooling_objs():
                for probe in spec.all_probes():
                    if not SWEEP_KINDS[probe.kind].per_layer:
                        yield Run(probe, hook, -1, pooling, seed, spec_key)
                        continue
                    for layer in _probe_layers(probe, layers):
                        yield Run(probe, hook, layer, pooling, seed, spec_key)
