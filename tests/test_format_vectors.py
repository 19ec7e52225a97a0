"""docs/format.md's test vectors: the EDEN vectors (tests/data/format-vectors/eden.json,
written by scripts/make_format_vectors.py), its Appendix A tables and its index streams.

For every EDEN vector: fedpress.decode gives the stored bits; tests/format_reference.py,
a decoder written from the document alone (its EDEN tables read from the document),
gives the same bits; and re-encoding the stored inputs with the stored seeds gives the
stored bytes, so a change of the wire layout or of the encoder cannot go unnoticed. The
same vectors as format version 1 wrote them (eden_v1.json) still decode, by both.
Both decoders also read every golden payload in tests/data/, of both versions.

Index streams: the document's examples decode with both decoders and are what both
encoders write; the reference's version 2 encoder and fedpress.ops.encode_indices agree
byte for byte on random index sets; and both decoders reject the document's malformed
streams, and agree on every truncation and bit flip of a valid one."""

from __future__ import annotations

import ast
import json
import re
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
VECTORS_V1_FILE = DATA / "format-vectors" / "eden_v1.json"  # the same vectors, as format version 1 wrote them
BY_NAME_V1 = {v["name"]: v for v in json.loads(VECTORS_V1_FILE.read_text(encoding="utf-8"))["vectors"]}
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
    assert VECTORS_FILE.stat().st_size < 512 * 1024 and VECTORS_V1_FILE.stat().st_size < 512 * 1024
    assert {bytes.fromhex(v["payload"])[4] for v in VECTORS} == {fp.format.FORMAT_VERSION} == {2}
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


@pytest.mark.parametrize("name", BY_NAME_V1)
def test_version1_vector_still_decodes_to_its_bits(name: str, doc_tables: dict) -> None:
    """Format version 1 payloads (Golomb index streams) are still read, by both decoders."""
    v = BY_NAME_V1[name]
    payload = bytes.fromhex(v["payload"])
    assert payload[4] == 1
    assert_same_bits(fp.decode(payload), v["decoded"], f"fedpress.decode of version 1 {name}")
    assert_same_bits(ref.decode(payload, tables=doc_tables), v["decoded"], f"format_reference of version 1 {name}")


def test_version1_and_version2_vectors_are_the_same_updates() -> None:
    """The versions differ only in their index streams: same inputs, same decoded bits, and
    a payload without index streams differs only in its version byte and its CRC."""
    assert list(BY_NAME_V1) == list(BY_NAME)
    for name, v2 in BY_NAME.items():
        v1 = BY_NAME_V1[name]
        for key in ("spec", "rht_block", "seed", "rotation_seed", "inputs", "decoded"):
            assert v1[key] == v2[key], (name, key)
        old, new = bytes.fromhex(v1["payload"]), bytes.fromhex(v2["payload"])
        if "shared" not in v2["spec"] and not v2["spec"].startswith("topk"):
            assert old[:4] + old[5:-4] == new[:4] + new[5:-4], name


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


GOLDEN_FILES = sorted(DATA.glob("golden_v*_*.bin"))


def stored_arrays(path: Path) -> dict:
    with np.load(path.with_suffix(".npz")) as stored:
        return {k: stored[k] for k in stored.files}


def assert_same_arrays(got: dict, expected: dict, who: str) -> None:
    assert set(got) == set(expected), who
    for k, want in expected.items():
        assert got[k].dtype == want.dtype and got[k].shape == want.shape, (who, k)
        assert got[k].tobytes() == want.tobytes(), f"{who}: tensor {k!r}"


def test_golden_payloads_exist_for_every_version_and_spec() -> None:
    for version in GOLDEN.VERSIONS:
        stems = [GOLDEN.file_stem(s, version=version) for s in GOLDEN.SPECS]
        stems += [GOLDEN.file_stem(s, "digest", version=version) for s in GOLDEN.DIGEST_SPECS]
        for stem in stems:
            assert (DATA / f"{stem}.bin").read_bytes()[4] == version, stem
            assert (DATA / f"{stem}.npz").is_file(), stem
    assert len(GOLDEN_FILES) == len(GOLDEN.VERSIONS) * (len(GOLDEN.SPECS) + len(GOLDEN.DIGEST_SPECS))


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=lambda p: p.stem)
def test_both_decoders_read_golden_payloads(path: Path, doc_tables: dict) -> None:
    table = update = None
    if path.stem.endswith("-table_digest"):
        update = GOLDEN.golden_input()
        table = [(k, a.dtype.name, a.shape) for k, a in update.items()]
    expected = stored_arrays(path)
    payload = path.read_bytes()
    assert_same_arrays(ref.decode(payload, table=table, tables=doc_tables), expected, f"format_reference, {path.name}")
    assert_same_arrays(fp.decode(payload, table=update), expected, f"fedpress.decode, {path.name}")


@pytest.mark.parametrize("path", sorted(DATA.glob("golden_v1_*.bin")), ids=lambda p: p.stem)
def test_golden_payload_of_each_version_decodes_alike(path: Path) -> None:
    """Version 2 changed only the index streams: the same update, written by each
    version's writer, decodes to the same arrays."""
    v2 = path.with_name(path.name.replace("golden_v1_", "golden_v2_", 1))
    assert_same_arrays(stored_arrays(v2), stored_arrays(path), f"{v2.name} against {path.name}")


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


# ------------------------------------------------------------ index streams --
def doc_section(title: str) -> str:
    """The text of the document's subsection '### title', up to the next heading."""
    text = ref.DOC.read_text(encoding="utf-8")
    start = text.index(f"\n### {title}\n")
    ends = [i for i in (text.find("\n### ", start + 1), text.find("\n---", start + 1)) if i >= 0]
    return text[start : min(ends)]


def doc_index_streams() -> list[tuple[int, bool, list, int, bytes]]:
    """(version, written by the reference encoder, indices, n, stream) of each index stream
    row of the document's test-vector table; 'any n' is taken as 1000."""
    rows = []
    for row in re.findall(
        r"^\| index stream([^|]*)\|([^|]*)\|\s*`([0-9a-f ]+)`\s*\|$", doc_section("Test vectors"), re.M
    ):
        label, given, stream = (part.strip() for part in row)
        indices = json.loads(re.search(r"`(\[[0-9, ]*\])`", given).group(1))
        n = re.search(r"`n = (\d+)`", given)
        version = 1 if label == ", version 1" else 2
        assert label in ("", ", version 1", ", other `l`"), label
        rows.append((version, label != ", other `l`", indices, int(n.group(1)) if n else 1000, bytes.fromhex(stream)))
    assert len(rows) >= 10
    return rows


def doc_malformed_streams() -> list[tuple[bytes, int, str]]:
    """(stream, n, reason) of the document's table of malformed version 2 streams."""
    rows = re.findall(r"^\| `([0-9a-f ]+)` \| (\d+) \| (.+) \|$", doc_section("Test vectors"), re.M)
    assert len(rows) >= 12
    return [(bytes.fromhex(stream), int(n), why) for stream, n, why in rows]


DOC_STREAMS = doc_index_streams()


def ops_indices(stream: bytes, n: int, version: int = 2) -> list:
    return np.asarray(ops.decode_indices(stream, n, version=version), dtype=np.int64).tolist()


@pytest.mark.parametrize("version, reference, indices, n, stream", DOC_STREAMS, ids=lambda v: str(v)[:24])
def test_document_index_streams(version: int, reference: bool, indices: list, n: int, stream: bytes) -> None:
    """Each documented stream decodes to its indices with both decoders, and the ones the
    document says the reference writes are what both encoders write."""
    assert ref.decode_index_stream(stream, n, version) == indices
    assert ops_indices(stream, n, version) == indices
    if reference:
        assert ops.encode_indices(np.asarray(indices, np.uint32), n, version=version) == stream
        if version == 2:
            assert ref.encode_index_stream(indices, n) == stream


@pytest.mark.parametrize("stream, n, why", doc_malformed_streams(), ids=lambda v: str(v)[:30])
def test_document_malformed_streams_are_rejected(stream: bytes, n: int, why: str) -> None:
    with pytest.raises(ref.FormatError):
        ref.decode_index_stream(stream, n, 2)
    with pytest.raises(ValueError):
        ops.decode_indices(stream, n, version=2)


def index_sets() -> list[tuple[str, np.ndarray, int]]:
    """(label, indices, n): uniform sets of several densities, the empty and the full set,
    clustered sets (runs with long gaps between, as top-k picks), and extreme gaps."""
    rng = np.random.default_rng(20261207)
    out = []
    for n in (1, 7, 1000, 65_537, 1_000_000):
        for density in (1e-4, 1e-3, 0.01, 0.1, 0.5, 0.9, 0.999):
            k = int(round(n * density))
            out.append((f"uniform-n{n}-d{density}", np.sort(rng.choice(n, k, replace=False)), n))
        out.append((f"empty-n{n}", np.zeros(0, np.int64), n))
        out.append((f"full-n{n}", np.arange(n), n))
    for n, runs, length in ((1_000_000, 40, 500), (1_000_000, 2000, 3), (100_000, 5, 10_000)):
        starts = np.sort(rng.choice(n // length, runs, replace=False)) * length
        idx = np.unique((starts[:, None] + np.arange(length)[None, :]).reshape(-1))
        out.append((f"clustered-n{n}-{runs}x{length}", idx[idx < n], n))
    mixed = np.unique(np.concatenate([np.arange(1000), rng.choice(1_000_000, 300, replace=False)]))
    out.append(("dense-head-sparse-tail", mixed, 1_000_000))
    out.append(("first-and-last-of-2^32", np.array([0, 2**32 - 1]), 2**32))
    out.append(("last-of-2^32", np.array([2**32 - 1]), 2**32))
    out.append(("first-of-2^32", np.array([0]), 2**32))
    out.append(("powers-of-two", np.array([2**j for j in range(32)]), 2**32))
    return out


@pytest.mark.parametrize("label, indices, n", index_sets(), ids=lambda v: v if isinstance(v, str) else "")
def test_reference_encoder_and_ops_agree_byte_for_byte(label: str, indices: np.ndarray, n: int) -> None:
    """The document's encoder rule (format_reference.encode_index_stream) writes what
    fedpress.ops.encode_indices writes, and both decoders read it back."""
    idx = np.asarray(indices, np.uint32)
    stream = ops.encode_indices(idx, n)
    assert stream == ops.encode_indices(idx, n, version=2)
    assert ref.encode_index_stream(indices, n) == stream, label
    want = np.asarray(indices, np.int64).tolist()
    assert ref.decode_index_stream(stream, n, 2) == want
    assert ops_indices(stream, n) == want
    if idx.size:
        # The document's cost formula: the stream is as long as its coded bits say.
        head = _varint_length(stream) + 1
        rice = stream[head - 1]
        low_bits = idx.size * rice
        unary_bits = ref.rice_cost(ref.rice_gaps(indices, n), rice) - low_bits
        assert len(stream) == head + (low_bits + 7) // 8 + (unary_bits + 7) // 8
        # Version 1 of the same set still round-trips through both decoders.
        old = ops.encode_indices(idx, n, version=1)
        assert ref.decode_index_stream(old, n, 1) == want and ops_indices(old, n, 1) == want


def _varint_length(stream: bytes) -> int:
    return next(i for i, b in enumerate(stream) if not b & 0x80) + 1


def hostile_variants(stream: bytes) -> list[bytes]:
    """Every truncation, every single bit flip, and a few appended bytes of a stream."""
    out = [stream[:cut] for cut in range(len(stream))]
    for i in range(len(stream)):
        for bit in range(8):
            flipped = bytearray(stream)
            flipped[i] ^= 1 << bit
            out.append(bytes(flipped))
    out += [stream + b"\x00", stream + b"\x01", stream + b"\x80"]
    return out


@pytest.mark.parametrize(
    "indices, n",
    [
        ([3, 4, 9], 16),
        ([0, 1, 2], 3),
        ([5], 6),
        ([2, 7, 300, 301, 1000], 1024),
        (list(range(0, 600, 7)) + [999], 1000),
        ([0, 2**32 - 1], 2**32),
    ],
    ids=str,
)
def test_both_decoders_agree_on_every_truncation_and_bit_flip(indices: list, n: int) -> None:
    """Each stream one edit away from a valid one: both decoders reject it, or both decode it
    to the same indices (so the document states every check ops makes, and no more)."""
    stream = ref.encode_index_stream(indices, n)
    rejected = 0
    for bad in hostile_variants(stream):
        try:
            got = ops_indices(bad, n)
        except ValueError:
            with pytest.raises(ref.FormatError):
                ref.decode_index_stream(bad, n, 2)
            rejected += 1
            continue
        try:
            want = ref.decode_index_stream(bad, n, 2)
        except ref.FormatError as exc:
            pytest.fail(f"{bad.hex(' ')}: ops decodes it, the document's decoder says {exc}")
        assert got == want, bad.hex(" ")
    assert rejected > len(stream)


def test_index_stream_count_must_match(doc_tables: dict) -> None:
    """k != count is rejected: by ops.decode_indices given out= of another length, and in a
    payload, by fedpress.decode and the document's decoder, in both versions."""
    from conftest import Wire

    stream = ops.encode_indices(np.array([3, 4, 9], np.uint32), 16)
    with pytest.raises(ValueError):
        ops.decode_indices(stream, 16, out=np.empty(2, np.uint32))
    with pytest.raises(ValueError):
        ops.decode_indices(stream, 16, max_count=2)
    w = Wire()
    for version in (1, 2):
        stream = ops.encode_indices(np.array([3, 4, 9], np.uint32), 16, version=version)
        for count in (2, 3, 4):
            values = np.arange(count, dtype="<f4").tobytes()
            t = w.tensor("w", "float32", (16,), w.SPARSE, count=count, index_data=stream, value_data=values)
            payload = w.wrap(w.body([t], "topk:0.2+fp32"), version=version)
            if count == 3:
                assert ref.decode(payload, tables=doc_tables)["w"].tolist() == fp.decode(payload)["w"].tolist()
                continue
            with pytest.raises(fp.DecodeError):
                fp.decode(payload)
            with pytest.raises(ref.FormatError):
                ref.decode(payload, tables=doc_tables)


def doc_hex_dump(title_start: str) -> bytes:
    """The bytes of the first hex dump (xxd layout) in the document's subsection whose title
    starts with title_start."""
    text = ref.DOC.read_text(encoding="utf-8")
    start = text.index(f"\n### {title_start}")
    section = text[start : text.index("\n### ", start + 1)]
    dump = re.search(r"^00000000: .*?(?=\n```)", section, re.M | re.S).group(0)
    return bytes.fromhex("".join(line[10:49] for line in dump.splitlines()).replace(" ", ""))


@pytest.mark.parametrize(
    "title, spec, kwargs, update",
    [
        ("Example 1", "fp32", {}, {"w": [1.0, -2.0]}),
        ("Example 2", "rht+fp32", {}, {"w": [1.0, -2.0, 3.0]}),
        ("Example 5", "fp32", {"table": "digest"}, {"w": [1.0, -2.0]}),
        ("Example 6", "eden2", {"rht_block": 4}, {"w": [1.0, -2.0, 3.0, 0.5, -1.5, 2.5]}),
    ],
)
def test_worked_examples_are_what_the_writer_writes(title: str, spec: str, kwargs: dict, update: dict) -> None:
    """The document's worked examples (not Example 3, whose zstd bytes depend on the zstd
    version) show the bytes the current writer writes, of the current version."""
    arrays = {k: np.asarray(v, np.float32) for k, v in update.items()}
    payload = fp.Codec(spec, **kwargs).encode(arrays, seed=7)
    assert doc_hex_dump(title) == payload, f"docs/format.md, {title}: {payload.hex(' ')}"
    assert payload[4] == fp.format.FORMAT_VERSION
