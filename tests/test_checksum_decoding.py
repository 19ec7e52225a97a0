"""The checksum that decodes on the way (_core.crc32c_decoding) and the reader's deferred
checksum: the same CRC as crc32c, the same values as decode_floats, whatever the pieces,
threads and offsets, and a payload is still refused for its checksum first."""

from __future__ import annotations

import fedpress as fp
import numpy as np
import pytest
from conftest import num_threads
from fedpress import _core
from fedpress.format.reader import finish_checksum, parse

PIECE = 1 << 20  # the checksum's parallel pieces (csrc/checksum.cpp)


def section(rng: np.random.Generator, code: str, n: int) -> tuple[bytes, np.ndarray]:
    """n float values coded as `code`, and what decoding them gives."""
    x = rng.standard_normal(n).astype(np.float32)
    if code == "fp32":
        return x.astype("<f4").tobytes(), x
    if code == "fp16":
        h = x.astype(np.float16)
        return h.astype("<f2").tobytes(), h.astype(np.float32)
    bits = (x.view(np.uint32) >> 16).astype("<u2")  # bf16: the top half (truncated is fine as input)
    return bits.tobytes(), (bits.astype(np.uint32) << 16).view(np.float32)


@pytest.mark.parametrize("size", [0, 1, 7, PIECE - 1, PIECE, 2 * PIECE + 5, 5 * PIECE + 3])
@pytest.mark.parametrize("threads", [1, 2])
def test_same_crc_without_jobs(size: int, threads: int) -> None:
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    with num_threads(threads):
        crc, flags = _core.crc32c_decoding(data, [])
    assert crc == _core.crc32c(data) and flags == []


@pytest.mark.parametrize("code", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_jobs_decode_what_decode_floats_does(code: str, threads: int) -> None:
    rng = np.random.default_rng(threads)
    # Offsets that put values across piece boundaries, odd addresses, sections back to back.
    head = bytes(rng.integers(0, 256, PIECE - 3, dtype=np.uint8))
    a, va = section(rng, code, 400_001)
    b, vb = section(rng, code, 3)
    tail = bytes(rng.integers(0, 256, 11, dtype=np.uint8))
    data = head + a + b + tail
    outs = [np.empty(va.size, np.float32), np.empty(vb.size, np.float32)]
    jobs = [(len(head), code, va.size, outs[0]), (len(head) + len(a), code, vb.size, outs[1])]
    with num_threads(threads):
        crc, flags = _core.crc32c_decoding(data, jobs)
    assert crc == _core.crc32c(data) and flags == [True, True]
    np.testing.assert_array_equal(outs[0], va)
    np.testing.assert_array_equal(outs[1], vb)
    check, _ = _core.decode_floats(a, code, va.size)
    np.testing.assert_array_equal(outs[0], check)


@pytest.mark.parametrize("where", [0, PIECE // 4 - 1, PIECE // 4, 299_999])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values_are_flagged_wherever_they_are(where: int, bad: float) -> None:
    x = np.ones(300_000, np.float32)
    x[where] = bad
    data = b"\x07" * (PIECE - 2) + x.astype("<f4").tobytes()
    out = np.empty(x.size, np.float32)
    with num_threads(2):
        _, flags = _core.crc32c_decoding(
            data, [(PIECE - 2, "fp32", x.size, out), (PIECE - 2, "fp32-finite", x.size, None)]
        )
    assert flags == [False, False]
    assert _core.crc32c_decoding(data[: PIECE - 2 + 4 * where], [(PIECE - 2, "fp32-finite", where, None)])[1] == [True]


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("bad_at", [None, 0, 2_500_000, 2_999_999])
def test_a_large_fp32_section_among_others(threads: int, bad_at) -> None:
    """An fp32 section of 12 MB at an odd offset, with a NaN anywhere or none, and a small
    fp16 section after it: the same values, CRC and flags."""
    rng = np.random.default_rng(threads)
    x = rng.standard_normal(3_000_000).astype(np.float32)
    if bad_at is not None:
        x[bad_at] = np.nan
    head = bytes(rng.integers(0, 256, PIECE + 5, dtype=np.uint8))  # an odd offset
    small, vs = section(rng, "fp16", 1000)
    data = head + x.astype("<f4").tobytes() + small
    outs = [np.empty(x.size, np.float32), np.empty(vs.size, np.float32)]
    jobs = [(len(head), "fp32", x.size, outs[0]), (len(head) + 4 * x.size, "fp16", vs.size, outs[1])]
    with num_threads(threads):
        crc, flags = _core.crc32c_decoding(data, jobs)
    assert crc == _core.crc32c(data)
    assert flags == [bad_at is None, True]
    assert outs[0].tobytes() == x.tobytes()
    np.testing.assert_array_equal(outs[1], vs)


SUB_PIECE = 64 << 10  # the pieces' sub-pieces, which a piece with jobs visits from its last


@pytest.mark.parametrize(
    "size",
    [2 * PIECE, 2 * PIECE + 1, 2 * PIECE + SUB_PIECE - 2, 3 * PIECE - SUB_PIECE + 2, 3 * PIECE + 2, 4 * PIECE + 6],
)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_pieces_visited_backwards_give_the_crc_and_values(size: int, threads: int) -> None:
    """A buffer of two pieces and more, with a job over most of it: the sub-pieces are
    checksummed last to first and their registers combined, a shorter one at the end after
    them; the CRC is crc32c's and every value is written once, whatever the size's remainder."""
    rng = np.random.default_rng(size + threads)
    head = 3
    n = (size - head - 1) // 2
    encoded, values = section(rng, "fp16", n)
    data = bytes([7, 8, 9]) + encoded + bytes(size - head - len(encoded))
    out = np.full(n, np.nan, np.float32)
    with num_threads(threads):
        crc, flags = _core.crc32c_decoding(data, [(head, "fp16", n, out), (head, "fp32-finite", n // 2, None)])
    assert len(data) == size
    assert crc == _core.crc32c(data)  # without jobs: every piece forward, the sub-pieces not combined
    np.testing.assert_array_equal(out, values)
    assert flags[0] is True  # the second job reads fp16 codes as fp32: whatever it finds


def test_bad_jobs_are_refused() -> None:
    data = bytes(64)
    for job, error in [
        ((0, "q8", 4, np.empty(4, np.float32)), ValueError),
        ((0, "fp32", 17, np.empty(17, np.float32)), ValueError),  # past the buffer
        ((62, "fp16", 2, np.empty(2, np.float32)), ValueError),
        ((0, "fp32", 4, np.empty(3, np.float32)), ValueError),
        ((0, "fp32", 4, np.empty(4, np.float64)), TypeError),
        ((0, "fp32", 4), ValueError),
    ]:
        with pytest.raises(error):
            _core.crc32c_decoding(data, [job])


def dense_payload(spec: str = "fp32") -> bytes:
    update = {"w": np.random.default_rng(0).standard_normal((300, 700)).astype(np.float32)}
    return fp.Codec(spec).encode(update, seed=1)


def test_decode_matches_the_checked_decode() -> None:
    for spec in ("fp32", "fp16", "bf16", "q8", "topk:0.1", "fp32+zstd"):
        payload = dense_payload(spec)
        deferred = fp.decode(payload)
        parsed = parse(payload)  # verified first, then decoded from the sections
        assert parsed.unchecked is None
        ref = fp.format.decode_parts(payload)
        for name, arr in deferred.items():
            idx, values = ref[name]
            dense = np.zeros(arr.size, np.float32)
            if idx is None:
                dense[:] = values
            else:
                dense[idx] = values
            np.testing.assert_array_equal(arr.reshape(-1), dense)


def test_corruption_is_a_checksum_mismatch_first() -> None:
    payload = bytearray(dense_payload())
    rng = np.random.default_rng(5)
    for pos in list(rng.integers(14, len(payload) - 4, 40)) + [15, 20, 30]:
        bad = bytearray(payload)
        bad[pos] ^= 0x5A
        with pytest.raises(fp.DecodeError, match="checksum mismatch"):
            fp.decode(bytes(bad))
        # A deferred parse names the checksum too: at once where the corruption breaks the
        # structure, at finish_checksum where it does not.
        with pytest.raises(fp.DecodeError, match="checksum mismatch"):
            finish_checksum(parse(bytes(bad), defer_checksum=True), [])


def test_non_finite_dense_values_are_refused(wire) -> None:
    payload = dense_payload()
    parsed = parse(payload, defer_checksum=True)
    rec = parsed.tensors[0]
    bad = bytearray(payload)
    bad[rec.value_offset + 4 * 12345 : rec.value_offset + 4 * 12346] = np.float32(np.inf).tobytes()
    with pytest.raises(fp.DecodeError, match="'w'.*non-finite"):
        fp.decode(wire.fix_crc(bytes(bad)))


def test_finish_checksum_needs_a_deferred_parse() -> None:
    parsed = parse(dense_payload("fp32+zstd"), defer_checksum=True)  # compressed: verified before inflating
    with pytest.raises(ValueError, match="not deferred"):
        finish_checksum(parsed, [])
    parsed = parse(dense_payload(), defer_checksum=True)
    assert finish_checksum(parsed, []) == [] and parsed.unchecked is None
    with pytest.raises(ValueError):
        finish_checksum(parsed, [])


def test_aggregator_add_many_refuses_non_finite_streamed_values(wire) -> None:
    update = {"w": np.random.default_rng(1).standard_normal(50_000).astype(np.float32)}
    good = fp.Codec("topk:0.05").encode(update, seed=2)
    rec = parse(good, defer_checksum=True).tensors[0]
    bad = bytearray(good)
    bad[rec.value_offset : rec.value_offset + 4] = np.float32(np.nan).tobytes()
    agg = fp.Aggregator()
    with pytest.raises(fp.DecodeError, match="payload 1: tensor 'w'.*non-finite"):
        agg.add_many([good, wire.fix_crc(bytes(bad)), good])
    assert agg.count == 0
    agg.add_many([good, good])
    np.testing.assert_allclose(agg.result()["w"], fp.decode(good)["w"])


@pytest.mark.parametrize("threads", [1, 2])
def test_a_job_may_start_at_the_first_byte(threads) -> None:
    """A job at offset 0 runs over its whole range (the last piece's end is unbounded)."""
    data = np.array([1.0, np.nan, 2.0], np.float32).tobytes()
    with num_threads(threads):
        assert _core.crc32c_decoding(data, [(0, "fp32-finite", 3, None), (8, "fp32-finite", 1, None)]) == (
            _core.crc32c(data),
            [False, True],
        )


def test_add_many_reports_the_first_bad_payload_in_order(wire) -> None:
    """A payload that fails its checksum and one that fails to parse: add_many names whichever
    comes first (payloads are parsed, then checked all at once), and adds nothing."""
    update = {"w": np.random.default_rng(4).standard_normal(50_000).astype(np.float32)}
    good = fp.Codec("topk:0.05").encode(update, seed=2)
    corrupt = bytearray(good)
    corrupt[-20] ^= 0x01  # a value bit: parses, fails the checksum
    other_model = fp.Codec("topk:0.05").encode({"v": update["w"]}, seed=2)  # checksum fine, wrong table
    agg = fp.Aggregator()
    with pytest.raises(fp.DecodeError, match="payload 1: checksum mismatch"):
        agg.add_many([good, bytes(corrupt), other_model, good])
    with pytest.raises(fp.DecodeError, match="payload 1: .*'v'"):
        agg.add_many([good, other_model, bytes(corrupt), good])
    assert agg.count == 0


def test_add_many_checks_streams_of_compressed_payloads(wire) -> None:
    """A compressed payload's checksum is verified as it is inflated: its streamed fp32 values
    are checked finite with its stream instead."""
    update = {"w": np.random.default_rng(5).standard_normal(50_000).astype(np.float32)}
    plain = fp.Codec("topk:0.05").encode(update, seed=2)
    rec = parse(plain, defer_checksum=True).tensors[0]
    body = bytearray(wire.plain_body(plain))
    at = rec.value_offset - wire.header(plain)["header_size"] + 8
    body[at : at + 4] = np.float32(np.inf).tobytes()
    good = wire.wrap(wire.plain_body(plain), seed=wire.header(plain)["seed"], zstd_level=3)
    bad = wire.wrap(bytes(body), seed=wire.header(plain)["seed"], zstd_level=3)
    agg = fp.Aggregator()
    with pytest.raises(fp.DecodeError, match="payload 2: tensor 'w'.*NaN or infinity"):
        agg.add_many([good, good, bad])
    assert agg.count == 0
    agg.add_many([good, good])
    np.testing.assert_allclose(agg.result()["w"], fp.decode(plain)["w"])


# ---------------------------------------------------- quantized sections' jobs --
def quantized_section(rng: np.random.Generator, bits: int, n: int, bucket: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    """A q-section's bytes (scales, then packed codes) for n values, its packed codes and scales."""
    x = rng.standard_normal(n).astype(np.float32)
    packed, scales = fp.ops.quantize(x, bits, bucket, seed=int(rng.integers(1 << 30)))
    return scales.astype("<f4").tobytes() + packed.tobytes(), packed, scales


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize(
    ("n", "bucket"), [(1, 1), (7, 3), (8, 512), (1001, 100), (300_001, 512), (2_000_003, 4096), (5_000_000, 7)]
)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_quantized_jobs_dequantize_as_dequantize_does(bits: int, n: int, bucket: int, threads: int) -> None:
    """A q-job (its codes in units of 8 values, cut anywhere by the pieces, which shrink for
    a buffer whose job writes many times its size) writes what ops.dequantize writes, and
    the CRC is crc32c's, at an odd offset, with bytes before and after."""
    rng = np.random.default_rng(n + bits + threads)
    section_bytes, packed, scales = quantized_section(rng, bits, n, bucket)
    head, tail = bytes(rng.integers(0, 256, 5, dtype=np.uint8)), bytes(rng.integers(0, 256, 3, dtype=np.uint8))
    data = head + section_bytes + tail
    out = np.full(n, np.nan, np.float32)
    job = (len(head) + 4 * scales.size, f"q{bits}", n, out, len(head), bucket)
    with num_threads(threads):
        crc, flags = _core.crc32c_decoding(data, [job])
    assert crc == _core.crc32c(data) and flags == [True]
    assert out.tobytes() == fp.ops.dequantize(packed, scales, bits, n, bucket).tobytes()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bad", ["nan", "inf", "negative", "padding", None])
def test_quantized_jobs_flag_what_the_decoder_refuses(threads: int, bad) -> None:
    """A non-finite or negative scale anywhere, or a padding bit set: the job's flag is
    False (the values are written all the same; the caller throws them away)."""
    rng = np.random.default_rng(3)
    n, bucket, bits = 1_000_003, 512, 4  # an odd count: the last byte holds a padding nibble
    section_bytes, packed, scales = quantized_section(rng, bits, n, bucket)
    data = bytearray(section_bytes)
    where = 4 * (scales.size * 2 // 3)
    if bad == "nan":
        data[where : where + 4] = np.float32(np.nan).tobytes()
    elif bad == "inf":
        data[where : where + 4] = np.float32(np.inf).tobytes()
    elif bad == "negative":
        data[where : where + 4] = np.float32(-0.5).tobytes()
    elif bad == "padding":
        data[-1] |= 0x10
    out = np.empty(n, np.float32)
    with num_threads(threads):
        _, flags = _core.crc32c_decoding(bytes(data), [(4 * scales.size, "q4", n, out, 0, bucket)])
    assert flags == [bad is None]


def test_bad_quantized_jobs_are_refused() -> None:
    data = bytes(64)
    out = np.empty(16, np.float32)
    for job in [
        (8, "q4", 16, out),  # a quantized job names its scales and bucket
        (8, "q3", 16, out, 0, 8),
        (8, "q4", 16, out, 0, 0),  # no bucket
        (8, "q4", 16, out, 0, -1),
        (60, "q4", 16, out, 0, 8),  # codes past the buffer
        (8, "q4", 16, out, 60, 8),  # scales past the buffer
        (8, "q4", 16, np.empty(15, np.float32), 0, 8),
    ]:
        with pytest.raises(ValueError):
            _core.crc32c_decoding(data, [job])
    with pytest.raises(TypeError):
        _core.crc32c_decoding(data, [(8, "q4", 16, np.empty(16, np.float64), 0, 8)])


@pytest.mark.parametrize(("spec", "bucket"), [("q8", 512), ("q4", 512), ("q2", 512), ("sign", 512), ("q4", 100)])
@pytest.mark.parametrize("threads", [1, 2])
def test_decode_of_quantized_payloads_is_the_checked_decode(spec: str, bucket: int, threads: int) -> None:
    """decode, which dequantizes dense q-sections in the checksum's read, gives what the
    sections' checked decoding gives, for a model of several tensors, large and small."""
    rng = np.random.default_rng(11)
    update = {
        "big": rng.standard_normal(700_001).astype(np.float32),
        "small": rng.standard_normal(13).astype(np.float32),
        "matrix": rng.standard_normal((300, 257)).astype(np.float32),
        "empty": np.zeros(0, np.float32),
    }
    payload = fp.Codec(spec, bucket=bucket).encode(update, seed=5)
    with num_threads(threads):
        got = fp.decode(payload)
    parsed = parse(payload)
    for rec in parsed.tensors:
        want = fp.format.decode_parts(payload)[rec.name][1].reshape(rec.shape)
        assert got[rec.name].shape == rec.shape
        assert got[rec.name].tobytes() == want.tobytes(), rec.name


@pytest.mark.parametrize("bad", ["scale", "padding"])
def test_decode_names_the_bad_quantized_tensor(wire, bad: str) -> None:
    """A refused q-section, its checksum made good: decode names the tensor and what is wrong."""
    update = {"a": np.ones(1001, np.float32), "b": np.linspace(-1, 1, 1001, dtype=np.float32)}
    payload = fp.Codec("q4").encode(update, seed=1)
    rec = parse(payload, defer_checksum=True).tensors[1]  # (offsets in the payload)
    broken = bytearray(payload)
    if bad == "scale":
        broken[rec.value_offset : rec.value_offset + 4] = np.float32(-1.0).tobytes()
        match = "'b'.*negative or non-finite scale"
    else:
        broken[rec.value_offset + rec.value_len - 1] |= 0xF0
        match = "'b'.*padding"
    with pytest.raises(fp.DecodeError, match=match):
        fp.decode(wire.fix_crc(bytes(broken)))


def _with_scales(payload: bytes, scale: float) -> bytes:
    """The payload with every scale of its one quantized section set to ``scale``, its checksum
    made good again."""
    rec = parse(payload, defer_checksum=True).tensors[0]  # (deferred: offsets in the payload)
    nb = -(-fp.ops.rht_padded_size(rec.count, rec.rht_block) // rec.bucket)
    out = bytearray(payload)
    out[rec.value_offset : rec.value_offset + 4 * nb] = np.full(nb, scale, "<f4").tobytes()
    out[-4:] = _core.crc32c(bytes(out[:-4])).to_bytes(4, "little")
    return bytes(out)


@pytest.mark.parametrize("spec", ["rht+q8", "rht+q4", "rht+sign", "topk:0.5+rht+q2"])
def test_rotated_quantized_values_are_finite_by_their_scales_or_refused(spec: str) -> None:
    # Codes times a scale lie within +-scale, and the inverse rotation sums at most a block
    # of them: with small scales the output is finite without a pass over it; with scales
    # near float32's largest, the rotation overflows and decode names the tensor.
    x = np.random.default_rng(5).standard_normal(5000).astype(np.float32)
    payload = fp.Codec(spec).encode({"w": x}, seed=3)
    assert np.all(np.isfinite(fp.decode(_with_scales(payload, 1e30))["w"]))
    with pytest.raises(fp.DecodeError, match="'w'.*non-finite"):
        fp.decode(_with_scales(payload, 3e38))


# ------------------------------------------------------------ accumulate --
ACCUMULATED_SPECS = ["q4", "q8+zstd", "sign", "fp16", "bf16", "fp32", "eden4", "int8", "rht+q4", "topk:0.1+q4"]
ACCUMULATED_SPECS += ["randk:0.2"]


@pytest.mark.parametrize("spec", ACCUMULATED_SPECS)
@pytest.mark.parametrize("weight", [1.0, -1.0, 0.5])
def test_accumulate_adds_what_decode_gives(spec: str, weight: float) -> None:
    """accs[name] += weight * the float32 values, in place, for the tensors named:
    what decode gives, added as numpy adds it (bit for bit); raw tensors and tensors
    left out of accs are skipped."""
    from fedpress.format.decoding import accumulate

    rng = np.random.default_rng(41)
    update = {
        "a": rng.standard_normal((40, 50)).astype(np.float32),
        "b": rng.standard_normal(300).astype(np.float32),
        "c": rng.standard_normal(9).astype(np.float32),
        "steps": np.arange(4),
    }
    payload = fp.Codec(spec).encode(update, seed=3)
    decoded = fp.decode(payload)
    accs = {"a": rng.standard_normal((40, 50)).astype(np.float32), "b": rng.standard_normal(300).astype(np.float32)}
    want = {name: acc + np.float32(weight) * decoded[name] for name, acc in accs.items()}
    accumulate(payload, accs, weight)
    for name in accs:
        np.testing.assert_array_equal(accs[name], want[name], err_msg=name)


def test_accumulate_checks_everything_before_adding(wire) -> None:
    """A corrupt payload, or a section the decoder refuses, raises DecodeError with every
    sum untouched; a sum of the wrong type or size is named."""
    from fedpress.format.decoding import accumulate

    rng = np.random.default_rng(42)
    update = {"q": rng.standard_normal(1000).astype(np.float32), "z": rng.standard_normal(500).astype(np.float32)}
    payload = fp.Codec("q4").encode(update, seed=1)
    accs = {name: np.ones(v.size, np.float32) for name, v in update.items()}
    flipped = bytearray(payload)
    flipped[len(payload) // 2] ^= 0x10
    with pytest.raises(fp.DecodeError, match="checksum"):
        accumulate(bytes(flipped), accs, -1.0)
    parsed = parse(payload, defer_checksum=True)
    bad = bytearray(payload)
    last = parsed.tensors[-1]  # its first scale made negative: refused by the section's check
    bad[last.value_offset : last.value_offset + 4] = np.float32(-1).tobytes()
    with pytest.raises(fp.DecodeError, match="'z'"):
        accumulate(wire.fix_crc(bytes(bad)), accs, -1.0)
    assert all(np.all(acc == 1.0) for acc in accs.values())
    with pytest.raises(ValueError, match=r"accs\['q'\] has 999 elements, the tensor 1000"):
        accumulate(payload, {"q": np.ones(999, np.float32)})
    with pytest.raises(TypeError, match=r"accs\['q'\] must be a C-contiguous float32"):
        accumulate(payload, {"q": np.ones(1000, np.float64)})
