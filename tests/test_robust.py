"""fedpress.robust: capped shares, clipping, coordinate-wise robust statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fedpress.robust import AggregationRule, cap_shares, clip_factor, robust_combine, update_norm
from hypothesis import given, settings
from hypothesis import strategies as st


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 1e6), st.floats(1e6, 1e30)), min_size=1, max_size=20),
    st.floats(0.01, 1.0),
)
def test_cap_shares_bounds_every_share_and_keeps_the_order(weights, share):
    capped = cap_shares(weights, share)
    positive = [w for w in weights if w > 0]
    total = sum(capped)
    if positive and share * len(positive) > 1:
        assert max(capped) <= share * total * (1 + 1e-9)
        assert all(c <= w * (1 + 1e-12) for c, w in zip(capped, weights))  # only ever cut
        if max(weights) <= share * sum(weights):
            assert capped == pytest.approx(weights)  # nothing to cut
    elif positive:
        assert set(c for c, w in zip(capped, weights) if w > 0) == {min(positive)}
    assert [c > 0 for c in capped] == [w > 0 for w in weights]


def test_cap_shares_examples_and_errors():
    assert cap_shares([100, 1, 1], 0.5) == [2, 1, 1]
    assert cap_shares([2**64 - 1, 128, 128, 128], 0.25) == pytest.approx([128] * 4)
    assert cap_shares([1, 3, 0], 0.3) == [1.0, 1.0, 0.0]  # cannot give 2 clients 30% each: equal
    for bad in (0.0, 1.5, math.nan):
        with pytest.raises(ValueError):
            cap_shares([1.0], bad)
    with pytest.raises(ValueError):
        cap_shares([1.0, math.inf], 0.5)


def test_clip_factor_and_norm():
    update = {"a": np.full(4, 3.0, np.float32), "b": np.array([8.0], np.float32)}  # norm sqrt(36 + 64) = 10
    assert update_norm(update) == pytest.approx(10.0)
    assert clip_factor(update, 20.0) == 1.0 and clip_factor(update, 5.0) == pytest.approx(0.5)
    huge = {"a": np.full(4, 3e38, np.float32)}
    assert math.isfinite(update_norm(huge)) and clip_factor(huge, 1.0) == pytest.approx(1 / 6e38)
    assert clip_factor({"a": np.array([np.inf], np.float32)}, 1.0) == 0.0


def test_median_and_trimmed_mean_ignore_a_minority():
    rng = np.random.default_rng(0)
    honest = [{"w": rng.normal(1.0, 0.01, 50).astype(np.float32), "n": np.array(2.0)} for _ in range(6)]
    evil = [{"w": np.full(50, 3e38, np.float32), "n": np.array(-1e300)} for _ in range(2)]
    for rule in ("median", "trimmed:0.25"):
        out = robust_combine(AggregationRule.parse(rule), honest + evil)
        assert out["w"].dtype == np.float32 and out["n"].dtype == np.float64
        np.testing.assert_allclose(out["w"], 1.0, atol=0.05)
        assert out["n"] == pytest.approx(2.0)
    assert str(AggregationRule.parse("trimmed:0.1")) == "trimmed:0.1"
    with pytest.raises(ValueError, match="streamed"):
        robust_combine(AggregationRule.parse("mean"), honest)
    for bad in ("mode", "trimmed:x", "trimmed:0.5", "trimmed:-0.1"):
        with pytest.raises(ValueError):
            AggregationRule.parse(bad)
