"""CLI plug-in: ``probe-atlas report DIR`` writes one self-contained HTML page of a sweep."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()


def register(app: typer.Typer) -> None:
    """Add the ``report`` command to the ``probe-atlas`` app."""

    @app.command("report")
    def report(
        results: Annotated[Path, typer.Argument(help="a sweep folder with results.parquet (and spec.yaml)")],
        out: Annotated[
            Path | None, typer.Option("--out", help="page to write (default DIR/report.html)")
        ] = None,
    ) -> None:
        """Write DIR/report.html: spec, headline table, figures and best probe per cost band (offline)."""
        from experiments.html_report import build_report

        try:
            path = build_report(results, out)
        except (FileNotFoundError, ValueError) as e:
            console.print(f"[bold red]error:[/] {e}")
            raise typer.Exit(2) from e
        console.print(f"[green]wrote[/] {path} ({path.stat().st_size / 2**20:.1f} MiB)")
