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

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from activations.data import DataError, PromptDataset, load_dataset
from activations.pooling import Pooling, PoolingError

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class SpecError(ValueError):
    pass


def shared_root() -> Path:
    """Where ``shared:`` paths point: ``$PROBE_ATLAS_SHARED``, else ``../shared`` near the repo or cwd."""
    env = os.environ.get("PROBE_ATLAS_SHARED")
    if env:
        return Path(env)
    for cand in (REPO_ROOT.parent / "shared", Path.cwd().parent / "shared", Path.cwd() / "shared"):
        if cand.exists():
            return cand
    return REPO_ROOT.parent / "shared"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetSpec(_Frozen):
    """One dataset: a JSONL path (relative to the spec file; ``shared:`` = the shared data folder),
    ``builtin`` or ``hf:NAME``, with optional filters, de-duplication and a seeded subsample."""

    path: str
    name: str | None = None
    split: str | list[str] | None = None
    kind: str | list[str] | None = None
    source: str | list[str] | None = None
    category: str | list[str] | None = None
    label: float | None = None
    dedup: bool = True
    subsample: int | None = Field(default=None, gt=0)
    max_per_class: int | None = Field(default=None, gt=0)
    seed: int = 0
    augment: list[str] | None = None
    augment_copies: int = Field(default=1, gt=0)
    augment_keep_original: bool = True

    @field_validator("augment")
    @classmethod
    def _known_transforms(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        from activations.augment import get_transform

        for name in v:
            try:
                get_transform(name)
            except (KeyError, ValueError) as e:
                raise ValueError(f"augment: {e}") from e
        return v

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
        ref = self.resolve_path(base)
        try:
            ds = load_dataset(ref)
        except DataError as e:
            raise SpecError(f"dataset {self.name or default_name!r}: {e}") from e
        name = self.name or default_name
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
                f"{self.model_dump(exclude_none=True, exclude={'path', 'name', 'dedup', 'seed'})} "
                "selects nothing"
            )
        if self.dedup:
            ds = ds.dedup()
        if self.max_per_class is not None:
            harmful = ds.filter(label=1.0)
            keep = {e.id for e in harmful.subsample(self.max_per_class, seed=self.seed, stratify=False)}
            harmless = ds.where(lambda e: e.label < 0.5)
            keep |= {e.id for e in harmless.subsample(self.max_per_class, seed=self.seed, stratify=False)}
            keep |= {e.id for e in ds if 0.0 < e.label < 1.0}
            ds = ds.where(lambda e: e.id in keep)
        if self.subsample is not None:
            ds = ds.subsample(self.subsample, seed=self.seed)
        if self.augment:
            from activations.augment import augment_dataset

            ds = augment_dataset(
                ds,
                self.augment,
                seed=self.seed,
                copies=self.augment_copies,
                include_original=self.augment_keep_original,
            )
        return PromptDataset(ds.examples, name=name)


class DatasetsSpec(_Frozen):
    train: DatasetSpec
    val: DatasetSpec | None = None
    test: dict[str, DatasetSpec] = Field(default_factory=dict)
    benign_control: DatasetSpec | None = None

    @model_validator(mode="after")
    def _has_tests(self) -> DatasetsSpec:
        if not self.test:
            raise ValueError("datasets.test: give at least one test set")
        return self


class ProbeSpec(_Frozen):
    """A probe kind (see :mod:`experiments.registry`; ``probe-atlas kinds`` lists them) and its options.

    ``layers``: the layers a multi-layer kind reads (default: every collected layer). ``params``: options
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
        from experiments.registry import kinds

        known = kinds()
        if v not in known:
            raise ValueError(f"unknown probe kind {v!r}; known kinds: {sorted(known)}")
        return v

    @model_validator(mode="after")
    def _known_params(self) -> ProbeSpec:
        from experiments.registry import kinds

        allowed = kinds()[self.kind].params
        bad = sorted(set(self.params) - allowed)
        if bad:
            raise ValueError(
                f"probe kind {self.kind!r} has no parameter(s) {bad}; it takes {sorted(allowed)}"
            )
        return self

    @property
    def uses_C(self) -> bool:
        from experiments.registry import kinds

        return kinds()[self.kind].uses_C

    def label(self) -> str:
        return self.kind


class SweepSpec(_Frozen):
    name: str
    model: str = "smollm2"
    max_len: int = Field(default=256, gt=0)
    token_budget: int = Field(default=4096, gt=0)
    positions: Literal["auto", "prompt", "response", "prompt+response", "all"] = "auto"
    #: the tokens the stores keep (default: the scored ``positions``); ``all`` keeps every rendered token,
    #: which fine-tuned final layers need (they re-run attention over the whole sequence)
    keep: Literal["auto", "prompt", "response", "prompt+response", "all"] | None = None
    datasets: DatasetsSpec
    hooks: list[str] = Field(default_factory=lambda: ["resid_post"])
    layers: str | list[int] = "all"
    poolings: list[str | dict[str, Any]] = Field(default_factory=lambda: list[str | dict[str, Any]](["mean"]))
    probes: list[ProbeSpec]
    Cs: list[float] = Field(default_factory=lambda: [1e-3, 1e-2, 1e-1, 1.0])
    seeds: list[int] = Field(default_factory=lambda: [0])
    select_metric: Literal["auroc", "log_auroc", "tpr_at_1pct_fpr"] = "auroc"
    bootstrap: int = Field(default=500, ge=0)
    context_len: int = Field(default=512, gt=0)

    @field_validator("hooks", "poolings", "probes", "Cs", "seeds")
    @classmethod
    def _nonempty(cls, v: list[Any], info: Any) -> list[Any]:
        if not v:
            raise ValueError(f"{info.field_name}: the grid is empty")
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
        for p in v:
            try:
                Pooling.parse(p)
            except PoolingError as e:
                raise ValueError(f"poolings: {e}") from e
        return v

    # ------------------------------------------------------------------ helpers
    def pooling_objs(self) -> list[Pooling]:
        return [Pooling.parse(p) for p in self.poolings]

    def fingerprint(self) -> str:
        d = self.model_dump(mode="json")
        if d.get("keep") is None:  # specs written before `keep` existed keep their fingerprint
            d.pop("keep", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> tuple[SweepSpec, Path]:
    """Parse and validate a YAML spec; returns the spec and the folder relative paths resolve against."""
    p = Path(path)
    if not p.exists() and (CONFIG_DIR / p.name).exists():
        p = CONFIG_DIR / p.name
    if not p.exists():
        raise SpecError(f"{path}: no such spec file")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"{p}: not valid YAML ({e})") from e
    if not isinstance(raw, dict):
        raise SpecError(f"{p}: a spec must be a mapping")
    raw.update(overrides or {})
    return parse_spec(raw, where=str(p)), p.parent


def parse_spec(raw: dict[str, Any], where: str = "spec") -> SweepSpec:
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
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
    from experiments.registry import kinds

    registry = kinds()
    for seed in spec.seeds:
        for hook in spec.hooks:
            for pooling in spec.pooling_objs():
                for probe in spec.probes:
                    if not registry[probe.kind].per_layer:
                        yield Run(probe, hook, -1, pooling, seed, spec_key)
                        continue
                    for layer in layers:
                        yield Run(probe, hook, layer, pooling, seed, spec_key)
