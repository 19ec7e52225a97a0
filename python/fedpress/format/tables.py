"""Tensor tables: the (name, dtype, shape) of each tensor, as a payload's table
entries and as the 8-byte digest a ``table="digest"`` payload carries instead.
Internal to fedpress apart from ``table_digest`` (see ``fedpress.format``)."""

from __future__ import annotations

import functools
import hashlib
import operator
from collections.abc import Mapping
from typing import Any

import numpy as np

from .limits import MAX_NDIM
from .primitives import encode_varint
from .registry import DIGEST_BYTES, DTYPE_CODE, DTYPES

__all__ = ["table_digest"]

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


class CheckedTable(list):
    """A list of (name, dtype name, shape) known to be valid (``table_entries``' result, or a
    parsed payload's table), which table_entries, and so ``parse``, takes as it is: checking
    a 160-tensor table costs about 150 us, and an aggregator parses every payload against its
    table. Not to be changed once made."""


def table_entries(table: Any) -> list[TableEntry]:
    """``table`` as a list of (name, wire dtype name, shape): from a mapping of names
    to arrays (anything with ``.dtype`` and ``.shape``: numpy, torch) or from a list
    of (name, dtype name, shape). ValueError or TypeError for what no payload can hold."""
    if type(table) is CheckedTable:
        return table
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
        if len(dims) > MAX_NDIM or any(d < 0 or d >= 1 << 64 for d in dims):
            raise ValueError(f"tensor {name!r}: shape {dims} cannot travel (at most 255 dimensions, each in [0, 2^64))")
        out.append((name, dtype, dims))
    return CheckedTable(out)


@functools.lru_cache(maxsize=1 << 14)
def entry_head(name: str, dtype: str, shape: tuple) -> bytes:
    """The first fields of an inline table entry: name_len, name, dtype, ndim, dims (kept:
    a model's tensors are the same every round)."""
    raw = name.encode("utf-8")
    return b"".join(
        [encode_varint(len(raw)), raw, bytes((DTYPE_CODE[dtype], len(shape))), *(encode_varint(d) for d in shape)]
    )


def heads_digest(heads: list[bytes]) -> bytes:
    """The table digest: SHA-256 over n_tensors (varint) and every entry head, first 8 bytes."""
    return hashlib.sha256(encode_varint(len(heads)) + b"".join(heads)).digest()[:DIGEST_BYTES]


def table_digest(table: Any) -> bytes:
    """The 8-byte digest a ``table="digest"`` payload carries for ``table``: a mapping
    of names to arrays (the update or the model's state) or a list of (name, dtype
    name, shape), in the update's order. Order, names, dtypes and shapes all count."""
    return heads_digest([entry_head(*e) for e in table_entries(table)])


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
