"""The runner of per-token probes and learned aggregations (probe, then pool): the ``tokens`` view.

The kinds (declared by their families: :mod:`probes.token`, :mod:`probes.attention`, :mod:`probes.multimax`):

* ``token_swim``: CC++, sliding-window mean of logits with the softmax-weighted BCE; aggregation
  ``swim<M>-tau<τ>``; params ``window``, ``tau``, ``weights_for``.
* ``token_swim_multi``: the same on the spec's layers concatenated (one run; ``probes[].layers``).
* ``token_ema``: Cost-effective CC, trained on mean pooling, read by an EMA of logits + max;
  ``mean->ema<a>``; param ``alpha``.
* ``token_max`` / ``token_mean`` / ``token_last``: per-token logits pooled (and trained) by max / mean / last.
* ``token_rolling``: rolling (window) mean of logits, then max, plain BCE; ``window<M>``; param ``window``.
* ``token_softmax``: softmax-weighted mean of logits; ``softmax<τ>``; param ``tau``.
* ``attention``: learned attention pooling with H heads; ``attention<H>h``; param ``heads``.
* ``multimax``: MultiMax, per-head max over tokens, learned weighted sum; ``multimax<H>h``; param ``heads``.

Every kind also takes the training params ``epochs``, ``lr``, ``weight_decay``, ``batch_size``.

**Pooling groups.** A sweep groups runs by the spec's ``poolings``; per-token kinds bring their own
aggregation, so they run only in the group of the spec's *first* pooling and return no rows in the others
(nothing is fitted twice, no duplicate rows), and their ``pooling`` column names their aggregation (above).
Costs are per-token read-outs (``order="probe_then_pool"``): a linear probe ``2·d·L + 1`` plus the pooling
update, attention / MultiMax heads their own FLOPs.

**Streaming columns.** A streaming monitor stops on the *stopping statistic* of a stream: the maximum of the
running score over the stream, the end-of-stream step included (windows as in :mod:`probes.stream`: full
windows only; a sequence shorter than the window has its one whole window, scored at its end). For ``max``,
``ema`` and ``window`` read-outs it is the offline score; for ``mean``, ``last``, ``softmax`` and attention it
is not (it is at least the offline score). So every per-token row also carries the metrics of the stopping
statistic, with thresholds set on the benign control's complete sequences as offline:

* ``stream_auroc``, ``stream_tpr_at_1pct_fpr`` (:mod:`probes.metrics`, like ``auroc`` /
  ``tpr_at_1pct_fpr``; a harmful-only eval set is scored against the control set);
* ``stream_threshold_1pct``: the conservative threshold on the control's stopping statistic at 1% FPR (also
  saved in the probe's metadata for ``probe-atlas monitor``), ``stream_recall_at_1pct``: the share of the
  eval set's harmful sequences whose stopping statistic exceeds it (the same figure as
  ``stream_tpr_at_1pct_fpr``, counted at the saved threshold);
* ``stream_equals_offline``: whether the stopping statistic equals the offline score for this aggregation
  (checked numerically on the control set);
* ``stream_threshold_positions`` (``prompt``, ``response``, ``prompt+response``, ``all``: the roles of the
  control tokens that were scored) and ``stream_threshold_calibration`` (the control set); the monitor
  scores generated responses and warns about a threshold calibrated on anything else.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from experiments.kinds.finish import finish_run
from experiments.kinds.registry import register_runner
from experiments.sweep.context import RunGroup, SweepContext
from probes.base import TOKENS
from probes.metrics import auroc, conservative_threshold, tpr_at_fpr
from probes.stream import positions_of_roles
from probes.token import TokenProbeBase

__all__ = ["run_tokens", "stream_metrics"]


@register_runner(TOKENS)
def run_tokens(g: RunGroup) -> list[dict[str, Any]]:
    """Per-token kinds carry their own aggregation: fitted once, in the first pooling group."""
    if not g.first_pooling:
        return []
    ctx = g.ctx
    rows: list[dict[str, Any]] = []
    for run in g.runs:
        layers = g.layers_of(run, TOKENS)
        entry = g.entry(run, layers)
        cls, kw = g.kind.build(entry)
        probe: TokenProbeBase = cls(**kw)
        hooks = tuple(entry["hooks"])
        t0 = time.perf_counter()
        probe.fit(ctx.tokens("train", hooks), ctx.labels("train"))
        fit_s = time.perf_counter() - t0
        scores = {role: probe.score(ctx.tokens(role, hooks)) for role in ctx.roles}
        stream, per_eval = stream_metrics(ctx, probe, hooks, scores["control"])
        agg = probe.pooling_label(run.pooling)
        rows += finish_run(
            g,
            run,
            probe,
            scores,
            layers=layers,
            fit_seconds=fit_s,
            extra={"aggregation": agg, "group_pooling": run.pooling.name, **stream},
            pooling=agg,
            tail=per_eval,
        )
    return rows


def stream_metrics(
    ctx: SweepContext, probe: TokenProbeBase, hooks: Sequence[str], offline_control: np.ndarray
) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """The streaming columns of a per-token probe (see the module docstring): the run's own (threshold, its
    positions and calibration set, ``stream_equals_offline``) and, per eval set, ``stream_auroc``,
    ``stream_tpr_at_1pct_fpr``, ``stream_recall_at_1pct``."""
    control = probe.stopping_statistic(ctx.tokens("control", hooks))
    with warnings.catch_warnings():  # a control too small for 1% FPR (< 100) gives no figure: NaN below
        warnings.simplefilter("ignore")
        info = conservative_threshold(control, 0.01)
    thr = float("nan") if info.limited_by_n else info.threshold
    st = ctx.stores["control"]
    roles = np.asarray(st.roles)[np.asarray(st.mask).astype(bool)]
    run_cols: dict[str, Any] = {
        "stream_threshold_1pct": thr,
        "stream_threshold_positions": positions_of_roles(roles),
        "stream_threshold_calibration": f"{st.key['dataset_name']} (benign control, n={info.n})",
        "stream_equals_offline": bool(np.allclose(control, offline_control, rtol=1e-4, atol=1e-5)),
    }
    per_eval: dict[str, dict[str, float]] = {}
    for name in ctx.data.tests:
        role = f"test:{name}"
        s = probe.stopping_statistic(ctx.tokens(role, hooks))
        harmful = ctx.labels(role) >= 0.5
        nan = float("nan")
        m = {"stream_auroc": nan, "stream_tpr_at_1pct_fpr": nan, "stream_recall_at_1pct": nan}
        if harmful.any():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if harmful.all():
                    yy = np.concatenate([np.ones(len(s), int), np.zeros(len(control), int)])
                    m["stream_auroc"] = auroc(yy, np.concatenate([s, control]))
                else:
                    m["stream_auroc"] = auroc(harmful.astype(int), s)
                if not info.limited_by_n:
                    m["stream_tpr_at_1pct_fpr"] = tpr_at_fpr(s[harmful], control, 0.01)
                    m["stream_recall_at_1pct"] = float((s[harmful] > thr).mean())
        per_eval[name] = m
    return run_cols, per_eval
