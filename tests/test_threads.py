"""Results are byte-identical for any ops.set_num_threads value."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
from fedpress import ops

N = 1_000_003
THREAD_COUNTS = (1, 2, 3, 8)


def _inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2024)
    normal = rng.standard_normal(N).astype(np.float32)
    ties = rng.choice(np.array([-2, -1, 0, 1, 2], dtype=np.float32), N)
    heavy = rng.standard_t(2, N).astype(np.float32)
    runs = np.repeat(rng.standard_t(2, N // 4096 + 1).astype(np.float32), 4096)[:N].copy()
    return {"normal": normal, "ties": ties, "heavy": heavy, "runs": runs}


@pytest.fixture(scope="module")
def inputs() -> dict[str, np.ndarray]:
    data = _inputs()
    for arr in data.values():
        arr.setflags(write=False)
    return data


def outputs_for_each_thread_count(threads, fn: Callable[[], bytes]) -> dict[int, bytes]:
    results = {}
    for t in THREAD_COUNTS:
        with threads(t):
            assert ops.get_num_threads() == t
            results[t] = fn()
    return results


def assert_all_equal(results: dict[int, bytes]) -> None:
    first = results[THREAD_COUNTS[0]]
    for t, out in results.items():
        assert out == first, f"output with {t} threads differs from {THREAD_COUNTS[0]} thread"


def pack(*arrays: object) -> bytes:
    return b"|".join(a if isinstance(a, bytes) else np.asarray(a).tobytes() for a in arrays)


# ------------------------------------------------------------------ kernels --
@pytest.mark.parametrize("kind", ["normal", "ties", "heavy", "runs"])
@pytest.mark.parametrize("k", [1, 1000, 10_000, 100_000, 600_000])
def test_topk(threads, inputs, kind: str, k: int) -> None:
    x = inputs[kind]
    assert_all_equal(outputs_for_each_thread_count(threads, lambda: pack(*ops.topk(x, k))))


@pytest.mark.parametrize("kind", ["normal", "ties", "runs"])
@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.3])
def test_threshold_topk(threads, inputs, kind: str, ratio: float) -> None:
    x = inputs[kind]
    assert_all_equal(outputs_for_each_thread_count(threads, lambda: pack(*ops.threshold_topk(x, ratio, seed=99))))


@pytest.mark.parametrize("k", [10_000, 900_000])
def test_randomk(threads, inputs, k: int) -> None:
    x = inputs["normal"]
    assert_all_equal(
        outputs_for_each_thread_count(threads, lambda: pack(*ops.randomk(x, k, seed=5), ops.randomk_indices(N, k, 5)))
    )


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("bucket", [512, 7, 2**20 + 1])
@pytest.mark.parametrize("stochastic", [True, False])
def test_quantize_and_dequantize(threads, inputs, bits: int, bucket: int, stochastic: bool) -> None:
    x = inputs["heavy"]

    def run() -> bytes:
        packed, scales = ops.quantize(x, bits, bucket=bucket, stochastic=stochastic, seed=1234)
        return pack(packed, scales, ops.dequantize(packed, scales, bits, N, bucket))

    assert_all_equal(outputs_for_each_thread_count(threads, run))


@pytest.mark.parametrize("k", [0, 100, 10_000, 200_000, N])
def test_ef_topk(threads, inputs, k: int) -> None:
    update = inputs["heavy"]
    start = inputs["normal"]

    def run() -> bytes:
        residual = start.copy()
        idx, val = ops.ef_topk(update, residual, k)
        idx2, val2 = ops.ef_topk(update, residual, k)  # a second round on the result
        return pack(idx, val, idx2, val2, residual)

    assert_all_equal(outputs_for_each_thread_count(threads, run))


@pytest.mark.parametrize("sort", [True, False])
def test_scatter_add_many(threads, inputs, sort: bool) -> None:
    rng = np.random.default_rng(77)
    idx_list, val_list = [], []
    for _ in range(20):
        idx = rng.integers(0, N, 30_000).astype(np.uint32)
        idx_list.append(np.sort(idx) if sort else idx)
        val_list.append(rng.standard_normal(30_000).astype(np.float32))
    weights = rng.uniform(0.5, 1.5, 20).tolist()
    start = inputs["normal"]

    def run() -> bytes:
        acc = start.copy()
        ops.scatter_add_many(acc, idx_list, val_list, weights)
        single = start.copy()
        ops.scatter_add(single, idx_list[0], val_list[0], weights[0])
        return pack(acc, single)

    assert_all_equal(outputs_for_each_thread_count(threads, run))


@pytest.mark.parametrize("k", [100, 10_000, 500_000])
def test_encode_and_decode_indices(threads, k: int) -> None:
    idx = ops.randomk_indices(N, k, 3)

    def run() -> bytes:
        buf = ops.encode_indices(idx, N)
        return pack(buf, ops.decode_indices(buf, N))

    assert_all_equal(outputs_for_each_thread_count(threads, run))


# ----------------------------------------------------------------- settings --
def test_set_num_threads_rejects_zero_and_negative() -> None:
    before = ops.get_num_threads()
    with pytest.raises(ValueError):
        ops.set_num_threads(0)
    with pytest.raises(ValueError):
        ops.set_num_threads(-1)
    with pytest.raises(TypeError):
        ops.set_num_threads(2.0)  # type: ignore[arg-type]
    assert ops.get_num_threads() == before


def test_get_num_threads_round_trip(threads) -> None:
    assert ops.get_num_threads() >= 1
    for t in (1, 2, 5):
        with threads(t):
            assert ops.get_num_threads() == t


def test_single_thread_fixture(single_thread) -> None:
    assert ops.get_num_threads() == 1
