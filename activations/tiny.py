"""Tiny TransformerLens models with a word-level tokenizer, built from a config in memory.

They run in milliseconds on a CPU and need no download, which makes them the workhorse of the tests, the
notebooks' fast mode and examples. ``plant_direction`` writes a known direction into the embedding of chosen
trigger words so that a probe has a signal with a known answer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
_WORD = re.compile(r"\w+|[^\w\s]")

BASE_VOCAB: tuple[str, ...] = tuple(
    [
        "the",
        "a",
        "an",
        "of",
        "to",
        "and",
        "in",
        "is",
        "for",
        "on",
        "how",
        "can",
        "i",
        "you",
        "me",
        "with",
        "make",
        "write",
        "give",
        "tell",
        "explain",
        "what",
        "why",
        "where",
        "when",
        "who",
        "my",
        "your",
        "this",
        "that",
        "it",
        "be",
        "do",
        "please",
        "some",
        "about",
        "into",
        "from",
        "at",
        "by",
        "as",
        "or",
        "not",
        "no",
        "yes",
        "are",
        "was",
        "will",
        "would",
        "should",
        "could",
        "steps",
        "guide",
        "recipe",
        "story",
        "poem",
        "list",
        "plan",
        "way",
        "best",
        "good",
        "bad",
        "help",
        "people",
        "home",
        "school",
        "water",
        "bread",
        "cake",
        "garden",
        "dog",
        "cat",
        "car",
        "bike",
        "music",
        "book",
        "code",
        "python",
        "email",
        "letter",
        "friend",
        "family",
        "money",
        "bank",
        "weapon",
        "bomb",
        "poison",
        "hack",
        "steal",
        "kill",
        "drug",
        "virus",
        "attack",
        "explosive",
        "malware",
        "password",
        "fraud",
        "scam",
        "gun",
        "user",
        "assistant",
        "system",
        "?",
        ".",
        ",",
        "!",
        ":",
        "'",
    ]
)


def make_tokenizer(words: Iterable[str] = (), *, chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer (``PreTrainedTokenizerFast``) over ``BASE_VOCAB`` + ``words``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab: dict[str, int] = {}
    for w in (*SPECIALS, *BASE_VOCAB, *words):
        w = w.lower()
        if w not in vocab:
            vocab[w] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    from tokenizers import normalizers

    tk.normalizer = normalizers.Lowercase()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        additional_special_tokens=list(SPECIALS[4:]),
        name_or_path="probe-atlas/tiny-word-level",
        add_bos_token=True,
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(
    *,
    n_layers: int = 3,
    d_model: int = 32,
    n_heads: int = 4,
    d_mlp: int | None = 64,
    n_ctx: int = 128,
    words: Sequence[str] = (),
    seed: int = 0,
    chat_template: bool = True,
    attn_only: bool = False,
    normalization_type: str | None = "LN",
    positional_embedding_type: str = "standard",
) -> HookedTransformer:
    """A randomly initialized ``HookedTransformer`` (seeded) with a word-level tokenizer."""
    tok = make_tokenizer(words, chat_template=chat_template)
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_model // n_heads,
        d_mlp=None if attn_only else d_mlp,
        attn_only=attn_only,
        n_ctx=n_ctx,
        d_vocab=len(tok),  # type: ignore[arg-type]
        act_fn="gelu",
        normalization_type=normalization_type,
        positional_embedding_type=positional_embedding_type,
        seed=seed,
        model_name=f"tiny-{n_layers}l-{d_model}d-s{seed}",
        default_prepend_bos=True,
    )
    torch.manual_seed(seed)
    model = HookedTransformer(cfg, tokenizer=tok, default_padding_side="right")
    model.eval()
    return model


def plant_direction(
    model: HookedTransformer, triggers: Sequence[str], *, scale: float = 4.0, seed: int = 1
) -> Float[Tensor, " d_model"]:
    """Add ``scale`` × a fixed unit direction to the embedding of each trigger word; return the direction."""
    tok = model.tokenizer
    assert tok is not None
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(model.cfg.d_model, generator=g)
    direction = direction / direction.norm()
    with torch.no_grad():
        for w in triggers:
            tid = tok.convert_tokens_to_ids(w.lower())
            if not isinstance(tid, int) or tid == tok.unk_token_id:
                raise ValueError(f"trigger word {w!r} is not in the tiny model's vocabulary")
            model.W_E[tid] += scale * direction
    return direction


def words_of(texts: Iterable[str]) -> list[str]:
    """All word tokens in ``texts`` (lower-cased, first-seen order), to extend a tiny vocabulary."""
    seen: dict[str, None] = {}
    for t in texts:
        for w in _WORD.findall(t.lower()):
            seen.setdefault(w, None)
    return list(seen)
