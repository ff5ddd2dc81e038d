"""Wall time of the same sweep on the local backend and on Ray (local instance), and that the tables agree.

Runs a small spec on the default model (built-in prompts, all layers, four poolings, two probe kinds) three
ways: local (collect + fit), Ray (sharded collection on ``--actors`` CPU actors + fit tasks), and Ray fits
only (stores already there). Prints the figures and, last, one JSON object.

    .venv/bin/python benchmarks/backends.py [--n-train 120] [--actors 2] [--cpus 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--n-train", type=int, default=120)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()

    import ray

    from activations.models import load_model
    from experiments.backends.ray import default_model_factory
    from experiments.sweep.engine import run_sweep
    from experiments.sweep.spec import parse_spec

    n = args.n_train
    spec = parse_spec(
        {
            "name": "bench-backends",
            "model": args.model,
            "max_len": 256,
            "datasets": {
                "train": {"path": "builtin", "split": "train", "subsample": n},
                "val": {"path": "builtin", "split": "val", "subsample": n // 2},
                "test": {"builtin_test": {"path": "builtin", "split": "test", "subsample": n // 2}},
            },
            "layers": "all",
            "poolings": ["mean", "max", "last", "ema0.5"],
            "probes": [{"kind": "logistic_l2"}, {"kind": "diffmeans"}],
            "Cs": [0.01, 0.1, 1.0, 10.0],
            "bootstrap": 100,
        }
    )
    model = load_model(args.model)
    tmp = Path(tempfile.mkdtemp(prefix="bench-backends-"))

    t0 = time.perf_counter()
    local = run_sweep(spec, tmp / "local", model=model, progress=False)
    t_local = time.perf_counter() - t0

    t0 = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    t_init = time.perf_counter() - t0
    t0 = time.perf_counter()
    remote = run_sweep(
        spec,
        tmp / "ray",
        model=model,
        backend="ray",
        model_factory=default_model_factory(args.model, device="cpu"),
        n_collectors=args.actors,
        progress=False,
    )
    t_ray = time.perf_counter() - t0
    t0 = time.perf_counter()
    fits_only = run_sweep(
        spec, tmp / "ray-fits", model=model, store_root=tmp / "ray" / "stores", progress=False, backend="ray"
    )
    t_ray_fits = time.perf_counter() - t0
    ray.shutdown()
    t0 = time.perf_counter()
    run_sweep(spec, tmp / "local-fits", model=model, store_root=tmp / "local" / "stores", progress=False)
    t_local_fits = time.perf_counter() - t0

    def comparable(df: pd.DataFrame) -> pd.DataFrame:
        return (
            df.drop(columns=["fit_seconds", "probe_path"])
            .sort_values(["run_id", "eval_set"])
            .reset_index(drop=True)
        )

    a, b, c = comparable(local), comparable(remote), comparable(fits_only)
    num = [k for k in a.columns if pd.api.types.is_numeric_dtype(a[k])]
    same = (
        a.drop(columns=num).equals(b.drop(columns=num))
        and np.allclose(a[num].to_numpy(float), b[num].to_numpy(float), rtol=1e-6, equal_nan=True)
        and np.allclose(a[num].to_numpy(float), c[num].to_numpy(float), rtol=1e-6, equal_nan=True)
    )
    max_diff = float(np.nanmax(np.abs(a[num].to_numpy(float) - b[num].to_numpy(float))))
    res = {
        "model": args.model,
        "runs": int(local["run_id"].nunique()),
        "rows": len(local),
        "prompts": n + n // 2 * 3,
        "local_collect_and_fit_s": round(t_local, 1),
        "ray_init_s": round(t_init, 1),
        "ray_collect_and_fit_s": round(t_ray, 1),
        "local_fits_only_s": round(t_local_fits, 1),
        "ray_fits_only_s": round(t_ray_fits, 1),
        "ray_actors": args.actors,
        "ray_cpus": args.cpus,
        "tables_equal": bool(same),
        "max_abs_numeric_diff": max_diff,
    }
    for k, v in res.items():
        print(f"{k:>28}: {v}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
