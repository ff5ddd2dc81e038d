"""Scoring prompts and attacked prompts with any probe: transfer of a suffix optimized against probe A to
every other probe, the clean scores that fix thresholds, and the fixed jailbreak transforms as the
non-adaptive baseline.

A token suffix is replayed as ids through each activation probe's own reading (its hooks, token roles and
pooling; one forward pass of the model serves every probe), and as text (the decoded suffix in the user
turn) to text classifiers. An embedding suffix is replayed as vectors in the suffix slots (activation
probes only: it has no text). Replaying a suffix to the probe it was optimized on, in the attack's own batch
size, gives the attack's own final score (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from transformer_lens import HookedTransformer

from activations.data import Example
from experiments.analysis.attacks.adapters import ProbeTarget, TextTarget, check_target
from experiments.analysis.attacks.common import replay
from experiments.analysis.attacks.objective import (
    AttackError,
    Objective,
    Placement,
    PreparedExample,
    attach_targets,
    prepare,
    suffix_text,
)
from experiments.analysis.attacks.result import AttackRun

__all__ = ["rebuild", "score_prompts", "transfer", "transfer_table", "transform_baseline"]

Target = ProbeTarget | TextTarget


def _split(targets: Sequence[Target]) -> tuple[list[ProbeTarget], list[TextTarget]]:
    probes = [t for t in targets if isinstance(t, ProbeTarget)]
    texts = [t for t in targets if isinstance(t, TextTarget)]
    if len(probes) + len(texts) != len(targets):
        raise AttackError("targets must be ProbeTarget or TextTarget (adapters.adapt / load_target)")
    names = [t.name for t in targets]
    if len(set(names)) < len(names):
        raise AttackError(f"target names must be unique, got {names}")
    return probes, texts


def rebuild(model: HookedTransformer, run: AttackRun) -> list[PreparedExample]:
    """The run's attacked examples, prepared again with their target completions."""
    if not run.examples:
        raise AttackError("the attack run has no examples")
    placement: Placement = run.config.get("placement", "suffix")
    prepared = prepare(model, run.examples, placement=placement, max_len=run.config.get("max_len"))
    return attach_targets(prepared, [np.asarray(r.target_ids, dtype=np.int64) for r in run.results])


def transfer(
    model: HookedTransformer,
    run: AttackRun,
    targets: Sequence[Target],
    *,
    batch_size: int | None = None,
) -> pd.DataFrame:
    """One row per (target, attacked example): the target's score of the clean and of the attacked prompt.

    ``replayed_as`` says how: ``ids`` / ``embeddings`` (activation probes), ``text`` (text classifiers;
    ``none`` with NaN scores for an embedding suffix, which has no text)."""
    probes, texts = _split(targets)
    for p in probes:
        check_target(model, p)
    prepared = rebuild(model, run)
    bs = int(batch_size or run.config.get("batch_size", 16))
    obj = Objective(match_tokens=int(run.config.get("match_tokens", 8)))
    is_tokens = run.results[0].suffix_ids is not None
    rows: list[dict[str, Any]] = []

    def add(name: str, family: str, clean: np.ndarray, att: np.ndarray, how: str) -> None:
        for r, c, a in zip(run.results, clean, att, strict=True):
            rows.append(
                {
                    "method": run.method,
                    "source_probe": run.probe,
                    "target_probe": name,
                    "target_family": family,
                    "example_id": r.example_id,
                    "clean_score": float(c),
                    "attacked_score": float(a),
                    "delta": float(a - c),
                    "replayed_as": how,
                    "same_probe": name == run.probe,
                }
            )

    if probes:
        scorers = [(p.name, p) for p in probes]
        clean = replay(model, scorers, prepared, objective=obj, batch_size=bs, behaviour=False)
        if is_tokens:
            ids = torch.tensor([r.suffix_ids for r in run.results], dtype=torch.long)
            att = replay(
                model, scorers, prepared, suffix_ids=ids, objective=obj, batch_size=bs, behaviour=False
            )
            how = "ids"
        else:
            if run.suffix_embeddings is None:
                raise AttackError("an embedding run without its suffix embeddings cannot be replayed")
            att = replay(
                model,
                scorers,
                prepared,
                suffix_embeds=run.suffix_embeddings,
                objective=obj,
                batch_size=bs,
                behaviour=False,
            )
            how = "embeddings"
        for p in probes:
            add(p.name, p.family, clean.scores[p.name], att.scores[p.name], how)
    for t in texts:
        clean_s = t.score_examples([p.example for p in prepared])
        if is_tokens:
            tok = model.tokenizer
            attacked = [
                p.attacked_example(suffix_text(tok, r.suffix_ids or [], p.placement))
                for p, r in zip(prepared, run.results, strict=True)
            ]
            add(t.name, t.family, clean_s, t.score_examples(attacked), "text")
        else:
            add(t.name, t.family, clean_s, np.full(len(prepared), np.nan), "none")
    return pd.DataFrame(rows)


def transfer_table(rows: pd.DataFrame, thresholds: dict[str, float] | None = None) -> pd.DataFrame:
    """Per (method, source probe, target probe): mean clean and attacked scores and their difference, and with
    ``thresholds`` (per target probe; flag when ``score > threshold``) the clean and attacked TPR."""
    if rows.empty:
        raise AttackError("no transfer rows")
    keys = ["method", "source_probe", "target_probe"]
    g = rows.groupby(keys, sort=False)
    out = g.agg(
        n=("example_id", "size"),
        mean_clean_score=("clean_score", "mean"),
        mean_attacked_score=("attacked_score", "mean"),
        mean_delta=("delta", "mean"),
    ).reset_index()
    if thresholds:
        thr = rows["target_probe"].map(thresholds)
        r = rows.assign(clean_flag=rows["clean_score"] > thr, attacked_flag=rows["attacked_score"] > thr)
        r = r[thr.notna()]
        tpr = r.groupby(keys, sort=False).agg(clean_tpr=("clean_flag", "mean"), tpr=("attacked_flag", "mean"))
        out = out.merge(tpr.reset_index(), on=keys, how="left")
    return out


def score_prompts(
    model: HookedTransformer,
    targets: Sequence[Target],
    examples: Sequence[Example],
    *,
    batch_size: int = 32,
) -> dict[str, np.ndarray]:
    """Every target's score of the clean prompts (no suffix, no target completion), in the input order:
    the scores a threshold is fixed on (e.g. the benign control) or a baseline's."""
    exs = list(examples)
    if not exs:
        raise AttackError("no examples to score")
    probes, texts = _split(targets)
    out: dict[str, np.ndarray] = {}
    if probes:
        for p in probes:
            check_target(model, p)
        prepared = prepare(model, exs)
        order = np.argsort([p.n_prompt for p in prepared], kind="stable")
        res = replay(
            model,
            [(p.name, p) for p in probes],
            [prepared[i] for i in order],
            batch_size=batch_size,
            behaviour=False,
        )
        for p in probes:
            s = np.empty(len(exs))
            s[order] = res.scores[p.name]
            out[p.name] = s
    for t in texts:
        out[t.name] = t.score_examples(exs)
    return out


def transform_baseline(
    model: HookedTransformer,
    targets: Sequence[Target],
    examples: Sequence[Example],
    transforms: Sequence[str],
    *,
    seed: int = 0,
    batch_size: int = 32,
) -> dict[str, dict[str, np.ndarray]]:
    """The non-adaptive baseline: ``{transform: {target: scores}}`` of the examples through each fixed
    jailbreak transform of :mod:`activations.augment` (``a+b`` composes), scored like the attacks."""
    from activations.augment import get_transform

    out: dict[str, dict[str, np.ndarray]] = {}
    for name in transforms:
        try:
            fn = get_transform(name)
        except KeyError as e:
            raise AttackError(str(e.args[0])) from None
        out[name] = score_prompts(model, targets, [fn(e, seed) for e in examples], batch_size=batch_size)
    return out
