"""fp.Codec: spec parsing, round trips of whole updates, selection and value-stage numerics.

Every numeric expectation is computed here with numpy from the documented
contract (README / fedpress.codec docstring), never by calling the library's
own helpers.
"""

from __future__ import annotations

import math

import fedpress as fp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

HAVE_RHT = hasattr(fp.ops, "rht")
needs_rht = pytest.mark.skipif(not HAVE_RHT, reason="fedpress.ops.rht is not available yet")

EXAMPLE_SPECS = [
    "fp32",
    "fp16",
    "q8",
    "q4",
    "sign",
    "topk:0.01",
    "topk:0.01+q4",
    "topk:0.001+q4+zstd",
    "randk:0.01+fp16",
    "q8+zstd:3",
    "rht+q2+zstd",
]
EXTRA_SPECS = [
    "bf16",
    "q2",
    "thresh:0.1",
    "topk:0.2+q8",
    "randk:0.3+q2+zstd",
    "topk:0.05+sign",
    "topk:1",
    "topk:0.1+rht+q8",
    "randk:0.5+rht+fp32",
    "eden1",
    "eden2:mse",
    "eden3+zstd",
    "eden4:shared",
    "eden8",
    "topk:0.1+eden4",
    "randk:0.2+eden2",
]


def spec_param(spec: str):
    marks = [needs_rht] if "rht" in spec else []
    return pytest.param(spec, marks=marks, id=spec)


ALL_SPECS = [spec_param(s) for s in EXAMPLE_SPECS + EXTRA_SPECS]

FLOAT_DTYPES = ("float32", "float64", "float16")
EXACT_DTYPES = ("int64", "int32", "uint8", "bool")
QLEVELS = {"q8": 255, "q4": 15, "q2": 3}
BUCKET = 512


# ------------------------------------------------------------------ helpers --
def generate(kind: str, n: int, seed: int = 0) -> np.ndarray:
    """float32[n] from a distribution (as conftest's generators, without importing conftest)."""
    rng = np.random.default_rng([seed, n])
    if kind == "normal":
        x = rng.standard_normal(n)
    elif kind == "student_t":
        x = rng.standard_t(2, n)
    elif kind == "lognormal":
        x = rng.lognormal(0.0, 2.0, n) * rng.choice([-1.0, 1.0], n)
    else:
        raise ValueError(kind)
    return x.astype(np.float32)


def kept(ratio: float, n: int) -> int:
    """round(ratio * n), at least one of a non-empty tensor."""
    return 0 if n == 0 else min(n, max(1, int(round(ratio * n))))


def make_array(dtype: str, shape: tuple, kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape, dtype=np.int64))
    if dtype == "bool":
        return (rng.random(n) < 0.5).reshape(shape)
    if dtype in EXACT_DTYPES:
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=n, dtype=dtype, endpoint=True).reshape(shape)
    if kind == "ties":
        x = rng.choice(np.array([-2.0, -1.0, 0.0, 1.0, 2.0]), n)
    elif kind == "zeros":
        x = np.zeros(n)
    elif kind == "wide":
        x = rng.lognormal(0.0, 3.0, n) * rng.choice([-1.0, 1.0], n)
        if dtype == "float16":
            x = np.clip(x, 1e-3, 6e4) * np.sign(x)
    else:
        x = rng.standard_normal(n) * 3.0
    return x.astype(dtype).reshape(shape)


shapes = st.one_of(
    st.lists(st.integers(0, 7), min_size=0, max_size=3).map(tuple),  # 0-d, empty and small n-d
    st.integers(0, 3000).map(lambda n: (n,)),
)
tensor_specs = st.tuples(
    st.sampled_from(FLOAT_DTYPES + EXACT_DTYPES),
    shapes,
    st.sampled_from(["normal", "ties", "zeros", "wide"]),
    st.integers(0, 2**32 - 1),
)
updates = st.dictionaries(st.text("abcxyz_.0", min_size=1, max_size=5), tensor_specs, min_size=1, max_size=4).map(
    lambda d: {name: make_array(*spec) for name, spec in d.items()}
)


def half_ulp_tol(dtype: np.dtype, ref: np.ndarray) -> np.ndarray:
    """Rounding of a float32 result into the output dtype."""
    if dtype == np.float16:
        return np.spacing(np.abs(ref).astype(np.float16)).astype(np.float64)
    return np.zeros(ref.shape)


def check_values(code: str, x: np.ndarray, dec: np.ndarray, kept_mask: np.ndarray) -> None:
    """Checks decoded values of one float tensor at the kept positions (flat)."""
    x64 = x.astype(np.float64).reshape(-1)
    x32 = x.astype(np.float32).reshape(-1)
    d = dec.astype(np.float64).reshape(-1)
    out_tol = half_ulp_tol(dec.dtype, x32)
    m = kept_mask
    if code == "fp32":
        np.testing.assert_array_equal(d[m], x32.astype(dec.dtype).astype(np.float64)[m])
    elif code == "fp16":
        # beyond the half range the stage saturates at +-65504 (decoders refuse infinities)
        ref = np.clip(x.reshape(-1), -65504, 65504).astype(np.float16).astype(np.float64)
        if x.dtype == np.float64:  # goes through float32 on its way: see test_fp16_float64_single_rounding
            one_ulp = np.maximum(np.abs(ref[m]) * 2.0**-10, 2.0**-24)
            assert np.all(np.abs(d[m] - ref[m]) <= one_ulp)
        else:
            np.testing.assert_array_equal(d[m], ref[m])
    elif code == "bf16":
        err = np.abs(d - x64)
        assert np.all(err[m] <= 2.0**-8 * np.abs(x64[m]) + out_tol[m] + 1e-37)
    elif code in QLEVELS:
        levels = QLEVELS[code]
        v = x32[m].astype(np.float64)
        n = v.size
        if n:
            nb = -(-n // BUCKET)
            pad = np.zeros(nb * BUCKET)
            pad[:n] = np.abs(v)
            scale = np.repeat(pad.reshape(nb, BUCKET).max(axis=1), BUCKET)[:n]
            bound = 2.0 * scale / levels * (1 + 1e-6) + out_tol[m] + 1e-30
            err = np.abs(d[m] - v)
            bad = np.flatnonzero(err > bound)
            assert bad.size == 0, (
                f"{code}: |error| {err[bad[:5]]} exceeds 2*scale/L {bound[bad[:5]]} at kept positions {bad[:5]}"
            )
    elif code == "sign":
        v = x32[m].astype(np.float64)
        dv = d[m]
        assert np.all(dv[v > 0] >= 0) and np.all(dv[v < 0] <= 0), "sign stage flipped a sign"
        # Each bucket is scaled by its mean magnitude: the L1 norm is preserved.
        tol = 1e-5 if dec.dtype != np.float16 else 2e-3
        np.testing.assert_allclose(np.abs(dv).sum(), np.abs(v).sum(), rtol=tol, atol=1e-30)
    else:
        raise AssertionError(code)


def check_rotated(code: str, x: np.ndarray, dec: np.ndarray, kept_mask: np.ndarray) -> None:
    """Rotated values: the rotation is orthonormal, so the L2 error of the kept
    entries is at most the value stage's error in the rotated domain: for q
    codes (2/L) * sqrt(bucket) * ||x_kept||, for floats their relative precision,
    for sign ||x_kept|| (each bucket replaced by its mean magnitude)."""
    x64 = x.astype(np.float32).astype(np.float64).reshape(-1)[kept_mask]
    d = dec.astype(np.float64).reshape(-1)[kept_mask]
    norm = float(np.linalg.norm(x64))
    # eden: no hard bound short of sqrt(block); these are many standard deviations of its error.
    rel = {
        "fp32": 1e-5,
        "fp16": 2.0**-10,
        "bf16": 2.0**-7,
        "sign": 1.0,
        "eden1": 3.0,
        "eden2": 1.5,
        "eden3": 0.8,
        "eden4": 0.5,
        "eden8": 0.05,
    }.get(code)
    if rel is None:
        rel = 2.0 / QLEVELS[code] * math.sqrt(BUCKET)
    if dec.dtype == np.float16:
        rel += 2.0**-10
    err = float(np.linalg.norm(d - x64))
    assert err <= rel * norm * (1 + 1e-5) + 1e-6 * (norm + 1e-30) + 1e-30, (code, err, norm)


def check_roundtrip(spec_text: str, update: dict, payload: bytes, per_tensor: bool = False) -> None:
    spec = fp.parse_spec(spec_text)
    dec = fp.decode(payload)
    info = fp.inspect(payload)
    assert list(dec) == list(update), "names or their order changed"
    tables = {t["name"]: t for t in info["tensors"]}
    float_names = [k for k, v in update.items() if v.dtype.kind == "f"]
    for name, x in update.items():
        d = dec[name]
        assert d.shape == x.shape, name
        assert d.dtype == x.dtype, (name, d.dtype, x.dtype)
        t = tables[name]
        assert tuple(t["shape"]) == x.shape and t["dtype"] == x.dtype.name
        if x.dtype.kind != "f":
            assert t["kind"] == "raw"
            np.testing.assert_array_equal(d, x)
            continue
        assert np.all(np.isfinite(d))
        n = x.size
        # eden always carries its rotation block, even for an empty tensor
        assert t["rotated"] == (spec.eden or (spec.rotate and t["count"] > 0)), t
        check = check_rotated if spec.rotate or spec.eden else check_values
        if t["kind"] == "dense":
            check(spec.values, x, d, np.ones(n, bool))
            continue
        assert t["kind"] in ("sparse", "sparse-seeded"), t
        assert spec.sparsifier is not None, f"{name}: a sparse section from a spec without a sparsifier"
        assert t["count"] <= n
        nz = d.reshape(-1) != 0
        assert nz.sum() <= t["count"]
        if spec.sparsifier == "randk":
            assert t["kind"] == "sparse-seeded"
            assert t["count"] == kept(spec.ratio, n), (name, t["count"], n)
        if spec.sparsifier == "topk" and per_tensor:
            assert t["count"] == kept(spec.ratio, n), (name, t["count"], n)
        check(spec.values, x, d, nz)
    if spec.sparsifier == "topk":
        groups = [float_names] if not per_tensor else [[k] for k in float_names]
        for names in groups:
            check_topk_selection(spec, names, update, dec, tables)


def check_topk_selection(spec, names: list, update: dict, dec: dict, tables: dict) -> None:
    """Global top-k over the concatenation of `names` (ties aside): with T the k-th largest
    magnitude, every |x| > T is kept, nothing with |x| < T is kept, and the count adds up."""
    mags = [np.abs(update[k].astype(np.float32).reshape(-1)).astype(np.float64) for k in names]
    total = sum(m.size for m in mags)
    if total == 0:
        return
    k = kept(spec.ratio, total)
    T = np.sort(np.concatenate(mags))[-k]
    lo = hi = 0
    exact_values = spec.values == "fp32"
    for name, m in zip(names, mags):
        t = tables[name]
        d = dec[name].reshape(-1)
        if t["kind"] == "dense":  # all of it travels: whatever it holds of the top k counts
            lo += int((m > T).sum())
            hi += int((m >= T).sum())
            continue
        lo += t["count"]
        hi += t["count"]
        nz = d != 0
        must = m > T
        if not (spec.rotate or spec.eden):  # (a rotated value can decode to exactly 0)
            assert np.all(nz[must]), f"{name}: an entry above the k-th magnitude {T} was dropped"
        assert np.all(m[nz] >= T), f"{name}: kept an entry below the k-th magnitude {T}"
        if exact_values:
            x32 = update[name].astype(np.float32).reshape(-1)
            np.testing.assert_array_equal(d[nz], x32[nz].astype(d.dtype))
    assert lo <= k <= hi, f"kept {lo}..{hi} entries, expected round({spec.ratio} * {total}) = {k}"


# ---------------------------------------------------------------- parsing --
@pytest.mark.parametrize("spec", EXAMPLE_SPECS + EXTRA_SPECS)
def test_example_specs_parse(spec: str) -> None:
    parsed = fp.parse_spec(spec)
    assert isinstance(parsed, fp.Spec)
    # The canonical text parses back to the same spec.
    assert fp.parse_spec(str(parsed)) == parsed
    assert fp.Codec(spec).spec == parsed


def test_parsed_fields() -> None:
    s = fp.parse_spec("topk:0.001+q4+zstd")
    assert (s.sparsifier, s.ratio, s.rotate, s.values) == ("topk", 0.001, False, "q4")
    assert s.zstd_level is not None
    s = fp.parse_spec("q8+zstd:3")
    assert (s.sparsifier, s.values, s.zstd_level) == (None, "q8", 3)
    s = fp.parse_spec("rht+q2+zstd")
    assert s.rotate and s.values == "q2"
    s = fp.parse_spec("randk:0.01+fp16")
    assert (s.sparsifier, s.ratio, s.values, s.zstd_level) == ("randk", 0.01, "fp16", None)
    assert fp.parse_spec("topk:0.01").values == "fp32"


@pytest.mark.parametrize(
    "spec, stage",
    [
        ("", ""),
        ("topk", "topk"),
        ("topk:0", "topk:0"),
        ("topk:1.5", "topk:1.5"),
        ("q3", "q3"),
        ("q4+topk:0.1", "topk:0.1"),
        ("zstd:0", "zstd:0"),
        ("zstd:23", "zstd:23"),
        ("q4+q8", "q8"),
        ("rht:3", "rht:3"),
        ("fp32+", ""),
        ("thresh:-0.1", "thresh:-0.1"),
        ("randk:nan", "randk:nan"),
        ("topk:0.1+topk:0.2", "topk:0.2"),
        ("q8+zstd+rht", "rht"),
        ("fp32:2", "fp32:2"),
        ("zstd:x", "zstd:x"),
        ("topk:0.1++q4", ""),
        ("lz4", "lz4"),
    ],
)
def test_bad_specs_raise_naming_the_stage(spec: str, stage: str) -> None:
    with pytest.raises(ValueError) as exc:
        fp.Codec(spec)
    assert stage in str(exc.value)
    with pytest.raises(ValueError):
        fp.parse_spec(spec)


@given(
    ratio=st.floats(min_value=1e-9, max_value=1.0),
    kind=st.sampled_from(["topk", "thresh", "randk"]),
    values=st.sampled_from(["", "+q4", "+rht+fp16+zstd:7"]),
)
def test_canonical_spec_text_round_trips(ratio: float, kind: str, values: str) -> None:
    """str(spec) is the canonical text: parsing it gives the same spec back, ratio included."""
    spec = fp.parse_spec(f"{kind}:{ratio!r}{values}")
    assert spec.ratio == ratio
    assert fp.parse_spec(str(spec)) == spec, (str(spec), ratio)


def test_canonical_spec_keeps_every_digit_of_the_ratio() -> None:
    spec = fp.parse_spec("topk:0.1234567+q4")
    assert fp.parse_spec(str(spec)).ratio == 0.1234567
    payload = fp.Codec("topk:0.1234567+q4").encode({"x": np.ones(10, np.float32)}, seed=0)
    assert fp.parse_spec(fp.inspect(payload)["codec"]).ratio == 0.1234567


def test_spec_must_be_a_string() -> None:
    with pytest.raises(TypeError):
        fp.Codec(None)  # type: ignore[arg-type]


# -------------------------------------------------------------- round trips --
@pytest.mark.parametrize("spec", ALL_SPECS)
@given(update=updates, seed=st.integers(0, 2**64 - 1))
def test_roundtrip_random_updates(spec: str, update: dict, seed: int) -> None:
    payload = fp.Codec(spec).encode(update, seed=seed)
    assert isinstance(payload, bytes)
    check_roundtrip(spec, update, payload)
    assert fp.Codec(spec).encode(update, seed=seed) == payload, "same seed, different bytes"


@pytest.mark.parametrize("spec", ["topk:0.01", "topk:0.05+q8", "topk:0.2+fp16", "randk:0.1+fp32"])
@given(update=updates, seed=st.integers(0, 2**64 - 1))
def test_roundtrip_per_tensor(spec: str, update: dict, seed: int) -> None:
    payload = fp.Codec(spec, per_tensor=True).encode(update, seed=seed)
    check_roundtrip(spec, update, payload, per_tensor=True)


def test_roundtrip_edge_shapes() -> None:
    update = {
        "scalar64": np.array(-2.75),
        "scalar32": np.float32(1.5) * np.ones((), np.float32),
        "empty": np.zeros((0,), np.float32),
        "empty2d": np.zeros((3, 0, 2), np.float64),
        "one": np.array([4.0], np.float16),
        "int0d": np.array(7, np.int64),
        "intempty": np.zeros((0, 4), np.int32),
        "flags": np.array([[True, False], [False, True]]),
        "bytes": np.arange(256, dtype=np.uint8),
    }
    for spec in EXAMPLE_SPECS + EXTRA_SPECS:
        if "rht" in spec and not HAVE_RHT:
            continue
        payload = fp.Codec(spec).encode(update, seed=3)
        check_roundtrip(spec, update, payload)


def test_empty_update() -> None:
    payload = fp.Codec("topk:0.01+q4+zstd").encode({}, seed=1)
    assert fp.decode(payload) == {}
    assert fp.inspect(payload)["tensors"] == []


def test_fp32_exact_and_fp16_exact() -> None:
    x = generate("lognormal", 5000, seed=4).reshape(50, 100)
    d = fp.decode(fp.Codec("fp32").encode({"x": x}))["x"]
    np.testing.assert_array_equal(d, x)
    x16 = np.clip(x, -6e4, 6e4)
    d = fp.decode(fp.Codec("fp16").encode({"x": x16}))["x"]
    assert d.dtype == np.float32
    np.testing.assert_array_equal(d, x16.astype(np.float16).astype(np.float32))


def test_fp16_float64_single_rounding() -> None:
    """fp16 values are x.astype(float16): a float64 tensor must be rounded to half
    precision once, not through float32 first (double rounding)."""
    # Just above the midpoint between 1 and the next half, 1 + 2^-10: the nearest
    # half is 1 + 2^-10, but float32 rounds it onto the midpoint and then ties go to 1.
    x = np.array([1.0 + 2.0**-11 + 2.0**-40, -(1.0 + 2.0**-11 + 2.0**-40), 3.0])
    d = fp.decode(fp.Codec("fp16").encode({"x": x}, seed=0))["x"]
    np.testing.assert_array_equal(d, x.astype(np.float16).astype(np.float64))


def test_bf16_relative_error() -> None:
    x = generate("lognormal", 20_000, seed=5)
    d = fp.decode(fp.Codec("bf16").encode({"x": x}))["x"]
    err = np.abs(d.astype(np.float64) - x)
    assert np.all(err <= 2.0**-8 * np.abs(x.astype(np.float64)))
    # round to nearest: most errors are well below the bound
    assert np.median(err / np.abs(x)) < 2.0**-9


@pytest.mark.parametrize("code", ["q8", "q4", "q2"])
def test_quantized_error_bound_multi_bucket(code: str) -> None:
    x = generate("student_t", 10_007, seed=6).reshape(-1)
    d = fp.decode(fp.Codec(code).encode({"x": x}, seed=9))["x"]
    check_values(code, x, d, np.ones(x.size, bool))
    # stochastic rounding is unbiased: the mean error is far below one step
    scale = np.abs(x).max()
    assert abs(float(np.mean(d.astype(np.float64) - x))) < 0.05 * 2 * scale / QLEVELS[code]


def test_sign_values() -> None:
    x = generate("normal", 4099, seed=7)
    d = fp.decode(fp.Codec("sign").encode({"x": x}, seed=1))["x"]
    check_values("sign", x, d, np.ones(x.size, bool))
    # every decoded magnitude is a bucket's mean magnitude: few distinct values
    assert len(np.unique(np.abs(d))) <= -(-x.size // BUCKET)


# ----------------------------------------------------------------- selection --
def test_global_topk_exact_against_numpy() -> None:
    rng = np.random.default_rng(11)
    update = {
        "w1": rng.standard_t(2, (300, 100)).astype(np.float32),
        "w2": (rng.standard_normal(50_000) * 4).astype(np.float32),
        "b": rng.standard_normal(1000).astype(np.float64),
        "h": rng.standard_normal((40, 25)).astype(np.float16),
    }
    for ratio in (0.01, 0.001, 0.003):
        payload = fp.Codec(f"topk:{ratio}").encode(update, seed=0)
        dec = fp.decode(payload)
        info = {t["name"]: t for t in fp.inspect(payload)["tensors"]}
        names = list(update)
        flat = np.concatenate([update[k].astype(np.float32).reshape(-1) for k in names])
        k = kept(ratio, flat.size)
        ref = np.zeros(flat.size, bool)
        ref[np.argsort(-np.abs(flat), kind="stable")[:k]] = True
        got = np.concatenate([dec[k_].astype(np.float32).reshape(-1) != 0 for k_ in names])
        assert all(info[n]["kind"] == "sparse" for n in names)
        assert sum(info[n]["count"] for n in names) == k
        np.testing.assert_array_equal(got, ref)
        # fp32 values: kept entries are the originals exactly, the rest are zero
        for n in names:
            x32 = update[n].astype(np.float32)
            d = dec[n]
            assert d.dtype == update[n].dtype
            np.testing.assert_array_equal(d[d != 0], x32[d != 0].astype(d.dtype))


def test_per_tensor_topk_counts() -> None:
    rng = np.random.default_rng(12)
    update = {
        "a": rng.standard_normal(10_000).astype(np.float32),
        "b": (100 * rng.standard_normal((100, 70))).astype(np.float32),
    }
    payload = fp.Codec("topk:0.01", per_tensor=True).encode(update, seed=0)
    dec = fp.decode(payload)
    for name, x in update.items():
        k = kept(0.01, x.size)
        assert np.count_nonzero(dec[name]) == k
        ref = np.zeros(x.size, bool)
        ref[np.argsort(-np.abs(x.reshape(-1)))[:k]] = True
        np.testing.assert_array_equal(dec[name].reshape(-1) != 0, ref)
    # globally, b's larger entries would have taken (almost) all of the budget
    payload = fp.Codec("topk:0.01").encode(update, seed=0)
    dec = fp.decode(payload)
    assert np.count_nonzero(dec["a"]) + np.count_nonzero(dec["b"]) == kept(0.01, 17_000)
    assert np.count_nonzero(dec["a"]) < 10


def test_randk_counts_and_values() -> None:
    rng = np.random.default_rng(13)
    update = {
        "a": rng.standard_normal(10_000).astype(np.float32) + 10,
        "b": rng.standard_normal((30, 30)).astype(np.float32) + 10,
        "c": np.full((2,), 5.0, np.float32),
    }
    payload = fp.Codec("randk:0.01+fp32").encode(update, seed=4)
    dec = fp.decode(payload)
    info = {t["name"]: t for t in fp.inspect(payload)["tensors"]}
    for name, x in update.items():
        k = kept(0.01, x.size)
        assert info[name]["count"] == k
        nz = dec[name] != 0
        assert nz.sum() == k
        np.testing.assert_array_equal(dec[name][nz], x[nz])
    # a different seed picks different entries; the same seed the same ones
    other = fp.decode(fp.Codec("randk:0.01+fp32").encode(update, seed=5))
    assert not np.array_equal(other["a"] != 0, dec["a"] != 0)
    again = fp.decode(fp.Codec("randk:0.01+fp32").encode(update, seed=4))
    np.testing.assert_array_equal(again["a"], dec["a"])


@pytest.mark.parametrize("per_tensor", [False, True])
def test_thresh_within_ten_percent(per_tensor: bool) -> None:
    update = {
        "a": np.array(generate("normal", 60_000, seed=14)),
        "b": np.array(generate("student_t", 40_000, seed=15)).reshape(200, 200),
    }
    for ratio in (0.01, 0.1):
        payload = fp.Codec(f"thresh:{ratio}", per_tensor=per_tensor).encode(update, seed=2)
        dec = fp.decode(payload)
        groups = [["a"], ["b"]] if per_tensor else [["a", "b"]]
        for names in groups:
            mags = np.concatenate([np.abs(update[n].reshape(-1)) for n in names])
            got = np.concatenate([dec[n].reshape(-1) != 0 for n in names])
            target = kept(ratio, mags.size)
            assert abs(int(got.sum()) - target) <= 0.1 * target, (names, got.sum(), target)
            # a threshold: everything kept is at least as large as anything dropped
            assert mags[got].min() >= mags[~got].max()
            vals = np.concatenate([dec[n].reshape(-1) for n in names])
            orig = np.concatenate([update[n].reshape(-1) for n in names])
            np.testing.assert_array_equal(vals[got], orig[got])


def test_tiny_tensors_may_go_dense_but_stay_exact() -> None:
    update = {
        "big": np.arange(1, 5001, dtype=np.float32),
        "tiny": np.array([1e6, -1e6], np.float32),
        "scalar": np.array(1e7, np.float32),
    }
    payload = fp.Codec("topk:0.001").encode(update, seed=0)
    check_roundtrip("topk:0.001", update, payload)


def test_byte_orders_and_memory_layouts() -> None:
    update = {
        "big_endian_f32": np.arange(12, dtype=">f4").reshape(3, 4) - 5.5,
        "big_endian_i64": np.arange(6, dtype=">i8").reshape(2, 3) - 3,
        "fortran_f64": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "fortran_i32": np.asfortranarray(np.arange(6, dtype=np.int32).reshape(2, 3)),
        "reversed_i16": np.arange(10, dtype=np.int16)[::-2],
        "strided_f32": np.arange(30, dtype=np.float32)[::-3],
    }
    dec = fp.decode(fp.Codec("fp32").encode(update, seed=0))
    for name, x in update.items():
        assert dec[name].dtype == x.dtype.newbyteorder("=") and dec[name].shape == x.shape, name
        np.testing.assert_array_equal(dec[name], x, err_msg=name)
    check_roundtrip("topk:0.3+q8", update, fp.Codec("topk:0.3+q8").encode(update, seed=0))


# --------------------------------------------------------------------- torch --
def test_torch_tensors() -> None:
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 48, generator=g)
    update = {
        "f32": base.clone(),
        "grad": base.clone().requires_grad_(True),
        "bf16": base.to(torch.bfloat16),
        "f16": base.to(torch.float16),
        "noncontig": base.t(),
        "strided": base[::3, 1::2],
        "scalar": torch.tensor(2.5),
        "ints": torch.arange(10, dtype=torch.int64).reshape(2, 5),
        "mask": torch.tensor([True, False, True]),
    }
    assert not update["noncontig"].is_contiguous()
    payload = fp.Codec("fp32").encode(update, seed=0)
    dec = fp.decode(payload)
    info = {t["name"]: t for t in fp.inspect(payload)["tensors"]}
    assert info["bf16"]["dtype"] == "bfloat16"
    expected_dtypes = {
        "f32": np.float32,
        "grad": np.float32,
        "bf16": np.float32,
        "f16": np.float16,
        "noncontig": np.float32,
        "strided": np.float32,
        "scalar": np.float32,
        "ints": np.int64,
        "mask": np.bool_,
    }
    for name, t in update.items():
        ref = t.detach().float().numpy() if name == "bf16" else t.detach().numpy()
        assert dec[name].dtype == expected_dtypes[name], name
        assert dec[name].shape == tuple(t.shape), name
        np.testing.assert_array_equal(dec[name], ref)
    # compressed specs accept them too
    for spec in ("topk:0.01+q4+zstd", "bf16", "randk:0.1+fp16", "sign"):
        dec = fp.decode(fp.Codec(spec).encode(update, seed=1))
        assert {k: v.shape for k, v in dec.items()} == {k: tuple(t.shape) for k, t in update.items()}
        np.testing.assert_array_equal(dec["ints"], update["ints"].numpy())
    # the inputs are untouched and keep their autograd state
    assert update["grad"].requires_grad
    assert torch.equal(update["grad"].detach(), base)


# --------------------------------------------------------------- determinism --
@pytest.mark.parametrize("spec", ALL_SPECS)
def test_seed_determinism(spec: str) -> None:
    update = {
        "w": np.array(generate("student_t", 5000, seed=20)).reshape(50, 100),
        "b": np.array(generate("normal", 300, seed=21)),
        "n": np.arange(4),
    }
    codec = fp.Codec(spec)
    a = codec.encode(update, seed=123)
    assert codec.encode(update, seed=123) == a
    assert fp.Codec(spec).encode(dict(update), seed=123) == a
    assert fp.inspect(a)["seed"] == 123
    if spec.startswith(("randk", "q", "rht", "topk:0.01+q4")):
        assert codec.encode(update, seed=124) != a  # random choices follow the seed


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, "7"])
def test_bad_seeds(seed) -> None:
    with pytest.raises((ValueError, TypeError)):
        fp.Codec("q8").encode({"x": np.ones(3, np.float32)}, seed=seed)


def test_seed_extremes() -> None:
    x = {"x": np.array(generate("normal", 1000, seed=3))}
    for seed in (0, 2**64 - 1):
        p = fp.Codec("randk:0.1+q4").encode(x, seed=seed)
        assert fp.inspect(p)["seed"] == seed
        assert fp.Codec("randk:0.1+q4").encode(x, seed=seed) == p


@pytest.mark.parametrize(
    "spec",
    ["topk:0.01+q4+zstd", "thresh:0.01+q8", "sign", "randk:0.05+fp16", "q2", "bf16", spec_param("topk:0.1+rht+q8")],
)
def test_bytes_independent_of_threads_and_simd(spec: str, threads, simd) -> None:
    """Same seed, same bytes, whatever the thread count or instruction set (the
    rotation's float arithmetic is only held to this across thread counts)."""
    update = {"w": generate("student_t", 300_007, seed=50), "b": generate("normal", 5000, seed=51)}
    with threads(1):
        reference = fp.Codec(spec).encode(update, seed=5)
        decoded = fp.decode(reference)
    levels = ["scalar", "avx2", "avx512"] if "rht" not in spec else ["avx512"]
    for level in levels:
        for n in (2, 3):
            with simd(level), threads(n):
                assert fp.Codec(spec).encode(update, seed=5) == reference, (level, n)
                if "rht" not in spec:
                    again = fp.decode(reference)
                    for k in decoded:
                        np.testing.assert_array_equal(again[k], decoded[k])


# ------------------------------------------------------------- type errors --
@pytest.mark.parametrize("bad", [[("a", np.zeros(3))], np.zeros(3), "abc", None, 3])
def test_non_mapping_update(bad) -> None:
    with pytest.raises(TypeError):
        fp.Codec("q8").encode(bad)


@pytest.mark.parametrize("key", [1, b"a", ("a",), None])
def test_non_string_key(key) -> None:
    with pytest.raises(TypeError):
        fp.Codec("q8").encode({key: np.zeros(3, np.float32)})


def test_unsupported_dtype() -> None:
    with pytest.raises(TypeError):
        fp.Codec("fp32").encode({"c": np.zeros(3, np.complex64)})


# --------------------------------------------------------------------- sizes --
@pytest.fixture(scope="module")
def realistic_update() -> dict:
    rng = np.random.default_rng(99)
    return {
        "layer.weight": np.array(generate("student_t", 1_000_000, seed=31)),
        "layer.bias": (rng.standard_normal(1000) * 0.1).astype(np.float32),
        "norm.weight": (1 + 0.01 * rng.standard_normal(256)).astype(np.float32),
        "head": (rng.standard_normal((10, 64)) * 0.05).astype(np.float32),
        "step": np.array(17, np.int64),
    }


@pytest.mark.parametrize(
    "spec, factor", [("topk:0.01+q4+zstd", 240), ("topk:0.001+q4+zstd", 1500), ("q8+zstd", 4), ("sign", 30)]
)
def test_issue_size_targets(realistic_update: dict, spec: str, factor: float) -> None:
    raw = sum(4 * v.size for k, v in realistic_update.items() if v.dtype.kind == "f")
    payload = fp.Codec(spec).encode(realistic_update, seed=0)
    ratio = raw / len(payload)
    assert ratio >= factor, f"{spec}: {len(payload)} bytes, {ratio:.1f}x smaller than float32, target {factor}x"
    dec = fp.decode(payload)
    assert dec["step"] == 17


@needs_rht
def test_rht_roundtrip_error_bound() -> None:
    # The rotation is orthonormal: the L2 error equals the rotated-domain error,
    # at most (2/L) * sqrt(bucket) * ||x||_2.
    x = np.array(generate("student_t", 20_000, seed=40))
    for code in ("q8", "q2"):
        d = fp.decode(fp.Codec(f"rht+{code}").encode({"x": x}, seed=1))["x"]
        err = np.linalg.norm(d.astype(np.float64) - x)
        assert err <= 2.0 / QLEVELS[code] * math.sqrt(BUCKET) * np.linalg.norm(x.astype(np.float64))
    d = fp.decode(fp.Codec("rht+q8").encode({"x": x}, seed=1))["x"]
    assert np.linalg.norm(d - x) < 0.05 * np.linalg.norm(x)


# ------------------------------------------- the caller's selection, and what is decoded --
def test_encode_with_the_callers_selection_reports_what_the_receiver_decodes() -> None:
    rng = np.random.default_rng(31)
    update = {
        "w": rng.standard_normal(50_000).astype(np.float32),
        "b": rng.standard_normal(300).astype(np.float32),
        "steps": np.arange(3, dtype=np.int64),
    }
    idx = np.sort(rng.choice(50_000, 400, replace=False)).astype(np.uint32)
    selected = {"w": (idx, update["w"][idx] * 2)}  # any values: the caller's (an error-feedback sum)
    for spec in ("topk:0.01+q4+zstd", "thresh:0.01+fp16", "q8"):
        decoded: dict = {}
        payload = fp.Codec(spec).encode(update, seed=3, selected=selected, on_decoded=decoded.update)
        out = fp.decode(payload)
        got_idx, got_val = decoded["w"]
        np.testing.assert_array_equal(got_idx, idx)  # the caller's entries, not the sparsifier's
        np.testing.assert_array_equal(np.flatnonzero(out["w"]), idx[got_val != 0])
        np.testing.assert_array_equal(out["w"][idx], got_val)  # exactly what the receiver has
        np.testing.assert_allclose(got_val, selected["w"][1], rtol=0, atol=0.2 * np.abs(selected["w"][1]).max())
        assert decoded["b"][0] is None  # left out of selected: sent dense
        np.testing.assert_array_equal(out["b"], decoded["b"][1])
        assert set(decoded) == {"w", "b"}  # float tensors only


def test_encode_refuses_a_selection_it_cannot_send() -> None:
    rng = np.random.default_rng(32)
    update = {"w": rng.standard_normal(10_000).astype(np.float32)}
    idx = np.arange(0, 10_000, 100, dtype=np.uint32)
    val = update["w"][idx]
    codec = fp.Codec("topk:0.01+q4")
    for selected, error, match in (
        ({"v": (idx, val)}, ValueError, r"selected\['v'\]: the update has no floating tensor of that name"),
        ({"w": (idx.astype(np.int64), val)}, ValueError, r"selected\['w'\] must be \(uint32 indices, float32 values\)"),
        ({"w": (idx, val[:-1])}, ValueError, r"selected\['w'\] must be"),
        ({"w": (idx[::-1].copy(), val)}, ValueError, r"tensor 'w': indices must be strictly ascending"),
        ({"w": (idx + np.uint32(9_950), val)}, ValueError, r"tensor 'w': index 10050 at position 1 is >= n"),
        ({"w": (idx, np.where(idx == 500, np.nan, val).astype(np.float32))}, ValueError, r"tensor 'w'.*NaN"),
        ([("w", (idx, val))], TypeError, "selected must be a mapping of tensor names"),
        ({"w": None}, ValueError, r"selected\['w'\] must be an \(indices, values\) pair"),
        ({"w": (idx, val, 1)}, ValueError, r"selected\['w'\] must be an \(indices, values\) pair"),
        ({"w": (np.arange(0, 400, 2, dtype=np.uint32)[::2], val)}, ValueError, r"1-D, contiguous, of one length"),
    ):
        with pytest.raises(error, match=match):
            codec.encode(update, seed=1, selected=selected)
    for spec in ("randk:0.01+q4", "int8"):
        with pytest.raises(ValueError, match="selected is for specs whose kept entries travel with their indices"):
            fp.Codec(spec).encode(update, seed=1, selected={"w": (idx, val)})


def test_bad_selected_indices_are_refused_before_on_decoded_is_called() -> None:
    # The caller corrects its residual in on_decoded: indices the payload cannot carry are
    # refused before that, naming the tensor, and the callback never runs.
    update = {"w": np.random.default_rng(33).standard_normal(1000).astype(np.float32)}
    called: list[object] = []
    for idx in (np.array([5, 3], np.uint32), np.array([2, 2], np.uint32), np.array([1, 1000], np.uint32)):
        with pytest.raises(ValueError, match="tensor 'w': "):
            fp.Codec("topk:0.01+q8").encode(
                update, selected={"w": (idx, np.ones(2, np.float32))}, on_decoded=called.append
            )
    assert not called
