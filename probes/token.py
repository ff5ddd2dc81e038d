"""Per-token probes: a probe applied to every scored token, trained *through* an aggregation of its per-token
outputs, on ragged per-token activations (an :class:`~activations.store.ActivationStore`'s rows + offsets).

Families (``kind`` in :data:`probes.base.SCORERS`; attention and MultiMax in their own modules,
:mod:`probes.attention` and :mod:`probes.multimax`):

* :class:`TokenProbe` (``token_linear``): a linear per-token logit ``l_t = w·x_t + b``, aggregated into one
  sequence logit. ``train_pool`` is the aggregation the loss sees during training, ``read_pool`` the one
  used at inference (and in the streaming monitor); both are :class:`~activations.pooling.Pooling` specs
  (``mean``, ``max``, ``last``, ``ema<a>``, ``window<M>``, ``softmax<τ>``). Presets:

  - **CC++** (``loss="softmax_weighted"``, ``train_pool=read_pool="window16"``): sliding-window means of the
    per-token logits ``z_t = (1/M) Σ_{u=t-M+1..t} l_u`` (windows as in :class:`Pooling`: every full window,
    or the whole sequence when it is shorter than ``M``), and the **softmax-weighted BCE**

        L_i = Σ_t ω_t · BCE(y_i, σ(z_t)),    ω_t = softmax_t(z_t / τ) over the sequence's windows,
        BCE(y, σ(z)) = softplus(z) − y·z,

    averaged over sequences with class-balanced weights. The weights are *not* detached: the loss is a
    smooth version of the BCE of the max window (τ → 0) that tends to the mean BCE over windows (τ → ∞).
    For a harmful sequence the loss concentrates on the windows the probe already finds most harmful (the
    harmful part need not cover the whole sequence); for a harmless one on its most harmful-looking
    windows, which are the ones a max read-out would flag. ``weights_for="harmful"`` uses the softmax
    weights only for harmful sequences and a uniform mean over windows for harmless ones. Inference reads
    the max over windows (what a streaming monitor stops on).
  - **Cost-effective CC** (``train_pool="mean"``, ``read_pool="ema0.5"``): the probe is trained on
    mean-pooled activations (the mean of per-token logits of a linear probe is the logit of the mean
    activation, so this *is* logistic regression on mean-pooled features) and read at inference by an EMA
    of per-token logits (``e_t = a·l_t + (1-a)·e_{t-1}``) with a max read-out.
  - McKenzie et al.'s poolings of per-token logits: ``max``, ``mean``, ``last``, ``window<M>`` (rolling mean
    then max) and ``softmax<τ>``, trained and read with the same pooling.

* :class:`AttentionProbe` (``token_attention``): ``H`` learned queries score every token
  (``a_{h,t} = q_h·x_t``), each head reads ``Σ_t softmax_t(a_{h,t}) · (v_h·x_t)``; the logit is the sum over
  heads plus a bias.
* :class:`MultiMaxProbe` (``token_multimax``, Kramár et al.): ``H`` per-head linear scores
  ``s_{h,t} = w_h·x_t + c_h``, a hard max over tokens per head, and a learned weighted sum
  ``Σ_h u_h · max_t s_{h,t} + b``.

Training (all families): inputs standardized with the training tokens' mean and standard deviation (folded
into the saved weights), AdamW with decoupled weight decay, minibatches of whole sequences, class-balanced
BCE (the CC++ loss for that preset), seeded initialization and shuffling: the same seed gives the same probe.

Every probe also has a :meth:`~TokenProbeBase.streamer`: an exact causal (token-by-token) version of
:meth:`~TokenProbeBase.decision_function` (the streaming monitor in :mod:`probes.stream` uses it).

**Partial windows, one definition.** A ``window<M>`` window counts only when it is full, or, for a sequence
shorter than ``M``, as the single whole-sequence window: in training (:func:`window_means`, the CC++ loss),
offline (:class:`~activations.pooling.Pooling`, ``decision_function``) and streaming. So a stream's running
score after ``t`` tokens is the offline score of those ``t`` tokens once ``t >= M``, and does not exist
before (NaN: a prefix shorter than the window is not yet scorable); a stream that ends before ``M`` tokens
is scored by its whole window at the **end-of-stream step** (:meth:`Streamer.finish`). For every other
aggregation the running score after ``t`` tokens is the offline score of those ``t`` tokens, and the
end-of-stream score is the running score. The **stopping statistic** of a complete stream, what a monitor
stops on, is the maximum of its running scores and its end-of-stream score
(:meth:`TokenProbeBase.stopping_statistic`): the offline score for ``max``, ``ema`` and ``window``
read-outs, at least the offline score (and in general more) for ``mean``, ``last``, ``softmax``, attention
and MultiMax with a negative head weight.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from einops import einsum
from jaxtyping import Bool, Float, Int
from torch import Tensor

from activations.pooling import Pooling, ragged_to_padded, rows_like
from activations.pooling.window import Window
from probes.base import TOKENS, ArrayLike, SweepKind, as_tensor, check_sample_weight, check_y, register_scorer
from probes.cost import CostModel, ProbeCost
from probes.io import TensorSpec, affine_specs
from probes.ragged import Ragged, ragged_from_store
from probes.scorer import Probe

__all__ = [
    "HeadsProbe",
    "HeadsStreamer",
    "StreamReplay",
    "Streamer",
    "TokenProbe",
    "TokenProbeBase",
    "softmax_weighted_bce",
    "window_means",
]

WeightsFor = Literal["both", "harmful"]
TP = TypeVar("TP", bound="TokenProbeBase")


# ----------------------------------------------------------------------------------------------------------
# the CC++ loss
# ----------------------------------------------------------------------------------------------------------


def window_means(
    logits: Float[Tensor, "b s"], mask: Bool[Tensor, "b s"], window: int
) -> tuple[Float[Tensor, "b s"], Bool[Tensor, "b s"]]:
    """Sliding-window means of left-aligned per-token values and which windows count: the
    :class:`~activations.pooling.window.Window` pooling's own (``means[:, t]`` is the mean of the up to
    ``window`` values ending at ``t``; a window counts when it is full, or, for a sequence shorter than
    ``window``, when it spans the whole sequence), whose max over counted windows is that pooling."""
    return Window(window).window_means(logits, mask.sum(1))


def softmax_weighted_bce(
    z: Float[Tensor, "b s"],
    valid: Bool[Tensor, "b s"],
    y: Float[Tensor, " b"],
    tau: float = 1.0,
    sample_weight: Float[Tensor, " b"] | None = None,
    weights_for: WeightsFor = "both",
) -> Float[Tensor, ""]:
    """CC++'s softmax-weighted BCE over positions (see the module docstring for the formula).

    ``z``: per-position logits (window means), ``valid``: which positions count, ``y``: sequence labels in
    [0, 1]. Returns the (sample-weighted) mean over sequences of ``Σ_t softmax_t(z_t/τ)·BCE(y, σ(z_t))``.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if not bool(valid.any(1).all()):
        raise ValueError("every sequence needs at least one valid position")
    neg_inf = torch.tensor(-math.inf, dtype=z.dtype, device=z.device)
    w = torch.softmax(torch.where(valid, z / tau, neg_inf), dim=1)
    if weights_for == "harmful":
        uniform = valid.to(z.dtype) / valid.sum(1, keepdim=True).to(z.dtype)
        w = torch.where((y >= 0.5)[:, None], w, uniform)
    elif weights_for != "both":
        raise ValueError(f"weights_for must be 'both' or 'harmful', got {weights_for!r}")
    bce = F.softplus(z) - y[:, None] * z
    per_seq = (w * torch.where(valid, bce, torch.zeros((), dtype=z.dtype))).sum(1)
    if sample_weight is None:
        return per_seq.mean()
    return (per_seq * sample_weight).sum() / sample_weight.sum()


# ----------------------------------------------------------------------------------------------------------
# streaming
# ----------------------------------------------------------------------------------------------------------


class Streamer:
    """Causal token-by-token scoring of a batch of streams (row ``i`` is one stream), on the device of the
    activations it is fed, with a few small tensor operations per token and no host round trip.

    * :meth:`reset` starts ``batch`` empty streams;
    * :meth:`update` feeds every stream its newest token (``rows``: the streams that consume it; the others
      keep their state) and returns every stream's *running score*: the offline score of the tokens so far,
      or NaN while the stream is not yet scorable (fewer than :attr:`min_tokens` tokens: a ``window<M>``
      aggregation before its first full window);
    * :meth:`finish` is the *end-of-stream step*: every stream's score if it ends now (the single
      whole-sequence window of a stream shorter than ``M``; the running score otherwise). It does not change
      the state.

    ``peak`` is the running maximum of the scores so far (NaN before the first). The *stopping statistic* of
    a complete stream, what a monitor stops on, is ``fmax(peak, finish())`` (:meth:`stopping_statistic`).
    ``last_token_logit`` is the newest token's own logit (for display). Subclasses define the state
    (:meth:`_init_state`), one token's update (:meth:`_step`), the running score (:meth:`_score`) and, where
    it differs, the end-of-stream score (:meth:`_final`).
    """

    min_tokens: int = 1

    def __init__(self) -> None:
        self.state: dict[str, Tensor] = {}
        self.count: Tensor = torch.zeros(0, dtype=torch.long)
        self.peak: Tensor = torch.zeros(0)
        self.last_token_logit: Tensor | None = None
        self.device = torch.device("cpu")
        self._low = 0  # a lower bound of every stream's token count (host side: enables fast paths)

    # -- subclass hooks -------------------------------------------------------------------------------------
    def _to(self, device: torch.device) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def _init_state(self, batch: int) -> dict[str, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def _step(
        self, state: dict[str, Tensor], x: Float[Tensor, "b d"], n: Int[Tensor, " b"], low: int
    ) -> tuple[dict[str, Tensor], Float[Tensor, " b"]]:  # pragma: no cover - interface
        """The state after one more token and the token's logit. ``n``: each stream's token count including
        this token; ``low``: a lower bound of every stream's count before it (``low >= 1``: no stream is
        empty)."""
        raise NotImplementedError

    def _score(
        self, state: dict[str, Tensor], n: Int[Tensor, " b"]
    ) -> Float[Tensor, " b"]:  # pragma: no cover - interface
        raise NotImplementedError

    def _final(self, state: dict[str, Tensor], n: Int[Tensor, " b"]) -> Float[Tensor, " b"]:
        return self._score(state, n)

    # -- the interface --------------------------------------------------------------------------------------
    def reset(self, batch: int, device: torch.device | str | None = None) -> None:
        """Start ``batch`` empty streams (state on ``device``, default CPU)."""
        if batch < 1:
            raise ValueError(f"a streamer needs at least one stream, got batch={batch}")
        self.device = torch.device(device if device is not None else "cpu")
        self._to(self.device)
        self.count = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.peak = torch.full((batch,), math.nan, dtype=torch.float32, device=self.device)
        self.state = self._init_state(batch)
        self.last_token_logit = None
        self._low = 0

    def update(self, x: Float[Tensor, "b d"], rows: Bool[Tensor, " b"] | None = None) -> Float[Tensor, " b"]:
        """Feed each stream in ``rows`` (default: all) its newest token's activation; every stream's running
        score (NaN: not yet scorable)."""
        b = self.count.shape[0]
        if x.ndim != 2 or x.shape[0] != b:
            raise ValueError(
                f"update expects [{b}, d] activations (one token per stream), got {tuple(x.shape)}"
            )
        if x.device != self.device or x.dtype != torch.float32:
            x = x.to(device=self.device, dtype=torch.float32)
        if rows is not None and rows.device.type == "cpu" and bool(rows.all()):
            rows = None  # every stream consumes the token: no masking
        n = self.count + 1
        new, logit = self._step(self.state, x, n, self._low)
        if rows is None:
            self.state, self.count = new, n
            self._low += 1
        else:
            r = rows.to(device=self.device, dtype=torch.bool)
            self.state = {k: torch.where(rows_like(r, v), v, self.state[k]) for k, v in new.items()}
            self.count = torch.where(r, n, self.count)
        self.last_token_logit = logit
        s = self._score(self.state, self.count)
        if self._low < self.min_tokens:  # some stream may not be scorable yet
            s = torch.where(self.count >= self.min_tokens, s, math.nan)
        self.peak = torch.fmax(self.peak, s)
        return s

    def finish(self) -> Float[Tensor, " b"]:
        """The end-of-stream step: each stream's score if it ends now (NaN for a stream with no tokens)."""
        s = self._final(self.state, self.count)
        return s if self._low >= 1 else torch.where(self.count > 0, s, math.nan)

    def stopping_statistic(self) -> Float[Tensor, " b"]:
        """What a monitor stops on: the maximum of the running scores and the end-of-stream score."""
        return torch.fmax(self.peak, self.finish())


class _PoolStreamer(Streamer):
    """Running pooled value of a scalar per-token logit ``l_t = w·x_t + b``: the read-out pooling's own
    streaming form (:meth:`~activations.pooling.Pooling.step`; ``window<M>``: running max over full
    windows, NaN before the first; the whole-sequence window of a stream shorter than ``M`` at
    :meth:`finish`)."""

    def __init__(self, coef: Float[Tensor, " d"], intercept: Float[Tensor, ""], pooling: Pooling) -> None:
        super().__init__()
        self.coef = coef.detach().to(torch.float32)
        self.intercept = intercept.detach().to(torch.float32).reshape(())
        self.pool = pooling
        self.min_tokens = pooling.min_stream_tokens
        self.reset(1)

    def _to(self, device: torch.device) -> None:
        self.coef, self.intercept = self.coef.to(device), self.intercept.to(device)

    def _init_state(self, batch: int) -> dict[str, Tensor]:
        return self.pool.init(batch, self.device)

    def _step(
        self, state: dict[str, Tensor], x: Float[Tensor, "b d"], n: Int[Tensor, " b"], low: int
    ) -> tuple[dict[str, Tensor], Float[Tensor, " b"]]:
        logit = torch.addmv(self.intercept, x, self.coef)
        return self.pool.step(state, logit, n, low), logit

    def _score(self, state: dict[str, Tensor], n: Int[Tensor, " b"]) -> Float[Tensor, " b"]:
        return self.pool.read(state, n)

    def _final(self, state: dict[str, Tensor], n: Int[Tensor, " b"]) -> Float[Tensor, " b"]:
        return self.pool.finish(state, n)


@dataclass(frozen=True)
class StreamReplay:
    """Complete sequences replayed token by token through a :class:`Streamer`."""

    running: list[np.ndarray]  # per sequence, the running score after each token (NaN: not yet scorable)
    final: np.ndarray  # per sequence, the end-of-stream score

    @property
    def stopping(self) -> np.ndarray:
        """Per sequence, the stopping statistic: the max of its running scores and its end-of-stream score."""
        return np.array(
            [np.fmax(np.nanmax(r, initial=-np.inf), f) for r, f in zip(self.running, self.final, strict=True)]
        )


class HeadsStreamer(Streamer):
    """Shared parameter handling of the attention and MultiMax streamers (float32 copies on the device)."""

    _heads_key: ClassVar[str] = "q"

    def __init__(self, params: Mapping[str, Tensor]) -> None:
        super().__init__()
        self.p = {k: v.detach().to(torch.float32) for k, v in params.items()}
        self.heads = int(self.p[self._heads_key].shape[0])
        self.reset(1)

    def _to(self, device: torch.device) -> None:
        self.p = {k: v.to(device) for k, v in self.p.items()}


# ----------------------------------------------------------------------------------------------------------
# sweep kinds: a spec entry's params -> constructor arguments
# ----------------------------------------------------------------------------------------------------------

#: the training params every per-token kind takes
TRAIN_PARAMS = ("epochs", "lr", "weight_decay", "batch_size")
SWIM_PARAMS = ("window", "tau", "weights_for", *TRAIN_PARAMS)
_TRAIN_DEFAULTS: dict[str, Any] = {"epochs": 40, "lr": 0.01, "weight_decay": 0.01, "batch_size": 32}


def train_kw(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The training options of a spec entry (its ``params``, its ``seed`` and the ``hooks`` it reads)."""
    params = entry.get("params") or {}
    kw = {k: params.get(k, v) for k, v in _TRAIN_DEFAULTS.items()}
    return {
        "epochs": int(kw["epochs"]),
        "lr": float(kw["lr"]),
        "weight_decay": float(kw["weight_decay"]),
        "batch_size": int(kw["batch_size"]),
        "seed": int(entry.get("seed", 0)),
        "hooks": list(entry["hooks"]) if entry.get("hooks") is not None else None,
    }


def _linear(pools: Any) -> Any:
    def build(entry: Mapping[str, Any]) -> tuple[type[Any], dict[str, Any]]:
        return TokenProbe, {**pools(entry.get("params") or {}), **train_kw(entry)}

    return build


def _swim(p: Mapping[str, Any]) -> dict[str, Any]:
    w = int(p.get("window", 16))
    return {
        "train_pool": f"window{w}",
        "read_pool": f"window{w}",
        "loss": "softmax_weighted",
        "tau": float(p.get("tau", 1.0)),
        "weights_for": p.get("weights_for", "both"),
    }


def _ema(p: Mapping[str, Any]) -> dict[str, Any]:
    return {"train_pool": "mean", "read_pool": f"ema{float(p.get('alpha', 0.5)):g}"}


def _rolling(p: Mapping[str, Any]) -> dict[str, Any]:
    return {"train_pool": f"window{int(p.get('window', 16))}"}


def _softmax(p: Mapping[str, Any]) -> dict[str, Any]:
    return {"train_pool": f"softmax{float(p.get('tau', 1.0)):g}"}


def _fixed_pool(pool: str) -> Any:
    def pools(p: Mapping[str, Any]) -> dict[str, Any]:
        return {"train_pool": pool}

    return pools


def heads_kind(name: str, family: Any, description: str) -> SweepKind:
    """The sweep kind of a learned-aggregation family with ``heads`` (attention, MultiMax); ``family()``
    returns its class."""

    def build(entry: Mapping[str, Any]) -> tuple[type[Any], dict[str, Any]]:
        return family(), {"heads": int((entry.get("params") or {}).get("heads", 4)), **train_kw(entry)}

    build.__qualname__ = f"heads_kind.{name}"
    return SweepKind(
        name, build, uses_C=False, params=frozenset(("heads", *TRAIN_PARAMS)), description=description
    )


# ----------------------------------------------------------------------------------------------------------
# the probes
# ----------------------------------------------------------------------------------------------------------


class TokenProbeBase(Probe):
    """Shared training loop, persistence and store scoring of per-token probes.

    Subclasses define the parameters (``_init_params``), the training-time sequence logits
    (``_train_logits`` on standardized padded inputs), the folding of standardization into raw-space
    weights (``_fold``), inference on raw padded inputs (``_raw_logits``) and a :class:`Streamer`.
    """

    input_ndim: ClassVar[int] = 2
    view = TOKENS

    def __init__(
        self,
        *,
        epochs: int = 40,
        lr: float = 0.01,
        weight_decay: float = 0.01,
        batch_size: int = 32,
        seed: int = 0,
        class_weight: Literal["balanced"] | None = "balanced",
        hooks: Sequence[str] | None = None,
    ) -> None:
        if epochs < 1 or batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
        if not (lr > 0 and math.isfinite(lr)) or weight_decay < 0:
            raise ValueError(f"need lr > 0 and weight_decay >= 0, got lr={lr}, weight_decay={weight_decay}")
        if class_weight not in ("balanced", None):
            raise ValueError(f"class_weight must be 'balanced' or None, got {class_weight!r}")
        self.epochs, self.lr, self.weight_decay = int(epochs), float(lr), float(weight_decay)
        self.batch_size, self.seed, self.class_weight = int(batch_size), int(seed), class_weight
        self.hooks = list(hooks) if hooks is not None else None
        self.params_: dict[str, Tensor] = {}
        self.loss_curve_: list[float] = []

    def _base_config(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "class_weight": self.class_weight,
            "hooks": self.hooks,
        }

    # -- subclass hooks -------------------------------------------------------------------------------------
    def _init_params(self, d: int, gen: torch.Generator) -> dict[str, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def _train_loss(
        self, p: dict[str, Tensor], Z: Tensor, mask: Tensor, y: Tensor, w: Tensor
    ) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def _fold(
        self, p: dict[str, Tensor], mean: Tensor, scale: Tensor
    ) -> dict[str, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def _raw_logits(self, X: Tensor, mask: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def streamer(self) -> Streamer:  # pragma: no cover
        raise NotImplementedError

    # -- fitting --------------------------------------------------------------------------------------------
    def fit(  # type: ignore[override]
        self: TP,
        X: Ragged | tuple[Any, Any] | Sequence[ArrayLike],
        y: ArrayLike,
        sample_weight: ArrayLike | None = None,
    ) -> TP:
        """Fit on ragged per-token features ``X`` and one label per sequence."""
        R = Ragged.of(X)
        yt = check_y(y, R.n_sequences).to(torch.float32)
        wt = check_sample_weight(sample_weight, R.n_sequences)
        self.n_features_in_ = int(R.values.shape[1])
        self._fit(R, yt, wt)  # type: ignore[arg-type]
        return self

    def _fit(self, X: Any, y: Float[Tensor, " n"], sample_weight: Float[Tensor, " n"] | None) -> None:
        R: Ragged = X
        vals = R.values.to(torch.float32)
        mean = vals.mean(0)
        scale = vals.std(0, unbiased=False)
        scale = torch.where(scale > 1e-8, scale, torch.ones_like(scale))
        Xp, mask = ragged_to_padded((vals - mean) / scale, R.offsets)
        n = R.n_sequences
        hard = y >= 0.5
        w = torch.ones(n) if sample_weight is None else sample_weight.to(torch.float32).clone()
        if self.class_weight == "balanced":
            n_pos = float(hard.sum())
            w = w * torch.where(hard, n / (2 * n_pos), n / (2 * (n - n_pos)))
        gen = torch.Generator().manual_seed(self.seed)
        params = self._init_params(int(vals.shape[1]), gen)
        for t in params.values():
            t.requires_grad_(True)
        opt = torch.optim.AdamW(list(params.values()), lr=self.lr, weight_decay=self.weight_decay)
        self.loss_curve_ = []
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny matmuls: threads only add contention (restored below)
        try:
            self._train(params, opt, Xp, mask, y, w, gen)
        finally:
            torch.set_num_threads(threads)
        self.params_ = {k: v.detach().clone() for k, v in self._fold(params, mean, scale).items()}

    def _train(
        self,
        params: dict[str, Tensor],
        opt: torch.optim.Optimizer,
        Xp: Tensor,
        mask: Tensor,
        y: Tensor,
        w: Tensor,
        gen: torch.Generator,
    ) -> None:
        n = Xp.shape[0]
        with torch.enable_grad():
            for _ in range(self.epochs):
                order = torch.randperm(n, generator=gen)
                total = 0.0
                for lo in range(0, n, self.batch_size):
                    idx = order[lo : lo + self.batch_size]
                    m = mask[idx]
                    s = int(m.sum(1).max())
                    loss = self._train_loss(params, Xp[idx, :s], m[:, :s], y[idx], w[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * len(idx)
                self.loss_curve_.append(total / n)

    # -- scoring --------------------------------------------------------------------------------------------
    def decision_function(self, X: Ragged | tuple[Any, Any] | Sequence[ArrayLike]) -> Float[Tensor, " n"]:  # type: ignore[override]
        """One logit per sequence (the read-out aggregation of per-token outputs)."""
        self._check_fitted()
        R = Ragged.of(X)
        if R.values.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {R.values.shape[1]} features per token, but the probe was fitted with "
                f"{self.n_features_in_}"
            )
        return self._decision_function(R)

    def _decision_function(self, X: Any, chunk: int = 256) -> Float[Tensor, " n"]:
        R: Ragged = X
        outs = []
        with torch.no_grad():
            for lo in range(0, R.n_sequences, chunk):
                sub = R.subset(np.arange(lo, min(lo + chunk, R.n_sequences)))
                Xp, mask = sub.padded()
                outs.append(self._raw_logits(Xp.to(torch.float32), mask))
        return torch.cat(outs)

    @property
    def min_stream_tokens(self) -> int:
        """Tokens a stream needs before it has a running score (``M`` for a ``window<M>`` read-out, else 1);
        a shorter complete stream is scored only at its end-of-stream step."""
        return 1

    def prefix_scores(self, x: Float[Tensor, "s d"], *, running: bool = False) -> Float[Tensor, " s"]:
        """The offline score of every prefix ``x[:t]`` of one sequence (``t = 1..s``).

        With ``running=True``: the running score a streamer reports after ``t`` tokens of a stream that goes
        on, i.e. the same with NaN for the prefixes that are not yet scorable (``t < min_stream_tokens``).
        """
        s = x.shape[0]
        R = Ragged(
            torch.cat([x[: t + 1] for t in range(s)]), np.cumsum([0, *range(1, s + 1)]).astype(np.int64)
        )
        out = self.decision_function(R)
        if running:
            out = torch.where(torch.arange(1, s + 1) >= self.min_stream_tokens, out, math.nan)
        return out

    def replay(self, X: Ragged | tuple[Any, Any] | Sequence[ArrayLike], chunk: int = 256) -> StreamReplay:
        """Replay every complete sequence token by token through :meth:`streamer`: the running score after
        each token (NaN while not yet scorable) and the end-of-stream score."""
        R = Ragged.of(X)
        running: list[np.ndarray] = []
        finals: list[np.ndarray] = []
        st = self.streamer()
        with torch.no_grad():
            for lo in range(0, R.n_sequences, chunk):
                sub = R.subset(np.arange(lo, min(lo + chunk, R.n_sequences)))
                Xp, _ = sub.padded()
                lengths = torch.as_tensor(sub.lengths)
                st.reset(sub.n_sequences)
                out = torch.full((sub.n_sequences, Xp.shape[1]), math.nan)
                for t in range(Xp.shape[1]):
                    out[:, t] = st.update(Xp[:, t], rows=t < lengths)
                M = out.to(torch.float64).numpy()
                running += [M[i, : int(L)] for i, L in enumerate(sub.lengths)]
                finals.append(st.finish().to(torch.float64).numpy())
        return StreamReplay(running, np.concatenate(finals))

    def stream_scores(self, X: Ragged | tuple[Any, Any] | Sequence[ArrayLike]) -> list[np.ndarray]:
        """Replay every sequence token by token: the running score after each token (one array each; NaN
        while not yet scorable). See :meth:`replay` for the end-of-stream scores too."""
        return self.replay(X).running

    def stopping_statistic(self, X: Ragged | tuple[Any, Any] | Sequence[ArrayLike]) -> np.ndarray:
        """Per complete sequence, what a streaming monitor stops on: the maximum of the running score over
        the stream, the end-of-stream step included (see the module docstring)."""
        return self.replay(X).stopping

    def score_store(
        self, store: Any, hook: str | None = None, *, select: str = "scored"
    ) -> Float[Tensor, " n"]:
        """Scores of every sequence of an activation store (reads the probe's own hooks, else ``hook``)."""
        hooks = self.hooks or ([hook] if hook is not None else None)
        if not hooks:
            raise ValueError("score_store: the probe records no hooks; pass the hook name")
        return self.decision_function(ragged_from_store(store, hooks, select=select))

    def flops_per_token(self) -> float:
        raise NotImplementedError  # pragma: no cover

    def _read_out(self) -> tuple[Pooling | str, float | None]:
        """The pooling of the per-token outputs and the per-token head FLOPs (None: a linear read-out)."""
        return "last", self.flops_per_token()

    def cost(
        self, cm: CostModel, *, layers: Sequence[int] = (), pooling: Pooling | None = None
    ) -> tuple[ProbeCost, ProbeCost]:
        """Probe, then pool: every token's read-out of ``layers`` (a linear probe ``2·d·L + 1`` plus the
        read-out pooling's update, or the heads' own FLOPs), in both views."""
        pool, head = self._read_out()
        marginal, standalone = (
            cm.probe_cost(list(layers), cm.d_model, pool, view=view, order="probe_then_pool", head_flops=head)
            for view in ("marginal", "standalone")
        )
        return marginal, standalone

    @property
    def aggregation(self) -> str:  # pragma: no cover - every family names its own
        raise NotImplementedError

    def pooling_label(self, pooling: Pooling) -> str:
        """Per-token probes bring their own aggregation: the results' ``pooling`` column names it."""
        return self.aggregation

    # -- persistence ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        self._check_fitted()
        return {k: v.detach().cpu().contiguous() for k, v in self.params_.items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.params_ = {k: v.clone() for k, v in state.items()}
        self.n_features_in_ = self._n_features_from_state()

    def _n_features_from_state(self) -> int:  # pragma: no cover
        raise NotImplementedError


@register_scorer
class TokenProbe(TokenProbeBase):
    """A linear per-token probe trained through an aggregation (see the module docstring for the presets)."""

    kind = "token_linear"
    sweep_kinds = (
        SweepKind(
            "token_swim",
            _linear(_swim),
            uses_C=False,
            params=frozenset(SWIM_PARAMS),
            description="CC++ per-token probe: sliding-window mean of logits, softmax-weighted BCE (tau)",
        ),
        SweepKind(
            "token_swim_multi",
            _linear(_swim),
            per_layer=False,
            uses_C=False,
            params=frozenset(SWIM_PARAMS),
            description="CC++ per-token probe on the spec's layers concatenated (probes.layers)",
        ),
        SweepKind(
            "token_ema",
            _linear(_ema),
            uses_C=False,
            params=frozenset(("alpha", *TRAIN_PARAMS)),
            description="Cost-effective CC: trained on mean-pooled activations, read by EMA of logits + max",
        ),
        *(
            SweepKind(
                f"token_{pool}",
                _linear(_fixed_pool(pool)),
                uses_C=False,
                params=frozenset(TRAIN_PARAMS),
                description=f"{pool} of per-token logits (trained through it)",
            )
            for pool in ("max", "mean", "last")
        ),
        SweepKind(
            "token_rolling",
            _linear(_rolling),
            uses_C=False,
            params=frozenset(("window", *TRAIN_PARAMS)),
            description="rolling mean of per-token logits, then max (plain BCE)",
        ),
        SweepKind(
            "token_softmax",
            _linear(_softmax),
            uses_C=False,
            params=frozenset(("tau", *TRAIN_PARAMS)),
            description="softmax-weighted mean of per-token logits (temperature tau)",
        ),
    )

    def __init__(
        self,
        train_pool: str = "window16",
        read_pool: str | None = None,
        loss: Literal["bce", "softmax_weighted"] = "bce",
        tau: float = 1.0,
        weights_for: WeightsFor = "both",
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.train_pooling = Pooling.parse(train_pool)
        self.read_pooling = Pooling.parse(read_pool if read_pool is not None else train_pool)
        if loss not in ("bce", "softmax_weighted"):
            raise ValueError(f"loss must be 'bce' or 'softmax_weighted', got {loss!r}")
        if loss == "softmax_weighted" and not isinstance(self.train_pooling, Window):
            raise ValueError("the softmax-weighted loss is defined over windows: use train_pool='window<M>'")
        if not (tau > 0):
            raise ValueError(f"tau must be > 0, got {tau}")
        if weights_for not in ("both", "harmful"):
            raise ValueError(f"weights_for must be 'both' or 'harmful', got {weights_for!r}")
        self.loss, self.tau, self.weights_for = loss, float(tau), weights_for

    @classmethod
    def cc_plus_plus(cls, window: int = 16, tau: float = 1.0, **kw: Any) -> TokenProbe:
        """CC++: sliding-window mean of logits, softmax-weighted BCE, max over windows at inference."""
        return cls(
            train_pool=f"window{window}", read_pool=f"window{window}", loss="softmax_weighted", tau=tau, **kw
        )

    @classmethod
    def cost_effective(cls, alpha: float = 0.5, **kw: Any) -> TokenProbe:
        """Cost-effective CC: trained on mean-pooled activations, read by an EMA of logits with a max."""
        return cls(train_pool="mean", read_pool=f"ema{alpha:g}", **kw)

    @property
    def aggregation(self) -> str:
        """A short name of the probe's aggregation, e.g. ``swim16-tau1``, ``mean->ema0.5``, ``max``."""
        if isinstance(self.train_pooling, Window) and self.loss == "softmax_weighted":
            return f"swim{self.train_pooling.window}-tau{self.tau:g}"
        if self.train_pooling == self.read_pooling:
            return self.read_pooling.name
        return f"{self.train_pooling.name}->{self.read_pooling.name}"

    def get_config(self) -> dict[str, Any]:
        return {
            "train_pool": self.train_pooling.name,
            "read_pool": self.read_pooling.name,
            "loss": self.loss,
            "tau": self.tau,
            "weights_for": self.weights_for,
            **self._base_config(),
        }

    def _init_params(self, d: int, gen: torch.Generator) -> dict[str, Tensor]:
        return {"w": torch.randn(d, generator=gen) * 0.01, "b": torch.zeros(())}

    def _train_loss(self, p: dict[str, Tensor], Z: Tensor, mask: Tensor, y: Tensor, w: Tensor) -> Tensor:
        logits = einsum(Z, p["w"], "b s d, d -> b s") + p["b"]
        if isinstance(self.train_pooling, Window) and self.loss == "softmax_weighted":
            z, valid = self.train_pooling.window_means(logits, mask.sum(1))
            return softmax_weighted_bce(z, valid, y, self.tau, w, self.weights_for)
        seq = self.train_pooling(logits, mask)
        return (F.binary_cross_entropy_with_logits(seq, y, reduction="none") * w).sum() / w.sum()

    def _fold(self, p: dict[str, Tensor], mean: Tensor, scale: Tensor) -> dict[str, Tensor]:
        coef = p["w"] / scale
        return {"coef": coef, "intercept": (p["b"] - (mean * coef).sum()).reshape(1)}

    def _n_features_from_state(self) -> int:
        return int(self.params_["coef"].shape[0])

    @property
    def coef_(self) -> Float[Tensor, " d"]:
        return self.params_["coef"]

    @property
    def intercept_(self) -> Float[Tensor, ""]:
        return self.params_["intercept"][0]

    def token_logits(self, values: Float[Tensor, "n d"]) -> Float[Tensor, " n"]:
        """The per-token logit of every row."""
        self._check_fitted()
        v = as_tensor(values)
        return v.to(self.coef_.dtype) @ self.coef_ + self.intercept_

    def _raw_logits(self, X: Tensor, mask: Tensor) -> Tensor:
        logits = X @ self.coef_ + self.intercept_
        return self.read_pooling(logits, mask)

    @property
    def min_stream_tokens(self) -> int:
        return self.read_pooling.min_stream_tokens

    def streamer(self) -> Streamer:
        self._check_fitted()
        return _PoolStreamer(self.coef_, self.intercept_, self.read_pooling)

    def flops_per_token(self) -> float:
        self._check_fitted()
        assert self.n_features_in_ is not None
        return 2.0 * self.n_features_in_ + 1.0 + self.read_pooling.flops_per_element

    def _read_out(self) -> tuple[Pooling | str, float | None]:
        return self.read_pooling, None

    @classmethod
    def tensor_specs(
        cls, config: Mapping[str, Any], n_in: int, names: Sequence[str], file: Path
    ) -> dict[str, TensorSpec] | None:
        return affine_specs(n_in, [])


class HeadsProbe(TokenProbeBase):
    """Shared options and training loss of the learned-aggregation families (attention, MultiMax)."""

    def __init__(self, heads: int = 4, **kw: Any) -> None:
        super().__init__(**kw)
        if heads < 1:
            raise ValueError(f"heads must be >= 1, got {heads}")
        self.heads = int(heads)

    def get_config(self) -> dict[str, Any]:
        return {"heads": self.heads, **self._base_config()}

    def _train_loss(self, p: dict[str, Tensor], Z: Tensor, mask: Tensor, y: Tensor, w: Tensor) -> Tensor:
        seq = self._logits(p, Z, mask)
        return (F.binary_cross_entropy_with_logits(seq, y, reduction="none") * w).sum() / w.sum()

    def _logits(self, p: dict[str, Tensor], X: Tensor, mask: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def _raw_logits(self, X: Tensor, mask: Tensor) -> Tensor:
        return self._logits(self.params_, X, mask)

    @property
    def aggregation(self) -> str:
        return f"{self.kind.removeprefix('token_')}{self.heads}h"
