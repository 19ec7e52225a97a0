"""Writes the golden payloads of the current format version (run once per version; the
files are committed).

    python tests/data/make_golden.py            # every spec
    python tests/data/make_golden.py eden3      # one (new) spec only

For each spec in SPECS it writes golden_v<V>_<name>.bin (the payload of
golden_input() encoded with seed SEED by the current writer, format version
V = fp.format.FORMAT_VERSION) and golden_v<V>_<name>.npz (what fp.decode returned for
it). tests/test_payload.py decodes the stored bytes and compares them with the
stored arrays, and re-encodes golden_input() to check that the same bytes come
out: a change of the wire format, of a value stage or of a seeded random choice
shows up there and needs a new format version (or, deliberately, regenerated
golden files). Each spec in DIGEST_SPECS is written the same way with
Codec(spec, table="digest") (the payload without its tensor table) as
golden_v<V>_<name>-table_digest.*, and tests/test_table_digest.py checks those.

The files of earlier versions (VERSIONS; golden_v1_* are version 1, whose index
streams are Golomb codes) are never rewritten: no writer writes them any more.
They stay so that tests/test_format_vectors.py checks that every version a decoder
reads still decodes, by fedpress and by tests/format_reference.py, to its stored
arrays, and to the same arrays as the current version's file of the same spec.
"""

from __future__ import annotations

import pathlib

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
SEED = 20240611
SPECS = (
    "fp32",
    "fp16",
    "q8+zstd:3",
    "sign",
    "topk:0.05+q4+zstd",
    "randk:0.1+fp16",
    "thresh:0.1+bf16",
    "eden3",
    "eden4:shared",
    "topk:0.5+eden2:mse",
)
DIGEST_SPECS = ("topk:0.05+q4",)  # written with table="digest"


VERSION = 2  # the version the writer writes (fp.format.FORMAT_VERSION); main() writes only its files
VERSIONS = (1, 2)  # every version with golden files


def file_stem(spec: str, table: str = "inline", version: int = VERSION) -> str:
    """golden_v<version>_<spec>, with -table_digest for a payload without its table."""
    stem = f"golden_v{version}_" + spec.replace(":", "_").replace("+", "-")
    return stem + "-table_digest" if table == "digest" else stem


def golden_input() -> dict:
    """A small update built only from integer arithmetic (no RNG): the same on every machine."""
    i = np.arange(1200, dtype=np.int64)
    spread = (((i * 7919) % 1009) - 504).astype(np.float64) / 97.0  # in [-5.2, 5.2], no ties in magnitude pairs
    return {
        "conv.weight": spread[:960].astype(np.float32).reshape(8, 4, 5, 6),
        "conv.bias": (np.arange(8, dtype=np.float32) - 3.25) / 8,
        "fc.weight": (spread[960:] / 3.0).reshape(12, 20),  # float64
        "half": (np.arange(-10, 10, dtype=np.float16) / np.float16(4)),
        "scalar": np.array(0.375, np.float32),
        "empty": np.zeros((0, 3), np.float32),
        "step": np.array(42, np.int64),
        "counts": np.arange(6, dtype=np.int32).reshape(2, 3) - 2,
        "mask": np.arange(5) % 2 == 0,
    }


def main(specs: tuple = SPECS, digest_specs: tuple = DIGEST_SPECS) -> None:
    import fedpress as fp

    if fp.format.FORMAT_VERSION != VERSION:
        raise SystemExit(f"the writer writes format version {fp.format.FORMAT_VERSION}, this script version {VERSION}")
    update = golden_input()
    for spec, table in [(s, "inline") for s in specs] + [(s, "digest") for s in digest_specs]:
        payload = fp.Codec(spec, table=table).encode(update, seed=SEED)
        assert payload[4] == VERSION, payload[4]
        stem = file_stem(spec, table)
        (HERE / f"{stem}.bin").write_bytes(payload)
        np.savez_compressed(HERE / f"{stem}.npz", **fp.decode(payload, table=update))
        print(f"{stem}: {len(payload)} bytes")


if __name__ == "__main__":
    import sys

    named = tuple(sys.argv[1:])  # python tests/data/make_golden.py [SPEC ...]
    if named:
        main(
            tuple(s for s in named if s in SPECS or s not in DIGEST_SPECS), tuple(s for s in named if s in DIGEST_SPECS)
        )
    else:
        main()
