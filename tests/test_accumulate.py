"""ops.scatter_add / ops.scatter_add_many: sparse accumulation into a float32 vector."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fedpress import _core, ops
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

PARALLEL_ENTRIES = (1 << 17) + 12_345  # enough entries for the multi-threaded path


# ---------------------------------------------------------------- reference --
def reference_add(acc: np.ndarray, idx: np.ndarray, val: np.ndarray, weight: float = 1.0) -> None:
    """np.add.at with the weight applied in float32 first, as the contract states."""
    contrib = (np.float32(weight) * np.asarray(val, dtype=np.float32)).astype(np.float32)
    np.add.at(acc, np.asarray(idx, dtype=np.int64), contrib)


def make_update(
    rng: np.random.Generator, n: int, k: int, *, sort: bool, unique: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    if unique:
        idx = rng.choice(n, size=k, replace=False)
    else:
        idx = rng.integers(0, n, size=k)
    if sort:
        idx = np.sort(idx)
    return idx.astype(np.uint32), rng.standard_normal(k).astype(np.float32)


# -------------------------------------------------------------- scatter_add --
@pytest.mark.parametrize("n", [1, 7, 1001, 300_007])
@pytest.mark.parametrize("sort", [True, False])
@pytest.mark.parametrize("weight", [1.0, 0.3, -2.5])
def test_scatter_add_matches_add_at(n: int, sort: bool, weight: float) -> None:
    rng = np.random.default_rng(n)
    acc = rng.standard_normal(n).astype(np.float32)
    expected = acc.copy()
    idx, val = make_update(rng, n, max(1, n // 10), sort=sort)
    ops.scatter_add(acc, idx, val, weight)
    reference_add(expected, idx, val, weight)
    assert acc.tobytes() == expected.tobytes()


def test_scatter_add_duplicates_accumulate_in_order() -> None:
    acc = np.zeros(4, dtype=np.float32)
    idx = np.array([2, 0, 2, 2, 3, 0], dtype=np.uint32)
    val = np.array([1e8, 1.0, 1.0, -1e8, 5.0, 2.0], dtype=np.float32)
    expected = acc.copy()
    reference_add(expected, idx, val)
    ops.scatter_add(acc, idx, val)
    # Order matters in float32: 1e8 + 1 - 1e8 == 0, which the reference also gets.
    assert acc.tobytes() == expected.tobytes()
    assert acc.tolist() == [3.0, 0.0, 0.0, 5.0]


def test_scatter_add_sorted_with_duplicates() -> None:
    rng = np.random.default_rng(2)
    n = 1000
    idx = np.sort(rng.integers(0, 50, 5000)).astype(np.uint32)
    val = rng.standard_normal(5000).astype(np.float32)
    acc = np.zeros(n, dtype=np.float32)
    expected = acc.copy()
    ops.scatter_add(acc, idx, val, 0.7)
    reference_add(expected, idx, val, 0.7)
    assert acc.tobytes() == expected.tobytes()


@pytest.mark.parametrize("sort", [True, False])
def test_scatter_add_large_parallel(sort: bool) -> None:
    rng = np.random.default_rng(3)
    n = 1_000_003
    acc = rng.standard_normal(n).astype(np.float32)
    expected = acc.copy()
    idx, val = make_update(rng, n, PARALLEL_ENTRIES, sort=sort)
    idx[[0, 1, 2]] = [0, n - 1, n - 1]  # both ends, a duplicate
    if sort:
        idx = np.sort(idx)
    ops.scatter_add(acc, idx, val, 1.5)
    reference_add(expected, idx, val, 1.5)
    assert acc.tobytes() == expected.tobytes()


def test_scatter_add_index_dtypes_and_value_dtypes() -> None:
    rng = np.random.default_rng(4)
    n = 500
    idx, val = make_update(rng, n, 300, sort=False)
    expected = np.zeros(n, dtype=np.float32)
    reference_add(expected, idx, val, 2.0)
    for idx_variant in (
        idx,
        idx.astype(np.int64),
        idx.astype(np.int32),
        idx.astype(np.uint16),
        idx.tolist(),
    ):
        for val_variant in (val, val.astype(np.float64), torch.from_numpy(val)):
            acc = np.zeros(n, dtype=np.float32)
            ops.scatter_add(acc, idx_variant, val_variant, 2.0)
            assert acc.tobytes() == expected.tobytes()


def test_scatter_add_empty_update() -> None:
    acc = np.arange(5, dtype=np.float32)
    ops.scatter_add(acc, np.zeros(0, dtype=np.uint32), np.zeros(0, dtype=np.float32))
    ops.scatter_add(acc, [], [])
    np.testing.assert_array_equal(acc, np.arange(5, dtype=np.float32))
    empty = np.zeros(0, dtype=np.float32)
    ops.scatter_add(empty, [], [])


def test_scatter_add_multidim_acc_uses_flat_indices() -> None:
    acc = np.zeros((3, 4), dtype=np.float32)
    ops.scatter_add(acc, [0, 5, 11], [1.0, 2.0, 3.0])
    assert acc[0, 0] == 1.0 and acc[1, 1] == 2.0 and acc[2, 3] == 3.0
    assert acc.sum() == 6.0


def test_scatter_add_weight_applied_in_float32() -> None:
    acc = np.zeros(1, dtype=np.float32)
    w = 0.1  # not exactly representable; float32(w) * v, not float64 w * v
    v = np.array([3.0], dtype=np.float32)
    ops.scatter_add(acc, [0], v, w)
    assert acc[0] == np.float32(w) * v[0]


@pytest.mark.parametrize("sort", [True, False])
@pytest.mark.parametrize("bad", ["n", "huge", "first"])
def test_scatter_add_out_of_range_leaves_acc_unchanged(sort: bool, bad: str) -> None:
    rng = np.random.default_rng(5)
    n = 300_007
    acc = rng.standard_normal(n).astype(np.float32)
    before = acc.copy()
    idx, val = make_update(rng, n, PARALLEL_ENTRIES, sort=sort)
    bad_value = {"n": n, "huge": 2**32 - 1, "first": n + 5}[bad]
    if bad == "first":
        idx[0] = bad_value
    else:
        idx[-1] = bad_value
    if sort:
        idx = np.sort(idx)
    with pytest.raises(IndexError):
        ops.scatter_add(acc, idx, val)
    assert acc.tobytes() == before.tobytes()


def test_scatter_add_index_beyond_uint32_raises_index_error() -> None:
    acc = np.zeros(10, dtype=np.float32)
    with pytest.raises(IndexError):
        ops.scatter_add(acc, np.array([1, 2**32 + 1], dtype=np.int64), [1.0, 2.0])
    assert not acc.any()


@pytest.mark.parametrize("idx_dtype", [np.int64, np.int32, np.int8])
def test_scatter_add_negative_index(idx_dtype: type) -> None:
    acc = np.ones(10, dtype=np.float32)
    with pytest.raises(IndexError):
        ops.scatter_add(acc, np.array([1, -1, 3], dtype=idx_dtype), [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(acc, np.ones(10, dtype=np.float32))


def test_scatter_add_length_mismatch() -> None:
    acc = np.zeros(10, dtype=np.float32)
    with pytest.raises(ValueError):
        ops.scatter_add(acc, [1, 2, 3], [1.0, 2.0])
    with pytest.raises(ValueError):
        ops.scatter_add(acc, [1], [1.0, 2.0])
    assert not acc.any()


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32])
def test_scatter_add_non_float32_acc(dtype: type) -> None:
    acc = np.zeros(10, dtype=dtype)
    with pytest.raises(TypeError):
        ops.scatter_add(acc, [1], [1.0])


def test_scatter_add_non_array_acc() -> None:
    with pytest.raises(TypeError):
        ops.scatter_add([0.0, 0.0], [1], [1.0])  # type: ignore[arg-type]


def test_scatter_add_read_only_acc() -> None:
    acc = np.zeros(10, dtype=np.float32)
    acc.setflags(write=False)
    with pytest.raises(ValueError):
        ops.scatter_add(acc, [1], [1.0])
    assert not acc.any()


def test_scatter_add_non_contiguous_acc() -> None:
    base = np.zeros(20, dtype=np.float32)
    with pytest.raises(ValueError):
        ops.scatter_add(base[::2], [1], [1.0])
    assert not base.any()


def test_scatter_add_float_indices_rejected() -> None:
    with pytest.raises(TypeError):
        ops.scatter_add(np.zeros(10, dtype=np.float32), np.array([1.0]), [1.0])


def test_scatter_add_torch_acc_in_place() -> None:
    rng = np.random.default_rng(6)
    n = 2000
    t = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
    expected = t.numpy().copy()
    idx, val = make_update(rng, n, 500, sort=False)
    ops.scatter_add(t, torch.from_numpy(idx.astype(np.int64)), torch.from_numpy(val), 0.5)
    reference_add(expected, idx, val, 0.5)
    assert t.numpy().tobytes() == expected.tobytes()
    # a parameter-like tensor that requires grad is updated in place as well
    p = torch.zeros(n, requires_grad=True)
    ops.scatter_add(p, idx, val)
    ref2 = np.zeros(n, dtype=np.float32)
    reference_add(ref2, idx, val)
    assert p.detach().numpy().tobytes() == ref2.tobytes()


def test_scatter_add_torch_acc_wrong_dtype_or_layout() -> None:
    with pytest.raises(TypeError):
        ops.scatter_add(torch.zeros(10, dtype=torch.float64), [1], [1.0])
    with pytest.raises(ValueError):
        ops.scatter_add(torch.zeros(4, 5).t(), [1], [1.0])


# --------------------------------------------------------- scatter_add_many --
def clients(
    n: int, count: int, k: int, seed: int, *, sort: bool
) -> tuple[list[np.ndarray], list[np.ndarray], list[float]]:
    rng = np.random.default_rng(seed)
    idx_list, val_list = [], []
    for _ in range(count):
        idx, val = make_update(rng, n, k, sort=sort, unique=sort)
        idx_list.append(idx)
        val_list.append(val)
    weights = rng.uniform(0.1, 2.0, count).astype(np.float64).tolist()
    return idx_list, val_list, weights


@pytest.mark.parametrize(
    ("n_clients", "n", "k"),
    [
        (1, 1_000_000, 10_000),
        (5, 1_000_000, 10_000),
        (100, 1_000_000, 10_000),
        (5, 1001, 50),
        (3, 7, 5),
    ],
)
@pytest.mark.parametrize("sort", [True, False])
def test_scatter_add_many_matches_sequential(n_clients: int, n: int, k: int, sort: bool) -> None:
    idx_list, val_list, weights = clients(n, n_clients, k, seed=n_clients + k, sort=sort)
    rng = np.random.default_rng(0)
    start = rng.standard_normal(n).astype(np.float32)

    acc = start.copy()
    ops.scatter_add_many(acc, idx_list, val_list, weights)

    via_add_at = start.copy()
    for idx, val, w in zip(idx_list, val_list, weights):
        reference_add(via_add_at, idx, val, w)
    np.testing.assert_allclose(acc, via_add_at, rtol=1e-5, atol=1e-6)

    via_scatter_add = start.copy()
    for idx, val, w in zip(idx_list, val_list, weights):
        ops.scatter_add(via_scatter_add, idx, val, w)
    assert acc.tobytes() == via_scatter_add.tobytes()


@pytest.mark.parametrize("n", [3 * 2**15, 3 * 2**15 + 1, 2**17 - 1, 2**17])
@pytest.mark.parametrize("n_threads", [1, 2, 3, 8])
def test_scatter_add_many_range_boundaries(threads, n: int, n_threads: int) -> None:
    # Entries on and around every multiple of 2^13..2^17 (candidate block
    # sizes), the first and last element, many clients, and enough entries in
    # total for the multi-threaded split.
    rng = np.random.default_rng(n)
    edges = np.array(
        [0, 1, n - 2, n - 1] + [m + d for s in range(13, 18) for m in range(2**s, n, 2**s) for d in (-1, 0, 1)]
    )
    edges = edges[(edges >= 0) & (edges < n)]
    idx_list, val_list = [], []
    for _ in range(6):
        idx = np.sort(np.concatenate([edges, edges, rng.integers(0, n, 25_000)])).astype(np.uint32)
        idx_list.append(idx)
        val_list.append(rng.standard_normal(idx.size).astype(np.float32))
    weights = rng.uniform(-2, 2, 6).tolist()
    start = rng.standard_normal(n).astype(np.float32)
    with threads(n_threads):
        acc = start.copy()
        ops.scatter_add_many(acc, idx_list, val_list, weights)
        sequential = start.copy()
        for idx, val, w in zip(idx_list, val_list, weights):
            ops.scatter_add(sequential, idx, val, w)
    expected = start.copy()
    for idx, val, w in zip(idx_list, val_list, weights):
        reference_add(expected, idx, val, w)
    assert sequential.tobytes() == expected.tobytes()
    assert acc.tobytes() == expected.tobytes()


def test_scatter_add_many_exact_client_order() -> None:
    # Within one element, additions happen in client order: the float32 result
    # is exactly that of sequential np.add.at, cancellation included.
    acc = np.zeros(3, dtype=np.float32)
    idx_list = [np.array([0, 1], np.uint32), np.array([0], np.uint32), np.array([0, 2], np.uint32)]
    val_list = [
        np.array([1e8, 1], np.float32),
        np.array([1], np.float32),
        np.array([-1e8, 4], np.float32),
    ]
    ops.scatter_add_many(acc, idx_list, val_list)
    expected = np.zeros(3, dtype=np.float32)
    for idx, val in zip(idx_list, val_list):
        reference_add(expected, idx, val)
    assert acc.tobytes() == expected.tobytes()


def test_scatter_add_many_unsorted_with_duplicates_matches_add_at() -> None:
    rng = np.random.default_rng(7)
    n = 200_003
    idx_list = [rng.integers(0, 1000, 60_000).astype(np.uint32) for _ in range(4)]
    val_list = [rng.standard_normal(60_000).astype(np.float32) for _ in range(4)]
    weights = [1.0, -1.0, 0.5, 3.0]
    acc = np.zeros(n, dtype=np.float32)
    ops.scatter_add_many(acc, idx_list, val_list, weights)
    expected = np.zeros(n, dtype=np.float32)
    sequential = np.zeros(n, dtype=np.float32)
    for idx, val, w in zip(idx_list, val_list, weights):
        reference_add(expected, idx, val, w)
        ops.scatter_add(sequential, idx, val, w)
    np.testing.assert_allclose(acc, expected, rtol=1e-5, atol=1e-5)
    assert acc.tobytes() == sequential.tobytes()
    # the caller's arrays are not reordered
    assert np.any(np.diff(idx_list[0].astype(np.int64)) < 0)


def test_scatter_add_many_default_weights_are_one() -> None:
    idx_list, val_list, _ = clients(10_000, 4, 500, seed=8, sort=False)
    a = np.zeros(10_000, dtype=np.float32)
    b = np.zeros(10_000, dtype=np.float32)
    ops.scatter_add_many(a, idx_list, val_list)
    ops.scatter_add_many(b, idx_list, val_list, [1.0] * 4)
    assert a.tobytes() == b.tobytes()
    c = np.zeros(10_000, dtype=np.float32)
    for idx, val in zip(idx_list, val_list):
        reference_add(c, idx, val)
    assert a.tobytes() == c.tobytes()


def test_scatter_add_many_no_clients() -> None:
    acc = np.ones(10, dtype=np.float32)
    ops.scatter_add_many(acc, [], [])
    ops.scatter_add_many(acc, [], [], [])
    np.testing.assert_array_equal(acc, np.ones(10, dtype=np.float32))


def test_scatter_add_many_mixed_inputs() -> None:
    rng = np.random.default_rng(9)
    n = 5000
    idx0, val0 = make_update(rng, n, 100, sort=True)
    idx1, val1 = make_update(rng, n, 100, sort=False)
    acc = torch.zeros(n)
    ops.scatter_add_many(
        acc,
        (torch.from_numpy(idx0.astype(np.int64)), idx1.tolist(), np.zeros(0, np.uint32)),
        (torch.from_numpy(val0), val1.astype(np.float64), np.zeros(0, np.float32)),
        (2.0, 0.5, 7.0),
    )
    expected = np.zeros(n, dtype=np.float32)
    reference_add(expected, idx0, val0, 2.0)
    reference_add(expected, idx1, val1, 0.5)
    assert acc.numpy().tobytes() == expected.tobytes()


@pytest.mark.parametrize("sort", [True, False])
def test_scatter_add_many_out_of_range_in_last_client(sort: bool) -> None:
    n = 1_000_000
    idx_list, val_list, weights = clients(n, 5, 10_000, seed=10, sort=sort)
    idx_list[-1] = idx_list[-1].copy()
    idx_list[-1][len(idx_list[-1]) // 2] = n  # one past the end
    if sort:
        idx_list[-1] = np.sort(idx_list[-1])
    acc = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    before = acc.copy()
    with pytest.raises(IndexError):
        ops.scatter_add_many(acc, idx_list, val_list, weights)
    assert acc.tobytes() == before.tobytes()


def test_scatter_add_many_negative_index_in_last_client() -> None:
    acc = np.zeros(100, dtype=np.float32)
    with pytest.raises(IndexError):
        ops.scatter_add_many(acc, [[1, 2], [3, -4]], [[1.0, 1.0], [1.0, 1.0]])
    assert not acc.any()


def test_scatter_add_many_length_mismatches() -> None:
    acc = np.zeros(100, dtype=np.float32)
    idx_list = [np.array([1, 2], np.uint32), np.array([3], np.uint32)]
    val_list = [np.array([1, 2], np.float32), np.array([3], np.float32)]
    with pytest.raises(ValueError):
        ops.scatter_add_many(acc, idx_list, val_list[:1])
    with pytest.raises(ValueError):
        ops.scatter_add_many(acc, idx_list[:1], val_list)
    with pytest.raises(ValueError):
        ops.scatter_add_many(acc, idx_list, val_list, [1.0])
    with pytest.raises(ValueError):
        ops.scatter_add_many(acc, idx_list, val_list, [1.0, 1.0, 1.0])
    # one client's indices and values differ in length (sorted and unsorted)
    with pytest.raises(ValueError):
        ops.scatter_add_many(acc, [np.array([1, 2], np.uint32)], [np.array([1.0], np.float32)])
    with pytest.raises(ValueError):
        ops.scatter_add_many(acc, [np.array([5, 2, 9], np.uint32)], [np.array([1.0, 2.0], np.float32)])
    assert not acc.any()


def test_scatter_add_many_bad_acc() -> None:
    with pytest.raises(TypeError):
        ops.scatter_add_many(np.zeros(10, dtype=np.float64), [[1]], [[1.0]])
    ro = np.zeros(10, dtype=np.float32)
    ro.setflags(write=False)
    with pytest.raises(ValueError):
        ops.scatter_add_many(ro, [[1]], [[1.0]])


# --------------------------------------------------------------- properties --
@given(
    n=st.integers(1, 300),
    data=st.data(),
    weight=st.floats(-10, 10, allow_nan=False),
)
def test_property_scatter_add(n: int, data: st.DataObject, weight: float) -> None:
    k = data.draw(st.integers(0, 400))
    idx = data.draw(hnp.arrays(np.uint32, k, elements=st.integers(0, n - 1)))
    val = data.draw(hnp.arrays(np.float32, k, elements=st.floats(-1e6, 1e6, width=32)))
    if data.draw(st.booleans()):
        idx = np.sort(idx)
    acc = data.draw(hnp.arrays(np.float32, n, elements=st.floats(-1e6, 1e6, width=32)))
    expected = acc.copy()
    ops.scatter_add(acc, idx, val, weight)
    reference_add(expected, idx, val, weight)
    assert acc.tobytes() == expected.tobytes()


@given(n=st.integers(1, 200), n_clients=st.integers(0, 6), data=st.data())
def test_property_scatter_add_many(n: int, n_clients: int, data: st.DataObject) -> None:
    idx_list, val_list, weights = [], [], []
    for _ in range(n_clients):
        k = data.draw(st.integers(0, 100))
        idx_list.append(data.draw(hnp.arrays(np.uint32, k, elements=st.integers(0, n - 1))))
        val_list.append(data.draw(hnp.arrays(np.float32, k, elements=st.floats(-1e3, 1e3, width=32))))
        weights.append(data.draw(st.floats(-4, 4)))
    acc = np.zeros(n, dtype=np.float32)
    ops.scatter_add_many(acc, idx_list, val_list, weights)
    expected = np.zeros(n, dtype=np.float32)
    sequential = np.zeros(n, dtype=np.float32)
    for idx, val, w in zip(idx_list, val_list, weights):
        reference_add(expected, idx, val, w)
        ops.scatter_add(sequential, idx, val, w)
    np.testing.assert_allclose(acc, expected, rtol=1e-5, atol=1e-3)
    assert acc.tobytes() == sequential.tobytes()


def test_scatter_add_each_adds_into_each_accumulator() -> None:
    """_core.scatter_add_each: a model's tensors, one (indices, values) each, in one call."""
    from fedpress import _core

    rng = np.random.default_rng(2)
    sizes = [10, 0, 200_000, 5]
    accs = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    want = [a.copy() for a in accs]
    idx = [np.sort(rng.choice(n, min(n, 3 + n // 10), replace=False)).astype(np.uint32) for n in sizes]
    val = [rng.standard_normal(i.size).astype(np.float32) for i in idx]
    for w, i, v in zip(want, idx, val):
        ops.scatter_add(w, i, v, -1.0)
    _core.scatter_add_each(accs, idx, val, -1.0)
    for a, w in zip(accs, want):
        assert a.tobytes() == w.tobytes()
    shared = np.zeros(8, np.float32)
    with pytest.raises(ValueError, match="shares memory with another accumulator"):
        _core.scatter_add_each([shared[:5], shared[3:]], [idx[0][:0]] * 2, [val[0][:0]] * 2, 1.0)
    with pytest.raises(IndexError, match=r"indices\[0\] holds 9, out of range for an accumulator of 5"):
        _core.scatter_add_each([np.zeros(5, np.float32)], [np.array([9], np.uint32)], [np.ones(1, np.float32)], 1.0)
    with pytest.raises(ValueError, match="equal lengths"):
        _core.scatter_add_each([np.zeros(5, np.float32)], [], [], 1.0)


@pytest.mark.parametrize("n", [0, 7, 70_000, 1_000_003])
def test_divide_gives_numpys_float32_division(n: int) -> None:
    """_core.divide (an aggregate's mean, in parallel): numpy's in-place float32 division, bit for bit."""
    from fedpress import _core

    x = (np.random.default_rng(n).standard_normal(n) * 1e3).astype(np.float32)
    for divisor in (3.0, 7.1, 1e-3, 123456.789):
        want, got = x.copy(), x.copy()
        want /= np.float32(divisor)
        _core.divide(got, divisor)
        assert got.tobytes() == want.tobytes()
    with pytest.raises(ValueError, match="acc must be writable"):
        ro = np.zeros(3, np.float32)
        ro.setflags(write=False)
        _core.divide(ro, 2.0)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_sparse_adds_into_large_accumulators_match_numpy(threads: int) -> None:
    """The one-client walk fetches accumulator lines ahead, and scatter_add_each cuts each
    large accumulator into runs of ranges for the threads: the sums stay exactly numpy's
    (sorted indices: one addition per element, so no order question arises)."""
    from fedpress import _core

    rng = np.random.default_rng(31)
    sizes = [3_000_000, 70_000, 1, 0, 1_000_001]
    accs = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    idx = [np.sort(rng.choice(n, n // 10 + (n > 0), replace=False)).astype(np.uint32) for n in sizes]
    val = [rng.standard_normal(i.size).astype(np.float32) for i in idx]
    want = [a.copy() for a in accs]
    for w, i, v in zip(want, idx, val):
        w[i] -= v  # weight -1: exact products, whatever the compiler contracts
    previous = ops.get_num_threads()
    ops.set_num_threads(threads)
    try:
        each = [a.copy() for a in accs]
        _core.scatter_add_each(each, idx, val, -1.0)
        one = [a.copy() for a in accs]
        for a, i, v in zip(one, idx, val):
            ops.scatter_add(a, i, v, -1.0)
    finally:
        ops.set_num_threads(previous)
    for w, e, o in zip(want, each, one):
        assert e.tobytes() == w.tobytes()
        assert o.tobytes() == w.tobytes()


# ------------------------------------------------- indices changed while added --
@pytest.mark.parametrize("call", ["scatter_add", "scatter_add_many", "scatter_add_each"])
def test_indices_changed_by_another_thread_never_write_outside_acc(call: str) -> None:
    """The kernels read the caller's index array without the GIL, after checking it:
    another thread rewriting it meanwhile (out of range, unsorted) makes the sum wrong,
    as that thread asked, but never writes outside the accumulator (guard zones around
    it stay untouched) and never crashes."""
    import threading

    n, guard = 1 << 20, 1 << 16
    buffer = np.zeros(n + 2 * guard, np.float32)
    acc = buffer[guard : guard + n]
    rng = np.random.default_rng(5)
    idx = np.sort(rng.choice(n, PARALLEL_ENTRIES, replace=False)).astype(np.uint32)
    good, val = idx.copy(), np.ones(idx.size, np.float32)
    stop = threading.Event()

    def rewrite() -> None:
        forms = [good, np.full_like(good, 2**32 - 1), good[::-1].copy(), good + np.uint32(n // 2)]
        i = 0
        while not stop.is_set():
            idx[...] = forms[i % len(forms)]
            i += 1

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        for _ in range(200):
            try:
                if call == "scatter_add":
                    ops.scatter_add(acc, idx, val)
                elif call == "scatter_add_many":
                    ops.scatter_add_many(acc, [idx, idx], [val, val])
                else:
                    _core.scatter_add_each([acc], [idx], [val], 1.0)  # the Encoder's correction
            except IndexError:
                pass  # the check saw an out-of-range form: refused, as it should be
    finally:
        stop.set()
        writer.join()
    assert not buffer[:guard].any() and not buffer[guard + n :].any()
