"""Seeds derived from several integers or strings, so a run repeats exactly.

One place for the mixing (numpy's SeedSequence, a well-tested hash of its
entropy) so that every caller that must agree on a seed (a federation client
and the in-process sweep that counts its bytes) computes the same one.
"""

from __future__ import annotations

import hashlib
from typing import Union

import numpy as np

__all__ = ["derive_seed"]

_MASK64 = (1 << 64) - 1


def _word(value: Union[int, str]) -> int:
    if isinstance(value, str):
        return int.from_bytes(hashlib.sha256(value.encode("utf-8")).digest()[:8], "little")
    return int(value) & _MASK64


def derive_seed(*entropy: Union[int, str]) -> int:
    """A 64-bit seed mixing ``entropy`` (integers, or strings hashed with SHA-256)."""
    return int(np.random.SeedSequence([_word(e) for e in entropy]).generate_state(1, np.uint64)[0])
