"""Figures of the robustness evaluation (:mod:`experiments.analysis.robustness`): per probe kind, TPR on
transformed harmful prompts and FPR on transformed harmless ones, per transformation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

__all__ = ["robustness_figures"]


def robustness_figures(df: pd.DataFrame) -> dict[str, go.Figure]:
    """One grouped bar chart per probe kind: TPR (top) and FPR (bottom) per transformation, bar per probe."""
    missing = [c for c in ("probe", "probe_kind", "transform", "tpr", "fpr") if c not in df.columns]
    if missing:
        raise ValueError(f"robustness table lacks columns {missing}")
    figs = {}
    order = list(dict.fromkeys(df["transform"]))
    for kind, g in df.groupby("probe_kind", sort=True):
        fig = make_subplots(
            rows=2,
            cols=1,
            shared_xaxes=True,
            vertical_spacing=0.08,
            subplot_titles=(
                "TPR on transformed harmful prompts (threshold: 1% FPR on clean harmless)",
                "FPR on transformed harmless prompts / over-refusal on contrast prompts",
            ),
        )
        for i, (probe, pg) in enumerate(g.groupby("probe", sort=True)):
            pg = pg.set_index("transform").reindex(order)
            color = qualitative.Plotly[i % len(qualitative.Plotly)]
            custom = np.stack([pg["n_harmful"].fillna(0), pg["n_harmless"].fillna(0), pg["auroc"]], 1)
            for r, metric in ((1, "tpr"), (2, "fpr")):
                fig.add_trace(
                    go.Bar(
                        x=order,
                        y=pg[metric],
                        name=str(probe),
                        legendgroup=str(probe),
                        showlegend=r == 1,
                        marker_color=color,
                        customdata=custom,
                        hovertemplate=(
                            f"{probe}<br>%{{x}}<br>{metric.upper()} %{{y:.3f}}<br>"
                            "n harmful %{customdata[0]}, n harmless %{customdata[1]}<br>"
                            "AUROC %{customdata[2]:.3f}<extra></extra>"
                        ),
                    ),
                    row=r,
                    col=1,
                )
        fig.update_yaxes(title_text="TPR", range=[0, 1.02], row=1, col=1)
        fig.update_yaxes(title_text="FPR", range=[0, 1.02], row=2, col=1)
        fig.update_layout(
            title=f"Robustness to jailbreak transformations: {kind}",
            barmode="group",
            template="plotly_white",
            height=720,
            width=max(900, 70 * len(order) * max(1, g["probe"].nunique()) // 2),
            legend_title_text="probe",
        )
        figs[str(kind)] = fig
    return figs
