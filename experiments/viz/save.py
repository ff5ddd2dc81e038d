"""Saving figures: self-contained HTML always, PNG through kaleido where it works (a failed PNG export is
reported once and not retried in the process)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio

__all__ = ["save_figure", "strip_suffix", "write_html", "write_pngs"]

logger = logging.getLogger(__name__)


_PNG_FAILURE: str | None = None  # why PNG export failed once in this process; later calls skip it


def strip_suffix(path: str | Path) -> Path:
    p = Path(path)
    return p.with_suffix("") if p.suffix.lower() in (".html", ".png") else p


def write_pngs(figs: Sequence[go.Figure], paths: Sequence[Path]) -> bool:
    """Write PNGs through kaleido in one browser session; False (with a warning) when that cannot work."""
    global _PNG_FAILURE
    if _PNG_FAILURE is not None or not figs:
        return False
    try:
        sizes = [(f.layout.width or 1000, f.layout.height or 600) for f in figs]
        pio.write_images(
            list(figs),
            [str(p) for p in paths],
            format="png",
            scale=2,
            width=[w for w, _ in sizes],
            height=[h for _, h in sizes],
        )
    except Exception as exc:  # kaleido missing, no browser, ...: HTML is still there
        _PNG_FAILURE = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        logger.warning("PNG export disabled (install kaleido>=1.2 and a Chromium browser): %s", _PNG_FAILURE)
        for p in paths:
            p.unlink(missing_ok=True)
        return False
    return all(p.exists() for p in paths)


def write_html(fig: go.Figure, base: Path) -> Path:
    base.parent.mkdir(parents=True, exist_ok=True)
    html = base.with_name(base.name + ".html")
    fig.write_html(html, include_plotlyjs=True, full_html=True)
    return html


def save_figure(fig: go.Figure, path_without_suffix: str | Path, png: bool = True) -> list[Path]:
    """Write ``<path>.html`` (self-contained, plotly.js inline) and, when kaleido works, ``<path>.png``.

    Returns the paths written. A failed PNG export logs a warning once and is not retried in this process.
    """
    base = strip_suffix(path_without_suffix)
    out = [write_html(fig, base)]
    if png:
        png_path = base.with_name(base.name + ".png")
        if write_pngs([fig], [png_path]):
            out.append(png_path)
    return out
