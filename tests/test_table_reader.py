"""The tensor table read natively (_core.read_table) and field by field in Python (the
path taken when the native reader refuses a table): the same records for every payload,
and the same error, word for word, for every malformed one. The native reader only speeds
up well-formed tables; what is wrong is always reported by the Python reader."""

from __future__ import annotations

import struct

import fedpress as fp
import numpy as np
import pytest
from fedpress import _core
from fedpress.format import reader
from fedpress.format.errors import DecodeError
from fedpress.format.limits import DEFAULT_LIMITS, Limits


def outcome(payload: bytes, table=None, limits: Limits = DEFAULT_LIMITS) -> object:
    """What parse gives: each record's fields, or the error's message."""
    try:
        parsed = reader.parse(payload, limits, table)
    except DecodeError as exc:
        return f"DecodeError: {exc}"
    return [
        (
            r.ordinal,
            r.name,
            r.dtype,
            r.shape,
            r.kind,
            r.value_code,
            r.count,
            r.bucket,
            r.rht_block,
            bytes(r.index_data),
            bytes(r.value_data),
            r.value_offset,
        )
        for r in parsed.tensors
    ]


def both(payload: bytes, monkeypatch: pytest.MonkeyPatch, **kw) -> tuple[object, object]:
    fast = outcome(payload, **kw)
    with monkeypatch.context() as m:
        m.setattr(reader._core, "read_table", lambda *args: None)
        slow = outcome(payload, **kw)
    return fast, slow


def payloads() -> list[tuple[bytes, object]]:
    rng = np.random.default_rng(0)
    model = {
        "conv.weight": rng.standard_normal((8, 4, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(8).astype(np.float32),
        "é": rng.standard_normal(300).astype(np.float16),
        "steps": np.arange(5, dtype=np.int64),
        "empty": np.zeros((0, 3), np.float32),
        "scalar": np.float64(2.5) * np.ones(()),
    }
    out = []
    for spec in ("fp32", "q4", "topk:0.1+q8+zstd", "randk:0.2+sign", "eden2", "rht+q2"):
        out.append((fp.Codec(spec).encode(model, seed=1), None))
        out.append((fp.Codec(spec, table="digest").encode(model, seed=1), model))
    return out


@pytest.mark.parametrize("index", range(12))
def test_well_formed_tables_read_the_same(index: int, monkeypatch: pytest.MonkeyPatch) -> None:
    payload, table = payloads()[index]
    fast, slow = both(payload, monkeypatch, table=table)
    assert fast == slow and isinstance(fast, list) and len(fast) == 6


@pytest.mark.parametrize("index", [0, 1, 2, 3, 6, 7, 8, 9, 10, 11])  # 4 and 5 are zstd-compressed
def test_mutated_tables_fail_the_same(index: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every byte of the body's start flipped in turn, with the checksum fixed up so the
    table itself is what is read: the same records or the same message either way."""
    payload, table = payloads()[index]
    rng = np.random.default_rng(index)
    raw = bytearray(payload)
    assert not raw[5] & 0x01  # not zstd-compressed (flag bit 0): the mutations hit the table
    body_start = 14  # magic (4), version, flags, seed (8): docs/format.md, "Header"
    limit = min(len(raw) - 4, body_start + 400)
    for at in range(body_start, limit):
        for value in {raw[at] ^ 0x80, raw[at] ^ 0x01, int(rng.integers(0, 256))}:
            mutated = bytearray(raw)
            mutated[at] = value
            mutated[-4:] = struct.pack("<I", _core.crc32c(bytes(mutated[:-4])))
            fast, slow = both(bytes(mutated), monkeypatch, table=table)
            assert fast == slow, (at, value)


def test_limits_and_truncations_fail_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    payload, _ = payloads()[0]
    for limits in (Limits(max_dims=3), Limits(max_tensors=5), Limits(max_elements=100)):
        fast, slow = both(payload, monkeypatch, limits=limits)
        assert fast == slow and str(fast).startswith("DecodeError")
    for cut in range(15, 120):
        short = bytearray(payload[:cut])
        short += struct.pack("<I", _core.crc32c(bytes(short)))
        fast, slow = both(bytes(short), monkeypatch)
        assert fast == slow


def test_the_native_reader_refuses_what_it_cannot_read() -> None:
    entry = bytes([1, ord("w"), 0, 1, 3, 0, 0, 0, 3, 0, 0, 0, 12])  # "w", float32 [3], dense fp32, 12 bytes
    end, rows = _core.read_table(entry, 0, 1, True, 8)
    assert end == len(entry) and rows == [(b"w", 0, (3,), 0, 0, 0, 3, 0, 0, 0, 12)]
    assert _core.read_table(entry[:-1], 0, 1, True, 8) is None  # truncated
    assert _core.read_table(entry, 0, 1, True, 0) is None  # too many dimensions
    assert _core.read_table(entry, 0, 2, True, 8) is None  # a count the body cannot hold
    assert _core.read_table(entry + entry, 0, 2, True, 8)[0] == 2 * len(entry)
    not_minimal = entry[:4] + bytes([0x83, 0x00]) + entry[5:]  # 3 written in two bytes
    assert _core.read_table(not_minimal, 0, 1, True, 8) is None
    huge = entry[:4] + bytes([0xFF] * 9 + [0x02]) + entry[5:]  # 2^64 and more
    assert _core.read_table(huge, 0, 1, True, 8) is None
    compact = bytes([0, 0, 0, 3, 0, 0, 0, 12])
    assert _core.read_table(compact, 0, 1, False, 8) == (8, [(None, 0, (), 0, 0, 0, 3, 0, 0, 0, 12)])
