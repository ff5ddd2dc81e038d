"""Probe cards: a card folder loads to the same scores, its README holds the model-card fields, and
``hf:`` references download through huggingface_hub with a one-line error offline."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from activations.tiny import make_tiny_model, plant_direction
from experiments.analysis.card import CardError, best_runs, make_card
from experiments.cli import app
from experiments.sweep.engine import run_sweep
from experiments.sweep.spec import parse_spec
from probes import load_probe
from probes.hub import HubError, hub_snapshot
from tests.conftest import HARM_WORDS, planted_dataset


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("card")
    ds = planted_dataset(n=120, seed=1).with_splits({"train": 0.5, "val": 0.25, "test": 0.25}, seed=0)
    ds.to_jsonl(tmp / "planted.jsonl")
    planted_dataset(n=240, seed=11, name="control").to_jsonl(tmp / "control.jsonl")
    spec = parse_spec(
        {
            "name": "cardsweep",
            "model": "tiny",
            "max_len": 64,
            "datasets": {
                "train": {"path": "planted.jsonl", "split": "train"},
                "val": {"path": "planted.jsonl", "split": "val"},
                "test": {"heldout": {"path": "planted.jsonl", "split": "test"}},
                "benign_control": {"path": "control.jsonl", "label": 0},
            },
            "layers": "1,2",
            "poolings": ["mean"],
            "probes": [{"kind": "logistic_l2"}],
            "Cs": [0.1, 1.0],
            "bootstrap": 20,
        }
    )
    torch.manual_seed(0)
    m = make_tiny_model(n_layers=3, d_model=32, n_heads=4, d_mlp=64, seed=0)
    plant_direction(m, HARM_WORDS, scale=6.0)
    out = tmp / "sweep"
    df = run_sweep(spec, out, base=tmp, model=m, progress=False)
    return out, df


def test_card_round_trips_and_holds_the_fields(sweep, tmp_path) -> None:
    out, df = sweep
    best = best_runs(df)
    assert list(best["probe"]) == ["logistic_l2"]  # surface baselines are not carded as "best"
    row = best.iloc[0]
    src = out / "probes" / row["run_id"]
    card = make_card(src, tmp_path / "card")
    assert {"probe.json", "probe.safetensors", "README.md", "card.json"} <= {p.name for p in card.iterdir()}
    X = torch.randn(50, 32, generator=torch.Generator().manual_seed(3))
    a, b = load_probe(src).decision_function(X), load_probe(card).decision_function(X)
    assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    text = (card / "README.md").read_text()
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["library_name"] == "probe-atlas" and "probe-atlas" in front["tags"]
    assert front["base_model"] == "tiny" and front["pipeline_tag"] == "text-classification"
    res = front["model-index"][0]["results"][0]
    assert res["dataset"]["name"] == "heldout"
    test = df[(df["run_id"] == row["run_id"]) & (df["eval_set"] == "heldout")].iloc[0]
    assert res["metrics"][0]["value"] == pytest.approx(test["auroc"])
    for field in ("## Thresholds", "benign control set", "## Training data", "## Evaluation", "## Cost",
                  "## Intended use and limitations", "hook_resid_post", f"| layer(s) | {int(row['layer'])} |",
                  "| pooling | mean |", f"{test['threshold_at_1pct_fpr']:.4f}", "| planted |",
                  f"{test['auroc']:.3f} [{test['auroc_lo']:.3f}, {test['auroc_hi']:.3f}]",
                  "validation selected"):  # fmt: skip
        assert field in text, field
    facts = json.loads((card / "card.json").read_text())["sweep"]
    assert facts["data"]["train"]["n"] == int(test["n_train"])
    assert facts["cost"]["overhead_pct"] == pytest.approx(test["overhead_pct"])


def test_card_errors_leave_nothing(sweep, tmp_path) -> None:
    out, _ = sweep
    with pytest.raises(CardError, match="saved probes"):
        make_card(out / "scores", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_hub_refs(sweep, tmp_path, monkeypatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    out, df = sweep
    card = make_card(out / "probes" / best_runs(df).iloc[0]["run_id"], tmp_path / "card")
    calls = []

    def fake(repo_id, revision=None, **kw):
        calls.append((repo_id, revision))
        return str(card)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    X = torch.randn(20, 32)
    got = load_probe("hf:someone/tiny-card@v1").decision_function(X)
    assert torch.equal(torch.as_tensor(got), torch.as_tensor(load_probe(card).decision_function(X)))
    assert calls == [("someone/tiny-card", "v1")]

    def offline(repo_id, **kw):
        raise LocalEntryNotFoundError("outgoing traffic has been disabled.\nset HF_HUB_OFFLINE=0")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError) as e:
        load_probe("hf:someone/tiny-card")
    assert "\n" not in str(e.value) and "hf:someone/tiny-card" in str(e.value) and "offline" in str(e.value)
    res = CliRunner().invoke(app, ["card", "--from-hub", "someone/tiny-card"])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "offline" in res.output
    with pytest.raises(HubError, match="not a Hub repository"):
        hub_snapshot("hf:no-slash")
