"""ops.rht / ops.irht / ops.rht_padded_size: seeded randomized Hadamard rotation."""

from __future__ import annotations

import numpy as np
import pytest
from fedpress import ops
from hypothesis import given
from hypothesis import strategies as st

SEED = 0x5EED
DEFAULT_BLOCK = 2**16
ROUND_TRIP_SIZES = (0, 1, 2, 3, 7, 1000, 4096, 65536, 65537, 300_007)
BLOCKS = (1, 2, 16, 2048, 4096, DEFAULT_BLOCK, 2**20)
# Float32 rounding over log2(block) <= 24 butterfly stages, there and back.
ROUND_TRIP_RTOL = 1e-6
NORM_RTOL = 1e-5


# ---------------------------------------------------------------- reference --
def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def ref_padded_size(n: int, block: int) -> int:
    tail = n % block
    return (n // block) * block + (next_pow2(tail) if tail else 0)


def ref_blocks(n: int, block: int) -> list[tuple[int, int, int]]:
    """(offset, padded length, valid length) of every block."""
    out = [(b * block, block, block) for b in range(n // block)]
    if n % block:
        out.append(((n // block) * block, next_pow2(n % block), n % block))
    return out


def sylvester(order: int) -> np.ndarray:
    """The unnormalised Walsh-Hadamard matrix of a power-of-two order, natural order."""
    h = np.ones((1, 1))
    while h.shape[0] < order:
        h = np.block([[h, h], [h, -h]])
    return h


def signs(n: int, seed: int) -> np.ndarray:
    """The random signs s_i: with block 1 the transform is diag(s)."""
    return ops.rht(np.ones(n, dtype=np.float32), seed, block=1)


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a64 - b64) / np.linalg.norm(b64))


def kurtosis(x: np.ndarray) -> float:
    z = x.astype(np.float64) - x.mean(dtype=np.float64)
    return float(np.mean(z**4) / np.mean(z**2) ** 2)


def student_t3(n: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_t(3, n).astype(np.float32)


# --------------------------------------------------------------- the layout --
@pytest.mark.parametrize("block", (1, 2, 8, 1024, DEFAULT_BLOCK, 2**24))
@pytest.mark.parametrize("n", (0, 1, 2, 3, 5, 1000, 1024, 1025, 65535, 65536, 65537, 300_007))
def test_padded_size(n: int, block: int) -> None:
    m = ops.rht_padded_size(n, block)
    assert isinstance(m, int)
    assert m == ref_padded_size(n, block)
    assert n <= m <= 2 * n


@pytest.mark.parametrize(
    ("n", "block", "m"),
    [
        (0, DEFAULT_BLOCK, 0),
        (1, DEFAULT_BLOCK, 1),
        (3, DEFAULT_BLOCK, 4),
        (1000, DEFAULT_BLOCK, 1024),
        (65536, DEFAULT_BLOCK, 65536),
        (65537, DEFAULT_BLOCK, 65537),
        (65539, DEFAULT_BLOCK, 65536 + 4),
        (300_007, DEFAULT_BLOCK, 4 * 65536 + 65536),
        (300_007, 4096, 73 * 4096 + 1024),
        (7, 1, 7),
    ],
)
def test_padded_size_examples(n: int, block: int, m: int) -> None:
    assert ops.rht_padded_size(n, block) == m
    assert ops.rht(np.zeros(n, dtype=np.float32), SEED, block).shape == (m,)


def test_default_block() -> None:
    assert ops.rht_padded_size(300_007) == ref_padded_size(300_007, DEFAULT_BLOCK)
    x = student_t3(300_007)
    np.testing.assert_array_equal(ops.rht(x, SEED), ops.rht(x, SEED, DEFAULT_BLOCK))


def test_block_larger_than_vector_is_the_vectors_power_of_two() -> None:
    x = student_t3(1000)
    ref = ops.rht(x, SEED, 1024)
    for block in (2048, DEFAULT_BLOCK, 2**24):
        np.testing.assert_array_equal(ops.rht(x, SEED, block), ref)


# --------------------------------------------------------------- round trip --
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("n", ROUND_TRIP_SIZES)
def test_round_trip(n: int, block: int) -> None:
    x = np.random.default_rng([n, block]).standard_normal(n).astype(np.float32)
    y = ops.rht(x, SEED, block)
    assert y.dtype == np.float32 and y.shape == (ref_padded_size(n, block),)
    z = ops.irht(y, n, SEED, block)
    assert z.dtype == np.float32 and z.shape == (n,)
    if n:
        assert rel_l2(z, x) < ROUND_TRIP_RTOL
        assert np.max(np.abs(z - x)) < 1e-5 * max(1.0, float(np.max(np.abs(x))))


def test_empty() -> None:
    y = ops.rht(np.zeros(0, dtype=np.float32), SEED)
    assert y.dtype == np.float32 and y.shape == (0,)
    z = ops.irht(y, 0, SEED)
    assert z.dtype == np.float32 and z.shape == (0,)


@pytest.mark.parametrize("kind", ("student_t", "lognormal", "ties", "zeros"))
def test_round_trip_distributions(make_input, kind: str) -> None:
    x = make_input(kind, 300_007)
    z = ops.irht(ops.rht(x, SEED), x.size, SEED)
    if kind == "zeros":
        np.testing.assert_array_equal(z, 0)
    else:
        assert rel_l2(z, x) < ROUND_TRIP_RTOL


@given(
    n=st.integers(0, 5000),
    log_block=st.integers(0, 13),
    seed=st.integers(0, 2**64 - 1),
    data_seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_property(n: int, log_block: int, seed: int, data_seed: int) -> None:
    block = 2**log_block
    x = np.random.default_rng(data_seed).standard_normal(n).astype(np.float32)
    y = ops.rht(x, seed, block)
    assert y.size == ref_padded_size(n, block)
    z = ops.irht(y, n, seed, block)
    if n:
        assert rel_l2(z, x) < ROUND_TRIP_RTOL
        ratio = np.linalg.norm(y.astype(np.float64)) / np.linalg.norm(x.astype(np.float64))
        assert abs(ratio - 1.0) < NORM_RTOL


# ----------------------------------------------------- orthonormal structure --
@pytest.mark.parametrize("block", (16, 2048, DEFAULT_BLOCK, 2**20))
@pytest.mark.parametrize("n", (5, 1000, 65537, 300_007))
def test_norm_preserved(make_input, n: int, block: int) -> None:
    for kind in ("normal", "student_t"):
        x = make_input(kind, n)
        y = ops.rht(x, SEED, block)
        ratio = np.linalg.norm(y.astype(np.float64)) / np.linalg.norm(x.astype(np.float64))
        assert abs(ratio - 1.0) < NORM_RTOL


@pytest.mark.parametrize(("n", "block"), [(37, 16), (20, 8), (13, 64), (9, 1), (64, 64)])
def test_basis_vectors(n: int, block: int) -> None:
    """Column i of the transform: +-1/sqrt(L) over its own block, zero elsewhere;
    and within each block the matrix is the Sylvester Hadamard matrix times the
    diagonal of the same signs that block = 1 exposes."""
    m = ref_padded_size(n, block)
    cols = np.empty((m, n), dtype=np.float32)
    for i in range(n):
        e = np.zeros(n, dtype=np.float32)
        e[i] = 1.0
        cols[:, i] = ops.rht(e, SEED, block)
    s = signs(n, SEED).astype(np.float64)
    for off, length, valid in ref_blocks(n, block):
        inside = cols[off : off + length, off : off + valid].astype(np.float64)
        np.testing.assert_allclose(np.abs(inside), 1 / np.sqrt(length), rtol=1e-6)
        expected = sylvester(length)[:, :valid] * s[off : off + valid] / np.sqrt(length)
        np.testing.assert_allclose(inside, expected, rtol=1e-6)
        outside = np.ones(m, dtype=bool)
        outside[off : off + length] = False
        assert not np.any(cols[outside, off : off + valid])


@pytest.mark.parametrize(("n", "block"), [(1000, 4096), (300, 64), (2048, 2048), (5000, 1024)])
def test_matches_numpy_reference(n: int, block: int) -> None:
    """y = H_L diag(s) x per block, H_L from the Sylvester construction in float64."""
    x = student_t3(n)
    s = signs(n, SEED).astype(np.float64)
    ref = np.zeros(ref_padded_size(n, block))
    for off, length, valid in ref_blocks(n, block):
        v = np.zeros(length)
        v[:valid] = s[off : off + valid] * x[off : off + valid]
        ref[off : off + length] = sylvester(length) @ v / np.sqrt(length)
    y = ops.rht(x, SEED, block)
    scale = np.linalg.norm(x.astype(np.float64)) / np.sqrt(n)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5 * scale)


def test_inverse_structure() -> None:
    """The inverse of a block is diag(s) H: irht(e_0) = s / sqrt(L)."""
    n = 256
    y = np.zeros(n, dtype=np.float32)
    y[0] = 1.0
    np.testing.assert_allclose(ops.irht(y, n, SEED, n), signs(n, SEED) / 16.0, rtol=1e-6)


def test_linearity() -> None:
    rng = np.random.default_rng(5)
    a = rng.standard_normal(70_000).astype(np.float32)
    b = rng.standard_normal(70_000).astype(np.float32)
    lhs = ops.rht(2.0 * a - 0.5 * b, SEED).astype(np.float64)
    rhs = 2.0 * ops.rht(a, SEED).astype(np.float64) - 0.5 * ops.rht(b, SEED).astype(np.float64)
    assert rel_l2(lhs, rhs) < 1e-6


# -------------------------------------------------------------------- signs --
def test_signs_are_a_function_of_seed_and_index() -> None:
    long = signs(100_000, SEED)
    np.testing.assert_array_equal(np.abs(long), 1.0)
    for n in (1, 31, 33, 1000):
        np.testing.assert_array_equal(signs(n, SEED), long[:n])
    # The same signs are used whatever the block (first row of H is all ones).
    x = np.zeros(300, dtype=np.float32)
    x[77] = 1.0
    assert np.sign(ops.rht(x, SEED, 64)[64]) == long[77]


def test_signs_look_random() -> None:
    n = 2**16
    s = signs(n, SEED).astype(np.float64)
    assert abs(s.mean()) < 5 / np.sqrt(n)
    assert abs(np.mean(s[1:] * s[:-1])) < 5 / np.sqrt(n)  # neighbours uncorrelated
    assert abs(np.mean(s[32:] * s[:-32])) < 5 / np.sqrt(n)
    t = signs(n, SEED + 1).astype(np.float64)
    assert abs(np.mean(s * t)) < 5 / np.sqrt(n)  # seeds independent


def test_deterministic_per_seed() -> None:
    x = student_t3(300_007)
    y = ops.rht(x, 42)
    np.testing.assert_array_equal(ops.rht(x, 42), y)
    np.testing.assert_array_equal(ops.rht(x.copy(), 42), y)
    other = ops.rht(x, 43)
    assert other.shape == y.shape
    assert np.mean(other != y) > 0.9
    # Decoding with the wrong seed does not give x back.
    assert rel_l2(ops.irht(y, x.size, 43), x) > 0.5
    np.testing.assert_array_equal(ops.rht(x, 2**64 - 1), ops.rht(x, 2**64 - 1))


@pytest.mark.parametrize(("n", "block"), [(300_007, DEFAULT_BLOCK), (2**20 + 3, 4096), (300_007, 2**20)])
def test_thread_count_independent(threads, n: int, block: int) -> None:
    x = student_t3(n)
    with threads(1):
        y1 = ops.rht(x, SEED, block)
        z1 = ops.irht(y1, n, SEED, block)
    with threads(2):
        y2 = ops.rht(x, SEED, block)
        z2 = ops.irht(y1, n, SEED, block)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(z1, z2)


# ------------------------------------------------------------ what it is for --
def test_rotation_gaussianises_heavy_tails() -> None:
    x = student_t3(2**16)
    assert kurtosis(x) > 6  # heavy-tailed
    y = ops.rht(x, SEED)
    assert abs(kurtosis(y) - 3.0) < 0.15


def test_rotation_helps_2bit_quantization() -> None:
    n = 2**16
    x = student_t3(n)

    def roundtrip(v: np.ndarray) -> np.ndarray:
        packed, scales = ops.quantize(v, 2, bucket=512, stochastic=False)
        return ops.dequantize(packed, scales, 2, v.size, bucket=512)

    direct = rel_l2(roundtrip(x), x)
    y = ops.rht(x, SEED)
    rotated = rel_l2(ops.irht(roundtrip(y), n, SEED), x)
    assert rotated * 2 <= direct, (direct, rotated)


# ------------------------------------------------------------ bad arguments --
@pytest.mark.parametrize("block", (0, 3, 6, 1000, 2**24 + 2**23, 2**25, -1, 2**70))
def test_bad_block(block: int) -> None:
    x = np.ones(10, dtype=np.float32)
    err = ValueError
    with pytest.raises(err, match="block"):
        ops.rht(x, SEED, block)
    with pytest.raises(err, match="block"):
        ops.irht(x, 10, SEED, block)
    with pytest.raises(err, match="block"):
        ops.rht_padded_size(10, block)


@pytest.mark.parametrize("block", (0, 3, 2**25, -4))
def test_bad_block_core(block: int) -> None:
    """The binding validates on its own, without the Python wrapper."""
    x = np.ones(10, dtype=np.float32)
    with pytest.raises(ValueError, match="block"):
        ops._core.rht(x, SEED, block)
    with pytest.raises(ValueError, match="block"):
        ops._core.irht(x, 10, SEED, block)
    with pytest.raises(ValueError, match="block"):
        ops._core.rht_padded_size(10, block)


def test_block_type() -> None:
    with pytest.raises(TypeError, match="block"):
        ops.rht(np.ones(4, dtype=np.float32), SEED, 4.0)  # type: ignore[arg-type]


def test_wrong_length_inverse() -> None:
    y = ops.rht(np.ones(1000, dtype=np.float32), SEED)  # 1024 elements
    with pytest.raises(ValueError, match="1023.*1024"):
        ops.irht(y[:-1], 1000, SEED)
    with pytest.raises(ValueError, match="1024.*2048"):
        ops.irht(y, 1025, SEED)
    with pytest.raises(ValueError, match="1024"):
        ops._core.irht(y, 2000, SEED, DEFAULT_BLOCK)
    with pytest.raises(ValueError, match="1024.*1000"):
        ops.irht(y, 1000, SEED, block=2)  # 500 full blocks of 2: y should have 1000
    assert ops.irht(y, 1000, SEED).shape == (1000,)


def test_bad_n() -> None:
    y = np.zeros(4, dtype=np.float32)
    for n in (-1, 2**32, 2**70):
        with pytest.raises(ValueError, match="n"):
            ops.irht(y, n, SEED)
        with pytest.raises(ValueError, match="n"):
            ops.rht_padded_size(n)
    with pytest.raises(TypeError, match="n"):
        ops.irht(y, 4.0, SEED)  # type: ignore[arg-type]


def test_seed_required() -> None:
    x = np.ones(8, dtype=np.float32)
    with pytest.raises(TypeError, match="seed"):
        ops.rht(x, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="seed"):
        ops.irht(x, 8, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seed"):
        ops.rht(x, -1)
    with pytest.raises(ValueError, match="seed"):
        ops.rht(x, 2**64)
    with pytest.raises(TypeError, match="seed"):
        ops.rht(x, 1.5)  # type: ignore[arg-type]


def test_input_conversion() -> None:
    x64 = np.random.default_rng(1).standard_normal((10, 30))
    y = ops.rht(x64, SEED)  # float64, 2-D: converted to flat float32
    np.testing.assert_array_equal(y, ops.rht(x64.astype(np.float32).reshape(-1), SEED))
    np.testing.assert_array_equal(ops.rht(list(x64.reshape(-1)), SEED), y)
    z = ops.irht(y.astype(np.float64), 300, SEED)
    assert rel_l2(z, x64.reshape(-1).astype(np.float32)) < ROUND_TRIP_RTOL
    strided = np.asarray(x64.astype(np.float32)[:, ::2])
    np.testing.assert_array_equal(ops.rht(strided, SEED), ops.rht(strided.copy(), SEED))
    with pytest.raises(TypeError, match="floating"):
        ops.rht(np.arange(10), SEED)
    with pytest.raises(TypeError, match="floating"):
        ops.irht(np.arange(16), 16, SEED)


def test_core_type_checks() -> None:
    with pytest.raises(TypeError, match="float32"):
        ops._core.rht(np.ones(8), SEED, 8)
    with pytest.raises(ValueError, match="1-D"):
        ops._core.rht(np.ones((2, 4), dtype=np.float32), SEED, 8)
    with pytest.raises(ValueError, match="contiguous"):
        ops._core.rht(np.ones(16, dtype=np.float32)[::2], SEED, 8)
    with pytest.raises(TypeError, match="numpy array"):
        ops._core.irht([1.0, 2.0], 2, SEED, 2)


def test_input_not_modified() -> None:
    x = student_t3(5000)
    before = x.copy()
    y = ops.rht(x, SEED, 1024)
    y_before = y.copy()
    ops.irht(y, x.size, SEED, 1024)
    np.testing.assert_array_equal(x, before)
    np.testing.assert_array_equal(y, y_before)


# ----------------------------------------------------- fwht and random_signs --
@pytest.mark.parametrize(
    ("n", "block"),
    [(1, 16), (7, 16), (1000, 4096), (5000, 1), (65541, DEFAULT_BLOCK), (300_007, 4096)],
)
def test_rht_is_fwht_of_random_signs(n: int, block: int) -> None:
    """rht(x) == fwht(random_signs(x zero-padded)), value for value."""
    x = student_t3(n)
    padded = np.zeros(ref_padded_size(n, block), dtype=np.float32)
    padded[:n] = x
    assert ops.random_signs(padded, SEED) is padded
    assert ops.fwht(padded, block) is padded
    np.testing.assert_array_equal(padded, ops.rht(x, SEED, block))


def test_random_signs_are_rhts_signs() -> None:
    x = np.ones(100_003, dtype=np.float32)
    ops.random_signs(x, SEED)
    np.testing.assert_array_equal(x, signs(x.size, SEED))
    y = student_t3(1000)
    z = y.copy()
    ops.random_signs(ops.random_signs(z, 7), 7)
    np.testing.assert_array_equal(z, y)


@pytest.mark.parametrize("block", (1, 2, 16, 2048, 4096, DEFAULT_BLOCK))
def test_fwht_is_orthonormal_and_its_own_inverse(block: int) -> None:
    n = max(3 * block, 4096) + block // 2  # whole blocks and a shorter power-of-two tail
    if block == 1:
        n = 4096
    x = np.random.default_rng(block).standard_normal(n).astype(np.float32)
    y = x.copy()
    ops.fwht(y, block)
    ratio = np.linalg.norm(y.astype(np.float64)) / np.linalg.norm(x.astype(np.float64))
    assert abs(ratio - 1.0) < NORM_RTOL
    ops.fwht(y, block)
    assert rel_l2(y, x) < ROUND_TRIP_RTOL


def test_fwht_matches_sylvester() -> None:
    x = student_t3(16 * 5 + 8)
    y = x.copy()
    ops.fwht(y, 16)
    ref = np.concatenate(
        [sylvester(16) @ x[o : o + 16] / 4 for o in range(0, 80, 16)] + [sylvester(8) @ x[80:] / np.sqrt(8)]
    )
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5 * float(np.max(np.abs(x))))


def test_fwht_default_block_is_the_whole_vector() -> None:
    x = student_t3(4096)
    a, b = x.copy(), x.copy()
    ops.fwht(a)
    ops.fwht(b, 4096)
    np.testing.assert_array_equal(a, b)
    assert ops.fwht(np.zeros(0, dtype=np.float32)).size == 0
    with pytest.raises(ValueError, match="power-of-two"):
        ops.fwht(np.ones(12, dtype=np.float32))


def test_fwht_torch_in_place() -> None:
    torch = pytest.importorskip("torch")
    x = student_t3(1024)
    t = torch.from_numpy(x.copy())
    assert ops.fwht(ops.random_signs(t, SEED), 256) is t
    np.testing.assert_array_equal(t.numpy(), ops.rht(x, SEED, 256))


@pytest.mark.parametrize(("n", "block"), [(2**20 + 4, 4096), (2**21, 2**20)])
def test_fwht_and_signs_thread_count_independent(threads, n: int, block: int) -> None:
    x = student_t3(n)
    out = []
    for t in (1, 2, 3):
        with threads(t):
            y = x.copy()
            ops.fwht(ops.random_signs(y, SEED), block)
            out.append(y)
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(out[0], out[2])


def test_fwht_bad_arguments() -> None:
    with pytest.raises(ValueError, match="x has 19 elements"):
        ops.fwht(np.ones(19, dtype=np.float32), 16)
    with pytest.raises(ValueError, match="x has 3 elements"):
        ops.fwht(np.ones(3, dtype=np.float32), 16)
    for block in (0, 3, 2**25):
        with pytest.raises(ValueError, match="block"):
            ops.fwht(np.ones(16, dtype=np.float32), block)
    with pytest.raises(TypeError, match="float32"):
        ops.fwht(np.ones(16), 16)
    with pytest.raises(TypeError, match="numpy array or torch tensor"):
        ops.fwht([1.0, 2.0], 2)  # type: ignore[arg-type]
    frozen = np.ones(16, dtype=np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        ops.fwht(frozen, 16)
    with pytest.raises(ValueError, match="writable"):
        ops._core.random_signs(frozen, SEED)
    with pytest.raises(TypeError, match="seed"):
        ops.random_signs(np.ones(4, dtype=np.float32), None)  # type: ignore[arg-type]
