"""Selection on validation only: the rule, the table annotation, the figures, and a whole sweep whose test
labels are permuted (no selection, plot point or saved probe may change)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file

from experiments.analysis.selection import annotate, pick, selection_summary
from experiments.sweep.engine import run_sweep
from experiments.viz import results as plots
from probes.selection import Selection, select_best, select_scores, tie_order, val_metrics
from tests.test_sweep import _spec


# ----------------------------------------------------------------------------------------------- the rule
def test_tie_order_and_primary() -> None:
    assert tie_order() == ("tpr_at_1pct_fpr", "log_auroc", "auroc")
    assert tie_order("auroc") == ("auroc", "tpr_at_1pct_fpr", "log_auroc")
    with pytest.raises(ValueError, match="unknown selection metric"):
        tie_order("accuracy")


def test_select_best_breaks_ties_in_order() -> None:
    c = [
        {"tpr_at_1pct_fpr": 0.9, "log_auroc": 0.5, "auroc": 0.99},
        {"tpr_at_1pct_fpr": 0.9, "log_auroc": 0.7, "auroc": 0.95},  # wins the first tie-break
        {"tpr_at_1pct_fpr": 0.8, "log_auroc": 0.9, "auroc": 1.0},
    ]
    sel = select_best(c)
    assert (sel.index, sel.n_tied, sel.n_tied_all, sel.value) == (1, 2, 1, 0.9)
    # AUROC as the primary metric picks the saturated one
    assert select_best(c, "auroc").index == 2
    # every metric tied: the cheaper candidate, then the earlier one
    same = [{"tpr_at_1pct_fpr": 1.0, "log_auroc": 1.0, "auroc": 1.0}] * 3
    assert select_best(same, costs=[5.0, 1.0, 1.0]).index == 1
    assert select_best(same).index == 0 and select_best(same).n_tied_all == 3
    # NaN (a figure the validation set cannot resolve) ranks below any number
    assert select_best([{"tpr_at_1pct_fpr": math.nan}, {"tpr_at_1pct_fpr": 0.0}]).index == 1


def test_val_metrics_resolve_only_what_the_set_can() -> None:
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(50), np.zeros(150)]
    s = y * 2 + rng.normal(size=200)
    m = val_metrics(y, s)
    assert 0.8 < m["auroc"] <= 1 and 0 <= m["tpr_at_1pct_fpr"] <= 1 and 0 < m["log_auroc"] <= 1
    few = val_metrics(y[:80], s[:80])  # 30 negatives cannot resolve 1% FPR
    assert math.isnan(few["tpr_at_1pct_fpr"]) and not math.isnan(few["auroc"])
    sel = select_scores(y, [s, -s, s * 2])
    assert isinstance(sel, Selection) and sel.index == 0 and sel.n_tied == 2  # s and 2s rank identically


# ------------------------------------------------------------------------------------------ the table
def _table(rng: np.random.Generator) -> pd.DataFrame:
    rows = []
    for probe in ("logistic_l2", "embedding", "tfidf"):
        for pooling in ("mean", "max"):
            for layer in range(5):
                vt, va = rng.uniform(0.3, 0.9), rng.uniform(0.9, 1.0)
                for es in ("a", "b"):
                    rows.append(
                        {
                            "run_id": f"{probe}-{pooling}-{layer}",
                            "model": "m",
                            "probe": probe,
                            "pooling": pooling,
                            "hook": "resid_post",
                            "layer": layer,
                            "eval_set": es,
                            "auroc": rng.uniform(0.5, 1.0) if probe == "logistic_l2" else 0.96 * (es == "a"),
                            "tpr_at_1pct_fpr": rng.uniform(0, 1),
                            "val_tpr_at_1pct_fpr": round(vt, 1),  # coarse: ties happen
                            "val_log_auroc": va - 0.3,
                            "val_auroc": va,
                            "select_metric": "tpr_at_1pct_fpr",
                            "flops_per_token": 100.0 + layer,
                        }
                    )
    return pd.DataFrame(rows)


def test_annotate_selects_one_row_per_group_on_validation_only() -> None:
    rng = np.random.default_rng(1)
    df = annotate(_table(rng))
    sel = df[df.selected]
    assert (sel.groupby(["probe", "pooling", "eval_set"]).size() == 1).all()
    assert sel.groupby(["probe", "pooling", "eval_set"]).ngroups == 12
    # the same run is chosen on every eval set (validation metrics are the run's)
    assert (sel.groupby(["probe", "pooling"])["run_id"].nunique() == 1).all()
    # each choice is the validation rule's
    for _, g in df[df.eval_set == "a"].groupby(["probe", "pooling"]):
        g = g.sort_values("layer").reset_index(drop=True)
        want = select_best(
            [{m: r[f"val_{m}"] for m in tie_order()} for _, r in g.iterrows()], costs=list(g.flops_per_token)
        )
        assert g.loc[g.selected, "layer"].item() == g.loc[want.index, "layer"]
    # permuting every test metric (and the row order) leaves every selection unchanged
    perm = _table(np.random.default_rng(1))
    for col in ("auroc", "tpr_at_1pct_fpr"):
        perm[col] = np.random.default_rng(7).permutation(perm[col].to_numpy())
    perm = annotate(perm.sample(frac=1.0, random_state=3))
    key = ["run_id", "eval_set"]
    a = df.set_index(key)["selected"].sort_index()
    b = perm.set_index(key)["selected"].sort_index()
    assert a.equals(b)
    # confounded: a surface baseline reaches AUROC 0.95 on set a, not on b
    assert (
        df.loc[df.eval_set == "a", "confounded"].all() and not df.loc[df.eval_set == "b", "confounded"].any()
    )
    summary = selection_summary(df)
    assert summary["layer_selections"] == 6 and 0 <= summary["layer_selections_tied_on_primary"] <= 6


def test_pick_and_plots_show_the_validation_choice_not_the_test_best() -> None:
    df = pd.DataFrame(
        {
            "run_id": ["r1", "r2"],
            "probe": ["logistic_l2"] * 2,
            "pooling": ["mean"] * 2,
            "layer": [3, 3],
            "C": [0.01, 1.0],
            "eval_set": ["t"] * 2,
            "auroc": [0.99, 0.80],  # the test prefers C = 0.01 ...
            "val_tpr_at_1pct_fpr": [0.5, 0.9],  # ... validation prefers C = 1
            "val_log_auroc": [0.5, 0.5],
            "val_auroc": [0.9, 0.9],
            "select_metric": ["tpr_at_1pct_fpr"] * 2,
            "flops_per_token": [1153.0, 1153.0],
        }
    )
    assert pick(df, ["probe", "pooling", "layer"])["C"].item() == 1.0
    fig = plots.auroc_by_layer(df)
    assert fig.data[0].y[0] == 0.80 and fig.data[0].customdata[0][0] == "1"
    fig = plots.layer_pooling_heatmap(df, eval_set="t")
    assert fig.data[0].z[0][0] == 0.80


def test_cost_frontier_draws_every_family_including_rows_without_c() -> None:
    """Per-token kinds have no C (NaN): they used to lose their cost in the plot (x = NaN)."""
    rows = []
    for i, (probe, pooling, c) in enumerate(
        [
            ("logistic_l2", "mean", 0.1),
            ("token_ema", "mean->ema0.5", math.nan),
            ("multimax", "multimax4h", math.nan),
        ]
    ):
        rows.append(
            {
                "run_id": f"r{i}",
                "probe": probe,
                "pooling": pooling,
                "layer": 9,
                "C": c,
                "eval_set": "t",
                "auroc": 0.9 + i / 100,
                "val_tpr_at_1pct_fpr": 0.5,
                "select_metric": "tpr_at_1pct_fpr",
                "flops_per_token": 1000.0 * (i + 1),
            }
        )
    fig = plots.cost_frontier(pd.DataFrame(rows), eval_set="t")
    pts = [t for t in fig.data if getattr(t, "meta", None) == {"role": "points"}]
    assert {t.name for t in pts} == {"logistic_l2", "token_ema", "multimax"}
    assert all(np.isfinite(np.asarray(t.x, dtype=float)).all() for t in pts)


# ------------------------------------------------------------------------------ a sweep, test permuted
def _permuted_spec(tmp_path, permute: bool):
    spec = _spec(tmp_path, probes=[{"kind": "logistic_l2"}, {"kind": "diffmeans"}], poolings=["mean", "max"])
    if permute:  # the same test examples, their labels shuffled
        from activations.data import load_jsonl

        heldout = load_jsonl(tmp_path / "planted.jsonl")
        labels = np.random.default_rng(5).permutation([e.label for e in heldout if e.split == "test"])
        it = iter(labels)
        out = [
            e.__class__(**{**e.__dict__, "label": float(next(it))}) if e.split == "test" else e
            for e in heldout
        ]
        from activations.data import PromptDataset

        PromptDataset(out, name="planted").to_jsonl(tmp_path / "planted.jsonl")
    return spec


def _figure_points(fig, cols: list[int]) -> list:
    """What each trace shows, without test values or run ids: name, x, and the hover columns ``cols``."""
    pts = []
    for t in fig.data:
        if t.type == "heatmap":
            pts.append(("heatmap", np.asarray(t.customdata)[..., :2].tolist()))
        elif t.customdata is not None and t.x is not None:
            cd = np.asarray(t.customdata, dtype=object)
            pts.append((t.name, [str(x) for x in t.x], [[str(r[c]) for c in cols] for r in cd]))
    return pts


def test_permuting_test_labels_changes_no_selection_plot_point_or_saved_probe(tmp_path, tiny_model) -> None:
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    spec = _permuted_spec(a_dir, permute=False)
    a = run_sweep(spec, a_dir / "out", base=a_dir, model=tiny_model, progress=False)
    spec_b = _permuted_spec(b_dir, permute=True)
    b = run_sweep(spec_b, b_dir / "out", base=b_dir, model=tiny_model, progress=False)
    assert not np.allclose(
        a.loc[a.eval_set == "heldout", "auroc"].to_numpy(float),
        b.loc[b.eval_set == "heldout", "auroc"].to_numpy(float),
    )  # the test metrics did change
    key = ["probe", "pooling", "layer", "eval_set"]
    cols = [*key, "C", "selected", "val_tpr_at_1pct_fpr", "val_auroc"]
    sa = a[cols].sort_values(key).reset_index(drop=True)
    sb = b[cols].sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(sa, sb)
    # the saved probes are the same tensors
    for (_, ra), (_, rb) in zip(
        a[a.eval_set == "heldout"].sort_values(key).iterrows(),
        b[b.eval_set == "heldout"].sort_values(key).iterrows(),
        strict=True,
    ):
        if not ra["probe_path"] or ra["probe"] == "tfidf":
            continue
        ta, tb = (
            load_file(f"{ra['probe_path']}/probe.safetensors"),
            load_file(f"{rb['probe_path']}/probe.safetensors"),
        )
        assert ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)
    # every figure shows the same points (which run, C, layer, cost), only their test values differ
    for fn, cols in (
        (lambda d: plots.auroc_by_layer(d, eval_set="heldout"), [0, 1]),  # C, candidates
        (lambda d: plots.layer_pooling_heatmap(d, eval_set="heldout"), []),  # probe, C
        (
            lambda d: plots.cost_frontier(d, eval_set="heldout"),
            [0, 1, 2, 3, 5],
        ),  # name, pooling, layer, C, cost
    ):
        pa, pb = _figure_points(fn(a), cols), _figure_points(fn(b), cols)
        assert pa and pa == pb
