"""Review of the batched stream adds (e28e3cc, 14113d0, c981fa5): ``_core.add_streams_each``,
``format.decoding.index_streams``, ``decode``/``Aggregator.add``/``add_many`` built on them,
the Encoder's inline-or-pooled residual correction, and the add_many callers (Flower's fast
path, the ordered server). Each batched path is compared with the one-tensor-at-a-time path
it replaced (``_core.add_streams`` per tensor, ``decoding.index_stream`` per record,
sequential ``Aggregator.add``), bit for bit where the additions are the same."""

from __future__ import annotations

import ast
import contextlib
import multiprocessing
import threading
import warnings
from pathlib import Path

import fedpress as fp
import numpy as np
import pytest
from _payload_helpers import corrupt, stream_of, with_crc
from conftest import num_threads
from fedpress import _core, aggregate, ops
from fedpress import encoder as encoder_module
from fedpress.format import decoding
from fedpress.format.reader import parse

RANGE = 1 << 15  # csrc/accumulate.cpp kRange: the floats of one range of a sum
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ helpers --
def model(rng: np.random.Generator, tensors: int = 200) -> dict[str, np.ndarray]:
    """Hundreds of tensors: tiny ones (sent dense), mid-sized ones, a zero one (a sparse
    tensor that keeps nothing under a global top-k), and ones around and beyond a range."""
    sizes = [int(s) for s in rng.integers(1, 3000, tensors)]
    sizes += [RANGE - 1, RANGE, RANGE + 1, 3 * RANGE + 7, 100_003]
    sizes[::7] = [int(s) for s in rng.integers(1, 9, len(sizes[::7]))]
    update = {f"t{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(sizes)}
    update["t5"][:] = 0.0
    return update


def records(payload: bytes):
    return parse(payload, defer_checksum=True).tensors  # value_offset is set by a deferred parse


@contextlib.contextmanager
def one_at_a_time(monkeypatch: pytest.MonkeyPatch):
    """The paths as they were: every stream made by ``index_stream`` and added by its own
    ``_core.add_streams`` call, in the order the batched call lists them."""

    def each(groups) -> None:
        for acc, streams, weights in groups:
            _core.add_streams(acc, list(streams), list(weights))

    with monkeypatch.context() as m:
        m.setattr(_core, "add_streams_each", each)
        m.setattr(decoding, "index_streams", lambda recs, finite=(): {})
        m.setattr(aggregate, "index_streams", lambda recs, finite=(): {})
        yield


def state(agg: fp.Aggregator) -> tuple:
    sums = {name: s.copy() for name, s in agg._sums.items()}
    return agg.count, agg.total_weight, agg._table, sums


def assert_same_state(a: tuple, b: tuple) -> None:
    assert a[:3] == b[:3]
    assert a[3].keys() == b[3].keys()
    for name in a[3]:
        np.testing.assert_array_equal(a[3][name], b[3][name], err_msg=name)


# -------------------------------------------------------- add_streams_each --
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_add_streams_each_many_groups_equal_add_streams_per_group(threads: int) -> None:
    rng = np.random.default_rng(100 + threads)
    groups, expected = [], []
    sizes = [0, 1, 2, RANGE - 1, RANGE, RANGE + 1, 3 * RANGE + 7] + [int(s) for s in rng.integers(1, 4000, 250)]
    for n in sizes:
        clients = int(rng.integers(0, 4))
        made = [stream_of(rng, n, int(rng.integers(0, min(n, 300) + 1)))[0] for _ in range(clients)]
        if made and rng.random() < 0.2:
            made.append(made[0])  # one stream twice in a group: read twice
        weights = [float(w) for w in rng.choice([0.0, 1.0, -0.5, 2.25], len(made))]
        start = rng.standard_normal(n).astype(np.float32)
        want = start.copy()
        _core.add_streams(want, made, weights)
        groups.append((start, made, weights))
        expected.append(want)
    # Sums cut into several tasks: one stream of 100,000 entries, and two of 150,000 each.
    for n, clients, k in [(300_007, 1, 100_000), (400_000, 2, 150_000)]:
        made = [stream_of(rng, n, k)[0] for _ in range(clients)]
        weights = [0.75] * clients
        start = rng.standard_normal(n).astype(np.float32)
        want = start.copy()
        _core.add_streams(want, made, weights)
        groups.append((start, made, weights))
        expected.append(want)
    with num_threads(threads):
        _core.add_streams_each(groups)
    for (got, _, _), want in zip(groups, expected):
        np.testing.assert_array_equal(got, want)


def test_add_streams_each_accumulators_in_one_buffer_and_empty_ones() -> None:
    """A model's sums are views of one buffer (``flat_views``): adjacent ones, and empty
    ones at the address of the next, are not overlaps."""
    rng = np.random.default_rng(101)
    sizes = [0, 0, 5, 0, 1000, 0, RANGE + 3, 0]
    buf = np.zeros(sum(sizes), np.float32)
    accs, at = [], 0
    for n in sizes:
        accs.append(buf[at : at + n])
        at += n
    groups, expected = [], []
    for acc in accs:
        n = acc.size
        made = [stream_of(rng, n, min(n, 40))[0] for _ in range(2)]
        want = np.zeros(n, np.float32)
        _core.add_streams(want, made, [1.0, 3.0])
        groups.append((acc, made, [1.0, 3.0]))
        expected.append(want)
    _core.add_streams_each(groups)
    for acc, want in zip(accs, expected):
        np.testing.assert_array_equal(acc, want)


def test_add_streams_each_refuses_an_accumulator_over_a_streams_bytes_and_writes_nothing() -> None:
    rng = np.random.default_rng(102)
    n, k = 1000, 50
    idx = np.sort(rng.choice(n, k, replace=False)).astype(np.uint32)
    # The values lie in the accumulator's buffer.
    buf = np.zeros(n + k, np.float32)
    buf[n:] = rng.standard_normal(k).astype(np.float32)
    stream = _core.IndexStream(ops.encode_indices(idx, n), n, k, buf[n:], True)
    other = np.zeros(n, np.float32)
    good, _, _ = stream_of(rng, n, k)
    before = buf.copy()
    with pytest.raises(ValueError, match="shares memory"):
        _core.add_streams_each([(other, [good], [1.0]), (buf[k:], [stream], [1.0])])
    np.testing.assert_array_equal(buf, before)
    assert not other.any()  # the group before the refused one was not added either
    _core.add_streams_each([(buf[:n], [stream], [1.0])])  # next to the values: allowed
    np.testing.assert_array_equal(buf[:n][idx], buf[n:])
    # The index stream's bytes lie in the accumulator's buffer.
    code = np.frombuffer(ops.encode_indices(idx, n), np.uint8)
    raw = np.zeros(4 * n + code.size + 3, np.uint8)
    raw[4 * n : 4 * n + code.size] = code
    values = rng.standard_normal(k).astype(np.float32)
    inside = _core.IndexStream(raw[4 * n : 4 * n + code.size], n, k, values, True)
    acc = raw[4 : 4 + 4 * n].view(np.float32)  # its last bytes cover the stream's first
    with pytest.raises(ValueError, match="shares memory"):
        _core.add_streams_each([(acc, [inside], [1.0])])
    assert not raw[: 4 * n].any() and np.array_equal(raw[4 * n : 4 * n + code.size], code)
    # A bad group late in the list: nothing of the earlier groups is added.
    deferred, _, _ = stream_of(rng, n, k, deferred=True)
    first = np.zeros(n, np.float32)
    with pytest.raises(ValueError, match=r"groups\[1\] stream 0 is deferred"):
        _core.add_streams_each([(first, [good], [1.0]), (np.zeros(n, np.float32), [deferred], [1.0])])
    assert not first.any()


# ------------------------------------------------------------- index_streams --
def test_index_streams_before_a_refused_tensor_carry_their_values(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(103)
    update = {
        f"t{i}": rng.standard_normal(int(s)).astype(np.float32) for i, s in enumerate(rng.integers(500, 3000, 12))
    }
    payload = fp.Codec("topk:0.05+q4").encode(update, seed=1)
    late = [r for r in records(payload) if decoding.streamable(r)][7]
    bad = corrupt(payload, {late.value_offset + 3: 0xFF})  # a NaN scale
    recs = [r for r in parse(bad).tensors if decoding.streamable(r)]
    # np.empty gives whatever the memory held: make that visible.
    real = decoding.flat_views
    monkeypatch.setattr(
        decoding,
        "flat_views",
        lambda sizes, dtype, make=np.zeros: real(sizes, dtype, lambda n, d: np.full(n, np.nan, d)),
    )
    made = decoding.index_streams(recs)
    assert len(made) == 7 and all(id(r) in made for r in recs[:7])  # documented: the ones before are kept
    for rec in recs[:7]:
        want, got = np.zeros(rec.size, np.float32), np.zeros(rec.size, np.float32)
        _core.add_streams(want, [decoding.index_stream(rec)], [1.0])
        _core.add_streams(got, [made[id(rec)]], [1.0])
        np.testing.assert_array_equal(got, want, err_msg=rec.name)


@pytest.mark.parametrize("values", ["fp32", "fp16", "bf16", "q8", "q2", "sign"])
def test_index_streams_of_hundreds_of_tensors_match_index_stream(values: str) -> None:
    rng = np.random.default_rng(104)
    payload = fp.Codec(f"topk:0.02+{values}").encode(model(rng), seed=3)
    recs = [r for r in parse(payload).tensors if decoding.streamable(r)]
    assert len(recs) > 150 and any(r.count == 0 for r in recs)
    made = decoding.index_streams(recs)
    assert set(made) == {id(r) for r in recs}
    assert all(made[id(r)].checked for r in recs)
    for rec in recs:
        want, got = np.zeros(rec.size, np.float32), np.zeros(rec.size, np.float32)
        _core.add_streams(want, [decoding.index_stream(rec)], [1.0])
        _core.add_streams(got, [made[id(rec)]], [1.0])
        np.testing.assert_array_equal(got, want, err_msg=rec.name)


def test_a_non_finite_fp16_value_and_a_bad_stream_are_named_in_table_order() -> None:
    rng = np.random.default_rng(105)
    payload = fp.Codec("topk:0.02+fp16", per_tensor=True).encode(model(rng, 120), seed=4)
    sparse = [r for r in records(payload) if decoding.streamable(r) and r.count > 1]
    early, late = sparse[40], sparse[90]
    inf_late = {late.value_offset + 2 * (late.count - 1): 0x00, late.value_offset + 2 * late.count - 1: 0x7C}
    bad_index_early = {early.value_offset - 1: 0xFF}
    calls = {
        "decode": fp.decode,
        "add": lambda p: fp.Aggregator().add(p),
        "add_many": lambda p: fp.Aggregator().add_many([payload, p]),
    }
    for name, call in calls.items():
        with pytest.raises(fp.DecodeError, match=f"tensor '{late.name}': .*non-finite"):
            call(corrupt(payload, inf_late))
        with pytest.raises(fp.DecodeError, match=f"tensor '{early.name}'") as info:
            call(corrupt(payload, {**inf_late, **bad_index_early}))
        assert "non-finite" not in str(info.value), name
        if name == "add_many":
            assert "payload 1" in str(info.value)


# -------------------------------------------------------------------- decode --
@pytest.mark.parametrize("values", ["fp32", "fp16", "bf16", "q8", "sign"])
@pytest.mark.parametrize("threads", [1, 3])
def test_decode_with_mixed_dtypes_matches_one_tensor_at_a_time(
    monkeypatch: pytest.MonkeyPatch, values: str, threads: int
) -> None:
    rng = np.random.default_rng(106)
    update = model(rng, 150)
    update["big"] = (rng.standard_normal(RANGE + 5) * 1e5).astype(np.float32)  # beyond float16's range
    names = list(update)
    dtypes = {name: ("float16", "float64", "bfloat16", "float32")[i % 4] for i, name in enumerate(names)}
    dtypes["big"] = "float16"
    payload = fp.Codec(f"topk:0.05+{values}", per_tensor=True).encode(update, seed=5, dtypes=dtypes)
    assert sum(decoding.streamable(r) for r in parse(payload).tensors) > 100
    with num_threads(threads):
        got = fp.decode(payload)
        with one_at_a_time(monkeypatch):
            want = fp.decode(payload)
    assert list(got) == list(want) == names
    for name in names:
        expected_dtype = np.float32 if dtypes[name] == "bfloat16" else np.dtype(dtypes[name])
        assert got[name].dtype == want[name].dtype == expected_dtype, name
        assert got[name].shape == update[name].shape
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    big = got["big"]
    if values in ("fp32", "fp16", "bf16", "q8"):
        assert np.abs(big).max() == 65504.0  # float16 saturates after the streams are added
    assert np.isfinite(big).all()


def test_decode_streams_of_one_stored_buffer_each_tensor_its_own() -> None:
    """Every output is its own tensor: adding the streams at the end and converting after
    must not let one tensor's output alias another's."""
    rng = np.random.default_rng(107)
    update = model(rng, 60)
    payload = fp.Codec("topk:0.05+q4", per_tensor=True).encode(update, seed=6)
    out = fp.decode(payload)
    parts = decoding.decode_parts(payload)
    for name, arr in out.items():
        idx, vals = parts[name]
        want = np.zeros(arr.size, np.float32)
        if idx is None:
            want[:] = vals
        else:
            want[idx.astype(np.intp)] = vals
        np.testing.assert_array_equal(arr.reshape(-1), want, err_msg=name)
    for name, arr in out.items():
        arr[...] = 7.0
        for other, b in out.items():
            if other != name:
                assert not np.shares_memory(arr, b)


# ---------------------------------------------------------------- Aggregator --
def rounds_of(rng: np.random.Generator, count: int, tensors: int) -> list[dict[str, np.ndarray]]:
    """``count`` updates of one model (the same names and shapes)."""
    first = model(rng, tensors)
    return [first] + [
        {n: rng.standard_normal(t.shape).astype(np.float32) for n, t in first.items()} for _ in range(count - 1)
    ]


def payloads_of(rng: np.random.Generator, count: int, spec: str, per_tensor: bool = True) -> list[bytes]:
    shapes = {name: t.shape for name, t in model(rng, 120).items()}
    codec = fp.Codec(spec, per_tensor=per_tensor)
    return [
        codec.encode({n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}, seed=c)
        for c in range(count)
    ]


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("spec", ["topk:0.05+q4", "topk:0.02+fp32"])
def test_aggregator_add_matches_one_tensor_at_a_time(monkeypatch: pytest.MonkeyPatch, threads: int, spec: str) -> None:
    rng = np.random.default_rng(108 + threads)
    payloads = payloads_of(rng, 3, spec, per_tensor=spec.endswith("q4"))
    weights = [1.5, 0.0, 2.0]
    with num_threads(threads):
        batched = fp.Aggregator()
        for p, w in zip(payloads, weights):
            batched.add(p, w)
        with one_at_a_time(monkeypatch):
            reference = fp.Aggregator()
            for p, w in zip(payloads, weights):
                reference.add(p, w)
    assert_same_state(state(batched), state(reference))


@pytest.mark.parametrize("threads", [1, 3])
def test_add_many_with_repeats_and_zero_weights_equals_sequential_add(
    monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    rng = np.random.default_rng(110)
    p = payloads_of(rng, 3, "topk:0.03+q4")
    batch = [p[0], p[1], p[0], p[2], p[0], p[0]]
    weights = [1.0, 0.0, 2.5, 0.0, 1.0, 0.0]
    with num_threads(threads):
        together = fp.Aggregator()
        together.add_many(batch, weights)
        one_by_one = fp.Aggregator()
        for q, w in zip(batch, weights):
            one_by_one.add(q, w)
        with one_at_a_time(monkeypatch):
            reference = fp.Aggregator()
            reference.add_many(batch, weights)
    assert_same_state(state(together), state(one_by_one))
    assert_same_state(state(together), state(reference))
    only_zero = fp.Aggregator()
    only_zero.add_many([p[1], p[1]], [0.0, 0.0])
    assert only_zero.count == 2 and only_zero.total_weight == 0.0
    assert not any(s.any() for s in only_zero._sums.values())


def bad_payloads(payload: bytes) -> dict[str, tuple[bytes, str]]:
    """Corrupt copies of a per-tensor q4 payload (dense tiny tensors, sparse others), and
    the tensor each must be refused for: the first bad one in table order."""
    recs = records(payload)
    sparse = [r for r in recs if decoding.streamable(r)]
    dense = [r for r in recs if not decoding.streamable(r) and r.value_code == "q4"]
    early_dense = next(r for r in dense if r.ordinal > sparse[3].ordinal)
    late_sparse = sparse[-1]
    early_sparse = sparse[3]
    late_dense = dense[-1]
    assert early_sparse.ordinal < early_dense.ordinal < late_dense.ordinal < late_sparse.ordinal
    scale = {early_dense.value_offset + 3: 0xFF}
    late_scale = {late_dense.value_offset + 3: 0xFF}
    sparse_scale = {late_sparse.value_offset + 3: 0xFF}
    index = {early_sparse.value_offset - 1: 0xFF}
    last_index = {late_sparse.value_offset - 1: 0xFF}
    return {
        "last stream": (corrupt(payload, last_index), late_sparse.name),
        "last sparse scale": (corrupt(payload, sparse_scale), late_sparse.name),
        "dense scale, then a stream": (corrupt(payload, {**scale, **last_index}), early_dense.name),
        "stream, then a dense scale": (corrupt(payload, {**index, **late_scale}), early_sparse.name),
        "stream, then a sparse scale": (corrupt(payload, {**index, **sparse_scale}), early_sparse.name),
    }


@pytest.mark.parametrize("fresh", [False, True])
def test_a_failed_add_names_the_first_bad_tensor_and_changes_nothing(fresh: bool) -> None:
    rng = np.random.default_rng(111)
    good = payloads_of(rng, 3, "topk:0.05+q4")
    for _what, (bad, name) in bad_payloads(good[2]).items():
        agg = fp.Aggregator()
        if not fresh:
            agg.add(good[0], 2.0)
        before = state(agg)
        with pytest.raises(fp.DecodeError, match=f"tensor '{name}'"):
            agg.add(bad, 1.0)
        assert_same_state(state(agg), before)
        agg.add(good[1], 0.5)
        clean = fp.Aggregator()
        if not fresh:
            clean.add(good[0], 2.0)
        clean.add(good[1], 0.5)
        assert_same_state(state(agg), state(clean))


def test_a_failed_add_many_names_the_payload_and_tensor_and_changes_nothing() -> None:
    rng = np.random.default_rng(112)
    good = payloads_of(rng, 4, "topk:0.05+q4")
    for what, (bad, name) in bad_payloads(good[3]).items():
        if what == "dense scale, then a stream":
            continue  # see test_add_many_names_an_earlier_dense_section_before_a_later_stream
        agg = fp.Aggregator()
        agg.add(good[0], 2.0)
        before = state(agg)
        with pytest.raises(fp.DecodeError, match=f"payload 2: .*tensor '{name}'"):
            agg.add_many([good[1], good[2], bad, good[1]], [1.0, 0.0, 1.0, 3.0])
        assert_same_state(state(agg), before)
        agg.add_many([good[1], good[2]], [1.0, 0.0])
        clean = fp.Aggregator()
        clean.add(good[0], 2.0)
        clean.add_many([good[1], good[2]], [1.0, 0.0])
        assert_same_state(state(agg), state(clean))


def test_decode_names_the_first_bad_tensor() -> None:
    rng = np.random.default_rng(112)
    good = payloads_of(rng, 1, "topk:0.05+q4")
    for what, (bad, name) in bad_payloads(good[0]).items():
        if what == "stream, then a dense scale":
            continue  # see test_decode_names_an_earlier_stream_before_a_later_dense_section
        with pytest.raises(fp.DecodeError, match=f"tensor '{name}'"):
            fp.decode(bad)


def test_decode_names_an_earlier_stream_before_a_later_dense_section() -> None:
    rng = np.random.default_rng(112)
    bad, name = bad_payloads(payloads_of(rng, 1, "topk:0.05+q4")[0])["stream, then a dense scale"]
    with pytest.raises(fp.DecodeError, match=f"tensor '{name}'"):
        fp.decode(bad)


def test_add_many_names_an_earlier_dense_section_before_a_later_stream() -> None:
    rng = np.random.default_rng(112)
    good = payloads_of(rng, 2, "topk:0.05+q4")
    bad, name = bad_payloads(good[1])["dense scale, then a stream"]
    with pytest.raises(fp.DecodeError, match=f"payload 1: .*tensor '{name}'"):
        fp.Aggregator().add_many([good[0], bad])


def test_add_many_of_mixed_dense_and_sparse_payloads_equals_sequential_add() -> None:
    rng = np.random.default_rng(113)
    n = 200_000
    dense, sparse = fp.Codec("q8"), fp.Codec("topk:0.3+fp32")
    payloads = [
        dense.encode({"w": rng.standard_normal(n).astype(np.float32)}, seed=1),
        sparse.encode({"w": rng.standard_normal(n).astype(np.float32)}, seed=2),
        dense.encode({"w": rng.standard_normal(n).astype(np.float32)}, seed=3),
    ]
    weights = [0.3, 0.7, 1.3]
    one_by_one = fp.Aggregator()
    for p, w in zip(payloads, weights):
        one_by_one.add(p, w)
    together = fp.Aggregator()
    together.add_many(payloads, weights)
    np.testing.assert_array_equal(together.result()["w"], one_by_one.result()["w"])


# ------------------------------------------------------------------- Encoder --
@pytest.mark.parametrize("inline", [True, False])
def test_a_failed_write_after_the_correction_puts_the_residual_back(
    monkeypatch: pytest.MonkeyPatch, inline: bool
) -> None:
    import fedpress.codec as codec_module

    rng = np.random.default_rng(114)
    rounds = rounds_of(rng, 3, 30)
    monkeypatch.setattr(encoder_module, "_SMALL_CORRECTION", 1 << 40 if inline else 0)
    enc = fp.Encoder("topk:0.01+q4", per_tensor=True)
    enc.encode(rounds[0], seed=0)
    before = {name: r.copy() for name, r in enc.residuals.items()}
    real = codec_module.write_payload
    calls = []

    def refuse(*args, **kwargs):
        calls.append(threading.current_thread().name)
        raise RuntimeError("the disk is full")

    taken: list[tuple[str, float]] = []
    take_out = encoder_module.Encoder._take_out

    def tracked(self, sent, sign):
        taken.append((threading.current_thread().name, sign))
        return take_out(self, sent, sign)

    monkeypatch.setattr(encoder_module.Encoder, "_take_out", tracked)
    monkeypatch.setattr(codec_module, "write_payload", refuse)
    with pytest.raises(RuntimeError, match="disk is full"):
        enc.encode(rounds[1], seed=1)
    assert calls
    # The correction was made (inline, or on the pool's thread), then put back on failure.
    assert [sign for _, sign in taken] == [-1.0, 1.0]
    assert taken[0][0].startswith("fedpress-correction") != inline
    assert taken[1][0] == threading.current_thread().name
    for name, r in enc.residuals.items():
        np.testing.assert_allclose(r, before[name], rtol=0, atol=1e-5, err_msg=name)
    assert enc.rounds == 1
    monkeypatch.setattr(codec_module, "write_payload", real)
    # The next round goes on as if the failed one had not been tried (to within a rounding).
    again = fp.decode(enc.encode(rounds[2], seed=2))
    fresh = fp.Encoder("topk:0.01+q4", per_tensor=True)
    fresh.encode(rounds[0], seed=0)
    want = fp.decode(fresh.encode(rounds[2], seed=2))
    for name in want:
        np.testing.assert_allclose(again[name], want[name], rtol=0, atol=1e-4, err_msg=name)


def test_failed_writes_leave_the_same_residual_inline_and_on_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    import fedpress.codec as codec_module

    rng = np.random.default_rng(115)
    rounds = rounds_of(rng, 2, 30)
    results = []
    for threshold in (1 << 40, 0):
        monkeypatch.setattr(encoder_module, "_SMALL_CORRECTION", threshold)
        monkeypatch.setattr(codec_module, "write_payload", fp.format.writer.write_payload)
        enc = fp.Encoder("topk:0.02+q8")
        enc.encode(rounds[0], seed=0)

        def refuse(*args, **kwargs):
            raise KeyError("refused")

        monkeypatch.setattr(codec_module, "write_payload", refuse)
        with pytest.raises(KeyError):
            enc.encode(rounds[1], seed=1)
        results.append({name: r.copy() for name, r in enc.residuals.items()})
    for name in results[0]:
        np.testing.assert_array_equal(results[0][name], results[1][name], err_msg=name)


def test_encoders_on_many_threads_share_the_pool_safely() -> None:
    rng = np.random.default_rng(116)
    updates = [{"w": rng.standard_normal(700_000).astype(np.float32), "b": rng.standard_normal(999).astype(np.float32)}]
    updates.append({k: v[::-1].copy() for k, v in updates[0].items()})
    spec = "topk:0.1+q4"  # 70,000 kept entries: corrected on the pool

    def run(client: int) -> list[bytes]:
        enc = fp.Encoder(spec)
        return [enc.encode({k: v * (client + 1) for k, v in u.items()}, seed=r) for r, u in enumerate(updates)]

    want = [run(c) for c in range(4)]
    got: dict[int, list[bytes]] = {}
    errors: list[BaseException] = []

    def worker(c: int) -> None:
        try:
            got[c] = run(c)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert [got[c] for c in range(4)] == want


def _encode_large(queue) -> None:
    enc = fp.Encoder("topk:0.1+q4")
    queue.put(len(enc.encode({"w": np.random.default_rng(0).standard_normal(700_000).astype(np.float32)}, seed=1)))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_a_child_forked_while_another_thread_makes_the_pool_can_encode() -> None:
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:  # another thread in _correction_pool at the moment of the fork
        with encoder_module._pool_lock:
            entered.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    entered.wait(10)
    try:
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork of a threaded process
            child = ctx.Process(target=_encode_large, args=(queue,))
            child.start()
        child.join(timeout=8)
        hung = child.exitcode is None
        if hung:
            child.kill()
            child.join(5)
    finally:
        release.set()
        holder.join(10)
    assert not hung, "the child deadlocked on the correction pool's lock"
    assert queue.get(timeout=5) > 0


# ------------------------------------------------------------ the micro-opts --
def test_reader_names_the_section_cut_short() -> None:
    rng = np.random.default_rng(117)
    payload = fp.Codec("topk:0.05+q4", per_tensor=True).encode(model(rng, 20), seed=7)
    recs = records(payload)
    last = recs[-1]
    # Cut inside the last tensor's values section, then inside its index section.
    assert last.index_len > 0 and last.value_len > 0
    for cut, section in ((1, "values section"), (last.value_len + 1, "index section")):
        with pytest.raises(fp.DecodeError, match=f"tensor '{last.name}' {section}"):
            parse(with_crc(bytearray(payload[: -4 - cut] + b"\0\0\0\0")))


def test_the_package_keeps_to_python_39() -> None:
    newer = {"slots", "kw_only", "match_args", "weakref_slot"}  # dataclass() keywords from 3.10 on
    found = []
    for path in sorted((ROOT / "python" / "fedpress").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "dataclass":
                found += [f"{path.relative_to(ROOT)}:{node.lineno}" for kw in node.keywords if kw.arg in newer]
    assert not found, found
