"""Benchmark: collection into the store vs a plain forward pass vs a naive run_with_cache + torch.save.

On the default model (SmolLM2-135M-Instruct), a few hundred prompts, every layer's resid_post:

* ``collect_vs_forward``: tokens/s of ``collect()`` (rendering, batching, hooks, fp16 writes, manifest)
  divided by tokens/s of ``model(tokens, attention_mask=..., stop_at_layer=...)`` over the same batches
  (target >= 0.95);
* ``collect_vs_naive_cache``: the same against ``run_with_cache()`` of every hook followed by ``torch.save``;
* ``rss_growth_10x``: peak RSS of a collection of 10x more prompts, relative to the smaller one, each in a
  fresh process (target < 25%).

Usage: ``python benchmarks/collect.py [--n 300] [--rss-n 100] [--model smollm2]``. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prompts(n: int, seed: int = 0):  # type: ignore[no-untyped-def]
    from activations.constitution import generate_prompts, load_constitution

    return generate_prompts(load_constitution("general"), n=n, seed=seed)


def _batches(model, ds, max_len: int, token_budget: int):  # type: ignore[no-untyped-def]
    from activations.collect import plan_batches
    from activations.render import render_all

    rendered = render_all(ds.examples, model.tokenizer, max_len=max_len)
    plan = plan_batches([len(r.ids) for r in rendered], token_budget)
    pad = model.tokenizer.pad_token_id or 0
    out = []
    for b in plan:
        L = max(len(rendered[i].ids) for i in b)
        toks = torch.full((len(b), L), pad, dtype=torch.long)
        attn = torch.zeros((len(b), L), dtype=torch.long)
        for j, i in enumerate(b):
            n = len(rendered[i].ids)
            toks[j, :n] = torch.from_numpy(rendered[i].ids)
            attn[j, :n] = 1
        out.append((toks, attn))
    n_tok = sum(len(r.ids) for r in rendered)
    return out, n_tok


def time_forward(model, batches, n_layers: int) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    with torch.inference_mode():
        for toks, attn in batches:
            model(toks, attention_mask=attn, stop_at_layer=n_layers)
    return time.perf_counter() - t0


def time_naive(model, batches, tmp: Path) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i, (toks, attn) in enumerate(batches):
            _, cache = model.run_with_cache(toks, attention_mask=attn)
            torch.save({k: v.to(torch.float16) for k, v in cache.items()}, tmp / f"cache_{i}.pt")
            del cache
    return time.perf_counter() - t0


def time_collect(model, ds, out: Path, max_len: int, token_budget: int) -> float:  # type: ignore[no-untyped-def]
    from activations.collect import collect

    t0 = time.perf_counter()
    collect(
        model,
        ds,
        out,
        hooks=["resid_post"],
        layers="all",
        max_len=max_len,
        token_budget=token_budget,
        progress=False,
    )
    return time.perf_counter() - t0


def rss_child(n: int, model_name: str, max_len: int, token_budget: int) -> None:
    """Run one collection of ``n`` prompts and print the process's peak RSS (MiB)."""
    from activations.models import load_model

    model = load_model(model_name)
    ds = prompts(n, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        time_collect(model, ds, Path(tmp) / "s", max_len, token_budget)
    print(json.dumps({"peak_rss_mib": peak_rss_mib(), "n": n}))


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM). ``getrusage``'s ru_maxrss is not used: Linux carries it over from
    the parent through fork and exec, so a child would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # pragma: no cover - non-Linux


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--rss-n", type=int, default=100)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--token-budget", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--only-rss", action="store_true", help="measure only the memory growth")
    args = ap.parse_args()
    if args.rss_child is not None:
        rss_child(args.rss_child, args.model, args.max_len, args.token_budget)
        return

    from activations.models import load_model

    def child(n: int) -> float:
        res = subprocess.run(
            [sys.executable, __file__, "--rss-child", str(n), "--model", args.model, "--max-len",
             str(args.max_len), "--token-budget", str(args.token_budget)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return float(json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mib"])

    # memory first, in fresh processes, before this one grows
    small, big = child(args.rss_n), child(10 * args.rss_n)
    print(f"peak RSS: {args.rss_n} prompts {small:.0f} MiB, {10 * args.rss_n} prompts {big:.0f} MiB")
    if args.only_rss:
        print(json.dumps({"rss_growth_10x": round(big / small - 1, 4)}))
        return
    torch.manual_seed(0)
    model = load_model(args.model)
    n_layers = model.cfg.n_layers
    ds = prompts(args.n)
    batches, n_tok = _batches(model, ds, args.max_len, args.token_budget)
    print(f"{len(ds)} prompts, {n_tok} tokens, {len(batches)} batches, {n_layers} layers of resid_post")
    time_forward(model, batches[:2], n_layers)  # warm-up
    fwd, col, naive = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):  # interleaved, so drifts in machine load hit all three alike
            fwd.append(time_forward(model, batches, n_layers))
            col.append(time_collect(model, ds, Path(tmp) / f"store{r}", args.max_len, args.token_budget))
            naive_dir = Path(tmp) / f"naive{r}"
            naive_dir.mkdir()
            naive.append(time_naive(model, batches, naive_dir))
    f, c, nv = min(fwd), min(col), min(naive)
    print(f"plain forward (stop_at_layer={n_layers}):      {n_tok / f:8.0f} tok/s  ({f:.2f} s; runs {fwd})")
    print(f"collect() into the store:                  {n_tok / c:8.0f} tok/s  ({c:.2f} s; runs {col})")
    print(f"naive run_with_cache(all hooks)+torch.save: {n_tok / nv:8.0f} tok/s  ({nv:.2f} s; runs {naive})")

    def child(n: int) -> float:
        res = subprocess.run(
            [
                sys.executable,
                __file__,
                "--rss-child",
                str(n),
                "--model",
                args.model,
                "--max-len",
                str(args.max_len),
                "--token-budget",
                str(args.token_budget),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        return float(json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mib"])

    small, big = child(args.rss_n), child(10 * args.rss_n)
    print(f"peak RSS: {args.rss_n} prompts {small:.0f} MiB, {10 * args.rss_n} prompts {big:.0f} MiB")
    print(
        json.dumps(
            {
                "collect_vs_forward": round(f / c, 4),
                "collect_vs_naive_cache": round(nv / c, 4),
                "rss_growth_10x": round(big / small - 1, 4),
                "forward_tok_s": round(n_tok / f, 1),
                "collect_tok_s": round(n_tok / c, 1),
                "naive_tok_s": round(n_tok / nv, 1),
                "peak_rss_mib_small": round(small, 1),
                "peak_rss_mib_10x": round(big, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
