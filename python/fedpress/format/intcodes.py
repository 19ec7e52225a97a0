"""Integer value sections (value code ``int``): the linear stage whose codes add up, for
secure aggregation. The vector is rotated as EDEN rotates it (power-of-two segments, two
seeded Hadamard passes each), clipped to [-clip, clip] and rounded, without bias, to one
of 2^bits evenly spaced levels. Clients that share the clip range and the rotation seed
send codes whose sum decodes to the sum of their rotated values: exactly in integers, or
modulo 2^modulus_bits, where secure aggregation's pairwise masks cancel. Written by
``encode_int``, validated by ``parse_int`` into an ``IntSection``. Internal to fedpress:
the public surface is ``fedpress.format``."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .. import _core
from .errors import DecodeError
from .primitives import ByteReader
from .values import KernelSection

__all__: list[str] = []

# bits, modulus bits, width, flags, clip, rotation seed (docs/format.md, "Integer sections").
INT_HEAD = struct.Struct("<BBBBfQ")
INT_MASKED = 0x01  # the codes carry secure aggregation's masks: they decode only in a sum
INT_WEIGHTED = 0x02  # the codes were multiplied by a weight, recorded after the head (u32)
INT_SUPPORT = 0x04  # a sparse-seeded entry's indices come from this seed (u64, after the weight)
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
MIN_BITS, MAX_BITS = 1, 16
MAX_MODULUS_BITS = 56  # the widest code the kernels pack (csrc/intcode.hpp)


def modulus_bits(bits: int, max_clients: int) -> int:
    """The m of a secure sum of up to ``max_clients`` codes of ``bits`` bits: the sum
    needs bits + ceil(log2(max_clients)) bits, and one more leaves room for
    distributed-DP noise on either side (``centered``)."""
    return bits + max(0, math.ceil(math.log2(max_clients))) + 1


def int_size(count: int, width: int) -> int:
    """Bytes of an int section of ``count`` codes of ``width`` bits."""
    return INT_HEAD.size + codes_size(count, width)


def codes_size(count: int, width: int) -> int:
    """Bytes of ``count`` codes packed ``width`` bits each."""
    return (count * width + 7) // 8


@dataclass(frozen=True)
class IntLevels:
    """What every client of one sum shares: ``bits`` per level, the ``clip`` range, the
    modulus of a masked sum and the rotation (seed and block)."""

    bits: int
    clip: float
    modulus_bits: int
    rotation_seed: int
    block: int

    @property
    def step(self) -> float:
        """The distance between two neighbouring levels."""
        return 2.0 * float(np.float32(self.clip)) / ((1 << self.bits) - 1)

    def values(self, total: np.ndarray, clients: int, weight: float = 1.0) -> np.ndarray:
        """``weight`` times the sum, back in the original domain (float32), of the values of
        ``clients`` vectors whose codes sum to ``total`` (signed integers, int64)."""
        # An int64 read as uint64 with no modulus is the same integer to the kernel.
        return self.values_of_residues(np.ascontiguousarray(total, dtype=np.int64).view(np.uint64), 0, clients, weight)

    def values_of_residues(self, codes: np.ndarray, modulus_bits: int, clients: int, weight: float = 1.0) -> np.ndarray:
        """``values`` of the sum whose codes (uint64) are ``codes``, read as residues modulo
        2^modulus_bits as ``centered`` reads them (0: as they are), in one pass: no int64 or
        float64 copy of them. The same float32 values, bit for bit."""
        clip = float(np.float32(self.clip))
        return self._unrotated(_core.int_values_of(codes, modulus_bits, self.step, clients * clip, weight))

    def values_of_packed(
        self, packed: Any, count: int, width: int, modulus_bits: int, clients: int, weight: float = 1.0
    ) -> np.ndarray:
        """``values_of_residues`` of ``count`` codes packed ``width`` bits each, unpacked on the way."""
        clip = float(np.float32(self.clip))
        return self._unrotated(_core.int_values(packed, count, width, modulus_bits, self.step, clients * clip, weight))

    def _unrotated(self, rotated: np.ndarray) -> np.ndarray:
        if rotated.size:
            _core.eden_unrotate(rotated, self.block, self.rotation_seed)
        return rotated


def encode_int(v: np.ndarray, levels: IntLevels, quant_seed: int, out: Optional[np.ndarray] = None) -> np.ndarray:
    """The integer codes (uint64, in [0, 2^bits)) of the float32 vector ``v``: rotated,
    clipped and rounded without bias (csrc/intcode.hpp), a range of rotated blocks at a
    time (no rotated copy of v); into ``out`` (uint64, v's size) when given."""
    x = np.ascontiguousarray(v, dtype=np.float32)
    return _core.int_encode(x, levels.bits, levels.clip, quant_seed, levels.block, levels.rotation_seed, out)


def int_section(
    codes: np.ndarray,
    levels: IntLevels,
    *,
    masked: bool,
    width: int,
    weight: int = 1,
    support_seed: Optional[int] = None,
) -> tuple:
    """The section's buffers: its head (the weight, when not 1; the support's seed, for a
    shared random-k support), then the codes packed ``width`` bits each."""
    head = int_head(levels, masked=masked, width=width, weight=weight, support_seed=support_seed)
    return (head, _core.pack_codes(np.ascontiguousarray(codes, dtype=np.uint64), width))


def int_head(
    levels: IntLevels, *, masked: bool, width: int, weight: int = 1, support_seed: Optional[int] = None
) -> bytes:
    """An int section's head: its levels, width and flags, the weight when not 1 and the
    support's seed for a shared random-k support (docs/format.md)."""
    flags = (INT_MASKED if masked else 0) | (INT_WEIGHTED if weight != 1 else 0)
    flags |= INT_SUPPORT if support_seed is not None else 0
    head = INT_HEAD.pack(levels.bits, levels.modulus_bits, width, flags, levels.clip, levels.rotation_seed)
    if weight != 1:
        head += _U32.pack(weight)
    if support_seed is not None:
        head += _U64.pack(support_seed)
    return head


def int_piece(v: np.ndarray, levels: IntLevels, quant_seed: int) -> KernelSection:
    """The unmasked codes of ``encode_int(v, levels, quant_seed)``, packed ``levels.bits``
    each, as a section part that ``_core.assemble`` writes in the payload, a range of
    rotated blocks at a time (no rotated copy, no 64-bit code per value); for blocks of
    8 values and more."""
    piece = ("int", v, levels.bits, float(levels.clip), quant_seed, levels.block, levels.rotation_seed)
    return KernelSection(piece, codes_size(v.size, levels.bits))


@dataclass
class IntSection:
    """A validated int values section: its levels, whether it is masked, and its codes."""

    levels: IntLevels
    width: int  # bits per code on the wire: ``bits``, or ``modulus_bits`` for residues
    masked: bool
    count: int
    packed: memoryview
    weight: int = 1  # the codes are weight times the levels (a client's example count)
    support_seed: Optional[int] = None  # a sparse-seeded entry's indices: randk_indices(n, count, seed)

    @property
    def modular(self) -> bool:
        """Whether the codes are residues modulo 2^modulus_bits (masked, or noised)."""
        return self.width == self.levels.modulus_bits

    def rotation_bound(self) -> float:
        """An upper bound on every value the inverse rotation of ``values`` computes: a
        level is at most (2^width * step + weight * clip) / weight from zero, and the
        rotation's butterflies grow it by up to L^1.5 (L = min(block, count); the EDEN
        rotation's bound, csrc/eden.hpp). At most 1e38, nothing can overflow."""
        clip = float(np.float32(self.levels.clip))
        largest = ((1 << self.width) * self.levels.step + self.weight * clip) / self.weight
        return largest * float(min(self.levels.block, self.count)) ** 1.5

    def codes(self) -> np.ndarray:
        """The codes as sent (uint64)."""
        return _core.unpack_codes(self.packed, self.count, self.width)

    def values(self) -> np.ndarray:
        """The float32 values of an unmasked section, decoded on their own: what
        ``levels.values`` gives for its codes (``centered`` where they are residues) as the
        sum of ``weight`` clients, times 1 / weight, with the codes unpacked and scaled in
        one pass (no int64 or float64 copy of them)."""
        if self.masked:
            raise DecodeError("int section is masked by secure aggregation: it decodes only as part of the round's sum")
        m = self.levels.modulus_bits if self.modular else 0
        return self.levels.values_of_packed(self.packed, self.count, self.width, m, self.weight, 1.0 / self.weight)


def centered(residues: np.ndarray, m: int) -> np.ndarray:
    """Residues modulo 2^m as the signed integers they stand for: a sum of codes lies in
    [0, 2^(m-1)) by the choice of m, and distributed-DP noise may push it below 0 or above;
    residues from 2^m - 2^(m-2) up are read as negative (int64)."""
    r = residues.astype(np.int64)
    return np.where(residues >= (1 << m) - (1 << (m - 2)), r - (1 << m), r)


def parse_int(data: memoryview, count: int, block: int) -> IntSection:
    """Validates an int section of ``count`` codes rotated with block ``block``."""
    r = ByteReader(data, "int section")
    bits, m, width, flags, clip, seed = r.unpack(INT_HEAD, "head")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise DecodeError(f"int section: bits {bits} outside [{MIN_BITS}, {MAX_BITS}]")
    if not bits < m <= MAX_MODULUS_BITS:
        raise DecodeError(f"int section: modulus bits {m} outside [{bits + 1}, {MAX_MODULUS_BITS}]")
    if width not in (bits, m):
        raise DecodeError(f"int section: code width {width} is neither bits ({bits}) nor modulus bits ({m})")
    if flags & ~(INT_MASKED | INT_WEIGHTED | INT_SUPPORT):
        raise DecodeError(f"int section: unknown flags 0x{flags:02x}")
    masked = bool(flags & INT_MASKED)
    if masked and width != m:
        raise DecodeError(f"int section: masked codes are {m}-bit residues, found width {width}")
    weight = 1
    if flags & INT_WEIGHTED:
        if width != m:
            raise DecodeError(f"int section: weighted codes are {m}-bit residues, found width {width}")
        (weight,) = r.unpack(_U32, "weight")
        if weight < 2:
            raise DecodeError(f"int section: weight {weight} is recorded only when it is 2 or more")
    support_seed = r.unpack(_U64, "support seed")[0] if flags & INT_SUPPORT else None
    if not (math.isfinite(clip) and clip > 0):
        raise DecodeError(f"int section: clip {clip!r} is not finite and positive")
    packed = r.take((count * width + 7) // 8, "codes")
    if (count * width) % 8 and packed[-1] >> ((count * width) % 8):
        raise DecodeError("int section: nonzero padding bits in the last byte")
    if r.pos != len(data):
        raise DecodeError(f"int section: {len(data) - r.pos} trailing bytes")
    return IntSection(IntLevels(bits, clip, m, seed, block), width, masked, count, packed, weight, support_seed)
