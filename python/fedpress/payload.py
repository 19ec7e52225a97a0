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
"""

from __future__ import annotations

import hashlib
import operator
import struct
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import zstandard

from . import _core, ops

__all__ = [
    "DecodeError",
    "Limits",
    "FORMAT_VERSION",
    "MAGIC",
    "decode",
    "inspect",
    "table_digest",
    "payload_table_digest",
]

MAGIC = b"FPRS"
FORMAT_VERSION = 1
HEADER = struct.Struct("<4sBBQ")  # magic, version, flags, seed; then raw body size (varint) if zstd
TRAILER = struct.Struct("<I")
FLAG_ZSTD = 0x01
FLAG_TABLE_DIGEST = 0x02  # the body carries a digest of the tensor table instead of the table
HEADER_FLAGS = FLAG_ZSTD | FLAG_TABLE_DIGEST
DIGEST_BYTES = 8
TABLE_FORMS = ("inline", "digest")  # Codec(table=...)

KIND_RAW, KIND_DENSE, KIND_SPARSE, KIND_SPARSE_SEEDED = 0, 1, 2, 3
KIND_NAMES = {KIND_RAW: "raw", KIND_DENSE: "dense", KIND_SPARSE: "sparse", KIND_SPARSE_SEEDED: "sparse-seeded"}
ENTRY_FLAG_ROTATED = 0x01

# dtype codes on the wire
DTYPES = [
    "float32",
    "float64",
    "float16",
    "bfloat16",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "bool",
]
DTYPE_CODE = {name: code for code, name in enumerate(DTYPES)}
FLOAT_DTYPES = {"float32", "float64", "float16", "bfloat16"}

# value codes on the wire
VALUE_CODES = ["fp32", "fp16", "bf16", "q8", "q4", "q2", "sign", "eden1", "eden2", "eden3", "eden4", "eden8"]
VALUE_CODE = {name: code for code, name in enumerate(VALUE_CODES)}
VALUE_RAW = 255
_QBITS = {"q8": 8, "q4": 4, "q2": 2}
EDEN_BITS = {"eden1": 1, "eden2": 2, "eden3": 3, "eden4": 4, "eden8": 8}
# First byte of an eden values section.
EDEN_SHARED = 0x01  # stochastic rounding under a rotation seed shared by the round's clients
EDEN_MSE_SCALE = 0x02  # the scale minimises the error instead of making the estimate unbiased

# Seeds for each random choice, derived from the payload seed and the tensor's
# position in the table, so a decoder can regenerate them.
PURPOSE_RANDK, PURPOSE_RHT, PURPOSE_QUANT = 1, 2, 3

# Table entries are mostly small numbers: they travel as LEB128 varints, which
# keeps the table of a many-tensor model a few bytes per tensor.
ENTRY_MIN_BYTES = 11  # name_len, dtype, ndim, kind, value code, flags, 5 varints: at least 1 byte each
COMPACT_ENTRY_MIN_BYTES = 8  # kind, value code, flags, 5 varints


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


if sys.byteorder != "little":  # the C++ kernels read multi-byte fields in host order
    raise ImportError("fedpress supports little-endian hosts only")


# Defined by the compiled module, so that the kernels that parse bytes (the index stream
# decoder) raise the same class as the Python reader.
DecodeError = _core.DecodeError
DecodeError.__doc__ = "A payload is malformed, truncated, corrupted or beyond the configured limits (a ValueError)."
DecodeError.__module__ = "fedpress"


@contextmanager
def out_of_memory_as_decode_error() -> Iterator[None]:
    """Reports a MemoryError inside the block as a DecodeError: a payload within the
    limits can still decode to more than this process can allocate, and a receiver
    handles one exception for every payload it cannot take (decode, inspect and
    Aggregator.add run under it)."""
    try:
        yield
    except MemoryError as exc:
        raise DecodeError(
            f"the payload's output could not be allocated ({exc or 'out of memory'}); "
            "smaller Limits refuse such payloads before allocating"
        ) from None


@dataclass(frozen=True)
class Limits:
    """Caps a decoder enforces before allocating (python-zstandard's max_output_size idea)."""

    max_tensors: int = 1 << 16
    max_dims: int = 32
    max_elements: int = (1 << 32) - 1  # per tensor
    max_total_elements: int = 1 << 33  # over the whole payload
    max_decoded_bytes: int = 1 << 34  # dense output, all tensors
    max_body_bytes: int = 1 << 33  # the body after zstd
    # Dense output bytes per payload byte, for a table the payload declares itself (a
    # table the receiver passes bounds the output instead), never less than
    # EXPANSION_FLOOR: without it a 46-byte payload declares 16 GiB. The codecs' worst
    # is randk:0.0001 with 1-bit values (sign, eden1), 1/8 byte per kept value standing
    # for 10^4 elements: 317,000x for float32 and 635,000x for float64 tensors as they
    # grow (measured, table="digest": 293,000x for a 256 MiB float32 tensor, 543,000x for
    # a 256 MiB float64 one). topk:0.0001 with 1-bit values needs 20,000x (float32) and
    # 40,000x (float64), dense codecs 64x. 2^20 leaves 1.65x room over the float64
    # worst. Beyond it: randk far below 0.0001, and constant (all-zero) tensors under
    # zstd, which stores 128 KiB of zeros in 4 bytes; those need table= or a raised limit.
    max_expansion: int = 1 << 20

    def __post_init__(self) -> None:
        for name in (
            "max_tensors",
            "max_dims",
            "max_elements",
            "max_total_elements",
            "max_decoded_bytes",
            "max_body_bytes",
            "max_expansion",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"Limits.{name} must be a non-negative integer, got {value!r}")
        if self.max_elements > (1 << 32) - 1:
            raise ValueError("Limits.max_elements cannot exceed 2**32 - 1 (indices are 32-bit)")
        if self.max_dims > 255:
            raise ValueError("Limits.max_dims cannot exceed 255 (ndim is one byte)")


DEFAULT_LIMITS = Limits()
# Every payload may declare this much output whatever Limits.max_expansion says, so
# a caller that tightens it still reads the tiny payloads of small models.
EXPANSION_FLOOR = 1 << 20


def stage_seed(payload_seed: int, ordinal: int, purpose: int) -> int:
    """The 64-bit seed of one random choice: SplitMix64 over (seed, ordinal, purpose)."""
    z = (payload_seed + 0x9E3779B97F4A7C15 * (ordinal * 4 + purpose + 1)) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


# ------------------------------------------------------------ tensor tables --
# A receiver that knows the model (a federation server, a simulation) does not
# need the names, dtypes and shapes in every payload: with table="digest" the
# payload carries an 8-byte digest of them instead, and the receiver passes the
# table it expects (see docs/format.md, "Table digest").
TableEntry = tuple[str, str, tuple[int, ...]]


def wire_dtype(value: Any) -> str:
    """The dtype name a payload's table gives a tensor: numpy's name (``float32``,
    ``bool``, ``bfloat16`` for ml_dtypes' type), torch's without ``torch.``."""
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        dtype = np.asarray(value).dtype
    if isinstance(dtype, np.dtype):
        return dtype.name
    text = str(dtype)
    return text[len("torch.") :] if text.startswith("torch.") else np.dtype(dtype).name


def table_entries(table: Any) -> list[TableEntry]:
    """``table`` as a list of (name, wire dtype name, shape): from a mapping of names
    to arrays (anything with ``.dtype`` and ``.shape``: numpy, torch) or from a list
    of (name, dtype name, shape). ValueError or TypeError for what no payload can hold."""
    if isinstance(table, Mapping):
        items = []
        for name, value in table.items():
            if not (hasattr(value, "dtype") and hasattr(value, "shape")):
                value = np.asarray(value)
            items.append((name, wire_dtype(value), value.shape))
    elif isinstance(table, (list, tuple)):
        items = []
        for i, item in enumerate(table):
            if not isinstance(item, (list, tuple)) or len(item) != 3:
                raise TypeError(f"table entry {i} must be (name, dtype name, shape), got {item!r}")
            items.append(tuple(item))
    else:
        raise TypeError(
            "table must be a mapping of names to arrays or a list of (name, dtype name, shape), "
            f"got {type(table).__name__}"
        )
    out: list[TableEntry] = []
    seen = set()
    for name, dtype, shape in items:
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be strings, got {type(name).__name__}")
        if name in seen:
            raise ValueError(f"tensor name {name!r} appears twice in the table")
        seen.add(name)
        if isinstance(dtype, np.dtype):
            dtype = dtype.name
        if dtype not in DTYPE_CODE:
            raise ValueError(f"tensor {name!r}: dtype {dtype!r} has no wire code (known: {', '.join(DTYPES)})")
        try:
            dims = tuple(operator.index(d) for d in shape)
        except TypeError:
            raise TypeError(f"tensor {name!r}: shape must be a sequence of integers, got {shape!r}") from None
        if len(dims) > 255 or any(d < 0 or d >= 1 << 64 for d in dims):
            raise ValueError(f"tensor {name!r}: shape {dims} cannot travel (at most 255 dimensions, each in [0, 2^64))")
        out.append((name, dtype, dims))
    return out


def _entry_head(name: str, dtype: str, shape: tuple) -> bytes:
    """The first fields of an inline table entry: name_len, name, dtype, ndim, dims."""
    raw = name.encode("utf-8")
    return b"".join([_varint(len(raw)), raw, bytes((DTYPE_CODE[dtype], len(shape))), *(_varint(d) for d in shape)])


def _digest(heads: list[bytes]) -> bytes:
    """The table digest: SHA-256 over n_tensors (varint) and every entry head, first 8 bytes."""
    return hashlib.sha256(_varint(len(heads)) + b"".join(heads)).digest()[:DIGEST_BYTES]


def table_digest(table: Any) -> bytes:
    """The 8-byte digest a ``table="digest"`` payload carries for ``table``: a mapping
    of names to arrays (the update or the model's state) or a list of (name, dtype
    name, shape), in the update's order. Order, names, dtypes and shapes all count."""
    return _digest([_entry_head(*e) for e in table_entries(table)])


def table_difference(expected: list, got: list, against: str) -> str:
    """A DecodeError message naming the first difference of two tables."""
    if len(expected) != len(got):
        return f"tensor table differs from {against}: {len(got)} tensors, expected {len(expected)}"
    for (n1, d1, s1), (n2, d2, s2) in zip(expected, got):
        if (n1, d1, tuple(s1)) != (n2, d2, tuple(s2)):
            return entry_difference((n1, d1, s1), (n2, d2, s2), against)
    return f"tensor table differs from {against}"


def entry_difference(expected: TableEntry, got: TableEntry, against: str) -> str:
    """A DecodeError message naming a table entry that differs from the expected one."""
    (n1, d1, s1), (n2, d2, s2) = expected, got
    return f"tensor table differs from {against}: {n2!r} {d2} {tuple(s2)}, expected {n1!r} {d1} {tuple(s1)}"


# ------------------------------------------------------------- value coding --
def values_size(code: str, count: int, bucket: int) -> int:
    """Exact bytes of a values section."""
    if code == "fp32":
        return 4 * count
    if code in ("fp16", "bf16"):
        return 2 * count
    nb = -(-count // bucket) if bucket else 0
    bits = 1 if code == "sign" else _QBITS[code]
    return 4 * nb + (count * bits + 7) // 8


def encode_values(code: str, v: np.ndarray, bucket: int, seed: int) -> Sections:
    """Codes a float32 vector with a value stage: the section's bytes, as buffers the
    writer copies once into the payload (see :data:`Sections`)."""
    if code == "fp16" and np.asarray(v).dtype == np.float64:
        # float64 originals round to half once, not through float32 first
        return (np.clip(np.asarray(v), -65504.0, 65504.0).astype("<f2"),)
    v = np.ascontiguousarray(v, dtype=np.float32)
    if code == "fp16":
        return (_little(_core.to_half(v)),)
    if code == "bf16":
        return (_little(_core.to_bfloat16(v)),)
    if code == "fp32":
        return (_little(v),)
    if code == "sign":
        n = v.size
        starts = np.arange(0, n, bucket, dtype=np.int64)
        sums = np.add.reduceat(np.abs(v).astype(np.float64), starts) if n else np.zeros(0)
        counts = np.diff(np.append(starts, n)).astype(np.float64)
        scales = (sums / np.maximum(counts, 1)).astype(np.float32)
        bits = np.packbits(v >= 0, bitorder="little")
        return (_little(scales), bits)
    packed, scales = ops.quantize(v, _QBITS[code], bucket=bucket, stochastic=True, seed=seed)
    return (_little(scales), packed)


#: A section's bytes as a tuple of buffers (bytes, or C-contiguous numpy arrays in
#: little-endian order) written one after another: the writer copies each once, into
#: the payload, instead of joining them first.
Sections = tuple


def _little(a: np.ndarray) -> np.ndarray:
    """``a`` in little-endian byte order, without a copy on little-endian hosts."""
    return np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"), copy=False))


def section_size(values: Any) -> int:
    """Bytes of a section given as bytes or as :data:`Sections`."""
    if isinstance(values, tuple):
        return sum(memoryview(p).nbytes for p in values)
    return memoryview(values).nbytes


def decode_values(code: str, data: memoryview, count: int, bucket: int) -> np.ndarray:
    """Inverse of encode_values; data has exactly values_size(code, count, bucket) bytes."""
    if code == "fp32":
        return np.frombuffer(data, dtype="<f4", count=count).astype(np.float32)
    if code == "fp16":
        return _core.from_half(np.frombuffer(data, dtype="<u2", count=count))
    if code == "bf16":
        return _core.from_bfloat16(np.frombuffer(data, dtype="<u2", count=count))
    nb = -(-count // bucket)
    scales = np.frombuffer(data, dtype="<f4", count=nb).astype(np.float32)
    if not np.all(np.isfinite(scales)) or np.any(scales < 0):
        raise DecodeError("values section holds a negative or non-finite scale")
    body = np.frombuffer(data, dtype=np.uint8, offset=4 * nb)
    if code == "sign":
        if count % 8 and body.size and body[-1] >> (count % 8):
            raise DecodeError("sign section: nonzero padding bits in the last byte")
        # One bit per value on the 1-bit grid {-s, +s}: exactly the 1-bit dequantizer.
        return ops.dequantize(body, scales, 1, count, bucket)
    bits = _QBITS[code]
    if (count * bits) % 8 and body.size and body[-1] >> ((count * bits) % 8):
        raise DecodeError(f"{code} section: nonzero padding bits in the last byte")
    return ops.dequantize(body, scales, bits, count, bucket)


# -------------------------------------------------------------- eden values --
# EDEN cuts the n values into *segments* whose lengths are powers of two, so no
# coordinate is padding: the whole blocks of the rotation block B, then the tail
# t = n mod B split by the set bits of t, largest first (t = 34467 gives 32768,
# 1024, 512, 128, 32, 2, 1). Zero padding would waste bits, and its share of the
# rounding error would vanish with the padding, so the error would no longer be
# EDEN's on every length. Each segment is rotated twice (two seeded Hadamard
# passes with independent signs): one pass maps a spike to a flat +-1/sqrt(L)
# vector, which rounds with no error; two make every input Gaussian-like, as a
# uniformly random rotation would. Each block of a segment has one scale.
#
# An eden section: mode (u8), the rotation seed (u64, shared mode only), one f32
# scale per block (segments in order), the packed codes of each segment in turn
# (ceil(L*bits/8) bytes each, LSB first), then in shared mode the outliers:
# varint count, varint index stream length, the Golomb index stream over [0, n)
# (positions in the rotated vector) and one f32 per outlier.
_U64 = struct.Struct("<Q")


def eden_segments(n: int, block: int) -> list[tuple[int, int]]:
    """(offset, length) of each segment of n values under rotation block ``block``."""
    segments = []
    whole = (n // block) * block
    if whole:
        segments.append((0, whole))
    offset, tail = whole, n - whole
    while tail:
        length = 1 << (tail.bit_length() - 1)
        segments.append((offset, length))
        offset += length
        tail -= length
    return segments


def _segment_blocks(length: int, block: int) -> int:
    return length // block if length >= block else 1


def _segment_seeds(rotation_seed: int, i: int) -> tuple[int, int]:
    return stage_seed(rotation_seed, 2 * i, PURPOSE_RHT), stage_seed(rotation_seed, 2 * i + 1, PURPOSE_RHT)


def eden_rotate(v: np.ndarray, rotation_seed: int, block: int) -> np.ndarray:
    """The rotated float32[n] vector EDEN quantizes (a new array)."""
    out = np.array(v, dtype=np.float32, copy=True).reshape(-1)
    for i, (off, length) in enumerate(eden_segments(out.size, block)):
        first, second = _segment_seeds(rotation_seed, i)
        part = out[off : off + length]  # segments are powers of two: each pass is rht, in place
        ops.fwht(ops.random_signs(part, first), block)
        ops.fwht(ops.random_signs(part, second), block)
    return out


def eden_unrotate(y: np.ndarray, rotation_seed: int, block: int) -> np.ndarray:
    """Inverse of ``eden_rotate``, in place on the float32 array ``y``; returns it."""
    for i, (off, length) in enumerate(eden_segments(y.size, block)):
        first, second = _segment_seeds(rotation_seed, i)
        part = y[off : off + length]
        ops.random_signs(ops.fwht(part, block), second)
        ops.random_signs(ops.fwht(part, block), first)
    return y


def eden_fixed_size(count: int, block: int, bits: int) -> int:
    """Bytes of an eden section's mode, scales and codes (the shared mode adds a seed and outliers)."""
    segments = eden_segments(count, block)
    return 1 + sum(4 * _segment_blocks(length, block) + (length * bits + 7) // 8 for _, length in segments)


@dataclass
class EdenSection:
    """A validated eden values section (views into the payload)."""

    bits: int
    shared: bool
    mse: bool
    rotation_seed: int
    n: int
    block: int
    scales: np.ndarray
    packed: np.ndarray
    outlier_idx: np.ndarray
    outlier_val: np.ndarray
    _correction: Optional[np.ndarray] = field(default=None, repr=False, compare=False)

    def _parts(self):
        """(offset, length, scales, packed codes) of each segment."""
        s_at = p_at = 0
        for off, length in eden_segments(self.n, self.block):
            nb, nbytes = _segment_blocks(length, self.block), (length * self.bits + 7) // 8
            yield off, length, self.scales[s_at : s_at + nb], self.packed[p_at : p_at + nbytes]
            s_at, p_at = s_at + nb, p_at + nbytes

    def rotated(self) -> np.ndarray:
        """The dequantized rotated vector, outliers in place: float32[n] (a new array)."""
        parts = list(self._parts())
        if len(parts) == 1:  # the common case: whole blocks only, no copy
            _, length, scales, packed = parts[0]
            y = ops.eden_dequantize(packed, scales, length, self.bits, block=self.block, stochastic=self.shared)
        else:
            y = np.empty(self.n, np.float32)
            for off, length, scales, packed in parts:
                y[off : off + length] = ops.eden_dequantize(
                    packed, scales, length, self.bits, block=self.block, stochastic=self.shared
                )
        if self.outlier_idx.size:
            y[self.outlier_idx.astype(np.intp)] = self.outlier_val
        return y

    def values(self) -> np.ndarray:
        """The decoded values: float32[n]."""
        return eden_unrotate(self.rotated(), self.rotation_seed, self.block)

    def rotation_bound(self) -> float:
        """An upper bound on every value the inverse rotation computes (its unnormalised
        butterflies grow a block by up to L**1.5): at most 1e38, nothing can overflow."""
        if self.n == 0:
            return 0.0
        table = ops.eden_levels(self.bits) if self.shared else ops.eden_centroids(self.bits)
        largest = float(self.scales.max()) * float(np.abs(table).max()) if self.scales.size else 0.0
        if self.outlier_val.size:
            largest = max(largest, float(np.abs(self.outlier_val).max()))
        return largest * float(min(self.block, self.n)) ** 1.5

    def outlier_correction(self) -> np.ndarray:
        """What each outlier adds to the value its code stands for (outliers replace their
        codes' values): float32, one per outlier. Computed once, so an aggregator can have it
        made before its sums change, and ``accumulate`` then allocates nothing."""
        if self._correction is None:
            if self.outlier_idx.size:
                codes, scales = self._outlier_codes()
                correction = self.outlier_val - scales * ops.eden_levels(self.bits)[codes]
                self._correction = correction.astype(np.float32)
            else:
                self._correction = np.zeros(0, np.float32)
        return self._correction

    def accumulate(self, acc: np.ndarray, weight: float) -> None:
        """``acc += weight * rotated()`` in place, without building the rotated vector; after
        ``outlier_correction``, nothing sized by the section is allocated."""
        correction = self.outlier_correction()
        for off, length, scales, packed in self._parts():
            ops.eden_accumulate(
                acc[off : off + length],
                packed,
                scales,
                length,
                self.bits,
                block=self.block,
                stochastic=self.shared,
                weight=weight,
            )
        if correction.size:
            ops.scatter_add(acc, self.outlier_idx, correction, weight)

    def _outlier_codes(self) -> tuple[np.ndarray, np.ndarray]:
        """The code and the scale stored at each outlier position."""
        codes = np.empty(self.outlier_idx.size, np.intp)
        scales = np.empty(self.outlier_idx.size, np.float32)
        pos = self.outlier_idx.astype(np.int64)
        for off, length, seg_scales, packed in self._parts():
            inside = (pos >= off) & (pos < off + length)
            if inside.any():
                local = pos[inside] - off
                codes[inside] = _codes_at(packed, local, self.bits)
                scales[inside] = seg_scales[local // self.block if length >= self.block else 0]
        return codes, scales


def _codes_at(packed: np.ndarray, positions: np.ndarray, bits: int) -> np.ndarray:
    """The codes stored for the given element positions (LSB-first bit stream)."""
    bit = positions.astype(np.int64) * bits
    byte = bit >> 3
    padded = np.concatenate([packed, np.zeros(1, np.uint8)])
    window = padded[byte].astype(np.uint32) | (padded[byte + 1].astype(np.uint32) << 8)
    return ((window >> (bit & 7).astype(np.uint32)) & ((1 << bits) - 1)).astype(np.intp)


def encode_eden(
    code: str, v: np.ndarray, block: int, rotation_seed: int, quant_seed: int, *, shared: bool, mse: bool
) -> bytes:
    """An eden values section for the float32 vector ``v``."""
    bits = EDEN_BITS[code]
    mode = (EDEN_SHARED if shared else 0) | (EDEN_MSE_SCALE if mse else 0)
    head = [bytes((mode,))]
    if shared:
        head.append(_U64.pack(rotation_seed))
    y = eden_rotate(v, rotation_seed, block)
    scales, codes, oidx, oval = [], [], [], []
    for i, (off, length) in enumerate(eden_segments(v.size, block)):
        packed, seg_scales, seg_idx, seg_val = ops.eden_quantize(
            y[off : off + length],
            length,
            bits,
            seed=stage_seed(quant_seed, i, PURPOSE_QUANT),
            block=block,
            stochastic=shared,
            scale="mse" if mse else "unbiased",
        )
        scales.append(seg_scales.astype("<f4").tobytes())
        codes.append(packed.tobytes())
        if seg_idx.size:
            oidx.append(seg_idx.astype(np.int64) + off)
            oval.append(seg_val)
    parts = head + scales + codes
    if shared:
        idx = np.concatenate(oidx).astype(np.uint32) if oidx else np.zeros(0, np.uint32)
        stream = ops.encode_indices(idx, v.size) if idx.size else b""
        values = np.concatenate(oval).astype("<f4").tobytes() if oval else b""
        parts += [_varint(int(idx.size)), _varint(len(stream)), stream, values]
    return b"".join(parts)


def parse_eden(code: str, data: memoryview, count: int, block: int, derived_seed: int) -> EdenSection:
    """Validates an eden section of ``count`` values; ``derived_seed`` is the rotation
    seed of the per-payload mode (the shared mode carries its own)."""
    bits = EDEN_BITS[code]
    r = _Reader(data, f"{code} section")
    (mode,) = r.take(1, "mode")
    if mode & ~(EDEN_SHARED | EDEN_MSE_SCALE):
        raise DecodeError(f"{code} section: unknown mode bits 0x{mode:02x}")
    shared, mse = bool(mode & EDEN_SHARED), bool(mode & EDEN_MSE_SCALE)
    if shared and mse:
        raise DecodeError(f"{code} section: the shared mode has no MSE scale (mode 0x{mode:02x})")
    seed = r.unpack(_U64, "rotation seed")[0] if shared else derived_seed
    segments = eden_segments(count, block)
    n_scales = sum(_segment_blocks(length, block) for _, length in segments)
    scales = np.frombuffer(r.take(4 * n_scales, "scales"), dtype="<f4").astype(np.float32)
    if not np.all(np.isfinite(scales)) or np.any(scales < 0):
        raise DecodeError(f"{code} section holds a negative or non-finite scale")
    chunks = []
    for off, length in segments:
        chunk = np.frombuffer(r.take((length * bits + 7) // 8, f"codes at {off}"), dtype=np.uint8)
        if (length * bits) % 8 and chunk[-1] >> ((length * bits) % 8):
            raise DecodeError(f"{code} section: nonzero padding bits after the codes at {off}")
        chunks.append(chunk)
    packed = np.concatenate(chunks) if chunks else np.zeros(0, np.uint8)
    oidx, oval = np.zeros(0, np.uint32), np.zeros(0, np.float32)
    if shared:
        k = r.varint("outlier count")
        if k > count:
            raise DecodeError(f"{code} section: {k} outliers among {count} values")
        stream_len = r.varint("outlier index length")
        if (k == 0) != (stream_len == 0):
            raise DecodeError(f"{code} section: {k} outliers with an index stream of {stream_len} bytes")
        stream = r.take(stream_len, "outlier indices")
        oval = np.frombuffer(r.take(4 * k, "outlier values"), dtype="<f4").astype(np.float32)
        if k:
            try:
                oidx = ops.decode_indices(stream, count, max_count=k)
            except ValueError as exc:
                raise DecodeError(f"{code} section: outlier indices: {exc}") from None
            if oidx.size != k:
                raise DecodeError(f"{code} section: outlier stream holds {oidx.size} indices, expected {k}")
            if not np.all(np.isfinite(oval)):
                raise DecodeError(f"{code} section: non-finite outlier value")
    if r.pos != len(data):
        raise DecodeError(f"{code} section: {len(data) - r.pos} trailing bytes")
    section = EdenSection(bits, shared, mse, seed, count, block, scales, packed, oidx, oval)
    if oidx.size:
        # An outlier's code is the end level of its sign: what the aggregator corrects.
        ends = np.where(oval < 0, 0, (1 << bits) - 1)
        if np.any(section._outlier_codes()[0] != ends):
            raise DecodeError(f"{code} section: an outlier's code is not the end level of its sign")
    return section


# ------------------------------------------------------------------ writing --
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


def write(spec: str, seed: int, entries: list[Entry], zstd_level: Optional[int], table: str = "inline") -> bytes:
    """The payload of ``entries``; ``table="digest"`` writes the table's digest and
    compact entries instead of the table (the receiver must know the model)."""
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
        if (
            any(d > DEFAULT_LIMITS.max_elements for d in e.shape)
            or int(np.prod(e.shape, dtype=object)) > DEFAULT_LIMITS.max_elements
        ):
            raise ValueError(
                f"tensor {e.name!r} of shape {e.shape} exceeds {DEFAULT_LIMITS.max_elements} "
                "elements (or has a dimension that does)"
            )
    total = sum(int(np.prod(e.shape, dtype=object)) for e in entries)
    if total > DEFAULT_LIMITS.max_total_elements:
        raise ValueError(
            f"an update of {total} elements exceeds the format's default limit of {DEFAULT_LIMITS.max_total_elements}"
        )
    spec_bytes = spec.encode("utf-8")
    heads = [_entry_head(e.name, e.dtype, e.shape) for e in entries]
    compact = table == "digest"
    parts = [_varint(len(spec_bytes)), spec_bytes]
    if compact:
        parts.append(_digest(heads))
    parts.append(_varint(len(entries)))
    sections = []
    for e, head in zip(entries, heads):
        index_bytes = b""
        if e.kind == KIND_SPARSE:
            n = int(np.prod(e.shape, dtype=np.int64)) if e.shape else 1
            index_bytes = ops.encode_indices(e.indices, n)
        vcode = VALUE_RAW if e.kind == KIND_RAW else VALUE_CODE[e.value_code]
        flags = ENTRY_FLAG_ROTATED if e.rht_block else 0
        if not compact:
            parts.append(head)
        parts += [
            bytes((e.kind, vcode, flags)),
            _varint(e.count),
            _varint(e.bucket),
            _varint(e.rht_block),
            _varint(len(index_bytes)),
            _varint(section_size(e.values)),
        ]
        sections.append(index_bytes)
        sections += e.values if isinstance(e.values, tuple) else (e.values,)
    pieces = [memoryview(p).cast("B") for p in parts + sections if memoryview(p).nbytes]
    flags = FLAG_TABLE_DIGEST if compact else 0
    if zstd_level is None:
        # One copy of every section, into the payload itself; the checksum runs over the
        # pieces in order.
        header = HEADER.pack(MAGIC, FORMAT_VERSION, flags, seed)
        crc = _core.crc32c(header)
        for piece in pieces:
            crc = _core.crc32c(piece, crc)
        return b"".join([header, *pieces, TRAILER.pack(crc)])
    body = b"".join(pieces)
    raw_size = len(body)
    # Level 0 (plain "zstd") adapts: small bodies, where every byte is a large
    # share of the payload, get a strong level at a cost of microseconds.
    level = zstd_level or (19 if raw_size <= 4096 else 9 if raw_size <= 65536 else 3)
    body = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(body)
    header = HEADER.pack(MAGIC, FORMAT_VERSION, flags | FLAG_ZSTD, seed) + _varint(raw_size)
    crc = _core.crc32c(body, _core.crc32c(header))
    return b"".join([header, body, TRAILER.pack(crc)])


# ------------------------------------------------------------------ reading --
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
    index_data: memoryview
    value_data: memoryview
    index_len: int = 0
    value_len: int = 0
    eden: Optional[EdenSection] = None  # eden value codes: the parsed section


@dataclass
class Parsed:
    spec: str
    seed: int
    version: int
    flags: int
    payload_size: int
    body_size: int
    tensors: list = field(default_factory=list)
    table_digest: Optional[bytes] = None  # what a payload without its table carries


class _Reader:
    def __init__(self, buf: memoryview, what: str) -> None:
        self.buf, self.pos, self.what = buf, 0, what

    def take(self, n: int, field_name: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise DecodeError(
                f"{self.what} truncated in {field_name}: need {n} bytes at offset "
                f"{self.pos}, have {len(self.buf) - self.pos}"
            )
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: struct.Struct, field_name: str) -> tuple:
        return fmt.unpack(self.take(fmt.size, field_name))

    def varint(self, field_name: str) -> int:
        """A LEB128 varint of at most 10 bytes, minimally encoded, below 2^64."""
        value = shift = 0
        start = self.pos
        while True:
            if self.pos >= len(self.buf):
                raise DecodeError(
                    f"{self.what} truncated in {field_name}: varint at offset {start} "
                    f"runs past the end ({len(self.buf)} bytes)"
                )
            byte = self.buf[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                if byte == 0 and self.pos - start > 1:
                    raise DecodeError(f"{field_name}: varint at offset {start} is not minimally encoded")
                if value >= 1 << 64:
                    raise DecodeError(f"{field_name}: varint at offset {start} exceeds 64 bits")
                return value
            shift += 7
            if shift >= 70:
                raise DecodeError(f"{field_name}: varint at offset {start} is longer than 10 bytes")


_BB, _BBB = struct.Struct("<BB"), struct.Struct("<BBB")


def _as_buffer(payload: Any) -> memoryview:
    if isinstance(payload, np.ndarray):
        payload = payload.tobytes()
    try:
        view = memoryview(payload)
    except TypeError:
        raise TypeError(f"payload must be bytes-like, got {type(payload).__name__}") from None
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def parse(payload: Any, limits: Limits = DEFAULT_LIMITS, table: Any = None) -> Parsed:
    """Validates a whole payload and returns its table with section views.

    ``table`` (as for ``table_digest``) is the model the payload must be made
    for: a payload without its table needs it, and one with its table must match it."""
    known = None if table is None else table_entries(table)
    parsed, body = _open(payload, limits)
    _parse_body(body, parsed, limits, known)
    return parsed


def payload_table_digest(payload: Any, *, limits: Limits = DEFAULT_LIMITS) -> Optional[bytes]:
    """The table digest a payload carries instead of its tensor table, or None when it
    carries its table. Checks the header, checksum and body framing only: for telling
    which model a payload was made for before decoding it with that model's table."""
    with out_of_memory_as_decode_error():  # the body may be zstd-compressed
        parsed, body = _open(payload, limits)
    if not parsed.flags & FLAG_TABLE_DIGEST:
        return None
    r = _Reader(body, "payload body")
    r.take(r.varint("codec spec length"), "codec spec")
    return bytes(r.take(DIGEST_BYTES, "tensor table digest"))


def _open(payload: Any, limits: Limits) -> tuple[Parsed, memoryview]:
    """Checks the header and trailer and returns the (decompressed) body."""
    buf = _as_buffer(payload)
    if len(buf) < HEADER.size + TRAILER.size:
        raise DecodeError(
            f"payload truncated: {len(buf)} bytes, the header and checksum alone take {HEADER.size + TRAILER.size}"
        )
    magic, version, flags, seed = HEADER.unpack(buf[: HEADER.size])
    if magic != MAGIC:
        raise DecodeError(f"not a fedpress payload: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise DecodeError(f"unsupported payload format version {version} (this decoder reads {FORMAT_VERSION})")
    if flags & ~HEADER_FLAGS:
        raise DecodeError(f"unknown header flags 0x{flags:02x} (reserved bits must be zero)")
    end = len(buf) - TRAILER.size
    head = _Reader(buf[:end], "payload header")
    head.pos = HEADER.size
    raw_size = head.varint("raw body size") if flags & FLAG_ZSTD else None
    (crc,) = TRAILER.unpack(buf[end:])
    actual = _core.crc32c(buf[:end])
    if crc != actual:
        raise DecodeError(f"checksum mismatch: stored 0x{crc:08x}, computed 0x{actual:08x}")
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
    return parsed, body


def _unzstd(stored: memoryview, raw_size: int) -> bytes:
    try:
        declared = zstandard.frame_content_size(stored)
    except zstandard.ZstdError as exc:
        raise DecodeError(f"zstd body: bad frame header ({exc})") from None
    if declared != raw_size:
        raise DecodeError(f"zstd body declares {declared} bytes, the header says {raw_size}")
    dobj = zstandard.ZstdDecompressor().decompressobj()
    try:
        out = dobj.decompress(stored)
    except zstandard.ZstdError as exc:
        raise DecodeError(f"zstd body is corrupt ({exc})") from None
    if len(out) != raw_size or not dobj.eof or dobj.unused_data:
        raise DecodeError(
            f"zstd body decodes to {len(out)} bytes with "
            f"{len(dobj.unused_data)} bytes left over, expected exactly {raw_size}"
        )
    return out


def _parse_body(body: memoryview, parsed: Parsed, limits: Limits, known: Optional[list[TableEntry]]) -> None:
    r = _Reader(body, "payload body")
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
        expected = _digest([_entry_head(*e) for e in known])
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
    names = set()
    total_elements = total_bytes = 0
    records = []
    for ordinal in range(n_tensors):
        if compact:
            assert known is not None
            name, dtype, shape = known[ordinal]
            if len(shape) > limits.max_dims:  # the receiver's table meets the same limits
                raise DecodeError(f"tensor {name!r}: {len(shape)} dimensions exceed the limit of {limits.max_dims}")
        else:
            name, dtype, shape = _read_entry_head(r, ordinal, names, limits)
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
        kind, vcode, flags = r.unpack(_BBB, f"tensor {name!r} kind")
        count = r.varint(f"tensor {name!r} count")
        bucket = r.varint(f"tensor {name!r} bucket")
        block = r.varint(f"tensor {name!r} rotation block")
        index_len = r.varint(f"tensor {name!r} index section length")
        value_len = r.varint(f"tensor {name!r} values section length")
        rec = _check_entry(
            name, dtype, shape, size, kind, vcode, flags, count, bucket, block, index_len, value_len, ordinal
        )
        total_elements += size
        total_bytes += _output_bytes(rec)
        if total_elements > limits.max_total_elements:
            raise DecodeError(f"payload holds more than {limits.max_total_elements} elements")
        if total_bytes > limits.max_decoded_bytes:
            raise DecodeError(f"payload decodes to more than {limits.max_decoded_bytes} bytes")
        records.append(rec)
    if known is None:
        # A table nobody vouched for: its output is bounded by the payload's size, checked
        # on the whole table, so a structural defect in a later entry is named first.
        bound = max(EXPANSION_FLOOR, limits.max_expansion * parsed.payload_size)
        if total_bytes > bound:
            big = max(records, key=_output_bytes)
            raise DecodeError(
                f"payload of {parsed.payload_size} bytes declares {total_bytes} bytes of output (tensor "
                f"{big.name!r}, {big.dtype} {big.shape}: {_output_bytes(big)} bytes), beyond its bound of {bound} "
                f"bytes (Limits.max_expansion = {limits.max_expansion} per payload byte, at least "
                f"{EXPANSION_FLOOR}); pass table= (the model it was made for) or raise Limits.max_expansion"
            )
    for rec in records:
        rec.index_data = r.take(rec.index_len, f"tensor {rec.name!r} index section")
        rec.value_data = r.take(rec.value_len, f"tensor {rec.name!r} values section")
        if rec.value_code in EDEN_BITS:
            try:
                rec.eden = parse_eden(
                    rec.value_code,
                    rec.value_data,
                    rec.count,
                    rec.rht_block,
                    stage_seed(parsed.seed, rec.ordinal, PURPOSE_RHT),
                )
            except DecodeError as exc:
                raise DecodeError(f"tensor {rec.name!r}: {exc}") from None
    if r.pos != len(body):
        raise DecodeError(f"{len(body) - r.pos} trailing bytes after the last section")
    parsed.tensors = records


def _read_entry_head(r: _Reader, ordinal: int, names: set, limits: Limits) -> TableEntry:
    """Name, dtype and shape of an inline table entry, checked (the size is checked by the caller)."""
    name_len = r.varint(f"tensor {ordinal} name length")
    try:
        name = bytes(r.take(name_len, f"tensor {ordinal} name")).decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError(f"tensor {ordinal} name is not valid UTF-8") from None
    if name in names:
        raise DecodeError(f"tensor name {name!r} appears twice")
    names.add(name)
    dtype_code, ndim = r.unpack(_BB, f"tensor {name!r} dtype")
    if dtype_code >= len(DTYPES):
        raise DecodeError(f"tensor {name!r}: unknown dtype code {dtype_code}")
    if ndim > limits.max_dims:
        raise DecodeError(f"tensor {name!r}: {ndim} dimensions exceed the limit of {limits.max_dims}")
    shape = tuple(r.varint(f"tensor {name!r} dimension {d}") for d in range(ndim))
    return name, DTYPES[dtype_code], shape


def _check_entry(
    name, dtype, shape, size, kind, vcode, flags, count, bucket, block, index_len, value_len, ordinal
) -> TensorRecord:
    where = f"tensor {name!r}"
    if kind not in KIND_NAMES:
        raise DecodeError(f"{where}: unknown section kind {kind}")
    if flags & ~ENTRY_FLAG_ROTATED:
        raise DecodeError(f"{where}: unknown entry flags 0x{flags:02x}")
    if kind == KIND_RAW:
        if vcode != VALUE_RAW or flags or bucket or block or index_len:
            raise DecodeError(f"{where}: a raw section carries no value code, rotation, bucket or indices")
        if count != size:
            raise DecodeError(f"{where}: raw count {count} differs from the shape's {size} elements")
        itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
        if value_len != size * itemsize:
            raise DecodeError(f"{where}: raw section of {value_len} bytes, expected {size * itemsize}")
        return TensorRecord(
            ordinal,
            name,
            dtype,
            tuple(shape),
            size,
            kind,
            "raw",
            count,
            0,
            0,
            memoryview(b""),
            memoryview(b""),
            0,
            value_len,
        )
    if dtype not in FLOAT_DTYPES:
        raise DecodeError(f"{where}: dtype {dtype} can only travel raw")
    if vcode >= len(VALUE_CODES):
        raise DecodeError(f"{where}: unknown value code {vcode}")
    code = VALUE_CODES[vcode]
    if kind == KIND_DENSE and count != size:
        raise DecodeError(f"{where}: dense count {count} differs from the shape's {size} elements")
    if count > size:
        raise DecodeError(f"{where}: count {count} exceeds the tensor's {size} elements")
    if kind != KIND_SPARSE and index_len:
        raise DecodeError(f"{where}: only sparse sections carry indices, found {index_len} index bytes")
    if kind == KIND_SPARSE and index_len == 0:
        raise DecodeError(f"{where}: sparse section without an index stream")
    rotated = bool(flags & ENTRY_FLAG_ROTATED)
    if rotated:
        if block == 0 or block & (block - 1) or block > (1 << 24):
            raise DecodeError(f"{where}: rotation block {block} is not a power of two <= 2^24")
    elif block:
        raise DecodeError(f"{where}: rotation block {block} set without the rotation flag")
    if code in EDEN_BITS:
        if not rotated:
            raise DecodeError(f"{where}: {code} values are rotated, but the rotation flag is not set")
        if bucket:
            raise DecodeError(f"{where}: {code} values take no bucket, found {bucket}")
        if value_len < eden_fixed_size(count, block, EDEN_BITS[code]):
            raise DecodeError(
                f"{where}: {code} section of {value_len} bytes, at least "
                f"{eden_fixed_size(count, block, EDEN_BITS[code])} needed for {count} values"
            )
        return TensorRecord(
            ordinal,
            name,
            dtype,
            tuple(shape),
            size,
            kind,
            code,
            count,
            0,
            block,
            memoryview(b""),
            memoryview(b""),
            index_len,
            value_len,
        )
    coded = ops.rht_padded_size(count, block) if rotated and count else count
    if code in ("fp32", "fp16", "bf16"):
        if bucket:
            raise DecodeError(f"{where}: {code} values take no bucket, found {bucket}")
    elif bucket == 0 or bucket > (1 << 32) - 1:
        raise DecodeError(f"{where}: {code} values need a bucket size in [1, 2^32), found {bucket}")
    expected = values_size(code, coded, bucket)
    if value_len != expected:
        raise DecodeError(
            f"{where}: values section of {value_len} bytes, expected {expected} for {coded} {code} values"
        )
    return TensorRecord(
        ordinal,
        name,
        dtype,
        tuple(shape),
        size,
        kind,
        code,
        count,
        bucket,
        block if rotated else 0,
        memoryview(b""),
        memoryview(b""),
        index_len,
        value_len,
    )


def sparse_parts(rec: TensorRecord, seed: int) -> tuple[Optional[np.ndarray], np.ndarray]:
    """(indices or None for dense, float32 values) of a float tensor, decoded and validated."""
    if rec.eden is not None:
        values = rec.eden.values()
    else:
        coded = ops.rht_padded_size(rec.count, rec.rht_block) if rec.rht_block and rec.count else rec.count
        try:
            values = decode_values(rec.value_code, rec.value_data, coded, rec.bucket)
        except DecodeError as exc:
            raise DecodeError(f"tensor {rec.name!r}: {exc}") from None
        if rec.rht_block and rec.count:
            values = ops.irht(values, rec.count, stage_seed(seed, rec.ordinal, PURPOSE_RHT), block=rec.rht_block)
    # Quantized codes times a checked finite scale cannot leave the scale's range: only
    # the other stages (and a rotation) need the full pass.
    finite_by_construction = rec.eden is None and not rec.rht_block and rec.value_code in ("q8", "q4", "q2", "sign")
    if not finite_by_construction and not np.all(np.isfinite(values)):
        raise DecodeError(f"tensor {rec.name!r}: values section decodes to non-finite values")
    if rec.kind == KIND_DENSE:
        return None, values
    if rec.kind == KIND_SPARSE_SEEDED:
        return ops.randomk_indices(rec.size, rec.count, stage_seed(seed, rec.ordinal, PURPOSE_RANDK)), values
    try:
        idx = ops.decode_indices(rec.index_data, rec.size, max_count=rec.count)
    except ValueError as exc:
        raise DecodeError(f"tensor {rec.name!r}: {exc}") from None
    if idx.size != rec.count:
        raise DecodeError(f"tensor {rec.name!r}: index stream holds {idx.size} indices, the table says {rec.count}")
    return idx, values


def raw_array(rec: TensorRecord) -> np.ndarray:
    if rec.dtype == "bfloat16":
        data = np.frombuffer(rec.value_data, dtype="<u2").astype(np.uint32) << 16
        return data.view(np.float32).reshape(rec.shape)
    dt = np.dtype(rec.dtype).newbyteorder("<")
    arr = np.frombuffer(rec.value_data, dtype=dt).astype(np.dtype(rec.dtype))
    if rec.dtype == "bool" and arr.size and np.frombuffer(rec.value_data, np.uint8).max() > 1:
        raise DecodeError(f"tensor {rec.name!r}: bool section holds bytes other than 0 and 1")
    return arr.reshape(rec.shape)


def _output_dtype(dtype: str) -> np.dtype:
    return np.dtype(np.float32) if dtype == "bfloat16" else np.dtype(dtype)


def _output_bytes(rec: TensorRecord) -> int:
    """Bytes of a tensor's dense output, what Limits.max_decoded_bytes and max_expansion count."""
    return rec.size * _output_dtype(rec.dtype).itemsize


def _to_output(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values in the tensor's own dtype; float16 saturates instead of overflowing."""
    if dtype == "float16":
        values = np.clip(values, -65504.0, 65504.0)
    return values.astype(_output_dtype(dtype), copy=False)


def decode(payload: Any, *, limits: Limits = DEFAULT_LIMITS, table: Any = None) -> dict[str, np.ndarray]:
    """Restores an update from payload bytes alone: ``{name: array}`` with the
    original shapes and dtypes (bfloat16 tensors come back as float32).

    ``table``: the model the payload was made for, as for ``table_digest`` (a
    mapping of names to arrays, or a list of (name, dtype name, shape)). A payload
    encoded with ``table="digest"`` needs it; any other payload must then match it.
    Without it, the output may be at most ``limits.max_expansion`` bytes per payload
    byte (docs/format.md, "Expansion bound"); with it, the model bounds the output."""
    with out_of_memory_as_decode_error():
        parsed = parse(payload, limits, table)
        out: dict[str, np.ndarray] = {}
        for rec in parsed.tensors:
            if rec.kind == KIND_RAW:
                out[rec.name] = raw_array(rec)
                continue
            idx, values = sparse_parts(rec, parsed.seed)
            if idx is None:
                dense = values
            else:
                dense = np.zeros(rec.size, np.float32)
                dense[idx.astype(np.intp)] = values
            out[rec.name] = _to_output(dense, rec.dtype).reshape(rec.shape)
        return out


def decode_parts(
    payload: Any, *, limits: Limits = DEFAULT_LIMITS, table: Any = None
) -> dict[str, tuple[Optional[np.ndarray], np.ndarray]]:
    """What ``decode`` restores for each float tensor, without the dense copy of a sparse
    one: ``{name: (indices or None for dense, float32 values)}``, the values as
    ``decode`` gives them (rounded to the tensor's dtype, then widened to float32), in
    the flattened tensor. Raw (integer, bool) tensors are left out. An encoder's error
    feedback subtracts these from what it meant to send, in O(kept entries)."""
    with out_of_memory_as_decode_error():
        parsed = parse(payload, limits, table)
        out: dict[str, tuple[Optional[np.ndarray], np.ndarray]] = {}
        for rec in parsed.tensors:
            if rec.kind == KIND_RAW:
                continue
            idx, values = sparse_parts(rec, parsed.seed)
            out[rec.name] = idx, _to_output(values, rec.dtype).astype(np.float32, copy=False)
        return out


def inspect(payload: Any, *, limits: Limits = DEFAULT_LIMITS, table: Any = None) -> dict[str, Any]:
    """What a payload holds: codec, each tensor's name, shape, dtype, section kind
    and bytes, the raw (float32/original) size, the payload size and the ratio,
    whether the table travels inline or as a digest, and the table's digest.
    ``table`` as for ``decode``."""
    with out_of_memory_as_decode_error():
        parsed = parse(payload, limits, table)
    tensors = []
    raw = 0
    for rec in parsed.tensors:
        itemsize = 2 if rec.dtype == "bfloat16" else np.dtype(rec.dtype).itemsize
        raw += rec.size * itemsize
        tensors.append(
            {
                "name": rec.name,
                "shape": list(rec.shape),
                "dtype": rec.dtype,
                "kind": KIND_NAMES[rec.kind],
                "values": rec.value_code,
                "count": rec.count,
                "rotated": bool(rec.rht_block),
                "index_bytes": rec.index_len,
                "value_bytes": rec.value_len,
                "bytes": rec.index_len + rec.value_len,
                "raw_bytes": rec.size * itemsize,
            }
        )
        if rec.eden is not None:
            tensors[-1]["eden"] = {
                "bits": rec.eden.bits,
                "shared": rec.eden.shared,
                "mse_scale": rec.eden.mse,
                "rotation_seed": rec.eden.rotation_seed,
                "outliers": int(rec.eden.outlier_idx.size),
            }
    size = parsed.payload_size
    digest = parsed.table_digest or _digest([_entry_head(r.name, r.dtype, r.shape) for r in parsed.tensors])
    return {
        "codec": parsed.spec,
        "format_version": parsed.version,
        "zstd": bool(parsed.flags & FLAG_ZSTD),
        "table": "digest" if parsed.flags & FLAG_TABLE_DIGEST else "inline",
        "table_digest": digest.hex(),
        "seed": parsed.seed,
        "tensors": tensors,
        "raw_bytes": raw,
        "payload_bytes": size,
        "ratio": (raw / size) if size else 0.0,
    }
