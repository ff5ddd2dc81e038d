"""Figures of the transfer atlas (:mod:`experiments.analysis.transfer`) and of a generalization sweep.

* :func:`transfer_heatmap`: train source × evaluation source, AUROC or TPR@1%FPR, one panel per family
  (each cell at the layer chosen on validation for that fold, or at a given layer);
* :func:`layer_profile_figure`: AUROC by layer, in-source beside out-of-source (does the signal that carries
  live in other layers than the signal that fits?);
* :func:`overrefusal_recall`: per family (the validation-chosen row of a sweep), the share of look-alikes
  flagged against the recall on held-out harmful sets: over-refusal against recall.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from experiments.analysis.transfer import IN_SOURCE, TRANSFER_COLUMNS, layer_profile
from experiments.viz.save import save_figure

__all__ = [
    "layer_profile_figure",
    "overrefusal_recall",
    "transfer_heatmap",
    "write_transfer_figures",
]

_METRIC = {"auroc": "AUROC", "tpr_at_1pct_fpr": "TPR @ 1% FPR", "flag_rate": "flagged at the 1% threshold"}


def _check(df: pd.DataFrame, cols: Sequence[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: the table lacks columns {missing}")


def transfer_heatmap(
    df: pd.DataFrame, metric: str = "auroc", *, mode: str | None = None, layer: int | None = None
) -> go.Figure:
    """Train source × evaluation source of ``metric``, one panel per family (× pooling)."""
    _check(df, TRANSFER_COLUMNS, "transfer_heatmap")
    if metric not in _METRIC:
        raise ValueError(f"metric must be one of {sorted(_METRIC)}, got {metric!r}")
    modes = list(dict.fromkeys(df["mode"]))
    mode = mode or ("train_on_one" if "train_on_one" in modes else modes[0])
    d = df[df["mode"] == mode]
    if d.empty:
        raise ValueError(f"transfer_heatmap: no rows of mode {mode!r} (modes: {modes})")
    d = d[d["layer"] == layer] if layer is not None else d[d["selected"] | (d["layer"] < 0)]
    if d.empty:
        raise ValueError(f"transfer_heatmap: no rows at layer {layer}")
    panels = list(dict.fromkeys(zip(d["probe"], d["pooling"], strict=True)))
    fig = make_subplots(
        rows=1,
        cols=len(panels),
        subplot_titles=[f"{p} · {q}" for p, q in panels],
        shared_yaxes=True,
        horizontal_spacing=0.03,
    )
    trains = list(dict.fromkeys(d["train_source"]))
    evals = [e for e in dict.fromkeys(d["eval_source"]) if e != IN_SOURCE] + [IN_SOURCE]
    for j, (p, q) in enumerate(panels, start=1):
        sub = d[(d["probe"] == p) & (d["pooling"] == q)]
        z = sub.pivot_table(index="train_source", columns="eval_source", values=metric, aggfunc="mean")
        z = z.reindex(index=trains, columns=[e for e in evals if e in z.columns])
        lay = sub.groupby("train_source")["layer"].first().reindex(trains)
        ylab = [
            f"{t} (L{int(la)})" if pd.notna(la) and la >= 0 else t for t, la in zip(trains, lay, strict=True)
        ]
        text = [[("" if not np.isfinite(v) else f"{v:.2f}") for v in row] for row in z.to_numpy(dtype=float)]
        fig.add_trace(
            go.Heatmap(
                z=z.to_numpy(dtype=float),
                x=list(z.columns),
                y=ylab,
                text=text,
                texttemplate="%{text}",
                zmin=0.5 if metric == "auroc" else 0.0,
                zmax=1.0,
                colorscale="Viridis",
                showscale=j == len(panels),
                hovertemplate="train %{y}<br>eval %{x}<br>" + _METRIC[metric] + " %{z:.3f}<extra></extra>",
            ),
            row=1,
            col=j,
        )
    title = "leave one source out (row: held-out source)" if mode == "loso" else "train on one source"
    fig.update_layout(
        title=f"transfer atlas: {_METRIC[metric]} · {title}"
        + (f" · layer {layer}" if layer is not None else " · layer chosen on validation"),
        height=200 + 28 * len(trains),
        width=max(600, 60 + 40 * len(evals) * len(panels)),
    )
    fig.update_xaxes(tickangle=45)
    return fig


def layer_profile_figure(df: pd.DataFrame, mode: str = "loso") -> go.Figure:
    """AUROC by layer: in-source (solid) and out-of-source (dashed), one colour per family × pooling."""
    _check(df, TRANSFER_COLUMNS, "layer_profile_figure")
    prof = layer_profile(df, mode)
    if prof.empty:
        raise ValueError(f"layer_profile_figure: no per-layer rows of mode {mode!r}")
    fig = go.Figure()
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    for i, ((p, q), g) in enumerate(prof.groupby(["probe", "pooling"], sort=False)):
        g = g.sort_values("layer")
        c = palette[i % len(palette)]
        for col, dash, lab in (
            ("in_source_auroc", "solid", "in-source"),
            ("out_of_source_auroc", "dash", "out-of-source"),
        ):
            fig.add_trace(
                go.Scatter(x=g["layer"], y=g[col], mode="lines+markers", name=f"{p} · {q} · {lab}",
                           line={"color": c, "dash": dash})
            )  # fmt: skip
    fig.update_layout(
        title=f"AUROC by layer, in-source vs out-of-source ({mode}; mean over folds)",
        xaxis_title="layer",
        yaxis_title="AUROC",
        height=480,
        width=860,
    )
    return fig


def overrefusal_recall(
    results: pd.DataFrame,
    *,
    overrefusal_set: str,
    recall_sets: Sequence[str],
    fpr: str = "1pct",
) -> go.Figure:
    """Per family (each sweep row chosen on validation), the share of ``overrefusal_set``'s harmless
    look-alikes flagged at the control threshold (x) against the mean TPR on ``recall_sets`` (y)."""
    _check(
        results, ["eval_set", "probe", "pooling", "layer", "val_" + "tpr_at_1pct_fpr"], "overrefusal_recall"
    )
    flag = f"own_negatives_flag_rate_at_{fpr}_fpr"
    if flag not in results.columns:
        flag = f"benign_flag_rate_at_{fpr}_fpr"
    tpr = f"tpr_at_{fpr}_fpr"
    _check(results, [flag, tpr], "overrefusal_recall")
    sets = set(results["eval_set"])
    for s in [overrefusal_set, *recall_sets]:
        if s not in sets:
            raise ValueError(f"overrefusal_recall: no eval set {s!r} (sets: {sorted(sets)})")
    keys = [k for k in ("probe", "pooling", "variant") if k in results.columns]
    pts = []
    for name, g in results.groupby(keys, sort=False, dropna=False):
        if "selected" in g.columns and "run_id" in g.columns and g["selected"].any():
            first = g[g["selected"].astype(bool)].iloc[0]  # the sweep's validation-chosen run
            pick = g[g["run_id"] == first["run_id"]]
        else:
            best = g.sort_values(["val_tpr_at_1pct_fpr", "val_auroc"], ascending=False, na_position="last")
            first = best.iloc[0]
            same = g["layer"].astype(str) == str(first["layer"])
            if "C" in g.columns:
                same &= g["C"].astype(str) == str(first["C"])
            pick = g[same]
        over = pick[pick["eval_set"] == overrefusal_set][flag]
        rec = pick[pick["eval_set"].isin(recall_sets)][tpr]
        if over.empty or rec.empty:
            continue
        label = " · ".join(
            str(v)
            for v in (name if isinstance(name, tuple) else (name,))
            if str(v) not in ("", "nan", "None")
        )
        pts.append((label, float(over.iloc[0]), float(rec.mean()), str(first["layer"])))
    if not pts:
        raise ValueError("overrefusal_recall: no family has both figures")
    fig = go.Figure(
        go.Scatter(
            x=[p[1] for p in pts],
            y=[p[2] for p in pts],
            mode="markers+text",
            text=[p[0] for p in pts],
            textposition="top center",
            customdata=[p[3] for p in pts],
            hovertemplate="%{text}<br>layer %{customdata}<br>flagged %{x:.3f}<br>recall %{y:.3f}"
            "<extra></extra>",
        )
    )
    fig.update_layout(
        title=f"over-refusal ({overrefusal_set}: look-alikes flagged) vs recall (mean TPR@{fpr} on "
        f"{', '.join(recall_sets)}), per family chosen on validation",
        xaxis_title="share of look-alikes flagged",
        yaxis_title="recall",
        height=520,
        width=860,
    )
    return fig


def write_transfer_figures(df: pd.DataFrame, out: str | Path, png: bool = False) -> list[Path]:
    """Every atlas figure for the folds the table has, into ``out``."""
    out = Path(out)
    written: list[Path] = []
    for mode in dict.fromkeys(df["mode"]):
        for metric in ("auroc", "tpr_at_1pct_fpr"):
            d = df[df["mode"] == mode]
            if d[metric].notna().any():
                written += save_figure(
                    transfer_heatmap(df, metric, mode=mode), out / f"transfer_{mode}_{metric}", png
                )
        if (df[(df["mode"] == mode)]["layer"] >= 0).any():
            written += save_figure(layer_profile_figure(df, mode), out / f"layer_profile_{mode}", png)
    return written
