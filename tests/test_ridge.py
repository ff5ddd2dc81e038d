"""The ridge probe: closed-form ridge regression on ``2y - 1`` (scikit-learn's ``Ridge`` on standardized
features, its alpha scaled by the weight total), saved and loaded like every probe, and run by a sweep spec
that names it (with the median pooling) and nothing else."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler

from experiments.sweep.engine import run_sweep
from experiments.sweep.spec import parse_spec
from probes.io import load_probe
from probes.metrics import auroc
from probes.ridge import RidgeProbe
from tests.conftest import planted_dataset


def _data(n: int = 300, d: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(float)  # imbalanced: the balanced weights matter
    X = rng.normal(size=(n, d)) * rng.uniform(0.5, 3.0, d) + y[:, None] * np.linspace(0.5, 2.5, d) + 2.0
    return X, y


@pytest.mark.parametrize("class_weight", [None, "balanced"])
def test_ridge_matches_sklearn(class_weight) -> None:
    X, y = _data()
    n = len(y)
    probe = RidgeProbe(C=0.5, class_weight=class_weight).fit(torch.tensor(X), torch.tensor(y))
    w = np.ones(n) if class_weight is None else np.where(y >= 0.5, n / (2 * y.sum()), n / (2 * (n - y.sum())))
    # population standardization with the (class-)weighted mean and std, as the probe does
    mu = np.average(X, axis=0, weights=w)
    sd = np.sqrt(np.average((X - mu) ** 2, axis=0, weights=w))
    ref = Ridge(alpha=2.0 * w.sum()).fit((X - mu) / sd, 2 * y - 1, sample_weight=w)
    Xt, _ = _data(seed=1)
    np.testing.assert_allclose(
        probe.decision_function(torch.tensor(Xt)).numpy(), ref.predict((Xt - mu) / sd), rtol=0, atol=1e-7
    )
    if class_weight is None:  # without weights, the standardization is scikit-learn's own
        scaled = StandardScaler().fit(X)
        np.testing.assert_allclose(scaled.mean_, mu)
    assert probe.alpha == 2.0


def test_regularization_shrinks_and_separates() -> None:
    X, y = _data()
    norms = [float(RidgeProbe(C=c).fit(X, y).coef_.norm()) for c in (1e-3, 1e-1, 10.0)]
    assert norms[0] < norms[1] < norms[2]
    strong = RidgeProbe(C=10.0).fit(X, y)
    assert auroc(y, strong.decision_function(X).numpy()) > 0.8


def test_save_load_round_trip(tmp_path) -> None:
    X, y = _data()
    probe = RidgeProbe(C=0.1).fit(torch.tensor(X, dtype=torch.float32), torch.tensor(y))
    probe.save(tmp_path / "p", metadata={"model_id": "synthetic"})
    back = load_probe(tmp_path / "p", expect={"model_id": "synthetic"})
    assert isinstance(back, RidgeProbe) and back.get_config() == probe.get_config()
    torch.testing.assert_close(back.decision_function(X), probe.decision_function(X))
    with pytest.raises(ValueError, match="C must be"):
        RidgeProbe(C=0.0)


def test_a_sweep_runs_ridge_on_median_pooling(tmp_path, tiny_model) -> None:
    """A new family and a new pooling, named by a spec and nothing else."""
    ds = planted_dataset(n=160, seed=1).with_splits({"train": 0.5, "val": 0.25, "test": 0.25}, seed=0)
    ds.to_jsonl(tmp_path / "planted.jsonl")
    spec = parse_spec(
        {
            "name": "ridge",
            "model": "tiny",
            "max_len": 64,
            "datasets": {
                "train": {"path": "planted.jsonl", "split": "train"},
                "val": {"path": "planted.jsonl", "split": "val"},
                "test": {"heldout": {"path": "planted.jsonl", "split": "test"}},
            },
            "layers": "all",
            "poolings": ["median"],
            "probes": [{"kind": "ridge"}],
            "Cs": [0.01, 0.1, 1.0],
            "bootstrap": 20,
            "surface_baselines": False,
        }
    )
    df = run_sweep(spec, tmp_path / "out", base=tmp_path, model=tiny_model, progress=False)
    rows = df[df.probe == "ridge"]
    assert len(rows) == tiny_model.cfg.n_layers and set(rows.pooling) == {"median"}
    assert set(rows.C) <= {0.01, 0.1, 1.0} and (rows.val_candidates == 3).all()
    assert rows.auroc.max() > 0.9  # the planted trigger word
    best = rows[rows.selected].iloc[0]
    assert isinstance(load_probe(best.probe_path), RidgeProbe)
    assert not pd.isna(best.flops_per_token)
