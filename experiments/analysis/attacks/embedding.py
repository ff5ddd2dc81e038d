"""The continuous embedding-space suffix attack.

``k`` free vectors take the place of the suffix tokens' embeddings (a hook on ``hook_embed``) and are
optimized with Adam on the attack loss (``probe score + λ · behaviour CE``, see :mod:`.objective`), every
example of a batch at once: the loss is the *sum* over examples and each example's vectors see only its own
loss, so a batch gives the same suffixes as one example at a time (up to floating-point summation order).
They start at the embeddings of the initial suffix tokens; with ``max_norm`` each vector is projected back
onto the ball of that radius after every step (``"auto"``: the largest norm of an allowed token's
embedding, so the vectors stay in the range the model sees). The kept suffix of each example is the iterate
with the lowest loss over the run (or, with ``stop_below``, the first that evades with the behaviour kept).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from activations.data import Example
from experiments.analysis.attacks.adapters import ProbeTarget, TextTarget
from experiments.analysis.attacks.common import AttackConfig, ChunkOutcome, Context, run_attack
from experiments.analysis.attacks.objective import AttackError, PreparedExample
from experiments.analysis.attacks.result import AttackRun

__all__ = ["EmbeddingConfig", "embedding_attack"]


@dataclass(frozen=True)
class EmbeddingConfig(AttackConfig):
    """``lr``: Adam's step size (``None``: a tenth of the mean absolute embedding coordinate);
    ``max_norm``: the per-vector L2 bound (a number, ``"auto"`` or ``None`` for none)."""

    lr: float | None = None
    max_norm: float | Literal["auto"] | None = "auto"

    def check(self) -> None:
        super().check()
        if self.lr is not None and not self.lr > 0:
            raise AttackError(f"lr must be > 0, got {self.lr}")
        if self.max_norm is not None and self.max_norm != "auto" and not float(self.max_norm) > 0:
            raise AttackError(f"max_norm must be > 0, 'auto' or None, got {self.max_norm!r}")


def _project(x: Tensor, bound: float | None) -> None:
    if bound is None:
        return
    with torch.no_grad():
        norms = x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        x.mul_((bound / norms).clamp(max=1.0))


def _chunk(chunk: list[PreparedExample], ctx: Context) -> ChunkOutcome:
    cfg = ctx.config
    assert isinstance(cfg, EmbeddingConfig)
    model = ctx.model
    b, k = len(chunk), cfg.suffix_len
    init = ctx.init_ids(chunk)
    prefix = ctx.prefix(chunk)
    batch = ctx.batch(chunk, init)
    W = model.W_E.detach().float()
    lr = cfg.lr if cfg.lr is not None else 0.1 * float(W.abs().mean())
    bound = (
        float(W[ctx.allowed].norm(dim=-1).max())
        if cfg.max_norm == "auto"
        else None
        if cfg.max_norm is None
        else float(cfg.max_norm)
    )
    x = W[init].clone().requires_grad_(True)
    _project(x, bound)
    opt = torch.optim.Adam([x], lr=lr)
    fwd = torch.tensor([ctx.forward_flops(p, k) for p in chunk], dtype=torch.float64)
    active = torch.ones(b, dtype=torch.bool)
    best_loss = torch.full((b,), float("inf"))
    best_x = x.detach().clone()
    best_step = torch.zeros(b, dtype=torch.long)
    steps = torch.zeros(b, dtype=torch.long)
    flops = torch.tensor([ctx.prefix_flops(p) for p in chunk], dtype=torch.float64)
    loss_hist: list[list[float]] = [[] for _ in range(b)]
    score_hist: list[list[float]] = [[] for _ in range(b)]
    need_kept = ctx.objective.lam > 0
    for step in range(cfg.steps + 1):
        ev = ctx.eval(batch, suffix_embeds=x, prefix=prefix)
        loss, score = ev.loss.detach(), ev.score.detach()
        flops += torch.where(active, fwd, 0.0)
        for i in torch.nonzero(active)[:, 0].tolist():
            loss_hist[i].append(float(loss[i]))
            score_hist[i].append(float(score[i]))
        better = active & (loss < best_loss)
        if cfg.stop_below is not None:
            done = active & (score <= cfg.stop_below) & (ev.kept if need_kept else True)
            better |= done  # the first iterate that succeeds is the one kept
            active &= ~done
        else:
            done = torch.zeros_like(active)
        best_loss = torch.where(better, loss, best_loss)
        best_x = torch.where(better[:, None, None], x.detach(), best_x)
        best_step = torch.where(better, step, best_step)
        if step == cfg.steps:
            break
        if cfg.max_flops is not None:  # this step's backward and the next forward must fit
            active &= flops + 3.0 * fwd <= cfg.max_flops
        if not bool(active.any()):
            break
        (grad,) = torch.autograd.grad((ev.loss * active).sum(), [x])
        before = x.detach().clone()
        x.grad = grad
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            x.copy_(torch.where(active[:, None, None], x, before))
        _project(x, bound)
        flops += torch.where(active, 2.0 * fwd, 0.0)
        steps += active.long()
    return ChunkOutcome(
        suffix_ids=None,
        suffix_embeds=best_x,
        steps=steps.tolist(),
        flops=flops.tolist(),
        best_step=best_step.tolist(),
        loss_history=loss_hist,
        score_history=score_hist,
        extra={"lr": lr, "max_norm": bound},
    )


def embedding_attack(
    model: HookedTransformer,
    target: ProbeTarget | TextTarget,
    examples: Sequence[Example],
    config: EmbeddingConfig | None = None,
    *,
    progress: bool = False,
) -> AttackRun:
    """Attack every harmful example of ``examples`` with a continuous suffix against ``target`` (see the
    module docstring); returns the run with per-example scores, behaviour, steps, seconds and FLOPs."""
    return run_attack(
        "embedding", model, target, examples, config or EmbeddingConfig(), _chunk, progress=progress
    )
