"""Benchmark: the sweep's batched logistic solver vs scikit-learn and probelab, on real store features.

Same features, same grid for every method: every layer of the default model × mean/max/last pooling × 8 C
values, on a few thousand constitution-generated prompts (train/test by group). The comparison is
:func:`solver.compare_solvers` (see ``benchmarks/solver.py`` for exactly how each method runs): scikit-learn
as a user runs it (defaults, float64, cold start, a loop), scikit-learn tuned (warm start along the C path,
float32, problems in parallel over joblib, our tolerance in its units), probelab's logistic probe, and
``fit_logistic_batched``; every method fits every (problem, C), in interleaved blocks, in one run. Accuracy
is every fit's held-out AUROC against scikit-learn converged in float64 (``tol=1e-8``). Also the cost of
scoring a token with a linear probe vs the model's forward pass per token (measured, and from the cost
model).

Usage: ``python benchmarks/sweep.py [--n 2400] [--threads 2] [--layer-step 1]``. The store is cached under
``~/.cache/probe-atlas/bench`` so a rerun skips collection. Needs the ``bench`` extra (probelab) unless
``--methods`` leaves it out. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

CS = [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 10.0]
POOLINGS = ("mean", "max", "last")


def main() -> None:
    from solver import METHODS, compare_solvers, parse_methods, require_probelab, summary

    from activations.collect import collect
    from activations.constitution import generate_prompts, load_constitution
    from activations.models import load_model
    from probes.cost import CostModel
    from probes.logistic import LogisticProbe

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2400)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=2, help="threads / joblib jobs for every method")
    ap.add_argument("--block", type=int, default=10, help="problems per interleaved block")
    ap.add_argument("--tol", type=float, default=1e-4, help="tol of fit_logistic_batched (its default)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset, with 'ours'")
    ap.add_argument(
        "--layer-step", type=int, default=1, help="every k-th layer only (fewer problems, for all methods)"
    )
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "probe-atlas" / "bench"))
    args = ap.parse_args()
    methods = parse_methods(args.methods)
    if "probelab" in methods:
        require_probelab()  # before the minutes of loading and pooling

    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    ds = generate_prompts(load_constitution("general"), n=args.n, seed=0)
    train_ids = {e.id for e in ds if e.split in ("train", "val")}
    store = collect(
        model,
        ds,
        Path(args.cache) / f"{args.model}-constitution-{args.n}",
        layers="all",
        max_len=256,
        progress=True,
    )
    ids = [e["id"] for e in store.examples()]
    tr = np.array([i in train_ids for i in ids])
    y = np.asarray(store.labels)
    layers = list(range(0, model.cfg.n_layers, args.layer_step))
    feats = []
    t0 = time.perf_counter()
    for pooling in POOLINGS:
        for layer in layers:
            feats.append(store.pooled(f"blocks.{layer}.hook_resid_post", pooling))
    X = torch.stack(feats)  # [layers × poolings, n, d]
    print(
        f"{len(ds)} prompts ({tr.sum()} train / {(~tr).sum()} test), {X.shape[0]} problems "
        f"({len(layers)} layers × {len(POOLINGS)} poolings), d={X.shape[2]}, {len(CS)} C values; "
        f"pooling took {time.perf_counter() - t0:.1f}s"
    )

    # probe scoring vs the forward pass, per token
    mid = model.cfg.n_layers // 2
    rows = torch.from_numpy(
        np.asarray(store.activations(f"blocks.{mid}.hook_resid_post")[:50000], dtype=np.float32)
    )
    probe = LogisticProbe(C=0.1).fit(store.pooled(f"blocks.{mid}.hook_resid_post", "mean")[tr], y[tr])
    reps = 5
    t0 = time.perf_counter()
    for _ in range(reps):
        probe.decision_function(rows)
    t_probe = (time.perf_counter() - t0) / (reps * len(rows))
    toks = torch.from_numpy(np.asarray(store.full_tokens[: 32 * 64], dtype=np.int64)).reshape(32, 64)
    with torch.inference_mode():
        model(toks[:2])
        t0 = time.perf_counter()
        model(toks)
        t_fwd = (time.perf_counter() - t0) / toks.numel()
    cost = CostModel.from_config(model.cfg, context_len=64)
    flop_ratio = cost.linear_probe_flops() / cost.full_forward_flops_per_token()
    del model, rows

    Xtr, Xte = X[:, torch.from_numpy(tr)].contiguous(), X[:, torch.from_numpy(~tr)].contiguous()
    del X, feats
    res = compare_solvers(
        Xtr, y[tr], Xte, y[~tr], CS, threads=args.threads, block=args.block, tol=args.tol, methods=methods
    )
    (Path(args.cache) / "last_compare.json").write_text(json.dumps(res))
    lines, figures = summary(res)
    print("\n".join(lines))
    print(
        f"probe scoring {t_probe * 1e9:.0f} ns/token vs forward pass {t_fwd * 1e6:.0f} us/token "
        f"(ratio {t_probe / t_fwd:.2e}; FLOP ratio from the cost model {flop_ratio:.2e})"
    )
    figures.update(
        {
            "n_problems": int(Xtr.shape[0]),
            "layers": len(layers),
            "poolings": list(POOLINGS),
            "n_train": int(tr.sum()),
            "n_test": int((~tr).sum()),
            "probe_vs_forward_per_token": float(f"{t_probe / t_fwd:.3e}"),
            "probe_vs_forward_flops": float(f"{flop_ratio:.3e}"),
        }
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
