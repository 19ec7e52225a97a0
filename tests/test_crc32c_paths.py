"""CRC-32C on every path of csrc/checksum.cpp (the portable tables, the crc32 instruction's
one and three streams, 128-bit and 512-bit carry-less folding) against a table-driven
reference written here: every size to 600, the sizes around each path's steps and
thresholds, large buffers in parallel pieces, misaligned starts and continued CRCs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import pytest
from conftest import SIMD_LEVELS, num_threads, simd_cap
from fedpress import _core

MIB = 1 << 20
POLY = 0x82F63B78  # Castagnoli, reflected
STRIPE = 8192  # the crc32 instruction's three streams take 3 * STRIPE bytes a step


def _byte_table() -> list[int]:
    table = []
    for byte in range(256):
        register = byte
        for _ in range(8):
            register = (register >> 1) ^ (POLY if register & 1 else 0)
        table.append(register)
    return table


TABLE = _byte_table()


def advance(register: int, data: Iterable[int]) -> int:
    """The CRC register after data, one byte at a time."""
    for byte in data:
        register = TABLE[(register ^ byte) & 0xFF] ^ (register >> 8)
    return register


def reference_crc(data: bytes, crc: int = 0) -> int:
    return advance(crc ^ 0xFFFFFFFF, data) ^ 0xFFFFFFFF


# The folding paths take 128 (16-byte lanes) or 256 (64-byte lanes) bytes a step, from
# 384 or 512 bytes; the crc32 streams take whole 3 * STRIPE steps, the rest folded.
BOUNDARIES = (128, 256, 384, 512, 1024, STRIPE, 3 * STRIPE, 6 * STRIPE)
NEAR_BOUNDARIES = sorted({b + d for b in BOUNDARIES for d in range(-17, 18)})
# The parallel checksum cuts buffers of 2 MiB and more into 1 MiB pieces.
LARGE = (MIB - 1, MIB + 1, MIB + 77, 2 * MIB + 5, 5 * MIB + 3)
SIZES = sorted(set(range(601)) | set(NEAR_BOUNDARIES) | set(LARGE))
MISALIGNED_SIZES = (517, 4133, 3 * STRIPE + 41)
CONFIGS = [(level, threads) for level in SIMD_LEVELS for threads in (1, 2)]


@pytest.fixture(scope="module")
def data() -> memoryview:
    """Random bytes, starting at a 64-byte boundary so slices start where a test says."""
    size = max(SIZES) + 64
    raw = np.random.default_rng(32).integers(0, 256, size + 64, dtype=np.uint8)
    shift = -raw.ctypes.data % 64
    return memoryview(raw[shift : shift + size])


@pytest.fixture(scope="module")
def prefix_crcs(data: memoryview) -> dict[int, int]:
    """The reference CRC of data[:n] for each n in SIZES, in one pass."""
    out, register, done = {}, 0xFFFFFFFF, 0
    for n in SIZES:
        register = advance(register, data[done:n])
        out[n], done = register ^ 0xFFFFFFFF, n
    return out


@contextlib.contextmanager
def configured(level: str, threads: int) -> Iterator[None]:
    with simd_cap(level), num_threads(threads):
        yield


def mismatches(sizes: Iterable[int], crc_of: Callable[[int], int], expected: dict[int, int]) -> list[int]:
    return [n for n in sizes if crc_of(n) != expected[n]]


def test_check_value() -> None:
    assert reference_crc(b"123456789") == 0xE3069283
    for level in SIMD_LEVELS:
        with configured(level, 1):
            assert _core.crc32c(b"123456789") == 0xE3069283


@pytest.mark.parametrize(("level", "threads"), CONFIGS)
def test_every_size_to_600(level: str, threads: int, data: memoryview, prefix_crcs: dict[int, int]) -> None:
    with configured(level, threads):
        assert mismatches(range(601), lambda n: _core.crc32c(data[:n]), prefix_crcs) == []


@pytest.mark.parametrize(("level", "threads"), CONFIGS)
def test_sizes_near_boundaries(level: str, threads: int, data: memoryview, prefix_crcs: dict[int, int]) -> None:
    with configured(level, threads):
        assert mismatches(NEAR_BOUNDARIES, lambda n: _core.crc32c(data[:n]), prefix_crcs) == []


@pytest.mark.parametrize(("level", "threads"), CONFIGS)
def test_large_sizes(level: str, threads: int, data: memoryview, prefix_crcs: dict[int, int]) -> None:
    with configured(level, threads):
        assert mismatches(LARGE, lambda n: _core.crc32c(data[:n]), prefix_crcs) == []


@pytest.fixture(scope="module")
def misaligned_crcs(data: memoryview) -> dict[tuple[int, int], int]:
    return {(o, n): reference_crc(data[o : o + n]) for o in range(64) for n in MISALIGNED_SIZES}


@pytest.mark.parametrize(("level", "threads"), CONFIGS)
def test_misaligned_starts(
    level: str, threads: int, data: memoryview, misaligned_crcs: dict[tuple[int, int], int]
) -> None:
    with configured(level, threads):
        wrong = [key for key, crc in misaligned_crcs.items() if _core.crc32c(data[key[0] : key[0] + key[1]]) != crc]
    assert wrong == []


@pytest.mark.parametrize(("level", "threads"), CONFIGS)
def test_continued_crc(level: str, threads: int, data: memoryview, prefix_crcs: dict[int, int]) -> None:
    """crc32c(b, crc32c(a)) == crc32c(a + b), with the second part on every path."""
    with configured(level, threads):
        for total in (600, 3 * STRIPE + 17, 5 * MIB + 3):
            for split in (1, 4, 5, 255, 383, 511, 3 * STRIPE - 1, MIB + 3, 2 * MIB + 1):
                if split < total:
                    continued = _core.crc32c(data[split:total], _core.crc32c(data[:split]))
                    assert continued == prefix_crcs[total], (total, split)
