"""ops.randomk / ops.randomk_indices: k uniform draws without replacement, seeded."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from fedpress import ops
from hypothesis import given
from hypothesis import strategies as st

LARGE_N = 1_000_003


def check_indices(idx: np.ndarray, n: int, k: int) -> None:
    assert isinstance(idx, np.ndarray)
    assert idx.dtype == np.uint32 and idx.ndim == 1
    assert idx.size == k
    if k > 1:
        assert np.all(np.diff(idx.astype(np.int64)) > 0), "indices not strictly ascending"
    if k:
        assert int(idx[-1]) < n


def chi_square(observed: np.ndarray, expected: np.ndarray) -> float:
    observed = np.asarray(observed, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.sum((observed - expected) ** 2 / expected))


def assert_chi_square_plausible(observed: np.ndarray, expected: np.ndarray) -> None:
    # Loose: mean df, sd sqrt(2 df); 6 sd above the mean is never reached by a
    # uniform generator, while a biased one (say a fixed index twice as likely)
    # overshoots by far with the sample sizes used here.
    df = observed.size - 1
    stat = chi_square(observed, expected)
    assert stat < df + 6 * math.sqrt(2 * df) + 10, f"chi-square {stat:.1f} with {df} dof"


# ------------------------------------------------------------------- shape --
@pytest.mark.parametrize("n", [1, 2, 63, 64, 65, 127, 128, 129, 1001, LARGE_N])
@pytest.mark.parametrize("k_frac", [0.0, 0.01, 0.3, 0.5, 0.51, 0.9, 1.0])
def test_distinct_ascending_and_values(make_input, n: int, k_frac: float) -> None:
    x = make_input("normal", n)
    k = round(k_frac * n)
    idx, val = ops.randomk(x, k, seed=99)
    check_indices(idx, n, k)
    assert val.dtype == np.float32
    assert val.tobytes() == x[idx].tobytes()


def test_k_zero(normal_input: np.ndarray) -> None:
    idx, val = ops.randomk(normal_input, 0, seed=1)
    assert idx.size == 0 and val.size == 0
    assert idx.dtype == np.uint32 and val.dtype == np.float32


def test_k_equals_n(normal_input: np.ndarray) -> None:
    idx, val = ops.randomk(normal_input, normal_input.size, seed=1)
    np.testing.assert_array_equal(idx, np.arange(normal_input.size, dtype=np.uint32))
    assert val.tobytes() == normal_input.tobytes()


@pytest.mark.parametrize("n", [10, 64, 100, 1001])
def test_k_above_half_uses_complement_correctly(n: int) -> None:
    for k in range(n // 2 + 1, n + 1, max(1, n // 20)):
        for seed in range(3):
            check_indices(ops.randomk_indices(n, k, seed), n, k)


def test_empty_input() -> None:
    idx, val = ops.randomk(np.zeros(0, dtype=np.float32), 0, seed=5)
    assert idx.size == 0 and val.size == 0
    assert ops.randomk_indices(0, 0, 5).size == 0


def test_length_one(length_one_input: np.ndarray) -> None:
    idx, val = ops.randomk(length_one_input, 1, seed=3)
    assert idx.tolist() == [0] and val.tolist() == [length_one_input[0]]


def test_multidim_and_torch_input() -> None:
    import torch

    t = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
    idx, val = ops.randomk(t, 10, seed=8)
    check_indices(idx, 60, 10)
    np.testing.assert_array_equal(val, idx.astype(np.float32))


# -------------------------------------------------------------- determinism --
def test_deterministic_per_seed(make_input) -> None:
    x = make_input("normal", LARGE_N)
    a = ops.randomk(x, 10_000, seed=2024)
    b = ops.randomk(x, 10_000, seed=2024)
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()


def test_different_seeds_differ(make_input) -> None:
    x = make_input("normal", 1001)
    sets = {ops.randomk(x, 50, seed=s)[0].tobytes() for s in range(20)}
    assert len(sets) == 20
    big = {ops.randomk_indices(LARGE_N, 1000, s).tobytes() for s in (0, 1, 2**63, 2**64 - 1)}
    assert len(big) == 4


def test_seed_none_is_random() -> None:
    draws = {ops.randomk(np.zeros(1000, dtype=np.float32), 20)[0].tobytes() for _ in range(5)}
    assert len(draws) > 1


@pytest.mark.parametrize("n", [1, 7, 64, 1001, LARGE_N])
@pytest.mark.parametrize("k_frac", [0.0, 0.01, 0.5, 0.7, 1.0])
def test_randomk_indices_equals_randomk(make_input, n: int, k_frac: float) -> None:
    k = round(k_frac * n)
    for seed in (0, 12345, 2**64 - 1):
        idx, _ = ops.randomk(make_input("student_t", n), k, seed=seed)
        ref = ops.randomk_indices(n, k, seed)
        assert ref.dtype == np.uint32
        assert ref.tobytes() == idx.tobytes()


def test_indices_do_not_depend_on_values(make_input) -> None:
    a = ops.randomk(make_input("normal", 1001), 77, seed=3)[0]
    b = ops.randomk(make_input("zeros", 1001), 77, seed=3)[0]
    c = ops.randomk(make_input("ties", 1001).astype(np.float64), 77, seed=3)[0]
    assert a.tobytes() == b.tobytes() == c.tobytes()


# ------------------------------------------------------------------ errors --
def test_k_greater_than_n(normal_input: np.ndarray) -> None:
    with pytest.raises(ValueError):
        ops.randomk(normal_input, normal_input.size + 1, seed=1)
    with pytest.raises(ValueError):
        ops.randomk_indices(10, 11, 1)


def test_negative_arguments() -> None:
    with pytest.raises(ValueError):
        ops.randomk(np.zeros(10, dtype=np.float32), -1, seed=1)
    with pytest.raises(ValueError):
        ops.randomk_indices(-1, 0, 1)
    with pytest.raises(ValueError):
        ops.randomk_indices(10, -1, 1)
    with pytest.raises(ValueError):
        ops.randomk_indices(10, 1, -1)


def test_n_too_large() -> None:
    with pytest.raises(ValueError):
        ops.randomk_indices(2**32, 1, 1)


def test_non_integer_arguments() -> None:
    with pytest.raises(TypeError):
        ops.randomk(np.zeros(10, dtype=np.float32), 1.0, seed=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ops.randomk_indices(10.0, 1, 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ops.randomk(np.zeros(10, dtype=np.int32), 1, seed=1)


# --------------------------------------------------------------- uniformity --
@pytest.mark.parametrize(("n", "k"), [(10, 1), (10, 3), (10, 7), (37, 5), (64, 40), (130, 20)])
def test_marginals_uniform(n: int, k: int) -> None:
    seeds = 6000
    counts = np.zeros(n, dtype=np.int64)
    for s in range(seeds):
        counts += np.bincount(ops.randomk_indices(n, k, s), minlength=n)
    assert counts.sum() == seeds * k
    assert_chi_square_plausible(counts, np.full(n, seeds * k / n))


@pytest.mark.parametrize(("n", "k"), [(6, 2), (6, 4), (5, 3), (7, 1)])
def test_subsets_uniform(n: int, k: int) -> None:
    # Every k-subset equally likely: catches generators with correct marginals
    # but correlated picks (e.g. a biased Floyd step or complement mapping).
    subsets = {c: i for i, c in enumerate(itertools.combinations(range(n), k))}
    seeds = 300 * len(subsets)
    counts = np.zeros(len(subsets), dtype=np.int64)
    for s in range(seeds):
        counts[subsets[tuple(ops.randomk_indices(n, k, s).tolist())]] += 1
    assert_chi_square_plausible(counts, np.full(len(subsets), seeds / len(subsets)))


def test_positions_uniform_on_large_n() -> None:
    n, k = LARGE_N, 20_000
    bins = 50
    counts = np.zeros(bins, dtype=np.int64)
    for s in range(10):
        counts += np.bincount(ops.randomk_indices(n, k, s) * bins // n, minlength=bins)
    assert_chi_square_plausible(counts, np.full(bins, 10 * k / bins))


def test_consecutive_seeds_are_not_correlated() -> None:
    # The overlap of two independent k-subsets of n is hypergeometric with mean k^2/n.
    n, k = 1000, 100
    overlaps = [np.intersect1d(ops.randomk_indices(n, k, s), ops.randomk_indices(n, k, s + 1)).size for s in range(400)]
    mean = float(np.mean(overlaps))
    expected = k * k / n
    sd = math.sqrt(expected * (1 - k / n) * (n - k) / (n - 1))
    assert abs(mean - expected) < 6 * sd / math.sqrt(len(overlaps))


# --------------------------------------------------------------- properties --
@given(n=st.integers(0, 5000), data=st.data(), seed=st.integers(0, 2**64 - 1))
def test_property_valid_and_consistent(n: int, data: st.DataObject, seed: int) -> None:
    k = data.draw(st.integers(0, n))
    idx = ops.randomk_indices(n, k, seed)
    check_indices(idx, n, k)
    x = np.arange(n, dtype=np.float32)
    ridx, rval = ops.randomk(x, k, seed=seed)
    assert ridx.tobytes() == idx.tobytes()
    np.testing.assert_array_equal(rval, idx.astype(np.float32))
