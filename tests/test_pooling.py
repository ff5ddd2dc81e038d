from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from activations.pooling import POOL_KINDS, Pooling, PoolingError, pool_ragged, ragged_to_padded

STREAMABLE = [
    "mean",
    "max",
    "last",
    "ema0.5",
    "ema0.2",
    "window1",
    "window3",
    "window16",
    "softmax0.5",
    "softmax4",
]
ALL = [*STREAMABLE, "median"]


def _ragged(lengths: list[int], d: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    off = np.concatenate([[0], np.cumsum(lengths)])
    return torch.randn(int(off[-1]), d, generator=g, dtype=torch.float64), off


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 20), min_size=1, max_size=6),
    extra_pad=st.integers(0, 7),
    kind=st.sampled_from(ALL),
    seed=st.integers(0, 1000),
)
def test_ragged_equals_padded_for_any_padding(
    lengths: list[int], extra_pad: int, kind: str, seed: int
) -> None:
    v, off = _ragged(lengths, 3, seed)
    p = Pooling.parse(kind)
    r = p.ragged(v, off)
    padded, mask = ragged_to_padded(v, off)
    # extra padding of arbitrary values must not matter
    junk = torch.full((padded.shape[0], extra_pad, 3), 1e3, dtype=v.dtype)
    padded = torch.cat([padded, junk], 1)
    mask = torch.cat([mask, torch.zeros(mask.shape[0], extra_pad, dtype=torch.bool)], 1)
    torch.testing.assert_close(p(padded, mask), r)
    # left padding (mask not left-aligned) gives the same answer too
    flipped_vals, flipped_mask = [], []
    for i, n in enumerate(lengths):
        row = padded[i]
        flipped_vals.append(torch.cat([row[n:], row[:n]]))
        flipped_mask.append(torch.cat([mask[i, n:], mask[i, :n]]))
    torch.testing.assert_close(p(torch.stack(flipped_vals), torch.stack(flipped_mask)), r)


def test_known_answers() -> None:
    x = torch.tensor([[1.0, 3.0, 2.0, 0.0]]).unsqueeze(-1)  # [1, 4, 1]
    m = torch.ones(1, 4, dtype=torch.bool)
    assert Pooling.make("mean")(x, m).item() == pytest.approx(1.5)
    assert Pooling.make("max")(x, m).item() == 3.0
    assert Pooling.make("last")(x, m).item() == 0.0
    # EMA a=0.5: e = 1, 2, 2, 1 -> max 2
    assert Pooling.make("ema", alpha=0.5)(x, m).item() == pytest.approx(2.0)
    # window 2 means: 2, 2.5, 1 -> max 2.5
    assert Pooling.make("window", window=2)(x, m).item() == pytest.approx(2.5)
    # window longer than the sequence: the whole mean
    assert Pooling.make("window", window=16)(x, m).item() == pytest.approx(1.5)
    w = torch.softmax(torch.tensor([1.0, 3.0, 2.0, 0.0]), 0)
    assert Pooling.make("softmax", temperature=1.0)(x, m).item() == pytest.approx(
        float((w * x[0, :, 0]).sum()), rel=1e-6
    )


def test_softmax_limits_and_ema_alpha_one() -> None:
    v, off = _ragged([5, 9], 4, 0)
    torch.testing.assert_close(
        Pooling.make("softmax", temperature=1e6).ragged(v, off),
        Pooling.make("mean").ragged(v, off),
        atol=1e-4,
        rtol=0,
    )
    torch.testing.assert_close(
        Pooling.make("softmax", temperature=1e-4).ragged(v, off), Pooling.make("max").ragged(v, off)
    )
    torch.testing.assert_close(
        Pooling.make("ema", alpha=1.0).ragged(v, off), Pooling.make("max").ragged(v, off)
    )
    torch.testing.assert_close(
        Pooling.make("window", window=1).ragged(v, off), Pooling.make("max").ragged(v, off)
    )


def test_scores_1d_and_chunked_memmap(tmp_path) -> None:
    v, off = _ragged([3, 50, 7, 1, 12], 1, 3)
    scores = v[:, 0]
    for kind in ALL:
        a = pool_ragged(scores, off, kind, dtype=torch.float64)
        b = Pooling.parse(kind).ragged(scores, off)
        torch.testing.assert_close(a, b)
    arr = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float16, shape=tuple(v.shape))
    arr[:] = v.numpy().astype(np.float16)
    ro = np.load(tmp_path / "x.npy", mmap_mode="r")
    for kind in ALL:
        chunked = pool_ragged(ro, off, kind, chunk_tokens=8)
        whole = Pooling.parse(kind).ragged(torch.from_numpy(np.array(ro, dtype=np.float32)), off)
        torch.testing.assert_close(chunked, whole)


def test_parse_and_errors() -> None:
    assert Pooling.parse("ema0.25") == Pooling.make("ema", alpha=0.25)
    assert Pooling.parse("window:8").window == 8
    assert Pooling.parse({"kind": "softmax", "temperature": 2}).temperature == 2
    assert {Pooling.parse(k).kind for k in POOL_KINDS} == set(POOL_KINDS)
    with pytest.raises(PoolingError, match="unknown pooling"):
        Pooling.parse("mode")
    with pytest.raises(PoolingError, match="alpha"):
        Pooling.make("ema", alpha=0.0)
    with pytest.raises(PoolingError, match="no scored tokens"):
        Pooling.make("mean")(torch.zeros(2, 3, 1), torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool))
    with pytest.raises(PoolingError, match="offsets"):
        Pooling.make("mean").ragged(torch.zeros(5, 2), np.array([0, 2, 4]))
    with pytest.raises(PoolingError, match="unknown key"):
        Pooling.parse({"kind": "ema", "beta": 1})


@settings(max_examples=30, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 24), min_size=1, max_size=5),
    kind=st.sampled_from(STREAMABLE),
    seed=st.integers(0, 1000),
)
def test_streaming_shares_the_pooling_definition(lengths: list[int], kind: str, seed: int) -> None:
    """Per-token values streamed one at a time (a probe whose logit is the value itself): the end-of-stream
    score is the pooled value of the whole sequence for every kind, and the stopping statistic (max over the
    stream, end-of-stream step included) is the pooled value for max / EMA / window, also for sequences
    shorter than the window (scored at the end only)."""
    from probes.ragged import Ragged
    from probes.token import TokenProbe

    v, off = _ragged(lengths, 1, seed)
    v = v.float()
    probe = TokenProbe(kind)
    probe.load_state_dict({"coef": torch.ones(1), "intercept": torch.zeros(1)})
    rep = probe.replay(Ragged(v, off))
    pooled = Pooling.parse(kind).ragged(v[:, 0], off).double().numpy()
    np.testing.assert_allclose(rep.final, pooled, rtol=1e-5, atol=1e-5)
    if Pooling.parse(kind).kind in ("max", "ema", "window"):
        np.testing.assert_allclose(rep.stopping, pooled, rtol=1e-5, atol=1e-5)
    else:
        assert (rep.stopping >= pooled - 1e-5).all()
    p = Pooling.parse(kind)
    if p.kind == "window":  # no running score before the first full window
        for r in rep.running:
            assert np.isnan(r[: p.window - 1]).all() and not np.isnan(r[p.window - 1 :]).any()


def test_median_pooling() -> None:
    """The median of the scored tokens (the mean of the two middle values for an even count), element-wise,
    padded and ragged alike; costed at 3 FLOPs per element; no streaming form."""
    x = torch.tensor([[4.0, 1.0, 3.0, 2.0, 9.0], [5.0, -1.0, 7.0, 0.0, 0.0]]).unsqueeze(-1)
    m = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 1]], dtype=torch.bool)
    med = Pooling.parse("median")
    assert med.name == "median" and med.params() == {"kind": "median"}
    torch.testing.assert_close(med(x, m)[:, 0], torch.tensor([3.0, 2.5]))  # odd count; 5, -1, 7, 0 -> 2.5
    v, off = _ragged([1, 2, 7, 8], 3, 5)
    expect = np.stack([np.median(v[off[i] : off[i + 1]].numpy(), 0) for i in range(4)])
    np.testing.assert_allclose(med.ragged(v, off).numpy(), expect)
    assert med.flops_per_element == 3.0 and not med.streamable
    with pytest.raises(PoolingError, match="no streaming form"):
        med.init(2)
    from probes.cost import CostModel

    assert CostModel.pooling_flops("median", 4) == 12.0
