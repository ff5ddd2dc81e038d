"""Per-token probes: a planted direction that appears once, mid-sequence, among long filler."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from activations.data import Example, PromptDataset
from activations.tiny import make_tiny_model, plant_direction
from experiments.sweep.engine import run_sweep
from experiments.sweep.spec import parse_spec
from probes.attention import AttentionProbe
from probes.io import load_probe
from probes.multimax import MultiMaxProbe
from probes.ragged import Ragged
from probes.token import TokenProbe, softmax_weighted_bce, window_means
from tests.conftest import FILLER


def decoy_model():
    """A tiny model where 'bomb' carries 6·v and each of 'cake' 1.5·v (same direction v) on top of one
    shared base embedding (also given to 'poem'): a harmful text (one 'bomb', three 'poem') and a harmless
    one (four 'cake') have the same mean embedding, but only the harmful one has a strong single token."""
    m = make_tiny_model(n_layers=2, d_model=32, n_heads=4, d_mlp=64, seed=0)
    tok = m.tokenizer
    ids = {w: tok.convert_tokens_to_ids(w) for w in ("bomb", "cake", "poem")}
    with torch.no_grad():
        m.W_E[ids["cake"]] = m.W_E[ids["bomb"]]
        m.W_E[ids["poem"]] = m.W_E[ids["bomb"]]
    plant_direction(m, ["bomb"], scale=6.0, seed=1)
    plant_direction(m, ["cake"], scale=1.5, seed=1)
    return m


def decoy_dataset(n: int, seed: int, name: str) -> PromptDataset:
    rng = random.Random(seed)
    exs = []
    for i in range(n):
        label = i % 2
        length = rng.randint(30, 40)
        words = [rng.choice(FILLER) for _ in range(length)]
        slots = [4, 12, length // 2, length - 6]  # spread apart (> window), one in the middle
        specials = ["poem", "poem", "bomb", "poem"] if label else ["cake"] * 4
        for s, w in zip(slots, specials, strict=True):
            words[s] = w
        exs.append(
            Example(id=f"{name}:{i}", text=" ".join(words), label=label, source=name, group=f"{name}{i}")
        )
    return PromptDataset(exs, name=name)


def test_planted_mid_sequence_mean_fails_max_ema_window_succeed(tmp_path) -> None:
    model = decoy_model()
    ds = decoy_dataset(160, 0, "decoy").with_splits({"train": 0.5, "val": 0.2, "test": 0.3}, seed=0)
    ds.to_jsonl(tmp_path / "decoy.jsonl")
    decoy_dataset(240, 1, "control").to_jsonl(tmp_path / "control.jsonl")  # 120 benign: resolves 1% FPR
    fast = {"epochs": 30, "lr": 0.02}
    spec = parse_spec(
        {
            "name": "tok",
            "model": "tiny",
            "max_len": 64,
            "positions": "prompt",
            "datasets": {
                "train": {"path": "decoy.jsonl", "split": "train"},
                "val": {"path": "decoy.jsonl", "split": "val"},
                "test": {"heldout": {"path": "decoy.jsonl", "split": "test"}},
                "benign_control": {"path": "control.jsonl", "label": 0},
            },
            "hooks": ["resid_pre"],
            "layers": [0],
            "poolings": ["mean", "max"],
            "probes": [
                {"kind": "logistic_l2"},
                {"kind": "token_mean", "params": fast},
                {"kind": "token_max", "params": fast},
                {"kind": "token_ema", "params": {"alpha": 0.5, **fast}},
                {"kind": "token_swim", "params": {"window": 4, "tau": 1.0, **fast}},
                {"kind": "token_rolling", "params": {"window": 4, **fast}},
                {"kind": "multimax", "params": {"heads": 2, **fast}},
                {"kind": "attention", "params": {"heads": 2, **fast}},
            ],
            "Cs": [0.01, 0.1, 1.0],
            "bootstrap": 20,
        }
    )
    df = run_sweep(spec, tmp_path / "out", base=tmp_path, model=model, progress=False)
    held = df[df.eval_set == "heldout"]
    by = {(r.probe, r.pooling): r for r in held.itertuples()}
    # per-token kinds run once (first pooling group) and name their aggregation in the pooling column
    tok_rows = held[held.probe.str.startswith("token_") | held.probe.isin(["attention", "multimax"])]
    assert tok_rows.probe.value_counts().max() == 1
    assert set(tok_rows.pooling) == {
        "mean",
        "max",
        "mean->ema0.5",
        "swim4-tau1",
        "window4",
        "multimax2h",
        "attention2h",
    }
    mean_auc = by[("token_mean", "mean")].auroc
    pooled_mean_auc = by[("logistic_l2", "mean")].auroc
    assert mean_auc < 0.8 and pooled_mean_auc < 0.8  # the mean dilutes the single token away
    for kind, agg in [
        ("token_max", "max"),
        ("token_ema", "mean->ema0.5"),
        ("token_swim", "swim4-tau1"),
        ("token_rolling", "window4"),
        ("multimax", "multimax2h"),
    ]:
        assert by[(kind, agg)].auroc > 0.95, (kind, by[(kind, agg)].auroc)
        assert by[(kind, agg)].auroc > mean_auc + 0.15
    # costs: per-token read-outs, window/EMA updates on top of the 2·d+1 dot product
    d = model.cfg.d_model
    assert by[("token_max", "max")].flops_per_token == pytest.approx(2 * d + 1 + 1)
    assert by[("token_ema", "mean->ema0.5")].flops_per_token == pytest.approx(2 * d + 1 + 3)
    assert by[("multimax", "multimax2h")].flops_per_token > by[("token_max", "max")].flops_per_token
    # the saved probe reloads, reads its own hook from a store, and has a streaming threshold
    row = by[("token_swim", "swim4-tau1")]
    probe = load_probe(row.probe_path)
    assert (
        isinstance(probe, TokenProbe)
        and probe.loss == "softmax_weighted"
        and probe.hooks == ["blocks.0.hook_resid_pre"]
    )
    assert np.isfinite(row.stream_threshold_1pct)
    # streaming columns: the stopping statistic is the offline score for max / EMA / window read-outs only
    equal = {"max", "mean->ema0.5", "swim4-tau1", "window4"}
    for r in tok_rows.itertuples():
        if r.probe == "multimax":  # a running max per head: equal unless a head has a negative weight
            expect = bool((load_probe(r.probe_path).params_["u"] >= 0).all())
        else:
            expect = r.pooling in equal
        assert r.stream_equals_offline == expect, r.pooling
        assert r.stream_threshold_positions == "prompt"  # the control's scored tokens (positions: prompt)
        assert "benign_control" in r.stream_threshold_calibration
        assert r.stream_recall_at_1pct == pytest.approx(r.stream_tpr_at_1pct_fpr)
        if r.stream_equals_offline:
            assert r.stream_threshold_1pct == pytest.approx(r.threshold_at_1pct_fpr, abs=1e-4)
            assert r.stream_auroc == pytest.approx(r.auroc, abs=1e-3)
            assert r.stream_tpr_at_1pct_fpr == pytest.approx(r.tpr_at_1pct_fpr, abs=1e-3)
        else:
            assert np.isfinite(r.stream_auroc) and 0 <= r.stream_recall_at_1pct <= 1
    meta = load_probe(row.probe_path).metadata_
    assert meta["stream_threshold_positions"] == "prompt" and meta["stream_equals_offline"] is True
    assert meta["stream_threshold_1pct"] == pytest.approx(row.stream_threshold_1pct)
    from experiments.analysis.scoring import score_dataset

    test = ds.filter(split="test")
    s, _ = score_dataset(row.probe_path, test, model)
    from probes.metrics import auroc

    assert auroc(test.labels.astype(int), s) == pytest.approx(row.auroc, abs=1e-9)


def test_softmax_weighted_loss_gradcheck() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 9, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[1, 6:] = False
    mask[2, 2:] = False  # shorter than the window: one window, the whole sequence
    y = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    sw = torch.tensor([1.0, 2.0, 0.5, 1.0], dtype=torch.float64)

    for weights_for in ("both", "harmful"):

        def f(x: torch.Tensor, wf: str = weights_for) -> torch.Tensor:
            z, valid = window_means(x, mask, 3)
            return softmax_weighted_bce(z, valid, y, tau=0.7, sample_weight=sw, weights_for=wf)

        assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-7)


def test_softmax_weighted_loss_limits_and_windows() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 12, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[2, 5:] = False
    z, valid = window_means(logits, mask, 4)
    # the max over counted windows is the window pooling of activations.pooling
    from activations.pooling import Pooling

    torch.testing.assert_close(
        torch.where(valid, z, -torch.inf).amax(1), Pooling.make("window", window=4)(logits, mask)
    )
    y = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    bce = torch.nn.functional.softplus(z) - y[:, None] * z
    zmax = torch.where(valid, z, -torch.inf).amax(1)
    tiny_tau = softmax_weighted_bce(z, valid, y, tau=1e-4)
    expect_max = (torch.nn.functional.softplus(zmax) - y * zmax).mean()
    torch.testing.assert_close(tiny_tau, expect_max)
    huge_tau = softmax_weighted_bce(z, valid, y, tau=1e6)
    expect_mean = (torch.where(valid, bce, 0).sum(1) / valid.sum(1)).mean()
    torch.testing.assert_close(huge_tau, expect_mean, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="tau"):
        softmax_weighted_bce(z, valid, y, tau=0)


def _synthetic(n: int = 80, d: int = 8, seed: int = 0) -> tuple[Ragged, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    v = torch.zeros(d)
    v[0] = 1.0
    seqs, ys = [], []
    for i in range(n):
        L = 6 + i % 9
        x = torch.randn(L, d, generator=g)
        if i % 2:
            x[L // 2] += 5 * v
        seqs.append(x)
        ys.append(i % 2)
    return Ragged.of(seqs), np.array(ys)


PROBES = [
    lambda: TokenProbe.cc_plus_plus(window=3, tau=0.5, epochs=8),
    lambda: TokenProbe.cost_effective(alpha=0.5, epochs=8),
    lambda: TokenProbe("max", epochs=8),
    lambda: TokenProbe("mean", epochs=8),
    lambda: TokenProbe("last", epochs=8),
    lambda: TokenProbe("window4", epochs=8),
    lambda: TokenProbe("window16", epochs=8),  # longer than every training sequence: whole windows only
    lambda: TokenProbe("softmax0.5", epochs=8),
    lambda: AttentionProbe(heads=3, epochs=8),
    lambda: MultiMaxProbe(heads=3, epochs=8),
]


def reference_stream(p, x: torch.Tensor) -> tuple[np.ndarray, float]:
    """The running score after each token (NaN: not yet scorable) and the end-of-stream score of one
    sequence, computed in float64 numpy straight from the definitions, independently of the streamers and of
    ``decision_function``: windows count when full, or as the one whole window of a sequence shorter than M
    (scored only at its end)."""
    X = x.double().numpy()
    L = X.shape[0]
    run = np.full(L, np.nan)
    if isinstance(p, AttentionProbe):
        q, v = p.params_["q"].double().numpy(), p.params_["v"].double().numpy()
        a, val = X @ q.T, X @ v.T + p.params_["bv"].double().numpy()
        for t in range(1, L + 1):
            w = np.exp(a[:t] - a[:t].max(0))
            run[t - 1] = ((w / w.sum(0)) * val[:t]).sum() + float(p.params_["b"][0])
        return run, run[-1]
    if isinstance(p, MultiMaxProbe):
        s = X @ p.params_["W"].double().numpy().T + p.params_["c"].double().numpy()
        for t in range(1, L + 1):
            run[t - 1] = s[:t].max(0) @ p.params_["u"].double().numpy() + float(p.params_["b"][0])
        return run, run[-1]
    logit = X @ p.coef_.double().numpy() + float(p.intercept_)
    pool = p.read_pooling
    for t in range(1, L + 1):
        lt = logit[:t]
        if pool.kind == "mean":
            run[t - 1] = lt.mean()
        elif pool.kind == "max":
            run[t - 1] = lt.max()
        elif pool.kind == "last":
            run[t - 1] = lt[-1]
        elif pool.kind == "ema":
            e, best = lt[0], lt[0]
            for u in lt[1:]:
                e = pool.alpha * u + (1 - pool.alpha) * e
                best = max(best, e)
            run[t - 1] = best
        elif pool.kind == "window":
            M = pool.window
            if t >= M:
                run[t - 1] = max(lt[u - M : u].mean() for u in range(M, t + 1))
        elif pool.kind == "softmax":
            w = np.exp((lt - lt.max()) / pool.temperature)
            run[t - 1] = (w / w.sum() * lt).sum()
    if pool.kind == "window" and pool.window > L:
        return run, logit.mean()
    return run, run[-1]


# the read-outs whose stopping statistic is the offline score
STOP_EQUALS_OFFLINE = {"max", "ema", "window"}


@pytest.mark.parametrize("make", PROBES)
def test_streaming_equals_offline_and_roundtrip(make, tmp_path) -> None:
    R, y = _synthetic()
    p = make().fit(R, y)
    # deterministic under the seed
    q = make().fit(R, y)
    for k, v in p.state_dict().items():
        torch.testing.assert_close(v, q.state_dict()[k], rtol=0, atol=0)
    # replay complete sequences of every length, some shorter than any window (1, 2, 3 tokens), ragged
    g = torch.Generator().manual_seed(7)
    seqs = [R.sequence(i) for i in range(6)] + [torch.randn(n, 8, generator=g) for n in (1, 2, 3, 17, 20)]
    X = Ragged.of(seqs)
    rep = p.replay(X)
    offline = p.decision_function(X).double().numpy()
    stops = []
    for i, x in enumerate(seqs):
        run, final = reference_stream(p, x)
        np.testing.assert_allclose(rep.running[i], run, rtol=1e-5, atol=1e-5)  # NaN where the reference is
        np.testing.assert_allclose(
            p.prefix_scores(x, running=True).double().numpy(), run, rtol=1e-5, atol=1e-5
        )
        assert rep.final[i] == pytest.approx(final, rel=1e-5, abs=1e-5)
        assert final == pytest.approx(offline[i], rel=1e-5, abs=1e-5)  # the end-of-stream step = offline
        stops.append(np.fmax(np.nanmax(run, initial=-np.inf), final))
    np.testing.assert_allclose(rep.stopping, stops, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(p.stopping_statistic(X), stops, rtol=1e-5, atol=1e-5)
    if isinstance(p, TokenProbe) and p.read_pooling.kind in STOP_EQUALS_OFFLINE:
        np.testing.assert_allclose(rep.stopping, offline, rtol=1e-5, atol=1e-6)
    elif not isinstance(p, MultiMaxProbe):  # MultiMax: equal unless a head weight is negative
        assert (rep.stopping >= offline - 1e-5).all() and (rep.stopping > offline + 1e-4).any()
    # the batched streamer, fed one stream at a time (rows mask), agrees with streaming each alone
    st = p.streamer()
    for i in (0, 7):
        st.reset(1)
        for t in range(seqs[i].shape[0]):
            s = st.update(seqs[i][t : t + 1])
        assert float(st.stopping_statistic()[0]) == pytest.approx(rep.stopping[i], rel=1e-5, abs=1e-5)
        assert np.isnan(float(s[0])) == np.isnan(rep.running[i][-1])
    # save / load (safetensors + JSON)
    p.save(tmp_path / "p", metadata={"model_id": "synthetic"})
    back = load_probe(tmp_path / "p")
    assert type(back) is type(p) and back.get_config() == p.get_config()
    torch.testing.assert_close(back.decision_function(R), p.decision_function(R))
    np.testing.assert_allclose(back.replay(X).stopping, rep.stopping, rtol=1e-6, atol=1e-6)
    assert p.flops_per_token() > 2 * 8


def test_streaming_fpr_matches_offline_calibration() -> None:
    """i.i.d. per-token logits (a fixed direction on random activations), a window of M = 16 over L = 200
    tokens: a threshold set at 1% FPR on offline scores of benign sequences gives about 1% FPR when the
    monitor streams fresh benign sequences. (Scoring prefixes shorter than M, as partial windows, made the
    first token alone the stream's maximum about a quarter of the time: a streaming FPR near 24%.)"""
    from probes.metrics import threshold_at_fpr
    from probes.stream import stream_max_scores

    d, M, L = 4, 16, 200
    g = torch.Generator().manual_seed(0)
    p = TokenProbe(f"window{M}")
    p.load_state_dict({"coef": torch.tensor([1.0, 0.0, 0.0, 0.0]), "intercept": torch.zeros(1)})
    calib = Ragged(torch.randn(1000 * L, d, generator=g), np.arange(0, 1000 * L + 1, L))
    fresh = Ragged(torch.randn(2000 * L, d, generator=g), np.arange(0, 2000 * L + 1, L))
    thr = threshold_at_fpr(p.decision_function(calib), 0.01)
    fpr_offline = float((p.decision_function(fresh).numpy() > thr).mean())
    fpr_stream = float((stream_max_scores(p, fresh) > thr).mean())
    assert fpr_offline <= 0.02
    assert fpr_stream <= 0.02, f"streaming FPR {fpr_stream:.3f} at the offline 1% threshold"
    assert fpr_stream == pytest.approx(fpr_offline, abs=1e-9)  # the same statistic


def test_ragged_input_errors() -> None:
    with pytest.raises(ValueError, match="no tokens"):
        Ragged(torch.zeros(3, 2), np.array([0, 0, 3]))
    with pytest.raises(ValueError, match="run from 0"):
        Ragged(torch.zeros(3, 2), np.array([0, 2]))
    R, y = _synthetic(n=10)
    with pytest.raises(ValueError, match="only one class"):
        TokenProbe("max").fit(R, np.zeros(10))
    p = TokenProbe("max", epochs=2).fit(R, y)
    with pytest.raises(ValueError, match="features per token"):
        p.decision_function(Ragged(torch.zeros(4, 3), np.array([0, 4])))
    with pytest.raises(ValueError, match="softmax-weighted loss"):
        TokenProbe("max", loss="softmax_weighted")
