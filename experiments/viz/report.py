"""One self-contained HTML page of a sweep: spec, headline table, every figure, best probe per cost band.

``probe-atlas report DIR`` writes ``DIR/report.html``. plotly.js is inlined once in the page head and each
figure is a ``<div>`` drawn by it, so the page opens offline in any browser and stays one file.
"""

from __future__ import annotations

import html
import logging
import math
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs

from experiments.analysis.report import best_per_cost_band, headline_table
from experiments.viz.results import auroc_by_layer, cost_frontier, layer_pooling_heatmap, load_results

logger = logging.getLogger(__name__)

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
.meta { color: #666; } pre { background: #f6f8fa; padding: 1em; overflow-x: auto; font-size: 85%; }
table.tab { border-collapse: collapse; font-size: 85%; margin: 0.5em 0 1.5em; }
table.tab th, table.tab td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
table.tab th { background: #f0f3f6; } table.tab td:first-child, table.tab th:first-child { text-align: left; }
.figure { margin: 1em 0 2em; } nav a { margin-right: 1em; }
"""


def _fmt(v: object) -> str:
    if isinstance(v, (float, np.floating)):
        if math.isnan(float(v)):
            return "–"
        x = float(v)
        return f"{x:.4g}" if abs(x) < 1e-3 or abs(x) >= 1e4 else f"{x:.4f}".rstrip("0").rstrip(".")
    return str(v)


def _table(df: pd.DataFrame, cols: Sequence[str]) -> str:
    cols = [c for c in cols if c in df.columns]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r[c]))}</td>" for c in cols) + "</tr>"
        for _, r in df.iterrows()
    )
    return (
        f'<div style="overflow-x:auto"><table class="tab"><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


def report_figures(df: pd.DataFrame) -> list[tuple[str, go.Figure]]:
    """The sweep's figures (title, figure): metric by layer, layer × pooling heatmaps, cost frontiers."""
    figs: list[tuple[str, go.Figure]] = []

    def attempt(title: str, make: Callable[..., go.Figure], *args: Any) -> None:
        try:
            figs.append((title, make(df, *args)))
        except ValueError as exc:  # the table cannot support this figure (no layers, no cost, ...)
            logger.info("report: skipping %s: %s", title, exc)

    metrics = [m for m in ("auroc", "tpr_at_1pct_fpr") if m in df.columns and df[m].notna().any()]
    detect_sets = [str(e) for e, sub in df.groupby("eval_set", sort=False) if sub["auroc"].notna().any()]
    for m in metrics:
        attempt(f"{m} by layer", auroc_by_layer, m)
    for es in detect_sets:
        attempt(f"layer × pooling heatmap (auroc) — {es}", layer_pooling_heatmap, "auroc", es)
        for m in metrics:
            for cost in ("flops_per_token", "standalone_overhead_pct"):
                if cost in df.columns:
                    attempt(f"{m} vs {cost} — {es}", cost_frontier, m, cost, es)
    return figs


def build_report(sweep_dir: str | Path, out: str | Path | None = None, title: str | None = None) -> Path:
    """Write the sweep's report page (default ``DIR/report.html``); return its path."""
    d = Path(sweep_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: not a folder")
    df = load_results(d)
    if len(df) == 0:
        raise ValueError(f"{d / 'results.parquet'}: the results table is empty")
    out = Path(out) if out is not None else d / "report.html"
    spec_file = d / "spec.yaml"
    spec_text = spec_file.read_text() if spec_file.exists() else "(no spec.yaml in this folder)"
    name = title or (str(df["sweep"].iloc[0]) if "sweep" in df.columns else d.name)
    model = ", ".join(sorted(df["model"].astype(str).unique())) if "model" in df.columns else "?"

    head_tab = headline_table(df)
    head_cols = ["eval_set", "probe", "pooling", "layer", "C", "auroc", "auroc_lo", "auroc_hi"]
    head_cols += ["tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr", "benign_flag_rate_at_1pct_fpr", "overhead_pct"]
    head_cols += ["standalone_overhead_pct"]
    bands = best_per_cost_band(df) if "overhead_pct" in df.columns else None

    parts: list[str] = []
    parts.append(f"<h1>{html.escape(name)}</h1>")
    parts.append(
        f'<p class="meta">model {html.escape(model)} · {df["run_id"].nunique()} runs · {len(df)} rows · '
        f"eval sets: {html.escape(', '.join(dict.fromkeys(df['eval_set'].astype(str))))} · "
        f"written {datetime.now(UTC):%Y-%m-%d %H:%M} UTC from {html.escape(str(d.resolve()))}</p>"
    )
    parts.append(
        '<nav><a href="#headline">headline</a><a href="#bands">cost bands</a>'
        '<a href="#figures">figures</a><a href="#spec">spec</a></nav>'
    )
    parts.append('<h2 id="headline">Headline: best layer per probe × pooling</h2>')
    parts.append(
        "<p>Per eval set, probe kind and pooling: the layer (and C) chosen on the <em>validation</em> set; "
        "test metrics with bootstrap intervals; thresholds from the benign control set. A benign-only set "
        "reports its over-refusal rate (<code>benign_flag_rate_at_1pct_fpr</code>).</p>"
    )
    parts.append(_table(head_tab, head_cols))
    if bands is not None:
        parts.append('<h2 id="bands">Best probe per cost band</h2>')
        parts.append(
            "<p>Marginal overhead of the probe (% of the policy model's forward pass per token, the probe "
            "riding on a pass that happens anyway). In each band the run with the best validation metric; "
            "its test metrics beside it. <code>standalone_overhead_pct</code> is the cost of running the "
            "model up to the probed layer just for the probe.</p>"
        )
        parts.append(_table(bands, list(bands.columns)))
    parts.append('<h2 id="figures">Figures</h2>')
    for i, (ftitle, fig) in enumerate(report_figures(df)):
        div = pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=f"fig{i}")
        parts.append(f'<div class="figure"><h3>{html.escape(ftitle)}</h3>{div}</div>')
    parts.append('<h2 id="spec">Spec</h2>')
    parts.append(f"<pre>{html.escape(spec_text)}</pre>")

    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(name)} — probe-atlas report</title><style>{_CSS}</style>"
        f'<script type="text/javascript">{get_plotlyjs()}</script></head><body>'
        + "\n".join(parts)
        + "</body></html>\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out
