"""Coverage-guided fuzzing of the payload decoders (atheris, libFuzzer):
fedpress.decode, inspect, payload_table_digest and Aggregator.add (with and without
``table=``). Each input is a payload; the checks are tests/fuzz_checks.py's
check_payload (success or fedpress.DecodeError; anything else is a finding).

    pip install atheris
    python fuzz/make_seeds.py                       # seeds, once (they are committed)
    python fuzz/fuzz_payload.py fuzz/corpus/payload -runs=100000

By default a structure-aware mutator keeps most mutated inputs past the checksum:
it mutates the plain body (decompressed when the zstd flag is set), writes hostile
varints into it, or flips the header flags, then recompresses and recomputes the
sizes and the CRC-32C; some mutations still go to the raw bytes (header, checksum
and zstd frame checks). ``--raw`` turns it off. See fuzz/README.md.
"""

from __future__ import annotations

import random
import struct
import sys

import _harness
import atheris
import zstandard
from fedpress.format.primitives import encode_varint as varint  # the format's LEB128, as the decoder reads it

HEADER = struct.Struct("<4sBBQ")
MAGIC = b"FPRS"
FLAG_ZSTD = 0x01
FLAG_DIGEST = 0x02
MAX_PLAIN = 1 << 16
HOSTILE = sorted(
    {0, 1, 2, 3, 7, 8, 15, 16, 31, 32, 63, 64, 127, 128, 255, 256, 511, 512, 4095, 4096, 65535, 65536}
    | {(1 << k) + d for k in range(8, 65) for d in (-1, 0, 1) if (1 << k) + d < 1 << 64}
)


def read_varint(buf: bytes, pos: int) -> tuple:
    value = shift = 0
    while True:
        byte = buf[pos]  # IndexError past the end: the caller falls back
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 70:
            raise ValueError("varint too long")


def crc32c(data: bytes) -> int:
    from fedpress import _core

    return int(_core.crc32c(data))


def split(data: bytes):
    """(version, flags, seed, plain body) of a payload-shaped input, else None."""
    if len(data) < HEADER.size + 4 or data[:4] != MAGIC:
        return None
    _, version, flags, seed = HEADER.unpack_from(data)
    pos = HEADER.size
    if flags & FLAG_ZSTD:
        _, pos = read_varint(data, pos)
    stored = data[pos : len(data) - 4]
    if flags & FLAG_ZSTD:
        with zstandard.ZstdDecompressor().stream_reader(stored) as reader:
            stored = reader.read(MAX_PLAIN)  # bounded: a hostile frame cannot blow up the mutator
    return version, flags, seed, bytes(stored)


def build(version: int, flags: int, seed: int, body: bytes) -> bytes:
    """A payload with this plain body: compressed when the zstd flag is set, sizes and CRC right."""
    size_field = b""
    if flags & FLAG_ZSTD:
        size_field = varint(len(body))
        body = zstandard.ZstdCompressor(level=1, write_content_size=True).compress(body)
    head = HEADER.pack(MAGIC, version, flags, seed) + size_field + body
    return head + struct.pack("<I", crc32c(head))


def hostile_varint(body: bytes, rnd: random.Random) -> bytes:
    """A hostile number written over (or inserted at) a random offset of the body."""
    pos = rnd.randrange(len(body) + 1)
    value = varint(rnd.choice(HOSTILE))
    if rnd.random() < 0.3:
        return body[:pos] + value + body[pos:]
    try:  # replace the varint that starts here, keeping the fields after it in place
        _, end = read_varint(body, pos)
    except (IndexError, ValueError):
        end = min(len(body), pos + len(value))
    return body[:pos] + value + body[end:]


def mutate(data: bytes, max_size: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    choice = rnd.random()
    parts = None
    if choice >= 0.15:
        try:
            parts = split(data)
        except Exception:  # noqa: BLE001 - not a payload we can take apart: mutate the bytes
            parts = None
    if parts is None:
        return atheris.Mutate(data, max_size)
    version, flags, pseed, body = parts
    if choice < 0.25:
        # Header and stored (compressed) bytes, with the checksum recomputed only.
        head = atheris.Mutate(data[:-4], max(1, max_size - 4))
        out = head + struct.pack("<I", crc32c(head))
    else:
        if choice < 0.40:
            body = hostile_varint(body, rnd)
        elif choice < 0.45:
            flags ^= rnd.choice((FLAG_ZSTD, FLAG_DIGEST, 0x04 << rnd.randrange(6)))
        else:
            body = atheris.Mutate(body, max(len(body) + 64, min(max_size, MAX_PLAIN)))
        if rnd.random() < 0.02:
            version = rnd.randrange(256)
        out = build(version, flags, pseed, body)
    return out if len(out) <= max_size else atheris.Mutate(data, max_size)


def main() -> None:
    argv, opts = _harness.parse_argv(sys.argv)
    checks = _harness.import_checks(atheris)
    one = _harness.target(checks.check_payload, checks, opts["findings"])
    if opts["raw"]:
        atheris.Setup(argv, one)
    else:
        atheris.Setup(argv, one, custom_mutator=mutate)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
