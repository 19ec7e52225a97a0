"""Version 2 index streams decoded as they are added (_core.IndexStream, _core.add_streams),
and decoded whole, on every SIMD path, thread count and Rice parameter: the same indices and
the same sums, bit for bit, as decoding first and scattering with ops.scatter_add_many."""

from __future__ import annotations

import fedpress as fp
import numpy as np
import pytest
from conftest import SIMD_LEVELS, num_threads
from fedpress import DecodeError, _core, ops
from fedpress.format import decoding
from fedpress.format.reader import parse

PARALLEL_ENTRIES = (1 << 17) + 12_345  # enough entries for the multi-threaded path


def index_set(rng: np.random.Generator, n: int, k: int, clustered: bool = False) -> np.ndarray:
    if clustered:  # runs of neighbours: small gaps, and long ones between the runs
        starts = np.sort(rng.choice(max(1, n - 64), size=max(1, k // 32), replace=False))
        idx = np.unique(np.concatenate([s + np.arange(32) for s in starts]))
        return idx[idx < n][:k].astype(np.uint32)
    return np.sort(rng.choice(n, size=k, replace=False)).astype(np.uint32)


def streams(n: int, sets: list[np.ndarray], rng: np.random.Generator) -> tuple[list, list]:
    values = [rng.standard_normal(s.size).astype(np.float32) for s in sets]
    checked = [_core.IndexStream(ops.encode_indices(s, n), n, s.size, v, True) for s, v in zip(sets, values)]
    return checked, values


# (n, k): every Rice parameter region (dense sets have l = 0, sparse ones up to 2^25 and
# beyond, where the wide path stops), counts that are not multiples of 8, single indices.
SHAPES = [(1, 1), (7, 3), (100, 100), (1000, 9), (4099, 4097), (70_000, 650), (1 << 20, 8191), (1 << 26, 3)]


@pytest.mark.parametrize("level", SIMD_LEVELS)
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_decode_matches_on_every_path(level: str, n: int, k: int, simd) -> None:
    rng = np.random.default_rng(n + k)
    for clustered in (False, True):
        idx = index_set(rng, n, k, clustered)
        buf = ops.encode_indices(idx, n)
        with simd(level):
            np.testing.assert_array_equal(ops.decode_indices(buf, n), idx)


@pytest.mark.parametrize("level", SIMD_LEVELS)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_add_streams_equals_scatter_add_many(level: str, threads: int, simd) -> None:
    rng = np.random.default_rng(threads)
    n = 3 * (1 << 20) + 17
    sets = [index_set(rng, n, k, clustered=c % 2 == 1) for c, k in enumerate([40_000, 90_001, 3, 0, 60_000, 1200])]
    assert sum(s.size for s in sets) > PARALLEL_ENTRIES
    weights = [1.0, 0.5, 2.0, 1.0, 0.25, 3.0]
    checked, values = streams(n, sets, rng)
    expected = rng.standard_normal(n).astype(np.float32)
    got = expected.copy()
    ops.scatter_add_many(expected, sets, values, weights)
    with simd(level), num_threads(threads):
        _core.add_streams(got, checked, weights)
    np.testing.assert_array_equal(got, expected)


def rice_parameter(stream: bytes) -> int:
    """The Rice parameter byte, after the count's varint."""
    at = 0
    while stream[at] & 0x80:
        at += 1
    return stream[at + 1]


@pytest.mark.parametrize("level", SIMD_LEVELS)
def test_every_small_parameter_sums_its_lows_on_every_path(level: str, simd) -> None:
    # The check sums the low bits of every checkpoint chunk (4096 indices) to find the last
    # index: by bit classes with AVX-512's popcount for parameters up to 12, by groups of
    # eight above and without it. Counts on either side of the chunks' edges, every
    # parameter from 1 to 14; the last index must be below n exactly.
    rng = np.random.default_rng(7)
    seen = set()
    for target in range(1, 15):
        gap = (1 << target) * 1.3
        for k in (1, 7, 8, 63, 64, 65, 4095, 4096, 4097, 8192 + 37):
            n = int(k * gap) + 2
            idx = np.sort(rng.choice(n, size=k, replace=False)).astype(np.uint32)
            buf = ops.encode_indices(idx, n)
            seen.add(rice_parameter(buf))
            values = np.ones(k, np.float32)
            with simd(level):
                np.testing.assert_array_equal(ops.decode_indices(buf, n), idx)
                _core.IndexStream(buf, int(idx[-1]) + 1, k, values, True)
                # (with fewer than k positions below idx[-1], the count is refused first)
                with pytest.raises(DecodeError, match="beyond n" if idx[-1] >= k else "exceeds n"):
                    _core.IndexStream(buf, int(idx[-1]), k, values, True)
    assert set(range(1, 15)) <= seen


@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_add_streams_any_parameter(n: int, k: int) -> None:
    rng = np.random.default_rng(k)
    sets = [index_set(rng, n, k), index_set(rng, n, max(1, k // 2), clustered=True)]
    checked, values = streams(n, sets, rng)
    expected = np.zeros(n, np.float32)
    ops.scatter_add_many(expected, sets, values, [1.0, 1.0])
    got = np.zeros(n, np.float32)
    _core.add_streams(got, checked, [1.0, 1.0])
    np.testing.assert_array_equal(got, expected)


def test_values_may_be_payload_bytes_at_any_address() -> None:
    n, idx = 1000, np.array([3, 500, 999], np.uint32)
    raw = b"\x01" + np.array([1.5, -2.0, 4.0], "<f4").tobytes()  # at offset 1: not 4-byte aligned
    stream = _core.IndexStream(ops.encode_indices(idx, n), n, 3, memoryview(raw)[1:], True)
    acc = np.zeros(n, np.float32)
    _core.add_streams(acc, [stream], [2.0])
    assert acc[[3, 500, 999]].tolist() == [3.0, -4.0, 8.0] and np.count_nonzero(acc) == 3


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused_when_checked(bad: float) -> None:
    buf = ops.encode_indices([1, 2], 10)
    values = np.array([1.0, bad], np.float32)
    with pytest.raises(DecodeError, match="NaN or infinity"):
        _core.IndexStream(buf, 10, 2, values, True)
    _core.IndexStream(buf, 10, 2, values, False)  # the caller vouches for decoded values


def test_malformed_streams_and_mismatches_are_refused() -> None:
    good = ops.encode_indices(np.array([3, 17, 90], np.uint32), 100)
    values = np.ones(3, np.float32)
    for bad, n, count, what in [
        (good[:-1], 100, 3, "unary"),
        (good + b"\x00", 100, 3, "zero byte"),
        (good, 50, 3, "beyond n"),
        (good, 100, 2, "exceeds the limit"),
        (ops.encode_indices(np.array([3, 17], np.uint32), 100), 100, 3, "holds 2 indices"),
        (b"\x03\x20" + good[2:], 100, 3, "Rice parameter"),
    ]:
        with pytest.raises(DecodeError, match=what):
            _core.IndexStream(bad, n, count, values[:count], True)
    with pytest.raises(ValueError, match="bytes"):
        _core.IndexStream(good, 100, 3, np.ones(2, np.float32), True)
    stream = _core.IndexStream(good, 100, 3, values, True)
    with pytest.raises(ValueError, match="acc holds"):
        _core.add_streams(np.zeros(99, np.float32), [stream], [1.0])
    with pytest.raises(ValueError, match="lengths differ"):
        _core.add_streams(np.zeros(100, np.float32), [stream], [1.0, 2.0])
    with pytest.raises(TypeError):
        _core.add_streams(np.zeros(100, np.float64), [stream], [1.0])


def test_buffers_outlive_the_caller_references() -> None:
    """The stream keeps the bytes it points into: dropping the caller's names is safe."""
    n, idx = 5000, np.arange(0, 5000, 7, dtype=np.uint32)
    buf = bytearray(ops.encode_indices(idx, n))
    values = np.full(idx.size, 2.0, np.float32)
    stream = _core.IndexStream(buf, n, idx.size, values, True)
    del buf, values
    acc = np.zeros(n, np.float32)
    _core.add_streams(acc, [stream], [1.0])
    assert acc.sum() == 2.0 * idx.size and stream.count == idx.size and stream.n == n


def test_deferred_streams_are_checked_by_check_payloads() -> None:
    """A deferred stream is refused by add_streams until check_payloads checks it; then it
    adds what a stream checked on construction adds."""
    rng = np.random.default_rng(7)
    n = 50_000
    sets = [index_set(rng, n, k) for k in (1, 900, PARALLEL_ENTRIES // 4)]
    values = [rng.standard_normal(s.size).astype(np.float32) for s in sets]
    deferred = [
        _core.IndexStream(ops.encode_indices(s, n), n, s.size, v, True, deferred=True) for s, v in zip(sets, values)
    ]
    assert not any(s.checked for s in deferred)
    with pytest.raises(ValueError, match="deferred"):
        _core.add_streams(np.zeros(n, np.float32), deferred[:1], [1.0])
    results = _core.check_payloads([(None, [], [s]) for s in deferred])
    assert results == [(None, [], None, "")] * 3
    assert all(s.checked for s in deferred)
    acc, expected = np.zeros(n, np.float32), np.zeros(n, np.float32)
    _core.add_streams(acc, deferred, [1.0, 0.5, 2.0])
    ops.scatter_add_many(expected, sets, values, [1.0, 0.5, 2.0])
    np.testing.assert_array_equal(acc, expected)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_check_payloads_reports_each_payload_on_its_own(threads) -> None:
    """Per item: the checksum of its bytes, its jobs' finiteness and the first of its streams
    that fails; the other items are unaffected, whatever the thread count (many items run one
    per thread, a few with the checksum in parallel pieces)."""
    good = ops.encode_indices(np.array([3, 17, 90], np.uint32), 100)
    values = np.ones(3, np.float32)
    blob = np.random.default_rng(3).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()  # beyond 2 pieces
    nan_bytes = np.array([1.0, np.nan, 2.0], np.float32).tobytes()
    old = _core.num_threads()
    try:
        _core.set_num_threads(threads)
        for copies in (1, 8):  # a few items, and many
            items = []
            for _ in range(copies):
                items += [
                    (blob, [], []),
                    (nan_bytes, [(0, "fp32-finite", 3, None), (8, "fp32-finite", 1, None)], []),
                    (
                        None,
                        [],
                        [
                            _core.IndexStream(good, 100, 3, values, True, deferred=True),
                            _core.IndexStream(good[:-1], 100, 3, values, True, deferred=True),
                            _core.IndexStream(good, 100, 3, values, True, deferred=True),
                        ],
                    ),
                ]
            results = _core.check_payloads(items)
            for i in range(copies):
                crc, finite, failed, error = results[3 * i]
                assert crc == _core.crc32c(blob) and finite == [] and failed is None
                assert results[3 * i + 1][:3] == (_core.crc32c(nan_bytes), [False, True], None)
                _, _, failed, error = results[3 * i + 2]
                assert failed == 1 and "unary" in error
                streams_of_item = items[3 * i + 2][2]
                assert [s.checked for s in streams_of_item] == [True, False, False]
    finally:
        _core.set_num_threads(old)


def test_check_payloads_refuses_misuse() -> None:
    good = ops.encode_indices(np.array([3, 17, 90], np.uint32), 100)
    stream = _core.IndexStream(good, 100, 3, np.ones(3, np.float32), True, deferred=True)
    with pytest.raises(ValueError, match="twice"):
        _core.check_payloads([(None, [], [stream]), (None, [], [stream])])
    with pytest.raises(ValueError, match="no bytes"):
        _core.check_payloads([(None, [(0, "fp32-finite", 1, None)], [])])
    with pytest.raises(ValueError, match="past the buffer"):
        _core.check_payloads([(b"abcd", [(0, "fp32-finite", 2, None)], [])])
    with pytest.raises(ValueError, match="an item is"):
        _core.check_payloads([(b"abcd", [])])
    assert not stream.checked
    _core.check_payloads([(None, [], [stream])])
    assert stream.checked
    assert _core.check_payloads([(None, [], [stream])]) == [(None, [], None, "")]  # checked once is enough


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_planned_index_streams_equal_encode_indices(threads: int) -> None:
    """A payload's index streams planned in one call and written in place by assemble, the
    pieces spread over the threads: each the same bytes as encode_indices makes of it
    alone; a refusal names the first bad array."""
    rng = np.random.default_rng(12)
    cases = [(n, k) for n, k in ((10, 0), (1, 1), (1000, 7), (2**32, 3), (300_000, 3_000), (2_000_000, 150_000))]
    sets = [index_set(rng, min(n, 2_000_000), k, clustered=i % 2 == 1) for i, (n, k) in enumerate(cases)]
    sizes = [n for n, _ in cases]
    with num_threads(threads):
        plans = _core.plan_indices_many(sets, sizes)
        got = _core.assemble([("rice", s, n, rice, size) for s, n, (rice, size) in zip(sets, sizes, plans)], False)
    assert bytes(got) == b"".join(ops.encode_indices(s, n) for s, n in zip(sets, sizes))
    assert [size for _, size in plans] == [len(ops.encode_indices(s, n)) for s, n in zip(sets, sizes)]
    assert _core.plan_indices_many([], []) == []
    descending = np.array([5, 3], np.uint32)
    beyond = np.array([1, 9], np.uint32)
    with pytest.raises(ValueError, match=r"^array 1: "):
        _core.plan_indices_many([sets[2], descending, beyond], [1000, 1000, 9])
    with pytest.raises(ValueError, match=r"^array 2: "):
        _core.plan_indices_many([sets[2], sets[2], beyond], [1000, 1000, 9])
    with pytest.raises(ValueError, match="equal lengths"):
        _core.plan_indices_many([sets[2]], [])
    with pytest.raises(ValueError, match=r"n_list\[0\] must be <= 2\^32"):
        _core.plan_indices_many([sets[2]], [2**32 + 1])
    with pytest.raises(TypeError, match=r"indices_list\[0\]"):
        _core.plan_indices_many([np.array([1.5])], [10])


def quantized_streams(n: int, sets: list[np.ndarray], bits: int, bucket: int, rng: np.random.Generator):
    """Each set's stream with quantized values (codes and scales at odd addresses, as in a
    payload), and the float32 values dequantize gives them."""
    streams, values = [], []
    for s in sets:
        packed, scales = ops.quantize(rng.standard_normal(s.size).astype(np.float32), bits, bucket=bucket, seed=3)
        raw = b"\x00" + scales.astype("<f4").tobytes() + packed.tobytes()  # one byte off: unaligned
        codes_at = memoryview(raw)[1 + scales.nbytes :]
        scales_at = np.frombuffer(raw, "<f4", count=scales.size, offset=1)
        streams.append(
            _core.IndexStream.quantized(ops.encode_indices(s, n), n, s.size, codes_at, scales_at, bits, bucket)
        )
        values.append(ops.dequantize(packed, scales, bits, s.size, bucket))
    return streams, values


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_quantized_streams_add_what_dequantize_gives(bits: int, threads: int) -> None:
    # Codes added as dequantize gives them, bit for bit: buckets that are not a multiple of a
    # run, counts that are not of 8, one stream (the fetch-ahead path) and many.
    rng = np.random.default_rng(bits * 10 + threads)
    n = 3 * (1 << 20) + 17
    sets = [index_set(rng, n, k, clustered=c % 2 == 1) for c, k in enumerate([40_001, 90_000, 3, 0, 60_007, 1201])]
    for bucket in (1, 37, 512, 1 << 20):
        streams, values = quantized_streams(n, sets, bits, bucket, rng)
        weights = [1.0, 0.5, 2.0, 1.0, 0.25, 3.0]
        for pick in (slice(None), slice(1, 2)):
            expected = rng.standard_normal(n).astype(np.float32)
            got = expected.copy()
            ops.scatter_add_many(expected, sets[pick], values[pick], weights[pick])
            with num_threads(threads):
                _core.add_streams(got, streams[pick], weights[pick])
            np.testing.assert_array_equal(got, expected)


def test_quantized_streams_refuse_bad_sections_and_shapes() -> None:
    n, idx = 1000, np.array([3, 500, 999], np.uint32)
    buf = ops.encode_indices(idx, n)
    packed, scales = ops.quantize(np.array([1.0, -2.0, 0.5], np.float32), 4, bucket=2, seed=1)
    _core.IndexStream.quantized(buf, n, 3, packed, scales, 4, 2)
    for bad_scale in (-1.0, np.nan, np.inf):
        with pytest.raises(DecodeError, match="negative or non-finite scale"):
            _core.IndexStream.quantized(buf, n, 3, packed, np.array([1.0, bad_scale], np.float32), 4, 2)
    padded = packed.copy()
    padded[-1] |= 0xF0  # 3 codes of 4 bits: the last byte's high half is padding
    with pytest.raises(DecodeError, match="padding"):
        _core.IndexStream.quantized(buf, n, 3, padded, scales, 4, 2)
    for args, what in [
        ((packed[:-1], scales, 4, 2), "codes hold"),
        ((packed, scales[:1], 4, 2), "scales hold"),
        ((packed, scales, 3, 2), "bits"),
        ((packed, scales, 4, 0), "bucket"),
    ]:
        with pytest.raises(ValueError, match=what):
            _core.IndexStream.quantized(buf, n, 3, *args)
    deferred = _core.IndexStream.quantized(buf, n, 3, padded, scales, 4, 2, deferred=True)
    assert not deferred.checked
    ((crc, _, failed, error),) = _core.check_payloads([(None, [], [deferred])])
    assert failed == 0 and "padding" in error


@pytest.mark.parametrize("spec", ["topk:0.02+q8", "topk:0.02+q4", "topk:0.02+q2", "topk:0.02+sign", "topk:0.02+fp16"])
def test_one_records_stream_adds_its_codes_as_decode_does(spec: str) -> None:
    """``decoding.index_stream`` of one record (the path a tensor left out of a batch
    takes) adds a quantized section from its codes: the decoded tensor, bit for bit; a
    section with a bad scale is refused by tensor name."""
    x = np.random.default_rng(8).standard_normal(50_000).astype(np.float32)
    payload = fp.Codec(spec).encode({"w": x}, seed=4)
    (rec,) = parse(payload).tensors
    acc = np.zeros(rec.size, np.float32)
    _core.add_streams(acc, [decoding.index_stream(rec)], [1.0])
    np.testing.assert_array_equal(acc, fp.decode(payload)["w"])
    if spec.endswith("fp16"):
        return
    bad = bytearray(payload)
    scale_at = len(payload) - len(bytes(rec.value_data)) - 4  # the first scale, the last section's start
    bad[scale_at : scale_at + 4] = np.float32(-1.0).tobytes()
    (broken,) = parse(bytes(bad), defer_checksum=True).tensors
    with pytest.raises(DecodeError, match="tensor 'w': .*negative or non-finite scale"):
        decoding.index_stream(broken)
