"""``probe-atlas transfer SPEC --out DIR``: the transfer atlas (:mod:`experiments.analysis.transfer`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from experiments.analysis.transfer import (
    TransferError,
    generalization_gap,
    layer_profile,
    load_transfer_spec,
    run_transfer,
)
from experiments.cli.main import command, console
from experiments.viz.transfer import write_transfer_figures


@command("transfer")
def transfer(
    spec: Annotated[Path, typer.Argument(help="transfer spec YAML (or a name in experiments/configs)")],
    out: Annotated[Path, typer.Option("--out", help="output folder")] = Path("runs/transfer"),
    plot: Annotated[bool, typer.Option("--plot/--no-plot", help="write the atlas figures")] = True,
) -> None:
    """Train each probe family on some sources and evaluate it on sources it never saw (leave-one-source-out
    by default): OUT/transfer.parquet, OUT/transfer.json and OUT/figures."""
    s = load_transfer_spec(spec)  # bad specs and data: one line via @command
    if out.exists() and not out.is_dir():
        raise TransferError(f"--out {out}: exists and is not a folder")
    df = run_transfer(s, out)
    if plot:
        write_transfer_figures(df, out / "figures")
    t = Table(title="out-of-source AUROC (layer chosen on validation), mean over held-out sources")
    for col in ("mode", "probe", "pooling", "out-of-source AUROC", "in-source AUROC", "gap"):
        t.add_column(col)
    sel = df[df["selected"] | (df["layer"] < 0)]
    for (mode, probe, pooling), g in sel.groupby(["mode", "probe", "pooling"], sort=False):
        o, i = g[~g["in_source"]]["auroc"].mean(), g[g["in_source"]]["auroc"].mean()
        t.add_row(mode, probe, pooling, f"{o:.3f}", f"{i:.3f}", f"{i - o:.3f}")
    console.print(t)
    generalization_gap(df).to_csv(out / "gap.csv", index=False)
    for mode in dict.fromkeys(df["mode"]):
        layer_profile(df, mode).to_csv(out / f"layer_profile_{mode}.csv", index=False)
    console.print(f"[green]wrote[/] {out / 'transfer.parquet'}, gap.csv, layer_profile_*.csv")
