from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from activations.collect import collect
from activations.tiny import make_tiny_model, plant_direction
from experiments.viz.sae import latent_figure
from probes.io import load_probe
from probes.logistic import LogisticProbe
from probes.metrics import auroc
from sae.features import LatentEncoder, SparseLatents, encode_store, pooled_latents
from sae.load import SAEHookMismatchError, SAELoadError, check_hook, load_pretrained, load_sae, save_sae
from sae.probe import SAEFeatureProbe, sae_probe_cost, select_latents
from sae.train import SAETrainConfig, store_batches, train_sae
from sae.view import latent_table
from tests.conftest import HARM_WORDS, planted_dataset

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def planted_model():
    m = make_tiny_model(n_layers=3, d_model=32, n_heads=4, d_mlp=64, seed=0)
    direction = plant_direction(m, HARM_WORDS, scale=6.0)
    return m, direction


@pytest.fixture(scope="module")
def store(planted_model, tmp_path_factory):
    m, _ = planted_model
    ds = planted_dataset(n=120, seed=1)
    return collect(m, ds, tmp_path_factory.mktemp("sae") / "store", hooks=[HOOK], layers=None, progress=False)


@pytest.fixture(scope="module")
def trained(store, planted_model, tmp_path_factory):
    m, _ = planted_model
    cfg = SAETrainConfig(expansion_factor=4, n_tokens=15000, batch_size=256, l1_coefficient=1.0)
    folder = tmp_path_factory.mktemp("sae") / "sae"
    sae, report = train_sae(store, HOOK, cfg, folder, model=m, ce_sequences=4, progress=False)
    return sae, report, folder


def test_store_batches_cover_every_row_once_per_epoch(store) -> None:
    batches = list(store_batches(store, HOOK, 64, buffer_rows=256, chunk_rows=50, epochs=1, seed=3))
    got = torch.cat(batches)
    n = store.manifest["n_scored"]
    assert got.dtype == torch.float32 and all(b.shape == (64, 32) for b in batches)
    assert n - 64 < len(got) <= n  # only the last partial batch is held back
    # rows are shuffled, and no row is served more often than the store holds it
    want = np.asarray(store.activations(HOOK), dtype=np.float32)
    assert not np.array_equal(got.numpy(), want[: len(got)])
    have = Counter(r.tobytes() for r in want)
    served = Counter(r.tobytes() for r in got.numpy())
    assert all(c <= have[k] for k, c in served.items())


def test_training_reduces_reconstruction_error(trained) -> None:
    _sae, report, folder = trained
    assert report["explained_variance"] > 0.4
    assert report["explained_variance"] > report["init_explained_variance"] + 0.5
    assert report["relative_error"] < 0.8 * report["init_relative_error"]
    assert 0 < report["l0"] < report["d_sae"]
    assert (folder / "cfg.json").is_file() and (folder / "report.json").is_file()
    for k in ("ce_loss_clean", "ce_loss_spliced", "ce_loss_zero"):
        assert np.isfinite(report[k]) and report[k] > 0
    # splicing a good reconstruction hurts the loss less than zero-ablating the hook
    assert abs(report["ce_loss_spliced"] - report["ce_loss_clean"]) < abs(
        report["ce_loss_zero"] - report["ce_loss_clean"]
    )


def test_topk_sae_trains(store, tmp_path) -> None:
    cfg = SAETrainConfig(architecture="topk", expansion_factor=2, k=8, n_tokens=6000, batch_size=256)
    sae, report = train_sae(store, HOOK, cfg, tmp_path / "topk", progress=False)
    assert report["l0"] == pytest.approx(8.0, abs=0.5)
    assert report["explained_variance"] > report["init_explained_variance"]
    # the self-contained encoder reproduces sae-lens's top-k encoding, also for a selection of latents
    x = torch.from_numpy(np.asarray(store.activations(HOOK)[:50], dtype=np.float32))
    full = sae.encode(x).detach()
    enc = LatentEncoder.from_sae(sae, [3, 0, 7])
    torch.testing.assert_close(enc(x), full[:, [3, 0, 7]], rtol=1e-5, atol=1e-5)


def test_k1_probe_finds_the_planted_latent(trained, store, planted_model) -> None:
    sae, _, _ = trained
    _, direction = planted_model
    Z = pooled_latents(store, HOOK, sae, "max")
    y = torch.as_tensor(np.array(store.labels))
    sel = select_latents(Z, y, 1)
    lat = int(sel[0])
    assert auroc((y >= 0.5).int().numpy(), Z[:, lat].numpy()) > 0.99
    w_dec = sae.W_dec[lat].detach()
    assert float(w_dec @ direction / w_dec.norm()) > 0.6
    # the k=1 probe on it separates the classes, and its saved form scores raw tokens identically
    head = LogisticProbe(C=1.0, class_weight="balanced").fit(Z[:, sel], y)
    enc = LatentEncoder.from_sae(sae, sel)
    probe = SAEFeatureProbe.build(enc, head, k=1, pooling="max", hook=HOOK, sae_ref="x")
    assert probe.latent_ids.tolist() == [lat]
    s = probe.score_store(store).numpy()
    assert auroc((y >= 0.5).int().numpy(), s) > 0.99
    np.testing.assert_allclose(s, head.decision_function(Z[:, sel]).numpy(), rtol=1e-5, atol=1e-5)


def test_select_latents_orders_by_class_mean_difference() -> None:
    Z = torch.tensor([[0.0, 5.0, 1.0, 0.0], [0.0, 4.0, 1.0, 2.0], [3.0, 5.0, 0.0, 0.0], [3.0, 4.0, 0.0, 0.0]])
    y = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert select_latents(Z, y, 2).tolist() == [0, 2]  # |3|, then |-1| ties with latent 3 (|-1|): lower first
    assert select_latents(Z, y, None).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="exceeds"):
        select_latents(Z, y, 5)
    with pytest.raises(ValueError, match="both classes"):
        select_latents(Z, torch.zeros(4), 1)


def test_round_trip_through_sae_lens_format(trained, store, tmp_path) -> None:
    sae, _, _ = trained
    x = torch.from_numpy(np.asarray(store.activations(HOOK)[:64], dtype=np.float32))
    save_sae(sae, tmp_path / "copy", hook=HOOK)
    again = load_sae(tmp_path / "copy", hook=HOOK, store=store)
    assert torch.equal(sae.encode(x), again.encode(x))
    torch.testing.assert_close(LatentEncoder.from_sae(again)(x), sae.encode(x).detach(), rtol=1e-5, atol=1e-6)


def test_probe_save_load_round_trip(trained, store, tmp_path) -> None:
    sae, _, folder = trained
    Z = pooled_latents(store, HOOK, sae, "mean")
    y = torch.as_tensor(np.array(store.labels))
    sel = select_latents(Z, y, 8)
    probe = SAEFeatureProbe.build(
        LatentEncoder.from_sae(sae, sel),
        LogisticProbe(C=0.1).fit(Z[:, sel], y),
        k=8,
        pooling="mean",
        hook=HOOK,
        sae_ref=str(folder),
    )
    probe.save(tmp_path / "p")
    back = load_probe(tmp_path / "p")
    assert isinstance(back, SAEFeatureProbe) and back.get_config() == probe.get_config()
    torch.testing.assert_close(back.score_store(store), probe.score_store(store))
    with pytest.raises(ValueError, match="features"):
        back.decision_function(torch.zeros(3, 32))  # raw activations are not pooled latents


def test_hook_mismatch_is_a_clear_error(trained, store, tmp_path) -> None:
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    local = StandardSAE(
        StandardSAEConfig(d_in=32, d_sae=64, metadata=SAEMetadata(hook_name="blocks.0.hook_resid_post"))
    )
    with pytest.raises(SAEHookMismatchError, match=r"blocks\.0\.hook_resid_post.*blocks\.1\.hook_resid_post"):
        check_hook(local, HOOK)
    check_hook(local, "blocks.0.hook_resid_post")
    wide = StandardSAE(StandardSAEConfig(d_in=48, d_sae=64, metadata=SAEMetadata(hook_name=HOOK)))
    with pytest.raises(SAEHookMismatchError, match="48"):
        check_hook(wide, HOOK, store)
    save_sae(local, tmp_path / "local")
    with pytest.raises(SAEHookMismatchError, match="trained on hook"):
        load_sae(tmp_path / "local", hook=HOOK)
    with pytest.raises(SAELoadError, match=r"no cfg\.json"):
        load_sae(tmp_path / "nothing")


def test_pretrained_offline_and_unknown_release(monkeypatch) -> None:
    with pytest.raises(SAELoadError, match="unknown sae-lens release"):
        load_pretrained("no-such-release", "x")
    with pytest.raises(SAELoadError, match="has no SAE"):
        load_pretrained("gpt2-small-res-jb", "no-such-id")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SAELoadError, match="HF_HUB_OFFLINE"):
        load_sae("pretrained:gpt2-small-res-jb/blocks.8.hook_resid_pre")


def test_sparse_encoding_matches_dense(trained, store, tmp_path) -> None:
    sae, _, _ = trained
    sp = encode_store(store, HOOK, sae, tmp_path / "sparse", chunk_tokens=100)
    again = SparseLatents(tmp_path / "sparse")
    assert again.n_rows == sp.n_rows == store.manifest["n_scored"]
    x = torch.from_numpy(np.asarray(store.activations(HOOK)[:40], dtype=np.float32))
    torch.testing.assert_close(again.dense(0, 40), sae.encode(x).detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        again.pooled("max"), pooled_latents(store, HOOK, sae, "max"), rtol=1e-5, atol=1e-6
    )
    col = again.column(5)
    np.testing.assert_allclose(col[:40], sae.encode(x)[:, 5].detach().numpy(), rtol=1e-5, atol=1e-6)
    top = encode_store(store, HOOK, sae, tmp_path / "top2", top_k=2)
    assert (np.diff(top.indptr) <= 2).all()


def test_cost_of_sparse_and_dense_probes(trained) -> None:
    from probes.cost import CostModel

    sae, _, _ = trained
    cm = CostModel.from_config(make_tiny_model().cfg, context_len=64)
    k8 = sae_probe_cost(cm, 1, LatentEncoder.from_sae(sae, list(range(8))), "mean")
    dense = sae_probe_cost(cm, 1, LatentEncoder.from_sae(sae), "mean")
    assert k8.probe_flops == pytest.approx(2 * 32 * 8 + (2 * 8 + 1) / 64)
    assert dense.probe_flops == pytest.approx(2 * 32 * 128 + (2 * 128 + 1) / 64)
    assert k8.flops_per_token < dense.flops_per_token
    st = sae_probe_cost(cm, 1, LatentEncoder.from_sae(sae, list(range(8))), "mean", view="standalone")
    assert st.forward_flops == pytest.approx(cm.forward_flops_per_token(1, include_unembed=False))


def test_latent_view(trained, store, planted_model) -> None:
    sae, _, _ = trained
    m, _ = planted_model
    Z = pooled_latents(store, HOOK, sae, "max")
    y = torch.as_tensor(np.array(store.labels))
    sel = select_latents(Z, y, 4)
    probe = SAEFeatureProbe.build(
        LatentEncoder.from_sae(sae, sel),
        LogisticProbe(C=1.0).fit(Z[:, sel], y),
        k=4,
        pooling="max",
        hook=HOOK,
    )
    table = latent_table(probe, store, m.tokenizer, latents=[0], n_examples=6)
    assert len(table) == 6 and table.latent.iloc[0] == int(sel[0])
    # the top latent fires on the planted trigger words, in harmful prompts
    assert table.token.str.strip().isin(HARM_WORDS).all()
    assert (table.label == 1).all() and table.context.str.contains(r"\[\[").all()
    assert table.activation.is_monotonic_decreasing
    fig = latent_figure(latent_table(probe, store, m.tokenizer, n_latents=2, n_examples=3))
    assert len(fig.data) == 2


def test_sweep_with_sae_kinds(tmp_path, planted_model) -> None:
    from experiments.sweep.engine import run_sweep
    from tests.test_sweep import _spec

    m, _ = planted_model
    sae_params = {"l1_coefficient": 1.0, "train_tokens": 8000, "batch_size": 256, "ce_sequences": 2}
    spec = _spec(
        tmp_path,
        layers=[1],
        poolings=["max"],
        probes=[
            {"kind": "logistic_l2"},
            {"kind": "sae_k1", "params": sae_params},
            {"kind": "sae", "params": {**sae_params, "k": 8}},
            {"kind": "sae_dense", "params": sae_params},
        ],
        bootstrap=20,
    )
    df = run_sweep(spec, tmp_path / "out", base=tmp_path, model=m, progress=False)
    held = df[df.eval_set == "heldout"].set_index("probe")
    assert set(held.index) == {"logistic_l2", "sae_k1", "sae_k8", "sae_dense", "tfidf", "embedding"}
    assert held.loc["sae_k1", "auroc"] > 0.9
    assert held.loc["sae_k1", "flops_per_token"] < held.loc["sae_k8", "flops_per_token"]
    assert held.loc["sae_k8", "flops_per_token"] < held.loc["sae_dense", "flops_per_token"]
    assert held.loc["sae_k8", "n_features"] == 8 and held.loc["sae_dense", "n_features"] == 128
    assert np.isfinite(held.loc["sae_k1", "sae_explained_variance"])
    assert len(list((tmp_path / "out" / "saes").glob("*/cfg.json"))) == 1  # one SAE shared by every kind
    p = load_probe(held.loc["sae_k8", "probe_path"])
    assert isinstance(p, SAEFeatureProbe) and p.metadata_["hook_names"] == [HOOK]  # type: ignore[attr-defined]
