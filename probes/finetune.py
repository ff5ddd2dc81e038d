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
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import einops
import numpy as np
import torch
import torch.nn.utils.parametrize as parametrize
from jaxtyping import Bool, Float
from safetensors.torch import save_file
from torch import Tensor, nn
from transformer_lens import HookedTransformer

from probes.base import check_y
from probes.cost import CostModel, ProbeCost
from probes.io import ProbeLoadError, atomic_dir, check_config, check_json_tree, read_json_file, read_tensors
from probes.selection import DEFAULT_SELECT, selection_key, val_metrics

__all__ = [
    "FinetuneError",
    "FinetunedLayers",
    "HeadPooling",
    "LowRankDelta",
    "SequenceClassifier",
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
JSON_FILE = "classifier.json"
TENSORS_FILE = "classifier.safetensors"


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


def plan_batches(lengths: np.ndarray, token_budget: int, max_batch: int = 64) -> list[np.ndarray]:
    """Length-sorted batches of sequence indices with at most ``token_budget`` padded tokens each."""
    order = np.argsort(lengths, kind="stable")
    batches: list[np.ndarray] = []
    cur: list[int] = []
    longest = 0
    for i in order:
        n = int(lengths[i])
        if cur and (max(longest, n) * (len(cur) + 1) > token_budget or len(cur) >= max_batch):
            batches.append(np.array(cur))
            cur, longest = [], 0
        cur.append(int(i))
        longest = max(longest, n)
    if cur:
        batches.append(np.array(cur))
    return batches


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

    @staticmethod
    def pool(h: Float[Tensor, "b p d"], scored: Bool[Tensor, "b p"], how: str) -> Float[Tensor, "b d"]:
        if how == "last":
            pos = torch.arange(h.shape[1], device=h.device).expand_as(scored)
            last = torch.where(scored, pos, -1).amax(dim=1)
            return h[torch.arange(h.shape[0], device=h.device), last]
        w = scored.to(h.dtype)
        return einops.einsum(h, w, "b p d, b p -> b d") / w.sum(1, keepdim=True).clamp_min(1)

    def features(self, x: Tensor, scored: Bool[Tensor, "b p"]) -> Float[Tensor, "b d"]:
        """Pooled normalized outputs (``max`` pooling: their mean, used to initialize the head)."""
        h = self.hidden(x)
        return self.pool(h, scored, "last" if self.pooling == "last" else "mean")

    def forward(self, x: Tensor, scored: Bool[Tensor, "b p"]) -> Float[Tensor, " b"]:
        h = self.hidden(x)
        if self.pooling == "max":
            logits = self.head(h).squeeze(-1)
            return logits.masked_fill(~scored, float("-inf")).amax(dim=1)
        return self.head(self.pool(h, scored, self.pooling)).squeeze(-1)


# ----------------------------------------------------------------------------------------------------------
# classifiers
# ----------------------------------------------------------------------------------------------------------
class SequenceClassifier:
    """Shared training, scoring and saving of :class:`FinetunedLayers` and
    :class:`TruncatedModelClassifier` (see the module docstring)."""

    kind: ClassVar[str] = ""
    module_: _Stack

    def __init__(
        self,
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

    # -------------------------------------------------------------------------------- to be specialised
    def _build(self, model: HookedTransformer) -> _Stack:
        raise NotImplementedError

    def input_hook(self) -> str | None:
        """The hook whose activations the classifier reads (None: token ids)."""
        raise NotImplementedError

    def cost(self, cm: CostModel) -> tuple[ProbeCost, ProbeCost]:
        """(marginal, standalone) per-token cost."""
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
            for idx in plan_batches(seqs.lengths, self.token_budget * 2):
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
        from probes.linear import LogisticProbe

        lp = LogisticProbe(C=self.head_C, class_weight="balanced").fit(X.double(), torch.as_tensor(y))
        assert lp.coef_ is not None and lp.intercept_ is not None
        with torch.no_grad():
            self.module_.head.weight.copy_(lp.coef_.float()[None])
            self.module_.head.bias.copy_(lp.intercept_.float().reshape(1))

    def fit(
        self,
        model: HookedTransformer,
        train: Sequences,
        y: Any,
        *,
        val: Sequences | None = None,
        val_y: Any = None,
        progress: bool = False,
        select_metric: str = DEFAULT_SELECT,
    ) -> SequenceClassifier:
        """Copy the layers from ``model``, fit the head as a linear probe, then fine-tune (see module doc).

        The kept epoch (0 = the linear-probe start) is chosen on validation by the rule of
        :mod:`probes.selection` (``select_metric`` first, then the other validation metrics), with the lower
        class-balanced validation loss as the last tie-break."""
        if len(train) == 0:
            raise FinetuneError("empty training set")
        try:
            yy = check_y(y, len(train), rows="sequences", unit="sequences").double().numpy()
        except ValueError as e:
            raise FinetuneError(str(e)) from None
        hard = yy >= 0.5
        if val is not None and (val_y is None or len(np.asarray(val_y)) != len(val)):
            raise FinetuneError("val_y must give one label per validation sequence")
        self._setup(model)
        self._check_input(train)
        t0 = time.perf_counter()
        self._init_head(self._scores(train, features=True), yy)
        self.fitted_ = True
        vy = None if val is None else (np.asarray(val_y, dtype=np.float64) >= 0.5).astype(int)

        def evaluate_val(rec: dict[str, float]) -> tuple[float, ...]:
            """The validation metrics of the selection rule and the class-balanced BCE; states are ranked by
            the rule, then by the lower loss (early stopping among equally separating states)."""
            assert val is not None and vy is not None
            s = self._scores(val).double()
            t = torch.as_tensor(vy, dtype=torch.float64)
            w = torch.where(t > 0.5, len(vy) / (2 * max(vy.sum(), 1)), len(vy) / (2 * max((1 - vy).sum(), 1)))
            vm = val_metrics(vy, s.numpy())
            rec.update({f"val_{k}": v for k, v in vm.items()})
            rec["val_loss"] = float(nn.functional.binary_cross_entropy_with_logits(s, t, weight=w))
            return (*selection_key(vm, select_metric), -rec["val_loss"])

        rec0 = {"epoch": 0, "train_loss": float("nan"), "val_auroc": float("nan"), "val_loss": float("nan")}
        best_state, best_key = None, (-math.inf,) * 5
        if val is not None:
            best_key, best_state = evaluate_val(rec0), self._trained_state()
        self.history_ = [rec0]
        self.best_epoch_ = 0 if val is not None else self.epochs
        head_params = list(self.module_.head.parameters())
        groups: list[dict[str, Any]] = [{"params": head_params, "lr": self.head_lr, "weight_decay": 0.0}]
        if self._body_params:
            groups.append({"params": self._body_params, "lr": self.lr, "weight_decay": self.weight_decay})
        opt = torch.optim.AdamW(groups)
        trainable = head_params + self._body_params
        n_pos, n_neg = float(hard.sum()), float((~hard).sum())
        w_pos, w_neg = len(yy) / (2 * n_pos), len(yy) / (2 * n_neg)
        batches = plan_batches(train.lengths, self.token_budget)
        gen = np.random.default_rng(self.seed)
        from tqdm.auto import tqdm

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
            if val is not None:
                key = evaluate_val(rec)
                if key > best_key:  # strictly better: ties keep the earlier epoch
                    best_key, best_state, self.best_epoch_ = key, self._trained_state(), epoch
            self.history_.append(rec)
        bar.close()
        if best_state is not None:
            self._load_trained_state(best_state)
        self.fit_seconds_ = time.perf_counter() - t0
        self.module_.eval()
        return self

    # ------------------------------------------------------------------------------------ persistence
    def _trained_state(self) -> dict[str, Tensor]:
        """The tensors training changes (LoRA factors, or copied blocks + norm; and the head)."""
        keep = {n for n, p in self.module_.named_parameters() if p.requires_grad}
        return {k: v.detach().clone() for k, v in self.module_.state_dict().items() if k in keep}

    def _load_trained_state(self, state: dict[str, Tensor]) -> None:
        missing = set(self._trained_state()) - set(state)
        if missing:
            raise FinetuneError(f"saved classifier lacks tensors {sorted(missing)[:4]}")
        self.module_.load_state_dict(state, strict=False)

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

    def save(self, path: str | Path, metadata: dict[str, Any] | None = None) -> None:
        """``path/classifier.safetensors`` (trained tensors) + ``path/classifier.json``, atomically."""
        if not self.fitted_:
            raise FinetuneError("fit the classifier before saving it")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_dir(path) as tmp:
            state = {k: v.contiguous() for k, v in self._trained_state().items()}
            save_file(state, str(tmp / TENSORS_FILE))
            info = {
                "kind": self.kind,
                "config": self.get_config(),
                "input_hook": self.input_hook(),
                "history": self.history_,
                "metadata": metadata or {},
            }
            (tmp / JSON_FILE).write_text(json.dumps(info, indent=1, default=str))


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


class FinetunedLayers(SequenceClassifier):
    """The model's last ``k`` blocks + final norm + a head, trained on cached ``blocks.{L-k-1}`` residuals."""

    kind = "finetune"

    def __init__(self, k: int = 1, **kw: Any) -> None:
        if k < 1:
            raise FinetuneError(f"k must be >= 1, got {k}")
        super().__init__(**kw)
        self.k = int(k)
        self.n_layers_: int | None = None

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

    def cost(self, cm: CostModel) -> tuple[ProbeCost, ProbeCost]:
        layer = cm.n_layers - self.k - 1
        head = cm.finetuned_layers_flops(self.k) + cm.pooling_flops(
            "last" if self.pooling == "last" else "mean", 1
        )
        fwd = cm.forward_flops_per_token(layer, include_unembed=False)
        return cm.cost_views(head, head + fwd, fwd, (layer,), f"finetune_k{self.k}")


class TruncatedModelClassifier(SequenceClassifier):
    """A standalone classifier: the model's (frozen) embeddings, first ``m`` blocks, final norm and a head."""

    kind = "truncated"

    def __init__(self, n_layers: int = 4, **kw: Any) -> None:
        if n_layers < 1:
            raise FinetuneError(f"n_layers must be >= 1, got {n_layers}")
        super().__init__(**kw)
        self.m = int(n_layers)

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

    def cost(self, cm: CostModel) -> tuple[ProbeCost, ProbeCost]:
        body = cm.forward_flops_per_token(self.m - 1, include_unembed=False)
        head = cm.final_norm + cm.linear_probe_flops() + cm.pooling_flops("mean", 1)
        return cm.cost_views(body + head, body + head, 0.0, (self.m - 1,), f"truncated_{self.m}")


_KINDS: dict[str, type[SequenceClassifier]] = {
    "finetune": FinetunedLayers,
    "truncated": TruncatedModelClassifier,
}


def load_sequence_classifier(path: str | Path, model: HookedTransformer) -> SequenceClassifier:
    """Rebuild a saved :class:`FinetunedLayers` / :class:`TruncatedModelClassifier` on ``model``.

    The folder is untrusted input: ``classifier.json`` is checked against the schema (a known kind, the
    class's constructor parameters and types, bounded size and nesting), and the tensors must be exactly the
    ones the rebuilt classifier trains, with their shapes and dtypes, and finite. Anything else is a
    :class:`~probes.io.ProbeLoadError` naming the file and field."""
    path = Path(path)
    jf = path / JSON_FILE
    if not jf.exists():
        raise FinetuneError(f"{path}: no {JSON_FILE} (not a saved fine-tuned classifier)")
    info = read_json_file(jf, what=JSON_FILE)
    if not isinstance(info, dict):
        raise ProbeLoadError(f"{jf}: not a JSON object")
    check_json_tree({k: v for k, v in info.items() if k != "history"}, jf)
    check_json_tree(info.get("history"), jf, "history", allow_nonfinite=True)
    extra = sorted(set(info) - {"kind", "config", "input_hook", "history", "metadata"})
    if extra or "config" not in info:
        raise ProbeLoadError(f"{jf}: unknown field(s) {extra}" if extra else f"{jf}: missing field 'config'")
    kind = info.get("kind")
    if not isinstance(kind, str) or kind not in _KINDS:
        raise ProbeLoadError(f"{jf}: unknown classifier kind {str(kind)[:40]!r}; known: {sorted(_KINDS)}")
    cls = _KINDS[kind]
    config = check_config(cls, info["config"], jf)
    history = info.get("history", [])
    if not isinstance(history, list) or not all(
        isinstance(h, dict)
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in h.values())
        for h in history
    ):
        raise ProbeLoadError(f"{jf}: history must be a list of objects of numbers")
    if not isinstance(info.get("metadata", {}), dict):
        raise ProbeLoadError(f"{jf}: metadata must be an object")
    try:
        clf = cls(**config)
        clf._setup(model)
    except Exception as e:  # the constructor judges values of the right types (ranges, k vs the model)
        raise ProbeLoadError(f"{jf}: config rejected by {cls.__name__} on this model: {e}") from e
    hook = info.get("input_hook")
    if hook is not None and hook != clf.input_hook():
        raise ProbeLoadError(
            f"{jf}: input_hook {str(hook)[:60]!r} is not {clf.input_hook()!r} for this config"
        )
    want = {k: (tuple(v.shape), frozenset({v.dtype})) for k, v in clf._trained_state().items()}
    state = read_tensors(path / TENSORS_FILE, want)
    clf._load_trained_state(state)
    clf.history_ = history
    clf.fitted_ = True
    clf.module_.eval()
    return clf
