"""Benchmark: the sweep's batched logistic solver vs a loop of scikit-learn fits, on real store features.

Same features, same grid: every layer of the default model × mean/max/last pooling × 8 C values, on a few
thousand constitution-generated prompts (train/test by group). Reports the wall time of
``fit_logistic_batched`` vs ``StandardScaler + LogisticRegression(lbfgs)`` over every (layer, pooling, C),
as a ratio measured in one run, and every run's test-AUROC difference. Also the cost of scoring a token with
a linear probe vs the model's forward pass per token (measured, and from the cost model).

Usage: ``python benchmarks/sweep.py [--n 2400] [--sklearn-problems 90]``. The store is cached under
``~/.cache/probe-atlas/bench`` so a rerun skips collection. Last line: one JSON object.
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


def main() -> None:
    from solver import compare_with_sklearn

    from activations.collect import collect
    from activations.constitution import generate_prompts, load_constitution
    from activations.models import load_model
    from probes.cost import CostModel
    from probes.linear import LogisticProbe

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2400)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument(
        "--sklearn-problems", type=int, default=None, help="time scikit-learn on this many (default all)"
    )
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "probe-atlas" / "bench"))
    args = ap.parse_args()

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
    L = model.cfg.n_layers
    feats = []
    t0 = time.perf_counter()
    for pooling in ("mean", "max", "last"):
        for layer in range(L):
            feats.append(store.pooled(f"blocks.{layer}.hook_resid_post", pooling))
    X = torch.stack(feats)  # [3L, n, d]
    print(
        f"{len(ds)} prompts ({tr.sum()} train / {(~tr).sum()} test), {X.shape[0]} problems "
        f"(layers × poolings), d={X.shape[2]}, {len(CS)} C values; "
        f"pooling took {time.perf_counter() - t0:.1f}s"
    )

    # probe scoring vs the forward pass, per token
    rows = torch.from_numpy(
        np.asarray(store.activations("blocks.15.hook_resid_post")[:50000], dtype=np.float32)
    )
    probe = LogisticProbe(C=0.1).fit(X[15, tr], y[tr])
    torch.set_num_threads(2)
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
    res = compare_with_sklearn(X[:, tr], y[tr], X[:, ~tr], y[~tr], CS, sklearn_p=args.sklearn_problems)
    (Path(args.cache) / "last_compare.json").write_text(
        json.dumps({k: v for k, v in res.items() if not isinstance(v, list)})
    )
    speedup, max_diff = res["speedup_vs_sklearn"], res["max_auroc_diff"]
    cost = CostModel.from_config(model.cfg, context_len=64)
    flop_ratio = cost.linear_probe_flops() / cost.full_forward_flops_per_token()
    print(
        f"batched solver {res['batched_seconds']:.1f}s vs scikit-learn {res['sklearn_seconds']:.1f}s "
        f"(timed on {res['sklearn_problems_timed']} of {X.shape[0]} problems): {speedup:.1f}x; "
        f"max test-AUROC difference {max_diff:.4f}"
    )
    print(
        f"probe scoring {t_probe * 1e9:.0f} ns/token vs forward pass {t_fwd * 1e6:.0f} us/token "
        f"(ratio {t_probe / t_fwd:.2e}; FLOP ratio from the cost model {flop_ratio:.2e})"
    )
    print(
        json.dumps(
            {
                "speedup_vs_sklearn": round(float(speedup), 2),
                "max_auroc_diff": round(float(max_diff), 5),
                "probe_vs_forward_per_token": float(f"{t_probe / t_fwd:.3e}"),
                "probe_vs_forward_flops": float(f"{flop_ratio:.3e}"),
                "batched_seconds": round(float(res["batched_seconds"]), 2),
                "sklearn_seconds": round(float(res["sklearn_seconds"]), 2),
                "n_problems": int(X.shape[0]),
                "n_train": int(tr.sum()),
                "n_test": int((~tr).sum()),
            }
        )
    )


if __name__ == "__main__":
    main()
