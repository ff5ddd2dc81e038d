"""Tests for experiments.viz.results (imported as plots) on a realistic fake results table."""

from __future__ import annotations

import hashlib
import itertools
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments.analysis.frontier import pareto_front
from experiments.viz import results as plots
from experiments.viz import save

D_MODEL = 576
N_LAYERS = 30
FORWARD_FLOPS = 2 * 135e6  # ≈ 2 · params of the policy model per token


def _fake_results(
    n_layers: int = N_LAYERS,
    layers: list[int] | None = None,
    poolings: tuple[str, ...] = ("mean", "max", "last", "ema"),
    probes: tuple[str, ...] = ("logistic_l2", "diffmeans"),
    eval_sets: tuple[str, ...] = ("test", "jailbreaks"),
    Cs: tuple[float, ...] = (0.01, 0.1, 1.0),
    seeds: tuple[int, ...] = (0,),
    hooks: tuple[str, ...] = ("resid_post",),
    extra_kinds: bool = True,
    rng_seed: int = 0,
) -> pd.DataFrame:
    """A results table shaped like a sweep's: per-layer linear probes plus multi-layer and standalone kinds.

    AUROC rises to a peak in the middle layers, max/ema pooling beats mean on jailbreaks, costs follow the
    cost model (2·d per read layer; standalone classifiers and fine-tuning far more; a keyword filter free).
    """
    rng = np.random.default_rng(rng_seed)
    layers = list(range(0, n_layers, 3)) if layers is None else layers
    pool_bonus = {"mean": 0.0, "max": 0.02, "last": -0.04, "ema": 0.03, "window": 0.025, "softmax": 0.015}
    rows: list[dict] = []

    def add(
        probe: str,
        layer: float,
        pooling: str,
        C: float,
        es: str,
        seed: int,
        hook: str,
        base: float,
        flops: float,
        standalone: float,
    ) -> None:
        auroc = float(np.clip(base + rng.normal(0, 0.005), 0.5, 0.9995))
        half = 0.01 + 0.02 * (1 - auroc)
        tpr1 = float(np.clip(1 - (1 - auroc) * 12 + rng.normal(0, 0.01), 0, 1))
        run_id = hashlib.sha1(f"{probe}{layer}{pooling}{C}{seed}{hook}".encode()).hexdigest()[:10]
        # validation metrics belong to the run (the same on every eval set's row); they track the test ones
        vrng = np.random.default_rng(int(run_id, 16) % 2**32)
        val_auroc = float(np.clip(base + 0.05 * (es == "jailbreaks") + vrng.normal(0, 0.003), 0.5, 0.9999))
        val_tpr = float(np.clip(1 - (1 - val_auroc) * 10 + vrng.normal(0, 0.003), 0, 1))
        rows.append(
            {
                "run_id": run_id,
                "probe": probe,
                "hook": hook,
                "layer": layer,
                "pooling": pooling,
                "C": C,
                "eval_set": es,
                "auroc": auroc,
                "auroc_lo": auroc - half,
                "auroc_hi": min(1.0, auroc + half),
                "auprc": auroc - 0.05,
                "log_auroc": auroc - 0.2,
                "tpr_at_1pct_fpr": tpr1,
                "tpr_at_1pct_fpr_lo": max(0.0, tpr1 - 0.05),
                "tpr_at_1pct_fpr_hi": min(1.0, tpr1 + 0.05),
                "tpr_at_0.1pct_fpr": tpr1 * 0.6,
                "flops_per_token": flops,
                "overhead_pct": 100 * flops / FORWARD_FLOPS,
                "standalone_flops_per_token": standalone,
                "standalone_overhead_pct": 100 * standalone / FORWARD_FLOPS,
                "probe_path": f"probes/{run_id}.safetensors",
                "fit_seconds": float(rng.uniform(0.1, 2)),
                "model": "SmolLM2-135M-Instruct",
                "seed": seed,
                "val_auroc": val_auroc,
                "val_log_auroc": val_auroc - 0.2,
                "val_tpr_at_1pct_fpr": val_tpr,
                "select_metric": "tpr_at_1pct_fpr",
            }
        )

    for probe, layer, pooling, C, es, seed, hook in itertools.product(
        probes, layers, poolings, Cs, eval_sets, seeds, hooks
    ):
        depth = layer / max(n_layers - 1, 1)
        base = 0.78 + 0.17 * np.exp(-((depth - 0.55) ** 2) / 0.08)
        base += pool_bonus.get(pooling, 0.0) * (2 if es == "jailbreaks" else 1) - (
            0.05 if es == "jailbreaks" else 0
        )
        base -= 0.02 * abs(np.log10(C) + 1) + (0.02 if probe == "diffmeans" else 0)
        flops = 2.0 * D_MODEL + (4.0 if pooling in ("ema", "window", "softmax") else 1.0)
        standalone = FORWARD_FLOPS * (layer + 1) / n_layers + flops
        add(probe, layer, pooling, C, es, seed, hook, base, flops, standalone)
    if extra_kinds:
        for es, seed, C in itertools.product(eval_sets, seeds, Cs):
            shift = (-0.04 if es == "jailbreaks" else 0.0) - 0.02 * abs(np.log10(C) + 1)
            add(
                "multilayer",
                -1,
                "mean",
                C,
                es,
                seed,
                "resid_post",
                0.975 + shift,
                2.0 * D_MODEL * n_layers,
                FORWARD_FLOPS,
            )
            add(
                "sae_k8",
                np.nan,
                "max",
                C,
                es,
                seed,
                "resid_post",
                0.95 + shift,
                2.0 * D_MODEL * 4608,
                FORWARD_FLOPS * 0.6,
            )
            add(
                "finetune",
                np.nan,
                "last",
                C,
                es,
                seed,
                "resid_post",
                0.985 + shift,
                FORWARD_FLOPS * 2 / 30,
                FORWARD_FLOPS,
            )
            add(
                "cascade",
                np.nan,
                "ema",
                C,
                es,
                seed,
                "resid_post",
                0.983 + shift,
                2.0 * D_MODEL + 0.05 * 9e8,
                FORWARD_FLOPS,
            )
            add("keyword", np.nan, "max", C, es, seed, "none", 0.70 + shift, 0.0, 0.0)
    return pd.DataFrame(rows)


def _points(fig: go.Figure) -> list[go.Scatter]:
    return [t for t in fig.data if getattr(t, "meta", None) == {"role": "points"}]


def _pareto_trace(fig: go.Figure) -> go.Scatter:
    (t,) = [t for t in fig.data if getattr(t, "meta", None) == {"role": "pareto"}]
    return t


# --- layer


def test_auroc_by_layer_one_trace_per_pooling() -> None:
    df = _fake_results(probes=("logistic_l2",), extra_kinds=False)
    fig = plots.auroc_by_layer(df, eval_set="test")
    assert isinstance(fig, go.Figure)
    assert sorted(t.name for t in fig.data) == sorted(
        f"logistic_l2 · {p}" for p in ("mean", "max", "last", "ema")
    )
    for t in fig.data:
        assert list(t.x) == list(range(0, N_LAYERS, 3))
        assert t.error_y.array is not None
    # best over C: C=0.1 wins in the fake (no penalty)
    assert fig.data[0].customdata[0][0] == "0.1"


def test_auroc_by_layer_dash_per_probe_and_facets() -> None:
    df = _fake_results()
    fig = plots.auroc_by_layer(df)
    lines = [t for t in fig.data if "no single layer" not in t.name]
    # 2 eval sets × 2 probes × 4 poolings
    assert len(lines) == 16
    assert {t.xaxis for t in fig.data} == {"x", "x2"}
    dashes = {t.name.split(" · ")[0]: t.line.dash for t in lines}
    assert dashes["logistic_l2"] != dashes["diffmeans"]
    colours = {t.name.split(" · ")[1]: t.line.color for t in lines}
    assert len(set(colours.values())) == 4
    # each legend entry once
    shown = [t.name for t in fig.data if t.showlegend is not False]
    assert len(shown) == len(set(shown))


def test_auroc_by_layer_nan_layers_become_reference_lines() -> None:
    df = _fake_results(probes=("logistic_l2",), eval_sets=("test",))
    fig = plots.auroc_by_layer(df)
    refs = [t for t in fig.data if "no single layer" in t.name]
    assert {t.name.split(" · ")[0] for t in refs} == {
        "multilayer",
        "sae_k8",
        "finetune",
        "cascade",
        "keyword",
    }
    for t in refs:
        assert list(t.x) == [0, 27] and t.y[0] == t.y[1]


def test_auroc_by_layer_other_metric_and_no_bounds() -> None:
    df = _fake_results(extra_kinds=False).drop(columns=["auroc_lo", "auroc_hi"])
    fig = plots.auroc_by_layer(df, metric="auroc", eval_set="test")
    assert all(t.error_y.array is None for t in fig.data)
    fig = plots.auroc_by_layer(df, metric="tpr_at_1pct_fpr", eval_set="test")
    assert fig.layout.yaxis.title.text == "TPR at 1% FPR"


def test_auroc_by_layer_several_hooks_and_seeds() -> None:
    df = _fake_results(
        hooks=("resid_post", "resid_mid"),
        seeds=(0, 1),
        probes=("logistic_l2",),
        eval_sets=("test",),
        extra_kinds=False,
    )
    fig = plots.auroc_by_layer(df)
    assert len(fig.data) == 8
    assert all("resid_" in t.name for t in fig.data)
    assert all(int(t.customdata[0][1]) == 6 for t in fig.data)  # 3 C × 2 seeds competed; chosen on val


# --- heatmap


def test_heatmap_shape_and_best_over_c() -> None:
    df = _fake_results(probes=("logistic_l2",))
    fig = plots.layer_pooling_heatmap(df, eval_set="jailbreaks", probe="logistic_l2")
    (hm,) = fig.data
    assert list(hm.x) == ["ema", "last", "max", "mean"]
    assert list(hm.y) == [str(v) for v in range(0, N_LAYERS, 3)]
    z = np.asarray(hm.z, float)
    assert z.shape == (10, 4)
    sub = df[(df.eval_set == "jailbreaks") & (df.layer == 15) & (df.pooling == "max")]
    assert z[5, 2] == pytest.approx(sub.auroc.max())
    assert hm.text[5][2] == f"{sub.auroc.max():.3f}"


def test_heatmap_best_probe_and_missing_cells() -> None:
    df = _fake_results()
    df = df[~((df.layer == 3) & (df.pooling == "max"))]
    fig = plots.layer_pooling_heatmap(df, eval_set="test")
    z = np.asarray(fig.data[0].z, dtype=float)
    assert np.isnan(z[1, 2]) and fig.data[0].text[1][2] == ""
    assert np.isfinite(z).sum() == 10 * 4 - 1
    assert "best probe" in fig.layout.title.text


def test_heatmap_needs_eval_set_when_several() -> None:
    with pytest.raises(ValueError, match="eval_set"):
        plots.layer_pooling_heatmap(_fake_results())
    with pytest.raises(ValueError, match="nope"):
        plots.layer_pooling_heatmap(_fake_results(), eval_set="test", probe="nope")


# --- pareto


def _brute_force_front(xs: list[float], ys: list[float]) -> set[int]:
    keep = set()
    for i, (xi, yi) in enumerate(zip(xs, ys, strict=True)):
        dominated = any(
            xj <= xi and yj >= yi and (xj < xi or yj > yi)
            for j, (xj, yj) in enumerate(zip(xs, ys, strict=True))
            if j != i
        )
        if not dominated:
            keep.add(i)
    return keep


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 8), st.integers(0, 8)), min_size=1, max_size=40))
def test_pareto_front_matches_brute_force(pts: list[tuple[int, int]]) -> None:
    xs = [float(a) for a, _ in pts]
    ys = [b / 8 for _, b in pts]
    df = pd.DataFrame({"flops_per_token": xs, "auroc": ys}, index=[f"r{i}" for i in range(len(pts))])
    front = pareto_front(df)
    assert {int(i[1:]) for i in front.index} == _brute_force_front(xs, ys)
    assert front["flops_per_token"].is_monotonic_increasing
    assert front["auroc"].is_monotonic_increasing


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.floats(-1e6, 1e12, allow_nan=False), st.floats(0, 1)), min_size=1, max_size=25))
def test_pareto_front_matches_brute_force_floats(pts: list[tuple[float, float]]) -> None:
    df = pd.DataFrame(pts, columns=["c", "m"])
    front = pareto_front(df, x="c", y="m")
    assert set(front.index) == _brute_force_front(df.c.tolist(), df.m.tolist())


def test_pareto_front_ignores_nan_and_names_missing_column() -> None:
    df = pd.DataFrame({"flops_per_token": [1.0, np.nan, 2.0], "auroc": [0.8, 0.99, np.nan]})
    assert list(pareto_front(df).index) == [0]
    with pytest.raises(ValueError, match="auroc"):
        pareto_front(df.drop(columns=["auroc"]))


# --- frontier


def test_cost_frontier_points_and_front() -> None:
    df = _fake_results()
    fig = plots.cost_frontier(df, eval_set="test")
    assert fig.layout.xaxis.type == "log"
    pts = _points(fig)
    # one trace per probe kind; one point per probe × layer × pooling (+ the five non-layer kinds)
    assert sorted(t.name for t in pts) == sorted(
        ["logistic_l2", "diffmeans", "multilayer", "sae_k8", "finetune", "cascade", "keyword"]
    )
    assert sum(len(t.x) for t in pts) == 2 * 10 * 4 + 5
    xs = np.concatenate([np.asarray(t.x, float) for t in pts])
    ys = np.concatenate([np.asarray(t.y, float) for t in pts])
    assert (xs > 0).all()
    expected = _brute_force_front(xs.tolist(), ys.tolist())
    front = _pareto_trace(fig)
    assert front.line.shape == "hv"
    assert sorted(zip(front.x, front.y, strict=True)) == sorted((xs[i], ys[i]) for i in expected)
    # symbol legend entries: one per pooling
    legend = [t for t in fig.data if getattr(t, "meta", None) == {"role": "symbol-legend"}]
    assert sorted(t.name for t in legend) == ["ema", "last", "max", "mean"]
    colours = [t for t in fig.data if getattr(t, "meta", None) == {"role": "colour-legend"}]
    assert [t.name for t in colours] == sorted(t.name for t in pts)
    assert {t.marker.color for t in colours} == {t.marker.color for t in pts}
    assert all(t.showlegend is False for t in pts)


def test_cost_frontier_clips_zero_cost_and_says_so() -> None:
    df = _fake_results(eval_sets=("test",))
    fig = plots.cost_frontier(df, cost="overhead_pct")
    (kw,) = [t for t in _points(fig) if t.name == "keyword"]
    min_positive = df.loc[df.overhead_pct > 0, "overhead_pct"].min()
    assert kw.x[0] == pytest.approx(min_positive / 10)
    assert "clipped" in kw.customdata[0][6]
    assert "clipped" in fig.layout.title.text
    (lr,) = [t for t in _points(fig) if t.name == "logistic_l2"]
    assert all(c[6] == "" for c in lr.customdata)
    # the free keyword filter is the cheapest point, so it is on the front
    assert _pareto_trace(fig).x[0] == pytest.approx(min_positive / 10)


def test_cost_frontier_negative_and_nan_costs(caplog: pytest.LogCaptureFixture) -> None:
    df = _fake_results(eval_sets=("test",), extra_kinds=False)
    df.loc[df.index[:3], "flops_per_token"] = -5.0
    df.loc[df.index[3:5], "flops_per_token"] = np.nan
    with caplog.at_level(logging.WARNING, logger="experiments.viz.results"):
        fig = plots.cost_frontier(df, cost_floor=1.0)
    assert "NaN" in caplog.text
    xs = np.concatenate([np.asarray(t.x, float) for t in _points(fig)])
    assert (xs >= 1.0).all() and (xs == 1.0).any()


def test_cost_frontier_hover_has_layer_c_run() -> None:
    fig = plots.cost_frontier(_fake_results(eval_sets=("test",)))
    (ml,) = [t for t in _points(fig) if t.name == "multilayer"]
    probe, pooling, layer, C, run_id, *_ = ml.customdata[0]
    assert (probe, pooling, layer) == ("multilayer", "mean", "all / none")
    assert C == "0.1" and len(run_id) == 10
    assert "layer %{customdata[2]}" in ml.hovertemplate


# --- errors


@pytest.mark.parametrize(
    "fn",
    [
        lambda d: plots.auroc_by_layer(d),
        lambda d: plots.layer_pooling_heatmap(d, eval_set="test"),
        lambda d: plots.cost_frontier(d, eval_set="test"),
    ],
)
def test_empty_table_is_a_clear_error(fn) -> None:
    empty = _fake_results().iloc[0:0]
    with pytest.raises(ValueError, match="empty"):
        fn(empty)


@pytest.mark.parametrize("column", ["pooling", "layer", "auroc", "eval_set", "flops_per_token"])
def test_missing_column_is_named(column: str) -> None:
    df = _fake_results(eval_sets=("test",)).drop(columns=[column])
    with pytest.raises(ValueError, match=column):
        plots.cost_frontier(df)
    if column != "flops_per_token":
        with pytest.raises(ValueError, match=column):
            plots.auroc_by_layer(df)
        with pytest.raises(ValueError, match=column):
            plots.layer_pooling_heatmap(df)


def test_only_non_layer_rows() -> None:
    df = _fake_results(probes=(), eval_sets=("test",))
    with pytest.raises(ValueError, match="no rows with a layer"):
        plots.auroc_by_layer(df)
    fig = plots.cost_frontier(df)  # the frontier still works
    assert sum(len(t.x) for t in _points(fig)) == 5


# --- roc


def test_roc_curves_log_axis_and_marks() -> None:
    fpr = np.array([0.0, 1e-4, 1e-3, 1e-2, 0.1, 1.0])
    curves = {"probe A": (fpr, np.sqrt(fpr)), "probe B": (fpr.tolist(), fpr.tolist())}
    fig = plots.roc_curves(curves)
    assert [t.name for t in fig.data] == ["probe A", "probe B", "chance"]
    assert fig.layout.xaxis.type == "log"
    assert tuple(fig.layout.xaxis.range) == pytest.approx((-4, 0))
    # the curve starts at the floor with the interpolated TPR; FPR 0 is left out
    assert fig.data[0].x[0] == pytest.approx(1e-4) and fig.data[0].y[0] == pytest.approx(1e-2)
    assert list(fig.data[0].x[1:]) == pytest.approx([1e-3, 1e-2, 0.1, 1.0])
    marks_at = sorted(a.x for a in fig.layout.annotations)
    assert marks_at == pytest.approx([-3, -2])  # annotations on a log axis take log10
    marks = sorted(s.x0 for s in fig.layout.shapes)
    assert marks == pytest.approx([1e-3, 1e-2])
    texts = {a.text for a in fig.layout.annotations}
    assert {"FPR 1%", "FPR 0.1%"} <= texts


def test_roc_curves_linear_and_errors() -> None:
    fig = plots.roc_curves({"a": ([0, 0.5, 1], [0, 0.9, 1])}, log_fpr=False)
    assert fig.layout.xaxis.type != "log"
    assert list(fig.data[0].x) == [0, 0.5, 1]
    with pytest.raises(ValueError):
        plots.roc_curves({})
    with pytest.raises(ValueError, match="length"):
        plots.roc_curves({"a": ([0, 1], [0, 0.5, 1])})


# --- saving


def _png_works() -> bool:
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return False
    import shutil

    return any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome", "chrome"))


def test_save_figure_html(tmp_path: Path) -> None:
    fig = plots.roc_curves({"a": ([0, 0.5, 1], [0, 0.9, 1])})
    paths = save.save_figure(fig, tmp_path / "sub" / "roc", png=False)
    assert paths == [tmp_path / "sub" / "roc.html"]
    html = paths[0].read_text()
    assert 'class="plotly-graph-div"' in html
    assert "<script src=" not in html  # no CDN or file reference: plotly.js is inline
    assert len(html) > 1_000_000  # plotly.js inline: works offline


def test_save_figure_without_kaleido_returns_html(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Kaleido requires Google Chrome to be installed.")

    monkeypatch.setattr(save.pio, "write_images", boom)
    monkeypatch.setattr(save, "_PNG_FAILURE", None)
    fig = plots.roc_curves({"a": ([0, 0.5, 1], [0, 0.9, 1])})
    with caplog.at_level(logging.WARNING, logger="experiments.viz.save"):
        paths = save.save_figure(fig, tmp_path / "roc.png")
    assert paths == [tmp_path / "roc.html"]
    assert "PNG export disabled" in caplog.text
    assert not (tmp_path / "roc.png").exists()


@pytest.mark.slow  # starts a headless Chromium (a few seconds)
@pytest.mark.skipif(not _png_works(), reason="kaleido or a Chromium browser is not installed")
def test_save_figure_png(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(save, "_PNG_FAILURE", None)
    fig = plots.cost_frontier(_fake_results(eval_sets=("test",)))
    paths = save.save_figure(fig, tmp_path / "frontier")
    if len(paths) == 1:
        pytest.skip(f"kaleido could not export: {save._PNG_FAILURE}")
    assert paths[1].suffix == ".png"
    assert paths[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_results_writes_every_figure(tmp_path: Path) -> None:
    df = _fake_results(n_layers=12, Cs=(0.1, 1.0))
    (tmp_path / "run").mkdir()
    df.to_parquet(tmp_path / "run" / "results.parquet")
    paths = plots.plot_results(tmp_path / "run", tmp_path / "out", png=False)
    names = sorted(p.name for p in paths)
    assert names == sorted(
        [
            "auroc_by_layer.html",
            "tpr_at_1pct_fpr_by_layer.html",
            *(f"heatmap_{m}_{e}.html" for m in ("auroc", "tpr_at_1pct_fpr") for e in ("jailbreaks", "test")),
            *(
                f"frontier_{m}_{c}_{e}.html"
                for m in ("auroc", "tpr_at_1pct_fpr")
                for c in ("flops_per_token", "overhead_pct", "standalone_overhead_pct")
                for e in ("jailbreaks", "test")
            ),
        ]
    )
    assert all(p.parent == tmp_path / "out" / "plots" and p.exists() for p in paths)


def test_plot_results_skips_what_the_table_cannot_show(tmp_path: Path) -> None:
    df = _fake_results(probes=(), eval_sets=("test",)).drop(
        columns=["tpr_at_1pct_fpr", "overhead_pct", "standalone_overhead_pct"], errors="ignore"
    )
    paths = plots.plot_results(df, tmp_path, png=False)
    assert sorted(p.name for p in paths) == ["frontier_auroc_flops_per_token_test.html"]
    with pytest.raises(ValueError, match="empty"):
        plots.plot_results(df.iloc[0:0], tmp_path, png=False)
