"""Tables drawn from a sweep's results: the headline table (the validation-chosen row per probe × pooling)
and the best run per cost band."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from experiments.analysis.selection import pick, primary_metric

__all__ = ["BAND_EDGES", "HEADLINE_KEYS", "best_per_cost_band", "cost_band", "headline_table"]

#: upper edges (exclusive) of the cost bands, in % of the policy model's forward pass; the last band is ≥ 1%
BAND_EDGES: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)


#: one headline row per these columns (those present)
HEADLINE_KEYS = ["eval_set", "model", "probe", "variant", "pooling", "hook"]


def headline_table(df: pd.DataFrame, select: str | None = None) -> pd.DataFrame:
    """Per eval set, probe kind and pooling (and variant, hook, model where present): the row chosen on
    *validation* (:mod:`experiments.analysis.selection`: the layer, seed and C), never on the test metrics.

    ``select`` names the primary validation metric (``tpr_at_1pct_fpr``, ``log_auroc``, ``auroc``, or the
    ``val_*`` column); default: the table's ``select_metric``. Rows are ordered by eval set (as in the table)
    and, for reading, by test AUROC.
    """
    if len(df) == 0:
        raise ValueError("results table is empty")
    primary = select.removeprefix("val_") if select else None
    best = pick(df, HEADLINE_KEYS, primary).drop(columns="n_rows")
    order = {k: i for i, k in enumerate(dict.fromkeys(df["eval_set"]))}
    best = best.assign(_o=best["eval_set"].map(order)).sort_values(["_o", "auroc"], ascending=[True, False])
    return best.drop(columns="_o").reset_index(drop=True)


def cost_band(overhead_pct: float, edges: Sequence[float] = BAND_EDGES) -> str:
    """The band label of a cost (overhead in %): ``< 0.001%``, ..., ``≥ 1%``; NaN gives ``unknown``."""
    if overhead_pct is None or (isinstance(overhead_pct, float) and math.isnan(overhead_pct)):
        return "unknown"
    for e in edges:
        if overhead_pct < e:
            return f"< {e:g}%"
    return f"≥ {edges[-1]:g}%"


def best_per_cost_band(
    df: pd.DataFrame,
    cost: str = "overhead_pct",
    select: str | None = None,
    edges: Sequence[float] = BAND_EDGES,
) -> pd.DataFrame:
    """Per eval set (with a defined AUROC) and cost band: the run chosen on *validation*.

    ``select`` is the primary validation metric (default: the table's ``select_metric``; ties by the rule
    of :mod:`experiments.analysis.selection`, then the cheaper run); test metrics are reported, never used
    to choose. Bands are in % overhead (``cost``).
    """
    if len(df) == 0:
        raise ValueError("results table is empty")
    if cost not in df.columns:
        raise ValueError(f"results table has no cost column {cost!r}")
    primary = select.removeprefix("val_") if select else primary_metric(df)
    d = df[df["auroc"].notna()].copy()
    d["band"] = [cost_band(float(c), edges) for c in d[cost]]
    order = {cost_band(e * 0.999, edges): i for i, e in enumerate(edges)}
    order[f"≥ {edges[-1]:g}%"] = len(edges)
    order["unknown"] = len(edges) + 1
    best = pick(d, ["eval_set", "band"], primary)
    best["_band_order"] = best["band"].map(order)
    best = best.sort_values(["eval_set", "_band_order"]).drop(columns=["_band_order", "n_rows"])
    cols = [
        "eval_set",
        "band",
        "probe",
        "pooling",
        "layer",
        "C",
        f"val_{primary}",
        "auroc",
        "tpr_at_1pct_fpr",
        cost,
    ]
    cols += [
        c for c in ("confounded", "standalone_overhead_pct", "flops_per_token", "run_id") if c in best.columns
    ]
    return best[[c for c in cols if c in best.columns]].reset_index(drop=True)
