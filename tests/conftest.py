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
from pathlib import Path
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
settings.register_profile("ci", max_examples=50, deadline=None, suppress_health_check=_SUPPRESS, print_blob=True)
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
    rng = np.random.default_rng([seed, n, DISTRIBUTIONS.index(kind) if kind in DISTRIBUTIONS else 99])
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


# ============================================================ payload tests --
# Helpers for the codec / payload / aggregator tests: a writer for hand-built
# payloads and a guard that caps the address space while hostile payloads are
# decoded, so a decoder that tries to allocate gigabytes fails with MemoryError
# instead of eating the machine.
import resource  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from fedpress.format.primitives import encode_varint as leb128  # noqa: E402  (the format's varints)


class Wire:
    """Builds format-v2 payloads by hand, written from the documented layout
    (docs/format.md), independently of python/fedpress/payload.py::

        header   magic b"FPRS" | version u8 | flags u8 | seed u64        (14 bytes)
                 | raw_body_size varint (only when flags bit 0, zstd, is set)
        body     spec_len varint | spec | n_tensors varint | table entries | sections
        entry    name_len varint | name | dtype u8 | ndim u8 | ndim x dim varint
                 | kind u8 | value code u8 | flags u8
                 | count, bucket, rht_block, index_len, values_len: varints
        trailer  crc32c u32 over header and stored body

    The ``wire`` fixture checks that Wire gives the library's own bytes for a
    reference update, so the hostile-payload tests never silently test garbage.
    """

    MAGIC = b"FPRS"
    HEADER = struct.Struct("<4sBBQ")  # magic, version, flags, seed
    SEED_OFFSET = 6
    TRAILER = struct.Struct("<I")
    FLAG_ZSTD = 0x01
    DTYPES = (
        "float32",
        "float64",
        "float16",
        "bfloat16",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "bool",
    )
    VALUES = ("fp32", "fp16", "bf16", "q8", "q4", "q2", "sign", "eden1", "eden2", "eden3", "eden4", "eden8")
    RAW, DENSE, SPARSE, SEEDED = 0, 1, 2, 3
    VALUE_RAW = 255
    ENTRY_VARINTS = ("count", "bucket", "block", "index_len", "value_len")

    varint = staticmethod(leb128)

    def __repr__(self) -> str:
        return "Wire()"

    @staticmethod
    def crc32c(data: bytes, crc: int = 0) -> int:
        from fedpress import _core

        return int(_core.crc32c(data, crc))

    @dataclass
    class Tensor:
        name: str
        dtype: str
        shape: tuple
        kind: int
        values: str = "fp32"  # value code name, or "raw"
        count: int = -1  # -1: the shape's size
        bucket: int = 0
        block: int = 0
        flags: int = 0
        index_data: bytes = b""
        value_data: bytes = b""
        index_len: int = -1  # -1: len(index_data)
        value_len: int = -1  # -1: len(value_data)
        dtype_code: int = -1  # -1: from dtype
        ndim: int = -1  # -1: len(shape)
        value_code: int = -1  # -1: from values

    def tensor(self, name: str, dtype: str, shape: tuple, kind: int, **kw) -> Wire.Tensor:
        return Wire.Tensor(name, dtype, tuple(shape), kind, **kw)

    def entry(self, t: Wire.Tensor) -> bytes:
        """One table entry."""
        name = t.name.encode("utf-8", "surrogateescape")
        size = int(np.prod(t.shape, dtype=object)) if t.shape else 1
        count = size if t.count < 0 else t.count
        vcode = (
            t.value_code
            if t.value_code >= 0
            else (self.VALUE_RAW if t.values == "raw" else self.VALUES.index(t.values))
        )
        dcode = self.DTYPES.index(t.dtype) if t.dtype_code < 0 else t.dtype_code
        ndim = len(t.shape) if t.ndim < 0 else t.ndim
        index_len = len(t.index_data) if t.index_len < 0 else t.index_len
        value_len = len(t.value_data) if t.value_len < 0 else t.value_len
        return b"".join(
            [
                leb128(len(name)),
                name,
                bytes((dcode, ndim)),
                *(leb128(d) for d in t.shape),
                bytes((t.kind, vcode, t.flags)),
                *(leb128(v) for v in (count, t.bucket, t.block, index_len, value_len)),
            ]
        )

    def body(self, tensors: list, spec: str = "fp32", n_tensors: int = -1, trailing: bytes = b"") -> bytes:
        spec_b = spec.encode()
        parts = [leb128(len(spec_b)), spec_b, leb128(len(tensors) if n_tensors < 0 else n_tensors)]
        parts += [self.entry(t) for t in tensors]
        for t in tensors:
            parts += [t.index_data, t.value_data]
        return b"".join(parts) + trailing

    @staticmethod
    def _read_varint(buf: bytes, pos: int) -> tuple:
        v = shift = 0
        while True:
            b = buf[pos]
            pos += 1
            v |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return v, pos

    def _walk(self, body: bytes) -> tuple:
        """(spec, [Tensor] without sections, [(field, start, end, value)] of every
        varint, offset of the first section) of a well-formed plain body."""
        spans = []

        def varint(field: str, pos: int) -> tuple:
            v, end = self._read_varint(body, pos)
            spans.append((field, pos, end, v))
            return v, end

        n, pos = varint("spec_len", 0)
        spec = body[pos : pos + n].decode()
        count, pos = varint("n_tensors", pos + n)
        tensors = []
        for i in range(count):
            name_len, pos = varint(f"tensor {i} name_len", pos)
            name = body[pos : pos + name_len].decode()
            pos += name_len
            dcode, ndim = body[pos], body[pos + 1]
            pos += 2
            shape = []
            for d in range(ndim):
                v, pos = varint(f"tensor {i} dim {d}", pos)
                shape.append(v)
            kind, vcode, flags = body[pos : pos + 3]
            pos += 3
            fields = {}
            for field in self.ENTRY_VARINTS:
                fields[field], pos = varint(f"tensor {i} {field}", pos)
            tensors.append(
                self.Tensor(
                    name,
                    self.DTYPES[dcode],
                    tuple(shape),
                    kind,
                    values="raw" if vcode == self.VALUE_RAW else self.VALUES[vcode],
                    flags=flags,
                    **fields,
                )
            )
        return spec, tensors, spans, pos

    def read_prefix(self, body: bytes) -> tuple:
        """(spec, n_tensors, offset of the first entry) of a plain body."""
        n, pos = self._read_varint(body, 0)
        spec = body[pos : pos + n].decode()
        count, pos = self._read_varint(body, pos + n)
        return spec, count, pos

    def varint_fields(self, body: bytes) -> list:
        """(field, start, end, value) of every varint of a well-formed plain body's
        spec and table, in order (field e.g. "n_tensors", "tensor 2 dim 0", "tensor 2 bucket")."""
        return self._walk(body)[2]

    @classmethod
    def index_varints(cls, stream: bytes) -> list:
        """(field, start, end, value) of the varint of a version 2 index stream: its count k
        (the Rice parameter that follows is one byte)."""
        k, pos = cls._read_varint(stream, 0)
        return [("k", 0, pos, k)]

    def parse_body(self, body: bytes) -> tuple:
        """(spec, [Tensor]) of a well-formed plain body, sections attached: the
        inverse of body(), for structured mutations."""
        import dataclasses

        spec, tensors, _, pos = self._walk(body)
        for i, t in enumerate(tensors):
            index_data = body[pos : pos + t.index_len]
            pos += t.index_len
            value_data = body[pos : pos + t.value_len]
            pos += t.value_len
            tensors[i] = dataclasses.replace(
                t, index_data=index_data, value_data=value_data, index_len=-1, value_len=-1
            )
        assert pos == len(body), "trailing bytes"
        return spec, tensors

    def sections_offset(self, body: bytes) -> int:
        """Where the sections of a well-formed plain body start (the size of spec and table)."""
        return self._walk(body)[3]

    # -- whole payloads
    def wrap(
        self,
        body: bytes,
        *,
        flags: int = 0,
        seed: int = 0,
        raw_size: int = -1,
        version: int = 2,
        magic: bytes = MAGIC,
        zstd_level: int = 0,
    ) -> bytes:
        """Header + stored body + a correct CRC. zstd_level > 0 compresses the body
        (and sets the zstd flag); raw_size defaults to the uncompressed body's size.
        With the zstd flag in `flags` and zstd_level 0, `body` is stored as given."""
        raw = len(body)
        if zstd_level:
            import zstandard

            body = zstandard.ZstdCompressor(level=zstd_level, write_content_size=True).compress(body)
            flags |= self.FLAG_ZSTD
        raw = raw if raw_size < 0 else raw_size
        header = self.HEADER.pack(magic, version, flags, seed) + (leb128(raw) if flags & self.FLAG_ZSTD else b"")
        return header + body + self.TRAILER.pack(self.crc32c(header + body))

    def fix_crc(self, payload: bytes) -> bytes:
        """The payload with its trailer recomputed over everything before it."""
        head = bytes(payload[:-4])
        return head + self.TRAILER.pack(self.crc32c(head))

    def header(self, payload: bytes) -> dict:
        """magic, version, flags, seed, raw_size (of the body after zstd) and header_size
        (14, plus the raw_body_size varint when the zstd flag is set)."""
        magic, version, flags, seed = self.HEADER.unpack(payload[: self.HEADER.size])
        size = self.HEADER.size
        raw = len(payload) - size - self.TRAILER.size
        if flags & self.FLAG_ZSTD:
            raw, size = self._read_varint(payload, size)
        return dict(magic=magic, version=version, flags=flags, seed=seed, raw_size=raw, header_size=size)

    def stored_body(self, payload: bytes) -> bytes:
        return bytes(payload[self.header(payload)["header_size"] : len(payload) - self.TRAILER.size])

    def plain_body(self, payload: bytes) -> bytes:
        """The body after zstd (if any)."""
        body = self.stored_body(payload)
        if self.header(payload)["flags"] & self.FLAG_ZSTD:
            import zstandard

            return zstandard.ZstdDecompressor().decompress(body)
        return body

    def rebuild(self, payload: bytes, plain_body: bytes, zstd_level: int = 3) -> bytes:
        """A payload with the same header fields but a new (plain) body, re-compressed
        when the original was, with sizes and CRC recomputed."""
        h = self.header(payload)
        zstd = h["flags"] & self.FLAG_ZSTD
        return self.wrap(
            plain_body,
            flags=h["flags"] & ~self.FLAG_ZSTD,
            seed=h["seed"],
            version=h["version"],
            zstd_level=zstd_level if zstd else 0,
        )

    def reference_payload(self) -> tuple:
        """(update, seed, spec, the bytes the format says Codec(spec).encode(update, seed) gives)."""
        update = {
            "w": np.array([1.5, -2.0, 0.25], np.float32),
            "n": np.array([[3, -4]], np.int64),
            "s": np.array(0.5, np.float64),
        }
        tensors = [
            self.tensor("w", "float32", (3,), self.DENSE, value_data=update["w"].astype("<f4").tobytes()),
            self.tensor("n", "int64", (1, 2), self.RAW, values="raw", value_data=update["n"].astype("<i8").tobytes()),
            self.tensor("s", "float64", (), self.DENSE, value_data=struct.pack("<f", 0.5)),
        ]
        return update, 0x0123456789ABCDEF, "fp32", self.wrap(self.body(tensors, "fp32"), seed=0x0123456789ABCDEF)


@pytest.fixture(scope="session")
def wire() -> Wire:
    """Hand-built payloads in the format-v2 layout (see Wire)."""
    from fedpress import Codec

    w = Wire()
    update, seed, spec, expected = w.reference_payload()
    got = Codec(spec).encode(update, seed=seed)
    if got != expected:
        pytest.fail(
            f"the library's payload differs from the format-v2 layout Wire builds:\n"
            f"  library {got.hex()}\n  Wire    {expected.hex()}"
        )
    return w


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmSize")


@contextlib.contextmanager
def capped_memory(extra: int = 2 << 30) -> Iterator[None]:
    """Runs a block with the address space capped at its current size + `extra`
    bytes (Linux), so an allocation of gigabytes raises MemoryError at once."""
    if not sys.platform.startswith("linux"):
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _vm_size() + extra
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture(scope="session")
def memory_cap() -> Callable[..., contextlib.AbstractContextManager[None]]:
    """memory_cap(extra=2 GiB) caps the address space for a block (see capped_memory).

    The kernels' worker threads are started first (each reserves address space
    for its stack and malloc arena), so the cap measures what decoding allocates."""
    x = np.linspace(-1.0, 1.0, 1 << 21, dtype=np.float32)
    ops.topk(x, 100)
    ops.quantize(x, 4, seed=0)
    ops.scatter_add(np.zeros(x.size, np.float32), np.arange(0, x.size, 7), x[::7])
    return capped_memory


def load_make_golden():
    """tests/data/make_golden.py as a module: the golden payloads' specs, input and seed."""
    import importlib.util

    path = Path(__file__).resolve().parent / "data" / "make_golden.py"
    spec = importlib.util.spec_from_file_location("fedpress_make_golden", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
