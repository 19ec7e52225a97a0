"""ops.topk: exact top-k by magnitude, checked against a numpy reference."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from fedpress import ops
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

LARGE_N = 300_007  # several 2^16 chunks, ragged tail, >= 2^17 (sampled path)
HUGE_N = 2_000_003
SIMD_LEVELS = ("scalar", "avx2", "avx512")


# ----------------------------------------------------------------- reference --
def reference_order(x: np.ndarray) -> np.ndarray:
    """All indices, largest |x| first, lower index first among equal magnitudes."""
    x32 = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    return np.lexsort((np.arange(x32.size), -np.abs(x32)))


def reference_topk(x: np.ndarray, k: int, order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first k of reference_order(x), sorted ascending, with their values."""
    x32 = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if order is None:
        order = reference_order(x32)
    idx = np.sort(order[:k]).astype(np.uint32)
    return idx, x32[idx]


def assert_well_formed(x: np.ndarray, idx: np.ndarray, val: np.ndarray, k: int) -> None:
    x32 = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    assert isinstance(idx, np.ndarray) and isinstance(val, np.ndarray)
    assert idx.dtype == np.uint32 and val.dtype == np.float32
    assert idx.ndim == 1 and val.ndim == 1
    assert idx.size == k and val.size == k
    if k > 1:
        assert np.all(np.diff(idx.astype(np.int64)) > 0), "indices not strictly ascending"
    if k:
        assert int(idx[-1]) < x32.size
    # Bit-exact, so the sign of a zero is checked too.
    assert val.tobytes() == x32[idx].tobytes()


def assert_topk_matches(x: np.ndarray, k: int, order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    idx, val = ops.topk(x, k)
    assert_well_formed(x, idx, val, k)
    ref_idx, ref_val = reference_topk(x, k, order)
    np.testing.assert_array_equal(idx, ref_idx)
    assert val.tobytes() == ref_val.tobytes()
    return idx, val


# ------------------------------------------------------------ distributions --
@pytest.mark.parametrize("k_spec", ["0", "1", "0.001", "0.01", "0.1", "0.5", "n-1", "n"])
def test_matches_reference(make_input, distribution: str, odd_length: int, k_spec: str) -> None:
    n = odd_length
    if k_spec == "n":
        k = n
    elif k_spec == "n-1":
        k = n - 1
    elif "." in k_spec:
        k = round(float(k_spec) * n)
    else:
        k = min(int(k_spec), n)
    assert_topk_matches(make_input(distribution, n), k)


def test_k_zero(normal_input: np.ndarray) -> None:
    idx, val = ops.topk(normal_input, 0)
    assert idx.dtype == np.uint32 and val.dtype == np.float32
    assert idx.shape == (0,) and val.shape == (0,)


def test_k_equals_n_returns_everything(normal_input: np.ndarray) -> None:
    idx, val = ops.topk(normal_input, normal_input.size)
    np.testing.assert_array_equal(idx, np.arange(normal_input.size, dtype=np.uint32))
    assert val.tobytes() == normal_input.tobytes()


def test_k_one_is_argmax_of_magnitude(heavy_tailed_input: np.ndarray, lognormal_input: np.ndarray) -> None:
    for x in (heavy_tailed_input, lognormal_input):
        idx, val = ops.topk(x, 1)
        expected = int(np.argmax(np.abs(x)))  # argmax: first maximum
        assert idx.tolist() == [expected]
        assert val[0] == x[expected]


def test_tie_heavy_lowest_indices_win(tie_heavy_input: np.ndarray) -> None:
    x = tie_heavy_input
    twos = np.flatnonzero(np.abs(x) == 2)
    assert twos.size > 100
    idx, _ = assert_topk_matches(x, 100)
    np.testing.assert_array_equal(idx, twos[:100])


def test_lower_index_wins_ties() -> None:
    x = np.array([1.0, -3.0, 3.0, 2.0, -3.0, 3.0], dtype=np.float32)
    idx, val = ops.topk(x, 2)
    assert idx.tolist() == [1, 2]
    assert val.tolist() == [-3.0, 3.0]
    idx, _ = ops.topk(x, 4)
    assert idx.tolist() == [1, 2, 4, 5]


def test_signed_zeros_tie() -> None:
    x = np.array([-0.0, 0.0, -0.0, 0.0], dtype=np.float32)
    idx, val = ops.topk(x, 3)
    assert idx.tolist() == [0, 1, 2]
    assert val.tobytes() == x[:3].tobytes()


def test_length_one(length_one_input: np.ndarray) -> None:
    assert_topk_matches(length_one_input, 0)
    assert_topk_matches(length_one_input, 1)


def test_empty_input() -> None:
    idx, val = ops.topk(np.zeros(0, dtype=np.float32), 0)
    assert idx.size == 0 and val.size == 0
    with pytest.raises(ValueError):
        ops.topk(np.zeros(0, dtype=np.float32), 1)


def test_all_zero(all_zero_input: np.ndarray) -> None:
    idx, _ = assert_topk_matches(all_zero_input, 17)
    np.testing.assert_array_equal(idx, np.arange(17, dtype=np.uint32))


# ------------------------------------------------------------ input types --
@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.float32])
def test_float_dtypes_are_converted(dtype: type) -> None:
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(1001) * 100).astype(dtype)
    idx, val = ops.topk(x, 50)
    ref_idx, ref_val = reference_topk(x.astype(np.float32), 50)
    np.testing.assert_array_equal(idx, ref_idx)
    assert val.dtype == np.float32
    assert val.tobytes() == ref_val.tobytes()


def test_float64_precision_lost_before_ranking() -> None:
    # Distinct as float64, equal after conversion to float32: the lower index wins.
    x = np.array([1.0, 1.0 + 1e-12, 0.5], dtype=np.float64)
    idx, _ = ops.topk(x, 1)
    assert idx.tolist() == [0]


def test_non_contiguous_input() -> None:
    rng = np.random.default_rng(2)
    base = rng.standard_normal(4002).astype(np.float32)
    x = base[::2]
    assert not x.flags.c_contiguous
    assert_topk_matches(np.ascontiguousarray(x), 77)
    idx, val = ops.topk(x, 77)
    ref_idx, ref_val = reference_topk(x, 77)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(val, ref_val)


@pytest.mark.parametrize("shape", [(7, 11), (3, 5, 67), (1, 1001)])
def test_multidimensional_input_is_flattened_in_c_order(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape).astype(np.float32)
    idx, val = ops.topk(x, 20)
    ref_idx, ref_val = reference_topk(x.reshape(-1), 20)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(val, ref_val)
    # Fortran-ordered input: still flat C-order indices.
    xf = np.asfortranarray(x)
    idx_f, val_f = ops.topk(xf, 20)
    np.testing.assert_array_equal(idx_f, ref_idx)
    np.testing.assert_array_equal(val_f, ref_val)


def test_torch_float32_tensor() -> None:
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(3001, generator=gen)
    idx, val = ops.topk(t, 100)
    assert isinstance(idx, np.ndarray) and isinstance(val, np.ndarray)
    ref_idx, ref_val = reference_topk(t.numpy(), 100)
    np.testing.assert_array_equal(idx, ref_idx)
    assert val.tobytes() == ref_val.tobytes()


def test_torch_multidim_tensor() -> None:
    gen = torch.Generator().manual_seed(1)
    t = torch.randn(13, 17, generator=gen)
    idx, val = ops.topk(t, 30)
    ref_idx, ref_val = reference_topk(t.numpy().reshape(-1), 30)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(val, ref_val)
    # A transposed (non-contiguous) tensor is flattened in its logical C order.
    tt = t.t()
    idx_t, val_t = ops.topk(tt, 30)
    ref_idx_t, ref_val_t = reference_topk(tt.contiguous().numpy().reshape(-1), 30)
    np.testing.assert_array_equal(idx_t, ref_idx_t)
    np.testing.assert_array_equal(val_t, ref_val_t)


def test_torch_bfloat16_tensor() -> None:
    gen = torch.Generator().manual_seed(2)
    t = (torch.randn(2049, generator=gen) * 10).to(torch.bfloat16)  # bf16: many ties
    idx, val = ops.topk(t, 200)
    x32 = t.float().numpy()
    ref_idx, ref_val = reference_topk(x32, 200)
    np.testing.assert_array_equal(idx, ref_idx)
    assert val.tobytes() == ref_val.tobytes()


def test_torch_float64_and_float16_tensors() -> None:
    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float64, torch.float16):
        t = torch.randn(999, generator=gen).to(dtype)
        idx, val = ops.topk(t, 10)
        ref_idx, ref_val = reference_topk(t.float().numpy(), 10)
        np.testing.assert_array_equal(idx, ref_idx)
        np.testing.assert_array_equal(val, ref_val)


def test_torch_tensor_requiring_grad() -> None:
    gen = torch.Generator().manual_seed(4)
    t = torch.randn(500, generator=gen, requires_grad=True)
    idx, val = ops.topk(t, 25)
    ref_idx, ref_val = reference_topk(t.detach().numpy(), 25)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(val, ref_val)
    assert t.grad is None


def test_torch_integer_tensor_rejected() -> None:
    with pytest.raises(TypeError):
        ops.topk(torch.arange(10), 3)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_])
def test_integer_array_rejected(dtype: type) -> None:
    with pytest.raises(TypeError):
        ops.topk(np.ones(10, dtype=dtype), 3)


def test_python_list_of_ints_rejected() -> None:
    with pytest.raises(TypeError):
        ops.topk([1, 2, 3], 1)


def test_python_list_of_floats_accepted() -> None:
    idx, val = ops.topk([0.5, -2.0, 1.0], 2)
    assert idx.tolist() == [1, 2]
    assert val.tolist() == [-2.0, 1.0]


# --------------------------------------------------------------- arguments --
def test_k_greater_than_n(normal_input: np.ndarray) -> None:
    with pytest.raises(ValueError):
        ops.topk(normal_input, normal_input.size + 1)


def test_k_negative(normal_input: np.ndarray) -> None:
    with pytest.raises(ValueError):
        ops.topk(normal_input, -1)


@pytest.mark.parametrize("k", [1.0, 2.5, "3", None])
def test_k_non_integer(normal_input: np.ndarray, k: object) -> None:
    with pytest.raises(TypeError):
        ops.topk(normal_input, k)  # type: ignore[arg-type]


def test_k_numpy_integer_accepted(normal_input: np.ndarray) -> None:
    idx, _ = ops.topk(normal_input, np.int64(5))
    ref_idx, _ = reference_topk(normal_input, 5)
    np.testing.assert_array_equal(idx, ref_idx)


# --------------------------------------------------------- NaN and infinity --
@pytest.mark.parametrize("n", [1, 7, 1001, LARGE_N])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("k_frac", [0.0, 0.001, 0.01, 0.2, 1.0])
def test_single_nan_raises(n: int, where: str, k_frac: float) -> None:
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(np.float32)
    pos = {"first": 0, "middle": n // 2, "last": n - 1}[where]
    x[pos] = np.nan
    k = round(k_frac * n)
    with pytest.raises(ValueError, match="NaN"):
        ops.topk(x, k)


@pytest.mark.parametrize("nan_fraction", [0.01, 0.2, 1.0])
@pytest.mark.parametrize("n", [1001, LARGE_N])
@pytest.mark.parametrize("k_frac", [0.001, 0.01])
def test_many_nans_raise(n: int, nan_fraction: float, k_frac: float) -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal(n).astype(np.float32)
    x[rng.random(n) < nan_fraction] = np.nan
    x[n // 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ops.topk(x, max(1, int(k_frac * n)))


def test_negative_nan_raises() -> None:
    x = np.ones(1001, dtype=np.float32)
    x[500] = -np.nan
    assert np.signbit(x[500])
    with pytest.raises(ValueError, match="NaN"):
        ops.topk(x, 3)


@pytest.mark.parametrize("n", [7, 1001, LARGE_N])
def test_infinities_allowed(n: int) -> None:
    rng = np.random.default_rng(11)
    x = rng.standard_normal(n).astype(np.float32)
    x[n // 2] = np.inf
    x[n - 1] = -np.inf
    x[0] = np.float32(3.4e38)
    for k in (1, 2, 3, max(3, n // 100), n):
        idx, _ = assert_topk_matches(x, k)
        if k >= 2:
            assert {n // 2, n - 1} <= set(idx.tolist())


def test_many_infinities_with_ties() -> None:
    rng = np.random.default_rng(12)
    x = rng.standard_normal(LARGE_N).astype(np.float32)
    x[rng.random(LARGE_N) < 0.02] = np.inf
    x[rng.random(LARGE_N) < 0.02] = -np.inf
    for k in (10, 3000, 20_000):
        assert_topk_matches(x, k)


# ------------------------------------------------ large inputs, ties, fallbacks --
_HUGE_KINDS = ("zeros", "half_zeros", "three_magnitudes", "ties")


@functools.cache
def _huge(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """A read-only HUGE_N-element tie-heavy input and its reference order."""
    rng = np.random.default_rng(_HUGE_KINDS.index(kind))
    n = HUGE_N
    if kind == "zeros":
        x = np.zeros(n, dtype=np.float32)
    elif kind == "half_zeros":
        x = rng.standard_normal(n).astype(np.float32)
        x[rng.random(n) < 0.5] = 0.0
    elif kind == "three_magnitudes":
        mags = rng.choice(np.array([1e-3, 1.0, 1e3], dtype=np.float32), n, p=[0.975, 0.02, 0.005])
        x = (mags * rng.choice(np.array([-1, 1], dtype=np.float32), n)).astype(np.float32)
    else:
        x = rng.choice(np.array([-2, -1, 0, 1, 2], dtype=np.float32), n)
    x.setflags(write=False)
    return x, reference_order(x)


@pytest.mark.parametrize("kind", _HUGE_KINDS)
def test_huge_tie_heavy(kind: str) -> None:
    x, order = _huge(kind)
    for k_frac in (0.0001, 0.005, 0.01, 0.1):
        assert_topk_matches(x, int(k_frac * x.size), order)


@pytest.mark.parametrize("kind", ["zeros", "half_zeros", "three_magnitudes", "ties"])
@pytest.mark.parametrize("k_frac", [0.001, 0.01, 0.03])
def test_large_tie_heavy(kind: str, k_frac: float) -> None:
    rng = np.random.default_rng(5)
    if kind == "zeros":
        x = np.zeros(LARGE_N, dtype=np.float32)
    elif kind == "half_zeros":
        x = rng.standard_normal(LARGE_N).astype(np.float32)
        x[rng.random(LARGE_N) < 0.5] = 0.0
    elif kind == "three_magnitudes":
        x = rng.choice(np.array([1e-3, 1.0, 1e3], dtype=np.float32), LARGE_N, p=[0.975, 0.02, 0.005])
    else:
        x = rng.choice(np.array([-2, -1, 0, 1, 2], dtype=np.float32), LARGE_N)
    assert_topk_matches(x, int(k_frac * LARGE_N))


@pytest.mark.parametrize("region", [50, 500, 5000])
def test_concentrated_huge_values_fool_the_sample(region: int) -> None:
    # Almost everything tiny; a few huge values packed into one small region
    # that a strided sample is likely to miss (or to over-represent).
    rng = np.random.default_rng(region)
    n = HUGE_N
    x = (rng.standard_normal(n) * 1e-6).astype(np.float32)
    start = int(rng.integers(0, n - region))
    x[start : start + region] = (rng.standard_normal(region) * 1e6).astype(np.float32)
    order = reference_order(x)
    for k in (10, 100, 1000, 6000, 60_000):
        idx, _ = assert_topk_matches(x, k, order)
        assert np.count_nonzero((idx >= start) & (idx < start + region)) == min(k, region)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("run", [16, 64, 4096])
@pytest.mark.parametrize("k_frac", [0.001, 0.01, 0.04])
def test_run_structured_values(seed: int, run: int, k_frac: float) -> None:
    # Values constant over runs: samples taken as contiguous blocks are strongly
    # correlated, so the sampled threshold misjudges far more often than for
    # i.i.d. data and the exact fallbacks run.
    rng = np.random.default_rng([seed, run])
    n = LARGE_N
    per_run = rng.standard_t(2, n // run + 1).astype(np.float32)
    x = np.repeat(per_run, run)[:n].copy()
    assert_topk_matches(x, int(k_frac * n))


# White-box: the sampled path of topk draws 1024 blocks of 16 elements, one per
# equal stratum, from a fixed seed (see the sampled_positions fixture). Planting
# values exactly there forces each fallback. Should the sampling scheme change,
# these stay valid correctness tests of odd inputs.
TOPK_SAMPLE_BLOCKS = 1024
TOPK_SAMPLE_SEED = 0x5EEDF00D


@pytest.mark.parametrize("k_frac", [0.0005, 0.01, 0.04])
def test_sample_sees_only_small_values(sampled_positions, k_frac: float) -> None:
    # Sampled positions tiny, everything else large: the sampled threshold is
    # far too low and the candidate list overflows.
    n = LARGE_N
    rng = np.random.default_rng(21)
    mask = sampled_positions(n, TOPK_SAMPLE_BLOCKS, TOPK_SAMPLE_SEED)
    x = (rng.standard_normal(n) * 100).astype(np.float32)
    x[mask] = (rng.standard_normal(int(mask.sum())) * 1e-3).astype(np.float32)
    assert_topk_matches(x, int(k_frac * n))


@pytest.mark.parametrize("k_frac", [0.0005, 0.01, 0.04])
def test_sample_sees_only_large_values(sampled_positions, k_frac: float) -> None:
    # Sampled positions large, everything else tiny: the sampled threshold is
    # far too high and fewer than k elements pass it.
    n = LARGE_N
    rng = np.random.default_rng(22)
    mask = sampled_positions(n, TOPK_SAMPLE_BLOCKS, TOPK_SAMPLE_SEED)
    x = (rng.standard_normal(n) * 1e-3).astype(np.float32)
    x[mask] = (rng.standard_normal(int(mask.sum())) * 100).astype(np.float32)
    assert_topk_matches(x, int(k_frac * n))


def test_sample_sees_ties_at_threshold(sampled_positions) -> None:
    # Sample all 1.0; outside, a mix where k-th largest sits in a big tie group.
    n = LARGE_N
    rng = np.random.default_rng(23)
    mask = sampled_positions(n, TOPK_SAMPLE_BLOCKS, TOPK_SAMPLE_SEED)
    x = rng.choice(np.array([0.5, 1.0, 2.0], dtype=np.float32), n, p=[0.9, 0.09, 0.01])
    x[mask] = 1.0
    for k in (100, 3000, 6000, 12_000):
        assert_topk_matches(x, k)


# ---------------------------------------------------------------- SIMD paths --
def _simd_inputs() -> list[tuple[str, np.ndarray, int]]:
    rng = np.random.default_rng(31)
    cases = []
    for n in (1, 7, 63, 64, 65, 1001, 65_536, 65_537, LARGE_N):
        x = rng.standard_normal(n).astype(np.float32)
        for k in sorted({0, 1, n // 100, n // 10, n // 2, n}):
            cases.append((f"normal-{n}-{k}", x, k))
    ties = rng.choice(np.array([-2, -1, 0, 1, 2], dtype=np.float32), LARGE_N)
    for k in (3, 3000, 30_000):
        cases.append((f"ties-{k}", ties, k))
    heavy = rng.standard_t(2, LARGE_N).astype(np.float32)
    for k in (30, 3000, 15_000):
        cases.append((f"heavy-{k}", heavy, k))
    return cases


def test_simd_levels_agree(simd) -> None:
    cases = _simd_inputs()
    results: dict[str, list[tuple[bytes, bytes]]] = {}
    for level in SIMD_LEVELS:
        with simd(level):
            results[level] = [(i.tobytes(), v.tobytes()) for i, v in (ops.topk(x, k) for _, x, k in cases)]
    for j, (name, x, k) in enumerate(cases):
        ref_idx, ref_val = reference_topk(x, k)
        for level in SIMD_LEVELS:
            assert results[level][j] == (ref_idx.tobytes(), ref_val.tobytes()), (name, level)


def test_simd_setting_is_restored_and_validated(simd) -> None:
    before = ops.simd()
    with simd("scalar"):
        assert ops.simd() == "scalar"
    assert ops.simd() == before
    with pytest.raises(ValueError):
        ops._core.set_simd("sse9")


# --------------------------------------------------------------- properties --
_TIES = st.sampled_from([-2.0, -1.0, -0.0, 0.0, 1.0, 2.0, 1e-30, -1e30])
_FINITE = st.floats(width=32, allow_nan=False, allow_infinity=False)


@st.composite
def _array_and_k(draw: st.DrawFn, max_size: int = 400) -> tuple[np.ndarray, int]:
    elements = draw(st.sampled_from(["finite", "ties", "mixed"]))
    elem = {"finite": _FINITE, "ties": _TIES, "mixed": st.one_of(_FINITE, _TIES)}[elements]
    x = draw(hnp.arrays(np.float32, st.integers(0, max_size), elements=elem))
    k = draw(st.integers(0, x.size))
    return x, k


@given(_array_and_k())
def test_property_matches_reference(case: tuple[np.ndarray, int]) -> None:
    x, k = case
    assert_topk_matches(x, k)


@given(
    pattern=hnp.arrays(np.float32, st.integers(1, 64), elements=st.one_of(_FINITE, _TIES)),
    reps=st.integers(2048, 2600),
    k=st.integers(0, 20_000),
)
def test_property_tiled_large(pattern: np.ndarray, reps: int, k: int) -> None:
    # Tiling a small pattern gives >= 2^17-element inputs full of exact ties.
    x = np.tile(pattern, reps)
    if x.size < (1 << 17):
        x = np.tile(x, 2)
    assert_topk_matches(x, min(k, x.size))
