"""FLOPs of attack steps, from :class:`probes.cost.CostModel` (forward FLOPs; backward counted as 2×).

Per attacked example, a forward pass over its ``n`` real tokens up to block ``l`` costs
``n · f(l; n)`` with ``f(l; n)`` the cost model's forward FLOPs per token at context length ``n`` (causal
attention: the mean over the ``n`` positions, so ``n · f`` is the exact sum over positions), plus the final
norm and unembedding at the target positions only (that is all the behaviour loss needs), plus the blocks a
probe runs itself (copied fine-tuned blocks). Padding is not counted: this is the attack's work per example,
the same batched or not (the benchmark measures what batching does to wall time). The probe's own read-out
is negligible next to the forward pass and not counted.

* the prefix of every row (everything before the suffix slot) is run once and its keys and values cached
  (:class:`~.objective.PrefixCache`): it is counted once, and each step counts only the later positions
  (which still attend to the prefix: positions ``P+1..n`` cost ``n·f(n) − P·f(P)``);
* an embedding-attack step: forward + backward = 3 × forward;
* a GCG step: forward + backward for the one-hot gradient, the gradient's projection on the allowed
  tokens (``2·k·d·|V|``), and one forward pass per candidate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformer_lens import HookedTransformer

from probes.cost import CostModel

__all__ = ["BACKWARD_FACTOR", "FlopCounter"]

#: backward FLOPs per forward FLOP (gradients w.r.t. activations and inputs; the weights are frozen, but
#: the usual 2× convention is kept so figures compare with the literature)
BACKWARD_FACTOR = 2.0


@dataclass
class FlopCounter:
    """Forward FLOPs of one example's pass, cached by sequence length."""

    cost: CostModel
    _by_len: dict[int, CostModel] = field(default_factory=dict, repr=False)

    @classmethod
    def for_model(cls, model: HookedTransformer) -> FlopCounter:
        return cls(CostModel.from_config(model.cfg, context_len=int(model.cfg.n_ctx)))

    def _at(self, n: int) -> CostModel:
        if n not in self._by_len:
            self._by_len[n] = self.cost.with_context_len(max(1, n))
        return self._by_len[n]

    def _body(self, n: int, up_to_layer: int) -> float:
        """Blocks ``0..up_to_layer`` over positions ``1..n`` (the sum over positions, ``n`` × the mean)."""
        if n <= 0:
            return 0.0
        cm = self._at(n)
        if up_to_layer < 0:
            return float(n * cm.embed)
        return float(n * cm.forward_flops_per_token(up_to_layer, include_unembed=False))

    def forward(
        self, n_tokens: int, up_to_layer: int, n_logits: int = 0, extra_blocks: int = 0, cached: int = 0
    ) -> float:
        """FLOPs of a forward pass over ``n_tokens`` tokens through blocks ``0..up_to_layer`` (-1: the
        embedding only), with ``n_logits`` positions unembedded and ``extra_blocks`` more blocks run by the
        probe over every token. ``cached``: the first tokens come from a KV cache (their blocks are not run
        again; the later tokens still attend to them)."""
        if n_tokens <= 0:
            return 0.0
        total = self._body(n_tokens, up_to_layer) - self._body(min(cached, n_tokens), up_to_layer)
        cm = self._at(n_tokens)
        if extra_blocks:
            total += n_tokens * sum(b.total for b in cm.blocks[-extra_blocks:])
        return float(total + n_logits * (cm.final_norm + cm.unembed))

    def one_hot_projection(self, suffix_len: int, n_allowed: int) -> float:
        """The one-hot gradient from the embedding gradient: ``[k, d] @ [d, |V|]``."""
        return 2.0 * suffix_len * self.cost.d_model * n_allowed
