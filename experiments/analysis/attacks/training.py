"""Adversarial training data from attacked examples.

Token suffixes found by an attack become training examples in two ways:

* the attacked harmful prompt (label 1): the original example with the decoded suffix in its user turn;
* harmless prompts with the *same* suffix appended (label 0), so a probe retrained on the mix cannot learn
  "this suffix = harmful"; each suffix goes to ``harmless_per_suffix`` harmless prompts of the same split.

Splits and groups are kept: an attacked example keeps its split and group, a harmless prompt keeps its own,
and a suffix found on an example of split ``s`` is only appended to harmless prompts of split ``s`` (so
nothing learned on one split reaches another). Test examples are never used, neither as attacked prompts
nor as carriers of a suffix (their suffixes are dropped too); examples without a split are refused.
Embedding suffixes have no text and cannot be turned into data.
"""

from __future__ import annotations

import random
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace

from activations.data import Example, PromptDataset
from experiments.analysis.attacks.objective import AttackError, Placement
from experiments.analysis.attacks.result import AttackRun

__all__ = ["EXCLUDED_SPLITS", "adversarial_examples"]

#: splits whose examples never enter adversarial training data
EXCLUDED_SPLITS = frozenset({"test"})


def _with_text(ex: Example, text: str, placement: Placement) -> Example:
    msgs = ex.as_messages()
    i = max(j for j, m in enumerate(msgs) if m.role == "user")
    content = msgs[i].content + text if placement == "suffix" else text + msgs[i].content
    if ex.text is not None:
        return replace(ex, text=content)
    from activations.data import Message

    return replace(ex, messages=(*msgs[:i], Message("user", content), *msgs[i + 1 :]))


def adversarial_examples(
    runs: AttackRun | Sequence[AttackRun],
    harmless: Sequence[Example],
    *,
    splits: Sequence[str] = ("train",),
    harmless_per_suffix: int = 1,
    only_successful: float | None = None,
    require_kept: bool = False,
    seed: int = 0,
    name: str = "adversarial",
) -> PromptDataset:
    """Attacked harmful prompts (label 1) and harmless prompts with the same suffixes (label 0) of the given
    ``splits`` (never ``test``).

    ``only_successful``: keep only suffixes whose attacked score is at or below this threshold;
    ``require_kept``: only those that kept the behaviour. Each example's ``meta`` records the attack, the
    probe, the suffix ids and text, and the source example."""
    run_list = [runs] if isinstance(runs, AttackRun) else list(runs)
    if not run_list:
        raise AttackError("no attack runs")
    bad = sorted(set(splits) & EXCLUDED_SPLITS)
    if bad:
        raise AttackError(f"adversarial training data never uses split(s) {bad}")
    if harmless_per_suffix < 0:
        raise AttackError(f"harmless_per_suffix must be >= 0, got {harmless_per_suffix}")
    want = set(splits)
    pool: dict[str, list[Example]] = defaultdict(list)
    for h in harmless:
        if h.label >= 0.5:
            raise AttackError(f"harmless example {h.id!r} has label {h.label}")
        if h.split is None:
            raise AttackError(f"harmless example {h.id!r} has no split (assign splits first: with_splits)")
        if h.split in want:
            pool[h.split].append(h)
    rng = random.Random(f"adversarial:{seed}")
    for s in pool:
        rng.shuffle(pool[s])
    cursor: dict[str, int] = defaultdict(int)
    out: list[Example] = []
    dropped = 0
    for run in run_list:
        if run.results and run.results[0].suffix_ids is None:
            raise AttackError(
                f"the {run.method} run against {run.probe!r} has embedding suffixes: they have no text and "
                "cannot become training data (use a token attack)"
            )
        placement: Placement = run.config.get("placement", "suffix")
        examples = {e.id: e for e in run.examples}
        for r in run.results:
            ex = examples[r.example_id]
            if ex.split is None:
                raise AttackError(
                    f"attacked example {ex.id!r} has no split (assign splits first: with_splits)"
                )
            if ex.split not in want:
                dropped += ex.split in EXCLUDED_SPLITS
                continue
            if only_successful is not None and not r.score <= only_successful:
                continue
            if require_kept and not r.kept:
                continue
            text = r.suffix_text or ""
            tag = f"{run.method}:{run.probe}"
            meta = {
                "attack": run.method,
                "attack_probe": run.probe,
                "suffix_ids": list(r.suffix_ids or []),
                "suffix_text": text,
                "attack_score": r.score,
                "behaviour_kept": r.kept,
                "source_example": ex.id,
            }
            out.append(
                replace(
                    _with_text(ex, text, placement),
                    id=f"{ex.id}:adv:{tag}",
                    label=1.0,
                    kind="jailbreak",
                    meta=tuple(sorted({**ex.meta_dict(), **meta}.items())),
                )
            )
            carriers = pool.get(ex.split, [])
            if harmless_per_suffix and not carriers:
                raise AttackError(f"no harmless examples of split {ex.split!r} to carry the suffixes")
            for j in range(harmless_per_suffix):
                h = carriers[cursor[ex.split] % len(carriers)]
                cursor[ex.split] += 1
                out.append(
                    replace(
                        _with_text(h, text, placement),
                        id=f"{h.id}:adv:{tag}:{ex.id}:{j}",
                        label=0.0,
                        meta=tuple(
                            sorted(
                                {
                                    **h.meta_dict(),
                                    **meta,
                                    "source_example": h.id,
                                    "suffix_from": ex.id,
                                }.items()
                            )
                        ),
                    )
                )
    if dropped:
        warnings.warn(f"{dropped} attacked test example(s) left out of the training data", stacklevel=2)
    if not out:
        raise AttackError(f"no attacked examples of split(s) {sorted(want)} to turn into training data")
    ids = [e.id for e in out]
    if len(set(ids)) < len(ids):
        raise AttackError(
            "duplicate adversarial example ids: the same example was attacked twice by one probe"
        )
    return PromptDataset(out, name=name)
