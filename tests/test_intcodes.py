"""The intB value stage (format.intcodes, csrc/intcode.cpp): codes that add up. The
Aggregator's integer sum is exact in any order and equals the plain sum of the codes;
secure aggregation's masks, added modulo 2^m, come out again with the correction."""

from __future__ import annotations

import fedpress as fp
import numpy as np
import pytest
from conftest import num_threads
from fedpress import _core
from fedpress.format.intcodes import centered, modulus_bits, parse_int
from fedpress.format.reader import parse


def updates(n_clients: int, seed: int = 0, scale: float = 0.003) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "w": (rng.standard_normal((61, 37)) * scale).astype(np.float32),
            "b": (rng.standard_normal(37) * scale).astype(np.float32),
        }
        for _ in range(n_clients)
    ]


def codes_of(payload: bytes) -> dict[str, np.ndarray]:
    return {rec.name: rec.intcode.codes() for rec in parse(payload).tensors}


# ------------------------------------------------------------------ kernels --
@pytest.mark.parametrize("width", [1, 2, 3, 7, 8, 9, 13, 16, 17, 31, 32, 33, 48, 55, 56])
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 65_536 + 13])
def test_pack_unpack_round_trip(width: int, n: int) -> None:
    rng = np.random.default_rng(width * 1000 + n)
    codes = rng.integers(0, 1 << width, size=n, dtype=np.uint64)
    packed = _core.pack_codes(codes, width)
    assert packed.size == (n * width + 7) // 8
    # LSB first: the bit stream numpy would build, bit by bit
    bits = ((codes[:, None] >> np.arange(width, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8).reshape(-1)
    np.testing.assert_array_equal(packed, np.packbits(bits, bitorder="little"))
    for threads in (1, 2):
        with num_threads(threads):
            np.testing.assert_array_equal(_core.unpack_codes(packed, n, width), codes)


def test_pack_refuses_wide_codes_and_unpack_bad_padding() -> None:
    with pytest.raises(ValueError, match="does not fit in 4 bits"):
        _core.pack_codes(np.array([3, 16], np.uint64), 4)
    with pytest.raises(ValueError, match="width"):
        _core.pack_codes(np.zeros(3, np.uint64), 57)
    with pytest.raises(fp.DecodeError, match="padding"):
        _core.unpack_codes(bytes([0x00, 0x10]), 3, 4)  # 12 bits used of 16
    with pytest.raises(fp.DecodeError, match="need 2"):
        _core.unpack_codes(bytes(3), 3, 4)


def numpy_int_values(codes: np.ndarray, m: int, step: float, offset: float, weight: float) -> np.ndarray:
    """What IntSection.values computed in numpy before _core.int_values fused it."""
    total = centered(codes, m) if m else codes.astype(np.int64)
    return ((total.astype(np.float64) * step - offset) * weight).astype(np.float32)


@pytest.mark.parametrize(
    ("width", "m"),
    # below 8, every width (a table of the levels, groups of eight codes); then the byte, 16-bit
    # and bit-stream paths
    [(1, 0), (2, 0), (3, 3), (4, 0), (4, 4), (5, 0), (5, 5), (6, 6), (7, 0), (7, 7)]
    + [(8, 0), (16, 0), (9, 9), (17, 17), (33, 33), (56, 56)],
)
@pytest.mark.parametrize("n", [0, 1, 7, 9, 65_536 * 2 + 5])
@pytest.mark.parametrize("threads", [1, 2])
def test_int_values_are_numpys_bit_for_bit(width: int, m: int, n: int, threads: int) -> None:
    """The fused kernel against the numpy steps it replaces: every code read as a residue
    around the wrap-around point too, odd steps, offsets and weights."""
    rng = np.random.default_rng(width * 7 + n)
    codes = rng.integers(0, 1 << width, size=n, dtype=np.uint64)
    if m and n:  # the codes around 2^m - 2^(m-2), where residues start to read as negative
        edge = (1 << m) - (1 << (m - 2))
        codes[: min(n, 4)] = np.array([edge - 1, edge, edge + 1, (1 << m) - 1], np.uint64)[: min(n, 4)]
    packed = _core.pack_codes(codes, width)
    for step, offset, weight in [(2 * 0.1 / 255, 3 * 0.1, 1 / 3), (1.0, 0.0, 1.0), (np.pi / 7, -2.5, 1 / 7)]:
        with num_threads(threads):
            got = _core.int_values(packed, n, width, m, step, offset, weight)
        assert got.dtype == np.float32 and got.tobytes() == numpy_int_values(codes, m, step, offset, weight).tobytes()


@pytest.mark.parametrize("m", [0, 12, 40])
def test_a_sums_values_are_the_levels_of_its_centered_residues(m: int) -> None:
    """What the Aggregator's int sum decodes (values_of_residues, one pass over the uint64
    sum) is IntLevels.values of the residues read by centered, bit for bit."""
    from fedpress.format.intcodes import IntLevels

    levels = IntLevels(bits=8, clip=0.05, modulus_bits=m or 12, rotation_seed=77, block=1 << 10)
    rng = np.random.default_rng(m)
    residues = rng.integers(0, 1 << (m or 20), 5000, dtype=np.uint64)
    total = centered(residues, m) if m else residues.astype(np.int64)
    want = levels.values(total, 7, 1 / 3)
    assert levels.values_of_residues(residues, m, 7, 1 / 3).tobytes() == want.tobytes()
    packed = _core.pack_codes(residues, m or 20)
    assert levels.values_of_packed(packed, residues.size, m or 20, m, 7, 1 / 3).tobytes() == want.tobytes()


def test_int_values_refuses_what_unpack_codes_refuses() -> None:
    with pytest.raises(fp.DecodeError, match="padding"):
        _core.int_values(bytes([0x00, 0x10]), 3, 4, 0, 1.0, 0.0, 1.0)
    with pytest.raises(fp.DecodeError, match="need 2"):
        _core.int_values(bytes(3), 3, 4, 0, 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="width"):
        _core.int_values(bytes(8), 1, 57, 0, 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="modulus_bits"):
        _core.int_values(bytes(1), 1, 4, 63, 1.0, 0.0, 1.0)


@pytest.mark.parametrize("spec", ["int8", "int4", "int2:clip=0.01", "int16"])
def test_an_int_payload_decodes_as_its_levels_say(spec: str) -> None:
    """decode of an unmasked int payload: the section's levels applied to its codes, as a
    sum of one client, then the inverse rotation (what IntLevels.values gives)."""
    payload = fp.Codec(spec).encode(updates(1, seed=4)[0], seed=9)
    out = fp.decode(payload)
    for rec in parse(payload).tensors:
        section = rec.intcode
        want = section.levels.values(section.codes().astype(np.int64), 1, 1.0)
        assert out[rec.name].reshape(-1).tobytes() == want.tobytes()


def test_int_encode_is_unbiased_and_clipped() -> None:
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.uniform(-1, 1, 2000), [5.0, -5.0, np.inf, -np.inf]]).astype(np.float32)
    step = 2.0 / 15
    mean = np.mean([_core.int_encode(x, 4, 1.0, s).astype(np.float64) * step - 1.0 for s in range(400)], axis=0)
    assert np.abs(mean[:2000] - x[:2000]).max() < 4 * step / np.sqrt(400)  # unbiased within the range
    np.testing.assert_array_equal(mean[2000:], [1.0, -1.0, 1.0, -1.0])  # clipped
    codes = _core.int_encode(x, 4, 1.0, 3)
    assert codes.max() <= 15 and np.all(np.abs(codes * step - 1.0 - np.clip(x, -1, 1)) < step + 1e-6)
    with num_threads(1):
        np.testing.assert_array_equal(_core.int_encode(x, 4, 1.0, 3), codes)  # the same on any thread count
    with pytest.raises(ValueError, match="NaN"):
        _core.int_encode(np.array([0.0, np.nan], np.float32), 4, 1.0, 0)
    with pytest.raises(ValueError, match="clip"):
        _core.int_encode(x, 4, 0.0, 0)


def test_eden_rotate_is_undone_by_eden_unrotate() -> None:
    x = np.random.default_rng(2).standard_normal(100_003).astype(np.float32)
    y = x.copy()
    _core.eden_rotate(y, 1 << 12, 77)
    assert np.isclose(np.linalg.norm(y), np.linalg.norm(x), rtol=1e-5) and not np.allclose(y, x)
    _core.eden_unrotate(y, 1 << 12, 77)
    np.testing.assert_allclose(y, x, atol=1e-5)


# -------------------------------------------------------------------- codec --
def test_decode_is_within_a_step_and_unbiased() -> None:
    update = updates(1)[0]
    codec = fp.Codec("int6:clip=0.02")
    step = 0.04 / 63
    decoded = [fp.decode(codec.encode(update, seed=s)) for s in range(60)]
    for name, x in update.items():
        mean = np.mean([d[name] for d in decoded], axis=0)
        assert np.abs(mean - x).max() < 3 * step  # rotated rounding errors average out
        assert decoded[0][name].shape == x.shape and decoded[0][name].dtype == np.float32


def test_wire_bits_per_coordinate() -> None:
    update = updates(1)[0]
    n = sum(v.size for v in update.values())
    plain = fp.Codec("int4:nmax=100").encode(update)
    masked = fp.Codec("int4:nmax=100").encode(update, mask=lambda c: c)
    m = modulus_bits(4, 100)
    assert m == 4 + 7 + 1
    sections = {rec.name: rec.value_len for rec in parse(plain).tensors}
    assert sum(sections.values()) == sum(16 + (v.size * 4 + 7) // 8 for v in update.values())
    assert sum(rec.value_len for rec in parse(masked).tensors) == sum(
        16 + (v.size * m + 7) // 8 for v in update.values()
    )
    assert len(masked) - len(plain) == sum((v.size * m + 7) // 8 - (v.size * 4 + 7) // 8 for v in update.values())
    assert n > 0


def test_int_spec_options_and_refusals() -> None:
    update = updates(1)[0]
    with pytest.raises(ValueError, match="mask is for intB"):
        fp.Codec("q4").encode(update, mask=lambda c: c)
    with pytest.raises(ValueError, match="different subset per client"):
        fp.Codec("randk:0.1+int4").encode(update, mask=lambda c: c)
    with pytest.raises(ValueError, match="float tensors only"):
        fp.Codec("int4").encode({**update, "steps": np.array([3])}, mask=lambda c: c)
    with pytest.raises(ValueError, match="uint64 array"):
        fp.Codec("int4").encode(update, mask=lambda c: c.astype(np.int64))
    with pytest.raises(ValueError, match="residues modulo 2"):
        fp.Codec("int4").encode(update, mask=lambda c: c + np.uint64(1 << 40))
    with pytest.raises(ValueError, match="NaN"):
        fp.Codec("int4").encode({"w": np.array([1.0, np.nan], np.float32)})
    with pytest.raises(ValueError, match="randk:R:shared or no sparsifier"):
        fp.Codec("topk:0.5+int8:clip=0.02")
    with pytest.raises(ValueError, match="is for intB values"):
        fp.Codec("randk:0.5:shared+q8")
    with pytest.raises(ValueError, match="needs intB values"):
        fp.Codec("randk:0.5:shared")
    with pytest.raises(ValueError, match="needs the round's rotation_seed"):
        fp.Codec("randk:0.5:shared+int8").encode(update, mask=lambda c: c)


# --------------------------------------------------------------- aggregator --
@pytest.mark.parametrize("spec", ["int2:clip=0.01", "int8:clip=0.02:nmax=10", "int16:clip=0.05+zstd"])
def test_integer_sum_is_exact_in_any_order(spec: str) -> None:
    ups = updates(9, seed=3)
    codec = fp.Codec(spec)
    payloads = [codec.encode(u, seed=i, rotation_seed=1234) for i, u in enumerate(ups)]
    one = fp.Aggregator()
    for p in payloads:
        one.add(p)
    many = fp.Aggregator()
    many.add_many(payloads[::-1])
    halves = fp.Aggregator()
    halves.add_many(payloads[:4])
    rest = fp.Aggregator()
    rest.add_many(payloads[4:])
    halves.merge(rest)
    results = [agg.result() for agg in (one, many, halves)]
    total = {name: sum(codes_of(p)[name].astype(np.int64) for p in payloads) for name in ("w", "b")}
    levels = {rec.name: rec.intcode.levels for rec in parse(payloads[0]).tensors}
    for name, x in ups[0].items():
        expected = (levels[name].values(total[name], len(payloads)) / np.float32(len(payloads))).reshape(x.shape)
        for r in results:
            np.testing.assert_array_equal(r[name], expected)  # bit for bit
        true_mean = np.mean([u[name] for u in ups], axis=0)
        step = 2 * levels[name].clip / ((1 << levels[name].bits) - 1)
        assert np.abs(results[0][name] - true_mean).max() < 2 * step


def test_masks_cancel_and_unmask_restores_the_plain_sum() -> None:
    ups = updates(6, seed=4)
    codec = fp.Codec("int4:clip=0.01:nmax=8")
    m = modulus_bits(4, 8)
    rng = np.random.default_rng(5)
    length = sum(v.size for v in ups[0].values())
    masks = [rng.integers(0, 1 << m, size=length, dtype=np.uint64) for _ in ups]
    modulus = np.uint64((1 << m) - 1)
    plain = [codec.encode(u, seed=i, rotation_seed=7) for i, u in enumerate(ups)]
    masked = [
        codec.encode(u, seed=i, rotation_seed=7, mask=lambda c, k=k: (c + k) & modulus)
        for i, (u, k) in enumerate(zip(ups, masks))
    ]
    for p, q, k in zip(plain, masked, masks):  # the same codes under the mask
        sent = np.concatenate([codes_of(q)["w"], codes_of(q)["b"]])
        own = np.concatenate([codes_of(p)["w"], codes_of(p)["b"]])
        np.testing.assert_array_equal((sent - k) & modulus, own)
    agg = fp.Aggregator()
    agg.add_many(masked[:3])
    for q in masked[3:]:
        agg.add(q)
    assert agg.masked_length == length
    with pytest.raises(ValueError, match="masked by secure aggregation"):
        agg.result()
    with pytest.raises(ValueError, match="uint64 values"):
        agg.unmask(np.zeros(length - 1, np.uint64))
    with pytest.raises(ValueError, match="residues"):
        agg.unmask(np.full(length, 1 << m, np.uint64))
    correction = np.zeros(length, np.uint64)
    for k in masks:
        correction = (correction + k) & modulus
    agg.unmask(correction)
    reference = fp.Aggregator()
    reference.add_many(plain)
    for name, value in reference.result().items():
        np.testing.assert_array_equal(agg.result()[name], value)
    with pytest.raises(fp.DecodeError, match="masked by secure aggregation"):
        fp.decode(masked[0])


def test_sums_that_do_not_add_up_are_refused_and_change_nothing() -> None:
    ups = updates(3, seed=6)
    base = fp.Codec("int8:clip=0.02")
    good = [base.encode(u, seed=i, rotation_seed=5) for i, u in enumerate(ups)]
    agg = fp.Aggregator()
    agg.add(good[0])
    before = agg.result()
    for other, what in [
        (fp.Codec("int8:clip=0.03").encode(ups[1], rotation_seed=5), "does not add up"),
        (base.encode(ups[1], rotation_seed=6), "does not add up"),  # another rotation
        (fp.Codec("int4:clip=0.02").encode(ups[1], rotation_seed=5), "does not add up"),
        (base.encode(ups[1], rotation_seed=5, mask=lambda c: c), "does not add up"),  # masked into a plain sum
    ]:
        with pytest.raises(fp.DecodeError, match=what):
            agg.add(other)
        with pytest.raises(fp.DecodeError, match=what):
            agg.add_many([good[1], other])
    with pytest.raises(ValueError, match="integer weights"):
        agg.add(good[1], weight=2.5)
    masked = fp.Aggregator()
    masked.add(base.encode(ups[0], rotation_seed=5, mask=lambda c: c))
    with pytest.raises(ValueError, match="cannot multiply them"):
        masked.add(base.encode(ups[1], rotation_seed=5, mask=lambda c: c), weight=2.0)
    assert agg.count == 1
    for name, value in agg.result().items():
        np.testing.assert_array_equal(value, before[name])


@pytest.mark.parametrize("copy", [True, False])
def test_float_and_int_payloads_of_a_tensor_combine_into_the_weighted_mean(copy: bool) -> None:
    """A server adds a zero-weight fp32 reference before the round's int payloads, and a
    round may mix codecs: the float sum and the integer sum combine in result()."""
    ups = updates(4, seed=8)
    ints = [fp.Codec("int8:clip=0.02").encode(u, seed=i, rotation_seed=3) for i, u in enumerate(ups[:3])]
    floats = fp.Codec("fp32").encode(ups[3])
    zero = fp.Codec("fp32").encode({k: np.zeros_like(v) for k, v in ups[0].items()})
    agg = fp.Aggregator()
    agg.add(zero, 0.0)
    agg.add_many(ints, [2.0, 2.0, 2.0])
    agg.add(floats, 1.0)
    got = agg.result(copy=copy)
    only_ints = fp.Aggregator()
    only_ints.add_many(ints)
    int_mean = only_ints.result()
    for name, x in ups[3].items():
        expected = (6.0 * int_mean[name] + x) / 7.0
        np.testing.assert_allclose(got[name], expected, rtol=1e-5, atol=1e-9)
    first_float = fp.Aggregator()
    first_float.add(floats)
    first_float.add_many(ints, [1.0, 1.0, 1.0])
    for name, x in ups[3].items():
        np.testing.assert_allclose(first_float.result()[name], (3 * int_mean[name] + x) / 4, rtol=1e-5, atol=1e-9)


def test_residues_read_as_signed_around_zero() -> None:
    m = 10
    r = np.array([0, 5, (1 << m) - 1, (1 << m) - (1 << (m - 2)), (1 << m) - (1 << (m - 2)) - 1], np.uint64)
    np.testing.assert_array_equal(centered(r, m), [0, 5, -1, -(1 << (m - 2)), (1 << m) - (1 << (m - 2)) - 1])


def test_malformed_int_sections_are_refused() -> None:
    payload = fp.Codec("int4").encode({"w": np.linspace(-0.01, 0.01, 13, dtype=np.float32)}, seed=1)
    rec = parse(payload).tensors[0]
    data = bytes(rec.value_data)
    assert parse_int(memoryview(data), 13, rec.rht_block).codes().size == 13
    for bad, what in [
        (bytes([0]) + data[1:], "bits 0"),
        (bytes([17]) + data[1:], "bits 17"),
        (data[:1] + bytes([4]) + data[2:], "modulus bits 4"),
        (data[:1] + bytes([57]) + data[2:], "modulus bits 57"),
        (data[:2] + bytes([5]) + data[3:], "width 5"),
        (data[:3] + bytes([0x80]) + data[4:], "unknown flags"),
        (data[:3] + bytes([0x01]) + data[4:], "masked codes"),
        (data[:4] + np.float32(-1).tobytes() + data[8:], "clip"),
        (data[:4] + np.float32(np.nan).tobytes() + data[8:], "clip"),
        (data[:-1], "truncated"),
        (data + b"\x00", "trailing"),
        (data[:-1] + bytes([data[-1] | 0xF0]), "padding"),
    ]:
        with pytest.raises(fp.DecodeError, match=what):
            parse_int(memoryview(bad), 13, rec.rht_block)


def test_integer_weights_weigh_exactly() -> None:
    """Plain codes take example counts as integer multipliers: the weighted mean, exact in
    any order, equal to repeating each payload its weight's times."""
    ups = updates(3, seed=9)
    codec = fp.Codec("int8:clip=0.02")
    payloads = [codec.encode(u, seed=i, rotation_seed=4) for i, u in enumerate(ups)]
    weighted = fp.Aggregator()
    weighted.add_many(payloads, [3.0, 1.0, 2.0])
    reordered = fp.Aggregator()
    for i in (2, 0, 1):
        reordered.add(payloads[i], [3.0, 1.0, 2.0][i])
    repeated = fp.Aggregator()
    repeated.add_many([payloads[0]] * 3 + [payloads[1]] + [payloads[2]] * 2)
    for name, value in repeated.result().items():
        np.testing.assert_array_equal(weighted.result()[name], value)
        np.testing.assert_array_equal(reordered.result()[name], value)
    big = fp.Aggregator()
    big.add(payloads[0], 2.0**32 - 1)
    with pytest.raises(ValueError, match="63 bits"):  # the sum of k * 255 would reach 2^63
        big._ints["w"].multiplier(2.0**32 - 1, (1 << 63) // 255 - 2**32)


def test_weighted_masked_codes_sum_as_the_plain_weighted_sum() -> None:
    """A client multiplies its codes by its weight before masking (the payload records it):
    the unmasked sum equals the plain sum weighted by the server, bit for bit."""
    ups = updates(3, seed=10)
    codec = fp.Codec("int6:clip=0.02:nmax=64")
    m = modulus_bits(6, 64)
    modulus = np.uint64((1 << m) - 1)
    weights = [5, 1, 30]
    rng = np.random.default_rng(11)
    length = sum(v.size for v in ups[0].values())
    masks = [rng.integers(0, 1 << m, size=length, dtype=np.uint64) for _ in ups]
    masked = [
        codec.encode(u, seed=i, rotation_seed=2, mask=lambda c, k=k: (c + k) & modulus, weight=w)
        for i, (u, k, w) in enumerate(zip(ups, masks, weights))
    ]
    plain = [codec.encode(u, seed=i, rotation_seed=2) for i, u in enumerate(ups)]
    assert [rec.intcode.weight for p in masked for rec in parse(p).tensors] == [5, 5, 1, 1, 30, 30]
    secure = fp.Aggregator()
    for p, w in zip(masked, weights):
        secure.add(p, float(w))
    correction = np.zeros(length, np.uint64)
    for k in masks:
        correction = (correction + k) & modulus
    secure.unmask(correction)
    reference = fp.Aggregator()
    reference.add_many(plain, [float(w) for w in weights])
    for name, value in reference.result().items():
        np.testing.assert_array_equal(secure.result()[name], value)
    with pytest.raises(ValueError, match="cannot multiply them"):
        fp.Aggregator().add_many(masked, [5.0, 1.0, 3.0])
    with pytest.raises(ValueError, match="nmax must be at least"):
        fp.Aggregator().add_many(masked * 3, [5.0, 1.0, 30.0] * 3)  # total weight 108, over nmax 64
    with pytest.raises(ValueError, match="weight must be an integer"):
        codec.encode(ups[0], mask=lambda c: c, weight=0)
    with pytest.raises(ValueError, match="weight is for masked"):
        codec.encode(ups[0], weight=3)


def test_weighted_sections_are_checked() -> None:
    payload = fp.Codec("int4:nmax=8").encode(
        {"w": np.linspace(-0.01, 0.01, 9, dtype=np.float32)}, mask=lambda c: c, weight=3
    )
    rec = parse(payload).tensors[0]
    data = bytes(rec.value_data)
    assert rec.intcode.weight == 3 and data[3] == 0x03  # masked, weighted
    for bad, what in [
        (data[:16] + (1).to_bytes(4, "little") + data[20:], "weight 1 is recorded only"),
        (data[:2] + bytes([4, 0x02]) + data[4:], "weighted codes are"),  # width b, unmasked
        (data[:18], "truncated"),
    ]:
        with pytest.raises(fp.DecodeError, match=what):
            parse_int(memoryview(bad), 9, rec.rht_block)


@pytest.mark.parametrize("masked", [False, True])
def test_shared_random_k_supports_add_up(masked: bool) -> None:
    """randk:R:shared+intB: every client of a round keeps the same entries (drawn from the
    round's seed), so their codes add up; the mean is the kept entries' mean, scattered."""
    ups = updates(4, seed=12)
    codec = fp.Codec("randk:0.25:shared+int8:clip=0.02:nmax=8")
    assert str(codec.spec) == "randk:0.25:shared+int8:clip=0.02:nmax=8"
    m = modulus_bits(8, 8)
    kept = {name: max(1, round(0.25 * v.size)) for name, v in ups[0].items()}
    length = sum(kept.values())
    rng = np.random.default_rng(13)
    masks = [rng.integers(0, 1 << m, size=length, dtype=np.uint64) for _ in ups]
    modulus = np.uint64((1 << m) - 1)
    payloads = [
        codec.encode(u, seed=i, rotation_seed=99, mask=(lambda c, k=k: (c + k) & modulus) if masked else None)
        for i, (u, k) in enumerate(zip(ups, masks))
    ]
    supports = [{rec.name: rec.intcode.support_seed for rec in parse(p).tensors} for p in payloads]
    assert all(s == supports[0] for s in supports)  # one support for the round
    agg = fp.Aggregator()
    agg.add_many(payloads)
    if masked:
        correction = np.zeros(length, np.uint64)
        for k in masks:
            correction = (correction + k) & modulus
        agg.unmask(correction)
    mean = agg.result()
    plain = [codec.encode(u, seed=i, rotation_seed=99) for i, u in enumerate(ups)]
    decoded = [fp.decode(p) for p in plain]
    for name in ups[0]:
        expected = np.mean([d[name] for d in decoded], axis=0)
        np.testing.assert_allclose(mean[name], expected, atol=1e-6)
        assert np.count_nonzero(mean[name]) <= kept[name]
    other_round = codec.encode(ups[0], seed=5, rotation_seed=100)
    with pytest.raises(fp.DecodeError, match="does not add up"):
        agg2 = fp.Aggregator()
        agg2.add_many([plain[0], other_round])


@pytest.mark.parametrize("clip", [1e30, 3e36, 1e38, 3e38])
def test_int_values_past_the_rotation_bound_are_checked(wire, clip: float) -> None:
    """The decoder skips the finiteness pass only where rotation_bound proves the inverse
    rotation cannot overflow; a clip that can overflow it still refuses non-finite values."""
    x = np.random.default_rng(3).uniform(-1, 1, 4096).astype(np.float32)
    payload = fp.Codec("int8:clip=1").encode({"w": x}, seed=1)
    rec = parse(payload, defer_checksum=True).tensors[0]
    bad = bytearray(payload)
    bad[rec.value_offset + 4 : rec.value_offset + 8] = np.float32(clip).tobytes()
    bad_payload = wire.fix_crc(bytes(bad))
    section = parse(bad_payload).tensors[0].intcode
    assert section is not None
    try:
        values = fp.decode(bad_payload)["w"]
    except fp.DecodeError as exc:
        assert section.rotation_bound() > 1e38 and "non-finite" in str(exc)
    else:
        assert np.all(np.isfinite(values))
        assert float(np.abs(values).max()) <= section.rotation_bound()


@pytest.mark.parametrize("spec", ["int2:clip=0.01", "int8:clip=0.02:nmax=10", "int16:clip=0.05"])
def test_rotation_bound_bounds_the_decoded_values(spec: str) -> None:
    rng = np.random.default_rng(8)
    for n in (1, 7, 1000, 70_000):
        x = (rng.standard_normal(n) * 0.05).astype(np.float32)
        section = parse(fp.Codec(spec).encode({"w": x}, seed=n)).tensors[0].intcode
        assert section is not None
        assert float(np.abs(section.values()).max()) <= section.rotation_bound() < 1e38


@pytest.mark.parametrize("threads", [1, 3])
def test_int_encode_rotates_a_range_at_a_time_as_eden_rotate_does(threads: int) -> None:
    """int_encode with a block codes x rotated as eden_rotate rotates a copy of it (no
    rotated copy made), into out when given; bad arguments are named."""
    from conftest import num_threads

    rng = np.random.default_rng(46)
    with num_threads(threads):
        for n in (0, 1, 7, 8, 1000, 4097, 70_001):
            for block in (1, 2, 8, 64, 1024, 1 << 16):
                x = (rng.standard_normal(n) * 0.01).astype(np.float32)
                rotated = x.copy()
                if n:
                    _core.eden_rotate(rotated, block, 77)
                want = _core.int_encode(rotated, 6, 0.02, 5)
                np.testing.assert_array_equal(_core.int_encode(x, 6, 0.02, 5, block, 77), want)
                out = np.empty(n, np.uint64)
                assert _core.int_encode(x, 6, 0.02, 5, block, 77, out) is out
                np.testing.assert_array_equal(out, want)
    x = np.ones(10, np.float32)
    with pytest.raises(ValueError, match="out has 9 elements"):
        _core.int_encode(x, 6, 0.02, 5, 8, 77, np.empty(9, np.uint64))
    with pytest.raises(ValueError, match="block"):
        _core.int_encode(x, 6, 0.02, 5, 3, 77)
    x[4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        _core.int_encode(x, 6, 0.02, 5, 8, 77)


def test_the_mask_gets_every_tensors_codes_in_one_buffer() -> None:
    """The mask receives the codes of every float tensor, in table order, as one array the
    codec made them in (no joined copy): the codes each tensor's own encode gives, times the
    weight; the payload decodes to the masked residues' sum as before."""
    rng = np.random.default_rng(47)
    update = {
        "a": (rng.standard_normal(3000) * 0.01).astype(np.float32),
        "b": (rng.standard_normal(70) * 0.01).astype(np.float32),
    }
    codec = fp.Codec("int8:clip=0.05")
    seen = []

    def mask(codes: np.ndarray) -> np.ndarray:
        seen.append(codes.copy())
        assert codes.base is None or codes.base.size == codes.size  # one buffer, whole
        return codes

    masked = codec.encode(update, seed=4, rotation_seed=8, mask=mask, weight=3)
    m = parse(masked).tensors[0].intcode.levels.modulus_bits
    plain = parse(codec.encode(update, seed=4, rotation_seed=8))
    want = np.concatenate([rec.intcode.codes() for rec in plain.tensors]) * np.uint64(3) & np.uint64((1 << m) - 1)
    np.testing.assert_array_equal(seen[0], want)
    got = np.concatenate([rec.intcode.codes() for rec in parse(masked).tensors])
    np.testing.assert_array_equal(got, want)
