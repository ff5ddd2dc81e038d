from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from activations.data import Example, PromptDataset
from experiments.analysis.robustness import (
    CLEAN,
    COLUMNS,
    CONTRAST,
    RobustnessError,
    best_probes,
    evaluate_robustness,
    load_contrast,
    parse_transforms,
    prepare_data,
    run_robustness,
)
from experiments.sweep.data import load_sweep_data
from experiments.sweep.engine import run_sweep
from experiments.sweep.spec import parse_spec
from tests.conftest import planted_dataset


def _contrast(n: int = 12) -> PromptDataset:
    """Harmless prompts that contain a trigger word: a probe keyed on the word flags them (over-refusal)."""
    words = ["bomb", "poison", "hack"]
    exs = [
        Example(id=f"look:{i}", text=f"how to {words[i % 3]} the cake {i}", label=0, kind="contrast")
        for i in range(n)
    ]
    return PromptDataset(exs, name="look")


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, tiny_model):
    """A small sweep on the tiny model (planted trigger words), max and mean pooling, two probe kinds."""
    tmp = tmp_path_factory.mktemp("robust")
    planted_dataset(n=160, seed=1).with_splits({"train": 0.7, "val": 0.3}, seed=0).to_jsonl(tmp / "p.jsonl")
    planted_dataset(n=60, seed=3, name="heldout").to_jsonl(tmp / "heldout.jsonl")
    spec = parse_spec(
        {
            "name": "r",
            "model": "tiny",
            "max_len": 64,
            "datasets": {
                "train": {"path": "p.jsonl", "split": "train"},
                "val": {"path": "p.jsonl", "split": "val"},
                "test": {"heldout": {"path": "heldout.jsonl"}},
            },
            "poolings": ["max", "mean"],
            "probes": [{"kind": "logistic_l2"}, {"kind": "diffmeans"}],
            "Cs": [0.1, 1.0],
            "bootstrap": 0,
        }
    )
    run_sweep(spec, tmp / "sweep", base=tmp, model=tiny_model, progress=False)
    return tmp / "sweep"


def test_transforms_that_hide_the_trigger_evade_and_wrappers_do_not(sweep_dir, tiny_model) -> None:
    probes = best_probes(sweep_dir, probe_kind="logistic_l2")  # one per pooling
    assert len(probes) == 2
    data = planted_dataset(n=80, seed=5, name="evalset")
    df = evaluate_robustness(
        probes,
        data,
        transforms="base64,rot13,roleplay,random_caps",
        contrast=_contrast(),
        model=tiny_model,
        progress=False,
    )
    for col in [
        "probe",
        "probe_path",
        "transform",
        "tpr",
        "fpr",
        "n",
        "n_harmful",
        "n_harmless",
        "threshold",
    ]:
        assert col in df.columns
    assert list(df.columns[: len(COLUMNS)]) == COLUMNS
    assert len(df) == 2 * (1 + 4 + 1)  # probes × (clean + transforms + contrast)
    assert set(df["transform"]) == {CLEAN, "base64", "rot13", "roleplay", "random_caps", CONTRAST}
    mx = df[df["pooling"] == "max"].set_index("transform")
    # the threshold is fixed on clean harmless prompts at ≤ 1% FPR: clean detection is near perfect
    assert mx.loc[CLEAN, "fpr"] <= 0.01 and mx.loc[CLEAN, "tpr"] > 0.9
    assert mx.loc[CLEAN, "n_harmful"] == 40 and mx.loc[CLEAN, "n_harmless"] == 40
    # encodings turn the trigger word into <unk>: the planted signal is gone, TPR collapses
    assert mx.loc["base64", "tpr"] <= 0.1 and mx.loc["rot13", "tpr"] <= 0.1
    assert mx.loc["base64", "delta_tpr"] < -0.8
    # a role-play wrapper keeps the trigger word (max pooling still finds it); the tokenizer lower-cases,
    # so random capitalization changes nothing at all
    assert mx.loc["roleplay", "tpr"] > 0.8 and mx.loc["roleplay", "auroc"] > 0.9
    assert mx.loc["random_caps", "tpr"] == mx.loc[CLEAN, "tpr"]
    # harmless look-alikes that contain a trigger word are flagged: over-refusal is measured
    assert mx.loc[CONTRAST, "fpr"] > 0.8 and mx.loc[CONTRAST, "n"] == 12 and np.isnan(mx.loc[CONTRAST, "tpr"])
    # probe names carry the sweep's kind name, and every probe shares one threshold per probe
    assert set(df["probe_kind"]) <= {"logistic_l2", "diffmeans"}
    assert df.groupby("probe")["threshold"].nunique().eq(1).all()


def test_run_robustness_writes_table_and_figures(sweep_dir, tiny_model, tmp_path) -> None:
    probes = best_probes(sweep_dir)
    data = PromptDataset(
        [*planted_dataset(n=30, seed=9, name="d"), *_contrast(4)], name="d"
    )  # contrast rows inside the data
    data.to_jsonl(tmp_path / "d.jsonl")
    df = run_robustness(
        probes,
        tmp_path / "d.jsonl",
        tmp_path / "out",
        transforms=["leetspeak"],
        n=10,
        seed=3,
        model=tiny_model,
        progress=False,
        png=False,
    )
    back = pd.read_parquet(tmp_path / "out" / "robustness.parquet")
    assert len(back) == len(df) == 2 * 3
    assert (back.loc[back["transform"] == CLEAN, "n_harmful"] == 10).all()
    assert (back.loc[back["transform"] == CONTRAST, "n"] == 4).all()
    html = sorted(p.name for p in (tmp_path / "out").glob("robustness_*.html"))
    assert html == [f"robustness_{k}.html" for k in sorted(set(df["probe_kind"]))]
    # seeded: the same call gives the same numbers
    again = evaluate_robustness(
        probes, data, transforms=["leetspeak"], n=10, seed=3, model=tiny_model, progress=False
    )
    pd.testing.assert_frame_equal(df.reset_index(drop=True), again.reset_index(drop=True))


def test_bad_input_errors(sweep_dir, tiny_model, tmp_path) -> None:
    probe = best_probes(sweep_dir)[0]
    data = planted_dataset(n=20, seed=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RobustnessError, match="not a saved probe"):
        evaluate_robustness([tmp_path / "empty"], data, model=tiny_model, progress=False)
    with pytest.raises(RobustnessError, match="no such folder"):
        evaluate_robustness([tmp_path / "nope"], data, model=tiny_model, progress=False)
    with pytest.raises(RobustnessError, match="is empty"):
        evaluate_robustness([probe], PromptDataset([], name="e"), model=tiny_model, progress=False)
    benign = data.where(lambda e: e.label < 0.5, name="benign")
    with pytest.raises(RobustnessError, match="no harmful"):
        evaluate_robustness([probe], benign, model=tiny_model, progress=False)
    harmful = data.where(lambda e: e.label >= 0.5, name="harmful")
    with pytest.raises(RobustnessError, match="no harmless"):
        prepare_data(harmful)
    # the threshold set can be larger than the set of harmless prompts that get transformed
    ed = prepare_data(planted_dataset(n=40, seed=2), n=5, n_control=15)
    assert (len(ed.harmful), len(ed.harmless), len(ed.to_transform)) == (5, 15, 5)
    assert {e.id for e in ed.to_transform} <= {e.id for e in ed.harmless}
    with pytest.raises(RobustnessError, match="unknown transform 'nope'"):
        parse_transforms("rot13,nope")
    assert parse_transforms("all")[0] == "atbash" and len(parse_transforms("all")) == 13
    assert parse_transforms("none") == []
    # a raw {"id", "prompt"} file (CoCoNot's contrast set format) is read as harmless contrast prompts
    (tmp_path / "raw.jsonl").write_text(json.dumps({"id": "a", "prompt": "how to kill time"}) + "\n")
    c = load_contrast(tmp_path / "raw.jsonl")
    assert len(c) == 1 and c[0].label == 0 and c[0].kind == "contrast"
    (tmp_path / "junk.jsonl").write_text('{"x": 1}\n')
    with pytest.raises(RobustnessError, match=r"junk\.jsonl"):
        load_contrast(tmp_path / "junk.jsonl")


def test_cli_robustness(sweep_dir, tmp_path, monkeypatch, tiny_model) -> None:
    from experiments.cli import app

    monkeypatch.setattr("experiments.analysis.robustness.load_model", lambda ref: tiny_model)
    planted_dataset(n=16, seed=4).to_jsonl(tmp_path / "d.jsonl")
    runner = CliRunner()
    res = runner.invoke(
        app,
        ["robustness", "--best-of", str(sweep_dir), "--data", str(tmp_path / "d.jsonl"), "--out",
         str(tmp_path / "o"), "--transforms", "rot13", "--no-png"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o" / "robustness.parquet").exists() and "rot13" in res.output
    bad = runner.invoke(app, ["robustness", "--probe", str(tmp_path), "--data", str(tmp_path / "d.jsonl"),
                              "--out", str(tmp_path / "o2")])  # fmt: skip
    assert bad.exit_code == 2 and "not a saved probe" in " ".join(bad.output.split())


def test_augmented_training_set_in_a_sweep_spec(tmp_path) -> None:
    base = planted_dataset(n=40, seed=1)
    base.to_jsonl(tmp_path / "p.jsonl")
    planted_dataset(n=20, seed=9, name="t").to_jsonl(tmp_path / "t.jsonl")
    planted_dataset(n=20, seed=8, name="v").to_jsonl(tmp_path / "v.jsonl")
    spec = parse_spec(
        {
            "name": "aug",
            "model": "tiny",
            "datasets": {
                "train": {"path": "p.jsonl", "augment": ["roleplay", "base64"], "augment_copies": 2},
                "test": {"t": {"path": "t.jsonl"}},
            },
            "probes": [{"kind": "logistic_l2"}],
        }
    )
    data = load_sweep_data(spec, tmp_path)
    train, val = data.train, data.val
    # originals + 2 transforms × 2 copies, split 80/20 by group into train and val
    assert len(train) + len(val) == 40 * (1 + 2 * 2)
    both = [*train, *val]
    assert (
        sum(1 for e in both if ":base64#" in e.id) == 80
        and sum(1 for e in both if ":roleplay#" in e.id) == 80
    )
    assert all(e.kind == "jailbreak" for e in both if e.label >= 0.5 and "#" in e.id)
    # every transformed copy sits in the split of its original: groups are never cut
    g_train, g_val = {e.group_key for e in train}, {e.group_key for e in val}
    assert g_train and g_val and not g_train & g_val
    orig_split = {e.id: "train" for e in train if "#" not in e.id} | {
        e.id: "val" for e in val if "#" not in e.id
    }
    for split, ds in (("train", train), ("val", val)):
        for e in ds:
            if "#" in e.id:
                assert orig_split[e.id.split(":roleplay")[0].split(":base64")[0]] == split
    # without keeping originals only transformed copies are used
    spec2 = parse_spec(
        {
            **spec.model_dump(mode="json"),
            "datasets": {
                "train": {"path": "p.jsonl", "augment": ["rot13"], "augment_keep_original": False},
                "val": {"path": "v.jsonl"},
                "test": {"t": {"path": "t.jsonl"}},
            },
        }
    )
    d2 = load_sweep_data(spec2, tmp_path)
    assert len(d2.train) == 40 and all(e.id.endswith(":rot13") for e in d2.train)
    bad = {"train": {"path": "p.jsonl", "augment": ["zzz"]}, "test": {"t": {"path": "t.jsonl"}}}
    with pytest.raises(Exception, match="unknown transform"):
        parse_spec({**spec.model_dump(mode="json"), "datasets": bad})
