"""Probe, classifier and SAE folders are untrusted input: a schema, bounds, and only ``ProbeLoadError``.

Every registered probe family (and the tf-idf baseline, a fine-tuned layer and local SAE folders) is saved
once; hypothesis then truncates, flips, inserts bytes, and edits the JSON (values of every type, huge dims,
NaN, extra keys, deep nesting, dtypes, shapes and names) of ``probe.json`` and of the safetensors header. The
loader must raise :class:`probes.io.ProbeLoadError` or return a probe that still scores.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probes.attention import AttentionProbe
from probes.diffmeans import DiffMeansProbe
from probes.io import LIMITS, ProbeLoadError, load_probe, save_probe
from probes.lda import LDAProbe
from probes.logistic import LogisticProbe
from probes.multilayer import MultiLayerProbe
from probes.multimax import MultiMaxProbe
from probes.ragged import Ragged
from probes.token import TokenProbe
from sae.features import LatentEncoder
from sae.probe import SAEFeatureProbe

pytestmark = pytest.mark.faults

RNG = np.random.default_rng(0)
N, D = 40, 6
Y = np.arange(N) % 2
X = torch.tensor(RNG.normal(size=(N, D)) + Y[:, None] * 1.5, dtype=torch.float32)


def _ragged(d: int = D) -> Ragged:
    lens = RNG.integers(2, 5, N)
    vals = torch.tensor(RNG.normal(size=(int(lens.sum()), d)), dtype=torch.float32)
    return Ragged(vals, np.concatenate([[0], np.cumsum(lens)]).astype(np.int64))


def _sae_probe(activation: str) -> SAEFeatureProbe:
    g = torch.Generator().manual_seed(1)
    m = 4 if activation != "topk" else 8
    k = 4 if activation != "topk" else 3
    enc = LatentEncoder(
        torch.randn(D, m, generator=g),
        torch.zeros(m),
        torch.zeros(D),
        torch.arange(k),
        activation,
        threshold=torch.zeros(m) if activation == "jumprelu" else None,
        select=torch.arange(k) if activation == "topk" else None,
        topk=2 if activation == "topk" else 0,
        d_sae=m,
    )
    head = LogisticProbe(C=1.0).fit(torch.randn(N, k, generator=g) + torch.tensor(Y)[:, None], Y)
    return SAEFeatureProbe.build(enc, head, k=k, pooling="mean", hook="blocks.0.hook_resid_post")


FAMILIES: dict[str, Callable[[], Any]] = {
    "logistic": lambda: LogisticProbe(C=1.0).fit(X, Y),
    "diff_means": lambda: DiffMeansProbe().fit(X, Y),
    "lda": lambda: LDAProbe().fit(X, Y),
    "multi_layer": lambda: MultiLayerProbe(LogisticProbe(), layers=[0, 2]).fit(X.reshape(N, 2, 3), Y),
    "token_linear": lambda: TokenProbe(train_pool="mean", read_pool="ema0.5", epochs=2).fit(_ragged(), Y),
    "token_attention": lambda: AttentionProbe(heads=2, epochs=2).fit(_ragged(), Y),
    "token_multimax": lambda: MultiMaxProbe(heads=2, epochs=2).fit(_ragged(), Y),
    "sae_feature": lambda: _sae_probe("relu"),
    "sae_feature_topk": lambda: _sae_probe("topk"),
}


def _score(probe: Any) -> torch.Tensor:
    """A loaded probe must still score a well-formed input to finite logits."""
    d = int(probe.n_features_in_)
    if isinstance(probe, TokenProbe | AttentionProbe | MultiMaxProbe):
        return probe.decision_function(Ragged(torch.ones(3, d), np.array([0, 3])))
    if isinstance(probe, MultiLayerProbe):
        return probe.decision_function(torch.ones(2, len(probe.layers), d // len(probe.layers)))
    if isinstance(probe, SAEFeatureProbe):
        probe.encode(torch.ones(2, probe.encoder_.d_in))
    return probe.decision_function(torch.ones(2, d))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("probes")
    out = {}
    for name, make in FAMILIES.items():
        save_probe(make(), root / name, metadata={"model_id": "tiny", "layer": 1})
        out[name] = root / name
    return out


def test_every_family_round_trips(saved) -> None:
    for name, path in saved.items():
        probe = load_probe(path, expect={"model_id": "tiny"})
        assert torch.isfinite(_score(probe)).all(), name


def _edit_json(path: Path, fn: Callable[[dict[str, Any]], None]) -> None:
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d.update(kind="os.system"), "unknown probe kind"),
        (lambda d: d.update({"class": "subprocess.Popen"}), "class"),
        (lambda d: d.update(surprise=1), "unknown field"),
        (lambda d: d["config"].update(C="abc"), r"config\.C"),
        (lambda d: d["config"].update(__import__="os"), r"config\.__import__"),
        (lambda d: d.update(n_features_in=10**12), "n_features_in"),
        (lambda d: d["tensors"]["coef"].update(shape=[2**40]), r"tensors\.coef\.shape"),
        (lambda d: d["tensors"]["coef"].update(dtype="complex64"), r"tensors\.coef\.dtype"),
        (lambda d: d["tensors"]["coef"].update(dtype="float64"), "disagree"),
        (lambda d: d.update(format_version=99), "format version"),
        (lambda d: d.update(metadata=[1]), "metadata"),
    ],
)
def test_schema_rejections_name_the_field(saved, tmp_path, edit, match) -> None:
    p = tmp_path / "p"
    shutil.copytree(saved["logistic"], p)
    _edit_json(p / "probe.json", edit)
    modules = set(sys.modules)
    with pytest.raises(ProbeLoadError, match=match):
        load_probe(p)
    assert set(sys.modules) <= modules | {m for m in sys.modules if m.startswith(("probes.", "sae."))}


def test_nonfinite_tensors_deep_nesting_and_huge_files(saved, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    p = tmp_path / "p"
    shutil.copytree(saved["logistic"], p)
    state = load_file(str(p / "probe.safetensors"))
    state["coef"][0] = float("nan")
    save_file(state, str(p / "probe.safetensors"))
    with pytest.raises(ProbeLoadError, match="NaN or inf"):
        load_probe(p)
    shutil.rmtree(p)
    shutil.copytree(saved["logistic"], p)
    (p / "probe.json").write_text('{"kind": "logistic", "metadata": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ProbeLoadError, match="nested"):
        load_probe(p)
    (p / "probe.json").write_text(json.dumps({"kind": "logistic", "metadata": {"x": "a" * 64}}))
    old = LIMITS.max_json_bytes
    object.__setattr__(LIMITS, "max_json_bytes", 32)
    try:
        with pytest.raises(ProbeLoadError, match="more than"):
            load_probe(p)
    finally:
        object.__setattr__(LIMITS, "max_json_bytes", old)


# ---------------------------------------------------------------------------------------------- fuzzing
LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([0, 1, -1, 2, 3, 2**31, 2**63, 2**64, 10**30, LIMITS.max_dim + 1])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(
        ["float32", "float64", "int64", "bool", "complex64", "F32", "I64", "relu", "topk", "mean"]
    )
)
JSON_VALUES = st.recursive(
    LEAVES,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
    max_leaves=8,
)
DEEP = "\x00DEEP\x00"


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _edit(data: st.DataObject, doc: Any) -> str:
    """One structural edit of a JSON document; returns the new text."""
    doc = copy.deepcopy(doc)
    path = data.draw(st.sampled_from(list(_paths(doc))), label="path")
    op = data.draw(
        st.sampled_from(["replace", "delete", "add", "deep", "shape", "rename", "dup"]), label="op"
    )
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if not path:
        if op == "replace":
            doc = data.draw(JSON_VALUES)
        elif isinstance(doc, dict):
            doc[data.draw(st.text(max_size=8))] = data.draw(JSON_VALUES)
    else:
        key = path[-1]
        node = parent[key]
        if op == "replace":
            parent[key] = data.draw(JSON_VALUES, label="value")
        elif op == "delete":
            del parent[key]
        elif op == "add" and isinstance(node, dict):
            node[data.draw(st.text(max_size=8), label="key")] = data.draw(JSON_VALUES, label="value")
        elif op == "deep":
            parent[key] = DEEP
        elif op == "shape":
            parent[key] = data.draw(st.lists(st.sampled_from([0, 1, 2, 3, 6, 2**24, 2**40, -1]), max_size=4))
        elif op == "rename" and isinstance(parent, dict):
            parent[data.draw(st.text(max_size=10), label="new name")] = parent.pop(key)
        elif op == "dup" and isinstance(node, list) and node:
            node.append(copy.deepcopy(node[0]))
    text = json.dumps(doc, allow_nan=True)
    depth = data.draw(st.integers(20, 3000), label="depth")
    return text.replace(json.dumps(DEEP), "[" * depth + "]" * depth)


def _mutate_bytes(data: st.DataObject, raw: bytes) -> bytes:
    op = data.draw(st.sampled_from(["truncate", "flip", "insert", "empty", "garbage"]), label="byte op")
    if op == "empty":
        return b""
    if op == "garbage":
        return data.draw(st.binary(max_size=64))
    i = data.draw(st.integers(0, max(len(raw) - 1, 0)), label="at")
    if op == "truncate":
        return raw[:i]
    if op == "flip":
        return raw[:i] + bytes([raw[i] ^ data.draw(st.integers(1, 255))]) + raw[i + 1 :]
    return raw[:i] + data.draw(st.binary(min_size=1, max_size=16)) + raw[i:]


def _mutate_safetensors_header(data: st.DataObject, raw: bytes) -> bytes:
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    text = _edit(data, header).encode()
    return len(text).to_bytes(8, "little") + text + raw[8 + n :]


def mutate_folder(data: st.DataObject, src: Path, dst: Path, json_name: str, tensor_name: str) -> None:
    """Copy a saved folder and damage one of its files in one of several ways."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    target = data.draw(
        st.sampled_from(["json-edit", "json-bytes", "tensor-header", "tensor-bytes"]), label="t"
    )
    jf, tf = dst / json_name, dst / tensor_name
    if target == "json-edit":
        jf.write_text(_edit(data, json.loads(jf.read_text())))
    elif target == "json-bytes":
        jf.write_bytes(_mutate_bytes(data, jf.read_bytes()))
    elif target == "tensor-header" and tf.exists():
        tf.write_bytes(_mutate_safetensors_header(data, tf.read_bytes()))
    elif tf.exists():
        tf.write_bytes(_mutate_bytes(data, tf.read_bytes()))


FUZZ = settings(
    max_examples=int(os.environ.get("PROBE_ATLAS_FUZZ_EXAMPLES", "60")),
    deadline=None,
    derandomize="PROBE_ATLAS_FUZZ_EXAMPLES" not in os.environ,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@FUZZ
@given(data=st.data())
def test_mutated_probe_folders_raise_only_probe_load_error(saved, family, data) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "p"
        mutate_folder(data, saved[family], dst, "probe.json", "probe.safetensors")
        try:
            probe = load_probe(dst)
        except ProbeLoadError:
            return
        logits = _score(probe)
        assert torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------- other loaders
@pytest.fixture(scope="module")
def tfidf_folder(tmp_path_factory) -> Path:
    from probes.tfidf import TfidfClassifier

    texts = [f"{'bomb' if i % 2 else 'cake'} recipe number {i}" for i in range(30)]
    clf = TfidfClassifier(char_ngrams=(3, 4)).fit(texts, [i % 2 for i in range(30)])
    p = tmp_path_factory.mktemp("tfidf") / "c"
    clf.save(p)
    return p


@FUZZ
@given(data=st.data())
def test_mutated_tfidf_folders_raise_only_probe_load_error(tfidf_folder, data) -> None:
    from probes.text import TextClassifier

    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "c"
        mutate_folder(data, tfidf_folder, dst, "classifier.json", "classifier.safetensors")
        try:
            clf = TextClassifier.load(dst)
        except ProbeLoadError:
            return
        assert np.isfinite(clf.decision_function(["a bomb recipe", "cake"])).all()


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory) -> tuple[Any, Path]:
    from activations.tiny import make_tiny_model
    from probes.finetune import FinetunedLayers

    model = make_tiny_model(n_layers=2, d_model=16, n_heads=2, d_mlp=32, seed=0)
    clf = FinetunedLayers(model, k=1, mode="lora", rank=2)
    clf.fitted_ = True
    p = tmp_path_factory.mktemp("ft") / "c"
    clf.save(p, metadata={"model_id": "tiny"})
    return model, p


@settings(FUZZ, max_examples=max(1, FUZZ.max_examples * 2 // 3))
@given(data=st.data())
def test_mutated_finetune_folders_raise_only_probe_load_error(finetuned, data) -> None:
    from probes.finetune import FinetuneError, Sequences, load_sequence_classifier

    model, src = finetuned
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "c"
        mutate_folder(data, src, dst, "classifier.json", "classifier.safetensors")
        try:
            clf = load_sequence_classifier(dst, model)
        except (ProbeLoadError, FinetuneError) as e:
            assert isinstance(e, ProbeLoadError) or "no classifier.json" in str(e)
            return
        seqs = Sequences(torch.ones(3, 16), np.array([0, 3]), torch.ones(3, dtype=torch.bool))
        assert np.isfinite(clf.decision_function(seqs)).all()


@pytest.fixture(scope="module")
def sae_folders(tmp_path_factory) -> dict[str, Path]:
    from sae_lens import (
        JumpReLUSAE,
        JumpReLUSAEConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
    )
    from sae_lens.saes.sae import SAEMetadata

    root = tmp_path_factory.mktemp("saes")
    meta = SAEMetadata(hook_name="blocks.0.hook_resid_post")
    out = {}
    for name, sae in {
        "standard": StandardSAE(StandardSAEConfig(d_in=8, d_sae=16, metadata=meta)),
        "topk": TopKSAE(TopKSAEConfig(d_in=8, d_sae=16, k=4, metadata=meta)),
        "jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=8, d_sae=16, metadata=meta)),
    }.items():
        with torch.no_grad():
            for prm in sae.parameters():
                prm.normal_()
        sae.save_model(root / name)
        out[name] = root / name
    return out


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
@settings(FUZZ, max_examples=max(1, FUZZ.max_examples // 2))
@given(data=st.data())
def test_mutated_sae_folders_raise_only_probe_load_error(sae_folders, arch, data) -> None:
    from sae.load import SAELoadError, load_sae

    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "s"
        mutate_folder(data, sae_folders[arch], dst, "cfg.json", "sae_weights.safetensors")
        try:
            sae = load_sae(dst)
        except ProbeLoadError:
            return
        except SAELoadError as e:  # only "no cfg.json" is not a ProbeLoadError
            assert "no cfg.json" in str(e)
            return
        z = sae.encode(torch.ones(2, sae.cfg.d_in))
        assert z.shape == (2, sae.cfg.d_sae) and bool(torch.isfinite(z).all())


def test_sae_folder_rejections(sae_folders, tmp_path) -> None:
    from sae.load import SAEFolderError, SAELoadError, load_sae

    p = tmp_path / "s"
    shutil.copytree(sae_folders["standard"], p)
    _edit_json(p / "cfg.json", lambda d: d.update(architecture="gated_with_remote_code"))
    with pytest.raises(SAEFolderError, match="architecture") as info:
        load_sae(p)
    assert isinstance(info.value, SAELoadError) and isinstance(info.value, ProbeLoadError)
    _edit_json(p / "cfg.json", lambda d: d.update(architecture="standard", d_sae=2**30))
    with pytest.raises(SAEFolderError, match="d_sae"):
        load_sae(p)
    _edit_json(p / "cfg.json", lambda d: d.update(d_sae=32))
    with pytest.raises(SAEFolderError, match="W_enc"):
        load_sae(p)
    assert math.isfinite(float(load_sae(sae_folders["standard"]).W_enc.detach().sum()))
