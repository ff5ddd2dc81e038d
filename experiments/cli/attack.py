"""``probe-atlas attack``: white-box adaptive attacks (embedding suffix, GCG token suffix, fixed transforms)
on saved probes, transfer between them, and adversarial training in rounds
(:mod:`experiments.analysis.attacks`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.markup import escape

from experiments.analysis.attacks.campaign import CampaignConfig
from experiments.analysis.attacks.objective import AttackError
from experiments.cli.main import command, console, frame_table


@command("attack")
def attack(
    out: Annotated[
        Path, typer.Option("--out", help="folder for attack.parquet, suffixes/, transfer, figures")
    ],
    probe: Annotated[
        list[Path] | None, typer.Option("--probe", help="a saved probe folder (repeatable)")
    ] = None,
    best_of: Annotated[
        Path | None,
        typer.Option("--best-of", help="a sweep folder: its probe chosen on validation per probe family"),
    ] = None,
    train: Annotated[
        str | None,
        typer.Option(
            "--train",
            help="recipe: fit logistic / diff-means / LDA / multi-layer probes, their z-scored ensemble and "
            "TF-IDF on this data's train split (val selection) and attack them (e.g. builtin)",
        ),
    ] = None,
    data: Annotated[
        str, typer.Option("--data", help="harmful prompts to attack (JSONL, shared:datasets/..., builtin)")
    ] = "shared:datasets/advbench/advbench.jsonl",
    control: Annotated[
        str, typer.Option("--control", help="harmless prompts that fix each probe's clean threshold")
    ] = "builtin:control",
    attack_kind: Annotated[
        list[str] | None,
        typer.Option(
            "--attack", help="embedding | suffix | transforms (repeatable; default embedding+suffix)"
        ),
    ] = None,
    steps: Annotated[int, typer.Option("--steps", help="optimization steps per example")] = 20,
    suffix_steps: Annotated[
        int | None, typer.Option("--suffix-steps", help="GCG steps (default --steps)")
    ] = None,
    lam: Annotated[float, typer.Option("--lambda", help="weight of the behaviour loss")] = 1.0,
    rounds: Annotated[int, typer.Option("--rounds", help="adversarial-training rounds")] = 0,
    n: Annotated[int, typer.Option("--n", help="at most N harmful prompts")] = 32,
    n_control: Annotated[
        int,
        typer.Option("--n-control", help="harmless control prompts (seeded subsample; >= 100 for 1% FPR)"),
    ] = 400,
    refit: Annotated[
        list[str] | None,
        typer.Option("--refit", help="recipe families to adversarially train (repeatable; default all)"),
    ] = None,
    suffix_len: Annotated[int, typer.Option("--suffix-len", help="suffix tokens / vectors")] = 10,
    target_tokens: Annotated[
        int, typer.Option("--target-tokens", help="tokens of the target completion")
    ] = 16,
    candidates: Annotated[int, typer.Option("--candidates", help="GCG candidates per step")] = 32,
    adv_train_n: Annotated[
        int, typer.Option("--adv-train-n", help="harmful train prompts attacked per adversarial round")
    ] = 16,
    layers: Annotated[str, typer.Option("--layers", help="recipe layers, comma separated")] = "9,15",
    model_name: Annotated[str, typer.Option("--model", help="model (must match the probes')")] = "smollm2",
    device: Annotated[str, typer.Option("--device", help="cpu | cuda")] = "cpu",
    threads: Annotated[int | None, typer.Option("--threads", help="torch CPU threads")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    png: Annotated[bool, typer.Option("--png/--no-png", help="also write PNG figures")] = False,
) -> None:
    """Attack every probe (clean 1%-FPR threshold on --control) with each --attack on the harmful prompts of
    --data; writes OUT/attack.parquet (probe × attack × round), OUT/suffixes/ (replayable),
    OUT/transfer.parquet
    and the transfer heatmap, by-round and robustness-frontier figures."""
    from experiments.analysis.attacks.driver import run_cli_campaign

    if threads:
        torch.set_num_threads(threads)
    sources = sum(x is not None and x != [] for x in (probe, best_of, train))
    if sources == 0:
        raise AttackError("give --probe DIR (repeatable), --best-of SWEEP or --train DATA")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AttackError("--device cuda: no CUDA device is available")
    cfg = CampaignConfig(
        attacks=tuple(attack_kind or ("embedding", "suffix")),
        steps=steps,
        suffix_steps=suffix_steps,
        lam=lam,
        suffix_len=suffix_len,
        target_tokens=target_tokens,
        n_candidates=candidates,
        rounds=rounds,
        adv_train_n=adv_train_n,
        seed=seed,
    )
    cfg.check()
    df = run_cli_campaign(
        out=out,
        probes=list(probe or []),
        best_of=best_of,
        train=train,
        data=data,
        control=control,
        n=n,
        n_control=n_control,
        refit=list(refit) if refit else None,
        cfg=cfg,
        layers=[int(x) for x in layers.split(",") if x.strip()],
        model_name=model_name,
        device=device,
        png=png,
        log=lambda s: console.print(escape(s)),
    )
    cols = ("probe", "attack", "round", "tpr_clean", "tpr_attacked", "behaviour_kept")
    console.print(frame_table(df, cols, "TPR at the clean 1%-FPR threshold, clean → attacked", digits=2))
    console.print(f"wrote {out / 'attack.parquet'}")
