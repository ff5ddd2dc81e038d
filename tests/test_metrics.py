"""Metrics: known answers against scikit-learn, conservative thresholds, log-AUROC, bootstrap CIs."""

import math
import time
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from probes import metrics as M

EXPECTED_KEYS = {
    "auroc",
    "auroc_lo",
    "auroc_hi",
    "auprc",
    "log_auroc",
    "tpr_at_1pct_fpr",
    "tpr_at_1pct_fpr_lo",
    "tpr_at_1pct_fpr_hi",
    "tpr_at_0.1pct_fpr",
    "threshold_at_1pct_fpr",
    "threshold_at_0.1pct_fpr",
    "n_pos",
    "n_neg",
    "n_benign_control",
}


def _data(n_pos: int, n_neg: int, shift: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(n_pos, dtype=int), np.zeros(n_neg, dtype=int)]
    s = rng.normal(size=n_pos + n_neg) + shift * y
    return y, s


# ------------------------------------------------------------------------------------- known answers
@pytest.mark.parametrize("n", [2, 7, 50, 1000])
@pytest.mark.parametrize("decimals", [0, 1, 6])
def test_auroc_auprc_match_sklearn(n: int, decimals: int) -> None:
    rng = np.random.default_rng(n * 10 + decimals)
    for _ in range(20):
        y = rng.integers(0, 2, n)
        y[0], y[-1] = 0, 1
        s = np.round(rng.normal(size=n) + 0.7 * y, decimals)  # decimals=0: many ties
        assert M.auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert M.auprc(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.integers(-3, 3)), min_size=2, max_size=60).filter(
        lambda xs: 0 < sum(b for b, _ in xs) < len(xs)
    )
)
def test_auroc_auprc_match_sklearn_with_heavy_ties(pairs: list[tuple[bool, int]]) -> None:
    y = np.array([int(b) for b, _ in pairs])
    s = np.array([float(v) for _, v in pairs])
    assert M.auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert M.auprc(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_torch_and_bool_inputs() -> None:
    y, s = _data(40, 60)
    ref = roc_auc_score(y, s)
    assert M.auroc(torch.tensor(y).bool(), torch.tensor(s, dtype=torch.float32)) == pytest.approx(
        ref, abs=1e-6
    )
    assert M.auroc(y.astype(float), s.tolist()) == pytest.approx(ref, abs=1e-12)
    assert M.auroc(y[:, None], s[:, None]) == pytest.approx(ref, abs=1e-12)


def test_roc_points_match_sklearn() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.normal(size=200) + y, 1)
    fpr, tpr = M.roc_points(y, s)
    ref_fpr, ref_tpr, _ = roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)


def test_jaxtyping_annotations_check_with_beartype() -> None:
    beartype = pytest.importorskip("beartype").beartype
    from jaxtyping import TypeCheckError, jaxtyped

    checked_auroc = jaxtyped(typechecker=beartype)(M.auroc)
    y, s = _data(10, 10)
    assert checked_auroc(y, s) == pytest.approx(roc_auc_score(y, s))
    with pytest.raises((TypeCheckError, M.MetricsError)):
        checked_auroc(y, s[:-1])


# ------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("y", "s", "match"),
    [
        ([], [], "empty"),
        ([1, 1, 1], [0.1, 0.2, 0.3], "one class"),
        ([0, 0], [0.1, 0.2], "one class"),
        ([0, 1], [0.1, float("nan")], "NaN"),
        ([0, 1, 1], [0.1, 0.2], "length mismatch"),
        ([0, 2], [0.1, 0.2], "0/1"),
    ],
)
def test_clear_errors(y: list, s: list, match: str) -> None:
    for fn in (M.auroc, M.auprc, M.log_auroc, M.roc_points, M.evaluate):
        with pytest.raises(M.MetricsError, match=match):
            fn(y, s)


def test_metrics_error_is_value_error() -> None:
    with pytest.raises(ValueError):
        M.threshold_at_fpr([], 0.01)
    with pytest.raises(ValueError, match="NaN"):
        M.threshold_at_fpr([0.0, float("nan")], 0.01)
    with pytest.raises(ValueError, match="fpr"):
        M.threshold_at_fpr([0.0, 1.0], 1.5)


# ------------------------------------------------------------------------------------- thresholds
def test_threshold_order_statistic() -> None:
    b = np.arange(100, dtype=float)  # 0..99
    # out-of-sample rule: the largest m with (m + 1) / (n + 1) <= fpr benign scores may lie above
    assert M.threshold_at_fpr(b, 0.01) == 99.0  # m = 0: expected FPR 1/101
    assert M.fpr_at_threshold(b, 99.0) == 0.0
    assert M.threshold_at_fpr(b, 0.05) == 95.0  # m = 4: 5/101 <= 5% < 6/101
    assert M.threshold_at_fpr(b, 0.015) == 99.0  # 1.515 -> m = 0 (never rounds up)
    info = M.conservative_threshold(np.random.default_rng(0).permutation(b), 0.1)
    assert (info.threshold, info.realized_fpr, info.max_false_positives) == (90.0, 0.09, 9)
    assert info.expected_fpr == pytest.approx(10 / 101) and not info.limited_by_n


def test_threshold_holds_out_of_sample() -> None:
    """Over many control sets of n = 300 from N(0, 1), the mean FPR on fresh benign data at the 1% threshold
    is (m + 1) / (n + 1) <= 1%; the in-sample rule (m / n <= 1%) gave 4/301 = 1.33%."""
    from scipy.stats import norm

    rng = np.random.default_rng(0)
    fresh = []
    for _ in range(3000):
        info = M.conservative_threshold(rng.normal(size=300), 0.01)
        fresh.append(norm.sf(info.threshold))
    assert info.max_false_positives == 2 and info.expected_fpr == pytest.approx(3 / 301)
    assert np.mean(fresh) == pytest.approx(3 / 301, abs=0.0006)
    assert np.mean(fresh) <= 0.0105


def test_threshold_with_ties_is_conservative() -> None:
    b = np.r_[np.zeros(95), np.ones(5)]  # 5% at 1.0, tied
    # 1% FPR cannot flag any of the tied block without flagging 5%: threshold at the tie, FPR 0.
    info = M.conservative_threshold(b, 0.01)
    assert info.threshold == 1.0 and info.realized_fpr == 0.0
    assert M.conservative_threshold(b, 0.05).threshold == 1.0  # m = 4 < 5 tied scores
    assert M.conservative_threshold(b, 0.06).threshold == 0.0  # m = 5
    assert M.conservative_threshold(b, 0.06).realized_fpr == 0.05
    assert M.tpr_at_fpr([0.5, 2.0, 1.0, 3.0], b, 0.01) == 0.5  # scores equal to the threshold are not flagged


def test_small_n_limited_by_n() -> None:
    b = np.linspace(-1, 1, 50)
    assert M.min_control_size(0.01) == 100 and M.min_control_size(0.001) == 1000
    with pytest.warns(M.SmallControlSetWarning, match="limited by n"):
        info = M.conservative_threshold(b, 0.001)
    assert info.limited_by_n and info.threshold == 1.0 and info.realized_fpr == 0.0
    with pytest.warns(M.SmallControlSetWarning):
        assert M.threshold_at_fpr(b, 0.01) == 1.0  # n = 50 < 100
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not M.conservative_threshold(b, 0.02).limited_by_n  # n = 50 = 1 / 0.02
        assert M.conservative_threshold(b, 0.02).threshold == b[-1]  # m = 0
        assert M.conservative_threshold(b, 0.04).threshold == b[-2]  # m = 1: 2/51 <= 4%
        assert M.conservative_threshold(b, 0.0).threshold == 1.0  # fpr 0 is exact, not a small-n limit
    assert M.conservative_threshold(b, 1.0).threshold == -math.inf


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(-5, 5) | st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=300),
    st.floats(0.0, 1.0, allow_nan=False),
)
def test_conservative_threshold_never_exceeds_target(values: list[float], fpr: float) -> None:
    b = np.array(values, dtype=float)
    n = b.size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", M.SmallControlSetWarning)
        info = M.conservative_threshold(b, fpr)
    realized = np.count_nonzero(b > info.threshold) / n
    assert realized <= fpr
    assert realized == info.realized_fpr == M.fpr_at_threshold(b, info.threshold)
    assert info.limited_by_n == (fpr > 0 and n < M.min_control_size(fpr))
    m = info.max_false_positives
    assert realized <= m / n
    if not info.limited_by_n and 0 < fpr < 1:
        # the expected FPR on fresh data is within the target, and one more allowed false positive is not
        assert info.expected_fpr == pytest.approx((m + 1) / (n + 1)) and info.expected_fpr <= fpr + 1e-12
        assert (m + 2) / (n + 1) > fpr - 1e-12


def test_tpr_at_fpr() -> None:
    benign = np.arange(1000, dtype=float)
    harmful = np.array([998.5, 999.5, 990.0, 10.0])
    assert M.threshold_at_fpr(benign, 0.001) == 999.0  # m = 0
    assert M.tpr_at_fpr(harmful, benign, 0.001) == 0.25
    assert M.tpr_at_fpr(harmful, benign, 0.01) == 0.5  # m = 9: threshold 990


def test_clopper_pearson() -> None:
    from scipy.stats import binomtest

    for k, n in ((0, 50), (3, 200), (50, 50), (7, 1000)):
        lo, hi = M.clopper_pearson(k, n)
        ci = binomtest(k, n).proportion_ci(0.95, method="exact")
        assert (lo, hi) == (pytest.approx(ci.low), pytest.approx(ci.high))
    with pytest.raises(M.MetricsError):
        M.clopper_pearson(3, 2)


# -------------------------------------------------------------------------------------------- log AUROC
def test_log_auroc_perfect_inverted_and_steps() -> None:
    y, s = _data(100, 1000)
    assert M.log_auroc(y, y * 10.0 + s * 1e-3) == 1.0
    assert M.log_auroc(y, -y * 10.0 + s * 1e-3) == 0.0
    neg = np.arange(1000, dtype=float)
    # Half the positives above every negative, half below all: TPR(f) = 0.5 on the whole range.
    yy = np.r_[np.ones(4), np.zeros(1000)]
    assert M.log_auroc(yy, np.r_[2000, 2000, -5, -5, neg]) == pytest.approx(0.5)
    # All positives just below the top 10 negatives: TPR jumps 0 -> 1 at FPR 0.01, the middle of the log axis.
    assert M.log_auroc(yy, np.r_[np.full(4, 989.5), neg]) == pytest.approx(0.5)
    # ... at FPR 0.002: area ln(0.1/0.002)/ln(100).
    assert M.log_auroc(yy, np.r_[np.full(4, 997.5), neg]) == pytest.approx(math.log(50) / math.log(100))
    # Custom range.
    assert M.log_auroc(yy, np.r_[np.full(4, 989.5), neg], fpr_min=0.01, fpr_max=0.1) == pytest.approx(1.0)


def test_log_auroc_random_matches_documented_value() -> None:
    expected = M.log_auroc_random()
    assert expected == pytest.approx(0.099 / math.log(100))
    assert expected == pytest.approx(0.0215, abs=1e-4)
    rng = np.random.default_rng(0)
    vals = []
    for _ in range(5):
        y = np.r_[np.ones(20_000), np.zeros(100_000)]
        vals.append(M.log_auroc(y, rng.normal(size=y.size)))
    assert np.mean(vals) == pytest.approx(expected, rel=0.05)


# ---------------------------------------------------------------------------------------------- bootstrap
def test_bootstrap_ci_contains_estimate_and_shrinks() -> None:
    widths = []
    for n in (200, 2000, 20000):
        y, s = _data(n // 2, n // 2, shift=1.0, seed=n)
        lo, hi = M.bootstrap_ci(M.auroc, y, s, n_boot=500, seed=1)
        est = M.auroc(y, s)
        assert lo <= est <= hi
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    # width scales roughly like 1/sqrt(n)
    assert widths[0] / widths[2] == pytest.approx(10.0, rel=0.35)


def test_bootstrap_vectorized_auroc_agrees_with_loop() -> None:
    y, s = _data(300, 500, shift=0.8)
    s = np.round(s, 1)  # ties
    fast = M.bootstrap_ci(M.auroc, y, s, n_boot=2000, seed=0)
    slow = M.bootstrap_ci(lambda a, b: M.auroc(a, b), y, s, n_boot=2000, seed=1)
    np.testing.assert_allclose(fast, slow, atol=0.006)
    unstrat = M.bootstrap_ci(M.auroc, y, s, n_boot=300, seed=0, stratified=False)
    assert unstrat[0] <= M.auroc(y, s) <= unstrat[1]


def test_bootstrap_generic_metric_and_seed() -> None:
    y, s = _data(200, 300)
    a = M.bootstrap_ci(M.auprc, y, s, n_boot=200, seed=3)
    b = M.bootstrap_ci(M.auprc, y, s, n_boot=200, seed=3)
    assert a == b
    assert a[0] <= M.auprc(y, s) <= a[1]
    with pytest.raises(ValueError):
        M.bootstrap_ci(M.auroc, y, s, n_boot=0)


def test_bootstrap_speed() -> None:
    y, s = _data(2500, 2500)
    M.bootstrap_ci(M.auroc, y, s, n_boot=50)  # warm-up
    t0 = time.perf_counter()
    M.bootstrap_ci(M.auroc, y, s, n_boot=1000)
    assert time.perf_counter() - t0 < 1.0


def test_tpr_bootstrap_vectorized_agrees_with_loop() -> None:
    rng = np.random.default_rng(5)
    harm = np.round(rng.normal(2.0, 1.0, 400), 2)
    benign = np.round(rng.normal(0.0, 1.0, 3000), 2)
    fast = M._boot_tpr_at_fpr(harm, benign, 0.01, 1500, np.random.default_rng(0))
    slow = []
    for _ in range(1500):
        h = rng.choice(harm, harm.size)
        b = rng.choice(benign, benign.size)
        slow.append(M.tpr_at_fpr(h, b, 0.01))
    assert np.mean(fast) == pytest.approx(np.mean(slow), abs=0.01)
    assert np.std(fast) == pytest.approx(np.std(slow), rel=0.15)


# ----------------------------------------------------------------------------------------------- evaluate
def test_evaluate_keys_and_values() -> None:
    y, s = _data(500, 3000, shift=2.0)
    out = M.evaluate(y, s, n_boot=200, seed=0)
    assert set(out) == EXPECTED_KEYS
    assert out["auroc"] == pytest.approx(roc_auc_score(y, s))
    assert out["auprc"] == pytest.approx(average_precision_score(y, s))
    assert out["auroc_lo"] <= out["auroc"] <= out["auroc_hi"]
    assert out["tpr_at_1pct_fpr_lo"] <= out["tpr_at_1pct_fpr"] <= out["tpr_at_1pct_fpr_hi"]
    assert out["tpr_at_0.1pct_fpr"] <= out["tpr_at_1pct_fpr"]
    assert out["threshold_at_1pct_fpr"] == M.threshold_at_fpr(s[y == 0], 0.01)
    assert (out["n_pos"], out["n_neg"], out["n_benign_control"]) == (500, 3000, 3000)
    assert M.fpr_at_threshold(s[y == 0], out["threshold_at_0.1pct_fpr"]) <= 0.001


def test_evaluate_with_control_set() -> None:
    y, s = _data(300, 300, shift=2.0)
    control = np.random.default_rng(9).normal(size=5000)
    out = M.evaluate(y, s, benign_control_scores=control, n_boot=100)
    assert out["n_benign_control"] == 5000
    thr = M.threshold_at_fpr(control, 0.001)
    assert out["threshold_at_0.1pct_fpr"] == thr
    assert out["tpr_at_0.1pct_fpr"] == np.mean(s[y == 1] > thr)
    out0 = M.evaluate(y, s, benign_control_scores=torch.tensor(control), n_boot=0)
    assert math.isnan(out0["auroc_lo"]) and math.isnan(out0["tpr_at_1pct_fpr_hi"])
    assert out0["auroc"] == out["auroc"]


def test_evaluate_warns_on_small_control() -> None:
    y, s = _data(50, 200)
    with pytest.warns(M.SmallControlSetWarning):
        out = M.evaluate(y, s, n_boot=50)
    # n = 200 cannot resolve 0.1% (needs 1,000): no figure; 1% is resolved
    assert math.isnan(out["threshold_at_0.1pct_fpr"]) and math.isnan(out["tpr_at_0.1pct_fpr"])
    assert out["threshold_at_1pct_fpr"] == M.threshold_at_fpr(s[y == 0], 0.01)
    assert out["n_benign_control"] == 200


def test_evaluate_realized_fpr_on_a_heldout_benign_set() -> None:
    y, s = _data(300, 300, shift=2.0)
    rng = np.random.default_rng(3)
    control, heldout = rng.normal(size=1000), rng.normal(size=2000)
    out = M.evaluate(y, s, benign_control_scores=control, benign_heldout_scores=heldout, n_boot=0)
    thr = out["threshold_at_1pct_fpr"]
    assert out["realized_fpr_at_1pct"] == np.mean(heldout > thr)
    assert out["realized_fpr_at_1pct_lo"] <= out["realized_fpr_at_1pct"] <= out["realized_fpr_at_1pct_hi"]
    assert out["n_benign_heldout"] == 2000 and 0.003 < out["realized_fpr_at_1pct"] < 0.02


def test_fpr_key() -> None:
    assert [M.fpr_key(f) for f in (0.01, 0.001, 0.05, 0.0001)] == ["1pct", "0.1pct", "5pct", "0.01pct"]


def test_tpr_vs_own_negatives_known_answer(unchecked: None) -> None:
    # 200 negatives 0..199: (m + 1) / 201 <= 1% allows m = 1, so the threshold is the 199th smallest (198)
    neg = np.arange(200, dtype=float)
    pos = np.array([198.5, 199.5, 50.0])
    y = np.r_[np.zeros(200), np.ones(3)]
    s = np.r_[neg, pos]
    assert M.tpr_vs_own_negatives(y, s) == pytest.approx(2 / 3)
    order = np.random.default_rng(0).permutation(len(y))  # order-free
    assert M.tpr_vs_own_negatives(y[order], s[order]) == pytest.approx(2 / 3)
    # too few negatives to resolve 1% (n < 100), or one side empty: not a number
    assert np.isnan(M.tpr_vs_own_negatives(np.r_[np.zeros(50), np.ones(3)], np.r_[neg[:50], pos]))
    assert np.isnan(M.tpr_vs_own_negatives(np.zeros(200), neg))
    with pytest.raises(M.MetricsError, match="length mismatch"):
        M.tpr_vs_own_negatives(y[:-1], s)
