"""The plain-PyTorch adapter: a model's update as numpy arrays, and an update back into a model.

    import fedpress as fp
    from fedpress.torch import apply_delta, state_delta

    payload = encoder.encode(state_delta(local_model, global_model))   # client, after training
    agg.add(payload, weight=num_examples)                               # server, per client
    apply_delta(global_model, agg.result())                             # server, once per round

``state_delta(model_or_state, reference) -> dict[str, np.ndarray]``
    ``current - reference`` for every tensor of a state_dict. Either argument is an
    ``nn.Module`` (its ``state_dict()``: parameters and persistent buffers) or a mapping of
    names to tensors or numpy arrays; both must hold the same names and shapes.

``apply_delta(model, delta, lr=1.0) -> None``
    Adds ``lr * delta`` to the module's state_dict tensors in place, under ``torch.no_grad()``.
    ``delta`` maps names to numpy arrays or tensors (``fp.decode``, ``Aggregator.result()``, or
    ``state_delta``'s output); a name it lacks is left unchanged (a zero delta).

What a delta holds, by the dtype of the model's tensor:

* float32, float16, bfloat16: the float32 difference. Half-precision differences are taken in
  float32, where the difference of two halves loses far less and cannot overflow; the codec
  compresses float32 values in any case.
* float64: the float64 difference (a float32 difference would drop the low bits of the update).
* integer (e.g. BatchNorm's ``num_batches_tracked``): the int64 difference, so a decrease of an
  unsigned buffer does not wrap around; the codec sends it losslessly.
* bool: the current values themselves, not a difference; ``fedpress.Aggregator`` turns
  them into the weighted majority and ``apply_delta`` assigns them.

``apply_delta`` mirrors this: floats get ``lr * delta`` (float16/bfloat16 tensors are updated in
float32 and rounded once); integer buffers get the delta rounded to the nearest integer and not
scaled by ``lr`` (a step counter advances by the steps taken, as in ``fedpress.federation``),
clamped to the buffer's range rather than wrapping around (a uint8 at 0 given -1 stays 0);
bool buffers take the delta's values. This is the arithmetic ``fedpress.federation`` and
``fedpress.flower`` use too. Every entry is checked (names, shapes, dtypes, finite values)
before any tensor changes. Names aliasing one tensor (tied weights) update it once.

Contiguous CPU tensors and numpy arrays are read through views, never copied (bfloat16 is
converted to float32, non-contiguous tensors are made contiguous); CUDA tensors are copied to the
host. Importing this module imports torch; ``import fedpress`` alone never does.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, Union

import numpy as np
import torch  # absolute: the real torch, not this module

from . import _update_math
from ._arrays import to_numpy

__all__ = ["state_delta", "apply_delta"]

StateLike = Union[torch.nn.Module, Mapping[str, Any]]

_KINDS = {"f": "floating", "i": "integer", "u": "integer", "b": "bool"}


def _state(value: Any, role: str) -> Mapping[str, Any]:
    if isinstance(value, torch.nn.Module):
        return value.state_dict()
    if isinstance(value, Mapping):
        return value
    raise TypeError(f"{role} must be an nn.Module or a mapping of names to tensors, got {type(value).__name__}")


def _as_numpy(name: str, value: Any, role: str) -> tuple[np.ndarray, str]:
    """(numpy array, dtype name) of one tensor: a view of a CPU tensor or array when
    it is contiguous, bfloat16 as float32 data."""
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise TypeError(f"{role} tensor {name!r} has layout {value.layout}; only dense tensors are supported")
    elif not isinstance(value, (np.ndarray, np.generic)):
        raise TypeError(f"{role} entry {name!r} is a {type(value).__name__}; expected a torch.Tensor or a numpy array")
    try:
        arr, dtype = to_numpy(name, value)
    except TypeError:  # dtypes numpy lacks (torch's float8, quantized) or refuses (str, object)
        arr, dtype = None, str(value.dtype).replace("torch.", "")
    if arr is None or arr.dtype.kind not in _KINDS:
        raise TypeError(
            f"{role} tensor {name!r} has unsupported dtype {dtype}; expected a floating, integer or bool tensor"
        )
    return arr, dtype


def _host_tensor(arr: np.ndarray) -> torch.Tensor:
    """A CPU tensor over ``arr``, copied only when torch cannot share it (read-only,
    non-native byte order, negative strides); unlike np.ascontiguousarray it keeps 0-d shapes."""
    native = arr.dtype.newbyteorder("=")
    return torch.from_numpy(np.require(arr, dtype=native, requirements=["C", "W"]))


def state_delta(model_or_state: StateLike, reference: StateLike) -> dict[str, np.ndarray]:
    """``current - reference`` per tensor as numpy arrays, in the current state's order.

    ``model_or_state`` and ``reference`` are each an ``nn.Module`` or a mapping of names to
    tensors / numpy arrays (e.g. the global state a client received). Floating tensors give
    float32 differences (float64 for float64 tensors), integer tensors int64 differences, bool
    tensors their current values (see the module docstring). Neither input is modified.

    Raises ValueError when the names or shapes differ and TypeError for a value that is not a
    floating, integer or bool tensor, or whose reference is of another kind.
    """
    current = _state(model_or_state, "model_or_state")
    base = _state(reference, "reference")
    missing = [k for k in current if k not in base]
    extra = [k for k in base if k not in current]
    if missing or extra:
        raise ValueError(
            "state_delta: the model and the reference hold different tensors; missing "
            f"from the reference: {missing}; not in the model: {extra}"
        )
    delta: dict[str, np.ndarray] = {}
    for name, value in current.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be strings, got {type(name).__name__}")
        now, now_dtype = _as_numpy(name, value, "model")
        then, then_dtype = _as_numpy(name, base[name], "reference")
        if now.shape != then.shape:
            raise ValueError(
                f"state_delta: tensor {name!r} has shape {tuple(now.shape)} in the "
                f"model but {tuple(then.shape)} in the reference"
            )
        if _KINDS[now.dtype.kind] != _KINDS[then.dtype.kind]:
            raise TypeError(
                f"state_delta: tensor {name!r} is {now_dtype} in the model but {then_dtype} in the reference"
            )
        # A new array (bool values copied too): the delta must not change when the model trains on.
        delta[name] = _update_math.subtract(now, then)
    return delta


def _check_lr(lr: Any) -> float:
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"lr must be a real number, got {type(lr).__name__}")
    if not math.isfinite(float(lr)):
        raise ValueError(f"lr must be finite, got {lr!r}")
    return float(lr)


def _alias_key(t: torch.Tensor) -> tuple:
    """Equal for two names of one tensor (tied weights), so it is updated once."""
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def apply_delta(model: torch.nn.Module, delta: Mapping[str, Any], lr: float = 1.0) -> None:
    """Adds ``lr * delta`` to ``model``'s parameters and buffers in place.

    ``delta`` maps state_dict names to numpy arrays or tensors of the same shapes; names it
    does not list are left unchanged. Floating tensors get ``lr * delta``; integer buffers get
    the delta rounded to an integer, not scaled by ``lr``; bool buffers take the delta's values
    (see the module docstring). Everything is validated first: an unknown name, a wrong shape,
    a non-finite value (ValueError) or an unusable dtype (TypeError) leaves the model unchanged.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(delta, Mapping):
        raise TypeError(f"delta must be a mapping of names to tensors, got {type(delta).__name__}")
    lr = _check_lr(lr)
    state = model.state_dict()
    unknown = [k for k in delta if k not in state]
    if unknown:
        raise ValueError(f"apply_delta: delta holds tensors the model does not have: {unknown}")
    updates: list[tuple[torch.Tensor, np.ndarray]] = []
    seen: set[tuple] = set()
    for name, target in state.items():
        if name not in delta:
            continue
        arr, dtype = _as_numpy(name, delta[name], "delta")
        if tuple(arr.shape) != tuple(target.shape):
            raise ValueError(
                f"apply_delta: delta for {name!r} has shape {tuple(arr.shape)}, the "
                f"model's tensor {tuple(target.shape)}"
            )
        if target.dtype == torch.bool:
            if arr.dtype.kind != "b":
                raise TypeError(
                    f"apply_delta: {name!r} is a bool buffer; its delta must hold bool "
                    f"values (the new state), got {dtype}"
                )
        elif arr.dtype.kind == "b":
            raise TypeError(
                f"apply_delta: delta for {name!r} is bool but the model's tensor is "
                f"{str(target.dtype).replace('torch.', '')}"
            )
        elif arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ValueError(f"apply_delta: delta for {name!r} holds NaN or infinity")
        key = _alias_key(target)
        if key in seen:
            continue
        seen.add(key)
        updates.append((target, arr))
    with torch.no_grad():
        for target, arr in updates:
            # The sum is formed on the host by the arithmetic every fedpress caller shares (a
            # bfloat16 tensor in float32, rounded once as it is copied back).
            current, _ = to_numpy("", target)
            target.copy_(_host_tensor(_update_math.add(current, arr, lr)))
