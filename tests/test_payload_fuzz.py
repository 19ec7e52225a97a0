"""Hostile payloads: fp.decode (and fp.inspect, Aggregator.add) may only ever
raise fp.DecodeError, and must do so promptly without allocating much.

Two families:
  * mutations of valid payloads as they are, which the checksum (or the sizes)
    must catch: these must raise DecodeError;
  * mutations of the body with sizes and CRC recomputed, and hand-built
    payloads with a correct CRC: these bypass the checksum and test the
    validation itself. A mutation may happen to give another valid payload,
    so success is allowed there; any exception other than DecodeError fails.

Every decode here runs with the address space capped at +2 GiB (conftest
memory_cap), so an attempt to allocate gigabytes surfaces as MemoryError,
and under small Limits, so a mutation cannot legitimately decode to
gigabytes either (the hand-built cases also run under the default limits).

The specs ending in "/table=digest" are payloads without their tensor table
(Codec(table="digest")), decoded with the update's table as the receiver's
model: every mutation of the bytes applies to them as well.
"""

from __future__ import annotations

import re
import struct
import time
from typing import Callable

import fedpress as fp
import numpy as np
import pytest
import zstandard
from fuzz_checks import SMALL_LIMITS, small_update  # the update the fuzz corpus seeds encode, and its limits
from hypothesis import given
from hypothesis import strategies as st

SPECS = [
    "fp32",
    "fp16",
    "bf16",
    "q8",
    "q4",
    "q2",
    "sign",
    "topk:0.01",
    "topk:0.01+q4",
    "topk:0.001+q4+zstd",
    "randk:0.01+fp16",
    "q8+zstd:3",
    "rht+q2+zstd",
    "thresh:0.2",
    "topk:0.2+q8+zstd:1",
    "randk:0.3+q2",
    "topk:0.3+sign",
    "topk:0.25+bf16+zstd",
    "eden1",
    "eden3",
    "eden4:shared",
    "eden8+zstd",
    "topk:0.1+eden2:mse",
]
DIGEST = "/table=digest"
DIGEST_SPECS = [
    s + DIGEST
    for s in (
        "fp32",
        "q4",
        "topk:0.01+q4",
        "topk:0.001+q4+zstd",
        "randk:0.01+fp16",
        "rht+q2+zstd",
        "sign",
        "eden3",
        "eden4:shared",
        "topk:0.1+eden2:mse",
    )
]
SPEC_PARAMS = [pytest.param(s, id=s) for s in SPECS]
ALL_SPEC_PARAMS = SPEC_PARAMS + [pytest.param(s, id=s) for s in DIGEST_SPECS]  # tests that see bytes only
ZSTD_SPEC_PARAMS = [p for p in ALL_SPEC_PARAMS if "zstd" in p.values[0]]
FUZZ_LIMITS = SMALL_LIMITS  # the fuzz targets' second decode runs under the same limits
SLOW = 2.0  # seconds: "promptly"


_PAYLOADS: dict = {}


def valid_payload(spec: str) -> bytes:
    if spec not in _PAYLOADS:
        codec_spec, _, table = spec.partition("/table=")
        _PAYLOADS[spec] = fp.Codec(codec_spec, table=table or "inline").encode(small_update(), seed=99)
    return _PAYLOADS[spec]


SMALL_TABLE = [(name, a.dtype.name, a.shape) for name, a in small_update().items()]


def table_for(spec: str):
    """The receiver's table a spec's payloads are decoded with: the update's, for payloads without theirs."""
    return SMALL_TABLE if spec.endswith(DIGEST) else None


@pytest.fixture(scope="module")
def W(wire):
    return wire


@pytest.fixture(scope="module")
def attempt(memory_cap) -> Callable[..., None]:
    def run(data: bytes, *, must_fail: bool, what: str, aggregate: bool = False, table=None) -> None:
        """Decodes hostile bytes (with ``table`` as the receiver's model): DecodeError passes;
        success passes unless must_fail; any other exception, or a slow decode, fails the test."""
        start = time.perf_counter()
        try:
            with memory_cap():
                fp.decode(data, limits=FUZZ_LIMITS, table=table)
                fp.inspect(data, limits=FUZZ_LIMITS, table=table)
                if aggregate:
                    fp.Aggregator(limits=FUZZ_LIMITS, table=table).add(data)
        except fp.DecodeError:
            pass
        except Exception as exc:  # noqa: BLE001 - IndexError, struct.error, MemoryError, ...
            pytest.fail(f"{what}: {type(exc).__name__} instead of DecodeError: {exc}", pytrace=False)
        else:
            if must_fail:
                pytest.fail(f"{what}: a damaged payload decoded without error", pytrace=False)
        elapsed = time.perf_counter() - start
        assert elapsed < SLOW, f"{what}: took {elapsed:.2f} s"

    return run


def positions(n: int, seed: int, at_least: int = 200) -> list:
    """Every offset of a short buffer, else a sorted random sample of at least `at_least`."""
    if n <= 2 * at_least:
        return list(range(n))
    rng = np.random.default_rng(seed)
    return sorted(set(rng.choice(n, at_least, replace=False).tolist()) | {0, n - 1})


# ---------------------------------------------------------- raw mutations --
@pytest.mark.parametrize("spec", ALL_SPEC_PARAMS)
def test_valid_payloads_decode(spec: str) -> None:
    dec = fp.decode(valid_payload(spec), limits=FUZZ_LIMITS, table=table_for(spec))
    assert set(dec) == set(small_update())


@pytest.mark.parametrize("spec", ALL_SPEC_PARAMS)
def test_truncation_at_every_offset(spec: str, attempt) -> None:
    p = valid_payload(spec)
    for cut in range(len(p)):
        attempt(p[:cut], must_fail=True, table=table_for(spec), what=f"{spec}: truncated to {cut} of {len(p)} bytes")


@pytest.mark.parametrize("spec", ALL_SPEC_PARAMS)
def test_single_bit_flips(spec: str, attempt) -> None:
    p = valid_payload(spec)
    for pos in positions(len(p), 1):
        for bit in {pos % 8, 7 - pos % 8}:
            data = bytearray(p)
            data[pos] ^= 1 << bit
            attempt(bytes(data), must_fail=True, table=table_for(spec), what=f"{spec}: bit {bit} of byte {pos} flipped")


@pytest.mark.parametrize("spec", ALL_SPEC_PARAMS)
def test_inserted_and_deleted_bytes(spec: str, attempt) -> None:
    p = valid_payload(spec)
    for pos in positions(len(p) + 1, 2, at_least=100):
        for ins in (b"\0", b"\xff", b"\x00" * 8):
            attempt(
                p[:pos] + ins + p[pos:],
                must_fail=True,
                table=table_for(spec),
                what=f"{spec}: {ins!r} inserted at {pos}",
            )
        if pos < len(p):
            attempt(p[:pos] + p[pos + 1 :], must_fail=True, table=table_for(spec), what=f"{spec}: byte {pos} deleted")


@pytest.mark.parametrize("spec", ALL_SPEC_PARAMS)
def test_huge_length_overwrites(spec: str, attempt) -> None:
    p = valid_payload(spec)
    for pos in range(0, len(p), 8):
        data = bytearray(p)
        data[pos : pos + 8] = b"\xff" * len(data[pos : pos + 8])
        if bytes(data) != p:
            attempt(bytes(data), must_fail=True, table=table_for(spec), what=f"{spec}: 0xff * 8 at {pos}")


# ------------------------------------------- mutations past the checksum --
@pytest.mark.parametrize("spec", ALL_SPEC_PARAMS)
def test_body_truncation_with_consistent_sizes(spec: str, W, attempt) -> None:
    p = valid_payload(spec)
    body = W.plain_body(p)
    for cut in range(len(body)):
        attempt(
            W.rebuild(p, body[:cut]),
            must_fail=True,
            table=table_for(spec),
            what=f"{spec}: body cut to {cut} of {len(body)}",
        )


@pytest.mark.parametrize("spec", ALL_SPEC_PARAMS)
def test_body_bit_flips_with_valid_crc(spec: str, W, attempt) -> None:
    p = valid_payload(spec)
    body = W.plain_body(p)
    for pos in positions(len(body), 3, at_least=300):
        for bit in range(0, 8, 3):
            data = bytearray(body)
            data[pos] ^= 1 << bit
            attempt(
                W.rebuild(p, bytes(data)),
                must_fail=False,
                aggregate=True,
                table=table_for(spec),
                what=f"{spec}: body bit {bit} of byte {pos} flipped (CRC fixed)",
            )


@pytest.mark.parametrize("spec", ALL_SPEC_PARAMS)
def test_body_huge_field_overwrites_with_valid_crc(spec: str, W, attempt) -> None:
    """0xff.. over every 4- and 8-byte window of the body (every offset: table
    fields are not aligned), giving overlong varint runs or, where a byte below
    0x80 ends them, huge varints; and the varints 2^28-1 and 2^64-1 written over
    whatever is there."""
    p = valid_payload(spec)
    body = W.plain_body(p)
    for pos in range(len(body)):
        for fill in (b"\xff" * 8, b"\xff" * 4, W.varint(2**28 - 1), W.varint(2**64 - 1)):
            data = bytearray(body)
            data[pos : pos + len(fill)] = fill[: len(data) - pos]
            if bytes(data) != body:
                attempt(
                    W.rebuild(p, bytes(data)),
                    must_fail=False,
                    table=table_for(spec),
                    what=f"{spec}: body bytes {pos}..{pos + len(fill)} set to {fill.hex()} (CRC fixed)",
                )


@pytest.mark.parametrize("spec", ALL_SPEC_PARAMS)
def test_body_inserted_deleted_bytes_with_valid_crc(spec: str, W, attempt) -> None:
    p = valid_payload(spec)
    body = W.plain_body(p)
    for pos in positions(len(body) + 1, 4, at_least=150):
        attempt(
            W.rebuild(p, body[:pos] + b"\x01" + body[pos:]),
            must_fail=False,
            table=table_for(spec),
            what=f"{spec}: byte inserted in the body at {pos} (CRC fixed)",
        )
        if pos < len(body):
            attempt(
                W.rebuild(p, body[:pos] + body[pos + 1 :]),
                must_fail=False,
                table=table_for(spec),
                what=f"{spec}: body byte {pos} deleted (CRC fixed)",
            )


@pytest.mark.parametrize("spec", ZSTD_SPEC_PARAMS)
def test_compressed_body_flips_with_valid_crc(spec: str, W, attempt) -> None:
    """Damage inside the zstd frame itself, checksum recomputed: zstd errors must
    come out as DecodeError."""
    p = valid_payload(spec)
    for pos in range(W.header(p)["header_size"], len(p) - 4):
        for bit in (0, 5):
            data = bytearray(p)
            data[pos] ^= 1 << bit
            attempt(
                W.fix_crc(bytes(data)),
                must_fail=False,
                table=table_for(spec),
                what=f"{spec}: zstd byte {pos} bit {bit} (CRC fixed)",
            )


HOSTILE_NUMBERS = (0, 1, 2, 7, 255, 256, 511, 4096, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**33 + 1, 2**63, 2**64 - 1)


def field_mutations(t) -> list:
    """(description, changes) for one table entry: every numeric field set to
    edge values, to its neighbours and to the other tensors' values."""
    size = int(np.prod(t.shape, dtype=object)) if t.shape else 1
    near = {
        size - 1,
        size,
        size + 1,
        t.count - 1,
        t.count + 1,
        len(t.value_data) - 1,
        len(t.value_data) + 1,
        len(t.index_data) - 1,
        len(t.index_data) + 1,
        t.bucket - 1,
        t.bucket + 1,
        t.bucket * 2,
        t.bucket // 2,
    }
    values = sorted(v for v in set(HOSTILE_NUMBERS) | near if 0 <= v < 2**64)
    out = []
    for field, limit in (
        ("count", 2**64),
        ("bucket", 2**64),
        ("block", 2**64),
        ("index_len", 2**64),
        ("value_len", 2**64),
        ("flags", 256),
        ("kind", 256),
        ("value_code", 256),
        ("dtype_code", 256),
    ):
        for v in values:
            if v < limit:
                out.append((f"{field}={v}", {field: v}))
    for d in range(len(t.shape)):
        for v in values:
            shape = list(t.shape)
            shape[d] = v
            out.append((f"shape[{d}]={v}", {"shape": tuple(shape)}))
    out.append(("one more dimension", {"shape": t.shape + (2,)}))
    out.append(("one less dimension", {"shape": t.shape[1:]}))
    out.append(("rotated", {"flags": t.flags | 1, "block": t.block or 64}))
    out.append(("sparse", {"kind": W_SPARSE}))
    out.append(("seeded", {"kind": W_SEEDED}))
    out.append(("dense", {"kind": W_DENSE, "index_data": b""}))
    out.append(("raw", {"kind": W_RAW, "value_code": 255, "bucket": 0, "block": 0, "flags": 0, "index_data": b""}))
    return out


W_RAW, W_DENSE, W_SPARSE, W_SEEDED = 0, 1, 2, 3


@pytest.mark.parametrize("spec", SPEC_PARAMS)
def test_structured_table_mutations_with_valid_crc(spec: str, W, attempt) -> None:
    """Each numeric field of each table entry set to hostile values, with the
    body re-serialised consistently (sizes and CRC right): validation alone
    stands between these and the decoder's allocations and kernels."""
    import dataclasses

    p = valid_payload(spec)
    text, tensors = W.parse_body(W.plain_body(p))
    assert W.rebuild(p, W.body(tensors, text)) == p or "zstd" in spec
    for i, t in enumerate(tensors):
        for what, change in field_mutations(t):
            mutated = list(tensors)
            mutated[i] = dataclasses.replace(t, **change)
            attempt(
                W.rebuild(p, W.body(mutated, text)),
                must_fail=False,
                aggregate=True,
                what=f"{spec}: tensor {t.name!r} {what}",
            )
        # sections of another tensor, or none
        for j, other in enumerate(tensors):
            if j != i:
                mutated = list(tensors)
                mutated[i] = dataclasses.replace(t, index_data=other.index_data, value_data=other.value_data)
                attempt(
                    W.rebuild(p, W.body(mutated, text)),
                    must_fail=False,
                    what=f"{spec}: tensor {t.name!r} with the sections of {other.name!r}",
                )


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 10**6), st.binary(min_size=1, max_size=9)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=9)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 9)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
)


def mutate(data: bytes, ops: list) -> bytes:
    buf = bytearray(data)
    for op, pos, arg in ops:
        pos = pos % (len(buf) + 1)
        if op == "flip" and pos < len(buf):
            buf[pos] ^= 1 << arg
        elif op == "set":
            buf[pos : pos + len(arg)] = arg
        elif op == "insert":
            buf[pos:pos] = arg
        elif op == "delete":
            del buf[pos : pos + arg]
        elif op == "truncate":
            del buf[pos:]
    return bytes(buf)


@given(spec=st.sampled_from(SPECS + DIGEST_SPECS), ops=st.lists(mutation, min_size=1, max_size=4), fix=st.booleans())
def test_random_mutations(spec: str, ops: list, fix: bool, W, attempt) -> None:
    p = valid_payload(spec)
    if fix:  # mutate the body, recompute sizes and checksum
        data = mutate(W.plain_body(p), ops)
        attempt(
            W.rebuild(p, data),
            must_fail=False,
            aggregate=True,
            table=table_for(spec),
            what=f"{spec}: body {ops} (CRC fixed)",
        )
    else:
        data = mutate(p, ops)
        attempt(data, must_fail=data != p, table=table_for(spec), what=f"{spec}: {ops}")


@given(body=st.binary(max_size=300), zstd=st.booleans())
def test_random_bodies_with_valid_crc(body: bytes, zstd: bool, W, attempt) -> None:
    attempt(W.wrap(body, zstd_level=1 if zstd else 0), must_fail=False, what=f"random body {body[:40]!r}")


@given(data=st.binary(max_size=200))
def test_random_bytes(data: bytes, attempt) -> None:
    attempt(data, must_fail=True, what=f"random bytes {data[:40]!r}")
    attempt(b"FPRS\x01" + data, must_fail=True, what=f"random bytes after a magic {data[:40]!r}")


# ------------------------------------------------ hand-built hostile payloads --
def idx(indices, n) -> bytes:
    return fp.ops.encode_indices(np.asarray(indices, np.uint32), n)


def f32(*values) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


BIG = 1 << 31


def ok_raw(W):
    return W.tensor("ok", "int64", (2,), W.RAW, values="raw", value_data=struct.pack("<2q", 1, 2))


def dense(W, name="a", dtype="float32", shape=(2,), **kw):
    if "value_data" not in kw:
        kw["value_data"] = f32(*range(int(np.prod(shape, dtype=object)) if shape else 1))
    return W.tensor(name, dtype, shape, W.DENSE, **kw)


def renamed(body: bytes, old: bytes, new: bytes) -> bytes:  # noqa: D103
    assert body.count(old) == 1
    return body.replace(old, new)


# name -> (body builder, found only when the values are decoded (inspect reads the table alone))
HOSTILE: dict = {
    "tensor count 2^64-1": (lambda W: W.body([ok_raw(W)], n_tensors=2**64 - 1), False),
    "tensor count 2^32-1": (lambda W: W.body([ok_raw(W)], n_tensors=2**32 - 1), False),
    "tensor count 1000, one entry": (lambda W: W.body([ok_raw(W)], n_tensors=1000), False),
    "tensor count 2, one entry": (lambda W: W.body([ok_raw(W)], n_tensors=2), False),
    "spec length beyond the body": (lambda W: W.varint(0xFFFF) + b"fp32", False),
    "spec not utf-8": (lambda W: W.varint(2) + b"\xff\xfe" + W.varint(0), False),
    "ndim 255 without a shape": (lambda W: W.body([W.tensor("a", "int64", (), W.RAW, values="raw", ndim=255)]), False),
    "ndim 200 with a shape": (
        lambda W: W.body([W.tensor("a", "int64", (1,) * 200, W.RAW, values="raw", value_data=b"\0" * 8)]),
        False,
    ),
    "shape 2^40": (lambda W: W.body([W.tensor("a", "float32", (1 << 40,), W.SEEDED, count=0)]), False),
    "shape product overflows u64": (
        lambda W: W.body([W.tensor("a", "float32", (1 << 33,) * 3, W.SEEDED, count=0)]),
        False,
    ),
    "shape 2^64-1": (lambda W: W.body([dense(W, shape=(2**64 - 1,), count=1, value_data=f32(1))]), False),
    "shape (0, 2^63) raw": (lambda W: W.body([W.tensor("a", "int64", (0, 1 << 63), W.RAW, values="raw")]), True),
    "shape (0, 2^40, 2^40) raw": (
        lambda W: W.body([W.tensor("a", "int64", (0, 1 << 40, 1 << 40), W.RAW, values="raw")]),
        True,
    ),
    "shape (0, 2^63) dense": (lambda W: W.body([dense(W, shape=(0, 1 << 63), value_data=b"")]), True),
    "shape (0, 2^63) seeded": (lambda W: W.body([W.tensor("a", "float32", (0, 1 << 63), W.SEEDED, count=0)]), True),
    "shape (2^63, 0) dense": (lambda W: W.body([dense(W, shape=(1 << 63, 0), value_data=b"")]), True),
    "dense count 2^63": (lambda W: W.body([dense(W, shape=(4,), count=1 << 63)]), False),
    "dense 2^31 elements, values missing": (
        lambda W: W.body([dense(W, shape=(BIG,), value_data=b"", value_len=4 * BIG)]),
        False,
    ),
    "values length 2^64-1": (lambda W: W.body([dense(W, value_len=2**64 - 1)]), False),
    "index length 2^64-1": (
        lambda W: W.body(
            [
                W.tensor(
                    "a",
                    "float32",
                    (100,),
                    W.SPARSE,
                    count=1,
                    index_data=idx([3], 100),
                    value_data=f32(1),
                    index_len=2**64 - 1,
                )
            ]
        ),
        False,
    ),
    "sparse count above size": (
        lambda W: W.body(
            [W.tensor("a", "float32", (10,), W.SPARSE, count=11, index_data=idx([1], 10), value_data=f32(*range(11)))]
        ),
        False,
    ),
    "sparse count 2^31, values missing": (
        lambda W: W.body(
            [
                W.tensor(
                    "a",
                    "float32",
                    (BIG,),
                    W.SPARSE,
                    count=BIG,
                    index_data=idx([1], BIG),
                    value_data=f32(1),
                    value_len=4 * BIG,
                )
            ]
        ),
        False,
    ),
    "sparse index out of range": (
        lambda W: W.body(
            [
                W.tensor(
                    "a", "float32", (100,), W.SPARSE, count=3, index_data=idx([1, 5, 150], 200), value_data=f32(1, 2, 3)
                )
            ]
        ),
        True,
    ),
    "sparse index stream holds fewer": (
        lambda W: W.body(
            [W.tensor("a", "float32", (100,), W.SPARSE, count=3, index_data=idx([1, 5], 100), value_data=f32(1, 2, 3))]
        ),
        True,
    ),
    "sparse index stream holds more": (
        lambda W: W.body(
            [W.tensor("a", "float32", (100,), W.SPARSE, count=1, index_data=idx([1, 5], 100), value_data=f32(1))]
        ),
        True,
    ),
    "sparse index stream claims 2^32 indices": (
        lambda W: W.body(
            [
                W.tensor(
                    "a",
                    "float32",
                    (100,),
                    W.SPARSE,
                    count=2,
                    index_data=b"\xff\xff\xff\xff\x0f\x01\xff",
                    value_data=f32(1, 2),
                )
            ]
        ),
        True,
    ),
    "sparse index stream garbage": (
        lambda W: W.body(
            [
                W.tensor(
                    "a",
                    "float32",
                    (1000,),
                    W.SPARSE,
                    count=4,
                    index_data=b"\x04\x00\xff\xff\xff\xff\xff",
                    value_data=f32(1, 2, 3, 4),
                )
            ]
        ),
        True,
    ),
    "sparse without an index stream": (
        lambda W: W.body([W.tensor("a", "float32", (100,), W.SPARSE, count=1, value_data=f32(1))]),
        False,
    ),
    "sparse on an integer tensor": (
        lambda W: W.body(
            [W.tensor("a", "int32", (100,), W.SPARSE, count=1, index_data=idx([3], 100), value_data=f32(1))]
        ),
        False,
    ),
    "seeded with index bytes": (
        lambda W: W.body(
            [W.tensor("a", "float32", (100,), W.SEEDED, count=1, index_data=idx([3], 100), value_data=f32(1))]
        ),
        False,
    ),
    "seeded count above size": (
        lambda W: W.body([W.tensor("a", "float32", (10,), W.SEEDED, count=11, value_data=f32(*range(11)))]),
        False,
    ),
    "raw count mismatch": (
        lambda W: W.body([W.tensor("a", "int64", (2,), W.RAW, values="raw", count=3, value_data=b"\0" * 16)]),
        False,
    ),
    "raw bytes mismatch": (
        lambda W: W.body([W.tensor("a", "int64", (2,), W.RAW, values="raw", value_data=b"\0" * 12)]),
        False,
    ),
    "raw with a value code": (
        lambda W: W.body([W.tensor("a", "int64", (2,), W.RAW, values="q8", value_data=b"\0" * 16)]),
        False,
    ),
    "raw with a bucket": (
        lambda W: W.body([W.tensor("a", "int64", (2,), W.RAW, values="raw", bucket=512, value_data=b"\0" * 16)]),
        False,
    ),
    "raw bool byte 2": (
        lambda W: W.body([W.tensor("a", "bool", (3,), W.RAW, values="raw", value_data=b"\x01\x02\x00")]),
        True,
    ),
    "dense int tensor": (lambda W: W.body([dense(W, dtype="int64")]), False),
    "unknown dtype code": (lambda W: W.body([dense(W, dtype_code=200)]), False),
    "unknown kind": (lambda W: W.body([W.tensor("a", "float32", (2,), 7, value_data=f32(1, 2))]), False),
    "unknown value code": (lambda W: W.body([dense(W, value_code=99)]), False),
    "value code raw on a dense entry": (lambda W: W.body([dense(W, value_code=255)]), False),
    "unknown entry flags": (lambda W: W.body([dense(W, flags=0x80)]), False),
    "rotation block without the flag": (lambda W: W.body([dense(W, block=64)]), False),
    "rotation block not a power of two": (lambda W: W.body([dense(W, flags=1, block=48)]), False),
    "rotation block 2^31": (lambda W: W.body([dense(W, flags=1, block=1 << 31)]), False),
    "q4 bucket 0": (lambda W: W.body([dense(W, shape=(4,), values="q4", value_data=f32(1) + b"\0\0")]), False),
    "fp32 with a bucket": (lambda W: W.body([dense(W, bucket=512)]), False),
    "q8 NaN scale": (
        lambda W: W.body([dense(W, values="q8", bucket=512, value_data=f32(float("nan")) + b"\0\0")]),
        True,
    ),
    "q8 negative scale": (lambda W: W.body([dense(W, values="q8", bucket=512, value_data=f32(-1.0) + b"\0\0")]), True),
    "q8 infinite scale": (
        lambda W: W.body([dense(W, values="q8", bucket=512, value_data=f32(float("inf")) + b"\0\0")]),
        True,
    ),
    "q4 padding bits": (
        lambda W: W.body([dense(W, shape=(3,), values="q4", bucket=512, value_data=f32(1.0) + b"\x00\xf0")]),
        True,
    ),
    "sign padding bits": (
        lambda W: W.body([dense(W, shape=(3,), values="sign", bucket=512, value_data=f32(1.0) + b"\xff")]),
        True,
    ),
    "fp32 NaN value": (lambda W: W.body([dense(W, value_data=f32(1, float("nan")))]), True),
    "fp16 infinity": (
        lambda W: W.body([dense(W, dtype="float16", shape=(1,), values="fp16", value_data=b"\x00\x7c")]),
        True,
    ),
    "bf16 NaN": (
        lambda W: W.body([dense(W, dtype="bfloat16", shape=(1,), values="bf16", value_data=b"\xc0\x7f")]),
        True,
    ),
    "values length off by one": (lambda W: W.body([dense(W, value_data=f32(1, 2) + b"\0")]), False),
    "duplicate names": (lambda W: W.body([ok_raw(W), ok_raw(W)]), False),
    "name not utf-8": (lambda W: renamed(W.body([ok_raw(W)]), b"ok", b"\xff\xfe"), False),
    "name length beyond the body": (lambda W: W.varint(4) + b"fp32" + W.varint(1) + W.varint(60000) + b"a" * 60, False),
    # malformed varints (every varint field of real payloads: test_non_canonical_varints_are_refused)
    "varint not minimal": (
        lambda W: W.varint(4) + b"fp32" + b"\x81\x00" + W.entry(ok_raw(W)) + struct.pack("<2q", 1, 2),
        False,
    ),
    "varint of 11 bytes": (lambda W: b"\x80" * 10 + b"\x01" + b"fp32", False),
    "varint above 2^64": (lambda W: W.varint(4) + b"fp32" + b"\xff" * 9 + b"\x02", False),
    "varint of 2^64-1 elements": (lambda W: W.varint(4) + b"fp32" + b"\xff" * 9 + b"\x01", False),
    "varint runs past the end": (lambda W: W.varint(4) + b"fp32" + b"\x80", False),
    "dimension varint runs past the end": (
        lambda W: W.varint(4) + b"fp32" + W.varint(1) + W.varint(1) + b"a" + bytes((0, 1)) + b"\xff\xff",
        False,
    ),
    "sections missing": (lambda W: W.body([dense(W, shape=(4,), value_data=b"", value_len=16)]), False),
    "trailing bytes after the sections": (lambda W: W.body([ok_raw(W)], trailing=b"\0"), False),
    "empty body": (lambda W: b"", False),
}


@pytest.mark.parametrize("zstd", [False, True], ids=["plain", "zstd"])
@pytest.mark.parametrize("what", list(HOSTILE))
def test_hostile_tables_raise_decode_error(what: str, zstd: bool, W, memory_cap) -> None:
    build, values_only = HOSTILE[what]
    data = W.wrap(build(W), zstd_level=1 if zstd else 0, seed=5)
    for limits in (fp.Limits(), FUZZ_LIMITS):  # the default limits, too
        start = time.perf_counter()
        agg = fp.Aggregator(limits=limits)
        with memory_cap():
            with pytest.raises(fp.DecodeError):
                fp.decode(data, limits=limits)
            if not values_only:
                with pytest.raises(fp.DecodeError):
                    fp.inspect(data, limits=limits)
            with pytest.raises(fp.DecodeError):
                agg.add(data)
        assert agg.count == 0
        assert time.perf_counter() - start < SLOW


# ---------------------------------------------------- non-canonical varints --
def leb_groups(value: int, n: int) -> bytes:
    """`value` as an n-byte LEB128 run: 7-bit groups, low first, with the
    continuation bit on every byte but the last (high groups beyond n dropped)."""
    return bytes(((value >> 7 * i) & 0x7F) | (0x80 if i < n - 1 else 0) for i in range(n))


def lax_varint(data: bytes) -> int:
    """What a reader without the minimality, length and range checks makes of a
    varint: the groups summed and wrapped modulo 2^64."""
    return sum((b & 0x7F) << 7 * i for i, b in enumerate(data)) % (1 << 64)


def bad_varints(value: int, W) -> list:
    """(what, encoding) of `value` that a decoder must refuse: not minimal, longer
    than 10 bytes, or not below 2^64. A lax reader (lax_varint) still reads each as
    `value`, so a payload with one of them is otherwise intact."""
    n = len(W.varint(value))
    out = [
        ("with a redundant zero group", leb_groups(value, n + 1)),
        ("in 11 bytes", leb_groups(value, 11)),
        ("plus 2^64 (10 bytes)", leb_groups(value + (1 << 64), 10)),
        ("plus 2^70 (11 bytes)", leb_groups(value + (1 << 70), 11)),
    ]
    if n < 9:
        out.append(("padded to 10 bytes", leb_groups(value, 10)))
    for what, enc in out:
        assert enc != W.varint(value) and lax_varint(enc) == value, (value, what)
    return out


def splice(data: bytes, start: int, end: int, new: bytes) -> bytes:
    return data[:start] + new + data[end:]


@pytest.mark.parametrize("spec", ["topk:0.2+q8+zstd:1", "rht+q2+zstd", "randk:0.3+q2", "fp16", "topk:0.05+q4"])
def test_non_canonical_varints_are_refused(spec: str, W, memory_cap) -> None:
    """Every varint of a real payload re-encoded non-minimally, in more than 10
    bytes, or beyond 2^64 (same value modulo 2^64), with sizes and CRC recomputed:
    the header's raw_body_size; the body's spec_len and n_tensors; each entry's
    name_len, dimensions, count, bucket, rht_block, index_len and values_len;
    each index stream's k and m. Nothing else is wrong with these payloads.
    (small_update plus a 1000-element tensor, so there are multi-byte varints
    and sparse entries with k > 0.)"""
    import dataclasses

    update = dict(small_update(), big=np.random.default_rng(7).standard_normal((40, 25)).astype(np.float32))
    p = fp.Codec(spec).encode(update, seed=99)
    body = W.plain_body(p)
    cases = []  # (what, payload, found by inspect too: the table and header, not the index streams)
    covered = set()
    for field, start, end, value in W.varint_fields(body):
        covered.add(field.split(" ")[2] if field.startswith("tensor") else field)  # "tensor 3 dim 0" -> "dim"
        for how, enc in bad_varints(value, W):
            cases.append((f"{field} {value} {how}", W.rebuild(p, splice(body, start, end, enc)), True))
    text, tensors = W.parse_body(body)
    for i, t in enumerate(tensors):
        if t.kind != W.SPARSE:
            continue
        for field, start, end, value in W.index_varints(t.index_data):
            covered.add(f"index stream {field}")
            for how, enc in bad_varints(value, W):
                mutated = list(tensors)
                mutated[i] = dataclasses.replace(t, index_data=splice(t.index_data, start, end, enc))
                cases.append(
                    (f"tensor {i} index stream {field} {value} {how}", W.rebuild(p, W.body(mutated, text)), False)
                )
    h = W.header(p)
    if h["flags"] & W.FLAG_ZSTD:
        covered.add("raw_body_size")
        for how, enc in bad_varints(h["raw_size"], W):
            cases.append(
                (
                    f"raw_body_size {h['raw_size']} {how}",
                    W.fix_crc(splice(p, W.HEADER.size, h["header_size"], enc)),
                    True,
                )
            )
    assert {"spec_len", "n_tensors", "name_len", "dim", "count", "bucket", "block", "index_len", "value_len"} <= covered
    assert ("raw_body_size" in covered) == ("zstd" in spec)
    assert {"index stream k"} <= covered or not spec.startswith("topk")
    for what, data, in_table in cases:
        agg = fp.Aggregator()
        calls = [("decode", fp.decode), ("Aggregator.add", agg.add)] + [("inspect", fp.inspect)] * in_table
        for name, call in calls:
            with memory_cap():
                try:
                    call(data)
                except fp.DecodeError as exc:
                    assert re.search(r"(?i)varint", str(exc)), f"{what}: {name} error does not name the varint: {exc}"
                else:
                    pytest.fail(f"{what}: {name} accepted it", pytrace=False)
        assert agg.count == 0, what


def test_sign_section_with_a_huge_bucket(W, memory_cap) -> None:
    """A 60-byte payload: three sign values in one bucket that claims 2^31 elements.
    Nothing in the table bounds the bucket, so decoding must not expand the
    scales to the bucket's size (8 GiB) to read three values."""
    body = W.body([dense(W, shape=(3,), values="sign", bucket=1 << 31, value_data=f32(1.5) + b"\x05")])
    with memory_cap():
        try:
            out = fp.decode(W.wrap(body))
        except fp.DecodeError:
            return
        except MemoryError as exc:
            pytest.fail(f"decoding 3 sign values with bucket 2^31 tried to allocate gigabytes: {exc}")
    np.testing.assert_array_equal(out["a"], np.array([1.5, -1.5, 1.5], np.float32))


@pytest.mark.parametrize("code", ["q8", "q4", "q2", "sign"])
@pytest.mark.parametrize("bucket", [1, 3, 2**32 - 1])
def test_odd_buckets_decode_or_refuse(code: str, bucket: int, W, attempt) -> None:
    """Any bucket the table accepts decodes at a cost bounded by the payload."""
    n = 5
    nb = -(-n // bucket)
    bits = {"q8": 8, "q4": 4, "q2": 2, "sign": 1}[code]
    data = f32(*([2.0] * nb)) + b"\0" * ((n * bits + 7) // 8)
    body = W.body([dense(W, shape=(n,), values=code, bucket=bucket, value_data=data)])
    attempt(W.wrap(body), must_fail=False, what=f"{code} with bucket {bucket}")


@pytest.mark.parametrize(
    "count, block, value_len", [(3, 64, 12), (3, 64, 4 * 64 + 1), (100, 64, 4 * 100), (3, 1 << 24, 4 * (1 << 24))]
)
def test_rotated_sections_with_wrong_sizes(count: int, block: int, value_len: int, W, attempt) -> None:
    body = W.body(
        [dense(W, shape=(count,), flags=1, block=block, value_data=b"\0" * min(value_len, 4096), value_len=value_len)]
    )
    attempt(W.wrap(body), must_fail=True, what=f"rotated {count} values, block {block}, {value_len} bytes")


# ----------------------------------------------------------------- zstd lies --
def zstd_frame(data: bytes, **kw) -> bytes:
    return zstandard.ZstdCompressor(level=3, **kw).compress(data)


def with_content_size(frame: bytes, size: int) -> bytes:
    """The frame with its Frame_Content_Size rewritten as an 8-byte field."""
    fhd = frame[4]
    single, did_flag, fcs_flag = (fhd >> 5) & 1, fhd & 3, fhd >> 6
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[did_flag]
    fcs_len = {0: 1 if single else 0, 1: 2, 2: 4, 3: 8}[fcs_flag]
    return frame[:4] + bytes([(fhd & 0x3F) | 0xC0]) + frame[5:pos] + struct.pack("<Q", size) + frame[pos + fcs_len :]


def zstd_payload(W, stored: bytes, raw_size: int) -> bytes:
    return W.wrap(stored, flags=W.FLAG_ZSTD, raw_size=raw_size)


def _hostile_table(W) -> bytes:
    return W.body([ok_raw(W)], n_tensors=2**32 - 1)


ZSTD_CASES: dict = {
    "header raw size one more than the frame's": lambda W, body, frame: zstd_payload(W, frame, len(body) + 1),
    "header raw size one less than the frame's": lambda W, body, frame: zstd_payload(W, frame, len(body) - 1),
    "frame without a content size": lambda W, body, frame: zstd_payload(
        W, zstd_frame(body, write_content_size=False), len(body)
    ),
    "frame content size lies small": lambda W, body, frame: zstd_payload(
        W, with_content_size(frame, len(body) - 7), len(body) - 7
    ),
    "frame content size lies large": lambda W, body, frame: zstd_payload(
        W, with_content_size(frame, len(body) + 7), len(body) + 7
    ),
    "frame content size 2^33 (bomb claim)": lambda W, body, frame: zstd_payload(
        W, with_content_size(frame, 1 << 33), 1 << 33
    ),
    "frame content size 2^40": lambda W, body, frame: zstd_payload(W, with_content_size(frame, 1 << 40), 1 << 40),
    "garbage after the frame": lambda W, body, frame: zstd_payload(W, frame + b"\0\1\2", len(body)),
    "two frames": lambda W, body, frame: zstd_payload(W, frame + frame, len(body)),
    "two frames, sizes added": lambda W, body, frame: zstd_payload(W, frame + frame, 2 * len(body)),
    "frame cut short": lambda W, body, frame: zstd_payload(W, frame[:-3], len(body)),
    "not a frame": lambda W, body, frame: zstd_payload(W, b"\0" * 40, len(body)),
    "empty stored body": lambda W, body, frame: zstd_payload(W, b"", 0),
    "frame holding a hostile table": lambda W, body, frame: zstd_payload(
        W, zstd_frame(_hostile_table(W)), len(_hostile_table(W))
    ),
    "raw size varint runs into the trailer": lambda W, body, frame: W.fix_crc(
        W.HEADER.pack(W.MAGIC, 1, W.FLAG_ZSTD, 0) + b"\x80\x80" + b"\0" * 4
    ),
    "raw size varint of 0xff up to the trailer": lambda W, body, frame: W.fix_crc(
        W.HEADER.pack(W.MAGIC, 1, W.FLAG_ZSTD, 0) + b"\xff" * 12 + b"\0" * 4
    ),
    "zstd bomb: 64 MiB of zeros": lambda W, body, frame: zstd_payload(W, zstd_frame(b"\0" * (64 << 20)), 64 << 20),
}


@pytest.mark.parametrize("what", list(ZSTD_CASES))
def test_zstd_bodies_that_lie(what: str, W, memory_cap) -> None:
    body = W.plain_body(valid_payload("q8"))
    data = ZSTD_CASES[what](W, body, zstd_frame(body))
    start = time.perf_counter()
    with memory_cap():
        with pytest.raises(fp.DecodeError):
            fp.decode(data, limits=FUZZ_LIMITS)
        with pytest.raises(fp.DecodeError):
            fp.decode(data)
    assert time.perf_counter() - start < SLOW


def test_frame_content_size_rewrite_is_faithful(W) -> None:
    """The helper above gives frames zstd itself accepts when the size is true."""
    body = W.plain_body(valid_payload("q8"))
    frame = with_content_size(zstd_frame(body), len(body))
    assert zstandard.frame_content_size(frame) == len(body)
    assert zstandard.ZstdDecompressor().decompress(frame) == body
    assert set(fp.decode(zstd_payload(W, frame, len(body)))) == set(small_update())
