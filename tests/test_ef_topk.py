"""ops.ef_topk: error-feedback top-k (residual += update; take top-k; zero them)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fedpress import ops

LARGE_N = 300_007  # >= 2^17: the sampled, fused path
SIMD_LEVELS = ("scalar", "avx2", "avx512")
TOPK_SAMPLE_BLOCKS = 1024
TOPK_SAMPLE_SEED = 0x5EEDF00D


# ---------------------------------------------------------------- reference --
def reference_ef_topk(update: np.ndarray, residual: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices, values, new residual), all computed in numpy float32."""
    acc = (np.asarray(residual, np.float32).reshape(-1) + np.asarray(update, np.float32).reshape(-1)).astype(np.float32)
    order = np.lexsort((np.arange(acc.size), -np.abs(acc)))
    idx = np.sort(order[:k]).astype(np.uint32)
    val = acc[idx].copy()
    acc[idx] = 0.0
    return idx, val, acc


def check_ef_topk(update: np.ndarray, residual: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    ref_idx, ref_val, ref_res = reference_ef_topk(update, residual, k)
    idx, val = ops.ef_topk(update, residual, k)
    assert idx.dtype == np.uint32 and val.dtype == np.float32
    np.testing.assert_array_equal(idx, ref_idx)
    assert val.tobytes() == ref_val.tobytes()
    assert residual.reshape(-1).tobytes() == ref_res.tobytes()
    return idx, val


# ------------------------------------------------------------------ equality --
@pytest.mark.parametrize("n", [1, 7, 1001, LARGE_N])
@pytest.mark.parametrize("k_spec", ["0", "1", "0.001", "0.01", "0.1", "n"])
def test_matches_reference(make_input, distribution: str, n: int, k_spec: str) -> None:
    k = {"0": 0, "1": min(1, n), "n": n}.get(k_spec)
    if k is None:
        k = round(float(k_spec) * n)
    update = make_input(distribution, n, seed=1)
    residual = make_input("normal", n, seed=2).copy()
    check_ef_topk(update, residual, k)


def test_zero_residual_equals_topk(make_input) -> None:
    update = make_input("student_t", LARGE_N)
    residual = np.zeros(LARGE_N, dtype=np.float32)
    idx, val = ops.ef_topk(update, residual, 3000)
    t_idx, t_val = ops.topk(update, 3000)
    assert idx.tobytes() == t_idx.tobytes() and val.tobytes() == t_val.tobytes()
    expected = update.copy()
    expected[idx] = 0
    assert residual.tobytes() == expected.tobytes()


def test_residual_modified_in_place() -> None:
    residual = np.array([1.0, -5.0, 0.5, 2.0], dtype=np.float32)
    buffer = residual  # same object, same memory
    idx, val = ops.ef_topk(np.array([0.5, 1.0, -3.0, 0.0], dtype=np.float32), residual, 2)
    assert idx.tolist() == [1, 2]
    assert val.tolist() == [-4.0, -2.5]
    assert buffer is residual
    assert residual.tolist() == [1.5, 0.0, 0.0, 2.0]


def test_k_zero_and_k_n_large(make_input) -> None:
    update = make_input("normal", LARGE_N, seed=3)
    residual = make_input("normal", LARGE_N, seed=4).copy()
    idx, _ = check_ef_topk(update, residual, 0)
    assert idx.size == 0
    idx, _ = check_ef_topk(update, residual, LARGE_N)
    assert idx.size == LARGE_N and not residual.any()


def test_tie_heavy_large(make_input) -> None:
    update = make_input("ties", LARGE_N, seed=5)
    residual = make_input("ties", LARGE_N, seed=6).copy()
    for k in (10, 3000, 15_000):
        check_ef_topk(update, residual, k)


@pytest.mark.parametrize("planted", ["small", "large"])
@pytest.mark.parametrize("k_frac", [0.0005, 0.01, 0.04])
def test_adversarial_sample(sampled_positions, planted: str, k_frac: float) -> None:
    # White-box: the sample of residual + update is unlike the rest, so the
    # sampled threshold misjudges and the exact fallback runs after the fused
    # pass has already accumulated the residual.
    mask = sampled_positions(LARGE_N, TOPK_SAMPLE_BLOCKS, TOPK_SAMPLE_SEED)
    rng = np.random.default_rng(7)
    update = rng.standard_normal(LARGE_N).astype(np.float32)
    factor = np.float32(1e-3) if planted == "small" else np.float32(1e3)
    update[mask] *= factor
    residual = np.zeros(LARGE_N, dtype=np.float32)
    residual[mask] = update[mask]  # doubles the planted values
    check_ef_topk(update, residual, int(k_frac * LARGE_N))


def test_cancellation_to_zero() -> None:
    # residual + update == 0 everywhere except a few entries
    rng = np.random.default_rng(8)
    residual = rng.standard_normal(LARGE_N).astype(np.float32)
    update = -residual
    update[[3, 100_000, LARGE_N - 1]] += np.float32(5.0)
    idx, _ = check_ef_topk(update, residual.copy(), 3)
    assert idx.tolist() == [3, 100_000, LARGE_N - 1]
    check_ef_topk(update, residual.copy(), 1000)  # then zeros, lowest indices


# ------------------------------------------------------------------- rounds --
@pytest.mark.parametrize("n", [1001, LARGE_N])
def test_rounds_conserve_mass(n: int) -> None:
    rng = np.random.default_rng(9)
    rounds, k = 20, max(1, n // 100)
    residual = np.zeros(n, dtype=np.float32)
    sim_residual = np.zeros(n, dtype=np.float32)
    sent_total = np.zeros(n, dtype=np.float64)
    update_total = np.zeros(n, dtype=np.float64)
    for _ in range(rounds):
        update = rng.standard_normal(n).astype(np.float32)
        idx, val = ops.ef_topk(update, residual, k)
        # bit-exact against a float32 simulation of the same rounds
        ref_idx, ref_val, sim_residual = reference_ef_topk(update, sim_residual, k)
        np.testing.assert_array_equal(idx, ref_idx)
        assert val.tobytes() == ref_val.tobytes()
        assert residual.tobytes() == sim_residual.tobytes()
        np.add.at(sent_total, idx.astype(np.int64), val.astype(np.float64))
        update_total += update
    # Nothing is lost: what was sent plus what is left is what came in, up to
    # float32 rounding of the running residual.
    np.testing.assert_allclose(sent_total + residual, update_total, rtol=1e-5, atol=1e-5 * rounds)


def test_rounds_with_torch_residual() -> None:
    gen = torch.Generator().manual_seed(10)
    residual = torch.zeros(5000)
    np_residual = np.zeros(5000, dtype=np.float32)
    for _ in range(5):
        update = torch.randn(5000, generator=gen)
        idx, val = ops.ef_topk(update, residual, 50)
        ref_idx, ref_val, np_residual = reference_ef_topk(update.numpy(), np_residual, 50)
        np.testing.assert_array_equal(idx, ref_idx)
        np.testing.assert_array_equal(val, ref_val)
        assert residual.numpy().tobytes() == np_residual.tobytes()


def test_multidim_update_and_residual() -> None:
    rng = np.random.default_rng(11)
    update = rng.standard_normal((31, 37)).astype(np.float32)
    residual = rng.standard_normal((31, 37)).astype(np.float32)
    ref_idx, ref_val, ref_res = reference_ef_topk(update, residual, 40)
    idx, val = ops.ef_topk(update, residual, 40)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(val, ref_val)
    assert residual.shape == (31, 37)
    assert residual.reshape(-1).tobytes() == ref_res.tobytes()


def test_float64_update_accepted() -> None:
    rng = np.random.default_rng(12)
    update = rng.standard_normal(1001)
    residual = np.zeros(1001, dtype=np.float32)
    ref_idx, _ref_val, ref_res = reference_ef_topk(update.astype(np.float32), residual, 10)
    idx, _val = ops.ef_topk(update, residual, 10)
    np.testing.assert_array_equal(idx, ref_idx)
    assert residual.tobytes() == ref_res.tobytes()


# ------------------------------------------------------------------- errors --
def test_shape_mismatch() -> None:
    residual = np.zeros(10, dtype=np.float32)
    with pytest.raises(ValueError):
        ops.ef_topk(np.zeros(11, dtype=np.float32), residual, 1)
    with pytest.raises(ValueError):
        ops.ef_topk(np.zeros(9, dtype=np.float32), residual, 1)


def test_read_only_residual() -> None:
    residual = np.zeros(10, dtype=np.float32)
    residual.setflags(write=False)
    with pytest.raises(ValueError):
        ops.ef_topk(np.ones(10, dtype=np.float32), residual, 1)
    assert not residual.any()


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32])
def test_non_float32_residual(dtype: type) -> None:
    with pytest.raises(TypeError):
        ops.ef_topk(np.ones(10, dtype=np.float32), np.zeros(10, dtype=dtype), 1)


def test_non_array_residual() -> None:
    with pytest.raises(TypeError):
        ops.ef_topk(np.ones(3, dtype=np.float32), [0.0, 0.0, 0.0], 1)  # type: ignore[arg-type]


def test_non_contiguous_residual() -> None:
    base = np.zeros(20, dtype=np.float32)
    with pytest.raises(ValueError):
        ops.ef_topk(np.ones(10, dtype=np.float32), base[::2], 1)
    assert not base.any()


def test_torch_residual_wrong_dtype() -> None:
    with pytest.raises(TypeError):
        ops.ef_topk(torch.ones(10), torch.zeros(10, dtype=torch.float64), 1)


def test_update_aliasing_residual() -> None:
    residual = np.ones(10, dtype=np.float32)
    with pytest.raises(ValueError):
        ops.ef_topk(residual, residual, 1)


def test_bad_k() -> None:
    residual = np.zeros(10, dtype=np.float32)
    with pytest.raises(ValueError):
        ops.ef_topk(np.ones(10, dtype=np.float32), residual, 11)
    with pytest.raises(ValueError):
        ops.ef_topk(np.ones(10, dtype=np.float32), residual, -1)
    with pytest.raises(TypeError):
        ops.ef_topk(np.ones(10, dtype=np.float32), residual, 1.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [1001, LARGE_N])
@pytest.mark.parametrize("nan_fraction", [0.0, 0.02])
def test_nan_raises(n: int, nan_fraction: float) -> None:
    rng = np.random.default_rng(13)
    update = rng.standard_normal(n).astype(np.float32)
    update[rng.random(n) < nan_fraction] = np.nan
    update[n // 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ops.ef_topk(update, np.zeros(n, dtype=np.float32), max(1, n // 1000))


# --------------------------------------------------------------------- SIMD --
def test_simd_levels_agree(simd) -> None:
    rng = np.random.default_rng(14)
    cases = []
    for n in (7, 65, 1001, 65_537, LARGE_N):
        update = rng.standard_normal(n).astype(np.float32)
        residual = rng.standard_t(3, n).astype(np.float32)
        for k in sorted({0, 1, n // 100, n // 10, n}):
            cases.append((update, residual, k))
    outputs: dict[str, list[bytes]] = {}
    for level in SIMD_LEVELS:
        outputs[level] = []
        with simd(level):
            for update, residual, k in cases:
                res = residual.copy()
                idx, val = ops.ef_topk(update, res, k)
                outputs[level].append(idx.tobytes() + val.tobytes() + res.tobytes())
    for j, (update, residual, k) in enumerate(cases):
        ref_idx, ref_val, ref_res = reference_ef_topk(update, residual, k)
        expected = ref_idx.tobytes() + ref_val.tobytes() + ref_res.tobytes()
        for level in SIMD_LEVELS:
            assert outputs[level][j] == expected, (update.size, k, level)


def test_ef_topk_can_leave_the_selected_entries() -> None:
    """zero_selected=False: the same selection and values, and the residual keeps the
    selected sums (what the Encoder overwrites with their rounding)."""
    rng = np.random.default_rng(3)
    u = rng.standard_normal(200_000).astype(np.float32)
    r = rng.standard_normal(200_000).astype(np.float32)
    zeroed, kept = r.copy(), r.copy()
    idx_a, val_a = ops.ef_topk(u, zeroed, 2000)
    idx_b, val_b = ops.ef_topk(u, kept, 2000, zero_selected=False)
    np.testing.assert_array_equal(idx_a, idx_b)
    np.testing.assert_array_equal(val_a, val_b)
    np.testing.assert_array_equal(kept[idx_b], val_b)
    kept[idx_b] = 0
    np.testing.assert_array_equal(kept, zeroed)
