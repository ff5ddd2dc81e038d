"""Where the signal lives in each model of a multi-model sweep (a spec whose ``model`` is a list).

:func:`signal_table`: per model, eval set, pooling and probe family, the layer chosen on validation (the
``selected`` rows of :func:`experiments.analysis.selection.annotate`: the one selection rule, so test sets
never choose), shown at its normalized depth (layer / the model's layers) beside its test metrics and cost.
"""

from __future__ import annotations

import pandas as pd

__all__ = ["SIGNAL_COLUMNS", "signal_table"]

#: the table's columns, in order (metric columns the results lack are left out)
SIGNAL_COLUMNS: tuple[str, ...] = (
    "model",
    "eval_set",
    "pooling",
    "probe",
    "layer",
    "model_layers",
    "depth",
    "auroc",
    "auroc_lo",
    "auroc_hi",
    "tpr_at_1pct_fpr",
    "flops_per_token",
    "standalone_flops_per_token",
    "overhead_pct",
    "standalone_overhead_pct",
)


def signal_table(df: pd.DataFrame, eval_set: str | None = None, per_layer_only: bool = True) -> pd.DataFrame:
    """The validation-selected layer of every (model, eval set, pooling, probe) with its depth, test
    metrics and cost; ``per_layer_only`` drops scorers that read no single layer (multi-layer probes, the
    surface baselines). A table without a ``selected`` or ``depth`` column (written before the model axis)
    is an error that says so."""
    missing = [c for c in ("selected", "depth", "model", "layer") if c not in df.columns]
    if missing:
        raise ValueError(
            f"signal_table: the results lack {missing} (annotate them, or rerun the sweep with this version)"
        )
    sel = df[df["selected"].astype(bool)]
    if eval_set is not None:
        sel = sel[sel["eval_set"] == eval_set]
    if per_layer_only:
        sel = sel[pd.to_numeric(sel["layer"], errors="coerce") >= 0]
    cols = [c for c in SIGNAL_COLUMNS if c in sel.columns]
    return sel[cols].sort_values(["eval_set", "pooling", "probe", "model"]).reset_index(drop=True)
