from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from activations.data import load_dataset
from activations.tiny import make_tiny_model
from experiments.analysis.report import headline_table
from experiments.analysis.scoring import ScoreError, score_dataset
from experiments.backends import local as run_mod
from experiments.sweep.engine import run_sweep
from experiments.sweep.results import SweepError, load_run_scores, read_results
from experiments.sweep.spec import SpecError, expand, parse_spec
from probes.selection import SELECTION_METRICS, select_best
from tests.conftest import planted_dataset

REQUIRED = [
    "run_id",
    "probe",
    "hook",
    "layer",
    "pooling",
    "C",
    "eval_set",
    "auroc",
    "tpr_at_1pct_fpr",
    "tpr_at_0.1pct_fpr",
    "flops_per_token",
    "overhead_pct",
    "probe_path",
    "auroc_lo",
    "auroc_hi",
    "standalone_overhead_pct",
    "fit_seconds",
]


def _spec(tmp_path, **over):
    ds = planted_dataset(n=160, seed=1).with_splits({"train": 0.5, "val": 0.25, "test": 0.25}, seed=0)
    ds.to_jsonl(tmp_path / "planted.jsonl")
    planted_dataset(n=40, seed=7, name="other").to_jsonl(tmp_path / "other.jsonl")
    planted_dataset(n=240, seed=11, name="control").to_jsonl(tmp_path / "control.jsonl")
    raw = {
        "name": "t",
        "model": "tiny",
        "max_len": 64,
        "datasets": {
            "train": {"path": "planted.jsonl", "split": "train"},
            "val": {"path": "planted.jsonl", "split": "val"},
            "test": {
                "heldout": {"path": "planted.jsonl", "split": "test"},
                "harmful_only": {"path": "other.jsonl", "label": 1},
                "benign_only": {"path": "other.jsonl", "label": 0},
            },
            "benign_control": {"path": "control.jsonl", "label": 0},
        },
        "layers": "all",
        "poolings": ["mean", "max", "last"],
        "probes": [{"kind": "logistic_l2"}, {"kind": "diffmeans"}, {"kind": "multilayer"}],
        "Cs": [0.01, 0.1, 1.0],
        "bootstrap": 50,
    }
    raw.update(over)
    return parse_spec(raw)


def test_sweep_end_to_end_and_resume(tmp_path, tiny_model) -> None:
    spec = _spec(tmp_path)
    out = tmp_path / "out"
    df = run_sweep(spec, out, base=tmp_path, model=tiny_model, progress=False)
    for col in REQUIRED:
        assert col in df.columns, col
    n_runs = len(list(expand(spec, [0, 1, 2], "x")))
    # 3 poolings × (2 per-layer kinds × 3 layers + multilayer + embedding + tfidf); tfidf reads the text
    # and writes rows once (in the first pooling group)
    assert n_runs == 3 * (2 * 3 + 3)
    assert df["run_id"].nunique() == n_runs - 2
    assert len(df) == (n_runs - 2) * 3  # one row per run × eval set
    # the surface baselines sit beside every probe; the planted trigger is a token, so they flag the sets
    assert {"tfidf", "embedding"} <= set(df["probe"])
    assert (df.loc[df.probe == "embedding", "hook"] == "embed").all()
    assert df.loc[df.eval_set == "heldout", "confounded"].all()
    assert not df.loc[df.eval_set == "benign_only", "confounded"].any()
    # exactly one validation-selected row per probe × pooling × eval set, chosen by the validation rule
    sel = df[df["selected"]]
    assert (sel.groupby(["probe", "pooling", "eval_set"]).size() == 1).all()
    assert (
        sel.groupby(["probe", "pooling", "eval_set"]).ngroups
        == df.groupby(["probe", "pooling", "eval_set"]).ngroups
    )
    assert (df["selected_by"] == "val_tpr_at_1pct_fpr").all()
    cand = df[(df.probe == "logistic_l2") & (df.pooling == "mean") & (df.eval_set == "heldout")]
    cand = cand.sort_values("layer").reset_index(drop=True)
    want = select_best(
        [{m: r[f"val_{m}"] for m in SELECTION_METRICS} for _, r in cand.iterrows()],
        "tpr_at_1pct_fpr",
        list(cand["flops_per_token"]),
    )
    assert cand.loc[cand["selected"], "layer"].item() == cand.loc[want.index, "layer"]
    # splits.json records every role and what decontamination removed
    splits = json.loads((out / "splits.json").read_text())
    assert set(splits["roles"]) == {"train", "val", "test:heldout", "test:harmful_only", "test:benign_only",
                                    "control"}  # fmt: skip
    assert splits["roles"]["control"]["decontamination"]["n_before"] == 120
    assert json.loads((out / "selection.json").read_text())["primary_metric"] == "val_tpr_at_1pct_fpr"
    held = df[df.eval_set == "heldout"]
    # the planted trigger word is linearly readable: the best probe is near perfect, mean/max pooling works
    assert held["auroc"].max() > 0.97
    assert held[(held.probe == "logistic_l2") & (held.pooling == "max")]["auroc"].min() > 0.9
    # C selected on validation, one of the grid
    assert set(df.loc[df.probe == "logistic_l2", "C"]).issubset({0.01, 0.1, 1.0})
    assert df.loc[df.probe == "diffmeans", "C"].isna().all()
    # costs: marginal overhead of a single-layer probe is tiny; standalone is larger and grows with depth
    lin = df[(df.probe == "logistic_l2") & (df.eval_set == "heldout") & (df.pooling == "mean")].sort_values(
        "layer"
    )
    assert (lin["overhead_pct"] < lin["standalone_overhead_pct"]).all()
    assert lin["standalone_overhead_pct"].is_monotonic_increasing
    ml = df[df.probe == "multilayer"]
    assert (ml["layer"] == -1).all() and (ml["n_layers_read"] == 3).all()
    benign = df[df.eval_set == "benign_only"]
    assert benign["auroc"].isna().all() and benign["benign_flag_rate_at_1pct_fpr"].notna().all()
    assert df[df.eval_set == "harmful_only"]["auroc"].notna().all()
    # rerun: nothing new is fitted
    again = run_sweep(spec, out, base=tmp_path, model=tiny_model, progress=False)
    assert len(again) == len(df)
    # headline: layer picked by validation
    head = headline_table(df)
    assert set(head["eval_set"]) == {"heldout", "harmful_only", "benign_only"}
    # a saved probe scores data exactly as in the sweep
    row = held[(held.probe == "logistic_l2") & held.selected].iloc[0]
    heldout = load_dataset(str(tmp_path / "planted.jsonl")).filter(split="test")
    scores, meta = score_dataset(row["probe_path"], heldout, tiny_model)
    saved = load_run_scores(out, row["run_id"])
    assert saved is not None and meta["run_id"] == row["run_id"]
    np.testing.assert_allclose(scores, saved[0]["test:heldout"], rtol=1e-5, atol=1e-5)


def test_killed_sweep_resumes_to_the_same_table(tmp_path, tiny_model, monkeypatch) -> None:
    spec = _spec(tmp_path, probes=[{"kind": "logistic_l2"}, {"kind": "diffmeans"}])
    full = run_sweep(spec, tmp_path / "full", base=tmp_path, model=tiny_model, progress=False)
    calls = {"n": 0}
    real = run_mod.run_group

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(run_mod, "run_group", dying)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, tmp_path / "part", base=tmp_path, model=tiny_model, progress=False)
    partial = read_results(tmp_path / "part")
    assert 0 < len(partial) < len(full)
    monkeypatch.setattr(run_mod, "run_group", real)
    resumed = run_sweep(spec, tmp_path / "part", base=tmp_path, model=tiny_model, progress=False)
    key = ["run_id", "eval_set"]
    a = full.sort_values(key).reset_index(drop=True)
    b = resumed.sort_values(key).reset_index(drop=True)
    assert list(a["run_id"]) == list(b["run_id"])
    np.testing.assert_allclose(a["auroc"].to_numpy(float), b["auroc"].to_numpy(float), equal_nan=True)


def test_a_kill_inside_a_group_keeps_the_kinds_already_finished(tmp_path, tiny_model, monkeypatch) -> None:
    from experiments.kinds.registry import RUNNERS

    spec = _spec(
        tmp_path,
        poolings=["mean"],
        probes=[{"kind": "logistic_l2"}, {"kind": "diffmeans"}],
        surface_baselines=False,
    )

    def boom(g):
        raise KeyboardInterrupt

    monkeypatch.setitem(RUNNERS, "diffmeans", boom)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, tmp_path / "part", base=tmp_path, model=tiny_model, progress=False)
    partial = read_results(tmp_path / "part")
    assert set(partial["probe"]) == {"logistic_l2"}  # same group, finished before the kill: kept
    monkeypatch.delitem(RUNNERS, "diffmeans")
    done = run_sweep(spec, tmp_path / "part", base=tmp_path, model=tiny_model, progress=False)
    assert set(done["probe"]) == {"logistic_l2", "diffmeans"}
    assert len(done[done.probe == "logistic_l2"]) == len(partial)  # not refitted


def test_spec_errors(tmp_path, tiny_model) -> None:
    with pytest.raises(SpecError, match="unknown key 'pooling'"):
        _spec(tmp_path, pooling=["mean"])
    with pytest.raises(SpecError, match=r"Cs: .*grid is empty"):
        _spec(tmp_path, Cs=[])
    with pytest.raises(SpecError, match=r"unknown key 'datasets\.train\.splitt'"):
        _spec(tmp_path, datasets={"train": {"path": "x", "splitt": "train"}, "test": {"a": {"path": "x"}}})
    spec = _spec(tmp_path)

    def with_train(**update):
        train = spec.datasets.train.model_copy(
            update={"mix": [spec.datasets.train.mix[0].model_copy(update=update)]}
        )
        return spec.model_copy(update={"datasets": spec.datasets.model_copy(update={"train": train})})

    with pytest.raises(SpecError, match="selects nothing"):
        run_sweep(with_train(split="nope"), tmp_path / "o1", base=tmp_path, model=tiny_model, progress=False)
    with pytest.raises(SpecError, match="only one class"):
        run_sweep(with_train(label=1.0), tmp_path / "o2", base=tmp_path, model=tiny_model, progress=False)
    # a results folder from another spec
    small = _spec(tmp_path, probes=[{"kind": "diffmeans"}], layers=[0], poolings=["mean"])
    run_sweep(small, tmp_path / "o3", base=tmp_path, model=tiny_model, progress=False)
    other = _spec(tmp_path, probes=[{"kind": "diffmeans"}], layers=[1], poolings=["mean"])
    with pytest.raises(SweepError, match="written by another spec"):
        run_sweep(other, tmp_path / "o3", base=tmp_path, model=tiny_model, progress=False)
    # a probe used on another model
    row = pd.read_parquet(tmp_path / "o3" / "results.parquet").iloc[0]
    with pytest.raises(ScoreError, match="was trained on model"):
        score_dataset(row["probe_path"], planted_dataset(n=4), make_tiny_model(n_layers=3, seed=11))
