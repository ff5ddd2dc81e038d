# ruff: noqa: E402  (the import hook is installed before anything of the project is imported)
"""Shared fixtures. The library runs under jaxtyping's import hook with beartype: every function and dataclass
of the four packages checks its annotations (jaxtyping shapes included) when called, so a wrong shape or type
fails the test that passes it. The hook is installed here, before the first import of a package."""

from __future__ import annotations

import jaxtyping
from jaxtyping import install_import_hook

# is_pep484_tower: an int is a float, a float or int a complex, as PEP 484 (and mypy) say
install_import_hook(
    ["activations", "probes", "sae", "experiments"],
    "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))",
)

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from activations.data import Example, Message, PromptDataset
from activations.tiny import make_tiny_model, plant_direction

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_DATASETS = Path(os.environ.get("PROBE_ATLAS_SHARED", SHARED)) / "datasets"

HARM_WORDS = ["bomb", "poison", "hack", "malware", "explosive"]
BENIGN_WORDS = ["cake", "garden", "poem", "bread", "music"]
FILLER = [
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "for",
    "on",
    "with",
    "about",
    "how",
    "can",
    "you",
    "me",
    "please",
]


def _sentence(rng: random.Random, key: str, n: int) -> str:
    words = [rng.choice(FILLER) for _ in range(n)]
    words.insert(rng.randrange(len(words) + 1), key)
    return " ".join(words)


def planted_dataset(
    n: int = 64, seed: int = 0, name: str = "planted", min_len: int = 4, max_len: int = 14
) -> PromptDataset:
    """Harmful prompts contain a trigger word (planted direction in the tiny model); harmless ones do not."""
    rng = random.Random(seed)
    exs = []
    for i in range(n):
        label = i % 2
        key = rng.choice(HARM_WORDS if label else BENIGN_WORDS)
        exs.append(
            Example(
                id=f"{name}:{i}",
                text=_sentence(rng, key, rng.randint(min_len, max_len)),
                label=label,
                source=name,
                group=f"g{i // 2}",
            )
        )
    return PromptDataset(exs, name=name)


def exchange_dataset(n: int = 16, seed: int = 0) -> PromptDataset:
    rng = random.Random(seed)
    exs = []
    for i in range(n):
        label = i % 2
        key = rng.choice(HARM_WORDS if label else BENIGN_WORDS)
        exs.append(
            Example(
                id=f"ex:{i}",
                messages=(
                    Message("user", _sentence(rng, "help", rng.randint(3, 8))),
                    Message("assistant", _sentence(rng, key, rng.randint(3, 10))),
                ),
                label=label,
                source="exchanges",
            )
        )
    return PromptDataset(exs, name="exchanges")


@pytest.fixture(scope="session")
def tiny_model():
    torch.manual_seed(0)
    m = make_tiny_model(n_layers=3, d_model=32, n_heads=4, d_mlp=64, seed=0)
    plant_direction(m, HARM_WORDS, scale=6.0)
    return m


@pytest.fixture()
def planted() -> PromptDataset:
    return planted_dataset()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip themselves where no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture()
def unchecked() -> Iterator[None]:
    """Run without the import hook's checks: for tests that pass ill-typed or ill-shaped input on purpose, to
    see the library's own error (the one a user without the hook gets)."""
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", False)
