"""The numbers the wire format fixes: magic, version, header and entry flags, section
kinds, dtype and value codes, EDEN modes, and the seed of every random choice
(docs/format.md). Internal to fedpress: the public surface is ``fedpress.format``."""

from __future__ import annotations

import struct
import sys

__all__ = ["MAGIC", "FORMAT_VERSION", "READ_VERSIONS"]

if sys.byteorder != "little":  # the C++ kernels read multi-byte fields in host order
    raise ImportError("fedpress supports little-endian hosts only")

MAGIC = b"FPRS"
FORMAT_VERSION = 2  # what writers write
# What readers read: the versions differ only in the index stream's layout (version 1
# Golomb codes, version 2 split Rice; docs/format.md, "Index stream").
READ_VERSIONS = (1, 2)
HEADER = struct.Struct("<4sBBQ")  # magic, version, flags, seed; then raw body size (varint) if zstd
TRAILER = struct.Struct("<I")
FLAG_ZSTD = 0x01
FLAG_TABLE_DIGEST = 0x02  # the body carries a digest of the tensor table instead of the table
HEADER_FLAGS = FLAG_ZSTD | FLAG_TABLE_DIGEST
DIGEST_BYTES = 8
TABLE_FORMS = ("inline", "digest")  # Codec(table=...)

KIND_RAW, KIND_DENSE, KIND_SPARSE, KIND_SPARSE_SEEDED = 0, 1, 2, 3
KIND_NAMES = {KIND_RAW: "raw", KIND_DENSE: "dense", KIND_SPARSE: "sparse", KIND_SPARSE_SEEDED: "sparse-seeded"}
ENTRY_FLAG_ROTATED = 0x01

# dtype codes on the wire
DTYPES = [
    "float32",
    "float64",
    "float16",
    "bfloat16",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "bool",
]
DTYPE_CODE = {name: code for code, name in enumerate(DTYPES)}
FLOAT_DTYPES = {"float32", "float64", "float16", "bfloat16"}

# value codes on the wire
VALUE_CODES = ["fp32", "fp16", "bf16", "q8", "q4", "q2", "sign", "eden1", "eden2", "eden3", "eden4", "eden8", "int"]
VALUE_CODE = {name: code for code, name in enumerate(VALUE_CODES)}
VALUE_RAW = 255
QUANT_BITS = {"q8": 8, "q4": 4, "q2": 2}
EDEN_BITS = {"eden1": 1, "eden2": 2, "eden3": 3, "eden4": 4, "eden8": 8}
# First byte of an eden values section.
EDEN_SHARED = 0x01  # stochastic rounding under a rotation seed shared by the round's clients
EDEN_MSE_SCALE = 0x02  # the scale minimises the error instead of making the estimate unbiased

# Seeds for each random choice, derived from the payload seed and the tensor's
# position in the table, so a decoder can regenerate them.
PURPOSE_RANDK, PURPOSE_RHT, PURPOSE_QUANT = 1, 2, 3


def stage_seed(payload_seed: int, ordinal: int, purpose: int) -> int:
    """The 64-bit seed of one random choice: SplitMix64 over (seed, ordinal, purpose)."""
    z = (payload_seed + 0x9E3779B97F4A7C15 * (ordinal * 4 + purpose + 1)) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)
