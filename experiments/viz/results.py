"""Figures for a sweep's results table (``results.parquet``).

Every figure is a plotly ``go.Figure``; :func:`save_figure` writes it as a self-contained HTML page (plotly.js
inline, so it opens offline) and, where kaleido and a browser are installed, as a PNG.

The results table has one row per run × eval set. The functions here read these columns (others are ignored):

- ``probe``, ``pooling``, ``hook``, ``layer`` (int; ``-1`` or NaN for multi-layer / non-layer probes), ``C``,
  ``eval_set``, ``run_id``, optional ``model`` and ``seed``;
- a metric column (``auroc``, ``tpr_at_1pct_fpr``, ...) with optional ``<metric>_lo`` / ``<metric>_hi``
  confidence bounds;
- a cost column (``flops_per_token``, ``overhead_pct``, ``standalone_*``) for the cost frontier.

Where several rows share a plotted point (several C values, several seeds, several probes of a heatmap cell),
the point shows the row chosen on *validation* (:mod:`experiments.analysis.selection`), never the best test
metric; the hover text names the C and run that were chosen. Points of every probe family are drawn, per-token
and pooled alike (a row's cost is read from its own cost column).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from experiments.analysis.frontier import pareto_front
from experiments.analysis.selection import pick
from experiments.sweep.results import RESULTS, has_results, read_results
from experiments.viz.save import write_html, write_pngs

logger = logging.getLogger(__name__)

__all__ = [
    "auroc_by_layer",
    "cost_frontier",
    "layer_pooling_heatmap",
    "load_results",
    "plot_results",
    "roc_curves",
]

METRIC_LABELS: dict[str, str] = {
    "auroc": "AUROC",
    "auprc": "AUPRC",
    "log_auroc": "log-space AUROC (FPR 1e-3 to 1e-1)",
    "tpr_at_1pct_fpr": "TPR at 1% FPR",
    "tpr_at_0.1pct_fpr": "TPR at 0.1% FPR",
}
COST_LABELS: dict[str, str] = {
    "flops_per_token": "FLOPs per token (probe read-out)",
    "overhead_pct": "Overhead (% of the policy model's forward pass)",
    "standalone_flops_per_token": "FLOPs per token (standalone)",
    "standalone_overhead_pct": "Overhead, standalone (% of the policy model's forward pass)",
}
_COLOURS: list[str] = list(qualitative.Plotly) + list(qualitative.D3) + list(qualitative.Dark24)
# reference lines (probes without a layer) get their own colours, distinct from the pooling palette
_REF_COLOURS: list[str] = ["#222222", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#9467bd", "#17becf"]
_DASHES: list[str] = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]
_SYMBOLS: list[str] = [
    "circle",
    "square",
    "diamond",
    "triangle-up",
    "cross",
    "x",
    "star",
    "hexagon",
    "triangle-down",
    "pentagon",
]
_BASE_KEYS: tuple[str, ...] = ("probe", "variant", "pooling", "hook", "model", "escalation_rate")
_NO_LAYER = -1


def _label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


def _check(df: pd.DataFrame, required: Iterable[str], what: str) -> None:
    """Raise ``ValueError`` for an empty table or one that lacks a required column."""
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"{what}: expected a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: results table is missing required column(s) {missing}")
    if df.empty:
        raise ValueError(f"{what}: results table is empty (no rows to plot)")


def _layer_key(layer: pd.Series) -> pd.Series:
    """Layer as an int key: ``-1`` for multi-layer / non-layer rows (NaN or negative)."""
    values = pd.to_numeric(layer, errors="coerce")
    return values.where(values >= 0, _NO_LAYER).fillna(_NO_LAYER).astype(int)


def _select_eval_set(df: pd.DataFrame, eval_set: str | None, what: str) -> tuple[pd.DataFrame, str]:
    sets = sorted(df["eval_set"].dropna().astype(str).unique())
    if eval_set is None:
        if len(sets) != 1:
            raise ValueError(f"{what}: the table has several eval sets {sets}; pass eval_set=")
        eval_set = sets[0]
    out = df[df["eval_set"].astype(str) == eval_set]
    if out.empty:
        raise ValueError(f"{what}: no rows for eval_set={eval_set!r}; the table has {sets}")
    return out, eval_set


def _varying_keys(df: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    """The keys among ``keys`` present in ``df`` (``probe`` and ``pooling`` always; others if they vary)."""
    out = []
    for k in keys:
        if k not in df.columns:
            continue
        if k in ("probe", "pooling") or df[k].nunique(dropna=False) > 1:
            out.append(k)
    return out


def _best_over_c(df: pd.DataFrame, keys: Sequence[str], metric: str) -> pd.DataFrame:
    """One row per ``keys``: the row chosen on *validation* (:func:`experiments.analysis.selection.pick`: the
    primary validation metric, its tie-breakers, then cost), never on the plotted test metric.

    Columns: ``keys``, ``metric``, ``lo``, ``hi`` (NaN where the table has no bounds), ``C``, ``run_id``,
    ``n_seeds`` (how many rows -- C values, seeds -- competed for the point), plus every other column of the
    chosen row. Rows whose ``metric`` is undefined are left out.
    """
    df = df[pd.to_numeric(df[metric], errors="coerce").notna()].copy()
    if df.empty:
        raise ValueError(f"no rows with a finite {metric!r}")
    df[metric] = pd.to_numeric(df[metric])
    if "C" not in df.columns:
        df["C"] = np.nan
    lo, hi = f"{metric}_lo", f"{metric}_hi"
    df["lo"] = pd.to_numeric(df[lo], errors="coerce") if lo in df.columns else np.nan
    df["hi"] = pd.to_numeric(df[hi], errors="coerce") if hi in df.columns else np.nan
    best = pick(df, list(keys))
    return best.rename(columns={"n_rows": "n_seeds"})


def _error_y(best: pd.DataFrame, metric: str) -> dict | None:
    if best["lo"].isna().all() and best["hi"].isna().all():
        return None
    y = best[metric].to_numpy(float)
    plus = np.clip(best["hi"].to_numpy(float) - y, 0, None)
    minus = np.clip(y - best["lo"].to_numpy(float), 0, None)
    return {
        "type": "data",
        "symmetric": False,
        "array": plus,
        "arrayminus": minus,
        "thickness": 1,
        "width": 3,
    }


def _custom_columns(best: pd.DataFrame) -> np.ndarray:
    """Hover columns: C, number of seeds, run id, confidence-interval text."""
    ci = [
        "" if np.isnan(lo) or np.isnan(hi) else f" [{lo:.4f}, {hi:.4f}]"
        for lo, hi in zip(best["lo"].to_numpy(float), best["hi"].to_numpy(float), strict=True)
    ]
    run = best["run_id"].astype(str) if "run_id" in best else pd.Series([""] * len(best), index=best.index)
    return np.stack([best["C"].map(_fmt_c), best["n_seeds"], run, ci], axis=1)


def _series_name(row: Mapping[str, Any] | pd.Series, keys: Sequence[str]) -> str:
    return " · ".join(str(row[k]) for k in keys)


def _fmt_c(c: object) -> str:
    try:
        value = float(c)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(c)
    return "–" if math.isnan(value) else f"{value:g}"


# --------------------------------------------------------------------------------------------------------
# metric by layer


def auroc_by_layer(
    df: pd.DataFrame, metric: str = "auroc", eval_set: str | None = None, error_bars: bool | None = None
) -> go.Figure:
    """Metric against layer: one line per pooling (colour) and probe kind (dash).

    One subplot column per eval set when ``eval_set`` is None. Error bars come from ``<metric>_lo`` /
    ``<metric>_hi`` where present. Rows without a layer (multi-layer probes, ``layer`` NaN or -1) are drawn
    as dotted horizontal reference lines across the layer range. Several C values or seeds: the row chosen
    on validation. Several hooks or models: one line each. ``error_bars=None`` draws them only when a facet
    has
    at most 8 lines (otherwise the bounds are in the hover text only).
    """
    what = "auroc_by_layer"
    _check(df, ["probe", "pooling", "layer", "eval_set", metric], what)
    if eval_set is not None:
        df, _ = _select_eval_set(df, eval_set, what)
    # eval sets where the metric is undefined (e.g. AUROC on a benign-only over-refusal set) get no facet
    has_metric = df.groupby(df["eval_set"].astype(str))[metric].transform(lambda v: v.notna().any())
    df = df[has_metric.astype(bool)]
    if len(df) == 0:
        raise ValueError(f"{what}: {metric} is undefined (NaN) on every eval set")
    df = df.assign(_layer=_layer_key(df["layer"]))
    if not (df["_layer"] >= 0).any():
        raise ValueError(f"{what}: no rows with a layer (all rows are multi-layer or non-layer probes)")
    keys = _varying_keys(df[df["_layer"] >= 0], _BASE_KEYS)
    eval_sets = sorted(df["eval_set"].astype(str).unique())
    best = _best_over_c(df.assign(eval_set=df["eval_set"].astype(str)), [*keys, "eval_set", "_layer"], metric)

    poolings = sorted(best["pooling"].astype(str).unique())
    probes = sorted(best["probe"].astype(str).unique())
    colour = {p: _COLOURS[i % len(_COLOURS)] for i, p in enumerate(poolings)}
    dash = {p: _DASHES[i % len(_DASHES)] for i, p in enumerate(probes)}
    layers = best.loc[best["_layer"] >= 0, "_layer"]
    x_span = [int(layers.min()), int(layers.max())]
    refs = best.loc[best["_layer"] < 0, keys].drop_duplicates().apply(lambda r: _series_name(r, keys), axis=1)
    ref_colour = {r: _REF_COLOURS[i % len(_REF_COLOURS)] for i, r in enumerate(sorted(refs))}

    fig = make_subplots(
        rows=1,
        cols=len(eval_sets),
        shared_yaxes=True,
        subplot_titles=eval_sets if len(eval_sets) > 1 else None,
        horizontal_spacing=0.04 if len(eval_sets) > 1 else 0.0,
    )
    shown: set[str] = set()
    style = _LayerStyle(keys, metric, colour, dash, ref_colour, x_span)
    for col, es in enumerate(eval_sets, start=1):
        sub = best[best["eval_set"] == es]
        n_lines = sub[sub["_layer"] >= 0].groupby(keys, dropna=False).ngroups
        bars = error_bars if error_bars is not None else n_lines <= 8
        for _, series in sub.groupby(keys, sort=True, dropna=False):
            _add_layer_series(fig, series.sort_values("_layer"), col, style, bars, shown)
        fig.update_xaxes(title_text="layer", row=1, col=col)
    fig.update_yaxes(title_text=_label(metric), row=1, col=1)
    title = f"{_label(metric)} by layer" + (f" — {eval_sets[0]}" if len(eval_sets) == 1 else "")
    fig.update_layout(
        title=title,
        template="plotly_white",
        hovermode="closest",
        width=max(700, 420 * len(eval_sets) + 260),
        height=max(520, 21 * len(shown) + 200),
        legend={"title": {"text": " · ".join(keys)}, "tracegroupgap": 2},
    )
    return fig


@dataclasses.dataclass(frozen=True)
class _LayerStyle:
    """What :func:`auroc_by_layer` draws every series with."""

    keys: list[str]
    metric: str
    colour: Mapping[str, str]  # pooling -> colour
    dash: Mapping[str, str]  # probe -> dash
    ref_colour: Mapping[str, str]  # series without a layer -> colour
    x_span: list[int]


def _add_layer_series(
    fig: go.Figure, series: pd.DataFrame, col: int, st: _LayerStyle, bars: bool, shown: set[str]
) -> None:
    """One series of :func:`auroc_by_layer` in facet ``col``: its per-layer line, and a dotted reference line
    across the layer range for its rows without a single layer. ``shown``: legend entries already drawn."""
    metric = st.metric
    head = series.iloc[0]
    name = _series_name(head, st.keys)
    per_layer = series[series["_layer"] >= 0]
    no_layer = series[series["_layer"] < 0]
    if not per_layer.empty:
        hover = (
            "%{fullData.name}<br>layer %{x}<br>" + _label(metric) + " %{y:.4f}%{customdata[3]}"
            "<br>C %{customdata[0]}<br>seeds %{customdata[1]}<br>run %{customdata[2]}<extra></extra>"
        )
        fig.add_trace(
            go.Scatter(
                x=per_layer["_layer"],
                y=per_layer[metric],
                mode="lines+markers",
                name=name,
                legendgroup=name,
                showlegend=name not in shown,
                line={
                    "color": st.colour[str(head["pooling"])],
                    "dash": st.dash[str(head["probe"])],
                    "width": 2,
                },
                marker={"size": 5},
                error_y=_error_y(per_layer, metric) if bars else None,
                customdata=_custom_columns(per_layer),
                hovertemplate=hover,
            ),
            row=1,
            col=col,
        )
        shown.add(name)
    if not no_layer.empty:
        value = float(no_layer[metric].iloc[0])
        ref = f"{name} (no single layer)"
        fig.add_trace(
            go.Scatter(
                x=st.x_span,
                y=[value, value],
                mode="lines",
                name=ref,
                legendgroup=ref,
                showlegend=ref not in shown,
                line={"color": st.ref_colour[name], "dash": "dot", "width": 1.5},
                hovertemplate=f"{ref}<br>{_label(metric)} {value:.4f}"
                f"<br>C {_fmt_c(no_layer['C'].iloc[0])}<extra></extra>",
            ),
            row=1,
            col=col,
        )
        shown.add(ref)


# --------------------------------------------------------------------------------------------------------
# layer × pooling heatmap


def layer_pooling_heatmap(
    df: pd.DataFrame, metric: str = "auroc", eval_set: str | None = None, probe: str | None = None
) -> go.Figure:
    """Layer × pooling heatmap of the metric of the run chosen on validation in each cell (over C, seeds, and
    probe kinds when ``probe`` is None).

    ``eval_set`` may be omitted only when the table has one eval set. Cells are annotated with their value;
    the hover names the probe, C and run behind each cell. Rows without a layer are left out.
    """
    what = "layer_pooling_heatmap"
    _check(df, ["probe", "pooling", "layer", "eval_set", metric], what)
    df, eval_set = _select_eval_set(df, eval_set, what)
    if probe is not None:
        kinds = sorted(df["probe"].astype(str).unique())
        df = df[df["probe"].astype(str) == probe]
        if df.empty:
            raise ValueError(f"{what}: no rows for probe={probe!r}; the table has {kinds}")
    df = df.assign(_layer=_layer_key(df["layer"]))
    df = df[df["_layer"] >= 0]
    if df.empty:
        raise ValueError(f"{what}: no rows with a layer for eval_set={eval_set!r}")
    cells = _best_over_c(df, ["pooling", "_layer"], metric)  # the probe of each cell: chosen on validation
    poolings = sorted(cells["pooling"].astype(str).unique())
    layers = sorted(cells["_layer"].unique())
    grid = cells.assign(pooling=cells["pooling"].astype(str)).set_index(["_layer", "pooling"])
    full = pd.MultiIndex.from_product([layers, poolings], names=["_layer", "pooling"])
    grid = grid.reindex(full)
    z = grid[metric].to_numpy(float).reshape(len(layers), len(poolings))
    custom = np.stack(
        [
            grid["probe"].astype(object).fillna("").to_numpy().reshape(z.shape),
            grid["C"].map(_fmt_c).to_numpy().reshape(z.shape),
            grid["run_id"].astype(object).fillna("").to_numpy().reshape(z.shape)
            if "run_id" in grid
            else np.full(z.shape, ""),
        ],
        axis=-1,
    )
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=poolings,
            y=[str(v) for v in layers],
            colorscale="Viridis",
            colorbar={"title": {"text": _label(metric)}},
            text=np.where(np.isnan(z), "", np.vectorize(lambda v: f"{v:.3f}")(np.nan_to_num(z))),
            texttemplate="%{text}",
            textfont={"size": 10},
            customdata=custom,
            hoverongaps=False,
            hovertemplate="layer %{y}, pooling %{x}<br>" + _label(metric) + " %{z:.4f}"
            "<br>probe %{customdata[0]}, C %{customdata[1]}<br>run %{customdata[2]}<extra></extra>",
        )
    )
    which = probe if probe is not None else "best probe per cell"
    fig.update_layout(
        title=f"{_label(metric)}, chosen on validation — {eval_set} ({which})",
        template="plotly_white",
        width=max(520, 110 * len(poolings) + 300),
        height=max(420, 24 * len(layers) + 180),
    )
    fig.update_xaxes(title_text="pooling", type="category", side="bottom")
    fig.update_yaxes(title_text="layer", type="category", autorange=True)
    return fig


# --------------------------------------------------------------------------------------------------------
# cost frontier


def cost_frontier(
    df: pd.DataFrame,
    metric: str = "auroc",
    cost: str = "flops_per_token",
    eval_set: str | None = None,
    cost_floor: float | None = None,
    error_bars: bool | None = None,
) -> go.Figure:
    """Metric against cost per token (log x): one point per probe kind × layer × pooling (× hook, model).

    Colour is the probe kind, symbol the pooling; the hover shows layer, C and run. The Pareto front (lower
    cost, higher metric) is drawn as a step line. Costs that are zero, negative or below ``cost_floor`` are
    clipped to the floor (default: a tenth of the smallest positive cost) so the log axis holds, and the
    hover says so. Rows with a NaN cost are left out (with a logged warning). ``error_bars=None`` draws the
    ``<metric>_lo/_hi`` bars only when there are at most 40 points.
    """
    what = "cost_frontier"
    _check(df, ["probe", "pooling", "layer", "eval_set", metric, cost], what)
    df, eval_set = _select_eval_set(df, eval_set, what)
    best, floor, n_clipped = _frontier_points(df, metric, cost, cost_floor, f"{what} (eval_set={eval_set!r})")
    probes = sorted(best["probe"].astype(str).unique())
    poolings = sorted(best["pooling"].astype(str).unique())
    colour = {p: _COLOURS[i % len(_COLOURS)] for i, p in enumerate(probes)}
    symbol = {p: _SYMBOLS[i % len(_SYMBOLS)] for i, p in enumerate(poolings)}
    bars = error_bars if error_bars is not None else len(best) <= 40
    fig = go.Figure()
    for i, p in enumerate(probes):
        _add_probe_points(
            fig, best[best["probe"].astype(str) == p], p, i == 0, metric, cost, colour, symbol, bars
        )
    for s in poolings:  # legend entries for the symbols
        fig.add_trace(
            go.Scatter(
                x=[None],
                y=[None],
                mode="markers",
                name=s,
                legendgroup="pooling",
                legendgrouptitle={"text": "pooling (symbol)"},
                marker={"color": "#555", "symbol": symbol[s], "size": 9},
                hoverinfo="skip",
                meta={"role": "symbol-legend"},
            )
        )
    front = pareto_front(best, x="_cost", y=metric)
    fig.add_trace(
        go.Scatter(
            x=front["_cost"],
            y=front[metric],
            mode="lines",
            line={"shape": "hv", "color": "black", "width": 1.5},
            name="Pareto front",
            legendgroup="front",
            hoverinfo="skip",
            meta={"role": "pareto"},
        )
    )
    title = f"{_label(metric)} vs cost — {eval_set}"
    if n_clipped:
        title += f" ({n_clipped} cost(s) clipped to the floor {floor:.3g} for the log axis)"
    fig.update_layout(
        title=title,
        template="plotly_white",
        width=1000,
        height=max(600, 21 * (len(probes) + len(poolings)) + 220),
        hovermode="closest",
        legend={"tracegroupgap": 0},
    )
    fig.update_xaxes(type="log", title_text=COST_LABELS.get(cost, cost), exponentformat="power")
    fig.update_yaxes(title_text=_label(metric))
    return fig


def _frontier_points(
    df: pd.DataFrame, metric: str, cost: str, cost_floor: float | None, what: str
) -> tuple[pd.DataFrame, float, int]:
    """The val-chosen point per probe × layer × pooling (× the other varying keys) with ``_cost`` clipped to
    the floor for the log axis (``_raw_cost`` kept, ``_note`` saying so), ``_layer_text``; the floor and how
    many points were clipped. NaN costs are left out with a warning."""
    df = df.assign(_layer=_layer_key(df["layer"]), _cost=pd.to_numeric(df[cost], errors="coerce"))
    n_nan = int(df["_cost"].isna().sum())
    if n_nan:
        logger.warning("%s: %d row(s) with NaN %s left out", what, n_nan, cost)
        df = df[df["_cost"].notna()]
    if df.empty:
        raise ValueError(f"{what}: no rows with a finite {cost!r}")
    best = _best_over_c(df, [*_varying_keys(df, _BASE_KEYS), "_layer"], metric)
    positive = best.loc[best["_cost"] > 0, "_cost"]
    floor = cost_floor if cost_floor is not None else (float(positive.min()) / 10 if len(positive) else 1.0)
    clipped = best["_cost"] < floor
    best["_raw_cost"] = best["_cost"]
    best["_cost"] = best["_cost"].clip(lower=floor)
    best["_note"] = np.where(
        clipped, [f"<br>cost {c:g} clipped to {floor:.3g} for the log axis" for c in best["_raw_cost"]], ""
    )
    best["_layer_text"] = np.where(best["_layer"] >= 0, best["_layer"].astype(str), "all / none")
    return best, floor, int(clipped.sum())


def _add_probe_points(
    fig: go.Figure,
    sub: pd.DataFrame,
    p: str,
    first: bool,
    metric: str,
    cost: str,
    colour: Mapping[str, str],
    symbol: Mapping[str, str],
    bars: bool,
) -> None:
    """One probe kind's points (colour = kind, symbol = pooling, hover with layer, C, run and cost) and its
    legend entry (a plain circle; clicking it toggles the kind's points)."""
    hover = (
        "<b>%{customdata[0]}</b> · %{customdata[1]}<br>layer %{customdata[2]}, C %{customdata[3]}"
        "<br>" + _label(metric) + " %{y:.4f}<br>" + cost + " %{customdata[5]}%{customdata[6]}"
        "<br>run %{customdata[4]}<extra></extra>"
    )
    name = sub["probe"].astype(str)
    if "variant" in sub:
        name = name + sub["variant"].fillna("").astype(str).map(lambda v: f" ({v})" if v else "")
    custom = np.stack(
        [
            name,
            sub["pooling"].astype(str),
            sub["_layer_text"],
            sub["C"].map(_fmt_c),
            sub["run_id"].astype(str) if "run_id" in sub else np.full(len(sub), ""),
            sub["_raw_cost"].map(lambda c: f"{c:.4g}"),
            sub["_note"],
        ],
        axis=1,
    )
    fig.add_trace(
        go.Scatter(
            x=sub["_cost"],
            y=sub[metric],
            mode="markers",
            name=p,
            legendgroup=f"probe:{p}",
            showlegend=False,
            marker={
                "color": colour[p],
                "symbol": [symbol[str(s)] for s in sub["pooling"]],
                "size": 9,
                "opacity": 0.85,
                "line": {"width": 0.5, "color": "white"},
            },
            error_y=_error_y(sub, metric) if bars else None,
            customdata=custom,
            hovertemplate=hover,
            meta={"role": "points"},
        )
    )
    fig.add_trace(
        go.Scatter(
            x=[None],
            y=[None],
            mode="markers",
            name=p,
            legendgroup=f"probe:{p}",
            legendgrouptitle={"text": "probe (colour)"} if first else None,
            marker={"color": colour[p], "symbol": "circle", "size": 9},
            hoverinfo="skip",
            meta={"role": "colour-legend"},
        )
    )


# --------------------------------------------------------------------------------------------------------
# ROC curves


def roc_curves(
    curves: Mapping[str, tuple[Sequence[float] | np.ndarray, Sequence[float] | np.ndarray]],
    log_fpr: bool = True,
    fpr_min: float = 1e-4,
    title: str = "ROC curves",
) -> go.Figure:
    """ROC curves, one trace per entry of ``curves`` (name → (fpr, tpr)), plus a chance line.

    With ``log_fpr`` the x axis is logarithmic from ``fpr_min`` to 1: each curve starts at ``fpr_min`` with
    the TPR linearly interpolated there, and its points at lower FPR (including 0) are left out. Dashed
    vertical lines mark FPR = 1% and 0.1%.
    """
    if not curves:
        raise ValueError("roc_curves: no curves given")
    fig = go.Figure()
    for i, (name, (fpr, tpr)) in enumerate(curves.items()):
        f, t = np.asarray(fpr, float).ravel(), np.asarray(tpr, float).ravel()
        if f.shape != t.shape or f.size == 0:
            raise ValueError(
                f"roc_curves: curve {name!r} has fpr of length {f.size} and tpr of length {t.size}"
            )
        order = np.lexsort((t, f))
        f, t = f[order], t[order]
        if log_fpr and (f < fpr_min).any():
            t_at_min = float(np.interp(fpr_min, f, t)) if (f >= fpr_min).any() else float(t[-1])
            keep = f > fpr_min
            f = np.concatenate([[fpr_min], f[keep]])
            t = np.concatenate([[t_at_min], t[keep]])
        fig.add_trace(
            go.Scatter(
                x=f,
                y=t,
                mode="lines",
                name=str(name),
                line={"color": _COLOURS[i % len(_COLOURS)], "width": 2},
                hovertemplate=f"{name}<br>FPR %{{x:.2e}}<br>TPR %{{y:.4f}}<extra></extra>",
            )
        )
    chance = np.logspace(math.log10(fpr_min), 0, 200) if log_fpr else np.array([0.0, 1.0])
    fig.add_trace(
        go.Scatter(
            x=chance,
            y=chance,
            mode="lines",
            name="chance",
            line={"color": "#999", "dash": "dot", "width": 1},
            hoverinfo="skip",
        )
    )
    for fpr_mark, text in ((1e-2, "FPR 1%"), (1e-3, "FPR 0.1%")):
        # a shape takes data coordinates on a log axis, an annotation takes log10 of them
        fig.add_shape(
            type="line",
            x0=fpr_mark,
            x1=fpr_mark,
            y0=0,
            y1=1,
            xref="x",
            yref="paper",
            line={"color": "#d62728", "dash": "dash", "width": 1},
        )
        fig.add_annotation(
            x=math.log10(fpr_mark) if log_fpr else fpr_mark,
            y=1,
            xref="x",
            yref="paper",
            text=text,
            showarrow=False,
            xanchor="right",
            yanchor="top",
            font={"size": 12, "color": "#d62728"},
        )
    fig.update_layout(title=title, template="plotly_white", width=800, height=560, hovermode="closest")
    if log_fpr:
        fig.update_xaxes(
            type="log",
            range=[math.log10(fpr_min), 0],
            title_text="false positive rate (log)",
            exponentformat="power",
        )
    else:
        fig.update_xaxes(range=[0, 1], title_text="false positive rate")
    fig.update_yaxes(range=[0, 1.02], title_text="true positive rate")
    return fig


# --------------------------------------------------------------------------------------------------------
# all standard figures


def load_results(results: str | Path | pd.DataFrame) -> pd.DataFrame:
    """A results table from a DataFrame, a parquet file, or a sweep folder (``results.parquet`` and the
    parts appended since it was consolidated: :func:`experiments.sweep.results.read_results`)."""
    if isinstance(results, pd.DataFrame):
        return results
    p = Path(results)
    if p.name == RESULTS and not p.is_dir():
        p = p.parent  # the folder's table: results.parquet and the parts appended since
    if p.is_dir():
        if not has_results(p):
            raise FileNotFoundError(f"no results table at {p / RESULTS}")
        return read_results(p)
    if not p.exists():
        raise FileNotFoundError(f"no results table at {p}")
    return pd.read_parquet(p)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "x"


def plot_results(
    results_dir_or_df: str | Path | pd.DataFrame,
    out_dir: str | Path,
    png: bool = True,
    metrics: Sequence[str] = ("auroc", "tpr_at_1pct_fpr"),
) -> list[Path]:
    """Write every standard figure for a results table into ``out_dir/plots/``; return the paths written.

    Figures (each for every metric in ``metrics`` that the table has):
    ``<metric>_by_layer`` (one facet per eval set), and per eval set ``heatmap_<metric>_<eval_set>``
    (layer × pooling) and ``frontier_<metric>_<cost>_<eval_set>`` (for ``flops_per_token`` and
    ``overhead_pct`` where present). Figures the table cannot support (no per-layer rows, no cost column)
    are skipped with a log message. PNGs are written in one kaleido session when it works.
    """
    df = load_results(results_dir_or_df)
    _check(df, ["probe", "pooling", "layer", "eval_set"], "plot_results")
    plots = Path(out_dir) / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    figs: list[tuple[go.Figure, Path]] = []

    def attempt(name: str, make: object) -> None:
        try:
            fig = make()  # type: ignore[operator]
        except ValueError as exc:
            logger.info("plot_results: skipping %s: %s", name, exc)
            return
        figs.append((fig, plots / _slug(name)))

    has_layers = bool((_layer_key(df["layer"]) >= 0).any())
    eval_sets = sorted(df["eval_set"].dropna().astype(str).unique())
    for metric in metrics:
        if metric not in df.columns or pd.to_numeric(df[metric], errors="coerce").isna().all():
            continue
        if has_layers:
            attempt(f"{metric}_by_layer", lambda m=metric: auroc_by_layer(df, metric=m))
        for es in eval_sets:
            if has_layers:
                attempt(f"heatmap_{metric}_{es}", lambda m=metric, e=es: layer_pooling_heatmap(df, m, e))
            for cost in ("flops_per_token", "overhead_pct", "standalone_overhead_pct"):
                if cost in df.columns:
                    attempt(
                        f"frontier_{metric}_{cost}_{es}",
                        lambda m=metric, c=cost, e=es: cost_frontier(df, m, c, e),
                    )
    if "model" in df.columns and df["model"].nunique() > 1:  # a model axis: every model on one plot
        from experiments.viz.models import metric_by_depth, metric_vs_flops

        for es in eval_sets:
            attempt(f"models_auroc_vs_flops_{es}", lambda e=es: metric_vs_flops(df, e))
            attempt(f"models_auroc_by_depth_{es}", lambda e=es: metric_by_depth(df, e))
    if not figs:
        raise ValueError("plot_results: the table supports none of the standard figures")
    written = [write_html(fig, base) for fig, base in figs]
    if png:
        pngs = [base.with_name(base.name + ".png") for _, base in figs]
        if write_pngs([f for f, _ in figs], pngs):
            written += pngs
    return written
