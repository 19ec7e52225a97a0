"""An independent decoder of fedpress payloads (format versions 1 and 2), written from
docs/format.md alone, in pure Python and numpy: it imports nothing from fedpress.

The two versions differ only in the layout of their index streams: version 2's split
Rice stream ("Index stream", ``decode_rice_stream``) and version 1's Golomb codes
("Index stream, version 1", ``decode_golomb_stream``). ``decode`` picks the layout by
the header's version byte (``decode_index_stream``), for sparse entries and EDEN
outlier streams alike.

It reads the EDEN tables from the document's normative appendix (``doc_tables``),
so a test that decodes with it checks the document as much as the code. It
follows the reference evaluation order the document gives for the inverse
rotations, so its results are meant to equal fedpress.decode bit for bit.
tests/test_format_vectors.py runs it over tests/data/format-vectors/ and the
golden payloads in tests/data/.

It also carries the encoder-side rules the document states for information
(the forward EDEN rotation, nearest and stochastic rounding, the choice of the Rice
parameter in ``encode_index_stream``), which the tests use to check the document's
description of the reference encoder. It enforces
the checks a valid payload needs to be read correctly, not every limit.
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

DOC = Path(__file__).resolve().parents[1] / "docs" / "format.md"

M64 = (1 << 64) - 1
M32 = (1 << 32) - 1

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
FLOAT_DTYPES = {"float32", "float64", "float16", "bfloat16"}
ITEM_SIZE = {"bfloat16": 2, "bool": 1}
RAW, DENSE, SPARSE, SPARSE_SEEDED = 0, 1, 2, 3
VALUE_CODES = ["fp32", "fp16", "bf16", "q8", "q4", "q2", "sign", "eden1", "eden2", "eden3", "eden4", "eden8"]
Q_BITS = {"q8": 8, "q4": 4, "q2": 2, "sign": 1}
EDEN_BITS = {"eden1": 1, "eden2": 2, "eden3": 3, "eden4": 4, "eden8": 8}
PURPOSE_RANDK, PURPOSE_RHT, PURPOSE_QUANT = 1, 2, 3
EDEN_SHARED, EDEN_MSE_SCALE = 0x01, 0x02
EDEN_CLIP = np.float32(3.3)


class FormatError(ValueError):
    """The payload breaks a rule of docs/format.md."""


# ------------------------------------------------------------- primitives --
def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_CRC_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    """CRC-32C ("CRC-32C trailer"), a byte at a time through a table of the bitwise loop."""
    crc = 0xFFFFFFFF
    for x in data:
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ x) & 0xFF]
    return crc ^ 0xFFFFFFFF


def stage_seed(seed: int, ordinal: int, purpose: int) -> int:
    z = (seed + 0x9E3779B97F4A7C15 * (4 * ordinal + purpose + 1)) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def hash64(seed: int, counter: int) -> int:
    z = (seed * 0x9E3779B97F4A7C15 + counter * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def hash32(key: int, counter: np.ndarray) -> np.ndarray:
    """lowbias32 of counter ^ key, element-wise over a uint32 array (wrapping products)."""
    x = np.asarray(counter, dtype=np.uint32) ^ np.uint32(key)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def bounded64(r: int, bound: int) -> int:
    return (r * bound) >> 64


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def rht_padded_size(m: int, block: int) -> int:
    return (m // block) * block + (0 if m % block == 0 else next_pow2(m % block))


def read_varint(buf: bytes, pos: int, end: int, what: str) -> tuple[int, int]:
    """(value, position after it) of the minimal LEB128 varint at pos; nothing read at or past end."""
    value = shift = 0
    for i in range(10):
        if pos + i >= end:
            raise FormatError(f"{what}: truncated varint")
        byte = buf[pos + i]
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            if i and byte == 0:
                raise FormatError(f"{what}: varint not minimal")
            if value > M64:
                raise FormatError(f"{what}: varint beyond 2^64")
            return value, pos + i + 1
    raise FormatError(f"{what}: varint longer than 10 bytes")


def write_varint(v: int) -> bytes:
    """The minimal LEB128 varint of v."""
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def bit_stream(data: bytes) -> np.ndarray:
    """Bit i of the stream is bit i mod 8 of byte i // 8 (LSB first), as uint8 0/1."""
    return np.unpackbits(np.frombuffer(bytes(data), dtype=np.uint8), bitorder="little")


def unpack_codes(data: bytes, count: int, bits: int) -> np.ndarray:
    """count codes of `bits` bits, code i at stream bits [i*bits, (i+1)*bits); padding bits checked."""
    if len(data) != (count * bits + 7) // 8:
        raise FormatError(f"{count} codes of {bits} bits need {(count * bits + 7) // 8} bytes, got {len(data)}")
    stream = bit_stream(data)
    if stream[count * bits :].any():
        raise FormatError("nonzero padding bits")
    fields = stream[: count * bits].reshape(count, bits).astype(np.int64)
    return (fields << np.arange(bits, dtype=np.int64)).sum(axis=1)


# ------------------------------------------------------------ index stream --
VERSIONS = (1, 2)  # the format versions this decoder reads: they differ only in their index streams
MAX_RICE_PARAMETER = 31


def decode_index_stream(data: bytes, n: int, version: int = 2) -> list[int]:
    """The k ascending indices of an index stream in the layout of the payload's version."""
    if version == 1:
        return decode_golomb_stream(data, n)
    return decode_rice_stream(data, n)


def stream_count(data: bytes, n: int) -> tuple[int, int]:
    """(k, position after it) of an index stream of either version, whose rules for k are
    the same: k <= n, and the stream of k = 0 is that one byte."""
    k, pos = read_varint(data, 0, len(data), "index stream k")
    if k > n:
        raise FormatError(f"index stream: k = {k} > n = {n}")
    if k == 0 and pos != len(data):
        raise FormatError("index stream: bytes after k = 0")
    return k, pos


def rice_stream_parts(data: bytes, n: int) -> tuple[int, int, np.ndarray, np.ndarray]:
    """(k, l, lows, positions of the ones in `unary`) of a version 2 index stream ("Index
    stream"), after every check the document lists: the stream is valid once this returns.
    The last index is computed from the last one's position and the sum of the lows alone,
    in Python integers, so a huge quotient cannot overflow."""
    k, pos = stream_count(data, n)
    if k == 0:
        return 0, 0, np.zeros(0, np.int64), np.zeros(0, np.int64)
    if pos >= len(data):
        raise FormatError("index stream: truncated before the Rice parameter")
    rice, pos = data[pos], pos + 1
    if rice > MAX_RICE_PARAMETER:
        raise FormatError(f"index stream: Rice parameter {rice} > {MAX_RICE_PARAMETER}")
    low_bytes = (k * rice + 7) // 8
    if len(data) - pos < low_bytes + 1:
        raise FormatError(f"index stream truncated: {len(data)} bytes, at least {pos + low_bytes + 1} needed")
    try:
        lows = unpack_codes(data[pos : pos + low_bytes], k, rice)
    except FormatError:
        raise FormatError("index stream: nonzero padding bits in the last byte of the lows") from None
    unary = data[pos + low_bytes :]
    ones = np.flatnonzero(bit_stream(unary))
    if ones.size != k:
        raise FormatError(f"index stream: {ones.size} one bits in the unary part, k = {k}")
    if unary[-1] == 0:
        raise FormatError("index stream: bytes after the one of the last index")
    p_last = int(ones[-1])
    last = (k - 1) + ((p_last - (k - 1)) << rice) + int(lows.sum())
    if last >= n:
        raise FormatError(f"index stream: last index {last} >= n = {n}")
    return k, rice, lows, ones.astype(np.int64)


def decode_rice_stream(data: bytes, n: int) -> list[int]:
    """The k ascending indices of a version 2 index stream ("Index stream"):
    idx_i = i + ((p_i - i) << l) + (low_0 + ... + low_i), p_i the position of the i-th one."""
    k, rice, lows, ones = rice_stream_parts(data, n)
    i = np.arange(k, dtype=np.int64)
    # Every index is at most the last, which the checks put below n: no overflow for n < 2^63.
    return (i + ((ones - i) << rice) + np.cumsum(lows)).tolist()


def rice_gaps(indices, n: int) -> np.ndarray:
    """g_0 = idx_0, g_i = idx_i - idx_{i-1} - 1 of strictly ascending indices in [0, n)."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx[0] < 0 or idx[-1] >= n or np.any(np.diff(idx) <= 0)):
        raise ValueError("indices must be strictly ascending and in [0, n)")
    return np.diff(idx, prepend=-1) - 1


def rice_cost(gaps: np.ndarray, rice: int) -> int:
    """Coded bits of the lows and the unary part with parameter l: k*(l+1) + sum(g_i >> l)."""
    return gaps.size * (rice + 1) + int((gaps >> rice).sum())


def rice_parameter(gaps: np.ndarray, n: int) -> int:
    """The reference encoder's l (informative, "Index stream"): with the mean gap
    mu = (n - k) / k and t = mu * ln 2, the guess l0 = floor(log2 t) (0 when t < 2); of
    l0 - 1 .. l0 + 2, clamped to [0, 31], the one with the smallest exact coded size, the
    smaller on a tie."""
    k = gaps.size
    t = (n - k) / k * math.log(2.0)
    guess = math.floor(math.log2(t)) if t >= 2.0 else 0
    candidates = range(max(0, guess - 1), min(MAX_RICE_PARAMETER, guess + 2) + 1)
    return min(candidates, key=lambda rice: (rice_cost(gaps, rice), rice))


def encode_index_stream(indices, n: int) -> bytes:
    """A version 2 index stream of strictly ascending indices in [0, n), with the
    reference encoder's choice of l: the document's layout, written from the document."""
    gaps = rice_gaps(indices, n)
    k = gaps.size
    head = bytearray(write_varint(k))
    if k == 0:
        return bytes(head)
    rice = rice_parameter(gaps, n)
    head.append(rice)
    lows = gaps & ((1 << rice) - 1)
    low_bits = ((lows[:, None] >> np.arange(rice, dtype=np.int64)) & 1).astype(np.uint8).reshape(-1)
    ones = np.cumsum((gaps >> rice) + 1) - 1  # the position of each gap's one
    unary = np.zeros(int(ones[-1]) + 1, np.uint8)
    unary[ones] = 1
    pack = lambda bits: np.packbits(bits, bitorder="little").tobytes()  # noqa: E731
    return bytes(head) + pack(low_bits) + pack(unary)


def decode_golomb_stream(data: bytes, n: int) -> list[int]:
    """The k ascending indices of a version 1 index stream ("Index stream, version 1"); the
    stream must be used up."""
    k, pos = stream_count(data, n)
    if k == 0:
        return []
    m, pos = read_varint(data, pos, len(data), "index stream m")
    if not 1 <= m <= max(1, n):
        raise FormatError(f"index stream: m = {m} out of range")
    stream = bit_stream(data[pos:])
    b = (m - 1).bit_length()
    u = (1 << b) - m
    at = 0

    def bit() -> int:
        nonlocal at
        if at >= stream.size:
            raise FormatError("index stream: codes run past the end")
        at += 1
        return int(stream[at - 1])

    def field_(width: int) -> int:
        return sum(bit() << t for t in range(width))

    out: list[int] = []
    for i in range(k):
        q = 0
        while bit() == 0:
            q += 1
        r = 0
        if b > 0:
            v = field_(b - 1)
            r = v if v < u else ((v << 1) | bit()) - u
        idx = (0 if i == 0 else out[-1] + 1) + q * m + r
        if idx >= n:
            raise FormatError(f"index stream: index {idx} >= n = {n}")
        out.append(idx)
    if (at + 7) // 8 != len(data) - pos or stream[at:].any():
        raise FormatError("index stream: wrong length or nonzero padding bits")
    return out


def randk_indices(n: int, k: int, s: int) -> list[int]:
    """Floyd's algorithm ("Random-k indices")."""
    complement = k > n // 2
    draw = n - k if complement else k
    chosen: set[int] = set()
    for j in range(n - draw, n):
        t = bounded64(hash64(s, j), j + 1)
        chosen.add(j if t in chosen else t)
    if complement:
        return [i for i in range(n) if i not in chosen]
    return sorted(chosen)


# ---------------------------------------------------------------- rotation --
def signs(seed: int, length: int) -> np.ndarray:
    """sigma_g for g = 0 .. length-1 ("Rotation"): True where the sign is -1."""
    key = hash64(seed, 0x524854) & M32
    g = np.arange(length, dtype=np.uint64)
    words = hash32(key, (g >> np.uint64(5)).astype(np.uint32))
    return ((words >> (g & np.uint64(31)).astype(np.uint32)) & np.uint32(1)).astype(bool)


def flip(v: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """v with the sign bit of the flagged elements flipped (exact)."""
    bits = v.view(np.uint32).copy()
    bits[negative] ^= np.uint32(0x80000000)
    return bits.view(np.float32)


def butterflies(v: np.ndarray, length: int) -> np.ndarray:
    """The unnormalised Walsh-Hadamard transform of each block of `length` floats of v, in
    binary32: stages h = 1, 2, 4, ..., length/2, each (a, b) -> (a + b, a - b)."""
    v = v.astype(np.float32, copy=True)
    h = 1
    while h < length:
        pairs = v.reshape(-1, 2, h)
        a, b = pairs[:, 0, :].copy(), pairs[:, 1, :].copy()
        pairs[:, 0, :] = a + b
        pairs[:, 1, :] = a - b
        h *= 2
    return v


def inv_sqrt(length: int) -> np.float32:
    """f32(1 / sqrt(L)), computed in binary64 and rounded."""
    return np.float32(1.0 / math.sqrt(length))


def irht(y: np.ndarray, count: int, seed: int, block: int) -> np.ndarray:
    """Inverse of the blockwise rotation of a non-EDEN entry, in the reference order the
    document gives: butterflies, then the signs and the factor f32(1/sqrt(L))."""
    out = np.empty(count, np.float32)
    negative = signs(seed, count)
    for start in range(0, count, block):
        valid = min(block, count - start)
        length = block if valid == block else next_pow2(valid)
        x = butterflies(y[start : start + length], length)[:valid]
        out[start : start + valid] = flip(x, negative[start : start + valid]) * inv_sqrt(length)
    return out


def eden_segments(count: int, block: int) -> list[tuple[int, int]]:
    """(offset, length) of each segment ("EDEN sections")."""
    segments = []
    whole = (count // block) * block
    if whole:
        segments.append((0, whole))
    offset, tail = whole, count - whole
    while tail:
        length = 1 << (tail.bit_length() - 1)
        segments.append((offset, length))
        offset += length
        tail -= length
    return segments


def segment_seeds(rotation_seed: int, i: int) -> tuple[int, int]:
    return stage_seed(rotation_seed, 2 * i, PURPOSE_RHT), stage_seed(rotation_seed, 2 * i + 1, PURPOSE_RHT)


def eden_pass_inverse(v: np.ndarray, seed: int, block: int) -> np.ndarray:
    """One inverse pass over a segment: per block, times f32(1/sqrt(L)), butterflies, then
    the signs of `seed`, indexed from the segment's first element."""
    length = min(block, v.size)
    return flip(butterflies(v * inv_sqrt(length), length), signs(seed, v.size))


def eden_pass_forward(v: np.ndarray, seed: int, block: int) -> np.ndarray:
    """One forward pass (encoder): the signs, times f32(1/sqrt(L)), butterflies."""
    length = min(block, v.size)
    return butterflies(flip(v, signs(seed, v.size)) * inv_sqrt(length), length)


def eden_unrotate(y: np.ndarray, rotation_seed: int, block: int) -> np.ndarray:
    out = np.asarray(y, np.float32).copy()
    for i, (off, length) in enumerate(eden_segments(out.size, block)):
        first, second = segment_seeds(rotation_seed, i)
        part = eden_pass_inverse(out[off : off + length], second, block)
        out[off : off + length] = eden_pass_inverse(part, first, block)
    return out


def eden_rotate(x: np.ndarray, rotation_seed: int, block: int) -> np.ndarray:
    out = np.asarray(x, np.float32).copy()
    for i, (off, length) in enumerate(eden_segments(out.size, block)):
        first, second = segment_seeds(rotation_seed, i)
        part = eden_pass_forward(out[off : off + length], first, block)
        out[off : off + length] = eden_pass_forward(part, second, block)
    return out


# ------------------------------------------------------------- EDEN tables --
_HEADING = re.compile(r"^(.+)\n-{3,}[ \t]*$", re.M)  # a setext second-level heading
_WIDTH = re.compile(r"^### .*?b = (\d+)\b", re.M)
_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*`(0x[0-9a-f]{8})`\s*\|[^|]*\|\s*`(0x[0-9a-f]{8})`\s*\|[^|]*\|\s*$", re.M)


def _from_hex(words: list[str]) -> np.ndarray:
    return np.array([int(w, 16) for w in words], dtype=np.uint32).view(np.float32)


def doc_tables(doc: Path = DOC) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{bits: (centroids, levels)} read from the document's Appendix A (the binary32 hex
    columns; the decimals beside them are for people)."""
    headings = list(_HEADING.finditer(doc.read_text(encoding="utf-8")))
    starts = [j for j, h in enumerate(headings) if h.group(1).startswith("Appendix A")]
    if not starts:
        raise FormatError(f"{doc}: no Appendix A")
    j = starts[0]
    text = headings[j].string[headings[j].end() : headings[j + 1].start() if j + 1 < len(headings) else None]
    heads = list(_WIDTH.finditer(text))
    tables = {}
    for j, head in enumerate(heads):
        bits = int(head.group(1))
        body = text[head.end() : heads[j + 1].start() if j + 1 < len(heads) else len(text)]
        rows = _ROW.findall(body)
        if [int(r[0]) for r in rows] != list(range(1 << bits)):
            raise FormatError(f"{doc}: the b = {bits} table does not list codes 0 .. {(1 << bits) - 1} in order")
        tables[bits] = (_from_hex([r[1] for r in rows]), _from_hex([r[2] for r in rows]))
    if sorted(tables) != [1, 2, 3, 4, 8]:
        raise FormatError(f"{doc}: Appendix A has tables for b = {sorted(tables)}")
    return tables


# ------------------------------------------------------------ EDEN section --
@dataclass
class EdenSection:
    bits: int
    shared: bool
    mse: bool
    rotation_seed: int
    count: int
    block: int
    scales: list[np.ndarray] = field(default_factory=list)  # per segment
    codes: list[np.ndarray] = field(default_factory=list)  # per segment
    outlier_idx: list[int] = field(default_factory=list)
    outlier_val: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    def table(self, tables: dict) -> np.ndarray:
        return tables[self.bits][1 if self.shared else 0]

    def rotated(self, tables: dict) -> np.ndarray:
        """y: each code's table value times its block's scale, in binary32, outliers in place."""
        table = self.table(tables)
        y = np.empty(self.count, np.float32)
        for (off, length), scales, codes in zip(eden_segments(self.count, self.block), self.scales, self.codes):
            block_of = np.arange(length) // self.block if length >= self.block else np.zeros(length, np.int64)
            y[off : off + length] = scales[block_of] * table[codes]
        y[self.outlier_idx] = self.outlier_val
        return y

    def values(self, tables: dict) -> np.ndarray:
        return eden_unrotate(self.rotated(tables), self.rotation_seed, self.block)


def eden_fixed_size(count: int, block: int, bits: int) -> int:
    return 1 + sum(
        4 * (length // block if length >= block else 1) + (length * bits + 7) // 8
        for _, length in eden_segments(count, block)
    )


def parse_eden(
    data: bytes, code: str, count: int, block: int, derived_seed: int, tables: dict, version: int = 2
) -> EdenSection:
    bits = EDEN_BITS[code]
    if not data:
        raise FormatError(f"{code} section: empty")
    mode, pos = data[0], 1
    if mode & ~(EDEN_SHARED | EDEN_MSE_SCALE):
        raise FormatError(f"{code} section: reserved mode bits 0x{mode:02x}")
    if mode == EDEN_SHARED | EDEN_MSE_SCALE:
        raise FormatError(f"{code} section: SHARED with MSE_SCALE")
    shared = bool(mode & EDEN_SHARED)
    rotation_seed = derived_seed
    if shared:
        if pos + 8 > len(data):
            raise FormatError(f"{code} section: truncated rotation seed")
        (rotation_seed,) = struct.unpack_from("<Q", data, pos)
        pos += 8
    section = EdenSection(bits, shared, bool(mode & EDEN_MSE_SCALE), rotation_seed, count, block)
    segments = eden_segments(count, block)
    for _, length in segments:
        nb = length // block if length >= block else 1
        if pos + 4 * nb > len(data):
            raise FormatError(f"{code} section: truncated scales")
        scales = np.frombuffer(data[pos : pos + 4 * nb], dtype="<f4").astype(np.float32)
        if not np.all(np.isfinite(scales)) or np.any(scales < 0):
            raise FormatError(f"{code} section: a negative or non-finite scale")
        section.scales.append(scales)
        pos += 4 * nb
    for off, length in segments:
        nbytes = (length * bits + 7) // 8
        if pos + nbytes > len(data):
            raise FormatError(f"{code} section: truncated codes")
        try:
            section.codes.append(unpack_codes(data[pos : pos + nbytes], length, bits))
        except FormatError as exc:
            raise FormatError(f"{code} section, segment at {off}: {exc}") from None
        pos += nbytes
    if shared:
        k, pos = read_varint(data, pos, len(data), "outlier_count")
        if k > count:
            raise FormatError(f"{code} section: {k} outliers among {count} values")
        index_len, pos = read_varint(data, pos, len(data), "outlier_index_len")
        if (k == 0) != (index_len == 0):
            raise FormatError(f"{code} section: {k} outliers, index stream of {index_len} bytes")
        if pos + index_len + 4 * k > len(data):
            raise FormatError(f"{code} section: truncated outliers")
        if k:
            section.outlier_idx = decode_index_stream(data[pos : pos + index_len], count, version)
            if len(section.outlier_idx) != k:
                raise FormatError(f"{code} section: outlier stream holds {len(section.outlier_idx)} indices")
        pos += index_len
        section.outlier_val = np.frombuffer(data[pos : pos + 4 * k], dtype="<f4").astype(np.float32)
        pos += 4 * k
        if not np.all(np.isfinite(section.outlier_val)):
            raise FormatError(f"{code} section: non-finite outlier value")
        starts = [off for off, _ in segments]
        for idx, val in zip(section.outlier_idx, section.outlier_val):
            i = int(np.searchsorted(starts, idx, side="right")) - 1
            end = 0 if val < 0 else (1 << bits) - 1
            if section.codes[i][idx - starts[i]] != end:
                raise FormatError(f"{code} section: outlier at {idx} is not coded as the end level of its sign")
    if pos != len(data):
        raise FormatError(f"{code} section: {len(data) - pos} trailing bytes")
    return section


# -------------------------------------------------------------- other codes --
def decode_values(code: str, data: bytes, c: int, bucket: int) -> np.ndarray:
    """The c binary32 values of a non-EDEN values section."""
    if code == "fp32":
        return np.frombuffer(data, dtype="<f4").astype(np.float32)
    if code == "fp16":
        return np.frombuffer(data, dtype="<f2").astype(np.float32)
    if code == "bf16":
        return (np.frombuffer(data, dtype="<u2").astype(np.uint32) << np.uint32(16)).view(np.float32)
    bits = Q_BITS[code]
    nb = -(-c // bucket)
    scales = np.frombuffer(data[: 4 * nb], dtype="<f4").astype(np.float32)
    if not np.all(np.isfinite(scales)) or np.any(scales < 0):
        raise FormatError(f"{code} section: a negative or non-finite scale")
    codes = unpack_codes(data[4 * nb :], c, bits)
    per = scales[np.arange(c) // bucket]
    if code == "sign":
        return np.where(codes == 1, np.float32(1.0), np.float32(-1.0)) * per
    top = (1 << bits) - 1
    grid = np.arange(-top, top + 1, 2, dtype=np.float32) / np.float32(top)  # f32(2j - L) / f32(L)
    return per * grid[codes]


def values_size(code: str, c: int, bucket: int) -> int:
    if code == "fp32":
        return 4 * c
    if code in ("fp16", "bf16"):
        return 2 * c
    return 4 * -(-c // bucket) + (c * Q_BITS[code] + 7) // 8


# ------------------------------------------------------------------ payload --
@dataclass
class Entry:
    name: str
    dtype: str
    shape: tuple
    kind: int
    code: Optional[str]
    rotated: bool
    count: int
    bucket: int
    block: int
    index_len: int
    values_len: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def table_image(heads: list[tuple[str, str, tuple]]) -> bytes:
    out = bytearray(write_varint(len(heads)))
    for name, dtype, shape in heads:
        raw = name.encode("utf-8")
        out += write_varint(len(raw)) + raw + bytes((DTYPES.index(dtype), len(shape)))
        for d in shape:
            out += write_varint(d)
    return bytes(out)


def decode(
    payload: bytes,
    table: Optional[list[tuple[str, str, tuple]]] = None,
    tables: Optional[dict] = None,
    sections: Optional[dict] = None,
) -> dict:
    """{name: numpy array} of a payload, as "Reconstruction" describes; the EDEN tables
    come from the document unless given. ``table``: (name, dtype, shape) of each tensor,
    for a payload without its table (header flag TABLE_DIGEST). ``sections``, a dict,
    receives {name: (ordinal, EdenSection, kept indices or None)} of the EDEN
    entries."""
    tables = doc_tables() if tables is None else tables
    payload = bytes(payload)
    if len(payload) < 18:
        raise FormatError("payload shorter than 18 bytes")
    if payload[:4] != b"FPRS":
        raise FormatError("bad magic")
    version = payload[4]
    if version not in VERSIONS:
        raise FormatError(f"unsupported payload format version {version} (this decoder reads versions 1 and 2)")
    flags = payload[5]
    if flags & 0xFC:
        raise FormatError(f"header flags 0x{flags:02x}")
    (seed,) = struct.unpack_from("<Q", payload, 6)
    end = len(payload) - 4
    pos = 14
    if flags & 0x01:
        raw_size, pos = read_varint(payload, 14, end, "raw_body_size")
    if crc32c(payload[:end]) != struct.unpack_from("<I", payload, end)[0]:
        raise FormatError("checksum mismatch")
    body = payload[pos:end]
    if flags & 0x01:
        import zstandard

        try:
            params = zstandard.get_frame_parameters(body)
            if params.content_size != raw_size:
                raise FormatError("zstd frame content size differs from raw_body_size")
            obj = zstandard.ZstdDecompressor().decompressobj()
            body = obj.decompress(body)
        except zstandard.ZstdError as exc:
            raise FormatError(f"zstd body: {exc}") from None
        if len(body) != raw_size or obj.unused_data or not obj.eof:
            raise FormatError("zstd frame does not decode to exactly raw_body_size bytes")
    try:
        return _decode_body(body, seed, flags, version, table, tables, {} if sections is None else sections)
    except (IndexError, KeyError, struct.error, UnicodeDecodeError) as exc:  # a field read past its end
        raise FormatError(f"malformed body: {exc!r}") from None


def _decode_body(body: bytes, seed: int, flags: int, version: int, table, tables: dict, sections: dict) -> dict:
    n_body = len(body)
    spec_len, pos = read_varint(body, 0, n_body, "spec_len")
    body[pos : pos + spec_len].decode("utf-8")
    pos += spec_len
    digest = None
    if flags & 0x02:
        digest, pos = body[pos : pos + 8], pos + 8
        if table is None:
            raise FormatError("payload omits its table")
        if hashlib.sha256(table_image(table)).digest()[:8] != digest:
            raise FormatError("table digest mismatch")
    n_tensors, pos = read_varint(body, pos, n_body, "n_tensors")
    entries, names = [], set()
    for ordinal in range(n_tensors):
        if digest is None:
            name_len, pos = read_varint(body, pos, n_body, "name_len")
            name = body[pos : pos + name_len].decode("utf-8")
            pos += name_len
            if name in names:
                raise FormatError(f"name {name!r} repeats")
            names.add(name)
            dtype, ndim = DTYPES[body[pos]], body[pos + 1]
            pos += 2
            shape = []
            for _ in range(ndim):
                d, pos = read_varint(body, pos, n_body, "dimension")
                shape.append(d)
        else:
            name, dtype, shape = table[ordinal]
        kind, vcode, eflags = body[pos : pos + 3]
        pos += 3
        fields = []
        for what in ("count", "bucket", "rht_block", "index_len", "values_len"):
            v, pos = read_varint(body, pos, n_body, what)
            fields.append(v)
        count, bucket, block, index_len, values_len = fields
        if kind > 3 or eflags & 0xFE:
            raise FormatError(f"tensor {name!r}: kind {kind}, entry flags 0x{eflags:02x}")
        code = None if kind == RAW else VALUE_CODES[vcode]
        entries.append(Entry(name, dtype, tuple(shape), kind, code, bool(eflags & 1), *fields))
        _check_entry(entries[-1], vcode)
    out = {}
    for ordinal, e in enumerate(entries):
        index_data, pos = body[pos : pos + e.index_len], pos + e.index_len
        data, pos = body[pos : pos + e.values_len], pos + e.values_len
        if pos > n_body:
            raise FormatError(f"tensor {e.name!r}: sections run past the body")
        out[e.name] = _tensor(e, ordinal, index_data, data, seed, version, tables, sections)
    if pos != n_body:
        raise FormatError(f"{n_body - pos} trailing bytes after the last section")
    return out


def _check_entry(e: Entry, vcode: int) -> None:
    where = f"tensor {e.name!r}"
    if e.kind == RAW:
        item = ITEM_SIZE.get(e.dtype, np.dtype(e.dtype).itemsize if e.dtype != "bfloat16" else 2)
        if vcode != 255 or e.rotated or e.bucket or e.block or e.index_len or e.count != e.size:
            raise FormatError(f"{where}: raw entry fields")
        if e.values_len != e.size * item:
            raise FormatError(f"{where}: raw values_len")
        return
    if e.dtype not in FLOAT_DTYPES or vcode >= len(VALUE_CODES):
        raise FormatError(f"{where}: dtype {e.dtype} with value code {vcode}")
    if (e.kind == DENSE and e.count != e.size) or e.count > e.size:
        raise FormatError(f"{where}: count {e.count}")
    if (e.kind == SPARSE) != (e.index_len > 0):
        raise FormatError(f"{where}: index_len {e.index_len} for kind {e.kind}")
    if e.rotated != (e.block != 0) or (e.block and (e.block & (e.block - 1) or e.block > 1 << 24)):
        raise FormatError(f"{where}: rht_block {e.block}")
    if e.code in EDEN_BITS:
        if not e.rotated or e.bucket:
            raise FormatError(f"{where}: {e.code} needs the ROTATED flag and bucket 0")
        if e.values_len < eden_fixed_size(e.count, e.block, EDEN_BITS[e.code]):
            raise FormatError(f"{where}: {e.code} section too short")
        return
    if (e.code in ("fp32", "fp16", "bf16")) != (e.bucket == 0) or e.bucket > M32:
        raise FormatError(f"{where}: bucket {e.bucket}")
    c = rht_padded_size(e.count, e.block) if e.rotated and e.count else e.count
    if e.values_len != values_size(e.code, c, e.bucket):
        raise FormatError(f"{where}: values_len {e.values_len}")


def _tensor(
    e: Entry, ordinal: int, index_data: bytes, data: bytes, seed: int, version: int, tables: dict, sections: dict
) -> np.ndarray:
    if e.kind == RAW:
        if e.dtype == "bfloat16":
            return (np.frombuffer(data, "<u2").astype(np.uint32) << np.uint32(16)).view(np.float32).reshape(e.shape)
        arr = np.frombuffer(data, np.dtype(e.dtype).newbyteorder("<")).astype(e.dtype)
        if e.dtype == "bool" and np.frombuffer(data, np.uint8).max(initial=0) > 1:
            raise FormatError(f"tensor {e.name!r}: bool byte other than 0 and 1")
        return arr.reshape(e.shape)
    with np.errstate(over="ignore", invalid="ignore"):  # binary32 overflow is rejected below, as non-finite
        if e.code in EDEN_BITS:
            derived = stage_seed(seed, ordinal, PURPOSE_RHT)
            section = parse_eden(data, e.code, e.count, e.block, derived, tables, version)
            values = section.values(tables)
        else:
            c = rht_padded_size(e.count, e.block) if e.rotated and e.count else e.count
            values = decode_values(e.code, data, c, e.bucket)
            if e.rotated and e.count:
                values = irht(values, e.count, stage_seed(seed, ordinal, PURPOSE_RHT), e.block)
    if not np.all(np.isfinite(values)):
        raise FormatError(f"tensor {e.name!r}: non-finite decoded value")
    if e.kind == DENSE:
        indices = list(range(e.size))
    elif e.kind == SPARSE_SEEDED:
        indices = randk_indices(e.size, e.count, stage_seed(seed, ordinal, PURPOSE_RANDK))
    else:
        indices = decode_index_stream(index_data, e.size, version)
        if len(indices) != e.count:
            raise FormatError(f"tensor {e.name!r}: {len(indices)} indices, count {e.count}")
    if e.code in EDEN_BITS:
        sections[e.name] = (ordinal, section, None if e.kind == DENSE else indices)
    out = np.zeros(e.size, np.float32)
    out[np.asarray(indices, dtype=np.int64)] = values
    if e.dtype == "float16":
        out = np.clip(out, np.float32(-65504.0), np.float32(65504.0)).astype(np.float16)
    elif e.dtype == "float64":
        out = out.astype(np.float64)
    return out.reshape(e.shape)


# ------------------------------------------- encoder rules (informative) --
def block_norm(y: np.ndarray) -> float:
    """r = sqrt of the sum of squares in binary64, in the reference order: 8 lanes, lane l
    adding terms l, l+8, ... in turn, then folded (l += l+4, l += l+2, l += l+1)."""
    padded = np.zeros(-(-y.size // 8) * 8, np.float64)
    padded[: y.size] = y.astype(np.float64) ** 2
    lanes = np.cumsum(padded.reshape(-1, 8), axis=0)[-1] if padded.size else np.zeros(8)
    acc = [float(v) for v in lanes]
    for w in (4, 2, 1):
        for lane in range(w):
            acc[lane] += acc[lane + w]
    return math.sqrt(acc[0])


def _prescale(r: float) -> np.float32:
    return np.float32(2.0**64) if r < 2.0**-60 else np.float32(2.0**-64) if r > 2.0**60 else np.float32(1.0)


def nearest_codes(y: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Codes of one block by the nearest rule: z = f32(f32(y * pre) * mul), mul =
    f32(sqrt(L) / (r * pre)); pos = the number of positive midpoints below |z|."""
    r = block_norm(y)
    h = centroids.size // 2
    if r == 0.0:
        return np.full(y.size, h, np.int64)
    pre = _prescale(r)
    mul = np.float32(math.sqrt(y.size) / (r * float(pre)))
    z = (y * pre) * mul
    cpos = centroids[h:]
    mids = np.float32(0.5) * (cpos[:-1] + cpos[1:])
    pos = (np.abs(z)[:, None] > mids[None, :]).sum(axis=1)
    return np.where(z < 0, h - 1 - pos, h + pos)


def stochastic_codes(y: np.ndarray, scale: np.float32, levels: np.ndarray, key: int, first: int) -> np.ndarray:
    """Codes of one block by the stochastic rule, given the block's scale s (the payload's)
    and the position `first` of its first element in the segment."""
    h = levels.size // 2
    r = block_norm(y)
    if r == 0.0:
        return np.full(y.size, h, np.int64)
    pre = _prescale(r)
    sp = np.float32(scale * pre)
    if np.isfinite(sp) and sp != 0 and abs(sp) >= np.finfo(np.float32).tiny:
        mul = np.float32(1.0) / sp
    else:
        mul = np.float32(math.sqrt(y.size) / (r * float(pre)))
    z = (y * pre) * mul
    a = np.abs(z)
    lpos = levels[h:]
    pos = (a[:, None] > lpos[None, :-1]).sum(axis=1)
    hi = lpos[pos]
    lo = np.where(pos == 0, -lpos[0], lpos[np.maximum(pos - 1, 0)])
    neg = z < 0
    dist = np.where(neg, hi - a, a - lo)
    u = (hash32(key, np.arange(first, first + y.size, dtype=np.uint32)) >> np.uint32(8)).astype(np.float32)
    u = u * np.float32(2.0**-24)
    up = (u * (hi - lo) < dist).astype(np.int64)
    codes = h - 1 + np.where(neg, -pos, pos) + up
    out = a > EDEN_CLIP
    return np.where(out, np.where(neg, 0, 2 * h - 1), codes)


def eden_expected_codes(section: EdenSection, x: np.ndarray, quant_seed: int, tables: dict) -> list[np.ndarray]:
    """The codes the document's encoder rules give each segment of the input x (its kept
    values), with the section's scales for the stochastic mode."""
    y = eden_rotate(x, section.rotation_seed, section.block)
    centroids, levels = tables[section.bits]
    out = []
    for i, ((off, length), scales) in enumerate(zip(eden_segments(section.count, section.block), section.scales)):
        key = hash64(stage_seed(quant_seed, i, PURPOSE_QUANT), 0xEDE5) & M32
        block = min(length, section.block)
        codes = []
        for b in range(length // block):
            part = y[off + b * block : off + (b + 1) * block]
            if section.shared:
                codes.append(stochastic_codes(part, scales[b], levels, key, b * block))
            else:
                codes.append(nearest_codes(part, centroids))
        out.append(np.concatenate(codes))
    return out
