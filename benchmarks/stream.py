"""Streaming monitor overhead: KV-cached generation with the per-token monitor vs without it.

Same model (the default SmolLM2-135M-Instruct), same prompts, same generation loop
(:func:`probes.stream.generate_tokens`), greedy, batched; the monitored run reads a per-token EMA probe
(trained here on the built-in prompts) from the hook of the forward pass that produces the next token and
updates the running score every token (threshold +inf, so both runs generate exactly the same tokens).

Why the design: on a CPU the monitor's own work is tens of microseconds per token (``monitor_self_time_pct``
below), while the forward pass it rides on is noisy: TransformerLens makes a fresh contiguous copy of every
MLP and unembedding weight in each forward pass (``W.T.contiguous()``; about half of a SmolLM2 decoding step,
and some 28k page faults per step for the 113 MB unembedding copy), so a run's time follows the memory and
CPU traffic of everything else on the machine. So the figure is a paired one: ``--pairs`` short pairs of
(plain, monitored) runs, back to back, in alternating order (ABBA), after one warm-up run of each. Each pair
gives a ratio ``t_monitored / t_plain - 1`` of wall time and one of process CPU time; the headline
``monitor_overhead`` is the median of the paired wall-time ratios, reported with their 20%-trimmed mean,
interquartile range and min-max, the ratio of the fastest runs, and the same statistics of the CPU-time
ratios (the machine may be shared: CPU time does not count time the process waits for a core, though it
still counts memory stalls). ``--score-last`` adds the monitor's extra partial pass that scores each
stream's final token (its FLOP share, ``forward to the probe's layer / new tokens``, is reported either
way). ``monitor_self_time_pct`` is measured directly in one more monitored run: the CPU time spent in the
probe's streamer (``update`` / ``finish``) as a share of that run's. The FLOP overhead of the same read-out
from the cost model is printed beside the measured one.

Last line: ``{"monitor_overhead": <fraction>, "monitor_overhead_iqr": [q25, q75], "n_pairs": ...,
"monitor_overhead_cpu_time": ..., "flop_overhead_pct": <percent>, ...}``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from activations.collect import collect
from activations.data import load_dataset
from activations.models import load_model
from probes.cost import CostModel
from probes.stream import StreamingMonitor, generate_tokens
from probes.token import Streamer, TokenProbe, ragged_from_store


def trimmed_mean(x: np.ndarray, cut: float = 0.2) -> float:
    """Mean of ``x`` without its lowest and highest ``cut`` shares."""
    s = np.sort(np.asarray(x, dtype=np.float64))
    k = int(cut * len(s))
    return float(s[k : len(s) - k].mean()) if len(s) > 2 * k else float(s.mean())


def summary(r: np.ndarray) -> dict[str, Any]:
    """Median, trimmed mean, IQR and min-max of paired ratios (rounded)."""
    q25, q75 = np.percentile(r, [25, 75])
    return {
        "median": round(float(np.median(r)), 4),
        "trimmed_mean": round(trimmed_mean(r), 4),
        "iqr": [round(float(q25), 4), round(float(q75), 4)],
        "range": [round(float(r.min()), 4), round(float(r.max()), 4)],
    }


def timed_streamer(probe: TokenProbe, spent: list[float]) -> Callable[[], Streamer]:
    """``probe.streamer`` whose instances add the CPU time (of this thread: a preemption is not counted) of
    their ``update`` / ``finish`` calls to ``spent[0]``."""
    make = probe.streamer

    def streamer() -> Streamer:
        st = make()
        update, finish = st.update, st.finish

        def timed_update(x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
            t0 = time.thread_time()
            out = update(x, rows)
            spent[0] += time.thread_time() - t0
            return out

        def timed_finish() -> torch.Tensor:
            t0 = time.thread_time()
            out = finish()
            spent[0] += time.thread_time() - t0
            return out

        st.update, st.finish = timed_update, timed_finish  # type: ignore[method-assign]
        return st

    return streamer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared CPU)")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--prompts", type=int, default=4, help="batch of prompts generated together")
    ap.add_argument("--new-tokens", type=int, default=12)
    ap.add_argument("--pairs", type=int, default=40, help="paired (plain, monitored) runs, ABBA order")
    ap.add_argument(
        "--score-last",
        action="store_true",
        help="also score each stream's last token (one more partial forward pass; off: both runs make the "
        "same forward passes and the difference is the monitor's own work)",
    )
    ap.add_argument("--train", type=int, default=64, help="built-in prompts to train the probe on")
    args = ap.parse_args()
    if args.pairs < 2:
        ap.error("--pairs must be >= 2")

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

    def run(monitored: bool) -> tuple[float, float, int]:
        kw: dict[str, Any] = (
            {"probe": probe, "threshold": float("inf"), "score_last": args.score_last} if monitored else {}
        )
        t0, c0 = time.perf_counter(), time.process_time()
        res = generate_tokens(model, prompts, args.new_tokens, stop_on_eos=False, **kw)
        return time.perf_counter() - t0, time.process_time() - c0, sum(len(r.ids) for r in res)

    run(False)  # warm-up
    run(True)
    wall: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    n_tokens = 0
    for k in range(args.pairs):
        order = (False, True) if k % 2 == 0 else (True, False)
        out = {m: run(m) for m in order}
        assert out[False][2] == out[True][2], "both runs must generate the same number of tokens"
        n_tokens = out[False][2]
        for m in (False, True):
            wall[m].append(out[m][0])
            cpu[m].append(out[m][1])
        (tp, cp_), (tm, cm_) = out[False][:2], out[True][:2]
        print(
            f"pair {k:2d}: plain {n_tokens / tp:.1f} tok/s, monitored {n_tokens / tm:.1f} tok/s, "
            f"overhead {tm / tp - 1:+.2%} (CPU time {cm_ / cp_ - 1:+.2%})",
            flush=True,
        )
    wp, wm = np.array(wall[False]), np.array(wall[True])
    cp, cm = np.array(cpu[False]), np.array(cpu[True])
    r_wall, r_cpu = wm / wp - 1.0, cm / cp - 1.0
    s_wall, s_cpu = summary(r_wall), summary(r_cpu)
    best = float(wm.min() / wp.min() - 1.0)

    # the monitor's own work, measured inside one more monitored run
    spent = [0.0]
    plain_streamer = probe.streamer
    probe.streamer = timed_streamer(probe, spent)  # type: ignore[method-assign]
    try:
        _, cpu_self, _ = run(True)
    finally:
        probe.streamer = plain_streamer  # type: ignore[method-assign]
    self_pct = 100.0 * spent[0] / cpu_self
    steps = args.new_tokens - (0 if args.score_last else 1)

    cost = CostModel.from_config(model.cfg, context_len=512)
    pc = cost.probe_cost(
        args.layer, cost.d_model, probe.read_pooling, view="marginal", order="probe_then_pool"
    )
    # the last token of each stream is scored by one extra forward pass up to the probe's layer
    final_pass = cost.forward_flops_per_token(args.layer, include_unembed=False) / args.new_tokens
    flop_pct = pc.overhead_pct
    print(
        f"{args.pairs} ABBA pairs: plain {np.median(n_tokens / wp):.1f} tok/s, monitored "
        f"{np.median(n_tokens / wm):.1f} tok/s; paired wall-time overhead median {s_wall['median']:+.2%}, "
        f"trimmed mean {s_wall['trimmed_mean']:+.2%}, "
        f"IQR [{s_wall['iqr'][0]:+.2%}, {s_wall['iqr'][1]:+.2%}], "
        f"range [{s_wall['range'][0]:+.2%}, {s_wall['range'][1]:+.2%}]; fastest runs {best:+.2%}; CPU time "
        f"median {s_cpu['median']:+.2%}, IQR [{s_cpu['iqr'][0]:+.2%}, {s_cpu['iqr'][1]:+.2%}]"
    )
    print(
        f"streamer (update/finish) CPU time: {self_pct:.3f}% of a monitored run's "
        f"({1e6 * spent[0] / max(steps, 1):.0f} µs per step for {args.prompts} streams); cost model: probe "
        f"read-out {flop_pct:.5f}% of a forward pass per token, "
        f"+ {cost.overhead_pct(final_pass):.2f}% for the final token's extra partial pass"
    )
    print(
        json.dumps(
            {
                "monitor_overhead": s_wall["median"],
                "monitor_overhead_trimmed_mean": s_wall["trimmed_mean"],
                "monitor_overhead_iqr": s_wall["iqr"],
                "monitor_overhead_range": s_wall["range"],
                "monitor_overhead_fastest_runs": round(best, 4),
                "monitor_overhead_cpu_time": s_cpu["median"],
                "monitor_overhead_cpu_time_iqr": s_cpu["iqr"],
                "monitor_self_time_pct": round(self_pct, 4),
                "n_pairs": args.pairs,
                "flop_overhead_pct": flop_pct,
                "flop_overhead_pct_with_final_pass": cost.overhead_pct(pc.flops_per_token + final_pass),
                "score_last": args.score_last,
                "plain_tokens_per_s": round(float(np.median(n_tokens / wp)), 2),
                "monitored_tokens_per_s": round(float(np.median(n_tokens / wm)), 2),
                "threads": args.threads,
                "batch": args.prompts,
                "new_tokens": args.new_tokens,
                "layer": args.layer,
            }
        )
    )


if __name__ == "__main__":
    main()
