"""Decontamination: drop evaluation examples that repeat what the probe was trained or selected on.

The shared benchmark sets reuse each other heavily (refusal_direction's validation split *is* HarmBench's
validation split; every JBB jailbreak artifact wraps one of JailbreakBench's 100 goals; GPTFuzz templates wrap
its questions), so de-duplicating on exact text alone leaks. :func:`decontaminate` removes an example of an
evaluation set when, against a *reference* (train ∪ val, and for the benign control also every test set):

1. ``text`` -- its normalized text (:func:`~activations.data.normalize_text`: NFKC, lower case, no
   punctuation, collapsed white space), or its normalized *request* (:func:`~activations.data.request_text`:
   the original request of a wrapped example), equals a reference text or request;
2. ``group`` -- it shares a cross-source group with a reference example
   (:func:`~activations.data.canonical_group`: the JBB behaviour index, the GPTFuzz question, a constitution
   topic with its look-alike);
3. ``near_duplicate`` -- on character 5-grams of the normalized texts (hashed into 2^22 buckets): the
   Jaccard similarity of its request and a reference request is ``>= jaccard`` (default 0.8), or the same
   request sits inside a template: ``>= containment`` (default 0.9) of the 5-grams of one side's request
   occur in the other side's full text, for requests of at least ``min_shingles`` (default 40) distinct
   5-grams (about 45 characters; shorter requests match only through the Jaccard rule). Comparing requests
   rather than whole texts means two different requests in the same jailbreak template are *not*
   duplicates, while a reference request wrapped in any template is.

Each removed example is counted once, under the first reason that applies, in a :class:`DecontamReport`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from activations.data import PromptDataset, canonical_group, normalize_text, request_text

__all__ = ["REASONS", "DecontamConfig", "DecontamReport", "Reference", "decontaminate"]

REASONS: tuple[str, ...] = ("text", "group", "near_duplicate")


@dataclass(frozen=True)
class DecontamConfig:
    """Thresholds of the near-duplicate rule (see the module docstring)."""

    jaccard: float = 0.8
    containment: float = 0.9
    min_shingles: int = 40
    ngram: int = 5
    by_group: bool = True
    chunk: int = 512  # evaluation rows compared at once (bounds memory)

    def __post_init__(self) -> None:
        if not 0 < self.jaccard <= 1 or not 0 < self.containment <= 1:
            raise ValueError("jaccard and containment must be in (0, 1]")
        if self.ngram < 1 or self.min_shingles < 1:
            raise ValueError("ngram and min_shingles must be >= 1")


@dataclass
class DecontamReport:
    """What :func:`decontaminate` removed from one evaluation set, and why."""

    name: str
    against: list[str]
    n_before: int
    n_after: int
    removed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    examples: dict[str, list[list[str]]] = field(default_factory=dict)  # reason -> [[eval id, ref id], ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "against": self.against,
            "n_before": self.n_before,
            "n_after": self.n_after,
            "removed": dict(self.removed),
            "examples": self.examples,
        }


def _vectorizer(ngram: int) -> Any:
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(
        analyzer="char",
        ngram_range=(ngram, ngram),
        n_features=1 << 22,
        alternate_sign=False,
        norm=None,
        binary=True,
        lowercase=False,
    )


def _shingles(texts: Sequence[str], ngram: int) -> sp.csr_matrix:
    m = _vectorizer(ngram).transform([t if len(t) >= ngram else t.ljust(ngram) for t in texts])
    m = sp.csr_matrix(m, dtype=np.float32)
    m.data[:] = 1.0
    return m


class Reference:
    """The examples an evaluation set must not repeat: texts, requests, groups and their 5-gram sets."""

    def __init__(self, datasets: Iterable[PromptDataset], cfg: DecontamConfig | None = None) -> None:
        self.cfg = cfg or DecontamConfig()
        self.names: list[str] = []
        self.ids: list[str] = []
        texts: list[str] = []
        requests: list[str] = []
        self.groups: dict[str, str] = {}
        for ds in datasets:
            self.names.append(ds.name)
            for e in ds:
                self.ids.append(e.id)
                texts.append(normalize_text(e.all_text()))
                requests.append(normalize_text(request_text(e)))
                g = canonical_group(e)
                if g is not None:
                    self.groups.setdefault(g, e.id)
        self.exact: dict[str, str] = {}
        for i, (t, r) in enumerate(zip(texts, requests, strict=True)):
            self.exact.setdefault(t, self.ids[i])
            self.exact.setdefault(r, self.ids[i])
        n = self.cfg.ngram
        self.req = _shingles(requests, n) if requests else sp.csr_matrix((0, 1 << 22), dtype=np.float32)
        self.full = _shingles(texts, n) if texts else sp.csr_matrix((0, 1 << 22), dtype=np.float32)
        self.req_size = np.asarray(self.req.sum(1)).ravel()

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def merge(cls, refs: Sequence[Reference], cfg: DecontamConfig | None = None) -> Reference:
        """One reference holding every example of ``refs`` (in order), without shingling anything again: the
        same as ``Reference([every dataset of refs])`` when all of them share ``cfg``."""
        cfg = cfg or (refs[0].cfg if refs else DecontamConfig())
        if any(r.cfg != cfg for r in refs):
            raise ValueError("Reference.merge: the references were built with different configurations")
        out = cls([], cfg)
        if not refs:
            return out
        for r in refs:
            out.names += r.names
            out.ids += r.ids
            for g, rid in r.groups.items():
                out.groups.setdefault(g, rid)
            for key, rid in r.exact.items():
                out.exact.setdefault(key, rid)
        out.req = sp.csr_matrix(sp.vstack([r.req for r in refs], format="csr"), dtype=np.float32)
        out.full = sp.csr_matrix(sp.vstack([r.full for r in refs], format="csr"), dtype=np.float32)
        out.req_size = np.concatenate([r.req_size for r in refs])
        return out


def _near_duplicates(ds: PromptDataset, ref: Reference, todo: np.ndarray) -> dict[int, str]:
    """Index (into ``ds``) -> matching reference id, for the near-duplicate rule, over rows ``todo``."""
    cfg = ref.cfg
    if len(ref) == 0 or len(todo) == 0:
        return {}
    exs = [ds[int(i)] for i in todo]
    req = _shingles([normalize_text(request_text(e)) for e in exs], cfg.ngram)
    full = _shingles([normalize_text(e.all_text()) for e in exs], cfg.ngram)
    req_size = np.asarray(req.sum(1)).ravel()
    ref_big = ref.req_size >= cfg.min_shingles
    out: dict[int, str] = {}
    for lo in range(0, len(exs), cfg.chunk):
        hi = min(lo + cfg.chunk, len(exs))
        inter = (req[lo:hi] @ ref.req.T).toarray()  # shared request 5-grams
        union = req_size[lo:hi, None] + ref.req_size[None, :] - inter
        jac = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
        hit = jac >= cfg.jaccard
        # a reference request inside this example's text, and this example's request inside a reference text
        in_eval = (full[lo:hi] @ ref.req.T).toarray() / np.maximum(ref.req_size[None, :], 1)
        hit |= (in_eval >= cfg.containment) & ref_big[None, :]
        in_ref = (req[lo:hi] @ ref.full.T).toarray() / np.maximum(req_size[lo:hi, None], 1)
        hit |= (in_ref >= cfg.containment) & (req_size[lo:hi, None] >= cfg.min_shingles)
        for r in np.flatnonzero(hit.any(1)):
            out[int(todo[lo + r])] = ref.ids[int(np.argmax(hit[r]))]
    return out


def _direct_matches(ds: PromptDataset, ref: Reference) -> dict[int, tuple[str, str]]:
    """Index -> (reason, reference id) for the text, group and near-duplicate rules."""
    why: dict[int, tuple[str, str]] = {}
    for i, e in enumerate(ds):
        for key in (normalize_text(e.all_text()), normalize_text(request_text(e))):
            if key in ref.exact:
                why[i] = ("text", ref.exact[key])
                break
        if i in why or not ref.cfg.by_group:
            continue
        g = canonical_group(e)
        if g is not None and g in ref.groups:
            why[i] = ("group", ref.groups[g])
    todo = np.asarray([i for i in range(len(ds)) if i not in why], dtype=np.int64)
    for i, rid in _near_duplicates(ds, ref, todo).items():
        why[i] = ("near_duplicate", rid)
    return why


def decontaminate(
    ds: PromptDataset,
    ref: Reference,
    *,
    anchors: Iterable[PromptDataset] = (),
    keep_examples: int = 5,
) -> tuple[PromptDataset, DecontamReport]:
    """``ds`` without the examples that repeat ``ref`` (text, group or near-duplicate), and the report.

    A cross-source group is contaminated as a whole once any of its members repeats the reference: when an
    example of ``ds`` is removed for its text or as a near-duplicate, every other example of its group goes
    too (reason ``group``; e.g. the paraphrased jailbreaks of a JBB goal that sits in the training set).
    ``anchors`` are further examples that name groups (e.g. the JBB goals behind a set of jailbreaks): an
    anchor that repeats the reference contaminates its group in ``ds`` the same way.
    """
    report = DecontamReport(ds.name, list(ref.names), len(ds), len(ds))
    why = _direct_matches(ds, ref)
    if ref.cfg.by_group:
        bad: dict[str, str] = {}
        for i, (reason, rid) in why.items():
            g = canonical_group(ds[i])
            if g is not None and reason != "group":
                bad.setdefault(g, rid)
        for anc in anchors:
            for i, (_, rid) in _direct_matches(anc, ref).items():
                g = canonical_group(anc[i])
                if g is not None:
                    bad.setdefault(g, rid)
        for i, e in enumerate(ds):
            g = canonical_group(e)
            if i not in why and g is not None and g in bad:
                why[i] = ("group", bad[g])
    for i in sorted(why):
        reason, rid = why[i]
        report.removed[reason] += 1
        ex = report.examples.setdefault(reason, [])
        if len(ex) < keep_examples:
            ex.append([ds[i].id, rid])
    clean = PromptDataset([e for i, e in enumerate(ds) if i not in why], name=ds.name)
    report.n_after = len(clean)
    return clean, report
