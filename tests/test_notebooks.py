"""The notebooks run top to bottom with ``jupyter nbconvert --to notebook --execute`` (fast setting in the
default run: tiny model, few prompts; the full setting is marked slow), are stored without outputs, and
import only the packages' public API (``from activations import ...`` of names in ``__all__``)."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
PACKAGES = ("activations", "probes", "sae", "experiments")


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


def private_imports(source: str) -> list[str]:
    """The imports of project code in ``source`` that bypass a package's public API: a submodule
    (``from activations.collect import x``, ``import probes.io``), a whole package imported as a module
    (``import probes``), or a name that is not in the package's ``__all__``."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PACKAGES:
                    bad.append(f"import {a.name} (use `from {a.name.split('.')[0]} import NAME`)")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            top = node.module.split(".")[0]
            if top not in PACKAGES:
                continue
            if node.module != top:
                bad.append(f"from {node.module} import ... (a submodule: import from `{top}`)")
                continue
            public = set(getattr(importlib.import_module(top), "__all__", ()))
            bad += [
                f"from {top} import {a.name} (not in {top}.__all__)"
                for a in node.names
                if a.name not in public
            ]
    return bad


def _code(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    # IPython magics (%time, !cmd) are not Python: blank them before parsing
    return "\n".join(
        "\n".join("" if ln.lstrip().startswith(("%", "!")) else ln for ln in c.source.splitlines())
        for c in nb.cells
        if c.cell_type == "code"
    )


def test_private_import_check_catches_bypasses() -> None:
    assert private_imports("from probes import load_probe\nimport numpy as np\nfrom os import path") == []
    bad = private_imports(
        "from probes.io import load_probe\nimport activations.collect\nfrom experiments import _nope\n"
        "def f():\n    from sae.load import x\n"
    )
    assert len(bad) == 4, bad


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_imports_public_api_only(path: Path) -> None:
    assert private_imports(_code(path)) == [], path.name


@pytest.fixture(scope="module")
def nb_out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("notebooks")  # shared: 03 reuses the stores 02 collected


def _execute(path: Path, out: Path, fast: bool, timeout: int) -> None:
    """``jupyter nbconvert --to notebook --execute`` in a fresh kernel, as a user runs it; the executed copy
    must hold no error and at least one plotly figure."""
    env = {**os.environ, "PROBE_ATLAS_NB_OUT": str(out)}
    env.pop("PROBE_ATLAS_NB_FAST", None)
    if fast:
        env["PROBE_ATLAS_NB_FAST"] = "1"
    # the kernel runs in notebooks/: put this checkout first, so it imports the code under test
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    dest = out / "executed"
    cmd = [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
           f"--ExecutePreprocessor.timeout={timeout}", "--output-dir", str(dest), str(path)]  # fmt: skip
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout + 120)
    assert res.returncode == 0, f"{path.name}: nbconvert failed\n{res.stderr[-3000:]}"
    nb = nbformat.read(dest / path.name, as_version=4)
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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_fast(path: Path, nb_out: Path) -> None:
    _execute(path, nb_out, fast=True, timeout=300)


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("PROBE_ATLAS_NB_FULL") != "1",
    reason="full notebook runs take minutes each (not in CI): set PROBE_ATLAS_NB_FULL=1",
)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_full(path: Path, tmp_path_factory) -> None:
    """The full setting (the default model on the real data), as `jupyter nbconvert --execute` runs it."""
    _execute(path, tmp_path_factory.getbasetemp() / "notebooks_full", fast=False, timeout=1800)
