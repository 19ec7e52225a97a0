"""ops.encode_indices / ops.decode_indices: Golomb gap coding and hostile input."""

from __future__ import annotations

import math

import fedpress as fp
import numpy as np
import pytest
from conftest import leb128 as varint
from fedpress import ops
from hypothesis import given
from hypothesis import strategies as st

N32 = 2**32


# ---------------------------------------------------------------- helpers --
def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    v, shift = 0, 0
    while True:
        byte = buf[pos]
        pos += 1
        v |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return v, pos


def reference_decode(buf: bytes, n: int) -> list[int]:
    """Decoder written from the layout documented in csrc/indexcode.hpp."""
    return reference_decode_layout(buf, n)[0]


def reference_decode_layout(buf: bytes, n: int) -> tuple[list[int], int, int]:
    """(indices, header bytes, code bits used) of a valid stream."""
    k, pos = read_varint(buf, 0)
    if k == 0:
        assert pos == len(buf)
        return [], pos, 0
    m, pos = read_varint(buf, pos)
    assert 1 <= m <= max(1, n)
    bits = np.unpackbits(np.frombuffer(buf[pos:], dtype=np.uint8), bitorder="little").tolist()
    b = math.ceil(math.log2(m)) if m > 1 else 0
    u = (1 << b) - m
    at = 0

    def take(count: int) -> int:  # a `count`-bit field, least significant bit first
        nonlocal at
        v = 0
        for i in range(count):
            v |= bits[at] << i
            at += 1
        return v

    out, nxt = [], 0
    for _ in range(k):
        q = 0
        while bits[at] == 0:
            q += 1
            at += 1
        at += 1
        r = 0
        if b > 0:
            v = take(b - 1)
            r = v if v < u else ((v << 1) | take(1)) - u
        value = nxt + q * m + r
        out.append(value)
        nxt = value + 1
    assert (at + 7) // 8 == len(bits) // 8, "stream has unused bytes"
    assert not any(bits[at:]), "padding bits not zero"
    return out, pos, at


def round_trip(idx: np.ndarray | list[int], n: int) -> bytes:
    arr = np.asarray(idx, dtype=np.int64)
    buf = ops.encode_indices(arr, n)
    assert isinstance(buf, bytes)
    out = ops.decode_indices(buf, n)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint32
    np.testing.assert_array_equal(out.astype(np.int64), arr)
    return buf


def random_indices(n: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)


def log2_binomial(n: int, k: int) -> float:
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def assert_decodes_consistently_or_raises(buf: bytes, n: int, max_count: int | None = None) -> None:
    """Corrupt input: ValueError, or an output that is self-consistent."""
    try:
        out = ops.decode_indices(buf, n, max_count)
    except ValueError:
        return
    limit = n if max_count is None else max_count
    count, _ = read_varint(buf, 0)
    assert out.dtype == np.uint32
    assert out.size == count <= limit
    if out.size:
        assert int(out.max()) < n
        assert np.all(np.diff(out.astype(np.int64)) > 0)
    # Whatever decoded must be what that stream means.
    assert out.tolist() == reference_decode(buf, n)


# ------------------------------------------------------------- round trips --
@pytest.mark.parametrize("density", [0.01, 0.001, 0.5, 1.0])
@pytest.mark.parametrize("n", [1, 2, 3, 100, 1001, 100_003])
def test_round_trip_random(n: int, density: float) -> None:
    k = max(1, round(density * n)) if density < 1 else n
    for seed in range(3):
        round_trip(random_indices(n, k, seed), n)


def test_round_trip_empty() -> None:
    for n in (0, 1, 1000, N32):
        buf = round_trip(np.zeros(0, dtype=np.int64), n)
        assert buf == b"\x00"
    assert ops.decode_indices(ops.encode_indices([], 10), 10).size == 0


def test_round_trip_single() -> None:
    for n in (1, 2, 7, 1000, 2**31, N32):
        for i in sorted({0, 1 % n, n // 2, n - 2 if n >= 2 else 0, n - 1}):
            round_trip([i], n)


def test_round_trip_n1() -> None:
    round_trip([0], 1)
    round_trip([], 1)


def test_round_trip_all_indices() -> None:
    for n in (1, 2, 9, 1000, 65_537):
        buf = round_trip(np.arange(n), n)
        assert len(buf) <= len(varint(n)) + len(varint(1)) + math.ceil(n / 8)


def test_round_trip_n_is_2_pow_32() -> None:
    edge = [0, 1, 2**31, N32 - 3, N32 - 2, N32 - 1]
    round_trip(edge, N32)
    round_trip([N32 - 1], N32)
    round_trip([N32 - 2, N32 - 1], N32)
    round_trip(np.arange(N32 - 1000, N32), N32)
    rng = np.random.default_rng(4)
    round_trip(np.unique(rng.integers(0, N32, 5000)), N32)
    # n = 2^32 - 1: the largest index is one less
    round_trip([0, N32 - 2], N32 - 1)


@pytest.mark.parametrize("seed", range(4))
def test_round_trip_clustered(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 1_000_000
    starts = np.sort(rng.choice(n - 300, 40, replace=False))
    idx = np.unique(np.concatenate([s + np.arange(rng.integers(1, 300)) for s in starts]))
    round_trip(idx, n)
    round_trip(np.arange(n - 5000, n), n)  # all at the end
    round_trip(np.arange(5000), n)  # all at the start
    round_trip(np.concatenate([np.arange(100), np.arange(n - 100, n)]), n)  # one huge gap


def test_round_trip_input_types() -> None:
    torch = pytest.importorskip("torch")  # an optional extra, as in test_eden_kernels

    idx = random_indices(10_000, 300, 1)
    ref = ops.encode_indices(idx, 10_000)
    for variant in (
        idx.astype(np.uint32),
        idx.astype(np.int32),
        idx.tolist(),
        torch.from_numpy(idx),
    ):
        assert ops.encode_indices(variant, 10_000) == ref
    for buf in (ref, bytearray(ref), memoryview(ref), np.frombuffer(ref, dtype=np.uint8)):
        np.testing.assert_array_equal(ops.decode_indices(buf, 10_000), idx)


@pytest.mark.parametrize("density", [0.0005, 0.01, 0.3, 1.0])
def test_stream_follows_documented_layout(density: float) -> None:
    n = 20_011
    k = max(1, int(density * n))
    idx = random_indices(n, k, 7)
    buf = ops.encode_indices(idx, n)
    count, pos = read_varint(buf, 0)
    assert count == k
    m, _ = read_varint(buf, pos)
    assert 1 <= m <= n
    assert reference_decode(buf, n) == idx.tolist()


# ------------------------------------------------------------- compactness --
@pytest.mark.parametrize("density", [0.01, 0.001])
def test_bits_per_index_near_information_bound(density: float) -> None:
    n = 1_000_000
    k = int(density * n)
    for seed in range(3):
        buf = round_trip(random_indices(n, k, seed), n)
        bits_per_index = len(buf) * 8 / k
        bound = log2_binomial(n, k) / k
        assert bits_per_index <= 1.05 * bound, (bits_per_index, bound)


# ------------------------------------------------------------- bad encodes --
@pytest.mark.parametrize(
    ("idx", "n"),
    [
        ([3, 2], 10),  # descending
        ([1, 5, 4, 8], 10),  # unsorted in the middle
        ([2, 2], 10),  # duplicate
        ([0, 1, 1], 10),
        ([10], 10),  # == n
        ([0, 11], 10),  # > n
        ([0], 0),
        ([-1, 3], 10),  # negative
        ([0, N32], N32),  # beyond uint32
        ([5], 2**32 + 1),  # n too large
        (list(range(11)), 10),  # more indices than n (and one >= n)
    ],
)
def test_encode_rejects_invalid(idx: list[int], n: int) -> None:
    with pytest.raises(ValueError):
        ops.encode_indices(np.asarray(idx, dtype=np.int64), n)


def test_encode_rejects_float_indices() -> None:
    with pytest.raises(TypeError):
        ops.encode_indices(np.array([1.0, 2.0]), 10)


def test_encode_negative_n() -> None:
    with pytest.raises(ValueError):
        ops.encode_indices([0], -1)


# ------------------------------------------------------------- bad decodes --
def _small_streams() -> list[tuple[str, bytes, int]]:
    streams = []
    for n, k, seed in [(1000, 40, 1), (64, 64, 2), (5000, 3, 3), (100_000, 25, 4), (N32, 6, 5)]:
        idx = random_indices(n, k, seed) if n < N32 else np.sort(np.random.default_rng(5).choice(N32, 6))
        streams.append((f"n={n},k={k}", ops.encode_indices(idx, n), n))
    streams.append(("single", ops.encode_indices([777], 1000), 1000))
    return streams


SMALL_STREAMS = _small_streams()
STREAM_IDS = [s[0] for s in SMALL_STREAMS]


@pytest.mark.parametrize(("name", "buf", "n"), SMALL_STREAMS, ids=STREAM_IDS)
def test_truncation_at_every_offset_raises(name: str, buf: bytes, n: int) -> None:
    assert ops.decode_indices(buf, n).size > 0
    for cut in range(len(buf)):
        with pytest.raises(ValueError):
            ops.decode_indices(buf[:cut], n)


@pytest.mark.parametrize(("name", "buf", "n"), SMALL_STREAMS, ids=STREAM_IDS)
def test_appended_bytes_raise(name: str, buf: bytes, n: int) -> None:
    for extra in (b"\x00", b"\x01", b"\xff", b"\x80", b"\x00\x00", bytes(range(1, 9))):
        with pytest.raises(ValueError):
            ops.decode_indices(buf + extra, n)


def test_trailing_bytes_after_empty_list_raise() -> None:
    for extra in (b"\x00", b"\x05", b"\xff\xff"):
        with pytest.raises(ValueError):
            ops.decode_indices(b"\x00" + extra, 100)


@pytest.mark.parametrize(("name", "buf", "n"), SMALL_STREAMS, ids=STREAM_IDS)
def test_flipped_bytes_raise_or_decode_consistently(name: str, buf: bytes, n: int) -> None:
    for pos in range(len(buf)):
        for mask in (0xFF, 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80):
            corrupt = bytearray(buf)
            corrupt[pos] ^= mask
            assert_decodes_consistently_or_raises(bytes(corrupt), n)


def test_nonzero_padding_bits_raise() -> None:
    tested = 0
    for idx, n in [([3], 1000), ([0, 5, 9], 10), ([17, 400, 401, 999], 1000), ([1, 2], 100)]:
        buf = ops.encode_indices(idx, n)
        _, header, used = reference_decode_layout(buf, n)
        assert len(buf) == header + (used + 7) // 8
        for bit in range(used, (len(buf) - header) * 8):  # every padding bit
            corrupt = bytearray(buf)
            corrupt[header + bit // 8] |= 1 << (bit % 8)
            with pytest.raises(ValueError):
                ops.decode_indices(bytes(corrupt), n)
            tested += 1
    assert tested > 0


@pytest.mark.parametrize(
    "count",
    [1001, 2**31, 2**32, 2**32 + 1, 2**40, 2**63, 2**64 - 1],
)
def test_huge_count_varint_raises(count: int) -> None:
    for n in (1000, N32):
        if count <= n:
            continue
        with pytest.raises(ValueError):
            ops.decode_indices(varint(count) + varint(7) + b"\xff" * 16, n)


@pytest.mark.parametrize(
    "buf",
    [
        b"",
        b"\x80",  # unterminated count
        b"\xff" * 10,  # 10 continuation bytes, never terminated
        b"\xff" * 11 + b"\x01",  # longer than any 64-bit varint
        b"\xff" * 9 + b"\x02",  # 10th byte overflows 64 bits
        b"\xff" * 9 + b"\x7f",
        b"\x85\x00",  # non-minimal count varint
        b"\x05",  # count, no Golomb parameter
        b"\x05\x00",  # m = 0
        b"\x05\x80",  # unterminated m
        b"\x05\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # m = 2^64 - 1
        b"\x05" + varint(1001) + b"\xff" * 8,  # m > n
        b"\x02\x01",  # count 2, no code bits
        b"\x09\x01\xff",  # count 9 needs >= 9 bits, 8 present
        b"\x01\x01" + b"\x00" * 200,  # unary quotient runs off the end
    ],
)
def test_malformed_headers_raise(buf: bytes) -> None:
    with pytest.raises(ValueError):
        ops.decode_indices(buf, 1000)


def test_index_beyond_n_raises() -> None:
    buf = ops.encode_indices([5, 999], 1000)
    with pytest.raises(ValueError):
        ops.decode_indices(buf, 999)
    with pytest.raises(ValueError):
        ops.decode_indices(buf, 500)
    # k = 1, m = 1: unary gap of 1000 zeros -> index 1000 >= n
    long_gap = (
        varint(1) + varint(1) + np.packbits(np.r_[np.zeros(1000, dtype=np.uint8), 1], bitorder="little").tobytes()
    )
    assert ops.decode_indices(long_gap, 1001).tolist() == [1000]
    with pytest.raises(ValueError):
        ops.decode_indices(long_gap, 1000)


def test_max_count_enforced() -> None:
    idx = random_indices(10_000, 100, 3)
    buf = ops.encode_indices(idx, 10_000)
    np.testing.assert_array_equal(ops.decode_indices(buf, 10_000, max_count=100), idx)
    np.testing.assert_array_equal(ops.decode_indices(buf, 10_000, max_count=10_000), idx)
    for limit in (99, 1, 0):
        with pytest.raises(ValueError):
            ops.decode_indices(buf, 10_000, max_count=limit)
    assert ops.decode_indices(b"\x00", 10, max_count=0).size == 0
    with pytest.raises(ValueError):
        ops.decode_indices(buf, 10_000, max_count=-1)


def test_decode_bad_arguments() -> None:
    buf = ops.encode_indices([1, 2], 10)
    with pytest.raises(TypeError):
        ops.decode_indices([1, 2, 3], 10)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ops.decode_indices("abc", 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ops.decode_indices(buf, 2**32 + 1)
    with pytest.raises(ValueError):
        ops.decode_indices(buf, -1)


@pytest.mark.slow
def test_gap_product_overflow_at_n_2_pow_32_raises() -> None:
    # n = 2^32, m = 2^32, a unary quotient of exactly 2^32: the gap is
    # q * m + r >= 2^64, far beyond n, and must be refused, not wrapped to r.
    header = varint(1) + varint(N32)
    tail = 5  # terminator bit + 32 remainder bits fit in 5 bytes after the zeros
    buf = bytearray(len(header) + N32 // 8 + tail)
    buf[: len(header)] = header
    start = len(header) + N32 // 8
    buf[start] = 0x01 | (5 << 1)  # terminator, then remainder bits (r = 10)
    with pytest.raises(ValueError):
        ops.decode_indices(memoryview(buf), N32)


# --------------------------------------------------------------- properties --
@given(n=st.integers(1, 3000), data=st.data())
def test_property_round_trip(n: int, data: st.DataObject) -> None:
    idx = data.draw(st.sets(st.integers(0, n - 1), max_size=min(n, 400)))
    round_trip(sorted(idx), n)


@given(
    n=st.one_of(st.integers(0, 5000), st.just(N32), st.integers(2**20, N32)),
    body=st.binary(max_size=64),
    count=st.integers(0, 300),
    m=st.integers(0, 2**33),
    framed=st.booleans(),
)
def test_property_random_bytes_never_escape(n: int, body: bytes, count: int, m: int, framed: bool) -> None:
    # Arbitrary bytes (optionally behind a plausible header) either raise
    # ValueError or decode to a valid, self-consistent list.
    buf = (varint(count) + varint(m) + body) if framed else body
    assert_decodes_consistently_or_raises(buf, n)


@given(n=st.integers(1, 2000), data=st.data())
def test_property_corrupted_valid_stream(n: int, data: st.DataObject) -> None:
    idx = sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=min(n, 200))))
    buf = bytearray(ops.encode_indices(idx, n))
    pos = data.draw(st.integers(0, len(buf) - 1))
    buf[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(buf)))
    assert_decodes_consistently_or_raises(bytes(buf[:cut]), n)


def test_corrupt_streams_raise_the_package_decode_error():
    """The kernel raises fedpress.DecodeError, the class the payload reader raises: one
    except clause catches every malformed input, and it is still a ValueError."""
    import pickle

    good = fp.ops.encode_indices(np.array([3, 17, 90], np.uint32), 100)
    for bad in (bytes(good[:-1]), b"\xff" * 11, bytes(good) + b"\x00"):
        with pytest.raises(fp.DecodeError, match="index stream"):
            fp.ops.decode_indices(bad, 100)
    with pytest.raises(fp.DecodeError, match="exceeds n"):
        fp.ops.decode_indices(good, 2)
    assert issubclass(fp.DecodeError, ValueError) and fp.DecodeError is fp.format.DecodeError
    assert repr(fp.DecodeError("x")) == "DecodeError('x')" and fp.DecodeError.__module__ == "fedpress"
    again = pickle.loads(pickle.dumps(fp.DecodeError("broken")))
    assert type(again) is fp.DecodeError and str(again) == "broken"
