"""ops.quantize / ops.dequantize / ops.packed_size: bucketed max-abs quantization."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fedpress import ops
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

BITS = (1, 2, 4, 8)
HUGE_BUCKET = 2**20 + 1  # too large to fuse scale and code passes per chunk
# Float32 evaluation of t = x * (L/2/scale) + L/2 and of t + 0.5 is off the exact
# value by well under 1e-4 for L <= 255; rounding may differ only that close to
# a boundary.
AMBIGUITY = 1e-4


# ---------------------------------------------------------------- reference --
def levels(bits: int) -> int:
    return 2**bits - 1


def ref_scales(x: np.ndarray, bucket: int) -> np.ndarray:
    if x.size == 0:
        return np.zeros(0, dtype=np.float32)
    return np.maximum.reduceat(np.abs(x), np.arange(0, x.size, bucket)).astype(np.float32)


def per_element(scales: np.ndarray, bucket: int, n: int) -> np.ndarray:
    return np.repeat(scales, bucket)[:n] if n else np.zeros(0, dtype=np.float32)


def exact_t(x: np.ndarray, scales: np.ndarray, bits: int, bucket: int) -> np.ndarray:
    """t = (x / scale + 1) * L / 2 in float64: the code position on [0, L]."""
    L = levels(bits)
    s = per_element(scales, bucket, x.size).astype(np.float64)
    ratio = np.divide(x.astype(np.float64), s, out=np.zeros(x.size), where=s > 0)
    return (ratio + 1.0) * (L / 2.0)


def unpack_codes(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Codes from the packed stream: element i at bits [i*bits, (i+1)*bits), LSB first."""
    assert packed.dtype == np.uint8
    stream = np.unpackbits(packed, bitorder="little")
    assert stream.size == packed.size * 8
    assert not stream[n * bits :].any(), "unused high bits of the last byte are not zero"
    weights = (1 << np.arange(bits)).astype(np.int64)
    return stream[: n * bits].reshape(n, bits).astype(np.int64) @ weights


def ref_dequantize(codes: np.ndarray, scales: np.ndarray, bits: int, bucket: int) -> np.ndarray:
    """value(j) = scale * (2j - L) / L, evaluated in float32."""
    L = levels(bits)
    lut = np.arange(L + 1, dtype=np.float32) * np.float32(2) - np.float32(L)
    lut = (lut / np.float32(L)).astype(np.float32)
    return (per_element(scales, bucket, codes.size) * lut[codes]).astype(np.float32)


def check_layout(x: np.ndarray, bits: int, bucket: int, packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Shapes, exact scales, zero padding; returns the unpacked codes."""
    n = x.size
    assert packed.dtype == np.uint8 and packed.ndim == 1
    assert scales.dtype == np.float32 and scales.ndim == 1
    assert packed.size == math.ceil(n * bits / 8) == ops.packed_size(n, bits)
    assert scales.size == math.ceil(n / bucket)
    assert scales.tobytes() == ref_scales(x, bucket).tobytes()
    codes = unpack_codes(packed, bits, n)
    assert codes.min(initial=0) >= 0 and codes.max(initial=0) <= levels(bits)
    return codes


def check_nearest(x: np.ndarray, bits: int, bucket: int) -> None:
    packed, scales = ops.quantize(x, bits, bucket=bucket, stochastic=False)
    codes = check_layout(x, bits, bucket, packed, scales)
    t = exact_t(x, scales, bits, bucket)
    expected = np.clip(np.floor(t + 0.5), 0, levels(bits)).astype(np.int64)
    ambiguous = np.abs(t - np.floor(t) - 0.5) < AMBIGUITY
    bad = (codes != expected) & ~(ambiguous & (np.abs(codes - expected) <= 1))
    assert not bad.any(), (
        f"{int(bad.sum())} codes differ from round-to-nearest, first at "
        f"{int(np.argmax(bad))}: x={x[bad][0]!r} t={t[bad][0]!r} "
        f"got {codes[bad][0]} want {expected[bad][0]}"
    )
    out = ops.dequantize(packed, scales, bits, x.size, bucket)
    assert out.dtype == np.float32 and out.shape == (x.size,)
    assert out.tobytes() == ref_dequantize(codes, scales, bits, bucket).tobytes()
    check_error(x, out, scales, bits, bucket, steps=1)


def check_stochastic(x: np.ndarray, bits: int, bucket: int, seed: int) -> None:
    packed, scales = ops.quantize(x, bits, bucket=bucket, stochastic=True, seed=seed)
    codes = check_layout(x, bits, bucket, packed, scales)
    t = exact_t(x, scales, bits, bucket)
    # One of the two grid points around x.
    lo = np.clip(np.floor(t - AMBIGUITY), 0, levels(bits))
    hi = np.clip(np.floor(t + AMBIGUITY) + 1, 0, levels(bits))
    outside = (codes < lo) | (codes > hi)
    assert not outside.any(), f"code not a neighbour of x at {int(np.argmax(outside))}"
    out = ops.dequantize(packed, scales, bits, x.size, bucket)
    assert out.tobytes() == ref_dequantize(codes, scales, bits, bucket).tobytes()
    check_error(x, out, scales, bits, bucket, steps=2)


def check_error(x: np.ndarray, out: np.ndarray, scales: np.ndarray, bits: int, bucket: int, steps: int) -> None:
    """|dequantized - x| <= steps * scale / L (a half grid step per `step`).

    Slack: the kernel's float32 t may be off by AMBIGUITY grid units (2 scale/L
    each), and the float32 product scale * lut[j] rounds (relative 2^-24, or
    one subnormal unit)."""
    s = per_element(scales, bucket, x.size).astype(np.float64)
    bound = (steps + 2 * AMBIGUITY) * s / levels(bits) * (1 + 1e-6) + 2.0**-148
    err = np.abs(out.astype(np.float64) - x.astype(np.float64))
    over = err > bound
    assert not over.any(), (
        f"{int(over.sum())} elements exceed the error bound, first at {int(np.argmax(over))}: "
        f"x={x[over][0]!r} got {out[over][0]!r} scale={s[over][0]!r}"
    )


# ----------------------------------------------------------------- the grid --
SIZES = (0, 1, 7, 8, 1001, 65_537, 200_003)
BUCKETS = (512, 1, 3, 7, 1000, 1 << 19)  # the last one is larger than every n here


@pytest.mark.parametrize("bucket", BUCKETS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("bits", BITS)
def test_nearest_and_layout(make_input, bits: int, n: int, bucket: int) -> None:
    check_nearest(make_input("normal", n), bits, bucket)


@pytest.mark.parametrize("bucket", BUCKETS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("bits", BITS)
def test_stochastic_and_layout(make_input, bits: int, n: int, bucket: int) -> None:
    check_stochastic(make_input("student_t", n), bits, bucket, seed=n + bucket)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("bucket", [512, 7])
def test_distributions(make_input, distribution: str, bits: int, bucket: int) -> None:
    x = make_input(distribution, 70_001)
    check_nearest(x, bits, bucket)
    check_stochastic(x, bits, bucket, seed=bits)


@pytest.mark.parametrize("bits", BITS)
def test_huge_bucket_path(make_input, bits: int) -> None:
    # A bucket this large is not whole within a 2^16 chunk: scales are computed
    # first, then codes chunk by chunk across bucket boundaries.
    n = HUGE_BUCKET + 1000
    x = make_input("normal", n)
    check_nearest(x, bits, HUGE_BUCKET)
    check_stochastic(x, bits, HUGE_BUCKET, seed=17)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("n", "bucket"), [(300_007, 131_073), (300_007, 100_003), (2**20 + 5, 2**20)])
def test_large_odd_buckets(make_input, bits: int, n: int, bucket: int) -> None:
    x = make_input("lognormal", n)
    check_nearest(x, bits, bucket)
    check_stochastic(x, bits, bucket, seed=3)


def test_buckets_of_very_different_scales() -> None:
    rng = np.random.default_rng(2)
    n, bucket = 10_000, 100
    x = rng.standard_normal(n).astype(np.float32)
    x *= np.repeat(10.0 ** rng.integers(-30, 30, n // bucket), bucket).astype(np.float32)
    x[300:400] = 0.0  # one all-zero bucket: scale 0
    x[555] = -0.0
    for bits in BITS:
        check_nearest(x, bits, bucket)
        check_stochastic(x, bits, bucket, seed=bits)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(
    "magnitude",
    [
        1e-30,
        float(np.float32(2.0**-100)),
        float(np.nextafter(np.float32(2.0**-100), np.float32(0))),
        1e-37,
        2e-38,
        1e-40,
        1e-44,
        float(np.float32(2.0**-149)),  # the smallest subnormal
    ],
)
def test_tiny_scales(bits: int, magnitude: float) -> None:
    # Finite inputs whose bucket maximum is tiny (down to subnormal): the scale
    # is still max|x| and the error bound still holds.
    rng = np.random.default_rng(bits)
    x = (rng.uniform(-1, 1, 1000) * magnitude).astype(np.float32)
    x[0] = np.float32(magnitude)
    x[1] = -np.float32(magnitude)
    x[2] = 0.0
    check_nearest(x, bits, 512)
    check_stochastic(x, bits, 512, seed=5)


@pytest.mark.parametrize("bits", BITS)
def test_extreme_scales(bits: int) -> None:
    x = np.array([3.4e38, -3.4e38, 1.0, 0.0, -1e30, 1e-30], dtype=np.float32)
    check_nearest(x, bits, 512)
    check_stochastic(x, bits, 512, seed=1)


@pytest.mark.parametrize("bits", BITS)
def test_grid_points_are_exact(bits: int) -> None:
    # x exactly on the grid (scale 1) quantizes to itself with both roundings.
    L = levels(bits)
    grid = (np.arange(L + 1, dtype=np.float32) * 2 - L) / np.float32(L)
    x = np.tile(grid, 3).astype(np.float32)
    packed, scales = ops.quantize(x, bits, bucket=x.size, stochastic=False)
    codes = unpack_codes(packed, bits, x.size)
    np.testing.assert_array_equal(codes, np.tile(np.arange(L + 1), 3))
    np.testing.assert_array_equal(ops.dequantize(packed, scales, bits, x.size, x.size), x)
    packed_s, scales_s = ops.quantize(x, bits, bucket=x.size, stochastic=True, seed=4)
    out = ops.dequantize(packed_s, scales_s, bits, x.size, x.size)
    np.testing.assert_allclose(out, x, rtol=0, atol=1e-6)


def test_one_bit_is_sign_times_scale() -> None:
    x = np.array([0.5, -0.25, 1.0, -1.0, 0.1], dtype=np.float32)
    packed, scales = ops.quantize(x, 1, bucket=512, stochastic=False)
    out = ops.dequantize(packed, scales, 1, x.size, 512)
    np.testing.assert_array_equal(out, np.array([1, -1, 1, -1, 1], dtype=np.float32))


# ------------------------------------------------------------ packing layout --
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 8, 9, 15, 17, 65_536 + 3])
def test_packed_layout_and_padding(bits: int, n: int) -> None:
    # Codes 0..L cycling, via grid points with scale 1, and hand-packed bytes.
    L = levels(bits)
    codes = np.arange(n) % (L + 1)
    codes[0] = L  # pins the scale to 1
    x = ((codes * 2 - L) / L).astype(np.float32)
    packed, _ = ops.quantize(x, bits, bucket=512, stochastic=False)
    expected = np.zeros(math.ceil(n * bits / 8), dtype=np.uint8)
    for i, c in enumerate(codes.tolist()):
        bit = i * bits
        expected[bit // 8] |= np.uint8((c << (bit % 8)) & 0xFF)
    np.testing.assert_array_equal(packed, expected)


@pytest.mark.parametrize("bits", BITS)
def test_packed_size(bits: int) -> None:
    for n in (0, 1, 2, 3, 7, 8, 9, 1001, 2**31 + 3):
        assert ops.packed_size(n, bits) == (n * bits + 7) // 8
    with pytest.raises(ValueError):
        ops.packed_size(10, 3)
    with pytest.raises(ValueError):
        ops.packed_size(-1, bits)


# --------------------------------------------------------- special inputs --
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("stochastic", [False, True])
def test_all_zero_dequantizes_to_zeros(all_zero_input: np.ndarray, bits: int, stochastic: bool) -> None:
    packed, scales = ops.quantize(all_zero_input, bits, bucket=100, stochastic=stochastic, seed=1)
    assert not scales.any()
    out = ops.dequantize(packed, scales, bits, all_zero_input.size, 100)
    np.testing.assert_array_equal(out, np.zeros(all_zero_input.size, dtype=np.float32))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("stochastic", [False, True])
def test_length_one(length_one_input: np.ndarray, bits: int, stochastic: bool) -> None:
    packed, scales = ops.quantize(length_one_input, bits, bucket=512, stochastic=stochastic, seed=2)
    assert packed.size == 1 and scales.tolist() == [abs(float(length_one_input[0]))]
    assert int(packed[0]) >> bits == 0
    out = ops.dequantize(packed, scales, bits, 1, 512)
    np.testing.assert_array_equal(out, length_one_input)  # max-abs: x is a grid end point


@pytest.mark.parametrize("bits", BITS)
def test_empty(bits: int) -> None:
    packed, scales = ops.quantize(np.zeros(0, dtype=np.float32), bits, bucket=512, seed=1)
    assert packed.size == 0 and scales.size == 0
    assert packed.dtype == np.uint8 and scales.dtype == np.float32
    out = ops.dequantize(packed, scales, bits, 0, 512)
    assert out.size == 0 and out.dtype == np.float32


def test_input_types() -> None:
    import torch

    rng = np.random.default_rng(9)
    x = rng.standard_normal((31, 33)).astype(np.float64)
    ref = ops.quantize(x.astype(np.float32).reshape(-1), 4, bucket=64, stochastic=False)
    for variant in (
        x,
        torch.from_numpy(x),
        torch.from_numpy(x.astype(np.float32)).requires_grad_(),
    ):
        packed, scales = ops.quantize(variant, 4, bucket=64, stochastic=False)
        assert packed.tobytes() == ref[0].tobytes() and scales.tobytes() == ref[1].tobytes()
    with pytest.raises(TypeError):
        ops.quantize(np.arange(10), 4)
    # dequantize takes bytes and torch uint8 tensors for packed
    out_bytes = ops.dequantize(ref[0].tobytes(), ref[1], 4, x.size, 64)
    out_torch = ops.dequantize(torch.from_numpy(ref[0]), torch.from_numpy(ref[1]), 4, x.size, 64)
    assert out_bytes.tobytes() == out_torch.tobytes()


# ---------------------------------------------------------------- stochastic --
def test_stochastic_reproducible_and_seed_dependent(make_input) -> None:
    x = make_input("normal", 200_003)
    for bits in BITS:
        a = ops.quantize(x, bits, bucket=512, stochastic=True, seed=31337)
        b = ops.quantize(x.copy(), bits, bucket=512, stochastic=True, seed=31337)
        c = ops.quantize(x, bits, bucket=512, stochastic=True, seed=31338)
        assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
        assert a[0].tobytes() != c[0].tobytes()
        assert a[1].tobytes() == c[1].tobytes()  # scales do not depend on the seed


def test_nearest_ignores_seed(make_input) -> None:
    x = make_input("normal", 1001)
    a = ops.quantize(x, 2, stochastic=False, seed=1)
    b = ops.quantize(x, 2, stochastic=False, seed=2)
    assert a[0].tobytes() == b[0].tobytes()


def test_stochastic_seed_none_varies(make_input) -> None:
    x = make_input("normal", 1001)
    draws = {ops.quantize(x, 1, stochastic=True)[0].tobytes() for _ in range(4)}
    assert len(draws) > 1


@pytest.mark.parametrize("bits", BITS)
def test_stochastic_rounding_is_unbiased(bits: int) -> None:
    # Mean over many seeds of dequantize(quantize(x)) converges to x. For each
    # element the draw is one of two grid points with probability set by its
    # position between them, so the exact standard error is known.
    rng = np.random.default_rng(100 + bits)
    n, seeds = 96, 3000
    x = rng.uniform(-1, 1, n).astype(np.float32)
    x[0] = 1.0  # scale 1
    L = levels(bits)
    total = np.zeros(n)
    for s in range(seeds):
        packed, scales = ops.quantize(x, bits, bucket=n, stochastic=True, seed=s)
        total += ops.dequantize(packed, scales, bits, n, n)
    mean = total / seeds
    t = (x.astype(np.float64) + 1.0) * L / 2.0
    p = t - np.floor(t)
    step = 2.0 / L
    se = np.sqrt(p * (1 - p)) * step / math.sqrt(seeds)
    err = mean - x.astype(np.float64)
    assert np.all(np.abs(err) <= 5 * se + 1e-6), np.max(np.abs(err) / (se + 1e-12))
    # Summed over elements the z-scores would drift visibly with any bias.
    z = err[se > 0] / se[se > 0]
    assert abs(z.sum()) < 5 * math.sqrt(z.size)


def test_stochastic_rounding_probability_on_one_value() -> None:
    # x = 0.3 with 1 bit (grid -1, +1, scale from a 1.0 companion):
    # P(+1) = (0.3 + 1) / 2 = 0.65, estimated over one long vector.
    n = 200_000
    x = np.full(n, 0.3, dtype=np.float32)
    x[0] = 1.0
    packed, _ = ops.quantize(x, 1, bucket=n, stochastic=True, seed=77)
    up = np.unpackbits(packed, bitorder="little")[1:n].mean()
    assert abs(up - 0.65) < 5 * math.sqrt(0.65 * 0.35 / n)


# -------------------------------------------------------------------- errors --
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(("n", "bucket"), [(10, 512), (200_003, 512), (200_003, 7), (HUGE_BUCKET + 10, HUGE_BUCKET)])
@pytest.mark.parametrize("stochastic", [False, True])
def test_non_finite_raises(bad: float, n: int, bucket: int, stochastic: bool) -> None:
    for pos in (0, n // 2, n - 1):
        x = np.ones(n, dtype=np.float32)
        x[pos] = bad
        with pytest.raises(ValueError):
            ops.quantize(x, 4, bucket=bucket, stochastic=stochastic, seed=1)


@pytest.mark.parametrize("bits", [0, 3, 5, 16, -1, 7, 32])
def test_bad_bits(normal_input: np.ndarray, bits: int) -> None:
    with pytest.raises(ValueError):
        ops.quantize(normal_input, bits)
    packed, scales = ops.quantize(normal_input, 8, stochastic=False)
    with pytest.raises(ValueError):
        ops.dequantize(packed, scales, bits, normal_input.size)


def test_bits_must_be_integer(normal_input: np.ndarray) -> None:
    with pytest.raises(TypeError):
        ops.quantize(normal_input, 4.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("bucket", [0, -1])
def test_bad_bucket(normal_input: np.ndarray, bucket: int) -> None:
    with pytest.raises(ValueError):
        ops.quantize(normal_input, 4, bucket=bucket)
    packed, scales = ops.quantize(normal_input, 4, stochastic=False)
    with pytest.raises(ValueError):
        ops.dequantize(packed, scales, 4, normal_input.size, bucket=bucket)


@pytest.mark.parametrize("bits", BITS)
def test_dequantize_wrong_lengths(normal_input: np.ndarray, bits: int) -> None:
    n = normal_input.size
    packed, scales = ops.quantize(normal_input, bits, bucket=100, stochastic=False)
    with pytest.raises(ValueError):
        ops.dequantize(packed[:-1], scales, bits, n, 100)
    with pytest.raises(ValueError):
        ops.dequantize(np.append(packed, np.uint8(0)), scales, bits, n, 100)
    with pytest.raises(ValueError):
        ops.dequantize(packed, scales[:-1], bits, n, 100)
    with pytest.raises(ValueError):
        ops.dequantize(packed, np.append(scales, np.float32(1)), bits, n, 100)
    with pytest.raises(ValueError):
        ops.dequantize(packed, scales, bits, n + 8 // bits * 8, 100)  # n says more bytes
    with pytest.raises(ValueError):
        ops.dequantize(packed, scales, bits, n, 50)  # bucket says more scales


def test_dequantize_bad_types(normal_input: np.ndarray) -> None:
    packed, scales = ops.quantize(normal_input, 8, stochastic=False)
    with pytest.raises(TypeError):
        ops.dequantize(packed.astype(np.int8), scales, 8, normal_input.size)
    with pytest.raises(TypeError):
        ops.dequantize(packed, scales.astype(np.int32), 8, normal_input.size)


def test_dequantize_bad_n(normal_input: np.ndarray) -> None:
    packed, scales = ops.quantize(normal_input, 8, stochastic=False)
    with pytest.raises(ValueError):
        ops.dequantize(packed, scales, 8, -1)
    with pytest.raises(TypeError):
        ops.dequantize(packed, scales, 8, float(normal_input.size))  # type: ignore[arg-type]


# --------------------------------------------------------------- properties --
# Magnitudes in [1e-30, 1e30], with ties: well-scaled buckets of realistic values.
_TINY = float(np.float32(1e-30))
_BIG = float(np.float32(1e30))


@given(
    x=hnp.arrays(
        np.float32,
        st.integers(0, 300),
        elements=st.floats(width=32, allow_nan=False, allow_infinity=False),
    ),
    bits=st.sampled_from(BITS),
    bucket=st.integers(1, 400),
    seed=st.integers(0, 2**64 - 1),
)
def test_property_round_trip_full_float_range(x: np.ndarray, bits: int, bucket: int, seed: int) -> None:
    # Any finite float32, subnormals and the extremes included.
    check_nearest(x, bits, bucket)
    check_stochastic(x, bits, bucket, seed)


@given(
    x=hnp.arrays(
        np.float32,
        st.integers(0, 600),
        elements=st.one_of(
            st.floats(_TINY, _BIG, width=32),
            st.floats(-_BIG, -_TINY, width=32),
            st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5]),
        ),
    ),
    bits=st.sampled_from(BITS),
    bucket=st.integers(1, 700),
    seed=st.integers(0, 2**64 - 1),
)
def test_property_round_trip(x: np.ndarray, bits: int, bucket: int, seed: int) -> None:
    check_nearest(x, bits, bucket)
    check_stochastic(x, bits, bucket, seed)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_dequantize_into_an_accumulator(bits: int) -> None:
    """dequantize(..., acc=, weight=) adds weight * values in place, bit for bit the two
    numpy steps, and returns acc; a wrong-sized or read-only acc is refused."""
    x = np.random.default_rng(bits).standard_normal(5003).astype(np.float32)
    packed, scales = ops.quantize(x, bits, bucket=128, seed=3)
    values = ops.dequantize(packed, scales, bits, x.size, 128)
    acc = np.random.default_rng(0).standard_normal(x.size).astype(np.float32)
    expected = acc + np.float32(0.7) * values
    out = ops.dequantize(packed, scales, bits, x.size, 128, acc=acc, weight=0.7)
    assert np.shares_memory(out, acc)
    np.testing.assert_array_equal(acc, expected)
    fresh = np.empty(x.size, np.float32)
    ops.dequantize(packed, scales, bits, x.size, 128, acc=fresh, weight=0.7, accumulate=False)
    np.testing.assert_array_equal(fresh, np.float32(0.7) * values)
    np.testing.assert_array_equal(ops.dequantize(packed, scales, bits, x.size, 128, weight=2.0), 2 * values)
    with pytest.raises(ValueError, match="acc has 10 elements"):
        ops.dequantize(packed, scales, bits, x.size, 128, acc=np.zeros(10, np.float32))
    frozen = np.zeros(x.size, np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="acc"):
        ops.dequantize(packed, scales, bits, x.size, 128, acc=frozen)


# ------------------------------------------------------------ many at once --
def test_dequantize_many_equals_one_call_per_job() -> None:
    """_core.dequantize_many (a payload's tensors in one parallel pass) writes what
    dequantize writes for each job: new values, or added with a weight."""
    from fedpress import _core

    rng = np.random.default_rng(9)
    sizes = [0, 5, 512, 70_000, 200_003, 3]
    jobs, want, outs = [], [], []
    buffer = np.full(sum(sizes), 7.0, np.float32)  # outputs back to back, as decode lays them out
    at = 0
    for i, n in enumerate(sizes):
        bits = (1, 2, 4, 8)[i % 4]
        x = rng.standard_normal(n).astype(np.float32)
        packed, scales = ops.quantize(x, bits, bucket=256, seed=i)
        out = buffer[at : at + n]
        at += n
        accumulate = i % 2 == 1
        weight = 0.5 if accumulate else 1.0
        expected = out.copy()
        ops.dequantize(packed, scales, bits, n, 256, acc=expected, weight=weight, accumulate=accumulate)
        jobs.append((packed, scales, bits, n, 256, out, weight, accumulate))
        want.append(expected)
        outs.append(out)
    returned = _core.dequantize_many(jobs)
    for got, expected, out in zip(returned, want, outs):
        assert got.tobytes() == expected.tobytes()
        assert got.size == 0 or np.shares_memory(got, out)
    assert _core.dequantize_many([]) == []


def test_dequantize_many_refuses_overlapping_outputs_and_bad_jobs() -> None:
    from fedpress import _core

    packed, scales = ops.quantize(np.ones(100, np.float32), 4, seed=1)
    buffer = np.zeros(150, np.float32)
    with pytest.raises(ValueError, match="shares memory with another job"):
        _core.dequantize_many(
            [
                (packed, scales, 4, 100, 512, buffer[:100], 1.0, False),
                (packed, scales, 4, 100, 512, buffer[50:], 1.0, False),
            ]
        )
    with pytest.raises(ValueError, match="a job is"):
        _core.dequantize_many([(packed, scales, 4)])
    with pytest.raises(ValueError, match="packed has 50 bytes, expected 13"):
        _core.dequantize_many([(packed, scales, 4, 25, 512, None, 1.0, False)])


def test_dequantize_many_checks_every_section_before_writing() -> None:
    """check=True: scales finite and >= 0 (-0.0 passes, as in the decoder), padding bits
    zero; the first failing job's index comes back and no output is written."""
    from fedpress import _core

    p10, s10 = ops.quantize(np.ones(10, np.float32), 4, seed=1)
    p3, s3 = ops.quantize(np.ones(3, np.float32), 2, seed=1)  # 6 bits of 8: two padding bits
    out = np.full(13, 7.0, np.float32)
    good = [(p10, s10, 4, 10, 512, out[:10], 1.0, False), (p3, s3, 2, 3, 512, out[10:], 1.0, False)]
    for bad_job, index in (
        ((p10, np.array([-1.0], np.float32), 4, 10, 512, out[:10], 1.0, False), 0),
        ((p10, np.array([np.inf], np.float32), 4, 10, 512, out[:10], 1.0, False), 0),
        ((p3 | np.uint8(0xC0), s3, 2, 3, 512, out[10:], 1.0, False), 1),
    ):
        jobs = list(good)
        jobs[index] = bad_job
        assert _core.dequantize_many(jobs, True) == index
        assert _core.check_quantized_many(jobs) == index  # the same check alone
        assert (out == 7.0).all()
    assert _core.check_quantized_many(good) is None
    short = (p10[:2], s10, 4, 10, 512, out[:10], 1.0, False)  # malformed after a bad one: raises, as dequantize_many
    with pytest.raises(ValueError, match="packed has 2 bytes"):
        _core.check_quantized_many([(p10, np.array([-1.0], np.float32), 4, 10, 512, out[:10], 1.0, False), short])
    assert _core.check_quantized_many([]) is None
    assert (out == 7.0).all()
    negative_zero = (p10, np.array([-0.0], np.float32), 4, 10, 512, out[:10], 1.0, False)
    assert isinstance(_core.dequantize_many([negative_zero, good[1]], True), list)


def test_decode_names_the_tensor_whose_section_is_bad() -> None:
    import struct

    import fedpress as fp
    from fedpress import _core

    payload = bytearray(fp.Codec("q4").encode({"a": np.ones(600, np.float32), "b": np.ones(10, np.float32)}, seed=1))
    at = bytes(payload).rfind(struct.pack("<f", 1.0))  # b's one scale, the last 1.0 written
    payload[at : at + 4] = struct.pack("<f", -1.0)
    payload[-4:] = struct.pack("<I", _core.crc32c(bytes(payload[:-4])))
    with pytest.raises(fp.DecodeError, match="tensor 'b': values section holds a negative or non-finite scale"):
        fp.decode(bytes(payload))


def test_aggregator_names_the_tensor_whose_section_is_bad_and_adds_nothing() -> None:
    """The Aggregator checks a payload's quantized sections in one call before any sum
    changes: the decoder's message, naming the tensor; add and add_many alike."""
    import struct

    import fedpress as fp
    from fedpress import _core

    update = {"a": np.ones(600, np.float32), "b": np.ones(10, np.float32), "c": np.arange(3, dtype=np.int32)}
    good = fp.Codec("q4").encode(update, seed=2)
    payload = bytearray(fp.Codec("q4").encode(update, seed=1))
    at = bytes(payload).rfind(struct.pack("<f", 1.0))  # b's one scale, the last 1.0 written
    payload[at : at + 4] = struct.pack("<f", -1.0)
    payload[-4:] = struct.pack("<I", _core.crc32c(bytes(payload[:-4])))
    message = "tensor 'b': values section holds a negative or non-finite scale"
    for fresh in (True, False):
        agg = fp.Aggregator()
        if not fresh:
            agg.add(good)
        before = {name: value.copy() for name, value in agg.result().items()} if not fresh else None
        with pytest.raises(fp.DecodeError, match=message):
            agg.add(bytes(payload))
        with pytest.raises(fp.DecodeError, match=f"^payload 1: {message}"):  # its position in the batch
            agg.add_many([good, bytes(payload)])
        assert agg.count == (0 if fresh else 1)
        if before is not None:
            for name, value in agg.result().items():
                assert value.tobytes() == before[name].tobytes()
