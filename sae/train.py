"""Train sparse autoencoders with sae-lens on activations from an :class:`ActivationStore`, offline.

sae-lens 6.x's :class:`sae_lens.SAETrainer` takes a ``data_provider``: any iterator of activation batches.
:func:`store_batches` is that iterator over one or more stores (memory-bounded: rows are read from the fp16
memmap in contiguous chunks, shuffled within a buffer, cast to fp32), so the training loop, the SAE classes,
the optimizer and the activation-norm scaling are sae-lens's own. Standard (ReLU + L1) and top-k SAEs.

Reconstruction quality (:func:`reconstruction_metrics`): explained variance ``1 - Σ‖x - x̂‖² / Σ‖x - x̄‖²``,
mean L0, MSE, dead-latent share on held-out rows; and (:func:`ce_loss_metrics`) the model's next-token loss
with the SAE spliced in at its hook versus clean versus zero-ablated, on a few of the store's own sequences
(the splice touches exactly the positions the store holds, which are the positions the SAE was trained on).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from activations.store import ActivationStore

__all__ = [
    "SAETrainConfig",
    "SAETrainError",
    "ce_loss_metrics",
    "make_training_sae",
    "reconstruction_metrics",
    "store_batches",
    "train_sae",
    "train_sae_cached",
]

Architecture = Literal["standard", "topk"]


class SAETrainError(ValueError):
    pass


@dataclass(frozen=True)
class SAETrainConfig:
    """What an SAE training run is: architecture, width, sparsity and the optimizer's schedule.

    ``expansion_factor``: ``d_sae = expansion_factor · d_in``. ``l1_coefficient`` (standard) or ``k``
    (top-k) set the sparsity. ``n_tokens``: training samples seen (several epochs over a small store).
    Activations are rescaled to mean norm ``√d_in`` during training (sae-lens's
    ``expected_average_only_in``) and the scale is folded back into the weights at the end.
    """

    architecture: Architecture = "standard"
    expansion_factor: int = 4
    l1_coefficient: float = 5.0
    k: int = 32
    n_tokens: int = 200_000
    batch_size: int = 1024
    lr: float = 1e-3
    l1_warm_up_frac: float = 0.1
    lr_decay_frac: float = 0.2
    buffer_rows: int = 32768
    select: str = "scored"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.architecture not in ("standard", "topk"):
            raise SAETrainError(f"architecture must be 'standard' or 'topk', got {self.architecture!r}")
        if self.expansion_factor < 1:
            raise SAETrainError(f"expansion_factor must be >= 1, got {self.expansion_factor}")
        if self.l1_coefficient < 0 or not math.isfinite(self.l1_coefficient):
            raise SAETrainError(f"l1_coefficient must be finite and >= 0, got {self.l1_coefficient}")
        if self.k < 1:
            raise SAETrainError(f"k must be >= 1, got {self.k}")
        if self.n_tokens < self.batch_size or self.batch_size < 1:
            raise SAETrainError(f"need n_tokens >= batch_size >= 1, got {self.n_tokens}, {self.batch_size}")
        if not self.lr > 0:
            raise SAETrainError(f"lr must be > 0, got {self.lr}")

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------- data
def _selected_rows(store: ActivationStore, select: str) -> np.ndarray:
    rows, off = store.selection(select)
    return np.arange(int(off[-1]), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)


def store_batches(
    stores: ActivationStore | Sequence[ActivationStore],
    hook: str,
    batch_size: int,
    *,
    buffer_rows: int = 32768,
    chunk_rows: int = 2048,
    select: str = "scored",
    seed: int = 0,
    epochs: int | None = None,
) -> Iterator[Float[Tensor, "b d"]]:
    """Shuffled fp32 batches ``[batch_size, d]`` of one hook's rows, forever (or for ``epochs`` epochs).

    Each epoch visits every selected row once: contiguous chunks of ``chunk_rows`` rows are read from the
    memmaps in a random order into a buffer of ``buffer_rows`` rows, shuffled there, and cut into batches
    (memory stays at about ``buffer_rows · d · 4`` bytes whatever the store size).
    """
    st = [stores] if isinstance(stores, ActivationStore) else list(stores)
    if not st:
        raise SAETrainError("store_batches: no stores given")
    if batch_size < 1 or buffer_rows < batch_size:
        raise SAETrainError(f"need 1 <= batch_size <= buffer_rows, got {batch_size}, {buffer_rows}")
    arrays = [s.activations(hook) for s in st]
    dims = {a.shape[1] for a in arrays}
    if len(dims) != 1:
        raise SAETrainError(f"stores disagree on the width of {hook}: {sorted(dims)}")
    rows = [_selected_rows(s, select) for s in st]
    chunks = [(i, lo) for i, r in enumerate(rows) for lo in range(0, len(r), chunk_rows)]
    if not chunks:
        raise SAETrainError(f"store_batches: the stores hold no {select!r} rows of {hook}")
    rng = np.random.default_rng(seed)
    carry: list[np.ndarray] = []
    epoch = 0
    while epochs is None or epoch < epochs:
        order = rng.permutation(len(chunks))
        pos = 0
        while pos < len(order):
            parts, n = carry, sum(len(c) for c in carry)
            while n < buffer_rows and pos < len(order):
                i, lo = chunks[order[pos]]
                r = rows[i][lo : lo + chunk_rows]
                parts.append(np.asarray(arrays[i][r], dtype=np.float32))
                n += len(r)
                pos += 1
            buf = np.concatenate(parts)
            buf = buf[rng.permutation(len(buf))]
            n_full = len(buf) // batch_size * batch_size
            for lo in range(0, n_full, batch_size):
                yield torch.from_numpy(buf[lo : lo + batch_size])
            carry = [buf[n_full:]] if n_full < len(buf) else []
        epoch += 1


# ---------------------------------------------------------------------------------------------- training
def make_training_sae(d_in: int, cfg: SAETrainConfig, *, hook: str = "", model_id: str = "") -> Any:
    """A fresh sae-lens training SAE (``StandardTrainingSAE`` or ``TopKTrainingSAE``), seeded."""
    from sae_lens import (
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )
    from sae_lens.saes.sae import SAEMetadata

    d_sae = int(cfg.expansion_factor * d_in)
    if cfg.architecture == "topk" and cfg.k > d_sae:
        raise SAETrainError(f"k={cfg.k} exceeds d_sae={d_sae}")
    meta = SAEMetadata(hook_name=hook, model_name=model_id, probe_atlas_train=asdict(cfg))
    steps = cfg.n_tokens // cfg.batch_size
    torch.manual_seed(cfg.seed)
    if cfg.architecture == "standard":
        scfg = StandardTrainingSAEConfig(
            d_in=d_in,
            d_sae=d_sae,
            l1_coefficient=cfg.l1_coefficient,
            l1_warm_up_steps=int(cfg.l1_warm_up_frac * steps),
            normalize_activations="expected_average_only_in",
            metadata=meta,
        )
        return StandardTrainingSAE(scfg)
    tcfg = TopKTrainingSAEConfig(
        d_in=d_in, d_sae=d_sae, k=cfg.k, normalize_activations="expected_average_only_in", metadata=meta
    )
    return TopKTrainingSAE(tcfg)


def _to_inference(training_sae: Any, folder: Path) -> Any:
    """Save the inference form of a trained SAE in sae-lens's format and load it back as an ``SAE``."""
    from sae_lens import SAE

    training_sae.save_inference_model(folder)
    return SAE.load_from_disk(folder)


def train_sae(
    stores: ActivationStore | Sequence[ActivationStore],
    hook: str,
    cfg: SAETrainConfig,
    out: str | Path,
    *,
    eval_store: ActivationStore | None = None,
    model: Any = None,
    ce_sequences: int = 16,
    progress: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """Train an SAE on ``hook`` of ``stores`` with sae-lens's ``SAETrainer``; save it to ``out``.

    ``out`` receives the SAE in sae-lens's format (``cfg.json`` + ``sae_weights.safetensors``, loadable with
    ``SAE.load_from_disk``) and ``report.json``. The report holds the training config, the time, and the
    reconstruction metrics on ``eval_store`` (default: the first store) for the trained SAE and for its
    initialization (``init_*``), plus the CE-loss figures when ``model`` is given.
    Returns ``(sae, report)`` with ``sae`` the inference ``sae_lens.SAE``.
    """
    from sae_lens import LoggingConfig, SAETrainer
    from sae_lens.config import SAETrainerConfig

    st = [stores] if isinstance(stores, ActivationStore) else list(stores)
    if not st:
        raise SAETrainError("train_sae: no stores given")
    d_in = int(st[0].activations(hook).shape[1])
    model_id = str(st[0].key.get("model_id", ""))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ev_store = eval_store or st[0]
    sae_t = make_training_sae(d_in, cfg, hook=hook, model_id=model_id)
    init = reconstruction_metrics(_to_inference(sae_t, out / ".init"), ev_store, hook, unscaled=True)
    steps = cfg.n_tokens // cfg.batch_size
    tcfg = SAETrainerConfig(
        total_training_samples=steps * cfg.batch_size,
        train_batch_size_samples=cfg.batch_size,
        lr=cfg.lr,
        lr_end=cfg.lr / 10,
        lr_warm_up_steps=max(1, steps // 20),
        lr_decay_steps=int(cfg.lr_decay_frac * steps),
        device="cpu",
        dead_feature_window=max(50, steps // 4),
        feature_sampling_window=max(50, steps // 4),
        n_batches_for_norm_estimate=max(1, min(50, 16384 // cfg.batch_size)),
        logger=LoggingConfig(log_to_wandb=False),
    )
    data = store_batches(
        st,
        hook,
        cfg.batch_size,
        buffer_rows=max(cfg.buffer_rows, cfg.batch_size),
        select=cfg.select,
        seed=cfg.seed,
    )
    trainer = SAETrainer(cfg=tcfg, sae=sae_t, data_provider=data)
    t0 = time.perf_counter()
    import contextlib
    import io

    quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
    with quiet:
        trained = trainer.fit()
    train_s = time.perf_counter() - t0
    sae = _to_inference(trained, out)
    import shutil

    shutil.rmtree(out / ".init", ignore_errors=True)
    metrics = reconstruction_metrics(sae, ev_store, hook)
    report: dict[str, Any] = {
        "hook": hook,
        "model_id": model_id,
        "d_in": d_in,
        "d_sae": int(sae.cfg.d_sae),
        "architecture": cfg.architecture,
        "config": asdict(cfg),
        "train_seconds": train_s,
        "train_steps": steps,
        "train_stores": [str(s.path) for s in st],
        "eval_store": str(ev_store.path),
        **metrics,
        **{f"init_{k}": v for k, v in init.items()},
    }
    if model is not None:
        report.update(ce_loss_metrics(model, sae, ev_store, hook, n_sequences=ce_sequences))
    # report.json marks the folder finished (train_sae_cached): written whole, then renamed into place, so a
    # kill at any instant leaves either no report (the SAE is trained again) or the whole one
    tmp = out / f".report.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, out / "report.json")
    return sae, report


def train_sae_cached(
    root: str | Path,
    stores: ActivationStore | Sequence[ActivationStore],
    hook: str,
    cfg: SAETrainConfig,
    **kwargs: Any,
) -> tuple[Any, dict[str, Any], Path]:
    """:func:`train_sae` into ``root/<hook>-<config key>-<data key>/`` unless a finished SAE is there.

    Returns ``(sae, report, folder)``; a rerun loads the saved SAE and its report instead of training.
    """
    from sae_lens import SAE

    st = [stores] if isinstance(stores, ActivationStore) else list(stores)
    data_key = hashlib.sha256(
        json.dumps([s.key.get("dataset_fingerprint", str(s.path)) for s in st]).encode()
    ).hexdigest()[:8]
    folder = Path(root) / f"{hook}-{cfg.architecture}-{cfg.key()}-{data_key}"
    if (folder / "report.json").exists() and (folder / "cfg.json").exists():
        return SAE.load_from_disk(folder), json.loads((folder / "report.json").read_text()), folder
    sae, report = train_sae(st, hook, cfg, folder, **kwargs)
    return sae, report, folder


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def reconstruction_metrics(
    sae: Any,
    store: ActivationStore,
    hook: str,
    *,
    select: str = "scored",
    max_rows: int = 20000,
    chunk_rows: int = 4096,
    unscaled: bool = False,
) -> dict[str, float]:
    """Explained variance, MSE, relative error, mean L0 and dead-latent share of ``sae`` on a store's rows.

    ``unscaled`` (an SAE whose training-time input scaling is not folded in yet, e.g. at initialization):
    the activations are rescaled to mean norm ``√d`` first, as the trainer would.
    """
    rows = _selected_rows(store, select)
    if len(rows) > max_rows:
        rows = np.sort(np.random.default_rng(0).choice(rows, max_rows, replace=False))
    arr = store.activations(hook)
    X = torch.from_numpy(np.asarray(arr[rows], dtype=np.float32))
    if unscaled:
        X = X * (X.shape[1] ** 0.5 / X.norm(dim=1).mean().clamp_min(1e-12))
    mu = X.mean(0)
    sse = tot = l0 = 0.0
    fired = torch.zeros(int(sae.cfg.d_sae), dtype=torch.bool)
    sae.eval()
    for lo in range(0, len(X), chunk_rows):
        x = X[lo : lo + chunk_rows]
        z = sae.encode(x)
        xh = sae.decode(z)
        sse += float((x - xh).square().sum())
        tot += float((x - mu).square().sum())
        l0 += float((z != 0).sum())
        fired |= (z != 0).any(0)
    n = len(X)
    return {
        "explained_variance": 1.0 - sse / max(tot, 1e-30),
        "mse": sse / (n * X.shape[1]),
        "relative_error": math.sqrt(sse / max(float(X.square().sum()), 1e-30)),
        "l0": l0 / n,
        "dead_frac": float((~fired).float().mean()),
        "n_eval_rows": float(n),
    }


@torch.no_grad()
def ce_loss_metrics(
    model: Any, sae: Any, store: ActivationStore, hook: str, *, n_sequences: int = 16
) -> dict[str, float]:
    """Next-token cross-entropy of ``model`` on ``n_sequences`` of the store's sequences: clean, with the
    SAE's reconstruction spliced in at ``hook``, and with ``hook`` zero-ablated; ``ce_loss_recovered`` is
    ``(zero - spliced) / (zero - clean)``.

    Only the positions the store holds (the positions the SAE was trained on) are replaced; the loss is the
    mean over every next-token prediction of the exact model inputs the store recorded.
    """
    full_off = np.asarray(store._load("full_offsets"))
    full_tok = store._load("full_tokens")
    off, pos = np.asarray(store.offsets), store.positions
    n = min(n_sequences, store.n_sequences)
    if n < 1:
        raise SAETrainError("ce_loss_metrics: the store holds no sequences")
    dev = next(model.parameters()).device
    totals = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    count = 0
    for i in np.linspace(0, store.n_sequences - 1, n).astype(int):
        toks = torch.as_tensor(
            np.asarray(full_tok[full_off[i] : full_off[i + 1]], dtype=np.int64), device=dev
        )
        if len(toks) < 2:
            continue
        where = torch.as_tensor(np.asarray(pos[off[i] : off[i + 1]], dtype=np.int64), device=dev)

        def splice(act: Tensor, hook: Any, where: Tensor = where) -> Tensor:
            act = act.clone()
            x = act[0, where].float()
            act[0, where] = sae.decode(sae.encode(x)).to(act.dtype)
            return act

        def zero(act: Tensor, hook: Any, where: Tensor = where) -> Tensor:
            act = act.clone()
            act[0, where] = 0.0
            return act

        for name, fns in (("clean", []), ("spliced", [(hook, splice)]), ("zero", [(hook, zero)])):
            loss = model.run_with_hooks(toks[None], return_type="loss", loss_per_token=True, fwd_hooks=fns)
            totals[name] += float(loss.sum())
        count += len(toks) - 1
    res = {f"ce_loss_{k}": v / max(count, 1) for k, v in totals.items()}
    gap = res["ce_loss_zero"] - res["ce_loss_clean"]
    res["ce_loss_recovered"] = (res["ce_loss_zero"] - res["ce_loss_spliced"]) / gap if gap else float("nan")
    res["ce_n_tokens"] = float(count)
    return res
