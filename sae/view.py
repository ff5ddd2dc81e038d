"""What does an SAE-feature probe read? The highest-activating prompts and tokens of its top latents.

:func:`latent_table` ranks a probe's latents by the size of their contribution (|weight| × the latent's spread
over training sequences) and lists, for each of the top ``n_latents``, its ``n_examples`` highest-activating
tokens in a store (each from a different sequence), with the token, a window of context (the token marked
``[[...]]``), the example's id and label. :func:`experiments.viz.sae.latent_figure` draws that table
(plotly): one panel per latent, a horizontal bar per example, the context on hover. Tokens are decoded with
the model's tokenizer; the store's ``tokens.npy`` holds each row's token id.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from activations.store import ActivationStore
from sae.features import LatentEncoder, iter_encoded
from sae.probe import SAEFeatureProbe

__all__ = ["latent_table", "top_latents"]


def top_latents(probe: Any, n: int = 8, spread: np.ndarray | torch.Tensor | None = None) -> list[int]:
    """Positions (in the probe's selection) of its ``n`` most influential latents: |coef| × ``spread``.

    ``spread`` defaults to the head's standardization scale (the latents' training std), so the ranking is
    by the weight on standardized latents.
    """
    coef = probe.coef.abs()
    if spread is None:
        sc = getattr(probe.head_, "scale_", None)
        spread = sc if sc is not None else torch.ones_like(coef)
    s = torch.as_tensor(np.asarray(spread), dtype=coef.dtype)
    order = torch.argsort(-(coef * s), stable=True)
    return [int(i) for i in order[:n]]


def _decode(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    if tokenizer is None:
        return [f"<{int(i)}>" for i in ids]
    return [tokenizer.decode([int(i)]) for i in ids]


def latent_table(
    probe_or_encoder: Any,
    store: ActivationStore,
    tokenizer: Any = None,
    *,
    hook: str | None = None,
    latents: Sequence[int] | None = None,
    n_latents: int = 8,
    n_examples: int = 10,
    context: int = 8,
    select: str = "scored",
    chunk_tokens: int = 8192,
) -> pd.DataFrame:
    """Top-activating examples of the probe's top latents (or of ``latents``, positions in its selection).

    Columns: ``latent`` (SAE index), ``rank_in_probe``, ``weight`` (head coefficient, NaN for a bare
    encoder), ``example_rank``, ``activation``, ``sequence``, ``example_id``, ``label``, ``token``,
    ``context``, ``frac_harmful_top`` (share of harmful examples among this latent's top examples).
    """
    if isinstance(probe_or_encoder, SAEFeatureProbe):
        enc: LatentEncoder = probe_or_encoder.encoder_  # type: ignore[assignment]
        h = hook or probe_or_encoder.hook
        pos = list(latents) if latents is not None else top_latents(probe_or_encoder, n_latents)
        weights = probe_or_encoder.coef[pos].tolist()
    elif isinstance(probe_or_encoder, LatentEncoder):
        enc, h = probe_or_encoder, hook or ""
        pos = list(latents) if latents is not None else list(range(min(n_latents, enc.n_latents)))
        weights = [float("nan")] * len(pos)
    else:
        raise TypeError(
            f"expected an SAEFeatureProbe or a LatentEncoder, got {type(probe_or_encoder).__name__}"
        )
    if not h:
        raise ValueError("give the hook the latents read")
    sub = enc.subset(pos)
    n_seq = store.n_sequences
    # best activation and its row, per sequence and latent (memory: n_seq × k)
    best = np.full((n_seq, len(pos)), -np.inf, np.float32)
    best_row = np.zeros((n_seq, len(pos)), np.int64)
    rows_sel, off = store.selection(select)
    for lo, hi, coff, z in iter_encoded(store, h, sub, select=select, chunk_tokens=chunk_tokens):
        zz = z.numpy()
        for j in range(hi - lo):
            a, b = int(coff[j]), int(coff[j + 1])
            seg = zz[a:b]
            arg = seg.argmax(0)
            best[lo + j] = seg[arg, np.arange(len(pos))]
            best_row[lo + j] = int(off[lo]) + a + arg
    if rows_sel is not None:
        best_row = np.asarray(rows_sel)[best_row]
    tokens, all_off = np.asarray(store.tokens), np.asarray(store.offsets)
    labels, exs = np.asarray(store.labels), store.examples()
    out = []
    for j in range(len(pos)):
        order = np.argsort(-best[:, j], kind="stable")[:n_examples]
        top_lab = labels[order] >= 0.5
        for r, s in enumerate(order):
            row = int(best_row[s, j])
            lo_s, hi_s = int(all_off[s]), int(all_off[s + 1])
            a, b = max(lo_s, row - context), min(hi_s, row + context + 1)
            toks = _decode(tokenizer, tokens[a:b].tolist())
            t_i = row - a
            ctx_str = "".join(toks[:t_i]) + "[[" + toks[t_i] + "]]" + "".join(toks[t_i + 1 :])
            out.append(
                {
                    "latent": int(sub.ids[j]),
                    "rank_in_probe": j,
                    "weight": float(weights[j]),
                    "example_rank": r,
                    "activation": float(best[s, j]),
                    "sequence": int(s),
                    "example_id": exs[s].get("id", str(s)),
                    "label": float(labels[s]),
                    "token": toks[t_i],
                    "context": ctx_str.replace("\n", "⏎"),
                    "frac_harmful_top": float(top_lab.mean()),
                }
            )
    return pd.DataFrame(out)
