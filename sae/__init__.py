"""sae: sparse autoencoders through sae-lens on activation stores, and the SAE-feature probe. Builds on
``activations`` and ``probes``; importing it registers the ``sae_feature`` scorer family and its sweep kinds
(``sae_k1`` ... ``sae_dense``, ``sae``)."""

from __future__ import annotations

from sae.features import LatentEncoder, SparseLatents, encode_store, pooled_latents, pooled_latents_multi
from sae.load import (
    SAEFolderError,
    SAEHookMismatchError,
    SAELoadError,
    check_hook,
    load_pretrained,
    load_sae,
    save_sae,
)
from sae.probe import SAE_PARAMS, SAEFeatureProbe, fit_heads, sae_probe_cost, select_latents
from sae.train import (
    SAETrainConfig,
    SAETrainError,
    ce_loss_metrics,
    reconstruction_metrics,
    train_sae,
    train_sae_cached,
)
from sae.view import latent_table, top_latents

__all__ = [
    "SAE_PARAMS",
    "LatentEncoder",
    "SAEFeatureProbe",
    "SAEFolderError",
    "SAEHookMismatchError",
    "SAELoadError",
    "SAETrainConfig",
    "SAETrainError",
    "SparseLatents",
    "ce_loss_metrics",
    "check_hook",
    "encode_store",
    "fit_heads",
    "latent_table",
    "load_pretrained",
    "load_sae",
    "pooled_latents",
    "pooled_latents_multi",
    "reconstruction_metrics",
    "sae_probe_cost",
    "save_sae",
    "select_latents",
    "top_latents",
    "train_sae",
    "train_sae_cached",
]
