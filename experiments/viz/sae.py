"""The figure of what an SAE-feature probe reads (:func:`sae.view.latent_table`)."""

from __future__ import annotations

from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

__all__ = ["latent_figure"]


def latent_figure(table: pd.DataFrame, title: str = "What the SAE probe reads") -> Any:
    """One panel per latent: its top examples' activations as bars (red harmful, blue harmless), the
    token as the bar label and the context on hover."""

    if table.empty:
        raise ValueError("the latent table is empty")
    lats = list(dict.fromkeys(table["latent"].tolist()))
    titles = []
    for lat in lats:
        t = table[table.latent == lat]
        titles.append(
            f"latent {lat} (weight {t.weight.iloc[0]:+.3g}, "
            f"{100 * t.frac_harmful_top.iloc[0]:.0f}% harmful in top)"
        )
    fig = make_subplots(
        rows=len(lats), cols=1, subplot_titles=titles, vertical_spacing=0.4 / max(len(lats), 1)
    )
    for i, lat in enumerate(lats, start=1):
        t = table[table.latent == lat].sort_values("example_rank", ascending=False)
        fig.add_trace(
            go.Bar(
                x=t.activation,
                y=[f"#{r} {tok!r}" for r, tok in zip(t.example_rank, t.token, strict=True)],
                orientation="h",
                marker_color=["#d62728" if lab >= 0.5 else "#1f77b4" for lab in t.label],
                hovertext=[
                    f"{eid} (label {lab:g})<br>{c}"
                    for eid, lab, c in zip(t.example_id, t.label, t.context, strict=True)
                ],
                hoverinfo="text+x",
                showlegend=False,
            ),
            row=i,
            col=1,
        )
    fig.update_layout(title=title, height=max(300, 260 * len(lats)), template="plotly_white")
    fig.update_xaxes(title_text="latent activation")
    return fig
