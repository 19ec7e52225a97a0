"""Value sections: a float32 vector coded as fp32, fp16, bf16, q8, q4, q2 or sign
(EDEN codes live in ``eden``), the exact size of each, and the inverse with its
checks. Internal to fedpress: the public surface is ``fedpress.format``."""

from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np

from .. import _core, ops
from .errors import DecodeError
from .registry import QUANT_BITS

__all__: list[str] = []

#: A section's bytes as a tuple of buffers (bytes, or C-contiguous numpy arrays in
#: little-endian order) written one after another: the writer copies each once, into
#: the payload, instead of joining them first.
Sections = tuple


class KernelSection:
    """A values section that a kernel writes straight into the payload (``_core.assemble``):
    its piece (``("q", x, bits, bucket, seed)``, ``("rq", x, bits, bucket, seed, block,
    rotation_seed)`` (the rotated x's), ``("f16", x)``, ``("bf16", x)`` or
    ``("eden", x, bits, block, rotation_seed, quant_seed, mode)``, x float32; or
    ``("move", buffer)``, a part made for this payload alone, its pages handed back as it
    is copied) and its size, which is known before it is computed. Such a section exists
    nowhere but in the payload. (A plain slotted class, not a frozen dataclass: one is made per tensor
    per encode, and a frozen dataclass's ``__init__`` costs a microsecond.)"""

    __slots__ = ("nbytes", "piece")

    def __init__(self, piece: tuple, nbytes: int) -> None:
        self.piece, self.nbytes = piece, nbytes

    def __repr__(self) -> str:
        return f"KernelSection(piece={self.piece[0]!r}..., nbytes={self.nbytes})"


def values_size(code: str, count: int, bucket: int) -> int:
    """Exact bytes of a values section."""
    if code == "fp32":
        return 4 * count
    if code in ("fp16", "bf16"):
        return 2 * count
    nb = -(-count // bucket) if bucket else 0
    bits = 1 if code == "sign" else QUANT_BITS[code]
    return 4 * nb + (count * bits + 7) // 8


def encode_values(
    code: str, v: np.ndarray, bucket: int, seed: int, *, in_place: bool = False
) -> Union[Sections, KernelSection]:
    """Codes a float32 vector with a value stage: the section's bytes, as buffers the
    writer copies once into the payload (see :data:`Sections`); with ``in_place``, a
    q8/q4/q2/sign/fp16/bf16 section is a :class:`KernelSection` the writer has its
    kernel write where the payload holds it (NaN and infinity are then found there)."""
    if code == "fp16" and np.asarray(v).dtype == np.float64:
        # float64 originals round to half once, not through float32 first
        return (np.clip(np.asarray(v), -65504.0, 65504.0).astype("<f2"),)
    v = np.ascontiguousarray(v, dtype=np.float32)
    if in_place and v.size:
        if code in QUANT_BITS:
            return KernelSection(("q", v, QUANT_BITS[code], bucket, seed), values_size(code, v.size, bucket))
        if code in ("fp16", "bf16"):
            return KernelSection(("f16" if code == "fp16" else "bf16", v), 2 * v.size)
        if code == "sign":
            return KernelSection(("sign", v, bucket), values_size(code, v.size, bucket))
    if code == "fp16":
        return (_little(_core.to_half(v)),)
    if code == "bf16":
        return (_little(_core.to_bfloat16(v)),)
    if code == "fp32":
        return (_little(v),)
    if code == "sign":
        bits, scales = _core.sign_quantize(v, bucket)
        return (scales, bits)
    # v is contiguous float32 and the codec checked bucket and seed: the kernel itself (the
    # public wrapper's checks cost more than a small tensor's quantizing)
    packed, scales = _core.quantize(v, QUANT_BITS[code], bucket, True, seed)
    return (_little(scales), packed)


def _little(a: np.ndarray) -> np.ndarray:
    """``a`` in little-endian byte order, without a copy on little-endian hosts."""
    return np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"), copy=False))


def section_size(values: Any) -> int:
    """Bytes of a section given as bytes, :data:`Sections` or a :class:`KernelSection`."""
    if isinstance(values, KernelSection):
        return values.nbytes
    if isinstance(values, tuple):
        total = 0
        for p in values:  # (numpy arrays, mostly: their size without a memoryview)
            total += p.nbytes if type(p) is np.ndarray or isinstance(p, KernelSection) else memoryview(p).nbytes
        return total
    return memoryview(values).nbytes


def unchecked_quantized_parts(
    code: str, data: memoryview, count: int, bucket: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """``quantized_parts`` without its checks, views of the section: for a kernel call
    that checks many sections at once (``_core.dequantize_many(..., check=True)``)."""
    nb = -(-count // bucket)
    bits = 1 if code == "sign" else QUANT_BITS[code]
    return np.frombuffer(data, dtype=np.uint8, offset=4 * nb), np.frombuffer(data, dtype="<f4", count=nb), bits


def quantized_parts(code: str, data: memoryview, count: int, bucket: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The validated (packed codes, float32 scales, bits) of a q8/q4/q2/sign section:
    what ``ops.dequantize`` takes, so a sum can add the values without building them."""
    nb = -(-count // bucket)
    scales = np.frombuffer(data, dtype="<f4", count=nb).astype(np.float32)
    if not np.all(np.isfinite(scales)) or np.any(scales < 0):
        raise DecodeError("values section holds a negative or non-finite scale")
    body = np.frombuffer(data, dtype=np.uint8, offset=4 * nb)
    # sign: one bit per value on the 1-bit grid {-s, +s}, exactly the 1-bit dequantizer.
    bits = 1 if code == "sign" else QUANT_BITS[code]
    if (count * bits) % 8 and body.size and body[-1] >> ((count * bits) % 8):
        raise DecodeError(f"{code} section: nonzero padding bits in the last byte")
    return body, scales, bits


def decode_values(code: str, data: memoryview, count: int, bucket: int, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Inverse of encode_values; data has exactly values_size(code, count, bucket) bytes.
    With ``out`` (float32[count], writable), the values go there and ``out`` is returned.
    Every value is finite: quantized codes times checked scales by construction, and the
    float codes are checked as they are converted (DecodeError otherwise)."""
    if code in QUANT_BITS or code == "sign":
        body, scales, bits = quantized_parts(code, data, count, bucket)
        return ops.dequantize(body, scales, bits, count, bucket, acc=out, accumulate=False)
    # fp32, fp16, bf16: converted and checked for NaN and infinity in one pass.
    values, finite = _core.decode_floats(data, code, count, out)
    if not finite:
        raise DecodeError("values section decodes to non-finite values (NaN or infinity)")
    return values
