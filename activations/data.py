"""Labelled examples and datasets.

An :class:`Example` is either a plain prompt (``text``) or a conversation (``messages``: user / assistant
turns, an *exchange* when it ends with an assistant response). A :class:`PromptDataset` is an ordered,
immutable collection of examples with a content fingerprint, loaders (the JSONL schema of
``../shared/datasets``, Hugging Face datasets when online, the built-in set), de-duplication on normalized
text, filters and group-respecting splits.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

Kind = Literal["plain", "jailbreak", "contrast"]
KINDS: tuple[str, ...] = ("plain", "jailbreak", "contrast")
ROLES: tuple[str, ...] = ("system", "user", "assistant")


class DataError(ValueError):
    """Bad labelled data: the message names the file, line or example."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise DataError(f"unknown chat role {self.role!r}; expected one of {ROLES}")


@dataclass(frozen=True)
class Example:
    """One labelled prompt or exchange.

    ``label`` is 1 for harmful (should be blocked), 0 for harmless, or a soft label in [0, 1].
    ``group`` ties examples that must land in the same split (defaults to ``id``).
    """

    id: str
    label: float
    text: str | None = None
    messages: tuple[Message, ...] | None = None
    source: str = ""
    group: str | None = None
    split: str | None = None
    kind: str = "plain"
    category: str | None = None
    meta: tuple[tuple[str, Any], ...] = field(default=())

    def __post_init__(self) -> None:
        if (self.text is None) == (self.messages is None):
            raise DataError(f"example {self.id!r}: give exactly one of `text` or `messages`")
        if self.messages is not None and len(self.messages) == 0:
            raise DataError(f"example {self.id!r}: `messages` is empty")
        lab = self.label
        if isinstance(lab, bool) or not isinstance(lab, (int, float)) or not math.isfinite(lab):
            raise DataError(f"example {self.id!r}: label {lab!r} is not a number in [0, 1]")
        if not 0.0 <= float(lab) <= 1.0:
            raise DataError(f"example {self.id!r}: label {lab!r} is outside [0, 1]")
        if self.kind not in KINDS:
            raise DataError(f"example {self.id!r}: kind {self.kind!r} is not one of {KINDS}")

    # ------------------------------------------------------------------ views
    @property
    def is_exchange(self) -> bool:
        """True when the example ends with an assistant turn (a response judged in its conversation)."""
        return self.messages is not None and self.messages[-1].role == "assistant"

    @property
    def prompt(self) -> str:
        """The (last) user prompt."""
        if self.text is not None:
            return self.text
        assert self.messages is not None
        users = [m.content for m in self.messages if m.role == "user"]
        return users[-1] if users else ""

    @property
    def response(self) -> str | None:
        if self.is_exchange:
            assert self.messages is not None
            return self.messages[-1].content
        return None

    @property
    def group_key(self) -> str:
        return self.group if self.group is not None else self.id

    def as_messages(self) -> tuple[Message, ...]:
        if self.messages is not None:
            return self.messages
        assert self.text is not None
        return (Message("user", self.text),)

    def all_text(self) -> str:
        return "\n".join(m.content for m in self.as_messages())

    def meta_dict(self) -> dict[str, Any]:
        return dict(self.meta)

    def with_response(self, response: str, **meta: Any) -> Example:
        """An exchange: this example's prompt followed by an assistant ``response`` (label carried over)."""
        msgs = self.as_messages()
        if self.is_exchange:
            msgs = msgs[:-1]
        new_meta = tuple(sorted({**self.meta_dict(), **meta}.items()))
        return replace(
            self,
            id=f"{self.id}:exchange",
            text=None,
            messages=(*msgs, Message("assistant", response)),
            group=self.group_key,
            meta=new_meta,
        )

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id}
        if self.text is not None:
            d["text"] = self.text
        else:
            assert self.messages is not None
            d["messages"] = [asdict(m) for m in self.messages]
        d.update(
            label=self.label,
            source=self.source,
            group=self.group,
            split=self.split,
            kind=self.kind,
            category=self.category,
        )
        if self.meta:
            d["meta"] = self.meta_dict()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], *, where: str = "") -> Example:
        """Build from one JSON object of the shared schema (``text`` or ``messages``, ``label``, ...)."""
        at = f"{where}: " if where else ""
        if not isinstance(d, dict):
            raise DataError(f"{at}expected a JSON object, got {type(d).__name__}")
        if "label" not in d:
            raise DataError(f"{at}missing required field 'label'")
        if "text" not in d and "messages" not in d:
            raise DataError(f"{at}missing required field 'text' (or 'messages')")
        label = d["label"]
        if isinstance(label, str):
            try:
                label = float(label)
            except ValueError as e:
                raise DataError(f"{at}label {d['label']!r} is not a number") from e
        messages = None
        text = d.get("text")
        if "messages" in d and d["messages"] is not None:
            raw = d["messages"]
            if not isinstance(raw, list) or not raw:
                raise DataError(f"{at}'messages' must be a non-empty list of {{role, content}}")
            try:
                messages = tuple(Message(str(m["role"]), str(m["content"])) for m in raw)
            except (KeyError, TypeError) as e:
                raise DataError(f"{at}each message needs 'role' and 'content'") from e
            text = None
        elif not isinstance(text, str):
            raise DataError(f"{at}'text' must be a string, got {type(text).__name__}")
        meta = d.get("meta") or {}
        try:
            return cls(
                id=str(d.get("id") if d.get("id") is not None else where or "example"),
                label=float(label) if not isinstance(label, bool) else label,
                text=text,
                messages=messages,
                source=str(d.get("source") or ""),
                group=None if d.get("group") is None else str(d["group"]),
                split=d.get("split"),
                kind=str(d.get("kind") or "plain"),
                category=d.get("category"),
                meta=tuple(sorted(meta.items())),
            )
        except DataError as e:
            raise DataError(f"{at}{e}") from None


# ---------------------------------------------------------------------- normalization
_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)
_SPACE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Lower-case, NFKC, strip punctuation and collapse white space (the de-duplication key)."""
    t = unicodedata.normalize("NFKC", text).lower()
    t = _PUNCT.sub(" ", t)
    return _SPACE.sub(" ", t).strip()


# ---------------------------------------------------------------------- cross-source groups
#: ids of the shared data sets that name a group shared across sources (the JBB behaviour index, the
#: GPTFuzz question): ``(pattern, group prefix)``; the first capture group is the index.
_GROUP_IDS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^jailbreakbench:(?:harmful|benign):(\d+)(?:\b|$)"), "jbb"),
    (re.compile(r"^jbb_artifacts:[^:]+:[^:]+:[^:]+:(\d+)(?:\b|$)"), "jbb"),
    (re.compile(r"^gptfuzz:template\d+\+question(\d+)(?:\b|$)"), "gptfuzz_q"),
    (re.compile(r"^gptfuzz:question:(\d+)(?:\b|$)"), "gptfuzz_q"),
)
#: prefixes of canonical cross-source groups (kept as they are)
CANONICAL_GROUP_PREFIXES: tuple[str, ...] = ("jbb:", "gptfuzz_q:")


def canonical_group(ex: Example) -> str | None:
    """The group an example shares with examples of *other* sources, or None.

    * The JailbreakBench behaviour index: ``jailbreakbench`` harmful goals, their benign twins and every
      ``jbb_artifacts`` jailbreak of that goal share ``jbb:<index>`` (split them together).
    * The GPTFuzz question: a plain question and every template wrapping it share ``gptfuzz_q:<index>``.
    * Any other explicit ``group`` is namespaced by its source (``<source>|<group>``): a constitution topic
      and its look-alike share one group; groups of unrelated sources never collide. A group that is already
      namespaced (it contains ``|``, e.g. set from this function's own result) is kept as it is, so an example
      moved to another source (:mod:`activations.shared_sources`) keeps its cross-source group.
    Transformed copies (ids with a ``:<transform>`` suffix, or a group that is such an id) keep the group.
    """
    for ref in (ex.id, ex.group):
        if ref is None:
            continue
        if ref.startswith(CANONICAL_GROUP_PREFIXES):
            return ref
        for pat, prefix in _GROUP_IDS:
            m = pat.match(ref)
            if m:
                return f"{prefix}:{int(m.group(1))}"
    if ex.group is None:
        return None
    return ex.group if "|" in ex.group else f"{ex.source}|{ex.group}"


def with_canonical_groups(ds: PromptDataset) -> PromptDataset:
    """``ds`` with the cross-source group (:func:`canonical_group`) set on examples that have one and no
    group of their own (so group-respecting splits keep a JBB behaviour or a GPTFuzz question together)."""
    out = []
    for e in ds:
        g = canonical_group(e) if e.group is None else None
        out.append(replace(e, group=g) if g is not None else e)
    return PromptDataset(out, name=ds.name)


def request_text(ex: Example) -> str:
    """The request an example makes: the original request of a transformed (wrapped) example, as recorded in
    its ``meta["request"]``, else its (last) user prompt."""
    req = ex.meta_dict().get("request")
    return str(req) if isinstance(req, str) and req else ex.prompt


# ---------------------------------------------------------------------- dataset
class PromptDataset(Sequence[Example]):
    """An immutable, ordered collection of examples with a content fingerprint."""

    def __init__(self, examples: Iterable[Example], name: str = "dataset") -> None:
        self._examples: tuple[Example, ...] = tuple(examples)
        self.name = name
        seen: set[str] = set()
        for ex in self._examples:
            if ex.id in seen:
                raise DataError(f"{name}: duplicate example id {ex.id!r}")
            seen.add(ex.id)

    # Sequence protocol
    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, i: int) -> Example:  # type: ignore[override]
        return self._examples[i]

    def __iter__(self) -> Iterator[Example]:
        return iter(self._examples)

    def __repr__(self) -> str:
        n1 = int(sum(1 for e in self._examples if e.label >= 0.5))
        return f"PromptDataset({self.name!r}, n={len(self)}, harmful={n1}, harmless={len(self) - n1})"

    @property
    def examples(self) -> tuple[Example, ...]:
        return self._examples

    @property
    def labels(self) -> np.ndarray:
        return np.asarray([e.label for e in self._examples], dtype=np.float32)

    @property
    def ids(self) -> list[str]:
        return [e.id for e in self._examples]

    def fingerprint(self) -> str:
        """Content hash of every example (order-sensitive): the key of stores built from this dataset."""
        h = hashlib.sha256()
        for ex in self._examples:
            h.update(json.dumps(ex.to_json(), sort_keys=True, ensure_ascii=False).encode())
            h.update(b"\n")
        return h.hexdigest()[:16]

    # ------------------------------------------------------------ checks
    def require_nonempty(self, what: str = "") -> PromptDataset:
        if len(self) == 0:
            raise DataError(f"{self.name}{' (' + what + ')' if what else ''}: dataset is empty")
        return self

    def require_two_classes(self, what: str = "") -> PromptDataset:
        self.require_nonempty(what)
        hard = self.labels >= 0.5
        if hard.all() or (~hard).all():
            only = "harmful (1)" if hard.all() else "harmless (0)"
            raise DataError(
                f"{self.name}{' (' + what + ')' if what else ''}: only one class present "
                f"({len(self)} examples, all {only}); need both harmful and harmless examples"
            )
        return self

    # ------------------------------------------------------------ transforms
    def filter(
        self,
        *,
        split: str | Sequence[str | None] | None = None,
        kind: str | Sequence[str] | None = None,
        source: str | Sequence[str] | None = None,
        label: float | None = None,
        category: str | Sequence[str] | None = None,
        name: str | None = None,
    ) -> PromptDataset:
        """Keep examples matching every given field (a value or a list of allowed values)."""

        def _allowed(v: Any) -> set[Any] | None:
            if v is None:
                return None
            return {v} if isinstance(v, str) else set(v)

        sp, kd, so, ca = _allowed(split), _allowed(kind), _allowed(source), _allowed(category)
        out = [
            e
            for e in self._examples
            if (sp is None or e.split in sp)
            and (kd is None or e.kind in kd)
            and (so is None or e.source in so)
            and (ca is None or e.category in ca)
            and (label is None or e.label == label)
        ]
        return PromptDataset(out, name=name or self.name)

    def where(self, pred: Any, name: str | None = None) -> PromptDataset:
        return PromptDataset([e for e in self._examples if pred(e)], name=name or self.name)

    def dedup(self) -> PromptDataset:
        """Drop examples whose normalized text repeats an earlier one (first occurrence kept)."""
        seen: set[str] = set()
        out = []
        for e in self._examples:
            key = normalize_text(e.all_text())
            if key in seen:
                continue
            seen.add(key)
            out.append(e)
        return PromptDataset(out, name=self.name)

    def subsample(self, n: int, seed: int = 0, *, stratify: bool = True) -> PromptDataset:
        """A seeded subsample of at most ``n`` examples (class-stratified by default), order preserved."""
        if n >= len(self):
            return self
        rng = random.Random(seed)
        idx = list(range(len(self)))
        if stratify:
            pos = [i for i in idx if self._examples[i].label >= 0.5]
            neg = [i for i in idx if self._examples[i].label < 0.5]
            n_pos = round(n * len(pos) / len(self))
            if pos and neg:
                n_pos = min(max(n_pos, 1), n - 1)
            keep = rng.sample(pos, min(n_pos, len(pos))) + rng.sample(neg, min(n - n_pos, len(neg)))
        else:
            keep = rng.sample(idx, n)
        keep_set = set(keep)
        return PromptDataset([e for i, e in enumerate(self._examples) if i in keep_set], name=self.name)

    def subsample_groups(self, n: int, seed: int = 0) -> PromptDataset:
        """A seeded subsample of whole groups (``group_key``) with at most ``n`` examples, order preserved.

        Groups are visited in a seeded random order and taken while they fit; a group larger than the room
        left is skipped (so the result never cuts a group)."""
        if n >= len(self):
            return self
        groups: dict[str, list[int]] = {}
        for i, e in enumerate(self._examples):
            groups.setdefault(e.group_key, []).append(i)
        keys = sorted(groups)
        random.Random(seed).shuffle(keys)
        keep: set[int] = set()
        for k in keys:
            if len(keep) + len(groups[k]) <= n:
                keep.update(groups[k])
            if len(keep) == n:
                break
        return PromptDataset([e for i, e in enumerate(self._examples) if i in keep], name=self.name)

    def concat(self, other: PromptDataset, name: str | None = None) -> PromptDataset:
        return PromptDataset(self._examples + other._examples, name=name or f"{self.name}+{other.name}")

    def map(self, fn: Any, name: str | None = None) -> PromptDataset:
        return PromptDataset([fn(e) for e in self._examples], name=name or self.name)

    def with_splits(
        self,
        fractions: dict[str, float] | None = None,
        seed: int = 0,
        *,
        overwrite: bool = False,
    ) -> PromptDataset:
        """Assign ``split`` by whole groups (a group never lands in two splits), stratified by label.

        Examples that already carry a split keep it unless ``overwrite``.
        """
        fractions = fractions or {"train": 0.6, "val": 0.2, "test": 0.2}
        total = sum(fractions.values())
        if total <= 0 or any(v < 0 for v in fractions.values()):
            raise DataError(f"split fractions must be non-negative and sum > 0, got {fractions}")
        names = list(fractions)
        probs = np.asarray([fractions[k] / total for k in names])
        # Groups, stratified by their majority label.
        groups: dict[str, list[int]] = {}
        for i, e in enumerate(self._examples):
            if e.split is not None and not overwrite:
                continue
            groups.setdefault(e.group_key, []).append(i)
        assign: dict[str, str] = {}
        for cls in (True, False):
            keys = sorted(
                k
                for k, ix in groups.items()
                if (np.mean([self._examples[i].label for i in ix]) >= 0.5) == cls
            )
            rng = random.Random(f"{seed}:{cls}")
            rng.shuffle(keys)
            sizes = np.asarray([len(groups[k]) for k in keys], dtype=float)
            target = probs * sizes.sum()
            filled = np.zeros(len(names))
            for k, s in zip(keys, sizes, strict=True):
                j = int(np.argmax(target - filled))
                assign[k] = names[j]
                filled[j] += s
        out = [replace(e, split=assign[e.group_key]) if e.group_key in assign else e for e in self._examples]
        return PromptDataset(out, name=self.name)

    def split(self, name: str) -> PromptDataset:
        return self.filter(split=name, name=f"{self.name}[{name}]")

    # ------------------------------------------------------------ IO
    def to_jsonl(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(p.suffix + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for e in self._examples:
                f.write(json.dumps(e.to_json(), ensure_ascii=False) + "\n")
        tmp.replace(p)
        return p


def load_jsonl(path: str | Path, *, name: str | None = None, soft_labels: bool = False) -> PromptDataset:
    """Load the JSONL schema of ``../shared/datasets`` (``text`` or ``messages``, ``label``, ...).

    Every bad line raises a :class:`DataError` naming the file and line. Labels must be 0/1 unless
    ``soft_labels`` (then anything in [0, 1]).
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file")
    raw = p.read_bytes()
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line_no = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{p}:{line_no}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    examples: list[Example] = []
    seen: dict[str, int] = {}
    for line_no, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{p}:{line_no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
        if isinstance(obj, dict) and obj.get("id") is None:
            obj["id"] = f"{p.stem}:{line_no}"
        ex = Example.from_json(obj, where=where)
        if not soft_labels and ex.label not in (0.0, 1.0):
            raise DataError(
                f"{where}: label {ex.label!r} is not 0 or 1 (pass soft_labels=True for soft labels)"
            )
        if ex.id in seen:
            raise DataError(f"{where}: duplicate id {ex.id!r} (first on line {seen[ex.id]})")
        seen[ex.id] = line_no
        examples.append(ex)
    if not examples:
        raise DataError(f"{p}: file is empty (no examples)")
    return PromptDataset(examples, name=name or p.stem)


def load_hf(
    name: str,
    *,
    split: str = "train",
    text_field: str = "text",
    label_field: str = "label",
    config: str | None = None,
    limit: int | None = None,
) -> PromptDataset:
    """Load a Hugging Face dataset by name (needs network access to the hub)."""
    try:
        import datasets as hf_datasets
    except ImportError as e:  # pragma: no cover - datasets ships with sae-lens
        raise DataError("loading Hugging Face datasets needs the `datasets` package") from e
    try:
        ds = hf_datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network errors come in many types
        raise DataError(f"could not load Hugging Face dataset {name!r} (split {split!r}): {e}") from e
    out = []
    for i, row in enumerate(ds):
        if limit is not None and i >= limit:
            break
        if text_field not in row or label_field not in row:
            raise DataError(f"hf:{name}[{i}]: missing field {text_field!r} or {label_field!r}")
        out.append(
            Example(
                id=f"{name}:{split}:{i}",
                text=str(row[text_field]),
                label=float(row[label_field]),
                source=name,
                split=None,
            )
        )
    if not out:
        raise DataError(f"hf:{name} split {split!r} is empty")
    return PromptDataset(out, name=name.replace("/", "_"))


#: a source prefix (``builtin``, ``hf``) -> its loader ``(argument after the colon or None, **kwargs)``;
#: filled by :func:`register_source` in the module that defines the source
DATASET_SOURCES: dict[str, Callable[..., PromptDataset]] = {}

F = TypeVar("F", bound=Callable[..., PromptDataset])


def register_source(prefix: str) -> Callable[[F], F]:
    """Decorator: make ``load_dataset("<prefix>")`` / ``load_dataset("<prefix>:<arg>")`` call the loader
    with ``arg`` (None without a colon) and the caller's keyword arguments."""

    def deco(fn: F) -> F:
        if prefix in DATASET_SOURCES and DATASET_SOURCES[prefix].__qualname__ != fn.__qualname__:
            raise ValueError(f"dataset source {prefix!r} is already registered")
        DATASET_SOURCES[prefix] = fn
        return fn

    return deco


@register_source("hf")
def _hf_source(arg: str | None, **kwargs: Any) -> PromptDataset:
    if not arg:
        raise DataError("a Hugging Face dataset is named hf:NAME")
    return load_hf(arg, **kwargs)


def load_dataset(ref: str | Path, **kwargs: Any) -> PromptDataset:
    """Load by reference: a JSONL path, or a registered source: ``builtin`` (the project's own labelled
    set; ``builtin:N`` for ``N`` prompts), ``builtin:control`` (1,100 harmless everyday requests in the same
    templates, for thresholds; ``builtin:control:N``), ``builtin:rich[:N]`` / ``builtin:wrapped[:N]`` (every
    look-alike and surface form, plain or in jailbreak wrappers), ``source:NAME[:CAP]`` (a named source of
    :mod:`activations.shared_sources`) or ``hf:NAME`` (:data:`DATASET_SOURCES`)."""
    s = str(ref)
    head, colon, rest = s.partition(":")
    source = DATASET_SOURCES.get(head)
    if source is not None:
        return source(rest if colon else None, **kwargs)
    return load_jsonl(s, **kwargs)
