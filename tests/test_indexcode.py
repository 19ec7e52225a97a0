"""ops.encode_indices / ops.decode_indices: the index streams of both format versions (1: Golomb
codes, 2: split Rice) and hostile input; each test runs for both unless it is about one layout."""

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
VERSIONS = (1, 2)


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


def read_unary(bits: list[int], at: int) -> tuple[int, int]:
    """(the zeros before the next one bit, the position after that one)."""
    q = 0
    while bits[at] == 0:
        q += 1
        at += 1
    return q, at + 1


def reference_decode(buf: bytes, n: int, version: int = 1) -> list[int]:
    """Decoder written from the layouts documented in csrc/indexcode.hpp and csrc/ricestream.hpp."""
    return (reference_decode_layout if version == 1 else reference_decode_rice)(buf, n)[0]


def reference_decode_rice(buf: bytes, n: int) -> tuple[list[int], int, int]:
    """(indices, bytes before the unary part, unary bits used) of a valid version 2 stream."""
    k, pos = read_varint(buf, 0)
    if k == 0:
        assert pos == len(buf)
        return [], pos, 0
    rice = buf[pos]
    pos += 1
    assert rice <= 31
    low_bytes = (k * rice + 7) // 8
    low_bits = np.unpackbits(np.frombuffer(buf[pos : pos + low_bytes], dtype=np.uint8), bitorder="little").tolist()
    assert not any(low_bits[k * rice :]), "padding bits of the lows not zero"
    unary = np.unpackbits(np.frombuffer(buf[pos + low_bytes :], dtype=np.uint8), bitorder="little").tolist()
    out, nxt, at = [], 0, 0
    for i in range(k):
        q, at = read_unary(unary, at)
        low = sum(low_bits[i * rice + j] << j for j in range(rice))
        value = nxt + (q << rice) + low
        out.append(value)
        nxt = value + 1
    assert (at + 7) // 8 == len(unary) // 8, "stream has unused bytes"
    assert not any(unary[at:]), "padding bits not zero"
    assert not out or out[-1] < n
    return out, pos + low_bytes, at


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
        q, at = read_unary(bits, at)
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


def round_trip(idx: np.ndarray | list[int], n: int, version: int) -> bytes:
    arr = np.asarray(idx, dtype=np.int64)
    buf = ops.encode_indices(arr, n, version=version)
    assert isinstance(buf, bytes)
    out = ops.decode_indices(buf, n, version=version)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint32
    np.testing.assert_array_equal(out.astype(np.int64), arr)
    return buf


def random_indices(n: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)


def log2_binomial(n: int, k: int) -> float:
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def assert_decodes_consistently_or_raises(buf: bytes, n: int, version: int, max_count: int | None = None) -> None:
    """Corrupt input: ValueError, or an output that is self-consistent."""
    try:
        out = ops.decode_indices(buf, n, max_count, version=version)
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
    assert out.tolist() == reference_decode(buf, n, version)


# ------------------------------------------------------------- round trips --
@pytest.mark.parametrize("density", [0.01, 0.001, 0.5, 1.0])
@pytest.mark.parametrize("n", [1, 2, 3, 100, 1001, 100_003])
@pytest.mark.parametrize("version", VERSIONS)
def test_round_trip_random(n: int, density: float, version: int) -> None:
    k = max(1, round(density * n)) if density < 1 else n
    for seed in range(3):
        round_trip(random_indices(n, k, seed), n, version)


@pytest.mark.parametrize("version", VERSIONS)
def test_round_trip_empty(version: int) -> None:
    for n in (0, 1, 1000, N32):
        buf = round_trip(np.zeros(0, dtype=np.int64), n, version)
        assert buf == b"\x00"
    assert ops.decode_indices(ops.encode_indices([], 10), 10, version=version).size == 0


@pytest.mark.parametrize("version", VERSIONS)
def test_round_trip_single(version: int) -> None:
    for n in (1, 2, 7, 1000, 2**31, N32):
        for i in sorted({0, 1 % n, n // 2, n - 2 if n >= 2 else 0, n - 1}):
            round_trip([i], n, version)


@pytest.mark.parametrize("version", VERSIONS)
def test_round_trip_n1(version: int) -> None:
    round_trip([0], 1, version)
    round_trip([], 1, version)


@pytest.mark.parametrize("version", VERSIONS)
def test_round_trip_all_indices(version: int) -> None:
    for n in (1, 2, 9, 1000, 65_537):
        buf = round_trip(np.arange(n), n, version)
        assert len(buf) <= len(varint(n)) + len(varint(1)) + math.ceil(n / 8)


@pytest.mark.parametrize("version", VERSIONS)
def test_round_trip_n_is_2_pow_32(version: int) -> None:
    edge = [0, 1, 2**31, N32 - 3, N32 - 2, N32 - 1]
    round_trip(edge, N32, version)
    round_trip([N32 - 1], N32, version)
    round_trip([N32 - 2, N32 - 1], N32, version)
    round_trip(np.arange(N32 - 1000, N32), N32, version)
    rng = np.random.default_rng(4)
    round_trip(np.unique(rng.integers(0, N32, 5000)), N32, version)
    # n = 2^32 - 1: the largest index is one less
    round_trip([0, N32 - 2], N32 - 1, version)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("version", VERSIONS)
def test_round_trip_clustered(seed: int, version: int) -> None:
    rng = np.random.default_rng(seed)
    n = 1_000_000
    starts = np.sort(rng.choice(n - 300, 40, replace=False))
    idx = np.unique(np.concatenate([s + np.arange(rng.integers(1, 300)) for s in starts]))
    round_trip(idx, n, version)
    round_trip(np.arange(n - 5000, n), n, version)  # all at the end
    round_trip(np.arange(5000), n, version)  # all at the start
    round_trip(np.concatenate([np.arange(100), np.arange(n - 100, n)]), n, version)  # one huge gap


@pytest.mark.parametrize("version", VERSIONS)
def test_round_trip_input_types(version: int) -> None:
    torch = pytest.importorskip("torch")  # an optional extra, as in test_eden_kernels

    idx = random_indices(10_000, 300, 1)
    ref = ops.encode_indices(idx, 10_000, version=version)
    for variant in (
        idx.astype(np.uint32),
        idx.astype(np.int32),
        idx.tolist(),
        torch.from_numpy(idx),
    ):
        assert ops.encode_indices(variant, 10_000, version=version) == ref
    for buf in (ref, bytearray(ref), memoryview(ref), np.frombuffer(ref, dtype=np.uint8)):
        np.testing.assert_array_equal(ops.decode_indices(buf, 10_000, version=version), idx)


@pytest.mark.parametrize("density", [0.0005, 0.01, 0.3, 1.0])
@pytest.mark.parametrize("version", VERSIONS)
def test_stream_follows_documented_layout(density: float, version: int) -> None:
    n = 20_011
    k = max(1, int(density * n))
    idx = random_indices(n, k, 7)
    buf = ops.encode_indices(idx, n, version=version)
    count, pos = read_varint(buf, 0)
    assert count == k
    if version == 1:
        m, _ = read_varint(buf, pos)
        assert 1 <= m <= n
    else:
        assert buf[pos] <= 31  # the Rice parameter, one byte
    assert reference_decode(buf, n, version) == idx.tolist()


# ------------------------------------------------------------- compactness --
@pytest.mark.parametrize("density", [0.01, 0.001])
@pytest.mark.parametrize("version", VERSIONS)
def test_bits_per_index_near_information_bound(density: float, version: int) -> None:
    n = 1_000_000
    k = int(density * n)
    for seed in range(3):
        buf = round_trip(random_indices(n, k, seed), n, version)
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
@pytest.mark.parametrize("version", VERSIONS)
def test_encode_rejects_invalid(idx: list[int], n: int, version: int) -> None:
    with pytest.raises(ValueError):
        ops.encode_indices(np.asarray(idx, dtype=np.int64), n, version=version)


@pytest.mark.parametrize("version", VERSIONS)
def test_encode_rejects_float_indices(version: int) -> None:
    with pytest.raises(TypeError):
        ops.encode_indices(np.array([1.0, 2.0]), 10, version=version)


@pytest.mark.parametrize("version", VERSIONS)
def test_encode_negative_n(version: int) -> None:
    with pytest.raises(ValueError):
        ops.encode_indices([0], -1, version=version)


# ------------------------------------------------------------- bad decodes --
def _small_streams() -> list[tuple[str, bytes, int, int]]:
    streams = []
    for version in VERSIONS:
        for n, k, seed in [(1000, 40, 1), (64, 64, 2), (5000, 3, 3), (100_000, 25, 4), (N32, 6, 5)]:
            idx = random_indices(n, k, seed) if n < N32 else np.sort(np.random.default_rng(5).choice(N32, 6))
            streams.append((f"v{version},n={n},k={k}", ops.encode_indices(idx, n, version=version), n, version))
        streams.append((f"v{version},single", ops.encode_indices([777], 1000, version=version), 1000, version))
    return streams


SMALL_STREAMS = _small_streams()
STREAM_IDS = [s[0] for s in SMALL_STREAMS]


@pytest.mark.parametrize(("name", "buf", "n", "version"), SMALL_STREAMS, ids=STREAM_IDS)
def test_truncation_at_every_offset_raises(name: str, buf: bytes, n: int, version: int) -> None:
    assert ops.decode_indices(buf, n, version=version).size > 0
    for cut in range(len(buf)):
        with pytest.raises(ValueError):
            ops.decode_indices(buf[:cut], n, version=version)


@pytest.mark.parametrize(("name", "buf", "n", "version"), SMALL_STREAMS, ids=STREAM_IDS)
def test_appended_bytes_raise(name: str, buf: bytes, n: int, version: int) -> None:
    for extra in (b"\x00", b"\x01", b"\xff", b"\x80", b"\x00\x00", bytes(range(1, 9))):
        with pytest.raises(ValueError):
            ops.decode_indices(buf + extra, n, version=version)


@pytest.mark.parametrize("version", VERSIONS)
def test_trailing_bytes_after_empty_list_raise(version: int) -> None:
    for extra in (b"\x00", b"\x05", b"\xff\xff"):
        with pytest.raises(ValueError):
            ops.decode_indices(b"\x00" + extra, 100, version=version)


@pytest.mark.parametrize(("name", "buf", "n", "version"), SMALL_STREAMS, ids=STREAM_IDS)
def test_flipped_bytes_raise_or_decode_consistently(name: str, buf: bytes, n: int, version: int) -> None:
    for pos in range(len(buf)):
        for mask in (0xFF, 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80):
            corrupt = bytearray(buf)
            corrupt[pos] ^= mask
            assert_decodes_consistently_or_raises(bytes(corrupt), n, version)


@pytest.mark.parametrize("version", VERSIONS)
def test_nonzero_padding_bits_raise(version: int) -> None:
    tested = 0
    for idx, n in [([3], 1000), ([0, 5, 9], 10), ([17, 400, 401, 999], 1000), ([1, 2], 100)]:
        buf = ops.encode_indices(idx, n, version=version)
        _, header, used = (reference_decode_layout if version == 1 else reference_decode_rice)(buf, n)
        assert len(buf) == header + (used + 7) // 8
        for bit in range(used, (len(buf) - header) * 8):  # every padding bit
            corrupt = bytearray(buf)
            corrupt[header + bit // 8] |= 1 << (bit % 8)
            with pytest.raises(ValueError):
                ops.decode_indices(bytes(corrupt), n, version=version)
            tested += 1
    assert tested > 0


@pytest.mark.parametrize(
    "count",
    [1001, 2**31, 2**32, 2**32 + 1, 2**40, 2**63, 2**64 - 1],
)
@pytest.mark.parametrize("version", VERSIONS)
def test_huge_count_varint_raises(count: int, version: int) -> None:
    for n in (1000, N32):
        if count <= n:
            continue
        with pytest.raises(ValueError):
            ops.decode_indices(varint(count) + varint(7) + b"\xff" * 16, n, version=version)


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
@pytest.mark.parametrize("version", VERSIONS)
def test_malformed_headers_raise(buf: bytes, version: int) -> None:
    with pytest.raises(ValueError):
        ops.decode_indices(buf, 1000, version=version)


@pytest.mark.parametrize("version", VERSIONS)
def test_index_beyond_n_raises(version: int) -> None:
    buf = ops.encode_indices([5, 999], 1000, version=version)
    with pytest.raises(ValueError):
        ops.decode_indices(buf, 999, version=version)
    with pytest.raises(ValueError):
        ops.decode_indices(buf, 500, version=version)
    # k = 1, m = 1 (version 1) or l = 0 (version 2): unary gap of 1000 zeros -> index 1000 >= n
    parameter = varint(1) if version == 1 else b"\x00"
    long_gap = (
        varint(1) + parameter + np.packbits(np.r_[np.zeros(1000, dtype=np.uint8), 1], bitorder="little").tobytes()
    )
    assert ops.decode_indices(long_gap, 1001, version=version).tolist() == [1000]
    with pytest.raises(ValueError):
        ops.decode_indices(long_gap, 1000, version=version)


@pytest.mark.parametrize("version", VERSIONS)
def test_max_count_enforced(version: int) -> None:
    idx = random_indices(10_000, 100, 3)
    buf = ops.encode_indices(idx, 10_000, version=version)
    np.testing.assert_array_equal(ops.decode_indices(buf, 10_000, max_count=100, version=version), idx)
    np.testing.assert_array_equal(ops.decode_indices(buf, 10_000, max_count=10_000, version=version), idx)
    for limit in (99, 1, 0):
        with pytest.raises(ValueError):
            ops.decode_indices(buf, 10_000, max_count=limit, version=version)
    assert ops.decode_indices(b"\x00", 10, max_count=0, version=version).size == 0
    with pytest.raises(ValueError):
        ops.decode_indices(buf, 10_000, max_count=-1, version=version)


@pytest.mark.parametrize("version", VERSIONS)
def test_decode_bad_arguments(version: int) -> None:
    buf = ops.encode_indices([1, 2], 10, version=version)
    with pytest.raises(TypeError):
        ops.decode_indices([1, 2, 3], 10, version=version)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ops.decode_indices("abc", 10, version=version)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ops.decode_indices(buf, 2**32 + 1, version=version)
    with pytest.raises(ValueError):
        ops.decode_indices(buf, -1, version=version)


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
        ops.decode_indices(memoryview(buf), N32, version=1)


@pytest.mark.parametrize("zeros", [2, 3, 4, 2**20])
def test_rice_quotient_shift_beyond_n_raises(zeros: int) -> None:
    # Version 2, n = 2^32, l = 31, one index: (zeros << 31) + low reaches 2^32 at 2
    # zeros, and passes 2^64 for large counts: refused, never wrapped.
    low = (5).to_bytes(4, "little")  # a 31-bit field, its padding bit zero
    unary = np.packbits(np.r_[np.zeros(zeros, dtype=np.uint8), 1], bitorder="little").tobytes()
    with pytest.raises(ValueError, match="beyond n"):
        ops.decode_indices(varint(1) + b"\x1f" + low + unary, N32, version=2)
    one_less = np.packbits(np.r_[np.zeros(1, dtype=np.uint8), 1], bitorder="little").tobytes()
    assert ops.decode_indices(varint(1) + b"\x1f" + low + one_less, N32, version=2).tolist() == [2**31 + 5]


@pytest.mark.parametrize("version", VERSIONS)
# --------------------------------------------------------------- properties --
@given(n=st.integers(1, 3000), data=st.data())
def test_property_round_trip(n: int, data: st.DataObject, version: int) -> None:
    idx = data.draw(st.sets(st.integers(0, n - 1), max_size=min(n, 400)))
    round_trip(sorted(idx), n, version)


@pytest.mark.parametrize("version", VERSIONS)
@given(
    n=st.one_of(st.integers(0, 5000), st.just(N32), st.integers(2**20, N32)),
    body=st.binary(max_size=64),
    count=st.integers(0, 300),
    m=st.integers(0, 2**33),
    framed=st.booleans(),
)
def test_property_random_bytes_never_escape(
    n: int, body: bytes, count: int, m: int, framed: bool, version: int
) -> None:
    # Arbitrary bytes (optionally behind a plausible header) either raise
    # ValueError or decode to a valid, self-consistent list.
    buf = (varint(count) + varint(m) + body) if framed else body
    assert_decodes_consistently_or_raises(buf, n, version)


@pytest.mark.parametrize("version", VERSIONS)
@given(n=st.integers(1, 2000), data=st.data())
def test_property_corrupted_valid_stream(n: int, data: st.DataObject, version: int) -> None:
    idx = sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=min(n, 200))))
    buf = bytearray(ops.encode_indices(idx, n, version=version))
    pos = data.draw(st.integers(0, len(buf) - 1))
    buf[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(buf)))
    assert_decodes_consistently_or_raises(bytes(buf[:cut]), n, version)


@pytest.mark.parametrize("version", VERSIONS)
def test_corrupt_streams_raise_the_package_decode_error(version: int):
    """The kernel raises fedpress.DecodeError, the class the payload reader raises: one
    except clause catches every malformed input, and it is still a ValueError."""
    import pickle

    good = fp.ops.encode_indices(np.array([3, 17, 90], np.uint32), 100, version=version)
    for bad in (bytes(good[:-1]), b"\xff" * 11, bytes(good) + b"\x00"):
        with pytest.raises(fp.DecodeError, match="index stream"):
            fp.ops.decode_indices(bad, 100, version=version)
    with pytest.raises(fp.DecodeError, match="exceeds n"):
        fp.ops.decode_indices(good, 2, version=version)
    assert issubclass(fp.DecodeError, ValueError) and fp.DecodeError is fp.format.DecodeError
    assert repr(fp.DecodeError("x")) == "DecodeError('x')" and fp.DecodeError.__module__ == "fedpress"
    again = pickle.loads(pickle.dumps(fp.DecodeError("broken")))
    assert type(again) is fp.DecodeError and str(again) == "broken"
