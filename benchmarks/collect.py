"""Benchmark: collection into the store vs a plain forward pass vs a naive run_with_cache + torch.save.

On the default model (SmolLM2-135M-Instruct), a few hundred prompts, every layer's resid_post:

* ``collect_vs_forward``: tokens/s of ``collect()`` (rendering, batching, hooks, fp16 writes, manifest)
  divided by tokens/s of ``model(tokens, attention_mask=..., stop_at_layer=...)`` over the same batches
  (target >= 0.95);
* ``collect_vs_naive_cache``: the same against ``run_with_cache()`` of every hook followed by ``torch.save``
  (all three interleaved over ``--repeats`` rounds; best times, and each round's ratios as the spread);
* ``rss_growth_mib_1x`` / ``rss_growth_mib_10x``: how far the peak RSS rises *above the post-load baseline*
  (model loaded and prompts generated, nothing collected yet) while collecting ``--rss-n`` prompts and 10x
  as many. Each collection runs in a fresh subprocess; the baseline is the RSS right after loading, and the
  peak is the kernel's high-water mark (VmHWM) reset to that baseline through ``/proc/self/clear_refs``
  (a 2 ms psutil sampler where that is not allowed), so neither the model's weights nor the other
  collection count. Flat memory means ``rss_growth_mib_10x`` ≈ ``rss_growth_mib_1x``
  (``benchmarks/collect_memory.py`` splits it up by allocator setting).

Usage: ``python benchmarks/collect.py [--n 300] [--rss-n 100] [--threads 1] [--model smollm2]``.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
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


def _proc_status_mib(key: str) -> float | None:
    """A ``/proc/self/status`` field (``VmRSS``, ``VmHWM``) in MiB, or None where there is none."""
    status = Path("/proc/self/status")
    if not status.exists():  # pragma: no cover - non-Linux
        return None
    for line in status.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return None  # pragma: no cover


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM). ``getrusage``'s ru_maxrss is not used: Linux carries it over from
    the parent through fork and exec, so a child would report its parent's peak."""
    hwm = _proc_status_mib("VmHWM")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # pragma: no cover - non-Linux


def current_rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs); False if denied."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    hwm, rss = _proc_status_mib("VmHWM"), _proc_status_mib("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1.0


def peak_rss_during(fn: Callable[[], object]) -> tuple[float, float, str]:
    """Run ``fn`` and return (baseline RSS before it, peak RSS while it ran, how the peak was taken), MiB.

    The peak is the kernel's high-water mark reset to the baseline just before ``fn``; where the reset is
    not allowed, a thread samples the RSS every 2 ms (it can miss a spike shorter than that)."""
    gc.collect()
    baseline = current_rss_mib()
    if _reset_peak_rss():
        fn()
        return baseline, max(peak_rss_mib(), baseline), "VmHWM reset via /proc/self/clear_refs"
    import psutil

    proc, peak, stop = psutil.Process(), [baseline], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss / 2**20)
            stop.wait(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        stop.set()
        sampler.join()
    return baseline, max(peak[0], current_rss_mib()), "psutil sampling every 2 ms"


def rss_child(n: int, model_name: str, max_len: int, token_budget: int, threads: int) -> None:
    """Load the model, then collect ``n`` prompts; print the post-load baseline and the peak RSS (MiB)."""
    from activations.models import load_model

    torch.set_num_threads(threads)
    model = load_model(model_name)
    ds = prompts(n, seed=1)
    load_peak = peak_rss_mib()  # loading may peak above the baseline (de-quantization); read it first
    with tempfile.TemporaryDirectory() as tmp:
        baseline, peak, how = peak_rss_during(
            lambda: time_collect(model, ds, Path(tmp) / "s", max_len, token_budget)
        )
    out = {
        "n": n,
        "baseline_rss_mib": baseline,
        "peak_rss_mib": peak,
        "load_peak_rss_mib": load_peak,
        "how": how,
    }
    print(json.dumps(out))


def rss_in_fresh_process(n: int, args: argparse.Namespace) -> dict[str, float | str]:
    """:func:`rss_child` in a new interpreter, so that no collection sees another's memory."""
    opts = {"--model": args.model, "--threads": args.threads, "--max-len": args.max_len}
    opts["--token-budget"] = args.token_budget
    cmd = [sys.executable, __file__, "--rss-child", str(n), *(str(x) for kv in opts.items() for x in kv)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(
            f"RSS child ({n} prompts) failed with code {res.returncode}:\n{res.stderr[-3000:]}"
        )
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--rss-n", type=int, default=100)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--token-budget", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (here and in RSS children)"
    )
    ap.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--only-rss", action="store_true", help="measure only the memory growth")
    args = ap.parse_args()
    if args.rss_child is not None:
        rss_child(args.rss_child, args.model, args.max_len, args.token_budget, args.threads)
        return
    torch.set_num_threads(args.threads)

    # memory first, each collection in its own fresh process
    small, big = rss_in_fresh_process(args.rss_n, args), rss_in_fresh_process(10 * args.rss_n, args)
    grow_1x = float(small["peak_rss_mib"]) - float(small["baseline_rss_mib"])
    grow_10x = float(big["peak_rss_mib"]) - float(big["baseline_rss_mib"])
    for label, r, g in ((f"{args.rss_n}", small, grow_1x), (f"{10 * args.rss_n}", big, grow_10x)):
        print(
            f"collecting {label} prompts: post-load baseline {float(r['baseline_rss_mib']):.0f} MiB, peak "
            f"{float(r['peak_rss_mib']):.0f} MiB: +{g:.1f} MiB ({r['how']})"
        )
    rss = {
        "rss_growth_mib_10x": round(grow_10x, 1),
        "rss_growth_mib_1x": round(grow_1x, 1),
        "rss_baseline_mib": round(float(big["baseline_rss_mib"]), 1),
        "rss_prompts": [args.rss_n, 10 * args.rss_n],
    }
    if args.only_rss:
        print(json.dumps(rss))
        return

    # with $PROBE_ATLAS_MMAP_THRESHOLD, collect() fixes glibc's mmap threshold for the process
    # (activations.collect.bound_heap); the forward pass it is compared with then runs under the same setting
    import activations.collect  # noqa: F401  (the package exports a function of the same name)
    from activations.models import load_model

    heap_bounded = sys.modules["activations.collect"].bound_heap()
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
    # the spread: the same ratios within each interleaved round
    vs_fwd = [a / b for a, b in zip(fwd, col, strict=True)]
    vs_naive = [a / b for a, b in zip(naive, col, strict=True)]
    print(f"plain forward (stop_at_layer={n_layers}):      {n_tok / f:8.0f} tok/s  ({f:.2f} s; runs {fwd})")
    print(f"collect() into the store:                  {n_tok / c:8.0f} tok/s  ({c:.2f} s; runs {col})")
    print(f"naive run_with_cache(all hooks)+torch.save: {n_tok / nv:8.0f} tok/s  ({nv:.2f} s; runs {naive})")
    print(
        json.dumps(
            {
                "collect_vs_forward": round(f / c, 4),
                "collect_vs_naive_cache": round(nv / c, 4),
                "collect_vs_forward_per_round": [round(v, 4) for v in vs_fwd],
                "collect_vs_naive_cache_per_round": [round(v, 4) for v in vs_naive],
                **rss,
                "forward_tok_s": round(n_tok / f, 1),
                "collect_tok_s": round(n_tok / c, 1),
                "naive_tok_s": round(n_tok / nv, 1),
                "peak_rss_mib_small": round(float(small["peak_rss_mib"]), 1),
                "peak_rss_mib_10x": round(float(big["peak_rss_mib"]), 1),
                "threads": args.threads,
                "heap_bounded": heap_bounded,
            }
        )
    )


if __name__ == "__main__":
    main()
