"""activations: the floor of probe-atlas. Models, labelled data, the constitution generator and jailbreak
transforms, collection into the on-disk activation store, and pooling. Imports nothing from the other
packages (``probes``, ``sae``, ``experiments`` build on it).

Importing the package registers every dataset source (``load_dataset("builtin")``, ``source:NAME``,
``hf:NAME``) and every
pooling kind.
"""

from __future__ import annotations

from activations.augment import TRANSFORMS, augment_dataset, compose, get_transform
from activations.builtin import benign_control, builtin_dataset
from activations.collect import (
    HOOK_KINDS,
    CollectError,
    collect,
    default_store_dir,
    estimate_collection,
    model_fingerprint,
    parse_layers,
    resolve_store_dtype,
)
from activations.constitution import (
    generate_prompts,
    generate_with_endpoint,
    generate_with_model,
    load_constitution,
)
from activations.data import (
    DATASET_SOURCES,
    DataError,
    Example,
    Message,
    PromptDataset,
    canonical_group,
    load_dataset,
    load_jsonl,
    normalize_text,
    register_source,
)
from activations.decontam import DecontamConfig, Reference, decontaminate
from activations.matched import rewrap
from activations.models import load_model
from activations.pooling import POOLINGS, Pooling, PoolingError, pool, pool_ragged, register_pooling
from activations.render import POSITIONS, render_example
from activations.shared_sources import SOURCES, load_source, loso_splits, shared_available
from activations.store import (
    ActivationStore,
    DiskFullError,
    InsufficientSpaceError,
    StoreCorruptError,
    StoreError,
    StoreKey,
    StoreMismatchError,
    verify_store,
)
from activations.tiny import make_tiny_model, plant_direction, words_of

__all__ = [
    "DATASET_SOURCES",
    "HOOK_KINDS",
    "POOLINGS",
    "POSITIONS",
    "SOURCES",
    "TRANSFORMS",
    "ActivationStore",
    "CollectError",
    "DataError",
    "DecontamConfig",
    "DiskFullError",
    "Example",
    "InsufficientSpaceError",
    "Message",
    "Pooling",
    "PoolingError",
    "PromptDataset",
    "Reference",
    "StoreCorruptError",
    "StoreError",
    "StoreKey",
    "StoreMismatchError",
    "augment_dataset",
    "benign_control",
    "builtin_dataset",
    "canonical_group",
    "collect",
    "compose",
    "decontaminate",
    "default_store_dir",
    "estimate_collection",
    "generate_prompts",
    "generate_with_endpoint",
    "generate_with_model",
    "get_transform",
    "load_constitution",
    "load_dataset",
    "load_jsonl",
    "load_model",
    "load_source",
    "loso_splits",
    "make_tiny_model",
    "model_fingerprint",
    "normalize_text",
    "parse_layers",
    "plant_direction",
    "pool",
    "pool_ragged",
    "register_pooling",
    "register_source",
    "render_example",
    "resolve_store_dtype",
    "rewrap",
    "shared_available",
    "verify_store",
    "words_of",
]
