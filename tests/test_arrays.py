"""fedpress._arrays: the tensor conversions every module shares."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from fedpress import _arrays

HAS_TORCH = importlib.util.find_spec("torch") is not None


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int8, np.uint8, np.int64, np.bool_])
def test_to_numpy_views_an_array_and_names_its_dtype(dtype: type) -> None:
    x = np.zeros((3, 2), dtype)
    arr, name = _arrays.to_numpy("x", x)
    assert arr is x and name == np.dtype(dtype).name


@pytest.mark.parametrize("value", [np.zeros(2, np.complex64), np.array(["a"]), np.zeros(2, np.longdouble)])
def test_to_numpy_refuses_what_no_payload_holds(value: np.ndarray) -> None:
    if value.dtype.itemsize <= 8 and value.dtype.kind == "f":
        pytest.skip("long double is float64 on this platform")
    with pytest.raises(TypeError, match="tensor 'x' has unsupported dtype"):
        _arrays.to_numpy("x", value)


def test_as_float32_is_flat_and_copies_only_when_it_must() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    flat = _arrays.as_float32(x, "x")
    assert flat.shape == (6,) and np.shares_memory(flat, x)
    assert _arrays.as_float32(x.astype(np.float64), "x").dtype == np.float32
    with pytest.raises(TypeError, match="x must be a floating-point array, got dtype int64"):
        _arrays.as_float32(np.zeros(3, np.int64), "x")
    assert not _arrays.is_torch_tensor(x) and _arrays.MAX_ELEMENTS == 2**32 - 1


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_torch_tensors() -> None:
    import torch

    t = torch.arange(4, dtype=torch.float32)
    arr, name = _arrays.to_numpy("t", t)
    assert name == "float32" and np.shares_memory(arr, t.numpy()) and _arrays.is_torch_tensor(t)
    arr, name = _arrays.to_numpy("b", t.to(torch.bfloat16))
    assert name == "bfloat16" and arr.dtype == np.float32 and arr.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert _arrays.to_numpy("n", torch.tensor(3))[1] == "int64"
    assert _arrays.as_float32(t.to(torch.float16).reshape(2, 2), "t").tolist() == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(TypeError, match="t must be a floating-point tensor"):
        _arrays.as_float32(torch.zeros(2, dtype=torch.int32), "t")
