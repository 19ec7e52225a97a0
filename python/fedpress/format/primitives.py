"""The format's primitive fields: LEB128 varints, and a cursor that reads fields from
a buffer with every length checked against what is left. Internal to fedpress: the
public surface is ``fedpress.format``."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Union

from .errors import DecodeError

__all__: list[str] = []


# Table entries are mostly small numbers: they travel as LEB128 varints, which
# keeps the table of a many-tensor model a few bytes per tensor.
def encode_varint(value: int) -> bytes:
    """``value`` (a non-negative integer) as a LEB128 varint, minimally encoded."""
    if 0 <= value < 0x80:
        return _ONE_BYTE[value]
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_ONE_BYTE = [bytes((i,)) for i in range(0x80)]


FieldName = Union[str, Callable[[], str]]  # a callable: the name, made only for an error message


def _named(field_name: FieldName) -> str:
    return field_name() if callable(field_name) else field_name


class ByteReader:
    """Reads fields in order from ``buf``; a field that runs past the end raises a
    DecodeError naming ``what``, the field, the offset and the bytes left. A field's
    name may be a callable, called only for an error message (a table of many tensors
    would otherwise format names it never shows)."""

    def __init__(self, buf: memoryview, what: str) -> None:
        self.buf, self.pos, self.what = buf, 0, what

    def take(self, n: int, field_name: FieldName) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise DecodeError(
                f"{self.what} truncated in {_named(field_name)}: need {n} bytes at offset "
                f"{self.pos}, have {len(self.buf) - self.pos}"
            )
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: struct.Struct, field_name: FieldName) -> tuple:
        return fmt.unpack(self.take(fmt.size, field_name))

    def varint(self, field_name: FieldName) -> int:
        """A LEB128 varint of at most 10 bytes, minimally encoded, below 2^64."""
        pos = self.pos
        if pos < len(self.buf) and self.buf[pos] < 0x80:  # one byte: the common case
            self.pos = pos + 1
            return self.buf[pos]
        value = shift = 0
        start = self.pos
        while True:
            if self.pos >= len(self.buf):
                raise DecodeError(
                    f"{self.what} truncated in {_named(field_name)}: varint at offset {start} "
                    f"runs past the end ({len(self.buf)} bytes)"
                )
            byte = self.buf[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                if byte == 0 and self.pos - start > 1:
                    raise DecodeError(f"{_named(field_name)}: varint at offset {start} is not minimally encoded")
                if value >= 1 << 64:
                    raise DecodeError(f"{_named(field_name)}: varint at offset {start} exceeds 64 bits")
                return value
            shift += 7
            if shift >= 70:
                raise DecodeError(f"{_named(field_name)}: varint at offset {start} is longer than 10 bytes")
