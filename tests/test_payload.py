"""The payload format: fp.inspect, header layout, version/flag/magic checks,
fp.Limits, trailing bytes and golden payloads of format versions 1 and 2."""

from __future__ import annotations

import pathlib
import struct

import fedpress as fp
import numpy as np
import pytest
from conftest import load_make_golden

DATA = pathlib.Path(__file__).resolve().parent / "data"
TRAILER_SIZE = 4


GOLDEN = load_make_golden()


def sample_update() -> dict:
    rng = np.random.default_rng(5)
    return {
        "a": rng.standard_normal((4, 5, 6)).astype(np.float32),  # 120 elements, 3 dims
        "b": rng.standard_normal(50),  # float64
        "c": np.arange(10, dtype=np.int64),
        "d": np.array([1.0, -2.0, 3.0], np.float32),
        "flag": np.array(True),
    }


def table_bounds(spec: str, update: dict) -> tuple:
    """Bounds on the bytes of a body that are not sections (spec and table): the
    spec, two count varints, and per entry its name, 5 u8 fields (dtype, ndim,
    kind, value code, flags) and 6 + ndim varints (name_len, dimensions, count, bucket, rht_block,
    index_len, values_len) of 1 to 10 bytes each."""
    varints = 2 + sum(6 + x.ndim for x in update.values())
    fixed = len(spec.encode()) + sum(len(k.encode()) + 5 for k in update)
    return fixed + varints, fixed + 10 * varints


# ------------------------------------------------------------------ inspect --
@pytest.mark.parametrize("spec", ["fp32", "q8", "topk:0.05+q4", "topk:0.05+q4+zstd", "randk:0.1+fp16", "sign+zstd:5"])
def test_inspect_fields(spec: str, wire) -> None:
    update = sample_update()
    payload = fp.Codec(spec).encode(update, seed=77)
    info = fp.inspect(payload)
    canonical = str(fp.parse_spec(spec))
    assert info["codec"] == canonical
    assert info["format_version"] == 2
    assert info["seed"] == 77
    assert info["zstd"] == ("zstd" in spec)
    assert info["payload_bytes"] == len(payload)
    raw = sum(x.nbytes for x in update.values())
    assert info["raw_bytes"] == raw
    assert info["ratio"] == pytest.approx(raw / len(payload))
    assert [t["name"] for t in info["tensors"]] == list(update)
    dec = fp.decode(payload)
    for t in info["tensors"]:
        x = update[t["name"]]
        assert tuple(t["shape"]) == x.shape
        assert t["dtype"] == x.dtype.name
        assert t["raw_bytes"] == x.nbytes
        assert t["bytes"] == t["index_bytes"] + t["value_bytes"]
        if x.dtype.kind != "f":
            assert t["kind"] == "raw" and t["bytes"] == x.nbytes and t["count"] == x.size
        elif t["kind"] == "dense":
            assert t["count"] == x.size and t["index_bytes"] == 0
        else:
            assert t["kind"] == ("sparse-seeded" if spec.startswith("randk") else "sparse")
            assert t["count"] == np.count_nonzero(dec[t["name"]])
            assert t["count"] < x.size
    # The sections and the table make up the whole body.
    body = wire.plain_body(payload)
    table = wire.sections_offset(body)
    lo, hi = table_bounds(canonical, update)
    assert lo <= table <= hi
    assert table + sum(t["bytes"] for t in info["tensors"]) == len(body)
    _, tensors = wire.parse_body(body)
    assert [(len(t.index_data), len(t.value_data)) for t in tensors] == [
        (t["index_bytes"], t["value_bytes"]) for t in info["tensors"]
    ]
    if not info["zstd"]:
        assert len(payload) == wire.header(payload)["header_size"] + len(body) + TRAILER_SIZE


def test_inspect_does_not_need_the_spec_and_checks_the_payload() -> None:
    payload = fp.Codec("q4").encode(sample_update(), seed=1)
    bad = bytearray(payload)
    bad[-10] ^= 0x10
    with pytest.raises(fp.DecodeError):
        fp.inspect(bytes(bad))
    with pytest.raises(fp.DecodeError):
        fp.inspect(payload, limits=fp.Limits(max_tensors=1))


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview, lambda b: np.frombuffer(b, np.uint8)])
def test_decode_accepts_bytes_like(kind) -> None:
    update = sample_update()
    payload = fp.Codec("fp32").encode(update, seed=1)
    dec = fp.decode(kind(payload))
    for name, x in update.items():
        np.testing.assert_array_equal(dec[name], x.astype(np.float32) if name == "b" else x)


def test_decode_rejects_non_bytes() -> None:
    with pytest.raises(TypeError):
        fp.decode(12345)  # type: ignore[arg-type]


# ------------------------------------------------------------------- header --
@pytest.mark.parametrize("spec", ["q8", "q8+zstd"])
def test_header_layout(spec: str, wire) -> None:
    seed = 0x1122334455667788
    payload = fp.Codec(spec).encode(sample_update(), seed=seed)
    assert payload[0:4] == b"FPRS"
    assert payload[4] == 2  # version
    assert payload[5] == (1 if "zstd" in spec else 0)  # flags: bit 0 = zstd
    assert struct.unpack_from("<Q", payload, 6)[0] == seed  # seed u64, unaligned
    h = wire.header(payload)
    stored = len(payload) - h["header_size"] - TRAILER_SIZE
    if "zstd" in spec:
        raw_size = len(wire.plain_body(payload))
        assert h["raw_size"] == raw_size
        assert payload[14 : h["header_size"]] == wire.varint(raw_size)  # minimal raw_body_size varint
        assert payload[h["header_size"] : h["header_size"] + 4] == b"\x28\xb5\x2f\xfd"  # zstd frame magic
    else:
        assert h["header_size"] == 14  # no raw_body_size field
        assert h["raw_size"] == stored
    body = wire.plain_body(payload)
    assert body[: 1 + len(spec)] == wire.varint(len(spec)) + spec.encode()
    assert wire.read_prefix(body)[:2] == (spec, 5)  # spec text, tensor count
    assert struct.unpack("<I", payload[-4:])[0] == wire.crc32c(payload[:-4])


def _patched(payload: bytes, wire, offset: int, data: bytes) -> bytes:
    out = bytearray(payload)
    out[offset : offset + len(data)] = data
    return wire.fix_crc(bytes(out))


@pytest.mark.parametrize("version", [0, 3, 255])
def test_unknown_version(version: int, wire) -> None:
    payload = fp.Codec("q8").encode(sample_update(), seed=1)
    with pytest.raises(fp.DecodeError, match=rf"(?i)version.*\b{version}\b|\b{version}\b.*version"):
        fp.decode(_patched(payload, wire, 4, bytes([version])))


@pytest.mark.parametrize("spec", ["q8", "q8+zstd"])
@pytest.mark.parametrize("flags", [0x04, 0x80, 0xFC, 0xFE])
def test_unknown_flags(flags: int, spec: str, wire) -> None:
    """Header flag bits 2-7 are reserved and must be zero, with or without the zstd bit
    (bit 1, TABLE_DIGEST, is tests/test_table_digest.py's)."""
    payload = fp.Codec(spec).encode(sample_update(), seed=1)
    with pytest.raises(fp.DecodeError, match=r"(?i)flag"):
        fp.decode(_patched(payload, wire, 5, bytes([flags | payload[5]])))


@pytest.mark.parametrize("magic", [b"FPRT", b"\0\0\0\0", b"fprs", b"\x28\xb5\x2f\xfd"])
def test_bad_magic(magic: bytes, wire) -> None:
    payload = fp.Codec("q8").encode(sample_update(), seed=1)
    with pytest.raises(fp.DecodeError, match=r"(?i)magic"):
        fp.decode(_patched(payload, wire, 0, magic))


def test_zstd_flag_without_zstd_body(wire) -> None:
    payload = fp.Codec("q8").encode(sample_update(), seed=1)
    with pytest.raises(fp.DecodeError):
        fp.decode(_patched(payload, wire, 5, b"\x01"))
    zpayload = fp.Codec("q8+zstd").encode(sample_update(), seed=1)
    with pytest.raises(fp.DecodeError):
        fp.decode(_patched(zpayload, wire, 5, b"\x00"))


def test_checksum_mismatch_is_named() -> None:
    payload = bytearray(fp.Codec("q8").encode(sample_update(), seed=1))
    payload[-1] ^= 1
    with pytest.raises(fp.DecodeError, match=r"(?i)checksum|crc"):
        fp.decode(bytes(payload))


def test_decode_error_is_a_value_error() -> None:
    assert issubclass(fp.DecodeError, ValueError)
    with pytest.raises(ValueError):
        fp.decode(b"not a payload at all, clearly not")


# ------------------------------------------------------------ trailing bytes --
@pytest.mark.parametrize("extra", [b"\0", b"\0" * 4, b"FPRS", b"x" * 100])
def test_trailing_bytes_after_the_payload(extra: bytes) -> None:
    payload = fp.Codec("topk:0.1+q4").encode(sample_update(), seed=1)
    with pytest.raises(fp.DecodeError):
        fp.decode(payload + extra)
    with pytest.raises(fp.DecodeError):
        fp.decode(payload + payload)


@pytest.mark.parametrize("spec", ["q8", "q8+zstd"])
def test_trailing_bytes_inside_the_body(spec: str, wire) -> None:
    """A body with bytes after its last section, with sizes and checksum all consistent."""
    payload = fp.Codec(spec).encode(sample_update(), seed=1)
    body = wire.plain_body(payload)
    assert fp.decode(wire.rebuild(payload, body))  # the rebuild itself is sound
    with pytest.raises(fp.DecodeError, match=r"(?i)trailing"):
        fp.decode(wire.rebuild(payload, body + b"\0"))
    with pytest.raises(fp.DecodeError):
        fp.decode(wire.rebuild(payload, body[:-1]))


# ------------------------------------------------------------------- limits --
def test_limits_defaults() -> None:
    lim = fp.Limits()
    for field in (
        "max_tensors",
        "max_dims",
        "max_elements",
        "max_total_elements",
        "max_decoded_bytes",
        "max_body_bytes",
    ):
        assert isinstance(getattr(lim, field), int) and getattr(lim, field) > 0


def _limit_cases():
    update = sample_update()
    n_tensors = len(update)
    ndim = max(x.ndim for x in update.values())
    max_elems = max(x.size for x in update.values())
    total = sum(x.size for x in update.values())
    out_bytes = sum(x.nbytes for x in update.values())
    return [
        ("max_tensors", n_tensors),
        ("max_dims", ndim),
        ("max_elements", max_elems),
        ("max_total_elements", total),
        ("max_decoded_bytes", out_bytes),
    ]


@pytest.mark.parametrize("spec", ["fp32", "topk:0.05+q4+zstd", "randk:0.1+q8"])
@pytest.mark.parametrize("field, needed", _limit_cases())
def test_limits_refuse_beyond_and_accept_at(spec: str, field: str, needed: int) -> None:
    payload = fp.Codec(spec).encode(sample_update(), seed=3)
    # exactly at the limit: fine
    kw = {field: needed}
    if field == "max_elements":
        kw["max_total_elements"] = 10**9
    assert set(fp.decode(payload, limits=fp.Limits(**kw))) == set(sample_update())
    kw[field] = needed - 1
    with pytest.raises(fp.DecodeError) as exc:
        fp.decode(payload, limits=fp.Limits(**kw))
    assert str(needed - 1) in str(exc.value), f"{field}: message does not mention the limit: {exc.value}"
    with pytest.raises(fp.DecodeError):
        fp.inspect(payload, limits=fp.Limits(**kw))


@pytest.mark.parametrize("spec", ["q8", "q8+zstd", "topk:0.05+q4+zstd"])
def test_limit_max_body_bytes(spec: str, wire) -> None:
    payload = fp.Codec(spec).encode(sample_update(), seed=3)
    raw_size = wire.header(payload)["raw_size"]
    assert fp.decode(payload, limits=fp.Limits(max_body_bytes=raw_size))
    with pytest.raises(fp.DecodeError) as exc:
        fp.decode(payload, limits=fp.Limits(max_body_bytes=raw_size - 1))
    assert str(raw_size - 1) in str(exc.value)


def test_limits_refuse_before_allocating(wire, memory_cap) -> None:
    """A 40-byte sparse payload that would decode to 8 GiB: refused by each limit
    without allocating (the address space is capped at +2 GiB while decoding)."""
    big = wire.tensor("huge", "float32", (1 << 31,), wire.SEEDED, values="fp32", count=0)
    small = wire.tensor("small", "float32", (1 << 30,), wire.SEEDED, values="fp32", count=0)
    payload = wire.wrap(wire.body([big]))
    pair = wire.wrap(wire.body([small, wire.tensor("other", "float32", (1 << 30,), wire.SEEDED, count=0)]))
    cases = [
        (payload, fp.Limits(max_elements=1 << 20), 1 << 20),
        (payload, fp.Limits(max_decoded_bytes=1 << 24), 1 << 24),
        (payload, fp.Limits(max_total_elements=1 << 22), 1 << 22),
        (pair, fp.Limits(max_total_elements=(1 << 30) + 5), (1 << 30) + 5),
        (pair, fp.Limits(max_decoded_bytes=1 << 32), 1 << 32),
    ]
    for data, limits, value in cases:
        with memory_cap():
            with pytest.raises(fp.DecodeError) as exc:
                fp.decode(data, limits=limits)
        assert str(value) in str(exc.value)


def test_limits_apply_to_the_aggregator() -> None:
    payload = fp.Codec("q8").encode(sample_update(), seed=3)
    agg = fp.Aggregator(limits=fp.Limits(max_tensors=2))
    with pytest.raises(fp.DecodeError):
        agg.add(payload)
    assert agg.count == 0


# ------------------------------------------------------------------- golden --
@pytest.mark.parametrize("version", GOLDEN.VERSIONS)
@pytest.mark.parametrize("spec", GOLDEN.SPECS)
def test_golden_payload_decodes_to_stored_arrays(spec: str, version: int) -> None:
    """Every version a decoder reads: version 1's files were written by the Golomb writer."""
    stem = GOLDEN.file_stem(spec, version=version)
    payload = (DATA / f"{stem}.bin").read_bytes()
    with np.load(DATA / f"{stem}.npz") as expected:
        expected = dict(expected)
    got = fp.decode(payload)
    assert list(got) == list(GOLDEN.golden_input())
    assert set(got) == set(expected)
    for name, arr in expected.items():
        assert got[name].dtype == arr.dtype and got[name].shape == arr.shape, name
        np.testing.assert_array_equal(got[name], arr, err_msg=name)
    info = fp.inspect(payload)
    assert info["codec"] == str(fp.parse_spec(spec))
    assert info["seed"] == GOLDEN.SEED and info["format_version"] == version


@pytest.mark.parametrize("spec", GOLDEN.SPECS)
def test_golden_payload_reencodes_byte_for_byte(spec: str) -> None:
    payload = (DATA / f"{GOLDEN.file_stem(spec)}.bin").read_bytes()
    again = fp.Codec(spec).encode(GOLDEN.golden_input(), seed=GOLDEN.SEED)
    assert again == payload, (
        f"{spec}: the encoder's output changed ({len(again)} bytes, golden {len(payload)}); a format "
        "change needs a new version, or regenerate with python tests/data/make_golden.py on purpose"
    )


def test_golden_files_are_small() -> None:
    assert sum(p.stat().st_size for p in DATA.iterdir() if p.is_file()) < 100_000 * len(GOLDEN.VERSIONS)
