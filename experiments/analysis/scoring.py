"""Score any labelled JSONL with a saved probe, on the exact hook, positions and pooling it was trained on."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformer_lens import HookedTransformer

from activations.collect import collect, model_fingerprint
from activations.data import PromptDataset, load_dataset
from activations.models import load_model
from activations.pooling import Pooling
from probes.io import load_probe, read_probe_info
from probes.scorer import Probe


class ScoreError(ValueError):
    pass


def read_probe_metadata(probe_dir: str | Path) -> dict[str, Any]:
    """The metadata a sweep saved with a probe (model fingerprint, hooks, pooling, positions, ...)."""
    meta = dict(read_probe_info(probe_dir).get("metadata") or {})
    for k in ("hook_names", "pooling", "model_id"):
        if k not in meta:
            raise ScoreError(
                f"probe at {probe_dir} has no {k!r} in its metadata: it was not saved by a sweep"
            )
    return meta


def score_dataset(
    probe_dir: str | Path,
    dataset: PromptDataset,
    model: HookedTransformer,
    *,
    progress: bool = False,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Logits of a saved probe on every example of ``dataset`` (checks the probe was made for ``model``)."""
    meta = read_probe_metadata(probe_dir)
    fp = model_fingerprint(model)
    for k in ("model_id", "config_hash", "weights_hash", "tokenizer_hash"):
        if k in meta and meta[k] != fp[k]:
            raise ScoreError(
                f"probe at {probe_dir} was trained on model {meta.get('model_id')!r} ({k}={meta[k]}), "
                f"not on the loaded model {fp['model_id']!r} ({k}={fp[k]})"
            )
    probe: Probe = load_probe(probe_dir)
    hook_names: list[str] = list(meta["hook_names"])
    pooling = Pooling.parse(dict(meta["pooling"]))
    with tempfile.TemporaryDirectory(prefix="probe-atlas-score-") as tmp:
        store = collect(
            model,
            dataset,
            Path(tmp) / "store",
            hooks=hook_names,
            layers=None,
            positions=meta.get("positions", "auto"),
            max_len=int(meta.get("max_len", model.cfg.n_ctx)),
            use_chat_template=meta.get("chat_template"),
            progress=progress,
        )
        score_store = getattr(probe, "score_store", None)
        if callable(score_store):  # probes that read tokens themselves (SAE-feature, per-token probes)
            return np.asarray(score_store(store, hook_names[0])), meta
        feats = [store.pooled(h, pooling) for h in hook_names]
    X = torch.stack(feats, 1) if probe.input_ndim == 3 else feats[0]
    return probe.decision_function(X).numpy(), meta


def score_file(
    probe_dir: str | Path, data: str | Path, out: str | Path, *, model_name: str | None = None
) -> int:
    """Write ``out`` (JSONL: id, label, score, prob) for every example of ``data``; returns the count."""
    meta = read_probe_metadata(probe_dir)
    ds = load_dataset(str(data))
    model = load_model(model_name or meta.get("model_ref") or meta["model_id"])
    scores, _ = score_dataset(probe_dir, ds, model, progress=True)
    outp = Path(out)
    outp.parent.mkdir(parents=True, exist_ok=True)
    with outp.open("w", encoding="utf-8") as f:
        for ex, s in zip(ds, scores, strict=True):
            f.write(
                json.dumps(
                    {"id": ex.id, "label": ex.label, "score": float(s), "prob": float(1 / (1 + np.exp(-s)))}
                )
                + "\n"
            )
    return len(ds)
