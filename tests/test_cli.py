"""The command line end to end on a tiny local Llama folder (the same code path as the bundled models)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from activations.store import ActivationStore
from experiments.cli import app
from tests.conftest import SHARED_DATASETS, planted_dataset
from tests.test_models import _save_tiny_llama

runner = CliRunner()


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("m") / "tiny-local"
    _save_tiny_llama(folder)
    return folder


def _invoke(args: list[str]) -> str:
    res = runner.invoke(app, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


def test_collect_sweep_score_plot(tmp_path, llama_folder) -> None:
    data = planted_dataset(n=80, seed=2).with_splits({"train": 0.5, "val": 0.25, "test": 0.25})
    data.to_jsonl(tmp_path / "d.jsonl")
    _invoke(
        [
            "collect",
            "--model",
            str(llama_folder),
            "--data",
            str(tmp_path / "d.jsonl"),
            "--layers",
            "0,1",
            "--hooks",
            "resid_post,mlp_out",
            "--out",
            str(tmp_path / "store"),
            "--max-len",
            "64",
        ]
    )
    st = ActivationStore.open(tmp_path / "store")
    assert st.hooks == [
        "blocks.0.hook_mlp_out",
        "blocks.0.hook_resid_post",
        "blocks.1.hook_mlp_out",
        "blocks.1.hook_resid_post",
    ]
    assert st.n_sequences == 80

    spec = {
        "name": "cli",
        "model": str(llama_folder),
        "max_len": 64,
        "datasets": {
            "train": {"path": "d.jsonl", "split": "train"},
            "val": {"path": "d.jsonl", "split": "val"},
            "test": {"held": {"path": "d.jsonl", "split": "test"}},
        },
        "poolings": ["mean", "last"],
        "probes": [{"kind": "logistic_l2"}],
        "Cs": [0.1, 1.0],
        "bootstrap": 20,
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = _invoke(["sweep", str(tmp_path / "spec.yaml"), "--out", str(tmp_path / "sw")])
    assert "chosen on validation" in out
    df = pd.read_parquet(tmp_path / "sw" / "results.parquet")
    assert set(df["probe"]) == {"logistic_l2", "tfidf", "embedding"}  # the surface baselines run beside it
    lin = df[df.probe == "logistic_l2"]
    assert len(lin) == 2 * 2 and set(lin["pooling"]) == {"mean", "last"}
    df = lin
    assert list((tmp_path / "sw" / "plots").glob("*.html"))
    probe_dir = df.sort_values("auroc").iloc[-1]["probe_path"]
    _invoke(
        [
            "score",
            "--probe",
            probe_dir,
            "--data",
            str(tmp_path / "d.jsonl"),
            "--out",
            str(tmp_path / "s.jsonl"),
        ]
    )
    lines = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(lines) == 80 and {"id", "label", "score", "prob"} <= set(lines[0])
    _invoke(["plot", str(tmp_path / "sw")])


def test_cli_errors_are_one_line(tmp_path, llama_folder) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "x", "label": 3}\n')
    res = runner.invoke(
        app,
        [
            "collect",
            "--model",
            str(llama_folder),
            "--data",
            str(tmp_path / "bad.jsonl"),
            "--out",
            str(tmp_path / "s"),
        ],
    )
    assert res.exit_code == 2 and "bad.jsonl:1" in res.output
    assert not (tmp_path / "s").exists()
    res = runner.invoke(
        app,
        [
            "collect",
            "--model",
            str(llama_folder),
            "--data",
            "builtin",
            "--layers",
            "5",
            "--out",
            str(tmp_path / "s"),
        ],
    )
    assert res.exit_code == 2 and "out of range" in res.output
    (tmp_path / "spec.yaml").write_text("name: x\nmodel: m\nbogus: 1\n")
    res = runner.invoke(app, ["sweep", str(tmp_path / "spec.yaml"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "unknown key 'bogus'" in res.output


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATASETS / "harmbench").exists(), reason="shared datasets not present")
def test_collect_default_model_from_shared_file(tmp_path) -> None:
    """`probe-atlas collect` writes a store for the default model from a ../shared/datasets file."""
    src = SHARED_DATASETS / "harmbench" / "harmbench.jsonl"
    small = tmp_path / "hb.jsonl"
    small.write_text(
        "".join(src.read_text(encoding="utf-8").splitlines(keepends=True)[:12]), encoding="utf-8"
    )
    _invoke(["collect", "--model", "smollm2", "--data", str(small), "--layers", "0,15,-1", "--out",
             str(tmp_path / "store"), "--max-len", "128"])  # fmt: skip
    st = ActivationStore.open(tmp_path / "store")
    assert st.key["model_id"] == "smollm2" and st.n_sequences == 12
    assert st.hooks == ["blocks.0.hook_resid_post", "blocks.15.hook_resid_post", "blocks.29.hook_resid_post"]
    x = st.pooled("blocks.29.hook_resid_post", "last")
    assert x.shape == (12, 576) and bool(torch.isfinite(x).all())
    assert set(np.unique(st.roles)) == {1}  # prompt tokens only: the system prompt is not stored


def test_threads_option_sets_torch_threads() -> None:
    before = torch.get_num_threads()
    try:
        res = CliRunner().invoke(app, ["--threads", "1", "kinds"])
        assert res.exit_code == 0, res.output
        assert torch.get_num_threads() == 1
        bad = CliRunner().invoke(app, ["--threads", "0", "kinds"])
        assert bad.exit_code == 2 and "--threads must be >= 1" in bad.output
    finally:
        torch.set_num_threads(before)


def _fails_in_one_line(args: list[str]) -> str:
    res = runner.invoke(app, args, catch_exceptions=False)
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error:") and "Traceback" not in res.output, res.output
    return res.output


def test_store_and_sweep_errors_are_one_line(tmp_path, monkeypatch) -> None:
    """A full disk, too little space or a damaged store ends a command with one line and exit status 2, in
    every command (not a traceback)."""
    import experiments.cli.main as cli_app
    from activations.store import DiskFullError, InsufficientSpaceError, StoreCorruptError

    def refuse(*a, **k):
        raise InsufficientSpaceError("stores/x: needs 5.0 GB, 1.0 GB free", needed=5, free=1)

    monkeypatch.setattr(cli_app, "run_sweep", refuse)
    out = _fails_in_one_line(["sweep", "demo.yaml", "--out", str(tmp_path / "o"), "--no-plot"])
    assert "needs 5.0 GB" in out
    model = SimpleNamespace(cfg=SimpleNamespace(n_ctx=64))
    monkeypatch.setattr(cli_app, "load_model", lambda name: model)

    def full(*a, **k):
        raise DiskFullError("stores/x/blocks.0.npy: no space left on device", "stores/x/blocks.0.npy")

    monkeypatch.setattr(cli_app, "do_collect", full)
    out = _fails_in_one_line(["collect", "--data", "builtin", "--out", str(tmp_path / "s")])
    assert "no space left" in out

    def corrupt(*a, **k):
        raise StoreCorruptError("stores/x/offsets.npy: checksum mismatch [run verify]", ["offsets.npy"])

    monkeypatch.setattr(cli_app, "score_file", corrupt)
    out = _fails_in_one_line(["score", "--probe", "p", "--data", "d.jsonl", "--out", str(tmp_path / "x")])
    assert "[run verify]" in out  # printed as text, not read as markup
