"""``probe-atlas sae-train`` (train an SAE on a store with sae-lens) and ``probe-atlas sae-view``
(the top-activating tokens of an SAE-feature probe's latents, as a parquet table and a plotly figure)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal, cast

import typer
from rich.console import Console

from activations.models import load_model
from activations.store import ActivationStore
from experiments.cli.main import command
from experiments.viz.sae import latent_figure
from experiments.viz.save import save_figure
from probes.io import load_probe
from sae.probe import SAEFeatureProbe
from sae.train import SAETrainConfig, SAETrainError, train_sae
from sae.view import latent_table

console = Console(stderr=True)


@command("sae-train")
def sae_train(
    store: Annotated[Path, typer.Option("--store", help="activation store folder")],
    hook: Annotated[str, typer.Option("--hook", help="full hook name, e.g. blocks.12.hook_resid_post")],
    out: Annotated[Path, typer.Option("--out", help="SAE folder (sae-lens format + report.json)")],
    architecture: Annotated[str, typer.Option(help="standard | topk")] = "standard",
    expansion_factor: Annotated[int, typer.Option(help="d_sae = expansion_factor · d_in")] = 4,
    l1_coefficient: Annotated[float, typer.Option(help="sparsity coefficient (standard)")] = 5.0,
    k: Annotated[int, typer.Option(help="active latents per token (topk)")] = 32,
    tokens: Annotated[int, typer.Option(help="training samples")] = 200_000,
    batch_size: Annotated[int, typer.Option()] = 1024,
    lr: Annotated[float, typer.Option()] = 1e-3,
    eval_store: Annotated[Path | None, typer.Option(help="held-out store for the metrics")] = None,
    model: Annotated[str | None, typer.Option(help="model for the CE-loss figures (e.g. smollm2)")] = None,
) -> None:
    """Train an SAE with sae-lens on one hook of a store; print its reconstruction report."""
    try:
        cfg = SAETrainConfig(
            architecture=cast(Literal["standard", "topk"], architecture),
            expansion_factor=expansion_factor,  # type: ignore[arg-type]
            l1_coefficient=l1_coefficient,
            k=k,
            n_tokens=tokens,
            batch_size=batch_size,
            lr=lr,
        )
    except SAETrainError as e:
        raise typer.BadParameter(str(e)) from e
    st = ActivationStore.open(store)
    ev = ActivationStore.open(eval_store) if eval_store else None
    m = None
    if model:
        m = load_model(model)
    _, report = train_sae(st, hook, cfg, out, eval_store=ev, model=m)
    keys = ["explained_variance", "l0", "dead_frac", "ce_loss_clean", "ce_loss_spliced", "ce_loss_zero"]
    console.print(json.dumps({k_: report[k_] for k_ in keys if k_ in report}, indent=1))
    console.print(f"[green]SAE saved[/] to {out}")


@command("sae-view")
def sae_view(
    probe: Annotated[Path, typer.Option("--probe", help="a saved SAE-feature probe (OUT/probes/<run_id>)")],
    store: Annotated[Path, typer.Option("--store", help="activation store to search for top examples")],
    out: Annotated[Path, typer.Option("--out", help="output prefix: writes OUT.parquet and OUT.html")],
    model: Annotated[
        str | None, typer.Option(help="model whose tokenizer decodes tokens (default: the probe's)")
    ] = None,
    n_latents: Annotated[int, typer.Option()] = 8,
    n_examples: Annotated[int, typer.Option()] = 10,
) -> None:
    """The highest-activating prompts and tokens of an SAE probe's most influential latents."""
    p = load_probe(probe)
    if not isinstance(p, SAEFeatureProbe):
        raise typer.BadParameter(f"{probe} is a {type(p).__name__}, not an SAE-feature probe")
    ref = model or dict(getattr(p, "metadata_", {})).get("model_ref")
    tok = None
    if ref:
        tok = load_model(str(ref)).tokenizer
    table = latent_table(p, ActivationStore.open(store), tok, n_latents=n_latents, n_examples=n_examples)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(out.with_suffix(".parquet"), index=False)
    save_figure(latent_figure(table), out.with_suffix(""))
    console.print(f"[green]wrote[/] {out.with_suffix('.parquet')} and the figure next to it")
