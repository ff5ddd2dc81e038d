"""Benchmark: the batched logistic solver vs a Python loop of scikit-learn ``LogisticRegression(lbfgs)``.

    .venv/bin/python benchmarks/solver.py                 # p=90 problems, n=3000, d=576, 8 Cs
    .venv/bin/python benchmarks/solver.py --p 12 --sklearn-p 6

Synthetic features imitate pooled residual-stream activations: an anisotropic (power-law spectrum)
Gaussian with a non-zero mean, one problem per (layer, pooling), labels shared by all problems, and a weak
planted class-mean shift per problem (Mahalanobis distance 0.9-2.8, so test AUROCs land around 0.7-0.95).
When scikit-learn would take long, it is timed on the first ``--sklearn-p`` problems and its time is
extrapolated linearly to all ``p`` (the output says so). The last line printed is a JSON object with
``speedup_vs_sklearn`` and ``max_auroc_diff``.

:func:`compare_with_sklearn` is reusable on real pooled activations (``X`` ``[p, n, d]`` or ``[n, d]``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from probes.linear import fit_logistic_batched

DEFAULT_CS: tuple[float, ...] = tuple(float(c) for c in np.logspace(-3, 2, 8))


def make_synthetic(
    p: int = 90,
    n_train: int = 3000,
    n_test: int = 1000,
    d: int = 576,
    seed: int = 0,
) -> tuple[Float[Tensor, "p n d"], Float[Tensor, " n"], Float[Tensor, "p m d"], Float[Tensor, " m"]]:
    """Synthetic pooled activations for ``p`` problems sharing labels (float32)."""
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


def compare_with_sklearn(
    X: Float[Tensor, "p n d"] | Float[Tensor, "n d"] | np.ndarray,
    y: Float[Tensor, " n"] | np.ndarray,
    X_test: Float[Tensor, "p m d"] | Float[Tensor, "m d"] | np.ndarray,
    y_test: Float[Tensor, " m"] | np.ndarray,
    Cs: Sequence[float] = DEFAULT_CS,
    *,
    sklearn_p: int | None = None,
    sklearn_max_iter: int = 1000,
    sklearn_tol: float = 1e-4,
    solver_kwargs: dict[str, Any] | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Fit every (problem, C) with :func:`fit_logistic_batched` and with a loop of scikit-learn lbfgs fits
    (StandardScaler then ``LogisticRegression(C, solver="lbfgs")``), on the first ``sklearn_p`` problems
    (default: all); compare wall time (scikit-learn's extrapolated linearly to all problems when it ran
    on a subset), test AUROC and coefficients (on standardized features)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    Xt = torch.as_tensor(np.asarray(X) if isinstance(X, np.ndarray) else X)
    Xe = torch.as_tensor(np.asarray(X_test) if isinstance(X_test, np.ndarray) else X_test)
    if Xt.ndim == 2:
        Xt, Xe = Xt[None], Xe[None]
    yt = torch.as_tensor(np.asarray(y, dtype=np.float32))
    ye = np.asarray(y_test, dtype=np.float64)
    p, n, d = Xt.shape
    Cs = [float(c) for c in Cs]
    sk_p = p if sklearn_p is None else max(1, min(p, sklearn_p))

    t0 = time.perf_counter()
    res = fit_logistic_batched(Xt, yt, Cs, warn=False, **(solver_kwargs or {}))
    t_batched = time.perf_counter() - t0
    scores = res.decision_function(Xe.to(res.coef.dtype)).cpu().numpy()  # [p, c, m]
    au_b = np.array([[roc_auc_score(ye, scores[k, j]) for j in range(len(Cs))] for k in range(p)])

    y_np = yt.numpy()
    au_s = np.zeros((sk_p, len(Cs)))
    coef_rel = np.zeros((sk_p, len(Cs)))
    sk_not_conv = 0
    sk_time = 0.0
    for k in range(sk_p):
        Xk = Xt[k].double().numpy()
        Xek = Xe[k].double().numpy()
        t0 = time.perf_counter()
        scaler = StandardScaler().fit(Xk)
        Xs = scaler.transform(Xk)
        fits = []
        for C in Cs:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                clf = LogisticRegression(C=C, solver="lbfgs", max_iter=sklearn_max_iter, tol=sklearn_tol)
                clf.fit(Xs, y_np)
            fits.append(clf)
        sk_time += time.perf_counter() - t0
        Xes = scaler.transform(Xek)
        for j, clf in enumerate(fits):
            sk_not_conv += int(clf.n_iter_[0] >= sklearn_max_iter)
            au_s[k, j] = roc_auc_score(ye, clf.decision_function(Xes))
            w_ref = clf.coef_[0]
            w_ours = res.coef_standardized[k, j].double().cpu().numpy()
            coef_rel[k, j] = np.linalg.norm(w_ours - w_ref) / max(np.linalg.norm(w_ref), 1e-30)
        if verbose:
            print(f"  sklearn problem {k + 1}/{sk_p}: {sk_time:.1f}s so far", file=sys.stderr, flush=True)

    sk_time_all = sk_time * p / sk_p
    diff = np.abs(au_b[:sk_p] - au_s)
    out = {
        "p": p,
        "n": n,
        "d": d,
        "n_C": len(Cs),
        "Cs": Cs,
        "batched_seconds": t_batched,
        "batched_newton_iters_mean": float(res.n_iter.double().mean()),
        "batched_not_converged": int((~res.converged).sum()),
        "sklearn_problems_timed": sk_p,
        "sklearn_seconds_measured": sk_time,
        "sklearn_seconds": sk_time_all,
        "sklearn_extrapolated": sk_p < p,
        "sklearn_max_iter": sklearn_max_iter,
        "sklearn_not_converged": sk_not_conv,
        "speedup_vs_sklearn": sk_time_all / t_batched,
        "max_auroc_diff": float(diff.max()),
        "mean_auroc_diff": float(diff.mean()),
        "max_coef_rel_diff": float(coef_rel.max()),
        "median_coef_rel_diff": float(np.median(coef_rel)),
        "coef_rel_diff_by_C": [float(v) for v in coef_rel.max(0)],
        "auroc_batched_range": [float(au_b.min()), float(au_b.max())],
        "auroc_batched": au_b.tolist(),
        "auroc_sklearn": au_s.tolist(),
    }
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--p", type=int, default=90, help="number of problems (layers × poolings)")
    ap.add_argument("--n", type=int, default=3000, help="training examples")
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--sklearn-p", type=int, default=None, help="time sklearn on this many problems only")
    ap.add_argument("--sklearn-max-iter", type=int, default=1000)
    ap.add_argument("--sklearn-tol", type=float, default=1e-4, help="scikit-learn's tol (its default: 1e-4)")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tol", type=float, default=1e-4, help="tol of fit_logistic_batched")
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument("--store", default=None, help="an ActivationStore directory (not wired up yet)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.store is not None:
        raise SystemExit(
            "--store: running on a store's pooled activations is not wired up yet; call "
            "compare_with_sklearn() on pooled [p, n, d] features instead"
        )

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    X, y, Xe, ye = make_synthetic(args.p, args.n, args.n_test, args.d, seed=args.seed)
    dt = getattr(torch, args.dtype)
    X, Xe = X.to(device=args.device, dtype=dt), Xe.to(device=args.device, dtype=dt)
    y = y.to(args.device)
    print(f"data: p={args.p} n={args.n} n_test={args.n_test} d={args.d} ({time.perf_counter() - t0:.1f}s)")
    sk_p = args.sklearn_p
    if sk_p is None:
        sk_p = min(args.p, 10)
    r = compare_with_sklearn(
        X,
        y.cpu(),
        Xe.cpu(),
        ye,
        DEFAULT_CS,
        sklearn_p=sk_p,
        sklearn_max_iter=args.sklearn_max_iter,
        sklearn_tol=args.sklearn_tol,
        solver_kwargs={"tol": args.tol, "chunk_size": args.chunk_size},
    )
    print(f"Cs: {', '.join(f'{c:.3g}' for c in r['Cs'])} (on standardized features)")
    print(
        f"batched torch solver ({args.device}, {args.dtype}): {r['batched_seconds']:.2f}s for "
        f"{r['p']}×{r['n_C']} fits, mean {r['batched_newton_iters_mean']:.1f} Newton steps per fit, "
        f"{r['batched_not_converged']} not converged"
    )
    extra = ""
    if r["sklearn_extrapolated"]:
        extra = (
            f" (measured {r['sklearn_seconds_measured']:.1f}s on {r['sklearn_problems_timed']} problems, "
            f"extrapolated linearly to {r['p']})"
        )
    print(
        f"sklearn lbfgs loop (tol={args.sklearn_tol:g}, max_iter={r['sklearn_max_iter']}): "
        f"{r['sklearn_seconds']:.1f}s{extra}; "
        f"{r['sklearn_not_converged']} fits hit max_iter"
    )
    print(
        f"test AUROC range {r['auroc_batched_range'][0]:.3f}–{r['auroc_batched_range'][1]:.3f}; "
        f"|ΔAUROC| max {r['max_auroc_diff']:.2e} mean {r['mean_auroc_diff']:.2e} over "
        f"{r['sklearn_problems_timed']}×{r['n_C']} fits"
    )
    print("coef ‖Δw‖/‖w_sklearn‖ max by C: " + ", ".join(f"{v:.1e}" for v in r["coef_rel_diff_by_C"]))
    print(
        json.dumps(
            {
                "speedup_vs_sklearn": round(r["speedup_vs_sklearn"], 2),
                "max_auroc_diff": float(f"{r['max_auroc_diff']:.3g}"),
            }
        )
    )
    return r


if __name__ == "__main__":
    main()
