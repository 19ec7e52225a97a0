"""Small helpers shared by the payload and batched-stream tests: a checked index stream
of random indices and values, and crafted payloads whose CRC-32C trailer is made valid
again after an edit.

This module lives in tests/ (next to conftest.py, not collected: its name does not
start with ``test_``), and the tests import it as they import conftest's helpers.
"""

from __future__ import annotations

import numpy as np
from fedpress import _core, ops


def stream_of(rng: np.random.Generator, n: int, k: int, deferred: bool = False) -> tuple:
    """A checked ``_core.IndexStream`` of ``k`` distinct sorted indices below ``n`` and
    their float32 values, with the indices and values: ``(stream, idx, values)``."""
    idx = np.sort(rng.choice(n, k, replace=False)).astype(np.uint32)
    values = rng.standard_normal(k).astype(np.float32)
    stream = _core.IndexStream(ops.encode_indices(idx, n), n, k, values, True, deferred=deferred)
    return stream, idx, values


def with_crc(data: bytearray) -> bytes:
    """``data`` with its CRC-32C trailer (the last 4 bytes) recomputed over everything
    before it (``data`` is changed in place)."""
    data[-4:] = _core.crc32c(bytes(data[:-4])).to_bytes(4, "little")
    return bytes(data)


def corrupt(payload: bytes, edits: dict[int, int]) -> bytes:
    """A copy of ``payload`` with the byte at each offset of ``edits`` set to its value,
    its checksum fixed."""
    data = bytearray(payload)
    for at, byte in edits.items():
        data[at] = byte
    return with_crc(data)
