"""Linear probes: agreement with scikit-learn, the batched solver, DiffMeans / LDA, persistence, errors."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from probes.base import SCORERS
from probes.diffmeans import DiffMeansProbe
from probes.io import ProbeMismatchError, load_probe, read_probe_info, save_probe
from probes.lda import LDAProbe, ledoit_wolf_shrinkage
from probes.logistic import LogisticProbe
from probes.multilayer import MultiLayerProbe
from probes.scorer import Probe
from probes.solver import fit_logistic_batched


def make_data(
    n: int = 400, d: int = 12, seed: int = 0, signal: float = 0.8, n_test: int = 300
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Correlated, shifted, unevenly scaled Gaussian features with a logistic label model."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)
    scales = np.exp(rng.normal(size=d))
    Z = rng.normal(size=(n + n_test, d))
    beta = rng.normal(size=d) * signal
    y = (rng.random(n + n_test) < 1 / (1 + np.exp(-(Z @ beta) - 0.3))).astype(np.float64)
    X = (Z @ A) * scales + rng.normal(size=d) * 3
    return X[:n], y[:n], X[n:], y[n:]


def sk_fit(
    Xs: np.ndarray, y: np.ndarray, C: float, l1_ratio: float = 0.0, **kw: object
) -> LogisticRegression:
    solver = "lbfgs" if l1_ratio == 0.0 else "saga"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LogisticRegression(
            C=C, l1_ratio=l1_ratio, solver=solver, tol=1e-12, max_iter=200_000, **kw
        ).fit(Xs, y)


# ----------------------------------------------------------------------------------------------------------
# agreement with scikit-learn
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("C", [1e-3, 0.03, 1.0, 30.0])
def test_l2_matches_sklearn(C: float) -> None:
    X, y, Xt, yt = make_data()
    scaler = StandardScaler().fit(X)
    sk = sk_fit(scaler.transform(X), y, C)
    probe = LogisticProbe(C=C, tol=1e-10).fit(X, y)
    assert probe.converged_
    # coefficients on standardized features
    coef_std = (probe.coef_ * probe.scale_).numpy()
    np.testing.assert_allclose(coef_std, sk.coef_[0], rtol=1e-3, atol=1e-6 * np.abs(sk.coef_).max())
    # decision values on raw test features (standardization folded into coef_ / intercept_)
    ours = probe.decision_function(Xt).numpy()
    ref = sk.decision_function(scaler.transform(Xt))
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6)
    assert abs(roc_auc_score(yt, ours) - roc_auc_score(yt, ref)) < 1e-6
    proba = probe.predict_proba(Xt).numpy()
    np.testing.assert_allclose(proba, sk.predict_proba(scaler.transform(Xt))[:, 1], atol=1e-6)


@pytest.mark.parametrize("C", [0.05, 1.0])
def test_l1_matches_sklearn_saga(C: float) -> None:
    X, y, _Xt, _ = make_data(n=300, d=10, seed=1)
    Xs = StandardScaler().fit_transform(X)
    sk = sk_fit(Xs, y, C, l1_ratio=1.0)
    probe = LogisticProbe(C=C, penalty="l1", tol=1e-9).fit(X, y)
    ours = (probe.coef_ * probe.scale_).numpy()
    ref = sk.coef_[0]
    np.testing.assert_allclose(ours, ref, atol=2e-4 * max(1.0, np.abs(ref).max()))
    big = np.abs(ref) > 1e-3
    assert np.all(ours[big] != 0)
    assert np.all(np.sign(ours[big]) == np.sign(ref[big]))
    assert np.sum(ours == 0) == pytest.approx(np.sum(np.abs(ref) < 1e-8), abs=1)


def test_elasticnet_matches_sklearn_saga() -> None:
    X, y, _, _ = make_data(n=300, d=10, seed=2)
    Xs = StandardScaler().fit_transform(X)
    for C, ratio in [(0.1, 0.5), (1.0, 0.3)]:
        sk = sk_fit(Xs, y, C, l1_ratio=ratio)
        probe = LogisticProbe(C=C, penalty="elasticnet", l1_ratio=ratio, tol=1e-9).fit(X, y)
        ours = (probe.coef_ * probe.scale_).numpy()
        np.testing.assert_allclose(ours, sk.coef_[0], atol=2e-4 * max(1.0, np.abs(sk.coef_).max()))


def test_class_weight_and_sample_weight_match_sklearn() -> None:
    X, y, Xt, _ = make_data(n=300, d=8, seed=3)
    y = y.copy()
    y[np.flatnonzero(y == 1)[: int((y == 1).sum() * 0.7)]] = 0  # imbalance the classes
    scaler = StandardScaler().fit(X)
    Xs = scaler.transform(X)
    sk = sk_fit(Xs, y, 0.5, class_weight="balanced")
    probe = LogisticProbe(C=0.5, class_weight="balanced", tol=1e-10).fit(X, y)
    np.testing.assert_allclose((probe.coef_ * probe.scale_).numpy(), sk.coef_[0], rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(
        probe.decision_function(Xt).numpy(), sk.decision_function(scaler.transform(Xt)), rtol=1e-4, atol=1e-6
    )
    sw = np.random.default_rng(0).uniform(0.2, 3.0, size=len(y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk_w = LogisticRegression(C=0.5, tol=1e-12, max_iter=100_000).fit(Xs, y, sample_weight=sw)
    probe_w = LogisticProbe(C=0.5, tol=1e-10).fit(X, y, sample_weight=sw)
    np.testing.assert_allclose((probe_w.coef_ * probe_w.scale_).numpy(), sk_w.coef_[0], rtol=1e-3, atol=1e-7)


def test_no_standardize_no_intercept_match_sklearn() -> None:
    X, y, _Xt, _ = make_data(n=250, d=6, seed=4)
    Xs = StandardScaler().fit_transform(X)  # well-scaled raw input
    sk = sk_fit(Xs, y, 2.0, fit_intercept=False)
    probe = LogisticProbe(C=2.0, standardize=False, fit_intercept=False, tol=1e-10).fit(Xs, y)
    np.testing.assert_allclose(probe.coef_.numpy(), sk.coef_[0], rtol=1e-3, atol=1e-7)
    assert float(probe.intercept_) == 0.0


def test_float32_input_is_close_to_float64() -> None:
    X, y, _Xt, _ = make_data(n=500, d=20, seed=5)
    p64 = LogisticProbe(C=10.0, tol=1e-8).fit(X, y)
    p32 = LogisticProbe(C=10.0, tol=1e-6).fit(X.astype(np.float32), y)
    assert p32.coef_.dtype == torch.float32
    rel = float((p32.coef_.double() - p64.coef_).norm() / p64.coef_.norm())
    assert rel < 1e-4


# ----------------------------------------------------------------------------------------------------------
# the batched path solver
# ----------------------------------------------------------------------------------------------------------


def test_batched_equals_separate_fits() -> None:
    p, Cs = 4, [10.0, 0.01, 1.0, 0.1]
    Xs, ys = [], []
    for k in range(p):
        X, y, _, _ = make_data(n=300, d=10, seed=10 + k)
        Xs.append(X)
        ys.append(y)
    Xb = torch.tensor(np.stack(Xs))
    yb = torch.tensor(np.stack(ys))
    res = fit_logistic_batched(Xb, yb, Cs, tol=1e-10, chunk_size=3, n_workers=2)
    assert res.coef.shape == (p, len(Cs), 10) and res.intercept.shape == (p, len(Cs))
    assert bool(res.converged.all())
    scores = res.decision_function(Xb)
    for k in range(p):
        for j, C in enumerate(Cs):
            single = LogisticProbe(C=C, tol=1e-10).fit(Xs[k], ys[k])
            np.testing.assert_allclose(res.coef[k, j].numpy(), single.coef_.numpy(), rtol=1e-5, atol=1e-9)
            np.testing.assert_allclose(
                scores[k, j].numpy(), single.decision_function(Xs[k]).numpy(), atol=1e-6
            )
            probe = LogisticProbe.from_path(res, k, j)
            np.testing.assert_allclose(
                probe.decision_function(Xs[k]).numpy(), scores[k, j].numpy(), atol=1e-9
            )


def test_batched_shared_labels_and_halfprecision_input() -> None:
    X, y, _, _ = make_data(n=300, d=10, seed=6)
    Xb = torch.tensor(np.stack([X, X * 2 + 1]), dtype=torch.float32)
    res = fit_logistic_batched(Xb, torch.tensor(y), [0.1, 1.0], tol=1e-7)
    # standardization makes the two problems identical up to the feature scaling
    np.testing.assert_allclose(res.coef_standardized[0].numpy(), res.coef_standardized[1].numpy(), atol=1e-4)
    half = fit_logistic_batched(Xb.half(), torch.tensor(y), [0.1, 1.0])
    assert half.coef.dtype == torch.float32
    np.testing.assert_allclose(half.coef_standardized.numpy(), res.coef_standardized.numpy(), atol=5e-2)


def test_batched_l1_path_sparsity_increases_with_regularization() -> None:
    X, y, _, _ = make_data(n=300, d=15, seed=7)
    res = fit_logistic_batched(
        torch.tensor(X)[None], torch.tensor(y), [0.01, 0.1, 1.0], penalty="l1", tol=1e-7
    )
    nnz = (res.coef[0] != 0).sum(1).tolist()
    assert nnz[0] <= nnz[1] <= nnz[2] and nnz[0] < 15


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(40, 200),
    d=st.integers(1, 12),
    logC=st.floats(-3, 2),
    balanced=st.booleans(),
)
def test_solution_satisfies_optimality(seed: int, n: int, d: int, logC: float, balanced: bool) -> None:
    """At the solution, the gradient of C·Σ s ℓ + ½‖w‖² (standardized features) vanishes."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) * rng.uniform(0.1, 10, size=d) + rng.normal(size=d)
    y = (rng.random(n) < 0.3 + 0.4 * (X[:, 0] > np.median(X[:, 0]))).astype(np.float64)
    y[:2] = [0.0, 1.0]
    C = 10.0**logC
    cw = "balanced" if balanced else None
    res = fit_logistic_batched(torch.tensor(X)[None], torch.tensor(y), [C, C / 7], tol=1e-9, class_weight=cw)
    Xs = (X - X.mean(0)) / np.where(X.std(0) > 0, X.std(0), 1.0)
    s = np.ones(n) if cw is None else np.where(y == 1, n / (2 * y.sum()), n / (2 * (n - y.sum())))
    for j, c in enumerate((C, C / 7)):
        w = res.coef_standardized[0, j].numpy()
        b = float(res.intercept_standardized[0, j])
        r = s * (1 / (1 + np.exp(-(Xs @ w + b))) - y)
        g = c * Xs.T @ r + w
        assert np.abs(g).max() < 1e-5 * max(1.0, c * s.sum())
        assert abs(c * r.sum()) < 1e-5 * max(1.0, c * s.sum())


@settings(max_examples=8, deadline=None)
@given(perm_seed=st.integers(0, 1000))
def test_path_order_does_not_matter(perm_seed: int) -> None:
    X, y, _, _ = make_data(n=200, d=6, seed=8)
    Cs = [0.001, 0.01, 0.1, 1.0, 10.0]
    order = np.random.default_rng(perm_seed).permutation(len(Cs))
    a = fit_logistic_batched(torch.tensor(X)[None], torch.tensor(y), Cs, tol=1e-10)
    b = fit_logistic_batched(torch.tensor(X)[None], torch.tensor(y), [Cs[i] for i in order], tol=1e-10)
    np.testing.assert_allclose(b.coef[0].numpy(), a.coef[0, order].numpy(), rtol=1e-6, atol=1e-10)


def test_jaxtyping_signature_checks() -> None:
    beartype = pytest.importorskip("beartype").beartype
    from jaxtyping import jaxtyped

    checked = jaxtyped(typechecker=beartype)(fit_logistic_batched)
    X, y, _, _ = make_data(n=100, d=4, seed=9)
    checked(torch.tensor(X)[None], torch.tensor(y), [1.0])
    with pytest.raises(Exception):  # noqa: B017 - jaxtyping raises its own error type
        checked(torch.tensor(X)[None], torch.tensor(y[:50]), [1.0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batched_on_cuda_matches_cpu() -> None:
    X, y, _, _ = make_data(n=400, d=16, seed=11)
    Xb = torch.tensor(np.stack([X, X[:, ::-1].copy()]), dtype=torch.float32)
    cpu = fit_logistic_batched(Xb, torch.tensor(y), [0.01, 1.0, 100.0], tol=1e-6)
    gpu = fit_logistic_batched(Xb.cuda(), torch.tensor(y).cuda(), [0.01, 1.0, 100.0], tol=1e-6)
    assert gpu.coef.is_cuda
    np.testing.assert_allclose(gpu.coef.cpu().numpy(), cpu.coef.numpy(), rtol=1e-3, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# difference of means, LDA, multi-layer
# ----------------------------------------------------------------------------------------------------------


def test_diff_means_recovers_planted_direction() -> None:
    rng = np.random.default_rng(0)
    n, d = 600, 32
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    y = (rng.random(n) < 0.5).astype(np.float64)
    X = rng.normal(size=(n, d)) + 5.0 + np.outer(y, u) * 3.0
    probe = DiffMeansProbe().fit(X, y)
    cos = float(probe.direction @ torch.tensor(u))
    assert cos > 0.95
    proba = probe.predict_proba(X).numpy()
    assert roc_auc_score(y, proba) > 0.95
    # calibrated: the mean predicted probability is close to the base rate
    assert abs(proba.mean() - y.mean()) < 0.02
    raw = DiffMeansProbe(calibrate=False).fit(X, y)
    mid = (X[y == 1].mean(0) + X[y == 0].mean(0)) / 2
    assert abs(float(raw.decision_function(mid[None])[0])) < 1e-8


def test_lda_beats_diff_means_on_correlated_noise() -> None:
    rng = np.random.default_rng(1)
    n, d = 800, 20
    # strong noise along a direction that overlaps the signal; LDA whitens it away, diff-of-means cannot
    noise_dir = rng.normal(size=d)
    noise_dir /= np.linalg.norm(noise_dir)
    perp = rng.normal(size=d)
    perp -= (perp @ noise_dir) * noise_dir
    signal = perp / np.linalg.norm(perp) * 0.8 + noise_dir * 2.0  # Bayes AUROC ≈ 0.73, diff-means ≈ 0.61
    y = (rng.random(2 * n) < 0.5).astype(np.float64)
    X = rng.normal(size=(2 * n, d)) + np.outer(rng.normal(size=2 * n) * 6.0, noise_dir) + np.outer(y, signal)
    Xtr, ytr, Xte, yte = X[:n], y[:n], X[n:], y[n:]
    lda = LDAProbe().fit(Xtr, ytr)
    dm = DiffMeansProbe().fit(Xtr, ytr)
    a_lda = roc_auc_score(yte, lda.decision_function(Xte).numpy())
    a_dm = roc_auc_score(yte, dm.decision_function(Xte).numpy())
    assert a_lda > a_dm + 0.05
    assert lda.shrinkage_ is not None and 0.0 <= lda.shrinkage_ <= 1.0
    fixed = LDAProbe(shrinkage=0.1).fit(Xtr, ytr)
    assert roc_auc_score(yte, fixed.decision_function(Xte).numpy()) > a_dm


def test_ledoit_wolf_matches_sklearn() -> None:
    from sklearn.covariance import ledoit_wolf_shrinkage as sk_lw

    X = np.random.default_rng(2).normal(size=(50, 8)) @ np.diag(np.arange(1, 9.0))
    Xc = X - X.mean(0)
    assert ledoit_wolf_shrinkage(torch.tensor(Xc)) == pytest.approx(sk_lw(Xc, assume_centered=True), rel=1e-6)


def test_multi_layer_probe() -> None:
    rng = np.random.default_rng(3)
    n, L, d = 300, 3, 8
    y = (rng.random(n) < 0.5).astype(np.float64)
    X = rng.normal(size=(n, L, d))
    X[:, 2, 0] += 2.0 * y  # the signal is in the third layer
    probe = MultiLayerProbe(LogisticProbe(C=1.0), layers=[4, 8, 12]).fit(X, y)
    assert probe.layers == [4, 8, 12]
    assert probe.flops_per_token() == 2 * d * L + 1
    assert roc_auc_score(y, probe.decision_function(X).numpy()) > 0.8
    coef = probe.base.coef_.reshape(L, d)  # type: ignore[attr-defined]
    assert int(coef.abs().argmax()) == 2 * d + 0
    with pytest.raises(ValueError, match="layers"):
        probe.fit(X[:, :2], y)
    with pytest.raises(ValueError, match="features"):
        probe.decision_function(X[:, :2])


def test_flops_per_token() -> None:
    X, y, _, _ = make_data(n=100, d=7)
    assert LogisticProbe().fit(X, y).flops_per_token() == 2 * 7 + 1
    assert DiffMeansProbe().fit(X, y).flops_per_token() == 2 * 7 + 1


# ----------------------------------------------------------------------------------------------------------
# persistence
# ----------------------------------------------------------------------------------------------------------


def _fitted_probes() -> list[tuple[Probe, np.ndarray]]:
    X, y, Xt, _ = make_data(n=200, d=6, seed=12)
    X3 = np.stack([X, X[:, ::-1] * 2], 1)
    Xt3 = np.stack([Xt, Xt[:, ::-1] * 2], 1)
    return [
        (LogisticProbe(C=0.3, penalty="l2", class_weight={0: 1.0, 1: 2.0}).fit(X, y), Xt),
        (LogisticProbe(C=0.3, penalty="l1").fit(X.astype(np.float32), y), Xt),
        (DiffMeansProbe().fit(X, y), Xt),
        (LDAProbe(shrinkage="auto").fit(X, y), Xt),
        (MultiLayerProbe(LDAProbe(shrinkage=0.2), layers=[3, 7]).fit(X3, y), Xt3),
    ]


def test_save_load_round_trip(tmp_path: object) -> None:
    from pathlib import Path

    root = Path(str(tmp_path))
    meta = {
        "model_id": "smollm2-135m",
        "hook": "blocks.3.hook_resid_post",
        "layer": 3,
        "pooling": "mean",
        "dataset_fingerprint": "abc123",
        "metrics": {"auroc": np.float64(0.91)},
    }
    for i, (probe, Xt) in enumerate(_fitted_probes()):
        path = root / f"p{i}"
        save_probe(probe, path, meta)
        assert sorted(p.name for p in path.iterdir()) == ["probe.json", "probe.safetensors"]
        assert not any(p.name.startswith(".") for p in root.iterdir())  # temp dirs cleaned up
        loaded = load_probe(path, expect={"model_id": "smollm2-135m", "layer": 3})
        assert type(loaded) is type(probe)
        assert torch.equal(loaded.decision_function(Xt), probe.decision_function(Xt))
        assert loaded.flops_per_token() == probe.flops_per_token()
        info = read_probe_info(path)
        assert info["kind"] == probe.kind and info["metadata"]["metrics"]["auroc"] == pytest.approx(0.91)
        json.dumps(info)
        # overwrite in place, atomically
        save_probe(probe, path, {**meta, "layer": 5})
        assert read_probe_info(path)["metadata"]["layer"] == 5


def test_load_expect_mismatch_names_file_and_key(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "probe"
    probe, _ = _fitted_probes()[0]
    probe.save(path, {"model_id": "model-A", "hook": "blocks.3.hook_resid_post"})
    with pytest.raises(
        ProbeMismatchError, match=r"probe at .*probe\.json was trained on model model-A, not model-B"
    ):
        load_probe(path, expect={"model_id": "model-B"})
    with pytest.raises(ProbeMismatchError, match="hook"):
        LogisticProbe.load(path, expect={"model_id": "model-A", "hook": "blocks.4.hook_resid_post"})
    with pytest.raises(ProbeMismatchError, match="pooling"):
        load_probe(path, expect={"pooling": "max"})
    assert isinstance(LogisticProbe.load(path, expect={"model_id": "model-A"}), LogisticProbe)
    with pytest.raises(ValueError, match="not a DiffMeansProbe"):
        DiffMeansProbe.load(path)
    with pytest.raises(FileNotFoundError):
        load_probe(path.parent / "missing")


def test_registry_knows_builtin_kinds() -> None:
    assert {"logistic", "diff_means", "lda", "multi_layer"} <= set(SCORERS)


# ----------------------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [LogisticProbe, DiffMeansProbe, LDAProbe])
def test_bad_inputs(make: type[Probe]) -> None:
    X, y, _, _ = make_data(n=60, d=5)
    with pytest.raises(ValueError, match="empty"):
        make().fit(np.zeros((0, 5)), np.zeros(0))
    with pytest.raises(ValueError, match="different lengths"):
        make().fit(X, y[:-1])
    with pytest.raises(ValueError, match="only one class present"):
        make().fit(X, np.ones(len(y)))
    Xbad = X.copy()
    Xbad[17, 2] = np.nan
    with pytest.raises(ValueError, match="X contains NaN or inf at row 17"):
        make().fit(Xbad, y)
    Xbad[17, 2] = np.inf
    with pytest.raises(ValueError, match="row 17"):
        make().fit(Xbad, y)
    probe = make().fit(X, y)
    with pytest.raises(ValueError, match="5"):
        probe.decision_function(X[:, :4])
    with pytest.raises(ValueError, match="row 17"):
        probe.decision_function(Xbad)
    with pytest.raises(RuntimeError, match="not fitted"):
        make().decision_function(X)


@pytest.mark.usefixtures("unchecked")
def test_bad_hyperparameters() -> None:
    X, y, _, _ = make_data(n=60, d=5)
    with pytest.raises(ValueError, match="penalty"):
        LogisticProbe(penalty="l3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="C must be"):
        LogisticProbe(C=0.0)
    with pytest.raises(ValueError, match="Cs"):
        fit_logistic_batched(torch.tensor(X)[None], torch.tensor(y), [])
    with pytest.raises(ValueError, match="y must be"):
        fit_logistic_batched(torch.tensor(X)[None], torch.tensor(y[:10]), [1.0])
    with pytest.raises(ValueError, match="class_weight"):
        LogisticProbe(class_weight="weird").fit(X, y)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sample_weight"):
        LogisticProbe().fit(X, y, sample_weight=-np.ones(len(y)))
