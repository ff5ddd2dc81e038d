"""Partially fine-tuned final layers, and the truncated-model classifier baseline.

*Cost-effective constitutional classifiers via representation re-use* fine-tunes only the policy model's last
few layers as a classifier: the frozen part of the forward pass is shared with generation, so the classifier
costs just the copied layers. Here:

* :class:`FinetunedLayers` copies the model's last ``k`` blocks and its final norm (weights included), adds a
  linear head, and trains them on the residual stream cached at ``blocks.{L-k-1}.hook_resid_post`` (read
  from an :class:`~activations.store.ActivationStore` that keeps every token, ``keep: all``), so the frozen
  ``L-k`` layers are never recomputed. All copied weights are trained (``mode="full"``), or low-rank updates
  of every attention and MLP matrix (``mode="lora"``, rank ``r``, scale ``alpha/r``; the copies stay
  frozen), or only the head (``mode="head"``). Costed as ``k`` blocks + final norm + head per token.
* :class:`TruncatedModelClassifier` is a *standalone* classifier built from the same model: the (frozen)
  embeddings and the first ``m`` blocks, the final norm and a head, fine-tuned from the tokens; it runs its
  own forward pass, so it is costed as a full pass of an ``m``-layer model.

Both read the head out of the per-token outputs of the scored tokens by ``mean`` or ``last`` pooling (pool,
then head) or by the ``max`` of per-token logits. Training: the head is first fitted as an L2 logistic
probe on the frozen copy's pooled outputs (linear-probe-then-fine-tune), then AdamW on a class-balanced
binary cross-entropy with gradient clipping, in length-sorted batches of at most ``token_budget`` padded
tokens; after each epoch the validation AUROC is measured and the best state (the linear-probe start
included) is kept. Sequences are right-padded, so causal attention never sees padding and rotary positions
are the original ones.

Saved as ``classifier.safetensors`` (the trained tensors only: LoRA factors, or the copied blocks for full
fine-tuning, and the head) + ``classifier.json``; loading rebuilds the copy from the same model (its
fingerprint is checked by the caller through the metadata).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import einops
import numpy as np
import torch
import torch.nn.utils.parametrize as parametrize
from jaxtyping import Bool, Float
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from activations.collect import plan_batches
from activations.pooling import Pooling
from probes.base import RESIDUAL, TOKEN_IDS, SweepKind, check_y, register_scorer, scorer_class
from probes.cost import CostModel, ProbeCost
from probes.io import load_sequence
from probes.logistic import LogisticProbe
from probes.scorer import Scorer
from probes.selection import DEFAULT_SELECT, selection_key, val_metrics

__all__ = [
    "FinetuneError",
    "FinetunedLayers",
    "HeadPooling",
    "LayerStack",
    "LowRankDelta",
    "Sequences",
    "TruncatedModelClassifier",
    "add_lora",
    "finetune_input_hook",
    "load_sequence_classifier",
    "sequences_from_store",
    "token_sequences_from_store",
]

HeadPooling = Literal["mean", "last", "max"]
Mode = Literal["full", "lora", "head"]


class FinetuneError(ValueError):
    """Bad input to a fine-tuned classifier (store layout, k or m out of range, one class, ...)."""


# ----------------------------------------------------------------------------------------------------------
# ragged inputs
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Sequences:
    """Ragged model inputs: per-token rows (residual vectors ``[N, d]`` or token ids ``[N]``) by ``offsets``,
    and which tokens are scored (what the head pools)."""

    values: Tensor
    offsets: np.ndarray
    scored: Bool[Tensor, " N"]

    def __post_init__(self) -> None:
        off = np.asarray(self.offsets, dtype=np.int64)
        if off.ndim != 1 or len(off) < 1 or off[0] != 0 or (np.diff(off) < 0).any():
            raise FinetuneError("offsets must start at 0 and be non-decreasing")
        if int(off[-1]) != len(self.values) or len(self.scored) != len(self.values):
            raise FinetuneError(
                f"offsets end at {int(off[-1])} but there are {len(self.values)} rows and "
                f"{len(self.scored)} scored flags"
            )
        self.offsets = off
        counts = torch.from_numpy(np.diff(off))
        seg = torch.repeat_interleave(torch.arange(len(counts)), counts)
        n_scored = torch.zeros(len(counts), dtype=torch.long).index_add_(0, seg, self.scored.long())
        if len(counts) and int(n_scored.min()) == 0:
            bad = int(torch.nonzero(n_scored == 0)[0, 0])
            raise FinetuneError(f"sequence {bad} has no scored tokens")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def is_tokens(self) -> bool:
        return self.values.ndim == 1

    def batch(self, idx: Sequence[int]) -> tuple[Tensor, Bool[Tensor, "b p"]]:
        """Right-padded ``[b, p(, d)]`` inputs (float32 for residuals) and the scored mask of ``idx``."""
        lens = [int(self.offsets[i + 1] - self.offsets[i]) for i in idx]
        p = max(lens)
        shape = (len(idx), p) if self.is_tokens else (len(idx), p, self.values.shape[1])
        x = torch.zeros(shape, dtype=self.values.dtype if self.is_tokens else torch.float32)
        m = torch.zeros(len(idx), p, dtype=torch.bool)
        for j, i in enumerate(idx):
            lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
            x[j, : hi - lo] = self.values[lo:hi]
            m[j, : hi - lo] = self.scored[lo:hi]
        return x, m


def _check_full_rows(store: Any) -> None:
    """The store must keep every token of every sequence, in order (``keep: all``)."""
    off = np.asarray(store.offsets)
    pos = np.asarray(store.positions)
    full = np.asarray(store.full_offsets)
    if not np.array_equal(np.diff(off), np.diff(full)):
        raise FinetuneError(
            f"{store.path}: the store keeps only some tokens (keep={store.key.get('keep')!r}); fine-tuned "
            "layers re-run attention over whole sequences, so collect with keep='all'"
        )
    starts = np.repeat(off[:-1], np.diff(off))
    if not np.array_equal(pos, np.arange(len(pos)) - starts):
        raise FinetuneError(f"{store.path}: rows are not the sequences' tokens in order")


def sequences_from_store(store: Any, hook: str) -> Sequences:
    """Every token's ``hook`` activations (fp16 on disk, memory-mapped) of a ``keep: all`` store."""
    _check_full_rows(store)
    values = store.tensor(hook)
    if not torch.isfinite(values[: min(len(values), 1 << 16)].float()).all():
        raise FinetuneError(f"{store.path}: {hook} has non-finite activations")
    return Sequences(values, np.asarray(store.offsets), torch.from_numpy(np.asarray(store.mask, dtype=bool)))


def token_sequences_from_store(store: Any) -> Sequences:
    """The model's whole input (token ids) of each sequence, with the store's scored positions marked."""
    full_off = np.asarray(store.full_offsets, dtype=np.int64)
    tokens = torch.from_numpy(np.asarray(store.full_tokens, dtype=np.int64))
    scored = np.zeros(len(tokens), dtype=bool)
    off = np.asarray(store.offsets)
    seq = np.repeat(np.arange(len(off) - 1), np.diff(off))
    mask = np.asarray(store.mask, dtype=bool)
    pos = np.asarray(store.positions, dtype=np.int64)
    scored[full_off[seq[mask]] + pos[mask]] = True
    return Sequences(tokens, full_off, torch.from_numpy(scored))


def _batches(lengths: np.ndarray, token_budget: int) -> list[np.ndarray]:
    """Length-sorted batches (shortest first, at most 64 sequences) within ``token_budget`` padded tokens."""
    return [np.array(b) for b in plan_batches(lengths, token_budget, 64, longest_first=False)]


# ----------------------------------------------------------------------------------------------------------
# LoRA on TransformerLens weights
# ----------------------------------------------------------------------------------------------------------
_LORA_TARGETS: dict[str, str] = {  # parameter name -> layout of its linear map
    "W_Q": "h i o",
    "W_K": "h i o",
    "W_V": "h i o",
    "_W_K": "h i o",
    "_W_V": "h i o",
    "W_O": "h o i",  # [heads, d_head, d_model]: the input is (heads, d_head)
    "W_in": "i o",
    "W_gate": "i o",
    "W_out": "i o",
}


class LowRankDelta(nn.Module):
    """A parametrization ``W + (alpha/r)·A@B`` of one TransformerLens weight, reshaped to its layout.

    ``h i o`` ([heads, d_in, d_head], e.g. ``W_Q``): a map ``d_in -> heads·d_head``; ``h o i`` (``W_O``):
    ``heads·d_head -> d_model``; ``i o``: a plain ``[d_in, d_out]`` matrix. ``B`` starts at zero, so the
    parametrized weight starts equal to the original."""

    def __init__(self, shape: Sequence[int], layout: str, rank: int, alpha: float, seed: int = 0) -> None:
        super().__init__()
        self.shape, self.layout = tuple(int(s) for s in shape), layout
        if layout == "h i o":
            h, i, o = self.shape
            d_in, d_out = i, h * o
        elif layout == "h o i":
            h, o, i = self.shape
            d_in, d_out = h * o, i
        elif layout == "i o":
            d_in, d_out = self.shape
        else:
            raise FinetuneError(f"unknown LoRA layout {layout!r}")
        g = torch.Generator().manual_seed(seed)
        self.A = nn.Parameter(torch.randn(d_in, rank, generator=g) / math.sqrt(d_in))
        self.B = nn.Parameter(torch.zeros(rank, d_out))
        self.scale = float(alpha) / rank

    def delta(self) -> Tensor:
        d = self.scale * (self.A @ self.B)
        if self.layout == "h i o":
            return einops.rearrange(d, "i (h o) -> h i o", h=self.shape[0])
        if self.layout == "h o i":
            return einops.rearrange(d, "(h o) i -> h o i", h=self.shape[0])
        return d

    def forward(self, W: Tensor) -> Tensor:
        return W + self.delta().to(W.dtype)


def add_lora(module: nn.Module, rank: int, alpha: float, seed: int = 0) -> list[nn.Parameter]:
    """Freeze ``module`` and add a :class:`LowRankDelta` to every attention / MLP matrix; returns the new
    trainable parameters (the A and B factors)."""
    if rank < 1:
        raise FinetuneError(f"LoRA rank must be >= 1, got {rank}")
    for p in module.parameters():
        p.requires_grad_(False)
    targets = []
    for mod_name, mod in module.named_modules():
        for pname, p in list(mod.named_parameters(recurse=False)):
            if pname in _LORA_TARGETS and p.ndim == len(_LORA_TARGETS[pname].split()):
                targets.append((mod_name, mod, pname, p))
    if not targets:
        raise FinetuneError("no attention or MLP weights to adapt")
    params: list[nn.Parameter] = []
    for j, (_, mod, pname, p) in enumerate(targets):
        delta = LowRankDelta(p.shape, _LORA_TARGETS[pname], rank, alpha, seed=seed * 1000 + j)
        parametrize.register_parametrization(mod, pname, delta, unsafe=True)
        params += [delta.A, delta.B]
    return params


# ----------------------------------------------------------------------------------------------------------
# the module
# ----------------------------------------------------------------------------------------------------------
class _Stack(nn.Module):
    """(optional embedding) → copied blocks → final norm → linear head over the scored tokens."""

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        ln_final: nn.Module | None,
        d_model: int,
        pooling: HeadPooling,
        embed: nn.Module | None = None,
        pos_embed: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.embed, self.pos_embed = embed, pos_embed
        self.blocks = nn.ModuleList(blocks)
        self.ln_final = ln_final if ln_final is not None else nn.Identity()
        self.head = nn.Linear(d_model, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.pooling = pooling

    def hidden(self, x: Tensor) -> Float[Tensor, "b p d"]:
        if self.embed is not None:
            tokens = x
            x = self.embed(tokens)
            if self.pos_embed is not None:
                x = x + self.pos_embed(tokens)
        for blk in self.blocks:
            x = blk(x)
        return self.ln_final(x)

    def features(self, x: Tensor, scored: Bool[Tensor, "b p"]) -> Float[Tensor, "b d"]:
        """Pooled normalized outputs (``max`` pooling: their mean, used to initialize the head)."""
        h = self.hidden(x)
        return Pooling.parse("last" if self.pooling == "last" else "mean").padded(h, scored)

    def forward(self, x: Tensor, scored: Bool[Tensor, "b p"]) -> Float[Tensor, " b"]:
        h = self.hidden(x)
        if self.pooling == "max":  # probe, then pool: the max of the per-token logits
            return Pooling.parse("max").padded(self.head(h).squeeze(-1), scored)
        return self.head(Pooling.parse(self.pooling).padded(h, scored)).squeeze(-1)


# ----------------------------------------------------------------------------------------------------------
# classifiers
# ----------------------------------------------------------------------------------------------------------
TRAIN_PARAMS = (
    "mode",
    "rank",
    "alpha",
    "head_pooling",
    "epochs",
    "lr",
    "head_lr",
    "weight_decay",
    "token_budget",
    "head_C",
)
MINILM_PARAMS = ("train_layers", "batch_size", "max_len", "warmup_frac", "normalize", "Cs", "C")


def _train_kw(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A spec entry's training options (``head_pooling`` is the constructor's ``pooling``) and seed."""
    p = entry.get("params") or {}
    kw: dict[str, Any] = {k: p[k] for k in TRAIN_PARAMS if k in p and k != "head_pooling"}
    if "head_pooling" in p:
        kw["pooling"] = p["head_pooling"]
    return {**kw, "seed": int(entry.get("seed", 0))}


def _finetune_kind(entry: Mapping[str, Any]) -> tuple[type[Any], dict[str, Any]]:
    return FinetunedLayers, {"k": int((entry.get("params") or {}).get("k", 1)), **_train_kw(entry)}


def _standalone_kind(entry: Mapping[str, Any]) -> tuple[type[Any], dict[str, Any]]:
    """``model: policy`` (the first ``n_layers`` blocks of the sweep's model) or ``model: minilm``."""
    p = dict(entry.get("params") or {})
    which = str(p.pop("model", "policy"))
    if which == "minilm":
        return scorer_class("minilm"), {**p, "seed": int(entry.get("seed", 0))}
    if which != "policy":
        raise ValueError(f"probes.standalone: model must be 'policy' or 'minilm', got {which!r}")
    bad = set(p) - set(TRAIN_PARAMS) - {"n_layers"}
    if bad:
        raise ValueError(f"probes.standalone (model: policy): unknown params {sorted(bad)}")
    n = p.get("n_layers")
    return TruncatedModelClassifier, {"n_layers": None if n is None else int(n), **_train_kw(entry)}


class LayerStack(Scorer):
    """Shared training, scoring and saving of :class:`FinetunedLayers` and :class:`TruncatedModelClassifier`
    (see the module docstring). Built on the policy ``model`` (copies of its layers); saved by
    :mod:`probes.io` in the ``sequence`` layout (the trained tensors only) and rebuilt on the same model."""

    layout = "sequence"
    needs_model = True
    module_: _Stack

    def __init__(
        self,
        model: HookedTransformer | None = None,
        *,
        mode: Mode = "full",
        rank: int = 8,
        alpha: float = 16.0,
        pooling: HeadPooling = "mean",
        epochs: int = 3,
        lr: float | None = None,
        head_lr: float = 1e-3,
        weight_decay: float = 0.01,
        token_budget: int = 2048,
        max_grad_norm: float = 1.0,
        head_C: float = 0.1,
        seed: int = 0,
    ) -> None:
        if mode not in ("full", "lora", "head"):
            raise FinetuneError(f"mode must be 'full', 'lora' or 'head', got {mode!r}")
        if pooling not in ("mean", "last", "max"):
            raise FinetuneError(f"pooling must be 'mean', 'last' or 'max', got {pooling!r}")
        if epochs < 0 or token_budget < 1:
            raise FinetuneError("epochs must be >= 0 and token_budget >= 1")
        self.mode, self.rank, self.alpha, self.pooling = mode, int(rank), float(alpha), pooling
        self.epochs, self.head_lr, self.weight_decay = int(epochs), float(head_lr), float(weight_decay)
        self.lr = float(lr) if lr is not None else (1e-3 if mode == "lora" else 5e-5)
        self.token_budget, self.max_grad_norm, self.head_C = int(token_budget), float(max_grad_norm), head_C
        self.seed = int(seed)
        self.history_: list[dict[str, float]] = []
        self.fitted_ = False
        self.model = model
        self._fresh = False  # the copied layers are the model's own (not yet trained)

    def _ready(self) -> None:
        """Build the copy from the model (once; again before each new fit)."""
        if self.model is None:
            raise FinetuneError(f"{type(self).__name__} needs the model: {type(self).__name__}(model, ...)")
        self._setup(self.model)
        self._fresh = True

    # -------------------------------------------------------------------------------- to be specialised
    def _build(self, model: HookedTransformer) -> _Stack:
        raise NotImplementedError

    def input_hook(self) -> str | None:
        """The hook whose activations the classifier reads (None: token ids)."""
        raise NotImplementedError

    def _extra_config(self) -> dict[str, Any]:
        return {}

    # ------------------------------------------------------------------------------------------ common
    def _setup(self, model: HookedTransformer) -> None:
        torch.manual_seed(self.seed)
        self.module_ = self._build(model)
        for p in self.module_.parameters():
            p.requires_grad_(False)
        body: list[nn.Parameter] = []
        if self.mode == "lora":
            body = add_lora(self.module_.blocks, self.rank, self.alpha, seed=self.seed)
        elif self.mode == "full":
            body = [p for p in self.module_.blocks.parameters()] + list(self.module_.ln_final.parameters())
            for p in body:
                p.requires_grad_(True)
        for p in self.module_.head.parameters():
            p.requires_grad_(True)
        self._body_params = body

    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.module_.parameters() if p.requires_grad)

    def n_params(self) -> int:
        """Parameters the classifier runs (copied blocks, norm, head; embeddings excluded)."""
        return sum(
            p.numel()
            for n, p in self.module_.named_parameters()
            if not n.startswith(("embed.", "pos_embed."))
        )

    def _scores(self, seqs: Sequences, features: bool = False) -> Tensor:
        out = []
        idx_all = []
        self.module_.eval()
        with torch.inference_mode():
            for idx in _batches(seqs.lengths, self.token_budget * 2):
                x, m = seqs.batch(idx.tolist())
                out.append(self.module_.features(x, m) if features else self.module_(x, m))
                idx_all.append(idx)
        order = np.concatenate(idx_all) if idx_all else np.zeros(0, np.int64)
        res = torch.cat(out) if out else torch.zeros(0)
        back = torch.empty_like(res)
        back[torch.from_numpy(order)] = res
        return back

    def decision_function(self, seqs: Sequences) -> np.ndarray:
        """The classifier's logit for every sequence (float64)."""
        if not self.fitted_:
            raise FinetuneError(f"{type(self).__name__} is not fitted")
        self._check_input(seqs)
        return self._scores(seqs).double().numpy()

    def _check_input(self, seqs: Sequences) -> None:
        if len(seqs) == 0:
            raise FinetuneError("no sequences to score")
        want_tokens = self.input_hook() is None
        if seqs.is_tokens != want_tokens:
            raise FinetuneError(
                f"{type(self).__name__} reads {'token ids' if want_tokens else self.input_hook()}, "
                f"got {'token ids' if seqs.is_tokens else 'activations'}"
            )

    def _init_head(self, X: Tensor, y: np.ndarray) -> None:
        lp = LogisticProbe(C=self.head_C, class_weight="balanced").fit(X.double(), torch.as_tensor(y))
        assert lp.coef_ is not None and lp.intercept_ is not None
        with torch.no_grad():
            self.module_.head.weight.copy_(lp.coef_.float()[None])
            self.module_.head.bias.copy_(lp.intercept_.float().reshape(1))

    def fit(
        self,
        train: Sequences,
        y: Any,
        *,
        val: Sequences | None = None,
        val_y: Any = None,
        progress: bool = False,
        select_metric: str = DEFAULT_SELECT,
    ) -> LayerStack:
        """Copy the layers from the model, fit the head as a linear probe, then fine-tune (module doc).

        The kept epoch (0 = the linear-probe start) is chosen on validation by the rule of
        :mod:`probes.selection` (``select_metric`` first, then the other validation metrics), with the lower
        class-balanced validation loss as the last tie-break."""
        if len(train) == 0:
            raise FinetuneError("empty training set")
        try:
            yy = check_y(y, len(train), rows="sequences", unit="sequences").double().numpy()
        except ValueError as e:
            raise FinetuneError(str(e)) from None
        if val is not None and (val_y is None or len(np.asarray(val_y)) != len(val)):
            raise FinetuneError("val_y must give one label per validation sequence")
        if not self._fresh:
            self._ready()
        self._fresh = False
        self._check_input(train)
        t0 = time.perf_counter()
        self._init_head(self._scores(train, features=True), yy)
        self.fitted_ = True
        vy = None if val is None else (np.asarray(val_y, dtype=np.float64) >= 0.5).astype(int)
        rec0 = {"epoch": 0, "train_loss": float("nan"), "val_auroc": float("nan"), "val_loss": float("nan")}
        best_state = None
        best_key: tuple[float, ...] = (-math.inf,) * 5
        if val is not None and vy is not None:
            best_key, best_state = self._evaluate_val(val, vy, select_metric, rec0), self.trained_state()
        self.history_ = [rec0]
        self.best_epoch_ = 0 if val is not None else self.epochs
        self._train_epochs(train, yy, val, vy, select_metric, best_key, best_state, progress)
        self.fit_seconds_ = time.perf_counter() - t0
        self.module_.eval()
        return self

    def _evaluate_val(
        self, val: Sequences, vy: np.ndarray, select_metric: str, rec: dict[str, float]
    ) -> tuple[float, ...]:
        """The validation metrics of the selection rule and the class-balanced BCE; states are ranked by the
        rule, then by the lower loss (early stopping among equally separating states)."""
        s = self._scores(val).double()
        t = torch.as_tensor(vy, dtype=torch.float64)
        w = torch.where(t > 0.5, len(vy) / (2 * max(vy.sum(), 1)), len(vy) / (2 * max((1 - vy).sum(), 1)))
        vm = val_metrics(vy, s.numpy())
        rec.update({f"val_{k}": v for k, v in vm.items()})
        rec["val_loss"] = float(nn.functional.binary_cross_entropy_with_logits(s, t, weight=w))
        return (*selection_key(vm, select_metric), -rec["val_loss"])

    def _train_epochs(
        self,
        train: Sequences,
        yy: np.ndarray,
        val: Sequences | None,
        vy: np.ndarray | None,
        select_metric: str,
        best_key: tuple[float, ...],
        best_state: dict[str, Tensor] | None,
        progress: bool,
    ) -> None:
        """AdamW epochs on a class-balanced BCE; the best validation state (the start included) is kept."""
        head_params = list(self.module_.head.parameters())
        groups: list[dict[str, Any]] = [{"params": head_params, "lr": self.head_lr, "weight_decay": 0.0}]
        if self._body_params:
            groups.append({"params": self._body_params, "lr": self.lr, "weight_decay": self.weight_decay})
        opt = torch.optim.AdamW(groups)
        trainable = head_params + self._body_params
        hard = yy >= 0.5
        n_pos, n_neg = float(hard.sum()), float((~hard).sum())
        w_pos, w_neg = len(yy) / (2 * n_pos), len(yy) / (2 * n_neg)
        batches = _batches(train.lengths, self.token_budget)
        gen = np.random.default_rng(self.seed)
        bar = tqdm(total=self.epochs * len(batches), desc=f"{self.kind} fine-tune", disable=not progress)
        yt = torch.as_tensor(yy, dtype=torch.float32)
        for epoch in range(1, self.epochs + 1):
            self.module_.train()
            total, n_seen = 0.0, 0
            for b in gen.permutation(len(batches)):
                idx = batches[b]
                x, m = train.batch(idx.tolist())
                logits = self.module_(x, m)
                target = yt[torch.from_numpy(idx)]
                w = torch.where(target >= 0.5, w_pos, w_neg)
                loss = nn.functional.binary_cross_entropy_with_logits(logits, target, weight=w)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(trainable, self.max_grad_norm)
                opt.step()
                total += float(loss.detach()) * len(idx)
                n_seen += len(idx)
                bar.update(1)
            rec = {"epoch": epoch, "train_loss": total / max(n_seen, 1), "val_auroc": float("nan")}
            rec["val_loss"] = float("nan")
            if val is not None and vy is not None:
                key = self._evaluate_val(val, vy, select_metric, rec)
                if key > best_key:  # strictly better: ties keep the earlier epoch
                    best_key, best_state, self.best_epoch_ = key, self.trained_state(), epoch
            self.history_.append(rec)
        bar.close()
        if best_state is not None:
            self.load_trained_state(best_state)

    # ------------------------------------------------------------------------------- the sweep's view
    def pooling_label(self, pooling: Pooling) -> str:
        return self.pooling

    def row_extras(self, model_name: str, n_layers: int) -> dict[str, Any]:
        return {
            "n_trainable": self.n_trainable(),
            "clf_params": self.n_params(),
            "best_epoch": getattr(self, "best_epoch_", -1),
        }

    # ------------------------------------------------------------------------------------ persistence
    def trained_state(self) -> dict[str, Tensor]:
        """The tensors training changes (LoRA factors, or copied blocks + norm; and the head)."""
        keep = {n for n, p in self.module_.named_parameters() if p.requires_grad}
        return {k: v.detach().clone() for k, v in self.module_.state_dict().items() if k in keep}

    def load_trained_state(self, state: Mapping[str, Tensor]) -> None:
        missing = set(self.trained_state()) - set(state)
        if missing:
            raise FinetuneError(f"saved classifier lacks tensors {sorted(missing)[:4]}")
        self.module_.load_state_dict(dict(state), strict=False)

    def get_config(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "rank": self.rank,
            "alpha": self.alpha,
            "pooling": self.pooling,
            "epochs": self.epochs,
            "lr": self.lr,
            "head_lr": self.head_lr,
            "weight_decay": self.weight_decay,
            "token_budget": self.token_budget,
            "max_grad_norm": self.max_grad_norm,
            "head_C": self.head_C,
            "seed": self.seed,
            **self._extra_config(),
        }


def finetune_input_hook(k: int, n_layers: int) -> str:
    """The cached residual stream the last ``k`` of ``n_layers`` blocks start from:
    ``blocks.{n_layers-k-1}.hook_resid_post``."""
    if k < 1:
        raise FinetuneError(f"k must be >= 1, got {k}")
    if k >= n_layers:
        raise FinetuneError(
            f"k={k} must be below the model's {n_layers} layers (the input is a cached layer)"
        )
    return f"blocks.{n_layers - k - 1}.hook_resid_post"


@register_scorer
class FinetunedLayers(LayerStack):
    """The model's last ``k`` blocks + final norm + a head, trained on cached ``blocks.{L-k-1}`` residuals."""

    kind = "finetune"
    view = RESIDUAL
    sweep_kinds = (
        SweepKind(
            "finetune",
            _finetune_kind,
            per_layer=False,
            uses_C=False,
            params=frozenset(("k", *TRAIN_PARAMS)),
            description="fine-tuned last k layers",
        ),
    )

    def __init__(self, model: HookedTransformer | None = None, k: int = 1, **kw: Any) -> None:
        if k < 1:
            raise FinetuneError(f"k must be >= 1, got {k}")
        super().__init__(model, **kw)
        self.k = int(k)
        self.n_layers_: int | None = None
        if model is not None:
            self._ready()

    @classmethod
    def input_hooks(cls, entry: Mapping[str, Any], n_layers: int) -> list[str]:
        """The residual stream a spec entry reads (every token of it: a ``keep: all`` store)."""
        return [finetune_input_hook(int((entry.get("params") or {}).get("k", 1)), n_layers)]

    def _extra_config(self) -> dict[str, Any]:
        return {"k": self.k}

    def _build(self, model: HookedTransformer) -> _Stack:
        L = model.cfg.n_layers
        finetune_input_hook(self.k, L)  # checks k against the model
        self.n_layers_ = L
        blocks = [copy.deepcopy(model.blocks[i]) for i in range(L - self.k, L)]
        ln = copy.deepcopy(model.ln_final) if hasattr(model, "ln_final") else None
        return _Stack(blocks, ln, model.cfg.d_model, self.pooling).float()

    def input_hook(self, n_layers: int | None = None) -> str | None:
        L = n_layers or self.n_layers_
        if L is None:
            return "resid"  # activations, layer not yet known
        return finetune_input_hook(self.k, L)

    def row_layers(self, n_layers: int) -> list[int]:
        return [n_layers - self.k - 1]

    def row_extras(self, model_name: str, n_layers: int) -> dict[str, Any]:
        return {"variant": f"k={self.k} {self.mode}", "k": self.k, "mode": self.mode} | super().row_extras(
            model_name, n_layers
        )

    def cost(
        self, cm: CostModel, *, layers: Sequence[int] = (), pooling: Pooling | None = None
    ) -> tuple[ProbeCost, ProbeCost]:
        """``k`` blocks + final norm + head per token (and the frozen forward pass in the standalone view)."""
        layer = cm.n_layers - self.k - 1
        head = cm.finetuned_layers_flops(self.k) + cm.pooling_flops(
            "last" if self.pooling == "last" else "mean", 1
        )
        fwd = cm.forward_flops_per_token(layer, include_unembed=False)
        return cm.cost_views(head, head + fwd, fwd, (layer,), f"finetune_k{self.k}")


@register_scorer
class TruncatedModelClassifier(LayerStack):
    """A standalone classifier: the model's (frozen) embeddings, first ``m`` blocks, final norm and a head
    (``n_layers=None``: a quarter of the model's blocks)."""

    kind = "truncated"
    view = TOKEN_IDS
    sweep_kinds = (
        SweepKind(
            "standalone",
            _standalone_kind,
            per_layer=False,
            uses_C=False,
            params=frozenset(("model", "n_layers", *TRAIN_PARAMS, *MINILM_PARAMS)),
            description="a separate classifier (first layers of the model, or MiniLM)",
        ),
    )

    def __init__(self, model: HookedTransformer | None = None, n_layers: int | None = 4, **kw: Any) -> None:
        if n_layers is None:
            if model is None:
                raise FinetuneError("n_layers=None (a quarter of the model) needs the model")
            n_layers = max(1, model.cfg.n_layers // 4)
        if n_layers < 1:
            raise FinetuneError(f"n_layers must be >= 1, got {n_layers}")
        super().__init__(model, **kw)
        self.m = int(n_layers)
        if model is not None:
            self._ready()

    def _extra_config(self) -> dict[str, Any]:
        return {"n_layers": self.m}

    def _build(self, model: HookedTransformer) -> _Stack:
        L = model.cfg.n_layers
        if self.m > L:
            raise FinetuneError(f"n_layers={self.m} is more than the model's {L} layers")
        if model.cfg.positional_embedding_type == "shortformer":
            raise FinetuneError("shortformer positional embeddings are not supported")
        blocks = [copy.deepcopy(model.blocks[i]) for i in range(self.m)]
        ln = copy.deepcopy(model.ln_final) if hasattr(model, "ln_final") else None
        pos = copy.deepcopy(model.pos_embed) if model.cfg.positional_embedding_type == "standard" else None
        stack = _Stack(
            blocks, ln, model.cfg.d_model, self.pooling, embed=copy.deepcopy(model.embed), pos_embed=pos
        )
        return stack.float()

    def input_hook(self) -> str | None:
        return None

    def row_layers(self, n_layers: int) -> list[int]:
        return [self.m - 1]

    def row_extras(self, model_name: str, n_layers: int) -> dict[str, Any]:
        return {"variant": f"{model_name}[:{self.m}]", "n_layers_model": n_layers} | super().row_extras(
            model_name, n_layers
        )

    def cost(
        self, cm: CostModel, *, layers: Sequence[int] = (), pooling: Pooling | None = None
    ) -> tuple[ProbeCost, ProbeCost]:
        """A full forward pass of an ``m``-layer model (its own, so both views are equal)."""
        body = cm.forward_flops_per_token(self.m - 1, include_unembed=False)
        head = cm.final_norm + cm.linear_probe_flops() + cm.pooling_flops("mean", 1)
        return cm.cost_views(body + head, body + head, 0.0, (self.m - 1,), f"truncated_{self.m}")


def load_sequence_classifier(path: Any, model: HookedTransformer) -> LayerStack:
    """Rebuild saved :class:`FinetunedLayers` / :class:`TruncatedModelClassifier` on ``model``
    (:func:`probes.io.load_sequence`: the folder is checked as untrusted input)."""
    if not (Path(path) / "classifier.json").exists():
        raise FinetuneError(f"{path}: no classifier.json (not a saved fine-tuned classifier)")
    clf = load_sequence(path, model=model)
    assert isinstance(clf, LayerStack)
    return clf
