"""Figures of streaming monitors (:mod:`probes.stream`): recall against tokens generated, and one
generation's tokens coloured by their running score."""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from probes.stream import GenerationResult

__all__ = ["recall_figure", "token_figure"]


def recall_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str = "") -> Any:
    """Plotly figure: recall against tokens generated, one line per probe."""
    fig = go.Figure()
    for name, (k, r) in curves.items():
        fig.add_trace(go.Scatter(x=k, y=r, mode="lines", name=name))
    fig.update_layout(
        title=title or "streaming recall at a fixed benign FPR",
        xaxis_title="tokens generated",
        yaxis_title="recall (harmful exchanges caught)",
        yaxis_range=[0, 1.02],
        template="plotly_white",
    )
    return fig


def token_figure(result: GenerationResult, tokenizer: Any, *, per_row: int = 12, title: str = "") -> Any:
    """Plotly figure: the generated tokens in a grid coloured by their running score, and the running score
    against the token index with the threshold."""
    n = len(result.scores)
    toks = [tokenizer.decode([t]) for t in result.ids[:n]]
    rows = max(1, -(-n // per_row))
    z = np.full((rows, per_row), np.nan)
    text = np.full((rows, per_row), "", dtype=object)
    for i, (t, s) in enumerate(zip(toks, result.scores, strict=True)):
        z[i // per_row, i % per_row] = s
        mark = " ■" if result.stop_index == i else ""
        text[i // per_row, i % per_row] = (t.replace("\n", "⏎") or "·") + mark
    fig = make_subplots(rows=2, cols=1, row_heights=[0.65, 0.35], vertical_spacing=0.08)
    fig.add_trace(
        go.Heatmap(
            z=z[::-1],
            text=text[::-1],
            texttemplate="%{text}",
            colorscale="RdYlGn_r",
            colorbar={"title": "running score"},
            showscale=True,
            hovertemplate="%{text}: %{z:.3f}<extra></extra>",
        ),
        row=1,
        col=1,
    )
    fig.add_trace(go.Scatter(y=result.scores, mode="lines+markers", name="running score"), row=2, col=1)
    fig.add_trace(
        go.Scatter(y=result.token_logits, mode="lines", name="token logit", opacity=0.5), row=2, col=1
    )
    if result.final_score is not None and n:
        fig.add_trace(
            go.Scatter(
                x=[n - 1], y=[result.final_score], mode="markers", name="end-of-stream score", marker_size=10
            ),
            row=2,
            col=1,
        )
    if result.threshold is not None:
        fig.add_hline(y=result.threshold, line_dash="dash", line_color="red", row=2, col=1)
    fig.update_xaxes(showticklabels=False, row=1, col=1)
    fig.update_yaxes(showticklabels=False, row=1, col=1)
    fig.update_xaxes(title_text="generated token", row=2, col=1)
    stop = f", stopped at token {result.stop_index}" if result.stopped else ""
    fig.update_layout(
        title=title or f"streaming monitor{stop}", template="plotly_white", height=300 + 40 * rows
    )
    return fig
