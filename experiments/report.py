"""Tables drawn from a sweep's results: the headline table (best layer per probe × pooling)."""

from __future__ import annotations

import pandas as pd


def headline_table(df: pd.DataFrame, select: str | None = None) -> pd.DataFrame:
    """Per eval set, probe kind and pooling: the layer chosen by the *validation* metric (never the test).

    ``select`` is the validation column (default: the first ``val_*`` column of the table); ties are broken
    by ``val_log_auroc`` (low-FPR performance on validation), then by the lower cost.
    """
    if len(df) == 0:
        raise ValueError("results table is empty")
    if select is None:
        vals = [c for c in df.columns if c.startswith("val_")]
        if not vals:
            raise ValueError("results table has no validation column (val_*)")
        select = vals[0]
    keys = ["eval_set", "probe", "pooling"]
    tie = ["val_log_auroc"] if "val_log_auroc" in df.columns and select != "val_log_auroc" else []
    ordered = df.sort_values(
        [*keys, select, *tie, "flops_per_token"],
        ascending=[True, True, True, False, *[False] * len(tie), True],
    )
    best = ordered.groupby(keys, sort=False).head(1)
    order = {k: i for i, k in enumerate(dict.fromkeys(df["eval_set"]))}
    best = best.assign(_o=best["eval_set"].map(order)).sort_values(["_o", "auroc"], ascending=[True, False])
    return best.drop(columns="_o").reset_index(drop=True)
