"""The Ray backend: sharded collection on actors and fits as tasks give the local backend's results."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from activations.collect import _Interrupted, collect
from activations.tiny import make_tiny_model, plant_direction
from experiments.sweep.engine import run_sweep
from experiments.sweep.spec import parse_spec
from tests.conftest import HARM_WORDS, planted_dataset

ray = pytest.importorskip("ray")

# starting Ray and its worker processes takes seconds: these are slow tests, run in CI with the ray marker
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def tiny_factory():
    """The conftest ``tiny_model`` rebuilt from its seeds (what each collector actor loads)."""
    m = make_tiny_model(n_layers=3, d_model=32, n_heads=4, d_mlp=64, seed=0)
    plant_direction(m, HARM_WORDS, scale=6.0)
    return m


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _spec(tmp_path):
    ds = planted_dataset(n=120, seed=1).with_splits({"train": 0.5, "val": 0.25, "test": 0.25}, seed=0)
    ds.to_jsonl(tmp_path / "planted.jsonl")
    planted_dataset(n=30, seed=7, name="other").to_jsonl(tmp_path / "other.jsonl")
    return parse_spec(
        {
            "name": "ray-vs-local",
            "model": "tiny",
            "max_len": 64,
            "token_budget": 256,  # several collection batches per store, spread over the actors
            "datasets": {
                "train": {"path": "planted.jsonl", "split": "train"},
                "val": {"path": "planted.jsonl", "split": "val"},
                "test": {
                    "heldout": {"path": "planted.jsonl", "split": "test"},
                    "harmful_only": {"path": "other.jsonl", "label": 1},
                },
            },
            "layers": "all",
            "poolings": ["mean", "max", "last"],
            "probes": [{"kind": "logistic_l2"}, {"kind": "diffmeans"}, {"kind": "multilayer"}],
            "Cs": [0.01, 0.1, 1.0],
            "bootstrap": 50,
        }
    )


def _comparable(df: pd.DataFrame) -> pd.DataFrame:
    return (
        df.drop(columns=["fit_seconds", "probe_path"])[
            sorted(set(df.columns) - {"fit_seconds", "probe_path"})
        ]
        .sort_values(["run_id", "eval_set"])
        .reset_index(drop=True)
    )


def _stores(out):
    return {p.name: p for p in sorted((out / "stores").iterdir())}


def test_ray_sweep_equals_local_sweep(tmp_path, tiny_model, ray_local) -> None:
    spec = _spec(tmp_path)
    local = run_sweep(spec, tmp_path / "local", base=tmp_path, model=tiny_model, progress=False)
    remote = run_sweep(
        spec,
        tmp_path / "ray",
        base=tmp_path,
        model=tiny_model,
        backend="ray",
        model_factory=tiny_factory,
        n_collectors=2,
        progress=False,
    )
    # the same rows, up to fit time and where the probe was saved
    pd.testing.assert_frame_equal(_comparable(local), _comparable(remote), check_exact=False, rtol=1e-6)
    assert local["run_id"].nunique() == 3 * 3 * 2 + 3 + 3 + 1  # + embedding per pooling + TF-IDF once
    assert remote.loc[remote.eval_set == "heldout", "auroc"].max() > 0.97
    # stores written by two actors hold the local collection's activations, and are marked complete
    ls, rs = _stores(tmp_path / "local"), _stores(tmp_path / "ray")
    assert ls.keys() == rs.keys() and len(ls) == 5  # train, val, control and the two test sets
    from activations.store import ActivationStore

    assert max(ActivationStore.open(p).manifest["n_batches"] for p in rs.values()) > 2
    for name in ls:
        a, b = ActivationStore.open(ls[name]), ActivationStore.open(rs[name])
        assert b.manifest["collect_actors"] == 2
        assert sorted(b.manifest["done_batches"]) == list(range(b.manifest["n_batches"]))
        np.testing.assert_array_equal(a.offsets, b.offsets)
        for h in a.hooks:
            np.testing.assert_allclose(
                a.activations(h).astype(np.float32), b.activations(h).astype(np.float32), atol=2e-3
            )
    # the saved probes of the Ray run exist (written by the tasks, on the shared filesystem)
    assert all(
        (tmp_path / "ray" / "probes" / r).is_dir() for r in remote.loc[remote.probe_path != "", "run_id"]
    )

    # run_sweep(backend="ray") dispatches to Ray; with complete stores it needs no collector actors
    again = run_sweep(
        spec,
        tmp_path / "ray2",
        base=tmp_path,
        model=tiny_model,
        store_root=tmp_path / "ray" / "stores",
        backend="ray",
        progress=False,
    )
    pd.testing.assert_frame_equal(_comparable(local), _comparable(again), check_exact=False, rtol=1e-6)
    # a rerun of a finished sweep fits nothing and keeps the table
    rerun = run_sweep(
        spec, tmp_path / "ray2", base=tmp_path, model=tiny_model, store_root=tmp_path / "ray" / "stores",
        backend="ray", progress=False,
    )  # fmt: skip
    assert len(rerun) == len(again)


def test_sharded_collection_resumes_a_killed_local_one(tmp_path, tiny_model, ray_local) -> None:
    from experiments.backends.ray import ActorBatches, start_collectors

    ds = planted_dataset(n=48, seed=3)
    kw = {
        "hooks": ["resid_post"],
        "layers": "all",
        "positions": "auto",
        "token_budget": 128,
        "progress": False,
    }
    full = collect(tiny_model, ds, tmp_path / "full", **kw)
    with pytest.raises(_Interrupted):
        collect(tiny_model, ds, tmp_path / "part", _stop_after_batches=2, **kw)
    actors = start_collectors(tiny_factory, n=2)
    try:
        runner = ActorBatches(actors, tiny_model, chunk_batches=1)
        st = collect(tiny_model, ds, tmp_path / "part", run_batches=runner, **kw)
    finally:
        for a in actors:
            ray.kill(a)
    assert st.complete and st.manifest["n_batches"] > 4
    for h in full.hooks:
        np.testing.assert_allclose(
            full.activations(h).astype(np.float32), st.activations(h).astype(np.float32), atol=2e-3
        )


def test_collector_with_another_model_is_refused(tmp_path, tiny_model, ray_local) -> None:
    from experiments.backends.ray import ActorBatches, RayBackendError, start_collectors

    other = make_tiny_model(n_layers=3, d_model=32, n_heads=4, d_mlp=64, seed=0)  # no planted direction
    actors = start_collectors(lambda: other, n=1)
    try:
        with pytest.raises(RayBackendError, match="weights_sample"):
            runner = ActorBatches(actors, tiny_model)
            collect(tiny_model, planted_dataset(n=8), tmp_path / "s", run_batches=runner, progress=False)
    finally:
        ray.kill(actors[0])
    assert not (tmp_path / "s").exists()


def test_local_backend_does_not_import_ray() -> None:
    """--backend local (the default) works where Ray is not installed."""
    code = (
        "import sys; sys.modules['ray'] = None\n"  # an import of ray would fail
        "import experiments, experiments.cli\n"
        "from experiments import SweepError, load_spec, run_sweep\n"
        "sp, _ = load_spec('demo.yaml')\n"
        "try:\n    run_sweep(sp, '/nonexistent/x', backend='nope')\nexcept SweepError as e:\n"
        "    assert 'local, ray' in str(e), e\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600)
