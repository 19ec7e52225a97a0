"""Compatibility: the wire format lives in ``fedpress.format``, whose ``__all__`` is its
public surface; this module keeps the names it used to export importable from here."""

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
