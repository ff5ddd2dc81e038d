"""Streaming monitor overhead: tokens/s of KV-cached generation with the per-token monitor vs without it.

Same model (the default SmolLM2-135M-Instruct), same prompts, same generation loop
(:func:`probes.stream.generate_tokens`), greedy, batched; the monitored run reads a per-token EMA probe
(trained here on the built-in prompts) from the hook of the forward pass that produces the next token and
updates the
running score every token (threshold +inf, so both runs generate exactly the same tokens). Repeats are
interleaved (plain, monitored, monitored, plain, ...) and the overhead is the median over repeats of
``t_monitored / t_plain - 1`` (wall clock; the process CPU-time ratio is reported too). By default both runs
make the same forward passes; ``--score-last`` adds the monitor's extra partial pass that scores each stream's
final token (its FLOP share, ``forward to the probe's layer / new tokens``, is reported either way). The FLOP
overhead of the same read-out from the cost model is printed beside the measured one.

Last line: ``{"monitor_overhead": <fraction>, "flop_overhead_pct": <percent>, ...}``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from activations.collect import collect
from activations.data import load_dataset
from activations.models import load_model
from probes.cost import CostModel
from probes.stream import StreamingMonitor, generate_tokens
from probes.token import TokenProbe, ragged_from_store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared CPU)")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--prompts", type=int, default=4, help="batch of prompts generated together")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument(
        "--score-last",
        action="store_true",
        help="also score each stream's last token (one more partial forward pass; off: both runs make the "
        "same forward passes and the difference is the monitor's own work)",
    )
    ap.add_argument("--train", type=int, default=64, help="built-in prompts to train the probe on")
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    hook = f"blocks.{args.layer}.hook_resid_post"
    ds = load_dataset("builtin")
    train = ds.filter(split="train").subsample(args.train, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        store = collect(model, train, Path(tmp) / "s", hooks=[hook], layers=None, progress=False)
        probe = TokenProbe.cost_effective(alpha=0.5, epochs=20, hooks=[hook]).fit(
            ragged_from_store(store, hook), store.labels
        )
    mon = StreamingMonitor(model, probe, threshold=float("inf"))
    test = ds.filter(split="test").subsample(args.prompts, seed=1)
    prompts = [mon.prompt_ids(e.prompt) for e in test]

    cpu: dict[str, float] = {}

    def plain() -> tuple[float, int]:
        t0, c0 = time.perf_counter(), time.process_time()
        res = generate_tokens(model, prompts, args.new_tokens, stop_on_eos=False)
        cpu["plain"] = time.process_time() - c0
        return time.perf_counter() - t0, sum(len(r.ids) for r in res)

    def monitored() -> tuple[float, int]:
        t0, c0 = time.perf_counter(), time.process_time()
        res = generate_tokens(
            model,
            prompts,
            args.new_tokens,
            stop_on_eos=False,
            probe=probe,
            threshold=float("inf"),
            score_last=args.score_last,
        )
        cpu["monitored"] = time.process_time() - c0
        return time.perf_counter() - t0, sum(len(r.ids) for r in res)

    plain()  # warm-up
    monitored()
    ratios, cpu_ratios, tp, tm = [], [], [], []
    for r in range(args.repeats):
        order = (plain, monitored) if r % 2 == 0 else (monitored, plain)
        out = {}
        for fn in order:
            out[fn.__name__] = fn()
        (a, na), (b, nb) = out["plain"], out["monitored"]
        assert na == nb, "both runs must generate the same number of tokens"
        tp.append(na / a)
        tm.append(nb / b)
        ratios.append(b / a - 1.0)
        cpu_ratios.append(cpu["monitored"] / cpu["plain"] - 1.0)
        print(
            f"repeat {r}: plain {na / a:.1f} tok/s, monitored {nb / b:.1f} tok/s, overhead {b / a - 1:+.2%} "
            f"(CPU time {cpu_ratios[-1]:+.2%})",
            flush=True,
        )
    overhead = float(np.median(ratios))
    cost = CostModel.from_config(model.cfg, context_len=512)
    pc = cost.probe_cost(
        args.layer, cost.d_model, probe.read_pooling, view="marginal", order="probe_then_pool"
    )
    # the last token of each stream is scored by one extra forward pass up to the probe's layer
    final_pass = cost.forward_flops_per_token(args.layer, include_unembed=False) / args.new_tokens
    flop_pct = pc.overhead_pct
    print(
        f"median over {args.repeats} interleaved repeats: plain {np.median(tp):.1f} tok/s, monitored "
        f"{np.median(tm):.1f} tok/s, overhead {overhead:+.2%}; cost model: probe read-out {flop_pct:.5f}% "
        f"of a forward pass per token, + {cost.overhead_pct(final_pass):.2f}% for the final token's extra "
        "partial pass"
    )
    print(
        json.dumps(
            {
                "monitor_overhead": round(overhead, 4),
                "monitor_overhead_cpu_time": round(float(np.median(cpu_ratios)), 4),
                "flop_overhead_pct": flop_pct,
                "flop_overhead_pct_with_final_pass": cost.overhead_pct(pc.flops_per_token + final_pass),
                "score_last": args.score_last,
                "plain_tokens_per_s": round(float(np.median(tp)), 2),
                "monitored_tokens_per_s": round(float(np.median(tm)), 2),
                "batch": args.prompts,
                "new_tokens": args.new_tokens,
                "layer": args.layer,
            }
        )
    )


if __name__ == "__main__":
    main()
