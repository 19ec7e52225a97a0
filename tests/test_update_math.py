"""fedpress._update_math: an update (new - old) and an update applied back, by dtype, against
references computed here (Python integers for the integer rule), and every caller agreeing with it."""

from __future__ import annotations

import importlib.util

import fedpress as fp
import numpy as np
import pytest
from fedpress import _update_math as um
from fedpress.federation import model as M
from fedpress.train import loops
from hypothesis import given
from hypothesis import strategies as st

INTS = [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64]
FLOATS = [np.float16, np.float32, np.float64]
HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_FLWR = importlib.util.find_spec("flwr") is not None


def _clamp(value: int, dtype: type) -> int:
    info = np.iinfo(dtype)
    return max(int(info.min), min(int(info.max), value))


# ---------------------------------------------------------------- dtypes --
@pytest.mark.parametrize(
    ("dtype", "want"),
    [(np.bool_, np.bool_), *((d, np.int64) for d in INTS), (np.float16, np.float32), (np.float32, np.float32)]
    + [(np.float64, np.float64)],
)
def test_delta_dtype(dtype: type, want: type) -> None:
    assert um.delta_dtype(dtype) == np.dtype(want)


@pytest.mark.parametrize("dtype", [np.complex64, np.str_, np.object_])
def test_delta_dtype_rejects_what_has_no_arithmetic(dtype: type) -> None:
    with pytest.raises(TypeError, match="no update arithmetic"):
        um.delta_dtype(dtype)


def test_update_table() -> None:
    model = {"w": np.zeros((2, 3), np.float16), "n": np.zeros((), np.uint8), "m": np.zeros(4, bool)}
    assert um.update_table(model) == [("w", "float32", (2, 3)), ("n", "int64", ()), ("m", "bool", (4,))]


# -------------------------------------------------------------- subtract --
def test_a_uint8_decrease_is_negative_not_wrapped() -> None:
    new = np.array([0, 5, 255, 3], np.uint8)
    old = np.array([3, 5, 0, 255], np.uint8)
    d = um.subtract(new, old)
    assert d.dtype == np.int64 and d.tolist() == [-3, 0, 255, -252]


@pytest.mark.parametrize("dtype", INTS)
def test_subtract_integers_matches_python_integers(dtype: type) -> None:
    info = np.iinfo(dtype)
    values = [int(info.min), int(info.min) + 1, -1 if info.min < 0 else 0, 0, 1, int(info.max) - 1, int(info.max)]
    new = np.array([a for a in values for _ in values], dtype)
    old = np.array([b for _ in values for b in values], dtype)
    d = um.subtract(new, old)
    # int64 differences, saturated at int64's ends (uint64 values beyond them are clamped first).
    want = [_clamp(_clamp(int(a), np.int64) - _clamp(int(b), np.int64), np.int64) for a, b in zip(new, old)]
    assert d.dtype == np.int64 and d.tolist() == want


def test_subtract_rounds_a_float_reference_of_an_integer_tensor() -> None:
    assert um.subtract(np.array([4], np.int64), np.array([1.6])).tolist() == [2]
    with pytest.raises(ValueError, match="NaN or infinity"):
        um.subtract(np.array([4], np.int64), np.array([np.nan]))


@pytest.mark.parametrize("dtype", FLOATS)
def test_subtract_floats_in_their_delta_dtype(dtype: type) -> None:
    rng = np.random.default_rng(1)
    big = 60000.0 if dtype == np.float16 else 1e30
    new = (rng.standard_normal(50) * big / 4).astype(dtype)
    old = (-rng.standard_normal(50) * big / 4).astype(dtype)
    d = um.subtract(new, old)
    work = np.float64 if dtype == np.float64 else np.float32
    assert d.dtype == work
    np.testing.assert_array_equal(d, new.astype(work) - old.astype(work))
    assert np.isfinite(d).all()  # the float16 difference would overflow


def test_subtract_bool_gives_the_new_values_as_a_copy() -> None:
    new = np.array([True, False, True])
    d = um.subtract(new, np.array([False, False, True]))
    assert d.dtype == bool and d.tolist() == [True, False, True] and not np.shares_memory(d, new)


def test_subtract_keeps_0d_arrays_and_checks_shapes() -> None:
    for dtype in (np.float32, np.int64, np.uint8, bool):
        d = um.subtract(np.array(1, dtype), np.array(0, dtype))
        assert isinstance(d, np.ndarray) and d.shape == ()
    with pytest.raises(ValueError, match="shapes"):
        um.subtract(np.zeros(3), np.zeros(2))


# ------------------------------------------------------------------- add --
@pytest.mark.parametrize("dtype", INTS)
@pytest.mark.parametrize("lr", [1.0, 0.25])
def test_add_integers_saturates_at_every_width(dtype: type, lr: float) -> None:
    info = np.iinfo(dtype)
    bases = [int(info.min), int(info.min) + 1, 0, 7, int(info.max) - 1, int(info.max)]
    steps = [-(2**63), -1000, -1, 0, 1, 1000, 2**63 - 1]
    base = np.array([b for b in bases for _ in steps], dtype)
    step = np.array([s for _ in bases for s in steps], np.int64)
    got = um.add(base, step, lr)  # not scaled by lr: a counter advances by the steps taken
    assert got.dtype == dtype
    assert got.tolist() == [_clamp(int(b) + int(s), dtype) for b, s in zip(base, step)]


def test_add_a_uint8_decrease_below_zero_stays_at_zero() -> None:
    got = um.add(np.array([0, 3, 250], np.uint8), np.array([-1, -5, 10], np.int64))
    assert got.tolist() == [0, 0, 255]


def test_add_rounds_a_float_update_of_an_integer_tensor() -> None:
    base = np.array([10, 10, 10, 10], np.int32)
    assert um.add(base, np.array([2.5, 2.6, -0.4, 1e30])).tolist() == [12, 13, 10, 2**31 - 1]
    with pytest.raises(ValueError, match="NaN or infinity"):
        um.add(base, np.array([np.inf, 0.0, 0.0, 0.0]))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("lr", [1.0, 0.5, -1.25])
def test_add_floats_in_float32_rounded_once(dtype: type, lr: float) -> None:
    rng = np.random.default_rng(2)
    base = rng.standard_normal(64).astype(dtype)
    update = (rng.standard_normal(64) * 1e-3).astype(um.delta_dtype(dtype))
    got = um.add(base, update, lr)
    work = np.float64 if dtype == np.float64 else np.float32
    want = (base.astype(work) + work(lr) * update.astype(work)).astype(dtype)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, base)  # 1e-3 steps are not lost in float16 arithmetic


def test_add_float16_saturates_instead_of_overflowing() -> None:
    got = um.add(np.array([60000.0, -60000.0, 1.0], np.float16), np.array([1e4, -1e4, np.nan], np.float32))
    assert got[:2].tolist() == [65504.0, -65504.0] and np.isnan(got[2])


def test_add_float32_overflow_stays_visible() -> None:
    got = um.add(np.array([3e38], np.float32), np.array([3e38], np.float32))
    assert np.isinf(got).all()


def test_add_bool_takes_the_values_or_the_majority() -> None:
    base = np.array([True, True, False, False])
    assert um.add(base, np.array([False, True, True, False])).tolist() == [False, True, True, False]
    assert um.add(base, np.array([0.2, 0.5, 0.7, 1.0])).tolist() == [False, False, True, True]


def test_add_inverts_subtract_for_every_dtype() -> None:
    rng = np.random.default_rng(3)
    for dtype in INTS:
        info = np.iinfo(dtype)
        old = rng.integers(info.min // 2, info.max // 2, 100, dtype=dtype, endpoint=True)
        new = rng.integers(info.min // 2, info.max // 2, 100, dtype=dtype, endpoint=True)
        np.testing.assert_array_equal(um.add(old, um.subtract(new, old)), new, err_msg=str(dtype))
    for dtype in FLOATS:
        old, new = rng.standard_normal(100).astype(dtype), rng.standard_normal(100).astype(dtype)
        back = um.add(old, um.subtract(new, old))
        if dtype == np.float16:  # float32 arithmetic on halves, rounded once: exact
            np.testing.assert_array_equal(back, new)
        else:  # (a - b) + b is within an ulp of the larger magnitude
            bound = np.finfo(dtype).eps * np.maximum(np.abs(old), np.abs(new))
            assert (np.abs(back - new) <= bound).all(), dtype
    mask = rng.random(10) < 0.5
    np.testing.assert_array_equal(um.add(~mask, um.subtract(mask, ~mask)), mask)


@given(
    base=st.integers(-(2**63), 2**64 - 1),
    step=st.integers(-(2**63), 2**63 - 1),
    dtype=st.sampled_from(INTS),
)
def test_add_integers_is_clamped_exact_sum(base: int, step: int, dtype: type) -> None:
    b = np.array([_clamp(base, dtype)], dtype)
    assert um.add(b, np.array([step], np.int64)).tolist() == [_clamp(int(b[0]) + step, dtype)]


# ------------------------------------------------------ to_dtype and friends --
def test_to_dtype_saturates() -> None:
    assert um.to_dtype(np.array([300, -5, 7]), np.uint8).tolist() == [255, 0, 7]
    assert um.to_dtype(np.array([2.0**70, -(2.0**70)]), np.int64).tolist() == [2**63 - 1024, -(2**63)]
    assert um.to_dtype(np.array([2**64 - 1], np.uint64), np.int64).tolist() == [2**63 - 1]
    assert um.to_dtype(np.array([-1], np.int64), np.uint64).tolist() == [0]
    assert um.to_dtype(np.array([1e6, -1e6]), np.float16).tolist() == [65504.0, -65504.0]
    assert um.to_dtype(np.array([0.4, 0.6]), bool).tolist() == [False, True]
    assert um.to_dtype(np.array([1e39]), np.float32).tolist() == [np.inf]


def test_unchanged_and_scale() -> None:
    model = {"w": np.ones(3, np.float16), "n": np.array(4, np.uint8), "m": np.array([True, False])}
    zero = {k: um.unchanged(v) for k, v in model.items()}
    assert zero["w"].dtype == np.float32 and not zero["w"].any()
    assert zero["n"].dtype == np.int64 and int(zero["n"]) == 0
    assert zero["m"].tolist() == [True, False]
    assert all(np.array_equal(um.add(v, zero[k]), v) for k, v in model.items())
    assert um.scale(np.array([2.0], np.float32), 0.5).tolist() == [1.0]
    assert um.scale(np.array([3], np.int64), 0.5).tolist() == [3]  # a step count is not a magnitude
    assert um.scale(np.array([True]), 0.0).tolist() == [True]


# ----------------------------------------------------- every caller agrees --
def _mixed() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(5)
    old = {
        "f32": rng.standard_normal(6).astype(np.float32),
        "f16": (rng.standard_normal(6) * 1000).astype(np.float16),
        "f64": rng.standard_normal(6),
        "u8": np.array([0, 5, 255, 3], np.uint8),
        "i8": np.array([-128, 0, 127, 3], np.int8),
        "steps": np.array(10, np.int64),
        "mask": np.array([True, False, True]),
    }
    new = {
        "f32": rng.standard_normal(6).astype(np.float32),
        "f16": (rng.standard_normal(6) * -1000).astype(np.float16),
        "f64": rng.standard_normal(6),
        "u8": np.array([3, 5, 0, 255], np.uint8),
        "i8": np.array([127, -128, 0, 3], np.int8),
        "steps": np.array(13, np.int64),
        "mask": np.array([False, False, True]),
    }
    return old, new


def test_param_delta_is_subtract() -> None:
    old, new = _mixed()
    for k in old:
        got, want = loops.param_delta(new[k], old[k]), um.subtract(new[k], old[k])
        assert got.dtype == want.dtype and np.array_equal(got, want), k
    assert loops.param_delta(np.array([0], np.uint8), np.array([3], np.uint8)).tolist() == [-3]


def test_federation_model_uses_the_same_arithmetic() -> None:
    old, new = _mixed()
    update = {k: um.subtract(new[k], old[k]) for k in old}
    applied = M.apply_update(old, update, 0.5)
    for k in old:
        want = um.add(old[k], update[k], 0.5)
        assert applied[k].dtype == old[k].dtype and np.array_equal(applied[k], want), k
    # Integer updates are not scaled by the server's lr, so the counters land exactly.
    assert applied["u8"].tolist() == new["u8"].tolist() and int(applied["steps"]) == 13
    aligned = M.align_update({**update, "f16": update["f16"].astype(np.float64)}, old)
    assert M.table(aligned) == um.update_table(old)
    assert fp.inspect(M.zero_reference(old))["tensors"] == fp.inspect(fp.Codec("fp32").encode(aligned))["tensors"]


def test_an_aggregated_integer_mean_is_rounded_and_clamped_like_add() -> None:
    agg = fp.Aggregator()
    for value in (-3, -4):
        agg.add(fp.Codec("fp32").encode({"n": np.array([value], np.int64)}))
    mean = agg.result()["n"]
    assert mean.dtype == np.int64 and mean.tolist() == [-4]  # -3.5 rounds to even
    assert um.add(np.array([2], np.uint8), mean).tolist() == [0]


@pytest.mark.skipif(not HAS_FLWR, reason="needs flwr")
def test_flower_uses_the_same_arithmetic() -> None:
    from fedpress import flower

    old, new = _mixed()
    update = flower._subtract(new, old)
    for k in old:
        want = um.subtract(new[k], old[k])
        assert update[k].dtype == want.dtype and np.array_equal(update[k], want), k
    back = flower._add(old, update)
    for k in old:
        assert back[k].dtype == old[k].dtype and np.array_equal(back[k], um.add(old[k], update[k])), k


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_torch_adapter_uses_the_same_arithmetic() -> None:
    import fedpress.torch as fpt
    import torch

    old, new = _mixed()
    delta = fpt.state_delta({k: torch.from_numpy(v) for k, v in new.items()}, old)
    for k in old:
        want = um.subtract(new[k], old[k])
        assert delta[k].dtype == want.dtype and np.array_equal(delta[k], want), k

    class Buffers(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for k, v in old.items():
                self.register_buffer(k, torch.from_numpy(v.copy()))

    for lr in (1.0, 0.5):
        model = Buffers()
        step = {**delta, "u8": np.array([-1, -10, 1, 0], np.int64)}  # 0 - 1 and 5 - 10 stay at 0, 255 + 1 at 255
        fpt.apply_delta(model, step, lr=lr)
        for k, t in model.state_dict().items():
            want = um.add(old[k], step[k], lr)
            assert t.numpy().dtype == want.dtype and np.array_equal(t.numpy(), want), (k, lr)
        assert model.u8.tolist() == [0, 0, 255, 3]

    bf16 = torch.tensor([1.0, -2.0, 3.5]).to(torch.bfloat16)
    model = torch.nn.Module()
    model.register_buffer("b", bf16.clone())
    update = np.array([1e-2, 0.5, -1.0], np.float32)
    fpt.apply_delta(model, {"b": update})
    want = torch.from_numpy(um.add(bf16.float().numpy(), update)).to(torch.bfloat16)
    assert torch.equal(model.b, want)
