"""CostModel: modelled forward FLOPs cross-checked against torch's FLOP counter on tiny TL models.

``torch.utils.flop_counter.FlopCounterMode`` counts only matmul-like ops (mm, addmm, bmm, sdpa, ...); norms,
softmax, activations, rotary, biases and residual adds are excluded, so the comparison is against
``forward_flops_per_token(matmul_only=True)``. TransformerLens's eager attention computes the full
``n × n`` score matrix and masks it, so the counter agrees with ``attention="full"`` accounting; the default
``"causal"`` accounting (about ``(n+1)/2`` keys per query) is lower by exactly the masked-out half.
"""

import itertools
import math
import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformer_lens import HookedTransformer, HookedTransformerConfig

from activations.pooling import Pooling
from probes.cost import CostModel, ProbeCost, cascade_expected_flops

CTX = 64

BASE = dict(n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=256, n_ctx=128, d_vocab=500)
CONFIGS = {
    "gelu_ln": dict(BASE, act_fn="gelu", normalization_type="LN"),
    "llama_gqa": dict(
        BASE,
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        gated_mlp=True,
        n_key_value_heads=2,
    ),
    "attn_only": dict(BASE, act_fn="gelu", normalization_type="LN", attn_only=True),
    "gemma_local": dict(
        BASE,
        n_layers=3,
        d_head=32,  # n_heads·d_head != d_model
        n_key_value_heads=1,
        act_fn="gelu_pytorch_tanh",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        gated_mlp=True,
        use_local_attn=True,
        attn_types=["local", "global", "local"],
        window_size=8,
        use_normalization_before_and_after=True,
        use_qk_norm=True,
        final_rms=True,
    ),
}

SMOLLM2 = dict(
    n_layers=30,
    d_model=576,
    n_heads=9,
    n_key_value_heads=3,
    d_head=64,
    d_mlp=1536,
    d_vocab=49152,
    n_ctx=2048,
    gated_mlp=True,
    act_fn="silu",
    normalization_type="RMS",
    positional_embedding_type="rotary",
)


def _cfg(kw: dict) -> HookedTransformerConfig:
    return HookedTransformerConfig(**kw, device="cpu", seed=0)


@pytest.fixture(scope="module")
def models() -> dict[str, HookedTransformer]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {name: HookedTransformer(_cfg(kw)).eval() for name, kw in CONFIGS.items()}


def _counted(model: HookedTransformer, n_tokens: int, stop_at_layer: int | None = None) -> int:
    tokens = torch.randint(0, model.cfg.d_vocab, (1, n_tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(tokens, stop_at_layer=stop_at_layer)
    return counter.get_total_flops()


# ------------------------------------------------------------------------------- counted vs modelled
@pytest.mark.parametrize("name", list(CONFIGS))
def test_full_forward_matches_flop_counter(models: dict[str, HookedTransformer], name: str) -> None:
    model = models[name]
    counted = _counted(model, CTX) / CTX
    full = CostModel.from_config(model.cfg, context_len=CTX, attention="full")
    assert full.forward_flops_per_token(matmul_only=True) == pytest.approx(counted, rel=1e-9)
    # Everything the counter leaves out (norms, softmax, activations, ...) is a small share.
    assert full.full_forward_flops_per_token() == pytest.approx(counted, rel=0.05)
    # Causal accounting: the counted figure minus the masked half of the score matrix, exactly.
    causal = CostModel.from_config(model.cfg, context_len=CTX)
    masked = sum(
        4.0 * model.cfg.n_heads * model.cfg.d_head * (CTX - causal.attended_positions(layer))
        for layer in range(model.cfg.n_layers)
    )
    assert causal.forward_flops_per_token(matmul_only=True) == pytest.approx(counted - masked, rel=1e-9)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_up_to_layer_matches_stop_at_layer(models: dict[str, HookedTransformer], name: str) -> None:
    model = models[name]
    cm = CostModel.from_config(model.cfg, context_len=CTX, attention="full")
    for layer in range(model.cfg.n_layers):
        counted = _counted(model, CTX, stop_at_layer=layer + 1) / CTX
        assert cm.forward_flops_per_token(layer, matmul_only=True) == pytest.approx(counted, rel=1e-9)


def test_from_model_dict_and_config_agree(models: dict[str, HookedTransformer]) -> None:
    model = models["llama_gqa"]
    a = CostModel.from_config(model)
    b = CostModel.from_config(model.cfg)
    c = CostModel.from_config(CONFIGS["llama_gqa"])
    assert a == b == c
    assert a.context_len == 512
    with pytest.raises(TypeError):
        CostModel.from_config(object())


# --------------------------------------------------------------------------------------- structure
def test_parts_by_hand_gqa_gated() -> None:
    cm = CostModel.from_config(CONFIGS["llama_gqa"], context_len=CTX)
    b = cm.blocks[0]
    assert b.q_proj == b.o_proj == 2 * 64 * 64
    assert b.k_proj == b.v_proj == 2 * 64 * 2 * 16  # 2 KV heads
    assert b.mlp == 3 * 2 * 64 * 256  # gated: 3 matrices
    assert b.attended == (CTX + 1) / 2
    assert b.attn_scores == b.attn_mix == 2 * 4 * 16 * (CTX + 1) / 2
    assert cm.unembed == 2 * 64 * 500 + 500
    assert cm.embed == 0.0  # rotary: no positional embedding add
    gelu = CostModel.from_config(CONFIGS["gelu_ln"], context_len=CTX)
    assert gelu.blocks[0].mlp == 2 * 2 * 64 * 256
    assert gelu.blocks[0].k_proj == 2 * 64 * 64
    assert CostModel.from_config(CONFIGS["attn_only"]).blocks[0].mlp == 0.0
    assert sum(cm.breakdown().values()) == pytest.approx(cm.full_forward_flops_per_token())


def test_local_attention_window() -> None:
    cm = CostModel.from_config(CONFIGS["gemma_local"], context_len=CTX)
    local, glob = cm.blocks[0], cm.blocks[1]
    assert (local.attn_type, glob.attn_type) == ("local", "global")
    w = 8
    assert local.attended == pytest.approx((w * (w + 1) / 2 + (CTX - w) * w) / CTX)
    assert glob.attended == (CTX + 1) / 2
    assert local.attention < glob.attention
    assert cm.attended_positions(0, position=3) == 3
    assert cm.attended_positions(0, position=50) == w
    assert cm.attended_positions(1, position=50) == 50
    # A window longer than the context is the same as global attention.
    short = CostModel.from_config(CONFIGS["gemma_local"], context_len=w)
    assert short.blocks[0].attended == short.blocks[1].attended == (w + 1) / 2


def test_context_length_scaling() -> None:
    cm = CostModel.from_config(CONFIGS["gelu_ln"], context_len=128)
    longer = cm.with_context_len(1024)
    assert longer.full_forward_flops_per_token() > cm.full_forward_flops_per_token()
    d_attn = longer.blocks[0].attention - cm.blocks[0].attention
    assert d_attn == pytest.approx(4 * 4 * 16 * (1025 - 129) / 2)
    assert cm.with_attention("full").blocks[0].attended == 128
    with pytest.raises(ValueError):
        CostModel.from_config(CONFIGS["gelu_ln"], context_len=0)


def test_up_to_layer_monotone_and_bounded() -> None:
    cm = CostModel.from_config(SMOLLM2)
    vals = [cm.forward_flops_per_token(layer) for layer in range(cm.n_layers)]
    assert all(a < b for a, b in itertools.pairwise(vals))
    assert vals[-1] == cm.forward_flops_per_token(None, include_unembed=False)
    assert vals[-1] < cm.full_forward_flops_per_token()
    assert cm.forward_flops_per_token(-1) == vals[-1]
    with pytest.raises(IndexError):
        cm.forward_flops_per_token(30)


# -------------------------------------------------------------------------------------- SmolLM2 sizes
def test_smollm2_full_forward_and_linear_probe_overhead() -> None:
    cfg = _cfg(SMOLLM2)
    cm = CostModel.from_config(cfg, context_len=512)
    full = cm.full_forward_flops_per_token()
    # ≈ 2·(block weights) + attention over ~256 keys + unembedding (+ small element-wise terms). (TL's
    # cfg.n_params ignores grouped-query attention, so count the weights here.)
    weights = 30 * (2 * 576 * 576 + 2 * 576 * 3 * 64 + 3 * 576 * 1536)
    attn = 30 * 4 * 9 * 64 * 513 / 2
    approx = 2 * weights + attn + 2 * 576 * 49152
    assert full == pytest.approx(approx, rel=0.01)
    assert 2.8e8 < full < 2.95e8
    probe = cm.probe_cost(15, pooling="ema")
    assert isinstance(probe, ProbeCost) and probe.view == "marginal"
    assert probe.flops_per_token == 2 * 576 + 1 + 3
    assert probe.overhead_pct < 0.01
    assert probe.overhead_pct == pytest.approx(100 * probe.flops_per_token / full)
    standalone = cm.probe_cost(15, pooling="ema", view="standalone")
    assert standalone.forward_flops == cm.forward_flops_per_token(15)
    assert 40 < standalone.overhead_pct < 60  # half the blocks, no unembedding
    all_layers = cm.probe_cost(list(range(30)), pooling="window")
    assert all_layers.probe_flops == 2 * 576 * 30 + 1
    assert all_layers.overhead_pct < 0.05
    pooled_first = cm.probe_cost(15, pooling="mean", order="pool_then_probe")
    assert pooled_first.pooling_flops == 576 and pooled_first.probe_flops == pytest.approx(1153 / 512)


def test_probe_family_costs() -> None:
    cm = CostModel.from_config(SMOLLM2)
    assert cm.linear_probe_flops() == 2 * 576 + 1
    assert cm.linear_probe_flops(100, n_layers_read=3) == 601
    assert cm.sae_encoder_flops(None, 16384) == 2 * 576 * 16384
    assert cm.sae_encoder_flops(576, 16384, k_selected=32) == 2 * 576 * 32
    assert cm.overhead_pct(cm.sae_encoder_flops(None, 16384)) > 1  # a full SAE read is not negligible
    ft0 = cm.finetuned_layers_flops(0)
    ft1 = cm.finetuned_layers_flops(1)
    assert ft1 - ft0 == pytest.approx(cm.blocks[-1].total)
    assert cm.finetuned_layers_flops(30) == pytest.approx(
        cm.forward_flops_per_token(None, include_unembed=False) - cm.embed + ft0
    )
    assert cm.standalone_flops(cm) == cm.full_forward_flops_per_token()
    small = cm.standalone_flops(CONFIGS["gelu_ln"])
    assert small == CostModel.from_config(CONFIGS["gelu_ln"], 512).full_forward_flops_per_token()
    assert cm.standalone_flops(CONFIGS["gelu_ln"], include_unembed=False) < small
    with pytest.raises(ValueError):
        cm.finetuned_layers_flops(31)


@pytest.mark.parametrize(
    ("kind", "per_element"),
    [("mean", 1), ("max", 1), ("ema", 3), ("window", 2), ("sliding_window", 2), ("softmax", 4), ("last", 0)],
)
def test_pooling_flops(kind: str, per_element: float) -> None:
    assert CostModel.pooling_flops(kind, 576) == per_element * 576
    assert CostModel.pooling_flops(kind) == per_element


def test_pooling_flops_specs() -> None:
    assert CostModel.pooling_flops("ema0.5", 10) == 30
    assert CostModel.pooling_flops(Pooling.make("window", window=16), 10) == 20
    assert CostModel.pooling_flops("window", 10, window=4) == 20
    with pytest.raises(ValueError):
        CostModel.pooling_flops("no_such_pooling", 10)


# -------------------------------------------------------------------------------------------- cascade
def test_cascade_arithmetic() -> None:
    assert cascade_expected_flops(10.0, 1000.0, 0.05) == pytest.approx(60.0)
    assert cascade_expected_flops(10.0, 1000.0, 0.0) == 10.0
    assert cascade_expected_flops(10.0, 1000.0, 1.0) == 1010.0
    cm = CostModel.from_config(SMOLLM2)
    probe = cm.probe_cost(15)
    expensive = cm.finetuned_layers_flops(4)
    expected = cascade_expected_flops(probe, expensive, 0.1)
    assert expected == pytest.approx(probe.flops_per_token + 0.1 * expensive)
    assert math.isclose(
        cm.overhead_pct(expected), cm.overhead_pct(probe.flops_per_token) + 0.1 * cm.overhead_pct(expensive)
    )
    with pytest.raises(ValueError):
        cascade_expected_flops(1.0, 2.0, 1.5)
