"""Attack throughput: the batched attack vs a one-example-at-a-time loop, same prompts, same steps, same seed.

The default model (SmolLM2-135M-Instruct), ``--prompts`` harmful AdvBench prompts, a logistic mean-pooled
probe on one mid layer trained here on a store of the built-in data (train split, C by validation AUROC).
Both attacks run twice per repeat, batched (``batch_size = --prompts``) and one example at a time
(``batch_size = 1``), in alternating order after a one-step warm-up of each; the figure is attack
*example-steps per second* (examples × optimization steps / wall seconds of the attack loop, the targets'
generation and the final evaluations excluded: they are the same work either way and not attack steps),
the median over ``--repeats`` runs of each; the same with the process's CPU time is reported beside it (on
a shared machine wall time also counts waiting for a core).
Both runs must find the same suffixes (the GCG suffix ids, the embedding suffixes to float tolerance): the
JSON says whether they did.

``flops_per_attack_step`` is the mean FLOPs of one example's optimization step by the cost model
(:mod:`experiments.analysis.attacks.budget`: forward + 2× backward, plus GCG's candidate forwards).

Last line: ``{"attack_speedup_batched": <embedding attack>, "gcg_speedup_batched": ...,
"flops_per_attack_step": <embedding>, "gcg_flops_per_attack_step": ..., ...}``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from activations.models import load_model
from experiments.analysis.attacks import EmbeddingConfig, GCGConfig, embedding_attack, gcg_attack
from experiments.analysis.attacks.common import prepare_attack
from experiments.analysis.attacks.run import advbench_prompts, train_reference_probe


def attack_seconds(run: Any) -> tuple[float, float]:
    """Wall and CPU seconds of the attack loops (the per-example shares of the chunks' times add up to
    them)."""
    return float(sum(r.seconds for r in run.results)), float(sum(r.cpu_seconds for r in run.results))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--emb-steps", type=int, default=4)
    ap.add_argument("--gcg-steps", type=int, default=2)
    ap.add_argument("--gcg-candidates", type=int, default=16)
    ap.add_argument("--suffix-len", type=int, default=10)
    ap.add_argument("--target-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="pairs of runs, in alternating order (ABBA)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model = load_model("smollm2")
    target, info = train_reference_probe(model, layer=args.layer)
    prompts = advbench_prompts(args.prompts)
    print(f"probe {target.name} (C={info['C']}, val AUROC {info['val_auroc']:.3f})")
    print(f"model and probe ready in {time.perf_counter() - t0:.0f} s")
    base = {"suffix_len": args.suffix_len, "target_tokens": args.target_tokens, "seed": 0}
    configs = {
        "embedding": EmbeddingConfig(steps=args.emb_steps, **base),
        "gcg": GCGConfig(steps=args.gcg_steps, n_candidates=args.gcg_candidates, top_k=64, **base),
    }
    fns = {"embedding": embedding_attack, "gcg": gcg_attack}
    # the greedy targets are generated once per run; time them apart so the reader sees what is excluded
    tg = time.perf_counter()
    prepare_attack(model, target, prompts, configs["embedding"])
    print(f"preparing {len(prompts)} prompts with greedy targets: {time.perf_counter() - tg:.1f} s")

    out: dict[str, Any] = {}
    for method, cfg in configs.items():
        fn = fns[method]
        for bs in (len(prompts), 1):  # warm-up: one step each
            fn(model, target, prompts[: min(bs, 2)], replace(cfg, steps=1, batch_size=bs))
        wall: dict[str, list[float]] = {"batched": [], "single": []}
        cpu: dict[str, list[float]] = {"batched": [], "single": []}
        runs: dict[str, Any] = {}
        for rep in range(args.repeats):
            order = ("batched", "single") if rep % 2 == 0 else ("single", "batched")
            for mode in order:
                bs = len(prompts) if mode == "batched" else 1
                run = fn(model, target, prompts, replace(cfg, batch_size=bs))
                w, c = attack_seconds(run)
                wall[mode].append(w)
                cpu[mode].append(c)
                runs[mode] = run
                print(f"{method} {mode}: {w:.1f} s of attack steps ({c:.1f} s CPU)", flush=True)
        steps = sum(r.steps for r in runs["batched"].results)
        rate = {m: steps / float(np.median(t)) for m, t in wall.items()}
        rate_cpu = {m: steps / float(np.median(t)) for m, t in cpu.items()}
        b, s = runs["batched"].results, runs["single"].results
        if method == "gcg":
            same = all(x.suffix_ids == y.suffix_ids for x, y in zip(b, s, strict=True))
        else:
            same = bool(
                torch.allclose(
                    runs["batched"].suffix_embeddings, runs["single"].suffix_embeddings, atol=1e-4, rtol=1e-3
                )
            )
        out[method] = {
            "speedup": rate["batched"] / rate["single"],
            "speedup_cpu_time": rate_cpu["batched"] / rate_cpu["single"],
            "steps_per_s_batched": rate["batched"],
            "steps_per_s_single": rate["single"],
            "flops_per_step": float(np.mean([r.flops / max(r.steps, 1) for r in b])),
            "same_suffixes": same,
            "max_abs_score_diff": float(max(abs(x.score - y.score) for x, y in zip(b, s, strict=True))),
            "mean_clean_score": float(np.mean([r.clean_score for r in b])),
            "mean_score": float(np.mean([r.score for r in b])),
        }
        print(f"{method}: {json.dumps(out[method])}", flush=True)
    e, g = out["embedding"], out["gcg"]
    print(
        json.dumps(
            {
                "attack_speedup_batched": round(e["speedup"], 3),
                "gcg_speedup_batched": round(g["speedup"], 3),
                "attack_speedup_batched_cpu_time": round(e["speedup_cpu_time"], 3),
                "gcg_speedup_batched_cpu_time": round(g["speedup_cpu_time"], 3),
                "flops_per_attack_step": e["flops_per_step"],
                "gcg_flops_per_attack_step": g["flops_per_step"],
                "steps_per_s_batched": round(e["steps_per_s_batched"], 4),
                "steps_per_s_single": round(e["steps_per_s_single"], 4),
                "gcg_steps_per_s_batched": round(g["steps_per_s_batched"], 4),
                "gcg_steps_per_s_single": round(g["steps_per_s_single"], 4),
                "same_suffixes": {"embedding": e["same_suffixes"], "gcg": g["same_suffixes"]},
                "max_abs_score_diff": {"embedding": e["max_abs_score_diff"], "gcg": g["max_abs_score_diff"]},
                "prompts": args.prompts,
                "emb_steps": args.emb_steps,
                "gcg_steps": args.gcg_steps,
                "gcg_candidates": args.gcg_candidates,
                "suffix_len": args.suffix_len,
                "target_tokens": args.target_tokens,
                "layer": args.layer,
                "repeats": args.repeats,
                "threads": args.threads,
            }
        )
    )


if __name__ == "__main__":
    main()
