from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from activations.collect import CollectError, _Interrupted, collect, parse_layers, plan_batches, resolve_hooks
from activations.data import DataError, Example, PromptDataset
from activations.render import render_example
from activations.store import ActivationStore, StoreError, StoreMismatchError
from activations.tiny import make_tiny_model
from tests.conftest import exchange_dataset, planted_dataset

ROOT = Path(__file__).resolve().parents[1]


def _assert_store_matches_cache(model, ds, store) -> None:
    for i, e in enumerate(ds):
        r = render_example(e, model.tokenizer, max_len=store.key["max_len"])
        _, cache = model.run_with_cache(torch.tensor(r.ids)[None])
        pos = torch.from_numpy(
            np.asarray(store.positions[store.offsets[i] : store.offsets[i + 1]], dtype=np.int64)
        )
        assert np.array_equal(store.tokens[store.offsets[i] : store.offsets[i + 1]], r.ids[pos.numpy()])
        for h in store.hooks:
            ref = cache[h][0][pos]
            got = store.sequence(i, h)
            # fp16 storage: relative precision ~1e-3
            torch.testing.assert_close(got, ref, atol=2e-3 * float(ref.abs().max()) + 1e-3, rtol=2e-3)


def test_round_trip_equals_run_with_cache(tmp_path, tiny_model) -> None:
    ds = planted_dataset(n=24)
    store = collect(
        tiny_model,
        ds,
        tmp_path / "s",
        hooks=["resid_post", "resid_pre", "mlp_out", "attn_out"],
        layers="all",
        token_budget=64,
        progress=False,
    )
    assert store.complete and len(store.hooks) == 12
    assert store.manifest["n_batches"] > 3  # several length-sorted batches with padding
    assert store.activations(store.hooks[0]).dtype == np.float16
    assert np.array_equal(store.labels, ds.labels)
    assert [e["id"] for e in store.examples()] == ds.ids
    _assert_store_matches_cache(tiny_model, ds, store)
    # reopening with the same request reuses the store; pooled reads are finite and shaped right
    again = collect(
        tiny_model,
        ds,
        tmp_path / "s",
        hooks=["resid_post", "resid_pre", "mlp_out", "attn_out"],
        progress=False,
    )
    assert again.manifest == store.manifest
    x = store.pooled("blocks.2.hook_resid_post", "mean")
    assert x.shape == (24, 32) and torch.isfinite(x).all()


def test_exchanges_store_response_and_prompt(tmp_path, tiny_model) -> None:
    ds = exchange_dataset(n=8)
    st = collect(
        tiny_model,
        ds,
        tmp_path / "x",
        layers=[1],
        positions="response",
        keep="prompt+response",
        progress=False,
    )
    assert set(np.unique(st.roles)) == {1, 2}
    assert (st.mask == (st.roles == 2)).all()
    _, off_resp = st.selection("response")
    _, off_prompt = st.selection("prompt")
    assert off_resp[-1] == int((st.roles == 2).sum()) and off_prompt[-1] == int((st.roles == 1).sum())
    full = st.pooled("blocks.1.hook_resid_post", "mean", select="all")
    resp = st.pooled("blocks.1.hook_resid_post", "mean", select="scored")
    assert not torch.allclose(full, resp)
    _assert_store_matches_cache(tiny_model, ds, st)
    with pytest.raises(DataError, match="no tokens to score"):
        collect(tiny_model, planted_dataset(n=4), tmp_path / "y", positions="response", progress=False)
    assert not (tmp_path / "y").exists()


def test_resume_after_interruption_equals_uninterrupted(tmp_path, tiny_model) -> None:
    ds = planted_dataset(n=30)
    full = collect(tiny_model, ds, tmp_path / "full", token_budget=48, progress=False)
    with pytest.raises(_Interrupted):
        collect(tiny_model, ds, tmp_path / "part", token_budget=48, progress=False, _stop_after_batches=2)
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore.open(tmp_path / "part")
    resumed = collect(tiny_model, ds, tmp_path / "part", token_budget=48, progress=False)
    assert resumed.complete
    for h in full.hooks:
        assert np.array_equal(np.asarray(full.activations(h)), np.asarray(resumed.activations(h)))


@pytest.mark.slow
def test_resume_after_kill_9(tmp_path) -> None:
    """A real SIGKILL mid-collection loses nothing: the rerun resumes and equals an uninterrupted run."""
    script = textwrap.dedent(
        f"""
        import sys, time, torch
        sys.path.insert(0, {str(ROOT)!r})
        from activations.tiny import make_tiny_model
        from activations.collect import collect
        from tests.conftest import planted_dataset
        m = make_tiny_model(n_layers=2, seed=5)
        if sys.argv[2] == "slow":
            m.blocks[0].hook_resid_post.add_hook(lambda a, hook: time.sleep(0.15))
        collect(m, planted_dataset(n=40), sys.argv[1], token_budget=32, progress=False)
        """
    )
    (tmp_path / "c.py").write_text(script)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(tmp_path / "c.py"), str(tmp_path / "s"), "slow"], env=env)
    manifest = tmp_path / "s" / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if manifest.exists():
            try:
                if len(json.loads(manifest.read_text())["done_batches"]) >= 3:
                    break
            except json.JSONDecodeError:  # pragma: no cover - the manifest is replaced atomically
                pytest.fail("manifest was observed half-written")
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    m = json.loads(manifest.read_text())
    assert not m["complete"] and 3 <= len(m["done_batches"]) < m["n_batches"]
    subprocess.run([sys.executable, str(tmp_path / "c.py"), str(tmp_path / "s"), "fast"], env=env, check=True)
    subprocess.run(
        [sys.executable, str(tmp_path / "c.py"), str(tmp_path / "ref"), "fast"], env=env, check=True
    )
    a, b = ActivationStore.open(tmp_path / "s"), ActivationStore.open(tmp_path / "ref")
    for h in a.hooks:
        assert np.array_equal(np.asarray(a.activations(h)), np.asarray(b.activations(h)))


def test_fingerprint_mismatch_is_an_error(tmp_path, tiny_model) -> None:
    ds = planted_dataset(n=10)
    collect(tiny_model, ds, tmp_path / "s", layers=[0, 1], progress=False)
    with pytest.raises(StoreMismatchError, match="dataset_fingerprint"):
        collect(tiny_model, planted_dataset(n=10, seed=9), tmp_path / "s", layers=[0, 1], progress=False)
    with pytest.raises(StoreMismatchError, match="hooks"):
        collect(tiny_model, ds, tmp_path / "s", layers=[2], progress=False)
    other = make_tiny_model(n_layers=3, seed=1)
    with pytest.raises(StoreMismatchError, match="weights_hash"):
        collect(other, ds, tmp_path / "s", layers=[0, 1], progress=False)
    with pytest.raises(StoreMismatchError, match="positions"):
        collect(tiny_model, ds, tmp_path / "s", layers=[0, 1], positions="all", progress=False)


def test_weights_hash_is_exact_and_thread_independent() -> None:
    from activations.collect import weights_hash

    m = make_tiny_model(n_layers=2, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = weights_hash(m)
        torch.set_num_threads(2)
        assert weights_hash(m) == one
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():  # one weight that the strided sample skips still changes the hash
        m.blocks[0].mlp.W_in[3, 5] += 1e-3
    assert weights_hash(m) != one


def test_bad_hooks_and_layers(tiny_model) -> None:
    with pytest.raises(CollectError, match="unknown hook 'resid_psot'"):
        resolve_hooks(tiny_model, ["resid_psot"])
    with pytest.raises(CollectError, match="layer 7 is out of range"):
        resolve_hooks(tiny_model, ["resid_post"], [0, 7])
    with pytest.raises(CollectError, match="out of range"):
        resolve_hooks(tiny_model, ["blocks.9.hook_resid_post"])
    assert resolve_hooks(tiny_model, ["resid_post"], "-1") == ["blocks.2.hook_resid_post"]
    assert parse_layers("0-2,1", 3) == [0, 1, 2]


def test_nan_activations_leave_no_store(tmp_path) -> None:
    m = make_tiny_model(n_layers=2, seed=3)
    with torch.no_grad():
        m.blocks[1].mlp.W_in[0, 0] = float("nan")
    with pytest.raises(StoreError, match=r"non-finite activations .* example 'planted:\d+'"):
        collect(m, planted_dataset(n=6), tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


def test_long_prompt_truncated_with_counted_warning(tmp_path, tiny_model) -> None:
    ds = PromptDataset(
        [Example(id="long", text="cake " * 300, label=0), Example(id="short", text="bomb", label=1)], name="t"
    )
    with pytest.warns(UserWarning, match=r"1 of 2 examples were longer than max_len=64"):
        st = collect(tiny_model, ds, tmp_path / "s", max_len=64, layers=[0], progress=False)
    assert st.manifest["n_truncated"] == 1
    assert st.offsets[1] - st.offsets[0] <= 64


def test_plan_batches_respects_budget() -> None:
    lengths = [5, 50, 7, 7, 30, 1, 64, 2]
    batches = plan_batches(lengths, token_budget=64)
    assert sorted(i for b in batches for i in b) == list(range(8))
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 64
