"""What a decoder accepts: the caps a caller sets (``Limits``) and the bounds the
format itself fixes. Each limit is defined here once; the writer, the reader and the
codec check against these names."""

from __future__ import annotations

from dataclasses import dataclass

from .._arrays import MAX_ELEMENTS as MAX_TENSOR_ELEMENTS  # 2**32 - 1: indices are 32-bit

__all__ = ["Limits", "DEFAULT_LIMITS", "EXPANSION_FLOOR"]

# Bounds of the format itself, whatever Limits say (the largest tensor, imported above).
MAX_NDIM = 255  # ndim is one byte
MAX_ROTATION_BLOCK = 1 << 24  # the largest Hadamard block a rotated entry may declare
MAX_BUCKET = (1 << 32) - 1  # the largest quantization bucket an entry may declare
MAX_INT_WEIGHT = (1 << 32) - 1  # an intB section's weight is a u32

# What the writers choose within those bounds (the codec's defaults and caps).
DEFAULT_ROTATION_BLOCK = 1 << 16  # the Hadamard block of rht/eden/intB codecs and of ops.rht
MAX_CODEC_BUCKET = 1 << 24  # the largest bucket a Codec quantizes with


@dataclass(frozen=True)
class Limits:
    """Caps a decoder enforces before allocating (python-zstandard's max_output_size idea)."""

    max_tensors: int = 1 << 16
    max_dims: int = 32
    max_elements: int = MAX_TENSOR_ELEMENTS  # per tensor
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
        if self.max_elements > MAX_TENSOR_ELEMENTS:
            raise ValueError("Limits.max_elements cannot exceed 2**32 - 1 (indices are 32-bit)")
        if self.max_dims > MAX_NDIM:
            raise ValueError("Limits.max_dims cannot exceed 255 (ndim is one byte)")


DEFAULT_LIMITS = Limits()
# Every payload may declare this much output whatever Limits.max_expansion says, so
# a caller that tightens it still reads the tiny payloads of small models.
EXPANSION_FLOOR = 1 << 20
