"""EDEN value sections: the vector cut into power-of-two segments, each rotated by two
seeded Hadamard passes and quantized to Lloyd-Max levels with one scale per block;
written by ``encode_eden``, validated by ``parse_eden`` into an ``EdenSection``.
Internal to fedpress: the public surface is ``fedpress.format``."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np

from .. import _core, ops
from .errors import DecodeError
from .primitives import ByteReader, encode_varint
from .registry import EDEN_BITS, EDEN_MSE_SCALE, EDEN_SHARED, FORMAT_VERSION
from .values import KernelSection, Sections

__all__: list[str] = []

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
# varint count, varint index stream length, the index stream over [0, n)
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


def eden_unrotate(y: np.ndarray, rotation_seed: int, block: int) -> np.ndarray:
    """Undoes the rotation of every segment of the float32 array ``y`` (a sum of
    dequantized rotated vectors under one rotation seed), in place; returns it."""
    _core.eden_unrotate(y, block, rotation_seed)
    return y


def rotation_bound(bits: int, shared: bool, scales: np.ndarray, outlier_val: np.ndarray, n: int, block: int) -> float:
    """An upper bound on every value the inverse rotation of a section computes (its
    butterflies grow a block by up to L**1.5; csrc/eden.hpp): the encoder refuses what the
    decoder could overflow on, and the rotated-domain sum checks it before adding."""
    return _core.eden_rotation_bound(scales, bits, shared, outlier_val, n, block)


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
        return self._decode(None, 1.0)

    def add_to(self, acc: np.ndarray, weight: float, *, accumulate: bool = True) -> None:
        """``acc += weight * values()`` in place (``acc = weight * values()`` with
        ``accumulate=False``), a cache-sized range at a time: the decoded vector is
        never built."""
        self._decode(acc, weight, accumulate)

    def _decode(self, acc: Optional[np.ndarray], weight: float, accumulate: bool = True) -> np.ndarray:
        return _core.eden_decode(
            self.packed,
            self.scales,
            self.n,
            self.bits,
            self.rotation_seed,
            self.block,
            self.shared,
            self.outlier_idx,
            self.outlier_val,
            acc,
            float(weight),
            accumulate,
        )

    def rotation_bound(self) -> float:
        """An upper bound on every value the inverse rotation computes: at most 1e38,
        nothing can overflow (see ``rotation_bound``)."""
        return rotation_bound(self.bits, self.shared, self.scales, self.outlier_val, self.n, self.block)

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
    code: str,
    v: np.ndarray,
    block: int,
    rotation_seed: int,
    quant_seed: int,
    *,
    shared: bool,
    mse: bool,
    in_place: bool = False,
) -> Union[Sections, KernelSection]:
    """An eden values section for the float32 vector ``v``, as buffers in order (the
    writer copies them once into the payload): one fused kernel rotates, quantizes
    and packs every segment (``ops.eden_encode``, the layout above). With ``in_place``
    (and no shared-mode outliers, whose number is known only afterwards), a
    :class:`KernelSection` that the kernel writes where the payload holds it; with
    outliers, the codes are moved into the payload (``("move", codes)``)."""
    bits = EDEN_BITS[code]
    mode = (EDEN_SHARED if shared else 0) | (EDEN_MSE_SCALE if mse else 0)
    if in_place and not shared and v.size:  # no outliers: the size is known before the kernel runs
        piece = ("eden", np.ascontiguousarray(v, dtype=np.float32), bits, block, rotation_seed, quant_seed, mode)
        return KernelSection(piece, eden_fixed_size(v.size, block, bits))
    packed, scales, oidx, oval = ops.eden_encode(
        v,
        bits,
        rotation_seed,
        block=block,
        stochastic=shared,
        scale="mse" if mse else "unbiased",
        quant_seed=quant_seed,
    )
    bound = rotation_bound(bits, shared, scales, oval, v.size, block)
    if not bound <= 1e38:
        raise ValueError(
            f"values too large to rotate in float32 (the decoder's inverse rotation could reach {bound:.3g} > 1e38)"
        )
    head = bytes((mode,)) + (_U64.pack(rotation_seed) if shared else b"")
    if not shared:
        return (head, scales, packed)  # float32 is little-endian on every platform fedpress builds on
    stream = ops.encode_indices(oidx, v.size) if oidx.size else b""
    # In place, the codes (most of the section, made before their outliers' count was
    # known) are moved into the payload: their pages handed back as they are copied.
    codes: Any = KernelSection(("move", packed), packed.nbytes) if in_place else packed
    return (head, scales, codes, encode_varint(int(oidx.size)), encode_varint(len(stream)), stream, oval)


def parse_eden(
    code: str, data: memoryview, count: int, block: int, derived_seed: int, *, version: int = FORMAT_VERSION
) -> EdenSection:
    """Validates an eden section of ``count`` values; ``derived_seed`` is the rotation
    seed of the per-payload mode (the shared mode carries its own); ``version``, the
    payload's, fixes the layout of the outlier index stream."""
    bits = EDEN_BITS[code]
    r = ByteReader(data, f"{code} section")
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
    sizes = [(length * bits + 7) // 8 for _, length in segments]
    packed = np.frombuffer(r.take(sum(sizes), "codes"), dtype=np.uint8)  # a view: the codes are not copied
    end = 0
    for (off, length), size in zip(segments, sizes):
        end += size
        if (length * bits) % 8 and packed[end - 1] >> ((length * bits) % 8):
            raise DecodeError(f"{code} section: nonzero padding bits after the codes at {off}")
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
                oidx = ops.decode_indices(stream, count, max_count=k, version=version)
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
