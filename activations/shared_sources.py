"""Named data sources for a transfer atlas, one de-duplicated corpus, and leave-one-source-out splits.

**Sources.** :data:`SOURCES` names every set a transfer atlas trains and evaluates on: the shared benchmarks
(``../shared/datasets``), Alpaca, and sets generated from the shipped constitution. Each is loaded as a
:class:`~activations.data.PromptDataset` whose examples carry ``source = <source name>`` and their
cross-source group (:func:`~activations.data.canonical_group`, computed before the source is renamed, so a
JBB behaviour or a constitution topic stays one group whichever source holds it). Each source declares its
kind (``harmful`` / ``jailbreak`` / ``contrast`` / ``benign`` / ``mixed``), its labels, a default cap and
whether it has its own negatives (harmless prompts of the same form). ``load_dataset("source:NAME[:CAP]")``
loads one.

**One corpus, every example owned once** (:func:`build_corpus`, :func:`dedup_sources`). The shared sets reuse
each other, so an example may repeat another source's by normalized text, by cross-source group or as a
near-duplicate (the rules of :mod:`activations.decontam`). The corpus keeps each such example in exactly one
source, in two steps:

1. *Shared groups are dealt.* A cross-source group claimed by several sources (a JBB behaviour: its goal in
   ``jailbreakbench``, its benign twin in ``jbb_benign``, its jailbreaks in ``jbb_artifacts``; a constitution
   topic in the three generated sets) goes to one of them, and the others drop their members of it. Giving
   every shared group to the first source in precedence would empty ``jbb_artifacts`` and ``jbb_benign``
   (every artifact and twin shares its group with a JBB goal), so by default (``shared_groups="deal"``) the
   groups of each set of claimants are dealt between them in proportion to their ``share`` (JBB behaviours:
   2:1:1 for artifacts, goals, twins), category by category, seeded. ``shared_groups="precedence"`` gives
   each to its first claimant instead.
2. *Repeats go to the first source in precedence* (:data:`PRECEDENCE`). Sources are taken in order; each is
   decontaminated against every source before it (text, group, near-duplicate; a group with a removed
   member goes as a whole, as in :func:`~activations.decontam.decontaminate`). The order:

   - jailbreak sets first (``jbb_artifacts``, ``gptfuzz``): a repeat costs a jailbreak set a whole wrapped
     behaviour but a plain set one prompt, and in-the-wild jailbreaks are the scarce evaluation target;
   - then the plain harmful benchmarks, the original before the sets that reused it: AdvBench,
     MaliciousInstruct, TDC2023, SimpleSafetyTests, HarmBench (absorbed TDC2023), JailbreakBench (drew on
     AdvBench, TDC and HarmBench), StrongREJECT (drew on AdvBench, MaliciousInstruct and others);
   - then the harmless look-alikes (JBB twins, CoCoNot's contrast evaluation set before its preference
     prompts), FastChat's questions, the generated sets, and Alpaca last (a capped sample of a 31k pool
     loses nothing by giving up a prompt).

   Sources are capped (:func:`cap_spread`: seeded, spread over groups, half harmful and half harmless where a
   source has both) after the deal and before this step.

The report (:attr:`Corpus.report`, JSON-able) gives, per source, its size after loading, the deal, the cap
and the de-duplication; what the deal took (``dealt``: examples, groups, to whom) and what de-duplication
removed by reason (``removed``: ``text``, ``group``, ``near_duplicate``) and against which source
(``against``), with example pairs. Generated sources are dealt from their full expansion (tens of thousands
of prompts) before their cap, so their ``dealt`` counts measure the expansion, not lost data.

**Splits.** :func:`leave_one_source_out` holds one source out: the evaluation set is that source (with its
own negatives where it has them, plus any negatives the caller names), the training pool every other source
minus anything that shares normalized text, a group or a near-duplicate with the evaluation set, and the
validation pool is carved from the training pool by whole groups (stratified by source and label).
:func:`train_on_one_source` is the other form of the atlas: train on one source, evaluate on every other
(each decontaminated against train ∪ val). Both work on a :class:`Corpus` or any mapping of name to dataset.
"""

from __future__ import annotations

import functools
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

from activations.augment import augment_dataset, wrap_each
from activations.builtin import WRAPPERS
from activations.constitution import generate_prompts, load_constitution
from activations.data import (
    DataError,
    Example,
    PromptDataset,
    canonical_group,
    load_jsonl,
    with_canonical_groups,
)
from activations.data import register_source as register_dataset_source
from activations.decontam import REASONS, DecontamConfig, Reference, decontaminate
from activations.matched import rewrap

__all__ = [
    "PRECEDENCE",
    "SOURCES",
    "SOURCE_KINDS",
    "Corpus",
    "Source",
    "SourceSplit",
    "TransferSplit",
    "build_corpus",
    "cap_spread",
    "deal_groups",
    "dedup_sources",
    "default_shared_root",
    "get_source",
    "leave_one_source_out",
    "load_source",
    "load_source_ref",
    "loso_splits",
    "register_source",
    "shared_available",
    "source_names",
    "train_on_one_source",
    "transfer_matrix",
]

SourceKind = Literal["harmful", "jailbreak", "contrast", "benign", "mixed"]
SOURCE_KINDS: tuple[str, ...] = ("harmful", "jailbreak", "contrast", "benign", "mixed")
SharedGroups = Literal["deal", "precedence"]
REPO_ROOT = Path(__file__).resolve().parents[1]


def default_shared_root() -> Path:
    """The shared data folder (holding ``datasets/``): ``$PROBE_ATLAS_SHARED``, else ``../shared`` next to
    the repository or the working directory, else ``./shared`` (as ``shared:`` paths in specs resolve)."""
    env = os.environ.get("PROBE_ATLAS_SHARED")
    if env:
        return Path(env)
    for cand in (REPO_ROOT.parent / "shared", Path.cwd().parent / "shared", Path.cwd() / "shared"):
        if cand.exists():
            return cand
    return REPO_ROOT.parent / "shared"


def _root(root: str | Path | None) -> Path:
    return Path(root) if root is not None else default_shared_root()


# ---------------------------------------------------------------------- the registry
Loader = Callable[[Path, int], PromptDataset]  # (shared root, seed) -> the whole source
Finish = Callable[[PromptDataset, int], PromptDataset]  # (capped source, seed) -> final source


@dataclass(frozen=True)
class Source:
    """One named source: how to load it and what it is.

    ``files`` are read under the shared root (none for generated sources). ``load`` returns the whole source
    (cross-source groups set, ``source`` renamed, de-duplicated on normalized text); ``cap`` is the default
    size limit (:func:`cap_spread`); ``finish`` runs after the cap (e.g. jailbreak wrappers, so only the kept
    examples are wrapped); ``share`` weighs the source when shared groups are dealt."""

    name: str
    kind: SourceKind
    labels: tuple[int, ...]
    description: str
    load: Loader
    files: tuple[str, ...] = ()
    cap: int | None = None
    own_negatives: bool = False
    share: float = 1.0
    finish: Finish | None = None

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"source {self.name!r}: kind {self.kind!r} is not one of {SOURCE_KINDS}")
        if not self.labels or any(lab not in (0, 1) for lab in self.labels):
            raise ValueError(f"source {self.name!r}: labels must be a non-empty subset of (0, 1)")
        if self.share <= 0:
            raise ValueError(f"source {self.name!r}: share must be > 0")

    @property
    def generated(self) -> bool:
        return not self.files

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "labels": list(self.labels),
            "cap": self.cap,
            "own_negatives": self.own_negatives,
            "generated": self.generated,
            "share": self.share,
            "files": list(self.files),
            "description": self.description,
        }


SOURCES: dict[str, Source] = {}

#: default order of ownership for repeated examples (see the module docstring)
PRECEDENCE: tuple[str, ...] = (
    "jbb_artifacts",
    "gptfuzz",
    "advbench",
    "malicious_instruct",
    "tdc2023",
    "simple_safety_tests",
    "harmbench",
    "jailbreakbench",
    "strongreject",
    "jbb_benign",
    "coconot_contrast_test",
    "coconot_contrast_train",
    "fastchat_questions",
    "constitution",
    "constitution_wrapped",
    "constitution_lookalikes",
    "alpaca",
)


def register_source(src: Source) -> Source:
    if src.name in SOURCES:
        raise ValueError(f"source {src.name!r} is already registered")
    SOURCES[src.name] = src
    return src


def get_source(name: str) -> Source:
    try:
        return SOURCES[name]
    except KeyError:
        raise DataError(f"unknown source {name!r}; known sources: {sorted(SOURCES)}") from None


def source_names(kind: str | Sequence[str] | None = None, *, generated: bool | None = None) -> list[str]:
    """Registered source names (in :data:`PRECEDENCE` order, then registration order), optionally of some
    kinds and only generated (or only shared-data) ones."""
    kinds = None if kind is None else ({kind} if isinstance(kind, str) else set(kind))
    ordered = [n for n in PRECEDENCE if n in SOURCES] + [n for n in SOURCES if n not in PRECEDENCE]
    return [
        n
        for n in ordered
        if (kinds is None or SOURCES[n].kind in kinds)
        and (generated is None or SOURCES[n].generated == generated)
    ]


def shared_available(root: str | Path | None = None, names: Sequence[str] | None = None) -> bool:
    """True when every file the sources ``names`` (default: all) read exists under the shared root."""
    r = _root(root)
    return all((r / f).exists() for n in (names or list(SOURCES)) for f in get_source(n).files)


# ---------------------------------------------------------------------- loading helpers
def _read(root: Path, rel: str, source: str) -> PromptDataset:
    p = root / rel
    if not p.exists():
        raise DataError(
            f"source {source!r}: {p}: no such file (shared data root {root}; set $PROBE_ATLAS_SHARED or "
            "pass root=)"
        )
    try:
        return with_canonical_groups(load_jsonl(p))
    except DataError as e:
        raise DataError(f"source {source!r}: {e}") from None


def _as_source(
    examples: Sequence[Example] | PromptDataset, name: str, *, id_prefix: str = ""
) -> PromptDataset:
    """``examples`` renamed to source ``name``, each with its cross-source group made explicit (computed
    under its original source, so it survives the rename), de-duplicated on normalized text."""
    out = [replace(e, id=f"{id_prefix}{e.id}", source=name, group=canonical_group(e)) for e in examples]
    ds = PromptDataset(out, name=name).dedup()
    if len(ds) == 0:
        raise DataError(f"source {name!r}: no examples")
    return ds


def _with_request(ex: Example, request: str | None) -> Example:
    """``ex`` with ``meta["request"]`` set (the original request inside a wrapper; decontamination compares
    requests, so two different requests in one template are not near-duplicates)."""
    if request is None or "request" in ex.meta_dict():
        return ex
    return replace(ex, meta=tuple(sorted({**ex.meta_dict(), "request": request}.items())))


def _contained(request: str, text: str) -> str | None:
    r = request.strip().rstrip(".").strip()
    return request.strip() if r and r.lower() in text.lower() else None


F = "datasets/{0}/{0}.jsonl"


def _plain(folder: str, name: str, keep: Callable[[Example], bool] | None = None) -> Loader:
    def load(root: Path, seed: int) -> PromptDataset:
        ds = _read(root, F.format(folder), name)
        return _as_source(ds.where(keep) if keep is not None else ds, name)

    return load


def _jbb_artifacts(root: Path, seed: int) -> PromptDataset:
    """JBB's jailbreak artifacts (label 1, ``meta.request`` = the JBB goal where the artifact contains it),
    and their own negatives: JBB's benign twins in the very same wrappers (:func:`activations.matched.rewrap`)
    and, for the paraphrasing attacks, in role-play / hypothetical wrappers."""

    arts = _read(root, F.format("jbb_artifacts"), "jbb_artifacts")
    jbb = _read(root, F.format("jailbreakbench"), "jbb_artifacts")
    goals, twins = jbb.filter(label=1.0), jbb.filter(label=0.0)
    goal_of = {canonical_group(g): g.text for g in goals}
    pos = [_with_request(a, _contained(goal_of.get(canonical_group(a)) or "", a.text or "")) for a in arts]
    negs = list(rewrap(twins, arts, goals))
    negs += augment_dataset(twins, ["roleplay", "hypothetical"], seed=seed)
    return _as_source([*pos, *negs], "jbb_artifacts")


def _gptfuzz(root: Path, seed: int) -> PromptDataset:
    """GPTFuzz's 77 human-written jailbreak templates, each filled with one of its questions (grouped by the
    question; ``meta.request`` = the question)."""
    ds = _read(root, F.format("gptfuzz"), "gptfuzz")
    question = {canonical_group(e): e.text for e in ds.filter(kind="plain")}
    wrapped = [
        _with_request(e, _contained(question.get(canonical_group(e)) or "", e.text or ""))
        for e in ds.filter(kind="jailbreak")
    ]
    return _as_source(wrapped, "gptfuzz")


@functools.lru_cache(maxsize=2)
def _constitution_full(seed: int) -> PromptDataset:
    """Every (topic, surface form) of the shipped constitution, every look-alike (no splits)."""

    return generate_prompts(
        load_constitution("general"), seed=seed, lookalikes="all", forms="all", split=False
    )


def _generated(name: str, kinds: Sequence[str] | None = None) -> Loader:
    def load(root: Path, seed: int) -> PromptDataset:
        full = _constitution_full(seed)
        exs = [e for e in full if kinds is None or e.kind in kinds]
        return _as_source(exs, name, id_prefix=f"{name}:")

    return load


def _wrap(ds: PromptDataset, seed: int) -> PromptDataset:

    return wrap_each(ds, WRAPPERS, seed=seed, name=ds.name)


def _contrast_split(split: str) -> Callable[[Example], bool]:
    def keep(e: Example) -> bool:
        return e.kind == "contrast" and e.split == split

    return keep


def _not_copyright(e: Example) -> bool:
    return not (e.category or "").startswith("copyright")


def _register_defaults() -> None:
    plain = [
        ("advbench", "AdvBench harmful behaviours (520)."),
        (
            "harmbench",
            "HarmBench text behaviours, standard and contextual (the 100 copyright ones, song lyrics and "
            "book passages, are left out: not harm in this constitution's sense).",
        ),
        ("strongreject", "StrongREJECT forbidden prompts (313)."),
        ("malicious_instruct", "MaliciousInstruct questions (100)."),
        ("tdc2023", "TDC2023 red-teaming behaviours (100)."),
        ("simple_safety_tests", "SimpleSafetyTests prompts (100)."),
    ]
    for name, desc in plain:
        keep = _not_copyright if name == "harmbench" else None
        register_source(
            Source(name, "harmful", (1,), desc, _plain(name, name, keep), files=(F.format(name),))
        )
    jbb_file = F.format("jailbreakbench")
    register_source(
        Source(
            "jailbreakbench",
            "harmful",
            (1,),
            "JailbreakBench's 100 harmful goals (group jbb:<index>).",
            _plain("jailbreakbench", "jailbreakbench", lambda e: e.label >= 0.5),
            files=(jbb_file,),
        )
    )
    register_source(
        Source(
            "jbb_artifacts",
            "jailbreak",
            (0, 1),
            "JailbreakBench attack artifacts (PAIR, GCG, JBC, random search, DSN; grouped by JBB behaviour), "
            "with their own negatives: the benign twins in the same wrappers.",
            _jbb_artifacts,
            files=(F.format("jbb_artifacts"), jbb_file),
            own_negatives=True,
            share=2.0,
        )
    )
    register_source(
        Source(
            "gptfuzz",
            "jailbreak",
            (1,),
            "GPTFuzz's 77 jailbreak templates, each filled with a harmful question (grouped by question).",
            _gptfuzz,
            files=(F.format("gptfuzz"),),
        )
    )
    register_source(
        Source(
            "jbb_benign",
            "contrast",
            (0,),
            "JailbreakBench's 100 benign twins of its harmful goals (same topic, harmless).",
            _plain("jailbreakbench", "jbb_benign", lambda e: e.label < 0.5),
            files=(jbb_file,),
        )
    )
    coconot = F.format("coconot")
    for split, n, desc in (
        ("test", "coconot_contrast_test", "CoCoNot's contrast evaluation set (379 look-alikes)."),
        (
            "train",
            "coconot_contrast_train",
            "CoCoNot's preference prompts (919 look-alikes, its train split).",
        ),
    ):
        register_source(
            Source(
                n,
                "contrast",
                (0,),
                desc,
                _plain("coconot", n, _contrast_split(split)),
                files=(coconot,),
            )
        )
    register_source(
        Source(
            "alpaca",
            "benign",
            (0,),
            "Alpaca instructions (refusal_direction's harmless splits, 31k; CC BY-NC 4.0), capped.",
            _plain("refusal_direction", "alpaca", lambda e: e.label < 0.5),
            files=(F.format("refusal_direction"),),
            cap=2000,
        )
    )
    register_source(
        Source(
            "fastchat_questions",
            "benign",
            (0,),
            "MT-Bench and Vicuna-Bench questions (158).",
            _plain("fastchat_questions", "fastchat_questions"),
            files=(F.format("fastchat_questions"),),
        )
    )
    register_source(
        Source(
            "constitution",
            "mixed",
            (0, 1),
            "The shipped constitution through every surface form (questions, imperatives, stories, "
            "role-play, lists, quoted requests, multi-turn): harmful topics, every look-alike, permitted "
            "topics.",
            _generated("constitution"),
            cap=2000,
            own_negatives=True,
            share=2.0,
        )
    )
    register_source(
        Source(
            "constitution_wrapped",
            "mixed",
            (0, 1),
            "Constitution prompts (harmful, look-alike and permitted alike) each in one jailbreak wrapper.",
            _generated("constitution_wrapped"),
            cap=1000,
            own_negatives=True,
            finish=_wrap,
        )
    )
    register_source(
        Source(
            "constitution_lookalikes",
            "contrast",
            (0,),
            "The constitution's harmless look-alikes (every look-alike, every surface form).",
            _generated("constitution_lookalikes", kinds=("contrast",)),
            cap=1000,
        )
    )


_register_defaults()


# ---------------------------------------------------------------------- caps
def _allocate(total: int, sizes: Mapping[Any, int], weights: Mapping[Any, float]) -> dict[Any, int]:
    """``total`` units split between strata by ``weights``, none above its size (the rest goes elsewhere)."""
    alloc = dict.fromkeys(sizes, 0)
    wsum = sum(weights.values())
    for step in range(1, min(total, sum(sizes.values())) + 1):
        room = [k for k in sizes if alloc[k] < sizes[k]]
        k = max(room, key=lambda s: (step * weights[s] / wsum - alloc[s], weights[s]))
        alloc[k] += 1
    return alloc


def _spread(ds: PromptDataset, idx: list[int], quota: int, rng: random.Random) -> list[int]:
    """``quota`` of the examples ``idx``, round robin over their groups (in a seeded order)."""
    groups: dict[str, list[int]] = {}
    for i in idx:
        e = ds[i]
        groups.setdefault(canonical_group(e) or e.id, []).append(i)
    keys = sorted(groups)
    rng.shuffle(keys)
    for k in keys:
        rng.shuffle(groups[k])
    out: list[int] = []
    for r in range(max((len(v) for v in groups.values()), default=0)):
        for k in keys:
            if len(out) == quota:
                return out
            if r < len(groups[k]):
                out.append(groups[k][r])
    return out


def cap_spread(ds: PromptDataset, n: int | None, seed: int = 0) -> PromptDataset:
    """At most ``n`` examples of ``ds``, seeded, spread over its groups (round robin: every group gives one
    before any gives two), half harmful and half harmless when ``ds`` has both (each half split evenly
    between its kinds; a stratum short of its quota gives all it has and the rest goes to the others).
    Order preserved; ``n=None`` keeps everything."""
    if n is None or n >= len(ds):
        return ds
    if n < 0:
        raise ValueError(f"cap must be >= 0, got {n}")
    strata: dict[tuple[bool, str], list[int]] = {}
    for i, e in enumerate(ds):
        strata.setdefault((e.label >= 0.5, e.kind), []).append(i)
    by_label = Counter(k[0] for k in strata)
    weights = {k: 1.0 / (len(by_label) * by_label[k[0]]) for k in strata}
    quotas = _allocate(n, {k: len(v) for k, v in strata.items()}, weights)
    keep: set[int] = set()
    for k in sorted(strata):
        keep |= set(_spread(ds, strata[k], quotas[k], random.Random(f"cap:{seed}:{k[0]}:{k[1]}")))
    return PromptDataset([e for i, e in enumerate(ds) if i in keep], name=ds.name)


# ---------------------------------------------------------------------- one source
def _load_full(name: str, root: str | Path | None, seed: int) -> PromptDataset:
    src = get_source(name)
    return src.load(_root(root), seed)


def load_source(
    name: str,
    root: str | Path | None = None,
    *,
    cap: int | Literal["default"] | None = "default",
    seed: int = 0,
) -> PromptDataset:
    """One named source, standalone (no cross-source de-duplication): loaded, capped (its default cap unless
    ``cap`` is given; ``None`` = everything) and finished. ``root`` is the shared data folder (default
    :func:`default_shared_root`). Errors name the source and the missing or bad file."""
    src = get_source(name)
    ds = _load_full(name, root, seed)
    ds = cap_spread(ds, src.cap if cap == "default" else cap, seed)
    return src.finish(ds, seed) if src.finish is not None else ds


@register_dataset_source("source")
def _source_source(arg: str | None, **_kwargs: Any) -> PromptDataset:
    """``source:NAME[:CAP]``: a named source of :data:`SOURCES`."""
    return load_source_ref("source" + (f":{arg}" if arg is not None else ""))


def load_source_ref(ref: str) -> PromptDataset:
    """``source:NAME`` or ``source:NAME:CAP`` (the ``load_dataset`` reference of :func:`load_source`)."""
    parts = ref.split(":")
    if parts[0] != "source" or len(parts) not in (2, 3) or not parts[1]:
        raise DataError(f"{ref!r}: expected source:NAME or source:NAME:CAP (sources: {sorted(SOURCES)})")
    try:
        cap: int | Literal["default"] = int(parts[2]) if len(parts) == 3 else "default"
    except ValueError:
        raise DataError(f"{ref!r}: the cap {parts[2]!r} is not an integer") from None
    return load_source(parts[1], cap=cap)


# ---------------------------------------------------------------------- the corpus
class Corpus(Mapping[str, PromptDataset]):
    """De-duplicated sources (name -> dataset, in precedence order) and the report of how they were built.

    No example repeats another source's by normalized text, cross-source group or near-duplicate. Each
    source's decontamination :class:`~activations.decontam.Reference` is built once and cached."""

    def __init__(
        self, sources: Mapping[str, PromptDataset], report: dict[str, Any], cfg: DecontamConfig
    ) -> None:
        self.sources = dict(sources)
        self.report = report
        self.cfg = cfg
        self._refs: dict[str, Reference] = {}

    def __getitem__(self, name: str) -> PromptDataset:
        try:
            return self.sources[name]
        except KeyError:
            raise DataError(f"the corpus has no source {name!r}; it has {list(self.sources)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.sources)

    def __len__(self) -> int:
        return len(self.sources)

    def __repr__(self) -> str:
        return f"Corpus({', '.join(f'{k}={len(v)}' for k, v in self.sources.items())})"

    def reference(self, name: str) -> Reference:
        if name not in self._refs:
            self._refs[name] = Reference([self[name]], self.cfg)
        return self._refs[name]

    def pooled(self, names: Sequence[str] | None = None, name: str = "corpus") -> PromptDataset:
        return _pool({n: self[n] for n in (names or list(self.sources))}, name)

    def counts(self) -> dict[str, dict[str, int]]:
        return {n: _counts(ds) for n, ds in self.sources.items()}


def _counts(ds: PromptDataset) -> dict[str, int]:
    c = Counter("harmful" if e.label >= 0.5 else "harmless" for e in ds)
    return {"n": len(ds), "harmful": c["harmful"], "harmless": c["harmless"]}


def _pool(parts: Mapping[str, PromptDataset], name: str) -> PromptDataset:
    seen: dict[str, str] = {}
    out: list[Example] = []
    for src, ds in parts.items():
        for e in ds:
            if e.id in seen:
                raise DataError(f"{name}: example id {e.id!r} is in both {seen[e.id]!r} and {src!r}")
            seen[e.id] = src
            out.append(e)
    return PromptDataset(out, name=name)


def _order(names: Sequence[str], precedence: Sequence[str] | None) -> list[str]:
    prec = list(precedence) if precedence is not None else list(PRECEDENCE)
    unknown = [n for n in prec if n not in names and precedence is not None]
    if unknown:
        raise DataError(f"precedence names {unknown}, which are not among the sources {list(names)}")
    return [n for n in prec if n in names] + [n for n in names if n not in prec]


def deal_groups(
    datasets: Mapping[str, PromptDataset],
    order: Sequence[str],
    *,
    policy: SharedGroups = "deal",
    shares: Mapping[str, float] | None = None,
    seed: int = 0,
    groups: Mapping[str, Sequence[str | None]] | None = None,
) -> tuple[dict[str, str], dict[str, Any]]:
    """Owner (a source name) of every cross-source group claimed by more than one source, and a report.

    ``precedence``: the first claimant in ``order``. ``deal``: for each set of claimants, their shared
    groups, ordered by category (of the group's first example) and seeded within a category, are dealt one
    at a time to the claimant furthest below its share (``shares``, default 1 each). ``groups`` may give
    each dataset's cross-source groups, example by example (computed when absent)."""
    if policy not in ("deal", "precedence"):
        raise ValueError(f"shared_groups must be 'deal' or 'precedence', got {policy!r}")
    claims: dict[str, dict[str, str]] = {}  # group -> {source: category}
    for n in order:
        gs = groups[n] if groups is not None else [canonical_group(e) for e in datasets[n]]
        for e, g in zip(datasets[n], gs, strict=True):
            if g is not None:
                claims.setdefault(g, {}).setdefault(n, e.category or "")
    by_claimants: dict[tuple[str, ...], list[str]] = {}
    for g, who in claims.items():
        if len(who) > 1:
            by_claimants.setdefault(tuple(n for n in order if n in who), []).append(g)
    owners: dict[str, str] = {}
    report: dict[str, Any] = {"policy": policy, "n_shared": 0, "claimants": {}}
    for cl, shared in sorted(by_claimants.items()):
        if policy == "precedence":
            seq = sorted(shared)
            picks = [cl[0]] * len(seq)
        else:
            rng = random.Random(f"deal:{seed}:{'+'.join(cl)}")
            strata: dict[str, list[str]] = {}
            for g in sorted(shared):
                strata.setdefault(claims[g][cl[0]], []).append(g)
            seq = []
            for cat in sorted(strata):
                rng.shuffle(strata[cat])
                seq += strata[cat]
            w = [float((shares or {}).get(n, 1.0)) for n in cl]
            filled = [0] * len(cl)
            picks = []
            for i in range(len(seq)):
                j = max(range(len(cl)), key=lambda j: ((i + 1) * w[j] / sum(w) - filled[j], -j))
                filled[j] += 1
                picks.append(cl[j])
        owners.update(zip(seq, picks, strict=True))
        report["n_shared"] += len(seq)
        report["claimants"]["+".join(cl)] = {"n_groups": len(seq), "owners": dict(Counter(picks))}
    return owners, report


def dedup_sources(
    datasets: Mapping[str, PromptDataset],
    *,
    precedence: Sequence[str] | None = None,
    shared_groups: SharedGroups = "deal",
    shares: Mapping[str, float] | None = None,
    caps: Mapping[str, int | None] | None = None,
    finish: Mapping[str, Finish] | None = None,
    seed: int = 0,
    cfg: DecontamConfig | None = None,
    keep_examples: int = 5,
) -> Corpus:
    """One corpus from ``datasets`` (source name -> dataset) in which every example belongs to one source.

    In order: shared cross-source groups are dealt (:func:`deal_groups`) and every source drops its members
    of the groups it does not own (``dealt`` in the report); each source is capped (``caps``,
    :func:`cap_spread`) and finished (``finish``); then, in ``precedence`` order (default
    :data:`PRECEDENCE`, then the order given), each source is decontaminated against all sources before it
    (reasons ``text``, ``group``, ``near_duplicate``: :func:`activations.decontam.decontaminate`)."""
    cfg = cfg or DecontamConfig()
    if not cfg.by_group:
        raise ValueError(
            "dedup_sources needs DecontamConfig(by_group=True): groups must not straddle sources"
        )
    order = _order(list(datasets), precedence)
    groups = {n: [canonical_group(e) for e in datasets[n]] for n in order}
    owners, deal_report = deal_groups(
        datasets, order, policy=shared_groups, shares=shares, seed=seed, groups=groups
    )
    report: dict[str, Any] = {
        "precedence": order,
        "shared_groups": deal_report,
        "decontam": {
            "jaccard": cfg.jaccard,
            "containment": cfg.containment,
            "min_shingles": cfg.min_shingles,
        },
        "sources": {},
    }
    kept: dict[str, PromptDataset] = {}
    refs: dict[str, Reference] = {}
    owner_of_id: dict[str, str] = {}
    for n in order:
        ds = datasets[n]
        info: dict[str, Any] = {"n_loaded": len(ds)}
        dealt: dict[str, str] = {}  # example id -> owner of its group
        away: set[str] = set()
        pairs: list[list[str]] = []
        for e, g in zip(ds, groups[n], strict=True):
            if g is not None and owners.get(g, n) != n:
                dealt[e.id] = owners[g]
                away.add(g)
                if len(pairs) < keep_examples:
                    pairs.append([e.id, g, owners[g]])
        ds = ds.where(lambda e, dealt=dealt: e.id not in dealt)
        info["dealt"] = {"n": len(dealt), "groups": len(away), "to": dict(Counter(dealt.values()))}
        info["n_after_deal"] = len(ds)
        info.update(removed=dict.fromkeys(REASONS, 0), against={}, examples={"dealt": pairs})
        ds = cap_spread(ds, (caps or {}).get(n), seed)
        if finish and n in finish:
            ds = finish[n](ds, seed)
        info["n_after_cap"] = len(ds)
        before = [m for m in order if m in refs]
        if before and len(ds):
            ref = Reference.merge([refs[m] for m in before], cfg)
            ds, rep = decontaminate(ds, ref, keep_examples=len(ds))
            for reason, pairs in rep.examples.items():
                info["removed"][reason] += len(pairs)
                for eid, rid in pairs:
                    src = owner_of_id.get(rid, "?")
                    info["against"][src] = info["against"].get(src, 0) + 1
                    if len(info["examples"].setdefault(reason, [])) < keep_examples:
                        info["examples"][reason].append([eid, rid, src])
        info["n_final"] = len(ds)
        info["final"] = _counts(ds)
        report["sources"][n] = info
        kept[n] = PromptDataset(ds.examples, name=n)
        if len(ds):
            refs[n] = Reference([kept[n]], cfg)
            owner_of_id.update(dict.fromkeys(kept[n].ids, n))
    report["removed"] = {r: sum(s["removed"][r] for s in report["sources"].values()) for r in REASONS}
    report["dealt"] = {
        "n": sum(s["dealt"]["n"] for s in report["sources"].values()),
        "groups": sum(s["dealt"]["groups"] for s in report["sources"].values()),
    }
    report["n_loaded"] = sum(s["n_loaded"] for s in report["sources"].values())
    report["n_after_cap"] = sum(s["n_after_cap"] for s in report["sources"].values())
    report["n_final"] = sum(s["n_final"] for s in report["sources"].values())
    corpus = Corpus(kept, report, cfg)
    corpus._refs.update(refs)
    _pool(kept, "corpus")  # ids unique across sources (raises otherwise)
    return corpus


def build_corpus(
    names: Sequence[str] | None = None,
    root: str | Path | None = None,
    *,
    seed: int = 0,
    caps: Mapping[str, int | None] | None = None,
    precedence: Sequence[str] | None = None,
    shared_groups: SharedGroups = "deal",
    cfg: DecontamConfig | None = None,
    keep_examples: int = 5,
) -> Corpus:
    """The registered sources ``names`` (default: all) loaded from the shared root and de-duplicated across
    sources (:func:`dedup_sources`; caps default to each source's, ``caps`` overrides some). The report also
    lists each source's declaration (``registry``)."""
    names = list(names) if names is not None else source_names()
    for n in names:
        get_source(n)
    datasets = {n: _load_full(n, root, seed) for n in names}
    all_caps = {n: get_source(n).cap for n in names} | dict(caps or {})
    fin = {n: f for n in names if (f := get_source(n).finish) is not None}
    shares = {n: get_source(n).share for n in names}
    corpus = dedup_sources(
        datasets,
        precedence=precedence,
        shared_groups=shared_groups,
        shares=shares,
        caps=all_caps,
        finish=fin,
        seed=seed,
        cfg=cfg,
        keep_examples=keep_examples,
    )
    corpus.report["registry"] = {n: get_source(n).info() for n in names}
    corpus.report["seed"] = seed
    return corpus


# ---------------------------------------------------------------------- splits
class SourceSplit(NamedTuple):
    """A leave-one-source-out split: ``(train, val, eval, report)``."""

    train: PromptDataset
    val: PromptDataset
    eval: PromptDataset
    report: dict[str, Any]


class TransferSplit(NamedTuple):
    """Train on one source, evaluate on the others: ``(train, val, evals, report)``."""

    train: PromptDataset
    val: PromptDataset
    evals: dict[str, PromptDataset]
    report: dict[str, Any]


def _check_cfg(cfg: DecontamConfig | None, sources: Mapping[str, PromptDataset]) -> DecontamConfig:
    cfg = cfg or (sources.cfg if isinstance(sources, Corpus) else DecontamConfig())
    if not cfg.by_group:
        raise ValueError("source splits need DecontamConfig(by_group=True): a group must not straddle splits")
    return cfg


def _get(sources: Mapping[str, PromptDataset], name: str) -> PromptDataset:
    if name not in sources:
        raise DataError(f"no source {name!r}; the sources are {list(sources)}")
    return sources[name]


def _ref(sources: Mapping[str, PromptDataset], name: str, cfg: DecontamConfig) -> Reference:
    if isinstance(sources, Corpus) and sources.cfg == cfg:
        return sources.reference(name)
    return Reference([sources[name]], cfg)


def carve(ds: PromptDataset, fraction: float, seed: int = 0) -> tuple[PromptDataset, PromptDataset]:
    """``ds`` split into (rest, carved) by whole cross-source groups, about ``fraction`` of it carved,
    stratified by source and label (each stratum's groups in a seeded order go to whichever part is further
    below its target). ``split`` fields are left alone."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(ds):
        groups.setdefault(canonical_group(e) or e.id, []).append(i)
    strata: dict[tuple[str, bool], list[str]] = {}
    for g, ix in groups.items():
        first = ds[ix[0]]
        harmful = sum(ds[i].label for i in ix) / len(ix) >= 0.5
        strata.setdefault((first.source, harmful), []).append(g)
    carved: set[int] = set()
    for key in sorted(strata):
        keys = sorted(strata[key])
        random.Random(f"carve:{seed}:{key[0]}:{key[1]}").shuffle(keys)
        total = sum(len(groups[g]) for g in keys)
        filled = [0.0, 0.0]  # rest, carved
        for g in keys:
            j = 1 if total * fraction - filled[1] > total * (1 - fraction) - filled[0] else 0
            filled[j] += len(groups[g])
            if j:
                carved.update(groups[g])
    rest = PromptDataset([e for i, e in enumerate(ds) if i not in carved], name=ds.name)
    return rest, PromptDataset([e for i, e in enumerate(ds) if i in carved], name=f"{ds.name}[carved]")


def _negatives(
    sources: Mapping[str, PromptDataset],
    negatives: str | PromptDataset | None,
    n: int,
    seed: int,
    exclude: Sequence[str],
) -> tuple[PromptDataset | None, str | None, PromptDataset | None]:
    """(negatives for evaluation, the source they came from, what is left of that source) for a request."""
    if negatives is None:
        return None, None, None
    if isinstance(negatives, PromptDataset):
        if (negatives.labels >= 0.5).any():
            raise DataError(
                f"negatives {negatives.name!r}: holds harmful examples; negatives must be label 0"
            )
        return negatives, None, None
    if negatives in exclude:
        raise DataError(f"negatives {negatives!r}: cannot come from the source being evaluated or trained on")
    pool = _get(sources, negatives).where(lambda e: e.label < 0.5)
    picked = pool.subsample_groups(max(n, 1), seed=seed)
    ids = set(picked.ids)
    rest = _get(sources, negatives).where(lambda e: e.id not in ids)
    return PromptDataset(picked.examples, name=f"{negatives}[negatives]"), negatives, rest


def leave_one_source_out(
    sources: Mapping[str, PromptDataset],
    held_out: str,
    *,
    negatives: str | PromptDataset | None = None,
    n_negatives: int | None = None,
    train_sources: Sequence[str] | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    cfg: DecontamConfig | None = None,
    keep_examples: int = 5,
) -> SourceSplit:
    """Hold out the source ``held_out``: evaluate on it, train on the others.

    The evaluation set is ``held_out`` (with its own negatives where it has them) plus ``negatives``: a
    source name (``n_negatives`` of its harmless examples, by whole groups, default as many as the evaluation
    set has harmful ones; the rest of that source stays in the training pool) or a dataset of harmless
    examples. The training pool is every other source (or ``train_sources``) minus each example that shares
    normalized text, a cross-source group or a near-duplicate with the evaluation set (its whole group goes
    with it); the validation pool is carved from it by whole groups (``val_fraction``, :func:`carve`)."""
    cfg = _check_cfg(cfg, sources)
    ev = _get(sources, held_out)
    n_pos = int((ev.labels >= 0.5).sum())
    neg, neg_src, neg_rest = _negatives(sources, negatives, n_negatives or n_pos, seed, [held_out])
    eval_ds = ev if neg is None else _pool({held_out: ev, "negatives": neg}, held_out)
    eval_ds = PromptDataset(eval_ds.examples, name=held_out)
    ref = _ref(sources, held_out, cfg) if neg is None else Reference([eval_ds], cfg)
    names = list(train_sources) if train_sources is not None else [n for n in sources if n != held_out]
    if held_out in names:
        raise DataError(f"train_sources include the held-out source {held_out!r}")
    parts: dict[str, PromptDataset] = {}
    removed: dict[str, Any] = {}
    for n in names:
        ds = neg_rest if n == neg_src and neg_rest is not None else _get(sources, n)
        clean, rep = decontaminate(ds, ref, keep_examples=keep_examples)
        parts[n] = clean
        if rep.n_after < rep.n_before:
            removed[n] = rep.to_json()
    pool = _pool(parts, f"train[-{held_out}]")
    train, val = carve(pool, val_fraction, seed)
    train = PromptDataset(train.examples, name=f"train[-{held_out}]")
    val = PromptDataset(val.examples, name=f"val[-{held_out}]")
    report = {
        "held_out": held_out,
        "eval": _counts(eval_ds),
        "eval_negatives": _negatives_label(ev, neg, neg_src),
        "train": _by_source(train),
        "val": _by_source(val),
        "n_train": len(train),
        "n_val": len(val),
        "removed_from_train": {r: sum(v["removed"][r] for v in removed.values()) for r in REASONS},
        "removed_by_source": removed,
        "seed": seed,
        "val_fraction": val_fraction,
    }
    return SourceSplit(train, val, eval_ds, report)


def _negatives_label(ev: PromptDataset, neg: PromptDataset | None, neg_src: str | None) -> str | None:
    """Where an evaluation set's harmless examples come from: a named source, a given dataset, ``own`` (a
    source with both labels), or None (a single-class source and no negatives asked for)."""
    if neg is not None:
        return neg_src or neg.name
    hard = ev.labels >= 0.5
    return "own" if hard.any() and (~hard).any() else None


def _by_source(ds: PromptDataset) -> dict[str, dict[str, int]]:
    out: dict[str, list[Example]] = {}
    for e in ds:
        out.setdefault(e.source, []).append(e)
    return {k: _counts(PromptDataset(v, name=k)) for k, v in out.items()}


def loso_splits(
    sources: Mapping[str, PromptDataset], held_out: Sequence[str] | None = None, **kwargs: Any
) -> Iterator[SourceSplit]:
    """:func:`leave_one_source_out` for each source in ``held_out`` (default: every source)."""
    for name in held_out if held_out is not None else list(sources):
        yield leave_one_source_out(sources, name, **kwargs)


def train_on_one_source(
    sources: Mapping[str, PromptDataset],
    train_source: str,
    *,
    eval_sources: Sequence[str] | None = None,
    negatives: str | None = None,
    negatives_fraction: float = 0.5,
    val_fraction: float = 0.2,
    seed: int = 0,
    cfg: DecontamConfig | None = None,
    keep_examples: int = 5,
) -> TransferSplit:
    """Train on ``train_source`` (validation carved from it by whole groups), evaluate on every other source
    (or ``eval_sources``), each decontaminated against train ∪ val.

    ``negatives`` (a source name) supplies harmless examples where a set has none: its groups are split in two
    (``negatives_fraction`` for training); the training half joins the training set when ``train_source``
    has no harmless examples, the other half joins every evaluation set that has none (decontaminated like
    the set). The negatives source is then not an evaluation set itself."""
    cfg = _check_cfg(cfg, sources)
    tr = _get(sources, train_source)
    if negatives is not None and negatives == train_source:
        raise DataError(f"negatives {negatives!r}: cannot be the training source")
    neg_train = neg_eval = None
    if negatives is not None:
        neg_all = _get(sources, negatives).where(lambda e: e.label < 0.5)
        neg_eval, neg_train = carve(neg_all, negatives_fraction, seed)
    train_all = tr
    if neg_train is not None and not (tr.labels < 0.5).any():
        train_all = _pool({train_source: tr, negatives or "": neg_train}, train_source)
    train, val = carve(PromptDataset(train_all.examples, name=f"train[{train_source}]"), val_fraction, seed)
    val = PromptDataset(val.examples, name=f"val[{train_source}]")
    ref = Reference([train, val], cfg)
    names = (
        list(eval_sources)
        if eval_sources is not None
        else [n for n in sources if n not in (train_source, negatives)]
    )
    evals: dict[str, PromptDataset] = {}
    info: dict[str, Any] = {}
    neg_clean = None
    if neg_eval is not None:
        neg_clean, _ = decontaminate(neg_eval, ref, keep_examples=keep_examples)
    for n in names:
        if n == train_source:
            raise DataError(f"eval_sources include the training source {train_source!r}")
        clean, rep = decontaminate(_get(sources, n), ref, keep_examples=keep_examples)
        added = None
        if neg_clean is not None and len(clean) and not (clean.labels < 0.5).any():
            clean = _pool({n: clean, "negatives": neg_clean}, n)
            added = negatives
        evals[n] = PromptDataset(clean.examples, name=n)
        info[n] = {**_counts(evals[n]), "negatives": added, "removed": rep.removed}
    report = {
        "train_source": train_source,
        "train": _by_source(train),
        "val": _by_source(val),
        "negatives": negatives,
        "evals": info,
        "seed": seed,
        "val_fraction": val_fraction,
    }
    return TransferSplit(PromptDataset(train.examples, name=f"train[{train_source}]"), val, evals, report)


def transfer_matrix(
    sources: Mapping[str, PromptDataset], train_sources: Sequence[str] | None = None, **kwargs: Any
) -> Iterator[TransferSplit]:
    """:func:`train_on_one_source` for each training source (default: every source): the rows of a
    train-source × eval-source atlas."""
    for name in train_sources if train_sources is not None else list(sources):
        if name == kwargs.get("negatives"):
            continue
        yield train_on_one_source(sources, name, **kwargs)
