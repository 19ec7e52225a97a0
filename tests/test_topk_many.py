"""ops.topk_many, threshold_topk_many and ef_topk_many: a model's tensors selected together,
as if concatenated, without concatenating them. Each must equal its one-array kernel on the
concatenation bit for bit (indices, values, the residuals), whatever the sizes (empty
tensors, tensors smaller than a SIMD vector, tensors straddling the kernels' 64Ki chunks),
the ties, the path (small inputs, the sampled path, the histogram fallback) and the thread
count; bad arguments are clear errors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch
from fedpress import Encoder, decode, ops

SIZES = [
    [5],
    [0, 3, 0],
    [1, 1, 1, 1],
    [64, 4096, 17, 36_864],
    [65_535, 2, 65_537],  # chunk boundaries inside and between tensors
    [150_000, 64, 64, 70_001],  # the sampled path
    [300_007],
    [10] * 200,  # many tiny tensors in one chunk
]


def arrays_for(rng: np.random.Generator, sizes: Sequence[int], kind: str) -> list[np.ndarray]:
    out = []
    for n in sizes:
        x = rng.standard_normal(n).astype(np.float32)
        if kind == "ties":
            x = np.round(x * 2).astype(np.float32)  # few distinct magnitudes
        elif kind == "heavy":
            x = (rng.standard_cauchy(n) * 1e3).astype(np.float32)
        out.append(x)
    return out


def split_reference(idx: np.ndarray, val: np.ndarray, sizes: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The one-array result cut by hand into per-array (local indices, values)."""
    out, start = [], 0
    for n in sizes:
        keep = (idx >= start) & (idx < start + n)
        out.append(((idx[keep] - start).astype(np.uint32), val[keep]))
        start += n
    return out


def assert_same(got: list[tuple[np.ndarray, np.ndarray]], want: list[tuple[np.ndarray, np.ndarray]]) -> None:
    assert len(got) == len(want)
    for (gi, gv), (wi, wv) in zip(got, want):
        assert gi.dtype == np.uint32 and gv.dtype == np.float32
        np.testing.assert_array_equal(gi, wi)
        assert gv.tobytes() == wv.tobytes()


def concat(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(0, np.float32)


@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: f"{len(s)}x{sum(s)}")
@pytest.mark.parametrize("kind", ["normal", "ties", "heavy"])
@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.01, 0.2, 1.0])
def test_topk_many_is_topk_of_the_concatenation(sizes: list[int], kind: str, fraction: float) -> None:
    rng = np.random.default_rng(sum(sizes) + len(kind))
    arrays = arrays_for(rng, sizes, kind)
    x = concat(arrays)
    k = min(x.size, round(fraction * x.size))
    assert_same(ops.topk_many(arrays, k), split_reference(*ops.topk(x, k), sizes))


@pytest.mark.parametrize("sizes", SIZES[3:], ids=lambda s: f"{len(s)}x{sum(s)}")
@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.1])
def test_threshold_topk_many_is_threshold_topk_of_the_concatenation(sizes: list[int], ratio: float) -> None:
    rng = np.random.default_rng(len(sizes))
    arrays = arrays_for(rng, sizes, "normal")
    for seed in (0, 7):
        want = split_reference(*ops.threshold_topk(concat(arrays), ratio, seed), sizes)
        assert_same(ops.threshold_topk_many(arrays, ratio, seed), want)


@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: f"{len(s)}x{sum(s)}")
@pytest.mark.parametrize("zero_selected", [True, False])
def test_ef_topk_many_is_ef_topk_of_the_concatenation(sizes: list[int], zero_selected: bool) -> None:
    rng = np.random.default_rng(len(sizes) * 3 + zero_selected)
    updates = arrays_for(rng, sizes, "normal")
    residuals = arrays_for(rng, sizes, "ties")
    flat_residual = concat(residuals).copy()
    total = flat_residual.size
    k = min(total, max(1, total // 100)) if total else 0
    want = split_reference(*ops.ef_topk(concat(updates), flat_residual, k, zero_selected), sizes)
    assert_same(ops.ef_topk_many(updates, residuals, k, zero_selected), want)
    assert concat(residuals).tobytes() == flat_residual.tobytes()


def test_ef_topk_many_rounds_conserve_what_is_not_sent() -> None:
    """Over rounds, what went out plus what is left is what came in (to float32 rounding)."""
    rng = np.random.default_rng(3)
    sizes = [40_000, 64, 90_000, 3]
    residuals = [np.zeros(n, np.float32) for n in sizes]
    sent = [np.zeros(n, np.float64) for n in sizes]
    came = [np.zeros(n, np.float64) for n in sizes]
    for _ in range(5):
        updates = arrays_for(rng, sizes, "normal")
        for c, u in zip(came, updates):
            c += u
        for s, (idx, val) in zip(sent, ops.ef_topk_many(updates, residuals, 1300)):
            s[idx] += val
    for c, s, r in zip(came, sent, residuals):
        np.testing.assert_allclose(s + r, c, atol=1e-4)


def test_ef_topk_many_with_a_nan_leaves_every_residual_summed() -> None:
    updates = [np.ones(200_000, np.float32), np.ones(10, np.float32)]
    updates[1][3] = np.nan
    residuals = [np.full(200_000, 2.0, np.float32), np.zeros(10, np.float32)]
    with pytest.raises(ValueError, match="NaN"):
        ops.ef_topk_many(updates, residuals, 100)
    assert (residuals[0] == 3.0).all()
    assert np.isnan(residuals[1][3]) and (np.delete(residuals[1], 3) == 1.0).all()


def test_the_result_does_not_depend_on_the_thread_count() -> None:
    rng = np.random.default_rng(5)
    arrays = arrays_for(rng, [150_000, 64, 70_001, 200_000], "ties")
    before = ops.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            ops.set_num_threads(threads)
            results.append(ops.topk_many(arrays, 4_000))
    finally:
        ops.set_num_threads(before)
    for other in results[1:]:
        assert_same(other, results[0])


def test_inputs_are_converted_like_topk() -> None:
    parts = ops.topk_many([np.arange(6, dtype=np.float64).reshape(2, 3), torch.tensor([-9.0, 1.0])], 2)
    assert_same(
        parts,
        [
            (np.array([5], np.uint32), np.array([5.0], np.float32)),
            (np.array([0], np.uint32), np.array([-9.0], np.float32)),
        ],
    )
    assert ops.topk_many([], 0) == []


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: ops.topk_many(np.zeros(3, np.float32), 1), TypeError, "arrays must be a sequence of arrays"),
        (lambda: ops.topk_many([np.zeros(3, np.int32)], 1), TypeError, r"arrays\[0\] must be a floating-point"),
        (lambda: ops.topk_many([np.zeros(3, np.float32)], 4), ValueError, "k"),
        (lambda: ops.threshold_topk_many([np.zeros(3, np.float32)], 1.5), ValueError, "ratio must be in"),
        (lambda: ops.topk_many([np.array([1.0, np.nan], np.float32)], 1), ValueError, "NaN"),
        (
            lambda: ops.ef_topk_many([np.zeros(3, np.float32)], [np.zeros(4, np.float32)], 1),
            ValueError,
            r"updates\[0\] has 3 elements but residuals\[0\] has 4",
        ),
        (lambda: ops.ef_topk_many([np.zeros(3, np.float32)], [], 1), ValueError, "1 updates but 0 residuals"),
        (
            lambda: ops.ef_topk_many([np.zeros(3, np.float32)], [np.zeros(3, np.float64)], 1),
            TypeError,
            "must be float32",
        ),
    ],
)
def test_bad_arguments_are_clear_errors(call, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        call()


def test_residuals_that_share_memory_are_refused() -> None:
    buf = np.zeros(10, np.float32)
    with pytest.raises(ValueError, match="must not share memory with a residual"):
        ops.ef_topk_many([buf[:5], np.ones(5, np.float32)], [np.zeros(5, np.float32), buf[3:8]], 1)
    with pytest.raises(ValueError, match="must not share memory with a residual"):
        ops.ef_topk_many([np.ones(5, np.float32), np.ones(5, np.float32)], [buf[:5], buf[4:9]], 1)
    with pytest.raises(ValueError, match="must not share memory with a residual"):
        ops.ef_topk_many([buf], [buf], 1)
    # Updates may share memory with each other (they are only read).
    shared = np.ones(5, np.float32)
    ops.ef_topk_many([shared, shared], [np.zeros(5, np.float32), np.zeros(5, np.float32)], 2)


def test_an_encoder_over_many_tensors_sends_what_the_unfused_path_sends() -> None:
    """Encoder's fused selection over every tensor (ef_topk_many) gives the payloads and
    residuals of adding each update to its residual and selecting over the concatenation."""
    rng = np.random.default_rng(11)
    shapes = [(64, 16, 3, 3), (64,), (0,), (3000,), (128, 64), (7,)]
    for spec in ("topk:0.01+q4+zstd", "topk:0.002+sign+zstd", "topk:0.05"):
        fused, plain = Encoder(spec), Encoder(spec)
        plain._fuses_globally = lambda *args: False  # type: ignore[method-assign]
        for r in range(4):
            update = {f"t{i}": (rng.standard_normal(s) * (i + 1)).astype(np.float32) for i, s in enumerate(shapes)}
            update["step"] = np.array([r], np.int64)
            assert fused.encode(update, seed=r) == plain.encode(update, seed=r)
            for name in fused.residuals:
                assert fused.residuals[name].tobytes() == plain.residuals[name].tobytes()
        assert set(decode(fused.encode(update, seed=9))) == set(update)
