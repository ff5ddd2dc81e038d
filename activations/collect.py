"""Collect per-token activations of chosen hooks into an :class:`~activations.store.ActivationStore`.

The forward pass is the model's own (``model(tokens, attention_mask=..., stop_at_layer=...)``) with forward
hooks that copy only the needed hooks' scored rows to fp16 and stop the pass right after the deepest needed
hook. Batches are length-sorted under a token budget (so padding is small and memory does not grow with the
dataset), written straight into preallocated memory maps, and recorded in the manifest one by one: a killed
collection resumes where it stopped and gives the same store as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import os
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from activations.data import DataError, PromptDataset
from activations.models import preferred_store_dtype
from activations.render import POSITIONS, Rendered, render_all, role_selection
from activations.store import (
    HOOK_DTYPES,
    ActivationStore,
    StoreError,
    StoreKey,
    StoreLayout,
    check_free_space,
    clean_temporary_files,
    disk_free,
    format_bytes,
    hook_dtype,
    new_hasher,
)

HOOK_KINDS: dict[str, str] = {
    "resid_pre": "blocks.{l}.hook_resid_pre",
    "resid_mid": "blocks.{l}.hook_resid_mid",
    "attn_out": "blocks.{l}.hook_attn_out",
    "mlp_out": "blocks.{l}.hook_mlp_out",
    "resid_post": "blocks.{l}.hook_resid_post",
}
#: what ``store_dtype`` may be: ``auto`` is the model's preference (:func:`resolve_store_dtype`)
STORE_DTYPES = ("auto", *HOOK_DTYPES)
_FP16_MAX = float(np.finfo(np.float16).max)

_ORDER = {
    "hook_resid_pre": 0,
    "hook_attn_out": 1,
    "hook_resid_mid": 2,
    "hook_mlp_out": 3,
    "hook_resid_post": 4,
}
_FULL = re.compile(r"^blocks\.(\d+)\.(hook_\w+)$")


class CollectError(ValueError):
    pass


class _StopForward(Exception):
    pass


# ---------------------------------------------------------------------- memory
#: environment variable: a fixed glibc mmap threshold in bytes for collections (:func:`bound_heap`); unset
#: or 0 leaves glibc's own
MMAP_THRESHOLD_ENV = "PROBE_ATLAS_MMAP_THRESHOLD"
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
_heap_bounded: bool | None = None


def bound_heap(threshold: int | None = None) -> bool:
    """Opt-in (``$PROBE_ATLAS_MMAP_THRESHOLD`` bytes, e.g. 1048576, or ``threshold``): fix glibc's mmap
    threshold, so that blocks of that size or more get their own mapping, returned to the system when freed.

    Left alone, glibc raises the threshold to the largest block freed so far (up to 32 MiB), so the MiB-sized
    tensors of every forward pass come from the heap, which fragments: the peak RSS of a collection grows
    with the data although nothing is kept alive across batches (SmolLM2, 1 thread, above the post-load
    baseline: +382 MiB for 100 prompts, +555 MiB for 1000; fixed at 1 MiB: +336 and +350). The price is a
    fresh, zero-filled mapping for every large tensor: 41-43 s of CPU instead of 31-32 s to load the model
    and collect 100 prompts (page faults: system time), which is why it is off by default
    (``benchmarks/collect.py``, ``benchmarks/collect_memory.py``). Applies to the whole
    process, once; returns whether the threshold is fixed (False when off, or off glibc)."""
    global _heap_bounded
    if _heap_bounded is not None:
        return _heap_bounded
    if threshold is None:
        raw = os.environ.get(MMAP_THRESHOLD_ENV, "")
        threshold = int(raw) if raw.strip().isdigit() else 0
    _heap_bounded = False
    if threshold > 0:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _heap_bounded = bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
        except (OSError, AttributeError):  # pragma: no cover - not glibc
            _heap_bounded = False
    return _heap_bounded


# ---------------------------------------------------------------------- hooks and layers
def parse_layers(layers: str | int | Sequence[int] | None, n_layers: int) -> list[int]:
    """``"all"``/None, ``"0,5,9"``, ``"0-3"``, an int or a list; negative indices count from the end."""
    if layers is None or (isinstance(layers, str) and layers.strip().lower() == "all"):
        return list(range(n_layers))
    if isinstance(layers, int):
        items: list[int] = [layers]
    elif isinstance(layers, str):
        items = []
        for part in layers.split(","):
            part = part.strip()
            if not part:
                continue
            m = re.fullmatch(r"(-?\d+)-(-?\d+)", part)
            try:
                if m:
                    items.extend(range(int(m.group(1)), int(m.group(2)) + 1))
                else:
                    items.append(int(part))
            except ValueError as e:
                raise CollectError(f"cannot parse layers {layers!r}") from e
    else:
        items = [int(x) for x in layers]
    out = []
    for layer in items:
        real = layer + n_layers if layer < 0 else layer
        if not 0 <= real < n_layers:
            raise CollectError(
                f"layer {layer} is out of range: the model has {n_layers} layers (0..{n_layers - 1})"
            )
        if real not in out:
            out.append(real)
    if not out:
        raise CollectError(f"no layers selected by {layers!r}")
    return sorted(out)


def resolve_hooks(
    model: HookedTransformer,
    hooks: Sequence[str] = ("resid_post",),
    layers: str | Sequence[int] | None = "all",
) -> list[str]:
    """Full TransformerLens hook names for ``hooks`` (short kinds × layers, or full names)."""
    if isinstance(hooks, str):
        hooks = [h for h in hooks.split(",") if h.strip()]
    if not hooks:
        raise CollectError("no hooks requested")
    n_layers = model.cfg.n_layers
    out: list[str] = []
    layer_list: list[int] | None = None
    for h in hooks:
        h = h.strip()
        if h in HOOK_KINDS:
            if layer_list is None:
                layer_list = parse_layers(layers, n_layers)
            names = [HOOK_KINDS[h].format(l=layer) for layer in layer_list]
        elif _FULL.match(h):
            names = [h]
        else:
            raise CollectError(
                f"unknown hook {h!r}; use one of {sorted(HOOK_KINDS)} "
                "or a full name like 'blocks.3.hook_resid_post'"
            )
        for name in names:
            if name not in model.hook_dict:
                m = _FULL.match(name)
                if m and int(m.group(1)) >= n_layers:
                    raise CollectError(
                        f"hook {name!r}: layer {m.group(1)} is out of range (model has {n_layers})"
                    )
                raise CollectError(f"unknown hook {name!r}: the model has no such hook point")
            if name not in out:
                out.append(name)
    return sorted(out, key=hook_sort_key)


def hook_sort_key(name: str) -> tuple[int, int, str]:
    m = _FULL.match(name)
    if not m:
        return (10**6, 0, name)
    return (int(m.group(1)), _ORDER.get(m.group(2), 9), name)


def hook_layer(name: str) -> int:
    m = _FULL.match(name)
    if not m:
        raise CollectError(f"hook {name!r} is not a per-block hook")
    return int(m.group(1))


# ---------------------------------------------------------------------- fingerprints
def model_id(model: HookedTransformer) -> str:
    return str(getattr(model, "probe_atlas_id", None) or model.cfg.model_name)


def config_hash(model: HookedTransformer) -> str:
    d = model.cfg.to_dict() if hasattr(model.cfg, "to_dict") else dict(vars(model.cfg))
    skip = {"device", "n_devices", "dtype", "model_name", "tokenizer_name", "original_architecture"}
    items = {k: repr(v) for k, v in sorted(d.items()) if k not in skip}
    return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()[:16]


def tokenizer_hash(tokenizer: Any) -> str:
    h = hashlib.sha256()
    vocab = tokenizer.get_vocab()
    for tok, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        h.update(f"{i}:{tok}\n".encode())
    h.update(str(getattr(tokenizer, "chat_template", "") or "").encode())
    return h.hexdigest()[:16]


def weights_hash(model: torch.nn.Module, sample: int = 4096) -> str:
    """A cheap, exact content hash of the weights: every floating parameter's name, shape, dtype, the integer
    sum of its values' bit patterns (any changed weight changes it) and the raw bytes of up to ``sample``
    evenly strided elements. Integer sums are exact, so unlike float sums the hash does not depend on the
    thread count or the summation order."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in sorted(model.state_dict().items()):
            if not torch.is_floating_point(p):
                continue
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // sample)
            picked = flat[::step][:sample].float().cpu().contiguous()
            bits = int(flat.float().view(torch.int32).to(torch.int64).sum())
            h.update(f"{name}{tuple(p.shape)}{p.dtype}{bits}".encode())
            h.update(picked.numpy().tobytes())
    return h.hexdigest()[:16]


def resolve_store_dtype(model: HookedTransformer, store_dtype: str = "auto") -> str:
    """The dtype of a model's activation stores: ``float16`` / ``float32`` as given, or with ``auto`` the
    model's registry preference (``float32`` for Gemma-3-270m, whose residual stream leaves the fp16
    range; ``float16`` for every other model, so their stores keep their keys)."""
    if store_dtype not in STORE_DTYPES:
        raise CollectError(f"unknown store_dtype {store_dtype!r}; expected one of {STORE_DTYPES}")
    if store_dtype != "auto":
        return store_dtype
    return preferred_store_dtype(model_id(model))


def model_fingerprint(model: HookedTransformer) -> dict[str, str]:
    fp = getattr(model, "_probe_atlas_fingerprint", None)
    if fp is None:
        fp = {
            "model_id": model_id(model),
            "config_hash": config_hash(model),
            "tokenizer_hash": tokenizer_hash(model.tokenizer),
            "weights_hash": weights_hash(model),
        }
        model._probe_atlas_fingerprint = fp  # type: ignore[attr-defined,assignment]
    return dict(fp)


# ---------------------------------------------------------------------- planning
def plan_batches(
    lengths: Sequence[int] | np.ndarray,
    token_budget: int,
    max_batch: int = 256,
    *,
    longest_first: bool = True,
) -> list[list[int]]:
    """Length-sorted batches whose padded size (n × longest) stays within ``token_budget`` (at most
    ``max_batch`` sequences each): longest first (collection), or shortest first (training batches)."""
    lens = np.asarray(lengths)
    order = np.argsort(-lens if longest_first else lens, kind="stable")
    batches: list[list[int]] = []
    cur: list[int] = []
    cur_max = 0
    for i in order:
        length = int(lens[i])
        new_max = max(cur_max, length)
        if cur and (new_max * (len(cur) + 1) > token_budget or len(cur) >= max_batch):
            batches.append(cur)
            cur, cur_max = [], 0
            new_max = length
        cur.append(int(i))
        cur_max = new_max
    if cur:
        batches.append(cur)
    return batches


def default_store_dir(root: str | Path, key: StoreKey) -> Path:
    """``root/<model>-<dataset>-<hash>``: one directory per (model, dataset, hooks, positions) key."""
    digest = hashlib.sha256(json.dumps(key.to_json(), sort_keys=True).encode()).hexdigest()[:12]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{key.model_id}-{key.dataset_name}")[:80]
    return Path(root) / f"{safe}-{digest}"


# ---------------------------------------------------------------------- collection
def batch_inputs(
    full_ids: Any, seqs: Sequence[int], offsets: np.ndarray, positions: np.ndarray, pad_id: int
) -> tuple[Tensor, Tensor, np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded token ids and attention mask of one batch of sequences, and which (batch row, position)
    of the forward pass goes to which store row (``bi``, ``pi`` -> ``dest``)."""
    ids_list = [full_ids(s) for s in seqs]
    width = max(len(x) for x in ids_list)
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for j, ids in enumerate(ids_list):
        tokens[j, : len(ids)] = torch.from_numpy(ids)
        attn[j, : len(ids)] = 1
    bi = np.concatenate([np.full(offsets[s + 1] - offsets[s], j) for j, s in enumerate(seqs)])
    pi = np.concatenate([positions[offsets[s] : offsets[s + 1]] for s in seqs])
    dest = np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in seqs])
    return tokens, attn, bi, pi, dest


def collect(
    model: HookedTransformer,
    dataset: PromptDataset,
    out: str | Path,
    *,
    hooks: Sequence[str] = ("resid_post",),
    layers: str | Sequence[int] | None = "all",
    positions: str = "auto",
    keep: str | None = None,
    max_len: int | None = None,
    token_budget: int = 4096,
    max_batch: int = 128,
    use_chat_template: bool | None = None,
    store_dtype: str = "auto",
    progress: bool = True,
    durable: bool = False,
    checksums: bool = True,
    check_space: bool = True,
    run_batches: BatchRunner | None = None,
    _stop_after_batches: int | None = None,
) -> ActivationStore:
    """Collect ``hooks`` for ``dataset`` into the store at ``out`` (created, resumed or reused).

    ``positions`` chooses the scored tokens (``auto``: response tokens of exchanges, prompt tokens otherwise);
    ``keep`` the stored tokens (default: the scored ones; e.g. ``prompt+response`` keeps both roles of an
    exchange so one store can be read either way). Returns the complete store.

    An existing store is checked first (file sizes, headers, metadata checksums) and repaired when damaged:
    damaged batches are collected again. ``checksums`` records a checksum of every batch's rows (checked by
    ``probe-atlas verify --deep``). ``check_space`` refuses up front (``InsufficientSpaceError``) when the
    disk has less free space than the store still needs; a disk that fills anyway is a
    :class:`~activations.store.DiskFullError`, and the batch being written stays not done.

    ``run_batches`` runs the remaining batches elsewhere (e.g. on Ray actors: :class:`BatchRunner`); by
    default they run here, in this process.

    ``store_dtype`` (``auto`` | ``float16`` | ``float32``) is the dtype of the hook files; ``auto`` is the
    model's preference (:func:`resolve_store_dtype`). Activations beyond the fp16 range in a float16 store
    are an error naming the hook and the largest |x|.
    """
    req = _request(model, dataset, hooks, layers, positions, keep, max_len, use_chat_template)
    hook_names, positions, keep, max_len, tpl = req
    store, created = open_or_create_store(
        model,
        dataset,
        out,
        hook_names,
        positions,
        keep,
        max_len,
        tpl,
        token_budget,
        max_batch,
        checksums=checksums,
        check_space=check_space,
        store_dtype=resolve_store_dtype(model, store_dtype),
    )
    if store.complete:
        return store
    try:
        if run_batches is None:
            _run(
                model,
                store,
                progress=progress,
                durable=durable,
                checksums=checksums,
                stop_after=_stop_after_batches,
            )
        else:
            done = set(store.manifest["done_batches"])
            todo = [b for b in range(int(store.manifest["n_batches"])) if b not in done]
            t0 = time.perf_counter()
            info = run_batches(store, todo, progress)
            store.mark_complete(collect_seconds=time.perf_counter() - t0, **(info or {}))
    except BaseException as e:
        if created and not store.manifest["done_batches"] and not isinstance(e, _Interrupted):
            store.delete()
        raise
    return store


def _request(
    model: HookedTransformer,
    dataset: PromptDataset,
    hooks: Sequence[str],
    layers: str | Sequence[int] | None,
    positions: str,
    keep: str | None,
    max_len: int | None,
    use_chat_template: bool | None,
) -> tuple[list[str], str, str, int, bool]:
    """Check a collection request: (hook names, positions, keep, max_len, chat template)."""
    if model.tokenizer is None:
        raise CollectError("the model has no tokenizer")
    dataset.require_nonempty("collect")
    if positions not in POSITIONS:
        raise CollectError(f"unknown positions {positions!r}; expected one of {POSITIONS}")
    keep = keep or positions
    if keep not in POSITIONS:
        raise CollectError(f"unknown keep {keep!r}; expected one of {POSITIONS}")
    hook_names = resolve_hooks(model, hooks, layers)
    max_len = int(max_len or model.cfg.n_ctx)
    if max_len > model.cfg.n_ctx:
        raise CollectError(f"max_len={max_len} exceeds the model's context n_ctx={model.cfg.n_ctx}")
    tpl = (
        bool(getattr(model.tokenizer, "chat_template", None))
        if use_chat_template is None
        else use_chat_template
    )
    return hook_names, positions, keep, max_len, tpl


def _store_key(
    model: HookedTransformer,
    dataset: PromptDataset,
    hook_names: list[str],
    positions: str,
    keep: str,
    max_len: int,
    chat_template: bool,
    store_dtype: str = "float16",
) -> StoreKey:
    return StoreKey(
        **model_fingerprint(model),
        dataset_name=dataset.name,
        dataset_fingerprint=dataset.fingerprint(),
        hooks=tuple(hook_names),
        positions=positions,
        keep=keep,
        max_len=max_len,
        chat_template=chat_template,
        dtype=store_dtype,
    )


def open_or_create_store(
    model: HookedTransformer,
    dataset: PromptDataset,
    out: str | Path,
    hook_names: list[str],
    positions: str,
    keep: str,
    max_len: int,
    chat_template: bool,
    token_budget: int,
    max_batch: int,
    *,
    checksums: bool = True,
    check_space: bool = True,
    store_dtype: str = "float16",
) -> tuple[ActivationStore, bool]:
    """Reopen the store at ``out`` (its key must match the request) or plan and preallocate a new one.

    A reopened store is verified (sizes, headers, metadata checksums) and repaired when damaged: truncated
    files are re-extended, damaged metadata files are rebuilt from the plan of this request, and the batches
    whose rows were lost are marked not done (the collection then re-collects them). With ``check_space``,
    a store the disk cannot hold is refused up front. Returns the store and whether it was created by this
    call.
    """
    key = _store_key(model, dataset, hook_names, positions, keep, max_len, chat_template, store_dtype)
    out = Path(out)
    if (out / "manifest.json").exists():
        store = ActivationStore.open(out, expect=key, require_complete=False, check=False)
        clean_temporary_files(out)
        report = store.verify()
        if not report.ok:
            hooks = {f"{h}.npy" for h in store.manifest["hook_dims"]}
            layout = None
            if any(f not in hooks for f in report.damaged_files):
                layout = _layout(
                    model,
                    dataset,
                    list(store.manifest["hook_dims"]),
                    positions,
                    keep,
                    max_len,
                    chat_template,
                    int(store.manifest.get("token_budget", token_budget)),
                    int(store.manifest.get("max_batch", max_batch)),
                    store.dtype,
                )
            report = store.repair(report, layout=layout)
            warnings.warn(
                f"{out}: the store was damaged ({'; '.join(str(d) for d in report.damage)}); repaired: "
                f"rebuilt {report.rebuilt or 'no files'}, {len(report.undone)} batches to collect again",
                stacklevel=3,
            )
        if check_space and not store.complete:
            check_free_space(out, store.bytes_to_write(), "the rest of the store")
        return store, False
    layout = _layout(
        model,
        dataset,
        hook_names,
        positions,
        keep,
        max_len,
        chat_template,
        token_budget,
        max_batch,
        store_dtype,
    )
    if check_space:
        check_free_space(out, layout.planned_bytes())
    return ActivationStore.create(out, key, layout, checksums=checksums), True


@dataclass
class CollectEstimate:
    """What a collection will write (``probe-atlas collect --dry-run``)."""

    path: Path
    exists: bool
    complete: bool
    n_sequences: int
    n_rows: int
    n_hooks: int
    d_model: int
    n_batches: int
    batches_left: int
    activation_bytes: int
    total_bytes: int
    bytes_needed: int
    bytes_free: int
    dtype: str = "float16"

    @property
    def fits(self) -> bool:
        return self.bytes_needed <= self.bytes_free

    def summary(self) -> str:
        state = (
            "complete"
            if self.complete
            else f"{self.n_batches - self.batches_left}/{self.n_batches} batches done"
            if self.exists
            else "new"
        )
        return (
            f"{self.path} ({state}): {self.n_sequences} sequences, {self.n_rows} stored tokens x "
            f"{self.n_hooks} hooks x d_model {self.d_model} x {hook_dtype(self.dtype).itemsize} bytes "
            f"({self.dtype}) = "
            f"{format_bytes(self.activation_bytes)} of activations, {format_bytes(self.total_bytes)} "
            "with metadata; needs "
            f"{format_bytes(self.bytes_needed)} more, {format_bytes(self.bytes_free)} free"
            + ("" if self.fits else " -- NOT ENOUGH SPACE: the collection would be refused")
        )


def estimate_collection(
    model: HookedTransformer,
    dataset: PromptDataset,
    out: str | Path,
    *,
    hooks: Sequence[str] = ("resid_post",),
    layers: str | Sequence[int] | None = "all",
    positions: str = "auto",
    keep: str | None = None,
    max_len: int | None = None,
    token_budget: int = 4096,
    max_batch: int = 128,
    use_chat_template: bool | None = None,
    store_dtype: str = "auto",
) -> CollectEstimate:
    """The bytes :func:`collect` with the same arguments would write, and the free space (writes nothing)."""
    hook_names, positions, keep, max_len, tpl = _request(
        model, dataset, hooks, layers, positions, keep, max_len, use_chat_template
    )
    out = Path(out)
    free = disk_free(out)
    dtype = resolve_store_dtype(model, store_dtype)
    if (out / "manifest.json").exists():
        key = _store_key(model, dataset, hook_names, positions, keep, max_len, tpl, dtype)
        st = ActivationStore.open(out, expect=key, require_complete=False, check=False)
        m = st.manifest
        act = sum(int(m["n_rows"]) * int(d) * st.hook_dtype.itemsize for d in m["hook_dims"].values())
        left = int(m["n_batches"]) - len(m["done_batches"])
        return CollectEstimate(
            out,
            True,
            st.complete,
            st.n_sequences,
            int(m["n_rows"]),
            len(m["hook_dims"]),
            int(next(iter(m["hook_dims"].values()))),
            int(m["n_batches"]),
            left,
            act,
            sum(f.stat().st_size for f in out.iterdir() if f.is_file()),
            0 if st.complete else st.bytes_to_write(),
            free,
            st.dtype,
        )
    layout = _layout(
        model, dataset, hook_names, positions, keep, max_len, tpl, token_budget, max_batch, dtype
    )
    n_rows = int(layout.offsets[-1])
    act = sum(n_rows * d * hook_dtype(dtype).itemsize for d in layout.hook_dims.values())
    total = layout.planned_bytes()
    return CollectEstimate(
        out,
        False,
        False,
        len(layout.offsets) - 1,
        n_rows,
        len(hook_names),
        int(model.cfg.d_model),
        layout.n_batches,
        layout.n_batches,
        act,
        total,
        total,
        free,
        dtype,
    )


class _Interrupted(Exception):
    """Raised by the test hook ``_stop_after_batches`` to simulate a crash."""


def _layout(
    model: HookedTransformer,
    dataset: PromptDataset,
    hook_names: list[str],
    positions: str,
    keep: str,
    max_len: int,
    tpl: bool,
    token_budget: int,
    max_batch: int,
    store_dtype: str = "float16",
) -> StoreLayout:
    rendered: list[Rendered] = render_all(
        dataset.examples, model.tokenizer, max_len=max_len, use_chat_template=tpl
    )
    n_trunc = [
        (e.id, r.n_truncated) for e, r in zip(dataset.examples, rendered, strict=True) if r.n_truncated
    ]
    if n_trunc:
        warnings.warn(
            f"{dataset.name}: {len(n_trunc)} of {len(dataset)} examples were longer than "
            f"max_len={max_len} tokens "
            f"and were truncated from the left (first: {n_trunc[0][0]!r}, {n_trunc[0][1]} tokens dropped)",
            stacklevel=3,
        )
    tok_parts, role_parts, mask_parts, pos_parts, counts = [], [], [], [], []
    for ex, r in zip(dataset.examples, rendered, strict=True):
        kept = np.isin(r.roles, role_selection(keep, ex.is_exchange))
        scored = np.isin(r.roles, role_selection(positions, ex.is_exchange))
        if not scored.any():
            raise DataError(
                f"{dataset.name}: example {ex.id!r} has no tokens to score with positions={positions!r}"
                + (" (it has no response)" if positions == "response" and not ex.is_exchange else "")
            )
        if not kept.any() or (scored & ~kept).any():
            raise DataError(
                f"example {ex.id!r}: keep={keep!r} must include the scored positions={positions!r}"
            )
        idx = np.nonzero(kept)[0]
        tok_parts.append(r.ids[idx])
        role_parts.append(r.roles[idx])
        mask_parts.append(scored[idx])
        pos_parts.append(idx)
        counts.append(len(idx))
    lengths = [len(r.ids) for r in rendered]
    batches = plan_batches(lengths, token_budget, max_batch)
    batch_of = np.zeros(len(dataset), dtype=np.int32)
    for b, seqs in enumerate(batches):
        batch_of[seqs] = b
    d = model.cfg.d_model
    examples = [
        {k: v for k, v in e.to_json().items() if k not in ("text", "messages")} | {"n_tokens": lengths[i]}
        for i, e in enumerate(dataset.examples)
    ]
    return StoreLayout(
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        tokens=np.concatenate(tok_parts),
        roles=np.concatenate(role_parts),
        mask=np.concatenate(mask_parts),
        positions=np.concatenate(pos_parts),
        labels=dataset.labels,
        examples=examples,
        hook_dims=dict.fromkeys(hook_names, d),
        batch_of=batch_of,
        full_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        full_tokens=np.concatenate([r.ids for r in rendered]),
        extra={"n_truncated": len(n_trunc), "token_budget": token_budget, "max_batch": max_batch},
        dtype=store_dtype,
    )


class BatchWriter:
    """Runs batches of a store's collection plan: one forward pass each that keeps only the needed hooks'
    scored rows, written into the store's files (hashed on the way when asked). The manifest is not touched:
    whoever runs the batches marks them done."""

    def __init__(self, model: HookedTransformer, store: ActivationStore) -> None:
        tokenizer = model.tokenizer
        if tokenizer is None:
            raise CollectError("the model has no tokenizer")
        self.model, self.store = model, store
        self.hook_names = sorted(store.hooks, key=hook_sort_key)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.n_layers_needed = max(hook_layer(h) for h in self.hook_names) + 1
        self.offsets = np.asarray(store.offsets)
        self.positions = np.asarray(store.positions)
        self.full_ids = _FullIds(store)
        self.examples = store.examples()
        self.writers = {h: store.writer(h) for h in self.hook_names}
        self.dtype: torch.dtype = getattr(torch, store.dtype)

    def write(self, b: int, hashers: dict[str, Any] | None = None) -> tuple[list[int], int]:
        """Collect batch ``b`` and write its rows; returns its sequences and its (unpadded) token count."""
        device = self.model.cfg.device
        seqs = [int(s) for s in self.store.batch_sequences(b)]
        if not seqs:
            raise StoreError(f"{self.store.path}: batch {b} is not in the collection plan")
        tokens, attn, bi, pi, dest = batch_inputs(
            self.full_ids, seqs, self.offsets, self.positions, self.pad_id
        )
        captured = _forward_capture(
            self.model,
            tokens.to(device),
            attn.to(device),
            self.hook_names,
            self.hook_names[-1],
            self.n_layers_needed,
            torch.from_numpy(bi).to(device),
            torch.from_numpy(pi).to(device),
            self.dtype,
        )
        for h, (x, raw) in captured.items():
            arr = x.numpy()
            if raw is not None:
                raise StoreError(self._non_finite(h, arr, raw, seqs, bi, pi))
            self.writers[h].write_rows(dest, arr, hasher=(hashers or {}).get(h))
        return seqs, int(attn.sum())

    def _non_finite(
        self, h: str, arr: np.ndarray, raw: Tensor, seqs: list[int], bi: np.ndarray, pi: np.ndarray
    ) -> str:
        """The error for rows that are not finite in the store's dtype: the model's own NaN/inf, or values
        beyond the fp16 range (then the largest |x| and the way out: a float32 store)."""
        bad_row = int(np.nonzero(~np.isfinite(arr).all(axis=1))[0][0])
        where = (
            f"at hook {h} (layer {hook_layer(h)}) for example "
            f"{self.examples[seqs[int(bi[bad_row])]]['id']!r} (token position {int(pi[bad_row])})"
        )
        r = raw.float()
        if not bool(torch.isfinite(r).all()):
            return f"non-finite activations (NaN/inf computed by the model itself) {where}"
        peak = float(r.abs().max())
        return (
            f"non-finite activations {where}: max |x| = {peak:,.0f} is beyond the float16 range "
            f"({_FP16_MAX:,.0f}) of this {self.store.dtype} store; collect a float32 store instead "
            "(`store_dtype: float32` in the sweep spec, `--store-dtype float32` for `probe-atlas collect`, "
            "store_dtype='float32' for collect())"
        )

    def sync(self) -> None:
        for w in self.writers.values():
            w.sync()

    def close(self) -> None:
        for w in self.writers.values():
            w.close()


#: runs a store's remaining batches elsewhere and marks them done: ``(store, batches, progress)``; may
#: return extra manifest fields (e.g. how many workers ran them)
BatchRunner = Callable[[ActivationStore, list[int], bool], "dict[str, Any] | None"]


def _run(
    model: HookedTransformer,
    store: ActivationStore,
    *,
    progress: bool,
    durable: bool,
    checksums: bool = True,
    stop_after: int | None,
) -> None:
    """Run the remaining batches of a store's plan (every hook of the store) and mark the store complete.

    Each batch's rows are written, then (with ``checksums``) its checksums go into the manifest as it is
    marked done; an error while writing leaves the batch not done."""
    assert model.tokenizer is not None
    done = set(store.manifest["done_batches"])
    n_batches = int(store.manifest["n_batches"])
    todo = [b for b in range(n_batches) if b not in done]
    if not todo:
        store.mark_complete()
        return
    bound_heap()
    checksums = checksums and store.checksums_enabled
    fields = store.checksum_fields
    algo = store.checksum_algo
    writer = BatchWriter(model, store)
    bar = tqdm(
        total=len(todo),
        desc=f"collect {store.manifest['key']['dataset_name']}",
        disable=not progress,
        unit="batch",
    )
    n_tok, t0 = 0, time.perf_counter()
    try:
        for step, b in enumerate(todo):
            if stop_after is not None and step >= stop_after:
                raise _Interrupted(f"stopped after {stop_after} batches")
            hashers = {h: new_hasher(algo) for h in writer.hook_names} if checksums and algo else {}
            seqs, n = writer.write(b, hashers)
            if durable:
                writer.sync()
            if hashers:
                meta = store.meta_digest(np.asarray(seqs, dtype=np.int64))
                digests = [meta if f == "meta" else hashers[f].hexdigest() for f in fields]
                store.mark_done([b], {b: digests})
            else:
                store.mark_done([b], compute=False)
            n_tok += n
            bar.update(1)
            bar.set_postfix(tok_s=f"{n_tok / (time.perf_counter() - t0):.0f}")
        writer.sync()
    finally:
        bar.close()
        writer.close()
    store.mark_complete(collect_seconds=time.perf_counter() - t0)


def _forward_capture(
    model: HookedTransformer,
    tokens: Int[Tensor, "b s"],
    attention_mask: Int[Tensor, "b s"],
    hook_names: list[str],
    last_hook: str,
    n_layers_needed: int,
    bi: Int[Tensor, " k"],
    pi: Int[Tensor, " k"],
    dtype: torch.dtype = torch.float16,
) -> dict[str, tuple[Tensor, Tensor | None]]:
    """One forward pass that keeps only the kept rows of the needed hooks (in ``dtype``, CPU). Each hook
    gives ``(rows, raw)``: ``raw`` is None unless a row is not finite in ``dtype``; then it holds the rows in
    the model's own dtype (to tell an overflow of the store's range from the model's own NaN/inf)."""
    captured: dict[str, tuple[Tensor, Tensor | None]] = {}

    def grab(act: Tensor, hook: Any) -> None:
        rows = act[bi, pi]
        cast = rows.to(dtype)
        raw = None if bool(torch.isfinite(cast).all()) else rows.cpu()
        captured[hook.name] = (cast.cpu(), raw)
        if hook.name == last_hook:
            raise _StopForward

    with (
        torch.inference_mode(),
        model.hooks(fwd_hooks=[(h, grab) for h in hook_names]),
        contextlib.suppress(_StopForward),
    ):
        model(tokens, attention_mask=attention_mask, stop_at_layer=n_layers_needed)
    missing = set(hook_names) - set(captured)
    if missing:  # pragma: no cover - would mean TL skipped a hook
        raise StoreError(f"hooks {sorted(missing)} did not fire during the forward pass")
    return captured


class _FullIds:
    """The model input (every rendered token) of each sequence of a store."""

    def __init__(self, store: ActivationStore) -> None:
        self.off = store.full_offsets
        self.ids = store.full_tokens

    def __call__(self, s: int) -> np.ndarray:
        return np.asarray(self.ids[self.off[s] : self.off[s + 1]], dtype=np.int64)
