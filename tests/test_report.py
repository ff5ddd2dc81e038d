"""The HTML report of a sweep: one offline page with spec, tables and plotly figures that render."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from experiments.analysis.report import best_per_cost_band, cost_band
from experiments.sweep.engine import run_sweep
from experiments.sweep.spec import parse_spec
from experiments.viz.report import build_report
from tests.conftest import planted_dataset


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, tiny_model) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    ds = planted_dataset(n=120, seed=1).with_splits({"train": 0.5, "val": 0.25, "test": 0.25}, seed=0)
    ds.to_jsonl(tmp / "planted.jsonl")
    planted_dataset(n=240, seed=11, name="control").to_jsonl(tmp / "control.jsonl")
    spec = parse_spec(
        {
            "name": "report-test",
            "model": "tiny",
            "max_len": 64,
            "datasets": {
                "train": {"path": "planted.jsonl", "split": "train"},
                "val": {"path": "planted.jsonl", "split": "val"},
                "test": {
                    "heldout": {"path": "planted.jsonl", "split": "test"},
                    "benign_only": {"path": "planted.jsonl", "split": "test", "label": 0},
                },
                "benign_control": {"path": "control.jsonl", "label": 0},
            },
            "layers": "all",
            "poolings": ["mean", "max"],
            "probes": [{"kind": "logistic_l2"}, {"kind": "diffmeans"}, {"kind": "multilayer"}],
            "Cs": [0.1, 1.0],
            "bootstrap": 20,
        }
    )
    run_sweep(spec, tmp / "out", base=tmp, model=tiny_model, progress=False)
    return tmp / "out"


def test_cost_bands() -> None:
    assert cost_band(0.0004) == "< 0.001%"
    assert cost_band(0.001) == "< 0.01%"
    assert cost_band(0.5) == "< 1%"
    assert cost_band(1.0) == "≥ 1%" and cost_band(42.0) == "≥ 1%"
    assert cost_band(float("nan")) == "unknown"
    df = pd.DataFrame(
        {
            "eval_set": ["t"] * 4,
            "probe": ["a", "b", "c", "d"],
            "pooling": ["mean"] * 4,
            "layer": [1, 2, 3, -1],
            "C": [1.0] * 4,
            "val_auroc": [0.9, 0.95, 0.8, 0.99],
            "auroc": [0.91, 0.5, 0.99, 0.97],  # the test metric never chooses
            "tpr_at_1pct_fpr": [0.1, 0.2, 0.3, 0.4],
            "overhead_pct": [0.0004, 0.0009, 0.05, 3.0],
        }
    )
    best = best_per_cost_band(df)
    assert list(best["band"]) == ["< 0.001%", "< 0.1%", "≥ 1%"]
    assert list(best["probe"]) == ["b", "c", "d"]  # b beats a on validation, though a is better on test


def test_report_page(sweep_dir: Path) -> None:
    path = build_report(sweep_dir)
    assert path == sweep_dir / "report.html"
    page = path.read_text()
    assert page.count('<script type="text/javascript">/**') <= 1  # plotly.js inlined once
    assert len(re.findall(r"plotly\.js v\d", page)) == 1
    assert 'src="http' not in page  # nothing fetched: works offline
    assert "report-test" in page and "name: report-test" in page  # the spec
    assert "Headline" in page and "Best probe per cost band" in page
    n_figs = page.count('class="plotly-graph-div"')
    # auroc + tpr by layer, one heatmap and 4 frontiers for the one detection set (benign_only has no AUROC)
    assert n_figs == 2 + 1 + 4, n_figs
    assert "benign_only" in page  # its over-refusal row is in the headline table


def test_report_cli(sweep_dir: Path, tmp_path: Path) -> None:
    from experiments.cli import app

    out = tmp_path / "r.html"
    res = CliRunner().invoke(app, ["report", str(sweep_dir), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.stat().st_size > 1_000_000  # plotly.js inside
    res = CliRunner().invoke(app, ["report", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "not a folder" in res.output


def _png_pixels(data: bytes) -> np.ndarray:
    """Decode an 8-bit RGB/RGBA PNG (no interlace) into [h, w, c] uint8, enough for a screenshot."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, w = 8, b"", 0
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, colour = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and colour in (2, 6)
            c = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + w * c)
    out = np.zeros((h, w * c), np.int32)
    prev = np.zeros(w * c, np.int32)
    for y in range(h):
        f, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        cur = np.zeros(w * c, np.int32)
        for x in range(w * c):
            a = cur[x - c] if x >= c else 0
            b, cc = prev[x], prev[x - c] if x >= c else 0
            if f == 0:
                pred = 0
            elif f == 1:
                pred = a
            elif f == 2:
                pred = b
            elif f == 3:
                pred = (a + b) // 2
            else:
                p = a + b - cc
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - cc)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else cc)
            cur[x] = (line[x] + pred) & 0xFF
        out[y], prev = cur, cur
    return out.reshape(h, w, c).astype(np.uint8)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs a Chromium for headless rendering")
def test_report_renders_in_headless_chromium(sweep_dir: Path, tmp_path: Path) -> None:
    page = build_report(sweep_dir, tmp_path / "report.html")
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000"]
    dom = subprocess.run(
        [*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    # plotly drew every figure: each graph div holds its SVG layers and its traces
    n_divs = dom.count('class="plotly-graph-div')
    assert n_divs == 7
    assert dom.count('class="main-svg"') >= 2 * n_divs
    assert dom.count('class="scatterlayer') >= 6
    assert 'class="hm"' in dom or "heatmaplayer" in dom  # the heatmap drew its cells
    shot = Path(os.environ.get("PROBE_ATLAS_REPORT_SHOT", tmp_path / "shot.png"))
    subprocess.run(
        [*flags, "--window-size=1280,1600", f"--screenshot={shot}", "--hide-scrollbars", page.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    px = _png_pixels(shot.read_bytes())[::4, ::4, :3]  # subsampled: decoding in Python is slow
    assert px.shape[0] >= 300 and px.shape[1] >= 300
    # not blank: many distinct colours, and a good share of non-white pixels (tables, plots, text)
    colours = {tuple(p) for p in px.reshape(-1, 3)}
    assert len(colours) > 50
    assert (px.min(axis=2) < 200).mean() > 0.02
