"""Loaded probes as differentiable score functions: the only module of the attack package that knows the
probe classes.

:func:`adapt` turns a fitted probe (or classifier) into a :class:`ProbeTarget` whose
``score(acts, mask, attention_mask) -> [b]`` is the probe's pre-threshold score (its logit) computed from
padded per-token activations ``acts[hook]: [b, s, d]`` of the tokens ``mask`` selects, differentiably, through
the probe's own pooling / aggregation, and equal to the probe's own ``decision_function`` on the same
activations (:func:`reference_scores` calls that, tested for every family):

* ``linear``: logistic / diff-means / LDA on pooled activations, ``pool(x)·coef + b`` (``coef`` acts on raw
  features: the logistic probe's standardization is folded into it);
* ``multi_layer``: the same on the concatenation of the pooled layers (in the probe's layer order);
* ``token``: per-token probes (``token_linear`` with every aggregation: ``token_ema``, ``token_swim``,
  max / mean / softmax ...; ``token_attention``; ``token_multimax``), through the probe's own padded scoring;
* ``sae``: SAE-feature probes: the selected encoder latents of every token, pooled, then the head;
* ``finetune`` / ``truncated``: the copied blocks (fine-tuned final layers, or the first ``m`` blocks of a
  standalone classifier) run again on the residual stream they start from, then norm, pooling and head.

Not differentiable in the model's activations, so transfer targets only (:class:`TextTarget`, scored on the
attacked *text*): TF-IDF, MiniLM and the prompted classifier. Ensembles and cascades are not adapted (their
members are; a cascade's escalation is a hard threshold).

:func:`load_target` loads a saved probe folder (``probe.json``: hooks, pooling, positions and the model
fingerprint from its metadata; ``classifier.json``: fine-tuned layers or a text classifier).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import einops
import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from activations.data import Example
from activations.pooling import Pooling
from activations.render import POSITIONS, role_selection
from experiments.analysis.attacks.objective import AttackError, hook_layer

__all__ = [
    "FINGERPRINT_KEYS",
    "ProbeTarget",
    "TextTarget",
    "adapt",
    "check_target",
    "load_target",
    "reference_scores",
]

FINGERPRINT_KEYS = ("model_id", "config_hash", "tokenizer_hash", "weights_hash")
ScoreFn = Callable[
    [Mapping[str, Float[Tensor, "b s d"]], Bool[Tensor, "b s"], Int[Tensor, "b s"] | None],
    Float[Tensor, " b"],
]
Reference = Callable[
    [Mapping[str, Float[Tensor, "b s d"]], Bool[Tensor, "b s"], Int[Tensor, "b s"] | None, Tensor | None],
    Float[Tensor, " b"],
]


@dataclass
class ProbeTarget:
    """A probe the attacker can differentiate: hooks it reads, token roles it reads, its score function."""

    name: str
    family: str
    hooks: tuple[str, ...]
    fn: ScoreFn
    reference: Reference
    roles: tuple[int, ...] = (1,)
    fingerprint: dict[str, str] | None = None
    source: Any = None
    path: str | None = None
    extra_blocks: int = 0  # blocks the probe runs itself (copied fine-tuned blocks): counted in FLOPs
    meta: dict[str, Any] = field(default_factory=dict)

    def score(
        self,
        acts: Mapping[str, Float[Tensor, "b s d"]],
        mask: Bool[Tensor, "b s"],
        attention_mask: Int[Tensor, "b s"] | None = None,
    ) -> Float[Tensor, " b"]:
        return self.fn(acts, mask, attention_mask)

    @property
    def layer(self) -> int:
        """The deepest block it reads (-1: the embeddings)."""
        return max(hook_layer(h) for h in self.hooks)


@dataclass
class TextTarget:
    """A text classifier (TF-IDF, MiniLM, prompted): scored on the attacked text, a transfer target only."""

    name: str
    classifier: Any
    path: str | None = None
    family: str = "text"

    def score_examples(self, examples: Sequence[Example]) -> np.ndarray:
        return np.asarray(self.classifier.score_examples(list(examples)), dtype=np.float64)


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def _rows(x: Float[Tensor, "b s d"], mask: Bool[Tensor, "b s"]) -> tuple[Tensor, np.ndarray]:
    """The masked rows of every sequence, in order, and their offsets (the store's ragged layout)."""
    lengths = mask.sum(1).cpu().numpy()
    return x[mask], np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def _cat(acts: Mapping[str, Tensor], hooks: Sequence[str]) -> Tensor:
    missing = [h for h in hooks if h not in acts]
    if missing:
        raise AttackError(f"activations of hook(s) {missing} are missing")
    xs = [acts[h] if acts[h].dtype == torch.float64 else acts[h].float() for h in hooks]
    return xs[0] if len(xs) == 1 else torch.cat(xs, dim=-1)


def _roles(positions: str) -> tuple[int, ...]:
    if positions not in POSITIONS:
        raise AttackError(f"unknown positions {positions!r}; expected one of {POSITIONS}")
    # an attacked example is a prompt: ``auto`` reads its prompt tokens (pass ``response`` for a probe
    # trained on exchanges' responses)
    return role_selection(positions, is_exchange=False)


def _affine_parts(probe: Any) -> tuple[Tensor, Tensor]:
    if probe.coef_ is None or probe.intercept_ is None:
        raise AttackError(f"{type(probe).__name__} is not fitted")
    return probe.coef_.detach().float(), probe.intercept_.detach().float().reshape(())


# ----------------------------------------------------------------------------------------------------------
# adapters, one per family
# ----------------------------------------------------------------------------------------------------------


def _linear(probe: Any, hooks: tuple[str, ...], pooling: Pooling) -> tuple[ScoreFn, Reference]:
    if len(hooks) != 1:
        raise AttackError(f"a {type(probe).__name__} reads one hook, got {list(hooks)}")
    coef, b = _affine_parts(probe)

    def fn(acts: Mapping[str, Tensor], mask: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        x = pooling(_cat(acts, hooks), mask)
        return x @ coef.to(x.dtype) + b.to(x.dtype)

    def ref(acts: Mapping[str, Tensor], mask: Tensor, attention_mask: Tensor | None, tokens: Any) -> Tensor:
        return probe.decision_function(pooling(_cat(acts, hooks), mask).detach())

    return fn, ref


def _multi(probe: Any, hooks: tuple[str, ...], pooling: Pooling) -> tuple[ScoreFn, Reference]:
    if len(hooks) != len(probe.layers):
        raise AttackError(f"the multi-layer probe reads layers {probe.layers}, got hooks {list(hooks)}")
    got = [hook_layer(h) for h in hooks]
    if got != list(probe.layers):
        raise AttackError(f"hooks {list(hooks)} are not the probe's layers {probe.layers}, in order")
    coef, b = _affine_parts(probe.base)

    def pooled(acts: Mapping[str, Tensor], mask: Tensor) -> Tensor:
        return torch.stack([pooling(_cat(acts, [h]), mask) for h in hooks], dim=1)  # [b L d]

    def fn(acts: Mapping[str, Tensor], mask: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        x = einops.rearrange(pooled(acts, mask), "b l d -> b (l d)")
        return x @ coef.to(x.dtype) + b.to(x.dtype)

    def ref(acts: Mapping[str, Tensor], mask: Tensor, attention_mask: Tensor | None, tokens: Any) -> Tensor:
        return probe.decision_function(pooled(acts, mask).detach())

    return fn, ref


def _token(probe: Any, hooks: tuple[str, ...]) -> tuple[ScoreFn, Reference]:
    from probes.token import Ragged

    def fn(acts: Mapping[str, Tensor], mask: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return probe._raw_logits(_cat(acts, hooks).float(), mask)

    def ref(acts: Mapping[str, Tensor], mask: Tensor, attention_mask: Tensor | None, tokens: Any) -> Tensor:
        values, off = _rows(_cat(acts, hooks).detach().float(), mask)
        return probe.decision_function(Ragged(values, off))

    return fn, ref


def _sae(probe: Any, hooks: tuple[str, ...]) -> tuple[ScoreFn, Reference]:
    if len(hooks) != 1:
        raise AttackError(f"an SAE-feature probe reads one hook, got {list(hooks)}")
    if probe.encoder_ is None or probe.head_ is None:
        raise AttackError("the SAE-feature probe has no encoder or head")
    coef, b = _affine_parts(probe.head_)

    def fn(acts: Mapping[str, Tensor], mask: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        x = _cat(acts, hooks).float()
        z = probe.encoder_(einops.rearrange(x, "b s d -> (b s) d"))
        z = einops.rearrange(z, "(b s) k -> b s k", b=x.shape[0])
        return probe.pooling(z, mask) @ coef + b

    def ref(acts: Mapping[str, Tensor], mask: Tensor, attention_mask: Tensor | None, tokens: Any) -> Tensor:
        values, off = _rows(_cat(acts, hooks).detach().float(), mask)
        return probe.score_tokens(values, off)

    return fn, ref


def _stack(clf: Any, hooks: tuple[str, ...], from_tokens: bool) -> tuple[ScoreFn, Reference]:
    from probes.finetune import Sequences

    stack = clf.module_

    def fn(acts: Mapping[str, Tensor], mask: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        h = _cat(acts, hooks).float()
        for blk in stack.blocks:
            h = blk(h, attention_mask=attention_mask)
        h = stack.ln_final(h)
        if stack.pooling == "max":
            return stack.head(h)[..., 0].masked_fill(~mask, float("-inf")).amax(dim=1)
        return stack.head(Pooling.parse(stack.pooling).padded(h, mask))[..., 0]

    def ref(acts: Mapping[str, Tensor], mask: Tensor, attention_mask: Tensor | None, tokens: Any) -> Tensor:
        real = (
            attention_mask.bool()
            if attention_mask is not None
            else torch.ones(mask.shape, dtype=torch.bool, device=mask.device)
        )
        if bool((~real & mask).any()):
            raise AttackError("a read token is masked out")
        lengths = real.sum(1)
        if not bool((real == (torch.arange(real.shape[1])[None, :] < lengths[:, None])).all()):
            raise AttackError("the classifier's own scoring needs right-padded rows without masked gaps")
        if from_tokens:
            if tokens is None:
                raise AttackError("the truncated-model classifier scores token ids: pass tokens")
            values = tokens[real]
        else:
            values = _cat(acts, hooks).detach().float()[real]
        off = np.concatenate([[0], np.cumsum(lengths.cpu().numpy())]).astype(np.int64)
        seqs = Sequences(values, off, mask[real])
        return torch.from_numpy(clf.decision_function(seqs)).float()

    return fn, ref


# ----------------------------------------------------------------------------------------------------------
# the public entry points
# ----------------------------------------------------------------------------------------------------------


def adapt(
    probe: Any,
    *,
    hooks: Sequence[str] | None = None,
    pooling: Pooling | str | Mapping[str, Any] | None = None,
    positions: str = "prompt",
    name: str | None = None,
    fingerprint: Mapping[str, str] | None = None,
    path: str | None = None,
    meta: Mapping[str, Any] | None = None,
) -> ProbeTarget | TextTarget:
    """A fitted probe or classifier as a :class:`ProbeTarget` (or a :class:`TextTarget` for text
    classifiers). ``hooks``: the hook(s) it reads (default: what the probe records); ``pooling``: the
    pooling of a pooled probe (default ``mean``); ``positions``: which tokens it reads (the store's
    ``positions``; ``auto`` reads an attacked prompt's prompt tokens); ``fingerprint``: the model it was
    trained on (checked by :func:`check_target`)."""
    from probes import DiffMeansProbe, LDAProbe, LogisticProbe, MultiLayerProbe
    from probes.finetune import FinetunedLayers, LayerStack, TruncatedModelClassifier
    from probes.text import TextClassifier
    from probes.token import TokenProbeBase
    from sae.probe import SAEFeatureProbe

    label = name or type(probe).__name__
    if isinstance(probe, TextClassifier):
        return TextTarget(label, probe, path)
    roles = _roles(positions)
    pool = Pooling.parse(dict(pooling) if isinstance(pooling, Mapping) else (pooling or "mean"))
    fp = dict(fingerprint) if fingerprint else None
    hk = tuple(hooks) if hooks is not None else None
    extra = 0
    if isinstance(probe, LogisticProbe | DiffMeansProbe | LDAProbe):
        if hk is None:
            raise AttackError(f"give the hook a {type(probe).__name__} reads")
        family, (fn, ref) = "linear", _linear(probe, hk, pool)
    elif isinstance(probe, MultiLayerProbe):
        if hk is None:
            raise AttackError("give the hooks a multi-layer probe reads (one per layer, in its order)")
        if not isinstance(probe.base, LogisticProbe | DiffMeansProbe | LDAProbe):
            raise AttackError(f"a multi-layer probe over a {type(probe.base).__name__} is not supported")
        family, (fn, ref) = "multi_layer", _multi(probe, hk, pool)
    elif isinstance(probe, TokenProbeBase):
        if not probe.is_fitted:
            raise AttackError(f"{type(probe).__name__} is not fitted")
        hk = hk or (tuple(probe.hooks) if probe.hooks else None)
        if hk is None:
            raise AttackError("the per-token probe records no hooks: pass hooks")
        family, (fn, ref) = "token", _token(probe, hk)
    elif isinstance(probe, SAEFeatureProbe):
        hk = hk or ((probe.hook,) if probe.hook else None)
        if hk is None:
            raise AttackError("the SAE-feature probe records no hook: pass hooks")
        family, (fn, ref) = "sae", _sae(probe, hk)
    elif isinstance(probe, LayerStack):
        if not probe.fitted_:
            raise AttackError(f"{type(probe).__name__} is not fitted")
        if isinstance(probe, FinetunedLayers):
            family, want = "finetune", probe.input_hook()
        elif isinstance(probe, TruncatedModelClassifier):
            family, want = "truncated", "blocks.0.hook_resid_pre"
        else:  # pragma: no cover - no other kind exists
            raise AttackError(f"unsupported classifier {type(probe).__name__}")
        if hk is not None and hk != (want,):
            raise AttackError(f"the {family} classifier reads {want}, not {list(hk)}")
        hk = (str(want),)
        extra = len(probe.module_.blocks)
        fn, ref = _stack(probe, hk, from_tokens=family == "truncated")
    else:
        raise AttackError(
            f"no differentiable adapter for {type(probe).__name__}: supported are logistic / diff-means / "
            "LDA / multi-layer probes, per-token probes (token_*), SAE-feature probes, fine-tuned layers and "
            "truncated-model classifiers (text classifiers are transfer targets only)"
        )
    return ProbeTarget(
        name=label,
        family=family,
        hooks=hk,
        fn=fn,
        reference=ref,
        roles=roles,
        fingerprint=fp,
        source=probe,
        path=path,
        extra_blocks=extra,
        meta=dict(meta or {}),
    )


def reference_scores(
    target: ProbeTarget,
    acts: Mapping[str, Float[Tensor, "b s d"]],
    mask: Bool[Tensor, "b s"],
    attention_mask: Int[Tensor, "b s"] | None = None,
    tokens: Int[Tensor, "b s"] | None = None,
) -> Float[Tensor, " b"]:
    """The probe's own ``decision_function`` on the same activations (no gradients): what the adapter must
    equal."""
    with torch.no_grad():
        return target.reference(acts, mask, attention_mask, tokens).float()


def check_target(model: HookedTransformer, target: ProbeTarget) -> None:
    """The probe must come from this model (fingerprint, where recorded) and read hooks it has, of its
    width."""
    from activations.collect import model_fingerprint

    if target.fingerprint:
        fp = model_fingerprint(model)
        for k in FINGERPRINT_KEYS:
            if k in target.fingerprint and target.fingerprint[k] != fp[k]:
                raise AttackError(
                    f"probe {target.name!r} was trained on model {target.fingerprint.get('model_id')!r} "
                    f"({k}={target.fingerprint[k]}), not on the loaded model {fp['model_id']!r} ({k}={fp[k]})"
                )
    for h in target.hooks:
        if h not in model.hook_dict:
            raise AttackError(f"probe {target.name!r} reads hook {h!r}, which the model does not have")
        if hook_layer(h) >= int(model.cfg.n_layers):
            raise AttackError(f"probe {target.name!r} reads layer {hook_layer(h)} of a smaller model")


def load_target(
    path: str | Path, model: HookedTransformer, *, positions: str | None = None, name: str | None = None
) -> ProbeTarget | TextTarget:
    """Load a saved probe folder as an attack / transfer target: a sweep's ``probe.json`` (hooks, pooling,
    positions and fingerprint from its metadata) or a ``classifier.json`` (fine-tuned layers, truncated
    model, text classifier). The fingerprint is checked against ``model``."""
    import json

    p = Path(path)
    label = name or p.name
    if (p / "probe.json").is_file():
        from probes.io import load_probe, read_probe_info

        info = read_probe_info(p)
        meta = dict(info.get("metadata") or {})
        probe = load_probe(p)
        hooks = meta.get("hook_names")
        fp = {k: str(meta[k]) for k in FINGERPRINT_KEYS if k in meta}
        target = adapt(
            probe,
            hooks=hooks,
            pooling=meta.get("pooling"),
            positions=positions or str(meta.get("positions") or "prompt"),
            name=label,
            fingerprint=fp or None,
            path=str(p),
            meta=meta,
        )
    elif (p / "classifier.json").is_file():
        doc = json.loads((p / "classifier.json").read_text())
        kind = doc.get("kind") if isinstance(doc, dict) else None
        if kind in ("finetune", "truncated"):
            from probes.io import load_sequence

            clf: Any = load_sequence(p, model)
            meta = dict(doc.get("metadata") or {})
            fp = {k: str(meta[k]) for k in FINGERPRINT_KEYS if k in meta}
            target = adapt(
                clf,
                positions=positions or str(meta.get("positions") or "prompt"),
                name=label,
                fingerprint=fp or None,
                path=str(p),
                meta=meta,
            )
        else:
            from probes.io import load_classifier

            target = adapt(load_classifier(p), name=label, path=str(p))
    elif (p / "ensemble.json").is_file():
        raise AttackError(f"{p}: ensembles are not adapted (attack or transfer to their members)")
    else:
        raise AttackError(f"{p}: no probe.json or classifier.json (not a saved probe)")
    if isinstance(target, ProbeTarget):
        check_target(model, target)
    return target


def zscore_ensemble(
    members: Sequence[ProbeTarget],
    means: Sequence[float],
    stds: Sequence[float],
    *,
    weights: Sequence[float] | None = None,
    name: str = "ensemble",
) -> ProbeTarget:
    """A z-scored average of activation probes as one attack target: ``Σ w_i·(s_i − μ_i)/σ_i`` with weights
    summing to 1 (equal by default), as :class:`probes.ZScoreEnsemble`; it reads the union of its members'
    hooks, and its gradient flows through every member. Members must read the same token roles."""
    ms = list(members)
    if len(ms) < 2:
        raise AttackError("an ensemble needs at least two members")
    if len({m.roles for m in ms}) > 1:
        raise AttackError("ensemble members must read the same token roles")
    if not (len(means) == len(stds) == len(ms)):
        raise AttackError("one mean and one std per member")
    w = np.ones(len(ms)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(ms),) or (w < 0).any() or w.sum() <= 0:
        raise AttackError("weights: one non-negative weight per member, with a positive sum")
    w = w / w.sum()
    hooks: list[str] = []
    for m in ms:
        hooks += [h for h in m.hooks if h not in hooks]

    def fn(acts: Mapping[str, Tensor], mask: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        out: Tensor | float = 0.0
        for m, mu, sd, wi in zip(ms, means, stds, w, strict=True):
            out = out + float(wi) * (m.fn(acts, mask, attention_mask) - mu) / sd
        assert isinstance(out, Tensor)
        return out

    def ref(acts: Mapping[str, Tensor], mask: Tensor, attention_mask: Tensor | None, tokens: Any) -> Tensor:
        out: Tensor | float = 0.0
        for m, mu, sd, wi in zip(ms, means, stds, w, strict=True):
            out = out + float(wi) * (m.reference(acts, mask, attention_mask, tokens).float() - mu) / sd
        assert isinstance(out, Tensor)
        return out

    fps = [m.fingerprint for m in ms if m.fingerprint]
    return ProbeTarget(
        name=name,
        family="ensemble",
        hooks=tuple(hooks),
        fn=fn,
        reference=ref,
        roles=ms[0].roles,
        fingerprint=fps[0] if fps else None,
        source=ms,
        extra_blocks=sum(m.extra_blocks for m in ms),
        meta={
            "members": [m.name for m in ms],
            "means": list(means),
            "stds": list(stds),
            "weights": w.tolist(),
        },
    )
