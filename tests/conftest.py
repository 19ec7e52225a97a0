"""Shared fixtures for the fedpress.ops kernel tests.

Hypothesis profiles (select with FEDPRESS_HYPOTHESIS_PROFILE):
  ci   (default) ~50 examples per property, no deadline
  dev  300 examples
  deep 2500 examples, for a long local soak

Input generators are deterministic (seeded) and cached; the cached arrays are
read-only so a test that wants to modify one must copy it first.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Iterator
from typing import Callable

import numpy as np
import pytest
from fedpress import ops
from hypothesis import HealthCheck, settings

# ----------------------------------------------------------------- hypothesis --
# Hypothesis imports its patch-suggestion helper only when a property fails;
# with some libcst/mypy_extensions versions that import emits a
# DeprecationWarning, which filterwarnings=error turns into a pytest
# INTERNALERROR hiding the real failure. Import it once, quietly, up front.
with warnings.catch_warnings(), contextlib.suppress(Exception):
    warnings.simplefilter("ignore", DeprecationWarning)
    import hypothesis.extra._patching  # noqa: F401

_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]
settings.register_profile(
    "ci", max_examples=50, deadline=None, suppress_health_check=_SUPPRESS, print_blob=True
)
settings.register_profile("dev", max_examples=300, deadline=None, suppress_health_check=_SUPPRESS)
settings.register_profile("deep", max_examples=2500, deadline=None, suppress_health_check=_SUPPRESS)
settings.load_profile(os.environ.get("FEDPRESS_HYPOTHESIS_PROFILE", "ci"))

# --------------------------------------------------------------------- sizes --
CHUNK = 1 << 16  # fixed work-chunk of the selection / quantization kernels
SAMPLE_MIN_N = 1 << 17  # from this size on, top-k uses a sampled threshold
# 1: trivial; 7: below every SIMD width; 1001: SIMD body + scalar tail;
# 300_007: several 2^16 chunks, a ragged last chunk, and the sampled path.
ODD_LENGTHS = (1, 7, 1001, 300_007)
LARGE_N = 300_007
assert LARGE_N >= SAMPLE_MIN_N and LARGE_N % CHUNK != 0

DISTRIBUTIONS = ("normal", "student_t", "lognormal", "ties", "zeros")
TIE_VALUES = np.array([-2.0, -1.0, 0.0, 1.0, 2.0], dtype=np.float32)


@functools.lru_cache(maxsize=64)
def _generate_cached(kind: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(
        [seed, n, DISTRIBUTIONS.index(kind) if kind in DISTRIBUTIONS else 99]
    )
    if kind == "normal":
        x = rng.standard_normal(n)
    elif kind == "student_t":  # heavy tails: df=2 has infinite variance
        x = rng.standard_t(2, n)
    elif kind == "lognormal":  # heavy right tail, random signs
        x = rng.lognormal(0.0, 2.0, n) * rng.choice([-1.0, 1.0], n)
    elif kind == "ties":  # a handful of distinct values, each repeated many times
        x = rng.choice(TIE_VALUES, n)
    elif kind == "zeros":
        x = np.zeros(n)
    else:
        raise ValueError(f"unknown distribution {kind!r}")
    out = np.ascontiguousarray(x, dtype=np.float32)
    out.setflags(write=False)
    return out


def generate(kind: str, n: int, seed: int = 0) -> np.ndarray:
    """A read-only float32 vector of length n drawn from distribution `kind`."""
    return _generate_cached(kind, int(n), int(seed))


@pytest.fixture
def make_input() -> Callable[..., np.ndarray]:
    """generate(kind, n, seed=0) -> read-only float32[n]."""
    return generate


@pytest.fixture(params=DISTRIBUTIONS)
def distribution(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=ODD_LENGTHS, ids=lambda n: f"n={n}")
def odd_length(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
def normal_input() -> np.ndarray:
    return generate("normal", 1001)


@pytest.fixture
def heavy_tailed_input() -> np.ndarray:
    return generate("student_t", 1001)


@pytest.fixture
def lognormal_input() -> np.ndarray:
    return generate("lognormal", 1001)


@pytest.fixture
def tie_heavy_input() -> np.ndarray:
    return generate("ties", 1001)


@pytest.fixture
def all_zero_input() -> np.ndarray:
    return generate("zeros", 1001)


@pytest.fixture
def length_one_input() -> np.ndarray:
    out = np.array([-3.5], dtype=np.float32)
    out.setflags(write=False)
    return out


@pytest.fixture
def large_normal_input() -> np.ndarray:
    return generate("normal", LARGE_N)


# ------------------------------------------------------------------- threads --
@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    """Run a block with ops.set_num_threads(n), restoring the previous value."""
    previous = ops.get_num_threads()
    ops.set_num_threads(n)
    try:
        yield
    finally:
        ops.set_num_threads(previous)


@pytest.fixture
def threads() -> Callable[[int], contextlib.AbstractContextManager[None]]:
    """threads(n) is a context manager running its block with n kernel threads."""
    return num_threads


@pytest.fixture
def single_thread() -> Iterator[None]:
    """The test body runs with ops.set_num_threads(1); the old value is restored."""
    with num_threads(1):
        yield


# ---------------------------------------------------------------------- simd --
SIMD_LEVELS = ("scalar", "avx2", "avx512")


def _default_simd_cap() -> str:
    env = os.environ.get("FEDPRESS_SIMD", "avx512")
    return env if env in SIMD_LEVELS else "avx512"


@contextlib.contextmanager
def simd_cap(level: str) -> Iterator[None]:
    """Cap the explicitly dispatched SIMD paths at `level` for a block."""
    ops._core.set_simd(level)
    try:
        yield
    finally:
        ops._core.set_simd(_default_simd_cap())


@pytest.fixture
def simd() -> Callable[[str], contextlib.AbstractContextManager[None]]:
    """simd(level) is a context manager capping the SIMD paths; the default cap is restored."""
    return simd_cap


@pytest.fixture(autouse=True)
def _restore_runtime_settings() -> Iterator[None]:
    """Guard: no test may leak a thread count or SIMD cap into the next one."""
    threads_before = ops.get_num_threads()
    yield
    ops._core.set_simd(_default_simd_cap())
    if ops.get_num_threads() != threads_before:
        ops.set_num_threads(threads_before)
        pytest.fail("test changed ops.set_num_threads without restoring it")


# ------------------------------------------------------------------ sampling --
_MASK64 = (1 << 64) - 1


def _hash64(seed: int, counter: int) -> int:
    """The kernels' counter-based hash (csrc/rng.hpp), in Python integers."""
    z = (seed * 0x9E3779B97F4A7C15 + counter * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def sampled_positions_mask(n: int, n_blocks: int, seed: int, block: int = 16) -> np.ndarray:
    """White-box: the elements the sampled selection paths read to estimate a
    threshold: n_blocks blocks of `block` elements, one at a hashed offset in
    each of n_blocks equal strata. Tests use it to plant adversarial values;
    if the scheme changes they remain valid (if less pointed) correctness tests."""
    n_blocks = min(n_blocks, n // block)
    stratum = n // n_blocks
    mask = np.zeros(n, dtype=bool)
    for b in range(n_blocks):
        start = b * stratum + ((_hash64(seed, b) * (stratum - block + 1)) >> 64)
        mask[start : start + block] = True
    return mask


@pytest.fixture
def sampled_positions() -> Callable[[int, int, int], np.ndarray]:
    """sampled_positions(n, n_blocks, seed) -> bool mask of the sampled elements."""
    return sampled_positions_mask
