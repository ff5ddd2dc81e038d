"""A model axis: a spec with several models runs each on the same data into one table, layers given as
fractions of depth, with a normalized-depth column and per-model costs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformer_lens import HookedTransformer

from activations.tiny import make_tiny_model, plant_direction
from experiments.sweep.engine import run_sweep
from experiments.sweep.spec import SpecError, parse_spec
from tests.conftest import HARM_WORDS, planted_dataset

DEPTHS = {"tiny-a": 2, "tiny-b": 4}


def _loader(name: str) -> HookedTransformer:
    torch.manual_seed(0)
    m = make_tiny_model(n_layers=DEPTHS[name], d_model=32, n_heads=4, d_mlp=64, seed=DEPTHS[name])
    plant_direction(m, HARM_WORDS, scale=6.0)
    m.probe_atlas_id = name  # type: ignore[attr-defined]
    return m


def _raw(tmp_path, **over):
    ds = planted_dataset(n=120, seed=1).with_splits({"train": 0.5, "val": 0.25, "test": 0.25}, seed=0)
    ds.to_jsonl(tmp_path / "planted.jsonl")
    planted_dataset(n=160, seed=11, name="control").to_jsonl(tmp_path / "control.jsonl")
    raw = {
        "name": "two",
        "model": ["tiny-a", "tiny-b"],
        "max_len": 64,
        "datasets": {
            "train": {"path": "planted.jsonl", "split": "train"},
            "val": {"path": "planted.jsonl", "split": "val"},
            "test": {"heldout": {"path": "planted.jsonl", "split": "test"}},
            "benign_control": {"path": "control.jsonl", "label": 0},
        },
        "depth": "0.5,1.0",
        "poolings": ["mean"],
        "probes": [{"kind": "logistic_l2"}],
        "Cs": [0.1, 1.0],
        "bootstrap": 20,
    }
    raw.update(over)
    return raw


def test_two_model_sweep(tmp_path) -> None:
    spec = parse_spec(_raw(tmp_path))
    out = tmp_path / "out"
    df = run_sweep(spec, out, base=tmp_path, model_loader=_loader, progress=False)
    assert set(df["model"]) == {"tiny-a", "tiny-b"}
    probe = df[df["probe"] == "logistic_l2"]
    # depth 0.5 and 1.0: layer round(f * n) capped at the last layer
    layers = {m: sorted(g["layer"].unique()) for m, g in probe.groupby("model")}
    assert layers == {"tiny-a": [1], "tiny-b": [2, 3]}
    for _, r in probe.iterrows():
        assert r["model_layers"] == DEPTHS[r["model"]]
        assert r["depth"] == pytest.approx(r["layer"] / DEPTHS[r["model"]])
    # both halves of the layer grid line up at depth 0.5
    assert set(probe.loc[probe["depth"] == 0.5, "model"]) == {"tiny-a", "tiny-b"}
    # the cost model is each model's own: a probe's overhead differs (different forward passes)
    oh = probe.groupby("model")["overhead_pct"].first()
    assert oh["tiny-a"] > oh["tiny-b"] > 0
    # validation selection is per model
    sel = df[df["selected"] & (df["probe"] == "logistic_l2")]
    assert sorted(sel["model"]) == ["tiny-a", "tiny-b"]
    assert (probe["auroc"] > 0.8).all()
    # every model on one AUROC-vs-FLOPs figure per eval set, and the metric by depth
    from experiments import metric_by_depth, metric_vs_flops, plot_results, signal_table

    fig = metric_vs_flops(df, "heldout")
    assert {t.legendgroup for t in fig.data} == {"tiny-a", "tiny-b"}
    assert {t.name.split(" · ")[0] for t in metric_by_depth(df, "heldout", probe="logistic_l2").data} == {
        "tiny-a",
        "tiny-b",
    }
    names = {p.name for p in plot_results(out, out, png=False)}
    assert {"models_auroc_vs_flops_heldout.html", "models_auroc_by_depth_heldout.html"} <= names
    tab = signal_table(df)
    assert sorted(tab["model"]) == ["tiny-a", "tiny-b"]
    assert (tab["depth"] == tab["layer"] / tab["model_layers"]).all()
    # resuming runs nothing new
    again = run_sweep(spec, out, base=tmp_path, model_loader=_loader, progress=False)
    assert len(again) == len(df)


def test_depth_and_model_list_errors(tmp_path) -> None:
    with pytest.raises(SpecError, match="depth"):
        parse_spec(_raw(tmp_path, depth="0.5,1.5"))
    with pytest.raises(SpecError, match="not both"):
        parse_spec(_raw(tmp_path, layers="0,1"))
    with pytest.raises(SpecError, match="listed twice"):
        parse_spec(_raw(tmp_path, model=["tiny-a", "tiny-a"]))
    with pytest.raises(SpecError, match="empty"):
        parse_spec(_raw(tmp_path, model=[]))
    spec = parse_spec(_raw(tmp_path, depth=None, layers="0.25,0.5,0.75"))
    assert spec.resolve_layers(30) == [8, 15, 23]  # half rounds up
    assert parse_spec(_raw(tmp_path, depth="all")).resolve_layers(4) == [0, 1, 2, 3]
    assert parse_spec(_raw(tmp_path, model=["x"])).model == "x"
    assert np.isclose(spec.resolve_layers(18)[1] / 18, 0.5)
