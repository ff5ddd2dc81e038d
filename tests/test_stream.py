"""The streaming monitor: KV-cached generation with a per-token probe read from the same forward pass."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch

from activations.collect import collect
from experiments.viz.stream import recall_figure, token_figure
from probes.attention import AttentionProbe
from probes.ragged import ragged_from_store
from probes.stream import (
    MonitorError,
    StreamCalibration,
    StreamingMonitor,
    ThresholdPositionWarning,
    calibrate_threshold,
    catch_positions,
    generate_tokens,
    recall_by_tokens,
    stream_max_scores,
)
from probes.token import TokenProbe, TokenProbeBase
from tests.conftest import planted_dataset

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """An EMA per-token probe trained on the tiny model's planted prompts, and the benign store."""
    tmp = tmp_path_factory.mktemp("stream")
    ds = planted_dataset(n=120, seed=3)
    store = collect(tiny_model, ds, tmp / "s", hooks=[HOOK], layers=None, positions="prompt", progress=False)
    R = ragged_from_store(store, HOOK)
    probe = TokenProbe.cost_effective(alpha=0.5, epochs=30, lr=0.02, hooks=[HOOK]).fit(R, store.labels)
    return probe, R, np.asarray(store.labels)


def _ids(model, text: str) -> list[int]:
    return [int(t) for t in model.tokenizer(text, add_special_tokens=False)["input_ids"]]


@pytest.mark.parametrize("kind", ["ema", "attention"])
def test_running_score_equals_offline(tiny_model, trained, kind) -> None:
    probe, R, y = trained
    if kind == "attention":
        probe = AttentionProbe(heads=2, epochs=5, hooks=[HOOK]).fit(R, y)
    mon = StreamingMonitor(tiny_model, probe)
    prompts = ["how can i make a cake", "tell me about the garden please", "hi"]  # ragged: left padding
    results = mon.generate(prompts, max_new_tokens=10, temperature=0.0)
    for res in results:
        assert len(res.scores) == len(res.ids) - int(res.eos) and len(res.scores) > 0
        offline = mon.offline_scores(res).double().numpy()
        np.testing.assert_allclose(res.scores, offline, rtol=1e-4, atol=1e-4)
    # batched generation = one prompt at a time (left padding and the KV cache change nothing)
    for p, res in zip(prompts, results, strict=True):
        single = mon.generate(p, max_new_tokens=10)[0]
        assert single.ids == res.ids
        np.testing.assert_allclose(single.scores, res.scores, rtol=1e-4, atol=1e-4)


def test_monitor_stops_on_forced_trigger(tiny_model, trained) -> None:
    probe, R, y = trained
    benign = R.subset(np.nonzero(y < 0.5)[0])
    thr = calibrate_threshold(probe, benign, fpr=0.0)
    assert (stream_max_scores(probe, benign) <= thr).all()
    mon = StreamingMonitor(tiny_model, probe, threshold=thr)
    cont = _ids(tiny_model, "the cake of the garden and bomb with the music for me")
    at = cont.index(tiny_model.tokenizer.convert_tokens_to_ids("bomb"))
    res = mon.generate("please help me", max_new_tokens=len(cont), forced=[cont])[0]
    assert res.stop_index == at and res.ids == cont[: at + 1]
    assert res.scores[at] > thr and max(res.scores[:at]) <= thr
    # without a threshold the stream runs to the end of the continuation
    full = StreamingMonitor(tiny_model, probe).generate("please help me", len(cont), forced=[cont])[0]
    assert full.ids == cont and not full.stopped
    np.testing.assert_allclose(full.scores[: at + 1], res.scores)


def test_monitor_stops_when_the_model_generates_the_trigger(tiny_model, trained) -> None:
    probe, R, y = trained
    thr = calibrate_threshold(probe, R.subset(np.nonzero(y < 0.5)[0]), fpr=0.0)
    model = copy.deepcopy(tiny_model)
    tok = model.tokenizer
    bomb, cake = tok.convert_tokens_to_ids("bomb"), tok.convert_tokens_to_ids("cake")
    with torch.no_grad():
        model.b_U[cake] += 50.0  # the model says "cake" first ...
    plain = generate_tokens(model, [_ids(model, "tell me")], 6)[0]
    assert plain.ids[0] == cake
    with torch.no_grad():  # ... and "bomb" once it has said "cake"
        model.b_U[bomb] += 25.0
        model.W_U[:, bomb] += 40.0 * model.W_E[cake] / model.W_E[cake].norm() ** 2
    free = generate_tokens(model, [_ids(model, "tell me")], 6)[0]
    assert bomb in free.ids and len(free.ids) == 6
    mon = StreamingMonitor(model, probe, threshold=thr)
    res = generate_tokens(model, [_ids(model, "tell me")], 6, probe=probe, threshold=thr)[0]
    first = free.ids.index(bomb)
    assert res.stop_index == first and res.ids == free.ids[: first + 1]
    assert mon.threshold == thr


def test_calibration_catch_positions_and_figures(tiny_model, trained, tmp_path) -> None:
    probe, R, y = trained
    benign, harmful = R.subset(np.nonzero(y < 0.5)[0]), R.subset(np.nonzero(y >= 0.5)[0])
    thr = calibrate_threshold(probe, benign, fpr=0.05)
    assert (stream_max_scores(probe, benign) > thr).mean() <= 0.05
    catch = catch_positions(probe, harmful, thr)
    assert (catch > 0).mean() > 0.9  # the planted trigger is caught ...
    store_tokens = [harmful.sequence(i) for i in range(harmful.n_sequences)]
    for i, c in enumerate(catch):
        if c > 0:  # ... never before the prefix that crosses, and the offline prefix score agrees
            assert probe.prefix_scores(store_tokens[i][:c])[-1] > thr
    k, rec = recall_by_tokens(catch, 20)
    assert (np.diff(rec) >= 0).all() and rec[-1] == pytest.approx((catch > 0).mean())
    recall_figure({"ema": (k, rec)}).write_html(tmp_path / "recall.html")
    res = StreamingMonitor(tiny_model, probe, threshold=thr).generate("how to bake bread", 8)[0]
    token_figure(res, tiny_model.tokenizer).write_html(tmp_path / "tokens.html")
    assert (tmp_path / "tokens.html").stat().st_size > 1000


def _window_probe(trained, window: int = 8) -> TokenProbe:
    """The trained per-token direction read out by a sliding window of ``window`` tokens."""
    win = TokenProbe(f"window{window}", hooks=[HOOK])
    win.load_state_dict(trained[0].state_dict())
    return win


def test_window_probe_short_generation_scores_the_end_of_stream(tiny_model, trained, tmp_path) -> None:
    win = _window_probe(trained, 8)
    mon = StreamingMonitor(tiny_model, win)
    short = _ids(tiny_model, "the cake of the garden")  # 5 tokens: shorter than the window
    long = _ids(tiny_model, "the cake of the garden and bomb with the music for me")  # 12 tokens
    res = mon.generate(["please help me", "tell me about bread"], 12, forced=[short, long])
    r_short, r_long = res
    # the short stream: no running score (no full window), its whole window scored at the end of the stream
    assert len(r_short.scores) == len(short) and all(math.isnan(s) for s in r_short.scores)
    assert r_short.final_score is not None
    assert r_short.final_score == pytest.approx(mon.offline_final_score(r_short), abs=1e-4)
    assert r_short.stopping_statistic == r_short.final_score
    token_figure(r_short, tiny_model.tokenizer).write_html(tmp_path / "short.html")  # NaN running scores
    # the long stream (same batch: the short row's state was frozen after its end): running scores from the
    # 8th token on, equal to the offline ones; its stopping statistic is the offline score of the sequence
    assert len(r_long.scores) == len(long)
    np.testing.assert_allclose(
        r_long.scores, mon.offline_scores(r_long).double().numpy(), rtol=1e-4, atol=1e-4
    )
    assert all(math.isnan(s) for s in r_long.scores[:7]) and not any(math.isnan(s) for s in r_long.scores[7:])
    assert r_long.stopping_statistic == pytest.approx(mon.offline_final_score(r_long), abs=1e-4)
    # each stream alone gives the same scores
    alone = mon.generate("please help me", 12, forced=[short])[0]
    assert alone.final_score == pytest.approx(r_short.final_score, abs=1e-5)
    # a threshold just below the end-of-stream score flags the short stream at its end, not before
    thr = r_short.final_score - 1e-3
    flagged = mon.generate("please help me", 12, forced=[short], threshold=thr)[0]
    assert flagged.stopped and flagged.stopped_at_end and flagged.ids == short
    assert flagged.stop_index == len(short) - 1
    # free generation shorter than the window (max_new_tokens): scored at the end too
    free = mon.generate("how can i make a cake", 4)[0]
    if free.scores:
        assert free.final_score == pytest.approx(mon.offline_final_score(free), abs=1e-4)


def _saved(probe: TokenProbeBase, model, path, **meta):
    from activations.collect import model_fingerprint

    probe.save(path, metadata={**model_fingerprint(model), "model_ref": "tiny", **meta})
    return path


def test_monitor_warns_on_a_threshold_not_calibrated_on_responses(tiny_model, trained, tmp_path) -> None:
    probe = trained[0]
    prompt_cal = _saved(
        probe, tiny_model, tmp_path / "a", stream_threshold_1pct=0.3, stream_threshold_positions="prompt"
    )
    with pytest.warns(ThresholdPositionWarning, match="'prompt' tokens.*calibrate-monitor"):
        mon = StreamingMonitor.from_dir(prompt_cal, tiny_model)
    assert mon.threshold == 0.3 and mon.threshold_positions == "prompt"
    unknown = _saved(probe, tiny_model, tmp_path / "b", stream_threshold_1pct=0.3)
    with pytest.warns(ThresholdPositionWarning, match="records no calibration positions"):
        StreamingMonitor.from_dir(unknown, tiny_model)
    response_cal = _saved(
        probe, tiny_model, tmp_path / "c", stream_threshold_1pct=0.3, stream_threshold_positions="response"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", ThresholdPositionWarning)
        assert StreamingMonitor.from_dir(response_cal, tiny_model).threshold == 0.3
        assert StreamingMonitor.from_dir(prompt_cal, tiny_model, threshold=1.5).threshold == 1.5  # by hand
    # calibrate on benign generated responses with the monitor's own loop
    benign = [e.prompt for e in planted_dataset(n=60, seed=11) if e.label == 0]
    cal = mon.calibrate(benign, fpr=0.1, max_new_tokens=6, batch_size=7)
    assert cal.positions == "response" and cal.n == len(benign) and cal.realized_fpr <= 0.1
    assert mon.threshold == cal.threshold and mon.threshold_positions == "response"
    again = generate_tokens(tiny_model, [mon.prompt_ids(p) for p in benign], 6, probe=probe, hooks=[HOOK])
    stats = np.array([r.stopping_statistic for r in again])
    # regenerated in one batch (calibration batches by length): left padding moves scores by float noise, so
    # at most the stream sitting at the threshold may flip
    assert abs((stats > cal.threshold).mean() - cal.realized_fpr) <= 1 / len(benign) + 1e-12
    # kept in the probe's folder, it replaces the sweep's prompt-token threshold, silently
    cal.save(prompt_cal)
    assert StreamCalibration.load(prompt_cal) == cal
    with warnings.catch_warnings():
        warnings.simplefilter("error", ThresholdPositionWarning)
        back = StreamingMonitor.from_dir(prompt_cal, tiny_model)
    assert back.threshold == cal.threshold and back.threshold_positions == "response"


def test_calibrate_monitor_cli(tiny_model, trained, tmp_path, monkeypatch) -> None:
    from typer.testing import CliRunner

    import probes.stream
    from experiments.cli import app

    monkeypatch.setattr(probes.stream, "load_model", lambda name, **kw: tiny_model)
    d = _saved(
        trained[0], tiny_model, tmp_path / "p", stream_threshold_1pct=0.3, stream_threshold_positions="prompt"
    )
    planted_dataset(n=20, seed=4).to_jsonl(tmp_path / "benign.jsonl")
    runner = CliRunner()
    args = ["monitor", "--probe", str(d), "--prompt", "how to bake bread", "--max-new-tokens", "4"]
    before = runner.invoke(app, args)
    assert before.exit_code == 0, before.output
    assert "warning:" in before.output and "calibrate-monitor" in before.output
    benign = str(tmp_path / "benign.jsonl")
    cmd = ["calibrate-monitor", "--probe", str(d), "--data", benign, "--fpr", "0.1", "--max-new-tokens", "4"]
    res = runner.invoke(app, cmd)
    assert res.exit_code == 0, res.output
    assert "skipped" in res.output and (d / "stream_calibration.json").is_file()
    cal = StreamCalibration.load(d)
    assert cal.positions == "response" and cal.n == 10 and cal.max_new_tokens == 4
    after = runner.invoke(app, args)
    assert after.exit_code == 0, after.output
    assert "warning:" not in after.output and "calibrated on response tokens" in after.output


def test_generate_exchanges_and_errors(tiny_model, tmp_path, trained) -> None:
    from activations.data import load_jsonl
    from experiments.analysis.generation import generate_exchanges, write_exchanges

    ds = planted_dataset(n=6, seed=5)
    ex = generate_exchanges(tiny_model, ds, max_new_tokens=5, batch_size=4, progress=False)
    assert len(ex) == 6 and all(e.is_exchange for e in ex)
    assert [e.label for e in ex] == [e.label for e in ds]
    assert [e.prompt for e in ex] == [e.prompt for e in ds]
    back = load_jsonl(write_exchanges(ex, tmp_path / "ex.jsonl"))
    assert [(e.id, e.label, e.messages) for e in back] == [(e.id, e.label, e.messages) for e in ex]
    store = collect(
        tiny_model, back, tmp_path / "r", hooks=[HOOK], layers=None, positions="response", progress=False
    )
    assert store.n_sequences == 6
    probe = trained[0]
    with pytest.raises(MonitorError, match="threshold needs a probe"):
        generate_tokens(tiny_model, [[1, 2]], 2, threshold=0.0)
    with pytest.raises(MonitorError, match="non-empty prompt"):
        generate_tokens(tiny_model, [[]], 2)
    with pytest.raises(MonitorError, match="not a hook point"):
        StreamingMonitor(tiny_model, probe, hooks=["blocks.9.hook_resid_post"])


@pytest.mark.slow
def test_default_model_generate_cli_and_left_padding(tmp_path) -> None:
    """SmolLM2 (rotary positions): batched left-padded generation equals one prompt at a time, and
    ``probe-atlas generate`` writes exchanges that load back."""
    from typer.testing import CliRunner

    from activations.data import load_jsonl
    from activations.models import load_model
    from experiments.cli import app

    model = load_model("smollm2")
    tok = model.tokenizer
    prompts = [
        tok(
            tok.apply_chat_template(
                [{"role": "user", "content": c}], add_generation_prompt=True, tokenize=False
            ),
            add_special_tokens=False,
        )["input_ids"]
        for c in ("What is the capital of France?", "Hi")
    ]
    both = generate_tokens(model, prompts, 6)
    for p, r in zip(prompts, both, strict=True):
        assert generate_tokens(model, [p], 6)[0].ids == r.ids
    out = tmp_path / "ex.jsonl"
    res = CliRunner().invoke(
        app, ["generate", "--data", "builtin", "--out", str(out), "--n", "2", "--max-new-tokens", "4"]
    )
    assert res.exit_code == 0, res.output
    ex = load_jsonl(out)
    assert len(ex) == 2 and all(e.is_exchange and e.response for e in ex)
