"""What each part of a training mixture buys: refit a probe family on subsets of a finished sweep's training
mixture (its stores reused; nothing is collected again) and evaluate every subset the sweep's way.

:func:`mixture_ablation` takes a prepared sweep context (:func:`experiments.sweep.engine.prepare` on the
sweep's folder) and named *variants*, each a predicate ``keep(component, example)`` over the training
examples (``component`` is the mixture component's name). Per variant it fits the family on the kept
examples for every layer × C, chooses (layer, C) on the sweep's validation set by the one selection rule,
and reports every test set: AUROC and TPR at 1% FPR (the control's threshold), the share of the set's own
harmless prompts flagged at that threshold, and ``tpr_vs_own_1pct`` (TPR at the threshold that flags 1% of
the set's own harmless prompts, out of sample; NaN with < 100 of them). Selection never sees a test figure.

``probe-atlas mixtures SPEC OUT`` runs :data:`DEFAULT_VARIANTS` on a finished sweep and
writes ``OUT/mixture_ablation.csv``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from activations.data import Example
from activations.pooling import Pooling
from experiments.sweep.context import FeatureCache, SweepContext, evaluate_scores
from experiments.sweep.spec import SpecError
from probes.base import SWEEP_KINDS
from probes.metrics import tpr_vs_own_negatives
from probes.scorer import Scorer
from probes.selection import select_scores

__all__ = ["DEFAULT_VARIANTS", "Keep", "mixture_ablation", "train_components"]

Keep = Callable[[str, Example], bool]


def _not(*names: str) -> Keep:
    return lambda comp, e: comp not in names


#: the ablations of ``generalize.yaml``'s mixture (component names of that spec)
DEFAULT_VARIANTS: dict[str, Keep] = {
    "refusal_direction only": lambda comp, e: comp == "rd",
    "+ constitution harmful/permitted (no look-alikes)": lambda comp, e: (
        comp == "rd" or (comp == "rich" and e.kind != "contrast")
    ),
    "+ look-alikes (constitution, CoCoNot train)": lambda comp, e: (
        comp in ("rd", "rich", "coconot_lookalikes")
    ),
    "full mixture (+ harmful and harmless in wrappers)": lambda comp, e: True,
    "full - CoCoNot look-alikes": _not("coconot_lookalikes"),
    "full - harmless in wrappers": _not("wrapped_harmless", "wrapped_alpaca"),
}


def train_components(ctx: SweepContext, base: Path | None = None) -> list[str]:
    """The mixture component of each training example (store order)."""
    train = ctx.spec.datasets.train
    mix = getattr(train, "mix", None)
    if mix is None:
        raise SpecError("the sweep's train set is not a mixture")
    owner: dict[str, str] = {}
    for i, c in enumerate(mix):
        ds = c.load(base, default_name=c.name or f"train[{i}]")
        for e in ds:
            owner.setdefault(e.id, c.name or f"train[{i}]")
    return [owner.get(e.id, "?") for e in ctx.data.train]


def mixture_ablation(
    ctx: SweepContext,
    variants: Mapping[str, Keep] | None = None,
    *,
    probe: str = "logistic_l2",
    poolings: Sequence[str] = ("mean", "last"),
    base: Path | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per variant × pooling × test set (see the module docstring)."""
    variants = dict(variants or DEFAULT_VARIANTS)
    comps = train_components(ctx, base)
    train = list(ctx.data.train)
    y_all = ctx.labels("train")
    y_val = ctx.labels("val")
    kind = SWEEP_KINDS[probe]
    rows: list[dict[str, Any]] = []
    for pname in poolings:
        feats = FeatureCache(ctx, "resid_post", Pooling.parse(pname))
        for vname, keep in variants.items():
            mask = torch.tensor([keep(c, e) for c, e in zip(comps, train, strict=True)])
            if mask.sum() == 0 or len(set(y_all[mask.numpy()] >= 0.5)) < 2:
                raise SpecError(f"variant {vname!r}: keeps no example of one class")
            entry = {"kind": probe, "params": {}, "seed": seed, "class_weight": "balanced", "penalty": "l2",
                     "l1_ratio": 0.5, "shrinkage": None, "layers": [ctx.layers[0]], "hooks": []}  # fmt: skip
            cls, config = kind.build(entry)
            assert issubclass(cls, Scorer)
            X = [feats.layer("train", la)[mask] for la in ctx.layers]
            Cs = list(ctx.spec.Cs) if kind.uses_C else None
            grid = cls.fit_grid(X, y_all[mask.numpy()], Cs, **config)
            cands = [(i, j) for i in range(len(ctx.layers)) for j in range(len(Cs or [None]))]
            val = grid.val_scores([feats.layer("val", la) for la in ctx.layers])
            sel = select_scores(y_val, [val[i][j] for i, j in cands], ctx.spec.select_metric)
            i, j = cands[sel.index]
            scorer = grid.scorer(i, j)
            la = ctx.layers[i]
            scores = {role: np.asarray(scorer.score(feats.layer(role, la)), float) for role in ctx.roles}
            metrics = evaluate_scores(ctx, scores, seed)
            counts = pd.Series(comps)[mask.numpy()].value_counts().to_dict()
            for test, m in metrics.items():
                y = ctx.labels(f"test:{test}")
                rows.append(
                    {
                        "variant": vname,
                        "probe": probe,
                        "pooling": pname,
                        "layer": la,
                        "C": None if Cs is None else Cs[j],
                        "n_train": int(mask.sum()),
                        "components": counts,
                        **{f"val_{k}": v for k, v in sel.metrics[sel.index].items()},
                        "eval_set": test,
                        "auroc": m["auroc"],
                        "tpr_at_1pct_fpr": m["tpr_at_1pct_fpr"],
                        "flag_rate_at_1pct": m["benign_flag_rate_at_1pct_fpr"],
                        "tpr_vs_own_1pct": tpr_vs_own_negatives(y, scores[f"test:{test}"]),
                    }
                )
    return pd.DataFrame(rows)
