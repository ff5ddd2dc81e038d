"""Ray as the engine of a sweep beyond one process: sharded collection on actors, fits as tasks.

``probe-atlas sweep SPEC --backend ray [--address ray://... | auto]`` (or ``run_sweep(..., backend="ray")``)
runs the same sweep as the local backend, in two stages:

1. **Collection**, sharded across :class:`Collector` actors, one per GPU (or ``n_collectors`` CPU actors
   where there is no GPU). Each actor loads the model once (``model_factory``, by default
   ``load_model(spec.model)``) and runs a disjoint subset of the collection plan's batches, writing its rows
   into the *same* store files with ``os.pwrite`` at fixed offsets (disjoint batches never share rows). Only
   the driver writes the manifest: it marks a chunk of batches done when the actor reports it written and
   synced, so a killed collection resumes as a local one does. Stores live on a filesystem every node sees.
2. **Fits**, one Ray task per group of runs sharing (seed, hook, pooling), exactly the groups of
   :func:`experiments.run.run_group`. The task receives the sweep context with ``model=None`` (the model is
   never shipped); its stores pickle as path + manifest and are memory-mapped on the node. Each finished
   task's rows are appended to ``results.parquet`` as it arrives, so a killed sweep resumes.

The rows equal the local backend's (up to ``fit_seconds``). Ray is imported only here: the local backend
needs no Ray installed.
"""

from __future__ import annotations

import functools
import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from transformer_lens import HookedTransformer

from activations.collect import (
    POSITIONS,
    CollectError,
    _forward_capture,
    _FullIds,
    batch_inputs,
    hook_layer,
    hook_sort_key,
    model_fingerprint,
    open_or_create_store,
    resolve_hooks,
)
from activations.data import PromptDataset
from activations.pooling import Pooling
from activations.store import ActivationStore, StoreError
from experiments.run import SweepError
from experiments.spec import Run, SweepSpec, expand

console = Console(stderr=True)

ModelFactory = Callable[[], HookedTransformer]


class RayBackendError(SweepError):
    pass


def _ray() -> Any:
    try:
        import ray
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RayBackendError(
            "the ray backend needs Ray: pip install 'ray==2.60.0' (the local backend needs nothing)"
        ) from e
    return ray


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to the cluster at ``address`` (``auto``, ``ray://host:10001``, ``host:6379``), or start a
    local instance; an already initialized Ray (e.g. a test's) is reused."""
    ray = _ray()
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)


# ---------------------------------------------------------------------- model factories
_MODELS: dict[str, HookedTransformer] = {}


def _cached_model(factory: ModelFactory) -> HookedTransformer:
    """The factory's model, built once per worker process."""
    key = repr(factory)
    if key not in _MODELS:
        _MODELS[key] = factory()
    return _MODELS[key]


def default_model_factory(name: str, device: str | None = None) -> ModelFactory:
    """A picklable ``() -> HookedTransformer``: :func:`activations.models.load_model` of ``name``."""
    from activations.models import load_model

    return functools.partial(load_model, name, device=device)


# ---------------------------------------------------------------------- sharded collection
def write_batches(
    model: HookedTransformer, store: ActivationStore, hook_names: Sequence[str], batches: Sequence[int]
) -> list[int]:
    """Run ``batches`` of a store's collection plan and write their rows (``pwrite``, then ``fsync``).

    The manifest is not touched: the caller marks the returned batches done. Disjoint batch sets may be
    written concurrently by different processes (their rows do not overlap).
    """
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise CollectError("the model has no tokenizer")
    hook_names = sorted(hook_names, key=hook_sort_key)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = model.cfg.device
    n_layers_needed = max(hook_layer(h) for h in hook_names) + 1
    last_hook = hook_names[-1]
    offsets = np.asarray(store.offsets)
    positions = np.asarray(store.positions)
    batch_of = np.asarray(store.batch_of)
    full_ids = _FullIds(store)
    writers = {h: store.writer(h) for h in hook_names}
    try:
        for b in batches:
            seqs = [int(s) for s in np.nonzero(batch_of == b)[0]]
            if not seqs:
                raise StoreError(f"{store.path}: batch {b} is not in the collection plan")
            tokens, attn, bi, pi, dest = batch_inputs(full_ids, seqs, offsets, positions, pad_id)
            captured = _forward_capture(
                model,
                tokens.to(device),
                attn.to(device),
                list(hook_names),
                last_hook,
                n_layers_needed,
                torch.from_numpy(bi).to(device),
                torch.from_numpy(pi).to(device),
            )
            for h, x in captured.items():
                arr = x.numpy()
                if not np.isfinite(arr).all():
                    raise StoreError(f"non-finite activations at hook {h} in batch {b} of {store.path}")
                writers[h].write_rows(dest, arr)
        for w in writers.values():
            w.sync()  # durable before the driver marks the batches done (other nodes read these files)
    finally:
        for w in writers.values():
            w.close()
    return [int(b) for b in batches]


def weights_sample_hash(model: torch.nn.Module) -> str:
    """An exact hash of every parameter's name, shape and a strided sample of its values (bit for bit).

    Unlike the store's ``weights_hash`` (which sums parameters, so its last digit depends on the device and
    thread count), this is equal for the same weights on any device: the check that actors hold the
    driver's model."""
    import hashlib

    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in sorted(model.state_dict().items()):
            flat = p.detach().flatten()
            k = min(64, flat.numel())
            idx = (torch.arange(k, dtype=torch.long) * max(flat.numel() - 1, 0) // max(k - 1, 1)).to(
                flat.device
            )
            h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            h.update(flat[idx].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def actor_fingerprint(model: HookedTransformer) -> dict[str, str]:
    """What must match between the driver's and an actor's model: id, config, tokenizer, sampled weights."""
    fp = model_fingerprint(model)
    return {
        "model_id": fp["model_id"],
        "config_hash": fp["config_hash"],
        "tokenizer_hash": fp["tokenizer_hash"],
        "weights_sample": weights_sample_hash(model),
    }


class Collector:
    """A collection worker holding one model (on its GPU when it has one). Used as a Ray actor."""

    def __init__(self, model_factory: ModelFactory) -> None:
        self.model = model_factory()
        self.model.eval()

    def fingerprint(self) -> dict[str, str]:
        return actor_fingerprint(self.model)

    def device(self) -> str:
        return str(self.model.cfg.device)

    def write(self, store_path: str, hook_names: list[str], batches: list[int]) -> list[int]:
        store = ActivationStore.open(store_path, require_complete=False)
        return write_batches(self.model, store, hook_names, batches)


def start_collectors(model_factory: ModelFactory, n: int | None = None) -> list[Any]:
    """One :class:`Collector` actor per GPU of the cluster, or ``n`` CPU actors (default 1) without GPUs."""
    ray = _ray()
    n_gpus = int(ray.cluster_resources().get("GPU", 0))
    if n_gpus > 0:
        cls = ray.remote(num_gpus=1, num_cpus=1)(Collector)
        n = n or n_gpus
    else:
        cls = ray.remote(num_cpus=1)(Collector)
        n = n or 1
    return [cls.remote(model_factory) for _ in range(n)]


def collect_sharded(
    model: HookedTransformer,
    dataset: PromptDataset,
    out: str | Path,
    *,
    actors: Sequence[Any],
    hooks: Sequence[str] = ("resid_post",),
    layers: str | Sequence[int] | None = "all",
    positions: str = "auto",
    keep: str | None = None,
    max_len: int | None = None,
    token_budget: int = 4096,
    max_batch: int = 128,
    chunk_batches: int | None = None,
    progress: bool = True,
    **_ignored: Any,
) -> ActivationStore:
    """:func:`activations.collect.collect` with the forward passes on Ray actors (same store, same bytes).

    The driver's ``model`` plans the store (tokenizer, fingerprint); the actors' models must have the same
    fingerprint (checked). Batches not yet done go to the actors round-robin in chunks of ``chunk_batches``
    (default: about two chunks per actor, at most 8 batches each); the driver marks each chunk done in the
    manifest as it is reported written.
    """
    ray = _ray()
    if not actors:
        raise RayBackendError("collect_sharded: no collector actors")
    dataset.require_nonempty("collect")
    if positions not in POSITIONS:
        raise CollectError(f"unknown positions {positions!r}; expected one of {POSITIONS}")
    keep = keep or positions
    hook_names = resolve_hooks(model, hooks, layers)
    max_len = int(max_len or model.cfg.n_ctx)
    if max_len > model.cfg.n_ctx:
        raise CollectError(f"max_len={max_len} exceeds the model's context n_ctx={model.cfg.n_ctx}")
    tpl = bool(getattr(model.tokenizer, "chat_template", None))
    want = actor_fingerprint(model)
    for i, afp in enumerate(ray.get([a.fingerprint.remote() for a in actors])):
        if afp != want:
            bad = sorted(k for k in want if afp.get(k) != want[k])
            raise RayBackendError(
                f"collector actor {i} holds another model than the driver (differs in {bad})"
            )
    store, _ = open_or_create_store(
        model, dataset, out, hook_names, positions, keep, max_len, tpl, token_budget, max_batch
    )
    if store.complete:
        return store
    done = set(store.manifest["done_batches"])
    todo = [b for b in range(int(store.manifest["n_batches"])) if b not in done]
    if chunk_batches is None:
        chunk_batches = max(1, min(8, len(todo) // (2 * len(actors))))
    chunks = [todo[i : i + chunk_batches] for i in range(0, len(todo), chunk_batches)]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc=f"collect {dataset.name} ({len(actors)} actors)", disable=not progress)
    t0 = time.perf_counter()
    # an actor runs its calls in order; queueing every chunk up front keeps each actor busy
    pending = {
        actors[i % len(actors)].write.remote(str(out), list(hook_names), chunk): chunk
        for i, chunk in enumerate(chunks)
    }
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                written = ray.get(ref)
                pending.pop(ref)
                store.mark_done(written)
                bar.update(len(written))
    finally:
        bar.close()
        for ref in pending:
            ray.cancel(ref)
    store.mark_complete(collect_seconds=time.perf_counter() - t0, collect_actors=len(actors))
    return ActivationStore.open(store.path)  # its key was checked by open_or_create_store


# ---------------------------------------------------------------------- fits as tasks
def _fit_group(
    ctx: Any,
    hook_kind: str,
    pooling: Pooling,
    group: list[Run],
    model_factory: ModelFactory | None,
) -> list[dict[str, Any]]:
    """One Ray task: fit and evaluate one (seed, hook, pooling) group; stores are memory-mapped here."""
    from experiments.run import run_group

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    if model_factory is not None:  # only for kinds that read the model (e.g. SAE next-token loss)
        ctx.model = _cached_model(model_factory)
    return run_group(ctx, hook_kind, pooling, group)


def run_sweep_ray(
    spec: SweepSpec,
    out: str | Path,
    *,
    base: Path | None = None,
    model: HookedTransformer | None = None,
    store_root: Path | None = None,
    progress: bool = True,
    address: str | None = None,
    model_factory: ModelFactory | None = None,
    n_collectors: int | None = None,
    task_cpus: float = 1.0,
    model_in_tasks: bool = False,
) -> pd.DataFrame:
    """Run (or resume) a sweep on Ray: sharded collection on actors, one fit task per group.

    ``model_factory`` builds the model in each collector actor (default: ``load_model(spec.model)`` on the
    actor's GPU, or CPU). The driver also holds the model (``model`` or ``model_factory()``), to plan the
    stores and the cost model. ``model_in_tasks`` gives every fit task the model too (built once per worker
    by ``model_factory``), for kinds that read it; by default tasks get ``model=None``.
    """
    from experiments.run import RESULTS, append_results, finalize_results, prepare

    ray = _ray()
    out = Path(out)
    t_start = time.perf_counter()
    init_ray(address)
    factory = model_factory or default_model_factory(spec.model)
    if model is None:
        console.print(f"[bold]loading model[/] {spec.model} (driver)")
        model = factory()
    collectors: list[Any] = []

    def sharded(m: HookedTransformer, ds: PromptDataset, path: Path, **kw: Any) -> ActivationStore:
        if (path / "manifest.json").exists():  # complete (or resumable) stores need no actor for a no-op
            try:
                st = ActivationStore.open(path, require_complete=False)
                if st.complete:
                    from activations.collect import collect

                    return collect(m, ds, path, **kw)
            except StoreError:
                pass
        if not collectors:
            collectors.extend(start_collectors(factory, n_collectors))
        return collect_sharded(m, ds, path, actors=collectors, **kw)

    try:
        ctx = prepare(
            spec, out, base=base, model=model, store_root=store_root, progress=progress, collect_fn=sharded
        )
    finally:
        for a in collectors:
            ray.kill(a)
    runs = list(expand(spec, ctx.layers, ctx.data.key()))
    todo = [r for r in runs if r.run_id not in ctx.done]
    console.print(
        f"[bold]{spec.name}[/] (ray): {len(runs)} runs, {len(runs) - len(todo)} already done, "
        f"{len(todo)} to fit"
    )
    groups: dict[tuple[int, str, Pooling], list[Run]] = defaultdict(list)
    for r in todo:
        groups[(r.seed, r.hook_kind, r.pooling)].append(r)
    ctx.model = None  # never shipped: tasks read the stores from disk
    ctx_ref = ray.put(ctx)
    task = ray.remote(num_cpus=task_cpus)(_fit_group)
    factory_for_tasks = factory if model_in_tasks else None
    pending = {
        task.remote(ctx_ref, hook_kind, pooling, group, factory_for_tasks): (hook_kind, pooling)
        for (_seed, hook_kind, pooling), group in groups.items()
    }
    from tqdm.auto import tqdm

    bar = tqdm(total=len(pending), desc="fit groups (ray)", disable=not progress)
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                pending.pop(ref)
                append_results(out, ray.get(ref))  # streamed: a killed sweep keeps what finished
                bar.update(1)
    finally:
        bar.close()
        for ref in pending:
            ray.cancel(ref)
    df = finalize_results(out)
    console.print(
        f"[green]done[/] (ray) in {time.perf_counter() - t_start:.1f}s: {len(df)} rows in {out / RESULTS}"
    )
    return df
