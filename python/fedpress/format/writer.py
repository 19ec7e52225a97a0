"""Writing a payload: ``Entry`` (one tensor, its sections already coded) and ``write``
(header, table or table digest, sections, checksum, optional zstd). Internal to
fedpress: the public surface is ``fedpress.format``."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import zstandard

from .. import _core
from .limits import DEFAULT_LIMITS
from .primitives import encode_varint
from .registry import (
    ENTRY_FLAG_ROTATED,
    FLAG_TABLE_DIGEST,
    FLAG_ZSTD,
    FORMAT_VERSION,
    HEADER,
    KIND_RAW,
    KIND_SPARSE,
    MAGIC,
    TABLE_FORMS,
    TRAILER,
    VALUE_CODE,
    VALUE_RAW,
)
from .tables import entry_head, heads_digest
from .values import KernelSection, section_size

__all__: list[str] = []


@dataclass
class Entry:
    """One tensor of a payload, ready to serialise."""

    name: str
    dtype: str
    shape: tuple
    kind: int
    count: int  # kept entries (n for dense and raw)
    values: Any  # the values section: bytes, or Sections (buffers in order)
    rht_block: int = 0  # 0: not rotated
    indices: Optional[np.ndarray] = None  # KIND_SPARSE only
    value_code: str = ""  # set by Codec
    bucket: int = 0


def raw_entry(name: str, arr: np.ndarray, dtype: str) -> Entry:
    """A tensor sent losslessly in its own dtype."""
    a = np.asarray(arr)  # not ascontiguousarray: it turns 0-d arrays into 1-d
    data = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes(order="C")
    return Entry(
        name=name, dtype=dtype, shape=tuple(int(s) for s in a.shape), kind=KIND_RAW, count=int(a.size), values=data
    )


_compressors = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """This thread's compressor for ``level``: a context is not safe to share between
    threads, and making one costs more than compressing a top-1% payload's tail."""
    by_level = getattr(_compressors, "by_level", None)
    if by_level is None:
        by_level = _compressors.by_level = {}
    cctx = by_level.get(level)
    if cctx is None:
        cctx = by_level[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cctx


class KernelRefused(ValueError):
    """A kernel writing a tensor's section in place refused its input (NaN or infinity,
    values too large to rotate): ``tensor`` names it, ``why`` is the kernel's reason."""

    def __init__(self, tensor: str, why: str) -> None:
        super().__init__(f"tensor {tensor!r}: {why}")
        self.tensor, self.why = tensor, why


def _assemble(pieces: list[tuple[Optional[str], Any]], *, checksum: bool) -> bytes:
    """``_core.assemble`` of the pieces; a kernel's refusal (its message starts with the
    piece's position, csrc/assemble.hpp) becomes KernelRefused naming the tensor."""
    try:
        return _core.assemble([p for _, p in pieces], checksum)
    except ValueError as exc:
        position, _, why = str(exc).partition(": ")
        name = pieces[int(position.split()[1])][0] if position.startswith("piece ") else None
        if name is None:
            raise
        raise KernelRefused(name, why) from None


def plan_index_streams(entries: list[Entry]) -> list[tuple[int, int]]:
    """The (Rice parameter, size) of each sparse entry's index stream, in order, planned in
    one call spread over the threads; ValueError naming the tensor whose indices are not
    strictly ascending within it."""
    sparse = [e for e in entries if e.kind == KIND_SPARSE]
    if not sparse:
        return []
    try:
        return _core.plan_indices_many([e.indices for e in sparse], [math.prod(e.shape) for e in sparse])
    except ValueError as exc:  # "array i: why", i among the sparse tensors: name the tensor
        position, _, why = str(exc).partition(": ")
        if not position.startswith("array "):
            raise
        raise ValueError(f"tensor {sparse[int(position.split()[1])].name!r}: {why}") from None


def write_payload(
    spec: str,
    seed: int,
    entries: list[Entry],
    zstd_level: Optional[int],
    table: str = "inline",
    plans: Optional[list[tuple[int, int]]] = None,
) -> bytes:
    """The payload of ``entries``; ``table="digest"`` writes the table's digest and
    compact entries instead of the table (the receiver must know the model). ``plans``:
    ``plan_index_streams(entries)``, when the caller made it already."""
    if table not in TABLE_FORMS:
        raise ValueError(f"table must be one of {', '.join(map(repr, TABLE_FORMS))}, got {table!r}")
    # Whatever is written must decode under the default limits.
    if len(entries) > DEFAULT_LIMITS.max_tensors:
        raise ValueError(
            f"an update of {len(entries)} tensors exceeds the format's default limit of {DEFAULT_LIMITS.max_tensors}"
        )
    for e in entries:
        if len(e.shape) > DEFAULT_LIMITS.max_dims:
            raise ValueError(
                f"tensor {e.name!r} has {len(e.shape)} dimensions; at most {DEFAULT_LIMITS.max_dims} are supported"
            )
        if any(d > DEFAULT_LIMITS.max_elements for d in e.shape) or math.prod(e.shape) > DEFAULT_LIMITS.max_elements:
            raise ValueError(
                f"tensor {e.name!r} of shape {e.shape} exceeds {DEFAULT_LIMITS.max_elements} "
                "elements (or has a dimension that does)"
            )
    total = sum(math.prod(e.shape) for e in entries)
    if total > DEFAULT_LIMITS.max_total_elements:
        raise ValueError(
            f"an update of {total} elements exceeds the format's default limit of {DEFAULT_LIMITS.max_total_elements}"
        )
    spec_bytes = spec.encode("utf-8")
    heads = [entry_head(e.name, e.dtype, e.shape) for e in entries]
    compact = table == "digest"
    # The table is written natively into one buffer (one piece for the kernel, not a few per tensor).
    prefix = bytearray(encode_varint(len(spec_bytes)))
    prefix += spec_bytes
    if compact:
        prefix += heads_digest(heads)
    prefix += encode_varint(len(entries))
    rows: list[tuple] = []
    # Every piece in order, into one new buffer: a KernelSection written in place by its
    # kernel, the rest (any contiguous buffers) copied once; the checksum runs over the buffer.
    pieces: list[tuple[Optional[str], Any]] = [(None, b"")]  # the table, made below
    # Every sparse tensor's index stream planned (its Rice parameter and size, for the
    # table); the kernel writes it in its place below.
    planned = iter(plan_index_streams(entries) if plans is None else plans)
    for e, head in zip(entries, heads):
        index_len = 0
        if e.kind == KIND_SPARSE:
            parameter, index_len = next(planned)
            pieces.append((None, ("rice", e.indices, math.prod(e.shape), parameter, index_len)))
        vcode = VALUE_RAW if e.kind == KIND_RAW else VALUE_CODE[e.value_code]
        flags = ENTRY_FLAG_ROTATED if e.rht_block else 0
        rows.append(
            (
                None if compact else head,
                e.kind,
                vcode,
                flags,
                e.count,
                e.bucket,
                e.rht_block,
                index_len,
                section_size(e.values),
            )
        )
        if isinstance(e.values, KernelSection):
            pieces.append((e.name, e.values.piece))
        elif isinstance(e.values, tuple):  # buffers, and a kernel's part (an int section's codes after its head)
            pieces += [(e.name, p.piece) if isinstance(p, KernelSection) else (None, p) for p in e.values]
        else:
            pieces.append((None, e.values))
    pieces[0] = (None, _core.write_table(bytes(prefix), rows))
    flags = FLAG_TABLE_DIGEST if compact else 0
    if zstd_level is None:
        header = HEADER.pack(MAGIC, FORMAT_VERSION, flags, seed)
        return _assemble([(None, header), *pieces], checksum=True)
    body = _assemble(pieces, checksum=False)
    raw_size = len(body)
    # Level 0 (plain "zstd") adapts: small bodies, where every byte is a large
    # share of the payload, get a strong level at a cost of microseconds.
    level = zstd_level or (19 if raw_size <= 4096 else 9 if raw_size <= 65536 else 3)
    header = HEADER.pack(MAGIC, FORMAT_VERSION, flags | FLAG_ZSTD, seed) + encode_varint(raw_size)
    if raw_size < _STREAMED_BODY:
        body = _compressor(level).compress(body)  # (the uncompressed body freed before the join)
        crc = _core.crc32c(body, _core.crc32c(header))
        return b"".join([header, body, TRAILER.pack(crc)])
    # A large body is compressed a window at a time into the payload itself, each window's
    # pages handed back once compressed: the body and the payload are never resident whole
    # together (a q8+zstd encode of 25.6M floats peaked at 1.21x the update plus the payload,
    # now 1.08x), and the compressed bytes are copied once, not joined at the end; streaming
    # costs some speed (q4+zstd: 36 ms against 31 one-shot).
    out = _core.PayloadBuilder(len(header) + _zstd_bound(raw_size))
    out.append(header)
    stream = _compressor(level).compressobj(size=raw_size)
    view = memoryview(body)
    for at in range(0, raw_size, _ZSTD_WINDOW):
        out.append(stream.compress(view[at : at + _ZSTD_WINDOW]))
        # zstd keeps what it still matches against in its own buffers: the input it has
        # consumed is never read again.
        _core.discard_pages(body, 0, min(raw_size, at + _ZSTD_WINDOW))
    out.append(stream.flush())
    view.release()
    return out.finish()


# Bodies from this size on are compressed a window at a time (and yield a frame that may
# differ from the one-shot compression's, as valid).
_STREAMED_BODY = 8 << 20
_ZSTD_WINDOW = 1 << 21


def _zstd_bound(size: int) -> int:
    """ZSTD_compressBound: the largest frame zstd makes of ``size`` bytes."""
    return size + (size >> 8) + (((128 << 10) - size) >> 11 if size < (128 << 10) else 0) + 64
