"""ops.eden_*: EDEN rotated quantization kernels (Lloyd-Max levels of N(0, 1),
stochastic shared-rotation mode and its levels, packing, fused encode/decode,
accumulation).

Every numeric check compares against a numpy reference of the documented
algorithm (csrc/eden.hpp) computed here."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fedpress import ops
from fedpress.format.eden import eden_segments
from fedpress.format.registry import PURPOSE_QUANT, PURPOSE_RHT, stage_seed

SEED = 0xEDE
BITS = (1, 2, 3, 4, 8)
SMALL_BITS = (1, 2, 3, 4)
SIZES = (1, 7, 1000, 2**16, 2**16 + 5, 300_007)
BLOCKS = (2, 16, 4096, 2**16)
MODES = ("nearest", "mse", "stochastic")
CLIP = np.float32(3.3)
_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1


# ------------------------------------------------------------ Lloyd-Max, numpy --
def _upper_tail(x: np.ndarray) -> np.ndarray:
    return np.array([0.0 if math.isinf(v) else 0.5 * math.erfc(v / math.sqrt(2.0)) for v in x])


def _pdf(x: np.ndarray) -> np.ndarray:
    finite = np.where(np.isinf(x), 0.0, x)
    return np.where(np.isinf(x), 0.0, np.exp(-0.5 * finite**2) / math.sqrt(2 * math.pi))


def _edges(c: np.ndarray) -> np.ndarray:
    return np.concatenate([[0.0], (c[:-1] + c[1:]) / 2, [np.inf]])


def _lloyd_step(c: np.ndarray) -> np.ndarray:
    t = _edges(c)
    q, p = _upper_tail(t), _pdf(t)
    return (p[:-1] - p[1:]) / (q[:-1] - q[1:])


def lloyd_max_positive(bits: int) -> np.ndarray:
    """Positive Lloyd-Max centroids of N(0, 1): Lloyd's iteration, then (for 8 bits,
    where it crawls) Newton's method on the same fixed point with a numerical Jacobian."""
    h = 1 << (bits - 1)
    c = (np.arange(h) + 0.5) * 3.0 / h
    for _ in range(20_000 if bits <= 4 else 3000):
        new = _lloyd_step(c)
        done = np.max(np.abs(new - c)) < 1e-13
        c = new
        if done:
            return c
    for _ in range(6):
        f = _lloyd_step(c) - c
        eps = 1e-7
        jac = np.empty((h, h))
        for j in range(h):
            d = np.zeros(h)
            d[j] = eps
            jac[:, j] = (_lloyd_step(c + d) - (c + d) - f) / eps
        c = c - np.linalg.solve(jac, f)
    assert np.max(np.abs(_lloyd_step(c) - c)) < 1e-10
    return c


def quantizer_mse(pos: np.ndarray) -> float:
    """E[(Z - Q(Z))^2] of the symmetric quantizer with positive centroids pos."""
    t = _edges(pos)
    q, p = _upper_tail(t), _pdf(t)
    mass = q[:-1] - q[1:]
    tp = np.where(np.isinf(t), 0.0, np.where(np.isinf(t), 0.0, t) * p)
    second = mass + tp[:-1] - tp[1:]
    first = p[:-1] - p[1:]
    return float(2 * np.sum(second - 2 * pos * first + pos**2 * mass))


@pytest.fixture(scope="module")
def lloyd_max() -> dict[int, np.ndarray]:
    return {b: lloyd_max_positive(b) for b in BITS}


# ------------------------------------------- stochastic levels, numpy --
def _interval_mass(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """P(a < Z < b), from the small tails."""
    both_pos = _upper_tail(a) - _upper_tail(b)
    both_neg = _upper_tail(-b) - _upper_tail(-a)
    across = 1.0 - _upper_tail(b) - _upper_tail(-a)
    return np.where(a >= 0, both_pos, np.where(b <= 0, both_neg, across))


def rounding_variance(levels: np.ndarray) -> float:
    """J = E[(Z - l_j)(l_{j+1} - Z); l_0 <= Z <= l_top]: stochastic rounding's variance."""
    a, b = levels[:-1], levels[1:]
    m0 = _interval_mass(a, b)
    m1 = _pdf(a) - _pdf(b)
    m2 = m0 + a * _pdf(a) - b * _pdf(b)
    return float(np.sum(-m2 + (a + b) * m1 - a * b * m0))


def _balance(levels: np.ndarray) -> np.ndarray:
    """The optimality condition of each interior level (zero at the optimum):
    the integral of (z - l_{j-1}) phi over [l_{j-1}, l_j] minus that of
    (l_{j+1} - z) phi over [l_j, l_{j+1}]."""
    a, b = levels[:-1], levels[1:]
    m0, m1 = _interval_mass(a, b), _pdf(a) - _pdf(b)
    return (m1 - a * m0)[:-1] - (b * m0 - m1)[1:]


def optimal_stochastic_levels(bits: int) -> np.ndarray:
    """The 2^bits levels on [-CLIP, CLIP] (ends fixed) minimising J: Newton's
    method on _balance from uniform levels, the tridiagonal Jacobian by finite
    differences (every third level moved at once), damped to keep the order."""
    top = (1 << bits) - 1
    levels = float(CLIP) * (2.0 * np.arange(top + 1) - top) / top
    if top == 1:
        return levels
    for _ in range(100):
        f = _balance(levels)
        jac = np.zeros((top - 1, top - 1))
        eps = 1e-7
        for r in range(3):
            moved = np.zeros(top + 1)
            moved[1:-1][r::3] = eps
            df = (_balance(levels + moved) - f) / eps
            for col in range(r, top - 1, 3):
                rows = slice(max(col - 1, 0), col + 2)
                jac[rows, col] = df[rows]
        step = np.concatenate([[0.0], -np.linalg.solve(jac, f), [0.0]])
        while np.any(np.diff(levels + step) <= 0):
            step /= 2
        levels = levels + step
        if np.max(np.abs(step)) < 1e-13:
            break
    assert np.max(np.abs(_balance(levels))) < 1e-14
    return levels


# ------------------------------------------------------------ the reference --
def ref_blocks(n: int, block: int) -> list[tuple[int, int]]:
    """(offset, length) of every rotation block of the rotated vector."""
    out = [(b * block, block) for b in range(n // block)]
    if n % block:
        out.append(((n // block) * block, 1 << (n % block - 1).bit_length()))
    return out


def hash32(key: int, counter: np.ndarray) -> np.ndarray:
    x = (counter.astype(np.uint64) ^ key) & _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    x ^= x >> 16
    return x


def hash64(seed: int, counter: int) -> int:
    z = (seed * 0x9E3779B97F4A7C15 + counter * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def ref_quantize(y: np.ndarray, n: int, bits: int, block: int, mode: str, seed: int):
    """(codes, scales, outlier_idx, outlier_val) as csrc/eden.hpp specifies; the
    full blocks are the rows of one 2-D array, the tail block another."""
    half, top = 1 << (bits - 1), (1 << bits) - 1
    cent = ops.eden_centroids(bits)
    cpos = cent[half:]
    tpos = (cpos[:-1] + cpos[1:]) * np.float32(0.5)
    key = hash64(seed, 0xEDE5) & _M32
    levels = ops.eden_levels(bits)
    full = n // block
    groups = [(0, y[: full * block].reshape(full, block))] if full else []
    if n % block:
        groups.append((full * block, y[full * block :].reshape(1, -1)))
    codes = np.empty(y.size, np.int64)
    scales, outliers = [], []
    for off, rows in groups:
        length = rows.shape[1]
        rows64 = rows.astype(np.float64)
        r = np.sqrt(np.sum(rows64**2, axis=1))
        zero = r == 0
        r = np.where(zero, 1.0, r)
        positions = off + np.arange(rows.size).reshape(rows.shape)
        if mode == "stochastic":
            s = (r / math.sqrt(length)).astype(np.float32)
            z = rows * (np.float32(1) / s)[:, None]
            # l_j <= z <= l_{j+1}, j the number of interior levels <= z.
            j = np.searchsorted(levels[1:-1], z, side="right")
            lo, hi = levels[j], levels[j + 1]
            u = (hash32(key, positions) >> 8).astype(np.float32) * np.float32(2.0**-24)
            c = j + (u * (hi - lo) < z - lo)
            out = (np.abs(z) > CLIP) & ~zero[:, None]
            c = np.where(out, np.where(z < 0, 0, top), c)
            outliers.append(positions[out])
            block_scales = np.where(zero, 0.0, s.astype(np.float64))
        else:
            z = rows * (math.sqrt(length) / r).astype(np.float32)[:, None]
            cnt = np.searchsorted(tpos, np.abs(z), side="left")
            c = np.where(z < 0, half - 1 - cnt, half + cnt)
            cv = cent[c].astype(np.float64)
            dot = np.where(zero, 1.0, np.sum(rows64 * cv, axis=1))  # zero blocks: any value
            block_scales = dot / np.sum(cv**2, axis=1) if mode == "mse" else r * r / dot
            block_scales = np.where(zero, 0.0, block_scales)
        c[zero] = half
        codes[off : off + rows.size] = c.reshape(-1)
        scales.append(block_scales)
    idx = np.concatenate(outliers).astype(np.uint32) if outliers else np.zeros(0, np.uint32)
    scale_arr = np.concatenate(scales) if scales else np.zeros(0)
    return codes, scale_arr, idx, y[idx.astype(np.intp)]


def unpack(packed: np.ndarray, m: int, bits: int) -> np.ndarray:
    """Codes of an LSB-first stream (element i at bits [i*bits, (i+1)*bits))."""
    stream = np.unpackbits(packed, bitorder="little")
    assert stream.size == 8 * ((m * bits + 7) // 8)
    assert not stream[m * bits :].any(), "padding bits must be zero"
    return (stream[: m * bits].reshape(m, bits).astype(np.int64) << np.arange(bits)).sum(axis=1)


def quantize(y: np.ndarray, n: int, bits: int, block: int, mode: str, seed: int = SEED):
    return ops.eden_quantize(
        y,
        n,
        bits,
        seed=seed,
        block=block,
        stochastic=mode == "stochastic",
        scale="mse" if mode == "mse" else "unbiased",
    )


def rotated_input(n: int, block: int, seed: int = 0) -> np.ndarray:
    """A rotated heavy-tailed vector, one all-zero block, and spikes that stay
    outliers after normalisation."""
    rng = np.random.default_rng([n, block, seed])
    y = ops.rht(rng.standard_t(3, n).astype(np.float32), SEED, block)
    blocks = ref_blocks(n, block)
    if len(blocks) > 2:
        off, length = blocks[1]
        y[off : off + length] = 0
    if y.size >= 64:
        y[rng.integers(0, y.size, 3)] *= 50
    return y


def vnmse(x_hat: np.ndarray, x: np.ndarray) -> float:
    x64 = x.astype(np.float64)
    return float(np.sum((x_hat.astype(np.float64) - x64) ** 2) / np.sum(x64**2))


# ------------------------------------------------------------------ tables --
@pytest.mark.parametrize("bits", BITS)
def test_centroids_are_lloyd_max(lloyd_max, bits: int) -> None:
    c = ops.eden_centroids(bits)
    assert c.dtype == np.float32 and c.shape == (1 << bits,)
    assert np.all(np.diff(c) > 0)
    np.testing.assert_array_equal(c[::-1], -c)
    np.testing.assert_allclose(c[1 << (bits - 1) :], lloyd_max[bits], rtol=1e-6)


def test_quantizer_mse(lloyd_max) -> None:
    assert quantizer_mse(lloyd_max[1]) == pytest.approx(1 - 2 / math.pi, rel=1e-9)
    # Max (1960), Table I: 4, 8 and 16 levels.
    for bits, mse in ((2, 0.1175), (3, 0.03455), (4, 0.009497)):
        assert quantizer_mse(lloyd_max[bits]) == pytest.approx(mse, rel=1e-3)
    assert quantizer_mse(lloyd_max[8]) < 5e-5


@pytest.mark.parametrize("bits", BITS)
def test_stochastic_levels_are_optimal(bits: int) -> None:
    levels = ops.eden_levels(bits)
    assert levels.dtype == np.float32 and levels.shape == (1 << bits,)
    assert np.all(np.diff(levels) > 0)
    np.testing.assert_array_equal(levels[::-1], -levels)
    assert levels[-1] == CLIP and ops.EDEN_CLIP == pytest.approx(3.3)
    best = optimal_stochastic_levels(bits)
    np.testing.assert_allclose(levels, best, rtol=0, atol=1e-6)
    if bits == 1:
        return
    # A minimum, below uniform levels and below nearby perturbations.
    top = (1 << bits) - 1
    j = rounding_variance(best)
    assert j < 0.8 * rounding_variance(float(CLIP) * (2.0 * np.arange(top + 1) - top) / top)
    rng = np.random.default_rng(bits)
    for _ in range(5):
        nudged = best + np.concatenate([[0.0], rng.normal(0, 1e-3, top - 1), [0.0]])
        assert rounding_variance(nudged) > j


def test_rounding_variance_of_uniform_levels() -> None:
    # At 4 bits uniform levels of step d have J close to d^2 / 6 (1 - P(|Z| > CLIP)).
    clip = float(CLIP)
    d = 2 * clip / 15
    uniform = clip * (2.0 * np.arange(16) - 15) / 15
    assert rounding_variance(uniform) == pytest.approx(d * d / 6, rel=0.01)
    # One interval: E[(CLIP + Z)(CLIP - Z)] = CLIP^2 P - E[Z^2; |Z| <= CLIP].
    p = 1 - 2 * _upper_tail(np.array([clip]))[0]
    second = p - 2 * clip * _pdf(np.array([clip]))[0]
    assert rounding_variance(np.array([-clip, clip])) == pytest.approx(clip**2 * p - second)


@pytest.mark.parametrize("bits", BITS)
def test_stochastic_vnmse_is_the_rounding_variance(bits: int) -> None:
    """The shared mode's error on a Gaussian vector of 2^16: J of its levels."""
    n = 2**16
    x = np.random.default_rng(100 + bits).standard_normal(n).astype(np.float32)
    errors = []
    for seed in range(8):
        packed, scales, oidx, oval = ops.eden_encode(x, bits, seed, stochastic=True)
        out = ops.eden_decode(packed, scales, n, bits, seed, stochastic=True, outlier_idx=oidx, outlier_val=oval)
        errors.append(vnmse(out, x))
    j = rounding_variance(ops.eden_levels(bits).astype(np.float64))
    assert np.mean(errors) == pytest.approx(j, rel=0.03)


# ------------------------------------------------ quantize against numpy --
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("n", SIZES)
def test_quantize_matches_reference(n: int, block: int, bits: int, mode: str) -> None:
    y = rotated_input(n, block)
    m = ops.rht_padded_size(n, block)
    packed, scales, oidx, oval = quantize(y, n, bits, block, mode)
    codes, ref_scales, ref_idx, ref_val = ref_quantize(y, n, bits, block, mode, SEED)
    assert packed.dtype == np.uint8 and packed.shape == ((m * bits + 7) // 8,)
    assert scales.dtype == np.float32 and scales.shape == (len(ref_blocks(n, block)),)
    np.testing.assert_array_equal(unpack(packed, m, bits), codes)
    # Nearest-mode sums add float products in short runs: relative error ~1e-7.
    np.testing.assert_allclose(scales, ref_scales, rtol=2e-6 if mode != "stochastic" else 1e-7)
    assert oidx.dtype == np.uint32 and oval.dtype == np.float32
    np.testing.assert_array_equal(oidx, ref_idx)
    np.testing.assert_array_equal(oval, ref_val)
    # Dequantization: scale of the element's block times the table entry, in float32.
    table = ops.eden_levels(bits) if mode == "stochastic" else ops.eden_centroids(bits)
    per_element = np.repeat(scales, [length for _, length in ref_blocks(n, block)])
    y_hat = ops.eden_dequantize(packed, scales, n, bits, block=block, stochastic=mode == "stochastic")
    np.testing.assert_array_equal(y_hat, per_element * table[codes])


def test_stochastic_finds_the_planted_outliers() -> None:
    n = 2**16
    y = rotated_input(n, 4096)
    _, scales, oidx, oval = ops.eden_quantize(y, n, 4, seed=1, block=4096, stochastic=True)
    s = np.repeat(scales, 4096)
    assert np.sum(s == 0) == 4096  # the zeroed block
    z = np.abs(y) * (np.float32(1) / np.where(s == 0, np.float32(1), s))
    np.testing.assert_array_equal(oidx, np.flatnonzero(z > CLIP))
    assert 3 <= oidx.size < 0.01 * n
    np.testing.assert_array_equal(oval, y[oidx.astype(np.intp)])


@pytest.mark.parametrize("bits", BITS)
def test_stochastic_values_on_levels(bits: int) -> None:
    """A z exactly on a level (the ends included) gets that level's code whatever
    the draw: the kernel may bracket it by either neighbouring interval."""
    n = 4096
    levels = ops.eden_levels(bits)
    y = np.random.default_rng(bits).standard_normal(n).astype(np.float32)
    planted = np.arange(levels.size) * 7

    def multiplier() -> np.float32:  # z = y * multiplier(), as in ref_quantize
        s = np.float32(np.sqrt(np.sum(y.astype(np.float64) ** 2)) / math.sqrt(n))
        return np.float32(1) / s

    inv = multiplier()
    for _ in range(10):  # planting moves the norm a little; repeat until it stays
        for p, level in zip(planted, levels):
            v = np.float32(level / inv)
            for _ in range(4):  # the float nearest level / inv, or a neighbour
                if v * inv != level:
                    v = np.nextafter(v, np.float32(np.inf if v * inv < level else -np.inf))
            y[p] = v
        inv, previous = multiplier(), inv
        if inv == previous:
            break
    hit = y[planted] * inv == levels
    assert hit.sum() >= levels.size // 2 and hit[0] and hit[-1]
    for seed in range(20):
        packed, _, oidx, _ = ops.eden_quantize(y, n, bits, seed=seed, block=n, stochastic=True)
        codes = unpack(packed, n, bits)
        np.testing.assert_array_equal(codes, ref_quantize(y, n, bits, n, "stochastic", seed)[0])
        np.testing.assert_array_equal(codes[planted[hit]], np.flatnonzero(hit))
        assert not np.isin(planted, oidx).any()


@pytest.mark.parametrize("bits", BITS)
def test_outlier_codes_are_end_levels(bits: int) -> None:
    y = rotated_input(300_007, 2**16)
    packed, _, oidx, _ = ops.eden_quantize(y, 300_007, bits, seed=3, stochastic=True)
    codes = unpack(packed, y.size, bits)[oidx.astype(np.intp)]
    np.testing.assert_array_equal(codes, np.where(y[oidx.astype(np.intp)] < 0, 0, (1 << bits) - 1))


def test_three_bit_layout() -> None:
    """Eight 3-bit codes fill three bytes, LSB first: code i at bits [3i, 3i + 3)."""
    n = 16
    y = np.array([-9, -5, -3, -2, -1, -0.5, -0.1, 0.1, 0.5, 1, 2, 3, 5, 9, 0.3, -0.3], np.float32)
    packed, _, _, _ = ops.eden_quantize(y, n, 3, block=n)
    codes, _, _, _ = ref_quantize(y, n, 3, n, "nearest", 0)
    assert len(set(codes.tolist())) == 8
    assert packed.size == 6
    for g in range(2):
        word = int.from_bytes(packed[3 * g : 3 * g + 3].tobytes(), "little")
        assert [(word >> (3 * i)) & 7 for i in range(8)] == codes[8 * g : 8 * g + 8].tolist()


@pytest.mark.parametrize("bits", (1, 2, 3, 4))
@pytest.mark.parametrize("block", (8, 16))
@pytest.mark.parametrize(("full", "tail"), [(0, 1), (0, 2), (0, 4), (1, 1), (1, 2), (1, 4), (2, 1), (256, 2)])
def test_padding_bits_are_zero_and_checked(full: int, tail: int, block: int, bits: int) -> None:
    """Rotated lengths m with a partial last byte: the padding bits are zero, and a
    stream with one set is rejected."""
    m = full * block + tail
    assert ops.rht_padded_size(m, block) == m
    y = np.random.default_rng(m).standard_normal(m).astype(np.float32) + 3
    for stochastic in (False, True):
        packed, scales, _, _ = ops.eden_quantize(y, m, bits, seed=1, block=block, stochastic=stochastic)
        unpack(packed, m, bits)  # asserts zero padding
        if (m * bits) % 8 == 0:
            continue
        bad = packed.copy()
        bad[-1] |= np.uint8(0x80)
        with pytest.raises(ValueError, match="padding bits"):
            ops.eden_dequantize(bad, scales, m, bits, block=block, stochastic=stochastic)
        with pytest.raises(ValueError, match="padding bits"):
            ops.eden_accumulate(np.zeros(m, np.float32), bad, scales, m, bits, block=block)
        with pytest.raises(ValueError, match="padding bits"):
            ops.eden_decode(bad, scales, m, bits, SEED, block=block)


@pytest.mark.parametrize("stochastic", (False, True))
def test_zero_vector(stochastic: bool) -> None:
    x = np.zeros(5000, np.float32)
    packed, scales, oidx, _ = ops.eden_encode(x, 2, SEED, block=1024, stochastic=stochastic)
    np.testing.assert_array_equal(scales, 0)
    np.testing.assert_array_equal(unpack(packed, 5000, 2), 2)  # 4096 + 512 + 256 + 128 + 8: whole bytes
    assert oidx.size == 0
    out = ops.eden_decode(packed, scales, x.size, 2, SEED, block=1024, stochastic=stochastic)
    np.testing.assert_array_equal(out, 0)


def test_non_finite_input_is_rejected() -> None:
    y = np.ones(64, np.float32)
    for bad in (np.nan, np.inf):
        y[5] = bad
        with pytest.raises(ValueError, match="NaN or infinity"):
            ops.eden_quantize(y, 64, 2, block=64)
        with pytest.raises(ValueError, match="NaN or infinity"):
            ops.eden_encode(y, 2, SEED, block=64)


def test_tiny_and_huge_values() -> None:
    rng = np.random.default_rng(7)
    g = rng.standard_normal(4096).astype(np.float32)
    for scale in (1e-40, 1e-30, 1e30):
        x = (g * np.float32(scale)).astype(np.float32)
        packed, scales, oidx, oval = ops.eden_encode(x, 4, SEED, block=4096)
        out = ops.eden_decode(packed, scales, x.size, 4, SEED, block=4096)
        assert np.all(np.isfinite(out))
        if scale >= 1e-30:  # subnormal inputs lose precision in float32 themselves
            assert vnmse(out, x) < 0.02
    with pytest.raises(ValueError, match="overflows float32"):
        ops.eden_quantize(np.full(64, 3e38, np.float32), 64, 1, block=64)


# ----------------------------------------------------------- the error rate --
@pytest.mark.parametrize("bits", SMALL_BITS)
def test_vnmse_matches_theory(lloyd_max, bits: int) -> None:
    """EDEN's unbiased scale: vNMSE = mse / (1 - mse), mse the Lloyd-Max quantizer's."""
    x = np.random.default_rng(bits).standard_normal(2**16).astype(np.float32)
    errors = []
    for seed in range(10):
        packed, scales, _, _ = ops.eden_encode(x, bits, seed)
        errors.append(vnmse(ops.eden_decode(packed, scales, x.size, bits, seed), x))
    mse = quantizer_mse(lloyd_max[bits])
    assert np.mean(errors) == pytest.approx(mse / (1 - mse), rel=0.02)


def test_mse_scale_error_is_the_quantizer_mse(lloyd_max) -> None:
    x = np.random.default_rng(11).standard_normal(2**16).astype(np.float32)
    errors = []
    for seed in range(6):
        packed, scales, _, _ = ops.eden_encode(x, 2, seed, scale="mse")
        errors.append(vnmse(ops.eden_decode(packed, scales, x.size, 2, seed), x))
    assert np.mean(errors) == pytest.approx(quantizer_mse(lloyd_max[2]), rel=0.02)


def test_eight_bits_is_nearly_lossless() -> None:
    x = np.random.default_rng(12).standard_t(3, 50_000).astype(np.float32)
    packed, scales, _, _ = ops.eden_encode(x, 8, SEED, block=4096)
    assert vnmse(ops.eden_decode(packed, scales, x.size, 8, SEED, block=4096), x) < 1e-4


@pytest.mark.parametrize("bits", (1, 4))
def test_stochastic_is_unbiased(bits: int) -> None:
    """Given the rotation, the mean of the decoded rotated vector over quantization
    seeds converges to y at the rate of independent draws."""
    n, trials = 4096, 300
    y = rotated_input(n, 1024, seed=bits)
    mean = np.zeros(n)
    single = []
    for seed in range(trials):
        packed, scales, oidx, oval = ops.eden_quantize(y, n, bits, seed=seed, block=1024, stochastic=True)
        y_hat = ops.eden_dequantize(packed, scales, n, bits, block=1024, stochastic=True)
        y_hat[oidx.astype(np.intp)] = oval
        np.testing.assert_array_equal(y_hat[oidx.astype(np.intp)], y[oidx.astype(np.intp)])
        mean += y_hat
        single.append(vnmse(y_hat, y))
    mean /= trials
    assert vnmse(mean, y) < 1.5 * np.mean(single) / trials


def test_stochastic_depends_on_the_seed_only() -> None:
    y = rotated_input(10_000, 4096)
    a = ops.eden_quantize(y, 10_000, 2, seed=5, block=4096, stochastic=True)
    b = ops.eden_quantize(y.copy(), 10_000, 2, seed=5, block=4096, stochastic=True)
    c = ops.eden_quantize(y, 10_000, 2, seed=6, block=4096, stochastic=True)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert np.mean(a[0] != c[0]) > 0.3


# ---------------------------------------------------------------- fused ops --
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(
    ("n", "block"), [(1, 2**16), (7, 4), (1000, 8), (4099, 16), (65541, 2**16), (300_007, 4096), (2**21 + 5, 2**21)]
)
def test_encode_decode_equal_the_steps(n: int, block: int, bits: int, mode: str) -> None:
    """eden_encode = per segment (whole blocks, then power-of-two tails) two seeded
    sign + Walsh-Hadamard passes and eden_quantize; eden_decode = per segment
    eden_dequantize, outliers, and the two passes undone: bit for bit (docs/format.md)."""
    stochastic = mode == "stochastic"
    x = np.random.default_rng([n, bits]).standard_t(3, n).astype(np.float32)
    scale = "mse" if mode == "mse" else "unbiased"
    kw = dict(block=block, stochastic=stochastic, scale=scale)
    fused = ops.eden_encode(x, bits, SEED, quant_seed=77, **kw)
    steps = [[], [], [], []]
    segments = eden_segments(n, block)
    for i, (off, length) in enumerate(segments):
        y = x[off : off + length].copy()
        ops.fwht(ops.random_signs(y, stage_seed(SEED, 2 * i, PURPOSE_RHT)), block)
        ops.fwht(ops.random_signs(y, stage_seed(SEED, 2 * i + 1, PURPOSE_RHT)), block)
        packed, scales, oidx, oval = ops.eden_quantize(y, length, bits, seed=stage_seed(77, i, PURPOSE_QUANT), **kw)
        for part, value in zip(steps, (packed, scales, oidx.astype(np.int64) + off, oval)):
            part.append(value)
    for a, b in zip(fused, steps):
        np.testing.assert_array_equal(a, np.concatenate(b).astype(a.dtype))
    packed, scales, oidx, oval = fused
    out = ops.eden_decode(
        packed, scales, n, bits, SEED, block=block, stochastic=stochastic, outlier_idx=oidx, outlier_val=oval
    )
    assert out.dtype == np.float32 and out.shape == (n,)
    expected = np.empty(n, np.float32)
    for i, ((off, length), codes, seg_scales) in enumerate(zip(segments, steps[0], steps[1])):
        y = ops.eden_dequantize(codes, seg_scales, length, bits, block=block, stochastic=stochastic)
        inside = (oidx >= off) & (oidx < off + length)
        y[oidx[inside].astype(np.intp) - off] = oval[inside]
        ops.random_signs(ops.fwht(y, block), stage_seed(SEED, 2 * i + 1, PURPOSE_RHT))
        ops.random_signs(ops.fwht(y, block), stage_seed(SEED, 2 * i, PURPOSE_RHT))
        expected[off : off + length] = y
    np.testing.assert_array_equal(out, expected)


def test_default_quant_seed_is_derived_from_the_seed() -> None:
    x = np.random.default_rng(3).standard_normal(5000).astype(np.float32)
    a = ops.eden_encode(x, 2, SEED, stochastic=True)
    b = ops.eden_encode(x, 2, SEED, stochastic=True, quant_seed=ops._core.eden_derived_seed(SEED))
    c = ops.eden_encode(x, 2, SEED, stochastic=True, quant_seed=1)
    np.testing.assert_array_equal(a[0], b[0])
    assert np.mean(a[0] != c[0]) > 0.3


@pytest.mark.parametrize("mode", ("nearest", "stochastic"))
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("n", "block"), [(7, 2), (1000, 8), (65541, 4096), (300_007, 2**16)])
def test_accumulate_is_weight_times_dequantize(n: int, block: int, bits: int, mode: str) -> None:
    stochastic = mode == "stochastic"
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    m = ops.rht_padded_size(n, block)
    packed, scales, _, _ = ops.eden_quantize(ops.rht(x, SEED, block), n, bits, block=block, stochastic=stochastic)
    acc = np.random.default_rng(1).standard_normal(m).astype(np.float32)
    y_hat = ops.eden_dequantize(packed, scales, n, bits, block=block, stochastic=stochastic)
    for weight in (1.0, 0.3, -2.5):
        expected = acc + np.float32(weight) * y_hat
        assert (
            ops.eden_accumulate(acc, packed, scales, n, bits, block=block, stochastic=stochastic, weight=weight) is None
        )
        np.testing.assert_array_equal(acc, expected)


def test_accumulate_into_a_torch_tensor() -> None:
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(2).standard_normal(3000).astype(np.float32)
    packed, scales, _, _ = ops.eden_quantize(ops.rht(x, SEED, 1024), 3000, 4, block=1024)
    acc = torch.zeros(ops.rht_padded_size(3000, 1024))
    ops.eden_accumulate(acc, packed, scales, 3000, 4, block=1024, weight=2.0)
    expected = np.float32(2.0) * ops.eden_dequantize(packed, scales, 3000, 4, block=1024)
    np.testing.assert_array_equal(acc.numpy(), expected)
    out = ops.eden_encode(torch.from_numpy(x), 4, SEED, block=1024)
    np.testing.assert_array_equal(out[0], ops.eden_encode(x, 4, SEED, block=1024)[0])
    decoded = torch.ones(3000)
    ops.eden_decode(out[0], out[1], 3000, 4, SEED, block=1024, acc=decoded, weight=0.5)
    expected = np.float32(1) + np.float32(0.5) * ops.eden_decode(out[0], out[1], 3000, 4, SEED, block=1024)
    np.testing.assert_array_equal(decoded.numpy(), expected)
    ops.eden_decode(out[0], out[1], 3000, 4, SEED, block=1024, acc=decoded, weight=0.5, accumulate=False)
    values = ops.eden_decode(out[0], out[1], 3000, 4, SEED, block=1024)
    np.testing.assert_array_equal(decoded.numpy(), np.float32(0.5) * values)


@pytest.mark.parametrize("stochastic", (False, True))
@pytest.mark.parametrize(("n", "block"), [(2**20 + 3, 4096), (2**20 + 3, 2**16), (2**20, 2**18), (300_007, 8)])
def test_thread_count_independent(threads, n: int, block: int, stochastic: bool) -> None:
    x = np.random.default_rng(n).standard_t(3, n).astype(np.float32)
    y = ops.rht(x, SEED, block)
    results = []
    for t in (1, 2, 3):
        with threads(t):
            enc = ops.eden_encode(x, 3, SEED, block=block, stochastic=stochastic)
            q = ops.eden_quantize(y, n, 3, seed=5, block=block, stochastic=stochastic)
            dec = ops.eden_decode(
                enc[0], enc[1], n, 3, SEED, block=block, stochastic=stochastic, outlier_idx=enc[2], outlier_val=enc[3]
            )
            acc = np.ones(y.size, np.float32)
            ops.eden_accumulate(acc, q[0], q[1], n, 3, block=block, stochastic=stochastic, weight=0.5)
            results.append((*enc, *q, dec, acc))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------ bad arguments --
def test_bad_bits() -> None:
    y = np.ones(64, np.float32)
    packed, scales, _, _ = ops.eden_quantize(y, 64, 2, block=64)
    for bits in (0, 5, 9, 16, -1):
        with pytest.raises(ValueError, match="bits"):
            ops.eden_quantize(y, 64, bits, block=64)
        with pytest.raises(ValueError, match="bits"):
            ops.eden_dequantize(packed, scales, 64, bits, block=64)
        with pytest.raises(ValueError, match="bits"):
            ops.eden_encode(y, bits, SEED)
        with pytest.raises(ValueError, match="bits"):
            ops.eden_centroids(bits)
        with pytest.raises(ValueError, match="bits"):
            ops._core.eden_quantize(y, 64, bits, 0, 64, False, False)
    with pytest.raises(TypeError, match="bits"):
        ops.eden_levels(2.0)  # type: ignore[arg-type]


def test_bad_lengths() -> None:
    n, block = 1000, 4096  # m = 1024, one block
    y = np.ones(1024, np.float32)
    packed, scales, _, _ = ops.eden_quantize(y, n, 3, block=block)
    with pytest.raises(ValueError, match=r"y has 1023 elements, expected 1024"):
        ops.eden_quantize(y[:-1], n, 3, block=block)
    with pytest.raises(ValueError, match="y has 1024 elements, expected 2048"):
        ops.eden_quantize(y, 1025, 3, block=block)
    with pytest.raises(ValueError, match="packed has 383 elements, expected 384"):
        ops.eden_dequantize(packed[:-1], scales, n, 3, block=block)
    with pytest.raises(ValueError, match="scales has 2 elements, expected 1"):
        ops.eden_dequantize(packed, np.ones(2, np.float32), n, 3, block=block)
    with pytest.raises(ValueError, match="acc has 1000 elements, expected 1024"):
        ops.eden_accumulate(np.zeros(1000, np.float32), packed, scales, n, 3, block=block)
    with pytest.raises(ValueError, match="packed"):
        ops.eden_decode(packed[:10], scales, n, 3, SEED, block=block)
    with pytest.raises(ValueError, match="n"):
        ops.eden_dequantize(packed, scales, -1, 3, block=block)
    with pytest.raises(ValueError, match="n"):
        ops.eden_dequantize(packed, scales, 2**32, 3, block=block)


@pytest.mark.parametrize("block", (0, 3, 1000, 2**25))
def test_bad_block(block: int) -> None:
    y = np.ones(64, np.float32)
    with pytest.raises(ValueError, match="block"):
        ops.eden_quantize(y, 64, 2, block=block)
    with pytest.raises(ValueError, match="block"):
        ops.eden_encode(y, 2, SEED, block=block)
    with pytest.raises(ValueError, match="block"):
        ops.eden_dequantize(np.zeros(16, np.uint8), np.ones(1, np.float32), 64, 2, block=block)
    with pytest.raises(ValueError, match="block"):
        ops._core.eden_decode(
            np.zeros(16, np.uint8),
            np.ones(1, np.float32),
            64,
            2,
            SEED,
            block,
            False,
            np.zeros(0, np.uint32),
            np.zeros(0, np.float32),
        )


def test_bad_scale_and_seed() -> None:
    y = np.ones(64, np.float32)
    with pytest.raises(ValueError, match="scale"):
        ops.eden_quantize(y, 64, 2, block=64, scale="max")
    with pytest.raises(ValueError, match="scale"):
        ops.eden_encode(y, 2, SEED, stochastic=True, scale="mse")
    with pytest.raises(TypeError, match="seed"):
        ops.eden_encode(y, 2, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="seed"):
        ops.eden_decode(np.zeros(16, np.uint8), np.ones(1, np.float32), 64, 2, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seed"):
        ops.eden_quantize(y, 64, 2, seed=-1, block=64, stochastic=True)


def test_bad_outliers() -> None:
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    packed, scales, _, _ = ops.eden_encode(x, 2, SEED, stochastic=True)
    args = (packed, scales, 1000, 2, SEED)
    with pytest.raises(ValueError, match="outlier_idx and outlier_val"):
        ops.eden_decode(*args, stochastic=True, outlier_idx=np.array([3], np.uint32))
    with pytest.raises(ValueError, match="outlier_val has 2 elements, expected 1"):
        ops.eden_decode(*args, stochastic=True, outlier_idx=[3], outlier_val=[1.0, 2.0])
    with pytest.raises(ValueError, match="strictly ascending"):
        ops.eden_decode(*args, stochastic=True, outlier_idx=[5, 3], outlier_val=[1.0, 2.0])
    with pytest.raises(ValueError, match="strictly ascending"):
        ops.eden_decode(*args, stochastic=True, outlier_idx=[3, 3], outlier_val=[1.0, 2.0])
    with pytest.raises(ValueError, match="below 1000"):
        ops.eden_decode(*args, stochastic=True, outlier_idx=[1000], outlier_val=[1.0])
    with pytest.raises(ValueError, match="negative"):
        ops.eden_decode(*args, stochastic=True, outlier_idx=[-1], outlier_val=[1.0])


def test_types() -> None:
    y = np.ones(64, np.float32)
    packed, scales, _, _ = ops.eden_quantize(y, 64, 2, block=64)
    with pytest.raises(TypeError, match="packed must be uint8"):
        ops.eden_dequantize(packed.astype(np.int16), scales, 64, 2, block=64)
    with pytest.raises(TypeError, match="floating"):
        ops.eden_quantize(np.arange(64), 64, 2, block=64)
    with pytest.raises(TypeError, match="acc"):
        ops.eden_accumulate(np.zeros(64), packed, scales, 64, 2, block=64)
    with pytest.raises(TypeError, match="float32"):
        ops._core.eden_quantize(np.ones(64), 64, 2, 0, 64, False, False)
    # bytes work as the packed stream
    np.testing.assert_array_equal(
        ops.eden_dequantize(packed.tobytes(), scales, 64, 2, block=64),
        ops.eden_dequantize(packed, scales, 64, 2, block=64),
    )


def test_malformed_codes_raise_decode_error() -> None:
    """Bytes that break the format (nonzero padding bits after a segment's codes) raise
    fedpress.DecodeError from the kernels too, as from every decode path."""
    import fedpress as fp

    x = np.ones(1001, np.float32)  # the last segment holds one 3-bit code: 5 padding bits
    packed, scales, _, _ = ops.eden_encode(x, 3, SEED, block=256)
    packed = packed.copy()
    packed[-1] |= 0x80
    with pytest.raises(fp.DecodeError, match="padding"):
        ops.eden_decode(packed, scales, 1001, 3, SEED, block=256)
    y = ops.rht(np.ones(3, np.float32), SEED, 4)  # four 3-bit codes: 4 padding bits
    codes, block_scales, _, _ = ops.eden_quantize(y, 3, 3, block=4)
    codes = codes.copy()
    codes[-1] |= 0x80
    with pytest.raises(fp.DecodeError, match="padding"):
        ops.eden_dequantize(codes, block_scales, 3, 3, block=4)
