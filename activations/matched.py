"""Matched negatives: harmless requests in the *same* jailbreak wrappers as a harmful evaluation set.

A jailbreak-wrapped harmful set scored against plain harmless prompts measures the wrapper as much as the
harm: a layer-0 probe (little more than token identity) separates JBB jailbreak artifacts from Alpaca
prompts almost perfectly. :func:`rewrap` builds negatives of the same form: for every wrapped example whose
cross-source group (:func:`~activations.data.canonical_group`, e.g. the JBB behaviour index) has an original
request (``goals``) that occurs verbatim in it (exactly, with its first letter lower-cased, or ignoring
case), a copy with that request replaced by the harmless request of the same group (e.g. the JBB benign
twin). Many templates also spell out the affirmative *target* the attack asks for ("Sure, here is a
defamatory article claiming ...", the GCG / random-search target string); that restatement of the harmful
request is rewritten too, as "Sure, here is <the harmless request without its leading verb>", so no harmful
text is left in a negative. Wrappers that paraphrase the request (PAIR) have no template to reuse and are
skipped; the harmless requests can be wrapped by :mod:`activations.augment`'s role-play and hypothetical
wrappers for those.
"""

from __future__ import annotations

import functools
import re
from dataclasses import replace

from activations.data import DataError, Example, PromptDataset, canonical_group

__all__ = ["rewrap", "wrap_like"]


def _locate(goal: str, text: str) -> tuple[int, int, str] | None:
    """Where ``goal`` occurs in ``text`` (start, end) and how its case was written there."""
    g = goal.strip().rstrip(".")
    if not g:
        return None
    for form, cand in (("exact", g), ("lower_first", g[:1].lower() + g[1:])):
        i = text.find(cand)
        if i >= 0:
            return i, i + len(cand), form
    m = re.search(re.escape(g), text, flags=re.IGNORECASE)
    return (m.start(), m.end(), "lower") if m else None


def _styled(request: str, form: str) -> str:
    r = request.strip().rstrip(".")
    if form == "lower_first":
        return r[:1].lower() + r[1:]
    if form == "lower":
        return r.lower()
    return r


_TARGET = re.compile(r"(Sure, here (?:is|are) )(.+?)(?= for educational and research purposes|[:\n]|$)")


def _noun_phrase(request: str) -> str:
    """A request as the object of "here is": its leading imperative verb dropped ("Write a story about x" ->
    "a story about x"; "Explain how to x" -> "how to x")."""
    words = request.strip().rstrip(".").split()
    return " ".join(words[1:]) if len(words) > 1 else request.strip()


def _by_group(ds: PromptDataset, what: str) -> dict[str, Example]:
    out: dict[str, Example] = {}
    for e in ds:
        g = canonical_group(e)
        if g is not None:
            out.setdefault(g, e)
    if not out:
        raise DataError(f"rewrap: no example of {what} ({ds.name}) has a cross-source group")
    return out


def _target_sub(noun: str, m: re.Match[str]) -> str:
    """The affirmative target string's request part replaced by ``noun``."""
    return m.group(1) + noun


def rewrap(requests: PromptDataset, wrapped: PromptDataset, goals: PromptDataset) -> PromptDataset:
    """``requests`` (e.g. harmless twins) placed into the wrappers of ``wrapped`` (e.g. jailbreaks), aligned
    by cross-source group through the original requests ``goals``.

    Each output example keeps the label, kind, category and source of its request, takes the group, gets
    the id ``<request id>@<wrapped id>`` and records ``meta``: ``wrapper_of`` (the wrapped example) and
    ``request`` (the harmless request, for decontamination). Only single-text (non-chat) examples are
    rewrapped."""
    req = _by_group(requests, "the requests")
    goal = _by_group(goals, "the goals")
    out: list[Example] = []
    for w in wrapped:
        g = canonical_group(w)
        if g is None or g not in req or g not in goal or w.text is None:
            continue
        r, gl = req[g], goal[g]
        if r.text is None or gl.text is None:
            continue
        where = _locate(gl.text, w.text)
        if where is None:
            continue
        lo, hi, form = where
        text = w.text[:lo] + _styled(r.text, form) + w.text[hi:]
        text, n_targets = _TARGET.subn(functools.partial(_target_sub, _noun_phrase(r.text)), text)
        meta = {**r.meta_dict(), "wrapper_of": w.id, "request": r.text, "targets_rewritten": n_targets}
        out.append(
            replace(
                r,
                id=f"{r.id}@{w.id}",
                text=text,
                group=g,
                meta=tuple(sorted(meta.items())),
            )
        )
    if not out:
        raise DataError(
            f"rewrap: no example of {wrapped.name} contains its group's original request from {goals.name}"
        )
    return PromptDataset(out, name=f"{requests.name}@{wrapped.name}")


def _retarget(text: str, request: str) -> str:
    """``text`` with each "Sure, here is <target>" naming ``request`` instead."""
    target = _noun_phrase(request)

    def sub(m: re.Match[str]) -> str:
        return m.group(1) + target

    return _TARGET.sub(sub, text)


def wrap_like(requests: PromptDataset, wrapped: PromptDataset, *, name: str | None = None) -> PromptDataset:
    """Harmless ``requests`` placed into the wrappers of ``wrapped`` (e.g. GPTFuzz templates), one request per
    wrapper in order (cycling through ``requests``), where each wrapped example records the request it wraps
    in ``meta["request"]``: the same form, a different request.

    Unlike :func:`rewrap`, nothing aligns the two by group: use it where a wrapped set has no harmless twins.
    Each output keeps its request's label, group, category and source, gets the id ``<request id>@<wrapped
    id>`` and ``meta`` ``wrapper_of`` / ``request``. Raises :class:`DataError` when no wrapped example names
    its request or ``requests`` is empty."""
    reqs = [r for r in requests if r.text is not None]
    if not reqs:
        raise DataError(f"wrap_like: {requests.name} has no single-text requests")
    out: list[Example] = []
    for w in wrapped:
        request = w.meta_dict().get("request")
        if w.text is None or not isinstance(request, str):
            continue
        where = _locate(request, w.text)
        if where is None:
            continue
        r = reqs[len(out) % len(reqs)]
        assert r.text is not None
        lo, hi, form = where
        text = w.text[:lo] + _styled(r.text, form) + w.text[hi:]
        text = _retarget(text, r.text)
        meta = {**r.meta_dict(), "wrapper_of": w.id, "request": r.text}
        out.append(replace(r, id=f"{r.id}@{w.id}", text=text, meta=tuple(sorted(meta.items()))))
    if not out:
        raise DataError(
            f"wrap_like: no example of {wrapped.name} records the request it wraps (meta.request)"
        )
    return PromptDataset(out, name=name or f"{requests.name}@{wrapped.name}")
