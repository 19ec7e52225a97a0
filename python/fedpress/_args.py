"""Checks of the integer arguments the public functions share (counts, bit widths,
buckets, seeds): one message per mistake, whichever function a caller went through
(``fedpress.ops``, ``Codec``)."""

from __future__ import annotations

import operator
import secrets
from typing import Any, Optional

__all__ = ["count", "seed", "bits", "bucket", "QUANT_BITS"]

#: The widths of ``ops.quantize``'s codes.
QUANT_BITS = (1, 2, 4, 8)


def count(value: Any, name: str) -> int:
    """``value`` as a non-negative int: TypeError for a non-integer, ValueError below 0."""
    try:
        out = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if out < 0:
        raise ValueError(f"{name} must be >= 0, got {out}")
    return out


def seed(value: Optional[Any]) -> int:
    """A 64-bit seed: ``value`` checked, or a fresh one from the OS for None."""
    if value is None:
        return secrets.randbits(64)
    try:
        out = operator.index(value)
    except TypeError:
        raise TypeError(f"seed must be an integer or None, got {type(value).__name__}") from None
    if not 0 <= out < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {out}")
    return out


def bits(value: Any) -> int:
    """A quantizer's code width: 1, 2, 4 or 8."""
    out = count(value, "bits")
    if out not in QUANT_BITS:
        raise ValueError(f"bits must be 1, 2, 4 or 8, got {out}")
    return out


def bucket(value: Any) -> int:
    """Values per quantization scale: a positive int."""
    out = count(value, "bucket")
    if out == 0:
        raise ValueError("bucket must be positive, got 0")
    return out
