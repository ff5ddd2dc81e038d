"""Fine-tuned final layers and the truncated-model classifier on tiny TransformerLens models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from activations.collect import collect
from activations.tiny import make_tiny_model
from probes.cost import CostModel
from probes.finetune import (
    FinetunedLayers,
    FinetuneError,
    Sequences,
    TruncatedModelClassifier,
    add_lora,
    load_sequence_classifier,
    sequences_from_store,
    token_sequences_from_store,
)
from probes.logistic import LogisticProbe
from probes.metrics import auroc
from tests.conftest import planted_dataset


def _parity(n: int, seed: int, d: int = 32, amp: float = 2.0) -> tuple[Sequences, np.ndarray]:
    """Residual sequences whose label is the parity of three ±1 directions: no linear read-out exists, and a
    random GELU block makes no cubic feature, so only training the block can solve it."""
    g = np.random.default_rng(seed)
    s = g.choice([-1, 1], (n, 3))
    lens = g.integers(4, 8, n)
    rows = [g.normal(0, 0.5, (lens[i], d)) + amp * np.pad(s[i], (0, d - 3)) for i in range(n)]
    vals = torch.tensor(np.concatenate(rows), dtype=torch.float32)
    off = np.concatenate([[0], np.cumsum(lens)])
    return Sequences(vals, off, torch.ones(len(vals), dtype=torch.bool)), (s.prod(1) > 0).astype(int)


def _mean_pool(s: Sequences) -> torch.Tensor:
    return torch.stack([s.values[s.offsets[i] : s.offsets[i + 1]].mean(0) for i in range(len(s))])


@pytest.fixture(scope="module")
def two_layer():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster than two contending ones
    yield make_tiny_model(n_layers=2, d_model=32, seed=0)
    torch.set_num_threads(threads)


def test_finetuning_one_layer_beats_a_linear_probe_on_a_nonlinear_task(two_layer) -> None:
    tr, ytr = _parity(240, 0)
    va, yva = _parity(120, 1)
    te, yte = _parity(200, 2)
    # a linear probe on the input, and one on the model's own last layer (the frozen copy, head only)
    lin_in = LogisticProbe(C=1.0).fit(_mean_pool(tr), ytr)
    auc_in = auroc(yte, lin_in.decision_function(_mean_pool(te)).numpy())
    frozen = FinetunedLayers(two_layer, k=1, mode="head", epochs=0).fit(tr, ytr)
    auc_frozen = auroc(yte, frozen.decision_function(te))
    ft = FinetunedLayers(two_layer, k=1, mode="full", lr=3e-3, head_lr=1e-2, epochs=6, token_budget=256)
    ft.fit(tr, ytr, val=va, val_y=yva)
    auc_ft = auroc(yte, ft.decision_function(te))
    assert max(auc_in, auc_frozen) < 0.75
    assert auc_ft > 0.9 and auc_ft > max(auc_in, auc_frozen) + 0.2
    assert ft.best_epoch_ >= 1 and len(ft.history_) == 7
    # the original model is untouched by fine-tuning its copy
    assert not any(p.grad is not None for p in two_layer.parameters())


def test_lora_starts_at_the_original_weights_and_trains_only_its_factors(two_layer) -> None:
    blk = __import__("copy").deepcopy(two_layer.blocks[1])
    x = torch.randn(3, 5, 32)
    before = blk(x)
    params = add_lora(blk, rank=2, alpha=4.0)
    assert torch.allclose(blk(x), before, atol=1e-6)  # B = 0 at the start
    assert {p.requires_grad for p in blk.parameters()} == {True, False}
    assert sum(p.numel() for p in blk.parameters() if p.requires_grad) == sum(p.numel() for p in params)
    with pytest.raises(FinetuneError, match="rank"):
        add_lora(blk, rank=0, alpha=1.0)


@pytest.mark.parametrize("pos", ["standard", "rotary"])
def test_copied_layers_reproduce_the_model_with_padding(pos: str) -> None:
    """The frozen copy of the last k blocks on cached residuals equals the model's own final-norm output,
    for padded batches (right padding keeps causal attention and rotary positions exact)."""
    m = make_tiny_model(n_layers=3, d_model=32, seed=1, positional_embedding_type=pos)
    ds = planted_dataset(n=8, seed=2)
    texts = [ex.text for ex in ds]
    toks = [m.to_tokens(t)[0] for t in texts]
    for k in (1, 2):
        clf = FinetunedLayers(m, k=k, mode="head")
        hook = f"blocks.{2 - k}.hook_resid_post"
        rows, refs = [], []
        for t in toks:
            _, cache = m.run_with_cache(t[None], names_filter=[hook, "ln_final.hook_normalized"])
            rows.append(cache[hook][0])
            refs.append(cache["ln_final.hook_normalized"][0].mean(0))
        off = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
        seqs = Sequences(torch.cat(rows), off, torch.ones(int(off[-1]), dtype=torch.bool))
        got = clf._scores(seqs, features=True)
        torch.testing.assert_close(got, torch.stack(refs), atol=1e-4, rtol=1e-4)
    # the truncated model from tokens equals the first m blocks + final norm of the model
    tr = TruncatedModelClassifier(m, n_layers=2, mode="head")
    refs = []
    for t in toks:
        _, cache = m.run_with_cache(t[None], names_filter=["blocks.1.hook_resid_post"])
        refs.append(m.ln_final(cache["blocks.1.hook_resid_post"])[0].mean(0))
    off = np.concatenate([[0], np.cumsum([len(t) for t in toks])])
    seqs = Sequences(torch.cat(toks), off, torch.ones(int(off[-1]), dtype=torch.bool))
    torch.testing.assert_close(tr._scores(seqs, features=True), torch.stack(refs), atol=1e-4, rtol=1e-4)


def test_store_inputs_save_load_and_errors(tmp_path, tiny_model) -> None:
    ds = planted_dataset(n=40, seed=4)
    hooks = ["blocks.1.hook_resid_post"]
    st = collect(tiny_model, ds, tmp_path / "all", hooks=hooks, layers=None, keep="all", progress=False)
    seqs = sequences_from_store(st, hooks[0])
    assert len(seqs) == 40 and int(seqs.scored.sum()) < len(seqs.values)  # prompt tokens of all tokens
    toks = token_sequences_from_store(st)
    assert np.array_equal(toks.lengths, seqs.lengths) and torch.equal(toks.scored, seqs.scored)
    y = np.array(st.labels)
    clf = FinetunedLayers(tiny_model, k=1, mode="lora", rank=2, epochs=2, lr=1e-2).fit(
        seqs, y, val=seqs, val_y=y
    )
    s = clf.decision_function(seqs)
    assert auroc(y, s) > 0.9  # the planted trigger word
    clf.save(tmp_path / "clf", {"model_id": "tiny"})
    back = load_sequence_classifier(tmp_path / "clf", tiny_model)
    np.testing.assert_allclose(back.decision_function(seqs), s, rtol=1e-5, atol=1e-5)
    tr = TruncatedModelClassifier(tiny_model, n_layers=1, epochs=1, lr=1e-3).fit(toks, y)
    with pytest.raises(FinetuneError, match="token ids"):
        tr.decision_function(seqs)
    # a store that keeps only the scored tokens cannot feed copied attention layers
    part = collect(tiny_model, ds, tmp_path / "part", hooks=hooks, layers=None, progress=False)
    with pytest.raises(FinetuneError, match="keep='all'"):
        sequences_from_store(part, hooks[0])
    with pytest.raises(FinetuneError, match="one class"):
        FinetunedLayers(tiny_model, k=1).fit(seqs, np.ones(len(seqs)))
    with pytest.raises(FinetuneError, match="below"):
        FinetunedLayers(tiny_model, k=3).fit(seqs, y)
    with pytest.raises(FinetuneError, match="labels"):
        FinetunedLayers(tiny_model, k=1).fit(seqs, y[:-1])
    with pytest.raises(FinetuneError, match="not a saved"):
        load_sequence_classifier(tmp_path, tiny_model)


def test_costs_sum_to_the_model_forward(tiny_model) -> None:
    cm = CostModel.from_config(tiny_model.cfg, context_len=64)
    L = cm.n_layers
    for k in (1, 2):
        marginal, standalone = FinetunedLayers(k=k).cost(cm)
        blocks = sum(b.total for b in cm.blocks[L - k :])
        head = 2 * cm.d_model + 1
        assert marginal.flops_per_token == pytest.approx(blocks + cm.final_norm + head + 1)  # + mean pooling
        # frozen part + copied part = the whole model without its unembedding, plus the head
        assert standalone.flops_per_token == pytest.approx(
            cm.forward_flops_per_token(None, include_unembed=False) + cm.final_norm + head + 1
        )
    m1, s1 = TruncatedModelClassifier(n_layers=1).cost(cm)
    assert (
        m1.flops_per_token
        == s1.flops_per_token
        == pytest.approx(
            cm.forward_flops_per_token(0, include_unembed=False) + cm.final_norm + 2 * cm.d_model + 1 + 1
        )
    )
