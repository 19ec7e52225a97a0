"""Reading a payload: ``parse`` checks the header, checksum, body, table and every
section against the buffer and the ``Limits`` before anything is allocated, and
returns a ``Parsed`` with one ``TensorRecord`` (views of its sections, nothing
decoded) per tensor; ``decoding`` turns records into arrays. Internal to fedpress
apart from ``payload_table_digest`` (see ``fedpress.format``)."""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import zstandard

from .. import _core, ops
from .eden import EdenSection, eden_fixed_size, parse_eden
from .errors import DecodeError, out_of_memory_as_decode_error
from .intcodes import INT_HEAD, IntSection, parse_int
from .limits import DEFAULT_LIMITS, EXPANSION_FLOOR, MAX_BUCKET, MAX_ROTATION_BLOCK, Limits
from .primitives import ByteReader
from .registry import (
    DIGEST_BYTES,
    DTYPES,
    EDEN_BITS,
    ENTRY_FLAG_ROTATED,
    FLAG_TABLE_DIGEST,
    FLAG_ZSTD,
    FLOAT_DTYPES,
    FORMAT_VERSION,
    HEADER,
    HEADER_FLAGS,
    KIND_DENSE,
    KIND_NAMES,
    KIND_RAW,
    KIND_SPARSE,
    MAGIC,
    PURPOSE_RHT,
    READ_VERSIONS,
    TRAILER,
    VALUE_CODES,
    VALUE_RAW,
    stage_seed,
)
from .tables import TableEntry, entry_difference, entry_head, heads_digest, table_entries
from .values import values_size

__all__ = ["payload_table_digest"]

# Each table entry takes at least this many bytes, which bounds the tensor count a body can hold.
ENTRY_MIN_BYTES = 11  # name_len, dtype, ndim, kind, value code, flags, 5 varints: at least 1 byte each
COMPACT_ENTRY_MIN_BYTES = 8  # kind, value code, flags, 5 varints

_BB, _BBB = struct.Struct("<BB"), struct.Struct("<BBB")


_NO_BYTES = memoryview(b"")


@dataclass
class TensorRecord:
    """A validated table entry and views of its sections (nothing decoded yet)."""

    ordinal: int
    name: str
    dtype: str
    shape: tuple
    size: int
    kind: int
    value_code: str
    count: int
    bucket: int
    rht_block: int
    index_len: int
    value_len: int
    index_data: memoryview = _NO_BYTES  # set once the whole table is checked
    value_data: memoryview = _NO_BYTES
    eden: Optional[EdenSection] = None  # eden value codes: the parsed section
    intcode: Optional[IntSection] = None  # the int value code: the parsed section
    index_version: int = FORMAT_VERSION  # the payload's version, which fixes its index streams' layout
    value_offset: int = 0  # where the values section starts in the payload (an uncompressed one)


@dataclass
class Parsed:
    """A validated payload: its header fields and one record per tensor, in table order."""

    spec: str
    seed: int
    version: int
    flags: int
    payload_size: int
    body_size: int
    tensors: list = field(default_factory=list)
    table_digest: Optional[bytes] = None  # what a payload without its table carries
    # parse(defer_checksum=True) of an uncompressed payload: the bytes the checksum covers
    # and the stored checksum, for finish_checksum; None once verified.
    unchecked: Optional[memoryview] = None
    stored_crc: int = 0
    body_offset: int = 0  # where an uncompressed body starts in the payload


def output_dtype(dtype: str) -> np.dtype:
    """The dtype ``decode`` gives a tensor of wire dtype ``dtype`` (bfloat16 comes back as float32)."""
    return np.dtype(np.float32) if dtype == "bfloat16" else np.dtype(dtype)


def output_bytes(rec: TensorRecord) -> int:
    """Bytes of a tensor's dense output, what Limits.max_decoded_bytes and max_expansion count."""
    return rec.size * _output_itemsize(rec.dtype)


@functools.lru_cache(maxsize=None)
def _output_itemsize(dtype: str) -> int:
    return output_dtype(dtype).itemsize


def as_buffer(payload: Any) -> memoryview:
    if isinstance(payload, np.ndarray):
        payload = payload.tobytes()
    try:
        view = memoryview(payload)
    except TypeError:
        raise TypeError(f"payload must be bytes-like, got {type(payload).__name__}") from None
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def parse(payload: Any, limits: Limits = DEFAULT_LIMITS, table: Any = None, *, defer_checksum: bool = False) -> Parsed:
    """Validates a whole payload and returns its table with section views.

    ``table`` (as for ``table_digest``) is the model the payload must be made
    for: a payload without its table needs it, and one with its table must match it.

    ``defer_checksum``: an uncompressed payload's checksum is left to the caller's
    ``finish_checksum``, which converts value sections while it reads them for the
    checksum, so a decoder reads the payload once; the caller uses nothing it decoded
    before that returns. A payload whose structure is broken is still reported as a
    checksum mismatch when its checksum is wrong (the usual cause)."""
    known = None if table is None else table_entries(table)
    parsed, body = _open(payload, limits, verify=not defer_checksum)
    try:
        _parse_body(body, parsed, limits, known)
    except DecodeError:
        if parsed.unchecked is not None:
            finish_checksum(parsed, [])
        raise
    return parsed


def finish_checksum(parsed: Parsed, jobs: list) -> list[bool]:
    """Verifies a deferred checksum (DecodeError on a mismatch), running ``jobs`` on the
    way: (offset in the payload, code, count, float32 out) decode a float values section
    (code fp32, fp16 or bf16) into ``out``, (offset, "fp32-finite", count, None) only
    checks one. Returns whether each job's values are all finite."""
    if parsed.unchecked is None:
        raise ValueError("the checksum was not deferred, or is already verified")
    actual, finite = _core.crc32c_decoding(parsed.unchecked, jobs)
    checksum_verified(parsed, actual)
    return [bool(f) for f in finite]


def checksum_verified(parsed: Parsed, computed: int) -> None:
    """Marks a deferred checksum verified, given the CRC-32C computed over ``parsed.unchecked``:
    DecodeError on a mismatch."""
    if computed != parsed.stored_crc:
        raise checksum_mismatch(parsed.stored_crc, computed)
    parsed.unchecked = None


def checksum_mismatch(stored: int, computed: int) -> DecodeError:
    return DecodeError(f"checksum mismatch: stored 0x{stored:08x}, computed 0x{computed:08x}")


def payload_table_digest(payload: Any, *, limits: Limits = DEFAULT_LIMITS) -> Optional[bytes]:
    """The table digest a payload carries instead of its tensor table, or None when it
    carries its table. Checks the header, checksum and body framing only: for telling
    which model a payload was made for before decoding it with that model's table."""
    with out_of_memory_as_decode_error():  # the body may be zstd-compressed
        parsed, body = _open(payload, limits)
    if not parsed.flags & FLAG_TABLE_DIGEST:
        return None
    r = ByteReader(body, "payload body")
    r.take(r.varint("codec spec length"), "codec spec")
    return bytes(r.take(DIGEST_BYTES, "tensor table digest"))


def _open(payload: Any, limits: Limits, *, verify: bool = True) -> tuple[Parsed, memoryview]:
    """Checks the header and trailer and returns the (decompressed) body. Without
    ``verify``, an uncompressed payload's checksum is left to ``finish_checksum``."""
    buf = as_buffer(payload)
    if len(buf) < HEADER.size + TRAILER.size:
        raise DecodeError(
            f"payload truncated: {len(buf)} bytes, the header and checksum alone take {HEADER.size + TRAILER.size}"
        )
    magic, version, flags, seed = HEADER.unpack(buf[: HEADER.size])
    if magic != MAGIC:
        raise DecodeError(f"not a fedpress payload: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version not in READ_VERSIONS:
        readable = " and ".join(str(v) for v in READ_VERSIONS)
        raise DecodeError(f"unsupported payload format version {version} (this decoder reads versions {readable})")
    if flags & ~HEADER_FLAGS:
        raise DecodeError(f"unknown header flags 0x{flags:02x} (reserved bits must be zero)")
    end = len(buf) - TRAILER.size
    head = ByteReader(buf[:end], "payload header")
    head.pos = HEADER.size
    raw_size = head.varint("raw body size") if flags & FLAG_ZSTD else None
    (crc,) = TRAILER.unpack(buf[end:])
    deferred = not verify and not flags & FLAG_ZSTD  # a compressed body is checked before it is inflated
    if not deferred:
        actual = _core.crc32c(buf[:end])
        if crc != actual:
            raise checksum_mismatch(crc, actual)
    stored = buf[head.pos : end]
    body_size = len(stored)
    if raw_size is not None:
        if raw_size > limits.max_body_bytes:
            raise DecodeError(f"body of {raw_size} bytes exceeds the limit of {limits.max_body_bytes}")
        body = memoryview(_unzstd(stored, raw_size))
    else:
        if body_size > limits.max_body_bytes:
            raise DecodeError(f"body of {body_size} bytes exceeds the limit of {limits.max_body_bytes}")
        body = stored
        raw_size = body_size
    parsed = Parsed(spec="", seed=seed, version=version, flags=flags, payload_size=len(buf), body_size=raw_size)
    if deferred:
        parsed.unchecked, parsed.stored_crc = buf[:end], crc
        parsed.body_offset = head.pos
    return parsed, body


def _unzstd(stored: memoryview, raw_size: int) -> bytes:
    try:
        declared = zstandard.frame_content_size(stored)
    except zstandard.ZstdError as exc:
        raise DecodeError(f"zstd body: bad frame header ({exc})") from None
    if declared != raw_size:
        raise DecodeError(f"zstd body declares {declared} bytes, the header says {raw_size}")
    # One call into a buffer of the declared size (bounded by the limit above): the
    # streaming decompressor passes everything through its window buffer, a 47 MB fp16 body
    # 93 ms instead of 64. One frame exactly: anything after it is refused.
    try:
        out = zstandard.ZstdDecompressor().decompress(stored, max_output_size=raw_size, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        if "unused data" in str(exc):
            raise DecodeError(f"zstd body: data left over after its frame ({exc}), expected one frame") from None
        raise DecodeError(f"zstd body is corrupt ({exc})") from None
    if len(out) != raw_size:
        raise DecodeError(f"zstd body decodes to {len(out)} bytes, expected exactly {raw_size}")
    return out


def _parse_body(body: memoryview, parsed: Parsed, limits: Limits, known: Optional[list[TableEntry]]) -> None:
    r = ByteReader(body, "payload body")
    spec_len = r.varint("codec spec length")
    try:
        parsed.spec = bytes(r.take(spec_len, "codec spec")).decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError("codec spec is not valid UTF-8") from None
    compact = bool(parsed.flags & FLAG_TABLE_DIGEST)
    if compact:
        digest = parsed.table_digest = bytes(r.take(DIGEST_BYTES, "tensor table digest"))
        if known is None:
            raise DecodeError(
                f"payload omits its tensor table (digest 0x{digest.hex()}); pass table= (the model it was made for)"
            )
        expected = heads_digest([entry_head(*e) for e in known])
        if digest != expected:
            raise DecodeError(
                f"tensor table digest 0x{digest.hex()} does not match the receiver's model (0x{expected.hex()})"
            )
    n_tensors = r.varint("tensor count")
    if n_tensors > limits.max_tensors:
        raise DecodeError(f"tensor count {n_tensors} exceeds the limit of {limits.max_tensors}")
    if known is not None and n_tensors != len(known):
        if compact:
            raise DecodeError(f"tensor count {n_tensors} differs from the receiver's model's {len(known)} tensors")
        raise DecodeError(f"tensor table differs from the receiver's model: {n_tensors} tensors, expected {len(known)}")
    # Each table entry takes at least ENTRY_MIN_BYTES (a compact one COMPACT_ENTRY_MIN_BYTES):
    # refuse counts the body cannot hold.
    min_bytes = COMPACT_ENTRY_MIN_BYTES if compact else ENTRY_MIN_BYTES
    if n_tensors * min_bytes > len(body) - r.pos:
        raise DecodeError(f"tensor count {n_tensors} cannot fit in the {len(body) - r.pos} bytes left")
    names: set[str] = set()
    total_elements = total_bytes = 0
    records = []
    # The table's fields read natively when it is well formed; otherwise (rows None) read
    # here, field by field, which names what is wrong. Either way they are checked here.
    fast = _core.read_table(body, r.pos, n_tensors, not compact, limits.max_dims)
    rows = None if fast is None else fast[1]
    for ordinal in range(n_tensors):
        row = None if rows is None else rows[ordinal]
        if compact:
            assert known is not None
            name, dtype, shape = known[ordinal]
            if len(shape) > limits.max_dims:  # the receiver's table meets the same limits
                raise DecodeError(f"tensor {name!r}: {len(shape)} dimensions exceed the limit of {limits.max_dims}")
        else:
            if row is None:
                name, dtype, shape = _read_entry_head(r, ordinal, names, limits)
            else:
                name, dtype, shape = _entry_head(ordinal, row[0], row[1], row[2], names, limits)
            # Checked as each entry is read, so the receiver's model, not the payload, sets the sizes.
            if known is not None and (name, dtype, shape) != known[ordinal]:
                raise DecodeError(entry_difference(known[ordinal], (name, dtype, shape), "the receiver's model"))
        size = 1
        for d in shape:
            # Each dimension on its own too: a zero elsewhere must not hide a huge one.
            size = size * d if d <= limits.max_elements else limits.max_elements + 1
            size = min(size, limits.max_elements + 1)
        if size > limits.max_elements or any(d > limits.max_elements for d in shape):
            raise DecodeError(f"tensor {name!r}: shape {shape} exceeds the limit of {limits.max_elements} elements")
        fields = _EntryFields.read(r, name) if row is None else _EntryFields(*row[3:])
        rec = _check_entry(ordinal, (name, dtype, shape), size, fields)
        total_elements += size
        total_bytes += output_bytes(rec)
        if total_elements > limits.max_total_elements:
            raise DecodeError(f"payload holds more than {limits.max_total_elements} elements")
        if total_bytes > limits.max_decoded_bytes:
            raise DecodeError(f"payload decodes to more than {limits.max_decoded_bytes} bytes")
        records.append(rec)
    if fast is not None:
        r.pos = fast[0]
    if known is None:
        # A table nobody vouched for: its output is bounded by the payload's size, checked
        # on the whole table, so a structural defect in a later entry is named first.
        bound = max(EXPANSION_FLOOR, limits.max_expansion * parsed.payload_size)
        if total_bytes > bound:
            big = max(records, key=output_bytes)
            raise DecodeError(
                f"payload of {parsed.payload_size} bytes declares {total_bytes} bytes of output (tensor "
                f"{big.name!r}, {big.dtype} {big.shape}: {output_bytes(big)} bytes), beyond its bound of {bound} "
                f"bytes (Limits.max_expansion = {limits.max_expansion} per payload byte, at least "
                f"{EXPANSION_FLOOR}); pass table= (the model it was made for) or raise Limits.max_expansion"
            )
    for rec in records:
        rec.index_version = parsed.version
        at = r.pos
        if at + rec.index_len + rec.value_len <= len(body):  # both fit: cut them here
            rec.index_data = body[at : at + rec.index_len]
            at += rec.index_len
            rec.value_offset = parsed.body_offset + at
            rec.value_data = body[at : at + rec.value_len]
            r.pos = at + rec.value_len
        else:  # one does not: take them in order, which names the one cut short
            rec.index_data = r.take(rec.index_len, _about(rec.name, "index section"))
            rec.value_offset = parsed.body_offset + r.pos
            rec.value_data = r.take(rec.value_len, _about(rec.name, "values section"))
        if rec.value_code in EDEN_BITS:
            try:
                rec.eden = parse_eden(
                    rec.value_code,
                    rec.value_data,
                    rec.count,
                    rec.rht_block,
                    stage_seed(parsed.seed, rec.ordinal, PURPOSE_RHT),
                    version=parsed.version,
                )
            except DecodeError as exc:
                raise DecodeError(f"tensor {rec.name!r}: {exc}") from None
        elif rec.value_code == "int":
            try:
                rec.intcode = parse_int(rec.value_data, rec.count, rec.rht_block)
            except DecodeError as exc:
                raise DecodeError(f"tensor {rec.name!r}: {exc}") from None
    if r.pos != len(body):
        raise DecodeError(f"{len(body) - r.pos} trailing bytes after the last section")
    parsed.tensors = records


def _about(name: str, field: str) -> Callable[[], str]:
    """A field's name for an error message, made only if one is raised."""
    return lambda: f"tensor {name!r} {field}"


def _read_entry_head(r: ByteReader, ordinal: int, names: set[str], limits: Limits) -> TableEntry:
    """Name, dtype and shape of an inline table entry, read and checked (the size is
    checked by the caller)."""
    name_len = r.varint(lambda: f"tensor {ordinal} name length")
    name = _entry_name(ordinal, bytes(r.take(name_len, lambda: f"tensor {ordinal} name")), names)
    dtype_code, ndim = r.unpack(_BB, lambda: f"tensor {name!r} dtype")
    _check_dtype_and_dims(name, dtype_code, ndim, limits)
    shape = tuple(r.varint(_about(name, f"dimension {d}")) for d in range(ndim))
    return name, DTYPES[dtype_code], shape


def _entry_head(
    ordinal: int, name_bytes: bytes, dtype_code: int, shape: tuple, names: set[str], limits: Limits
) -> TableEntry:
    """``_read_entry_head`` of fields already read (``_core.read_table``): the same checks."""
    name = _entry_name(ordinal, name_bytes, names)
    _check_dtype_and_dims(name, dtype_code, len(shape), limits)
    return name, DTYPES[dtype_code], shape


def _entry_name(ordinal: int, name_bytes: bytes, names: set[str]) -> str:
    try:
        name = name_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError(f"tensor {ordinal} name is not valid UTF-8") from None
    if name in names:
        raise DecodeError(f"tensor name {name!r} appears twice")
    names.add(name)
    return name


def _check_dtype_and_dims(name: str, dtype_code: int, ndim: int, limits: Limits) -> None:
    if dtype_code >= len(DTYPES):
        raise DecodeError(f"tensor {name!r}: unknown dtype code {dtype_code}")
    if ndim > limits.max_dims:
        raise DecodeError(f"tensor {name!r}: {ndim} dimensions exceed the limit of {limits.max_dims}")


@dataclass
class _EntryFields:
    """A table entry's fields after its head (name, dtype, shape), as read: not checked yet."""

    kind: int
    value_code: int  # the wire code: an index into VALUE_CODES, or VALUE_RAW
    flags: int
    count: int
    bucket: int
    block: int  # the rotation block
    index_len: int
    value_len: int

    @classmethod
    def read(cls, r: ByteReader, name: str) -> _EntryFields:
        kind, value_code, flags = r.unpack(_BBB, lambda: f"tensor {name!r} kind")
        count = r.varint(lambda: f"tensor {name!r} count")
        bucket = r.varint(lambda: f"tensor {name!r} bucket")
        block = r.varint(lambda: f"tensor {name!r} rotation block")
        index_len = r.varint(lambda: f"tensor {name!r} index section length")
        value_len = r.varint(lambda: f"tensor {name!r} values section length")
        return cls(kind, value_code, flags, count, bucket, block, index_len, value_len)


def _check_entry(ordinal: int, head: TableEntry, size: int, e: _EntryFields) -> TensorRecord:
    """The record of tensor ``ordinal`` (``head`` checked, ``size`` elements) once its
    fields agree with each other and with its dtype and size; its sections' views are
    set after the whole table is checked."""
    name, dtype, shape = head
    where = f"tensor {name!r}"

    def record(value_code: str, bucket: int, rht_block: int) -> TensorRecord:
        return TensorRecord(
            ordinal=ordinal,
            name=name,
            dtype=dtype,
            shape=tuple(shape),
            size=size,
            kind=e.kind,
            value_code=value_code,
            count=e.count,
            bucket=bucket,
            rht_block=rht_block,
            index_len=e.index_len,
            value_len=e.value_len,
        )

    if e.kind not in KIND_NAMES:
        raise DecodeError(f"{where}: unknown section kind {e.kind}")
    if e.flags & ~ENTRY_FLAG_ROTATED:
        raise DecodeError(f"{where}: unknown entry flags 0x{e.flags:02x}")
    if e.kind == KIND_RAW:
        if e.value_code != VALUE_RAW or e.flags or e.bucket or e.block or e.index_len:
            raise DecodeError(f"{where}: a raw section carries no value code, rotation, bucket or indices")
        if e.count != size:
            raise DecodeError(f"{where}: raw count {e.count} differs from the shape's {size} elements")
        itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
        if e.value_len != size * itemsize:
            raise DecodeError(f"{where}: raw section of {e.value_len} bytes, expected {size * itemsize}")
        return record("raw", 0, 0)
    if dtype not in FLOAT_DTYPES:
        raise DecodeError(f"{where}: dtype {dtype} can only travel raw")
    if e.value_code >= len(VALUE_CODES):
        raise DecodeError(f"{where}: unknown value code {e.value_code}")
    code = VALUE_CODES[e.value_code]
    if e.kind == KIND_DENSE and e.count != size:
        raise DecodeError(f"{where}: dense count {e.count} differs from the shape's {size} elements")
    if e.count > size:
        raise DecodeError(f"{where}: count {e.count} exceeds the tensor's {size} elements")
    if e.kind != KIND_SPARSE and e.index_len:
        raise DecodeError(f"{where}: only sparse sections carry indices, found {e.index_len} index bytes")
    if e.kind == KIND_SPARSE and e.index_len == 0:
        raise DecodeError(f"{where}: sparse section without an index stream")
    rotated = bool(e.flags & ENTRY_FLAG_ROTATED)
    if rotated:
        if e.block == 0 or e.block & (e.block - 1) or e.block > MAX_ROTATION_BLOCK:
            raise DecodeError(f"{where}: rotation block {e.block} is not a power of two <= 2^24")
    elif e.block:
        raise DecodeError(f"{where}: rotation block {e.block} set without the rotation flag")
    if code in EDEN_BITS:
        if not rotated:
            raise DecodeError(f"{where}: {code} values are rotated, but the rotation flag is not set")
        if e.bucket:
            raise DecodeError(f"{where}: {code} values take no bucket, found {e.bucket}")
        if e.value_len < eden_fixed_size(e.count, e.block, EDEN_BITS[code]):
            raise DecodeError(
                f"{where}: {code} section of {e.value_len} bytes, at least "
                f"{eden_fixed_size(e.count, e.block, EDEN_BITS[code])} needed for {e.count} values"
            )
        return record(code, 0, e.block)
    if code == "int":
        if not rotated:
            raise DecodeError(f"{where}: int values are rotated, but the rotation flag is not set")
        if e.bucket:
            raise DecodeError(f"{where}: int values take no bucket, found {e.bucket}")
        if e.value_len < INT_HEAD.size:
            raise DecodeError(f"{where}: int section of {e.value_len} bytes, its head alone takes {INT_HEAD.size}")
        return record(code, 0, e.block)
    coded = ops.rht_padded_size(e.count, e.block) if rotated and e.count else e.count
    if code in ("fp32", "fp16", "bf16"):
        if e.bucket:
            raise DecodeError(f"{where}: {code} values take no bucket, found {e.bucket}")
    elif e.bucket == 0 or e.bucket > MAX_BUCKET:
        raise DecodeError(f"{where}: {code} values need a bucket size in [1, 2^32), found {e.bucket}")
    expected = values_size(code, coded, e.bucket)
    if e.value_len != expected:
        raise DecodeError(
            f"{where}: values section of {e.value_len} bytes, expected {expected} for {coded} {code} values"
        )
    return record(code, e.bucket, e.block if rotated else 0)
