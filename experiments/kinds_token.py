"""Sweep kinds for per-token probes and learned aggregations (probe, then pool).

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
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from activations.collect import HOOK_KINDS, parse_layers
from experiments.registry import register_kind
from experiments.run import RunGroup, SweepContext, evaluate_scores, make_rows, select_best
from experiments.spec import SpecError
from probes.metrics import auroc, conservative_threshold, tpr_at_fpr
from probes.stream import positions_of_roles
from probes.token import AttentionProbe, MultiMaxProbe, Ragged, TokenProbe, TokenProbeBase, ragged_from_store

TRAIN_PARAMS = ("epochs", "lr", "weight_decay", "batch_size")
_TRAIN_DEFAULTS: dict[str, Any] = {"epochs": 40, "lr": 0.01, "weight_decay": 0.01, "batch_size": 32}


def _cache(ctx: SweepContext) -> dict[Any, Ragged]:
    return ctx.__dict__.setdefault("_token_kind_cache", {})


def token_data(ctx: SweepContext, role: str, hooks: tuple[str, ...], keep: int = 12) -> Ragged:
    """Every scored token's features of ``hooks`` for one dataset role (a small LRU cache of layers)."""
    cache = _cache(ctx)
    key = (role, hooks)
    if key in cache:
        cache[key] = cache.pop(key)  # most recent last
        return cache[key]
    R = ragged_from_store(ctx.stores[role], list(hooks))
    cache[key] = R
    while len(cache) > keep:
        cache.pop(next(iter(cache)))
    return R


def _train_kw(params: dict[str, Any], seed: int) -> dict[str, Any]:
    kw = {k: params.get(k, v) for k, v in _TRAIN_DEFAULTS.items()}
    return {
        "epochs": int(kw["epochs"]),
        "lr": float(kw["lr"]),
        "weight_decay": float(kw["weight_decay"]),
        "batch_size": int(kw["batch_size"]),
        "seed": int(seed),
    }


def _cost(ctx: SweepContext, layers: list[int], probe: TokenProbeBase) -> tuple[Any, Any]:
    d = ctx.cost.d_model
    if isinstance(probe, TokenProbe):
        pool: Any = probe.read_pooling
        head = None
    else:  # the heads' own per-token FLOPs (read-outs, online softmax / max, weighted sum)
        pool = "last"
        head = probe.flops_per_token()
    return tuple(  # type: ignore[return-value]
        ctx.cost.probe_cost(layers, d, pool, view=view, order="probe_then_pool", head_flops=head)
        for view in ("marginal", "standalone")
    )


def _run_one(
    g: RunGroup, run: Any, layers: list[int], make: Callable[[dict[str, Any], int, list[str]], TokenProbeBase]
) -> list[dict[str, Any]]:
    ctx = g.ctx
    hooks = tuple(HOOK_KINDS[run.hook_kind].format(l=layer) for layer in layers)
    probe = make(dict(run.probe.params), run.seed, list(hooks))
    t0 = time.perf_counter()
    probe.fit(token_data(ctx, "train", hooks), torch.as_tensor(ctx.labels("train")))
    fit_s = time.perf_counter() - t0
    scores = {role: probe.decision_function(token_data(ctx, role, hooks)).numpy() for role in ctx.roles}
    stream, per_eval = stream_metrics(ctx, probe, hooks, scores["control"])
    agg = str(getattr(probe, "aggregation", ""))
    rows = make_rows(
        ctx,
        run,
        layers,
        probe,
        C=None,
        val=select_best(ctx, [scores["val"]])[1][0],
        metrics=evaluate_scores(ctx, scores, run.seed),
        fit_seconds=fit_s,
        cost=_cost(ctx, layers, probe),
        extra={"aggregation": agg, "group_pooling": run.pooling.name, **stream},
        scores=scores,
    )
    for row in rows:
        row["pooling"] = agg
        row.update(per_eval.get(str(row.get("eval_set")), {}))
    return rows


def stream_metrics(
    ctx: SweepContext, probe: TokenProbeBase, hooks: tuple[str, ...], offline_control: np.ndarray
) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """The streaming columns of a per-token probe (see the module docstring): the run's own (threshold, its
    positions and calibration set, ``stream_equals_offline``) and, per eval set, ``stream_auroc``,
    ``stream_tpr_at_1pct_fpr``, ``stream_recall_at_1pct``."""
    control = probe.stopping_statistic(token_data(ctx, "control", hooks))
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
        s = probe.stopping_statistic(token_data(ctx, role, hooks))
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


def _runner(make: Callable[[dict[str, Any], int, list[str]], TokenProbeBase], multi: bool = False) -> Any:
    def runner(g: RunGroup) -> list[dict[str, Any]]:
        if not g.first_pooling:
            return []  # per-token kinds carry their own aggregation: fitted once, in the first pooling group
        rows: list[dict[str, Any]] = []
        for run in g.runs:
            if multi:
                ps = run.probe
                layers = (
                    parse_layers(ps.layers, g.ctx.cost.n_layers) if ps.layers is not None else g.ctx.layers
                )
                missing = [la for la in layers if la not in g.ctx.layers]
                if missing:
                    raise SpecError(
                        f"probes.{ps.kind}.layers: layers {missing} are not collected (spec layers: "
                        f"{g.ctx.layers})"
                    )
            else:
                layers = [run.layer]
            rows += _run_one(g, run, layers, make)
        return rows

    return runner


def _linear(train: Callable[[dict[str, Any]], dict[str, Any]]) -> Any:
    def make(params: dict[str, Any], seed: int, hooks: list[str]) -> TokenProbeBase:
        return TokenProbe(**train(params), **_train_kw(params, seed), hooks=hooks)

    return make


def _swim(p: dict[str, Any]) -> dict[str, Any]:
    w = int(p.get("window", 16))
    return {
        "train_pool": f"window{w}",
        "read_pool": f"window{w}",
        "loss": "softmax_weighted",
        "tau": float(p.get("tau", 1.0)),
        "weights_for": p.get("weights_for", "both"),
    }


_SWIM_PARAMS = ("window", "tau", "weights_for", *TRAIN_PARAMS)
register_kind(
    "token_swim",
    uses_C=False,
    params=_SWIM_PARAMS,
    description="CC++ per-token probe: sliding-window mean of logits, softmax-weighted BCE (tau)",
)(_runner(_linear(_swim)))
register_kind(
    "token_swim_multi",
    per_layer=False,
    uses_C=False,
    params=_SWIM_PARAMS,
    description="CC++ per-token probe on the spec's layers concatenated (probes.layers)",
)(_runner(_linear(_swim), multi=True))
register_kind(
    "token_ema",
    uses_C=False,
    params=("alpha", *TRAIN_PARAMS),
    description="Cost-effective CC: trained on mean-pooled activations, read by EMA of logits + max",
)(_runner(_linear(lambda p: {"train_pool": "mean", "read_pool": f"ema{float(p.get('alpha', 0.5)):g}"})))


def _fixed_pool(pool: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda p: {"train_pool": pool}


for _name, _pool in (("token_max", "max"), ("token_mean", "mean"), ("token_last", "last")):
    register_kind(
        _name,
        uses_C=False,
        params=TRAIN_PARAMS,
        description=f"{_pool} of per-token logits (trained through it)",
    )(_runner(_linear(_fixed_pool(_pool))))
register_kind(
    "token_rolling",
    uses_C=False,
    params=("window", *TRAIN_PARAMS),
    description="rolling mean of per-token logits, then max (plain BCE)",
)(_runner(_linear(lambda p: {"train_pool": f"window{int(p.get('window', 16))}"})))
register_kind(
    "token_softmax",
    uses_C=False,
    params=("tau", *TRAIN_PARAMS),
    description="softmax-weighted mean of per-token logits (temperature tau)",
)(_runner(_linear(lambda p: {"train_pool": f"softmax{float(p.get('tau', 1.0)):g}"})))
register_kind(
    "attention",
    uses_C=False,
    params=("heads", *TRAIN_PARAMS),
    description="attention probe: learned queries over tokens, attention-weighted value read-out",
)(
    _runner(
        lambda p, seed, hooks: AttentionProbe(heads=int(p.get("heads", 4)), **_train_kw(p, seed), hooks=hooks)
    )
)
register_kind(
    "multimax",
    uses_C=False,
    params=("heads", *TRAIN_PARAMS),
    description="MultiMax: per-head max over tokens of per-head scores, learned weighted sum",
)(
    _runner(
        lambda p, seed, hooks: MultiMaxProbe(heads=int(p.get("heads", 4)), **_train_kw(p, seed), hooks=hooks)
    )
)

TOKEN_KINDS = (
    "token_swim",
    "token_swim_multi",
    "token_ema",
    "token_max",
    "token_mean",
    "token_last",
    "token_rolling",
    "token_softmax",
    "attention",
    "multimax",
)
__all__ = ["TOKEN_KINDS", "stream_metrics", "token_data"]
