"""Array conversion: what every module turns a tensor into before it reads it.

A tensor reaches fedpress as a numpy array, a torch tensor (CPU or not) or anything
``np.asarray`` accepts. Two conversions cover every caller:

* ``to_numpy(name, value)``: the tensor as a numpy array in its own dtype, and the
  dtype name a payload records for it (the codec, the encoder, the torch adapter and
  the federation's model all read tensors this way). Contiguous CPU tensors and
  arrays are viewed, not copied; bfloat16, which numpy lacks, becomes float32 data
  named ``"bfloat16"``.
* ``as_float32(x, name)``: a floating tensor as the flat C-contiguous float32 array
  the kernels take, without a copy when it already is one.

torch is never imported here: a torch tensor is recognised by its type's module, so
``import fedpress`` stays free of torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["MAX_ELEMENTS", "is_torch_tensor", "torch_to_numpy", "as_float32", "to_numpy", "flat_views"]

#: The most elements one kernel call takes (lengths and indices are uint32).
MAX_ELEMENTS = 2**32 - 1


def is_torch_tensor(x: object) -> bool:
    """Whether ``x`` is a torch tensor (checked without importing torch)."""
    t = type(x)
    return t.__module__.split(".", 1)[0] == "torch" and hasattr(x, "detach")


def torch_to_numpy(x: Any, name: str, want_float32: bool) -> np.ndarray:
    """A torch tensor as a C-contiguous numpy array on the host (float32 with
    ``want_float32``, which only floating tensors accept)."""
    t = x.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if want_float32:
        if not (t.is_floating_point()):
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        t = t.float()
    return t.contiguous().numpy()


_FLOAT32 = np.dtype(np.float32)


def as_float32(x: Any, name: str) -> np.ndarray:
    """x as a 1-D C-contiguous float32 array, without a copy when it already is one."""
    if type(x) is np.ndarray and x.dtype == _FLOAT32 and x.flags.c_contiguous and x.size <= MAX_ELEMENTS:
        return x if x.ndim == 1 else x.reshape(-1)  # the common case, called several times per tensor
    if is_torch_tensor(x):
        arr = torch_to_numpy(x, name, want_float32=True)
    else:
        arr = np.asarray(x)
        if arr.dtype.name == "bfloat16":  # ml_dtypes' bfloat16
            arr = arr.astype(np.float32)
        elif arr.dtype.kind != "f":
            raise TypeError(f"{name} must be a floating-point array, got dtype {arr.dtype}")
    with np.errstate(over="ignore"):  # float64 beyond float32 becomes inf; kernels report it
        arr = np.ascontiguousarray(arr, dtype=np.float32).reshape(-1)
    if arr.size > MAX_ELEMENTS:
        raise ValueError(f"{name} has {arr.size} elements; at most 2**32 - 1 are supported")
    return arr


def to_numpy(name: str, value: Any) -> tuple[np.ndarray, str]:
    """The tensor as a numpy array and the dtype name a payload's table records for it
    (numpy's name, torch's without ``torch.``; bfloat16 becomes float32 data).
    TypeError for a dtype no payload can hold."""
    if type(value) is np.ndarray:  # the common case, twice per tensor per encode: no torch check
        known = _DTYPE_NAMES.get(value.dtype)
        if known is not None:
            return value, known
    if is_torch_tensor(value):
        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        dtype = str(t.dtype).replace("torch.", "", 1)
        if dtype == "bfloat16":
            return t.float().contiguous().numpy(), "bfloat16"
        return t.contiguous().numpy(), dtype
    arr = np.asarray(value)
    known = _DTYPE_NAMES.get(arr.dtype)
    if known is not None:
        return arr, known
    if arr.dtype.name == "bfloat16":
        return arr.astype(np.float32), "bfloat16"
    if arr.dtype.kind not in "fiub" or arr.dtype.itemsize > 8:
        raise TypeError(f"tensor {name!r} has unsupported dtype {arr.dtype}")
    return arr, arr.dtype.name


# numpy's dtype.name is computed on every read: the usual dtypes' names, looked up.
_DTYPE_NAMES = {
    np.dtype(t): np.dtype(t).name
    for t in (np.float32, np.float64, np.float16, np.int8, np.int16, np.int32, np.int64, np.uint8, np.bool_)
}


def flat_views(sizes: Sequence[int], dtype: Any, make: Callable[..., np.ndarray] = np.zeros) -> list[np.ndarray]:
    """One array of ``make(sum(sizes), dtype)`` cut into consecutive 1-D views of these
    sizes: a model's tensors allocated at once. An allocation per tensor costs, for the
    mid-sized ones the allocator neither keeps between calls nor backs with huge pages, a
    page fault per 4 KiB: decoding a 160-tensor model spent more in them than in its kernels."""
    buf = make(sum(sizes), dtype)
    views, at = [], 0
    for n in sizes:
        views.append(buf[at : at + n])
        at += n
    return views
