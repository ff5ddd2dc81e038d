"""The sweep's datasets: every role loaded, mixed, decontaminated and checked, and ``OUT/splits.json``."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from activations.data import PromptDataset
from activations.decontam import Reference, decontaminate
from experiments.sweep.spec import SpecError, SweepSpec

__all__ = ["SPLITS_JSON", "SweepData", "load_sweep_data", "write_splits"]

console = Console(stderr=True)

SPLITS_JSON = "splits.json"


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
