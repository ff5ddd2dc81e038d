"""``probe-atlas report DIR`` writes one self-contained HTML page of a sweep."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from experiments.cli.main import command, console
from experiments.viz.report import build_report


@command("report")
def report(
    results: Annotated[Path, typer.Argument(help="a sweep folder (results.parquet) or attack folder")],
    out: Annotated[Path | None, typer.Option("--out", help="page to write (default DIR/report.html)")] = None,
) -> None:
    """Write DIR/report.html: spec, headline table, figures and best probe per cost band (offline)."""
    if (results / "attack.parquet").is_file() and not (results / "results.parquet").is_file():
        from experiments.viz.attacks import build_attack_report

        path = build_attack_report(results, out)
    else:
        path = build_report(results, out)
    console.print(f"[green]wrote[/] {path} ({path.stat().st_size / 2**20:.1f} MiB)")
