"""Update arithmetic by dtype: a tensor's update (``new - old``) and an update applied
back (``base + lr * update``), written once for every caller: the torch adapter, the
Flower mod and strategy, the federation's model, the training loops and the
aggregator's integer and bool means.

What an update holds, by the dtype of the tensor (``delta_dtype``):

* float32, float16, bfloat16: the float32 difference. Half-precision differences are
  taken in float32, where the difference of two halves is exact or nearly so and
  cannot overflow; the codec compresses float32 values in any case.
* float64: the float64 difference (float32 would drop the low bits of the update).
* integer, signed or not, any width (BatchNorm's ``num_batches_tracked``, a uint8
  buffer): the int64 difference, so a uint8 that goes from 3 to 0 gives -3, never 253.
* bool: the new values themselves (a difference of bools means nothing); the
  aggregator takes the weighted majority.

Applying an update (``add``) gives the base's dtype back:

* floats: ``base + lr * update`` computed in float32 (float64 for float64 tensors) and
  rounded once, so a 1e-3 step is not lost in float16 arithmetic;
* integers: the update rounded to the nearest integer (a mean of step counts is not an
  integer) and added exactly, not scaled by ``lr``: a step counter advances by the
  steps taken, whatever the server's learning rate;
* bool: the update's values (a numeric update, a mean of votes, is True above 0.5).

Out of range, every conversion saturates (``to_dtype``): an integer result beyond its
dtype is the dtype's nearest end (an int64 difference too, which only 64-bit values
near their extremes can exceed), and float16 stops at +-65504 (as ``fedpress.decode``
does). Why saturate: a buffer that leaves its range has no right answer, and the
nearest representable value is the least wrong one: a uint8 at 0 that receives -1
stays 0 and a counter at its maximum stays there, where wrap-around would turn the
smallest error into the largest (0 - 1 = 255), and raising would fail a whole round
of a federation over one buffer. float32 and float64 results that overflow become
infinite instead, so that a diverging model is seen (the server checks every update
for finiteness); float16's range is small enough for real updates to reach it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

__all__ = ["is_floating", "delta_dtype", "update_table", "to_dtype", "subtract", "add", "unchanged", "scale"]

_FLOAT16_MAX = 65504.0
_INT64 = np.iinfo(np.int64)


def is_floating(dtype: DTypeLike) -> bool:
    """Whether tensors of ``dtype`` take float updates: numpy's floats and ml_dtypes'
    bfloat16 (whose kind is "V", not "f")."""
    dt = np.dtype(dtype)
    return dt.kind == "f" or dt.name == "bfloat16"


def delta_dtype(dtype: DTypeLike) -> np.dtype:
    """The dtype of the update of a tensor of ``dtype`` (see the module docstring);
    TypeError for a dtype that is neither floating, integer nor bool."""
    dt = np.dtype(dtype)
    if dt.kind == "b":
        return np.dtype(np.bool_)
    if dt.kind in "iu":
        return np.dtype(np.int64)
    if dt == np.float64:
        return dt
    if is_floating(dt):
        return np.dtype(np.float32)
    raise TypeError(f"no update arithmetic for dtype {dt}; expected a floating, integer or bool dtype")


def update_table(model: Mapping[str, Any]) -> list[tuple[str, str, tuple[int, ...]]]:
    """The tensor table (name, dtype name, shape) of an update of ``model`` (arrays):
    what a payload of that update holds, and what a receiver decodes it with."""
    return [(name, delta_dtype(value.dtype).name, tuple(value.shape)) for name, value in model.items()]


def to_dtype(values: Any, dtype: DTypeLike) -> np.ndarray:
    """``values`` in ``dtype``, saturating instead of wrapping around: floats into an
    integer dtype are rounded to the nearest integer and clamped to its range (ValueError
    for NaN or infinity), integers are clamped, numbers into bool are True above 0.5,
    anything into float16 stops at +-65504. May return ``values`` itself when it is
    already an array of ``dtype``."""
    target = np.dtype(dtype)
    arr = np.asarray(values)
    if target.kind == "b":
        return arr.astype(np.bool_, copy=False) if arr.dtype.kind == "b" else np.asarray(arr > 0.5)
    if target.kind in "iu":
        info = np.iinfo(target)
        if arr.dtype.kind == "f":
            if not np.isfinite(arr).all():
                raise ValueError(f"NaN or infinity has no value as {target}")
            # float64 rounds the ends of a 64-bit range outward (2**63 - 1 becomes 2**63):
            # clamp to the largest float64 inside it.
            high = float(np.nextafter(np.float64(info.max), -np.inf)) if info.max > 2**53 else info.max
            return np.asarray(np.clip(np.rint(arr.astype(np.float64)), info.min, high)).astype(target)
        if arr.dtype.kind not in "iub":
            raise TypeError(f"cannot convert {arr.dtype} values to {target}")
        if np.can_cast(arr.dtype, target, "safe"):
            return arr.astype(target, copy=False)
        source = np.iinfo(arr.dtype)
        return np.asarray(np.clip(arr, max(info.min, source.min), min(info.max, source.max))).astype(target)
    if target.kind == "f" or target.name == "bfloat16":
        if target == np.float16:
            arr = np.clip(arr, -_FLOAT16_MAX, _FLOAT16_MAX)  # NaN stays NaN
        with np.errstate(over="ignore"):  # an infinity is the answer: overflow is not an error here
            return np.asarray(arr.astype(target, copy=False))
    raise TypeError(f"no update arithmetic for dtype {target}; expected a floating, integer or bool dtype")


def _check_shapes(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes {a.shape} and {b.shape} differ")


def subtract(new: Any, old: Any) -> np.ndarray:
    """The update that takes a tensor from ``old`` to ``new`` (arrays of one shape), in
    ``delta_dtype(new.dtype)``: the float difference, the int64 difference (a float
    ``old`` rounded to the nearest integer first), or ``new``'s values for bool. A new
    array, never a view of either input."""
    now, then = np.asarray(new), np.asarray(old)
    _check_shapes(now, then, "subtract")
    work = delta_dtype(now.dtype)
    if work.kind == "b":
        return np.array(now, dtype=np.bool_, copy=True)
    if work.kind == "f":
        # out= keeps 0-d results arrays (a bare ufunc returns a numpy scalar for them).
        return np.subtract(now, then, out=np.empty(now.shape, work), dtype=work)
    a, b = to_dtype(now, np.int64), to_dtype(then, np.int64)
    with np.errstate(over="ignore"):
        d = np.subtract(a, b, out=np.empty(a.shape, np.int64))
    # Overflow iff a and b have opposite signs and d's sign is not a's: saturate toward a's side.
    overflow = ((a ^ b) & (a ^ d)) < 0
    np.copyto(d, np.where(a >= 0, _INT64.max, _INT64.min), where=overflow)
    return d


def _saturating_add(base: np.ndarray, step: np.ndarray) -> np.ndarray:
    """``base + step`` (int64) in base's integer dtype, clamped to its range. Exact for
    every width: the sum is formed in uint64 two's complement, where the room left above
    and below each value is a non-negative number that always fits."""
    info = np.iinfo(base.dtype)
    top, bottom = np.uint64(info.max), np.uint64(info.min % 2**64)
    with np.errstate(over="ignore"):
        u = base.reshape(-1).astype(np.uint64)
        s = step.reshape(-1)
        rise = s.astype(np.uint64)  # the step where it is >= 0
        fall = np.uint64(0) - rise  # -step where it is < 0 (2**63 for int64's minimum)
        up = np.where(rise > top - u, top, u + rise)
        down = np.where(fall > u - bottom, bottom, u - fall)
        out = np.where(s >= 0, up, down)
    return out.astype(base.dtype).reshape(base.shape)


def add(base: Any, update: Any, lr: float = 1.0) -> np.ndarray:
    """``base + lr * update`` as a new array in ``base``'s dtype (the module docstring
    says how for each dtype: floats in float32 or float64 and rounded once, integers by
    the rounded update and not scaled by ``lr``, bool by the update's values; integer
    results saturate). Raises ValueError for shapes that differ or a non-finite update of
    an integer tensor; float updates are not checked (callers check what they receive)."""
    b, u = np.asarray(base), np.asarray(update)
    _check_shapes(b, u, "add")
    work = delta_dtype(b.dtype)
    if work.kind == "b":
        return np.array(to_dtype(u, np.bool_), copy=True)
    if work.kind in "iu":
        return _saturating_add(b, to_dtype(u, np.int64))
    with np.errstate(over="ignore"):  # an overflow gives infinity, which callers check for
        out = np.array(u, dtype=work, copy=True)
        if lr != 1.0:
            out *= work.type(lr)
        np.add(out, b, out=out)
    return to_dtype(out, b.dtype)


def unchanged(base: Any) -> np.ndarray:
    """The update that leaves a tensor as it is: zeros in its delta dtype, or for a bool
    tensor its own values."""
    b = np.asarray(base)
    work = delta_dtype(b.dtype)
    return np.array(b, copy=True) if work.kind == "b" else np.zeros(b.shape, work)


def scale(update: Any, factor: float) -> np.ndarray:
    """An update multiplied by ``factor`` (a clipping or weighting ratio): float tensors
    in their own dtype; integer and bool updates unchanged, as ``add`` does not scale them
    by ``lr`` either (a step count and a vote are not magnitudes)."""
    u = np.asarray(update)
    if u.dtype.kind != "f":
        return u
    return np.asarray(u * u.dtype.type(factor))
