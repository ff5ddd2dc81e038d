"""Execute a sweep: collect what is missing, fit, select C on validation, evaluate, append results.

Work is grouped by what shares pooled features: one *group* is (seed, hook kind, pooling), and within it a
family's :meth:`~probes.scorer.Scorer.fit_grid` fits every layer × every C at once. Each finished kind
appends its rows to ``DIR/results.parquet`` (atomically); runs already in the table are skipped, so a killed
sweep resumes. Where the groups run is the backend's business (:mod:`experiments.backends`: in this
process, or as Ray tasks); the rows are the same.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from transformer_lens import HookedTransformer

from activations.collect import (
    HOOK_KINDS,
    collect,
    default_store_dir,
    estimate_collection,
    model_fingerprint,
    resolve_store_dtype,
)
from activations.lock import folder_lock
from activations.models import load_model
from activations.store import ActivationStore, StoreKey
from experiments.backends import Backend, get_backend
from experiments.sweep.context import SweepContext
from experiments.sweep.data import SweepData, load_sweep_data, write_splits
from experiments.sweep.groups import groups_of
from experiments.sweep.preflight import check_disk, check_requirements
from experiments.sweep.results import RESULTS, check_sweep_dir, finalize_results, read_results
from experiments.sweep.spec import SpecError, SweepSpec
from probes.base import SWEEP_KINDS
from probes.cost import CostModel

__all__ = ["prepare", "run_sweep"]

console = Console(stderr=True)


def prepare(
    spec: SweepSpec,
    out: Path,
    *,
    base: Path | None = None,
    model: HookedTransformer | None = None,
    model_loader: Callable[[str], HookedTransformer] | None = None,
    store_root: Path | None = None,
    progress: bool = True,
    collect_fn: Callable[..., ActivationStore] | None = None,
    check_space: bool = True,
    check: bool = True,
    data: SweepData | None = None,
) -> SweepContext:
    """Check the folder, load data, collect missing stores; everything a sweep needs before fitting.

    Before the first collection, the bytes every store still needs are compared with the free space
    (``check_space``; :func:`experiments.sweep.preflight.check_disk`). ``collect_fn`` replaces
    :func:`activations.collect.collect` (same signature), e.g. the Ray backend's collection on actors. One
    model's part of a multi-model sweep passes ``check=False`` (the folder was checked against the whole
    spec) and the ``data`` already loaded."""
    if len(spec.models()) > 1:
        raise SpecError(f"prepare runs one model; this spec lists {spec.models()} (use spec.for_model)")
    if check:
        check_sweep_dir(out, spec)
    if data is None:
        data = load_sweep_data(spec, base)
        write_splits(out, data)
    if model is None:
        console.print(f"[bold]loading model[/] {spec.model}")
        model = (model_loader or load_model)(str(spec.model))
    layers = spec.resolve_layers(model.cfg.n_layers)
    hook_names = {h: [HOOK_KINDS[h].format(l=layer) for layer in layers] for h in spec.hooks}
    for h in spec.hooks:
        if h not in HOOK_KINDS:
            raise SpecError(f"hooks: unknown hook {h!r}; expected one of {sorted(HOOK_KINDS)}")
    all_hooks = [n for names in hook_names.values() for n in names]
    for p in spec.all_probes():  # hooks a kind reads beside the spec's (the surface baseline's embeddings)
        fixed = SWEEP_KINDS[p.kind].hook
        if fixed is not None and fixed not in all_hooks:
            all_hooks.append(fixed)
    store_root = store_root or out / "stores"
    fp = model_fingerprint(model)
    dtype = resolve_store_dtype(model, spec.store_dtype)
    plan: dict[str, tuple[Path, Any]] = {}
    for role, ds in data.all().items():
        key = StoreKey(
            **fp,
            dataset_name=ds.name,
            dataset_fingerprint=ds.fingerprint(),
            hooks=tuple(all_hooks),
            positions=spec.positions,
            keep=spec.keep or spec.positions,
            max_len=min(spec.max_len, model.cfg.n_ctx),
            chat_template=bool(getattr(model.tokenizer, "chat_template", None)),
            dtype=dtype,
        )
        plan[role] = (default_store_dir(store_root, key), ds)
    if check_space:
        _check_space(model, plan, all_hooks, spec, store_root, dtype)
    stores = {}
    for role, (path, ds) in plan.items():
        stores[role] = (collect_fn or collect)(
            model,
            ds,
            path,
            hooks=all_hooks,
            layers=None,
            positions=spec.positions,
            keep=spec.keep or spec.positions,
            max_len=min(spec.max_len, model.cfg.n_ctx),
            token_budget=spec.token_budget,
            store_dtype=dtype,
            progress=progress,
        )
    cost = CostModel.from_config(model.cfg, context_len=spec.context_len)
    ctx = SweepContext(spec, out, fp, cost, data, stores, hook_names, layers, model=model)
    done = read_results(out)
    ctx.done = set(done["run_id"]) if len(done) else set()
    return ctx


def _check_space(
    model: HookedTransformer,
    plan: dict[str, tuple[Path, Any]],
    hooks: list[str],
    spec: SweepSpec,
    store_root: Path,
    store_dtype: str = "float16",
) -> None:
    """Every store's remaining bytes (the estimate of ``collect --dry-run``) against the free space."""
    needs: dict[Path, int] = {}
    for path, ds in plan.values():
        if path in needs:
            continue
        est = estimate_collection(
            model,
            ds,
            path,
            hooks=hooks,
            layers=None,
            positions=spec.positions,
            keep=spec.keep or spec.positions,
            max_len=min(spec.max_len, model.cfg.n_ctx),
            token_budget=spec.token_budget,
            store_dtype=store_dtype,
        )
        needs[path] = est.bytes_needed
    check_disk(needs, store_root)


def run_sweep(
    spec: SweepSpec,
    out: str | Path,
    *,
    base: Path | None = None,
    model: HookedTransformer | None = None,
    store_root: Path | None = None,
    progress: bool = True,
    backend: str | Backend = "local",
    address: str | None = None,
    wait: bool = False,
    wait_timeout: float | None = None,
    force: bool = False,
    png: bool = False,
    model_loader: Callable[[str], HookedTransformer] | None = None,
    **backend_options: Any,
) -> pd.DataFrame:
    """Run (or resume) a sweep; returns the full results table.

    The sweep holds ``out``'s lock (:mod:`activations.lock`) from start to end: another writer makes it
    exit at once naming the holder (:class:`~activations.lock.LockHeldError`), or, with ``wait``, wait for
    it (at most ``wait_timeout`` seconds); ``force`` breaks a lock written on another host. Before anything
    is loaded, what the spec needs is checked (:func:`experiments.sweep.preflight.check_requirements`:
    packages, the model's weights, data files; ``png``: kaleido), and before anything is collected, the
    free disk space.

    ``backend``: ``local`` (this process, the default) or ``ray`` (``address``: the cluster; further
    ``backend_options`` such as ``model_factory``, ``n_collectors``, ``task_cpus`` go to
    :class:`~experiments.backends.ray.RayBackend`), or a :class:`~experiments.backends.base.Backend`.

    A spec with several models runs them one after the other (each loaded by ``model_loader``, default
    :func:`~activations.models.load_model`, and released before the next) on the same data, into one
    table whose ``model`` column tells them apart (``depth`` = layer / model_layers lines them up)."""
    out = Path(out)
    with folder_lock(out, wait=wait, timeout=wait_timeout, force=force, what="results folder", on_wait=_say):
        check_requirements(
            spec,
            base,
            backend=backend if isinstance(backend, str) else "local",
            png=png,
            model_given=model is not None or model_loader is not None,
        )
        return _run_locked(
            spec, out, base, model, store_root, progress, backend, address, backend_options, model_loader
        )


def _say(msg: str) -> None:
    console.print(msg, soft_wrap=True)


def _run_locked(
    spec: SweepSpec,
    out: Path,
    base: Path | None,
    model: HookedTransformer | None,
    store_root: Path | None,
    progress: bool,
    backend: str | Backend,
    address: str | None,
    backend_options: dict[str, Any],
    model_loader: Callable[[str], HookedTransformer] | None = None,
) -> pd.DataFrame:
    be = get_backend(backend, address=address, **backend_options)
    t_start = time.perf_counter()
    names = spec.models()
    if model is not None and len(names) > 1:
        raise SpecError(f"the spec lists {len(names)} models; pass model_loader, not one model")
    if model is None and model_loader is not None and len(names) == 1:
        model = model_loader(names[0])
    check_sweep_dir(out, spec)
    data = load_sweep_data(spec, base)
    write_splits(out, data)
    for name in names:
        sub = spec.for_model(name)
        m = model
        if m is None and len(names) > 1:
            console.print(f"[bold]loading model[/] {name} ({names.index(name) + 1}/{len(names)})")
            m = (model_loader or load_model)(name)
        with be.session(sub, m) as session:
            ctx = prepare(
                sub,
                out,
                base=base,
                model=session.model,
                store_root=store_root,
                progress=progress,
                collect_fn=session.collect_fn,
                check=False,
                data=data,
            )
            session.run_groups(ctx, groups_of(ctx), progress=progress)
        del ctx, session, m
    df = finalize_results(out)
    console.print(
        f"[green]done[/] in {time.perf_counter() - t_start:.1f}s: {len(df)} rows in {out / RESULTS}"
    )
    return df
