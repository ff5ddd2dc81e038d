"""The ``probe-atlas`` command line: the typer :data:`app`, the :func:`command` decorator every command module
uses, and the core commands (collect, sweep, demo, plot, score, kinds). Other commands live beside this
module, one module per topic (:mod:`experiments.cli`)."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import pandas as pd
import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from activations.collect import collect as do_collect
from activations.collect import estimate_collection
from activations.constitution import GenerationError
from activations.data import load_dataset
from activations.lock import LockError, folder_lock
from activations.models import load_model
from activations.store import StoreError
from experiments.analysis.report import headline_table
from experiments.analysis.scoring import score_file
from experiments.sweep.engine import run_sweep
from experiments.sweep.results import SweepError
from experiments.sweep.spec import load_spec
from experiments.viz.attacks import write_attack_figures
from experiments.viz.results import plot_results
from probes.base import SWEEP_KINDS
from sae.load import SAELoadError

__all__ = [
    "USER_ERRORS",
    "ForceOpt",
    "WaitOpt",
    "WaitTimeoutOpt",
    "app",
    "command",
    "console",
    "fail",
    "frame_table",
    "writing",
]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="probe-atlas: cheap safety probes on a model's own activations.",
)
console = Console()

#: what a command reports as one line (and exit status 2) instead of a traceback: bad input (ValueError:
#: specs, data, probe folders, ...), store failures (a full disk, too little space, a damaged store), sweep
#: and backend failures, SAE folders, a folder another process writes, and files that cannot be read or
#: written
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    StoreError,
    SweepError,
    LockError,
    SAELoadError,
    GenerationError,
    OSError,
)

F = TypeVar("F", bound=Callable[..., Any])


def fail(msg: str) -> None:
    console.print(f"[bold red]error:[/] {escape(msg)}", soft_wrap=True)
    raise typer.Exit(2)


def frame_table(df: pd.DataFrame, cols: Sequence[str], title: str, digits: int = 3) -> Table:
    """A rich table of ``df[cols]``: floats with ``digits`` decimals, everything else as ``str``."""
    t = Table(title=title)
    for c in cols:
        t.add_column(c)
    for _, r in df[list(cols)].iterrows():
        t.add_row(*(f"{v:.{digits}f}" if isinstance(v, float) else str(v) for v in r))
    return t


def command(name: str | None = None, **kwargs: Any) -> Callable[[F], F]:
    """Register a command on :data:`app`; the errors of :data:`USER_ERRORS` it raises are printed as one
    line (``error: ...``) with exit status 2."""

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kw: Any) -> Any:
            try:
                return fn(*args, **kw)
            except typer.Exit:
                raise
            except USER_ERRORS as e:
                fail(str(e) or type(e).__name__)

        app.command(name, **kwargs)(wrapper)
        return fn

    return deco


WaitOpt = Annotated[
    bool,
    typer.Option(
        "--wait",
        help="when another process writes the folder, wait for it (default: exit at once, naming it)",
    ),
]
WaitTimeoutOpt = Annotated[
    float | None, typer.Option("--wait-timeout", help="with --wait: give up after this many seconds")
]
ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force",
        help="break the folder's lock when it was written on another host (make sure that process is gone)",
    ),
]


def writing(folder: Path, wait: bool = False, wait_timeout: float | None = None, force: bool = False) -> Any:
    """Hold ``folder``'s lock (one writer per results folder: :mod:`activations.lock`) in a ``with``."""
    if wait_timeout is not None and wait_timeout < 0:
        fail(f"--wait-timeout must be >= 0, got {wait_timeout}")
    return folder_lock(
        folder,
        wait=wait or wait_timeout is not None,
        timeout=wait_timeout,
        force=force,
        what="results folder",
        on_wait=lambda msg: console.print(f"[yellow]{escape(msg)}[/]", soft_wrap=True),
    )


@app.callback()
def _options(
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            help="PyTorch CPU threads (default: one per core; 1 avoids oversubscribing a busy machine)",
        ),
    ] = None,
) -> None:
    """probe-atlas: cheap safety probes on a model's own activations."""
    if threads is not None:
        if threads < 1:
            fail(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


@command()
def collect(
    data: Annotated[list[str], typer.Option("--data", help="JSONL file (repeatable), 'builtin' or hf:NAME")],
    out: Annotated[Path, typer.Option("--out", help="store directory (one per dataset when several --data)")],
    model: Annotated[
        str, typer.Option("--model", help="smollm2, gemma3-270m, a TL name or an HF folder")
    ] = "smollm2",
    layers: Annotated[str, typer.Option("--layers", help="all | 0,5,9 | 3-7")] = "all",
    hooks: Annotated[
        str, typer.Option("--hooks", help="comma list of resid_post,resid_pre,mlp_out,attn_out")
    ] = "resid_post",
    positions: Annotated[
        str, typer.Option("--positions", help="auto | prompt | response | prompt+response | all")
    ] = "auto",
    max_len: Annotated[int, typer.Option("--max-len")] = 512,
    token_budget: Annotated[int, typer.Option("--token-budget", help="padded tokens per batch")] = 4096,
    store_dtype: Annotated[
        str,
        typer.Option(
            "--store-dtype",
            help="auto | float16 | float32 (auto: the model's preference, float32 for gemma3-270m)",
        ),
    ] = "auto",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print the bytes each store needs and the free space")
    ] = False,
) -> None:
    """Collect per-token activations of chosen hooks into an on-disk activation store."""
    datasets = [load_dataset(d) for d in data]
    m = load_model(model)
    for ds in datasets:
        path = out if len(datasets) == 1 else out / ds.name
        kw: dict[str, Any] = dict(
            hooks=hooks.split(","),
            layers=layers,
            positions=positions,
            max_len=min(max_len, m.cfg.n_ctx),
            token_budget=token_budget,
            store_dtype=store_dtype,
        )
        if dry_run:
            console.print(estimate_collection(m, ds, path, **kw).summary(), soft_wrap=True)
            continue
        store = do_collect(m, ds, path, **kw)
        console.print(f"[green]wrote[/] {store} ({store.nbytes() / 2**20:.1f} MiB)")


@command()
def sweep(
    spec: Annotated[Path, typer.Argument(help="sweep spec YAML (or a name in experiments/configs)")],
    out: Annotated[Path, typer.Option("--out", help="results folder")] = Path("runs/sweep"),
    backend: Annotated[str, typer.Option("--backend", help="local | ray")] = "local",
    address: Annotated[str | None, typer.Option("--address", help="Ray cluster address")] = None,
    plot: Annotated[bool, typer.Option("--plot/--no-plot", help="write the standard figures")] = True,
    png: Annotated[
        bool | None,
        typer.Option("--png/--no-png", help="PNG figures (--png: required; default: where kaleido works)"),
    ] = None,
    wait: WaitOpt = False,
    wait_timeout: WaitTimeoutOpt = None,
    force: ForceOpt = False,
) -> None:
    """Run (or resume) a layer × pooling × probe × C sweep and append to OUT/results.parquet.

    One sweep writes a results folder at a time: a second one exits at once naming the first (or waits,
    --wait). Everything the spec needs (packages, the model, data files, disk space) is checked first."""
    sp, base = load_spec(spec)
    with writing(out, wait, wait_timeout, force):
        df = run_sweep(sp, out, base=base, backend=backend, address=address, png=bool(png and plot))
        _print_headline(df)
        if plot:
            _plot(out, png=png is not False)


@command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="results folder")] = Path("probe-atlas-demo"),
    plot: Annotated[bool, typer.Option("--plot/--no-plot")] = True,
    wait: WaitOpt = False,
    wait_timeout: WaitTimeoutOpt = None,
) -> None:
    """The main job on the embedded default: a real sweep of SmolLM2-135M-Instruct on the built-in data."""
    sp, base = load_spec("demo.yaml")
    with writing(out, wait, wait_timeout):
        df = run_sweep(sp, out, base=base)
        _print_headline(df)
        if plot:
            _plot(out)
    console.print(f"results: {out / 'results.parquet'}")


@command()
def plot(
    results: Annotated[
        Path, typer.Argument(help="a sweep folder (results.parquet) or an attack folder (attack.parquet)")
    ],
    wait: WaitOpt = False,
    wait_timeout: WaitTimeoutOpt = None,
) -> None:
    """Write the standard figures (HTML, and PNG where kaleido works) into DIR/plots/."""
    if not results.is_dir():
        fail(f"{results}: no such folder")
    with writing(results, wait, wait_timeout):
        _plot(results)


@command()
def score(
    probe: Annotated[Path, typer.Option("--probe", help="a saved probe folder")],
    data: Annotated[str, typer.Option("--data", help="JSONL file to score")],
    out: Annotated[Path, typer.Option("--out", help="scores JSONL (id, label, score)")],
    model: Annotated[str | None, typer.Option("--model", help="override the model the probe names")] = None,
) -> None:
    """Score every example of a JSONL with a saved probe (one line per example: id, label, score)."""
    n = score_file(probe, data, out, model_name=model)
    console.print(f"[green]wrote[/] {n} scores to {out}")


def _plot(out: Path, png: bool = True) -> None:
    if (out / "attack.parquet").is_file():  # an attack campaign (probe-atlas attack)
        paths = write_attack_figures(out, png=png)
        console.print(f"[green]wrote[/] {len(paths)} attack figure files under {out / 'plots'}")
        if not (out / "results.parquet").is_file():
            return
    paths = plot_results(out, out, png=png)
    console.print(f"[green]wrote[/] {len(paths)} figure files under {out / 'plots'}")


def _print_headline(df: Any) -> None:
    """The validation-chosen row per (probe, pooling) on each eval set: AUROC, TPR@1%FPR, the FPR the
    threshold realizes on held-out benign data, overhead %; a confounded set (a surface baseline separates
    it) is marked."""
    if df is None or len(df) == 0:
        return
    tab = headline_table(df)
    for eval_set, sub in tab.groupby("eval_set", sort=False):
        over_refusal = bool(sub["auroc"].isna().all()) and "benign_flag_rate_at_1pct_fpr" in sub
        title = "over-refusal (benign-only set)" if over_refusal else "chosen on validation"
        if "confounded" in sub and bool(sub["confounded"].any()):
            surface = float(sub["surface_auroc"].max())
            title += f" — CONFOUNDED: a surface baseline reaches AUROC {surface:.3f}"
        t = Table(title=f"{title} — {eval_set}")
        cols = ["probe", "pooling", "layer", "C"]
        cols += (
            ["benign_flag_rate_at_1pct_fpr"] if over_refusal else ["auroc", "tpr_at_1pct_fpr", "overhead_pct"]
        )
        if not over_refusal and "realized_fpr_at_1pct" in sub:
            cols.insert(-1, "realized_fpr_at_1pct")
        for col in cols:
            t.add_column(
                col.replace("benign_flag_rate_at_1pct_fpr", "flagged @1%FPR thr").replace(
                    "realized_fpr_at_1pct", "FPR on held-out benign"
                ),
                justify="left" if col in ("probe", "pooling") else "right",
            )
        for _, r in sub.iterrows():
            cells = [str(r["probe"]), str(r["pooling"]), str(r["layer"]), f"{r['C']:.3g}"]
            if over_refusal:
                cells.append(f"{r['benign_flag_rate_at_1pct_fpr']:.3f}")
            else:
                cells += [
                    f"{r['auroc']:.3f} [{r['auroc_lo']:.3f}, {r['auroc_hi']:.3f}]",
                    f"{r['tpr_at_1pct_fpr']:.3f}",
                ]
                if "realized_fpr_at_1pct" in cols:
                    cells.append(f"{r['realized_fpr_at_1pct']:.4f}")
                cells.append(f"{r['overhead_pct']:.2g}")
            t.add_row(*cells)
        console.print(t)


@command("kinds")
def list_kinds() -> None:
    """List the probe kinds a sweep spec can name."""
    t = Table(title="probe kinds")
    for col in ("kind", "per layer", "C grid", "params", "description"):
        t.add_column(col)
    for k in sorted(SWEEP_KINDS.values(), key=lambda k: k.name):
        t.add_row(
            k.name,
            "yes" if k.per_layer else "no",
            "yes" if k.uses_C else "no",
            ", ".join(sorted(k.params)),
            k.description,
        )
    console.print(t)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
