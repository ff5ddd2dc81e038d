"""SAE-feature probes: a logistic read-out of the top-k SAE latents (or of all of them), pooled over tokens.

Recipe (after Kantamneni, Engels et al., "Are sparse autoencoders useful? A case study in sparse probing"):
encode every token with the SAE, pool each latent over the sequence's scored tokens (the same
:class:`~activations.pooling.Pooling` as raw probes), pick the ``k`` latents with the largest class-mean
difference of the pooled latents on the training set (:func:`select_latents`), and fit an L2 (or L1)
logistic probe on them (:meth:`probes.logistic.LogisticProbe.fit_grid`, C chosen on validation by the sweep).
``k=None`` is the dense probe on every latent.

:class:`SAEFeatureProbe` is a registered :class:`~probes.base.Probe` (kind ``sae_feature``) whose
``decision_function`` takes the *pooled selected latents* ``[n, k]`` (what it was fitted on); it also carries
its own encoder (only the ``k`` encoder columns for ReLU / JumpReLU SAEs, the whole encoder for top-k SAEs),
so :meth:`SAEFeatureProbe.score_tokens` / :meth:`SAEFeatureProbe.score_store` score raw activations with no
SAE at hand. Saved with safetensors + JSON like every probe (``encoder.*`` and ``head.*`` tensors), plus a
reference to the SAE folder it came from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from activations.pooling import Pooling
from activations.store import ActivationStore
from probes.base import SAE_LATENTS, SweepKind, as_tensor, register_scorer
from probes.cost import CostModel, ProbeCost
from probes.io import FLOATS, INTS, Dim, ProbeLoadError, TensorSpec, affine_specs
from probes.logistic import LogisticProbe
from probes.scorer import Grid, Probe
from probes.solver import ClassWeight, Penalty
from sae.features import LatentEncoder, pooled_latents

__all__ = ["SAE_PARAMS", "SAEFeatureProbe", "fit_heads", "sae_probe_cost", "select_latents"]

#: the params of the SAE sweep kinds: where the SAE comes from, how it is trained, the head's penalty
SAE_PARAMS = (
    "sae",
    "architecture",
    "expansion_factor",
    "l1_coefficient",
    "topk",
    "train_tokens",
    "batch_size",
    "lr",
    "sae_data",
    "sae_data_subsample",
    "ce_sequences",
    "head_penalty",
)
#: the head options of the config (the head is a :class:`~probes.logistic.LogisticProbe`)
_HEAD_KEYS = ("C", "penalty", "l1_ratio", "class_weight")


def _sae_kind(k: int | None) -> Any:
    """A sweep kind's builder: ``k`` latents (None: every latent, or ``params.k`` for the ``sae`` kind)."""

    def build(entry: Mapping[str, Any]) -> tuple[type[Any], dict[str, Any]]:
        p = entry.get("params") or {}
        return SAEFeatureProbe, {
            "k": k,
            "penalty": p.get("head_penalty", "l2"),
            "class_weight": entry.get("class_weight", "balanced"),
        }

    return build


def select_latents(
    Z: Float[Tensor, "n m"], y: Float[Tensor, " n"] | np.ndarray, k: int | None
) -> Int[Tensor, " k"]:
    """Indices of the ``k`` latents with the largest |mean over harmful − mean over harmless| (descending).

    ``k=None`` (or ``k >= m``) returns every latent in index order. Ties keep the lower index first.
    """
    Z = as_tensor(Z).to(torch.float32)
    yy = as_tensor(y, name="y").flatten() >= 0.5
    if Z.ndim != 2 or yy.shape[0] != Z.shape[0]:
        raise ValueError(f"need Z [n, m] and y [n]; got {tuple(Z.shape)} and {tuple(yy.shape)}")
    if bool(yy.all()) or not bool(yy.any()):
        raise ValueError("select_latents needs both classes in y")
    m = Z.shape[1]
    if k is None or k >= m:
        if k is not None and k > m:
            raise ValueError(f"k={k} exceeds the number of SAE latents ({m})")
        return torch.arange(m)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    diff = (Z[yy].mean(0) - Z[~yy].mean(0)).abs()
    order = torch.argsort(-diff.double(), stable=True)
    return order[:k].clone()


@register_scorer
class SAEFeatureProbe(Probe):
    """Logistic read-out of ``k`` pooled SAE latents; carries the encoder of those latents.

    Build one with :meth:`build` (from a fitted :class:`LogisticProbe` head and a :class:`LatentEncoder`) or
    fit the head here with :meth:`fit` on pooled latents after :meth:`set_encoder`.
    """

    kind = "sae_feature"
    view = SAE_LATENTS
    sweep_kinds = (
        *(
            SweepKind(
                f"sae_k{k}",
                _sae_kind(k),
                params=frozenset(SAE_PARAMS),
                description=f"logistic probe on the top-{k} SAE latents by class-mean difference "
                "(pooled latents)",
            )
            for k in (1, 8, 64, 512)
        ),
        SweepKind(
            "sae_dense",
            _sae_kind(None),
            params=frozenset(SAE_PARAMS),
            description="logistic probe on every SAE latent (pooled)",
        ),
        SweepKind(
            "sae",
            _sae_kind(None),
            params=frozenset((*SAE_PARAMS, "k")),
            description="SAE-feature probe with params.k latents ('all': dense)",
        ),
    )

    def __init__(
        self,
        C: float = 1.0,
        penalty: Penalty = "l2",
        l1_ratio: float = 0.5,
        class_weight: ClassWeight = "balanced",
        k: int | None = None,
        pooling: Mapping[str, Any] | str = "mean",
        hook: str = "",
        sae_ref: str = "",
        activation: str = "relu",
        topk: int = 0,
        d_sae: int = 0,
    ) -> None:
        self.head = LogisticProbe(C=C, penalty=penalty, l1_ratio=l1_ratio, class_weight=class_weight)
        self.k = None if k is None else int(k)
        self.pooling = Pooling.parse(dict(pooling) if isinstance(pooling, Mapping) else pooling)
        self.hook, self.sae_ref = hook, sae_ref
        self.activation, self.topk, self.d_sae = activation, int(topk), int(d_sae)
        self.encoder_: LatentEncoder | None = None
        self.head_: LogisticProbe | None = None

    # ---------------------------------------------------------------- construction
    @classmethod
    def build(
        cls,
        encoder: LatentEncoder,
        head: LogisticProbe,
        *,
        k: int | None,
        pooling: Pooling | str,
        hook: str = "",
        sae_ref: str = "",
    ) -> SAEFeatureProbe:
        """A fitted probe from an encoder of the selected latents and a fitted head on their pooled values."""
        if not head.is_fitted:
            raise ValueError("the head must be fitted")
        if head.n_features_in_ != encoder.n_latents:
            raise ValueError(
                f"the head reads {head.n_features_in_} features, the encoder gives {encoder.n_latents}"
            )
        p = cls(
            **{key: head.get_config()[key] for key in _HEAD_KEYS},
            k=k,
            pooling=Pooling.parse(pooling).params(),
            hook=hook,
            sae_ref=sae_ref,
            **encoder.config(),
        )
        p.encoder_, p.head_ = encoder, head
        p.n_features_in_ = encoder.n_latents
        return p

    def set_encoder(self, encoder: LatentEncoder) -> SAEFeatureProbe:
        self.encoder_ = encoder
        self.activation, self.topk, self.d_sae = encoder.activation, encoder.topk, encoder.d_sae
        return self

    @property
    def latent_ids(self) -> Int[Tensor, " k"]:
        """The selected latents' indices in the SAE."""
        self._check_encoder()
        assert self.encoder_ is not None
        return self.encoder_.ids

    @property
    def coef(self) -> Float[Tensor, " k"]:
        """The head's weights on the raw pooled latents (one per selected latent)."""
        self._check_fitted()
        assert self.head_ is not None and self.head_.coef_ is not None
        return self.head_.coef_

    def _check_encoder(self) -> None:
        if self.encoder_ is None:
            raise RuntimeError("this SAEFeatureProbe has no encoder; call set_encoder() or build()")

    # ---------------------------------------------------------------- Probe API (on pooled latents)
    def _fit(self, X: Tensor, y: Float[Tensor, " n"], sample_weight: Float[Tensor, " n"] | None) -> None:
        self._check_encoder()
        assert self.encoder_ is not None
        if X.shape[1] != self.encoder_.n_latents:
            raise ValueError(f"X has {X.shape[1]} latents, the encoder gives {self.encoder_.n_latents}")
        self.head_ = LogisticProbe(**self.head.get_config()).fit(X, y, sample_weight)

    def _decision_function(self, X: Tensor) -> Float[Tensor, " n"]:
        assert self.head_ is not None
        return self.head_.decision_function(X)

    # ---------------------------------------------------------------- scoring raw activations
    def encode(self, acts: Float[Tensor, "t d"]) -> Float[Tensor, "t k"]:
        """The selected latents of per-token activations."""
        self._check_encoder()
        assert self.encoder_ is not None
        return self.encoder_(as_tensor(acts).to(torch.float32))

    def score_tokens(self, acts: Float[Tensor, "t d"], offsets: np.ndarray | Tensor) -> Float[Tensor, " n"]:
        """Logits of ragged sequences of raw activations (sequence i is ``acts[offsets[i]:offsets[i+1]]``)."""
        return self.decision_function(self.pooling.ragged(self.encode(acts), offsets))

    def score_store(
        self, store: ActivationStore, hook: str | None = None, *, select: str = "scored"
    ) -> Float[Tensor, " n"]:
        """Logits of every sequence of a store (reads ``hook``, default the probe's own)."""
        h = hook or self.hook
        if not h:
            raise ValueError("give the hook: the probe does not record one")
        self._check_encoder()
        Z = pooled_latents(store, h, self.encoder_, self.pooling, select=select)
        return self.decision_function(Z)

    def flops_per_token(self) -> float:
        """Encoder of the computed latents per token, plus a per-token linear read of the ``k`` latents."""
        self._check_fitted()
        assert self.encoder_ is not None
        return self.encoder_.flops_per_token() + 2.0 * self.encoder_.n_latents + 1.0

    # ---------------------------------------------------------------- persistence
    def get_config(self) -> dict[str, Any]:
        head = self.head.get_config()
        return {
            **{key: head[key] for key in _HEAD_KEYS},
            "k": self.k,
            "pooling": self.pooling.params(),
            "hook": self.hook,
            "sae_ref": self.sae_ref,
            "activation": self.activation,
            "topk": self.topk,
            "d_sae": self.d_sae,
        }

    def state_dict(self) -> dict[str, Tensor]:
        self._check_fitted()
        assert self.encoder_ is not None and self.head_ is not None
        return {
            **self.encoder_.state_dict("encoder."),
            **{f"head.{k}": v for k, v in self.head_.state_dict().items()},
        }

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.encoder_ = LatentEncoder.from_state(
            {"activation": self.activation, "topk": self.topk, "d_sae": self.d_sae}, state, "encoder."
        )
        head = LogisticProbe(**self.head.get_config())
        head.load_state_dict({k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")})
        self.head_ = head
        self.n_features_in_ = head.n_features_in_

    # ---------------------------------------------------------------- a saved folder
    @classmethod
    def tensor_specs(
        cls, config: Mapping[str, Any], n_in: int, names: Sequence[str], file: Path
    ) -> dict[str, TensorSpec] | None:
        """The encoder of the selected latents (``encoder.*``: its columns, or the whole encoder of a top-k
        SAE with its selection) and the head (``head.*``)."""
        act = config.get("activation", "relu")
        m: Dim = n_in if act in ("relu", "jumprelu") else "m"
        specs: dict[str, TensorSpec] = {
            "encoder.W": (("d_in", m), FLOATS),
            "encoder.b": ((m,), FLOATS),
            "encoder.b_in": (("d_in",), FLOATS),
            "encoder.ids": ((n_in,), INTS),
        }
        if act == "jumprelu":
            specs["encoder.threshold"] = ((m,), FLOATS)
        elif act == "topk":
            specs["encoder.select"] = ((n_in,), INTS)
            if "encoder.scale" in names:
                specs["encoder.scale"] = ((m,), FLOATS)
        elif act != "relu":
            raise ProbeLoadError(f"{file}: config.activation must be relu, jumprelu or topk, got {act!r}")
        specs.update(affine_specs(n_in, names, "head."))
        return specs

    @classmethod
    def check_state(cls, config: Mapping[str, Any], state: Mapping[str, Tensor], file: Path) -> None:
        """Latent indices within the SAE, the selection within the encoder, top-k within its width."""
        d_sae = config.get("d_sae", 0)
        ids, m = state["encoder.ids"], int(state["encoder.W"].shape[1])
        if ids.numel() and (
            int(ids.min()) < 0 or (isinstance(d_sae, int) and d_sae > 0 and int(ids.max()) >= d_sae)
        ):
            raise ProbeLoadError(f"{file}: tensor encoder.ids: latent indices outside [0, d_sae={d_sae})")
        sel = state.get("encoder.select")
        if sel is not None and sel.numel() and (int(sel.min()) < 0 or int(sel.max()) >= m):
            raise ProbeLoadError(f"{file}: tensor encoder.select: indices outside [0, {m})")
        topk = config.get("topk", 0)
        if config.get("activation") == "topk" and not (isinstance(topk, int) and 0 < topk <= m):
            raise ProbeLoadError(f"{file}: config.topk must be in [1, {m}] for a top-k encoder, got {topk!r}")


def sae_probe_cost(
    cost: CostModel,
    layer: int,
    encoder: LatentEncoder,
    pooling: Pooling | str,
    view: str = "marginal",
) -> ProbeCost:
    """Per-token cost of an SAE-feature probe on ``layer``.

    Every token runs the encoder of the latents it needs: ``2·d·k`` (:meth:`CostModel.sae_encoder_flops`
    with ``k_selected``) for a ReLU / JumpReLU SAE, the full ``2·d·d_sae`` for a top-k SAE (its latents
    compete) or a dense probe; the ``k`` latents are pooled per token; the linear head (``2k + 1``) runs once
    per sequence, amortized over the context. ``view="standalone"`` adds the forward pass to ``layer``.
    """
    pool = Pooling.parse(pooling)
    d_sae = encoder.d_sae or encoder.n_computed
    k_comp = encoder.n_computed
    enc_f = cost.sae_encoder_flops(encoder.d_in, d_sae, k_selected=k_comp if k_comp < d_sae else None)
    head_f = (2.0 * encoder.n_latents + 1.0) / cost.context_len
    pool_f = cost.pooling_flops(pool, encoder.n_latents)
    fwd = cost.forward_flops_per_token(layer, include_unembed=False) if view == "standalone" else 0.0
    total = enc_f + head_f + pool_f + fwd
    return ProbeCost(
        flops_per_token=total,
        overhead_pct=cost.overhead_pct(total),
        view=view,
        layers=(int(layer),),
        probe_flops=enc_f + head_f,
        pooling_flops=pool_f,
        forward_flops=fwd,
        pooling=pool.name,
        order="pool_then_probe",
    )


def fit_heads(
    Z_train: Float[Tensor, "n m"],
    y: Float[Tensor, " n"] | np.ndarray,
    ks: Sequence[int | None],
    Cs: Sequence[float],
    *,
    penalty: Penalty = "l2",
    class_weight: ClassWeight = "balanced",
) -> dict[int | None, tuple[Int[Tensor, " k"], Grid]]:
    """For each ``k``: the selected latents and the logistic heads on their pooled values (every C in one
    solve: :meth:`~probes.logistic.LogisticProbe.fit_grid`)."""
    yt = torch.as_tensor(np.asarray(y), dtype=torch.float32)
    out: dict[int | None, tuple[Tensor, Grid]] = {}
    for k in ks:
        sel = select_latents(Z_train, yt, k)
        out[k] = (
            sel,
            LogisticProbe.fit_grid([Z_train[:, sel]], yt, Cs, penalty=penalty, class_weight=class_weight),
        )
    return out
