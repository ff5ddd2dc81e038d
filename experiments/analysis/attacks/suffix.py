"""The discrete token-suffix attack, in the style of GCG (Zou et al., 2023), against a probe.

Each step, for every example of the batch at once:

1. the suffix is written as one-hot indicators over the allowed tokens (no special tokens, printable ASCII,
   :func:`~.objective.allowed_token_ids`); its embeddings are ``one_hot @ W_E[allowed]``, put into the
   suffix slots through ``hook_embed``; one forward + backward pass gives the gradient of the attack loss
   w.r.t. the indicators (a linear estimate of the loss change of every single-token swap);
2. per position, the ``top_k`` tokens with the most negative gradient are the candidate substitutions;
   ``n_candidates`` suffixes, each differing from the current one in one random position by one random
   token of that position's top-k, are drawn from the example's own generator (seeded by the attack seed
   and the example id, so an example's candidates never depend on the rest of its batch);
3. with ``text_filter``, candidates whose text does not render back to the same token ids are dropped
   (the attack stays a text a user can send);
4. every candidate of every example is evaluated in one batched forward pass (in chunks of ``eval_rows``
   rows) and each example moves to its best candidate (GCG moves even when that is worse than the current
   suffix); the suffix with the lowest loss seen is kept.

Batched and one-example-at-a-time runs make the same choices for the same seed; they can differ only where
two candidates' losses tie to within floating-point summation noise (the batch changes the order of sums).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from activations.data import Example
from experiments.analysis.attacks.adapters import ProbeTarget, TextTarget
from experiments.analysis.attacks.common import AttackConfig, ChunkOutcome, Context, run_attack
from experiments.analysis.attacks.objective import (
    AttackError,
    Evaluation,
    PrefixCache,
    PreparedExample,
    example_generator,
    replays_as_text,
)
from experiments.analysis.attacks.result import AttackRun

__all__ = ["GCGConfig", "candidate_suffixes", "gcg_attack", "one_hot_gradient"]


@dataclass(frozen=True)
class GCGConfig(AttackConfig):
    """``top_k`` substitutions per position, ``n_candidates`` single-token swaps evaluated per example and
    step, ``text_filter`` (drop candidates that do not survive a text round trip), ``eval_rows`` (rows per
    candidate forward pass)."""

    top_k: int = 64
    n_candidates: int = 64
    text_filter: bool = True
    eval_rows: int = 128

    def check(self) -> None:
        super().check()
        if self.top_k < 1 or self.n_candidates < 1 or self.eval_rows < 1:
            raise AttackError("top_k, n_candidates and eval_rows must be >= 1")


def one_hot_gradient(
    ctx: Context,
    batch: object,
    one_hot_idx: Int[Tensor, "b k"],
    active: torch.Tensor,
    prefix: PrefixCache | None = None,
) -> tuple[Evaluation, Float[Tensor, "b k v"]]:
    """The evaluation of the current suffixes and the gradient of the (active rows') summed loss w.r.t. the
    one-hot indicators of the suffix tokens over the allowed set."""
    W = ctx.model.W_E.detach()[ctx.allowed].float()  # [v d]
    one_hot = F.one_hot(one_hot_idx, num_classes=len(ctx.allowed)).float().requires_grad_(True)
    emb = one_hot @ W
    ev = ctx.eval(batch, suffix_embeds=emb, prefix=prefix)
    (grad,) = torch.autograd.grad((ev.loss * active).sum(), [one_hot])
    return ev.detach(), grad


def candidate_suffixes(
    current: Int[Tensor, " k"],
    grad: Float[Tensor, "k v"],
    allowed: Int[Tensor, " v"],
    top_k: int,
    n: int,
    gen: torch.Generator,
) -> Int[Tensor, "n k"]:
    """``n`` single-token swaps of ``current``: a random position, a random token of its ``top_k`` most
    loss-decreasing substitutions (by the linear estimate ``grad``)."""
    k = current.shape[0]
    top = (-grad).topk(min(top_k, grad.shape[1]), dim=-1).indices  # [k top]
    pos = torch.randint(k, (n,), generator=gen)
    pick = torch.randint(top.shape[1], (n,), generator=gen)
    cand = current[None, :].repeat(n, 1)
    cand[torch.arange(n), pos] = allowed[top[pos, pick]]
    return cand


def _chunk(chunk: list[PreparedExample], ctx: Context) -> ChunkOutcome:
    cfg = ctx.config
    assert isinstance(cfg, GCGConfig)
    tok = ctx.model.tokenizer
    b, k = len(chunk), cfg.suffix_len
    index_of = torch.full((int(ctx.allowed.max()) + 1,), -1, dtype=torch.long)
    index_of[ctx.allowed] = torch.arange(len(ctx.allowed))
    ids = ctx.init_ids(chunk)
    gens = [example_generator(cfg.seed, p.example.id) for p in chunk]
    for g in gens:  # init_ids used a fresh generator of the same seed: move past its draws
        if cfg.init == "random":
            torch.randint(len(ctx.allowed), (k,), generator=g)
    fwd = torch.tensor([ctx.forward_flops(p, k) for p in chunk], dtype=torch.float64)
    grad_flops = 2.0 * fwd + ctx.flops.one_hot_projection(k, len(ctx.allowed))
    active = torch.ones(b, dtype=torch.bool)
    best_loss = torch.full((b,), float("inf"))
    best_ids = ids.clone()
    best_step = torch.zeros(b, dtype=torch.long)
    steps = torch.zeros(b, dtype=torch.long)
    flops = torch.tensor([ctx.prefix_flops(p) for p in chunk], dtype=torch.float64)
    prefix = ctx.prefix(chunk)
    loss_hist: list[list[float]] = [[] for _ in range(b)]
    score_hist: list[list[float]] = [[] for _ in range(b)]
    need_kept = ctx.objective.lam > 0
    n_filtered = 0
    for step in range(cfg.steps + 1):
        batch = ctx.batch(chunk, ids)
        last = step == cfg.steps
        if last:
            with torch.no_grad():
                ev = ctx.eval(batch, prefix=prefix).detach()
            grad = None
        else:
            ev, grad = one_hot_gradient(ctx, batch, index_of[ids], active, prefix)
        flops += torch.where(active, fwd, 0.0)
        for i in torch.nonzero(active)[:, 0].tolist():
            loss_hist[i].append(float(ev.loss[i]))
            score_hist[i].append(float(ev.score[i]))
        better = active & (ev.loss < best_loss)
        if cfg.stop_below is not None:
            done = active & (ev.score <= cfg.stop_below) & (ev.kept if need_kept else True)
            better |= done
            active &= ~done
        best_loss = torch.where(better, ev.loss, best_loss)
        best_ids = torch.where(better[:, None], ids, best_ids)
        best_step = torch.where(better, step, best_step)
        if last:
            break
        if cfg.max_flops is not None:  # the gradient, the candidates and the next forward must fit
            active &= flops + grad_flops + (cfg.n_candidates + 1) * fwd <= cfg.max_flops
        if not bool(active.any()):
            break
        assert grad is not None
        rows = torch.nonzero(active)[:, 0].tolist()
        cands = torch.cat(
            [
                candidate_suffixes(ids[i], grad[i], ctx.allowed, cfg.top_k, cfg.n_candidates, gens[i])
                for i in rows
            ]
        )
        owners = torch.tensor([i for i in rows for _ in range(cfg.n_candidates)], dtype=torch.long)
        prepared = [chunk[i] for i in owners.tolist()]
        if cfg.text_filter:
            ok = torch.tensor(replays_as_text(tok, prepared, cands.tolist()))
            n_filtered += int((~ok).sum())
        else:
            ok = torch.ones(len(owners), dtype=torch.bool)
        cand_loss = torch.full((len(owners),), float("inf"))
        keep = torch.nonzero(ok)[:, 0]
        with torch.no_grad():
            for lo in range(0, len(keep), cfg.eval_rows):
                sel = keep[lo : lo + cfg.eval_rows]
                cb = ctx.batch([prepared[j] for j in sel.tolist()], cands[sel])
                cp = prefix.select(owners[sel]) if prefix is not None else None
                cand_loss[sel] = ctx.eval(cb, prefix=cp).loss.detach()
        cand_loss = cand_loss.view(len(rows), cfg.n_candidates)
        for r, i in enumerate(rows):
            j = int(torch.argmin(cand_loss[r]))
            if torch.isfinite(cand_loss[r, j]):
                ids[i] = cands[r * cfg.n_candidates + j]
        n_eval = torch.zeros(b, dtype=torch.float64)
        n_eval[rows] = ok.view(len(rows), cfg.n_candidates).sum(1).double()
        flops += torch.where(active, grad_flops + n_eval * fwd, 0.0)
        steps += active.long()
    return ChunkOutcome(
        suffix_ids=best_ids,
        suffix_embeds=None,
        steps=steps.tolist(),
        flops=flops.tolist(),
        best_step=best_step.tolist(),
        loss_history=loss_hist,
        score_history=score_hist,
        extra={"filtered_candidates": n_filtered},
    )


def gcg_attack(
    model: HookedTransformer,
    target: ProbeTarget | TextTarget,
    examples: Sequence[Example],
    config: GCGConfig | None = None,
    *,
    progress: bool = False,
) -> AttackRun:
    """Attack every harmful example of ``examples`` with a GCG token suffix against ``target`` (see the
    module docstring); returns the run with per-example suffix ids + text, scores, behaviour, steps,
    seconds and FLOPs."""
    return run_attack("gcg", model, target, examples, config or GCGConfig(), _chunk, progress=progress)
