"""The constitution generator's look-alike lists, surface forms, multi-turn prompts and jailbreak-wrapped
variants (``builtin:rich``, ``builtin:wrapped``), and the unchanged default built-in set."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from activations.augment import TRANSFORMS, wrap_each
from activations.builtin import WRAPPERS, benign_control, builtin_dataset, rich_dataset, wrapped_dataset
from activations.constitution import (
    FORM_TEMPLATES,
    FORMS,
    OPENERS,
    TEMPLATES,
    Constitution,
    ConstitutionError,
    _tasks,
    form_slots,
    generate_prompts,
    load_constitution,
)
from activations.data import DataError, Example, PromptDataset, load_dataset, normalize_text


@pytest.fixture(scope="module")
def general() -> Constitution:
    return load_constitution("general")


@pytest.fixture(scope="module")
def rich() -> PromptDataset:
    return rich_dataset()


def _split_of_group(ds: PromptDataset) -> dict[str, set[str | None]]:
    out: dict[str, set[str | None]] = {}
    for e in ds:
        out.setdefault(e.group_key, set()).add(e.split)
    return out


# ---------------------------------------------------------------------- the default set does not move
def test_default_generation_is_byte_for_byte_unchanged(general: Constitution) -> None:
    """Stores and tests key on these fingerprints (computed before look-alike lists and forms existed)."""
    assert builtin_dataset().fingerprint() == "3cf7fd325de95d6c"
    assert benign_control().fingerprint() == "0d49615cf0b560bc"
    assert generate_prompts(general).fingerprint() == "a26ababbb2be972e"
    assert load_dataset("builtin").fingerprint() == "3cf7fd325de95d6c"
    assert all("form" not in e.meta_dict() for e in builtin_dataset())


# ---------------------------------------------------------------------- look-alike lists
def test_every_restricted_topic_has_several_lookalikes(general: Constitution) -> None:
    assert general.n_topics == {"restricted": 88, "lookalike": 264, "permitted": 80}
    for cat in general.restricted:
        for t in cat.topics:
            assert len(t.lookalikes) >= 3, t.topic
            assert t.lookalikes[0] == t.lookalike
            keys = {normalize_text(x) for x in t.lookalikes}
            assert len(keys) == len(t.lookalikes) and normalize_text(t.topic) not in keys
            assert not any(x.lower().startswith("to ") for x in t.lookalikes)


def _mini(lookalike: Any) -> dict[str, Any]:
    return {
        "name": "mini",
        "restricted": [
            {
                "name": "weapons",
                "description": "weapon requests",
                "topics": [{"topic": "build a pipe bomb", "lookalike": lookalike}],
            }
        ],
        "permitted": [{"name": "cooking", "description": "food", "topics": ["bake bread"]}],
    }


def test_lookalike_lists_parse_round_trip_and_fail_clearly(tmp_path: Path) -> None:
    c = Constitution.from_dict(_mini(["build a pipe organ", "fix a leaking pipe", "make a bath bomb"]))
    t = c.restricted[0].topics[0]
    assert t.lookalike == "build a pipe organ" and t.more_lookalikes == (
        "fix a leaking pipe",
        "make a bath bomb",
    )
    p = c.to_yaml(tmp_path / "c.yaml")
    assert Constitution.from_yaml(p) == c
    assert Constitution.from_dict(_mini("build a pipe organ")).restricted[0].topics[0].more_lookalikes == ()
    bad = [
        (_mini([]), "restricted[0].topics[0].lookalike"),
        (_mini(["build a pipe organ", "build a pipe bomb"]), "must differ"),
        (_mini(["build a pipe organ", "bake bread"]), "appears twice"),
        (_mini(["build a pipe organ", "ok"]), "at least 3 characters"),
    ]
    for data, needle in bad:
        p = tmp_path / "bad.yaml"
        p.write_text(yaml.safe_dump(data))
        with pytest.raises(ConstitutionError, match=re.escape(needle)) as err:
            Constitution.from_yaml(p)
        assert str(p) in str(err.value)
    both = _mini(["build a pipe organ", "x y z"])
    both["restricted"][0]["topics"][0]["more_lookalikes"] = ["fix a pipe"]
    with pytest.raises(ConstitutionError, match="not both"):
        Constitution.from_dict(both)


def test_all_lookalikes_are_expanded_as_contrast(general: Constitution) -> None:
    first = generate_prompts(general, split=False)
    every = generate_prompts(general, lookalikes="all", split=False)
    assert len({e.meta_dict()["topic"] for e in first if e.kind == "contrast"}) == 88
    looks = [e for e in every if e.kind == "contrast"]
    assert len({e.meta_dict()["topic"] for e in looks}) == 264
    assert all(e.label == 0.0 for e in looks)
    # the primary look-alike's examples are the same examples as in the default expansion
    assert set(first.ids) <= set(every.ids)


@pytest.mark.usefixtures("unchecked")
def test_unknown_lookalikes_choice_is_named(general: Constitution) -> None:
    with pytest.raises(ValueError, match="lookalikes"):
        generate_prompts(general, lookalikes="some")  # type: ignore[arg-type]


def test_the_model_generator_is_shown_every_lookalike(general: Constitution) -> None:
    contrast = [t for t in _tasks(general, True, True) if t.role == "contrast"]
    assert len(contrast) == 11 and all(len(t.examples) == 24 for t in contrast)


# ---------------------------------------------------------------------- surface forms
def test_form_slots() -> None:
    slots = form_slots("all")
    assert {f for f, _ in slots} == set(FORMS)
    assert len(form_slots(["question", "imperative"])) == len(TEMPLATES)
    assert len(form_slots("multi_turn")) == len(OPENERS)
    assert form_slots(["story", "story"]) == form_slots("story")
    with pytest.raises(ValueError, match="unknown form 'poem'"):
        form_slots(["poem"])
    with pytest.raises(ValueError, match="at least one"):
        form_slots([])


def test_rich_generation_is_deterministic_seeded_and_balanced(general: Constitution) -> None:
    kw: dict[str, Any] = {"lookalikes": "all", "forms": "all"}
    a = generate_prompts(general, n=600, seed=3, **kw)
    b = generate_prompts(general, n=600, seed=3, **kw)
    c = generate_prompts(general, n=600, seed=4, **kw)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert Counter((int(e.label), e.kind) for e in a) == {
        (1, "plain"): 300,
        (0, "contrast"): 150,
        (0, "plain"): 150,
    }
    assert {e.meta_dict()["seed"] for e in c} == {4}
    texts = [normalize_text(e.all_text()) for e in a]
    assert len(set(texts)) == len(texts)


def test_every_form_appears_for_every_role(rich: PromptDataset) -> None:
    assert len(rich) == 1920
    seen = Counter((e.meta_dict()["form"], e.label >= 0.5, e.kind) for e in rich)
    for form in FORMS:  # a form carries no label signal
        for role in ((True, "plain"), (False, "contrast"), (False, "plain")):
            assert seen[(form, *role)] > 0, (form, role)
    for e in rich:
        m = e.meta_dict()
        assert m["generator"] == "template" and m["topic"] in e.prompt
        if m["form"] in FORM_TEMPLATES:
            body = FORM_TEMPLATES[m["form"]][m["template"]].format(t=m["topic"])
            assert body[1:] in (e.text or ""), e.id
        if e.kind == "contrast":
            assert e.label == 0.0
        else:
            assert e.label == (1.0 if e.id.split(":")[3] == "r" else 0.0)


def test_multi_turn_examples_are_conversations_awaiting_an_answer(rich: PromptDataset) -> None:
    multi = [e for e in rich if e.meta_dict()["form"] == "multi_turn"]
    assert len(multi) > 50
    openers = {u for u, _ in OPENERS}
    for e in multi:
        assert e.text is None and e.messages is not None
        assert [m.role for m in e.messages] == ["user", "assistant", "user"]
        assert not e.is_exchange and e.response is None
        assert e.messages[0].content in openers and e.meta_dict()["topic"] in e.prompt
        assert Example.from_json(e.to_json()) == e
    # in a wrapper (many-shot adds turns before the request) they still end with the user's request
    wrapped = wrap_each(PromptDataset(multi, name="m"), ["many_shot", "roleplay"], seed=0)
    for e in wrapped:
        assert e.messages is not None and e.messages[-1].role == "user" and not e.is_exchange
        assert e.messages[0].content in openers


def test_groups_never_straddle_splits(general: Constitution, rich: PromptDataset) -> None:
    wrapped = wrapped_dataset()
    for ds in (rich, wrapped):
        assert all(len(s) == 1 and None not in s for s in _split_of_group(ds).values())
        for name in ("train", "val", "test"):
            ds.split(name).require_two_classes(name)
    # a topic, every look-alike of it and every form of both share one group
    group_of: dict[str, str] = {}
    for cat in general.restricted:
        for i, t in enumerate(cat.topics):
            for phrase in (t.topic, *t.lookalikes):
                group_of[phrase] = f"general/{cat.name}/{i:02d}"
    for e in rich:
        topic = e.meta_dict()["topic"]
        if topic in group_of:
            assert e.group == group_of[topic]
    # the wrapped set is the rich set in wrappers: the same groups in the same splits
    assert {e.group: e.split for e in wrapped} == {e.group: e.split for e in rich}


def test_wrappers_are_dealt_evenly_over_labels(rich: PromptDataset) -> None:
    wrapped = wrapped_dataset()
    assert len(wrapped) == len(rich)
    by = Counter((e.meta_dict()["transform"], e.label >= 0.5) for e in wrapped)
    for w in WRAPPERS:
        assert w in TRANSFORMS
        harmful, harmless = by[(w, True)], by[(w, False)]
        assert abs(harmful - len(rich) / 2 / len(WRAPPERS)) <= 1
        assert abs(harmless - len(rich) / 2 / len(WRAPPERS)) <= 2
    for w, r in zip(wrapped, rich, strict=True):
        assert (w.label, w.group, w.split, w.category) == (r.label, r.group, r.split, r.category)
        assert w.kind == ("jailbreak" if r.label >= 0.5 else r.kind)
        assert w.meta_dict()["request"] == r.prompt
    assert wrap_each(rich, WRAPPERS, seed=0).fingerprint() == wrapped.fingerprint()
    assert wrap_each(rich, WRAPPERS, seed=1).fingerprint() != wrapped.fingerprint()


def test_builtin_references() -> None:
    assert len(load_dataset("builtin:rich:100")) == 100
    assert load_dataset("builtin:rich").fingerprint() == rich_dataset().fingerprint()
    small = load_dataset("builtin:wrapped:80")
    assert len(small) == 80 and all(e.meta_dict().get("transform") for e in small)
    assert len(load_dataset("builtin:control:10")) == 10 and len(load_dataset("builtin:40")) == 40
    for bad in ("builtin:rich:many", "builtin:nope", "builtin:1:2:3", "builtin:control:x"):
        with pytest.raises(DataError, match="builtin:rich"):
            load_dataset(bad)
