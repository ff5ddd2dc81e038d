"""``probe-atlas card``: a probe as a Hugging Face model card folder (:mod:`experiments.analysis.card`),
the validation-best probe of each family of a sweep (``--best``), or a card fetched from the Hub
(``--from-hub``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from experiments.analysis.card import README, best_runs, make_card
from experiments.cli.main import command, console, fail
from experiments.sweep.results import read_results
from probes.hub import hub_snapshot
from probes.io import load_scorer


@command("card")
def card(
    probe_dir: Annotated[
        Path | None,
        typer.Argument(help="a saved probe folder (SWEEP/probes/<run_id>), or a sweep folder with --best"),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="the card folder to write")] = None,
    sweep: Annotated[
        Path | None, typer.Option("--sweep", help="the sweep its metrics come from (default: its own)")
    ] = None,
    best: Annotated[
        bool, typer.Option("--best", help="PROBE_DIR is a sweep: card the val-best probe of each family")
    ] = False,
    from_hub: Annotated[
        str | None, typer.Option("--from-hub", help="OWNER/NAME[@REV]: fetch a card from the Hub")
    ] = None,
) -> None:
    """Write a probe card: the probe (safetensors + JSON), README.md in the Hugging Face model-card format
    and card.json. Push it with huggingface_hub.upload_folder (see the README)."""
    if from_hub is not None:
        ref = from_hub if from_hub.startswith("hf:") else f"hf:{from_hub}"
        local = hub_snapshot(ref)
        scorer = load_scorer(local)  # checks the folder like any probe folder
        console.print(f"[green]loaded[/] {ref}: {type(scorer).__name__} at {local}")
        if out is not None:
            make_card(local, out)
            console.print(f"[green]wrote[/] {out}")
        return
    if probe_dir is None or out is None:
        fail("give PROBE_DIR and --out (or --from-hub OWNER/NAME)")
        return
    if best:
        df = read_results(probe_dir)
        if df.empty:
            fail(f"{probe_dir}: no results.parquet (--best takes a sweep folder)")
        for _, r in best_runs(df).iterrows():
            src = probe_dir / "probes" / str(r["run_id"])
            layer = f"L{int(r['layer'])}" if r["layer"] >= 0 else "multi"
            model = f"{r['model']}-" if df["model"].nunique() > 1 else ""
            dest = out / f"{model}{r['probe']}-{r['pooling']}-{layer}"
            make_card(src, dest, sweep=probe_dir)
            console.print(f"[green]wrote[/] {dest / README}")
        return
    make_card(probe_dir, out, sweep=sweep)
    console.print(f"[green]wrote[/] {out / README}")
