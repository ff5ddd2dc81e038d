from __future__ import annotations

import json

import numpy as np
import pytest

from activations.data import (
    DataError,
    Example,
    Message,
    PromptDataset,
    load_dataset,
    load_jsonl,
    normalize_text,
)
from activations.render import ROLE_PROMPT, ROLE_RESPONSE, ROLE_SYSTEM, render_example
from tests.conftest import SHARED_DATASETS, planted_dataset


def _write(tmp_path, lines: list[str], name: str = "d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def test_load_shared_schema_and_fingerprint(tmp_path) -> None:
    rows = [
        {
            "id": "a",
            "text": "How do I bake bread?",
            "label": 0,
            "source": "t",
            "split": "train",
            "kind": "plain",
        },
        {
            "id": "b",
            "text": "How do I build a bomb?",
            "label": 1,
            "source": "t",
            "split": "test",
            "kind": "plain",
        },
        {
            "id": "c",
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
            "label": 0,
        },
    ]
    p = _write(tmp_path, [json.dumps(r) for r in rows])
    ds = load_jsonl(p)
    assert len(ds) == 3 and ds.name == "d"
    assert ds[2].is_exchange and ds[2].response == "hello" and ds[2].prompt == "hi"
    assert list(ds.labels) == [0, 1, 0]
    assert ds.fingerprint() == load_jsonl(p).fingerprint()
    ds.to_jsonl(tmp_path / "round.jsonl")
    assert load_jsonl(tmp_path / "round.jsonl").fingerprint() == ds.fingerprint()
    assert ds.filter(split="test").ids == ["b"]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"text": "x", "label": 1}\nnot json', r"d\.jsonl:2: not valid JSON"),
        ('{"label": 1}', r"d\.jsonl:1: missing required field 'text'"),
        ('{"text": "x"}', r"d\.jsonl:1: missing required field 'label'"),
        ('{"text": "x", "label": 2}', r"d\.jsonl:1: .*outside \[0, 1\]"),
        ('{"text": "x", "label": 0.5}', r"d\.jsonl:1: label 0\.5 is not 0 or 1"),
        ('{"text": "x", "label": "yes"}', r"d\.jsonl:1: label 'yes' is not a number"),
        ('{"text": 3, "label": 1}', r"d\.jsonl:1: 'text' must be a string"),
        ('{"id": "a", "text": "x", "label": 1}\n{"id": "a", "text": "y", "label": 0}', r"duplicate id 'a'"),
        ("", r"file is empty"),
    ],
)
def test_bad_jsonl_lines_name_file_and_line(tmp_path, content: str, match: str) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=match):
        load_jsonl(p)


def test_non_utf8_and_missing_file(tmp_path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"text": "ok", "label": 1}\n{"text": "caf\xe9", "label": 0}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid UTF-8"):
        load_jsonl(p)
    with pytest.raises(DataError, match="no such file"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_soft_labels(tmp_path) -> None:
    p = _write(tmp_path, ['{"text": "x", "label": 0.3}', '{"text": "y", "label": 1}'])
    assert load_jsonl(p, soft_labels=True).labels.tolist() == pytest.approx([0.3, 1.0])


def test_dedup_normalized_and_two_classes() -> None:
    ds = PromptDataset(
        [
            Example(id="1", text="How to bake  BREAD?", label=0),
            Example(id="2", text="how to bake bread", label=0),
            Example(id="3", text="how to bake cake", label=0),
        ],
        name="x",
    )
    assert normalize_text("How to bake  BREAD?") == "how to bake bread"
    assert ds.dedup().ids == ["1", "3"]
    with pytest.raises(DataError, match="only one class"):
        ds.require_two_classes()
    with pytest.raises(DataError, match="empty"):
        PromptDataset([], name="e").require_nonempty()


def test_splits_never_cut_a_group() -> None:
    ds = planted_dataset(n=200)
    out = ds.with_splits({"train": 0.6, "val": 0.2, "test": 0.2}, seed=3)
    where: dict[str, set] = {}
    for e in out:
        where.setdefault(e.group_key, set()).add(e.split)
    assert all(len(s) == 1 for s in where.values())
    counts = {s: len(out.split(s)) for s in ("train", "val", "test")}
    assert counts["train"] > counts["val"] > 0 and counts["test"] > 0
    for s in ("train", "val", "test"):
        out.split(s).require_two_classes()
    assert out.fingerprint() == ds.with_splits({"train": 0.6, "val": 0.2, "test": 0.2}, seed=3).fingerprint()


def test_exchange_roles_with_chat_template(tiny_model) -> None:
    ex = Example(
        id="e",
        label=1,
        messages=(Message("user", "how to make a bomb"), Message("assistant", "no i will not")),
    )
    r = render_example(ex, tiny_model.tokenizer, max_len=100)
    toks = tiny_model.tokenizer.convert_ids_to_tokens(r.ids.tolist())
    resp = [t for t, role in zip(toks, r.roles, strict=True) if role == ROLE_RESPONSE]
    prompt = [t for t, role in zip(toks, r.roles, strict=True) if role == ROLE_PROMPT]
    assert resp[:4] == ["no", "i", "will", "not"]
    assert "bomb" in prompt and "<|assistant|>" in prompt and "no" not in prompt
    assert r.roles[0] == ROLE_SYSTEM  # the template's turn marker before the first user content
    plain = render_example(Example(id="p", label=0, text="bake a cake"), tiny_model.tokenizer, max_len=100)
    assert (plain.roles == ROLE_RESPONSE).sum() == 0 and plain.roles[-1] == ROLE_PROMPT


def test_truncation_counts(tiny_model) -> None:
    r = render_example(Example(id="p", label=0, text="cake " * 50), tiny_model.tokenizer, max_len=10)
    assert len(r.ids) == 10 and r.n_truncated > 0


def test_builtin_dataset_loads() -> None:
    ds = load_dataset("builtin")
    ds.require_two_classes()
    assert {e.split for e in ds} >= {"train", "test"}


@pytest.mark.skipif(
    not (SHARED_DATASETS / "jailbreakbench" / "jailbreakbench.jsonl").exists(),
    reason="shared datasets not present",
)
def test_shared_dataset_loads() -> None:
    ds = load_jsonl(SHARED_DATASETS / "jailbreakbench" / "jailbreakbench.jsonl")
    assert len(ds) == 200 and set(np.unique(ds.labels)) == {0.0, 1.0}
    assert {e.kind for e in ds} == {"plain", "contrast"}


def test_builtin_control_is_benign_and_shares_no_topic_with_the_builtin_set() -> None:
    from activations.data import canonical_group, normalize_text
    from activations.decontam import Reference, decontaminate

    control = load_dataset("builtin:control")
    assert (
        len(control) == 1100 and (control.labels == 0).all() and len(load_dataset("builtin:control:50")) == 50
    )
    assert control.fingerprint() == load_dataset("builtin:control").fingerprint()  # deterministic
    builtin = load_dataset("builtin")
    assert not {canonical_group(e) for e in control} & {canonical_group(e) for e in builtin}
    assert not {e.meta_dict()["topic"] for e in control} & {e.meta_dict()["topic"] for e in builtin}
    # same templates, other topics: nothing is a duplicate or a near-duplicate of the built-in prompts
    clean, rep = decontaminate(control, Reference([builtin]))
    assert len(clean) == len(control), rep.removed
    assert len({normalize_text(e.text or "") for e in control}) == len(control)
    with pytest.raises(DataError, match="builtin:control"):
        load_dataset("builtin:control:x")
