"""Render examples into token ids with a per-token role (system/template, prompt, response).

With a chat template (instruction models) the conversation is rendered exactly as the model sees it; the role
of each token comes from the character span of each message in the rendered string. Without one (base
models, tiny test models without a template) prompts are plain text and exchanges
``User: ...\\nAssistant: ...``.

Roles: ``0`` system prompt and template tokens before the first user turn, ``1`` prompt (user turns and the
template tokens up to the response, including the generation prompt), ``2`` response (the final assistant
turn).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from activations.data import DataError, Example

ROLE_SYSTEM, ROLE_PROMPT, ROLE_RESPONSE = 0, 1, 2
Positions = Literal["auto", "prompt", "response", "prompt+response", "all"]
POSITIONS: tuple[str, ...] = ("auto", "prompt", "response", "prompt+response", "all")


@dataclass(frozen=True)
class Rendered:
    ids: np.ndarray  # int64 [n]
    roles: np.ndarray  # int8 [n]
    n_truncated: int = 0


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def role_selection(positions: str, is_exchange: bool) -> tuple[int, ...]:
    """Which roles a ``positions`` request scores for one example."""
    if positions not in POSITIONS:
        raise ValueError(f"unknown positions {positions!r}; expected one of {POSITIONS}")
    if positions == "auto":
        return (ROLE_RESPONSE,) if is_exchange else (ROLE_PROMPT,)
    if positions == "prompt":
        return (ROLE_PROMPT,)
    if positions == "response":
        return (ROLE_RESPONSE,)
    if positions == "prompt+response":
        return (ROLE_PROMPT, ROLE_RESPONSE)
    return (ROLE_SYSTEM, ROLE_PROMPT, ROLE_RESPONSE)


def render_text(
    example: Example, tokenizer: Any, use_chat_template: bool | None = None
) -> tuple[str, np.ndarray]:
    """The rendered string and a per-character role array."""
    msgs = example.as_messages()
    use_tpl = has_chat_template(tokenizer) if use_chat_template is None else use_chat_template
    if use_tpl:
        if not has_chat_template(tokenizer):
            raise DataError("use_chat_template=True but the tokenizer has no chat template")
        conv = [{"role": m.role, "content": m.content} for m in msgs]
        text = tokenizer.apply_chat_template(
            conv, tokenize=False, add_generation_prompt=not example.is_exchange
        )
    else:
        parts = []
        for m in msgs:
            if len(msgs) == 1 and m.role == "user":
                parts.append(m.content)
            else:
                parts.append(f"{m.role.capitalize()}: {m.content}")
        text = "\n".join(parts)
    roles = np.full(len(text), ROLE_SYSTEM, dtype=np.int8)
    cursor = 0
    started = False  # seen a non-system message
    last_role = ROLE_PROMPT
    for i, m in enumerate(msgs):
        content = m.content
        at = text.find(content, cursor) if content else cursor
        if at < 0 and content.strip():
            content = content.strip()
            at = text.find(content, cursor)
        if at < 0:
            raise DataError(f"example {example.id!r}: message {i} not found in the rendered chat template")
        end = at + len(content)
        if m.role == "system":
            role = ROLE_SYSTEM
        elif m.role == "assistant" and i == len(msgs) - 1:
            role = ROLE_RESPONSE
        else:
            role = ROLE_PROMPT
        if role == ROLE_RESPONSE:
            roles[cursor if started else at : at] = ROLE_PROMPT  # the assistant header is still prompt
            roles[at:end] = ROLE_RESPONSE
        elif role == ROLE_PROMPT:
            # template tokens between the previous message and this one belong to this turn
            roles[cursor if started else at : end] = ROLE_PROMPT
        if role != ROLE_SYSTEM:
            started = True
            last_role = role
        cursor = end
    # trailing template tokens (generation prompt, end-of-turn) take the last message's role
    roles[cursor:] = last_role
    return text, roles


def render_example(
    example: Example,
    tokenizer: Any,
    *,
    max_len: int,
    use_chat_template: bool | None = None,
    prepend_bos: bool | None = None,
) -> Rendered:
    """Token ids and roles of one example, truncated from the left to ``max_len`` tokens."""
    text, char_roles = render_text(example, tokenizer, use_chat_template)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offs = enc["offset_mapping"]
    roles: list[int] = []
    prev = int(char_roles[0]) if len(char_roles) else ROLE_PROMPT
    for a, b in offs:
        if b > a and a < len(char_roles):
            # a token's role is the largest role among its characters (a token straddling into the
            # response counts as response)
            prev = int(char_roles[a:b].max())
        roles.append(prev)
    use_tpl = has_chat_template(tokenizer) if use_chat_template is None else use_chat_template
    bos = getattr(tokenizer, "bos_token_id", None)
    if prepend_bos is None:
        prepend_bos = not use_tpl
    if prepend_bos and bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
        roles = [ROLE_SYSTEM, *roles]
    n_trunc = max(0, len(ids) - max_len)
    if n_trunc:
        ids, roles = ids[n_trunc:], roles[n_trunc:]
    return Rendered(np.asarray(ids, dtype=np.int64), np.asarray(roles, dtype=np.int8), n_trunc)


def render_all(
    examples: Sequence[Example],
    tokenizer: Any,
    *,
    max_len: int,
    use_chat_template: bool | None = None,
) -> list[Rendered]:
    return [
        render_example(e, tokenizer, max_len=max_len, use_chat_template=use_chat_template) for e in examples
    ]
