"""Figures of an attack campaign (``OUT/attack.parquet``, ``OUT/transfer.parquet``): the transfer heatmap,
TPR under attack by adversarial-training round, and the robustness frontier (TPR at 1% FPR under the
strongest attack against scoring FLOPs per token, with its Pareto front, beside the clean frontier)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from experiments.analysis.frontier import pareto_front
from experiments.viz.save import save_figure

__all__ = [
    "attack_figures",
    "build_attack_report",
    "robustness_frontier",
    "robustness_points",
    "rounds_figure",
    "transfer_heatmap",
    "write_attack_figures",
]

ADAPTIVE = ("embedding", "suffix")


def transfer_heatmap(tab: pd.DataFrame) -> go.Figure:
    """TPR under attack of every target probe (columns) for suffixes optimized against each source probe
    (rows), one panel per attack method; the diagonal is the attack itself."""
    methods = list(dict.fromkeys(tab["method"]))
    fig = make_subplots(rows=1, cols=len(methods), subplot_titles=methods, horizontal_spacing=0.12)
    for i, m in enumerate(methods, 1):
        t = tab[tab["method"] == m].pivot(index="source_probe", columns="target_probe", values="tpr_attacked")
        fig.add_trace(
            go.Heatmap(
                z=t.to_numpy(),
                x=list(t.columns),
                y=list(t.index),
                zmin=0,
                zmax=1,
                colorscale="RdYlGn",
                text=t.round(2).to_numpy(),
                texttemplate="%{text}",
                showscale=i == len(methods),
                colorbar={"title": "TPR"},
            ),
            row=1,
            col=i,
        )
        fig.update_xaxes(title_text="scored by", row=1, col=i)
    fig.update_yaxes(title_text="suffix optimized against", row=1, col=1)
    fig.update_layout(
        title="Transfer: TPR at each probe's clean 1%-FPR threshold", width=500 * len(methods), height=520
    )
    return fig


def rounds_figure(df: pd.DataFrame) -> go.Figure:
    """``tpr_attacked`` by adversarial-training round per probe, one panel per adaptive attack."""
    d = df[df["attack"].isin(ADAPTIVE)]
    methods = [m for m in ADAPTIVE if m in set(d["attack"])] or ["embedding"]
    fig = make_subplots(rows=1, cols=len(methods), subplot_titles=methods, shared_yaxes=True)
    for i, m in enumerate(methods, 1):
        for probe, g in d[d["attack"] == m].groupby("probe", sort=False):
            g = g.sort_values("round")
            fig.add_trace(
                go.Scatter(
                    x=g["round"],
                    y=g["tpr_attacked"],
                    mode="lines+markers",
                    name=str(probe),
                    legendgroup=str(probe),
                    showlegend=i == 1,
                ),
                row=1,
                col=i,
            )
        fig.update_xaxes(title_text="adversarial-training round", dtick=1, row=1, col=i)
    fig.update_yaxes(
        title_text="TPR under attack (clean 1%-FPR threshold)", range=[-0.02, 1.02], row=1, col=1
    )
    fig.update_layout(
        title="TPR under attack by adversarial-training round", width=450 * len(methods), height=450
    )
    return fig


def robustness_points(df: pd.DataFrame, rnd: int | None = None) -> pd.DataFrame:
    """Per probe (at ``rnd``, default the last round each probe reached): scoring FLOPs per token, clean TPR
    and the TPR under the strongest adaptive attack (the minimum over attacks)."""
    d = df[df["attack"].isin(ADAPTIVE) & df["probe_flops_per_token"].notna()]
    if d.empty:
        return pd.DataFrame(
            columns=["probe", "family", "round", "flops_per_token", "tpr_clean", "tpr_attacked"]
        )
    if rnd is None:
        d = d[d["round"] == d.groupby("probe")["round"].transform("max")]
    else:
        d = d[d["round"] == rnd]
    g = d.groupby(["probe", "family", "round"], sort=False)
    return g.agg(
        flops_per_token=("probe_flops_per_token", "first"),
        tpr_clean=("tpr_clean", "first"),
        tpr_attacked=("tpr_attacked", "min"),
    ).reset_index()


def robustness_frontier(df: pd.DataFrame) -> go.Figure:
    """TPR at 1% FPR under attack (round 0 and the last round) and clean, against FLOPs per token, with the
    Pareto fronts."""
    fig = go.Figure()
    series = [("clean", robustness_points(df, 0), "tpr_clean", "circle")]
    series.append(("under attack (round 0)", robustness_points(df, 0), "tpr_attacked", "x"))
    last = int(df["round"].max()) if len(df) else 0
    if last > 0:
        series.append(
            (f"under attack (after round {last})", robustness_points(df), "tpr_attacked", "diamond")
        )
    for name, pts, col, sym in series:
        if pts.empty:
            continue
        fig.add_trace(
            go.Scatter(
                x=pts["flops_per_token"],
                y=pts[col],
                mode="markers+text",
                text=pts["probe"],
                textposition="top center",
                marker={"symbol": sym, "size": 10},
                name=name,
            )
        )
        front = pareto_front(pts, x="flops_per_token", y=col)
        fig.add_trace(
            go.Scatter(
                x=front["flops_per_token"],
                y=front[col],
                mode="lines",
                line={"dash": "dot"},
                name=f"Pareto front, {name}",
            )
        )
    fig.update_xaxes(title_text="scoring FLOPs per token", type="log")
    fig.update_yaxes(title_text="TPR at the clean 1%-FPR threshold", range=[-0.02, 1.05])
    fig.update_layout(
        title="Robustness frontier: detection under adaptive attack vs compute", width=900, height=550
    )
    return fig


def attack_figures(out: str | Path) -> dict[str, go.Figure]:
    """Every figure a campaign folder supports (missing inputs: the figure is left out)."""
    out = Path(out)
    figs: dict[str, go.Figure] = {}
    if (out / "attack.parquet").is_file():
        df = pd.read_parquet(out / "attack.parquet")
        if not df.empty:
            figs["attack_rounds"] = rounds_figure(df)
            figs["robustness_frontier"] = robustness_frontier(df)
    if (out / "transfer.parquet").is_file():
        tab = pd.read_parquet(out / "transfer.parquet")
        if not tab.empty:
            figs["transfer_heatmap"] = transfer_heatmap(tab)
    return figs


def write_attack_figures(out: str | Path, png: bool = False) -> list[Path]:
    """Write :func:`attack_figures` to ``OUT/plots/`` (HTML, and PNG when asked and kaleido works)."""
    paths: list[Path] = []
    for name, fig in attack_figures(out).items():
        paths += save_figure(fig, Path(out) / "plots" / name, png=png)
    return paths


def build_attack_report(out_dir: str | Path, out: str | Path | None = None) -> Path:
    """One self-contained HTML page of an attack campaign (default ``DIR/report.html``): the attack table,
    the transfer table and every figure of :func:`attack_figures`."""
    import html

    import plotly.io as pio

    d = Path(out_dir)
    df = pd.read_parquet(d / "attack.parquet")
    if df.empty:
        raise ValueError(f"{d / 'attack.parquet'}: the attack table is empty")
    page = Path(out) if out is not None else d / "report.html"
    parts = [f"<h1>Attack campaign: {html.escape(d.name)}</h1>", "<h2>TPR at the clean 1%-FPR threshold</h2>"]
    parts.append(df.to_html(index=False, float_format=lambda v: f"{v:.3g}", na_rep="–"))
    if (d / "transfer.parquet").is_file():
        parts.append("<h2>Transfer</h2>")
        parts.append(
            pd.read_parquet(d / "transfer.parquet").to_html(index=False, float_format=lambda v: f"{v:.3g}")
        )
    parts.append("<h2>Figures</h2>")
    for i, (name, fig) in enumerate(attack_figures(d).items()):
        div = pio.to_html(fig, include_plotlyjs=i == 0, full_html=False, div_id=f"fig{i}")
        parts.append(f"<h3>{html.escape(name)}</h3>{div}")
    page.write_text(
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'></head><body>"
        + "".join(parts)
        + "</body></html>"
    )
    return page
