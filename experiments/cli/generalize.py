"""``probe-atlas recipe`` and ``probe-atlas mixtures``: the generalization recipe's figures against its
targets (:mod:`experiments.analysis.recipe`) and what each part of its training mixture buys
(:mod:`experiments.analysis.mixtures`), both on a finished sweep folder (nothing is collected again)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from experiments.analysis.mixtures import mixture_ablation
from experiments.analysis.recipe import TARGETS, recipe_table
from experiments.cli.main import command, console, fail, frame_table
from experiments.sweep.engine import prepare
from experiments.sweep.spec import load_spec

SpecArg = Annotated[Path, typer.Argument(help="the sweep's spec YAML (e.g. generalize.yaml)")]
SweepArg = Annotated[Path, typer.Argument(help="the finished sweep folder (its results.parquet and stores)")]


def _check_sweep(sweep: Path) -> None:
    if not (sweep / "results.parquet").is_file():
        fail(f"{sweep}: no results.parquet (run `probe-atlas sweep SPEC --out {sweep}` first)")


@command("recipe")
def recipe(spec: SpecArg, sweep: SweepArg) -> None:
    """The recipe's targets (issue 14) per family, from the runs the sweep chose on validation: held-out
    harmful AUROC, CoCoNot look-alikes flagged and AUROC, jailbreak TPR vs matched negatives, in-distribution
    TPR. Writes SWEEP/recipe_targets.csv."""
    _check_sweep(sweep)
    s, base = load_spec(spec)  # bad specs and sweep folders: one line via @command
    t = recipe_table(sweep, s, base)
    t.to_csv(sweep / "recipe_targets.csv", index=False)
    cols = ["recipe", "probe", "pooling", "layer", "overhead_pct", "val_tpr_at_1pct_fpr"]
    cols += [c for c, _, _ in TARGETS.values()] + ["jailbreak_auroc", "jailbreak_matched_flagged"]
    console.print(frame_table(t, [c for c in cols if c in t.columns], "recipe figures (val-chosen runs)"))
    console.print(f"[green]wrote[/] {sweep / 'recipe_targets.csv'}")


@command("mixtures")
def mixtures(
    spec: SpecArg,
    sweep: SweepArg,
    probe: Annotated[str, typer.Option("--probe", help="the probe family refit per variant")] = "logistic_l2",
) -> None:
    """Refit one family on subsets of the sweep's training mixture (stores reused; layer and C chosen on the
    sweep's validation set) and evaluate each on the test sets. Writes SWEEP/mixture_ablation.csv."""
    _check_sweep(sweep)
    s, base = load_spec(spec)
    ctx = prepare(s, sweep, base=base, progress=False)
    df = mixture_ablation(ctx, probe=probe, base=base)
    df.to_csv(sweep / "mixture_ablation.csv", index=False)
    cols = ["variant", "pooling", "layer", "eval_set", "auroc", "tpr_at_1pct_fpr", "flag_rate_at_1pct"]
    console.print(frame_table(df, [*cols, "tpr_vs_own_1pct"], f"mixture ablation ({probe})"))
    console.print(f"[green]wrote[/] {sweep / 'mixture_ablation.csv'}")
