"""Writes tests/data/format-vectors/eden.json, the EDEN test vectors of docs/format.md.

    python scripts/make_format_vectors.py              # (re)write the vectors file
    python scripts/make_format_vectors.py --appendix   # print docs/format.md's Appendix A tables

Each vector is one payload made by fedpress.Codec(spec, rht_block=...).encode(inputs,
seed=..., rotation_seed=...), stored with its inputs and with what fedpress.decode
returns for it, every array as the hex of its little-endian bytes.
tests/test_format_vectors.py checks that fedpress decodes each payload to the stored
values, that tests/format_reference.py (a decoder written from the document) does
too, and that re-encoding the inputs gives the same bytes. Run this only on purpose:
a changed file means a changed wire format or encoder.

The payloads are of the format version the writer writes (fedpress.format.FORMAT_VERSION, 2).
tests/data/format-vectors/eden_v1.json holds the same vectors as the version 1 writer
wrote them; this script never rewrites it (no writer writes version 1 any more), and
the tests only decode it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "format-vectors" / "eden.json"
sys.path.insert(0, str(ROOT / "tests"))

import format_reference as ref  # noqa: E402  (the document's decoder: rotations, seeds, parsing)

BITS = (1, 2, 3, 4, 8)


def gaussian(n: int, seed: int, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


def heavy(n: int, seed: int) -> np.ndarray:
    """Student-t (3 degrees of freedom) with a few spikes: far from Gaussian before rotation."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(3, n) * 0.01
    x[rng.choice(n, 3, replace=False)] = [0.9, -1.3, 0.4]
    return x.astype(np.float32)


def with_outliers(n: int, block: int, seed: int, rotation_seed: int, spikes: dict[int, float]) -> np.ndarray:
    """An input whose EDEN rotation (under rotation_seed R of the tensor) is Gaussian noise
    plus spikes at the given rotated positions, so that the shared mode has outliers."""
    y = gaussian(n, seed, 0.05)
    for pos, value in spikes.items():
        y[pos] = value
    return ref.eden_unrotate(y, rotation_seed, block)


def several_tensors() -> dict:
    return {
        "conv": gaussian(256, 404).reshape(4, 8, 8),
        "zeros": np.zeros(40, np.float32),
        "step": np.array(7, np.int64),
        "empty": np.zeros((0, 3), np.float32),
        "f64": gaussian(37, 405).astype(np.float64),
        "f16": (gaussian(24, 406) * 3).astype(np.float16),
    }


def rotation_seed_of(payload_seed: int, rotation_seed: Optional[int], ordinal: int) -> int:
    """R of the tensor with this ordinal: from rotation_seed (shared mode, when given) or the payload seed."""
    base = payload_seed if rotation_seed is None else rotation_seed
    return ref.stage_seed(base, ordinal, ref.PURPOSE_RHT)


def vector_specs() -> list[dict[str, Any]]:
    """Name, spec, rotation block, seeds and an input builder for each vector."""
    out: list[dict[str, Any]] = []

    def add(name: str, spec: str, block: int, seed: int, build: Callable[..., dict], rotation_seed=None, note=""):
        out.append(
            {"name": name, "spec": spec, "rht_block": block, "seed": seed, "rotation_seed": rotation_seed}
            | {"build": build, "note": note}
        )

    for b in BITS:
        add(
            f"eden{b}-n1000-B256",
            f"eden{b}",
            256,
            100 + b,
            lambda s=100 + b: {"w": gaussian(1000, s, 0.02)},
            note="nearest rounding, unbiased scale; segments 768 (3 blocks), 128, 64, 32, 8",
        )
    for b in BITS:
        add(
            f"eden{b}-mse-n512-B128",
            f"eden{b}:mse",
            128,
            200 + b,
            lambda s=200 + b: {"w": heavy(512, s)},
            note="nearest rounding, MSE scale; one segment of 4 whole blocks",
        )
    for b in BITS:
        seed, given = 300 + b, (0xFEDC0000 + b if b in (4, 8) else None)
        r = rotation_seed_of(seed, given, 0)
        spikes = {5: 1.5, 140: -2.0, 270: 0.9}  # rotated positions in segments 256 (twice) and 32
        add(
            f"eden{b}-shared-n300-B128",
            f"eden{b}:shared",
            128,
            seed,
            lambda s=seed, r=r, spikes=spikes: {"w": with_outliers(300, 128, s, r, spikes)},
            rotation_seed=given,
            note="stochastic rounding, outliers; segments 256 (2 blocks), 32, 8, 4"
            + ("; rotation seed given (a round's shared seed)" if given is not None else ""),
        )
    # One-off cases: (name, spec, rotation block, seed, inputs, note).
    cases = [
        ("topk0.25-eden3-n1000-B256", "topk:0.25+eden3", 256, 401, lambda: {"w": heavy(1000, 401)},
         "sparse entry: 250 kept values, segments 128, 64, 32, 16, 8, 2 (all shorter than the block)"),
        ("randk0.1-eden4-shared-n1000-B64", "randk:0.1+eden4:shared", 64, 402, lambda: {"w": gaussian(1000, 402)},
         "sparse-seeded entry: 100 values, segments 64, 32, 4"),
        ("eden3-n37-B4", "eden3", 4, 403, lambda: {"w": gaussian(37, 403)},
         "blocks of 4 (3-bit codes of a block straddle bytes); segments 36 (9 blocks), 1"),
        ("eden2-tensors-B64", "eden2", 64, 404, several_tensors,
         "ordinals count every entry (raw ones too); an all-zero tensor (scales 0); an empty one; "
         "float64 and float16 outputs; segments of 37: 32, 4, 1"),
        ("rht-q4-n1000-B256", "rht+q4", 256, 405, lambda: {"w": heavy(1000, 405)},
         "not EDEN: the blockwise rotation of 'Rotation' (one pass, padded tail block of 256)"),
    ]  # fmt: skip
    for name, spec, block, seed, build, note in cases:
        add(name, spec, block, seed, build, note=note)
    return out


def hex_array(arr: np.ndarray) -> dict[str, Any]:
    arr = np.asarray(arr)
    return {
        "dtype": arr.dtype.name,
        "shape": list(arr.shape),
        "hex": np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes().hex(),
    }


def make_vector(v: dict[str, Any]) -> dict[str, Any]:
    import fedpress as fp

    inputs = v["build"]()
    codec = fp.Codec(v["spec"], rht_block=v["rht_block"])
    payload = codec.encode(inputs, seed=v["seed"], rotation_seed=v["rotation_seed"])
    decoded = fp.decode(payload)
    check_coverage(v, payload)
    return {
        "name": v["name"],
        "spec": v["spec"],
        "rht_block": v["rht_block"],
        "seed": v["seed"],
        "rotation_seed": v["rotation_seed"],
        "note": v["note"],
        "payload": payload.hex(),
        "inputs": [{"name": k} | hex_array(a) for k, a in inputs.items()],
        "decoded": [{"name": k} | hex_array(a) for k, a in decoded.items()],
    }


def check_coverage(v: dict[str, Any], payload: bytes) -> None:
    """The vector exercises what its note says: outliers in the shared mode, and at 8 bits
    (nearest) the two centroids that are not the correctly rounded optimum."""
    if "eden" not in v["spec"]:
        return
    found: dict = {}
    ref.decode(payload, tables=code_tables(), sections=found)
    sections = [found[name][1] for name in found]
    for section in sections:
        if section.shared and section.count >= 256 and len(section.outlier_idx) < 2:
            raise SystemExit(f"{v['name']}: expected outliers, found {len(section.outlier_idx)}")
        if section.bits == 8 and not section.shared and section.count >= 512:
            used = set(np.concatenate(section.codes).tolist())
            if not {120, 135} <= used:
                raise SystemExit(f"{v['name']}: codes 120 and 135 unused")


def code_tables() -> dict:
    """{bits: (centroids, levels)} as the code has them (the appendix may not be written yet)."""
    import fedpress.ops as ops

    return {b: (ops.eden_centroids(b), ops.eden_levels(b)) for b in BITS}


def appendix() -> str:
    """Markdown of Appendix A's tables, from the code's tables."""
    import fedpress.ops as ops

    lines = []
    for b in BITS:
        centroids, levels = ops.eden_centroids(b), ops.eden_levels(b)
        lines += [
            f"### Tables for b = {b}",
            "",
            "| Code | Centroid (binary32) | Centroid (decimal) | Level (binary32) | Level (decimal) |",
            "|-----:|---------------------|-------------------:|------------------|----------------:|",
        ]
        for j in range(1 << b):
            c, lv = np.float32(centroids[j]), np.float32(levels[j])
            lines.append(
                f"| {j} | `0x{int(c.view(np.uint32)):08x}` | {float(c):.9g} "
                f"| `0x{int(lv.view(np.uint32)):08x}` | {float(lv):.9g} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appendix", action="store_true", help="print the Appendix A tables instead")
    args = parser.parse_args(argv)
    if args.appendix:
        sys.stdout.write(appendix())
        return 0
    import fedpress as fp

    vectors = [make_vector(v) for v in vector_specs()]
    version = fp.format.FORMAT_VERSION
    if any(bytes.fromhex(v["payload"])[4] != version for v in vectors):
        raise SystemExit(f"the writer wrote a payload whose version is not fedpress.format.FORMAT_VERSION = {version}")
    document = {
        "about": f"EDEN test vectors of docs/format.md (format version {version}), written by "
        "scripts/make_format_vectors.py. Arrays are the hex of their little-endian bytes; 'decoded' is what "
        "fedpress.decode returns.",
        "format_version": version,
        "vectors": vectors,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    print(f"{OUT.relative_to(ROOT)}: {len(vectors)} vectors, {OUT.stat().st_size} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
