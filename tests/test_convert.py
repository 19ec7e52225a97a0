"""float32 <-> float16 / bfloat16 kernels against numpy references."""

from __future__ import annotations

import numpy as np
import pytest
from fedpress import _core


def _inputs() -> np.ndarray:
    rng = np.random.default_rng(0)
    scales = np.exp(rng.uniform(-40, 14, 200_003))
    special = [65504, 65519, 65520, 1e9, -1e9, 6e-8, 3e-8, 2.98e-8, 0.0, -0.0, 1e-45, 3.4e38, -3.4e38]
    return np.concatenate([rng.standard_normal(200_003) * scales, special]).astype(np.float32)


def test_to_half_matches_numpy_with_saturation() -> None:
    x = _inputs()
    expected = np.clip(x, -65504, 65504).astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(_core.to_half(x), expected)


def test_from_half_is_exact_for_every_finite_half() -> None:
    h = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    finite = ((h >> 10) & 31) != 31
    out = _core.from_half(h)
    np.testing.assert_array_equal(out[finite], h[finite].view(np.float16).astype(np.float32))


def test_bfloat16_round_to_nearest_even_and_saturation() -> None:
    x = _inputs()
    u = x.view(np.uint32).astype(np.uint64)
    mag = ((u & 0x7FFFFFFF) + 0x7FFF + (((u & 0x7FFFFFFF) >> 16) & 1)) >> 16
    expected = (((u >> 16) & 0x8000) | np.minimum(mag, 0x7F7F)).astype(np.uint16)
    got = _core.to_bfloat16(x)
    np.testing.assert_array_equal(got, expected)
    back = _core.from_bfloat16(got)
    np.testing.assert_array_equal(back.view(np.uint32), got.astype(np.uint32) << 16)
    assert np.all(np.abs(back - x) <= np.abs(x) * 2.0**-8 + 1e-45)


def test_conversions_do_not_depend_on_threads() -> None:
    from fedpress import ops

    x = _inputs()
    before = ops.get_num_threads()
    try:
        ops.set_num_threads(1)
        one = (_core.to_half(x), _core.to_bfloat16(x))
        ops.set_num_threads(2)
        two = (_core.to_half(x), _core.to_bfloat16(x))
    finally:
        ops.set_num_threads(before)
    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_array_equal(one[1], two[1])


def test_wrong_dtype_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="float32"):
        _core.to_half(np.zeros(3, np.float64))
    with pytest.raises(TypeError, match="uint16"):
        _core.from_half(np.zeros(3, np.int16))


@pytest.mark.parametrize("n", [1, 7, 1001, 200_003])
def test_from_half_and_bfloat16_read_a_section_at_an_odd_offset(n: int) -> None:
    # Payload sections sit at any offset: the kernels must read 16-bit patterns at odd
    # addresses (the sanitizer build, scripts/sanitize, catches a typed load there).
    h = np.random.default_rng(n).integers(0, 65536, n).astype(np.uint16)
    odd = np.frombuffer(b"\0" + h.tobytes(), dtype=np.uint16, offset=1)
    assert not odd.flags.aligned
    from_half = _core.from_half(odd).view(np.uint32)
    from_bf16 = _core.from_bfloat16(odd).view(np.uint32)
    np.testing.assert_array_equal(from_half, _core.from_half(h).view(np.uint32))
    np.testing.assert_array_equal(from_bf16, h.astype(np.uint32) << 16)


@pytest.mark.parametrize("code", ["fp32", "fp16", "bf16"])
def test_decode_floats_converts_and_checks_finiteness(code: str) -> None:
    """A float value section is converted and checked for NaN and infinity in one pass,
    from any address, into a new array or a given one."""
    from fedpress import _core

    x = np.random.default_rng(2).standard_normal(300_001).astype(np.float32)
    raw = {"fp32": x.tobytes(), "fp16": _core.to_half(x).tobytes(), "bf16": _core.to_bfloat16(x).tobytes()}[code]
    expected = {
        "fp32": x,
        "fp16": _core.from_half(_core.to_half(x)),
        "bf16": _core.from_bfloat16(_core.to_bfloat16(x)),
    }[code]
    odd = memoryview(b"\x00" + raw)[1:]  # a section at an odd offset of its payload
    values, finite = _core.decode_floats(odd, code, x.size)
    assert finite
    np.testing.assert_array_equal(values, expected)
    out = np.empty(x.size, np.float32)
    same, finite = _core.decode_floats(odd, code, x.size, out)
    assert finite and np.shares_memory(same, out)
    np.testing.assert_array_equal(out, expected)
    # NaN, +infinity and -infinity as each code writes them
    specials = {
        "fp32": [np.float32(v).view(np.uint32) for v in (np.nan, np.inf, -np.inf)],
        "fp16": [0x7E00, 0x7C00, 0xFC00],
        "bf16": [0x7FC0, 0x7F80, 0xFF80],
    }[code]
    width = 4 if code == "fp32" else 2
    for special in specials:
        data = bytearray(raw)
        data[width * 250_000 : width * 250_001] = int(special).to_bytes(width, "little")
        assert not _core.decode_floats(bytes(data), code, x.size)[1]
    with pytest.raises(ValueError, match="bytes, expected"):
        _core.decode_floats(raw[:-2], code, x.size)
