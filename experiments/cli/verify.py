"""``probe-atlas verify STORE|SWEEP_DIR [--deep] [--repair]`` checks activation stores.

Without options it checks every file's size and ``.npy`` header against the manifest and the checksums of
the files written once (metadata arrays, ``examples.jsonl``); ``--deep`` also checks every done batch's
checksum (reads every activation once). It names each damaged file and batch and exits 1 when anything is
damaged (0 when everything is sound, 2 when the path holds no store). ``--repair`` re-extends truncated
files, rewrites damaged headers and marks the damaged batches not done, so that the next ``probe-atlas
collect`` (or the sweep) re-collects exactly those; damaged metadata files are rebuilt by that collection,
which has the data. For a sweep folder every store under ``OUT/stores/`` is checked. Do not run
``--repair`` while a collection is writing the same store (both write its manifest).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from activations.store import ActivationStore, StoreError, verify_store
from experiments.cli.main import command, console


def find_stores(path: Path) -> list[Path]:
    """The store at ``path``, or every store under ``path/stores/`` (a sweep folder), or every store directly
    under ``path``."""
    if (path / "manifest.json").exists():
        return [path]
    for root in (path / "stores", path):
        if root.is_dir():
            found = sorted(p for p in root.iterdir() if (p / "manifest.json").exists())
            if found:
                return found
    return []


@command("verify")
def verify(
    path: Annotated[Path, typer.Argument(help="a store, or a sweep folder (checks OUT/stores/*)")],
    deep: Annotated[
        bool, typer.Option("--deep", help="also check every batch's checksum (reads all activations)")
    ] = False,
    repair: Annotated[
        bool,
        typer.Option("--repair", help="mark damaged batches not done and fix sizes / headers in place"),
    ] = False,
) -> None:
    """Check activation stores against their manifests; name every damaged file and batch."""
    stores = find_stores(path)
    if not stores:
        console.print(
            f"[bold red]error:[/] {escape(str(path))}: no activation store here (no manifest.json)",
            soft_wrap=True,
        )
        raise typer.Exit(2)
    n_damaged = 0
    for p in stores:
        try:
            report = verify_store(p, deep=deep)
        except StoreError as e:
            console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
            n_damaged += 1
            continue
        colour = "green" if report.ok else "bold red"
        head = "OK" if report.ok else f"DAMAGED: {len(report.damaged_files)} file(s)"
        what = f"{report.batches_checked} batch checksums checked" if deep else "sizes and metadata checked"
        console.print(f"[{colour}]{head}[/] {escape(str(p))} ({what})", soft_wrap=True)
        for d in report.damage:
            console.print(f"  damaged: {escape(str(d))}", soft_wrap=True)
        for n in report.notes:
            console.print(f"  note: {escape(n)}", soft_wrap=True)
        if report.ok:
            continue
        n_damaged += 1
        if not repair:
            console.print(
                f"  run `probe-atlas verify {escape(str(p))} --repair` (or rerun the collection / sweep, "
                "which repairs it itself), then rerun the collection to re-collect the damaged batches",
                soft_wrap=True,
            )
            continue
        try:
            store = ActivationStore.open(p, require_complete=False, check=False)
            done = store.repair(report)
        except StoreError as e:
            console.print(f"  [bold red]cannot repair:[/] {escape(str(e))}", soft_wrap=True)
            continue
        console.print(
            f"  repaired: {len(done.undone)} batch(es) marked not done"
            + (f" {done.undone[:20]}" if done.undone else ""),
            soft_wrap=True,
        )
        if done.needs_collect:
            console.print(
                f"  {', '.join(done.needs_collect)}: only a collection with the same data can rebuild "
                "(it checks the rebuilt bytes against the recorded checksums)",
                soft_wrap=True,
            )
        console.print(
            "  now rerun the same `probe-atlas collect` (or the sweep) to re-collect them", soft_wrap=True
        )
    if n_damaged:
        raise typer.Exit(1)
