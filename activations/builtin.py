"""The built-in labelled dataset: a small balanced set from the shipped ``general`` constitution.

Offline and deterministic; used by the demo, the notebooks' fast mode and the tests
(``activations.data.load_dataset("builtin")``).
"""

from __future__ import annotations

import functools

from activations.constitution import generate_prompts, load_constitution
from activations.data import PromptDataset


@functools.lru_cache(maxsize=8)
def builtin_dataset(n: int = 480, seed: int = 0) -> PromptDataset:
    """``n`` template prompts from the shipped constitution: half harmful (label 1), a quarter harmless
    look-alikes (``contrast``), a quarter permitted everyday requests (``plain``), spread evenly over
    topics, with train/val/test splits (0.6/0.2/0.2) by group (a topic with its look-alike)."""
    ds = generate_prompts(load_constitution("general"), n=n, seed=seed)
    return PromptDataset(ds, name="builtin" if (n, seed) == (480, 0) else f"builtin-{n}-s{seed}")
