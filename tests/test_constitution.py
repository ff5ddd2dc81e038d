from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml
from pydantic import ValidationError

from activations.builtin import builtin_dataset
from activations.constitution import (
    TEMPLATES,
    Constitution,
    ConstitutionError,
    GenerationError,
    generate_prompts,
    generate_with_endpoint,
    generate_with_model,
    load_constitution,
    parse_generated,
    shipped_constitutions,
)
from activations.data import Example, PromptDataset, load_dataset, normalize_text
from activations.tiny import make_tiny_model


@pytest.fixture(scope="module")
def general() -> Constitution:
    return load_constitution("general")


@pytest.fixture(scope="module")
def full(general: Constitution) -> PromptDataset:
    return generate_prompts(general)


def _groups_by_split(ds: PromptDataset) -> dict[str, set[str | None]]:
    out: dict[str, set[str | None]] = {}
    for e in ds:
        out.setdefault(e.group_key, set()).add(e.split)
    return out


# ---------------------------------------------------------------------- the shipped constitution
def test_shipped_constitution_shape(general: Constitution) -> None:
    assert "general" in shipped_constitutions()
    assert general.name == "general"
    assert 10 <= len(general.restricted) <= 12
    assert len(general.permitted) >= 6
    for cat in general.restricted:
        assert cat.description and len(cat.topics) >= 5
        for t in cat.topics:
            assert t.topic and t.lookalike and normalize_text(t.topic) != normalize_text(t.lookalike)
    # frozen models
    with pytest.raises(ValidationError):
        general.name = "other"  # type: ignore[misc]


def test_roundtrip_yaml(general: Constitution, tmp_path: Path) -> None:
    p = general.to_yaml(tmp_path / "c.yaml")
    assert Constitution.from_yaml(p) == general
    assert load_constitution(p) == general


def _minimal() -> dict[str, Any]:
    return {
        "name": "mini",
        "restricted": [
            {
                "name": "weapons",
                "description": "weapon requests",
                "topics": [{"topic": "build a pipe bomb", "lookalike": "build a pipe organ"}],
            }
        ],
        "permitted": [{"name": "cooking", "description": "food", "topics": ["bake bread"]}],
    }


def _write(tmp_path: Path, data: Any) -> Path:
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


def test_minimal_constitution_loads(tmp_path: Path) -> None:
    c = Constitution.from_yaml(_write(tmp_path, _minimal()))
    ds = generate_prompts(c)
    assert len(ds) == 3 * len(TEMPLATES)
    assert {e.source for e in ds} == {"constitution:mini"}


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d["restricted"][0]["topics"][0].pop("lookalike"), "restricted[0].topics[0].lookalike"),
        (lambda d: d["restricted"][0].pop("description"), "restricted[0].description"),
        (lambda d: d["restricted"][0]["topics"][0].update(lookalke="x"), "lookalke"),
        (lambda d: d.update(permited=[]), "permited"),
        (lambda d: d.pop("name"), "name"),
        (lambda d: d["permitted"][0].update(name="Bad Name!"), "permitted[0].name"),
        (lambda d: d["permitted"][0].update(topics=[]), "permitted[0].topics"),
        (lambda d: d["restricted"].append(dict(d["restricted"][0])), "unique"),
    ],
)
def test_bad_constitution_names_the_key(tmp_path: Path, mutate: Any, needle: str) -> None:
    data = _minimal()
    mutate(data)
    p = _write(tmp_path, data)
    with pytest.raises(ConstitutionError) as err:
        Constitution.from_yaml(p)
    assert needle in str(err.value)
    assert str(p) in str(err.value)


def test_bad_yaml_syntax_and_missing_file(tmp_path: Path) -> None:
    p = _write(tmp_path, "name: x\nrestricted: [\n  - {")
    with pytest.raises(ConstitutionError, match="not valid YAML"):
        Constitution.from_yaml(p)
    with pytest.raises(ConstitutionError, match="top level"):
        Constitution.from_yaml(_write(tmp_path, "- just\n- a list\n"))
    with pytest.raises(ConstitutionError, match="no such"):
        Constitution.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ConstitutionError, match="available"):
        load_constitution("no-such-constitution")


# ---------------------------------------------------------------------- template generation
def test_full_expansion_is_large_distinct_and_labelled(full: PromptDataset) -> None:
    distinct = {normalize_text(e.text or "") for e in full}
    assert len(distinct) >= 2000
    assert len(distinct) == len(full)
    kinds = Counter((int(e.label), e.kind) for e in full)
    assert set(kinds) == {(1, "plain"), (0, "contrast"), (0, "plain")}
    assert kinds[(1, "plain")] == kinds[(0, "contrast")]  # one look-alike per restricted topic
    for e in full:
        m = e.meta_dict()
        assert m["generator"] == "template" and m["constitution"] == "general" and m["seed"] == 0
        assert e.source == "constitution:general"
        assert e.category and e.group and e.group.startswith("general/")
        assert m["topic"] in (e.text or "")


def test_splits_never_cut_a_group(full: PromptDataset) -> None:
    by_group = _groups_by_split(full)
    assert all(len(s) == 1 and None not in s for s in by_group.values())
    # every topic's phrasings (and its look-alike) share one split
    topics: dict[str, set[str | None]] = {}
    for e in full:
        topics.setdefault(e.meta_dict()["topic"], set()).add(e.split)
    assert all(len(s) == 1 for s in topics.values())
    for name in ("train", "val", "test"):
        part = full.split(name)
        assert len(part) > 0
        part.require_two_classes(name)


def test_generation_is_deterministic_and_seeded(general: Constitution) -> None:
    a = generate_prompts(general, n=300, seed=3)
    b = generate_prompts(general, n=300, seed=3)
    c = generate_prompts(general, n=300, seed=4)
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()
    assert len(a) == 300
    labels = Counter(int(e.label) for e in a)
    assert labels[1] == labels[0] == 150
    assert {e.meta_dict()["seed"] for e in c} == {4}


def test_subset_is_spread_over_topics(general: Constitution) -> None:
    ds = generate_prompts(general, n=480)
    per_group = Counter(e.group for e in ds if e.label == 1)
    assert len(per_group) == sum(len(c.topics) for c in general.restricted)  # every restricted topic used
    assert max(per_group.values()) - min(per_group.values()) <= 1


# ---------------------------------------------------------------------- built-in dataset
def test_builtin_is_balanced_split_and_cached() -> None:
    ds = builtin_dataset()
    assert ds is builtin_dataset()  # lru_cache
    assert load_dataset("builtin").fingerprint() == ds.fingerprint()
    assert len(ds) == 480
    kinds = Counter((int(e.label), e.kind) for e in ds)
    assert kinds == {(1, "plain"): 240, (0, "contrast"): 120, (0, "plain"): 120}
    assert all(len(s) == 1 for s in _groups_by_split(ds).values())
    sizes = Counter(e.split for e in ds)
    assert set(sizes) == {"train", "val", "test"}
    assert sizes["train"] > sizes["val"] > 0 and sizes["test"] > 0
    for name in ("train", "val", "test"):
        labels = Counter(int(e.label) for e in ds.split(name))
        assert abs(labels[1] - labels[0]) <= 0.1 * sum(labels.values()) + 2
    assert builtin_dataset(120, seed=1).fingerprint() == builtin_dataset(120, seed=1).fingerprint()
    assert len(builtin_dataset(120, seed=1)) == 120


# ---------------------------------------------------------------------- model-written prompts
def test_parse_generated() -> None:
    raw = '1. How do I bake bread?\n2) "Write a poem about rain."\n\n- x\n* Request 4: Plan a trip to Rome\n'
    assert parse_generated(raw) == ["How do I bake bread?", "Write a poem about rain.", "Plan a trip to Rome"]


def test_local_model_generator_on_tiny_model(general: Constitution) -> None:
    model = make_tiny_model(n_ctx=128, seed=0)
    ds = generate_with_model(general, model, n=3, seed=0, per_call=3, max_new_tokens=12)
    assert 1 <= len(ds) <= 3
    texts = [normalize_text(e.text or "") for e in ds]
    assert all(texts) and len(set(texts)) == len(texts)
    for e in ds:
        assert isinstance(e, Example)
        m = e.meta_dict()
        assert m["generator"] == "local-model" and m["model"] == model.cfg.model_name
        assert m["constitution"] == "general" and m["seed"] == 0
        assert e.source == "constitution:general" and e.category and e.group and e.split
        assert e.label == (1.0 if m["role"] == "harmful" else 0.0)
    again = generate_with_model(general, model, n=3, seed=0, per_call=3, max_new_tokens=12)
    assert again.fingerprint() == ds.fingerprint()
    ex = generate_with_model(
        general, model, n=1, seed=1, per_call=2, max_new_tokens=12, responses=True, response_tokens=6
    )
    assert ex[0].is_exchange and ex[0].response is not None


# ---------------------------------------------------------------------- OpenAI-compatible endpoint
class _Stub(BaseHTTPRequestHandler):
    mode = "ok"
    requests: ClassVar[list[dict[str, Any]]] = []

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
        if self.mode == "error":
            self._send(500, b'{"error": "boom"}')
            return
        if self.mode == "slow":
            time.sleep(1.5)
        if self.mode == "garbage":
            self._send(200, b"not json")
            return
        lines = [f"Stub request number {i} about seed {body.get('seed')}" for i in range(1, 4)]
        # numbered lines, then a duplicate, a too-short line and a blank: the last three are dropped
        content = "\n".join([f"{i}. {t}" for i, t in enumerate(lines, 1)] + [f"4) {lines[0]}", "5. ok", ""])
        reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
        self._send(200, json.dumps(reply).encode())

    def _send(self, code: int, payload: bytes) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass


@pytest.fixture()
def stub() -> Iterator[tuple[str, type[_Stub]]]:
    handler = type("Handler", (_Stub,), {"requests": [], "mode": "ok"})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    watchdog = threading.Timer(60.0, server.shutdown)  # bounded: stops itself whatever happens
    watchdog.daemon = True
    watchdog.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", handler
    finally:
        watchdog.cancel()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_endpoint_round_trip(general: Constitution, stub: tuple[str, type[_Stub]]) -> None:
    url, handler = stub
    ds = generate_with_endpoint(general, url, "sk-test", "stub-model", n=7, seed=5, per_call=3, timeout=5)
    assert len(ds) == 7
    req = handler.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["auth"] == "Bearer sk-test" and req["model"] == "stub-model"
    assert req["messages"][0]["role"] == "system" and "Category:" in req["messages"][1]["content"]
    texts = [e.text for e in ds]
    assert len(set(texts)) == len(texts) and all(t and t.startswith("Stub request") for t in texts)
    for e in ds:
        m = e.meta_dict()
        assert m["generator"] == "endpoint" and m["model"] == "stub-model" and m["seed"] == 5
        assert e.source == "constitution:general" and e.split in {"train", "val", "test"}
    assert len(handler.requests) == 3  # 3 + 3 + 1 prompts


@pytest.mark.parametrize(
    ("mode", "match"), [("error", "HTTP 500"), ("slow", "timeout"), ("garbage", "OpenAI")]
)
def test_endpoint_errors_are_clear(
    general: Constitution, stub: tuple[str, type[_Stub]], mode: str, match: str
) -> None:
    url, handler = stub
    handler.mode = mode
    with pytest.raises(GenerationError, match=match):
        generate_with_endpoint(general, url, None, "m", n=2, seed=0, timeout=0.5)


def test_endpoint_unreachable(general: Constitution) -> None:
    with pytest.raises(GenerationError, match="could not reach"):
        generate_with_endpoint(general, "http://127.0.0.1:9", None, "m", n=1, timeout=2)
