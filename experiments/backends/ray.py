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
   :func:`experiments.sweep.groups.run_group`. The task receives the sweep context with ``model=None`` (the
   model is never shipped); its stores pickle as path + manifest and are memory-mapped on the node. Each
   finished task's rows are appended to ``results.parquet`` as it arrives, so a killed sweep resumes.

The rows equal the local backend's (up to ``fit_seconds``). Ray is imported only here: the local backend
needs no Ray installed.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from rich.console import Console
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from activations.collect import BatchWriter, collect, model_fingerprint
from activations.models import load_model
from activations.pooling import Pooling
from activations.store import ActivationStore
from experiments.backends.base import Backend, Session, register_backend
from experiments.sweep.context import SweepContext
from experiments.sweep.groups import GroupKey, run_group
from experiments.sweep.results import SweepError, append_results
from experiments.sweep.spec import Run, SweepSpec

__all__ = [
    "ActorBatches",
    "Collector",
    "RayBackend",
    "RayBackendError",
    "actor_fingerprint",
    "default_model_factory",
    "init_ray",
    "start_collectors",
    "weights_sample_hash",
    "write_batches",
]

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
    return functools.partial(load_model, name, device=device)


# ---------------------------------------------------------------------- collection on actors
def write_batches(model: HookedTransformer, store: ActivationStore, batches: Sequence[int]) -> list[int]:
    """Run ``batches`` of a store's collection plan and write their rows (``pwrite``, then ``fsync``).

    The manifest is not touched: the caller marks the returned batches done. Disjoint batch sets may be
    written concurrently by different processes (their rows do not overlap).
    """
    writer = BatchWriter(model, store)
    try:
        for b in batches:
            writer.write(int(b))
        writer.sync()  # durable before the driver marks the batches done (other nodes read these files)
    finally:
        writer.close()
    return [int(b) for b in batches]


def weights_sample_hash(model: torch.nn.Module) -> str:
    """An exact hash of every parameter's name, shape and a strided sample of its values (bit for bit).

    Unlike the store's ``weights_hash`` (which sums parameters, so its last digit depends on the device and
    thread count), this is equal for the same weights on any device: the check that actors hold the
    driver's model."""
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

    def write(self, store_path: str, batches: list[int]) -> list[int]:
        store = ActivationStore.open(store_path, require_complete=False)
        return write_batches(self.model, store, batches)


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


class ActorBatches:
    """A :data:`~activations.collect.BatchRunner` on :class:`Collector` actors: ``collect(...,
    run_batches=ActorBatches(actors, model))`` collects a store with the forward passes on the actors (same
    store, same bytes). The actors' models must have the driver's ``model``'s fingerprint (checked once).
    Batches not yet done go to the actors round-robin in chunks of ``chunk_batches`` (default: about two
    chunks per actor, at most 8 batches each); the driver marks each chunk done in the manifest as it is
    reported written. ``actors`` may be a callable that starts them (on first use: a complete store needs
    none)."""

    def __init__(
        self,
        actors: Sequence[Any] | Callable[[], Sequence[Any]],
        model: HookedTransformer,
        *,
        chunk_batches: int | None = None,
    ) -> None:
        self._actors, self.model, self.chunk_batches = actors, model, chunk_batches
        self._checked: list[Any] | None = None

    def actors(self) -> list[Any]:
        """The actors, started and checked against the driver's model on first use."""
        if self._checked is None:
            actors = list(self._actors() if callable(self._actors) else self._actors)
            if not actors:
                raise RayBackendError("collection on Ray: no collector actors")
            want = actor_fingerprint(self.model)
            for i, afp in enumerate(_ray().get([a.fingerprint.remote() for a in actors])):
                if afp != want:
                    bad = sorted(k for k in want if afp.get(k) != want[k])
                    raise RayBackendError(
                        f"collector actor {i} holds another model than the driver (differs in {bad})"
                    )
            self._checked = actors
        return self._checked

    def __call__(self, store: ActivationStore, todo: list[int], progress: bool) -> dict[str, Any]:
        ray = _ray()
        actors = self.actors()
        size = self.chunk_batches or max(1, min(8, len(todo) // (2 * len(actors))))
        chunks = [todo[i : i + size] for i in range(0, len(todo), size)]
        name = store.manifest["key"]["dataset_name"]
        bar = tqdm(total=len(todo), desc=f"collect {name} ({len(actors)} actors)", disable=not progress)
        # an actor runs its calls in order; queueing every chunk up front keeps each actor busy
        pending = {
            actors[i % len(actors)].write.remote(str(store.path), chunk): chunk
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
        return {"collect_actors": len(actors)}


# ---------------------------------------------------------------------- fits as tasks
def _fit_group(
    ctx: SweepContext,
    hook_kind: str,
    pooling: Pooling,
    group: list[Run],
    model_factory: ModelFactory | None,
) -> list[dict[str, Any]]:
    """One Ray task: fit and evaluate one (seed, hook, pooling) group; stores are memory-mapped here."""
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    if model_factory is not None:  # only for kinds that read the model (e.g. SAE next-token loss)
        ctx.model = _cached_model(model_factory)
    return run_group(ctx, hook_kind, pooling, group)


class _RaySession(Session):
    def __init__(self, backend: RayBackend, spec: SweepSpec, model: HookedTransformer | None) -> None:
        self.backend = backend
        self.factory = backend.model_factory or default_model_factory(str(spec.model))
        if model is None:
            console.print(f"[bold]loading model[/] {spec.model} (driver)")
            model = self.factory()
        self.model = model
        self.collectors: list[Any] = []
        self.collect_fn = functools.partial(collect, run_batches=ActorBatches(self._start, model))

    def _start(self) -> list[Any]:
        if not self.collectors:
            self.collectors.extend(start_collectors(self.factory, self.backend.n_collectors))
        return self.collectors

    def stop_collectors(self) -> None:
        ray = _ray()
        for a in self.collectors:
            ray.kill(a)
        self.collectors.clear()

    def run_groups(
        self, ctx: SweepContext, groups: Mapping[GroupKey, Sequence[Run]], *, progress: bool = True
    ) -> None:
        ray = _ray()
        self.stop_collectors()  # collection is over
        ctx.model = None  # never shipped: tasks read the stores from disk
        ctx_ref = ray.put(ctx)
        task = ray.remote(num_cpus=self.backend.task_cpus)(_fit_group)
        factory_for_tasks = self.factory if self.backend.model_in_tasks else None
        pending = {
            task.remote(ctx_ref, hook_kind, pooling, list(group), factory_for_tasks): (hook_kind, pooling)
            for (_seed, hook_kind, pooling), group in groups.items()
        }
        bar = tqdm(total=len(pending), desc="fit groups (ray)", disable=not progress)
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    pending.pop(ref)
                    append_results(ctx.out, ray.get(ref))  # streamed: a killed sweep keeps what finished
                    bar.update(1)
        finally:
            bar.close()
            for ref in pending:
                ray.cancel(ref)


@register_backend
class RayBackend(Backend):
    """Collection on :class:`Collector` actors (one per GPU, else ``n_collectors`` CPU actors; each builds
    its model with ``model_factory``, by default ``load_model(spec.model)``) and one fit task per group
    (``task_cpus`` each). The driver also holds the model (the caller's, or ``model_factory()``), to plan
    the stores and the cost model. ``model_in_tasks`` gives every fit task the model too (built once per
    worker by ``model_factory``), for kinds that read it; by default tasks get ``model=None``."""

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        *,
        model_factory: ModelFactory | None = None,
        n_collectors: int | None = None,
        task_cpus: float = 1.0,
        model_in_tasks: bool = False,
    ) -> None:
        self.address, self.model_factory, self.n_collectors = address, model_factory, n_collectors
        self.task_cpus, self.model_in_tasks = task_cpus, model_in_tasks

    @contextmanager
    def session(self, spec: SweepSpec, model: HookedTransformer | None) -> Iterator[Session]:
        init_ray(self.address)
        session = _RaySession(self, spec, model)
        try:
            yield session
        finally:
            session.stop_collectors()
