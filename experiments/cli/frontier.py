"""``probe-atlas frontier DIR`` prints the cost frontier of a sweep and the seed claims."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pandas as pd
import typer
from rich.table import Table

from experiments.analysis.frontier import claims_table, frontier_summary
from experiments.cli.main import WaitOpt, WaitTimeoutOpt, command, console, fail, writing
from experiments.sweep.results import read_results


@command("frontier")
def frontier(
    results: Annotated[Path, typer.Argument(help="a sweep folder with results.parquet")],
    eval_set: Annotated[
        list[str] | None, typer.Option("--eval-set", help="eval set(s) (default: every one)")
    ] = None,
    wait: WaitOpt = False,
    wait_timeout: WaitTimeoutOpt = None,
) -> None:
    """Per eval set: every scorer's AUROC, TPR@1%FPR and FLOPs (Pareto points starred), and whether
    each seed claim holds. Writes DIR/frontier.csv and DIR/claims.csv."""
    if not results.is_dir():
        fail(f"{results}: no such folder")
    with writing(results, wait, wait_timeout):
        _frontier(results, eval_set)


def _frontier(results: Path, eval_set: list[str] | None) -> None:
    df = read_results(results)
    if df.empty:
        fail(f"{results} has no results")
    sets = eval_set or list(dict.fromkeys(df["eval_set"].astype(str)))
    fronts, claims = [], []
    for name in sets:
        try:
            summ = frontier_summary(df, name)
            cl = claims_table(df, name)
        except ValueError as e:
            fail(str(e))
        fronts.append(summ.assign(eval_set=name))
        claims.append(cl.assign(eval_set=name))
        t = Table(title=f"cost frontier -- {name}")
        for col in ("", "probe", "variant / layer", "AUROC", "TPR@1%", "MFLOPs/token", "overhead %"):
            t.add_column(col)
        for _, r in summ.iterrows():
            where = str(r.get("variant") or "") or (f"L{int(r['layer'])} {r['pooling']}")
            t.add_row(
                "*" if r["pareto"] else "",
                str(r["probe"]),
                where,
                f"{r['auroc']:.3f}",
                f"{r['tpr_at_1pct_fpr']:.3f}",
                f"{r['flops_per_token'] / 1e6:.4g}",
                f"{r['overhead_pct']:.3g}",
            )
        console.print(t)
        for _, c in cl.iterrows():
            verdict = {True: "[green]holds[/]", False: "[red]does not hold[/]", None: "[yellow]n/a[/]"}
            console.print(f"- {c['claim']}: {verdict[c['holds']]}\n  {c['figures']}")
    pd.concat(fronts).to_csv(results / "frontier.csv", index=False)
    pd.concat(claims).to_csv(results / "claims.csv", index=False)
    console.print(f"[green]wrote[/] {results / 'frontier.csv'} and {results / 'claims.csv'}")
