"""A sweep's results folder: ``results.parquet`` (one :class:`ResultRow` per run × eval set), the folder's
spec (``sweep.json``, ``spec.yaml``), every finished run's scores (``scores/<run_id>.npz``) and the
validation-only annotations written when the sweep ends (``selection.json``).

The row schema is here and only here: :data:`HEAD` and :data:`MIDDLE` are the fixed columns, in table order;
between them sit the eval set's metrics (:func:`experiments.sweep.context.evaluate_scores`) and the
validation metrics, after them the run's own scalar columns (``variant``, ``aggregation``, ``stream_*``,
``sae_*``, ...) and, last, columns a kind adds per eval set; :data:`ANNOTATIONS` are derived from the
finished table.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from rich.console import Console

from experiments.analysis.selection import CONFOUND_AUROC, annotate, selection_summary
from experiments.sweep.spec import SweepSpec

__all__ = [
    "ANNOTATIONS",
    "COLUMNS",
    "HEAD",
    "MIDDLE",
    "RESULTS",
    "SCORES_DIR",
    "SELECTION_JSON",
    "SWEEP_JSON",
    "ResultRow",
    "SweepError",
    "append_results",
    "check_sweep_dir",
    "finalize_results",
    "load_run_scores",
    "read_results",
    "save_run_scores",
]

console = Console(stderr=True)

RESULTS = "results.parquet"
SWEEP_JSON = "sweep.json"
SELECTION_JSON = "selection.json"
#: every finished run's scores, one ``<run_id>.npz`` per run (what ensembles and cascades combine)
SCORES_DIR = "scores"

#: the columns before the metrics, in table order
HEAD: tuple[str, ...] = (
    "run_id",
    "sweep",
    "model",
    "probe",
    "hook",
    "layer",  # -1 for multi-layer and layer-less scorers
    "depth",  # normalized depth layer / model_layers (NaN where layer is -1): models of any depth line up
    "model_layers",  # the model's number of layers
    "layers",
    "n_layers_read",
    "pooling",
    "C",
    "seed",
    "eval_set",
)
#: the columns after the metrics and the validation metrics, in table order
MIDDLE: tuple[str, ...] = (
    "select_metric",
    "val_candidates",
    "val_ties",
    "flops_per_token",
    "overhead_pct",
    "standalone_flops_per_token",
    "standalone_overhead_pct",
    "probe_path",
    "fit_seconds",
    "n_train",
    "n_features",
    "params",
)
#: the columns :func:`finalize_results` derives from the whole table
ANNOTATIONS = ("selected", "selected_by", "surface_auroc", "confounded")
#: every fixed column of a row (the metric, validation and kind-specific columns sit where the module
#: docstring says)
COLUMNS: tuple[str, ...] = HEAD + MIDDLE


class SweepError(RuntimeError):
    pass


@dataclass
class ResultRow:
    """One row of ``results.parquet``: a finished run on one eval set (see the module docstring)."""

    run_id: str
    sweep: str
    model: str
    probe: str
    hook: str
    layer: int
    depth: float
    model_layers: int
    layers: str
    n_layers_read: int
    pooling: str
    C: float
    seed: int
    eval_set: str
    metrics: dict[str, Any]
    val: dict[str, float]
    select_metric: str
    val_candidates: int
    val_ties: int
    flops_per_token: float
    overhead_pct: float
    standalone_flops_per_token: float
    standalone_overhead_pct: float
    probe_path: str
    fit_seconds: float
    n_train: int
    n_features: int
    params: str
    #: the run's own columns (scalars only are kept)
    extra: dict[str, Any] = field(default_factory=dict)
    #: columns a kind adds for this eval set (after everything else)
    tail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The row as ``results.parquet`` holds it (infinities stored as NaN)."""
        d: dict[str, Any] = {c: getattr(self, c) for c in HEAD}
        d.update(self.metrics)
        d.update({f"val_{k}": v for k, v in self.val.items()})
        d.update({c: getattr(self, c) for c in MIDDLE})
        d.update({k: v for k, v in self.extra.items() if isinstance(v, (int, float, str))})
        d.update(self.tail)
        return {k: float("nan") if isinstance(v, float) and np.isinf(v) else v for k, v in d.items()}


# ---------------------------------------------------------------------- the table
def read_results(out: Path) -> pd.DataFrame:
    p = Path(out) / RESULTS
    if not p.exists():
        return pd.DataFrame()
    return pd.read_parquet(p)


def _write(out: Path, df: pd.DataFrame) -> None:
    tmp = out / f".tmp-{RESULTS}"
    df.to_parquet(tmp, index=False)
    os.replace(tmp, out / RESULTS)


def append_results(out: Path, rows: list[dict[str, Any]]) -> None:
    """Append rows to ``results.parquet`` (atomically)."""
    if not rows:
        return
    old = read_results(out)
    new = pd.DataFrame(rows)
    _write(out, pd.concat([old, new], ignore_index=True) if len(old) else new)


def finalize_results(out: Path) -> pd.DataFrame:
    """Annotate the finished table (``selected``, ``selected_by``, ``surface_auroc``, ``confounded``:
    :func:`experiments.analysis.selection.annotate`), rewrite it atomically and write ``OUT/selection.json``
    (how often validation tied). Returns the annotated table."""
    df = read_results(out)
    if len(df) == 0:
        return df
    df = annotate(df.drop(columns=[c for c in ANNOTATIONS if c in df.columns]))
    _write(out, df)
    (out / SELECTION_JSON).write_text(json.dumps(selection_summary(df), indent=1))
    n_conf = sorted(df.loc[df["confounded"], "eval_set"].unique())
    if n_conf:
        console.print(
            f"[yellow]confounded[/] (a surface baseline reaches AUROC >= {CONFOUND_AUROC}): "
            + ", ".join(n_conf)
        )
    return df


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


# ---------------------------------------------------------------------- every run's scores
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
