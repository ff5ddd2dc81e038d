"""Benchmark: where a collection's memory goes as the dataset grows (what ``rss_growth_mib`` of
``benchmarks/collect.py`` is made of).

For each prompt count (default 100 and 1000 constitution prompts, SmolLM2, every layer's resid_post), in a
fresh process: the RSS right after loading (``base``), the peak while collecting (VmHWM reset to the base,
as ``benchmarks/collect.py`` does), and the RSS after every batch; under three allocator settings:

* ``bounded``: glibc's mmap threshold fixed at 1 MiB (``PROBE_ATLAS_MMAP_THRESHOLD=1048576``, opt-in:
  :func:`activations.collect.bound_heap`);
* ``glibc``: glibc's own moving threshold (what ``collect()`` does by default);
* ``glibc+trim``: the same with ``malloc_trim(0)`` after every batch, which hands freed memory back to the
  system: the RSS after each batch then shows what the collection really keeps alive (flat in the data
  size means the growth without it is memory the allocator kept after it was freed, not live objects).

Usage: ``python benchmarks/collect_memory.py [--n 100 1000] [--threads 1]``. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(n: int, variant: str, threads: int, max_len: int, token_budget: int) -> dict[str, Any]:
    import activations.collect  # noqa: F401  (the package exports a function of the same name)
    import benchmarks.collect as bc
    from activations.models import load_model

    ac = sys.modules["activations.collect"]
    torch.set_num_threads(threads)
    libc = ctypes.CDLL("libc.so.6")
    trim = variant == "glibc+trim"
    t0 = time.perf_counter()
    model = load_model("smollm2")
    ds = bc.prompts(n, seed=1)
    after: list[float] = []
    real = ac.BatchWriter.write

    def write(self: Any, b: int, hashers: Any = None) -> Any:
        r = real(self, b, hashers)
        if trim:
            libc.malloc_trim(0)
        after.append(round(bc.current_rss_mib(), 1))
        return r

    ac.BatchWriter.write = write  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as tmp:
        base, peak, how = bc.peak_rss_during(
            lambda: bc.time_collect(model, ds, Path(tmp) / "s", max_len, token_budget)
        )
    return {
        "n": n,
        "variant": variant,
        "heap_bounded": ac.bound_heap(),
        "seconds": round(time.perf_counter() - t0, 1),
        # CPU time of loading and collecting (a fixed mmap threshold shows as system time: page faults)
        "cpu_user_s": round(resource.getrusage(resource.RUSAGE_SELF).ru_utime, 1),
        "cpu_sys_s": round(resource.getrusage(resource.RUSAGE_SELF).ru_stime, 1),
        "base_mib": round(base, 1),
        "peak_growth_mib": round(peak - base, 1),
        "after_batch_growth_mib_first": round(after[0] - base, 1),
        "after_batch_growth_mib_last": round(after[-1] - base, 1),
        "after_batch_growth_mib_max": round(max(after) - base, 1),
        "n_batches": len(after),
        "how": how,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--token-budget", type=int, default=4096)
    ap.add_argument("--variants", nargs="+", default=["bounded", "glibc", "glibc+trim"])
    ap.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(
            json.dumps(
                child(int(args.child[0]), args.child[1], args.threads, args.max_len, args.token_budget)
            )
        )
        return
    out = []
    for variant in args.variants:
        env = dict(os.environ)
        env["PROBE_ATLAS_MMAP_THRESHOLD"] = str(1 << 20) if variant == "bounded" else "0"
        for n in args.n:
            cmd = [sys.executable, __file__, "--child", str(n), variant]
            cmd += ["--threads", str(args.threads), "--max-len", str(args.max_len)]
            cmd += ["--token-budget", str(args.token_budget)]
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode != 0:
                raise RuntimeError(res.stderr[-3000:])
            r = json.loads(res.stdout.strip().splitlines()[-1])
            print(
                f"{n} prompts, {variant}: peak +{r['peak_growth_mib']} MiB, "
                f"after batches +{r['after_batch_growth_mib_first']} .. "
                f"+{r['after_batch_growth_mib_last']} MiB "
                f"(max +{r['after_batch_growth_mib_max']}, {r['n_batches']} batches); CPU "
                f"{r.get('cpu_user_s')} s user + {r.get('cpu_sys_s')} s system"
            )
            out.append(r)
    print(json.dumps({"runs": out, "threads": args.threads}))


if __name__ == "__main__":
    main()
