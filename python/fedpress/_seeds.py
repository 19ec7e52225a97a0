"""Seeds of a run: every seed fedpress derives outside a payload, from one scheme.

``derive_seed(seed, purpose, *entropy)`` mixes a run's base seed, a named purpose
and the integers or strings that place the seed (a round, a client id, a DDP step
and bucket) through numpy's SeedSequence, a well-tested hash of its entropy. Each
caller names its purpose with one of the constants below, so two uses never share a
stream by accident, and every caller that must agree on a seed (a federation client
and the in-process sweep that counts its bytes; every DDP rank; every Flower node)
computes the same one by calling the same function with the same arguments.

How this relates to the other seeds in fedpress (three layers, each derived from the
one above it, never the other way round):

1. Run and round seeds, here: a payload's seed (``PURPOSE_PAYLOAD``), the rotation seed
   a round's senders share for ``edenB:shared`` (``PURPOSE_ROTATION``), and so on.
2. Inside a payload, each random choice of each tensor (random-k indices, rotation
   signs, stochastic rounding) has a stage seed derived from the payload seed (or the
   shared rotation seed) and the tensor's position by SplitMix64, as docs/format.md
   specifies (``stage_seed``); a decoder regenerates it from the bytes alone.
3. The C++ kernels turn a stage seed into a stream with the counter-based ``hash64``
   of docs/format.md, so results do not depend on the number of threads.

Layers 2 and 3 are part of the wire format and fixed by it; this module is not, and a
change here changes which seeds a run uses but never whether a payload decodes.
"""

from __future__ import annotations

import hashlib
from typing import Union

import numpy as np

__all__ = [
    "derive_seed",
    "PURPOSES",
    "PURPOSE_PAYLOAD",
    "PURPOSE_DOWNLINK",
    "PURPOSE_ROTATION",
    "PURPOSE_SAMPLING",
    "PURPOSE_SHUFFLE",
    "PURPOSE_SECAGG",
    "PURPOSE_TRAINING",
]

#: One sender's payload: (client id, round) in a federation and its sweep, (node id,
#: round) in the Flower mod, (rank, step, bucket) in the DDP hook.
PURPOSE_PAYLOAD = "payload"
#: A downlink delta of the server's model: (version) or (client id, version).
PURPOSE_DOWNLINK = "downlink"
#: The rotation every sender of a round shares for ``edenB:shared``: (round), or
#: (step, bucket) in the DDP hook.
PURPOSE_ROTATION = "rotation"
#: Which clients the server samples in a round: (round).
PURPOSE_SAMPLING = "sampling"
#: The order a client visits its examples in a round of local training: (round).
PURPOSE_SHUFFLE = "shuffle"
#: The public seed of a round's secure aggregation graph: (round). The masks themselves
#: come from key agreement and the OS's randomness, never from a seed.
PURPOSE_SECAGG = "secagg"
#: A client's local training, the seed its train_fn starts from (example order, dropout):
#: (client index), in the command line's clients, the demo and the sweep alike.
PURPOSE_TRAINING = "training"

PURPOSES = frozenset(
    {
        PURPOSE_PAYLOAD,
        PURPOSE_DOWNLINK,
        PURPOSE_ROTATION,
        PURPOSE_SAMPLING,
        PURPOSE_SHUFFLE,
        PURPOSE_SECAGG,
        PURPOSE_TRAINING,
    }
)

_MASK64 = (1 << 64) - 1


def _word(value: Union[int, str]) -> int:
    if isinstance(value, str):
        return int.from_bytes(hashlib.sha256(value.encode("utf-8")).digest()[:8], "little")
    return int(value) & _MASK64


def derive_seed(seed: int, purpose: str, *entropy: Union[int, str]) -> int:
    """A 64-bit seed for ``purpose`` (one of ``PURPOSES``) mixing the base ``seed`` and
    ``entropy`` (integers, or strings hashed with SHA-256). ValueError for a purpose
    that is not listed here."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown seed purpose {purpose!r}; expected one of {sorted(PURPOSES)}")
    words = [_word(seed), _word(purpose), *(_word(e) for e in entropy)]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0])
