"""The shipped sweep specs parse, and the shared-benchmark protocol holds on the real data: a validation set
that can discriminate, matched negatives, a control large enough for 0.1% FPR, and nothing leaked."""

from __future__ import annotations

from pathlib import Path

import pytest

from activations.data import canonical_group, normalize_text
from experiments.analysis.transfer import load_transfer_spec
from experiments.sweep.data import load_sweep_data
from experiments.sweep.spec import CONFIG_DIR, SpecError, load_spec
from probes.metrics import min_control_size
from tests.conftest import SHARED_DATASETS

#: specs of other commands than ``sweep`` (``probe-atlas transfer``)
OTHER_SPECS = {"transfer.yaml"}
CONFIGS = sorted(p.name for p in CONFIG_DIR.glob("*.yaml") if p.name not in OTHER_SPECS)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_spec_parses(name: str) -> None:
    spec, base = load_spec(name)
    assert spec.name and spec.datasets.test and base == CONFIG_DIR


def test_the_transfer_spec_parses() -> None:
    spec = load_transfer_spec(CONFIG_DIR / "transfer.yaml")
    assert len(spec.sources) >= 2


def test_datasets_include_and_its_errors(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "name: a\ndatasets: {include: shared_benchmarks.yaml, test: {t: {path: builtin, split: test}}}\n"
        "probes: [{kind: diffmeans}]\n"
    )
    spec, _ = load_spec(tmp_path / "a.yaml")
    assert list(spec.datasets.test) == ["t"] and len(spec.datasets.val.mix) == 7  # the rest is included
    (tmp_path / "b.yaml").write_text("name: b\ndatasets: {include: c.yaml}\nprobes: [{kind: diffmeans}]\n")
    (tmp_path / "c.yaml").write_text("name: c\ndatasets: {include: b.yaml}\nprobes: [{kind: diffmeans}]\n")
    with pytest.raises(SpecError, match="cycle"):
        load_spec(tmp_path / "b.yaml")
    (tmp_path / "d.yaml").write_text("name: d\ndatasets: {include: nope.yaml}\nprobes: [{kind: diffmeans}]\n")
    with pytest.raises(SpecError, match=r"nope\.yaml: no such spec file"):
        load_spec(tmp_path / "d.yaml")


@pytest.mark.skipif(not (SHARED_DATASETS / "jbb_artifacts").exists(), reason="shared datasets not present")
def test_shared_benchmarks_protocol_on_the_real_data() -> None:
    spec, base = load_spec("shared_benchmarks.yaml")
    data = load_sweep_data(spec, base)
    roles = data.splits["roles"]
    # validation: >= 200 harmful prompts from several sources, wrapped prompts, and look-alikes as negatives
    val = data.val
    harmful_sources = {e.source for e in val if e.label >= 0.5}
    assert sum(e.label >= 0.5 for e in val) >= 200 and len(harmful_sources) >= 3
    assert any(e.kind == "jailbreak" for e in val)
    assert sum(e.kind == "contrast" and e.label < 0.5 for e in val) >= 100
    # the jailbreak set has harmless prompts of the same form; the control resolves 0.1% FPR
    jbb = data.tests["jbb_jailbreaks"]
    assert sum(e.label < 0.5 for e in jbb) >= 100
    assert sum("wrapper_of" in e.meta_dict() for e in jbb) >= 80
    assert len(data.control) >= min_control_size(0.001) and data.heldout is not None
    # nothing in an evaluation set, the control or the held-out benign set repeats train ∪ val
    fit = [*data.train, *data.val]
    texts = {normalize_text(e.all_text()) for e in fit}
    groups = {canonical_group(e) for e in fit} - {None}
    evals = [*data.tests.values(), data.control, data.heldout]
    for ds in evals:
        for e in ds:
            assert normalize_text(e.all_text()) not in texts, (ds.name, e.id)
            assert canonical_group(e) not in groups, (ds.name, e.id)
    # the control is disjoint from every test set, the held-out set from the control
    test_texts = {normalize_text(e.all_text()) for t in data.tests.values() for e in t}
    assert not {normalize_text(e.all_text()) for e in data.control} & test_texts
    assert not {e.id for e in data.heldout} & {e.id for e in data.control}
    assert roles["test:jbb_jailbreaks"]["decontamination"]["n_before"] > len(jbb)  # something was caught
