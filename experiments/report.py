"""Tables drawn from a sweep's results: the headline table (the validation-chosen row per probe × pooling)."""

from __future__ import annotations

import pandas as pd

from experiments.selection import pick

#: one headline row per these columns (those present)
HEADLINE_KEYS = ["eval_set", "model", "probe", "variant", "pooling", "hook"]


def headline_table(df: pd.DataFrame, select: str | None = None) -> pd.DataFrame:
    """Per eval set, probe kind and pooling (and variant, hook, model where present): the row chosen on
    *validation* (:mod:`experiments.selection`: the layer, seed and C), never on the test metrics.

    ``select`` names the primary validation metric (``tpr_at_1pct_fpr``, ``log_auroc``, ``auroc``, or the
    ``val_*`` column); default: the table's ``select_metric``. Rows are ordered by eval set (as in the table)
    and, for reading, by test AUROC.
    """
    if len(df) == 0:
        raise ValueError("results table is empty")
    primary = select.removeprefix("val_") if select else None
    best = pick(df, HEADLINE_KEYS, primary).drop(columns="n_rows")
    order = {k: i for i, k in enumerate(dict.fromkeys(df["eval_set"]))}
    best = best.assign(_o=best["eval_set"].map(order)).sort_values(["_o", "auroc"], ascending=[True, False])
    return best.drop(columns="_o").reset_index(drop=True)
