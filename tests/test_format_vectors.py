"""docs/format.md's EDEN test vectors (tests/data/format-vectors/eden.json, written by
scripts/make_format_vectors.py) and its Appendix A tables.

For every vector: fedpress.decode gives the stored bits; tests/format_reference.py, a
decoder written from the document alone (its EDEN tables read from the document),
gives the same bits; and re-encoding the stored inputs with the stored seeds gives the
stored bytes, so a change of the wire layout or of the encoder cannot go unnoticed.
The reference decoder also reads every golden payload in tests/data/."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import fedpress as fp
import format_reference as ref
import numpy as np
import pytest
from conftest import load_make_golden
from fedpress import ops

DATA = Path(__file__).resolve().parent / "data"
VECTORS_FILE = DATA / "format-vectors" / "eden.json"
VECTORS = json.loads(VECTORS_FILE.read_text(encoding="utf-8"))["vectors"]
BY_NAME = {v["name"]: v for v in VECTORS}
EDEN_WIDTHS = (1, 2, 3, 4, 8)


@pytest.fixture(scope="module")
def doc_tables() -> dict:
    return ref.doc_tables()


def array(t: dict) -> np.ndarray:
    """A stored array: the hex of its little-endian bytes, its dtype and shape."""
    dtype = np.dtype(t["dtype"])
    raw = np.frombuffer(bytes.fromhex(t["hex"]), dtype=dtype.newbyteorder("<"))
    return raw.astype(dtype).reshape(t["shape"])


def hex_of(arr: np.ndarray) -> dict:
    """An array as the vectors store it."""
    return {
        "dtype": arr.dtype.name,
        "shape": list(arr.shape),
        "hex": arr.astype(arr.dtype.newbyteorder("<")).tobytes().hex(),
    }


def assert_same_bits(got: dict, expected: list[dict], who: str) -> None:
    assert list(got) == [t["name"] for t in expected], who
    for t in expected:
        arr = np.asarray(got[t["name"]])
        assert arr.dtype.name == t["dtype"] and list(arr.shape) == t["shape"], (who, t["name"])
        want = array(t)
        same = arr.reshape(-1).view(np.uint8) == want.reshape(-1).view(np.uint8)
        assert same.all(), f"{who}, tensor {t['name']!r}: differs at byte {int(np.argmin(same))}"


# ------------------------------------------------------------------ vectors --
def test_vectors_are_small_and_cover_every_eden_mode() -> None:
    assert VECTORS_FILE.stat().st_size < 512 * 1024
    specs = {v["spec"] for v in VECTORS}
    for b in EDEN_WIDTHS:
        assert {f"eden{b}", f"eden{b}:mse", f"eden{b}:shared"} <= specs, b
    assert any(s.startswith("topk:") and "eden" in s for s in specs)  # sparse
    assert any(s.startswith("randk:") and "eden" in s for s in specs)  # sparse-seeded
    # A length that is whole blocks, and one whose tail splits into power-of-two segments.
    tails = {(v["rht_block"], int(np.prod(t["shape"]))) for v in VECTORS for t in v["inputs"]}
    assert any(n % block == 0 for block, n in tails) and any(bin(n % block).count("1") > 2 for block, n in tails)


@pytest.mark.parametrize("name", BY_NAME)
def test_fedpress_decodes_vector_to_its_bits(name: str) -> None:
    v = BY_NAME[name]
    assert_same_bits(fp.decode(bytes.fromhex(v["payload"])), v["decoded"], f"fedpress.decode of {name}")


@pytest.mark.parametrize("name", BY_NAME)
def test_reference_decoder_matches_vector_bit_for_bit(name: str, doc_tables: dict) -> None:
    v = BY_NAME[name]
    got = ref.decode(bytes.fromhex(v["payload"]), tables=doc_tables)
    assert_same_bits(got, v["decoded"], f"tests/format_reference.py on {name}")


@pytest.mark.parametrize("name", BY_NAME)
def test_reencoding_vector_reproduces_its_bytes(name: str) -> None:
    v = BY_NAME[name]
    update = {t["name"]: array(t) for t in v["inputs"]}
    again = fp.Codec(v["spec"], rht_block=v["rht_block"]).encode(
        update, seed=v["seed"], rotation_seed=v["rotation_seed"]
    )
    assert again.hex() == v["payload"], (
        f"{name}: the encoder's output changed ({len(again)} bytes, vector {len(v['payload']) // 2}); a wire "
        "change needs docs/format.md and a new format version, or regenerate with "
        "python scripts/make_format_vectors.py on purpose"
    )


EDEN_VECTORS = [name for name, v in BY_NAME.items() if "eden" in v["spec"]]


@pytest.mark.parametrize("name", EDEN_VECTORS)
def test_documented_encoder_rules_give_the_vectors_codes_and_scales(name: str, doc_tables: dict) -> None:
    """The document's informative encoder description (rotation, nearest and stochastic
    rounding with their seeds and uniforms, scales) reproduces what the encoder wrote."""
    v = BY_NAME[name]
    inputs = {t["name"]: array(t).astype(np.float32).reshape(-1) for t in v["inputs"]}
    sections: dict = {}
    ref.decode(bytes.fromhex(v["payload"]), tables=doc_tables, sections=sections)
    assert sections
    for tensor, (ordinal, section, kept) in sections.items():
        x = inputs[tensor] if kept is None else inputs[tensor][np.asarray(kept, dtype=np.int64)]
        quant_seed = ref.stage_seed(v["seed"], ordinal, ref.PURPOSE_QUANT)
        expected = ref.eden_expected_codes(section, x, quant_seed, doc_tables)
        for i, (want, got) in enumerate(zip(expected, section.codes)):
            np.testing.assert_array_equal(got, want, err_msg=f"{name}, {tensor}, segment {i}")
        y = ref.eden_rotate(x, section.rotation_seed, section.block).astype(np.float64)
        if section.outlier_idx:
            np.testing.assert_array_equal(section.outlier_val, y[section.outlier_idx].astype(np.float32))
        centroids, _ = doc_tables[section.bits]
        segments = ref.eden_segments(section.count, section.block)
        for (off, length), scales, codes in zip(segments, section.scales, section.codes):
            size = min(length, section.block)
            for b, scale in enumerate(scales):
                part, c = y[off + b * size : off + (b + 1) * size], codes[b * size : (b + 1) * size]
                r = ref.block_norm(part.astype(np.float32))
                if r == 0.0:
                    assert scale == 0.0 and (c == 1 << (section.bits - 1)).all()
                elif section.shared:
                    assert scale == np.float32(r / np.sqrt(size))
                else:
                    cv = centroids[c].astype(np.float64)
                    want = part @ cv / (cv @ cv) if section.mse else r * r / (part @ cv)
                    assert abs(float(scale) - want) <= 1e-6 * want, (name, tensor, off, b)


# ----------------------------------------------------------- the document --
def test_appendix_tables_are_the_codes_tables(doc_tables: dict) -> None:
    assert sorted(doc_tables) == list(EDEN_WIDTHS)
    for b in EDEN_WIDTHS:
        centroids, levels = doc_tables[b]
        np.testing.assert_array_equal(centroids.view(np.uint32), ops.eden_centroids(b).view(np.uint32))
        np.testing.assert_array_equal(levels.view(np.uint32), ops.eden_levels(b).view(np.uint32))


def test_appendix_tables_are_ascending_and_symmetric(doc_tables: dict) -> None:
    for b, (centroids, levels) in doc_tables.items():
        for table in (centroids, levels):
            assert (np.diff(table) > 0).all(), b
            np.testing.assert_array_equal(table, -table[::-1])
        assert levels[0] == -np.float32(3.3) and levels[-1] == np.float32(3.3)


def test_reference_decoder_imports_nothing_from_fedpress() -> None:
    tree = ast.parse(Path(ref.__file__).read_text(encoding="utf-8"))
    modules = [a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names]
    modules += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert not [m for m in modules if m.split(".")[0] == "fedpress"]


GOLDEN = load_make_golden()


@pytest.mark.parametrize("path", sorted(DATA.glob("golden_v1_*.bin")), ids=lambda p: p.stem)
def test_reference_decoder_reads_golden_payloads(path: Path, doc_tables: dict) -> None:
    table = None
    if path.stem.endswith("-table_digest"):
        table = [(k, a.dtype.name, a.shape) for k, a in GOLDEN.golden_input().items()]
    got = ref.decode(path.read_bytes(), table=table, tables=doc_tables)
    with np.load(path.with_suffix(".npz")) as stored:
        expected = {k: stored[k] for k in stored.files}
    assert set(got) == set(expected)
    for k, want in expected.items():
        assert got[k].dtype == want.dtype and got[k].shape == want.shape, k
        assert got[k].tobytes() == want.tobytes(), f"{path.name}: tensor {k!r}"


@pytest.mark.parametrize("name", ["eden3-n37-B4", "eden2-shared-n300-B128"])
def test_reference_and_document_agree_on_every_single_bit_flip(name: str, doc_tables: dict) -> None:
    """Each payload one bit away from the vector (its checksum recomputed): fedpress and the
    document's decoder both reject it, or both decode it to the same bits. So the document
    states every check the reference makes on these sections, and nothing more."""
    payload = bytes.fromhex(BY_NAME[name]["payload"])
    rejected = 0
    for i in range(len(payload) - 4):
        for bit in range(8):
            flipped = bytearray(payload)
            flipped[i] ^= 1 << bit
            flipped[-4:] = ref.crc32c(bytes(flipped[:-4])).to_bytes(4, "little")
            try:
                got = fp.decode(bytes(flipped))
            except fp.DecodeError:
                with pytest.raises(ref.FormatError):
                    ref.decode(bytes(flipped), tables=doc_tables)
                rejected += 1
                continue
            try:
                want = ref.decode(bytes(flipped), tables=doc_tables)
            except ref.FormatError as exc:
                pytest.fail(f"byte {i} bit {bit}: fedpress decodes it, the document's decoder says {exc}")
            assert_same_bits(got, [{"name": k} | hex_of(a) for k, a in want.items()], f"byte {i} bit {bit}")
    assert 0 < rejected < 8 * len(payload)
