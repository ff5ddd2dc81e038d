"""The notebooks run top to bottom (fast setting: tiny model, few prompts) and are stored without outputs."""

from __future__ import annotations

import os
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks() -> None:
    names = [p.stem for p in NOTEBOOKS]
    assert {"01_activations", "02_layer_sweep", "03_cost_frontier", "04_frontier"} <= set(names), names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_committed_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: cell {i} has outputs (strip them before committing)"
            assert cell.execution_count is None, f"{path.name}: cell {i} has an execution count"
    assert any(c.cell_type == "markdown" for c in nb.cells), f"{path.name}: no narration"


@pytest.fixture(scope="module")
def nb_out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("notebooks")  # shared: 03 reuses the stores 02 collected


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, nb_out: Path, monkeypatch) -> None:
    """Execute in a fresh kernel ("python3": jupyter_client launches it with this interpreter)."""
    from nbclient import NotebookClient

    monkeypatch.setenv("PROBE_ATLAS_NB_FAST", "1")
    monkeypatch.setenv("PROBE_ATLAS_NB_OUT", str(nb_out))
    # the kernel runs in notebooks/: put this checkout first, so it imports the code under test (not
    # another installed copy)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    print(f"{path.name}: {time.perf_counter() - t0:.1f}s (fast setting)")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    figures = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if "application/vnd.plotly.v1+json" in o.get("data", {})
    ]
    assert figures, f"{path.name}: no plotly figure was shown"
