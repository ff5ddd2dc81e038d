"""The cost frontier of a sweep and the seed papers' claims checked against it.

:func:`frontier_summary` lists every scorer of one eval set (per-layer probes at their best C, fine-tuned
layers, standalone classifiers, ensembles, cascade points) with its metrics, per-token FLOPs and whether it
is on the AUROC-vs-FLOPs Pareto front. :func:`claims_table` states, with figures, whether each claim holds:

1. a fine-tuned final layer beats a standalone classifier a quarter the size of the policy model;
2. a linear probe matches a small standalone classifier at almost no cost;
3. a probe → classifier cascade keeps the classifier's detection at a fraction of its cost.

Every row compared is chosen on *validation* (:mod:`experiments.analysis.selection`): the layer, C and seed
of a probe, the cascade's operating point (the cheapest escalation rate whose *validation* metrics match
stage 2's); test metrics only report what the chosen rows achieve.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from experiments.analysis.selection import pick

__all__ = ["CLAIMS", "claims_table", "frontier_summary"]

CLAIMS = (
    "a fine-tuned final layer beats a standalone classifier ~1/4 the policy model's size",
    "a linear probe matches a small standalone classifier at almost no cost",
    "a probe → classifier cascade matches the classifier at a fraction of its cost",
)

_COLS = [
    "probe",
    "variant",
    "pooling",
    "layer",
    "auroc",
    "auroc_lo",
    "auroc_hi",
    "tpr_at_1pct_fpr",
    "flops_per_token",
    "overhead_pct",
    "standalone_overhead_pct",
    "clf_params",
    "escalation_rate",
    "run_id",
]


def pareto_front(points: pd.DataFrame, x: str = "flops_per_token", y: str = "auroc") -> pd.DataFrame:
    """The rows not dominated by another row, sorted by ``x`` (cost) ascending.

    Row q dominates row p when ``q[x] <= p[x]`` and ``q[y] >= p[y]`` with at least one strict (lower cost
    is better, higher metric is better). Exact ties are all kept. Rows with NaN in ``x`` or ``y`` are
    ignored. The original index is kept.
    """
    missing = [c for c in (x, y) if c not in points.columns]
    if missing:
        raise ValueError(f"pareto_front: missing required column(s) {missing}")
    xs = pd.to_numeric(points[x], errors="coerce")
    ys = pd.to_numeric(points[y], errors="coerce")
    ok = xs.notna() & ys.notna()
    if not ok.any():
        return points.iloc[0:0]
    xv, yv = xs[ok].to_numpy(float), ys[ok].to_numpy(float)
    index = points.index[ok.to_numpy()]
    unique_x, group = np.unique(xv, return_inverse=True)
    group_max = np.full(len(unique_x), -np.inf)
    np.maximum.at(group_max, group, yv)
    # the best metric among strictly cheaper points, for each distinct cost
    cheaper_max = np.concatenate([[-np.inf], np.maximum.accumulate(group_max)[:-1]])
    keep = (yv == group_max[group]) & (yv > cheaper_max[group])
    order = np.lexsort((-yv[keep], xv[keep]))
    return points.loc[index[keep][order]]


def _one_set(df: pd.DataFrame, eval_set: str) -> pd.DataFrame:
    sub = df[df["eval_set"].astype(str) == eval_set]
    if sub.empty:
        raise ValueError(
            f"no rows for eval_set={eval_set!r}; the table has {sorted(df['eval_set'].unique())}"
        )
    return sub


def frontier_summary(df: pd.DataFrame, eval_set: str) -> pd.DataFrame:
    """Every point of the AUROC-vs-FLOPs plot of ``eval_set`` (one validation-chosen row per probe ×
    variant × pooling × layer × escalation rate), cheapest first, with a ``pareto`` flag (the front of the
    test AUROCs of those points)."""
    sub = _one_set(df, eval_set).copy()
    if "variant" not in sub:
        sub["variant"] = ""
    sub["variant"] = sub["variant"].fillna("").astype(str)
    pts = pick(sub, ["probe", "variant", "pooling", "layer", "escalation_rate"])
    pts = pts.sort_values(["flops_per_token", "auroc"], ascending=[True, False]).reset_index(drop=True)
    front = pareto_front(pts.assign(_x=pts["flops_per_token"]), x="_x", y="auroc")
    pts["pareto"] = pts.index.isin(front.index)
    return pts[[c for c in [*_COLS, "pareto"] if c in pts.columns]]


def _pick(rows: pd.DataFrame) -> pd.Series | None:
    """The validation-chosen row of ``rows`` (None when empty)."""
    return None if rows.empty else pick(rows, []).iloc[0]


def _fmt(r: pd.Series) -> str:
    name = f"{r['probe']}" + (
        f" {r['variant']}" if isinstance(r.get("variant"), str) and r["variant"] else ""
    )
    if (
        r["probe"] not in ("finetune", "standalone", "tfidf", "prompted", "ensemble", "cascade")
        and r["layer"] >= 0
    ):
        name += f" L{int(r['layer'])} {r['pooling']}"
    return (
        f"{name}: AUROC {r['auroc']:.3f}, TPR@1% {r['tpr_at_1pct_fpr']:.3f}, "
        f"{r['flops_per_token'] / 1e6:.3g} MFLOPs/token ({r['overhead_pct']:.3g}% of the forward pass)"
    )


def _matches(rows: pd.DataFrame, ref: pd.Series, prefix: str, tol: float) -> pd.Series:
    """Rows whose ``<prefix>tpr_at_1pct_fpr`` and ``<prefix>auroc`` are within ``tol`` of ``ref``'s."""
    ok = pd.Series(True, index=rows.index)
    for m in ("tpr_at_1pct_fpr", "auroc"):
        c = prefix + m
        if c in rows.columns and c in ref.index and pd.notna(ref[c]):
            ok &= pd.to_numeric(rows[c], errors="coerce") >= float(ref[c]) - tol
    return ok


def claims_table(df: pd.DataFrame, eval_set: str, tol: float = 0.01) -> pd.DataFrame:
    """One row per seed claim: the comparison, its figures and whether it holds (None: not measurable).

    ``tol`` is the AUROC / TPR slack within which two scorers "match"."""
    sub = _one_set(df, eval_set)
    if "variant" not in sub:
        sub = sub.assign(variant="")
    out: list[dict[str, Any]] = []

    ft = sub[sub["probe"] == "finetune"]
    k1 = ft[ft["variant"].fillna("").astype(str).str.startswith("k=1 ")]
    sa = sub[sub["probe"] == "standalone"]
    n_layers = sa["variant"].fillna("").astype(str).str.extract(r"\[:(\d+)\]")[0].astype(float)
    policy_sa = sa[n_layers.notna()]
    if len(policy_sa) and "n_layers_model" in sub:
        quarter = float(sub["n_layers_model"].dropna().iloc[0]) / 4
    else:
        quarter = float(n_layers.max()) if n_layers.notna().any() else 0.0
    if len(policy_sa):  # the policy-model classifier closest to a quarter of the model's layers
        closest = (n_layers[policy_sa.index] - quarter).abs()
        policy_sa = policy_sa[closest == closest.min()]
    ft_best, sa_best = _pick(k1 if len(k1) else ft), _pick(policy_sa)
    if ft_best is not None and sa_best is not None:
        holds = bool(ft_best["auroc"] >= sa_best["auroc"])
        out.append(
            {
                "claim": CLAIMS[0],
                "figures": f"{_fmt(ft_best)} vs {_fmt(sa_best)}",
                "holds": holds,
            }
        )
    else:
        out.append({"claim": CLAIMS[0], "figures": "missing", "holds": None})

    lin_kinds = {"logistic_l2", "logistic_l1", "logistic_elasticnet", "diffmeans", "lda"}
    lb = _pick(sub[sub["probe"].isin(lin_kinds)])
    if lb is not None and len(sa):
        small = sa.sort_values("flops_per_token").iloc[0]
        holds = bool(lb["auroc"] >= small["auroc"] - tol and lb["overhead_pct"] < 0.1)
        out.append(
            {
                "claim": CLAIMS[1],
                "figures": f"{_fmt(lb)} vs {_fmt(small)}",
                "holds": holds,
            }
        )
    else:
        out.append({"claim": CLAIMS[1], "figures": "missing", "holds": None})

    cas = sub[sub["probe"] == "cascade"]
    if len(cas) and "stage2_run_id" in cas:
        for s2_id, grp in cas.groupby("stage2_run_id"):
            s2 = sub[sub["run_id"] == s2_id]
            if s2.empty:
                continue
            s2r = s2.iloc[0]
            # the operating point is chosen on validation: the cheapest rate matching stage 2 there
            ok = grp[_matches(grp, s2r, "val_", tol)]
            if ok.empty or float(ok.sort_values("flops_per_token").iloc[0]["escalation_rate"]) >= 1.0:
                out.append(
                    {
                        "claim": CLAIMS[2],
                        "figures": f"no escalation rate below 1 matches {_fmt(s2r)} on validation",
                        "holds": False,
                    }
                )
                continue
            best = ok.sort_values("flops_per_token").iloc[0]
            on_test = bool(_matches(best.to_frame().T, s2r, "", tol).iloc[0])
            ratio = float(s2r["flops_per_token"]) / float(best["flops_per_token"])
            alone = " (stage 1 alone already matches)" if best["escalation_rate"] == 0 else ""
            out.append(
                {
                    "claim": CLAIMS[2],
                    "figures": (
                        f"cheapest cascade matching stage 2 on validation: escalation rate "
                        f"{best['escalation_rate']:g}{alone} "
                        f"(control {best.get('escalation_rate_control', np.nan):.3f})"
                        f" -- {_fmt(best)}; stage 2 alone: {_fmt(s2r)}; {ratio:.1f}x cheaper; "
                        f"{'matches' if on_test else 'does not match'} stage 2 on the test set"
                    ),
                    "holds": on_test,
                }
            )
    else:
        out.append({"claim": CLAIMS[2], "figures": "missing", "holds": None})
    return pd.DataFrame(out)
