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

import contextlib
import errno
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from rich.console import Console

from activations.store import DiskFullError, disk_free, format_bytes
from experiments.analysis.selection import CONFOUND_AUROC, annotate, selection_summary
from experiments.sweep.spec import SweepSpec

__all__ = [
    "ANNOTATIONS",
    "COLUMNS",
    "HEAD",
    "MIDDLE",
    "PARTS_DIR",
    "RESULTS",
    "SCORES_DIR",
    "SELECTION_JSON",
    "SWEEP_JSON",
    "ResultRow",
    "SweepError",
    "append_results",
    "check_sweep_dir",
    "consolidate_results",
    "finalize_results",
    "has_results",
    "load_run_scores",
    "read_results",
    "save_run_scores",
]

console = Console(stderr=True)

RESULTS = "results.parquet"
#: rows appended since the table was last consolidated, one parquet file per append
PARTS_DIR = "results.parts"
#: parquet metadata key of the consolidated table: the parts it already holds
ABSORBED_KEY = "probe_atlas.absorbed_parts"
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
def _parts(out: Path) -> list[Path]:
    """The appended parts of ``out``'s table, in the order they were written."""
    d = Path(out) / PARTS_DIR
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.name.startswith("part-") and p.suffix == ".parquet")


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        # page checksums (written since parts exist) are verified: a flipped bit is an error, not data
        return pd.read_parquet(path, page_checksum_verification=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # (pyarrow raises several types for a damaged file)
        raise SweepError(
            f"{path}: damaged, cannot be read as a results table ({type(e).__name__}: {e}); delete it and "
            "rerun the sweep: the runs it held are fitted again"
        ) from e


def _absorbed(path: Path) -> set[str]:
    """The parts the consolidated table at ``path`` already holds (recorded in its parquet metadata)."""
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(ABSORBED_KEY)
    return set(json.loads(raw)) if raw else set()


def has_results(out: str | Path) -> bool:
    """Whether ``out`` holds a results table (the consolidated file or appended parts)."""
    return (Path(out) / RESULTS).is_file() or bool(_parts(Path(out)))


def read_results(out: str | Path) -> pd.DataFrame:
    """The results table of the folder ``out``: ``results.parquet`` plus the parts appended since it was
    last consolidated (``results.parts/``). Folders written before parts
    existed (one ``results.parquet``) read the same. A run's rows are read from the first file that holds
    the run (none twice). A damaged file is a :class:`SweepError` naming it."""
    out = Path(out)
    p = out / RESULTS
    frames, absorbed = [], set()
    if p.is_file():
        frames.append(_read_parquet(p))
        try:
            absorbed = _absorbed(p)
        except Exception:  # (already read above; metadata unreadable means none)
            absorbed = set()
    for part in _parts(out):
        if part.name in absorbed:
            continue  # consolidated, then killed before the part was removed
        try:
            frames.append(_read_parquet(part))
        except FileNotFoundError:  # consolidated and removed meanwhile by the writer
            continue
    # a run's rows come from one append (a cascade has several rows per run and eval set, one per rate): a
    # run already read from an earlier file is not read again
    seen: set[str] = set()
    kept = []
    for f in frames:
        if "run_id" in f.columns and len(f):
            ids = f["run_id"].astype(str)
            f = f[~ids.isin(seen)]
            seen.update(ids)
        if len(f):
            kept.append(f)
    if not kept:
        return pd.DataFrame()
    return kept[0].reset_index(drop=True) if len(kept) == 1 else pd.concat(kept, ignore_index=True)


def _write_parquet(path: Path, df: pd.DataFrame, metadata: dict[str, str] | None = None) -> None:
    """Write ``df`` to a temporary sibling, fsync it and rename it onto ``path``: ``path`` is the whole new
    table or the old one, never part of one. A full disk is a :class:`DiskFullError` naming the path, with
    nothing left behind."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        table = pa.Table.from_pandas(df, preserve_index=False)
        if metadata:
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
        pq.write_table(table, tmp, write_page_checksum=True)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            free = format_bytes(disk_free(path.parent))
            raise DiskFullError(
                f"{path}: no space left on device ({free} free) while writing the results table; the rows "
                "being written were not recorded: free some space and rerun the "
                "same sweep, it resumes (finished runs are kept, the unrecorded ones are fitted again)",
                path,
            ) from e
        raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _write_text(path: Path, text: str) -> None:
    """Write a small text file whole, then rename it into place (a kill leaves the old one or the new)."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def append_results(out: Path, rows: list[dict[str, Any]]) -> Path | None:
    """Append rows to the folder's results table as one new part (``results.parts/part-NNNNNN-*.parquet``,
    written whole, then renamed into place): a kill at any instant leaves the table with or without these
    rows, never part of them. Returns the part written (None for no rows). One writer per folder: the
    sweep holds the folder's lock (:mod:`activations.lock`)."""
    if not rows:
        return None
    d = Path(out) / PARTS_DIR
    d.mkdir(parents=True, exist_ok=True)
    for tmp in d.glob(".tmp-*"):  # a writer killed mid-write (the folder's lock is ours)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    seqs = [int(p.name.split("-")[1]) for p in _parts(Path(out)) if p.name.split("-")[1].isdigit()]
    part = d / f"part-{max(seqs, default=0) + 1:06d}-{secrets.token_hex(4)}.parquet"
    _write_parquet(part, pd.DataFrame(rows))
    return part


def consolidate_results(out: Path, df: pd.DataFrame | None = None) -> pd.DataFrame:
    """Rewrite ``results.parquet`` as the whole table (``df``, default the table as read) and remove the
    parts it absorbed. The new file records which parts it holds, so a kill between the rename and the
    removal leaves a table that still reads once."""
    out = Path(out)
    parts = [p.name for p in _parts(out)]
    table = read_results(out) if df is None else df
    _write_parquet(out / RESULTS, table, {ABSORBED_KEY: json.dumps(parts)})
    for name in parts:
        with contextlib.suppress(FileNotFoundError):
            (out / PARTS_DIR / name).unlink()
    with contextlib.suppress(OSError):
        (out / PARTS_DIR).rmdir()
    return table


def finalize_results(out: Path) -> pd.DataFrame:
    """Annotate the finished table (``selected``, ``selected_by``, ``surface_auroc``, ``confounded``:
    :func:`experiments.analysis.selection.annotate`), consolidate it into one ``results.parquet`` (atomic)
    and write ``OUT/selection.json`` (how often validation tied). Returns the annotated table."""
    df = read_results(out)
    if len(df) == 0:
        return df
    df = annotate(df.drop(columns=[c for c in ANNOTATIONS if c in df.columns]))
    consolidate_results(out, df)
    _write_text(out / SELECTION_JSON, json.dumps(selection_summary(df), indent=1))
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
        # spec.yaml first, sweep.json (which claims the folder) last; each written whole, then renamed
        _write_text(out / "spec.yaml", yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
        _write_text(sj, json.dumps({"name": spec.name, "spec_fingerprint": fp}, indent=1))


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
    try:
        with np.load(f, allow_pickle=False) as z:
            scores = {k.split(":", 1)[1]: z[k] for k in z.files if k.startswith("role:")}
            info = json.loads(str(z["info"]))
    except Exception as e:  # (a damaged zip: BadZipFile, a CRC error, a truncated member, bad JSON)
        raise SweepError(
            f"{f}: damaged, cannot be read ({type(e).__name__}: {e}); delete it and the rows of run "
            f"{run_id} and rerun the sweep"
        ) from e
    return scores, info
