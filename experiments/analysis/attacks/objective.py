"""Attacked inputs, the batched forward pass with a free suffix, and the attack objective.

An attacked prompt is the harmful prompt rendered exactly as the probe's training data was
(:func:`activations.render.render_example`: chat template, roles, BOS), with ``k`` suffix tokens inserted
inside the last user turn, right after its text (``placement="suffix"``) or right before it (``"prefix"``),
so before the end-of-turn tokens and the generation prompt. A target completion (the *behaviour*) follows
the generation prompt. One right-padded row per example::

    [ prefix (template + user text) | suffix (k) | post (end of turn + generation prompt) | target | pad ]

:func:`run_model` runs the model on a :class:`Batch` with TransformerLens hooks: one on ``hook_embed``
replaces the embeddings at the suffix positions by free vectors (the embedding attack, or one-hot
indicators times the embedding matrix for GCG's gradient), the others keep the probe's activations (in the
autograd graph). The pass stops after the deepest block it needs; when the behaviour loss is wanted it runs
every block and applies the final norm and the unembedding at the target positions only.

:func:`evaluate` gives, per example, the probe's pre-threshold score, the behaviour cross-entropy, whether the
behaviour is kept and the attack loss ``probe_loss + λ · behaviour_loss`` (see the package docstring).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from activations.data import Example, Message
from activations.render import ROLE_PROMPT, ROLE_RESPONSE, render_example, render_text

__all__ = [
    "ROLE_PAD",
    "AttackError",
    "Batch",
    "Evaluation",
    "ForwardOut",
    "Objective",
    "Placement",
    "PrefixCache",
    "PreparedExample",
    "ProbeLayerWarning",
    "Scorer",
    "allowed_token_ids",
    "attach_targets",
    "behaviour_metrics",
    "build_batch",
    "build_prefix_cache",
    "evaluate",
    "example_generator",
    "hook_layer",
    "prepare",
    "replays_as_text",
    "run_model",
    "stop_layer_for",
    "suffix_text",
]

Placement = Literal["suffix", "prefix"]
ROLE_PAD = -1
_SLOT = "\u27e6probe-atlas-attack-slot\u27e7"


class AttackError(ValueError):
    """Bad input to an attack (data, probe, model, budget): the message names what and why."""


class ProbeLayerWarning(UserWarning):
    """The probe reads where hiding from it and keeping the behaviour are in direct conflict."""


@runtime_checkable
class Scorer(Protocol):
    """What :func:`evaluate` needs of a probe: the hooks it reads, the roles of the tokens it reads, the
    blocks it runs itself (FLOPs) and a differentiable score ``score(acts, mask, attention_mask) -> [b]``
    (see :mod:`.adapters`)."""

    hooks: tuple[str, ...]
    roles: tuple[int, ...]
    extra_blocks: int

    def score(
        self,
        acts: Mapping[str, Float[Tensor, "b s d"]],
        mask: Bool[Tensor, "b s"],
        attention_mask: Int[Tensor, "b s"] | None = None,
    ) -> Float[Tensor, " b"]:  # pragma: no cover - interface
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------------
# attacked inputs
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedExample:
    """One harmful prompt split around its suffix slot, with its target completion.

    ``prefix_ids + post_ids`` are exactly :func:`~activations.render.render_example`'s ids of the clean
    prompt (checked), ``text_before + text_after`` its rendered text."""

    example: Example
    placement: Placement
    prefix_ids: np.ndarray
    prefix_roles: np.ndarray
    post_ids: np.ndarray
    post_roles: np.ndarray
    text_before: str
    text_after: str
    bos: bool  # a BOS token was prepended to the rendered text
    target_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def clean_ids(self) -> np.ndarray:
        return np.concatenate([self.prefix_ids, self.post_ids])

    @property
    def n_prompt(self) -> int:
        return int(len(self.prefix_ids) + len(self.post_ids))

    def with_target(self, target_ids: Sequence[int] | np.ndarray) -> PreparedExample:
        return replace(self, target_ids=np.asarray(target_ids, dtype=np.int64))

    def attacked_example(self, text: str) -> Example:
        """The example with ``text`` (a decoded suffix, its separator included) put into its slot."""
        msgs = self.example.as_messages()
        i = _last_user(msgs, self.example.id)
        content = msgs[i].content + text if self.placement == "suffix" else text + msgs[i].content
        if self.example.text is not None:
            return replace(self.example, text=content)
        new = (*msgs[:i], Message("user", content), *msgs[i + 1 :])
        return replace(self.example, messages=new)


def _last_user(msgs: Sequence[Message], ex_id: str) -> int:
    for i in range(len(msgs) - 1, -1, -1):
        if msgs[i].role == "user":
            return i
    raise AttackError(f"example {ex_id!r} has no user turn to attack")


def prepare(
    model: HookedTransformer,
    examples: Sequence[Example],
    *,
    placement: Placement = "suffix",
    max_len: int | None = None,
    use_chat_template: bool | None = None,
) -> list[PreparedExample]:
    """Render every example as the probe's training data was and split it at the suffix slot.

    Errors (:class:`AttackError`) name the example: an exchange (a response is already there), a prompt
    longer than ``max_len``, a tokenizer that merges a token across the slot, a template that changes the
    user text."""
    tok = model.tokenizer
    if tok is None:
        raise AttackError("the model has no tokenizer")
    if placement not in ("suffix", "prefix"):
        raise AttackError(f"placement must be 'suffix' or 'prefix', got {placement!r}")
    max_len = int(max_len or model.cfg.n_ctx)
    out = []
    for ex in examples:
        if ex.is_exchange:
            raise AttackError(
                f"example {ex.id!r} is an exchange: attacks take prompts (the target completion is the "
                "behaviour)"
            )
        msgs = ex.as_messages()
        i = _last_user(msgs, ex.id)
        content = msgs[i].content
        slotted_content = content + _SLOT if placement == "suffix" else _SLOT + content
        slotted = replace(
            ex,
            text=None,
            messages=(*msgs[:i], Message("user", slotted_content), *msgs[i + 1 :]),
        )
        text, _ = render_text(ex, tok, use_chat_template)
        stext, _ = render_text(slotted, tok, use_chat_template)
        at = stext.find(_SLOT)
        if at < 0 or stext.replace(_SLOT, "", 1) != text:
            raise AttackError(
                f"example {ex.id!r}: the chat template changes the user text around the attack slot"
            )
        rendered = render_example(ex, tok, max_len=max_len, use_chat_template=use_chat_template)
        if rendered.n_truncated:
            raise AttackError(
                f"example {ex.id!r}: {len(rendered.ids) + rendered.n_truncated} prompt tokens exceed "
                f"max_len={max_len}"
            )
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        bos = len(rendered.ids) == len(ids) + 1
        if not np.array_equal(rendered.ids[int(bos) :], ids):
            raise AttackError(
                f"example {ex.id!r}: cannot reproduce the rendered token ids"
            )  # pragma: no cover
        cut = len(ids)
        for j, (a, b) in enumerate(enc["offset_mapping"]):
            if a < at < b:
                raise AttackError(
                    f"example {ex.id!r}: token {j} ({tok.decode([int(ids[j])])!r}) spans the attack slot; "
                    "the tokenizer merges the user text with the template here"
                )
            if a >= at and b > a:
                cut = j
                break
        cut += int(bos)
        out.append(
            PreparedExample(
                example=ex,
                placement=placement,
                prefix_ids=rendered.ids[:cut].copy(),
                prefix_roles=rendered.roles[:cut].copy(),
                post_ids=rendered.ids[cut:].copy(),
                post_roles=rendered.roles[cut:].copy(),
                text_before=text[:at],
                text_after=text[at:],
                bos=bos,
            )
        )
    return out


def attach_targets(
    prepared: Sequence[PreparedExample], targets: Sequence[Sequence[int] | np.ndarray]
) -> list[PreparedExample]:
    if len(targets) != len(prepared):
        raise AttackError(f"{len(targets)} targets for {len(prepared)} examples")
    return [p.with_target(t) for p, t in zip(prepared, targets, strict=True)]


def suffix_text(tokenizer: Any, suffix_ids: Sequence[int], placement: Placement = "suffix") -> str:
    """The text of a token suffix as it goes into the user turn: the decoded tokens, with a space between
    them and the user text unless the decoded text already starts (ends, for a prefix) with whitespace."""
    s = tokenizer.decode([int(i) for i in suffix_ids], clean_up_tokenization_spaces=False)
    if not s:
        return s
    if placement == "suffix":
        return s if s[0].isspace() else " " + s
    return s if s[-1].isspace() else s + " "


def replays_as_text(
    tokenizer: Any, prepared: Sequence[PreparedExample], suffixes: Sequence[Sequence[int]]
) -> list[bool]:
    """Whether each (example, token suffix) pair, written out as text and rendered again, gives back exactly
    ``prefix + suffix + post`` (so the attack works on the text a user can send, not only on ids)."""
    texts = []
    for p, s in zip(prepared, suffixes, strict=True):
        texts.append(p.text_before + suffix_text(tokenizer, s, p.placement) + p.text_after)
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    out = []
    for p, s, ids in zip(prepared, suffixes, enc, strict=True):
        want = np.concatenate([p.prefix_ids[int(p.bos) :], np.asarray(s, dtype=np.int64), p.post_ids])
        out.append(bool(len(ids) == len(want) and np.array_equal(np.asarray(ids, dtype=np.int64), want)))
    return out


def allowed_token_ids(tokenizer: Any, *, ascii_only: bool = True) -> Int[Tensor, " v"]:
    """The token set a token suffix may use: no special or added tokens, a non-empty decoded string that is
    not only whitespace and (``ascii_only``) printable ASCII."""
    special = set(int(i) for i in tokenizer.all_special_ids)
    special |= set(int(i) for i in tokenizer.get_added_vocab().values())
    keep = []
    n = len(tokenizer)
    for i in range(n):
        if i in special:
            continue
        s = tokenizer.decode([i], clean_up_tokenization_spaces=False)
        if not s.strip() or "\ufffd" in s:
            continue
        if ascii_only and not (s.isascii() and s.isprintable()):
            continue
        keep.append(i)
    if not keep:
        raise AttackError("the tokenizer has no token a suffix may use")
    return torch.tensor(keep, dtype=torch.long)


def example_generator(seed: int, example_id: str) -> torch.Generator:
    """A generator seeded by (seed, example id) only: an example's random choices do not depend on the other
    examples of its batch."""
    h = hashlib.sha256(f"{seed}:{example_id}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))


# ----------------------------------------------------------------------------------------------------------
# batches
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """Right-padded rows ``prefix | suffix | post | target``; ``roles`` is -1 on padding, suffix tokens are
    prompt tokens (role 1), target tokens response tokens (role 2)."""

    tokens: Int[Tensor, "b s"]
    attention_mask: Int[Tensor, "b s"]
    roles: Int[Tensor, "b s"]
    suffix_pos: Int[Tensor, "b k"]
    suffix_active: Bool[Tensor, "b k"]
    target_pos: Int[Tensor, "b t"]  # the position whose next-token logits predict target_ids[:, j]
    target_ids: Int[Tensor, "b t"]
    target_mask: Bool[Tensor, "b t"]
    lengths: Int[Tensor, " b"]  # tokens in the row (padding excluded, inactive suffix slots included)

    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def suffix_len(self) -> int:
        return int(self.suffix_pos.shape[1])

    def read_mask(self, roles: Sequence[int]) -> Bool[Tensor, "b s"]:
        """The tokens a probe reading ``roles`` reads (inactive suffix slots and padding never)."""
        want = torch.tensor(sorted(set(int(r) for r in roles)), dtype=self.roles.dtype)
        return torch.isin(self.roles, want) & self.attention_mask.bool()


def build_batch(
    prepared: Sequence[PreparedExample],
    suffix_ids: Int[Tensor, "b k"] | None,
    *,
    suffix_active: Bool[Tensor, "b k"] | None = None,
    with_target: bool = True,
    pad_id: int = 0,
    skip_prefix: bool = False,
) -> Batch:
    """A batch of ``prepared`` rows with ``suffix_ids`` in their slots (``None``: no suffix).

    ``suffix_active`` masks suffix slots out (attention mask 0, not read by the probe, no position
    advance): an all-inactive suffix gives the clean prompt's activations and logits. ``skip_prefix``: the
    rows start at the suffix (the prefix comes from a :class:`PrefixCache`); positions are relative to it."""
    b = len(prepared)
    if b == 0:
        raise AttackError("no examples in the batch")
    if suffix_ids is None:
        suffix_ids = torch.zeros((b, 0), dtype=torch.long)
    suffix_ids = torch.as_tensor(suffix_ids, dtype=torch.long)
    if suffix_ids.ndim != 2 or suffix_ids.shape[0] != b:
        raise AttackError(f"suffix_ids must be [{b}, k], got {tuple(suffix_ids.shape)}")
    k = int(suffix_ids.shape[1])
    active = torch.ones((b, k), dtype=torch.bool) if suffix_active is None else suffix_active.to(torch.bool)
    n_t = [len(p.target_ids) if with_target else 0 for p in prepared]
    t = max(n_t)
    starts = [len(p.prefix_ids) if skip_prefix else 0 for p in prepared]
    lengths = [p.n_prompt + k + n - a0 for p, n, a0 in zip(prepared, n_t, starts, strict=True)]
    if skip_prefix and any(k + len(p.post_ids) == 0 for p in prepared):
        raise AttackError("a cached prefix needs at least one token after it (a suffix or the template)")
    s = max(lengths)
    tokens = torch.full((b, s), pad_id, dtype=torch.long)
    attn = torch.zeros((b, s), dtype=torch.long)
    roles = torch.full((b, s), ROLE_PAD, dtype=torch.long)
    spos = torch.zeros((b, k), dtype=torch.long)
    tpos = torch.zeros((b, t), dtype=torch.long)
    tids = torch.zeros((b, t), dtype=torch.long)
    tmask = torch.zeros((b, t), dtype=torch.bool)
    for i, p in enumerate(prepared):
        a = len(p.prefix_ids) - starts[i]
        tokens[i, :a] = torch.from_numpy(p.prefix_ids[starts[i] :])
        roles[i, :a] = torch.from_numpy(p.prefix_roles[starts[i] :].astype(np.int64))
        tokens[i, a : a + k] = suffix_ids[i]
        roles[i, a : a + k] = ROLE_PROMPT
        spos[i] = torch.arange(a, a + k)
        c = a + k + len(p.post_ids)
        tokens[i, a + k : c] = torch.from_numpy(p.post_ids)
        roles[i, a + k : c] = torch.from_numpy(p.post_roles.astype(np.int64))
        if n_t[i]:
            tokens[i, c : c + n_t[i]] = torch.from_numpy(p.target_ids)
            roles[i, c : c + n_t[i]] = ROLE_RESPONSE
            tpos[i, : n_t[i]] = torch.arange(c - 1, c - 1 + n_t[i])
            tids[i, : n_t[i]] = torch.from_numpy(p.target_ids)
            tmask[i, : n_t[i]] = True
        attn[i, : lengths[i]] = 1
        attn[i, a : a + k] = active[i].long()
    return Batch(tokens, attn, roles, spos, active, tpos, tids, tmask, torch.tensor(lengths))


@dataclass(frozen=True)
class PrefixCache:
    """The constant part of every row (everything before the suffix slot: template, system prompt, the
    user's text), run once: its keys and values per block (TransformerLens's frozen KV cache), its
    activations of the probe's hooks, roles and attention mask. Rows are right-padded to ``width``; the
    padding is masked, and positions after it follow the attention mask, so a cached pass over
    ``suffix | post | target`` equals the full pass (up to floating-point summation order)."""

    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]
    attention_mask: Int[Tensor, "b p"]
    roles: Int[Tensor, "b p"]
    acts: dict[str, Tensor]
    depth: int  # blocks run (the cached passes must not go deeper)
    lengths: Int[Tensor, " b"]

    @property
    def width(self) -> int:
        return int(self.attention_mask.shape[1])

    def select(self, rows: Int[Tensor, " n"]) -> PrefixCache:
        """The cache of rows ``rows`` (e.g. one row per GCG candidate)."""
        return PrefixCache(
            tuple(k.index_select(0, rows) for k in self.keys),
            tuple(v.index_select(0, rows) for v in self.values),
            self.attention_mask.index_select(0, rows),
            self.roles.index_select(0, rows),
            {h: a.index_select(0, rows) for h, a in self.acts.items()},
            self.depth,
            self.lengths.index_select(0, rows),
        )

    def read_mask(self, roles: Sequence[int]) -> Bool[Tensor, "b p"]:
        want = torch.tensor(sorted(set(int(r) for r in roles)), dtype=self.roles.dtype)
        return torch.isin(self.roles, want) & self.attention_mask.bool()

    def tl_cache(self) -> Any:
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
        from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

        entries = [
            TransformerLensKeyValueCacheEntry(k, v, frozen=True)
            for k, v in zip(self.keys, self.values, strict=True)
        ]
        return TransformerLensKeyValueCache(entries, self.attention_mask, frozen=True)


def build_prefix_cache(
    model: HookedTransformer,
    prepared: Sequence[PreparedExample],
    hooks: Sequence[str],
    depth: int,
    pad_id: int = 0,
) -> PrefixCache:
    """Run every row's prefix once through ``depth`` blocks (all the later cached passes may run)."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    if not prepared:
        raise AttackError("no examples in the batch")
    if depth < 1:
        raise AttackError("a prefix cache needs at least one block (the probe reads the embeddings)")
    lens = torch.tensor([len(p.prefix_ids) for p in prepared])
    if int(lens.min()) < 1:
        raise AttackError("an example has an empty prefix")
    b, w = len(prepared), int(lens.max())
    tokens = torch.full((b, w), pad_id, dtype=torch.long)
    attn = torch.zeros((b, w), dtype=torch.long)
    roles = torch.full((b, w), ROLE_PAD, dtype=torch.long)
    for i, p in enumerate(prepared):
        n = len(p.prefix_ids)
        tokens[i, :n] = torch.from_numpy(p.prefix_ids)
        attn[i, :n] = 1
        roles[i, :n] = torch.from_numpy(p.prefix_roles.astype(np.int64))
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, b)
    acts: dict[str, Tensor] = {}

    def keep(x: Tensor, hook: Any) -> None:
        acts[hook.name] = x.detach()

    with torch.no_grad():
        model.run_with_hooks(
            tokens,
            attention_mask=attn,
            past_kv_cache=cache,
            stop_at_layer=depth,
            fwd_hooks=[(h, keep) for h in dict.fromkeys(hooks)],
        )
    missing = [h for h in hooks if h not in acts]
    if missing:
        raise AttackError(f"the prefix pass never reached hook(s) {missing}")
    entries = cache.entries[:depth]
    return PrefixCache(
        tuple(e.past_keys.detach() for e in entries),
        tuple(e.past_values.detach() for e in entries),
        attn,
        roles,
        acts,
        depth,
        lens,
    )


# ----------------------------------------------------------------------------------------------------------
# the forward pass
# ----------------------------------------------------------------------------------------------------------


def hook_layer(name: str) -> int:
    """The block a hook belongs to (``blocks.{l}.…``), -1 for the embedding hooks."""
    if name.startswith("blocks."):
        try:
            return int(name.split(".")[1])
        except (IndexError, ValueError):
            raise AttackError(f"cannot read a layer from hook {name!r}") from None
    if name in ("hook_embed", "hook_pos_embed"):
        return -1
    raise AttackError(f"hook {name!r} is neither a block hook nor an embedding hook")


def stop_layer_for(hooks: Sequence[str]) -> int:
    """TransformerLens ``stop_at_layer`` (blocks to run) that computes every hook of ``hooks``."""
    return max(hook_layer(h) for h in hooks) + 1 if hooks else 0


@dataclass
class ForwardOut:
    acts: dict[str, Float[Tensor, "b s d"]]
    target_logits: Float[Tensor, "b t v"] | None


def run_model(
    model: HookedTransformer,
    batch: Batch,
    hooks: Sequence[str],
    *,
    suffix_embeds: Float[Tensor, "b k d"] | None = None,
    logits: bool = True,
    extra_hook: Callable[[Tensor, Any], Tensor | None] | None = None,
    prefix: PrefixCache | None = None,
) -> ForwardOut:
    """Run ``model`` on ``batch``: the activations of ``hooks`` and, with ``logits``, the logits at the
    target positions (final norm and unembedding applied there only). ``suffix_embeds`` replace the token
    embeddings at the suffix positions (``hook_embed``); gradients flow to them. With ``prefix`` (and a
    batch built with ``skip_prefix``) the rows continue the cached prefixes, and the activations returned
    cover ``prefix | rest``."""
    acts: dict[str, Tensor] = {}
    fwd: list[tuple[str | Callable[..., Any], Callable[..., Any]]] = []
    if suffix_embeds is not None:
        if suffix_embeds.shape[:2] != batch.suffix_pos.shape:
            raise AttackError(
                f"suffix_embeds {tuple(suffix_embeds.shape)} do not fit suffix slots "
                f"{tuple(batch.suffix_pos.shape)}"
            )
        rows = torch.arange(batch.size)[:, None].expand_as(batch.suffix_pos)

        def put(x: Tensor, hook: Any) -> Tensor:
            return x.index_put((rows, batch.suffix_pos), suffix_embeds.to(x.dtype))

        fwd.append(("hook_embed", put))
    if extra_hook is not None:
        fwd.append(("hook_embed", extra_hook))

    def keep(x: Tensor, hook: Any) -> None:
        acts[hook.name] = x

    for h in dict.fromkeys(hooks):
        fwd.append((h, keep))
    n_layers = int(model.cfg.n_layers)
    stop = n_layers if logits else stop_layer_for(hooks)
    kw: dict[str, Any] = {}
    if prefix is not None:
        if stop > prefix.depth:
            raise AttackError(f"the prefix cache covers {prefix.depth} blocks, the pass needs {stop}")
        if prefix.attention_mask.shape[0] != batch.size:
            raise AttackError("the prefix cache and the batch have different rows")
        kw["past_kv_cache"] = prefix.tl_cache()
    resid = model.run_with_hooks(
        batch.tokens, attention_mask=batch.attention_mask, stop_at_layer=stop, fwd_hooks=fwd, **kw
    )
    missing = [h for h in hooks if h not in acts]
    if missing:
        raise AttackError(f"the forward pass never reached hook(s) {missing}")
    if prefix is not None:
        acts = {h: torch.cat([prefix.acts[h].to(a.dtype), a], dim=1) for h, a in acts.items()}
    out_logits = None
    if logits and batch.target_pos.shape[1] > 0:
        rows_t = torch.arange(batch.size)[:, None].expand_as(batch.target_pos)
        r = resid[rows_t, batch.target_pos]  # [b t d]
        ln = getattr(model, "ln_final", None)
        if ln is not None:
            r = ln(r)
        out_logits = model.unembed(r)
    return ForwardOut(acts, out_logits)


# ----------------------------------------------------------------------------------------------------------
# the objective
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Objective:
    """``loss = probe_loss(score) + lam · behaviour_ce``.

    ``probe_loss="score"``: the probe's pre-threshold score itself (a logit); ``"softplus"``:
    ``softplus(score - margin)`` (the BCE of the probe towards "harmless" shifted by ``margin``: it stops
    pushing once the score is well below ``margin``). ``match_tokens`` is the ``k`` of ``behaviour_kept``
    (the greedy continuation starts with the target's first ``k`` tokens); ``ce_margin`` the slack of the
    CE criterion reported beside it."""

    lam: float = 1.0
    probe_loss: Literal["score", "softplus"] = "score"
    margin: float = 0.0
    match_tokens: int = 8
    ce_margin: float = 0.5

    def __post_init__(self) -> None:
        if not (self.lam >= 0 and math.isfinite(self.lam)):
            raise AttackError(f"lam must be a finite number >= 0, got {self.lam}")
        if self.probe_loss not in ("score", "softplus"):
            raise AttackError(f"probe_loss must be 'score' or 'softplus', got {self.probe_loss!r}")
        if self.match_tokens < 1:
            raise AttackError(f"match_tokens must be >= 1, got {self.match_tokens}")

    def probe_term(self, score: Float[Tensor, " b"]) -> Float[Tensor, " b"]:
        return score if self.probe_loss == "score" else F.softplus(score - self.margin)


@dataclass
class Evaluation:
    """Per example: the probe's score, the behaviour CE (mean over target tokens; NaN without target or
    when not computed), ``kept`` (greedy continuation starts with the target's first k tokens), the loss."""

    score: Float[Tensor, " b"]
    ce: Float[Tensor, " b"]
    kept: Bool[Tensor, " b"]
    loss: Float[Tensor, " b"]

    def detach(self) -> Evaluation:
        return Evaluation(self.score.detach(), self.ce.detach(), self.kept, self.loss.detach())


def behaviour_metrics(
    logits: Float[Tensor, "b t v"], batch: Batch, match_tokens: int
) -> tuple[Float[Tensor, " b"], Bool[Tensor, " b"]]:
    """Per row: the mean target cross-entropy and ``kept``: the greedy continuation starts with the target's
    first ``match_tokens`` tokens (exactly: the argmax at each of those teacher-forced positions is the
    target token; the greedy decode then reproduces them one by one)."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp.gather(-1, batch.target_ids[..., None])[..., 0]
    m = batch.target_mask
    n = m.sum(1)
    ce = torch.where(m, nll, 0.0).sum(1) / n.clamp_min(1)
    ce = torch.where(n > 0, ce, torch.nan)
    hit = logits.argmax(-1) == batch.target_ids
    first = torch.arange(m.shape[1])[None, :] < torch.minimum(n, torch.full_like(n, match_tokens))[:, None]
    kept = ((hit | ~first) & (n[:, None] > 0)).all(1)
    return ce, kept


def evaluate(
    model: HookedTransformer,
    scorer: Scorer,
    batch: Batch,
    objective: Objective,
    *,
    suffix_embeds: Float[Tensor, "b k d"] | None = None,
    behaviour: bool | None = None,
    prefix: PrefixCache | None = None,
) -> Evaluation:
    """Score, behaviour and loss of every row. ``behaviour=None`` computes the behaviour when it is part of
    the loss (``lam > 0``); ``True`` always (reports), ``False`` never (the pass then stops at the probe's
    deepest block)."""
    want = objective.lam > 0 if behaviour is None else behaviour
    if objective.lam > 0 and not want:
        raise AttackError("the behaviour loss is part of the objective (lam > 0): it must be computed")
    out = run_model(model, batch, scorer.hooks, suffix_embeds=suffix_embeds, logits=want, prefix=prefix)
    mask = batch.read_mask(scorer.roles)
    attention = batch.attention_mask
    if prefix is not None:
        mask = torch.cat([prefix.read_mask(scorer.roles), mask], dim=1)
        attention = torch.cat([prefix.attention_mask, attention], dim=1)
    empty = ~mask.any(1)
    if bool(empty.any()):
        i = int(torch.nonzero(empty)[0, 0])
        raise AttackError(f"row {i} has no token the probe reads (roles {scorer.roles})")
    score = scorer.score(out.acts, mask, attention)
    score = score if score.dtype == torch.float64 else score.float()
    nan = torch.full_like(score, torch.nan)
    if out.target_logits is not None:
        ce, kept = behaviour_metrics(out.target_logits, batch, objective.match_tokens)
    else:
        ce, kept = nan, torch.zeros_like(score, dtype=torch.bool)
    loss = objective.probe_term(score)
    if objective.lam > 0:
        loss = loss + objective.lam * torch.nan_to_num(ce, nan=0.0)
    return Evaluation(score, ce, kept, loss)


def check_layers(model: HookedTransformer, scorer: Scorer, objective: Objective) -> None:
    """Warn (:class:`ProbeLayerWarning`) when the probe reads the final block's output or the target tokens
    while the behaviour loss is on: the unembedding reads that same residual stream for the behaviour
    loss (the target's logits), so hiding from the probe there and keeping the target pull the same vectors
    in opposite directions. Allowed; expect a worse trade-off."""
    if objective.lam <= 0:
        return
    n = int(model.cfg.n_layers)
    deep = [h for h in scorer.hooks if hook_layer(h) >= n - 1]
    if deep:
        warnings.warn(
            f"the probe reads {deep}, the output of the final block ({n - 1}): the behaviour loss is "
            "computed from this same residual stream (final norm + unembedding), so the probe and the "
            "behaviour objectives act on the same vectors; the attack is allowed but expect a worse "
            "trade-off",
            ProbeLayerWarning,
            stacklevel=3,
        )
    if ROLE_RESPONSE in scorer.roles:
        warnings.warn(
            "the probe reads response tokens: the target completion the behaviour loss keeps is read by the "
            "probe too",
            ProbeLayerWarning,
            stacklevel=3,
        )
