"""ops.threshold_topk: sampled-threshold selection of about ratio*n largest magnitudes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fedpress import ops
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

LARGE_N = 300_007  # >= 2^17: the sampled path
RATIOS = (0.001, 0.01, 0.05, 0.3)
SIZES = (1001, 65_537, 1 << 17, LARGE_N)
THRESHOLD_SAMPLE_BLOCKS = 4096


def target_of(ratio: float, n: int) -> int:
    """round(ratio * n), halves rounded up (as the kernel's llround does)."""
    return min(n, math.floor(ratio * n + 0.5))


def band_of(target: int) -> tuple[int, int]:
    lo, hi = math.ceil(0.9 * target), math.floor(1.1 * target)
    if lo >= hi:  # an empty (or one-point) band: exactly the target
        return target, target
    return lo, hi


def check_selection(x: np.ndarray, ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    x32 = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    n = x32.size
    idx, val = ops.threshold_topk(x, ratio, seed=seed)
    assert idx.dtype == np.uint32 and val.dtype == np.float32
    assert idx.ndim == 1 and idx.shape == val.shape
    target = target_of(ratio, n)
    lo, hi = band_of(target)
    assert lo <= idx.size <= hi, f"selected {idx.size}, target {target}, band [{lo}, {hi}]"
    if idx.size > 1:
        assert np.all(np.diff(idx.astype(np.int64)) > 0), "indices not strictly ascending"
    if idx.size:
        assert int(idx[-1]) < n
    assert val.tobytes() == x32[idx].tobytes()
    # Everything selected is at least as large as everything left out.
    selected = np.zeros(n, dtype=bool)
    selected[idx] = True
    mag = np.abs(x32)
    if 0 < idx.size < n:
        assert mag[selected].min() >= mag[~selected].max()
    return idx, val


# ------------------------------------------------------------------ band/order --
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("n", SIZES)
def test_count_in_band_and_largest_selected(make_input, distribution: str, n: int, ratio: float) -> None:
    check_selection(make_input(distribution, n), ratio, seed=12345)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ratio", RATIOS)
def test_many_seeds_large_normal(make_input, seed: int, ratio: float) -> None:
    check_selection(make_input("normal", LARGE_N), ratio, seed=seed)


@pytest.mark.parametrize("run", [16, 256, 8192])
@pytest.mark.parametrize("ratio", RATIOS)
def test_run_structured_values(run: int, ratio: float) -> None:
    # Constant runs make the block sample strongly correlated: misjudged
    # thresholds, so the fix-up paths run.
    rng = np.random.default_rng(run)
    per_run = rng.standard_t(3, LARGE_N // run + 1).astype(np.float32)
    x = np.repeat(per_run, run)[:LARGE_N].copy()
    for seed in range(4):
        check_selection(x, ratio, seed=seed)


@pytest.mark.parametrize("ratio", RATIOS)
def test_three_magnitudes_with_ties(ratio: float) -> None:
    rng = np.random.default_rng(3)
    mags = np.array([1e-3, 1.0, 1e3], dtype=np.float32)
    x = rng.choice(mags, LARGE_N, p=[0.95, 0.04, 0.01]) * rng.choice(np.array([-1, 1], dtype=np.float32), LARGE_N)
    check_selection(x.astype(np.float32), ratio, seed=9)


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("planted", ["small", "large"])
def test_adversarial_sample(sampled_positions, ratio: float, planted: str) -> None:
    # White-box: the sampled elements hold values unlike the rest of x, so the
    # estimated threshold is far off and the exact fix-up must take over.
    seed = 4242
    mask = sampled_positions(LARGE_N, THRESHOLD_SAMPLE_BLOCKS, seed)
    rng = np.random.default_rng(5)
    x = rng.standard_normal(LARGE_N).astype(np.float32)
    scale = np.float32(1e-3) if planted == "small" else np.float32(1e3)
    x[mask] *= scale
    check_selection(x, ratio, seed=seed)


def test_concentrated_region() -> None:
    rng = np.random.default_rng(8)
    x = (rng.standard_normal(LARGE_N) * 1e-6).astype(np.float32)
    x[1000:1300] = (rng.standard_normal(300) * 1e6).astype(np.float32)
    for ratio in RATIOS:
        idx, _ = check_selection(x, ratio, seed=1)
        assert np.count_nonzero((idx >= 1000) & (idx < 1300)) == min(idx.size, 300)


# ------------------------------------------------------------------ edge cases --
def test_ratio_zero_and_one(make_input) -> None:
    for n in (1, 1001, LARGE_N):
        x = make_input("normal", n)
        idx, val = ops.threshold_topk(x, 0.0, seed=1)
        assert idx.size == 0 and val.size == 0
        idx, val = ops.threshold_topk(x, 1.0, seed=1)
        np.testing.assert_array_equal(idx, np.arange(n, dtype=np.uint32))
        assert val.tobytes() == x.tobytes()


def test_empty_input() -> None:
    idx, val = ops.threshold_topk(np.zeros(0, dtype=np.float32), 0.5, seed=1)
    assert idx.size == 0 and val.size == 0


def test_length_one(length_one_input: np.ndarray) -> None:
    check_selection(length_one_input, 0.3, seed=1)
    check_selection(length_one_input, 0.7, seed=1)


@pytest.mark.parametrize("target", [1, 2, 5, 9])
def test_tiny_target_on_large_input_is_exact(make_input, target: int) -> None:
    # For target <= 9 the +-10% band holds at most one count: exactly the target.
    x = make_input("student_t", LARGE_N)
    ratio = target / LARGE_N
    assert target_of(ratio, LARGE_N) == target
    idx, _ = check_selection(x, ratio, seed=3)
    assert idx.size == target


@pytest.mark.parametrize(
    ("n", "ratio"),
    [
        (2_000_003, 12 / 2_000_003),  # a target below one expected sample hit
        (2_000_003, 60 / 2_000_003),
        (LARGE_N, 0.5),
        (LARGE_N, 0.97),  # a target above the whole sample
        (LARGE_N, 0.999),
        (LARGE_N, 1 - 1 / LARGE_N),
    ],
)
def test_extreme_ratios_on_large_input(make_input, n: int, ratio: float) -> None:
    x = make_input("student_t", n)
    check_selection(x, ratio, seed=6)


def test_all_zero_large(make_input) -> None:
    x = make_input("zeros", LARGE_N)
    for ratio in RATIOS:
        _idx, val = check_selection(x, ratio, seed=2)
        assert not np.any(val)


def test_infinities_are_selected() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal(LARGE_N).astype(np.float32)
    x[[5, 70_000, LARGE_N - 1]] = [np.inf, -np.inf, np.inf]
    idx, _ = check_selection(x, 0.01, seed=4)
    assert {5, 70_000, LARGE_N - 1} <= set(idx.tolist())


# ---------------------------------------------------------------- determinism --
@pytest.mark.parametrize("distribution_name", ["normal", "ties", "lognormal"])
def test_reproducible_for_a_seed(make_input, distribution_name: str) -> None:
    x = make_input(distribution_name, LARGE_N)
    for ratio in RATIOS:
        a = ops.threshold_topk(x, ratio, seed=777)
        b = ops.threshold_topk(x.copy(), ratio, seed=777)
        assert a[0].tobytes() == b[0].tobytes()
        assert a[1].tobytes() == b[1].tobytes()


def test_seed_none_gives_valid_selection(large_normal_input: np.ndarray) -> None:
    idx, _ = ops.threshold_topk(large_normal_input, 0.01)
    lo, hi = band_of(target_of(0.01, LARGE_N))
    assert lo <= idx.size <= hi


def test_accepts_float64_and_multidim(make_input) -> None:
    x = make_input("normal", 1001)
    a = ops.threshold_topk(x.astype(np.float64).reshape(7, 11, 13), 0.05, seed=1)
    b = ops.threshold_topk(x, 0.05, seed=1)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


# ------------------------------------------------------------------- errors --
@pytest.mark.parametrize("ratio", [-0.01, 1.01, -1.0, 2.0, float("nan"), float("inf"), -float("inf")])
def test_bad_ratio(normal_input: np.ndarray, ratio: float) -> None:
    with pytest.raises(ValueError):
        ops.threshold_topk(normal_input, ratio, seed=1)


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_bad_seed_value(normal_input: np.ndarray, seed: int) -> None:
    with pytest.raises(ValueError):
        ops.threshold_topk(normal_input, 0.1, seed=seed)


def test_bad_seed_type(normal_input: np.ndarray) -> None:
    with pytest.raises(TypeError):
        ops.threshold_topk(normal_input, 0.1, seed=1.5)  # type: ignore[arg-type]


def test_integer_input_rejected() -> None:
    with pytest.raises(TypeError):
        ops.threshold_topk(np.arange(100), 0.1, seed=1)


@pytest.mark.parametrize("n", [1001, LARGE_N])
@pytest.mark.parametrize("nan_fraction", [0.0, 0.01, 0.5])
def test_nan_raises(n: int, nan_fraction: float) -> None:
    rng = np.random.default_rng(6)
    x = rng.standard_normal(n).astype(np.float32)
    x[rng.random(n) < nan_fraction] = np.nan
    x[n // 2] = np.nan
    for ratio in (0.001, 0.05):
        with pytest.raises(ValueError, match="NaN"):
            ops.threshold_topk(x, ratio, seed=1)


# --------------------------------------------------------------- properties --
@given(
    x=hnp.arrays(
        np.float32,
        st.integers(0, 300),
        elements=st.one_of(
            st.floats(width=32, allow_nan=False, allow_infinity=False),
            st.sampled_from([0.0, -1.0, 1.0, 2.0]),
        ),
    ),
    ratio=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**64 - 1),
)
def test_property_small(x: np.ndarray, ratio: float, seed: int) -> None:
    check_selection(x, ratio, seed)


@given(
    pattern=hnp.arrays(np.float32, st.integers(1, 50), elements=st.floats(-1e6, 1e6, width=32)),
    ratio=st.sampled_from([0.0005, 0.002, 0.01, 0.05, 0.2, 0.6]),
    seed=st.integers(0, 2**64 - 1),
)
def test_property_tiled_large(pattern: np.ndarray, ratio: float, seed: int) -> None:
    x = np.tile(pattern, (1 << 17) // pattern.size + 1)
    check_selection(x, ratio, seed)
