"""Cascades and ensembles: a cascade at its limits is one of its stages, costs add up, ensembles combine."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from activations.tiny import make_tiny_model
from probes.cascade import (
    CascadeError,
    ZRef,
    cascade_scores,
    cheapest_matching,
    escalation_mask,
    thresholds_for_rate,
)
from probes.cost import CostModel, cascade_expected_flops
from probes.ensemble import EnsembleError, StackingEnsemble, ZScoreEnsemble, ensemble_cost
from probes.metrics import auroc, threshold_at_fpr, tpr_at_fpr


def _two_stages(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    y = np.arange(n) % 2
    s1 = y * 1.0 + g.normal(0, 1.0, n)  # weak, cheap
    s2 = y * 3.0 + g.normal(0, 1.0, n)  # strong, expensive
    return y, s1, s2


def test_rate_one_is_stage_two_and_rate_zero_is_stage_one() -> None:
    y, s1, s2 = _two_stages()
    z1, z2 = ZRef.of(s1), ZRef.of(s2)
    lo, hi = thresholds_for_rate(s1, 1.0)
    assert (lo, hi) == (-math.inf, math.inf)
    final, esc = cascade_scores(s1, s2, lo, hi, z1=z1, z2=z2)
    assert esc.all()
    np.testing.assert_allclose(final, z2(s2))
    assert auroc(y, final) == pytest.approx(auroc(y, s2))
    lo, hi = thresholds_for_rate(s1, 0.0)
    final, esc = cascade_scores(s1, np.full_like(s2, np.nan), lo, hi, z1=z1, z2=z2)  # stage 2 never runs
    assert not esc.any()
    np.testing.assert_array_equal(final, s1)
    # costs at the two ends
    assert cascade_expected_flops(10.0, 1000.0, 0.0) == 10.0
    assert cascade_expected_flops(10.0, 1000.0, 1.0) == 1010.0
    assert cascade_expected_flops(10.0, 1000.0, 0.05) == pytest.approx(60.0)


def test_intermediate_rates_order_examples_by_decision_and_interpolate() -> None:
    y, s1, s2 = _two_stages(seed=1)
    z1, z2 = ZRef.of(s1), ZRef.of(s2)
    aucs = []
    for rate in (0.0, 0.1, 0.3, 0.6, 1.0):
        lo, hi = thresholds_for_rate(s1, rate, block_rate=0.05 if 0 < rate < 1 else 0.0)
        final, esc = cascade_scores(s1, s2, lo, hi, z1=z1, z2=z2)
        assert esc.mean() == pytest.approx(rate, abs=2 / len(s1))
        passed, blocked = s1 < lo, s1 >= hi
        if esc.any():
            assert final[esc].min() > final[passed].max(initial=-np.inf)
            assert final[esc].max() < final[blocked].min(initial=np.inf)
        aucs.append(auroc(y, final))
    assert aucs[0] == pytest.approx(auroc(y, s1)) and aucs[-1] == pytest.approx(auroc(y, s2))
    assert aucs[3] > aucs[0] + 0.05  # escalating most examples recovers most of stage 2
    # the ensemble combination of the escalated band
    lo, hi = thresholds_for_rate(s1, 1.0)
    final, _ = cascade_scores(s1, s2, lo, hi, z1=z1, z2=z2, combine="ensemble", weight=0.55)
    np.testing.assert_allclose(final, 0.55 * z1(s1) + 0.45 * z2(s2))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-50, 50), min_size=5, max_size=80),
    st.floats(0, 1),
    st.floats(0, 0.5),
)
@example([0.0, 1.0, 0.5, 0.75, 0.25], 1e-200, 0.0)  # a rate below one example escalates nothing
def test_thresholds_escalate_the_requested_share(ref: list[float], rate: float, block: float) -> None:
    r = np.array(ref)
    if rate + block > 1:
        with pytest.raises(CascadeError):
            thresholds_for_rate(r, rate, block)
        return
    lo, hi = thresholds_for_rate(r, rate, block)
    assert lo <= hi
    esc = escalation_mask(r, lo, hi)
    if len(np.unique(r)) == len(r):  # without ties the share is exact (rounded up)
        assert esc.sum() == math.ceil((rate + block) * len(r) - 1e-9) - math.ceil(block * len(r) - 1e-9) or (
            rate == 0 and esc.sum() == 0
        )


def test_cheapest_matching_and_errors() -> None:
    curve = [
        {"flops_per_token": 10.0, "tpr_at_1pct_fpr": 0.5},
        {"flops_per_token": 60.0, "tpr_at_1pct_fpr": 0.89},
        {"flops_per_token": 110.0, "tpr_at_1pct_fpr": 0.9},
        {"flops_per_token": 1010.0, "tpr_at_1pct_fpr": 0.9},
    ]
    assert cheapest_matching(curve, 0.9)["flops_per_token"] == 110.0
    assert cheapest_matching(curve, 0.9, tol=0.02)["flops_per_token"] == 60.0
    assert cheapest_matching(curve, 0.95) is None
    with pytest.raises(CascadeError, match="escalation_rate"):
        thresholds_for_rate(np.zeros(3), 1.5)
    with pytest.raises(CascadeError, match="shape"):
        cascade_scores(np.zeros(3), np.zeros(4), 0.0, 1.0, z1=ZRef(0, 1), z2=ZRef(0, 1))
    with pytest.raises(CascadeError, match="no finite score"):
        cascade_scores(np.zeros(3), np.full(3, np.nan), -1.0, 1.0, z1=ZRef(0, 1), z2=ZRef(0, 1))


def test_zscore_ensemble_and_stacking() -> None:
    y, s1, s2 = _two_stages(n=600, seed=2)
    ens = ZScoreEnsemble([0.55, 0.45]).fit([s1, 10 * s2 + 3])
    got = ens.combine([s1, 10 * s2 + 3])
    want = 0.55 * (s1 - s1.mean()) / s1.std() + 0.45 * (s2 - s2.mean()) / s2.std()  # scale-free
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    stk = StackingEnsemble().fit([s1, s2], y)
    assert stk.coef_[1] > stk.coef_[0] > 0  # the strong member weighs more
    assert auroc(y, stk.oof_scores_) > auroc(y, s1)
    # at 1% FPR the ensemble with the strong member beats the weak member alone
    neg = got[y == 0]
    assert tpr_at_fpr(got[y == 1], neg, 0.01) > tpr_at_fpr(s1[y == 1], s1[y == 0], 0.01)
    # the ensemble's 1%-FPR threshold on its negatives flags at most m of them, (m + 1) / (n + 1) <= 1%
    thr = threshold_at_fpr(neg, 0.01)
    m = int(0.01 * (neg.size + 1)) - 1
    assert int((neg > thr).sum()) <= m and (m + 1) / (neg.size + 1) <= 0.01
    assert int((neg >= thr).sum()) >= m + 1  # ... and no stricter than that: the threshold is a benign score
    with pytest.raises(EnsembleError, match="weights"):
        ZScoreEnsemble([1.0]).fit([s1, s2])
    with pytest.raises(EnsembleError, match="different numbers"):
        ZScoreEnsemble().fit([s1, s2[:-1]])
    with pytest.raises(EnsembleError, match="both classes"):
        StackingEnsemble().fit([s1, s2], np.zeros(len(y)))


def test_ensemble_cost_sums_parts_and_shares_the_forward() -> None:
    cm = CostModel.from_config(make_tiny_model().cfg, context_len=64)
    fwd = cm.forward_flops_per_token(1, include_unembed=False)
    probe = (100.0, 100.0 + fwd, fwd)
    other = (5000.0, 5000.0, 0.0)  # its own model
    marginal, standalone = ensemble_cost(cm, [probe, other])
    assert marginal.flops_per_token == 5100.0
    assert standalone.flops_per_token == pytest.approx(5100.0 + fwd)
    assert marginal.overhead_pct == pytest.approx(100 * 5100.0 / cm.full_forward_flops_per_token())


def _write_old_ensemble(path, doc) -> None:
    """An ensemble folder as the code before the reshape wrote it: ``ensemble.json`` only (no loader then)."""
    path.mkdir(parents=True)
    (path / "ensemble.json").write_text(json.dumps(doc, indent=1))


def test_ensemble_folders_of_the_old_layout_load_and_new_ones_round_trip(tmp_path) -> None:
    from probes.ensemble import Ensemble
    from probes.io import ProbeLoadError, load_scorer

    meta = {"model_id": "tiny", "val_tpr_at_1pct_fpr": math.nan, "layers": []}  # NaN: as written then
    s = [np.array([0.5, -1.0, 2.0]), np.array([1.0, 0.0, -2.0])]
    _write_old_ensemble(
        tmp_path / "z",
        {"method": "zscore", "members": ["r1", "r2"], "labels": ["a", "b"], "mean": [0.2, -0.1],
         "std": [4.0, 0.9], "weights": [0.55, 0.45], "metadata": meta},
    )  # fmt: skip
    z = load_scorer(tmp_path / "z")
    assert isinstance(z, Ensemble) and z.method == "zscore" and z.members == ["r1", "r2"]
    want = 0.55 * (s[0] - 0.2) / 4.0 + 0.45 * (s[1] + 0.1) / 0.9
    np.testing.assert_allclose(z.decision_function(s), want)
    _write_old_ensemble(
        tmp_path / "st",
        {"method": "stack", "members": ["r1", "r2"], "labels": ["a", "b"], "coef": [2.0, 1.0],
         "intercept": -0.5, "metadata": meta},
    )  # fmt: skip
    st = load_scorer(tmp_path / "st")
    assert st.method == "stack" and st.combiner_.coef_.tolist() == [2.0, 1.0]
    with pytest.raises(EnsembleError, match="z-scoring reference"):  # the old layout did not keep it
        st.decision_function(s)
    # a new stacking ensemble keeps it, and scores again after loading
    g = np.random.default_rng(0)
    y = np.arange(60) % 2
    val = [y + g.normal(0, 1, 60), 2 * y + g.normal(0, 1, 60)]
    ens = Ensemble(method="stack", members=["r1", "r2"], labels=["a", "b"]).fit(val, y)
    ens.save(tmp_path / "new", {"model_id": "tiny"})
    np.testing.assert_allclose(
        load_scorer(tmp_path / "new").decision_function(val), ens.decision_function(val)
    )
    _write_old_ensemble(
        tmp_path / "bad", {"method": "zscore", "members": ["r1"], "labels": ["a"], "mean": [1]}
    )
    with pytest.raises(ProbeLoadError, match="std"):
        load_scorer(tmp_path / "bad")
