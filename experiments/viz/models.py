"""Figures of a multi-model sweep: detection against compute, one figure per eval set with every model on
it, and the metric against normalized depth (layer / the model's layers), so models of any depth line up."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative

__all__ = ["metric_by_depth", "metric_vs_flops"]

_LABELS = {
    "auroc": "AUROC",
    "tpr_at_1pct_fpr": "TPR at 1% FPR",
    "standalone_flops_per_token": "FLOPs per token (forward to the read layer + probe)",
    "flops_per_token": "FLOPs per token (probe read-out)",
}
_SYMBOLS = ["circle", "square", "diamond", "triangle-up", "x", "star", "cross", "pentagon"]


def _rows(df: pd.DataFrame, eval_set: str, metric: str, what: str) -> pd.DataFrame:
    for c in ("model", "probe", "pooling", "eval_set", metric):
        if c not in df.columns:
            raise ValueError(f"{what}: the results have no {c!r} column")
    sub = df[df["eval_set"] == eval_set]
    if sub.empty:
        raise ValueError(f"{what}: no rows for eval_set={eval_set!r}; have {sorted(df['eval_set'].unique())}")
    return sub


def metric_vs_flops(
    df: pd.DataFrame, eval_set: str, metric: str = "auroc", cost: str = "standalone_flops_per_token"
) -> go.Figure:
    """``metric`` against ``cost`` (log axis) on one eval set: every run (C chosen on validation) is a
    point, coloured by model, shaped by probe family; the hover names pooling, layer and depth."""
    sub = _rows(df, eval_set, metric, "metric_vs_flops")
    if cost not in sub.columns:
        raise ValueError(f"metric_vs_flops: the results have no {cost!r} column")
    models = list(dict.fromkeys(sub["model"].astype(str)))
    probes = list(dict.fromkeys(sub["probe"].astype(str)))
    fig = go.Figure()
    for mi, model in enumerate(models):
        for pi, probe in enumerate(probes):
            s = sub[(sub["model"].astype(str) == model) & (sub["probe"].astype(str) == probe)]
            s = s[pd.to_numeric(s[cost], errors="coerce") > 0]
            if s.empty:
                continue
            depth = s["depth"] if "depth" in s.columns else pd.Series(np.nan, index=s.index)
            fig.add_trace(
                go.Scatter(
                    x=s[cost],
                    y=s[metric],
                    mode="markers",
                    name=f"{model} · {probe}",
                    legendgroup=model,
                    marker={
                        "color": qualitative.Plotly[mi % len(qualitative.Plotly)],
                        "symbol": _SYMBOLS[pi % len(_SYMBOLS)],
                        "size": 8,
                    },
                    customdata=np.stack([s["pooling"].astype(str), s["layer"], depth], axis=1),
                    hovertemplate="%{fullData.name}<br>pooling %{customdata[0]} · layer %{customdata[1]}"
                    " (depth %{customdata[2]:.2f})<br>%{x:.3g} FLOPs/token<br>%{y:.4f}<extra></extra>",
                )
            )
    fig.update_xaxes(type="log", title_text=_LABELS.get(cost, cost))
    fig.update_yaxes(title_text=_LABELS.get(metric, metric))
    fig.update_layout(title=f"{_LABELS.get(metric, metric)} against compute, by model — {eval_set}")
    return fig


def metric_by_depth(
    df: pd.DataFrame, eval_set: str, metric: str = "auroc", probe: str | None = None
) -> go.Figure:
    """``metric`` against normalized depth on one eval set: a line per model (colour) and pooling (dash),
    for one probe family (default: the first per-layer one)."""
    sub = _rows(df, eval_set, metric, "metric_by_depth")
    if "depth" not in sub.columns:
        raise ValueError("metric_by_depth: the results have no 'depth' column (rerun the sweep)")
    sub = sub[pd.to_numeric(sub["depth"], errors="coerce").notna()]
    if sub.empty:
        raise ValueError("metric_by_depth: no rows read a single layer")
    probe = probe or str(sub["probe"].iloc[0])
    sub = sub[sub["probe"] == probe]
    dashes = ["solid", "dash", "dot", "dashdot", "longdash"]
    fig = go.Figure()
    for mi, model in enumerate(dict.fromkeys(sub["model"].astype(str))):
        for pi, pooling in enumerate(dict.fromkeys(sub["pooling"].astype(str))):
            s = sub[(sub["model"].astype(str) == model) & (sub["pooling"].astype(str) == pooling)]
            s = s.sort_values("depth")
            fig.add_trace(
                go.Scatter(
                    x=s["depth"],
                    y=s[metric],
                    mode="lines+markers",
                    name=f"{model} · {pooling}",
                    line={"color": qualitative.Plotly[mi % len(qualitative.Plotly)], "dash": dashes[pi % 5]},
                    customdata=s["layer"],
                    hovertemplate="%{fullData.name}<br>depth %{x:.2f} (layer %{customdata})<br>%{y:.4f}"
                    "<extra></extra>",
                )
            )
    fig.update_xaxes(title_text="normalized depth (layer / model layers)", range=[-0.02, 1.02])
    fig.update_yaxes(title_text=_LABELS.get(metric, metric))
    fig.update_layout(title=f"{_LABELS.get(metric, metric)} by depth, {probe} — {eval_set}")
    return fig
