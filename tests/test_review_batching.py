"""Review tests for the batched index coding, the Aggregator's one-call section check and
the prefetching sparse adds (commits 525d320 and f0b4656).

They try to break: the one-client walks that fetch accumulator lines ahead
(csrc/accumulate.cpp add_ranges, RiceCursor::run_below_touching) and scatter_add_each's
runs of ranges, at accumulator sizes of 32768*k +- 1, indices at n - 1, duplicates and
unsorted updates at several thread counts, against numpy; _core.plan_indices_many
against ops.encode_indices and the independent reference encoder (edge cases, refusals);
the payload writer against the writer before these commits (same bytes); the Aggregator
given crafted payloads (a valid CRC-32C) whose quantized sections hold a bad scale or
padding bits, in add and add_many, fresh and not; _core.check_quantized_many against
dequantize_many(check=True); the cached Spec.int_bits and entry_head; and the per-thread
zstd compressors.

Strict xfails mark real bugs found by the review; each reason says what is wrong.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
import pickle
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import fedpress
import format_reference as ref
import numpy as np
import pytest
import zstandard
from _payload_helpers import with_crc
from conftest import num_threads
from fedpress import _core, ops
from fedpress._arrays import to_numpy
from fedpress.codec import Spec, parse_spec
from fedpress.format import writer
from fedpress.format.limits import DEFAULT_LIMITS
from fedpress.format.reader import parse
from fedpress.format.tables import entry_head, table_digest
from fedpress.format.values import KernelSection

ROOT = Path(__file__).resolve().parents[1]
R = 1 << 15  # the accumulators' range (csrc/accumulate.cpp kRange)
THREAD_COUNTS = (1, 2, 3, 5)
# The writer before these commits (ops.encode_indices per tensor, pieces cast to bytes,
# a fresh zstd compressor per payload).
OLD_WRITER_COMMIT = "ebe9369038384e1d777bd59c622b833113ef9b77"


def numpy_sum(acc: np.ndarray, idx: np.ndarray, val: np.ndarray, w: float) -> np.ndarray:
    """acc[idx] += float32(w) * val in float32, duplicates in their given order."""
    out = acc.copy()
    np.add.at(out, idx.astype(np.intp), np.float32(w) * val)
    return out


# ----------------------------------------------------------- the sparse adds --
SIZES = [R - 1, R, R + 1, 2 * R - 1, 2 * R, 2 * R + 1, 5 * R + 1, 40 * R - 1, 1, 2, 0, 3]


def make_indices(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    if n == 0:
        return np.zeros(0, np.uint32)
    if kind == "sorted":
        return np.sort(rng.choice(n, min(n, 40_000), replace=False)).astype(np.uint32)
    if kind == "unsorted_duplicates":
        return rng.integers(0, n, size=min(3 * n, 60_000)).astype(np.uint32)
    if kind == "sorted_duplicates":
        return np.sort(rng.integers(0, n, size=min(3 * n, 60_000))).astype(np.uint32)
    if kind == "clustered":  # one range holds most entries: one task does them all
        return np.repeat(np.array([n - 1, 0, n // 2], np.uint32), 20_000)
    return np.full(50_000, n - 1, np.uint32)  # "last": every entry at n - 1


@pytest.mark.parametrize("kind", ["sorted", "unsorted_duplicates", "sorted_duplicates", "clustered", "last"])
def test_sparse_adds_equal_numpy_at_range_edges_for_any_thread_count(kind: str) -> None:
    """scatter_add_each (runs of ranges over the threads), ops.scatter_add and one-client
    scatter_add_many (the prefetching walk) give numpy's bits, duplicates in given order."""
    rng = np.random.default_rng(hash(kind) % 2**32)
    accs = [rng.standard_normal(n).astype(np.float32) for n in SIZES]
    idx = [make_indices(rng, n, kind) for n in SIZES]
    val = [rng.standard_normal(i.size).astype(np.float32) for i in idx]
    for w in (0.3, -1.0):
        want = [numpy_sum(a, i, v, w).tobytes() for a, i, v in zip(accs, idx, val)]
        for t in THREAD_COUNTS:
            with num_threads(t):
                each = [a.copy() for a in accs]
                assert _core.scatter_add_each(each, idx, val, w) is None
                one, many = [a.copy() for a in accs], [a.copy() for a in accs]
                for a, b, i, v in zip(one, many, idx, val):
                    ops.scatter_add(a, i, v, w)
                    ops.scatter_add_many(b, [i], [v], [w])
            for n, e, o, m, expected in zip(SIZES, each, one, many, want):
                assert e.tobytes() == expected, (kind, w, t, n)
                assert o.tobytes() == expected, (kind, w, t, n)
                assert m.tobytes() == expected, (kind, w, t, n)


def test_scatter_add_each_leaves_inputs_alone_and_takes_empty_updates() -> None:
    """Unsorted updates are sorted on a copy: the caller's indices and values are unchanged;
    empty updates into empty and non-empty accumulators add nothing."""
    rng = np.random.default_rng(12)
    n = 3 * R + 1
    idx = rng.integers(0, n, size=50_000).astype(np.uint32)
    val = rng.standard_normal(idx.size).astype(np.float32)
    idx0, val0 = idx.copy(), val.copy()
    acc = np.zeros(n, np.float32)
    empty_i, empty_v = np.zeros(0, np.uint32), np.zeros(0, np.float32)
    others = [np.ones(0, np.float32), np.ones(5, np.float32)]
    with num_threads(3):
        _core.scatter_add_each([acc, *others], [idx, empty_i, empty_i], [val, empty_v, empty_v], 1.0)
    assert idx.tobytes() == idx0.tobytes() and val.tobytes() == val0.tobytes()
    assert acc.tobytes() == numpy_sum(np.zeros(n, np.float32), idx, val, 1.0).tobytes()
    assert others[0].size == 0 and others[1].tobytes() == np.ones(5, np.float32).tobytes()


def test_scatter_add_many_several_clients_equal_sequential_adds() -> None:
    """Several clients (the path without prefetching) still add in client order."""
    rng = np.random.default_rng(13)
    n = 7 * R - 1
    acc0 = rng.standard_normal(n).astype(np.float32)
    idx = [make_indices(rng, n, kind) for kind in ("sorted", "unsorted_duplicates", "last")]
    val = [rng.standard_normal(i.size).astype(np.float32) for i in idx]
    ws = [0.3, -1.7, 2.0]
    want = acc0.copy()
    for i, v, w in zip(idx, val, ws):
        want = numpy_sum(want, i, v, w)
    for t in THREAD_COUNTS:
        with num_threads(t):
            got = acc0.copy()
            ops.scatter_add_many(got, idx, val, ws)
        assert got.tobytes() == want.tobytes(), t


@pytest.mark.parametrize("n", [1, 2, R - 1, R, R + 1, 3 * R - 1, 3 * R + 1, 64 * R + 1])
def test_add_streams_one_client_equals_scatter_add(n: int) -> None:
    """One stream (RiceCursor::run_below_touching: touches 24 entries ahead within a decoded
    block of 64) gives ops.scatter_add's bits; so do two streams (no prefetching)."""
    rng = np.random.default_rng(n)
    layouts = {
        "spread": np.sort(rng.choice(n, max(1, n // 50), replace=False)),
        "all": np.arange(n),
        "last": np.array([n - 1]),
        "ends": np.unique([0, n - 1]),
        "range_edges": np.unique(np.clip([R - 1, R, 2 * R - 1, 2 * R, n - 1], 0, n - 1)),
    }
    for count in (23, 24, 25, 63, 64, 65, 88, 89):  # around the lead and the decoded block
        if count <= n:
            layouts[f"first_{count}"] = np.sort(rng.choice(n, count, replace=False))
    acc0 = rng.standard_normal(n).astype(np.float32)
    for label, raw in layouts.items():
        idx = np.asarray(raw, np.uint32)
        val = rng.standard_normal(idx.size).astype(np.float32)
        stream = ops.encode_indices(idx, n)
        want1 = numpy_sum(acc0, idx, val, 0.3)
        want2 = numpy_sum(want1, idx, val, -1.0)
        for t in THREAD_COUNTS:
            with num_threads(t):
                one = acc0.copy()
                _core.add_streams(one, [_core.IndexStream(stream, n, idx.size, val.tobytes(), True)], [0.3])
                two = acc0.copy()
                streams = [_core.IndexStream(stream, n, idx.size, val.tobytes(), True) for _ in range(2)]
                _core.add_streams(two, streams, [0.3, -1.0])
            assert one.tobytes() == want1.tobytes(), (label, t)
            assert two.tobytes() == want2.tobytes(), (label, t)


# ------------------------------------------------------ plan_indices_many --
def index_sets(rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    sets = [
        ([], 0),
        ([], 1),
        ([], 2**32),
        ([0], 1),
        ([2**32 - 1], 2**32),
        ([0, 2**32 - 1], 2**32),
        (np.arange(2**32 - 1000, 2**32), 2**32),
        (np.sort(rng.choice(2**32, 5000, replace=False)), 2**32),
        (np.arange(100_000), 100_000),  # every gap 0
        (np.concatenate([np.arange(1000), np.arange(2**31, 2**31 + 1000)]), 2**32),  # clustered
        (np.sort(rng.choice(3_000_000, 300_000, replace=False)), 3_000_000),
        ([5], 6),
        ([5], 2**32),
    ]
    return [(np.asarray(i, dtype=np.uint64).astype(np.uint32), n) for i, n in sets]


def _planned_and_written(idx: list[np.ndarray], ns: list[int]) -> list[bytes]:
    """plan_indices_many, then each stream written by assemble's rice piece as planned."""
    plans = _core.plan_indices_many(idx, ns)
    return [bytes(_core.assemble([("rice", i, n, rice, size)], False)) for i, n, (rice, size) in zip(idx, ns, plans)]


def test_planned_index_streams_equal_encode_indices_and_the_reference() -> None:
    sets = index_sets(np.random.default_rng(7))
    want = [ops.encode_indices(i, n) for i, n in sets]
    for (i, n), w in zip(sets, want):
        assert ref.encode_index_stream(i.astype(np.int64), n) == w, (i.size, n)
    idx, ns = [i for i, _ in sets], [n for _, n in sets]
    for t in THREAD_COUNTS:
        with num_threads(t):
            assert _planned_and_written(idx, ns) == want, t
            assert _planned_and_written(idx[::-1], ns[::-1]) == want[::-1], t
            assert _planned_and_written([idx[-3]] * 5, [ns[-3]] * 5) == [want[-3]] * 5, t
            # every stream in one buffer, the pieces spread over the threads, with the checksum
            plans = _core.plan_indices_many(idx, ns)
            pieces = [("rice", i, n, rice, size) for i, n, (rice, size) in zip(idx, ns, plans)]
            body = b"".join(want)
            assert bytes(_core.assemble(pieces, True)) == body + _core.crc32c(body).to_bytes(4, "little"), t
    assert _core.plan_indices_many([], []) == []
    assert _core.plan_indices_many((idx[3],), (ns[3],)) == _core.plan_indices_many([idx[3]], [ns[3]])  # any sequences
    # a view at an odd address is copied first, not read misaligned
    odd = np.frombuffer(b"\0" + np.array([1, 5, 9], np.uint32).tobytes(), np.uint32, count=3, offset=1)
    assert _planned_and_written([odd], [10]) == [ops.encode_indices(np.array([1, 5, 9]), 10)]


def test_a_rice_piece_writes_only_its_own_plan() -> None:
    # The writer checks the indices and the planned size before writing a byte: a plan
    # that is not theirs (another parameter, another size, indices changed since) is
    # refused, naming the piece, never written past its place.
    u = np.array([1, 5, 9, 300], np.uint32)
    ((rice, size),) = _core.plan_indices_many([u], [1000])
    assert bytes(_core.assemble([("rice", u, 1000, rice, size)], False)) == ops.encode_indices(u, 1000)
    for bad, match in (
        (("rice", u, 1000, rice, size - 1), r"^piece 0: the indices do not code in the planned"),
        (("rice", u, 1000, rice, size + 1), r"^piece 0: the indices do not code in the planned"),
        (("rice", u, 1000, 0, size), r"^piece 0: the indices do not code in the planned"),
        (("rice", u, 1000, 32, size), r"^piece 0: rice piece: the parameter must be in \[0, 31\]"),
        (("rice", u, 300, rice, size), r"^piece 0: index 300 at position 3 is >= n = 300"),
        (("rice", u[::-1].copy(), 1000, rice, size), r"^piece 0: indices must be strictly ascending"),
        (("rice", u, 2**32 + 1, rice, size), r"^piece 0: n must be <= 2\^32"),
        (("rice", u, 1000, rice), r"^piece 0: a rice piece is"),
    ):
        with pytest.raises(ValueError, match=match):
            _core.assemble([bad], False)
    # a size no stream of these indices can take (it would wrap the payload's size around)
    for size, match in ((2**64 - 16, r"^piece 0: a stream of 4 indices takes at most \d+ bytes"), (-1, "out of range")):
        with pytest.raises(ValueError, match=match):
            _core.assemble([b"x" * 64, ("rice", u, 1000, rice, size)][1:], False)
    with pytest.raises(TypeError, match="indices must have dtype uint32"):
        _core.assemble([("rice", u.astype(np.int64), 1000, rice, size)], False)


def test_plan_indices_many_refusals_name_the_first_array() -> None:
    u = np.array([1, 5, 9], np.uint32)
    with pytest.raises(ValueError, match="equal lengths, got 1 and 2"):
        _core.plan_indices_many([u], [10, 11])
    with pytest.raises(ValueError, match=r"n_list\[0\] must be <= 2\^32"):
        _core.plan_indices_many([u], [2**32 + 1])
    with pytest.raises(ValueError, match=r"n_list\[0\] is out of range"):
        _core.plan_indices_many([u], [-1])
    for bad_n in (10.0, True, np.int64(10)):  # ops.encode_indices casts; the kernel wants an int
        with pytest.raises(TypeError, match=r"n_list\[0\] must be an integer"):
            _core.plan_indices_many([u], [bad_n])
    with pytest.raises(TypeError, match=r"indices_list\[1\] must have dtype uint32, got int64"):
        _core.plan_indices_many([u, u.astype(np.int64)], [10, 10])
    with pytest.raises(TypeError, match=r"indices_list\[0\] must be a numpy array"):
        _core.plan_indices_many([[1, 2]], [10])
    with pytest.raises(ValueError, match=r"indices_list\[0\] must be C-contiguous"):
        _core.plan_indices_many([np.arange(20, dtype=np.uint32)[::2]], [40])
    with pytest.raises(ValueError, match=r"indices_list\[0\] must be 1-D"):
        _core.plan_indices_many([u.reshape(3, 1)], [10])
    with pytest.raises(ValueError, match=r"^array 0: index 9 at position 2 is >= n = 9$"):
        _core.plan_indices_many([u], [9])
    descending, repeated = np.array([5, 2], np.uint32), np.array([3, 3], np.uint32)
    with pytest.raises(ValueError, match=r"^array 1: indices must be strictly ascending: position 1 holds 2 after 5"):
        _core.plan_indices_many([u, descending, repeated, u], [10, 10, 10, 9])
    with pytest.raises(ValueError, match=r"^array 2: .*position 1 holds 3 after 3"):
        _core.plan_indices_many([u, u, repeated], [10, 10, 10])


# ------------------------------------------------------------- the payloads --
def sample_update(rng: np.random.Generator) -> dict[str, np.ndarray]:
    x = rng.standard_normal((40, 30))
    return {
        "w": rng.standard_normal((64, 33)).astype(np.float32),
        "b": rng.standard_normal(7).astype(np.float32),
        "h": rng.standard_normal(300).astype(np.float16),
        "d": rng.standard_normal(1000),
        "i": np.arange(5, dtype=np.int64),
        "s": np.full((), 2.5, np.float32),
        "e": np.zeros((0, 3), np.float32),
        "flag": np.array([True, False]),
        "be": x.astype(">f4"),  # big-endian, through to_numpy's slow path
        "nc": x.astype(np.float32)[:, ::3],  # not contiguous
        "big": rng.standard_normal(70_000).astype(np.float32),
    }


SPECS = [
    "fp32",
    "fp16",
    "bf16",
    "q8",
    "q4",
    "q2",
    "sign",
    "topk:0.01+q4",
    "topk:0.1+fp16",
    "topk:0.05+fp32+zstd",
    "thresh:0.02+q8",
    "randk:0.1+q4",
    "rht+q4",
    "topk:0.1+rht+q2",
    "eden4",
    "eden2:shared",
    "topk:0.1+eden4",
    "int8",
    "randk:0.2:shared+int8",
    "q4+zstd",
    "q4+zstd:3",
    "topk:0.001+sign+zstd:19",
    "topk:0.5+q4",
]


def rotation(spec: str) -> dict:
    return {"rotation_seed": 5} if ("shared" in spec or "int" in spec) else {}


def old_writer():
    """write_payload as it was before these commits, or None where git cannot show it."""
    try:
        source = subprocess.run(
            ["git", "show", f"{OLD_WRITER_COMMIT}:python/fedpress/format/writer.py"],
            cwd=ROOT,
            capture_output=True,
            check=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    path = Path(__file__).with_name("__review_old_writer.py")
    name = "fedpress.format._review_old_writer"
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "fedpress.format"
    sys.modules[name] = module  # its dataclass looks its module up
    try:
        exec(compile(source, str(path), "exec"), module.__dict__)
    except Exception:  # the old writer no longer fits the package around it
        return None
    finally:
        del sys.modules[name]
    return module.write_payload


@pytest.mark.parametrize("table", ["inline", "digest"])
def test_payloads_equal_the_previous_writers_bytes(monkeypatch, table: str) -> None:
    """Codec and Encoder payloads, byte for byte, against the writer before these commits."""
    before = old_writer()
    if before is None:
        pytest.skip("the writer before these commits is not available from git")
    import fedpress.codec as codec

    def old(spec: str, seed: int, entries: list, *args: Any, plans: Any = None, **kwargs: Any) -> bytes:
        # (index streams planned in it; an int section's codes, a kernel's part of the section
        # since, written out first)
        def written(values: Any) -> Any:
            if not isinstance(values, tuple):
                return values
            return tuple(bytes(_core.assemble([p.piece], False)) if isinstance(p, KernelSection) else p for p in values)

        entries = [dataclasses.replace(e, values=written(e.values)) for e in entries]
        return before(spec, seed, entries, *args, **kwargs)

    new = codec.write_payload
    update = sample_update(np.random.default_rng(4))
    for spec in SPECS:
        for per_tensor in (False, True):
            c = fedpress.Codec(spec, per_tensor=per_tensor, table=table)
            monkeypatch.setattr(codec, "write_payload", new)
            a = c.encode(update, seed=11, **rotation(spec))
            monkeypatch.setattr(codec, "write_payload", old)
            b = c.encode(update, seed=11, **rotation(spec))
            assert a == b, (spec, per_tensor)
    for spec in ("topk:0.01+q4", "sign", "topk:0.05+q2+zstd", "thresh:0.05+fp32", "eden4"):
        e1, e2 = fedpress.Encoder(spec, table=table), fedpress.Encoder(spec, table=table)
        for r in range(2):
            monkeypatch.setattr(codec, "write_payload", new)
            a = e1.encode(update, seed=r)
            monkeypatch.setattr(codec, "write_payload", old)
            b = e2.encode(update, seed=r)
            assert a == b, (spec, r)


def test_payloads_decode_and_carry_the_reference_index_streams() -> None:
    """Whatever git holds: every payload decodes (fedpress and the independent decoder
    alike), and each sparse tensor's index section is the reference encoder's stream."""
    rng = np.random.default_rng(5)
    update = sample_update(rng)
    for spec in SPECS:
        payload = fedpress.Codec(spec, per_tensor=True).encode(update, seed=3, **rotation(spec))
        decoded = fedpress.decode(payload)
        assert list(decoded) == list(update)
        for name, value in update.items():
            assert decoded[name].shape == value.shape, (spec, name)
            if (spec == "fp32" and value.dtype == np.float32) or value.dtype.kind in "ib":
                assert np.array_equal(decoded[name], value), (spec, name)
        parsed = parse(payload, DEFAULT_LIMITS, None)
        for rec in parsed.tensors:
            if rec.kind == 2:  # sparse: an index stream of its own
                idx = ops.decode_indices(rec.index_data, rec.size)
                assert bytes(rec.index_data) == ref.encode_index_stream(idx.astype(np.int64), rec.size), spec
        if spec in ("q4", "topk:0.01+q4", "topk:0.1+fp16"):
            theirs = ref.decode(payload)
            for name in update:
                assert np.asarray(theirs[name]).tobytes() == decoded[name].tobytes(), (spec, name)


def test_concurrent_encodes_equal_serial_ones() -> None:
    """The per-thread zstd compressors: payloads encoded from many threads at once, and
    after bodies of other sizes and levels, equal those of a fresh compressor."""
    rng = np.random.default_rng(9)
    updates = [
        {"a": rng.standard_normal(n).astype(np.float32), "b": rng.standard_normal(300).astype(np.float32)}
        for n in (100, 20_000, 300_000)
    ]
    specs = ["q4+zstd", "topk:0.01+q4+zstd", "fp16+zstd:7", "topk:0.1+fp32+zstd:1", "sign+zstd"]
    jobs = [(s, i) for s in specs for i in range(len(updates))]
    real = writer._compressor
    try:
        writer._compressor = lambda level: zstandard.ZstdCompressor(level=level, write_content_size=True)
        want = {j: fedpress.Codec(j[0]).encode(updates[j[1]], seed=3) for j in jobs}
    finally:
        writer._compressor = real
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda j: fedpress.Codec(j[0]).encode(updates[j[1]], seed=3), jobs * 6))
    assert all(g == want[j] for g, j in zip(got, jobs * 6))
    assert all(fedpress.Codec(s).encode(updates[i], seed=3) == want[(s, i)] for s, i in reversed(jobs))


def test_to_numpy_fast_path_is_the_slow_path() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 4))
    cases = [
        x.astype(np.float32),
        x.astype(">f4"),
        x.astype(np.float16)[::2],
        x.T,
        np.arange(3, dtype=">i8"),
        np.array(True),
        np.zeros((0, 2), np.uint8),
        np.arange(4, dtype=np.uint16),
    ]
    for a in cases:
        arr, name = to_numpy("t", a)
        assert arr is a and name == a.dtype.name, a.dtype
    arr, name = to_numpy("t", x.tolist())
    assert name == "float64" and np.array_equal(arr, x)
    with pytest.raises(TypeError, match="unsupported dtype"):
        to_numpy("t", np.zeros(2, np.complex64))


# --------------------------------------- the Aggregator and crafted payloads --
def crafted(payload: bytes, name: str, how: str, bucket_index: int = 0) -> bytes:
    """The payload with tensor ``name``'s values section altered, its CRC-32C made valid."""
    parsed = parse(payload, DEFAULT_LIMITS, None, defer_checksum=True)
    rec = next(r for r in parsed.tensors if r.name == name)
    buf = bytearray(payload)
    at = rec.value_offset + 4 * bucket_index
    if how == "pad":
        buf[rec.value_offset + rec.value_len - 1] |= 0x80
    else:
        buf[at : at + 4] = struct.pack("<f", {"neg": -1.0, "nan": math.nan, "inf": math.inf, "-0": -0.0}[how])
    return with_crc(buf)


def update_for_sections(rng: np.random.Generator) -> dict[str, np.ndarray]:
    # "b": 1001 values, so a q4, q2 or sign section has padding bits; 5 buckets of 256
    return {
        "a": rng.standard_normal(700).astype(np.float32),
        "b": rng.standard_normal(1001).astype(np.float32),
        "c": rng.standard_normal(37).astype(np.float32),
    }


def snapshot(agg: fedpress.Aggregator):
    if agg.count == 0:
        return (0, agg.total_weight, None)
    return (agg.count, agg.total_weight, {k: v.tobytes() for k, v in agg.result().items()})


@pytest.mark.parametrize("code", ["q8", "q4", "q2", "sign"])
def test_bad_quantized_section_is_refused_and_nothing_changes(code: str) -> None:
    rng = np.random.default_rng(21)
    codec = fedpress.Codec(code, bucket=256 if code != "sign" else 32)
    good = codec.encode(update_for_sections(rng), seed=1)
    other = codec.encode(update_for_sections(rng), seed=2)
    corruptions = [("neg", 0), ("nan", 2), ("inf", 3)] + ([("pad", 0)] if code != "q8" else [])
    for how, bucket_index in corruptions:
        bad = crafted(good, "b", how, bucket_index)
        with pytest.raises(fedpress.DecodeError) as decoded:
            fedpress.decode(bad)
        message = str(decoded.value)
        assert message.startswith("tensor 'b': "), message
        for mode in ("add", "add_after", "many", "many_after", "many_pair"):
            agg = fedpress.Aggregator()
            if mode.endswith("_after"):
                agg.add(other, 0.5)
            before = snapshot(agg)
            with pytest.raises(fedpress.DecodeError) as refused:
                if mode.startswith("add"):
                    agg.add(bad, 2.0)
                elif mode == "many_pair":
                    agg.add_many([other, bad], [1.0, 2.0])
                else:
                    agg.add_many([bad], [2.0])
            assert str(refused.value).endswith(message), (how, mode, str(refused.value))
            assert snapshot(agg) == before, (how, mode)
            # and the aggregator goes on as if it had never seen the payload
            agg.add(good, 3.0)
            clean = fedpress.Aggregator()
            if mode.endswith("_after"):
                clean.add(other, 0.5)
            clean.add(good, 3.0)
            assert snapshot(agg) == snapshot(clean), (how, mode)


def test_negative_zero_scale_is_accepted_alike() -> None:
    """-0.0 is >= 0: the decoder, add and add_many accept it, and add what decode gives
    (add_many adds it to a zeroed sum: +0.0 where decode gives -0.0)."""
    rng = np.random.default_rng(22)
    payload = crafted(fedpress.Codec("q4", bucket=256).encode(update_for_sections(rng), seed=1), "b", "-0", 1)
    decoded = fedpress.decode(payload)
    one, many = fedpress.Aggregator(), fedpress.Aggregator()
    one.add(payload)
    many.add_many([payload])
    for name, value in decoded.items():
        assert one.result()[name].tobytes() == value.tobytes()
        assert np.array_equal(many.result()[name], value)


def test_check_quantized_many_agrees_with_dequantize_many_check() -> None:
    rng = np.random.default_rng(23)
    for trial in range(40):
        jobs = []
        for _ in range(int(rng.integers(1, 6))):
            bits = int(rng.choice([1, 2, 4, 8]))
            n, bucket = int(rng.integers(0, 3000)), int(rng.choice([1, 7, 256]))
            packed, scales = ops.quantize(rng.standard_normal(n).astype(np.float32), bits, bucket=bucket, seed=trial)
            if scales.size and rng.random() < 0.3:
                scales[rng.integers(scales.size)] = rng.choice([-1.0, np.nan, np.inf, -np.inf, -0.0, 1e-45])
            if packed.size and (n * bits) % 8 and rng.random() < 0.3:
                packed[-1] |= 0x80
            jobs.append((packed, scales, bits, n, bucket, np.zeros(n, np.float32), 1.0, True))
        accs = [j[5].copy() for j in jobs]
        got = _core.check_quantized_many(jobs)
        assert all(j[5].tobytes() == a.tobytes() for j, a in zip(jobs, accs))  # wrote nothing
        want = _core.dequantize_many(jobs, check=True)
        assert got == (want if isinstance(want, int) else None), trial


def payload_with_two_bad_tensors() -> tuple[bytes, str]:
    """A dense q4 tensor "a" and a later sparse q4 tensor "z", both with a negative scale,
    and the decoder's message (it names the first, "a")."""
    rng = np.random.default_rng(24)
    update = {"a": rng.standard_normal(16).astype(np.float32), "z": rng.standard_normal(100_000).astype(np.float32)}
    payload = fedpress.Codec("topk:0.3+q4", per_tensor=True).encode(update, seed=1)
    kinds = {r.name: r.kind for r in parse(payload, DEFAULT_LIMITS, None).tensors}
    assert kinds == {"a": 1, "z": 2}  # dense, sparse
    bad = crafted(crafted(payload, "a", "neg"), "z", "neg")
    with pytest.raises(fedpress.DecodeError) as decoded:
        fedpress.decode(bad)
    assert str(decoded.value).startswith("tensor 'a': ")
    return bad, str(decoded.value)


def test_two_bad_tensors_refused_and_nothing_changes() -> None:
    bad, _ = payload_with_two_bad_tensors()
    for agg in (fedpress.Aggregator(), fedpress.Aggregator(dtype=np.float64)):
        with pytest.raises(fedpress.DecodeError, match="negative or non-finite scale"):
            agg.add(bad)
        with pytest.raises(fedpress.DecodeError, match="negative or non-finite scale"):
            agg.add_many([bad])
        assert agg.count == 0 and agg.total_weight == 0.0
    with pytest.raises(fedpress.DecodeError, match="^tensor 'a': "):
        fedpress.Aggregator(dtype=np.float64).add(bad)  # decodes tensor by tensor, in order


# Was a strict xfail: add checked the dense sections only after every other tensor was decoded.
def test_add_names_the_first_bad_tensor_as_the_decoder_does() -> None:
    bad, message = payload_with_two_bad_tensors()
    with pytest.raises(fedpress.DecodeError) as refused:
        fedpress.Aggregator().add(bad)
    assert str(refused.value) == message


@pytest.mark.parametrize("threads", [1, 3])
def test_add_and_add_many_agree_bit_for_bit(threads: int) -> None:
    """Dense sections dequantized into the sums (checked in one call first), sparse ones
    streamed (one client: the prefetching walk) or batched: add and add_many alike."""
    rng = np.random.default_rng(25)
    updates = [
        {
            "w": rng.standard_normal((300, 70)).astype(np.float32),
            "e": np.zeros(0, np.float32),
            "one": rng.standard_normal(1).astype(np.float32),
            "big": rng.standard_normal(5 * R + 1).astype(np.float32),
        }
        for _ in range(3)
    ]
    weights = [1.0, 0.25, 3.0]
    for spec in ("q4", "sign", "q2+zstd", "topk:0.05+fp32", "topk:0.05+q8", "randk:0.1+q4", "topk:0.3+q4"):
        payloads = [fedpress.Codec(spec).encode(u, seed=i) for i, u in enumerate(updates)]
        with num_threads(threads):
            one, many, single = fedpress.Aggregator(), fedpress.Aggregator(), fedpress.Aggregator()
            for p, w in zip(payloads, weights):
                one.add(p, w)
            many.add_many(payloads, weights)
            single.add_many(payloads[:1])
        assert snapshot(one) == snapshot(many), spec
        decoded = fedpress.decode(payloads[0])
        assert {k: v.tobytes() for k, v in single.result().items()} == {k: v.tobytes() for k, v in decoded.items()}


# ------------------------------------------------------ cached Python helpers --
def test_spec_int_bits_cached_keeps_pickling_equality_and_hash() -> None:
    a, b = parse_spec("int8:clip=2:nmax=10"), parse_spec("int8:clip=2:nmax=10")
    assert a.int_bits == 8 and a.shares_rotation
    assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1  # b never read int_bits
    for spec in (a, b):
        again = pickle.loads(pickle.dumps(spec))
        assert again == a and hash(again) == hash(a) and again.int_bits == 8 and str(again) == str(a)
        assert copy.deepcopy(spec) == a and copy.copy(spec).int_bits == 8
    changed = dataclasses.replace(a, values="int4")
    assert changed.int_bits == 4 and str(changed) == "int4:clip=2.0:nmax=10"
    assert dataclasses.replace(a, values="q4").int_bits == 0
    assert dataclasses.asdict(a) == dataclasses.asdict(b) and "int_bits" not in dataclasses.asdict(a)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.int_bits = 3  # type: ignore[misc]
    assert a.int_bits == 8
    assert Spec().int_bits == 0 and parse_spec("q4").int_bits == 0


def test_entry_head_cache_is_keyed_by_value() -> None:
    """Shapes of numpy integers give the bytes of plain ints, in either order of calls;
    table_digest takes shapes as lists and numpy integers (normalised before the cache)."""
    raw = entry_head.__wrapped__
    shapes = [(3, 200, 1), (0,), (), (2**40, 1)]
    for i, shape in enumerate(shapes):
        as_numpy = tuple(np.int64(d) if j % 2 else np.uint64(d) for j, d in enumerate(shape))
        name = f"review_head_{i}"
        first, second = (as_numpy, shape) if i % 2 else (shape, as_numpy)
        assert entry_head(name, "float32", first) == raw(name, "float32", shape)
        assert entry_head(name, "float32", second) == raw(name, "float32", shape)
    model = [("a", "float32", (3, 4)), ("b", "int64", (5,))]
    as_lists = [("a", "float32", [3, 4]), ("b", "int64", [np.int64(5)])]
    assert table_digest(as_lists) == table_digest(model)
    arrays = {"a": np.zeros((3, 4), np.float32), "b": np.zeros(5, np.int64)}
    assert table_digest(arrays) == table_digest(model)
    payload = fedpress.Codec("q4", table="digest").encode(arrays, seed=1)
    assert fedpress.format.payload_table_digest(payload) == table_digest(model)
