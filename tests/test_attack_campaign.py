"""The attack campaign (probe × attack × round), the z-scored ensemble target, adversarial-training rounds,
transfer, figures and the ``probe-atlas attack`` command's bad input, on a tiny model with a planted
direction."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from activations.tiny import make_tiny_model, plant_direction
from experiments.analysis.attacks import adapt
from experiments.analysis.attacks.campaign import (
    ATTACK_COLUMNS,
    CampaignConfig,
    Refitter,
    ensemble_target,
    fit_affine_target,
    run_campaign,
)
from experiments.analysis.attacks.objective import AttackError
from experiments.analysis.attacks.transfer import score_prompts
from experiments.viz.attacks import attack_figures, build_attack_report, robustness_points
from tests.conftest import HARM_WORDS, planted_dataset

HOOK_LAYERS = (0, 1)
FAST = {"suffix_len": 3, "target_tokens": 4, "batch_size": 8, "n_candidates": 4, "top_k": 8}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    m = make_tiny_model(n_layers=3, d_model=32, n_heads=4, d_mlp=64, seed=0)
    plant_direction(m, HARM_WORDS, scale=6.0)
    return m


def _split(exs, split):
    from dataclasses import replace

    return [replace(e, split=split) for e in exs]


@pytest.fixture(scope="module")
def data():
    from activations.data import PromptDataset

    ex = list(planted_dataset(120, seed=1))
    train = PromptDataset(_split(ex[:48], "train"), name="train")
    val = PromptDataset(_split(ex[48:72], "val"), name="val")
    test = _split(ex[72:], "test")
    control = [e for e in planted_dataset(240, seed=2, name="ctrl") if e.label == 0]
    return train, val, test, control


@pytest.fixture(scope="module")
def fitted(model, data):
    train, val, _, _ = data
    cache: dict = {}
    out = {}
    for kind in ("logistic", "lda", "multilayer"):
        out[kind] = fit_affine_target(model, kind, train, val, HOOK_LAYERS, name=kind, cache=cache)[0]
    return out, cache


def test_fitted_families_select_on_validation_and_adapt_exactly(model, data, fitted):
    targets, _ = fitted
    _, _, test, _ = data
    for t in targets.values():
        assert t.meta["val_auroc"] > 0.9  # the planted direction is easy
        s = score_prompts(model, [t], test)[t.name]
        y = np.array([e.label for e in test])
        assert s[y == 1].mean() > s[y == 0].mean()
    assert targets["multilayer"].hooks == tuple(f"blocks.{i}.hook_resid_post" for i in HOOK_LAYERS)


def test_the_ensemble_target_is_the_zscored_average_of_its_members(model, data, fitted):
    targets, _ = fitted
    _, val, test, _ = data
    members = [targets["logistic"], targets["lda"]]
    ens = ensemble_target(members, list(val), model)
    sv = score_prompts(model, members, list(val))
    st = score_prompts(model, [*members, ens], test)
    want = sum(0.5 * (st[m.name] - sv[m.name].mean()) / sv[m.name].std() for m in members)
    np.testing.assert_allclose(st["ensemble"], want, rtol=1e-4, atol=1e-4)
    with pytest.raises(AttackError, match="two members"):
        ensemble_target(members[:1], list(val), model)


def test_campaign_writes_one_row_per_probe_attack_round_and_refits_on_train_only(
    model, data, fitted, tmp_path
):
    targets, cache = fitted
    train, val, test, control = data
    seen: list = []

    def refit(extra):
        seen.append(extra)
        return fit_affine_target(
            model, "logistic", train, val, HOOK_LAYERS, name="logistic", extra=extra, cache=cache
        )[0]

    cfg = CampaignConfig(
        attacks=("embedding", "suffix", "transforms"),
        steps=2,
        rounds=1,
        adv_train_n=4,
        transforms=("roleplay",),
        suffix_len=FAST["suffix_len"],
        target_tokens=FAST["target_tokens"],
        n_candidates=FAST["n_candidates"],
        top_k=FAST["top_k"],
        batch_size=8,
    )
    harmful = [e for e in test if e.label == 1][:6]
    df = run_campaign(
        model,
        [targets["logistic"], targets["multilayer"]],
        harmful,
        control,
        tmp_path / "out",
        cfg,
        refitters={"logistic": Refitter(refit, train, val)},
        progress=False,
        log=lambda s: None,
    )
    on_disk = pd.read_parquet(tmp_path / "out" / "attack.parquet")
    assert list(on_disk.columns) == ATTACK_COLUMNS
    pd.testing.assert_frame_equal(on_disk, df)
    r0 = df[df["round"] == 0]
    assert set(zip(r0["probe"], r0["attack"], strict=True)) == {
        (p, a) for p in ("logistic", "multilayer") for a in ("embedding", "suffix", "transform:roleplay")
    }
    # only the refittable probe gets a round 1, attacked again
    r1 = df[df["round"] == 1]
    assert set(r1["probe"]) == {"logistic"} and {"embedding", "suffix"} <= set(r1["attack"])
    assert (df["n"] == len(harmful)).all()
    adaptive = df[df["attack"].isin(["embedding", "suffix"])]
    assert (adaptive["flops"] > 0).all() and (adaptive["steps"] >= 1).all()
    assert adaptive["behaviour_kept"].between(0, 1).all()
    # adversarial data: train split only, attacked harmful label 1, harmless carriers label 0
    (extra,) = seen
    assert {e.split for e in extra} == {"train"}
    assert {e.label for e in extra} == {0.0, 1.0}
    test_ids = {e.id for e in test}
    assert not any(e.meta_dict().get("source_example") in test_ids for e in extra)
    # replayable suffixes and the transfer matrix (same probe: the attack's own final score)
    assert (tmp_path / "out" / "suffixes" / "r0" / "suffix" / "logistic").is_dir()
    tr = pd.read_parquet(tmp_path / "out" / "transfer.parquet")
    same = tr[(tr["source_probe"] == tr["target_probe"]) & (tr["method"] == "suffix")]
    for _, r in same.iterrows():
        own = r0[(r0["probe"] == r["source_probe"]) & (r0["attack"] == "suffix")]["tpr_attacked"].item()
        assert r["tpr_attacked"] == pytest.approx(own)
    page = build_attack_report(tmp_path / "out").read_text()
    assert "Transfer" in page and "robustness_frontier" in page
    figs = attack_figures(tmp_path / "out")
    assert set(figs) == {"attack_rounds", "robustness_frontier", "transfer_heatmap"}
    pts = robustness_points(df, 0)
    assert set(pts["probe"]) == {"logistic", "multilayer"}
    assert (
        pts["tpr_attacked"] <= r0.groupby("probe")["tpr_attacked"].max().loc[pts["probe"]].to_numpy()
    ).all()
    # the multi-layer probe reads a deeper layer: it costs more per token
    cost = df.groupby("probe")["probe_flops_per_token"].first()
    assert cost["multilayer"] >= cost["logistic"] > 0


def test_bad_input_writes_nothing(model, data, fitted, tmp_path):
    targets, _ = fitted
    _, _, test, control = data
    harmful = [e for e in test if e.label == 1][:2]
    harmless = [e for e in test if e.label == 0][:2]
    out = tmp_path / "bad"
    t = targets["logistic"]
    cases = [
        ([t], [], CampaignConfig(steps=1), "empty"),
        ([t], harmless, CampaignConfig(steps=1), "all harmless"),
        ([t], harmful, CampaignConfig(steps=0), "steps must be"),
        ([t], harmful, CampaignConfig(steps=1, attacks=("nope",)), "--attack"),
        ([], harmful, CampaignConfig(steps=1), "no probes"),
    ]
    foreign = adapt(
        t.source, hooks=list(t.hooks), fingerprint={"model_id": "other-model", "weights_hash": "0"}
    )
    cases.append(([foreign], harmful, CampaignConfig(steps=1), "other-model"))
    for tg, d, cfg, msg in cases:
        with pytest.raises(AttackError, match=msg):
            run_campaign(model, tg, d, control, out, cfg, progress=False, log=lambda s: None)
        assert not out.exists()
    with pytest.raises(AttackError, match="too few"):
        run_campaign(
            model,
            [t],
            harmful,
            control[:20],
            out,
            CampaignConfig(steps=1),
            progress=False,
            log=lambda s: None,
        )
    assert not out.exists()


def test_cli_bad_input_is_one_line_with_status_2(tmp_path):
    from experiments.cli import app

    r = CliRunner().invoke(
        app, ["attack", "--out", str(tmp_path / "o"), "--steps", "0", "--train", "builtin"]
    )
    assert r.exit_code == 2 and "steps must be" in r.output
    r = CliRunner().invoke(app, ["attack", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--probe" in r.output
    assert not (tmp_path / "o").exists()


def test_best_of_takes_each_familys_val_chosen_probe(tmp_path):
    from experiments.analysis.attacks import best_per_family

    sweep = tmp_path / "sweep"
    (sweep / "probes").mkdir(parents=True)
    rows = [
        ("a", "logistic_l2", 0.90, 0.99),
        ("b", "logistic_l2", 0.95, 0.50),  # best on validation, worse on test: chosen
        ("c", "diffmeans", 0.80, 0.90),
        ("d", "tfidf", 0.70, 0.70),
        ("e", "diffmeans", 0.85, 0.10),
    ]
    df = pd.DataFrame(
        [
            {"run_id": r, "probe": k, "val_auroc": v, "auroc": t, "probe_path": str(sweep / "probes" / r)}
            for r, k, v, t in rows
        ]
    )
    df.to_parquet(sweep / "results.parquet")
    assert [p.name for p in best_per_family(sweep)] == ["e", "b", "d"]
    with pytest.raises(AttackError, match="not a sweep folder"):
        best_per_family(tmp_path)
