"""The built-in labelled dataset: a small balanced set from the shipped ``general`` constitution, and a
built-in benign control set.

Offline and deterministic; used by the demo, the notebooks and the tests (``load_dataset("builtin")``,
``load_dataset("builtin:control")``).
"""

from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Any

import yaml

from activations.constitution import TEMPLATES, _render, _Topic, generate_prompts, load_constitution
from activations.data import DataError, Example, PromptDataset, register_source

EVERYDAY = Path(__file__).resolve().parent / "constitutions" / "everyday.yaml"


@functools.lru_cache(maxsize=8)
def builtin_dataset(n: int = 480, seed: int = 0) -> PromptDataset:
    """``n`` template prompts from the shipped constitution: half harmful (label 1), a quarter harmless
    look-alikes (``contrast``), a quarter permitted everyday requests (``plain``), spread evenly over
    topics, with train/val/test splits (0.6/0.2/0.2) by group (a topic with its look-alike)."""
    ds = generate_prompts(load_constitution("general"), n=n, seed=seed)
    return PromptDataset(ds, name="builtin" if (n, seed) == (480, 0) else f"builtin-{n}-s{seed}")


@functools.lru_cache(maxsize=4)
def benign_control(n: int = 1100, seed: int = 0) -> PromptDataset:
    """``n`` harmless everyday requests (label 0) for thresholds: topics of
    ``constitutions/everyday.yaml``, which appear in no shipped constitution, expanded through the same
    request templates as the built-in prompts (so the control has their form but none of their groups).
    Topics are visited round robin with seeded templates; each topic is its own group."""
    doc = yaml.safe_load(EVERYDAY.read_text())
    try:
        cats = [(str(c["name"]), [str(t) for t in c["topics"]]) for c in doc["categories"]]
        name, source = str(doc["name"]), str(doc["source"])
    except (KeyError, TypeError) as e:
        raise DataError(f"{EVERYDAY}: expected name, source and categories[{{name, topics}}] ({e})") from None
    topics = [
        _Topic(t, cat, f"{name}/{cat}/{i:02d}", 0.0, "plain", "plain", f"{cat}:{i:02d}:p")
        for cat, ts in cats
        for i, t in enumerate(ts)
    ]
    if n < 1 or n > len(topics) * len(TEMPLATES):
        raise DataError(f"builtin:control: n must be in [1, {len(topics) * len(TEMPLATES)}], got {n}")
    rng = random.Random(f"control:{seed}")
    orders = {t.index: rng.sample(range(len(TEMPLATES)), len(TEMPLATES)) for t in topics}
    out: list[Example] = []
    for j in range(len(TEMPLATES)):
        for t in topics:
            if len(out) == n:
                break
            k = orders[t.index][j]
            out.append(
                Example(
                    id=f"{name}:{t.index}:t{k:02d}",
                    label=0.0,
                    text=_render(t, k, seed),
                    source=source,
                    group=t.group,
                    kind="plain",
                    category=t.category,
                    meta=(
                        ("constitution", name),
                        ("generator", "template"),
                        ("template", k),
                        ("topic", t.text),
                    ),
                )
            )
    return PromptDataset(
        out, name="builtin_control" if (n, seed) == (1100, 0) else f"builtin_control-{n}-s{seed}"
    )


@register_source("builtin")
def _builtin_source(arg: str | None, **_kwargs: Any) -> PromptDataset:
    """``builtin``, ``builtin:N``, ``builtin:control`` or ``builtin:control:N``."""
    parts = arg.split(":") if arg is not None else []
    try:
        if parts and parts[0] == "control":  # builtin:control[:N]
            return benign_control(int(parts[1])) if len(parts) > 1 else benign_control()
        return builtin_dataset(int(parts[0])) if parts else builtin_dataset()  # builtin[:N]
    except ValueError as e:
        ref = "builtin" + (f":{arg}" if arg is not None else "")
        raise DataError(
            f"{ref!r}: expected builtin, builtin:N, builtin:control or builtin:control:N ({e})"
        ) from None
