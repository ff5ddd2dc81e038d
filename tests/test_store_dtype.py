"""Float32 activation stores (``store_dtype``): for models whose residual stream leaves the fp16 range
(Gemma-3-270m reaches |x| ~ 1e5), while float16 stores keep their format, bytes and keys."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformer_lens import HookedTransformer

from activations.collect import (
    _Interrupted,
    collect,
    default_store_dir,
    estimate_collection,
    resolve_store_dtype,
)
from activations.models import preferred_store_dtype
from activations.store import (
    MANIFEST,
    ActivationStore,
    StoreError,
    StoreKey,
    StoreLayout,
    StoreMismatchError,
    npy_header,
    verify_store,
)
from activations.tiny import make_tiny_model
from experiments.sweep.spec import parse_spec
from tests.conftest import planted_dataset

KW = {"layers": [0, 1], "token_budget": 48, "progress": False, "check_space": False}
HOOK0, HOOK1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def loud_model() -> HookedTransformer:
    """A tiny model whose residual stream leaves the fp16 range: its embeddings scaled to |x| ~ 1e5 (like
    Gemma-3's middle layers); LayerNorm keeps everything after them finite."""
    m = make_tiny_model(n_layers=2, d_model=32, n_heads=4, d_mlp=64, seed=0)
    with torch.no_grad():
        m.W_E.mul_(2e5 / float(m.W_E.abs().max()))
    return m


def _reference(model: HookedTransformer, store: ActivationStore, hook: str) -> np.ndarray:
    """Each sequence's stored rows computed by a plain forward pass of that sequence alone (float32)."""
    off, pos, foff = np.asarray(store.offsets), np.asarray(store.positions), np.asarray(store.full_offsets)
    ft = np.asarray(store.full_tokens)
    rows = []
    for i in range(store.n_sequences):
        toks = torch.tensor(ft[foff[i] : foff[i + 1]], dtype=torch.long)[None]
        _, cache = model.run_with_cache(toks, names_filter=[hook])
        rows.append(cache[hook][0, torch.from_numpy(pos[off[i] : off[i + 1]].astype(np.int64))].numpy())
    return np.concatenate(rows)


def test_float32_store_keeps_activations_beyond_fp16(loud_model, tmp_path) -> None:
    ds = planted_dataset(n=8)
    st = collect(loud_model, ds, tmp_path / "s", store_dtype="float32", **KW)
    assert st.dtype == "float32" and st.manifest["key"]["dtype"] == "float32"
    arr = st.activations(HOOK0)
    assert arr.dtype == np.float32 and np.isfinite(arr).all()
    assert float(np.abs(arr).max()) > 1e5  # fp16 would hold inf here
    np.testing.assert_allclose(arr, _reference(loud_model, st, HOOK0), rtol=1e-5, atol=1e-3)
    n_rows, d = arr.shape
    size = (tmp_path / "s" / f"{HOOK0}.npy").stat().st_size
    assert size == len(npy_header(np.dtype(np.float32), (n_rows, d))) + n_rows * d * 4
    assert verify_store(tmp_path / "s", deep=True).ok
    est = estimate_collection(loud_model, ds, tmp_path / "new", store_dtype="float32", **_est_kw())
    assert est.activation_bytes == 2 * n_rows * d * 4 and "float32" in est.summary()
    files = st.nbytes() - (tmp_path / "s" / MANIFEST).stat().st_size
    assert files < est.total_bytes <= files + 64 * 1024  # the manifest's size is estimated


def _est_kw() -> dict[str, object]:
    return {k: v for k, v in KW.items() if k not in ("progress", "check_space")}


def test_float16_overflow_names_the_hook_the_peak_and_float32(loud_model, tmp_path) -> None:
    with pytest.raises(StoreError) as e:
        collect(loud_model, planted_dataset(n=8), tmp_path / "s", store_dtype="float16", **KW)
    msg = str(e.value)
    assert "non-finite activations at hook blocks.0.hook_resid_post (layer 0)" in msg
    assert "beyond the float16 range (65,504)" in msg and "store_dtype: float32" in msg
    peak = float(msg.split("max |x| = ")[1].split(" ")[0].replace(",", ""))
    assert 1e5 < peak < 1e6
    assert not (tmp_path / "s" / MANIFEST).exists()  # nothing half-written: the new store is removed


def test_the_models_own_nan_is_not_blamed_on_fp16(tmp_path) -> None:
    m = make_tiny_model(n_layers=2, d_model=32, n_heads=4, d_mlp=64, seed=0)
    with torch.no_grad():
        m.blocks[0].mlp.b_out.fill_(float("nan"))
    with pytest.raises(StoreError, match=r"NaN/inf computed by the model itself"):
        collect(m, planted_dataset(n=8), tmp_path / "s", store_dtype="float32", **KW)


def test_planted_values_round_trip_exactly_through_the_store_api(tmp_path) -> None:
    """Rows written through a float32 store's writer read back bit for bit (values fp16 cannot hold)."""
    rng = np.random.default_rng(0)
    lens = np.array([3, 5, 2])
    n, d = int(lens.sum()), 6
    layout = StoreLayout(
        offsets=np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
        tokens=np.arange(n, dtype=np.int32),
        roles=np.ones(n, np.int8),
        mask=np.ones(n, bool),
        positions=np.concatenate([np.arange(k) for k in lens]).astype(np.int32),
        labels=np.array([0.0, 1.0, 0.0], np.float32),
        examples=[{"id": f"e{i}"} for i in range(3)],
        hook_dims={HOOK0: d},
        batch_of=np.array([0, 0, 1], np.int32),
        full_offsets=np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
        full_tokens=np.arange(n, dtype=np.int32),
        dtype="float32",
    )
    key = StoreKey("m", "c", "t", "w", "d", "f", (HOOK0,), "auto", "auto", 16, True, dtype="float32")
    st = ActivationStore.create(tmp_path / "s", key, layout)
    values = (rng.standard_normal((n, d)) * 1e5 + 0.123).astype(np.float32)
    w = st.writer(HOOK0)
    w.write_rows(np.arange(n), values)
    with pytest.raises(StoreError, match="float32"):  # rows of another dtype do not fit a float32 file
        w.write_rows(np.arange(n), values.astype(np.float64))
    w.close()
    st.mark_done([0, 1])
    st.mark_complete()
    again = ActivationStore.open(tmp_path / "s", expect=key)
    assert np.array_equal(np.asarray(again.activations(HOOK0)), values)
    assert again.tensor(HOOK0).dtype == torch.float32
    assert verify_store(tmp_path / "s", deep=True).ok
    with pytest.raises(StoreError, match="float32 hook files but the key says float16"):
        ActivationStore.create(
            tmp_path / "t", StoreKey(**{**key.to_json(), "hooks": (HOOK0,), "dtype": "float16"}), layout
        )
    with pytest.raises(StoreError, match="unknown store dtype 'bfloat16'"):
        StoreKey("m", "c", "t", "w", "d", "f", (HOOK0,), "auto", "auto", 16, True, dtype="bfloat16")


def test_reopening_with_another_dtype_is_a_mismatch(tiny_model, tmp_path) -> None:
    ds = planted_dataset(n=10)
    collect(tiny_model, ds, tmp_path / "s", store_dtype="float32", **KW)
    with pytest.raises(
        StoreMismatchError, match=r"dtype: the store holds float32 activations, the request asks for float16"
    ):
        collect(tiny_model, ds, tmp_path / "s", **KW)  # auto: float16 for this model
    with pytest.raises(StoreMismatchError, match="dtype"):
        estimate_collection(tiny_model, ds, tmp_path / "s", store_dtype="float16", **_est_kw())
    assert collect(tiny_model, ds, tmp_path / "s", store_dtype="float32", **KW).complete


def test_float16_stores_are_unchanged(tiny_model, tmp_path) -> None:
    """auto / float16 write the float16 store of before: same key (so the same folder and run ids), ``<f2``
    hook files of the same size, the same bytes; a manifest without a dtype reads as float16."""
    ds = planted_dataset(n=10)
    a = collect(tiny_model, ds, tmp_path / "a", **KW)
    b = collect(tiny_model, ds, tmp_path / "b", store_dtype="float16", **KW)
    c = collect(tiny_model, ds, tmp_path / "c", store_dtype="float32", **KW)
    assert a.key == b.key and a.key["dtype"] == "float16" and c.key["dtype"] == "float32"
    for h in (HOOK0, HOOK1):
        fa, fb = (tmp_path / x / f"{h}.npy" for x in "ab")
        assert fa.read_bytes() == fb.read_bytes()
        assert np.load(fa, mmap_mode="r").dtype == np.float16
        np.testing.assert_allclose(a.activations(h), c.activations(h), rtol=1e-3, atol=1e-3)
    n_rows, d = a.activations(HOOK0).shape
    assert (tmp_path / "a" / f"{HOOK0}.npy").stat().st_size == len(
        npy_header(np.dtype(np.float16), (n_rows, d))
    ) + n_rows * d * 2
    # the folder name of a float16 key (pinned from the code before store_dtype existed)
    key = StoreKey(
        model_id="smollm2",
        config_hash="c",
        tokenizer_hash="t",
        weights_hash="w",
        dataset_name="train",
        dataset_fingerprint="f",
        hooks=("blocks.0.hook_resid_post",),
        positions="auto",
        keep="auto",
        max_len=96,
        chat_template=True,
    )
    assert default_store_dir("/r", key).name == "smollm2-train-c2df02cdb97b"
    assert default_store_dir(
        "/r", StoreKey(**{**key.to_json(), "hooks": key.hooks, "dtype": "float32"})
    ).name != ("smollm2-train-c2df02cdb97b")
    # an old manifest without the dtype
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "a", old)
    m = json.loads((old / MANIFEST).read_text())
    del m["key"]["dtype"]
    m.pop("manifest_hash")
    (old / MANIFEST).write_text(json.dumps(m))
    st = ActivationStore.open(old, expect=StoreKey(**{**a.key, "hooks": tuple(a.hooks)}))
    assert st.dtype == "float16" and np.array_equal(st.activations(HOOK0), a.activations(HOOK0))
    assert verify_store(old, deep=True).ok


def test_auto_is_the_models_preference_and_keeps_spec_fingerprints() -> None:
    assert preferred_store_dtype("gemma3-270m") == "float32"
    assert preferred_store_dtype("google/gemma-3-270m") == "float32"
    assert preferred_store_dtype("smollm2") == "float16"
    assert preferred_store_dtype("local:/some/folder") == "float16"
    m = make_tiny_model(n_layers=1, d_model=16, n_heads=2, d_mlp=32, seed=0)
    assert resolve_store_dtype(m) == "float16" and resolve_store_dtype(m, "float32") == "float32"
    m.__dict__["probe_atlas_id"] = "gemma3-270m"
    assert resolve_store_dtype(m) == "float32" and resolve_store_dtype(m, "float16") == "float16"
    with pytest.raises(ValueError, match="unknown store_dtype 'fp8'"):
        resolve_store_dtype(m, "fp8")
    raw = {
        "name": "pin",
        "model": ["smollm2", "gemma3-270m"],
        "max_len": 96,
        "datasets": {
            "train": {"path": "a.jsonl"},
            "val": {"path": "a.jsonl"},
            "test": {"t": {"path": "a.jsonl"}},
        },
        "probes": [{"kind": "logistic_l2"}],
    }
    # pinned from the code before store_dtype existed: a spec without it (auto) keeps its fingerprint
    assert parse_spec(raw).fingerprint() == "5155e00b3e2950f3"
    assert parse_spec({**raw, "store_dtype": "auto"}).fingerprint() == "5155e00b3e2950f3"
    assert parse_spec({**raw, "store_dtype": "float32"}).fingerprint() != "5155e00b3e2950f3"


def test_float32_store_resumes_and_repairs(tiny_model, tmp_path) -> None:
    ds = planted_dataset(n=24)
    whole = collect(tiny_model, ds, tmp_path / "whole", store_dtype="float32", **KW)
    assert whole.manifest["n_batches"] >= 3
    with pytest.raises(_Interrupted):
        collect(tiny_model, ds, tmp_path / "p", store_dtype="float32", _stop_after_batches=1, **KW)
    part = ActivationStore.open(tmp_path / "p", require_complete=False)
    assert part.dtype == "float32" and len(part.manifest["done_batches"]) == 1
    assert verify_store(tmp_path / "p", deep=True).ok
    done = collect(tiny_model, ds, tmp_path / "p", store_dtype="float32", **KW)
    for h in (HOOK0, HOOK1):
        assert (tmp_path / "p" / f"{h}.npy").read_bytes() == (tmp_path / "whole" / f"{h}.npy").read_bytes()
    assert verify_store(tmp_path / "p", deep=True).ok and done.complete
    # a truncated float32 hook file: verify finds it, the next collection re-collects the lost batches
    f = tmp_path / "p" / f"{HOOK1}.npy"
    os.truncate(f, f.stat().st_size // 2)
    rep = verify_store(tmp_path / "p")
    assert not rep.ok and rep.damaged_files == [f"{HOOK1}.npy"]
    with pytest.warns(UserWarning, match="repaired"):
        collect(tiny_model, ds, tmp_path / "p", store_dtype="float32", **KW)
    assert f.read_bytes() == (tmp_path / "whole" / f"{HOOK1}.npy").read_bytes()
    assert verify_store(tmp_path / "p", deep=True).ok
    # a flipped byte in a done batch's rows: the deep check names the batch
    with f.open("r+b") as fh:
        fh.seek(-5, os.SEEK_END)
        byte = fh.read(1)
        fh.seek(-5, os.SEEK_END)
        fh.write(bytes([byte[0] ^ 0xFF]))
    rep = verify_store(tmp_path / "p", deep=True)
    assert not rep.ok and rep.damaged_batches and rep.damage[0].kind == "batch"


def test_sweep_stores_take_the_spec_dtype(tmp_path: Path) -> None:
    """A sweep's stores follow ``store_dtype`` (float32 keys and files)."""
    from experiments.sweep.engine import prepare

    ds = planted_dataset(n=60, seed=1).with_splits({"train": 0.5, "val": 0.25, "test": 0.25}, seed=0)
    ds.to_jsonl(tmp_path / "planted.jsonl")
    raw = {
        "name": "f32",
        "model": "tiny",
        "max_len": 64,
        "store_dtype": "float32",
        "datasets": {
            "train": {"path": "planted.jsonl", "split": "train"},
            "val": {"path": "planted.jsonl", "split": "val"},
            "test": {"heldout": {"path": "planted.jsonl", "split": "test"}},
        },
        "layers": "1",
        "poolings": ["mean"],
        "probes": [{"kind": "diffmeans"}],
        "surface_baselines": False,
    }
    spec = parse_spec(raw)
    model = make_tiny_model(n_layers=2, d_model=16, n_heads=2, d_mlp=32, seed=0)
    ctx = prepare(spec, tmp_path / "out", base=tmp_path, model=model, progress=False)
    assert {r: st.dtype for r, st in ctx.stores.items()} == dict.fromkeys(ctx.stores, "float32")


def test_collect_command_takes_store_dtype(tmp_path) -> None:
    from typer.testing import CliRunner

    from experiments.cli import app
    from tests.test_models import _save_tiny_llama

    folder = tmp_path / "tiny-local"
    _save_tiny_llama(folder)
    planted_dataset(n=12).to_jsonl(tmp_path / "d.jsonl")
    args = ["collect", "--model", str(folder), "--data", str(tmp_path / "d.jsonl"), "--layers", "0"]
    args += ["--out", str(tmp_path / "store"), "--max-len", "64"]
    runner = CliRunner()
    res = runner.invoke(app, [*args, "--store-dtype", "float32", "--dry-run"], catch_exceptions=False)
    assert res.exit_code == 0 and "x 4 bytes (float32)" in res.output, res.output
    res = runner.invoke(app, [*args, "--store-dtype", "float32"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert ActivationStore.open(tmp_path / "store").dtype == "float32"
    res = runner.invoke(app, args, catch_exceptions=False)  # auto: float16 for this model
    assert res.exit_code == 2 and "dtype: the store holds float32" in res.output
    res = runner.invoke(app, [*args, "--store-dtype", "fp8"], catch_exceptions=False)
    assert res.exit_code == 2 and "unknown store_dtype 'fp8'" in res.output
