"""Payloads without their tensor table (Codec(table="digest"), header flag
TABLE_DIGEST): fp.table_digest against the serialisation docs/format.md
defines, round trips equal to the inline payload's, the Encoder and the
Aggregator with them, the errors for a missing or different table, and the
golden payload. (Truncations and byte flips: tests/test_payload_fuzz.py's
"/table=digest" variants.)"""

from __future__ import annotations

import hashlib
import pathlib
import re

import fedpress as fp
import numpy as np
import pytest
from conftest import Wire, leb128, load_make_golden
from fedpress.cli import main as cli_main
from fedpress.format import payload_table_digest
from hypothesis import given
from hypothesis import strategies as st

DATA = pathlib.Path(__file__).resolve().parent / "data"
DTYPES = Wire.DTYPES  # the wire codes, docs/format.md, as the hand-built payloads use them
SPECS = [
    "fp32",
    "q8+zstd",
    "topk:0.01+q4+zstd",
    "randk:0.1+fp16",
    "eden4",
    "topk:0.1+eden2:mse",
    "sign",
    "thresh:0.05+q8",
]


def reference_digest(entries: list) -> bytes:
    """docs/format.md, "Table digest": the first 8 bytes of SHA-256 over the table
    image, n varint, then per tensor name_len varint, name, dtype code u8, ndim u8,
    and one varint per dimension."""
    image = leb128(len(entries))
    for name, dtype, shape in entries:
        raw = name.encode("utf-8")
        image += leb128(len(raw)) + raw + bytes((DTYPES.index(dtype), len(shape)))
        image += b"".join(leb128(d) for d in shape)
    return hashlib.sha256(image).digest()[:8]


def entries_of(update: dict) -> list:
    return [(name, a.dtype.name, a.shape) for name, a in update.items()]


def head_bytes(entries: list) -> int:
    """Bytes of the first five fields of every inline entry (what a compact entry omits)."""
    return sum(
        len(leb128(len(n.encode()))) + len(n.encode()) + 2 + sum(len(leb128(d)) for d in s) for n, _, s in entries
    )


def mixed_update(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "features.conv1.weight": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
        "features.conv1.bias": rng.standard_normal(8).astype(np.float32),
        "classifier.fc.weight": rng.standard_normal((10, 72)),  # float64
        "classifier.fc.half": rng.standard_normal((6, 7)).astype(np.float16),
        "scalar.temperature": np.array(rng.standard_normal(), np.float32),  # 0-d
        "buffers.empty": np.zeros((0, 4), np.float32),  # empty
        "buffers.num_batches_tracked": np.array(1234, np.int64),  # 0-d int
        "buffers.counts": rng.integers(-5, 5, size=(3, 2)).astype(np.int64),
        "buffers.mask": rng.random(9) < 0.5,  # bool
    }


def cnn_update(seed: int = 0) -> dict:
    """The 215k-parameter CNN of the brief: conv 16x1x5x5, conv 32x16x5x5, fc 384x512, fc 10x384."""
    rng = np.random.default_rng(seed)
    shapes = {
        "conv1.weight": (16, 1, 5, 5),
        "conv1.bias": (16,),
        "conv2.weight": (32, 16, 5, 5),
        "conv2.bias": (32,),
        "fc1.weight": (384, 512),
        "fc1.bias": (384,),
        "fc2.weight": (10, 384),
        "fc2.bias": (10,),
    }
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def assert_same_update(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)
    for name, arr in expected.items():
        assert got[name].dtype == arr.dtype and got[name].shape == arr.shape, name
        np.testing.assert_array_equal(got[name], arr, err_msg=name)


# ------------------------------------------------------------------ digest --
def test_table_digest_follows_the_documented_serialisation() -> None:
    update = mixed_update()
    entries = entries_of(update)
    assert fp.table_digest(update) == reference_digest(entries)
    assert fp.table_digest(entries) == reference_digest(entries)
    assert fp.table_digest([(n, d, list(s)) for n, d, s in entries]) == reference_digest(entries)
    assert len(fp.table_digest(update)) == 8
    assert fp.table_digest({}) == fp.table_digest([]) == hashlib.sha256(b"\x00").digest()[:8]
    # multi-byte varints: a long name and large dimensions
    long = [("x" * 200, "float32", (70000, 3)), ("ünïcode", "uint8", ())]
    assert fp.table_digest(long) == reference_digest(long)


def test_table_digest_is_order_sensitive_and_names_every_field() -> None:
    update = mixed_update()
    entries = entries_of(update)
    digest = fp.table_digest(entries)
    variants = {
        "reordered": list(reversed(entries)),
        "swapped two": [entries[1], entries[0]] + entries[2:],
        "renamed": [("features.conv1.weights",) + entries[0][1:]] + entries[1:],
        "reshaped": [entries[0][:2] + ((8, 27),)] + entries[1:],
        "retyped": [(entries[0][0], "float64", entries[0][2])] + entries[1:],
        "extra dimension": [entries[0][:2] + (entries[0][2] + (1,),)] + entries[1:],
        "one fewer": entries[:-1],
    }
    seen = {digest}
    for what, other in variants.items():
        d = fp.table_digest(other)
        assert d == reference_digest(other), what
        assert d not in seen, what
        seen.add(d)


names = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
tensors = st.tuples(
    st.sampled_from(["float32", "float16", "float64", "int32", "uint8", "bool"]),
    st.lists(st.integers(0, 6), max_size=3),
)
tables = st.dictionaries(names, tensors, max_size=5)


def update_of(table: dict, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        name: (rng.standard_normal(shape) * 3 if dtype.startswith("float") else rng.integers(0, 2, shape)).astype(dtype)
        for name, (dtype, shape) in table.items()
    }


@given(table=tables, spec=st.sampled_from(SPECS), seed=st.integers(0, 2**32 - 1))
def test_random_tables_round_trip_and_digest(table: dict, spec: str, seed: int) -> None:
    update = update_of(table, seed)
    entries = entries_of(update)
    assert fp.table_digest(update) == fp.table_digest(entries) == reference_digest(entries)
    inline = fp.Codec(spec).encode(update, seed=seed)
    digest = fp.Codec(spec, table="digest").encode(update, seed=seed)
    assert_same_update(fp.decode(digest, table=entries), fp.decode(inline))
    if "zstd" not in spec:
        assert len(digest) - len(inline) == 8 - head_bytes(entries)


def test_table_digest_of_torch_tensors() -> None:
    torch = pytest.importorskip("torch")
    model = {
        "w": torch.zeros(3, 4, dtype=torch.bfloat16),
        "b": torch.zeros(4, dtype=torch.float16),
        "n": torch.tensor(7, dtype=torch.int64),
        "m": torch.zeros(2, dtype=torch.bool),
    }
    expected = [("w", "bfloat16", (3, 4)), ("b", "float16", (4,)), ("n", "int64", ()), ("m", "bool", (2,))]
    assert fp.table_digest(model) == reference_digest(expected)


@pytest.mark.parametrize(
    "table, error, match",
    [
        ([("a", "float32", (2,)), ("a", "float32", (2,))], ValueError, "twice"),
        ([("a", "complex64", (2,))], ValueError, "complex64"),
        ({"a": np.zeros(2, np.complex64)}, ValueError, "complex64"),
        ([("a", "float32", (-1,))], ValueError, "shape"),
        ([("a", "float32", (2.5,))], TypeError, "shape"),
        ([("a", "float32")], TypeError, "entry 0"),
        ([(1, "float32", (2,))], TypeError, "names"),
        ("float32", TypeError, "mapping"),
        (None, TypeError, "mapping"),
    ],
)
def test_bad_tables_are_refused(table, error, match: str) -> None:
    with pytest.raises(error, match=match):
        fp.table_digest(table)


# ------------------------------------------------------------- round trips --
@pytest.mark.parametrize("spec", SPECS)
def test_round_trip_equals_the_inline_payload(spec: str) -> None:
    update = mixed_update()
    inline = fp.Codec(spec).encode(update, seed=11)
    digest = fp.Codec(spec, table="digest").encode(update, seed=11)
    expected = fp.decode(inline)
    assert_same_update(fp.decode(digest, table=update), expected)
    assert_same_update(fp.decode(digest, table=entries_of(update)), expected)
    # the receiver's own model, with other values, is the same table
    assert_same_update(fp.decode(digest, table=mixed_update(seed=5)), expected)
    assert len(digest) < len(inline)
    if "zstd" not in spec:  # exactly the entries' first fields, less the 8-byte digest
        assert len(inline) - len(digest) == head_bytes(entries_of(update)) - 8
    info, ref = fp.inspect(digest, table=update), fp.inspect(inline)
    assert info["table"] == "digest" and ref["table"] == "inline"
    assert info["table_digest"] == ref["table_digest"] == fp.table_digest(update).hex()
    assert info["tensors"] == ref["tensors"] and info["payload_bytes"] == len(digest)
    assert payload_table_digest(digest) == fp.table_digest(update)
    assert payload_table_digest(inline) is None


def test_round_trip_with_bfloat16_from_torch() -> None:
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(3)
    update = {
        "emb": torch.randn(40, 8, generator=gen).to(torch.bfloat16),
        "bias": torch.randn(8, generator=gen),
        "steps": torch.tensor([3, 4], dtype=torch.int64),
    }
    for spec in ("fp32", "topk:0.1+q4+zstd", "bf16"):
        inline = fp.Codec(spec).encode(update, seed=2)
        digest = fp.Codec(spec, table="digest").encode(update, seed=2)
        assert_same_update(fp.decode(digest, table=update), fp.decode(inline))
        assert fp.decode(digest, table=update)["emb"].dtype == np.float32
        assert fp.inspect(digest, table=update)["tensors"][0]["dtype"] == "bfloat16"
        with pytest.raises(fp.DecodeError, match="does not match"):
            fp.decode(digest, table={**update, "emb": update["emb"].float()})  # float32 is another table


def test_the_brief_cnn_saves_its_table() -> None:
    update = cnn_update()
    entries = entries_of(update)
    for spec in ("topk:0.001+q4", "topk:0.001+q4+zstd", "fp32"):
        inline = fp.Codec(spec).encode(update, seed=1)
        digest = fp.Codec(spec, table="digest").encode(update, seed=1)
        assert len(digest) < len(inline), spec
        if "zstd" not in spec:
            assert len(inline) - len(digest) == head_bytes(entries) - 8
        assert_same_update(fp.decode(digest, table=update), fp.decode(inline))


def test_a_one_tensor_payload_grows_by_the_digest_less_its_head() -> None:
    update = {"w": np.array([1.0, -2.0], np.float32)}
    inline = fp.Codec("fp32").encode(update, seed=7)
    digest = fp.Codec("fp32", table="digest").encode(update, seed=7)
    assert len(digest) - len(inline) == 8 - head_bytes(entries_of(update)) == 3


def test_table_option_is_validated() -> None:
    for bad in ("Digest", "none", "", None, True):
        with pytest.raises(ValueError, match="'inline', 'digest'"):
            fp.Codec("fp32", table=bad)
        with pytest.raises(ValueError, match="'inline', 'digest'"):
            fp.Encoder("fp32", table=bad)
    assert "table='digest'" in repr(fp.Codec("fp32", table="digest"))
    assert fp.Codec("fp32").table == "inline"


def test_inline_payloads_are_unchanged_by_the_default() -> None:
    update = mixed_update()
    for spec in SPECS:
        assert fp.Codec(spec).encode(update, seed=4) == fp.Codec(spec, table="inline").encode(update, seed=4)
        assert fp.Codec(spec).encode(update, seed=4)[5] & 0x02 == 0


# ----------------------------------------------------------------- encoder --
@pytest.mark.parametrize(
    "spec, momentum",
    [("topk:0.05+q4", None), ("topk:0.02+q8+zstd", 0.9), ("randk:0.1+fp16", None), ("eden2:mse", None)],
)
def test_encoder_error_feedback_is_the_same_without_the_table(spec: str, momentum) -> None:
    inline = fp.Encoder(spec, momentum=momentum)
    digest = fp.Encoder(spec, momentum=momentum, table="digest")
    for rnd in range(3):
        update = mixed_update(seed=rnd)
        p_inline = inline.encode(update, seed=rnd)
        p_digest = digest.encode(update, seed=rnd)
        assert p_digest[5] & 0x02 and not p_inline[5] & 0x02
        assert_same_update(fp.decode(p_digest, table=update), fp.decode(p_inline))
        assert set(digest.residuals) == set(inline.residuals) and digest.residuals
        for name, r in inline.residuals.items():
            np.testing.assert_array_equal(digest.residuals[name], r, err_msg=name)
        for name, v in inline.velocities.items():
            np.testing.assert_array_equal(digest.velocities[name], v, err_msg=name)


# -------------------------------------------------------------- aggregator --
def test_aggregator_sums_digest_payloads_like_inline_ones() -> None:
    model = mixed_update(seed=99)
    weights = [1.0, 2.5, 0.5]
    for spec in ("topk:0.01+q4+zstd", "eden4:shared", "fp32"):
        kw = {"rotation_seed": 77} if "shared" in spec else {}
        inline = [fp.Codec(spec).encode(mixed_update(i), seed=i, **kw) for i in range(3)]
        digest = [fp.Codec(spec, table="digest").encode(mixed_update(i), seed=i, **kw) for i in range(3)]
        ref, agg = fp.Aggregator(), fp.Aggregator(table=model)
        for pi, pd, w in zip(inline, digest, weights):
            ref.add(pi, w)
            agg.add(pd, w)
        assert_same_update(agg.result(), ref.result())
        # learned from a first inline payload, then digest payloads that match it
        learner = fp.Aggregator()
        learner.add(inline[0], weights[0])
        for pd, w in zip(digest[1:], weights[1:]):
            learner.add(pd, w)
        assert_same_update(learner.result(), ref.result())


def test_aggregator_keeps_its_table_across_rounds_and_merges() -> None:
    model = mixed_update(seed=99)
    payloads = [fp.Codec("topk:0.05+q8", table="digest").encode(mixed_update(i), seed=i) for i in range(4)]
    agg = fp.Aggregator(table=entries_of(model))
    agg.add(payloads[0])
    agg.result(copy=False)  # empties the aggregator (reset): the given table stays
    a, b = fp.Aggregator(table=model), fp.Aggregator(table=model)
    for p in payloads[:2]:
        a.add(p)
        agg.add(p)
    for p in payloads[2:]:
        b.add(p)
        agg.add(p)
    empty = fp.Aggregator(table=model)
    empty.merge(a)
    empty.merge(b)
    merged, whole = empty.result(), agg.result()
    assert list(merged) == list(whole) and empty.count == agg.count == 4
    for name, arr in whole.items():  # sums added in another order: equal up to rounding
        assert merged[name].dtype == arr.dtype and merged[name].shape == arr.shape, name
        np.testing.assert_allclose(
            merged[name].astype(np.float64), arr.astype(np.float64), rtol=1e-5, atol=1e-6, err_msg=name
        )
    other = fp.Aggregator()
    other.add(fp.Codec("fp32").encode({"x": np.ones(3, np.float32)}, seed=0))
    with pytest.raises(fp.DecodeError, match="receiver's model"):
        fp.Aggregator(table=model).merge(other)


def test_aggregator_refuses_what_it_cannot_read_and_keeps_its_sums() -> None:
    update = mixed_update()
    digest = fp.Codec("topk:0.05+q4", table="digest").encode(update, seed=1)
    agg = fp.Aggregator()
    with pytest.raises(fp.DecodeError, match="omits its tensor table"):
        agg.add(digest)
    assert agg.count == 0
    agg = fp.Aggregator(table=update)
    agg.add(digest, 2.0)
    before = agg.result()
    renamed = {("x" if k == "buffers.mask" else k): v for k, v in update.items()}
    for bad in (
        fp.Codec("topk:0.05+q4", table="digest").encode(renamed, seed=2),
        fp.Codec("topk:0.05+q4").encode(renamed, seed=2),
    ):
        with pytest.raises(fp.DecodeError, match="receiver's model"):
            agg.add(bad)
    assert agg.count == 1 and agg.total_weight == 2.0
    assert_same_update(agg.result(), before)


# ------------------------------------------------------------------ errors --
def test_decoding_without_a_table_names_the_digest() -> None:
    update = mixed_update()
    payload = fp.Codec("q8+zstd", table="digest").encode(update, seed=1)
    hexdigest = fp.table_digest(update).hex()
    for call in (fp.decode, fp.inspect):
        with pytest.raises(fp.DecodeError, match=rf"omits its tensor table \(digest 0x{hexdigest}\).*table="):
            call(payload)


def _mismatched_tables(update: dict) -> dict:
    names = list(update)
    return {
        "renamed": {("features.conv1.w" if k == names[0] else k): v for k, v in update.items()},
        "reshaped": dict(update, **{names[0]: update[names[0]].reshape(8, 27)}),
        "retyped": dict(update, **{names[1]: update[names[1]].astype(np.float64)}),
        "int retyped": dict(update, **{"buffers.counts": update["buffers.counts"].astype(np.int32)}),
        "reordered": dict(reversed(list(update.items()))),
        "missing": {k: v for k, v in update.items() if k != "buffers.mask"},
        "extra": dict(update, more=np.zeros(3, np.float32)),
    }


@pytest.mark.parametrize("which", list(_mismatched_tables(mixed_update())))
def test_a_different_table_is_refused(which: str) -> None:
    update = mixed_update()
    other = _mismatched_tables(update)[which]
    digest = fp.Codec("topk:0.1+q4", table="digest").encode(update, seed=1)
    mine, theirs = fp.table_digest(update).hex(), fp.table_digest(other).hex()
    for call in (fp.decode, fp.inspect):
        with pytest.raises(
            fp.DecodeError,
            match=rf"tensor table digest 0x{mine} does not match the receiver's "
            rf"model \(0x{theirs}\)",
        ):
            call(digest, table=other)
    # an inline payload checked against a table names the first difference
    inline = fp.Codec("topk:0.1+q4").encode(update, seed=1)
    with pytest.raises(fp.DecodeError, match=r"tensor table differs from the receiver's model: "):
        fp.decode(inline, table=other)


def test_inline_payload_against_a_table_names_the_tensor() -> None:
    update = {"a": np.zeros(3, np.float32), "b": np.zeros((2, 2), np.float32)}
    inline = fp.Codec("fp32").encode(update, seed=1)
    assert_same_update(fp.decode(inline, table=update), fp.decode(inline))
    with pytest.raises(fp.DecodeError, match=re.escape("'b' float32 (2, 2), expected 'b' float32 (4,)")):
        fp.decode(inline, table={"a": np.zeros(3, np.float32), "b": np.zeros(4, np.float32)})
    with pytest.raises(fp.DecodeError, match="2 tensors, expected 1"):
        fp.decode(inline, table={"a": np.zeros(3, np.float32)})


def _compact_body(W, spec: str, digest: bytes, n: int, entries: list, sections: bytes = b"") -> bytes:
    """A plain body in the TABLE_DIGEST layout (docs/format.md): spec, digest, n_tensors,
    compact entries (kind, value code, flags, count, bucket, rht_block, index_len, values_len)."""
    out = leb128(len(spec)) + spec.encode() + digest + leb128(n)
    for kind, vcode, flags, *varints in entries:
        out += bytes((kind, vcode, flags)) + b"".join(leb128(v) for v in varints)
    return out + sections


def test_hand_built_compact_body_decodes(wire) -> None:
    """The layout of docs/format.md, written by hand, is what the library reads."""
    table = [("w", "float32", (2,)), ("n", "int64", (2,))]
    values = np.array([1.5, -2.0], "<f4").tobytes()
    ints = np.array([3, -4], "<i8").tobytes()
    body = _compact_body(
        wire, "fp32", reference_digest(table), 2, [(1, 0, 0, 2, 0, 0, 0, 8), (0, 255, 0, 2, 0, 0, 0, 16)], values + ints
    )
    payload = wire.wrap(body, flags=0x02, seed=7)
    out = fp.decode(payload, table=table)
    np.testing.assert_array_equal(out["w"], [1.5, -2.0])
    np.testing.assert_array_equal(out["n"], [3, -4])
    assert payload == fp.Codec("fp32", table="digest").encode(
        {"w": np.array([1.5, -2.0], np.float32), "n": np.array([3, -4], np.int64)}, seed=7
    )


HOSTILE_COMPACT = {
    # what -> (n_tensors, compact entries, sections, match)
    "tensor count differs": (3, [(1, 0, 0, 2, 0, 0, 0, 8)] * 3, b"\0" * 24, "tensor count 3 differs"),
    "tensor count 2^32-1": (2**32 - 1, [], b"", r"tensor count 4294967295 (differs|exceeds)"),
    "entries cut short": (2, [], b"\0" * 10, "cannot fit in the 10 bytes"),
    "dense count above the known size": (
        2,
        [(1, 0, 0, 3, 0, 0, 0, 12), (0, 255, 0, 2, 0, 0, 0, 16)],
        b"\0" * 28,
        "dense count 3 differs from the shape's 2",
    ),
    "raw count of another shape": (
        2,
        [(1, 0, 0, 2, 0, 0, 0, 8), (0, 255, 0, 3, 0, 0, 0, 24)],
        b"\0" * 32,
        "raw count 3 differs",
    ),
    "raw bytes of another dtype": (
        2,
        [(1, 0, 0, 2, 0, 0, 0, 8), (0, 255, 0, 2, 0, 0, 0, 8)],
        b"\0" * 16,
        "raw section of 8 bytes, expected 16",
    ),
    "compressing the int tensor": (
        2,
        [(1, 0, 0, 2, 0, 0, 0, 8), (1, 0, 0, 2, 0, 0, 0, 8)],
        b"\0" * 16,
        "int64 can only travel raw",
    ),
    "values length 2^64-1": (
        2,
        [(1, 0, 0, 2, 0, 0, 0, 2**64 - 1), (0, 255, 0, 2, 0, 0, 0, 16)],
        b"\0" * 24,
        "values section",
    ),
    "sections missing": (2, [(1, 0, 0, 2, 0, 0, 0, 8), (0, 255, 0, 2, 0, 0, 0, 16)], b"\0" * 8, "truncated"),
    "trailing bytes": (2, [(1, 0, 0, 2, 0, 0, 0, 8), (0, 255, 0, 2, 0, 0, 0, 16)], b"\0" * 25, "trailing"),
}


@pytest.mark.parametrize("what", list(HOSTILE_COMPACT))
def test_hostile_compact_tables_raise_decode_error(what: str, wire, memory_cap) -> None:
    table = [("w", "float32", (2,)), ("n", "int64", (2,))]
    n, entries, sections, match = HOSTILE_COMPACT[what]
    payload = wire.wrap(_compact_body(wire, "fp32", reference_digest(table), n, entries, sections), flags=0x02)
    agg = fp.Aggregator(table=table)
    with memory_cap():
        for call in (fp.decode, fp.inspect):
            with pytest.raises(fp.DecodeError, match=match):
                call(payload, table=table)
            with pytest.raises(fp.DecodeError, match="omits its tensor table"):
                call(payload)
        with pytest.raises(fp.DecodeError, match=match):
            agg.add(payload)
    assert agg.count == 0


@pytest.mark.parametrize(
    "limits, match",
    [
        (fp.Limits(max_tensors=8), "tensor count 9 exceeds the limit of 8"),
        (fp.Limits(max_dims=3), "4 dimensions exceed the limit of 3"),
        (fp.Limits(max_elements=200), "exceeds the limit of 200 elements"),
        (fp.Limits(max_total_elements=300), "more than 300 elements"),
        (fp.Limits(max_decoded_bytes=1000), "more than 1000 bytes"),
        (fp.Limits(max_body_bytes=100), "exceeds the limit of 100"),
    ],
)
def test_limits_apply_to_the_receivers_table(limits: fp.Limits, match: str) -> None:
    update = mixed_update()
    for table in ("inline", "digest"):
        payload = fp.Codec("q8", table=table).encode(update, seed=1)
        assert fp.decode(payload, table=update)
        with pytest.raises(fp.DecodeError, match=match):
            fp.decode(payload, limits=limits, table=update)
        with pytest.raises(fp.DecodeError, match=match):
            fp.Aggregator(limits=limits, table=update).add(payload)


def test_the_digest_flag_on_an_inline_payload_is_refused(wire) -> None:
    update = mixed_update()
    inline = fp.Codec("q8").encode(update, seed=1)
    flagged = wire.fix_crc(inline[:5] + bytes([inline[5] | 0x02]) + inline[6:])
    with pytest.raises(fp.DecodeError, match="omits its tensor table"):
        fp.decode(flagged)
    with pytest.raises(fp.DecodeError, match="does not match the receiver's model"):
        fp.decode(flagged, table=update)


def test_cli_inspect_of_a_digest_payload(tmp_path, capsys) -> None:
    update = cnn_update()
    path = tmp_path / "update.fprs"
    path.write_bytes(fp.Codec("topk:0.001+q4+zstd", table="digest").encode(update, seed=1))
    assert cli_main(["inspect", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err
    assert "omits its tensor table" in lines[0] and fp.table_digest(update).hex() in lines[0]


# ------------------------------------------------------------------ golden --
GOLDEN = load_make_golden()


@pytest.mark.parametrize("spec", GOLDEN.DIGEST_SPECS)
def test_golden_digest_payload(spec: str) -> None:
    stem = GOLDEN.file_stem(spec, "digest")
    payload = (DATA / f"{stem}.bin").read_bytes()
    update = GOLDEN.golden_input()
    with np.load(DATA / f"{stem}.npz") as expected:
        expected = {name: expected[name] for name in update}
    assert_same_update(fp.decode(payload, table=update), expected)
    assert payload[5] & 0x02
    assert payload_table_digest(payload) == reference_digest(entries_of(update))
    # the same update, inline, decodes to the same arrays
    assert_same_update(fp.decode(fp.Codec(spec).encode(update, seed=GOLDEN.SEED)), expected)
    again = fp.Codec(spec, table="digest").encode(update, seed=GOLDEN.SEED)
    assert again == payload, (
        f"{spec}: the encoder's output without its table changed ({len(again)} bytes, golden {len(payload)}); "
        "a format change needs a new version, or regenerate with python tests/data/make_golden.py on purpose"
    )
