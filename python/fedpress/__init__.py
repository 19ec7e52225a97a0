"""fedpress: compress federated-learning updates, measured in bytes on the wire.

import fedpress as fp
payload = fp.Codec("topk:0.01+q4+zstd").encode(update)   # client
update = fp.decode(payload)                              # anyone, from the bytes alone
"""

from __future__ import annotations

from . import ops
from .aggregate import Aggregator
from .codec import Codec, Spec, parse_spec
from .encoder import Encoder
from .format import DecodeError, Limits, decode, inspect, table_digest

__version__ = "0.1.0"
__all__ = [
    "ops",
    "Codec",
    "Encoder",
    "Aggregator",
    "Spec",
    "parse_spec",
    "decode",
    "inspect",
    "table_digest",
    "DecodeError",
    "Limits",
    "__version__",
]
