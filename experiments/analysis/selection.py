"""Validation-only selection over a results table, and the form-confound flag.

Every row that a table, a figure, a claim or a report shows is chosen here, by the rule of
:mod:`probes.selection` applied to the rows' *validation* columns (``val_tpr_at_1pct_fpr``,
``val_log_auroc``, ``val_auroc``; the primary one named by the ``select_metric`` column), then the lower cost
(``flops_per_token``, then ``standalone_flops_per_token``), then the candidate's identity (probe, variant,
pooling, hook, layer, C, seed; not the run id, which hashes the data, test sets included). Test metrics never
enter: permuting a test set's labels and scores changes no selection.

:func:`annotate` adds to a sweep's table:

* ``selected`` (bool): the validation-chosen row per model × probe × variant × pooling × hook (× escalation
  rate) × eval set -- exactly one per group; it picks the layer and the seed;
* ``selected_by``: the validation column that chose it;
* ``surface_auroc``: per eval set, the best AUROC of the *selected* surface-baseline rows (``tfidf`` on the
  text, ``embedding`` on the token embeddings);
* ``confounded`` (bool): that surface AUROC is ``>= 0.95``: the set is separable by form (wrapper, source,
  length, vocabulary) alone, so its AUROC measures form as much as harm.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from experiments.sweep.spec import SURFACE_KINDS
from probes.selection import DEFAULT_SELECT, SELECTION_METRICS, tie_order

__all__ = [
    "CONFOUND_AUROC",
    "SELECT_KEYS",
    "SURFACE_KINDS",
    "annotate",
    "pick",
    "primary_metric",
    "selection_summary",
    "val_order",
]

#: a surface baseline at or above this AUROC marks an eval set ``confounded``
CONFOUND_AUROC = 0.95
#: what identifies a candidate, in the order of the last-resort tie-break (never the run id: it hashes the
#: data, test sets included)
IDENTITY: tuple[str, ...] = ("probe", "variant", "pooling", "hook", "layer", "C", "seed")
#: the columns that make one selection group (those present in the table)
SELECT_KEYS: tuple[str, ...] = ("model", "probe", "variant", "pooling", "hook", "escalation_rate", "eval_set")


def primary_metric(df: pd.DataFrame) -> str:
    """The table's primary selection metric: its ``select_metric`` column, else (tables written before it
    existed) the first ``val_*`` metric column it has."""
    if "select_metric" in df.columns and df["select_metric"].notna().any():
        return str(df["select_metric"].dropna().iloc[0])
    for m in SELECTION_METRICS:
        if f"val_{m}" in df.columns:
            return m
    raise ValueError("results table has no validation column (val_*): nothing can be selected")


def val_order(df: pd.DataFrame, primary: str | None = None) -> pd.DataFrame:
    """``df`` sorted best-first by the selection rule (validation metrics, then cost, then run id)."""
    primary = primary or primary_metric(df)
    cols: list[str] = []
    asc: list[bool] = []
    tmp = df.copy()
    for m in tie_order(primary):
        if f"val_{m}" in tmp.columns:
            cols.append(f"__val_{m}")
            asc.append(False)
            tmp[cols[-1]] = pd.to_numeric(tmp[f"val_{m}"], errors="coerce").fillna(-np.inf)
    if not cols:
        raise ValueError(f"results table has no validation column for {primary!r}")
    for c in ("flops_per_token", "standalone_flops_per_token"):
        if c in tmp.columns:
            cols.append(f"__{c}")
            asc.append(True)
            tmp[cols[-1]] = pd.to_numeric(tmp[c], errors="coerce").fillna(np.inf)
    temp = list(cols)
    for c in IDENTITY:  # a last resort that does not depend on the test data (run ids do)
        if c in tmp.columns:
            cols.append(c)
            asc.append(True)
    return tmp.sort_values(cols, ascending=asc, kind="mergesort", na_position="last").drop(columns=temp)


def _keys(df: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    return [k for k in keys if k in df.columns]


def pick(df: pd.DataFrame, keys: Sequence[str], primary: str | None = None) -> pd.DataFrame:
    """One row per ``keys`` group: the validation-chosen one (every column of it kept), plus ``n_rows``
    (how many rows the group had)."""
    if df.empty:
        return df.assign(n_rows=pd.Series(dtype=int))
    ks = _keys(df, keys)
    ordered = val_order(df, primary)
    if not ks:
        return ordered.head(1).assign(n_rows=len(df)).reset_index(drop=True)
    n = ordered.groupby(ks, dropna=False, sort=False)[ordered.columns[0]].transform("size")
    best = ordered.assign(n_rows=n).groupby(ks, dropna=False, sort=False).head(1)
    return best.reset_index(drop=True)


def annotate(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with ``selected``, ``selected_by``, ``surface_auroc`` and ``confounded`` (module docstring)."""
    if df.empty:
        return df
    primary = primary_metric(df)
    out = df.copy()
    ks = _keys(out, SELECT_KEYS)
    ordered = val_order(out, primary)
    first = ordered.groupby(ks, dropna=False, sort=False).head(1).index
    out["selected"] = out.index.isin(first)
    out["selected_by"] = f"val_{primary}"
    surf = out[out["selected"] & out["probe"].isin(SURFACE_KINDS)]
    best = pd.to_numeric(surf["auroc"], errors="coerce").groupby(surf["eval_set"]).max()
    out["surface_auroc"] = out["eval_set"].map(best).astype(float)
    out["confounded"] = (out["surface_auroc"] >= CONFOUND_AUROC).fillna(False).astype(bool)
    return out


def selection_summary(df: pd.DataFrame) -> dict[str, Any]:
    """How often validation could not discriminate: for C (``val_ties`` of each run) and for the layer /
    seed choice behind ``selected`` (rows tied with the chosen one on the primary validation metric)."""
    if df.empty:
        return {}
    primary = primary_metric(df)
    col = f"val_{primary}"
    runs = df.drop_duplicates("run_id") if "run_id" in df.columns else df
    c_runs = runs[runs.get("val_candidates", pd.Series(1, index=runs.index)) > 1]
    c_tied = int((c_runs["val_ties"] > 1).sum()) if "val_ties" in c_runs else 0
    first_set = df["eval_set"].iloc[0]
    one = df[df["eval_set"] == first_set]  # val metrics are the same on every eval set's row of a run
    ks = [k for k in _keys(one, SELECT_KEYS) if k != "eval_set"]
    groups, tied = 0, 0
    for _, g in one.groupby(ks, dropna=False, sort=False):
        if len(g) < 2:
            continue
        groups += 1
        v = pd.to_numeric(g[col], errors="coerce").fillna(-np.inf).to_numpy()
        if int(np.sum(np.isclose(v, v.max(), rtol=0, atol=1e-12))) > 1:
            tied += 1
    return {
        "primary_metric": col,
        "tie_rule": " > ".join(f"val_{m}" for m in tie_order(primary))
        + " > lower flops_per_token > lower standalone cost > probe, variant, pooling, hook, layer, C, seed",
        "c_selections": len(c_runs),
        "c_selections_tied_on_primary": c_tied,
        "layer_selections": groups,
        "layer_selections_tied_on_primary": tied,
        "default_primary": DEFAULT_SELECT,
    }
