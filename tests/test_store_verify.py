"""Store self-verification: what the manifest records, old stores, the read path, ``probe-atlas verify`` and
``probe-atlas collect --dry-run``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import activations.store as store_mod
from activations.collect import collect, estimate_collection
from activations.store import MANIFEST, ActivationStore, StoreCorruptError, StoreError, verify_store
from experiments.cli import app
from tests.conftest import planted_dataset

KW = {"layers": [0, 2], "token_budget": 48, "progress": False}
HOOK = "blocks.0.hook_resid_post"
runner = CliRunner()


@pytest.fixture(scope="module")
def store_path(tiny_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("v") / "s"
    collect(tiny_model, planted_dataset(n=20), path, **KW)
    return path


def test_manifest_records_sizes_checksums_and_itself(store_path) -> None:
    m = json.loads((store_path / MANIFEST).read_text())
    on_disk = {f.name: f.stat().st_size for f in store_path.iterdir() if f.name != MANIFEST}
    assert {k: v["size"] for k, v in m["files"].items()} == on_disk
    assert all("hash" in v for k, v in m["files"].items() if not k.startswith("blocks."))
    assert m["checksum"]["fields"] == ["meta", *m["key"]["hooks"]]
    assert sorted(map(int, m["batch_checksums"])) == list(range(m["n_batches"]))
    assert m["manifest_hash"] == store_mod._manifest_digest(m)
    rep = verify_store(store_path, deep=True)
    assert rep.ok and rep.batches_checked == m["n_batches"] and not rep.notes


def test_mark_done_reads_checksums_back_from_disk(store_path, tmp_path) -> None:
    """What the Ray backend's driver does: it marks batches written by actors done without digests."""
    d = tmp_path / "s"
    shutil.copytree(store_path, d)
    st = ActivationStore.open(d)
    want = dict(st.manifest["batch_checksums"])
    st.manifest["batch_checksums"] = {}
    st.mark_done(list(range(st.manifest["n_batches"])))
    assert ActivationStore.open(d).manifest["batch_checksums"] == want


def test_old_store_without_checksums_still_opens(store_path, tmp_path) -> None:
    d = tmp_path / "old"
    shutil.copytree(store_path, d)
    m = json.loads((d / MANIFEST).read_text())
    for k in ("files", "checksum", "batch_checksums", "manifest_hash", "n_full_tokens", "max_batch"):
        m.pop(k)
    (d / MANIFEST).write_text(json.dumps(m, indent=1))
    st = ActivationStore.open(d)
    assert np.array_equal(st.activations(HOOK), ActivationStore.open(store_path).activations(HOOK))
    rep = verify_store(d, deep=True)
    assert rep.ok and any("no batch checksums" in n for n in rep.notes)
    os.truncate(d / "full_tokens.npy", 200)  # sizes are still checked (full_tokens' from full_offsets)
    with pytest.raises(StoreCorruptError, match=r"full_tokens\.npy: truncated"):
        ActivationStore.open(d)


def test_reads_of_a_file_cut_after_opening_are_store_errors(store_path, tmp_path) -> None:
    """The reported ``ValueError: mmap length is greater than file size`` is a StoreCorruptError now."""
    d = tmp_path / "s"
    shutil.copytree(store_path, d)
    st = ActivationStore.open(d)
    os.truncate(d / f"{HOOK}.npy", 1000)
    with pytest.raises(StoreCorruptError, match=rf"{HOOK}\.npy: damaged.*rerun the collection"):
        st.activations(HOOK)
    with pytest.raises(StoreCorruptError, match=rf"{HOOK}\.npy: truncated"):
        ActivationStore.open(d, require_complete=False)


def test_checksums_off_and_mark_complete_guard(tiny_model, tmp_path) -> None:
    st = collect(tiny_model, planted_dataset(n=12), tmp_path / "s", **KW, checksums=False)
    assert st.complete and not st.manifest["batch_checksums"]
    assert any("no checksum" in n for n in verify_store(tmp_path / "s", deep=True).notes)
    st.manifest["done_batches"] = st.manifest["done_batches"][:-1]
    with pytest.raises(StoreError, match="cannot mark the store complete"):
        st.mark_complete()


def _cli(*args: str) -> tuple[int, str]:
    res = runner.invoke(app, ["verify", *args], catch_exceptions=False)
    return res.exit_code, res.output


def test_verify_command_on_a_store_and_a_sweep_folder(store_path, tmp_path) -> None:
    code, out = _cli(str(store_path))
    assert code == 0 and out.startswith("OK") and "sizes and metadata checked" in out
    sweep = tmp_path / "sweep"
    for name in ("a", "b"):
        shutil.copytree(store_path, sweep / "stores" / name)
    hook_file = sweep / "stores" / "b" / f"{HOOK}.npy"
    raw = bytearray(hook_file.read_bytes())
    raw[-5] ^= 0x10
    hook_file.write_bytes(bytes(raw))
    code, out = _cli(str(sweep))
    assert code == 0 and out.count("OK") == 2  # sizes and metadata are sound: only --deep sees a flipped row
    code, out = _cli(str(sweep), "--deep")
    assert code == 1 and "DAMAGED" in out and f"{HOOK}.npy" in out and "batches" in out and "--repair" in out
    code, out = _cli(str(sweep), "--deep", "--repair")
    assert code == 1 and "1 batch(es) marked not done" in out and "rerun the same" in out
    st = ActivationStore.open(sweep / "stores" / "b", require_complete=False)
    assert not st.complete and len(st.manifest["done_batches"]) == st.manifest["n_batches"] - 1
    code, out = _cli(str(sweep), "--deep")  # what is done is sound; incomplete until collected again
    assert code == 0 and "incomplete" in out
    code, out = _cli(str(tmp_path / "nothing"))
    assert code == 2 and "no activation store" in out


def test_collect_dry_run_estimates_and_refuses_when_short(tmp_path, monkeypatch) -> None:
    from tests.test_models import _save_tiny_llama

    folder = tmp_path / "tiny-local"
    _save_tiny_llama(folder)
    planted_dataset(n=24).to_jsonl(tmp_path / "d.jsonl")
    args = ["collect", "--model", str(folder), "--data", str(tmp_path / "d.jsonl"), "--layers", "0,1"]
    args += ["--out", str(tmp_path / "store"), "--max-len", "64"]
    res = runner.invoke(app, [*args, "--dry-run"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "stored tokens x 2 hooks x d_model" in res.output and "free" in res.output
    assert not (tmp_path / "store").exists()
    monkeypatch.setattr(store_mod, "_disk_free", lambda path: 1000)
    res = runner.invoke(app, [*args, "--dry-run"], catch_exceptions=False)
    assert "NOT ENOUGH SPACE" in res.output
    res = runner.invoke(app, args, catch_exceptions=False)
    assert res.exit_code == 2 and "only 1000 B are free" in res.output
    assert not (tmp_path / "store" / MANIFEST).exists()


def test_estimate_matches_the_store_written(tiny_model, tmp_path) -> None:
    ds = planted_dataset(n=20)
    est = estimate_collection(tiny_model, ds, tmp_path / "s", layers=[0, 2], token_budget=48)
    st = collect(tiny_model, ds, tmp_path / "s", **KW)
    files = st.nbytes() - (tmp_path / "s" / MANIFEST).stat().st_size
    assert files < est.total_bytes <= files + 64 * 1024
    assert est.activation_bytes == 2 * st.manifest["n_rows"] * 32 * 2
    again = estimate_collection(tiny_model, ds, tmp_path / "s", layers=[0, 2], token_budget=48)
    assert again.exists and again.complete and again.bytes_needed == 0
