"""What every kind's runner works in: the sweep context (spec, model fingerprint, cost model, data, stores),
the views of the data a scorer family reads (:data:`probes.base.VIEWS`), cached per sweep, and the shared
evaluation (metrics of every eval set, validation selection, saved probe metadata).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from transformer_lens import HookedTransformer

from activations.collect import HOOK_KINDS, collect, default_store_dir, parse_layers
from activations.pooling import Pooling
from activations.store import ActivationStore, StoreKey
from experiments.sweep.data import SweepData
from experiments.sweep.spec import Run, SpecError, SweepSpec
from probes.base import POOLED_LAYERS, SWEEP_KINDS, TOKENS, SweepKind
from probes.cost import CostModel
from probes.finetune import Sequences, sequences_from_store, token_sequences_from_store
from probes.metrics import conservative_threshold, evaluate, fpr_key
from probes.ragged import Ragged, ragged_from_store
from probes.selection import Selection, select_scores
from probes.text import example_text

__all__ = [
    "FeatureCache",
    "RunGroup",
    "SweepContext",
    "ViewCache",
    "evaluate_scores",
    "probe_metadata",
    "val_selection",
]


@dataclass
class ViewCache:
    """Per-sweep caches of the views that do not depend on a pooling (pooled features are cached per
    group by :class:`FeatureCache`)."""

    tokens: OrderedDict[tuple[str, tuple[str, ...]], Ragged] = field(default_factory=OrderedDict)
    texts: dict[str, list[str]] = field(default_factory=dict)
    token_ids: dict[str, Sequences] = field(default_factory=dict)
    residual: dict[tuple[str, str], Sequences] = field(default_factory=dict)
    full_stores: dict[tuple[str, tuple[str, ...]], ActivationStore] = field(default_factory=dict)
    #: anything else a kind's runner keeps for the sweep (SAEs and their latents)
    other: dict[Any, Any] = field(default_factory=dict)
    #: how many per-token layer sets stay in memory
    keep_tokens: int = 12


@dataclass
class SweepContext:
    spec: SweepSpec
    out: Path
    model_fp: dict[str, str]
    cost: CostModel
    data: SweepData
    stores: dict[str, ActivationStore]
    hook_names: dict[str, list[str]]  # hook kind -> full names (one per layer)
    layers: list[int]
    done: set[str] = field(default_factory=set)
    model: HookedTransformer | None = None
    cache: ViewCache = field(default_factory=ViewCache)

    @property
    def roles(self) -> list[str]:
        return list(self.stores)

    def labels(self, role: str) -> np.ndarray:
        return np.array(self.stores[role].labels)

    def require_model(self) -> HookedTransformer:
        if self.model is None:
            raise SpecError("this probe kind needs the sweep's model (it was not loaded)")
        return self.model

    # -------------------------------------------------------------------------------- views of the data
    def tokens(self, role: str, hooks: Sequence[str]) -> Ragged:
        """Every scored token's features of ``hooks`` for one dataset role (a small LRU cache)."""
        cache, key = self.cache.tokens, (role, tuple(hooks))
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        R = ragged_from_store(self.stores[role], list(hooks))
        cache[key] = R
        while len(cache) > self.cache.keep_tokens:
            cache.popitem(last=False)
        return R

    def texts(self, role: str) -> list[str]:
        """The texts of one role, in store order (read and checked once per sweep)."""
        if role not in self.cache.texts:
            ds = self.data.all()[role]
            ids = [e["id"] for e in self.stores[role].examples()]
            if ids != [ex.id for ex in ds]:
                raise SpecError(f"{role}: the store's examples are not the dataset's (order or ids differ)")
            self.cache.texts[role] = [example_text(ex) for ex in ds]
        return self.cache.texts[role]

    def token_ids(self, role: str) -> Sequences:
        """The model's whole input (token ids) of each sequence, the scored positions marked."""
        if role not in self.cache.token_ids:
            self.cache.token_ids[role] = token_sequences_from_store(self.stores[role])
        return self.cache.token_ids[role]

    def residual(self, role: str, hook: str) -> Sequences:
        """Every token's ``hook`` activations of one role (from a store that keeps every token)."""
        key = (role, hook)
        if key not in self.cache.residual:
            self.cache.residual[key] = sequences_from_store(self._full_store(role, [hook]), hook)
        return self.cache.residual[key]

    def _full_store(self, role: str, hooks: list[str]) -> ActivationStore:
        """A store of ``role`` that keeps every token and has ``hooks``: the sweep's own, or one collected
        (once, with every hook the spec's probes read this way)."""
        st = self.stores[role]
        if st.key.get("keep") == "all" and all(h in st.hooks for h in hooks):
            return st
        needed = sorted(set(self._residual_hooks()) | set(hooks), key=lambda h: int(h.split(".")[1]))
        key = (role, tuple(needed))
        if key not in self.cache.full_stores:
            fields = {f: st.key[f] for f in StoreKey.__dataclass_fields__}
            path = default_store_dir(
                self.out / "stores", StoreKey(**{**fields, "hooks": tuple(needed), "keep": "all"})
            )
            self.cache.full_stores[key] = collect(
                self.require_model(),
                self.data.all()[role],
                path,
                hooks=needed,
                layers=None,
                positions=self.spec.positions,
                keep="all",
                max_len=st.key["max_len"],
                token_budget=self.spec.token_budget,
                store_dtype=st.dtype,
            )
        return self.cache.full_stores[key]

    def _residual_hooks(self) -> list[str]:
        """Every hook the spec's probes read from stores that keep every token."""
        hooks: list[str] = []
        for p in self.spec.probes:
            entry = p.model_dump()
            try:
                cls, _ = SWEEP_KINDS[p.kind].build(entry)
            except ValueError:
                continue
            hooks += cls.input_hooks(entry, self.cost.n_layers)
        return hooks


class FeatureCache:
    """Pooled features of every dataset role for one (hook, pooling), computed once per layer."""

    def __init__(self, ctx: SweepContext, hook_kind: str, pooling: Pooling) -> None:
        self.ctx, self.hook_kind, self.pooling = ctx, hook_kind, pooling
        self._cache: dict[tuple[str, int | str], torch.Tensor] = {}

    def hook(self, layer: int) -> str:
        return HOOK_KINDS[self.hook_kind].format(l=layer)

    def layer(self, role: str, layer: int) -> Float[torch.Tensor, "n d"]:
        key = (role, layer)
        if key not in self._cache:
            self._cache[key] = self.ctx.stores[role].pooled(self.hook(layer), self.pooling)
        return self._cache[key]

    def layers(self, role: str, layers: Sequence[int]) -> Float[torch.Tensor, "l n d"]:
        return torch.stack([self.layer(role, layer) for layer in layers])

    def hooked(self, role: str, hook: str) -> Float[torch.Tensor, "n d"]:
        """Pooled features of a full hook name (e.g. the embeddings), computed once."""
        key = (role, hook)
        if key not in self._cache:
            self._cache[key] = self.ctx.stores[role].pooled(hook, self.pooling)
        return self._cache[key]


@dataclass
class RunGroup:
    """The runs of one probe spec that share seed, hook and pooling (what a kind's runner receives)."""

    ctx: SweepContext
    runs: list[Run]
    hook_kind: str
    pooling: Pooling
    feats: FeatureCache

    @property
    def spec(self) -> SweepSpec:
        return self.ctx.spec

    @property
    def probe_spec(self) -> Any:
        return self.runs[0].probe

    @property
    def kind(self) -> SweepKind:
        return SWEEP_KINDS[self.runs[0].probe.kind]

    @property
    def first_pooling(self) -> bool:
        """Whether this is the spec's first pooling group: kinds that pool by themselves (per-token probes,
        fine-tuned layers, standalone classifiers, ...) run there only, once per sweep."""
        return self.pooling == self.ctx.spec.pooling_objs()[0]

    def layers_of(self, run: Run, view: str) -> list[int]:
        """The layers a run reads: its own (per-layer kinds), the probe's ``layers`` or every collected layer
        (multi-layer views), none otherwise (scorers that name their layers themselves)."""
        ctx, kind = self.ctx, self.kind
        if kind.hook is not None:
            return []
        if kind.per_layer:
            return [run.layer]
        if view not in (POOLED_LAYERS, TOKENS):
            return []
        ps = run.probe
        layers = parse_layers(ps.layers, ctx.cost.n_layers) if ps.layers is not None else ctx.layers
        missing = [la for la in layers if la not in ctx.layers]
        if missing:
            raise SpecError(
                f"probes.{ps.kind}.layers: layers {missing} are not collected (spec layers: {ctx.layers})"
            )
        return layers

    def entry(self, run: Run, layers: Sequence[int] = ()) -> dict[str, Any]:
        """What a sweep kind builds its scorer from: the spec's probe entry, the run's seed, and the layers
        and hooks it reads."""
        hooks = [HOOK_KINDS[run.hook_kind].format(l=layer) for layer in layers]
        return {**run.probe.model_dump(), "seed": run.seed, "layers": list(layers), "hooks": hooks}


# ---------------------------------------------------------------------- evaluation
def evaluate_scores(
    ctx: SweepContext, scores: Mapping[str, np.ndarray], seed: int
) -> dict[str, dict[str, Any]]:
    """Metrics of one probe's scores (one array per dataset role) on every test set.

    Thresholds come from the benign control set and hold out of sample (:mod:`probes.metrics`); with a
    held-out benign set the FPR they realize there is reported too (``realized_fpr_at_*``). A test set with
    both classes (e.g. a harmful set with matched ``negatives``) is scored against its own negatives; a
    harmful-only set against the control set; a benign-only one (e.g. contrast prompts) gets NaN detection
    metrics and its over-refusal rate (``benign_flag_rate_at_*``: share flagged at the control threshold).
    """
    control = scores["control"]
    heldout = scores.get("heldout")
    n_boot = ctx.spec.bootstrap
    out = {}
    for name in ctx.data.tests:
        s = scores[f"test:{name}"]
        harmful = ctx.labels(f"test:{name}") >= 0.5
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m: dict[str, Any] = {}
            if harmful.any():
                yy, ss = harmful.astype(int), s
                if harmful.all():
                    yy = np.concatenate([np.ones(len(s), int), np.zeros(len(control), int)])
                    ss = np.concatenate([s, control])
                m.update(
                    evaluate(
                        yy,
                        ss,
                        seed=seed,
                        benign_control_scores=control,
                        benign_heldout_scores=heldout,
                        n_boot=n_boot,
                    )
                )
            else:
                m = {
                    "auroc": float("nan"),
                    "tpr_at_1pct_fpr": float("nan"),
                    "tpr_at_0.1pct_fpr": float("nan"),
                    "n_benign_control": len(control),
                }
            for fpr in (0.01, 0.001):
                key = fpr_key(fpr)
                info = conservative_threshold(control, fpr, warn=False)
                benign = s[~harmful]
                m[f"benign_flag_rate_at_{key}_fpr"] = (
                    float((benign > info.threshold).mean())
                    if len(benign) and not info.limited_by_n
                    else float("nan")
                )
        m["negatives"] = "control" if harmful.all() else ("own" if harmful.any() else "")
        m["n_eval"] = len(s)
        out[name] = m
    return out


def val_selection(ctx: SweepContext, val_scores: Sequence[np.ndarray]) -> Selection:
    """The candidate (e.g. a C value, in grid order) chosen on validation by the one rule of
    :mod:`probes.selection` with the spec's primary metric."""
    return select_scores(ctx.labels("val"), [np.asarray(v) for v in val_scores], ctx.spec.select_metric)


def probe_metadata(
    ctx: SweepContext, run: Run, layers: Sequence[int], extra: Mapping[str, Any]
) -> dict[str, Any]:
    """What a saved probe records: model fingerprint and reference, hooks, pooling, positions, data."""
    st = ctx.stores["train"]
    return {
        **ctx.model_fp,
        "model_ref": ctx.spec.model,
        "hook": run.hook_kind,
        "hook_names": [HOOK_KINDS[run.hook_kind].format(l=layer) for layer in layers],
        "layers": list(layers),
        "pooling": run.pooling.params(),
        "positions": st.key["positions"],
        "max_len": st.key["max_len"],
        "chat_template": st.key["chat_template"],
        "train_dataset": st.key["dataset_name"],
        "train_fingerprint": st.key["dataset_fingerprint"],
        "run_id": run.run_id,
        "sweep": ctx.spec.name,
        **extra,
    }
