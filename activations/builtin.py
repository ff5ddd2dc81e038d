"""The built-in labelled dataset: a small balanced set from the shipped ``general`` constitution, and a
built-in benign control set; a *rich* set (every look-alike, every surface form) and its jailbreak-wrapped
variant.

Offline and deterministic; used by the demo, the notebooks and the tests (``load_dataset("builtin")``,
``load_dataset("builtin:control")``, ``load_dataset("builtin:rich")``, ``load_dataset("builtin:wrapped")``).
"""

from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Any

import yaml

from activations.augment import wrap_each
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


#: the jailbreak wrappers of the generated wrapped sets (:mod:`activations.augment`), one per example
WRAPPERS: tuple[str, ...] = (
    "roleplay",
    "hypothetical",
    "prefix_injection",
    "refusal_suppression",
    "many_shot",
    "leetspeak",
    "random_caps",
    "base64",
)


@functools.lru_cache(maxsize=4)
def rich_dataset(n: int = 1920, seed: int = 0) -> PromptDataset:
    """``n`` prompts from the shipped constitution with *every* look-alike and every surface form
    (questions, imperatives, stories, role-play, lists, quoted requests, multi-turn conversations): half
    harmful, a quarter look-alikes (``contrast``), a quarter permitted, spread over topics, with
    train/val/test splits by group (a topic with all its look-alikes and forms)."""
    ds = generate_prompts(load_constitution("general"), n=n, seed=seed, lookalikes="all", forms="all")
    return PromptDataset(ds, name="builtin_rich" if (n, seed) == (1920, 0) else f"builtin_rich-{n}-s{seed}")


@functools.lru_cache(maxsize=4)
def wrapped_dataset(n: int = 1920, seed: int = 0) -> PromptDataset:
    """:func:`rich_dataset` (same ``n`` and ``seed``, so the same groups and splits) with every example in one
    of the jailbreak wrappers :data:`WRAPPERS`, dealt evenly over harmful, look-alike and permitted
    prompts (harmful ones become kind ``jailbreak``; the others keep theirs)."""
    name = "builtin_wrapped" if (n, seed) == (1920, 0) else f"builtin_wrapped-{n}-s{seed}"
    return wrap_each(rich_dataset(n, seed), WRAPPERS, seed=seed, name=name)


_BUILTIN_REFS = "builtin, builtin:N, builtin:control[:N], builtin:rich[:N] or builtin:wrapped[:N]"


def load_builtin(ref: str) -> PromptDataset:
    """A built-in set by reference: ``builtin`` (480 prompts; ``builtin:N``), ``builtin:control[:N]``,
    ``builtin:rich[:N]`` or ``builtin:wrapped[:N]``."""
    parts = ref.split(":")
    if parts[0] != "builtin" or len(parts) > 3:
        raise DataError(f"{ref!r}: expected {_BUILTIN_REFS}")
    named = {"control": benign_control, "rich": rich_dataset, "wrapped": wrapped_dataset}
    try:
        if len(parts) == 1:
            return builtin_dataset()
        if parts[1] in named:
            return named[parts[1]](int(parts[2])) if len(parts) == 3 else named[parts[1]]()
        if len(parts) == 2:
            return builtin_dataset(int(parts[1]))
    except ValueError as e:
        raise DataError(f"{ref!r}: expected {_BUILTIN_REFS} ({e})") from None
    raise DataError(f"{ref!r}: expected {_BUILTIN_REFS}")


@register_source("builtin")
def _builtin_source(arg: str | None, **_kwargs: Any) -> PromptDataset:
    """``builtin[:N]``, ``builtin:control[:N]``, ``builtin:rich[:N]`` or ``builtin:wrapped[:N]``."""
    return load_builtin("builtin" + (f":{arg}" if arg is not None else ""))
