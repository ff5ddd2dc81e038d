"""``probe-atlas robustness`` (TPR / FPR of saved probes under jailbreak transformations, and
over-refusal on contrast prompts) and ``probe-atlas robustness-cross`` (constitution ↔ shared-benchmark
training sweeps with shared stores, and their best probes on every eval set)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from experiments.analysis.robustness import (
    CROSS_SPECS,
    RobustnessError,
    best_probes,
    run_cross_dataset,
    run_robustness,
    summary_table,
)
from experiments.cli.main import WaitOpt, WaitTimeoutOpt, command, console, writing


@command("robustness")
def robustness(
    data: Annotated[
        str, typer.Option("--data", help="labelled JSONL (or shared:datasets/..., builtin) to transform")
    ],
    out: Annotated[Path, typer.Option("--out", help="folder for robustness.parquet and the figures")],
    probe: Annotated[
        list[Path] | None, typer.Option("--probe", help="a saved probe folder (repeatable)")
    ] = None,
    best_of: Annotated[
        list[Path] | None,
        typer.Option("--best-of", help="a sweep folder: add its probe chosen on validation per pooling"),
    ] = None,
    transforms: Annotated[
        str, typer.Option("--transforms", help="all | none | a,b,c (a+b composes)")
    ] = "all",
    n: Annotated[
        int | None, typer.Option("--n", help="at most N harmful, N harmless and N contrast prompts")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="subsampling and transformation seed")] = 0,
    contrast: Annotated[
        str | None,
        typer.Option("--contrast", help="more harmless look-alike prompts (kind contrast) for over-refusal"),
    ] = None,
    split: Annotated[str | None, typer.Option("--split", help="use only this split of --data")] = None,
    n_control: Annotated[
        int | None,
        typer.Option("--n-control", help="clean harmless prompts that fix the threshold (default: --n)"),
    ] = None,
    fpr: Annotated[float, typer.Option("--fpr", help="target FPR on clean harmless prompts")] = 0.01,
    png: Annotated[bool, typer.Option("--png/--no-png", help="also write PNG figures")] = True,
    wait: WaitOpt = False,
    wait_timeout: WaitTimeoutOpt = None,
) -> None:
    """Per jailbreak transformation: TPR on harmful and FPR on harmless prompts at a threshold fixed on
    clean harmless prompts; plus over-refusal on contrast prompts. Writes OUT/robustness.parquet."""
    dirs: list[Path] = list(probe or [])
    for sweep in best_of or []:
        dirs += best_probes(sweep)
    if not dirs:
        raise RobustnessError("give --probe DIR (repeatable) or --best-of SWEEP_DIR")
    with writing(out, wait, wait_timeout):
        df = run_robustness(
            dirs,
            data,
            out,
            transforms=transforms,
            n=n,
            seed=seed,
            contrast=contrast,
            split=split,
            n_control=n_control,
            fpr=fpr,
            png=png,
        )
    tpr, fprs = summary_table(df, "tpr"), summary_table(df, "fpr")
    table = Table(title=f"TPR / FPR at {fpr:.1%} FPR on clean harmless (threshold fixed on clean)")
    table.add_column("transform")
    for p in tpr.columns:
        table.add_column(str(p), justify="right")
    for t in tpr.index:
        cells = []
        for p in tpr.columns:
            a, b = tpr.loc[t, p], fprs.loc[t, p]
            cells.append(("  -  " if a != a else f"{a:.2f}") + f" / {b:.2f}")
        table.add_row(str(t), *cells)
    console.print(table)
    console.print(f"[green]wrote[/] {out / 'robustness.parquet'} and figures under {out}")


@command("robustness-cross")
def robustness_cross(
    out: Annotated[Path, typer.Option("--out", help="folder: one sweep folder per spec + stores")] = Path(
        "runs/robustness"
    ),
    spec: Annotated[
        list[str] | None,
        typer.Option("--spec", help="sweep specs (default: the three robustness*.yaml specs)"),
    ] = None,
    wait: WaitOpt = False,
    wait_timeout: WaitTimeoutOpt = None,
) -> None:
    """Train on constitution data, on a shared benchmark, and on augmented constitution data; evaluate
    each on both; write OUT/cross_dataset.parquet (best probe per pooling of each sweep)."""
    with writing(out, wait, wait_timeout):
        table = run_cross_dataset(out, spec or list(CROSS_SPECS))
    t = Table(title="probe chosen on validation per pooling: AUROC / TPR@1% / flag rate of harmless")
    for c in ("train", "pooling", "eval set", "AUROC", "TPR@1%", "flagged@1%"):
        t.add_column(c)
    for _, r in table.iterrows():
        t.add_row(
            str(r["train_sweep"]),
            str(r["pooling"]),
            str(r["eval_set"]),
            f"{r['auroc']:.3f}",
            f"{r['tpr_at_1pct_fpr']:.3f}",
            f"{r.get('benign_flag_rate_at_1pct_fpr', float('nan')):.3f}",
        )
    console.print(t)
    console.print(f"[green]wrote[/] {out / 'cross_dataset.parquet'}")
