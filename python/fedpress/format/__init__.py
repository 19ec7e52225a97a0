"""The wire format: one self-describing payload per update (see docs/format.md).

Layout (all integers little-endian)::

    header   magic b"FPRS" | version u8 | flags u8 | seed u64 (14 bytes)
             | raw_body_size varint (only when the body is zstd-compressed)
    body     (zstd-compressed when flags bit 0 is set)
             spec_len varint | spec | n_tensors varint | table entries | sections
             entry: name_len varint | name | dtype u8 | ndim u8 | ndim x dim varint
                    | kind u8 | value code u8 | flags u8 | count, bucket, rotation block,
                    index section length, values section length: varints
             with flags bit 1 (TABLE_DIGEST) set, the table is left to the receiver:
             spec_len varint | spec | table digest (8 bytes) | n_tensors varint
             | compact entries (an entry from kind on) | sections
    trailer  crc32c u32 over header and stored body

Every length, count, shape and index is checked against the buffer and against
``Limits`` before anything is allocated; any malformed payload raises
``DecodeError``.

The names below are the public surface. The modules behind them, each one concept,
are internal to fedpress (the rest of the package imports from them by name):

    registry    magic, version, flags, section kinds, dtype and value codes, stage seeds
    primitives  LEB128 varints and the bounds-checked ByteReader
    errors      DecodeError, and MemoryError reported as it
    limits      Limits, DEFAULT_LIMITS and the bounds the format fixes
    tables      tensor tables and their digests
    values      fp32/fp16/bf16/q8/q4/q2/sign value sections
    eden        EDEN value sections
    writer      Entry and write
    reader      parse: every check, records with section views
    decoding    decode, decode_parts, accumulate, inspect and the per-record decoders
"""

from __future__ import annotations

from .decoding import accumulate, decode, decode_parts, inspect
from .errors import DecodeError
from .limits import DEFAULT_LIMITS, EXPANSION_FLOOR, Limits
from .reader import payload_table_digest
from .registry import FORMAT_VERSION, MAGIC, READ_VERSIONS
from .tables import table_digest

__all__ = [
    "decode",
    "decode_parts",
    "accumulate",
    "inspect",
    "table_digest",
    "payload_table_digest",
    "DecodeError",
    "Limits",
    "DEFAULT_LIMITS",
    "EXPANSION_FLOOR",
    "FORMAT_VERSION",
    "READ_VERSIONS",
    "MAGIC",
]
