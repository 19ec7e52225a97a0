"""Compatibility: the wire format lives in ``fedpress.format``, whose ``__all__`` is its
public surface. This module keeps the names it used to export importable from here,
and, until every caller imports from ``fedpress.format``, the internal names the rest
of the package reached through it. New code imports from ``fedpress.format``."""

# ruff: noqa: F401 - re-exports for callers of the former module

from __future__ import annotations

from .format import (
    DEFAULT_LIMITS,
    FORMAT_VERSION,
    MAGIC,
    DecodeError,
    Limits,
    decode,
    decode_parts,
    inspect,
    payload_table_digest,
    table_digest,
)
from .format.decoding import raw_array, sparse_parts
from .format.eden import EdenSection, eden_fixed_size, eden_unrotate, encode_eden
from .format.errors import out_of_memory_as_decode_error
from .format.reader import output_dtype as _output_dtype
from .format.reader import parse
from .format.registry import (
    EDEN_BITS,
    KIND_DENSE,
    KIND_RAW,
    KIND_SPARSE,
    KIND_SPARSE_SEEDED,
    PURPOSE_QUANT,
    PURPOSE_RANDK,
    PURPOSE_RHT,
    TABLE_FORMS,
    stage_seed,
)
from .format.tables import table_difference, table_entries, wire_dtype
from .format.values import encode_values, values_size
from .format.writer import Entry, raw_entry
from .format.writer import write_payload as write

__all__ = [
    "DecodeError",
    "Limits",
    "DEFAULT_LIMITS",
    "FORMAT_VERSION",
    "MAGIC",
    "decode",
    "decode_parts",
    "inspect",
    "table_digest",
    "payload_table_digest",
]
