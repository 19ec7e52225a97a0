"""Bounded decoding: what a payload may decode to is bounded by its size
(Limits.max_expansion) when the receiver does not know the model, and by the
model when it does; a payload whose output cannot be allocated is a DecodeError
that leaves an Aggregator as it was.

The bombs are hand-built (conftest Wire): a 46-byte payload declaring a sparse
float32 tensor of 2^32 - 1 elements (16 GiB), a 2 KiB zstd payload whose dense
1-bit values are a constant (4 GiB of float64), and a 146-byte random-k payload
of float16[151, 1048576]. Each is refused under the default limits while the
address space is capped (conftest memory_cap), so an attempt to allocate its
output fails the test; scaled-down versions decode when the caller raises the
limit.
"""

from __future__ import annotations

import math
import re
import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import fedpress as fp
import numpy as np
import pytest
from fedpress import aggregate
from fedpress.codec import EDEN_MODES, EDEN_STAGES, VALUE_STAGES
from fedpress.format import decoding, reader
from fedpress.format.eden import EdenSection
from hypothesis import given
from hypothesis import strategies as st

DEFAULT = fp.Limits()
FLOOR = 1 << 20  # docs/format.md, "Expansion bound"
SEED = 5
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="memory_cap needs RLIMIT_AS")


def f32(*values) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def output_bytes(table) -> int:
    """The dense output a table declares, as docs/format.md counts it (bfloat16 decodes to 4 bytes)."""
    return sum(math.prod(shape) * (4 if dtype == "bfloat16" else np.dtype(dtype).itemsize) for _, dtype, shape in table)


# ------------------------------------------------------------------ bombs --
def sparse_bomb(W, n: int = 2**32 - 1) -> bytes:
    """A seeded sparse float32 tensor of n elements with a single fp32 value."""
    return W.wrap(
        W.body([W.tensor("w", "float32", (n,), W.SEEDED, count=1, value_data=f32(1.0))], spec="randk"), seed=SEED
    )


def constant_bomb(W, n: int = 1 << 29) -> bytes:
    """A dense float64 tensor of n sign values that are all +0.5 (one scale, every bit set): zstd stores
    the n/8 bytes of codes in about n/2^18 bytes."""
    section = f32(0.5) + b"\xff" * (n // 8)
    body = W.body(
        [W.tensor("w", "float64", (n,), W.DENSE, values="sign", bucket=2**32 - 1, value_data=section)], spec="sign+zstd"
    )
    return W.wrap(body, zstd_level=1, seed=SEED)


def half_bomb(W, columns: int = 1 << 20, count: int = 47) -> bytes:
    """float16[151, columns] from ``count`` random-k fp16 values of 1.0."""
    t = W.tensor("w", "float16", (151, columns), W.SEEDED, values="fp16", count=count, value_data=b"\x00\x3c" * count)
    return W.wrap(W.body([t], spec="randk:1e-6+fp16"), seed=SEED)


BOMBS = {  # name -> (builder, declared table, bytes at most)
    "sparse 2^32-1 float32": (sparse_bomb, [("w", "float32", (2**32 - 1,))], 47),
    "dense constant float64 under zstd": (constant_bomb, [("w", "float64", (1 << 29,))], 2200),
    "float16[151, 1048576] from random-k": (half_bomb, [("w", "float16", (151, 1 << 20))], 146),
}
# Smaller versions, each still beyond the default bound, whose output fits a test's memory.
SCALED = {
    "sparse 2^24 float32": (lambda W: sparse_bomb(W, 1 << 24), [("w", "float32", (1 << 24,))]),
    "dense constant 2^25 float64": (lambda W: constant_bomb(W, 1 << 25), [("w", "float64", (1 << 25,))]),
    "float16[151, 262144]": (lambda W: half_bomb(W, 1 << 18, count=10), [("w", "float16", (151, 1 << 18))]),
}


def bound_message(data: bytes, table) -> str:
    """What the refusal must say: the payload's size, its declared output, the tensor and the bound."""
    declared = output_bytes(table)
    name, dtype, shape = table[0]
    bound = max(FLOOR, DEFAULT.max_expansion * len(data))
    return (
        rf"payload of {len(data)} bytes declares {declared} bytes of output \(tensor '{name}', {dtype} "
        rf"{re.escape(str(shape))}: {declared} bytes\), beyond its bound of {bound} bytes"
    )


@pytest.mark.parametrize("what", list(BOMBS))
def test_bombs_are_what_they_claim(what: str, wire) -> None:
    """Small payloads that declare gigabytes: well beyond the default bound."""
    build, table, at_most = BOMBS[what]
    data = build(wire)
    assert len(data) <= at_most
    assert output_bytes(table) > DEFAULT.max_expansion * len(data)
    assert output_bytes(table) >= 300 << 20
    info = fp.inspect(data, limits=fp.Limits(max_expansion=1 << 30))
    assert [(t["name"], t["dtype"], tuple(t["shape"])) for t in info["tensors"]] == table


@pytest.mark.parametrize("what", list(BOMBS))
def test_bombs_are_refused_under_the_default_limits(what: str, wire, memory_cap) -> None:
    build, table, _ = BOMBS[what]
    data = build(wire)
    message = bound_message(data, table)
    agg = fp.Aggregator()
    with memory_cap():
        for call in (fp.decode, fp.inspect, agg.add):
            with pytest.raises(fp.DecodeError, match=message):
                call(data)
    assert agg.count == 0
    with pytest.raises(ValueError, match="no payload was added"):
        agg.result()


@pytest.mark.parametrize("what", list(SCALED))
def test_legit_but_large_payloads_decode_with_a_raised_limit(what: str, wire, memory_cap) -> None:
    build, table = SCALED[what]
    data = build(wire)
    with memory_cap():
        with pytest.raises(fp.DecodeError, match=bound_message(data, table)):
            fp.decode(data)
    raised = fp.Limits(max_expansion=output_bytes(table) // len(data) + 1)
    out = fp.decode(data, limits=raised)
    ((name, dtype, shape),) = table
    arr = out[name]
    assert arr.dtype == np.dtype(dtype) and arr.shape == shape
    if "constant" in what:
        assert np.all(arr == 0.5)
    else:  # random-k: the values sent, zero elsewhere
        count = 1 if "sparse" in what else 10
        assert np.count_nonzero(arr) == count and set(np.unique(arr).tolist()) == {0.0, 1.0}
    if "constant" not in what:  # the aggregator too (its float32 sums of the dense tensor would be 128 MiB more)
        agg = fp.Aggregator(limits=raised)
        agg.add(data)
        np.testing.assert_array_equal(agg.result()[name], arr)


def test_the_bound_is_exact_and_has_a_floor(wire) -> None:
    """Declared output == max(FLOOR, max_expansion * payload bytes) decodes; one byte more is refused."""
    data = half_bomb(wire, 8192)
    declared = 151 * 8192 * 2
    assert declared > FLOOR
    at = -(-declared // len(data))  # the smallest max_expansion whose bound holds the output
    assert fp.decode(data, limits=fp.Limits(max_expansion=at))["w"].shape == (151, 8192)
    with pytest.raises(fp.DecodeError, match=rf"Limits.max_expansion = {at - 1} per payload byte"):
        fp.decode(data, limits=fp.Limits(max_expansion=at - 1))
    # Below the floor any payload decodes, whatever max_expansion says.
    columns = FLOOR // (151 * 2)
    small = half_bomb(wire, columns)
    assert fp.decode(small, limits=fp.Limits(max_expansion=0))["w"].shape == (151, columns)
    with pytest.raises(fp.DecodeError, match=f"at least {FLOOR}"):
        fp.decode(half_bomb(wire, columns + 1), limits=fp.Limits(max_expansion=0))


def test_the_bound_counts_every_tensor_and_names_the_largest(wire) -> None:
    tensors = [
        wire.tensor(name, "float32", (n,), wire.SEEDED, count=1, value_data=f32(1.0))
        for name, n in (("a", 1 << 20), ("b", 3 << 20), ("c", 1 << 20))
    ]
    data = wire.wrap(wire.body(tensors, spec="randk"))
    limits = fp.Limits(max_expansion=(4 << 22) // len(data))  # a bound below the 20 MiB declared
    with pytest.raises(
        fp.DecodeError,
        match=rf"declares {5 << 22} bytes of output \(tensor 'b', float32 "
        rf"\({3 << 20},\): {3 << 22} bytes\)",
    ):
        fp.decode(data, limits=limits)
    assert set(fp.decode(data, limits=fp.Limits(max_expansion=(5 << 22) // len(data) + 1))) == {"a", "b", "c"}


def test_structural_defects_are_named_before_the_bound(wire) -> None:
    """The bound is checked on the whole table: a later malformed entry is reported as such."""
    huge = wire.tensor("w", "float32", (2**32 - 1,), wire.SEEDED, count=1, value_data=f32(1.0))
    bad = wire.tensor("x", "float32", (4,), wire.DENSE, value_data=f32(1, 2, 3, 4), flags=0x80)
    with pytest.raises(fp.DecodeError, match="unknown entry flags 0x80"):
        fp.decode(wire.wrap(wire.body([huge, bad], spec="randk")))


def test_limits_validate_max_expansion() -> None:
    assert DEFAULT.max_expansion == 1 << 20
    for bad in (-1, 1.5, None):
        with pytest.raises(ValueError, match="max_expansion"):
            fp.Limits(max_expansion=bad)


# ------------------------------------------------------- the known model --
@pytest.mark.parametrize("what", list(BOMBS))
def test_a_known_model_refuses_tables_that_differ(what: str, wire, memory_cap) -> None:
    """Given the receiver's model, the payload's table must be the model's: the model sets the sizes."""
    build, table, _ = BOMBS[what]
    data = build(wire)
    ((name, dtype, shape),) = table
    model = [(name, dtype, (1000,))]
    differs = re.escape(
        f"tensor table differs from the receiver's model: '{name}' {dtype} {shape}, expected '{name}' {dtype} (1000,)"
    )
    first = fp.Codec("fp32").encode({name: np.ones(1000, dtype)}, seed=1)
    learned = fp.Aggregator()
    learned.add(first)  # knows its table from its first payload
    before = learned.result()
    with memory_cap():
        for call in (
            lambda p: fp.decode(p, table=model),
            lambda p: fp.inspect(p, table=model),
            fp.Aggregator(table=model).add,
            learned.add,
        ):
            with pytest.raises(fp.DecodeError, match=differs):
                call(data)
        with pytest.raises(fp.DecodeError, match="1 tensors, expected 2"):  # checked before any entry is read
            fp.decode(data, table=model + [("v", "float32", (3,))])
    assert learned.count == 1
    np.testing.assert_array_equal(learned.result()[name], before[name])


def test_a_digest_payload_declaring_a_huge_model_needs_that_model(wire, memory_cap) -> None:
    huge = [("w", "float32", (2**32 - 1,))]
    spec = b"randk"
    body = (
        wire.varint(len(spec))
        + spec
        + fp.table_digest(huge)
        + wire.varint(1)
        + bytes((wire.SEEDED, 0, 0))
        + b"".join(wire.varint(v) for v in (1, 0, 0, 0, 4))
        + f32(1.0)
    )
    data = wire.wrap(body, flags=0x02, seed=SEED)
    with memory_cap():
        with pytest.raises(fp.DecodeError, match="omits its tensor table"):
            fp.decode(data)
        with pytest.raises(fp.DecodeError, match="does not match the receiver's model"):
            fp.decode(data, table=[("w", "float32", (1000,))])


@pytest.mark.parametrize("what", list(SCALED))
def test_a_known_model_bounds_the_output_instead(what: str, wire) -> None:
    """The receiver that passes its model already holds that much: no expansion bound then."""
    build, table = SCALED[what]
    data = build(wire)
    with pytest.raises(fp.DecodeError, match="beyond its bound"):
        fp.inspect(data)
    assert fp.inspect(data, table=table)["tensors"][0]["shape"] == list(table[0][2])
    if "constant" in what:
        return  # decoding it is test_legit_but_large_payloads_decode_with_a_raised_limit's
    expected = fp.decode(data, limits=fp.Limits(max_expansion=1 << 30))
    np.testing.assert_array_equal(fp.decode(data, table=table)["w"], expected["w"])
    agg = fp.Aggregator(table=table)
    agg.add(data)
    np.testing.assert_array_equal(agg.result()["w"], expected["w"])


def test_an_aggregator_that_learned_its_table_takes_what_fits_it(wire) -> None:
    n = 1 << 22
    data = sparse_bomb(wire, n)
    limits = fp.Limits(max_expansion=1 << 16)  # the 16 MiB output is beyond this bound for 45 bytes
    agg = fp.Aggregator(limits=limits)
    with pytest.raises(fp.DecodeError, match="beyond its bound"):
        agg.add(data)
    dense = fp.Codec("q8").encode({"w": np.zeros(n, np.float32)}, seed=1)  # a payload of the model's size
    agg.add(dense)
    agg.add(data)
    assert agg.count == 2 and np.count_nonzero(agg.result()["w"]) == 1


# --------------------------------------------------------- out of memory --
@linux_only
def test_an_output_beyond_memory_is_a_decode_error(wire, memory_cap) -> None:
    """Within raised limits, the 16 GiB output cannot be allocated under a 2 GiB cap."""
    data = sparse_bomb(wire)
    limits = fp.Limits(max_expansion=1 << 30)
    agg = fp.Aggregator(limits=limits)
    with memory_cap():
        with pytest.raises(fp.DecodeError, match="the payload's output could not be allocated"):
            fp.decode(data, limits=limits)
        with pytest.raises(fp.DecodeError, match="the payload's output could not be allocated"):
            agg.add(data)
        assert fp.inspect(data, limits=limits)["tensors"][0]["raw_bytes"] == 4 * (2**32 - 1)
    assert agg.count == 0
    small = sparse_bomb(wire, 1000)  # the aggregator is still empty, not half-set-up
    agg.add(small)
    np.testing.assert_array_equal(agg.result()["w"], fp.decode(small)["w"])


def test_memory_errors_while_decoding_are_decode_errors(monkeypatch) -> None:
    data = fp.Codec("topk:0.1+q4+zstd").encode({"w": np.linspace(-1, 1, 1000, dtype=np.float32)}, seed=1)

    def no_memory(*args, **kwargs):
        raise MemoryError("injected")

    monkeypatch.setattr(reader, "_unzstd", no_memory)
    for call in (fp.decode, fp.inspect, fp.format.payload_table_digest, fp.Aggregator().add):
        with pytest.raises(fp.DecodeError, match=r"the payload's output could not be allocated \(injected\)"):
            call(data)
    monkeypatch.undo()
    monkeypatch.setattr(decoding, "sparse_parts", no_memory)
    monkeypatch.setattr(decoding, "index_stream", no_memory)  # a version 2 sparse tensor's path
    monkeypatch.setattr(decoding, "index_streams", no_memory)  # a model's version 2 sparse tensors
    with pytest.raises(fp.DecodeError, match="could not be allocated"):
        fp.decode(data)


class FailingAllocations:
    """Counts the allocations Aggregator.add makes through numpy's constructors and the
    decoding helpers it calls, and raises MemoryError at the one numbered ``fail_at``."""

    HELPERS = ("parse", "sparse_parts", "raw_array")
    NUMPY = ("zeros", "empty", "concatenate")

    def __init__(self, fail_at: int = -1) -> None:
        self.fail_at, self.calls = fail_at, 0

    def tick(self) -> None:
        n, self.calls = self.calls, self.calls + 1
        if n == self.fail_at:
            raise MemoryError("injected")

    def counted(self, fn):
        def run(*args, **kwargs):
            self.tick()
            return fn(*args, **kwargs)

        return run

    @contextmanager
    def installed(self, monkeypatch) -> Iterator[None]:
        injector = self

        class CountingNumpy:
            def __getattr__(self, name):
                attr = getattr(np, name)
                return injector.counted(attr) if name in FailingAllocations.NUMPY else attr

        with monkeypatch.context() as m:
            m.setattr(aggregate, "np", CountingNumpy())
            for name in self.HELPERS:
                m.setattr(aggregate, name, self.counted(getattr(aggregate, name)))
            # What allocates an eden section's outlier correction (made once, before the sums change).
            m.setattr(EdenSection, "_outlier_codes", self.counted(EdenSection._outlier_codes))
            yield


def mixed_update(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "conv.w": rng.standard_normal((16, 3, 3, 3)).astype(np.float32),
        "fc.w": rng.standard_normal((40, 50)).astype(np.float32),
        "fc.b": rng.standard_normal(50).astype(np.float16),
        "steps": np.array([3, 4], np.int64),
        "mask": np.array([True, False, True]),
    }


def injection_payloads() -> dict:
    return {
        "sparse": fp.Codec("topk:0.2+q4").encode(mixed_update(1), seed=1),
        "dense": fp.Codec("fp32+zstd").encode(mixed_update(2), seed=2),
        "seeded": fp.Codec("randk:0.3+fp16").encode(mixed_update(3), seed=3),
        "rotated": fp.Codec("eden4:shared").encode(mixed_update(4), seed=4, rotation_seed=11),
    }


def state(agg: fp.Aggregator) -> tuple:
    return agg.count, agg.total_weight, (agg.result() if agg.count else None)


def assert_same_state(got: tuple, expected: tuple) -> None:
    assert got[:2] == expected[:2]
    if expected[2] is None:
        assert got[2] is None
        return
    assert list(got[2]) == list(expected[2])
    for name in expected[2]:
        np.testing.assert_array_equal(got[2][name], expected[2][name], err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("primed", [False, True], ids=["empty", "primed"])
def test_a_failed_allocation_leaves_the_aggregate_unchanged(dtype, primed: bool, monkeypatch) -> None:
    """MemoryError at each allocation of an add in turn: a DecodeError, the sums as they were,
    and the same add then succeeds with the sums a clean run gives (bit for bit)."""
    payloads = injection_payloads()

    def start() -> fp.Aggregator:
        agg = fp.Aggregator(dtype=dtype)
        if primed:  # sums, and rotated-domain sums under the same rotation, already there
            agg.add(payloads["rotated"], 0.5)
            agg.add(payloads["sparse"], 1.5)
        return agg

    for what, data in payloads.items():
        reference = start()
        counter = FailingAllocations()
        with counter.installed(monkeypatch):
            reference.add(data, 2.0)
        assert counter.calls >= 2, what
        for fail_at in range(counter.calls):
            agg = start()
            before = state(agg)
            with FailingAllocations(fail_at).installed(monkeypatch):
                with pytest.raises(fp.DecodeError, match=r"could not be allocated \(injected\)"):
                    agg.add(data, 2.0)
            assert_same_state(state(agg), before)
            agg.add(data, 2.0)
            assert_same_state(state(agg), state(reference))


# ------------------------------------------------- legit payloads still fit --
# The specs the project names (tests, benchmarks, README cells), and the extremes of the grammar.
PROJECT_SPECS = [
    "fp32",
    "fp16",
    "bf16",
    "q8",
    "q4",
    "q2",
    "sign",
    "q8+zstd",
    "q8+zstd:3",
    "rht+q2+zstd",
    "eden1",
    "eden2:mse",
    "eden3+zstd",
    "eden4",
    "eden4:shared",
    "eden8",
    "topk:1",
    "topk:0.3+sign",
    "topk:0.25+bf16+zstd",
    "topk:0.2+q8",
    "topk:0.2+q8+zstd:1",
    "topk:0.1+fp16",
    "topk:0.1+rht+q8",
    "topk:0.1+eden4",
    "topk:0.1+eden2:mse",
    "topk:0.1+q8+zstd",
    "topk:0.05+sign",
    "topk:0.05+q4+zstd",
    "topk:0.02+q2+zstd",
    "topk:0.01",
    "topk:0.01+q4",
    "topk:0.01+q4+zstd",
    "topk:0.01+q8",
    "topk:0.01+q8+zstd",
    "topk:0.01+sign+zstd",
    "topk:0.004+sign+zstd",
    "topk:0.0023+sign+zstd",
    "topk:0.001+q4+zstd",
    "thresh:0.2",
    "thresh:0.1+bf16",
    "thresh:0.05+q8",
    "thresh:0.01+q4+zstd",
    "randk:0.5+rht+fp32",
    "randk:0.3+q2",
    "randk:0.3+q2+zstd",
    "randk:0.2+eden2",
    "randk:0.1+fp16",
    "randk:0.01+fp16",
    # the most output per payload byte: 1-bit values at a sparsity of 10^-4
    "topk:0.0001+sign+zstd",
    "topk:0.0001+eden1",
    "thresh:0.0001+sign",
    "randk:0.0001+sign",
    "randk:0.0001+eden1",
    "randk:0.0001+rht+sign+zstd",
    "randk:0.0001+eden1:shared",
]


def cnn_update(dtype, seed: int = 0, wide: int = 1 << 20) -> dict:
    """An update shaped like a small CNN's with one wide layer: 1.1 M parameters by default."""
    rng = np.random.default_rng(seed)
    shapes = {
        "conv1.weight": (32, 1, 3, 3),
        "conv1.bias": (32,),
        "conv2.weight": (64, 32, 3, 3),
        "conv2.bias": (64,),
        "fc1.weight": (wide,),
        "fc1.bias": (128,),
        "fc2.weight": (10, 128),
        "fc2.bias": (10,),
    }
    update = {name: (rng.standard_normal(shape) * 0.01).astype(dtype) for name, shape in shapes.items()}
    update["bn.num_batches_tracked"] = np.array(100, np.int64)
    return update


def update_table(update: dict) -> list:
    return [(name, a.dtype.name, a.shape) for name, a in update.items()]


@pytest.fixture(scope="module")
def cnn() -> dict:
    return cnn_update(np.float32)


@pytest.mark.parametrize("table", ["inline", "digest"])
@pytest.mark.parametrize("spec", PROJECT_SPECS)
def test_project_codecs_decode_under_the_default_limits(spec: str, table: str, cnn: dict) -> None:
    data = fp.Codec(spec, table=table).encode(cnn, seed=7)
    model = update_table(cnn) if table == "digest" else None
    ratio = output_bytes(update_table(cnn)) / len(data)
    assert ratio <= DEFAULT.max_expansion / 2, f"{spec}: {ratio:.0f} output bytes per payload byte"
    assert list(fp.decode(data, table=model)) == list(cnn)
    assert fp.inspect(data, table=model)["codec"] == str(fp.parse_spec(spec))
    fp.Aggregator(table=model).add(data)


@pytest.mark.parametrize("spec", ["randk:0.0001+sign", "randk:0.0001+eden1"])
def test_the_worst_codec_on_a_large_float64_tensor_fits(spec: str) -> None:
    """The case the default was chosen for: 1/8 byte per kept value, each standing for 10^4 float64
    elements (about 635,000x as tensors grow; 128 MiB here)."""
    n = 1 << 24
    update = {"w": np.random.default_rng(3).standard_normal(n), "b": np.zeros(10)}
    data = fp.Codec(spec).encode(update, seed=1)
    ratio = output_bytes(update_table(update)) / len(data)
    assert 250_000 < ratio < DEFAULT.max_expansion, ratio
    out = fp.decode(data)
    assert out["w"].dtype == np.float64 and out["w"].shape == (n,)
    assert 0 < np.count_nonzero(out["w"]) <= round(1e-4 * n)  # the kept values, at seeded positions


@st.composite
def codec_specs(draw) -> str:
    """A spec of the grammar (python/fedpress/codec.py) at a sparsity down to 10^-4."""
    parts = []
    sparsifier = draw(st.sampled_from([None, "topk", "thresh", "randk"]))
    if sparsifier:
        parts.append(f"{sparsifier}:{draw(st.sampled_from([0.0001, 0.001, 0.01, 0.1, 0.5, 1.0]))}")
    values = draw(st.sampled_from(VALUE_STAGES))
    if values in EDEN_STAGES:
        mode = draw(st.sampled_from([None, *EDEN_MODES]))
        values = f"{values}:{mode}" if mode else values
    elif draw(st.booleans()):
        parts.append("rht")
    parts.append(values)
    zstd = draw(st.sampled_from([None, "zstd", "zstd:1"]))  # plain zstd picks level 19 for small bodies
    return "+".join(parts + ([zstd] if zstd else []))


@given(
    spec=codec_specs(),
    table=st.sampled_from(["inline", "digest"]),
    dtype=st.sampled_from([np.float32, np.float64, np.float16]),
    wide=st.integers(1 << 12, 1 << 21),
    seed=st.integers(0, 2**32 - 1),
)
def test_codec_payloads_stay_within_the_default_bound(spec: str, table: str, dtype, wide: int, seed: int) -> None:
    """Whatever a codec makes of a realistic update decodes under the default limits, with half
    the default expansion to spare (the worst codec approaches the bound only on huge tensors)."""
    update = cnn_update(dtype, seed % 1000, wide)
    data = fp.Codec(spec, table=table).encode(update, seed=seed)
    model = update_table(update) if table == "digest" else None
    ratio = output_bytes(update_table(update)) / len(data)
    assert ratio <= DEFAULT.max_expansion / 2, f"{spec} ({table}): {ratio:.0f} output bytes per payload byte"
    out = fp.decode(data, table=model)
    assert [(k, v.dtype.name, v.shape) for k, v in out.items()] == update_table(update)
    fp.inspect(data, table=model)
    fp.Aggregator(table=model).add(data)
