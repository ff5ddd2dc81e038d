"""``probe-atlas report DIR`` writes one self-contained HTML page of a sweep."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from experiments.cli.main import WaitOpt, WaitTimeoutOpt, command, console, writing
from experiments.viz.attacks import build_attack_report
from experiments.viz.report import build_report


@command("report")
def report(
    results: Annotated[Path, typer.Argument(help="a sweep folder (results.parquet) or attack folder")],
    out: Annotated[Path | None, typer.Option("--out", help="page to write (default DIR/report.html)")] = None,
    wait: WaitOpt = False,
    wait_timeout: WaitTimeoutOpt = None,
) -> None:
    """Write DIR/report.html: spec, headline table, figures and best probe per cost band (offline)."""
    if (results / "attack.parquet").is_file() and not (results / "results.parquet").is_file():
        path = build_attack_report(results, out)
    elif out is None and results.is_dir():
        with writing(results, wait, wait_timeout):
            path = build_report(results, out)
    else:
        path = build_report(results, out)
    console.print(f"[green]wrote[/] {path} ({path.stat().st_size / 2**20:.1f} MiB)")
