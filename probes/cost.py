"""FLOP cost of probes relative to the policy model's forward pass, derived from a TransformerLens config.

Everything is **forward FLOPs per token**, counting a multiply-add as 2 FLOPs, so a ``[d_in] @ [d_in, d_out]``
matmul costs ``2·d_in·d_out``. The numbers come from the model's :class:`HookedTransformerConfig` (never from
a hand-written table); :meth:`CostModel.from_config` accepts the config, a ``HookedTransformer`` (its
``.cfg``) or a config dict.

What is counted, per block (see :class:`BlockFlops`):

* attention projections: ``Q`` and ``O`` are ``2·d_model·n_heads·d_head`` each; ``K`` and ``V`` are
  ``2·d_model·n_kv·d_head`` each, with ``n_kv = n_key_value_heads`` (grouped-query attention) or ``n_heads``;
* attention scores ``QKᵀ`` and the weighted sum ``AV``: ``2·n_heads·d_head·a`` each, where ``a`` is the mean
  number of key positions a query attends to (below);
* MLP: ``2·d_model·d_mlp`` per matrix, 3 matrices for gated MLPs (``gated_mlp=True``, llama/gemma), else 2;
  mixture-of-experts configs (``num_experts``) pay ``experts_per_token`` MLPs plus the router
  ``2·d_model·num_experts``; nothing for ``attn_only`` models;
* norms (``LN`` ≈ 7·d: mean, centre, square-and-sum, scale, affine; ``LNPre`` ≈ 5·d; ``RMS`` ≈ 4·d;
  ``RMSPre`` ≈ 3·d): ``ln1``, ``ln2``, the extra post-norms of ``use_normalization_before_and_after``
  (gemma 2/3) and the per-head q/k norms of ``use_qk_norm``;
* other element-wise work, approximate: softmax and scaling (≈ 5 FLOPs per score), rotary embeddings (3 per
  rotated element of q and k), biases, the MLP activation (≈ 4 per element) and gate product, residual adds.

Outside the blocks: the embedding is a gather (0 FLOPs; a standard positional embedding adds ``d_model``),
the final norm, and the unembedding ``2·d_model·d_vocab_out`` (+ bias).

**Context length.** Attention cost depends on how many keys each query sees. Costs are averaged over a
sequence of ``context_len`` tokens (the same as the mean per-token cost of generating that many tokens with a
KV cache). Two accountings:

* ``attention="causal"`` (default, the useful work): the token at position ``t`` (1-based) attends to
  ``min(t, w)`` keys, ``w`` the local window (``use_local_attn`` with ``attn_types[l] == "local"`` and
  ``window_size``; gemma-style) or unbounded; the mean is ``(n+1)/2`` for global layers, i.e. about
  ``context_len/2``. Bidirectional models attend to ``min(n, w)`` keys.
* ``attention="full"``: every query scores all ``n`` keys, which is what TransformerLens's eager attention
  actually computes (it materializes the full score matrix and masks it, local layers included). Use it to
  compare with a FLOP counter on a TransformerLens model.

``attended_positions(layer, position=...)`` gives the per-position figure instead of the average.

Probe costs (per token, see the methods): a linear probe is ``2·d`` per read layer ``+ 1`` (bias); pooling
``d`` values costs the pooling's own ``flops_per_element`` (:mod:`activations.pooling`) times ``d``: ``d``
for mean (adds) and max (compares), ``3·d`` for EMA (two multiplies and an add), ``2·d`` for a sliding
window (add the new value, subtract the one leaving the window), ``≈ 4·d`` for softmax weighting (exp,
multiply, two running sums), ``0`` for last; the running-max read-out of EMA / window pooling (``d``
compares) is not included. Overhead is reported as a percentage of the policy model's full forward pass
per token, in two views:

* ``marginal``: the probe reads activations of a forward pass that happens anyway (the policy model is
  generating), so it pays only for the probe and its pooling;
* ``standalone``: a forward pass up to the probed layer is run just for the probe (no unembedding), plus the
  probe.
"""

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from transformer_lens import HookedTransformerConfig

from activations.pooling import Pooling

__all__ = [
    "NORM_FLOPS_PER_ELEMENT",
    "BlockFlops",
    "CostModel",
    "ProbeCost",
    "cascade_expected_flops",
]

AttentionAccounting = Literal["causal", "full"]
View = Literal["marginal", "standalone"]
Order = Literal["probe_then_pool", "pool_then_probe"]

#: FLOPs per element of the normalized vector, by TransformerLens ``normalization_type``.
NORM_FLOPS_PER_ELEMENT: dict[str | None, int] = {"LN": 7, "LNPre": 5, "RMS": 4, "RMSPre": 3, None: 0}
_SOFTMAX_FLOPS_PER_SCORE = 5.0  # scale, max, subtract, exp, sum, divide (≈)
_ACT_FLOPS_PER_ELEMENT = 4.0  # gelu / silu, approximate
_ROTARY_FLOPS_PER_ELEMENT = 3.0  # x·cos + rot(x)·sin


@dataclass(frozen=True)
class BlockFlops:
    """Forward FLOPs per token of one transformer block, by part."""

    layer: int
    attn_type: str
    attended: float
    q_proj: float
    k_proj: float
    v_proj: float
    o_proj: float
    attn_scores: float
    attn_mix: float
    mlp: float
    norms: float
    elementwise: float

    @property
    def attn_proj(self) -> float:
        """Q, K, V and O projections."""
        return self.q_proj + self.k_proj + self.v_proj + self.o_proj

    @property
    def attention(self) -> float:
        """Context-dependent attention matmuls: ``QKᵀ`` and ``AV``."""
        return self.attn_scores + self.attn_mix

    @property
    def matmul(self) -> float:
        """The matmul FLOPs (what ``torch.utils.flop_counter`` counts)."""
        return self.attn_proj + self.attention + self.mlp

    @property
    def total(self) -> float:
        return self.matmul + self.norms + self.elementwise


@dataclass(frozen=True)
class ProbeCost:
    """The per-token cost of a probe and its overhead relative to the policy model's full forward pass."""

    flops_per_token: float
    overhead_pct: float
    view: str
    layers: tuple[int, ...]
    probe_flops: float
    pooling_flops: float
    forward_flops: float
    pooling: str
    order: str


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    return getattr(cfg, name, default)


def _as_config(cfg: Any) -> HookedTransformerConfig:
    if isinstance(cfg, HookedTransformerConfig):
        return cfg
    if isinstance(cfg, dict):
        return HookedTransformerConfig.from_dict(cfg)
    inner = getattr(cfg, "cfg", None)
    if isinstance(inner, HookedTransformerConfig):
        return inner
    raise TypeError(
        f"expected a HookedTransformerConfig, a HookedTransformer or a config dict, got {type(cfg)}"
    )


def _mean_attended(n: int, window: float, causal: bool) -> float:
    """Mean number of keys a query attends to over positions 1..n with a window of ``window`` keys."""
    if not causal:
        return float(min(n, window))
    if window >= n:
        return (n + 1) / 2.0
    w = int(window)
    return (w * (w + 1) / 2.0 + (n - w) * w) / n


@dataclass(frozen=True)
class CostModel:
    """Per-token forward FLOPs of a TransformerLens model, and of probes relative to it.

    Build with :meth:`from_config`. ``blocks[l]`` holds the parts of block ``l``; ``embed``,
    ``final_norm`` and ``unembed`` the rest.
    """

    model_name: str
    n_layers: int
    d_model: int
    d_vocab_out: int
    context_len: int
    attention: AttentionAccounting
    blocks: tuple[BlockFlops, ...]
    embed: float
    final_norm: float
    unembed: float
    cfg: HookedTransformerConfig = field(repr=False, compare=False)

    # ------------------------------------------------------------------------------------------ building
    @classmethod
    def from_config(
        cls, cfg: Any, context_len: int = 512, attention: AttentionAccounting = "causal"
    ) -> "CostModel":
        """The cost model of ``cfg`` (a ``HookedTransformerConfig``, a ``HookedTransformer`` or a dict),
        averaged over sequences of ``context_len`` tokens, with ``attention`` accounting ``causal`` or
        ``full`` (see the module docstring)."""
        c = _as_config(cfg)
        if context_len < 1:
            raise ValueError(f"context_len must be >= 1, got {context_len}")
        if attention not in ("causal", "full"):
            raise ValueError(f"attention must be 'causal' or 'full', got {attention!r}")
        d_model, d_head, n_heads = int(c.d_model), int(c.d_head), int(c.n_heads)
        n_kv = int(_get(c, "n_key_value_heads") or n_heads)
        norm_type = _get(c, "normalization_type", "LN")
        if norm_type not in NORM_FLOPS_PER_ELEMENT:
            raise ValueError(f"unknown normalization_type {norm_type!r}")
        norm_pe = NORM_FLOPS_PER_ELEMENT[norm_type]
        attn_only = bool(_get(c, "attn_only", False))
        d_mlp = _get(c, "d_mlp")
        if not attn_only and d_mlp is None:
            raise ValueError("config has no d_mlp and is not attn_only")
        gated = bool(_get(c, "gated_mlp", False))
        n_experts = _get(c, "num_experts")
        causal = _get(c, "attention_dir", "causal") != "bidirectional"
        use_local = bool(_get(c, "use_local_attn", False))
        attn_types = _get(c, "attn_types")
        window = _get(c, "window_size")
        rotary = _get(c, "positional_embedding_type", "standard") == "rotary"
        rotary_dim = int(_get(c, "rotary_dim") or d_head) if rotary else 0
        post_norms = bool(_get(c, "use_normalization_before_and_after", False))
        qk_norm = bool(_get(c, "use_qk_norm", False))
        n = int(context_len)
        n_layers = int(c.n_layers)

        blocks = []
        for layer in range(n_layers):
            attn_type = "global"
            if use_local:
                if attn_types is None or window is None:
                    raise ValueError("use_local_attn needs attn_types and window_size in the config")
                attn_type = str(attn_types[layer])
            w = float(window) if attn_type == "local" else math.inf
            attended = float(n) if attention == "full" else _mean_attended(n, w, causal)

            q = o = 2.0 * d_model * n_heads * d_head
            k = v = 2.0 * d_model * n_kv * d_head
            scores = mix = 2.0 * n_heads * d_head * attended
            if attn_only:
                mlp = 0.0
                act = 0.0
            else:
                per_mlp = 2.0 * d_model * float(d_mlp) * (3 if gated else 2)
                act = (_ACT_FLOPS_PER_ELEMENT + (1 if gated else 0)) * float(d_mlp) + float(d_mlp) + d_model
                if n_experts:
                    k_exp = int(_get(c, "experts_per_token") or 1)
                    mlp = k_exp * per_mlp + 2.0 * d_model * int(n_experts)
                    act *= k_exp
                else:
                    mlp = per_mlp
            n_norms = (1 if attn_only else 2) * (2 if post_norms else 1)
            norms = float(n_norms * norm_pe * d_model)
            if qk_norm:
                norms += NORM_FLOPS_PER_ELEMENT["RMS"] * d_head * (n_heads + n_kv)
            elementwise = (
                _SOFTMAX_FLOPS_PER_SCORE * n_heads * attended
                + _ROTARY_FLOPS_PER_ELEMENT * rotary_dim * (n_heads + n_kv)
                + (n_heads + 2 * n_kv) * d_head
                + d_model  # attention biases
                + act
                + (1 if attn_only else 2) * d_model  # residual adds
            )
            blocks.append(
                BlockFlops(layer, attn_type, attended, q, k, v, o, scores, mix, mlp, norms, elementwise)
            )

        pos_type = _get(c, "positional_embedding_type", "standard")
        embed = float(d_model) if pos_type in ("standard", "shortformer") else 0.0
        if _get(c, "post_embedding_ln", False):
            embed += norm_pe * d_model
        final_norm_pe = NORM_FLOPS_PER_ELEMENT["RMS"] if _get(c, "final_rms", False) else norm_pe
        d_vocab_out = int(_get(c, "d_vocab_out", -1))
        if d_vocab_out <= 0:
            d_vocab_out = int(c.d_vocab)
        unembed = 2.0 * d_model * d_vocab_out + d_vocab_out
        return cls(
            model_name=str(_get(c, "model_name", "custom")),
            n_layers=n_layers,
            d_model=d_model,
            d_vocab_out=d_vocab_out,
            context_len=n,
            attention=attention,
            blocks=tuple(blocks),
            embed=embed,
            final_norm=float(final_norm_pe * d_model),
            unembed=unembed,
            cfg=c,
        )

    def with_context_len(self, context_len: int) -> "CostModel":
        """The same model's costs for another context length."""
        return CostModel.from_config(self.cfg, context_len, self.attention)

    def with_attention(self, attention: AttentionAccounting) -> "CostModel":
        """The same model's costs under another attention accounting (``causal`` or ``full``)."""
        return CostModel.from_config(self.cfg, self.context_len, attention)

    def attended_positions(self, layer: int, position: int | None = None) -> float:
        """Keys attended per query in ``layer``: the sequence average, or at a 1-based ``position``."""
        blk = self.blocks[self._layer(layer)]
        if position is None:
            return blk.attended
        if position < 1:
            raise ValueError(f"position is 1-based, got {position}")
        if self.attention == "full":
            return float(self.context_len)
        w = float(self.cfg.window_size or math.inf) if blk.attn_type == "local" else math.inf
        if self.cfg.attention_dir == "bidirectional":
            return float(min(self.context_len, w))
        return float(min(position, w))

    # ------------------------------------------------------------------------------------- forward pass
    def _layer(self, layer: int) -> int:
        li = layer + self.n_layers if layer < 0 else layer
        if not 0 <= li < self.n_layers:
            raise IndexError(f"layer {layer} out of range for a {self.n_layers}-layer model")
        return li

    def forward_flops_per_token(
        self, up_to_layer: int | None = None, include_unembed: bool = True, matmul_only: bool = False
    ) -> float:
        """FLOPs per token of the forward pass.

        ``up_to_layer=l`` (negative counts from the end): the embedding and blocks ``0..l`` inclusive, i.e.
        what it takes to compute ``blocks.{l}.hook_resid_post`` (TransformerLens ``stop_at_layer=l+1``); the
        final norm and unembedding are never included. ``up_to_layer=None``: all blocks, plus the final norm
        and unembedding when ``include_unembed``. ``matmul_only`` counts only the matmuls.
        """
        last = self.n_layers - 1 if up_to_layer is None else self._layer(up_to_layer)
        blocks = self.blocks[: last + 1]
        if matmul_only:
            total = sum(b.matmul for b in blocks)
        else:
            total = self.embed + sum(b.total for b in blocks)
        if up_to_layer is None and include_unembed:
            total += 2.0 * self.d_model * self.d_vocab_out if matmul_only else self.final_norm + self.unembed
        return float(total)

    def full_forward_flops_per_token(self) -> float:
        """The policy model's full forward pass per token, unembedding included."""
        return self.forward_flops_per_token(None, include_unembed=True)

    def breakdown(self) -> dict[str, float]:
        """Full-forward FLOPs per token by part (sums to :meth:`full_forward_flops_per_token`)."""
        parts = {
            "embed": self.embed,
            "attn_proj": sum(b.attn_proj for b in self.blocks),
            "attention": sum(b.attention for b in self.blocks),
            "mlp": sum(b.mlp for b in self.blocks),
            "norms": sum(b.norms for b in self.blocks) + self.final_norm,
            "elementwise": sum(b.elementwise for b in self.blocks),
            "unembed": self.unembed,
        }
        return {k: float(v) for k, v in parts.items()}

    def overhead_pct(self, extra_flops_per_token: float) -> float:
        """``extra_flops_per_token`` as a percentage of the full forward pass per token."""
        return 100.0 * float(extra_flops_per_token) / self.full_forward_flops_per_token()

    # ------------------------------------------------------------------------------------------- probes
    def linear_probe_flops(self, d: int | None = None, n_layers_read: int = 1) -> float:
        """A linear probe on ``n_layers_read`` layers of width ``d`` (default ``d_model``): ``2·d·L + 1``."""
        dd = self.d_model if d is None else int(d)
        if n_layers_read < 1 or dd < 1:
            raise ValueError("need d >= 1 and n_layers_read >= 1")
        return 2.0 * dd * n_layers_read + 1.0

    @staticmethod
    def pooling_flops(kind: str | Pooling, d: int = 1, **params: Any) -> float:
        """Per-token FLOPs of pooling ``d`` values (``d=1``: pooling per-token probe scores): the pooling's
        own ``flops_per_element`` times ``d`` (:mod:`activations.pooling`: ``mean`` and ``max`` 1,
        ``ema`` 3, ``window`` 2, ``softmax`` ≈ 4, ``last`` 0, ...). ``kind`` is a :class:`Pooling`, a spec
        such as ``"ema0.5"`` or an alias (``sliding_window``, ``exp``, ``attention``). ``params``
        (``alpha``, ``window``, ``temperature``) are accepted for symmetry with :class:`Pooling`; they do not
        change the per-token cost.
        """
        pool = Pooling.parse(kind, aliases=True)
        own = {f.name for f in dataclasses.fields(pool)}
        if params:
            pool = dataclasses.replace(pool, **{k: v for k, v in params.items() if k in own})
        if d < 1:
            raise ValueError(f"d must be >= 1, got {d}")
        return pool.flops_per_element * d

    def sae_encoder_flops(self, d: int | None, d_sae: int, k_selected: int | None = None) -> float:
        """An SAE encoder read ``2·d·d_sae`` (or ``2·d·k`` when only ``k_selected`` latents are computed)."""
        dd = self.d_model if d is None else int(d)
        width = int(d_sae) if k_selected is None else int(k_selected)
        if k_selected is not None and not 0 < k_selected <= d_sae:
            raise ValueError(f"k_selected must be in [1, d_sae={d_sae}], got {k_selected}")
        return 2.0 * dd * width

    def finetuned_layers_flops(self, k: int, head_outputs: int = 1) -> float:
        """A fine-tuned copy of the last ``k`` blocks, the final norm and a linear head (``head_outputs``)."""
        if not 0 <= k <= self.n_layers:
            raise ValueError(f"k must be in [0, {self.n_layers}], got {k}")
        blocks = self.blocks[self.n_layers - k :] if k else ()
        head = (2.0 * self.d_model + 1.0) * head_outputs
        return float(sum(b.total for b in blocks) + self.final_norm + head)

    def standalone_flops(self, other: Any, include_unembed: bool = True) -> float:
        """Full forward FLOPs per token of another model (config, ``HookedTransformer`` or CostModel).

        A config is costed at this model's ``context_len`` and attention accounting. With
        ``include_unembed=False`` the unembedding is replaced by a final norm and a 1-logit linear head
        (a classifier built on that model).
        """
        cm = (
            other
            if isinstance(other, CostModel)
            else CostModel.from_config(other, self.context_len, self.attention)
        )
        if include_unembed:
            return cm.full_forward_flops_per_token()
        return (
            cm.forward_flops_per_token(None, include_unembed=False) + cm.final_norm + 2.0 * cm.d_model + 1.0
        )

    def cost_views(
        self,
        marginal: float,
        standalone: float,
        forward: float = 0.0,
        layers: Sequence[int] = (),
        name: str = "",
    ) -> tuple[ProbeCost, ProbeCost]:
        """(marginal, standalone) :class:`ProbeCost` of a scorer from its per-token totals in each view;
        ``forward`` is the part of the standalone total that is the policy model's own forward pass (0 for a
        scorer with a forward pass of its own, whose two views are equal)."""

        def one(view: View, flops: float, fwd: float) -> ProbeCost:
            return ProbeCost(
                flops_per_token=flops,
                overhead_pct=self.overhead_pct(flops),
                view=view,
                layers=tuple(layers),
                probe_flops=flops - fwd,
                pooling_flops=0.0,
                forward_flops=fwd,
                pooling=name,
                order="probe_then_pool",
            )

        return one("marginal", float(marginal), 0.0), one("standalone", float(standalone), float(forward))

    def probe_cost(
        self,
        layers: int | Sequence[int],
        d: int | None = None,
        pooling: str | Pooling = "mean",
        view: View = "marginal",
        order: Order = "probe_then_pool",
        head_flops: float | None = None,
    ) -> ProbeCost:
        """Per-token cost and overhead of a probe reading ``layers`` (resid_post) of width ``d``.

        ``order="probe_then_pool"``: the probe scores every token and the scalar scores are pooled
        (streaming monitoring). ``"pool_then_probe"``: the ``d·len(layers)`` activations are pooled per token
        and the probe runs once per sequence (its cost amortized over ``context_len``). ``head_flops``
        replaces the linear probe's per-evaluation cost (e.g. an SAE encoder plus a linear read).
        ``view="standalone"`` adds a forward pass through the deepest read layer.
        """
        if view not in ("marginal", "standalone"):
            raise ValueError(f"view must be 'marginal' or 'standalone', got {view!r}")
        if order not in ("probe_then_pool", "pool_then_probe"):
            raise ValueError(f"order must be 'probe_then_pool' or 'pool_then_probe', got {order!r}")
        ls = (layers,) if isinstance(layers, int) else tuple(layers)
        if not ls:
            raise ValueError("layers must not be empty")
        ls = tuple(self._layer(x) for x in ls)
        dd = self.d_model if d is None else int(d)
        head = self.linear_probe_flops(dd, len(ls)) if head_flops is None else float(head_flops)
        pool = Pooling.parse(pooling, aliases=True)
        if order == "probe_then_pool":
            probe, pool_f = head, self.pooling_flops(pool, 1)
        else:
            probe, pool_f = head / self.context_len, self.pooling_flops(pool, dd * len(ls))
        fwd = self.forward_flops_per_token(max(ls), include_unembed=False) if view == "standalone" else 0.0
        total = probe + pool_f + fwd
        return ProbeCost(
            flops_per_token=total,
            overhead_pct=self.overhead_pct(total),
            view=view,
            layers=ls,
            probe_flops=probe,
            pooling_flops=pool_f,
            forward_flops=fwd,
            pooling=pool.name,
            order=order,
        )

    def summary(self) -> dict[str, Any]:
        """A flat, JSON-friendly summary (for results tables and reports)."""
        return {
            "model_name": self.model_name,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "context_len": self.context_len,
            "attention": self.attention,
            "full_forward_flops_per_token": self.full_forward_flops_per_token(),
            **{f"flops_{k}": v for k, v in self.breakdown().items()},
        }

    def __post_init__(self) -> None:
        if len(self.blocks) != self.n_layers:
            raise ValueError("blocks must have one entry per layer")


def cascade_expected_flops(c1: float | ProbeCost, c2: float | ProbeCost, escalation_rate: float) -> float:
    """Expected per-token FLOPs of a two-stage cascade: ``c1 + escalation_rate·c2``."""
    if not 0.0 <= escalation_rate <= 1.0:
        raise ValueError(f"escalation_rate must be in [0, 1], got {escalation_rate}")
    f1 = c1.flops_per_token if isinstance(c1, ProbeCost) else float(c1)
    f2 = c2.flops_per_token if isinstance(c2, ProbeCost) else float(c2)
    return f1 + escalation_rate * f2
