"""fp.Aggregator: weighted means of payloads, merging, and refusing bad payloads
without touching the running sums."""

from __future__ import annotations

import struct

import fedpress as fp
import fedpress.codec as codec_module
import numpy as np
import pytest
from fedpress.format.reader import parse
from fedpress.format.writer import write_payload

HAVE_RHT = hasattr(fp.ops, "rht")
SPECS = [
    "fp32",
    "q8",
    "topk:0.01+q4",
    "topk:0.001+q4+zstd",
    "randk:0.1+fp16",
    "sign",
    "thresh:0.05+bf16",
    "topk:0.05",
    pytest.param("rht+q2+zstd", marks=pytest.mark.skipif(not HAVE_RHT, reason="no ops.rht yet")),
]
WEIGHTS = [1.0, 2.5, 0.5, 3.0, 1.0]


def client_update(i: int) -> dict:
    rng = np.random.default_rng(1000 + i)
    return {
        "conv": rng.standard_t(3, (30, 40)).astype(np.float32),
        "fc": rng.standard_normal(500),  # float64
        "half": rng.standard_normal((5, 6)).astype(np.float16),
        "scalar": np.array(rng.standard_normal(), np.float32),
        "steps": rng.integers(0, 1000, size=(3,), dtype=np.int64),
        "tiny": rng.integers(0, 250, size=(4,), dtype=np.uint8),
        "mask": rng.random(7) < 0.5,
    }


def payloads(spec: str, n: int = len(WEIGHTS)) -> list:
    return [fp.Codec(spec).encode(client_update(i), seed=i) for i in range(n)]


def reference_mean(ps: list, weights: list) -> dict:
    """Sum of w_i * decode(p_i) / sum(w_i), in float64."""
    decoded = [fp.decode(p) for p in ps]
    total = float(sum(weights))
    out = {}
    for name in decoded[0]:
        acc = np.zeros(decoded[0][name].shape, np.float64)
        for d, w in zip(decoded, weights):
            acc += d[name].astype(np.float64) * w
        out[name] = acc / total
    return out


def check_against_reference(result: dict, ref: dict, like: dict, rtol: float = 1e-5) -> None:
    assert set(result) == set(ref)
    for name, r in ref.items():
        got = result[name]
        orig = like[name]
        assert got.shape == orig.shape, name
        kind = orig.dtype.kind
        if kind == "f":
            scale = max(float(np.abs(r).max()), 1e-30)
            tol = 1e-3 if got.dtype == np.float16 else rtol
            np.testing.assert_allclose(got.astype(np.float64), r, rtol=tol, atol=tol * scale, err_msg=name)
        elif kind == "b":
            assert got.dtype == np.bool_
            np.testing.assert_array_equal(got, r > 0.5, err_msg=name)
        else:
            assert got.dtype == orig.dtype, name
            np.testing.assert_array_equal(got, np.rint(r).astype(orig.dtype), err_msg=name)


# ------------------------------------------------------------- weighted mean --
@pytest.mark.parametrize("spec", SPECS)
def test_weighted_mean_matches_decode(spec: str) -> None:
    ps = payloads(spec)
    agg = fp.Aggregator()
    for p, w in zip(ps, WEIGHTS):
        agg.add(p, w)
    assert agg.count == len(ps)
    assert agg.total_weight == pytest.approx(sum(WEIGHTS))
    res = agg.result()
    like = client_update(0)
    check_against_reference(res, reference_mean(ps, WEIGHTS), like)
    for name, x in like.items():
        if x.dtype == np.float64 or x.dtype == np.float16:
            assert res[name].dtype == x.dtype, name
        elif x.dtype == np.float32:
            assert res[name].dtype == np.float32, name
    # result() is repeatable and does not consume the aggregate
    again = agg.result()
    for name in res:
        np.testing.assert_array_equal(res[name], again[name])


def test_result_without_copy_hands_over_the_sums() -> None:
    ps = payloads("topk:0.01+q4", 3)
    a, b = fp.Aggregator(), fp.Aggregator()
    for p, w in zip(ps, [1.0, 2.0, 3.0]):
        a.add(p, w)
        b.add(p, w)
    if "copy" not in fp.Aggregator.result.__code__.co_varnames:
        pytest.skip("Aggregator.result has no copy option")
    kept, handed = a.result(), b.result(copy=False)
    for name in kept:
        np.testing.assert_array_equal(handed[name], kept[name])
    assert b.count == 0 and b.total_weight == 0  # empty again, ready for the next round
    with pytest.raises(ValueError):
        b.result()
    b.add(ps[0], 1.0)
    check_against_reference(b.result(), reference_mean(ps[:1], [1.0]), client_update(0))


def test_payloads_of_different_specs_mix() -> None:
    """The table is names, dtypes and shapes: clients may use different codecs."""
    ps = [
        fp.Codec(spec).encode(client_update(i), seed=i)
        for i, spec in enumerate(["fp32", "topk:0.01+q4", "randk:0.1+fp16", "sign+zstd", "q8"])
    ]
    agg = fp.Aggregator()
    for p, w in zip(ps, WEIGHTS):
        agg.add(p, w)
    check_against_reference(agg.result(), reference_mean(ps, WEIGHTS), client_update(0))


def test_default_weight_is_one() -> None:
    ps = payloads("topk:0.01+q4", 3)
    agg = fp.Aggregator()
    for p in ps:
        agg.add(p)
    assert agg.total_weight == 3.0
    check_against_reference(agg.result(), reference_mean(ps, [1, 1, 1]), client_update(0))


def test_zero_weights_are_allowed_but_not_all() -> None:
    ps = payloads("q8", 3)
    agg = fp.Aggregator()
    agg.add(ps[0], 0.0)
    with pytest.raises(ValueError):
        agg.result()
    agg.add(ps[1], 2.0)
    agg.add(ps[2], 0)
    check_against_reference(agg.result(), reference_mean(ps, [0, 2, 0]), client_update(0))


def test_integer_tensors_averaged_and_cast_back() -> None:
    ps = []
    values = [
        np.array([1, 10, -7, 200], np.int64),
        np.array([2, 20, -8, 100], np.int64),
        np.array([4, 31, -9, 0], np.int64),
    ]
    masks = [np.array([True, True, False]), np.array([True, False, False]), np.array([False, False, True])]
    for i, (v, m) in enumerate(zip(values, masks)):
        ps.append(
            fp.Codec("topk:0.5+q8").encode(
                {"v": v, "u8": v.astype(np.uint8), "m": m, "f": np.ones(3, np.float32)}, seed=i
            )
        )
    agg = fp.Aggregator()
    weights = [1.0, 1.5, 2.0]
    for p, w in zip(ps, weights):
        agg.add(p, w)
    res = agg.result()
    mean = sum(v.astype(np.float64) * w for v, w in zip(values, weights)) / 4.5
    assert res["v"].dtype == np.int64
    np.testing.assert_array_equal(res["v"], np.rint(mean).astype(np.int64))
    np.testing.assert_array_equal(res["v"], [3, 23, -8, 78])
    assert res["u8"].dtype == np.uint8
    u8_mean = sum(v.astype(np.uint8).astype(np.float64) * w for v, w in zip(values, weights)) / 4.5
    np.testing.assert_array_equal(res["u8"], np.rint(u8_mean).astype(np.uint8))
    assert res["m"].dtype == np.bool_
    np.testing.assert_array_equal(res["m"], [True, False, False])  # weighted votes 5/9, 2/9, 4/9
    np.testing.assert_allclose(res["f"], 1.0)


def test_bfloat16_tensors_come_back_float32() -> None:
    torch = pytest.importorskip("torch")
    ps = [
        fp.Codec("bf16").encode({"w": torch.full((4,), float(i + 1), dtype=torch.bfloat16)}, seed=i) for i in range(3)
    ]
    agg = fp.Aggregator()
    for p in ps:
        agg.add(p, 1.0)
    res = agg.result()
    assert res["w"].dtype == np.float32
    np.testing.assert_allclose(res["w"], 2.0)


def test_float64_accumulation() -> None:
    """Cancellation that float32 running sums cannot represent: 1e8 + ten 1s - 1e8."""
    ps = [fp.Codec("fp32").encode({"x": np.array([1e8, 1.0], np.float32)}, seed=0)]
    ps += [fp.Codec("fp32").encode({"x": np.array([1.0, 1.0], np.float32)}, seed=0) for _ in range(10)]
    ps += [fp.Codec("fp32").encode({"x": np.array([-1e8, 1.0], np.float32)}, seed=0)]
    agg64 = fp.Aggregator(dtype=np.float64)
    for p in ps:
        agg64.add(p, 1.0)
    res = agg64.result()
    np.testing.assert_allclose(res["x"], [10.0 / 12.0, 1.0], rtol=1e-6)
    # and float64 agrees with a float64 reference on a realistic mix, to float64 precision
    mixed = payloads("topk:0.01+q4")
    agg = fp.Aggregator(dtype=np.float64)
    for p, w in zip(mixed, WEIGHTS):
        agg.add(p, w)
    ref = reference_mean(mixed, WEIGHTS)
    got = agg.result()
    for name in ("conv", "fc"):
        tol = 1e-12 if got[name].dtype == np.float64 else 1e-6
        np.testing.assert_allclose(
            got[name].astype(np.float64), ref[name], rtol=tol, atol=tol * np.abs(ref[name]).max()
        )


def test_aggregator_dtype_must_be_float() -> None:
    with pytest.raises(ValueError):
        fp.Aggregator(dtype=np.int32)


# --------------------------------------------------------------------- merge --
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("spec", ["topk:0.01+q4", "q8+zstd", "randk:0.1+fp16"])
def test_merge_equals_one_aggregator(spec: str, dtype) -> None:
    ps = payloads(spec)
    whole, left, right = fp.Aggregator(dtype), fp.Aggregator(dtype), fp.Aggregator(dtype)
    for i, (p, w) in enumerate(zip(ps, WEIGHTS)):
        whole.add(p, w)
        (left if i < 2 else right).add(p, w)
    left.merge(right)
    assert left.count == whole.count == len(ps)
    assert left.total_weight == pytest.approx(whole.total_weight)
    a, b = left.result(), whole.result()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape
        np.testing.assert_allclose(
            a[name].astype(np.float64),
            b[name].astype(np.float64),
            rtol=1e-5,
            atol=1e-6 * max(1.0, float(np.abs(b[name].astype(np.float64)).max())),
        )
    check_against_reference(a, reference_mean(ps, WEIGHTS), client_update(0))


def test_merge_with_empty_aggregators() -> None:
    ps = payloads("q8", 2)
    full = fp.Aggregator()
    full.add(ps[0], 1.0)
    full.add(ps[1], 3.0)
    before = full.result()
    full.merge(fp.Aggregator())  # nothing to add
    assert full.count == 2 and full.total_weight == 4.0
    empty = fp.Aggregator()
    empty.merge(full)  # takes everything
    assert empty.count == 2 and empty.total_weight == 4.0
    after = empty.result()
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])
    # merging copied the sums: adding to one does not change the other
    empty.add(ps[0], 100.0)
    for name, x in full.result().items():
        np.testing.assert_array_equal(x, before[name])


def test_merge_mismatching_tables() -> None:
    a, b = fp.Aggregator(), fp.Aggregator()
    a.add(fp.Codec("q8").encode({"x": np.ones(4, np.float32)}, seed=0), 1.0)
    b.add(fp.Codec("q8").encode({"x": np.ones(5, np.float32)}, seed=0), 1.0)
    before = a.result()
    with pytest.raises(fp.DecodeError):
        a.merge(b)
    assert a.count == 1 and a.total_weight == 1.0
    np.testing.assert_array_equal(a.result()["x"], before["x"])
    with pytest.raises(TypeError):
        a.merge({"x": np.ones(4)})  # type: ignore[arg-type]


# --------------------------------------------------------- refusing payloads --
def _snapshot(agg: fp.Aggregator) -> tuple:
    return agg.count, agg.total_weight, agg.result()


def _assert_unchanged(agg: fp.Aggregator, snap: tuple) -> None:
    count, total, res = snap
    assert agg.count == count and agg.total_weight == total
    now = agg.result()
    assert set(now) == set(res)
    for name in res:
        np.testing.assert_array_equal(now[name], res[name])


def _mismatches() -> dict:
    u = client_update(9)
    reshaped = dict(u, conv=u["conv"].reshape(40, 30))
    retyped = dict(u, fc=u["fc"].astype(np.float32))
    renamed = {("conv2" if k == "conv" else k): v for k, v in u.items()}
    extra = dict(u, more=np.zeros(3, np.float32))
    missing = {k: v for k, v in u.items() if k != "mask"}
    int_retyped = dict(u, steps=u["steps"].astype(np.int32))
    return {
        "reshaped": reshaped,
        "retyped": retyped,
        "renamed": renamed,
        "extra": extra,
        "missing": missing,
        "int retyped": int_retyped,
    }


@pytest.mark.parametrize("which", list(_mismatches()))
def test_mismatching_table_raises_and_leaves_sums(which: str) -> None:
    ps = payloads("topk:0.01+q4", 2)
    agg = fp.Aggregator()
    agg.add(ps[0], 2.0)
    agg.add(ps[1], 1.0)
    snap = _snapshot(agg)
    bad = fp.Codec("topk:0.01+q4").encode(_mismatches()[which], seed=3)
    with pytest.raises(fp.DecodeError):
        agg.add(bad, 5.0)
    _assert_unchanged(agg, snap)
    # and the aggregator still works
    agg.add(ps[0], 1.0)
    check_against_reference(agg.result(), reference_mean([ps[0], ps[1], ps[0]], [2.0, 1.0, 1.0]), client_update(0))


def _nan_in_last_tensor(wire) -> bytes:
    """A payload whose checksum and table are fine but whose last tensor decodes to
    NaN: it can only be refused after the first tensors were decoded."""
    u = client_update(7)
    marker = np.float32(1.2345678)
    u["scalar"] = np.array(marker, np.float32)
    payload = fp.Codec("fp32").encode(u, seed=0)
    body = wire.plain_body(payload)
    needle = struct.pack("<f", marker)
    assert body.count(needle) == 1
    return wire.rebuild(payload, body.replace(needle, struct.pack("<f", float("nan"))))


def test_corrupt_payloads_raise_and_leave_sums(wire) -> None:
    ps = payloads("fp32", 2)
    agg = fp.Aggregator()
    agg.add(ps[0], 1.0)
    agg.add(ps[1], 0.5)
    snap = _snapshot(agg)
    good = fp.Codec("fp32").encode(client_update(7), seed=0)
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x04
    bad = [good[:-1], good[: len(good) // 2], bytes(flipped), good + b"\0", b"", b"FPRS", _nan_in_last_tensor(wire)]
    for data in bad:
        with pytest.raises(fp.DecodeError):
            agg.add(data, 1.0)
        _assert_unchanged(agg, snap)
    # the NaN payload really was well-formed up to its values
    assert fp.inspect(_nan_in_last_tensor(wire))["tensors"][-1]["name"] == "mask"
    agg.add(good, 1.0)
    assert agg.count == 3


def test_first_payload_corrupt_leaves_the_aggregator_empty(wire) -> None:
    agg = fp.Aggregator()
    with pytest.raises(fp.DecodeError):
        agg.add(_nan_in_last_tensor(wire), 1.0)
    assert agg.count == 0 and agg.total_weight == 0
    with pytest.raises(ValueError):
        agg.result()
    # the table was not fixed by the refused payload: any table is still welcome
    agg.add(fp.Codec("q8").encode({"other": np.ones(3, np.float32)}, seed=0), 1.0)
    np.testing.assert_allclose(agg.result()["other"], 1.0, rtol=1e-2)


def test_result_with_nothing_added() -> None:
    with pytest.raises(ValueError):
        fp.Aggregator().result()
    with pytest.raises(ValueError):
        fp.Aggregator(dtype=np.float64).result()


@pytest.mark.parametrize("weight", [-1.0, -1e-12, float("nan"), float("inf"), float("-inf")])
def test_bad_weights(weight: float) -> None:
    ps = payloads("q8", 2)
    agg = fp.Aggregator()
    agg.add(ps[0], 1.0)
    snap = _snapshot(agg)
    with pytest.raises(ValueError):
        agg.add(ps[1], weight)
    _assert_unchanged(agg, snap)
    empty = fp.Aggregator()
    with pytest.raises(ValueError):
        empty.add(ps[0], weight)
    assert empty.count == 0


def test_payloads_from_encoders() -> None:
    """The typical round: several clients with error-feedback encoders, one server."""
    specs = "topk:0.01+q4+zstd"
    encoders = [fp.Encoder(specs) for _ in range(3)]
    for rnd in range(2):
        agg = fp.Aggregator()
        ps = [enc.encode(client_update(10 * rnd + i), seed=rnd * 10 + i) for i, enc in enumerate(encoders)]
        for p, w in zip(ps, [1.0, 2.0, 3.0]):
            agg.add(p, w)
        ref = reference_mean(ps, [1.0, 2.0, 3.0])
        res = agg.result()
        for name in ("conv", "fc", "steps"):
            np.testing.assert_allclose(
                res[name].astype(np.float64),
                ref[name] if name != "steps" else np.rint(ref[name]),
                rtol=1e-5,
                atol=1e-6 * np.abs(ref[name]).max(),
            )


def test_add_update_sums_decoded_updates_with_payloads():
    rng = np.random.default_rng(5)
    model = {"w": rng.standard_normal((6, 7)).astype(np.float32), "n": np.arange(5, dtype=np.int64)}
    other = {"w": rng.standard_normal((6, 7)).astype(np.float32), "n": np.arange(5, dtype=np.int64) * 3}
    mixed, payloads = fp.Aggregator(), fp.Aggregator()
    mixed.add(fp.Codec("fp32").encode(model), 2.0)
    mixed.add_update(other, 1.0)
    payloads.add(fp.Codec("fp32").encode(model), 2.0)
    payloads.add(fp.Codec("fp32").encode(other), 1.0)
    a, b = mixed.result(), payloads.result()
    np.testing.assert_allclose(a["w"], b["w"], rtol=1e-6)
    np.testing.assert_array_equal(a["n"], b["n"])
    assert a["n"].dtype == np.int64 and mixed.count == 2 and mixed.total_weight == 3.0


def test_add_update_refuses_another_table_and_leaves_the_sum():
    agg = fp.Aggregator(table={"w": np.zeros(4, np.float32)})
    with pytest.raises(fp.DecodeError, match="receiver's model"):
        agg.add_update({"w": np.zeros(5, np.float32)})
    agg.add_update({"w": np.ones(4, np.float32)}, 2.0)
    with pytest.raises(fp.DecodeError, match="first payload"):
        agg.add_update({"v": np.ones(4, np.float32)})
    for bad, error in (([1.0], TypeError), ({"w": np.ones(4, np.float32)}, ValueError)):
        with pytest.raises(error):
            agg.add_update(bad, -1.0 if isinstance(bad, dict) else 1.0)
    assert agg.count == 1
    np.testing.assert_array_equal(agg.result()["w"], np.ones(4, np.float32))


MANY_SPECS = [
    "fp32",
    "q4",
    "topk:0.01+q4",
    "topk:0.05+q8+zstd",
    "randk:0.1+fp16",
    "sign",
    "thresh:0.05+bf16",
    "eden4",
    "eden4:shared",
    "topk:0.1+eden2",
    "rht+q2",
]


@pytest.mark.parametrize("spec", MANY_SPECS)
def test_add_many_equals_adding_one_by_one(spec):
    codec = fp.Codec(spec)
    payloads = [
        codec.encode(client_update(i), seed=i, rotation_seed=77)
        if spec.endswith(":shared")
        else codec.encode(client_update(i), seed=i)
        for i in range(5)
    ]
    one, many = fp.Aggregator(), fp.Aggregator()
    for p, w in zip(payloads, WEIGHTS):
        one.add(p, w)
    many.add_many(payloads[:2], WEIGHTS[:2])
    many.add_many(payloads[2:], WEIGHTS[2:])
    assert many.count == one.count == 5 and many.total_weight == pytest.approx(one.total_weight)
    a, b = one.result(), many.result()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6)
        assert b[k].dtype == a[k].dtype


def test_add_many_is_all_or_nothing():
    codec = fp.Codec("topk:0.05+q4")
    good = [codec.encode(client_update(i), seed=i) for i in range(3)]
    agg = fp.Aggregator()
    agg.add(good[0])
    before = agg.result()
    broken = bytearray(good[2])
    broken[len(broken) // 2] ^= 0xFF
    with pytest.raises(fp.DecodeError, match="payload 2"):
        agg.add_many([good[1], good[0], bytes(broken)])
    other = fp.Codec("topk:0.05+q4").encode({"other": np.ones(10, np.float32)})
    with pytest.raises(fp.DecodeError, match="payload 1"):
        agg.add_many([good[1], other])
    with pytest.raises(ValueError, match="2 payloads but 1 weights"):
        agg.add_many(good[:2], [1.0])
    assert agg.count == 1
    for k, v in agg.result().items():
        np.testing.assert_array_equal(v, before[k])


@pytest.mark.parametrize(
    "spec", ["fp32", "q4", "topk:0.05+q4+zstd", "randk:0.1+fp16", "eden4", "topk:0.1+eden2", "rht+q2", "sign"]
)
def test_decode_parts_is_decode_without_the_dense_copy(spec):
    """What the Encoder's error feedback subtracts: decode's values, kept entries only."""
    payload = fp.Codec(spec).encode(client_update(3), seed=5)
    dense = fp.decode(payload)
    parts = fp.format.decode_parts(payload)
    assert set(parts) == {k for k, v in dense.items() if v.dtype.kind == "f"}
    for name, (idx, values) in parts.items():
        assert values.dtype == np.float32
        expected = dense[name].reshape(-1).astype(np.float32)
        rebuilt = values if idx is None else np.zeros(expected.size, np.float32)
        if idx is not None:
            rebuilt[idx] = values
        np.testing.assert_array_equal(rebuilt, expected)


@pytest.mark.parametrize("spec", ["q8", "q4", "q2", "sign", "eden3", "eden4:mse", "fp16"])
def test_dense_sections_add_into_the_sum_as_decoded(spec: str) -> None:
    """A dense quantized or eden tensor is added straight from its section (no decoded
    copy): the same float32 sum, bit for bit, as decoding it and adding weight * values."""
    rng = np.random.default_rng(4)
    codec = fp.Codec(spec, rht_block=4096)
    payloads = [codec.encode({"w": rng.standard_normal(10_001).astype(np.float32)}, seed=s) for s in range(3)]
    weights = [1.0, 0.25, 3.0]
    agg = fp.Aggregator()
    for p, w in zip(payloads, weights):
        agg.add(p, weight=w)
    expected = np.zeros(10_001, np.float32)
    for p, w in zip(payloads, weights):
        expected += np.float32(w) * fp.decode(p)["w"]
    np.testing.assert_array_equal(agg.result()["w"], expected / np.float32(sum(weights)))
    many = fp.Aggregator()
    many.add_many(payloads, weights)
    np.testing.assert_array_equal(many.result()["w"], agg.result()["w"])


@pytest.mark.parametrize("spec", ["fp32", "fp16", "bf16", "q8", "q4", "q2", "sign"])
@pytest.mark.parametrize("weight", [1.0, 0.3, 7.0, 0.0])
def test_a_first_payload_is_written_weighted_as_its_checksum_reads_it(spec: str, weight: float) -> None:
    """A new aggregator's first uncompressed payload is written into its sums, times its
    weight, in the pass that checks its checksum: the same sums, bit for bit, as adding it
    to sums that already hold something (a zero-weight payload first)."""
    rng = np.random.default_rng(11)
    update = {f"t{i}": rng.standard_normal(size).astype(np.float32) for i, size in enumerate((3, 700, 40_000))}
    payload = fp.Codec(spec, bucket=64).encode(update, seed=5)
    first, later = fp.Aggregator(), fp.Aggregator()
    first.add(payload, weight)
    later.add(payload, 0.0)
    later.add(payload, weight)
    assert first.count == 1 and first.total_weight == weight
    decoded = fp.decode(payload)
    for name in update:
        np.testing.assert_array_equal(first._sums[name], later._sums[name])
        np.testing.assert_array_equal(first._sums[name], np.float32(weight) * decoded[name].reshape(-1))


@pytest.mark.parametrize("spec", ["fp32", "fp16", "bf16"])
def test_a_first_payload_written_into_new_sums_keeps_their_signed_zeros(spec: str) -> None:
    """A float section written into new sums is their first term, 0 + weight * value in
    float32: the bytes add_many gives (and an add to sums holding something), -0.0 included."""
    x = np.array([-0.0, 0.0, -1.5, 2.0, -3.0, 1e-40, -1e-40] * 100, np.float32)
    payload = fp.Codec(spec).encode({"w": x}, seed=1)
    for weight in (1.0, 0.0, 0.5, 3.0):
        one, many = fp.Aggregator(), fp.Aggregator()
        one.add(payload, weight)
        many.add_many([payload], [weight])
        assert one._sums["w"].tobytes() == many._sums["w"].tobytes(), weight


def test_the_first_bad_tensor_in_order_is_named_whatever_the_sums_hold() -> None:
    """A first payload's sections are written as its checksum is read, but the error named
    is still the first bad tensor's in table order (a bad q4 scale before a NaN in a later
    fp32 tensor), as for a payload added to sums that hold something, or by add_many."""

    def entries(spec: str, name: str, seed: int) -> list:
        made: list = []
        real = codec_module.write_payload
        codec_module.write_payload = lambda *args, **kwargs: made.extend(args[2]) or real(*args, **kwargs)
        try:
            fp.Codec(spec).encode({name: np.random.default_rng(seed).standard_normal(1000).astype(np.float32)}, seed=1)
        finally:
            codec_module.write_payload = real
        return made

    good = write_payload("q4", 1, entries("q4", "a", 0) + entries("fp32", "b", 1), None)
    a, b = parse(good, defer_checksum=True).tensors
    data = bytearray(good)
    data[a.value_offset : a.value_offset + 4] = np.float32(-1.0).tobytes()  # a's first scale
    data[b.value_offset : b.value_offset + 4] = np.float32(np.nan).tobytes()  # b's first value
    data[-4:] = struct.pack("<I", fp._core.crc32c(bytes(data[:-4])))
    bad = bytes(data)

    def second(agg: fp.Aggregator) -> None:
        agg.add(good)
        agg.add(bad)

    for call in (
        lambda: fp.Aggregator().add(bad),
        lambda: second(fp.Aggregator()),
        lambda: fp.Aggregator(dtype=np.float64).add(bad),
        lambda: fp.Aggregator().add_many([bad, good]),
        lambda: fp.Aggregator().mean_of([good, bad]),
    ):
        with pytest.raises(fp.DecodeError, match="tensor 'a': values section holds a negative or non-finite scale"):
            call()


@pytest.mark.parametrize("spec", ["fp32", "q4", "sign"])
def test_a_first_payload_whose_checksum_fails_after_its_sections_were_written_adds_nothing(spec: str) -> None:
    """The sections of a first payload are written into new sums before its checksum is
    known: a payload whose checksum then fails leaves the aggregator empty."""
    x = np.random.default_rng(2).standard_normal(300_000).astype(np.float32)
    payload = bytearray(fp.Codec(spec).encode({"w": x}, seed=1))
    payload[len(payload) // 2] ^= 0x10  # inside the values section
    agg = fp.Aggregator()
    with pytest.raises(fp.DecodeError, match="checksum mismatch"):
        agg.add(bytes(payload))
    assert agg.count == 0 and agg.total_weight == 0 and not agg._sums
    agg.add(fp.Codec("q8").encode({"other": np.ones(3, np.float32)}, seed=0))
    assert list(agg.result()) == ["other"]


def test_a_weight_beyond_float32_is_refused_for_float32_sums() -> None:
    """float32 sums are multiplied by the weight in float32: a larger weight would make them
    infinite or NaN, so it is refused (a float64 aggregator takes it)."""
    payload = fp.Codec("q4").encode({"w": np.ones(10, np.float32)}, seed=0)
    for call in (
        lambda agg: agg.add(payload, 1e39),
        lambda agg: agg.add_many([payload, payload], [1.0, 1e300]),
        lambda agg: agg.add_update({"w": np.ones(10, np.float32)}, 4e38),
        lambda agg: agg.mean_of([payload], [1e39]),
        lambda agg: agg.add(payload, 1e-46),  # rounds to 0 in float32, yet would count in the total
    ):
        agg = fp.Aggregator()
        with pytest.raises(ValueError, match="beyond float32's range"):
            call(agg)
        assert agg.count == 0
    wide = fp.Aggregator(dtype=np.float64)
    wide.add(payload, 1e300)
    np.testing.assert_allclose(wide.result()["w"], fp.decode(payload)["w"], rtol=1e-6)


def test_sparse_parts_into_given_buffers() -> None:
    """An aggregator decodes a batch's kept entries into two buffers allocated once:
    sparse_parts(out=) gives the same indices and values, in those buffers, for exact,
    seeded and rotated sparse tensors, and refuses a stream of another count."""
    from fedpress.format.decoding import sparse_parts
    from fedpress.format.reader import parse

    x = np.random.default_rng(5).standard_normal(20_000).astype(np.float32)
    for spec in ("topk:0.01", "topk:0.01+q4", "randk:0.02+fp16", "topk:0.05+rht+q8", "thresh:0.01+sign"):
        parsed = parse(fp.Codec(spec).encode({"w": x}, seed=3))
        rec = parsed.tensors[0]
        idx, values = sparse_parts(rec, parsed.seed)
        out = (np.empty(rec.count, np.uint32), np.empty(rec.count, np.float32))
        got_idx, got_values = sparse_parts(rec, parsed.seed, out)
        assert np.shares_memory(got_idx, out[0]) and np.shares_memory(got_values, out[1])
        np.testing.assert_array_equal(got_idx, idx)
        np.testing.assert_array_equal(got_values, values)
    parsed = parse(fp.Codec("topk:0.01").encode({"w": x}, seed=3))
    with pytest.raises(fp.DecodeError):
        fp.ops.decode_indices(
            parsed.tensors[0].index_data, x.size, out=np.empty(parsed.tensors[0].count + 1, np.uint32)
        )


def _bad_scale(payload: bytes) -> bytes:
    """The payload with its one tensor's first scale made negative, its checksum good."""
    from fedpress import _core
    from fedpress.format.reader import parse

    rec = parse(payload, defer_checksum=True).tensors[0]
    out = bytearray(payload)
    out[rec.value_offset : rec.value_offset + 4] = struct.pack("<f", -1.0)
    out[-4:] = struct.pack("<I", _core.crc32c(bytes(out[:-4])))
    return bytes(out)


@pytest.mark.parametrize("spec", ["topk:0.05+q8", "topk:0.05+q4", "topk:0.05+sign", "topk:0.05+fp16"])
def test_streamed_values_of_many_payloads_decode_together(spec: str) -> None:
    # Sparse tensors whose values are not fp32 are decoded for all the payloads of a batch in
    # one call: the sums are those of adding one by one, and a bad section in any payload is
    # named by its position, with nothing added.
    rng = np.random.default_rng(11)
    codec = fp.Codec(spec)
    payloads = [codec.encode({"w": rng.standard_normal(30_000).astype(np.float32)}, seed=i) for i in range(5)]
    one_by_one = fp.Aggregator()
    for p in payloads:
        one_by_one.add(p, 2.0)
    batched = fp.Aggregator()
    batched.add_many(payloads, [2.0] * 5)
    assert batched.result()["w"].tobytes() == one_by_one.result()["w"].tobytes()
    assert (
        fp.Aggregator().mean_of(payloads)["w"].tobytes() == fp.Aggregator().mean_of(payloads, [1.0] * 5)["w"].tobytes()
    )
    if spec.endswith("fp16"):
        return
    for at in (0, 2, 4):
        batch = list(payloads)
        batch[at] = _bad_scale(batch[at])
        agg = fp.Aggregator()
        agg.add(payloads[1])
        before = agg.result()["w"].copy()
        with pytest.raises(fp.DecodeError, match=f"^payload {at}: tensor 'w': .*negative or non-finite scale"):
            agg.add_many(batch)
        with pytest.raises(fp.DecodeError, match=f"^payload {at}: "):
            fp.Aggregator().mean_of(batch)
        assert agg.count == 1 and agg.result()["w"].tobytes() == before.tobytes()
