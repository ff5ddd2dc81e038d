"""Benchmark: the batched logistic solver vs scikit-learn (as a user runs it, and tuned) vs probelab.

    python benchmarks/solver.py                        # 30 synthetic problems, n=3000, d=576, 8 Cs, 2 threads
    python benchmarks/solver.py --p 12 --threads 1

:func:`compare_solvers` is the comparison that ``benchmarks/sweep.py`` runs on real pooled store features;
this script runs it on synthetic ones. Every method fits every (problem, C) with the same L2 objective
(scikit-learn's ``C Σ ℓ + ½‖w‖²`` on features standardized with the train-set mean and population std,
unpenalized intercept, no class weights):

* ``sklearn``: scikit-learn as a user runs it: ``make_pipeline(StandardScaler(), LogisticRegression(C=C))``
  with every default (lbfgs, ``tol=1e-4``, ``max_iter=100``) on float64 input, one cold fit per
  (problem, C) in a Python loop; BLAS gets ``--threads`` threads.
* ``sklearn_tuned``: ``StandardScaler`` once per problem, then ``LogisticRegression(warm_start=True)`` refit
  along the C path from strong to weak regularization, on float32 input, problems in parallel over joblib
  (loky) with ``n_jobs = --threads``; its tolerance is ours translated into its units (scikit-learn's lbfgs
  stops on the gradient of the objective divided by ``C n``, ours on the gradient of ``C Σ ℓ + ½‖w‖²``,
  so it gets ``tol / (C n)``), with ``max_iter`` 1000.
* ``probelab``: ``probelab.probes.Logistic(C=C)`` (its own standardization, torch L-BFGS with its
  defaults) on a float32 ``Activations`` per problem, one fit per (problem, C), torch on ``--threads``.
* ``ours``: :func:`probes.solver.fit_logistic_batched` at its defaults (float32, ``tol=1e-4``, warm start
  along the C path, ``--threads`` worker threads).

The problems are split into blocks; each block is fitted by every method in turn (the order rotates from
block to block), so drifts in the machine's load hit every method alike. Speedups are total time ratios;
the per-block ratios give their spread. Nothing is extrapolated: every method fits every problem.

Accuracy is measured against a *converged* reference, scikit-learn's ``newton-cholesky`` in float64 with
``tol=1e-8`` (its own optimality is checked: the largest gradient of ``C Σ ℓ + ½‖w‖²`` over all fits is
reported): per method, the largest |ΔAUROC| on the held-out set, relative objective gap and relative
coefficient difference over every (problem, C). Needs the optional extra ``bench``
(``pip install -e '.[bench]'``) for probelab; ``--methods`` can leave it out.

Last line: one JSON object (``speedup_vs_sklearn``, ``speedup_vs_sklearn_tuned``, ``speedup_vs_probelab``,
``max_auroc_diff``, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from probes.solver import fit_logistic_batched

DEFAULT_CS: tuple[float, ...] = tuple(float(c) for c in np.logspace(-3, 2, 8))
METHODS: tuple[str, ...] = ("sklearn", "sklearn_tuned", "probelab", "ours")
PROBELAB_SPEC = "probelab>=0.1,<0.2"  # keep in step with the `bench` extra in pyproject.toml


def require_probelab() -> None:
    """Exit with a clear message when probelab (the ``bench`` extra) is not installed."""
    try:
        import probelab  # noqa: F401
    except ImportError:
        raise SystemExit(
            "this benchmark compares against probelab, which is not installed: "
            f"pip install -e '.[bench]' (or pip install '{PROBELAB_SPEC}'), "
            "or leave it out with --methods sklearn,sklearn_tuned,ours"
        ) from None


def parse_methods(text: str) -> tuple[str, ...]:
    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or "ours" not in methods:
        raise SystemExit(
            f"--methods: a comma-separated subset of {','.join(METHODS)} with 'ours'; got {text!r}"
        )
    return tuple(m for m in METHODS if m in methods)


def make_synthetic(
    p: int = 30,
    n_train: int = 3000,
    n_test: int = 1000,
    d: int = 576,
    seed: int = 0,
) -> tuple[Float[Tensor, "p n d"], Float[Tensor, " n"], Float[Tensor, "p m d"], Float[Tensor, " m"]]:
    """Synthetic pooled activations for ``p`` problems sharing labels (float32).

    An anisotropic (power-law spectrum) Gaussian with a non-zero mean per problem and a weak planted
    class-mean shift (Mahalanobis distance 0.9-2.8, so test AUROCs land around 0.7-0.95)."""
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    y = (torch.rand(n, generator=g) < 0.4).to(torch.float32)
    X = torch.empty(p, n, d)
    spectrum = torch.arange(1, d + 1, dtype=torch.float32) ** -0.8  # power-law variance profile
    for k in range(p):
        Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
        A = Q * spectrum.sqrt()[None, :] * 3.0
        u = torch.randn(d, generator=g)
        u /= u.norm()
        delta = 0.9 + 1.9 * torch.rand((), generator=g)  # Mahalanobis distance between the classes
        z = torch.randn(n, d, generator=g) + y[:, None] * delta * u[None, :]
        mu = torch.randn(d, generator=g) * 2.0
        X[k] = z @ A.T + mu
    return X[:, :n_train], y[:n_train], X[:, n_train:], y[n_train:]


# ----------------------------------------------------------------------------------------------------------
# the methods: each fits problems `idx` × every C, returns its wall time, and records its fits
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Fits:
    """One method's fits: coefficients on standardized features plus the standardization it used."""

    coef_std: np.ndarray  # [p, c, d]
    intercept_std: np.ndarray  # [p, c]
    mean: np.ndarray  # [p, c, d] (methods that refit the scaler per C may differ across C)
    scale: np.ndarray  # [p, c, d]
    hit_max_iter: np.ndarray | None  # [p, c] bool; None where the method does not say (probelab)

    @classmethod
    def empty(cls, p: int, c: int, d: int) -> Fits:
        return cls(
            np.zeros((p, c, d)),
            np.zeros((p, c)),
            np.zeros((p, c, d)),
            np.ones((p, c, d)),
            np.zeros((p, c), bool),
        )

    def raw(self, k: int, j: int) -> tuple[np.ndarray, float]:
        """Coefficients and intercept on raw features (float64)."""
        coef = self.coef_std[k, j] / self.scale[k, j]
        return coef, float(self.intercept_std[k, j] - coef @ self.mean[k, j])


@dataclass
class Problems:
    """``p`` problems sharing labels: float32 train / test features and 0/1 labels."""

    X: Float[Tensor, "p n d"]
    y: np.ndarray
    X_test: Float[Tensor, "p m d"]
    y_test: np.ndarray
    Cs: tuple[float, ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        p, n, d = self.X.shape
        return int(p), int(n), int(d)


def _quiet_fit(est: Any, X: np.ndarray, y: np.ndarray) -> Any:
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return est.fit(X, y)


def run_sklearn_default(P: Problems, idx: Sequence[int], fits: Fits, threads: int) -> float:
    """A user's loop: a fresh StandardScaler + LogisticRegression pipeline per (problem, C), float64."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    X64 = P.X[list(idx)].double().numpy()  # the user's float64 features (not timed)
    done = []
    with threadpool_limits(threads):
        t0 = time.perf_counter()
        for i in range(len(idx)):
            for C in P.Cs:
                done.append(_quiet_fit(make_pipeline(StandardScaler(), LogisticRegression(C=C)), X64[i], P.y))
        seconds = time.perf_counter() - t0
    for t, pipe in enumerate(done):
        k, j = idx[t // len(P.Cs)], t % len(P.Cs)
        scaler, clf = pipe[0], pipe[1]
        fits.coef_std[k, j], fits.intercept_std[k, j] = clf.coef_[0], clf.intercept_[0]
        fits.mean[k, j], fits.scale[k, j] = scaler.mean_, scaler.scale_
        fits.hit_max_iter[k, j] = clf.n_iter_[0] >= clf.max_iter  # type: ignore[index]
    return seconds


def _sklearn_tuned_path(
    X: np.ndarray, y: np.ndarray, Cs: Sequence[float], tols: Sequence[float], max_iter: int
) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, float, int]]]:
    """One problem's C path (given in fitting order), warm-started; runs in a joblib worker."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(X)
    Xs = scaler.transform(X)
    clf = LogisticRegression(warm_start=True, max_iter=max_iter)
    out = []
    for C, tol in zip(Cs, tols, strict=True):
        _quiet_fit(clf.set_params(C=C, tol=tol), Xs, y)
        out.append((clf.coef_[0].copy(), float(clf.intercept_[0]), int(clf.n_iter_[0])))
    return scaler.mean_, scaler.scale_, out


def sklearn_tuned_tols(Cs: Sequence[float], n: int, tol: float) -> list[float]:
    """Our ``tol`` (on the gradient of ``C Σ ℓ + ½‖w‖²``) in lbfgs's units (that gradient over ``C n``)."""
    return [tol / (C * n) for C in Cs]


def run_sklearn_tuned(
    P: Problems, idx: Sequence[int], fits: Fits, threads: int, tol: float, max_iter: int = 1000
) -> float:
    """Warm start along the C path (strong → weak), float32, problems in parallel (loky, n_jobs=threads)."""
    from joblib import Parallel, delayed
    from threadpoolctl import threadpool_limits

    X32 = [np.ascontiguousarray(P.X[k].numpy(), dtype=np.float32) for k in idx]
    y32 = P.y.astype(np.float32)
    order = sorted(range(len(P.Cs)), key=lambda j: P.Cs[j])
    Cs = [P.Cs[j] for j in order]
    tols = sklearn_tuned_tols(Cs, len(P.y), tol)
    with threadpool_limits(1):  # one BLAS thread per job (loky's workers get that by default too)
        t0 = time.perf_counter()
        res = Parallel(n_jobs=threads)(delayed(_sklearn_tuned_path)(x, y32, Cs, tols, max_iter) for x in X32)
        seconds = time.perf_counter() - t0
    for k, (mean, scale, path) in zip(idx, res, strict=True):
        for j, (coef, icpt, n_iter) in zip(order, path, strict=True):
            fits.coef_std[k, j], fits.intercept_std[k, j] = coef, icpt
            fits.mean[k, j], fits.scale[k, j] = mean, scale
            fits.hit_max_iter[k, j] = n_iter >= max_iter  # type: ignore[index]
    return seconds


def run_probelab(P: Problems, idx: Sequence[int], fits: Fits, threads: int) -> float:
    """probelab's ``Logistic`` with its defaults, one fit per (problem, C); torch on ``threads`` threads."""
    import probelab as pl

    y = torch.as_tensor(P.y, dtype=torch.float32)
    done = []
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        for k in idx:
            acts = pl.Activations(P.X[k], dims="bh")
            for C in P.Cs:
                done.append(pl.probes.Logistic(C=C, seed=0).fit(acts, y))
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(prev)
    for t, probe in enumerate(done):
        k, j = idx[t // len(P.Cs)], t % len(P.Cs)
        assert probe.linear is not None
        fits.coef_std[k, j] = probe.linear.weight.detach()[0].double().numpy()
        fits.intercept_std[k, j] = float(probe.linear.bias.detach()[0])
        fits.mean[k, j] = probe.scaler_mean.double().numpy()
        fits.scale[k, j] = probe.scaler_std.double().numpy()
    fits.hit_max_iter = None  # its L-BFGS iteration count is not exposed
    return seconds


def run_ours(P: Problems, idx: Sequence[int], fits: Fits, threads: int, tol: float) -> float:
    """:func:`fit_logistic_batched` on the block, ``threads`` worker threads."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)  # fit_logistic_batched's n_workers defaults to this
    try:
        Xb = P.X[list(idx)]  # (a copy; not timed, like the other methods' inputs)
        y = torch.as_tensor(P.y, dtype=torch.float32)
        t0 = time.perf_counter()
        res = fit_logistic_batched(Xb, y, P.Cs, tol=tol, warn=False)
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(prev)
    for i, k in enumerate(idx):
        fits.coef_std[k] = res.coef_standardized[i].double().numpy()
        fits.intercept_std[k] = res.intercept_standardized[i].double().numpy()
        fits.mean[k] = res.mean[i].double().numpy()[None]
        fits.scale[k] = res.scale[i].double().numpy()[None]
        fits.hit_max_iter[k] = (~res.converged[i]).numpy()  # type: ignore[index]
    return seconds


# ----------------------------------------------------------------------------------------------------------
# the converged reference and the accuracy of every method against it
# ----------------------------------------------------------------------------------------------------------


def _standardize64(X: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    X64 = X.double().numpy()
    mean = X64.mean(0)
    scale = X64.std(0)
    scale[scale < 1e-12 * (1.0 + np.abs(mean))] = 1.0
    return (X64 - mean) / scale, mean, scale


def _objective(Xs: np.ndarray, y: np.ndarray, w: np.ndarray, b: float, C: float) -> float:
    """scikit-learn's objective divided by ``C n``: mean log-loss + ‖w‖² / (2 C n), on standardized X."""
    z = Xs @ w + b
    return float(np.mean(np.logaddexp(0.0, z) - y * z) + (w @ w) / (2.0 * C * len(y)))


def _sklearn_scale_grad(Xs: np.ndarray, y: np.ndarray, w: np.ndarray, b: float, C: float) -> float:
    """‖∇(C Σ ℓ + ½‖w‖²)‖∞ over (w, b)."""
    r = 1.0 / (1.0 + np.exp(-(Xs @ w + b))) - y
    return float(max(np.abs(C * (r @ Xs) + w).max(), abs(C * r.sum())))


def evaluate(P: Problems, fits: dict[str, Fits], verbose: bool = True) -> dict[str, Any]:
    """Fit the converged float64 reference and compare every method's fits with it."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    p, _, _ = P.shape
    nc = len(P.Cs)
    y64 = P.y.astype(np.float64)
    order = sorted(range(nc), key=lambda j: P.Cs[j])
    names = list(fits)
    au = {m: np.zeros((p, nc)) for m in [*names, "reference"]}
    gap = {m: np.zeros((p, nc)) for m in names}
    coef_rel = {m: np.zeros((p, nc)) for m in names}
    ref_grad = np.zeros((p, nc))
    t0 = time.perf_counter()
    for k in range(p):
        Xs, mean, scale = _standardize64(P.X[k])
        Xe = P.X_test[k].double().numpy()
        ref = LogisticRegression(solver="newton-cholesky", tol=1e-8, max_iter=1000, warm_start=True)
        for j in order:
            C = P.Cs[j]
            _quiet_fit(ref.set_params(C=C), Xs, y64)
            w_ref, b_ref = ref.coef_[0].copy(), float(ref.intercept_[0])
            ref_grad[k, j] = _sklearn_scale_grad(Xs, y64, w_ref, b_ref, C)
            f_ref = _objective(Xs, y64, w_ref, b_ref, C)
            coef_raw = w_ref / scale
            au["reference"][k, j] = roc_auc_score(P.y_test, Xe @ coef_raw + (b_ref - coef_raw @ mean))
            for m in names:
                c_raw, b_raw = fits[m].raw(k, j)
                w, b = c_raw * scale, b_raw + c_raw @ mean  # in the reference's standardized frame
                gap[m][k, j] = (_objective(Xs, y64, w, b, C) - f_ref) / f_ref
                coef_rel[m][k, j] = np.linalg.norm(w - w_ref) / max(np.linalg.norm(w_ref), 1e-30)
                au[m][k, j] = roc_auc_score(P.y_test, Xe @ c_raw + b_raw)
        if verbose:
            print(f"  reference + accuracy: problem {k + 1}/{p}", file=sys.stderr, flush=True)
    out: dict[str, Any] = {
        "reference": "sklearn newton-cholesky, float64, tol=1e-8, max_iter=1000, warm-started",
        "reference_seconds": time.perf_counter() - t0,
        "reference_max_grad": float(ref_grad.max()),
        "auroc_reference_range": [float(au["reference"].min()), float(au["reference"].max())],
    }
    for m in names:
        d_au = np.abs(au[m] - au["reference"])
        out[m] = {
            "max_auroc_diff": float(d_au.max()),
            "mean_auroc_diff": float(d_au.mean()),
            "max_auroc_diff_by_C": [float(v) for v in d_au.max(0)],
            "max_objective_rel_gap": float(gap[m].max()),
            "min_objective_rel_gap": float(gap[m].min()),
            "max_coef_rel_diff": float(coef_rel[m].max()),
            "max_coef_rel_diff_by_C": [float(v) for v in coef_rel[m].max(0)],
            "not_converged": None if (h := fits[m].hit_max_iter) is None else int(h.sum()),
        }
    return out


# ----------------------------------------------------------------------------------------------------------
# the comparison
# ----------------------------------------------------------------------------------------------------------


def _warm_up(P: Problems, methods: Sequence[str], runners: dict[str, Callable[..., float]]) -> None:
    """One small untimed round (imports, the loky worker pool, first-call costs)."""
    small = Problems(P.X[:1, :200], P.y[:200], P.X_test[:1, :10], P.y_test[:10], P.Cs[:2])
    if len(np.unique(small.y)) < 2:
        small = Problems(P.X[:1], P.y, P.X_test[:1], P.y_test, P.Cs[:2])
    _, _, d = small.shape
    for m in methods:
        runners[m](small, [0], Fits.empty(1, len(small.Cs), d))


def compare_solvers(
    X: Float[Tensor, "p n d"] | np.ndarray,
    y: np.ndarray | Tensor,
    X_test: Float[Tensor, "p m d"] | np.ndarray,
    y_test: np.ndarray | Tensor,
    Cs: Sequence[float] = DEFAULT_CS,
    *,
    threads: int = 2,
    block: int = 10,
    tol: float = 1e-4,
    methods: Sequence[str] = METHODS,
    verbose: bool = True,
) -> dict[str, Any]:
    """Time every method in ``methods`` on every problem × C (block by block, rotating the order within
    each block) and measure each one's accuracy against a converged float64 reference.

    ``X`` is ``[p, n, d]`` (or ``[n, d]``), converted to float32 (the store's pooled features are float32);
    ``y`` holds 0/1 labels shared by all problems. ``tol`` is ours (``fit_logistic_batched``'s), also
    given to the tuned scikit-learn in its units. Returns times, speedups (``t_method / t_ours``, in total
    and per block) and accuracy figures."""
    methods = tuple(m for m in METHODS if m in methods)
    if "ours" not in methods:
        raise ValueError(f"methods must include 'ours', got {methods}")
    if "probelab" in methods:
        require_probelab()
    Xt = torch.as_tensor(np.asarray(X) if isinstance(X, np.ndarray) else X).to(torch.float32)
    Xe = torch.as_tensor(np.asarray(X_test) if isinstance(X_test, np.ndarray) else X_test).to(torch.float32)
    if Xt.ndim == 2:
        Xt, Xe = Xt[None], Xe[None]
    y_np = np.asarray(y, dtype=np.float64)
    ye_np = np.asarray(y_test, dtype=np.float64)
    if set(np.unique(y_np)) != {0.0, 1.0} or set(np.unique(ye_np)) != {0.0, 1.0}:
        raise ValueError("y and y_test must hold both labels 0 and 1 (and nothing else)")
    P = Problems(Xt.contiguous(), y_np, Xe.contiguous(), ye_np, tuple(float(c) for c in Cs))
    p, n, d = P.shape
    runners: dict[str, Callable[..., float]] = {
        "sklearn": lambda P, idx, f: run_sklearn_default(P, idx, f, threads),
        "sklearn_tuned": lambda P, idx, f: run_sklearn_tuned(P, idx, f, threads, tol),
        "probelab": lambda P, idx, f: run_probelab(P, idx, f, threads),
        "ours": lambda P, idx, f: run_ours(P, idx, f, threads, tol),
    }
    _warm_up(P, methods, runners)
    fits = {m: Fits.empty(p, len(P.Cs), d) for m in methods}
    blocks = [list(range(lo, min(p, lo + block))) for lo in range(0, p, block)]
    times = {m: np.zeros(len(blocks)) for m in methods}
    load = [os.getloadavg()[0]]
    for b, idx in enumerate(blocks):
        rot = b % len(methods)
        for m in methods[rot:] + methods[:rot]:
            times[m][b] = runners[m](P, idx, fits[m])
        if verbose:
            done = ", ".join(f"{m} {times[m][: b + 1].sum():.1f}s" for m in methods)
            print(f"  block {b + 1}/{len(blocks)} (problems {idx[0]}-{idx[-1]}): {done}", file=sys.stderr)
    load.append(os.getloadavg()[0])
    out: dict[str, Any] = {
        "p": p,
        "n": n,
        "n_test": int(Xe.shape[1]),
        "d": d,
        "n_C": len(P.Cs),
        "Cs": list(P.Cs),
        "n_fits": p * len(P.Cs),
        "threads": threads,
        "blocks": len(blocks),
        "tol": tol,
        "methods": list(methods),
        "loadavg_1min_before_after": load,
        "seconds": {m: float(times[m].sum()) for m in methods},
        "seconds_per_block": {m: [float(t) for t in times[m]] for m in methods},
    }
    for m in methods:
        if m == "ours":
            continue
        per_block = times[m] / times["ours"]
        out[f"speedup_vs_{m}"] = float(times[m].sum() / times["ours"].sum())
        out[f"speedup_vs_{m}_per_block"] = [float(np.min(per_block)), float(np.median(per_block)),
                                            float(np.max(per_block))]  # fmt: skip
    out["accuracy"] = evaluate(P, fits, verbose=verbose)
    out["max_auroc_diff"] = out["accuracy"]["ours"]["max_auroc_diff"]
    return out


def summary(r: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """Printable lines and the JSON figures of a :func:`compare_solvers` result."""
    load = ", ".join(f"{v:.1f}" for v in r["loadavg_1min_before_after"])
    lines = [
        f"{r['p']} problems × {r['n_C']} C = {r['n_fits']} fits per method (n={r['n']}, d={r['d']}), "
        f"{r['threads']} threads, {r['blocks']} interleaved blocks; 1-min load average before/after {load}"
    ]
    acc = r["accuracy"]
    for m in r["methods"]:
        a = acc[m]
        speed = ""
        if m != "ours":
            lo, med, hi = r[f"speedup_vs_{m}_per_block"]
            speed = (
                f"; ours {r[f'speedup_vs_{m}']:.1f}x faster (per block {lo:.1f}-{hi:.1f}, median {med:.1f})"
            )
        lines.append(
            f"{m:14s} {r['seconds'][m]:8.1f}s{speed}; vs reference: max |ΔAUROC| {a['max_auroc_diff']:.2e}, "
            f"objective gap ≤ {a['max_objective_rel_gap']:.1e}, "
            f"coef rel diff ≤ {a['max_coef_rel_diff']:.1e}, "
            f"{'?' if a['not_converged'] is None else a['not_converged']} fits not converged"
        )
    lines.append(
        f"reference: {acc['reference']} (largest gradient of C Σ ℓ + ½‖w‖²: {acc['reference_max_grad']:.1e}; "
        f"{acc['reference_seconds']:.0f}s); test AUROC {acc['auroc_reference_range'][0]:.3f}-"
        f"{acc['auroc_reference_range'][1]:.3f}"
    )
    figures: dict[str, Any] = {}
    for m in ("sklearn", "sklearn_tuned", "probelab"):
        if f"speedup_vs_{m}" in r:
            figures[f"speedup_vs_{m}"] = round(r[f"speedup_vs_{m}"], 2)
            figures[f"speedup_vs_{m}_per_block"] = [round(v, 2) for v in r[f"speedup_vs_{m}_per_block"]]
    figures["max_auroc_diff"] = float(f"{r['max_auroc_diff']:.3g}")
    for m in r["methods"]:
        figures[f"max_auroc_diff_{m}"] = float(f"{acc[m]['max_auroc_diff']:.3g}")
        figures[f"max_objective_rel_gap_{m}"] = float(f"{acc[m]['max_objective_rel_gap']:.3g}")
    figures["max_coef_rel_diff_ours"] = float(f"{acc['ours']['max_coef_rel_diff']:.3g}")
    figures["reference_max_grad"] = float(f"{acc['reference_max_grad']:.3g}")
    figures["seconds"] = {m: round(v, 2) for m, v in r["seconds"].items()}
    for key in ("p", "n_fits", "n", "n_test", "d", "threads", "blocks", "tol"):
        figures[key] = r[key]
    return lines, figures


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--p", type=int, default=30, help="number of problems (every method fits all of them)")
    ap.add_argument("--n", type=int, default=3000, help="training examples")
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--threads", type=int, default=2, help="threads / joblib jobs for every method")
    ap.add_argument("--block", type=int, default=5, help="problems per interleaved block")
    ap.add_argument("--tol", type=float, default=1e-4, help="tol of fit_logistic_batched (its default)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset, with 'ours'")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    methods = parse_methods(args.methods)
    if "probelab" in methods:
        require_probelab()

    t0 = time.perf_counter()
    X, y, Xe, ye = make_synthetic(args.p, args.n, args.n_test, args.d, seed=args.seed)
    print(f"data: p={args.p} n={args.n} n_test={args.n_test} d={args.d} ({time.perf_counter() - t0:.1f}s)")
    r = compare_solvers(
        X, y, Xe, ye, DEFAULT_CS, threads=args.threads, block=args.block, tol=args.tol, methods=methods
    )
    lines, figures = summary(r)
    print("\n".join(lines))
    print(json.dumps(figures))
    return r


if __name__ == "__main__":
    main()
