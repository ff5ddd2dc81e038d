"""What both attacks share: their settings, input checks, target completions, suffix initialization,
replaying suffixes through probes, and assembling the per-example results."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from activations.data import Example
from experiments.analysis.attacks.adapters import ProbeTarget, TextTarget, check_target
from experiments.analysis.attacks.budget import FlopCounter
from experiments.analysis.attacks.objective import (
    AttackError,
    Evaluation,
    Objective,
    Placement,
    PrefixCache,
    PreparedExample,
    Scorer,
    allowed_token_ids,
    attach_targets,
    behaviour_metrics,
    build_batch,
    build_prefix_cache,
    check_layers,
    evaluate,
    example_generator,
    prepare,
    replays_as_text,
    run_model,
    suffix_text,
)
from experiments.analysis.attacks.result import AttackRun, ExampleResult

__all__ = [
    "AttackConfig",
    "ChunkOutcome",
    "Replay",
    "affirmative_targets",
    "greedy_targets",
    "harmful_examples",
    "init_suffix",
    "prepare_attack",
    "replay",
    "run_attack",
]

TargetKind = Literal["greedy", "affirmative"]


@dataclass(frozen=True)
class AttackConfig:
    """Settings shared by both attacks.

    Budget: ``steps`` optimization steps per example (>= 1), and optionally ``max_flops`` per example (an
    example stops before a step that would exceed it). ``stop_below``: an example whose score is at or
    below this (e.g. the probe's threshold) with its behaviour kept stops early (its suffix is frozen).
    ``prefix_cache``: run the part of every row before the suffix once and cache it (equal results, fewer
    FLOPs).
    Objective: ``lam``, ``probe_loss``, ``margin``, ``match_tokens``, ``ce_margin`` (:class:`Objective`).
    Behaviour target: ``target="greedy"`` (the model's own greedy completion of the clean prompt,
    ``target_tokens`` long, cut after an end-of-sequence token) or ``"affirmative"`` (``affirmative``, e.g.
    "Sure, here is"), or explicit ``targets`` (one string per example). ``init``: the initial suffix, a
    string whose tokens are tiled to ``suffix_len``, or ``"random"`` (seeded per example)."""

    steps: int = 100
    max_flops: float | None = None
    suffix_len: int = 20
    placement: Placement = "suffix"
    lam: float = 1.0
    probe_loss: Literal["score", "softplus"] = "score"
    margin: float = 0.0
    match_tokens: int = 8
    ce_margin: float = 0.5
    target: TargetKind = "greedy"
    targets: tuple[str, ...] | None = None
    target_tokens: int = 32
    affirmative: str = "Sure, here is"
    init: str = "!"
    seed: int = 0
    batch_size: int = 16
    stop_below: float | None = None
    max_len: int | None = None
    prefix_cache: bool = True

    def objective(self) -> Objective:
        return Objective(
            lam=self.lam,
            probe_loss=self.probe_loss,
            margin=self.margin,
            match_tokens=self.match_tokens,
            ce_margin=self.ce_margin,
        )

    def check(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise AttackError(
                f"steps must be an integer >= 1, got {self.steps!r}: to score prompts without attacking them "
                "use experiments.analysis.attacks.transfer.score_prompts"
            )
        if self.max_flops is not None and not self.max_flops > 0:
            raise AttackError(f"max_flops must be > 0, got {self.max_flops}")
        if self.suffix_len < 1:
            raise AttackError(f"suffix_len must be >= 1, got {self.suffix_len}")
        if self.batch_size < 1:
            raise AttackError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.target not in ("greedy", "affirmative"):
            raise AttackError(f"target must be 'greedy' or 'affirmative', got {self.target!r}")
        if self.target_tokens < 1:
            raise AttackError(f"target_tokens must be >= 1, got {self.target_tokens}")
        self.objective()

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"] = list(self.targets) if self.targets is not None else None
        return d


# ----------------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------------


def greedy_targets(
    model: HookedTransformer, prepared: Sequence[PreparedExample], n_tokens: int, *, batch_size: int = 32
) -> list[np.ndarray]:
    """The model's own greedy completion of each clean prompt (``n_tokens`` tokens, up to and including the
    first end-of-sequence token), generated in batches with the KV cache
    (:func:`probes.stream.generate_tokens`)."""
    from probes.stream import generate_tokens

    out: list[np.ndarray] = []
    for lo in range(0, len(prepared), batch_size):
        chunk = prepared[lo : lo + batch_size]
        with torch.no_grad():
            gens = generate_tokens(model, [p.clean_ids.tolist() for p in chunk], max_new_tokens=n_tokens)
        for p, g in zip(chunk, gens, strict=True):
            if not g.ids:  # pragma: no cover - generation always returns a token
                raise AttackError(f"example {p.example.id!r}: the model generated nothing")
            out.append(np.asarray(g.ids, dtype=np.int64))
    return out


def affirmative_targets(tokenizer: Any, texts: Sequence[str]) -> list[np.ndarray]:
    out = []
    for t in texts:
        ids = np.asarray(tokenizer(t, add_special_tokens=False)["input_ids"], dtype=np.int64)
        if len(ids) == 0:
            raise AttackError(f"target text {t!r} has no tokens")
        out.append(ids)
    return out


def init_suffix(
    tokenizer: Any, init: str, k: int, allowed: Int[Tensor, " v"], gen: torch.Generator
) -> Int[Tensor, " k"]:
    """``k`` initial suffix tokens: ``init``'s tokens tiled, or (``"random"``) drawn from ``allowed``."""
    if init == "random":
        return allowed[torch.randint(len(allowed), (k,), generator=gen)]
    ids = tokenizer(" " + init, add_special_tokens=False)["input_ids"]
    if not ids:
        raise AttackError(f"init {init!r} has no tokens")
    bad = [i for i in ids if not bool((allowed == i).any())]
    if bad:
        raise AttackError(f"init {init!r} uses tokens outside the allowed set: {bad}")
    return torch.tensor([ids[j % len(ids)] for j in range(k)], dtype=torch.long)


def harmful_examples(examples: Sequence[Example]) -> list[Example]:
    """The harmful examples (label >= 0.5) an attack works on; an ``AttackError`` when there are none: empty
    data, or labels that are all harmless."""
    exs = list(examples)
    if not exs:
        raise AttackError("no examples to attack (the data is empty)")
    harmful = [e for e in exs if e.label >= 0.5]
    if not harmful:
        raise AttackError(
            f"the {len(exs)} examples' labels are all harmless (label 0): the attack makes harmful prompts "
            "look harmless; give harmful prompts (label 1)"
        )
    return harmful


def prepare_attack(
    model: HookedTransformer,
    target: ProbeTarget | TextTarget,
    examples: Sequence[Example],
    config: AttackConfig,
) -> list[PreparedExample]:
    """Check everything up front (clear errors and warnings) and prepare the examples with their targets."""
    config.check()
    if isinstance(target, TextTarget):
        raise AttackError(
            f"{target.name!r} is a text classifier: it reads no activations, so it cannot be attacked "
            "through the model (score attacked text with it: transfer.transfer)"
        )
    if not isinstance(target, ProbeTarget):
        raise AttackError(
            f"the target must be a ProbeTarget (adapters.adapt / load_target), got {type(target)}"
        )
    exs = list(examples)
    harmful = harmful_examples(exs)
    if len(harmful) < len(exs):
        warnings.warn(
            f"{len(exs) - len(harmful)} harmless example(s) skipped: only harmful prompts are attacked",
            stacklevel=3,
        )
    ids = [e.id for e in harmful]
    if len(set(ids)) < len(ids):
        raise AttackError("example ids must be unique (seeds and results are keyed by id)")
    if config.targets is not None and len(config.targets) != len(harmful):
        raise AttackError(f"{len(config.targets)} target strings for {len(harmful)} harmful examples")
    check_target(model, target)
    check_layers(model, target, config.objective())
    prepared = prepare(model, harmful, placement=config.placement, max_len=config.max_len)
    if config.targets is not None:
        tids = affirmative_targets(model.tokenizer, config.targets)
    elif config.target == "affirmative":
        tids = affirmative_targets(model.tokenizer, [config.affirmative] * len(prepared))
    else:
        tids = greedy_targets(model, prepared, config.target_tokens)
    prepared = attach_targets(prepared, tids)
    n_ctx = int(model.cfg.n_ctx)
    for p in prepared:
        if p.n_prompt + config.suffix_len + len(p.target_ids) > n_ctx:
            raise AttackError(f"example {p.example.id!r}: prompt + suffix + target exceed n_ctx={n_ctx}")
    return prepared


# ----------------------------------------------------------------------------------------------------------
# replaying suffixes
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Replay:
    """Scores of every scorer, and the behaviour, of prompts with a given suffix (``n`` rows)."""

    scores: dict[str, np.ndarray]
    ce: np.ndarray
    kept: np.ndarray


def replay(
    model: HookedTransformer,
    scorers: Sequence[tuple[str, Scorer]],
    prepared: Sequence[PreparedExample],
    *,
    suffix_ids: Int[Tensor, "n k"] | None = None,
    suffix_embeds: Float[Tensor, "n k d"] | None = None,
    suffix_active: Bool[Tensor, "n k"] | None = None,
    objective: Objective | None = None,
    batch_size: int = 16,
    behaviour: bool = True,
) -> Replay:
    """Every scorer's score of the prompts with their suffixes (ids, or embeddings in the suffix slots), in
    chunks of ``batch_size`` rows in order (the attacks evaluate their final suffixes with this same
    function), and the behaviour (CE, kept) when ``behaviour``."""
    n = len(prepared)
    if n == 0:
        raise AttackError("no examples to score")
    obj = objective or Objective()
    pad = int(getattr(model.tokenizer, "pad_token_id", None) or 0)
    k = (
        int(suffix_embeds.shape[1])
        if suffix_embeds is not None
        else int(suffix_ids.shape[1])
        if suffix_ids is not None
        else 0
    )
    ids_all = suffix_ids if suffix_ids is not None else torch.zeros((n, k), dtype=torch.long)
    hooks = tuple(dict.fromkeys(h for _, s in scorers for h in s.hooks))
    scores: dict[str, list[np.ndarray]] = {name: [] for name, _ in scorers}
    ces, kepts = [], []
    with torch.no_grad():
        for lo in range(0, n, batch_size):
            hi = min(n, lo + batch_size)
            act = suffix_active[lo:hi] if suffix_active is not None else None
            batch = build_batch(prepared[lo:hi], ids_all[lo:hi], suffix_active=act, pad_id=pad)
            emb = suffix_embeds[lo:hi] if suffix_embeds is not None else None
            out = run_model(model, batch, hooks, suffix_embeds=emb, logits=behaviour)
            for name, s in scorers:
                mask = batch.read_mask(s.roles)
                scores[name].append(s.score(out.acts, mask, batch.attention_mask).float().numpy())
            if out.target_logits is not None:
                ce, kept = behaviour_metrics(out.target_logits, batch, obj.match_tokens)
                ces.append(ce.numpy())
                kepts.append(kept.numpy())
            else:
                ces.append(np.full(hi - lo, np.nan))
                kepts.append(np.zeros(hi - lo, dtype=bool))
    return Replay(
        {k_: np.concatenate(v).astype(np.float64) for k_, v in scores.items()},
        np.concatenate(ces).astype(np.float64),
        np.concatenate(kepts),
    )


# ----------------------------------------------------------------------------------------------------------
# the driver
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ChunkOutcome:
    """What an attack found for one chunk of examples."""

    suffix_ids: Int[Tensor, "b k"] | None
    suffix_embeds: Float[Tensor, "b k d"] | None
    steps: list[int]
    flops: list[float]
    best_step: list[int]
    loss_history: list[list[float]]
    score_history: list[list[float]]
    extra: dict[str, Any] = field(default_factory=dict)


ChunkFn = Callable[[list[PreparedExample], "Context"], ChunkOutcome]


@dataclass
class Context:
    """Shared state of one attack run."""

    model: HookedTransformer
    target: ProbeTarget
    config: AttackConfig
    objective: Objective
    flops: FlopCounter
    allowed: Int[Tensor, " v"]
    pad_id: int

    def init_ids(self, chunk: Sequence[PreparedExample]) -> Int[Tensor, "b k"]:
        return torch.stack(
            [
                init_suffix(
                    self.model.tokenizer,
                    self.config.init,
                    self.config.suffix_len,
                    self.allowed,
                    example_generator(self.config.seed, p.example.id),
                )
                for p in chunk
            ]
        )

    def step_layer(self) -> int:
        """The deepest block an optimization step runs."""
        return int(self.model.cfg.n_layers) - 1 if self.objective.lam > 0 else self.target.layer

    @property
    def cached(self) -> bool:
        """Whether the steps continue a cached prefix (not for a probe on the embeddings alone)."""
        return self.config.prefix_cache and self.step_layer() >= 0

    def prefix(self, chunk: Sequence[PreparedExample]) -> PrefixCache | None:
        if not self.cached:
            return None
        return build_prefix_cache(self.model, chunk, self.target.hooks, self.step_layer() + 1, self.pad_id)

    def prefix_flops(self, p: PreparedExample) -> float:
        """The prefix pass, once per example (0 without the cache)."""
        return self.flops.forward(len(p.prefix_ids), self.step_layer()) if self.cached else 0.0

    def forward_flops(self, p: PreparedExample, k: int) -> float:
        """One step's forward pass of one example (the cached prefix excluded)."""
        beh = self.objective.lam > 0
        n = p.n_prompt + k + len(p.target_ids)
        cached = len(p.prefix_ids) if self.cached else 0
        n_logits = len(p.target_ids) if beh else 0
        return self.flops.forward(n, self.step_layer(), n_logits, self.target.extra_blocks, cached=cached)

    def batch(self, chunk: Sequence[PreparedExample], ids: Tensor) -> Any:
        return build_batch(chunk, ids, pad_id=self.pad_id, skip_prefix=self.cached)

    def eval(
        self, batch: Any, suffix_embeds: Tensor | None = None, prefix: PrefixCache | None = None
    ) -> Evaluation:
        return evaluate(
            self.model, self.target, batch, self.objective, suffix_embeds=suffix_embeds, prefix=prefix
        )


def run_attack(
    method: str,
    model: HookedTransformer,
    target: ProbeTarget | TextTarget,
    examples: Sequence[Example],
    config: AttackConfig,
    chunk_fn: ChunkFn,
    *,
    progress: bool = False,
) -> AttackRun:
    """Prepare, attack chunk by chunk (``config.batch_size`` examples at a time), evaluate the clean and the
    attacked prompts with :func:`replay` and assemble the run."""
    from activations.collect import model_fingerprint

    t_all = time.perf_counter()
    prepared = prepare_attack(model, target, examples, config)
    assert isinstance(target, ProbeTarget)
    tok: Any = model.tokenizer
    ctx = Context(
        model,
        target,
        config,
        config.objective(),
        FlopCounter.for_model(model),
        allowed_token_ids(tok),
        int(getattr(tok, "pad_token_id", None) or 0),
    )
    # optimize in chunks of similar lengths (less padding); everything is reported in the input order
    n = len(prepared)
    order = sorted(range(n), key=lambda i: (prepared[i].n_prompt + len(prepared[i].target_ids), i))
    bs = config.batch_size
    per: list[dict[str, Any]] = [{} for _ in range(n)]
    ids = None
    embs = None
    for lo in range(0, n, bs):
        rows = order[lo : lo + bs]
        t0, c0 = time.perf_counter(), time.process_time()
        out = chunk_fn([prepared[i] for i in rows], ctx)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        if out.suffix_ids is not None:
            ids = ids if ids is not None else torch.zeros((n, out.suffix_ids.shape[1]), dtype=torch.long)
            ids[rows] = out.suffix_ids
        if out.suffix_embeds is not None:
            embs = embs if embs is not None else torch.zeros((n, *out.suffix_embeds.shape[1:]))
            embs[rows] = out.suffix_embeds.float()
        for r, i in enumerate(rows):
            per[i] = {
                "steps": int(out.steps[r]),
                "seconds": seconds / len(rows),
                "cpu_seconds": cpu / len(rows),
                "flops": float(out.flops[r]),
                "best_step": int(out.best_step[r]),
                "loss_history": [float(x) for x in out.loss_history[r]],
                "score_history": [float(x) for x in out.score_history[r]],
            }
        if progress:
            print(f"[{method}] {lo + len(rows)}/{n} examples, {seconds:.1f} s", flush=True)
    scorer = [(target.name, target)]
    obj = ctx.objective
    clean = replay(model, scorer, prepared, objective=obj, batch_size=bs)
    att = replay(model, scorer, prepared, suffix_ids=ids, suffix_embeds=embs, objective=obj, batch_size=bs)
    replayable = replays_as_text(tok, prepared, ids.tolist()) if ids is not None else None
    results = []
    for j, p in enumerate(prepared):
        sid = ids[j].tolist() if ids is not None else None
        stext = suffix_text(tok, sid, p.placement) if sid is not None else None
        results.append(
            ExampleResult(
                example_id=p.example.id,
                label=float(p.example.label),
                split=p.example.split,
                group=p.example.group_key,
                clean_score=float(clean.scores[target.name][j]),
                score=float(att.scores[target.name][j]),
                clean_ce=float(clean.ce[j]),
                ce=float(att.ce[j]),
                clean_kept=bool(clean.kept[j]),
                kept=bool(att.kept[j]),
                ce_kept=bool(att.ce[j] <= clean.ce[j] + obj.ce_margin),
                target_ids=[int(x) for x in p.target_ids],
                target_text=str(
                    tok.decode([int(x) for x in p.target_ids], clean_up_tokenization_spaces=False)
                ),
                suffix_ids=sid,
                suffix_text=stext,
                attacked_text=p.attacked_example(stext).prompt if stext is not None else None,
                replays_as_text=replayable[j] if replayable is not None else None,
                suffix_norm=float(embs[j].norm(dim=-1).mean()) if embs is not None else None,
                **per[j],
            )
        )
    return AttackRun(
        method=method,
        probe=target.name,
        probe_path=target.path,
        probe_family=target.family,
        hooks=list(target.hooks),
        config=config.to_json(),
        fingerprint=model_fingerprint(model),
        examples=[p.example for p in prepared],
        results=results,
        seconds=time.perf_counter() - t_all,
        suffix_embeddings=embs,
    )
