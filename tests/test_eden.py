"""EDEN through the codec: vNMSE on any input, unbiasedness, the shared-rotation
mode and its rotated-domain aggregation, round trips and malformed payloads."""

from __future__ import annotations

import fedpress as fp
import numpy as np
import pytest
from fedpress.format.eden import eden_fixed_size, eden_segments
from fedpress.format.primitives import encode_varint
from fedpress.format.reader import parse
from fedpress.format.registry import EDEN_MSE_SCALE
from fedpress.format.writer import Entry, write_payload

# Known vNMSE of EDEN with the unbiased scale (Vargaftik et al. 2022, Table 1):
# mse / (1 - mse) for the Lloyd-Max quantizer of N(0, 1).
VNMSE = {1: 0.5707963, 2: 0.1331212, 3: 0.0357840, 4: 0.0095921}
INPUTS = ("gaussian", "lognormal", "student_t3", "one_spike", "all_equal")


def _vector(kind: str, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng([seed, d, INPUTS.index(kind)])
    if kind == "gaussian":
        x = rng.standard_normal(d)
    elif kind == "lognormal":
        x = rng.lognormal(0.0, 1.0, d)
    elif kind == "student_t3":
        x = rng.standard_t(3, d)
    elif kind == "one_spike":
        x = np.zeros(d)
        x[int(rng.integers(d))] = 5.0
    else:
        x = np.full(d, 0.3)
    return x.astype(np.float32)


def _vnmse(spec: str, x: np.ndarray, seeds: range, **kwargs) -> float:
    codec = fp.Codec(spec, **kwargs)
    errors = []
    for seed in seeds:
        x_hat = fp.decode(codec.encode({"x": x}, seed=seed))["x"]
        errors.append(float(np.sum((x_hat.astype(np.float64) - x) ** 2) / np.sum(x.astype(np.float64) ** 2)))
    return float(np.mean(errors))


@pytest.mark.parametrize("kind", INPUTS)
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_vnmse_matches_theory_on_any_input_at_2_16(bits: int, kind: str) -> None:
    x = _vector(kind, 1 << 16)
    assert _vnmse(f"eden{bits}", x, range(8)) == pytest.approx(VNMSE[bits], rel=0.02)


@pytest.mark.parametrize("kind", INPUTS)
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_vnmse_within_5_percent_from_2_10(bits: int, kind: str) -> None:
    x = _vector(kind, 1 << 10, seed=1)
    assert _vnmse(f"eden{bits}", x, range(150)) == pytest.approx(VNMSE[bits], rel=0.05)


@pytest.mark.parametrize("d", [(1 << 16) + 5, 3 * (1 << 16) - 1, 100_003])
@pytest.mark.parametrize("bits", [2, 4])
def test_vnmse_on_odd_lengths(bits: int, d: int) -> None:
    x = _vector("student_t3", d, seed=2)
    assert _vnmse(f"eden{bits}", x, range(6)) == pytest.approx(VNMSE[bits], rel=0.02)


def test_odd_lengths_cost_no_padding_bits() -> None:
    # 100003 = 65536 + 32768 + 1024 + 512 + 128 + 32 + 2 + 1: power-of-two segments, nothing padded.
    assert eden_segments(100_003, 1 << 16) == [
        (0, 65536),
        (65536, 32768),
        (98304, 1024),
        (99328, 512),
        (99840, 128),
        (99968, 32),
        (100000, 2),
        (100002, 1),
    ]
    x = _vector("gaussian", 100_003)
    payload = fp.Codec("eden4").encode({"x": x})
    assert 8 * len(payload) / x.size < 4.02


@pytest.mark.slow
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_vnmse_over_several_blocks(bits: int) -> None:
    x = _vector("lognormal", 1 << 20, seed=3)
    assert _vnmse(f"eden{bits}", x, range(3)) == pytest.approx(VNMSE[bits], rel=0.02)


def test_eden8_is_nearly_lossless_and_mse_scale_is_better_but_biased() -> None:
    x = _vector("gaussian", 1 << 14)
    assert _vnmse("eden8", x, range(4)) < 1e-4
    # The MSE-optimal scale trades the bias away for a smaller error: mse/(1) instead of mse/(1-mse).
    assert _vnmse("eden2:mse", x, range(8)) == pytest.approx(0.1175, rel=0.03)


@pytest.mark.parametrize("spec", ["eden2", "eden4:shared"])
def test_unbiased_mean_over_seeds_converges(spec: str) -> None:
    x = _vector("lognormal", 1 << 12, seed=4)
    codec = fp.Codec(spec)
    trials = 400
    mean = np.zeros(x.size, np.float64)
    for seed in range(trials):
        mean += fp.decode(codec.encode({"x": x}, seed=seed))["x"]
    mean /= trials
    err = np.sum((mean - x) ** 2) / np.sum(x.astype(np.float64) ** 2)
    single = _vnmse(spec, x, range(20))
    # An unbiased estimator's mean of T draws has 1/T of one draw's error.
    assert err < 1.5 * single / trials


@pytest.mark.parametrize("bits", [2, 4])
def test_shared_mode_error_of_the_mean_falls_as_one_over_n(bits: int) -> None:
    d, clients, trials = 1 << 14, 10, 6
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal(d).astype(np.float32) * rng.uniform(0.5, 2.0) for _ in range(clients)]
    truth = np.mean(xs, axis=0, dtype=np.float64)
    mean_sq_norm = np.mean([np.sum(x.astype(np.float64) ** 2) for x in xs])
    codec = fp.Codec(f"eden{bits}:shared")
    single, together = [], []
    for t in range(trials):
        agg = fp.Aggregator()
        for i, x in enumerate(xs):
            payload = codec.encode({"x": x}, seed=1000 * t + i, rotation_seed=t)
            error = fp.decode(payload)["x"] - x.astype(np.float64)
            single.append(np.sum(error**2) / np.sum(x.astype(np.float64) ** 2))
            agg.add(payload)
        together.append(np.sum((agg.result()["x"] - truth) ** 2) / mean_sq_norm)
    # DME convention: the mean's error normalised by the clients' mean squared norm.
    assert np.mean(together) == pytest.approx(np.mean(single) / clients, rel=0.15)


@pytest.mark.parametrize(
    "spec", ["eden1", "eden3", "eden4:mse", "topk:0.05+eden2+zstd", "randk:0.1+eden4", "eden4:shared+zstd"]
)
def test_round_trip_keeps_names_shapes_dtypes(spec: str) -> None:
    rng = np.random.default_rng(6)
    update = {
        "w": rng.standard_normal((64, 33)).astype(np.float32),
        "b": rng.standard_normal(33).astype(np.float16),
        "d": rng.standard_normal(7).astype(np.float64),
        "n": np.array(3, np.int64),
        "empty": np.zeros((0, 4), np.float32),
    }
    out = fp.decode(fp.Codec(spec).encode(update, seed=1))
    assert list(out) == list(update)
    for k, v in update.items():
        assert out[k].shape == v.shape and out[k].dtype == v.dtype
    assert out["n"] == 3
    info = fp.inspect(fp.Codec(spec).encode(update, seed=1))
    entry = next(t for t in info["tensors"] if t["name"] == "w")
    assert entry["values"].startswith("eden")
    assert entry["eden"]["shared"] == ("shared" in spec)


def test_bits_per_coordinate() -> None:
    x = _vector("gaussian", 1 << 16)
    for bits in (1, 2, 3, 4, 8):
        payload = fp.Codec(f"eden{bits}").encode({"x": x})
        assert 8 * len(payload) / x.size == pytest.approx(bits, abs=0.01)


def test_spec_grammar() -> None:
    assert str(fp.parse_spec("EDEN4")) == "eden4"
    assert str(fp.parse_spec("topk:0.01+eden2:shared+zstd")) == "topk:0.01+eden2:shared+zstd"
    assert fp.parse_spec("eden3:mse").eden_mode == "mse"
    with pytest.raises(ValueError, match="rotates by itself"):
        fp.parse_spec("rht+eden4")
    with pytest.raises(ValueError, match="':shared' or ':mse'"):
        fp.parse_spec("eden4:fast")
    with pytest.raises(ValueError, match="unknown stage"):
        fp.parse_spec("eden5")
    with pytest.raises(ValueError, match="rotation_seed is for"):
        fp.Codec("eden4").encode({"x": np.ones(4, np.float32)}, rotation_seed=3)


# -------------------------------------------------- rotated-domain aggregation --
@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_rotated_domain_sum_equals_decoding_each_payload(bits: int) -> None:
    rng = np.random.default_rng(7)
    codec = fp.Codec(f"eden{bits}:shared", rht_block=1 << 12)
    d = (1 << 13) + 77
    payloads, weights = [], []
    for i in range(12):
        x = (rng.standard_t(3, d) * (i + 1)).astype(np.float32)
        x[rng.integers(d)] = 60.0  # an outlier beyond the clip after rotation, now and then
        payloads.append(codec.encode({"x": x, "n": np.array(i, np.int32)}, seed=i, rotation_seed=99))
        weights.append(float(i % 4 + 1))
    agg = fp.Aggregator()
    for p, w in zip(payloads, weights):
        agg.add(p, w)
    assert set(agg._rotated) == {"x"}  # summed in the rotated domain
    got = agg.result()
    expected = sum(w * fp.decode(p)["x"].astype(np.float64) for p, w in zip(payloads, weights)) / sum(weights)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got["x"], expected, rtol=0, atol=2e-5 * scale)
    assert any(fp.inspect(p)["tensors"][0]["eden"]["outliers"] for p in payloads)


def test_mixed_rotation_seeds_fall_back_to_decoding() -> None:
    rng = np.random.default_rng(8)
    x1, x2, x3 = (rng.standard_normal(5000).astype(np.float32) for _ in range(3))
    codec = fp.Codec("eden4:shared")
    ps = [
        codec.encode({"x": x1}, rotation_seed=1),
        codec.encode({"x": x2}, rotation_seed=2),
        fp.Codec("eden4").encode({"x": x3}),
    ]
    agg = fp.Aggregator()
    for p in ps:
        agg.add(p)
    expected = np.mean([fp.decode(p)["x"] for p in ps], axis=0)
    np.testing.assert_allclose(agg.result()["x"], expected, atol=1e-5)


def test_merge_and_copy_false_with_rotated_sums() -> None:
    rng = np.random.default_rng(9)
    codec = fp.Codec("eden2:shared")
    ps = [codec.encode({"x": rng.standard_normal(3000).astype(np.float32)}, rotation_seed=5) for _ in range(6)]
    a, b, whole = fp.Aggregator(), fp.Aggregator(), fp.Aggregator()
    for i, p in enumerate(ps):
        (a if i < 3 else b).add(p)
        whole.add(p)
    a.merge(b)
    expected = whole.result()["x"]
    np.testing.assert_allclose(a.result()["x"], expected, atol=1e-6)
    np.testing.assert_allclose(a.result(copy=False)["x"], expected, atol=1e-6)
    assert a.count == 0 and not a._rotated


def test_encoder_error_feedback_with_eden() -> None:
    rng = np.random.default_rng(10)
    enc = fp.Encoder("eden1:mse")
    total_sent = np.zeros(4096)
    total = np.zeros(4096)
    for _ in range(5):
        u = rng.standard_normal(4096).astype(np.float32)
        total += u
        total_sent += fp.decode(enc.encode({"u": u}))["u"]
    np.testing.assert_allclose(total_sent + enc.residuals["u"], total, atol=1e-4)


# ----------------------------------------------------------------- malformed --
def _payload(spec: str = "eden3:shared") -> bytes:
    x = np.random.default_rng(11).standard_t(2, 3000).astype(np.float32)
    x[17] = 400.0
    return fp.Codec(spec).encode({"x": x}, seed=3, rotation_seed=4 if "shared" in spec else None)


@pytest.mark.parametrize("spec", ["eden3:shared", "eden2", "topk:0.1+eden4"])
def test_truncation_and_bit_flips_raise_decode_error(spec: str) -> None:
    payload = _payload(spec)
    for cut in range(0, len(payload), max(1, len(payload) // 200)):
        with pytest.raises(fp.DecodeError):
            fp.decode(payload[:cut])
    rng = np.random.default_rng(12)
    for _ in range(200):
        bad = bytearray(payload)
        bad[int(rng.integers(len(bad)))] ^= 1 << int(rng.integers(8))
        with pytest.raises(fp.DecodeError):
            fp.decode(bytes(bad))


def _rewrite_section(payload: bytes, edit) -> bytes:
    """Re-serialises a payload after ``edit(section_bytes) -> bytes`` on its eden section
    (with a valid checksum, so only the section's own checks can object)."""
    parsed = parse(payload)
    rec = parsed.tensors[0]
    entry = Entry(
        name=rec.name,
        dtype=rec.dtype,
        shape=rec.shape,
        kind=rec.kind,
        count=rec.count,
        values=edit(bytes(rec.value_data)),
        rht_block=rec.rht_block,
        value_code=rec.value_code,
    )
    return write_payload(parsed.spec, parsed.seed, [entry], None)


def test_section_checks_name_what_is_wrong() -> None:
    payload = _payload()
    info = fp.inspect(payload)["tensors"][0]
    assert info["eden"]["outliers"] >= 1
    cases = {
        "unknown mode bits": lambda s: bytes((s[0] | 0x80,)) + s[1:],
        "no MSE scale": lambda s: bytes((s[0] | EDEN_MSE_SCALE,)) + s[1:],
        "trailing bytes": lambda s: s + b"\x00",
        "negative or non-finite scale": lambda s: s[:9] + np.float32(-1).tobytes() + s[13:],
        "outliers among": _bump_outlier_count,
    }
    for message, edit in cases.items():
        with pytest.raises(fp.DecodeError, match=message):
            fp.decode(_rewrite_section(payload, edit))


def _bump_outlier_count(section: bytes) -> bytes:
    # The outlier count varint follows the fixed part: make it absurdly large.
    parsed = parse(_payload())
    rec = parsed.tensors[0]
    fixed = 8 + eden_fixed_size(rec.count, rec.rht_block, 3)
    return section[:fixed] + encode_varint(1 << 40) + section[fixed + 1 :]


def test_an_outlier_code_must_be_an_end_level() -> None:
    payload = _payload()
    parsed = parse(payload)
    sec = parsed.tensors[0].eden
    pos = int(sec.outlier_idx[0])
    offset = 1 + 8 + 4 * sec.scales.size + (pos * 3) // 8

    def edit(section: bytes) -> bytes:
        b = bytearray(section)
        b[offset] ^= 1 << ((pos * 3) % 8)
        return bytes(b)

    with pytest.raises(fp.DecodeError, match="end level"):
        fp.decode(_rewrite_section(payload, edit))


def test_cli_inspect_names_the_eden_mode(tmp_path, capsys) -> None:
    from fedpress.cli import main

    path = tmp_path / "p.bin"
    path.write_bytes(_payload("eden3:shared"))
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "eden3:shared" in out and "outliers" in out and "+rht" not in out


@pytest.mark.parametrize("spec", ["eden4", "rht+q4"])
def test_values_too_large_to_rotate_are_refused_by_name(spec: str) -> None:
    with pytest.raises(ValueError, match="'big' holds values too large to rotate"):
        fp.Codec(spec).encode({"big": np.array([3e38, -1e38, 2e38], np.float32)})
    x = np.array([1e30, -3e29], np.float32)  # large but rotatable
    np.testing.assert_allclose(fp.decode(fp.Codec(spec).encode({"x": x}))["x"], x, rtol=0.3)


def test_aggregator_rejects_what_decode_rejects_in_the_rotated_domain() -> None:
    """A finite but huge scale would overflow the inverse rotation: the rotated-domain sum must
    refuse it as decode does, and leave the aggregate untouched."""
    x = np.random.default_rng(13).standard_normal(5000).astype(np.float32)
    codec = fp.Codec("eden2:shared")
    good = codec.encode({"w": x}, rotation_seed=7)
    bad = _rewrite_section(good, lambda s: s[:9] + np.float32(3e38).tobytes() + s[13:])
    with pytest.raises(fp.DecodeError, match="non-finite"):
        fp.decode(bad)
    agg = fp.Aggregator()
    agg.add(good)
    with pytest.raises(fp.DecodeError, match="non-finite"):
        agg.add(bad)
    assert agg.count == 1
    np.testing.assert_allclose(agg.result()["w"], fp.decode(good)["w"], atol=1e-6)
