"""A model's many tensors in a few native calls: ``_core.add_streams_each`` (every sparse
tensor's stream added into its own sum in one call), ``format.decoding.index_streams``
(their values decoded and their streams checked in two calls), and the paths built on them
(``decode``, ``Aggregator.add``/``add_many``, the Encoder's residual correction), against
the one-tensor-at-a-time results, with the first bad tensor in order still the one named;
and the checksum that decodes on the way, in sub-pieces, around their boundaries."""

from __future__ import annotations

import multiprocessing

import fedpress as fp
import numpy as np
import pytest
from _payload_helpers import stream_of, with_crc
from conftest import num_threads
from fedpress import _core
from fedpress.format import decoding
from fedpress.format.reader import parse

SUB_PIECE = 64 << 10  # the checksum's sub-pieces (csrc/checksum.cpp, kSubPiece)


def model(rng: np.random.Generator, tensors: int = 40) -> dict[str, np.ndarray]:
    """Tensors of many sizes, a few large enough to be cut into several tasks."""
    sizes = [int(s) for s in rng.integers(1, 5000, tensors)] + [300_007, 70_001]
    return {f"t{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(sizes)}


# ------------------------------------------------------------ add_streams_each --
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_add_streams_each_equals_add_streams_per_group(threads: int) -> None:
    rng = np.random.default_rng(threads)
    groups, expected = [], []
    for n, clients in [(1, 1), (7, 2), (5000, 3), (300_007, 4), (1 << 17, 1), (40, 0)]:
        streams = [stream_of(rng, n, max(1, min(n, n // 50 + 1)))[0] for _ in range(clients)]
        weights = [float(w) for w in rng.uniform(0.5, 2.0, clients)]
        start = rng.standard_normal(n).astype(np.float32)
        want = start.copy()
        _core.add_streams(want, streams, weights)
        groups.append((start, streams, weights))
        expected.append(want)
    with num_threads(threads):
        _core.add_streams_each(groups)
    for (got, _, _), want in zip(groups, expected):
        np.testing.assert_array_equal(got, want)  # the same additions, in the same order


def test_add_streams_each_one_stream_in_many_groups() -> None:
    rng = np.random.default_rng(5)
    stream, idx, values = stream_of(rng, 1000, 30)
    accs = [np.zeros(1000, np.float32) for _ in range(3)]
    _core.add_streams_each([(a, [stream], [w]) for a, w in zip(accs, (1.0, 2.0, -1.0))])
    for a, w in zip(accs, (1.0, 2.0, -1.0)):
        np.testing.assert_array_equal(a[idx], np.float32(w) * values)
        assert np.count_nonzero(a) == idx.size


def test_add_streams_each_refuses_misuse() -> None:
    rng = np.random.default_rng(6)
    stream, _, _ = stream_of(rng, 100, 5)
    deferred, _, _ = stream_of(rng, 100, 5, deferred=True)
    acc = np.zeros(100, np.float32)
    with pytest.raises(ValueError, match="shares memory"):
        _core.add_streams_each([(acc, [stream], [1.0]), (acc, [stream], [1.0])])
    with pytest.raises(ValueError, match="shares memory"):  # two views of one buffer that overlap
        buf = np.zeros(150, np.float32)
        _core.add_streams_each([(buf[:100], [stream], [1.0]), (buf[50:], [stream], [1.0])])
    with pytest.raises(ValueError, match="deferred and was not checked"):
        _core.add_streams_each([(acc, [deferred], [1.0])])
    with pytest.raises(ValueError, match="indexes 100 values, acc holds 99"):
        _core.add_streams_each([(np.zeros(99, np.float32), [stream], [1.0])])
    with pytest.raises(ValueError, match="lengths differ"):
        _core.add_streams_each([(acc, [stream], [1.0, 2.0])])
    with pytest.raises(ValueError, match=r"groups\[0\] must be \(acc, streams, weights\)"):
        _core.add_streams_each([(acc, [stream])])
    with pytest.raises(TypeError):
        _core.add_streams_each([(np.zeros(100, np.float64), [stream], [1.0])])
    with pytest.raises(TypeError):
        _core.add_streams_each([(acc, [None], [1.0])])
    assert not acc.any()  # nothing was added by a refused call
    _core.add_streams_each([])  # nothing to do


# --------------------------------------------------------------- index_streams --
@pytest.mark.parametrize("values", ["fp32", "fp16", "bf16", "q8", "q4", "q2", "sign"])
def test_index_streams_match_index_stream(values: str) -> None:
    rng = np.random.default_rng(7)
    payload = fp.Codec(f"topk:0.02+{values}").encode(model(rng), seed=3)
    parsed = parse(payload)
    records = [rec for rec in parsed.tensors if decoding.streamable(rec)]
    assert len(records) > 30
    made = decoding.index_streams(records)
    assert set(made) == {id(rec) for rec in records}
    for rec in records:
        one, many = np.zeros(rec.size, np.float32), np.zeros(rec.size, np.float32)
        _core.add_streams(one, [decoding.index_stream(rec)], [1.0])
        _core.add_streams(many, [made[id(rec)]], [1.0])
        np.testing.assert_array_equal(one, many)


def corrupt_values_section(payload: bytes, rec, at: int) -> bytes:
    """A copy of an uncompressed payload with byte ``at`` of ``rec``'s values section (a
    record of a deferred parse) set to 0xFF, its checksum fixed."""
    data = bytearray(payload)
    data[rec.value_offset + at] = 0xFF
    return with_crc(data)


def test_the_first_bad_tensor_in_order_is_named() -> None:
    rng = np.random.default_rng(8)
    update = model(rng, tensors=12)
    payload = fp.Codec("topk:0.05+q4").encode(update, seed=1)
    records = parse(payload, defer_checksum=True).tensors  # (value_offset is set by a deferred parse)
    sparse = [rec for rec in records if decoding.streamable(rec)]
    early, late = sparse[2], sparse[7]
    # A negative scale (the first 4 bytes of a q4 section) in the later tensor, a stream
    # holding an index past the tensor's end in the earlier one (its last byte set).
    bad = corrupt_values_section(payload, late, 3)
    data = bytearray(bad)
    data[early.value_offset - 1] = 0xFF
    data[-4:] = _core.crc32c(bytes(data[:-4])).to_bytes(4, "little")
    both = bytes(data)
    for call in (fp.decode, fp.Aggregator().add, lambda p: fp.Aggregator().add_many([p])):
        with pytest.raises(fp.DecodeError, match=f"tensor '{late.name}'"):
            call(bad)
        with pytest.raises(fp.DecodeError, match=f"tensor '{early.name}'"):
            call(both)
    # index_streams leaves out the first failing tensor and the ones after it
    for corrupt, good in ((both, 2), (bad, 7)):
        made = decoding.index_streams([r for r in parse(corrupt).tensors if decoding.streamable(r)])
        assert len(made) == good


# ------------------------------------------------------------- the paths on it --
@pytest.mark.parametrize("values", ["fp32", "fp16", "q4", "sign"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
def test_decode_of_many_sparse_tensors(values: str, dtype: str) -> None:
    rng = np.random.default_rng(9)
    update = {name: t.astype(dtype) for name, t in model(rng, tensors=20).items()}
    payload = fp.Codec(f"topk:0.02+{values}").encode(update, seed=2)
    out = fp.decode(payload)
    parts = decoding.decode_parts(payload)
    for name, t in update.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape
        idx, vals = parts[name]
        want = np.zeros(t.size, np.float32)
        if idx is None:
            want[:] = vals
        else:
            want[idx.astype(np.intp)] = vals
        # the kept values arrive in the tensor's own dtype (float16 ones were rounded to it)
        np.testing.assert_array_equal(out[name].reshape(-1), want.astype(dtype))
        assert np.count_nonzero(out[name]) > 0


def test_aggregator_sums_of_many_sparse_tensors_match_decoding() -> None:
    rng = np.random.default_rng(10)
    codec = fp.Codec("topk:0.03+q4")
    shapes = {name: t.shape for name, t in model(rng, tensors=25).items()}
    payloads = [
        codec.encode({name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}, seed=c)
        for c in range(4)
    ]
    weights = [1.0, 2.0, 0.5, 3.0]
    want: dict[str, np.ndarray] = {}
    for p, w in zip(payloads, weights):
        for name, t in fp.decode(p).items():
            want[name] = want.get(name, np.zeros(t.size, np.float64)) + w * t.reshape(-1).astype(np.float64)
    one_by_one, together = fp.Aggregator(), fp.Aggregator()
    for p, w in zip(payloads, weights):
        one_by_one.add(p, weight=w)
    together.add_many(payloads, weights)
    total = sum(weights)
    for agg in (one_by_one, together):
        got = agg.result()
        for name, t in want.items():
            np.testing.assert_allclose(got[name].reshape(-1), t / total, rtol=1e-5, atol=1e-6)
    a, b = one_by_one.result(), together.result()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])  # the same sums, in the same order


@pytest.mark.parametrize("per_tensor", [False, True])
def test_encoder_correction_is_the_same_below_and_above_the_hand_off(monkeypatch, per_tensor: bool) -> None:
    from fedpress import encoder as encoder_module

    rng = np.random.default_rng(11)
    rounds = [model(rng, tensors=10) for _ in range(3)]
    results = []
    for threshold in (0, 1 << 40):  # every correction on the pool's thread / on the caller's
        monkeypatch.setattr(encoder_module, "_SMALL_CORRECTION", threshold)
        enc = fp.Encoder("topk:0.01+q4+zstd", per_tensor=per_tensor)
        payloads = [enc.encode(update, seed=r) for r, update in enumerate(rounds)]
        results.append((payloads, {name: r.copy() for name, r in enc.residuals.items()}))
    (p0, r0), (p1, r1) = results
    assert p0 == p1
    for name in r0:
        np.testing.assert_array_equal(r0[name], r1[name])


@pytest.mark.parametrize("per_tensor", [False, True])
def test_encoder_residual_is_what_the_receiver_did_not_get(per_tensor: bool) -> None:
    # After each round, bit for bit: residual = (residual before + update) - what the
    # payload decodes to (the kept entries lose their decoded values, the rest nothing).
    rng = np.random.default_rng(11)
    shapes = {name: t.shape for name, t in model(rng, tensors=10).items()}
    rounds = [{name: rng.standard_normal(s).astype(np.float32) for name, s in shapes.items()} for _ in range(3)]
    enc = fp.Encoder("topk:0.01+q4+zstd", per_tensor=per_tensor)
    before = {name: np.zeros_like(t, dtype=np.float32) for name, t in rounds[0].items()}
    for r, update in enumerate(rounds):
        got = fp.decode(enc.encode(update, seed=r))
        for name, t in update.items():
            want = (before[name] + t.astype(np.float32)) - got[name]
            np.testing.assert_array_equal(enc.residuals[name], want, err_msg=f"round {r} {name}")
            before[name] = enc.residuals[name].copy()


def _encode_in_child(queue) -> None:
    update = {"w": np.random.default_rng(0).standard_normal(2_000_000).astype(np.float32)}
    enc = fp.Encoder("topk:0.1+q4")  # 200,000 kept entries: corrected on the pool's thread
    queue.put(len(enc.encode(update, seed=1)))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_a_forked_child_corrects_on_its_own_threads() -> None:
    # The parent's pool exists (and its threads are not in the child) before the fork.
    enc = fp.Encoder("topk:0.1+q4")
    enc.encode({"w": np.random.default_rng(1).standard_normal(2_000_000).astype(np.float32)}, seed=1)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_encode_in_child, args=(queue,))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == 0, "the child hung or failed encoding with error feedback"
    assert queue.get(timeout=5) > 0


# ------------------------------------------------- checksum in sub-pieces --
@pytest.mark.parametrize("code", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("threads", [1, 2])
def test_jobs_around_sub_piece_boundaries(code: str, threads: int) -> None:
    rng = np.random.default_rng(12)
    width = 4 if code == "fp32" else 2
    for start in (SUB_PIECE - 1, SUB_PIECE - width, SUB_PIECE, 3 * SUB_PIECE + 1):
        head = bytes(rng.integers(0, 256, start, dtype=np.uint8))
        n = 5 * SUB_PIECE // width + 3  # across several sub-pieces, ending mid-value of none
        x = rng.standard_normal(n).astype(np.float32)
        body = {"fp32": x.astype("<f4"), "fp16": x.astype("<f2")}.get(code)
        if body is None:
            body = (x.view(np.uint32) >> 16).astype("<u2")
        data = head + body.tobytes() + b"\x01\x02\x03"
        out = np.empty(n, np.float32)
        with num_threads(threads):
            crc, flags = _core.crc32c_decoding(data, [(start, code, n, out)])
        want, finite = _core.decode_floats(body.tobytes(), code, n)
        assert crc == _core.crc32c(data) and flags == [finite]
        np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shift", [0, 1, 3])  # the output's address, in floats past 16-byte alignment
@pytest.mark.parametrize("bad_at", [None, 0, 2_500_001, (1 << 22) + 6])
def test_a_large_fp32_section_is_streamed_out_exactly(threads: int, shift: int, bad_at) -> None:
    """From 2^22 values (csrc/convert.hpp, kStreamingValues) the values go out with
    non-temporal stores and are checked on the input: the same bytes and the same flag."""
    n = (1 << 22) + 7
    rng = np.random.default_rng(13)
    x = rng.standard_normal(n).astype(np.float32)
    if bad_at is not None:
        x[bad_at] = np.inf
    head = bytes(rng.integers(0, 256, 3, dtype=np.uint8))  # values at an odd address
    data = head + x.tobytes() + b"\x07"
    buf = np.empty(n + 8, np.float32)
    start = (-buf.ctypes.data // 4) % 4 + shift  # `shift` floats past a 16-byte boundary
    out = buf[start : start + n]
    with num_threads(threads):
        crc, flags = _core.crc32c_decoding(data, [(len(head), "fp32", n, out)])
    assert crc == _core.crc32c(data) and flags == [bad_at is None]
    assert out.tobytes() == x.tobytes()


@pytest.mark.parametrize("bad", [False, True])
def test_decode_floats_streams_a_large_fp32_section_exactly(bad: bool) -> None:
    n = (1 << 22) + 5
    x = np.random.default_rng(14).standard_normal(n).astype(np.float32)
    if bad:
        x[n - 1] = np.nan
    data = b"\x01" + x.tobytes()  # at an odd address
    buf = np.empty(n + 1, np.float32)
    out, finite = _core.decode_floats(memoryview(data)[1:], "fp32", n, buf[1:])
    assert finite is not bad and out.tobytes() == x.tobytes()


# ----------------------------------------------------------------- the table --
def test_write_table_writes_what_read_table_reads() -> None:
    heads = [b"\x01a\x00\x01\x05", b"\x02bb\x03\x02\x80\x01\x03"]  # (name, dtype code, shape), coded
    rows = [
        (heads[0], 1, 2, 0, 5, 512, 0, 0, 24),
        (heads[1], 2, 0, 1, 1 << 40, 0, 1 << 16, 300, (1 << 64) - 1),
    ]
    table = _core.write_table(b"\x07prefix", rows)
    assert table.startswith(b"\x07prefix")
    end, read = _core.read_table(table, 7, 2, True, 8)
    assert end == len(table)
    assert [row[3:] for row in read] == [row[1:] for row in rows]
    assert [(row[0], row[1], row[2]) for row in read] == [(b"a", 0, (5,)), (b"bb", 3, (128, 3))]
    compact = _core.write_table(b"", [(None, *row[1:]) for row in rows])
    end, read = _core.read_table(compact, 0, 2, False, 8)
    assert end == len(compact) and [row[3:] for row in read] == [row[1:] for row in rows]


def test_write_table_refuses_malformed_rows() -> None:
    with pytest.raises(ValueError, match=r"rows\[0\] must be"):
        _core.write_table(b"", [(None, 1, 2, 3)])
    with pytest.raises(ValueError, match=r"rows\[1\]: a code byte is 256"):
        _core.write_table(b"", [(None, 0, 0, 0, 1, 0, 0, 0, 4), (None, 256, 0, 0, 1, 0, 0, 0, 4)])
    with pytest.raises(ValueError, match=r"rows\[0\]: field 4 is -1, outside \[0, 2\^64\)"):
        _core.write_table(b"", [(None, 1, 0, 0, -1, 0, 0, 0, 4)])
    with pytest.raises(ValueError, match="field 8 is 18446744073709551616"):
        _core.write_table(b"", [(None, 1, 0, 0, 1, 0, 0, 0, 1 << 64)])
    with pytest.raises(TypeError, match="field 5 must be an integer, got float"):
        _core.write_table(b"", [(None, 1, 0, 0, 1, 2.0, 0, 0, 4)])
    with pytest.raises(TypeError, match="a head is bytes or None"):
        _core.write_table(b"", [("name", 1, 0, 0, 1, 0, 0, 0, 4)])


def test_add_many_names_an_earlier_int_mismatch_before_a_later_bad_stream() -> None:
    """What only the aggregator's own int sums refuse (other levels) counts in the order too."""
    rng = np.random.default_rng(15)
    update = {"w": rng.standard_normal(3000).astype(np.float32)}
    agg = fp.Aggregator()
    agg.add(fp.Codec("int4:clip=0.05").encode(update, seed=0))
    other_levels = fp.Codec("int8:clip=0.05").encode(update, seed=1)
    data = bytearray(fp.Codec("topk:0.05").encode(update, seed=2))
    data[-8:-4] = np.float32(np.nan).tobytes()  # the last kept value
    data[-4:] = _core.crc32c(bytes(data[:-4])).to_bytes(4, "little")
    non_finite = bytes(data)
    with pytest.raises(fp.DecodeError, match="payload 0: tensor 'w': int8 .* does not add up"):
        agg.add_many([other_levels, non_finite])
    with pytest.raises(fp.DecodeError, match="payload 0: tensor 'w': values section decodes to non-finite"):
        agg.add_many([non_finite, other_levels])
    with pytest.raises(fp.DecodeError, match="payload 1: tensor 'w': int8 .* does not add up"):
        agg.add_many([fp.Codec("topk:0.05").encode(update, seed=3), other_levels])
    assert agg.count == 1  # nothing added by the refused batches


# --------------------------------------------------------------------- mean_of --
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_add_streams_each_divides_each_range_after_its_last_addition(threads: int) -> None:
    rng = np.random.default_rng(40 + threads)
    groups, expected = [], []
    for n, clients, divisor in [(1, 1, 3.0), (5000, 3, 0.7), (300_007, 4, 7.5), (1 << 17, 2, 1e-3), (40, 0, 2.0)]:
        streams = [stream_of(rng, n, max(1, min(n, n // 50 + 1)))[0] for _ in range(clients)]
        weights = [float(w) for w in rng.uniform(0.5, 2.0, clients)]
        start = rng.standard_normal(n).astype(np.float32)
        want = start.copy()
        _core.add_streams(want, streams, weights)
        _core.divide(want, divisor)
        groups.append((start, streams, weights, divisor))
        expected.append(want)
    undivided = stream_of(rng, 999, 20)[0]
    plain = np.zeros(999, np.float32)
    groups.append((plain, [undivided], [1.0], None))  # None: summed only
    with num_threads(threads):
        _core.add_streams_each(groups)
    for (got, *_), want in zip(groups, expected):
        np.testing.assert_array_equal(got, want)  # the same bits as adding, then dividing
    assert np.count_nonzero(plain) == 20 and plain.max() <= 5  # not divided


@pytest.mark.parametrize("divisor", [0.0, -1.0, float("nan"), float("inf")])
def test_add_streams_each_refuses_a_bad_divisor(divisor: float) -> None:
    stream = stream_of(np.random.default_rng(1), 100, 5)[0]
    acc = np.zeros(100, np.float32)
    with pytest.raises(ValueError, match="divisor must be finite and > 0"):
        _core.add_streams_each([(acc, [stream], [1.0], divisor)])
    assert not acc.any()


MEAN_SPECS = ["topk:0.01", "topk:0.2", "randk:0.05", "topk:0.05+q4", "topk:0.05+sign", "q8", "fp16", "topk:0.05+zstd"]


@pytest.mark.parametrize("spec", MEAN_SPECS)
@pytest.mark.parametrize("before", [0, 1, 3])  # payloads added one by one first
def test_mean_of_is_add_many_then_result(spec: str, before: int) -> None:
    rng = np.random.default_rng(len(spec) + before)
    base = model(rng, 12)
    payloads = [fp.Codec(spec).encode({k: v * rng.standard_normal() for k, v in base.items()}) for _ in range(6)]
    weights = [float(w) for w in rng.uniform(0.1, 3.0, 6)]
    a, b = fp.Aggregator(), fp.Aggregator()
    for p, w in zip(payloads[:before], weights[:before]):
        a.add(p, w)
        b.add(p, w)
    a.add_many(payloads[before:], weights[before:])
    want = a.result(copy=False)
    got = b.mean_of(payloads[before:], weights[before:])
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
        np.testing.assert_array_equal(got[name], want[name])
    assert b.count == 0 and b.total_weight == 0.0  # handed over, as result(copy=False)


def test_mean_of_a_mixed_batch_and_dtypes() -> None:
    """Tensors sent dense by some payloads and sparse by others, float16 and float64 tensors,
    and a float64 aggregator: all as add_many then result."""
    rng = np.random.default_rng(9)
    base = {
        "w": rng.standard_normal(20_000).astype(np.float32),
        "h": rng.standard_normal(3000).astype(np.float16),
        "d": rng.standard_normal(500),
    }
    specs = ["topk:0.05", "fp32", "topk:0.1+q8", "topk:0.05"]
    payloads = [fp.Codec(s).encode({k: v * (i + 1) for k, v in base.items()}) for i, s in enumerate(specs)]
    for dtype in (np.float32, np.float64):
        a, b = fp.Aggregator(dtype), fp.Aggregator(dtype)
        a.add_many(payloads, [1.0, 2.0, 0.5, 1.5])
        want = a.result(copy=False)
        got = b.mean_of(payloads, [1.0, 2.0, 0.5, 1.5])
        for name in want:
            assert got[name].dtype == want[name].dtype
            np.testing.assert_array_equal(got[name], want[name])


def test_mean_of_refuses_before_adding_anything() -> None:
    rng = np.random.default_rng(10)
    base = model(rng, 5)
    payloads = [fp.Codec("topk:0.1").encode({k: v * (i + 1) for k, v in base.items()}) for i in range(4)]
    agg = fp.Aggregator()
    agg.add(payloads[0], 2.0)
    before = {k: v.copy() for k, v in agg.result().items()}

    def unchanged() -> None:
        assert agg.count == 1 and agg.total_weight == 2.0
        for name, value in agg.result().items():
            np.testing.assert_array_equal(value, before[name])

    bad = bytearray(payloads[2])
    bad[len(bad) // 2] ^= 0xFF
    with pytest.raises(fp.DecodeError, match="payload 1: checksum mismatch"):
        agg.mean_of([payloads[1], bytes(bad), payloads[3]])
    unchanged()
    with pytest.raises(ValueError, match="weight 1 must be finite"):
        agg.mean_of(payloads[1:3], [1.0, float("nan")])
    unchanged()
    with pytest.raises(ValueError, match="2 payloads but 1 weights"):
        agg.mean_of(payloads[1:3], [1.0])
    unchanged()
    empty = fp.Aggregator()
    with pytest.raises(ValueError, match="the total weight is zero"):
        empty.mean_of(payloads[1:3], [0.0, 0.0])
    assert empty.count == 0
    with pytest.raises(ValueError, match="no payload was added"):
        empty.mean_of([])
    got = agg.mean_of([])  # nothing more: result(copy=False)
    for name, value in got.items():
        np.testing.assert_array_equal(value, before[name])


def test_mean_of_refuses_masked_sums_before_adding_them() -> None:
    rng = np.random.default_rng(11)
    update = {"w": rng.standard_normal(300).astype(np.float32)}
    codec = fp.Codec("int4:clip=0.01:nmax=8")
    masked = [codec.encode(update, seed=i, rotation_seed=7, mask=lambda c: c) for i in range(2)]
    agg = fp.Aggregator()
    with pytest.raises(ValueError, match="masked by secure aggregation"):
        agg.mean_of(masked)
    assert agg.count == 0 and agg.masked_length == 0
    agg.add_many(masked)  # the way such sums are summed
    assert agg.count == 2


def test_mean_of_divides_streamed_tensors_in_the_adding_pass(monkeypatch) -> None:
    rng = np.random.default_rng(12)
    base = model(rng, 6)
    payloads = [fp.Codec("topk:0.05").encode({k: v * (i + 1) for k, v in base.items()}) for i in range(3)]
    divided: list[int] = []
    real = _core.divide
    monkeypatch.setattr(_core, "divide", lambda acc, d: (divided.append(acc.size), real(acc, d))[1])
    want = fp.Aggregator()
    want.add_many(payloads)
    expected = want.result(copy=False)
    assert len(divided) == len(base)  # a pass each
    divided.clear()
    got = fp.Aggregator().mean_of(payloads)
    assert divided == []  # none: each range was divided as it was summed
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])


# ------------------------------------------------------------ checked tables --
def test_a_checked_table_is_not_checked_again(monkeypatch) -> None:
    from fedpress.format import tables

    entries = tables.table_entries([("w", "float32", (3, 4)), ("b", np.dtype("float16"), [4])])
    assert isinstance(entries, tables.CheckedTable)
    assert entries == [("w", "float32", (3, 4)), ("b", "float16", (4,))]
    assert tables.table_entries(entries) is entries
    with pytest.raises(ValueError, match="appears twice"):  # a plain list is still checked
        tables.table_entries([("w", "float32", (1,)), ("w", "float32", (1,))])
    # An aggregator parses every payload against its table, checked once.
    rng = np.random.default_rng(13)
    base = model(rng, 20)
    payloads = [fp.Codec("topk:0.1+q4").encode({k: v * (i + 1) for k, v in base.items()}) for i in range(5)]
    checks = []
    real = tables.table_entries

    def counting(table):
        if type(table) is not tables.CheckedTable:
            checks.append(len(table))
        return real(table)

    monkeypatch.setattr(tables, "table_entries", counting)
    import fedpress.format.reader as reader

    monkeypatch.setattr(reader, "table_entries", counting)
    agg = fp.Aggregator()
    for p in payloads[:2]:
        agg.add(p)
    agg.add_many(payloads[2:])
    assert checks == []
    want = fp.Aggregator()
    for p in payloads:
        want.add(p)
    for name, value in want.result().items():
        np.testing.assert_array_equal(agg.result()[name], value)
