"""Classifier metrics for probe scores: AUROC, AUPRC, TPR at a fixed FPR, log-space AUROC, bootstrap CIs.

Conventions
-----------
* Scores are logits (any real number; higher = more harmful). Labels are 0/1 (bool, int or float holding
  only 0 and 1). Both may be numpy arrays, torch tensors or sequences; they are flattened to 1-D float64.
* ``auroc`` and ``auprc`` match ``sklearn.metrics.roc_auc_score`` and ``average_precision_score``
  (ties included: AUROC counts a tied (positive, negative) pair as 1/2; AP treats tied scores as one
  threshold).
* The operating threshold is set **on a benign control set so that it holds out of sample**: an example is
  flagged when ``score > threshold``, and the threshold is the ``(n − m)``-th smallest of the ``n`` benign
  scores, with ``m`` the largest integer such that ``(m + 1) / (n + 1) <= fpr``. For a fresh benign example
  from the same distribution (continuous scores) the probability of scoring above the ``(n − m)``-th order
  statistic is exactly ``(m + 1) / (n + 1)``, so the *expected* FPR on new data is within the target (the
  in-sample rule ``m / n <= fpr`` gives ``(m + 1) / (n + 1)``, i.e. 1.2-1.3% at n = 300-500 for a 1%
  target). At most ``m`` control scores lie strictly above the threshold; ties at it are not flagged and only
  lower the FPR. Nothing is interpolated. A target the control set cannot resolve (``n < 1 / fpr``: 100
  examples for 1%, 1,000 for 0.1%) gives no figure: :func:`evaluate` reports NaN for it (its
  ``n_benign_control`` says why), and :func:`conservative_threshold` falls back to the maximum benign score
  with ``limited_by_n`` set and a :class:`SmallControlSetWarning`.
* :func:`clopper_pearson` gives the exact binomial interval of a realized rate (e.g. the FPR measured on a
  second, disjoint benign set).
* ``log_auroc``: the area under the *step* ROC curve (``TPR(f)`` = best TPR reachable with FPR ``<= f``)
  against ``ln(FPR)`` over ``[fpr_min, fpr_max]``, divided by ``ln(fpr_max / fpr_min)``. A perfect classifier
  scores 1; a random one (``TPR = FPR``) scores ``(fpr_max - fpr_min) / ln(fpr_max / fpr_min)``, which is
  ``0.099 / ln(100) ≈ 0.0215`` for the defaults ``[1e-3, 1e-1]`` (see :func:`log_auroc_random`).
* Bootstrap CIs are percentile intervals. Resampling is stratified by default (positives and negatives
  resampled separately, keeping the class counts). AUROC and TPR-at-FPR have vectorized fast paths (one
  sort of the data, then weighted counts per resample), so 1,000 resamples of 5,000 examples take tens of
  milliseconds; any other metric function is evaluated in a Python loop.
"""

import math
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import torch
from jaxtyping import Float, Real, Shaped

__all__ = [
    "MetricsError",
    "SmallControlSetWarning",
    "ThresholdInfo",
    "auprc",
    "auroc",
    "bootstrap_ci",
    "clopper_pearson",
    "conservative_threshold",
    "evaluate",
    "fpr_at_threshold",
    "fpr_key",
    "log_auroc",
    "log_auroc_random",
    "min_control_size",
    "roc_points",
    "threshold_at_fpr",
    "tpr_at_fpr",
    "tpr_vs_own_negatives",
]

Scores: TypeAlias = Real[np.ndarray, " n ..."] | Real[torch.Tensor, " n ..."] | Sequence[float]
#: scores of a benign set, sized on its own (a control set, a held-out set)
ControlScores: TypeAlias = Real[np.ndarray, " m ..."] | Real[torch.Tensor, " m ..."] | Sequence[float]
HeldoutScores: TypeAlias = Real[np.ndarray, " k ..."] | Real[torch.Tensor, " k ..."] | Sequence[float]
Labels: TypeAlias = Shaped[np.ndarray, " n ..."] | Shaped[torch.Tensor, " n ..."] | Sequence[int]
MetricFn: TypeAlias = Callable[[Any, Any], float]

# Rows of resamples processed at once by the vectorized bootstrap (bounds memory: chunk × n int64).
_BOOT_CHUNK_ELEMS = 1_000_000


class MetricsError(ValueError):
    """Invalid input to a metric: empty, one class only, NaN scores, mismatched lengths, bad labels."""


class SmallControlSetWarning(UserWarning):
    """The benign control set is too small to resolve the requested FPR (``n·fpr < 1``)."""


# --------------------------------------------------------------------------------------------- validation
def _to_numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16 or x.dtype == torch.float16:
            x = x.float()
        x = x.numpy()
    arr = np.asarray(x)
    if arr.ndim == 0:
        raise MetricsError(f"{name} must be 1-D, got a scalar")
    if arr.ndim > 1:
        if sum(d > 1 for d in arr.shape) > 1:
            raise MetricsError(f"{name} must be 1-D, got shape {arr.shape}")
        arr = arr.reshape(-1)
    return arr


def _scores(s: Any, name: str = "scores") -> Float[np.ndarray, " n"]:
    arr = _to_numpy(s, name)
    if arr.size == 0:
        raise MetricsError(f"{name} is empty")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise MetricsError(f"{name} must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if np.isnan(arr).any():
        raise MetricsError(f"{name} contains {int(np.isnan(arr).sum())} NaN value(s)")
    return arr


def _labels(y: Any) -> np.ndarray:
    arr = _to_numpy(y, "labels")
    if arr.size == 0:
        raise MetricsError("labels are empty")
    if arr.dtype == np.bool_:
        return arr.astype(np.int8)
    if not np.issubdtype(arr.dtype, np.number):
        raise MetricsError(f"labels must be 0/1, got dtype {arr.dtype}")
    bad = ~((arr == 0) | (arr == 1))
    if bad.any():
        raise MetricsError(f"labels must be 0/1; found e.g. {arr[bad][:3].tolist()}")
    return arr.astype(np.int8)


def _check(y: Any, s: Any, need_both: bool = True) -> tuple[np.ndarray, np.ndarray]:
    yy = _labels(y)
    ss = _scores(s)
    if yy.shape[0] != ss.shape[0]:
        raise MetricsError(f"length mismatch: {yy.shape[0]} labels, {ss.shape[0]} scores")
    if need_both:
        n_pos = int(yy.sum())
        if n_pos == 0 or n_pos == yy.shape[0]:
            only = "positive (1)" if n_pos else "negative (0)"
            raise MetricsError(f"only one class present (all {yy.shape[0]} labels are {only})")
    return yy, ss


# ------------------------------------------------------------------------------------------ ROC and AP
def _distinct_desc(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative (tp, fp) at each distinct score threshold, scores descending; flag when score >= thr."""
    order = np.argsort(-s, kind="mergesort")
    ss = s[order]
    yy = y[order].astype(np.float64)
    last_of_group = np.r_[np.flatnonzero(np.diff(ss) != 0), ss.size - 1]
    tps = np.cumsum(yy)[last_of_group]
    fps = (last_of_group + 1) - tps
    return tps, fps, ss[last_of_group]


def roc_points(y: Labels, s: Scores) -> tuple[Float[np.ndarray, " k"], Float[np.ndarray, " k"]]:
    """The ROC curve's vertices ``(fpr, tpr)``, starting at ``(0, 0)``, one point per distinct score.

    Point ``i > 0`` is the operating point "flag when score >= the i-th largest distinct score"; both arrays
    are non-decreasing and end at ``(1, 1)``. Between vertices, ties give a diagonal segment (the trapezoid
    of AUROC); :func:`log_auroc` uses the step curve instead.
    """
    yy, ss = _check(y, s)
    tps, fps, _ = _distinct_desc(yy, ss)
    return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]]


def _avg_ranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (as scipy.stats.rankdata 'average')."""
    order = np.argsort(s, kind="mergesort")
    ss = s[order]
    n = ss.size
    new = np.r_[True, ss[1:] != ss[:-1]]
    start = np.maximum.accumulate(np.where(new, np.arange(n), 0))
    end_flags = np.r_[ss[1:] != ss[:-1], True]
    end = np.minimum.accumulate(np.where(end_flags, np.arange(n), n)[::-1])[::-1]
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = (start + end) / 2.0 + 1.0
    return ranks


def auroc(y: Labels, s: Scores) -> float:
    """Area under the ROC curve (Mann–Whitney U / (n_pos·n_neg), tied pairs count 1/2), as scikit-learn."""
    yy, ss = _check(y, s)
    n_pos = int(yy.sum())
    n_neg = yy.size - n_pos
    ranks = _avg_ranks(ss)
    u = ranks[yy == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def auprc(y: Labels, s: Scores) -> float:
    """Average precision ``Σ_k (R_k − R_{k−1})·P_k`` over distinct thresholds, as scikit-learn."""
    yy, ss = _check(y, s)
    tps, fps, _ = _distinct_desc(yy, ss)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def log_auroc_random(fpr_min: float = 1e-3, fpr_max: float = 1e-1) -> float:
    """What :func:`log_auroc` gives for a random classifier (TPR = FPR): ``(b − a) / ln(b / a)``."""
    return (fpr_max - fpr_min) / math.log(fpr_max / fpr_min)


def log_auroc(y: Labels, s: Scores, fpr_min: float = 1e-3, fpr_max: float = 1e-1) -> float:
    """Normalized area under the step ROC curve with a log-scaled FPR axis over ``[fpr_min, fpr_max]``.

    ``(1 / ln(fpr_max/fpr_min)) · ∫ TPR(f) d ln f`` with ``TPR(f)`` the largest TPR among ROC vertices with
    FPR ``<= f`` (the step curve: no credit for the diagonal of tied scores). 1 = perfect; random ≈
    :func:`log_auroc_random` (0.0215 for the defaults). With fewer than ``1/fpr_min`` negatives the low-FPR
    end is coarse (the first step above FPR 0 is at ``1/n_neg``).
    """
    if not 0.0 < fpr_min < fpr_max <= 1.0:
        raise MetricsError(f"need 0 < fpr_min < fpr_max <= 1, got [{fpr_min}, {fpr_max}]")
    fpr, tpr = roc_points(y, s)
    # Step curve: for each distinct FPR keep the highest TPR; TPR(f) = tpr at the last vertex with fpr <= f.
    last = np.r_[np.flatnonzero(np.diff(fpr) != 0), fpr.size - 1]
    f, t = fpr[last], tpr[last]
    lo, hi = math.log(fpr_min), math.log(fpr_max)
    # Breakpoints of the step function inside (fpr_min, fpr_max).
    with np.errstate(divide="ignore"):
        logf = np.log(f)
    starts = np.clip(logf, lo, hi)
    ends = np.clip(np.r_[logf[1:], np.inf], lo, hi)
    area = float(np.sum(t * (ends - starts)))
    return area / (hi - lo)


# ------------------------------------------------------------------------------------------ thresholds
@dataclass(frozen=True)
class ThresholdInfo:
    """A threshold set on a control set and what it achieves there and, in expectation, on fresh data."""

    threshold: float
    target_fpr: float
    realized_fpr: float  # on the control set itself
    n: int
    max_false_positives: int  # m: at most this many control scores lie above the threshold
    limited_by_n: bool  # the control set cannot resolve the target (n < 1 / fpr)
    expected_fpr: float  # (m + 1) / (n + 1): the FPR on fresh benign data, in expectation


def min_control_size(fpr: float) -> int:
    """The smallest control set whose threshold for ``fpr`` holds out of sample: ``ceil(1 / fpr)``."""
    _check_fpr(fpr)
    if fpr <= 0.0:
        return 0
    inv = 1.0 / fpr
    return sys.maxsize if not math.isfinite(inv) or inv > sys.maxsize else math.ceil(inv - 1e-9)


def _allowed_fp(n: int, fpr: float) -> int:
    """Largest integer ``m`` with ``(m + 1) / (n + 1) <= fpr`` (at most ``n``); ``-1`` when there is none."""
    if fpr >= 1.0:
        return n
    m = math.floor(fpr * (n + 1) + 1e-9) - 1
    while m >= 0 and (m + 1) / (n + 1) > fpr:
        m -= 1
    return min(max(m, -1), n)


def _check_fpr(fpr: float) -> None:
    if not (0.0 <= fpr <= 1.0) or math.isnan(fpr):
        raise MetricsError(f"fpr must be in [0, 1], got {fpr}")


def conservative_threshold(benign_scores: Scores, fpr: float, warn: bool = True) -> ThresholdInfo:
    """The threshold (flag when ``score > threshold``) whose expected FPR on fresh benign data is ``<= fpr``.

    The ``(n − m)``-th smallest benign score with ``m`` the largest integer such that
    ``(m + 1) / (n + 1) <= fpr`` (see the module docstring). ``limited_by_n`` is true when the control set is
    too small (``n < 1 / fpr``): then the threshold is the maximum benign score and a
    :class:`SmallControlSetWarning` is emitted unless ``warn=False``. ``fpr = 0`` gives the maximum (nothing
    flagged on the control set), ``fpr = 1`` flags everything.
    """
    _check_fpr(fpr)
    b = np.sort(_scores(benign_scores, "benign_scores"))
    n = b.size
    m = _allowed_fp(n, fpr)
    limited = fpr > 0.0 and n < min_control_size(fpr)
    if fpr >= 1.0:
        thr = -math.inf
    elif m < 0 or limited:
        m, thr = 0, float(b[-1])
    else:
        thr = float(b[n - m - 1])
    if limited and warn:
        warnings.warn(
            f"benign control set of n={n} cannot resolve FPR {fpr:g} "
            f"(it needs n >= {min_control_size(fpr)}); "
            "threshold set at the max benign score: the estimate is limited by n",
            SmallControlSetWarning,
            stacklevel=2,
        )
    realized = float(np.count_nonzero(b > thr)) / n
    expected = min(1.0, (m + 1) / (n + 1)) if fpr < 1.0 else 1.0
    return ThresholdInfo(thr, float(fpr), realized, n, m, limited, expected)


def threshold_at_fpr(benign_scores: Scores, fpr: float) -> float:
    """Conservative threshold on a benign control set; see :func:`conservative_threshold`."""
    return conservative_threshold(benign_scores, fpr).threshold


def fpr_at_threshold(benign_scores: Scores, threshold: float) -> float:
    """Fraction of benign scores flagged, i.e. strictly above ``threshold``."""
    b = _scores(benign_scores, "benign_scores")
    return float(np.count_nonzero(b > threshold)) / b.size


def tpr_at_fpr(harmful_scores: Scores, benign_scores: ControlScores, fpr: float) -> float:
    """TPR on ``harmful_scores`` at the conservative threshold set on ``benign_scores`` for ``fpr``."""
    h = _scores(harmful_scores, "harmful_scores")
    thr = conservative_threshold(benign_scores, fpr).threshold
    return float(np.count_nonzero(h > thr)) / h.size


def tpr_vs_own_negatives(y: Labels, s: Scores, fpr: float = 0.01) -> float:
    """TPR of a set's harmful prompts at the conservative threshold that flags ``fpr`` of the *same set's*
    harmless prompts (its matched negatives), out of sample; NaN when either side is empty or the negatives
    are too few to resolve ``fpr`` (``n < 1 / fpr``)."""
    yy, ss = _check(y, s, need_both=False)
    neg, pos = ss[yy < 0.5], ss[yy >= 0.5]
    if not len(neg) or not len(pos):
        return math.nan
    info = conservative_threshold(neg, fpr, warn=False)
    return math.nan if info.limited_by_n else float(np.count_nonzero(pos > info.threshold)) / len(pos)


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact (Clopper-Pearson) two-sided ``1 − alpha`` interval of a binomial rate with ``k`` of ``n``."""
    from scipy.stats import beta

    if n <= 0 or not 0 <= k <= n:
        raise MetricsError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


# ------------------------------------------------------------------------------------------- bootstrap
def _resample_counts(rng: np.random.Generator, n: int, b: int) -> np.ndarray:
    """[b, n] multiplicities of each original item in b resamples of size n (with replacement)."""
    idx = rng.integers(0, n, size=(b, n))
    flat = idx + (np.arange(b)[:, None] * n)
    return np.bincount(flat.ravel(), minlength=b * n).reshape(b, n)


def _group_ids(sorted_vals: np.ndarray) -> tuple[np.ndarray, int]:
    new = np.r_[True, sorted_vals[1:] != sorted_vals[:-1]]
    g = np.cumsum(new) - 1
    return g, int(g[-1]) + 1


def _boot_auroc_stratified(
    pos: np.ndarray, neg: np.ndarray, n_boot: int, rng: np.random.Generator
) -> np.ndarray:
    """AUROC of n_boot stratified resamples via weighted counts over the sorted distinct scores."""
    allv = np.r_[pos, neg]
    uniq, inv = np.unique(allv, return_inverse=True)
    g = uniq.size
    gp, gn = inv[: pos.size], inv[pos.size :]
    out = np.empty(n_boot)
    chunk = max(1, _BOOT_CHUNK_ELEMS // max(pos.size, neg.size, g))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        rows = np.arange(b)[:, None] * g
        ip = rng.integers(0, pos.size, size=(b, pos.size))
        wn_idx = rng.integers(0, neg.size, size=(b, neg.size))
        wp = np.bincount((rows + gp[ip]).ravel(), minlength=b * g).reshape(b, g)
        wn = np.bincount((rows + gn[wn_idx]).ravel(), minlength=b * g).reshape(b, g)
        below = np.cumsum(wn, axis=1) - wn
        u = np.sum(wp * (below + 0.5 * wn), axis=1)
        out[start : start + b] = u / (pos.size * neg.size)
    return out


def _boot_tpr_at_fpr(
    harm: np.ndarray, benign: np.ndarray, fpr: float, n_boot: int, rng: np.random.Generator
) -> np.ndarray:
    """TPR at the conservative threshold, re-set on each resample of the benign set."""
    h = np.sort(harm)
    bsorted = np.sort(benign)
    nb, nh = bsorted.size, h.size
    if fpr >= 1.0:  # everything is flagged
        return np.ones(n_boot)
    k = nb - max(_allowed_fp(nb, fpr), 0)  # 1-based order statistic (as conservative_threshold)
    out = np.empty(n_boot)
    chunk = max(1, _BOOT_CHUNK_ELEMS // max(nb, nh))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        cb = np.cumsum(_resample_counts(rng, nb, b), axis=1)
        j = np.count_nonzero(cb < k, axis=1)  # index (in sorted original) of the k-th smallest resampled
        thr = bsorted[j]
        ch = np.cumsum(_resample_counts(rng, nh, b), axis=1)
        p = np.searchsorted(h, thr, side="right")  # original harmful items <= thr: h[:p]
        le = np.where(p > 0, ch[np.arange(b), np.maximum(p - 1, 0)], 0)
        out[start : start + b] = (nh - le) / nh
    return out


def _percentile_ci(vals: np.ndarray, alpha: float) -> tuple[float, float]:
    vals = vals[~np.isnan(vals)]
    if vals.size == 0:
        return math.nan, math.nan
    lo, hi = np.quantile(vals, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


def bootstrap_ci(
    metric_fn: MetricFn,
    y: Labels,
    s: Scores,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    stratified: bool = True,
) -> tuple[float, float]:
    """Percentile bootstrap ``(1 − alpha)`` interval of ``metric_fn(y, s)``.

    ``stratified`` resamples positives and negatives separately (class counts fixed); otherwise the
    resample is drawn from all examples and resamples with a single class are skipped. ``metric_fn is
    auroc`` with stratified resampling uses a vectorized path; other metrics run in a loop.
    """
    if n_boot < 1:
        raise MetricsError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise MetricsError(f"alpha must be in (0, 1), got {alpha}")
    yy, ss = _check(y, s)
    rng = np.random.default_rng(seed)
    pos, neg = ss[yy == 1], ss[yy == 0]
    if stratified and metric_fn is auroc:
        return _percentile_ci(_boot_auroc_stratified(pos, neg, n_boot, rng), alpha)
    vals = np.full(n_boot, np.nan)
    n = yy.size
    pos_idx, neg_idx = np.flatnonzero(yy == 1), np.flatnonzero(yy == 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallControlSetWarning)
        for i in range(n_boot):
            if stratified:
                idx = np.r_[rng.choice(pos_idx, pos_idx.size), rng.choice(neg_idx, neg_idx.size)]
            else:
                idx = rng.integers(0, n, size=n)
                n_pos = int(yy[idx].sum())
                if n_pos == 0 or n_pos == n:
                    continue
            vals[i] = metric_fn(yy[idx], ss[idx])
    return _percentile_ci(vals, alpha)


# -------------------------------------------------------------------------------------------- evaluate
def fpr_key(fpr: float) -> str:
    """``0.01 -> '1pct'``, ``0.001 -> '0.1pct'`` (the metric-dict key fragment for an FPR)."""
    return f"{round(fpr * 100.0, 10):g}pct"


def evaluate(
    y: Labels,
    s: Scores,
    benign_control_scores: ControlScores | None = None,
    fprs: Sequence[float] = (0.01, 0.001),
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    benign_heldout_scores: HeldoutScores | None = None,
) -> dict[str, float]:
    """All headline metrics of scores ``s`` for labels ``y``, as a flat dict (one results-table row).

    Keys (for the default ``fprs``): ``auroc``, ``auroc_lo``, ``auroc_hi``, ``auprc``, ``log_auroc``,
    ``tpr_at_1pct_fpr``, ``tpr_at_1pct_fpr_lo``, ``tpr_at_1pct_fpr_hi``, ``tpr_at_0.1pct_fpr``,
    ``threshold_at_1pct_fpr``, ``threshold_at_0.1pct_fpr``, ``n_pos``, ``n_neg``, ``n_benign_control``.
    Thresholds are set on ``benign_control_scores`` (default: the negatives of ``(y, s)``) so that they hold
    out of sample (:func:`conservative_threshold`) and TPRs are measured on the positives of ``(y, s)``. An
    FPR the control set cannot resolve (``n < 1 / fpr``) gets NaN for its threshold and TPR (no figure is
    printed that the sample size cannot support) and a :class:`SmallControlSetWarning`. With
    ``benign_heldout_scores`` (a second benign set, disjoint from the control) each FPR also gets
    ``realized_fpr_at_<key>`` (its share flagged at the control threshold) with the Clopper-Pearson bounds
    ``realized_fpr_at_<key>_lo`` / ``_hi``, and ``n_benign_heldout``. Confidence intervals (stratified
    percentile bootstrap, ``n_boot`` resamples; NaN when ``n_boot == 0``) are given for AUROC and for the
    TPR at the first FPR in ``fprs`` (that one resamples both the positives and the control set, re-setting
    the threshold each time).
    """
    yy, ss = _check(y, s)
    pos, neg = ss[yy == 1], ss[yy == 0]
    if benign_control_scores is None:
        control = neg
    else:
        control = _scores(benign_control_scores, "benign_control_scores")
    heldout = (
        None if benign_heldout_scores is None else _scores(benign_heldout_scores, "benign_heldout_scores")
    )
    if len(fprs) == 0:
        raise MetricsError("fprs must not be empty")
    out: dict[str, float] = {}
    out["auroc"] = auroc(yy, ss)
    if n_boot > 0:
        lo, hi = _percentile_ci(_boot_auroc_stratified(pos, neg, n_boot, np.random.default_rng(seed)), alpha)
    else:
        lo, hi = math.nan, math.nan
    out["auroc_lo"], out["auroc_hi"] = lo, hi
    out["auprc"] = auprc(yy, ss)
    out["log_auroc"] = log_auroc(yy, ss)
    thresholds: dict[str, float] = {}
    for i, fpr in enumerate(fprs):
        key = fpr_key(fpr)
        info = conservative_threshold(control, fpr)
        thr = math.nan if info.limited_by_n else info.threshold
        thresholds[key] = thr
        out[f"tpr_at_{key}_fpr"] = (
            math.nan if info.limited_by_n else float(np.count_nonzero(pos > thr)) / pos.size
        )
        if i == 0:
            if n_boot > 0 and not info.limited_by_n:
                rng = np.random.default_rng(seed + 1)
                lo, hi = _percentile_ci(_boot_tpr_at_fpr(pos, control, fpr, n_boot, rng), alpha)
            else:
                lo, hi = math.nan, math.nan
            out[f"tpr_at_{key}_fpr_lo"], out[f"tpr_at_{key}_fpr_hi"] = lo, hi
        if heldout is not None:
            if info.limited_by_n:
                r, rlo, rhi = math.nan, math.nan, math.nan
            else:
                k = int(np.count_nonzero(heldout > thr))
                r = k / heldout.size
                rlo, rhi = clopper_pearson(k, heldout.size, alpha)
            out[f"realized_fpr_at_{key}"] = r
            out[f"realized_fpr_at_{key}_lo"], out[f"realized_fpr_at_{key}_hi"] = rlo, rhi
    for key, thr in thresholds.items():
        out[f"threshold_at_{key}_fpr"] = thr
    out["n_pos"] = int(pos.size)
    out["n_neg"] = int(neg.size)
    out["n_benign_control"] = int(control.size)
    if heldout is not None:
        out["n_benign_heldout"] = int(heldout.size)
    return out
