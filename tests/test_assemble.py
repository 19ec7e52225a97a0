"""The payload written into one buffer (``_core.assemble``): value sections made by
their kernels in place give the same bytes as sections made first and copied; the
checksum is CRC-32C whatever the length, thread count and SIMD level; a kernel's
refusal names its tensor."""

from __future__ import annotations

import struct
import sys

import fedpress as fp
import numpy as np
import pytest
from conftest import num_threads
from fedpress import _core, ops
from format_reference import crc32c as crc32c_reference  # docs/format.md's, written apart from fedpress

SPECS = [
    "q8",
    "q4",
    "q2",
    "fp16",
    "bf16",
    "fp32",
    "eden1",
    "eden3",
    "eden4:mse",
    "eden8",
    "q4+zstd",
    "eden2+zstd:5",
    "topk:0.05+q4",
    "topk:0.05+eden4",
    "rht+q4",
    "rht+q2",
    "rht+q8+zstd",
    "topk:0.05+rht+q4",
    "int8",
    "int4:clip=0.5+zstd",
    "randk:0.3:shared+int8",
    "eden2:shared",
    "eden4:shared+zstd",
    "sign",
]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("n", [1, 1000, 70_001])
def test_in_place_sections_equal_copied_ones(spec: str, n: int) -> None:
    """Codec.encode (kernels write into the payload) and the path that builds each section
    first (the one the Encoder takes, as it reads the sections back) give the same bytes."""
    rng = np.random.default_rng(n)
    update = {
        "w": rng.standard_normal(n).astype(np.float32),
        "b": rng.standard_normal(7).astype(np.float32),
        "steps": np.arange(3, dtype=np.int64),
    }
    codec = fp.Codec(spec, rht_block=1024)
    in_place = codec.encode(update, seed=5)
    copied = codec.encode(update, seed=5, on_decoded=lambda decoded: None)
    assert in_place == copied
    out = fp.decode(in_place)
    assert set(out) == set(update)


def test_move_piece_copies_and_hands_its_pages_back() -> None:
    """("move", buffer) is copied like bytes; the buffer's whole pages are handed back as
    they are copied (on Linux they read as zeros afterwards), so a section made before its
    size was known is never resident twice. Only a writable buffer may be moved."""
    data = np.random.default_rng(2).integers(0, 256, 5 << 20, dtype=np.uint8)
    want = data.tobytes()
    moved = data.copy()
    assert _core.assemble([b"head", ("move", moved), b"tail"], True) == _core.assemble([b"head", want, b"tail"], True)
    if sys.platform.startswith("linux"):
        assert not moved[1 << 16 : -(1 << 16)].any()  # every page inside it was handed back
    for threads in (1, 3):
        with num_threads(threads):
            for size in (0, 1, 4097, (1 << 20) + 3, (3 << 20) - 5):
                part = data[7 : 7 + size].copy()  # (at any address)
                assert _core.assemble([("move", part), b"!"], False) == want[7 : 7 + size] + b"!"
    with pytest.raises(TypeError, match="piece 0: a move piece's buffer must be writable"):
        _core.assemble([("move", want)], False)
    with pytest.raises(ValueError, match=r'piece 1: a move piece is \("move", buffer\)'):
        _core.assemble([b"", ("move", data, 1)], False)


def test_assemble_pieces_and_checksum() -> None:
    x = np.random.default_rng(1).standard_normal(3001).astype(np.float32)
    pieces = [
        b"head",
        ("q", x, 4, 512, 7),
        ("f16", x),
        ("bf16", x),
        ("eden", x, 3, 256, 11, 12, 2),
        ("sign", x, 100),
        memoryview(b"tail"),
    ]
    out = _core.assemble(pieces, True)
    body, crc = out[:-4], int.from_bytes(out[-4:], "little")
    assert crc == _core.crc32c(body)
    packed, scales = ops.quantize(x, 4, seed=7)
    packed_eden, scales_eden, _, _ = ops.eden_encode(x, 3, 11, block=256, scale="mse", quant_seed=12)
    signs, sign_scales = _core.sign_quantize(x, 100)
    expected = b"".join(
        [
            b"head",
            scales.tobytes(),
            packed.tobytes(),
            _core.to_half(x).tobytes(),
            _core.to_bfloat16(x).tobytes(),
            bytes([2]),
            scales_eden.tobytes(),
            packed_eden.tobytes(),
            sign_scales.tobytes(),
            signs.tobytes(),
            b"tail",
        ]
    )
    assert body == expected
    assert _core.assemble(pieces, False) == expected
    assert _core.assemble([], True) == _core.crc32c(b"").to_bytes(4, "little")


def test_sign_stage_is_numpys_mean_magnitude_and_packed_signs() -> None:
    """The sign kernel gives, bit for bit, what its definition computes in numpy: the
    float64 np.add.reduceat of |x| over the count, rounded to float32, and x >= 0 packed
    LSB first (zeros of either sign count as positive)."""
    rng = np.random.default_rng(11)
    for n, bucket in ((1, 1), (7, 3), (1000, 64), (70_001, 4096), (5000, 5000), (9, 100)):
        x = (rng.standard_normal(n) * 10 ** rng.uniform(-5, 5)).astype(np.float32)
        x[:: max(1, n // 7)] = -0.0
        starts = np.arange(0, n, bucket)
        sums = np.add.reduceat(np.abs(x).astype(np.float64), starts)
        counts = np.diff(np.append(starts, n)).astype(np.float64)
        packed, scales = _core.sign_quantize(x, bucket)
        np.testing.assert_array_equal(scales.view(np.uint32), (sums / counts).astype(np.float32).view(np.uint32))
        np.testing.assert_array_equal(packed, np.packbits(x >= 0, bitorder="little"))
    bad = np.ones(10, np.float32)
    bad[4] = np.inf
    with pytest.raises(ValueError, match="NaN or infinity"):
        _core.sign_quantize(bad, 4)


def test_assemble_refusals_name_the_piece() -> None:
    x = np.ones(100, np.float32)
    x[3] = np.inf
    with pytest.raises(ValueError, match=r"^piece 1: .*NaN or infinity"):
        _core.assemble([b"a", ("q", x, 4, 64, 1)], True)
    with pytest.raises(ValueError, match="unknown kernel piece"):
        _core.assemble([("zz", x)], True)
    with pytest.raises(ValueError, match="only the mode bit"):
        _core.assemble([("eden", np.ones(8, np.float32), 2, 8, 1, 2, 1)], True)
    with pytest.raises(TypeError, match="float32"):
        _core.assemble([("f16", np.ones(4, np.float64))], True)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_many_pieces_spread_over_threads_give_the_same_bytes(threads: int) -> None:
    """A model's many sections are written one per thread (each kernel serial inside), a
    single large one by its kernel's own threads: the same payload either way, and a
    refused piece is still named."""
    rng = np.random.default_rng(4)
    model = {f"t{i}": rng.standard_normal(n).astype(np.float32) for i, n in enumerate([70_001, 3, 9_000] * 12)}
    before = ops.get_num_threads()
    try:
        ops.set_num_threads(threads)
        for spec in ("q4", "sign", "fp16", "bf16", "eden4", "q8+zstd"):
            payload = fp.Codec(spec).encode(model, seed=3)
            ops.set_num_threads(1)
            assert fp.Codec(spec).encode(model, seed=3) == payload, spec
            ops.set_num_threads(threads)
        bad = dict(model)
        bad["t30"] = model["t30"].copy()
        bad["t30"][5] = np.nan
        with pytest.raises(ValueError, match="tensor 't30' holds NaN or infinity"):
            fp.Codec("q4").encode(bad)
    finally:
        ops.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_checksum_made_piece_by_piece_is_the_whole_buffers(threads: int) -> None:
    """Pieces spread over the threads are checksummed each where it was written and the
    CRCs combined in order: the CRC-32C of the whole body, whatever the pieces' sizes
    (empty, odd, a byte, past 1 MiB) and kinds."""
    rng = np.random.default_rng(9)
    pieces: list = []
    for i in range(60):
        kind = i % 5
        n = int(rng.choice([0, 1, 7, 4093, 70_001, 300_000]))
        x = rng.standard_normal(max(n, 1)).astype(np.float32)
        if kind == 0:
            pieces.append(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
        elif kind == 1:
            pieces.append(("q", x, 4, 64, i))
        elif kind == 2:
            pieces.append(("f16", x))
        elif kind == 3:
            pieces.append(("sign", x, 512))
        else:
            pieces.append(("q", x, 2, 512, i))
    pieces.append(rng.integers(0, 256, 1_100_001, dtype=np.uint8).tobytes())  # a copy in 1 MiB chunks
    pieces += [("f16", rng.standard_normal(300_000).astype(np.float32)) for _ in range(4)]  # no piece is half
    before = ops.get_num_threads()
    try:
        ops.set_num_threads(threads)
        out = _core.assemble(pieces, True)
    finally:
        ops.set_num_threads(before)
    assert struct.unpack("<I", out[-4:])[0] == _core.crc32c(out[:-4])
    assert out[:-4] == _core.assemble(pieces, False)


def test_codec_names_the_tensor_a_kernel_refused() -> None:
    x = np.ones(5000, np.float32)
    x[9] = np.nan
    for spec in ("q4", "fp16", "eden4", "q8+zstd"):
        with pytest.raises(ValueError, match="tensor 'bad' holds NaN or infinity"):
            fp.Codec(spec).encode({"good": np.ones(10, np.float32), "bad": x})


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_crc32c_any_length_any_split(threads: int) -> None:
    """Three interleaved streams per 24 KiB and pieces of 1 MiB checksummed in parallel,
    combined: the CRC-32C of the bytes, whatever the length and thread count."""
    rng = np.random.default_rng(threads)
    big = rng.integers(0, 256, (3 << 20) + 12_345, dtype=np.uint8).tobytes()
    reference = _core.crc32c(big)  # checked against the scalar table path below
    level = _core.simd()
    old = ops.get_num_threads()
    try:
        ops.set_num_threads(threads)
        for size in (0, 1, 7, 8, 24_575, 24_576, 24_577, 3 * 24_576 + 5):
            data = big[:size]
            assert _core.crc32c(data) == crc32c_reference(data)
        assert _core.crc32c(big) == reference
        assert _core.crc32c(big[12_345:], _core.crc32c(big[:12_345])) == reference
        _core.set_simd("scalar")
        assert _core.crc32c(big) == reference
    finally:
        _core.set_simd(level)
        ops.set_num_threads(old)
    assert _core.crc32c(b"123456789") == 0xE3069283


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_rotated_quantize_piece_equals_rotating_then_quantizing(threads: int) -> None:
    # ("rq", ...) rotates a few blocks at a time into a buffer and quantizes from there:
    # the bytes of rht() then ("q", ...), for blocks and buckets that line up either way,
    # that line up only over many blocks, or never (the whole rotation first), a tail block
    # shorter than a bucket, and with other pieces around it (pieces spread over threads).
    rng = np.random.default_rng(41)
    cases = [
        (1, 512, 65536),
        (7, 512, 65536),
        (65537, 512, 65536),
        (300_001, 512, 65536),
        (300_001, 1000, 1024),
        (300_001, 131072, 1024),
        (200_000, 512, 16),
        (50_000, 3, 64),
        (300_000, 99991, 65536),
        (10, 1, 2),
        (0, 512, 65536),
    ]
    with num_threads(threads):
        for n, bucket, block in cases:
            x = (rng.standard_normal(n) * rng.exponential(1.0, n)).astype(np.float32)
            rotated = _core.rht(x, 99, block)
            for bits in (2, 4, 8):
                want = _core.assemble([b"ab", ("q", rotated, bits, bucket, 7), ("q", x, bits, bucket, 8)], True)
                got = _core.assemble([b"ab", ("rq", x, bits, bucket, 7, block, 99), ("q", x, bits, bucket, 8)], True)
                assert got == want, (n, bucket, block, bits)
    bad = rng.standard_normal(1000).astype(np.float32)
    bad[321] = np.inf
    with pytest.raises(ValueError, match=r"^piece 1: x contains NaN or infinity"):
        _core.assemble([b"x", ("rq", bad, 4, 512, 3, 256, 5)], False)
    for piece, match in (
        (("rq", x, 1, 512, 3, 256, 5), "rotated quantize piece: bits must be 2, 4 or 8"),
        (("rq", x, 4, 512, 3, 1000, 5), "rotated quantize piece: the rotation block must be a power of two"),
        # a bucket near 2^64 wrapped the kernels' bucket arithmetic around (a crash)
        (("rq", x, 4, 0, 3, 256, 5), r"bucket must be in \[1, 2\^32 - 1\], got 0"),
        (("rq", x, 2, 2**64 - 1, 5, 8, 1), r"bucket must be in \[1, 2\^32 - 1\]"),
        (("q", x, 2, 2**64 - 7, 5), r"bucket must be in \[1, 2\^32 - 1\]"),
        (("sign", x, 2**40), r"bucket must be in \[1, 2\^32 - 1\]"),
    ):
        with pytest.raises(ValueError, match=f"^piece 0: {match}"):
            _core.assemble([piece], False)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_int_piece_equals_rotating_coding_and_packing(threads: int) -> None:
    # ("int", ...) codes an unmasked intB section a range of rotated blocks at a time: the
    # bytes of eden_rotate, int_encode and pack_codes of the whole, for lengths around the
    # segments shorter than 8 that are packed last, widths that do not divide a byte, and
    # with other pieces around it.
    rng = np.random.default_rng(42)
    with num_threads(threads):
        for n in (0, 1, 7, 8, 9, 1000, 65543, 300_001):
            x = rng.standard_normal(n).astype(np.float32)
            for bits, block in ((8, 65536), (4, 1024), (2, 8), (16, 65536), (3, 16)):
                rotated = x.copy()
                if n:
                    _core.eden_rotate(rotated, block, 77)
                codes = _core.pack_codes(_core.int_encode(rotated, bits, 1.5, 5), bits)
                want = _core.assemble([b"ab", codes, ("q", x, 4, 512, 8)], True)
                got = _core.assemble([b"ab", ("int", x, bits, 1.5, 5, block, 77), ("q", x, 4, 512, 8)], True)
                assert got == want, (n, bits, block)
    x = rng.standard_normal(100).astype(np.float32)
    for piece, match in (
        (("int", x, 17, 1.5, 5, 64, 7), r"bits must be in \[1, 16\]"),
        (("int", x, 8, 0.0, 5, 64, 7), "clip must be finite and positive"),
        (("int", x, 8, 1.5, 5, 4, 7), r"the rotation block must be a power of two in \[8, 2\^24\]"),
    ):
        with pytest.raises(ValueError, match=f"^piece 0: int piece: {match}"):
            _core.assemble([piece], False)
    x[50] = np.nan
    with pytest.raises(ValueError, match="^piece 0: values hold NaN"):
        _core.assemble([("int", x, 8, 1.5, 5, 64, 7)], False)


@pytest.mark.parametrize("spec", ["fp32+zstd", "q8+zstd:1", "topk:0.5+fp16+zstd"])
def test_a_large_body_compressed_a_window_at_a_time_decodes_to_the_same_values(spec: str) -> None:
    # Bodies from 8 MiB on go through zstd a window at a time, into the payload itself, the
    # compressed windows' pages handed back: the payload decodes to what the same spec
    # without zstd decodes to, and the same seed gives the same bytes.
    rng = np.random.default_rng(43)
    update = {"w": rng.standard_normal(2_300_000).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32)}
    codec = fp.Codec(spec)
    payload = codec.encode(update, seed=9)
    assert payload == codec.encode(update, seed=9)
    plain = fp.Codec(spec.split("+zstd")[0]).encode(update, seed=9)
    got, want = fp.decode(payload), fp.decode(plain)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    agg = fp.Aggregator()
    agg.add(payload)
    np.testing.assert_array_equal(agg.result()["w"], want["w"])


def test_payload_builder_and_discarded_pages() -> None:
    out = _core.PayloadBuilder(10)
    out.append(b"abc")
    out.append(memoryview(b"defgh"))
    with pytest.raises(ValueError, match="a part of 3 bytes does not fit in the 2 left"):
        out.append(b"xyz")
    payload = out.finish()
    assert payload == b"abcdefgh" + _core.crc32c(b"abcdefgh").to_bytes(4, "little")
    with pytest.raises(ValueError, match="finished already"):
        out.append(b"x")
    with pytest.raises(ValueError, match="finished already"):
        out.finish()
    big = np.ones(1 << 22, np.uint8)  # 4 MiB: whole pages inside
    _core.discard_pages(big, 0, 1 << 21)
    assert big[(1 << 21) :].all()  # the rest untouched
    if sys.platform.startswith("linux"):
        assert not big[64 << 10 : 1 << 20].any()  # whole pages inside the range read as zeros
    for begin, end in ((5, 3), (0, (1 << 22) + 1)):
        with pytest.raises(ValueError, match=r"must lie inside the buffer"):
            _core.discard_pages(big, begin, end)
