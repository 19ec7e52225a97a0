"""Arrays at unaligned addresses (np.frombuffer at an odd offset) reach every kernel safely.

Inputs are copied to aligned memory before a kernel reads them through a typed pointer, so
results match those of aligned inputs; arrays updated in place cannot be copied and are
refused. On x86 an unaligned load works anyway: the undefined behaviour these tests guard
against shows in the sanitizer build (scripts/sanitize), which runs this file.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
from fedpress import ops

N = 5000
SEED = 7


def misaligned(a: np.ndarray) -> np.ndarray:
    """A writable copy of a, one byte past an aligned address (bytes are never unaligned)."""
    buf = bytearray(a.nbytes + 1)
    view = np.frombuffer(buf, dtype=a.dtype, offset=1, count=a.size)
    view[...] = a
    assert a.itemsize == 1 or not view.flags.aligned
    return view


def _x() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(N).astype(np.float32)


def _same(a: object, b: object) -> None:
    if isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b)
        for u, v in zip(a, b):
            _same(u, v)
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))
    else:
        assert a == b


def _eden() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return ops.eden_encode(_x(), 4, SEED, block=1024, stochastic=True)


# Each case: a kernel call given a function that prepares its array arguments.
CASES: dict[str, Callable[[Callable[[np.ndarray], np.ndarray]], object]] = {
    "topk": lambda p: ops.topk(p(_x()), 50),
    "threshold_topk": lambda p: ops.threshold_topk(p(_x()), 0.01, seed=SEED),
    "randomk": lambda p: ops.randomk(p(_x()), 50, seed=SEED),
    "quantize": lambda p: ops.quantize(p(_x()), 4, bucket=64, seed=SEED),
    "dequantize": lambda p: ops.dequantize(*map(p, ops.quantize(_x(), 4, bucket=64, seed=SEED)), 4, N, 64),
    "rht": lambda p: ops.rht(p(_x()), SEED, block=1024),
    "irht": lambda p: ops.irht(p(ops.rht(_x(), SEED, block=1024)), N, SEED, block=1024),
    "eden_encode": lambda p: ops.eden_encode(p(_x()), 4, SEED, block=1024),
    "eden_quantize": lambda p: ops.eden_quantize(p(ops.rht(_x(), SEED, block=1024)), N, 4, block=1024),
    "eden_decode": lambda p: ops.eden_decode(
        *map(p, _eden()[:2]),
        N,
        4,
        SEED,
        block=1024,
        stochastic=True,
        outlier_idx=p(_eden()[2]),
        outlier_val=p(_eden()[3]),
    ),
    "eden_dequantize": lambda p: ops.eden_dequantize(
        *map(p, ops.eden_quantize(ops.rht(_x(), SEED, block=1024), N, 4, seed=SEED, block=1024, stochastic=True)[:2]),
        N,
        4,
        block=1024,
        stochastic=True,
    ),
    "encode_indices": lambda p: ops.encode_indices(p(np.arange(0, N, 7, dtype=np.uint32)), N),
    "scatter_add": lambda p: _scatter(p),
}


def _scatter(p: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    acc = np.zeros(N, np.float32)
    idx = np.arange(0, N, 3, dtype=np.uint32)
    ops.scatter_add(acc, p(idx), p(_x()[: idx.size]), 0.5)
    ops.scatter_add_many(
        acc,
        [p(idx), p(idx[::2].copy())],
        [p(_x()[: idx.size]), p(_x()[: idx[::2].size])],
        [1.0, 2.0],
    )
    return acc


@pytest.mark.parametrize("name", sorted(CASES))
def test_unaligned_inputs_give_the_aligned_result(name: str) -> None:
    _same(CASES[name](misaligned), CASES[name](lambda a: a))


def _eden_accumulate(acc: np.ndarray) -> None:
    packed, scales, _, _ = _eden()
    ops.eden_accumulate(acc, packed, scales, N, 4, block=1024, stochastic=True)


@pytest.mark.parametrize(
    "update",
    [
        lambda a: ops.scatter_add(a, np.array([1], np.uint32), np.ones(1, np.float32)),
        lambda a: ops.scatter_add_many(a, [np.array([1], np.uint32)], [np.ones(1, np.float32)]),
        lambda a: ops.ef_topk(np.ones(a.size, np.float32), a, 3),
        lambda a: ops.fwht(a, 1024),
        lambda a: ops.random_signs(a, SEED),
        _eden_accumulate,
    ],
    ids=["scatter_add", "scatter_add_many", "ef_topk", "fwht", "random_signs", "eden_accumulate"],
)
def test_unaligned_arrays_updated_in_place_are_refused(
    update: Callable[[np.ndarray], object],
) -> None:
    acc = misaligned(np.zeros(ops.rht_padded_size(N, 1024), np.float32))
    with pytest.raises(ValueError, match="updated in place and must be 4-byte aligned"):
        update(acc)
    assert not acc.any()
