"""The frontier kinds in a sweep: fine-tuned layers, standalone classifiers, TF-IDF, prompted, ensembles and
cascades on a tiny model, end to end (rows, costs, saved scores, resume)."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.analysis.frontier import claims_table, frontier_summary
from experiments.sweep.engine import run_sweep
from experiments.sweep.results import load_run_scores
from experiments.sweep.spec import SpecError
from tests.test_sweep import _spec

LIN = {"kind": "logistic_l2", "pooling": "mean", "layer": "best"}
FT = {"kind": "finetune", "params": {"k": 1, "epochs": 2, "lr": 1e-3, "mode": "lora", "rank": 2}}


def _frontier_spec(tmp_path, **over):
    probes = [
        {"kind": "logistic_l2"},
        FT,
        {"kind": "standalone", "params": {"model": "policy", "n_layers": 1, "epochs": 1}},
        {"kind": "tfidf"},
        {"kind": "prompted"},
        {"kind": "ensemble", "params": {"members": [LIN, FT], "weights": [0.55, 0.45]}},
        {"kind": "ensemble", "params": {"members": [LIN, {"kind": "tfidf"}], "method": "stack"}},
        {"kind": "cascade", "params": {"stage1": LIN, "stage2": FT, "rates": [0.0, 0.2, 1.0]}},
    ]
    return _spec(tmp_path, keep="all", poolings=["mean", "max"], probes=probes, **over)


def test_frontier_kinds_in_a_sweep(tmp_path, tiny_model) -> None:
    spec = _frontier_spec(tmp_path)
    out = tmp_path / "out"
    df = run_sweep(spec, out, base=tmp_path, model=tiny_model, progress=False)
    kinds = set(df["probe"])
    assert {"logistic_l2", "finetune", "standalone", "tfidf", "prompted", "ensemble", "cascade"} <= kinds
    held = df[df.eval_set == "heldout"]
    # the planted trigger word: the trained scorers find it
    for kind in ("finetune", "standalone", "tfidf"):
        assert held.loc[held.probe == kind, "auroc"].iloc[0] > 0.85, kind
    # fine-tuned k=1 reads the layer before the last and costs one block + norm + head
    ft = held[held.probe == "finetune"].iloc[0]
    assert ft["layer"] == 1 and ft["variant"] == "k=1 lora" and ft["n_trainable"] > 0
    assert 0 < ft["overhead_pct"] < ft["standalone_overhead_pct"]
    # a cascade's cost interpolates its stages; rate 1 equals stage 2 alone, rate 0 stage 1 alone
    cas = held[held.probe == "cascade"].sort_values("escalation_rate")
    assert list(cas["escalation_rate"]) == [0.0, 0.2, 1.0]
    assert cas["flops_per_token"].is_monotonic_increasing
    s1 = load_run_scores(out, cas["stage1_run_id"].iloc[0])
    s2 = load_run_scores(out, cas["stage2_run_id"].iloc[0])
    assert s1 is not None and s2 is not None
    lin_row = held[held.run_id == cas["stage1_run_id"].iloc[0]].iloc[0]
    ft_row = held[held.run_id == cas["stage2_run_id"].iloc[0]].iloc[0]
    assert cas["auroc"].iloc[0] == pytest.approx(lin_row["auroc"])
    assert cas["auroc"].iloc[-1] == pytest.approx(ft_row["auroc"])
    assert cas["tpr_at_1pct_fpr"].iloc[-1] == pytest.approx(ft_row["tpr_at_1pct_fpr"])
    assert cas["flops_per_token"].iloc[0] == pytest.approx(lin_row["flops_per_token"])
    assert cas["flops_per_token"].iloc[-1] == pytest.approx(
        lin_row["flops_per_token"] + ft_row["flops_per_token"]
    )
    # the ensemble's cost is the sum of its members'
    ens = held[(held.probe == "ensemble") & (held.pooling == "zscore")].iloc[0]
    assert ens["flops_per_token"] == pytest.approx(lin_row["flops_per_token"] + ft_row["flops_per_token"])
    assert "finetune" in ens["variant"]
    # standalone classifiers pay their own forward pass in both views
    sa = held[held.probe == "standalone"].iloc[0]
    assert sa["flops_per_token"] == sa["standalone_flops_per_token"] and sa["variant"] == "tiny[:1]"
    # every fitted run kept its scores; a rerun fits nothing new
    for rid in df.loc[df.probe != "cascade", "run_id"].unique():
        assert load_run_scores(out, rid) is not None
    again = run_sweep(spec, out, base=tmp_path, model=tiny_model, progress=False)
    assert len(again) == len(df)
    # the summary tables
    summ = frontier_summary(df, "heldout")
    assert {"probe", "variant", "auroc", "tpr_at_1pct_fpr", "flops_per_token", "pareto"} <= set(summ.columns)
    # one point per scorer configuration, each the row chosen on validation
    keys = ["probe", "variant", "pooling", "layer", "escalation_rate"]
    assert not summ.duplicated(keys).any()
    sel = df[(df.eval_set == "heldout") & df.selected]
    for _, p in summ[summ.layer < 0].iterrows():
        if p["probe"] != "cascade":  # one row per layer-less scorer: its selected row
            assert sel[(sel.probe == p.probe) & (sel.pooling == p.pooling)]["auroc"].isin([p.auroc]).any()
    # the Pareto flags: a point is on the front iff no cheaper-or-equal point beats it (brute force)
    c, a = summ["flops_per_token"].to_numpy(float), summ["auroc"].to_numpy(float)
    brute = [
        bool(a[i] == a[c == c[i]].max() and (a[c < c[i]].max(initial=-np.inf) < a[i]))
        for i in range(len(summ))
    ]
    assert summ["pareto"].tolist() == brute and any(brute)
    claims = claims_table(df, "heldout")
    assert len(claims) == 3
    # claim 1: fine-tuned k=1 vs the policy classifier closest to a quarter of the model, both chosen on val
    assert "finetune k=1" in claims.iloc[0]["figures"] and "tiny[:1]" in claims.iloc[0]["figures"]
    ft1 = held[held.variant.astype(str).str.startswith("k=1")]
    sa1 = held[held.variant == "tiny[:1]"]
    assert claims.iloc[0]["holds"] == bool(ft1["auroc"].iloc[0] >= sa1["auroc"].iloc[0])
    # claim 3: the operating point is the cheapest rate matching stage 2 on *validation*; holds if it also
    # matches on the test set
    ok = np.ones(len(cas), bool)
    for m in ("tpr_at_1pct_fpr", "auroc"):  # a metric validation cannot resolve (NaN) is not compared
        if np.isfinite(ft_row[f"val_{m}"]):
            ok &= (cas[f"val_{m}"] >= ft_row[f"val_{m}"] - 0.01).to_numpy()
    ok = cas[ok]
    pick = ok.sort_values("flops_per_token").iloc[0]
    if pick["escalation_rate"] >= 1.0:
        assert claims.iloc[2]["holds"] is False
    else:
        want = bool(
            pick.tpr_at_1pct_fpr >= ft_row.tpr_at_1pct_fpr - 0.01 and pick.auroc >= ft_row.auroc - 0.01
        )
        assert claims.iloc[2]["holds"] == want
        assert f"escalation rate {pick['escalation_rate']:g}" in claims.iloc[2]["figures"]


def test_frontier_spec_errors(tmp_path, tiny_model) -> None:
    spec = _spec(tmp_path, probes=[{"kind": "ensemble", "params": {"members": [LIN]}}])
    with pytest.raises(SpecError, match="at least two"):
        run_sweep(spec, tmp_path / "o1", base=tmp_path, model=tiny_model, progress=False)
    bad = {"kind": "logistic_l2", "layer": 7}
    spec = _spec(tmp_path, probes=[{"kind": "cascade", "params": {"stage1": bad, "stage2": LIN}}])
    with pytest.raises(SpecError, match="layer 7 is not collected"):
        run_sweep(spec, tmp_path / "o2", base=tmp_path, model=tiny_model, progress=False)
    with pytest.raises(SpecError, match="model must be"):
        run_sweep(
            _spec(tmp_path, probes=[{"kind": "standalone", "params": {"model": "bert"}}]),
            tmp_path / "o3",
            base=tmp_path,
            model=tiny_model,
            progress=False,
        )


def test_finetune_collects_a_full_store_when_the_sweep_keeps_only_scored_tokens(tmp_path, tiny_model) -> None:
    spec = _spec(tmp_path, poolings=["mean"], probes=[FT], surface_baselines=False)
    df = run_sweep(spec, tmp_path / "out", base=tmp_path, model=tiny_model, progress=False)
    assert (df["probe"] == "finetune").all() and np.isfinite(df["auroc"].dropna()).all()
