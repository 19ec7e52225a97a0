"""Coverage-guided fuzzing of the federation protocol parsers (atheris, libFuzzer):
read_frame over an asyncio StreamReader holding the input, the frame body parsers
(Hello/Auth/Welcome/Task/Update.unpack, unpack_error, unpack_text, loads_json) and
FrameOpener.open. The checks are tests/fuzz_checks.py's FrameChecker (success or
ProtocolError; read_frame may also raise ConnectionClosed at EOF; anything else is
a finding).

    pip install atheris
    python fuzz/fuzz_frames.py fuzz/corpus/frames -runs=100000

Each input is read as a stream of up to 4 frames (each unpacked by its type, both
as it is and opened as a sealed frame under the harness key), and also handed to
every body parser as a bare body. By default a structure-aware mutator mutates one
frame's body and fixes its length field, re-sealing it (right key, right sequence
number) when it was sealed, with a dictionary of the bodies' JSON keys (fuzz/frames.dict);
``--raw`` turns the mutator off. See fuzz/README.md.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import _harness
import atheris


def split_frames(data: bytes, P) -> tuple:
    """([(type byte, body)], the bytes after the last whole frame) of a frame stream."""
    frames, pos = [], 0
    while pos + P.HEADER.size <= len(data):
        magic, version, ftype, length = P.HEADER.unpack_from(data, pos)
        if magic != P.MAGIC or pos + P.HEADER.size + length > len(data):
            break
        start = pos + P.HEADER.size
        frames.append((ftype, version, data[start : start + length]))
        pos = start + length
    return frames, data[pos:]


def make_mutator(checks):
    P = checks.P

    def mutate(data: bytes, max_size: int, seed: int) -> bytes:
        rnd = random.Random(seed)
        if rnd.random() < 0.6:
            return atheris.Mutate(data, max_size)
        try:
            frames, tail = split_frames(data, P)
        except Exception:  # noqa: BLE001 - not frames we can take apart: mutate the bytes
            frames = []
        if not frames:
            return atheris.Mutate(data, max_size)
        i = rnd.randrange(len(frames))
        opener = P.FrameOpener(checks.KEY)
        sealed = []  # the sequence number of each frame that opens under the harness key, else None
        for ftype, _, body in frames:
            seq = opener.seq
            try:
                opener.open(P.Frame(P.FrameType(ftype), body))
                sealed.append(seq)
            except Exception:  # noqa: BLE001 - does not open: not sealed
                sealed.append(None)
        ftype, version, body = frames[i]
        inner = body[: -P.TRAILER_BYTES] if sealed[i] is not None else body
        inner = atheris.Mutate(inner, max(len(inner) + 64, max_size // 2))
        if rnd.random() < 0.05:
            ftype = rnd.randrange(256)
        frames[i] = (ftype, version, inner)
        out = []
        sealer = P.FrameSealer(checks.KEY)
        types = {int(t) for t in P.FrameType}
        for j, (ft, ver, b) in enumerate(frames):
            if sealed[j] is not None and ft in types:
                if j != i:
                    b = b[: -P.TRAILER_BYTES]
                sealer.seq = sealed[j]
                out.append(b"".join(bytes(x) for x in sealer.seal(ft, b)))
            else:
                out.append(P.HEADER.pack(P.MAGIC, ver, ft, len(b)) + b)
        result = b"".join(out) + tail
        return result if len(result) <= max_size else atheris.Mutate(data, max_size)

    return mutate


def main() -> None:
    argv, opts = _harness.parse_argv(sys.argv, {"-dict": str(Path(__file__).resolve().parent / "frames.dict")})
    checks = _harness.import_checks(atheris)
    checker = checks.FrameChecker()
    one = _harness.target(checker.check, checks, opts["findings"])
    if opts["raw"]:
        atheris.Setup(argv, one)
    else:
        atheris.Setup(argv, one, custom_mutator=make_mutator(checks))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
