"""The models of the training tasks, and parameters as dicts of numpy arrays.

torch is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from .._arrays import to_numpy
from .._update_math import to_dtype
from ._deps import require_torch
from .mlp import MLP

if TYPE_CHECKING:
    import torch

__all__ = ["make_model", "get_params", "set_params", "init_params"]


def _build(task: str) -> torch.nn.Module:
    nn = require_torch().nn
    if task == "digits":  # (N, 1, 8, 8) -> 64 -> 64 -> 10
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    if task == "mnist":  # (N, 1, 28, 28) -> 16x12x12 -> 32x4x4 -> 384 -> 10: 214,090 parameters
        return nn.Sequential(
            nn.Conv2d(1, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 384),
            nn.ReLU(),
            nn.Linear(384, 10),
        )
    raise ValueError(f"unknown task {task!r}; choose one of digits, mnist")


def make_model(task: str, seed: int = 0) -> torch.nn.Module:
    """The model of ``task`` (``"digits"``: an MLP 64-64-10 on (N, 1, 8, 8);
    ``"mnist"``: a CNN of 214k parameters on (N, 1, 28, 28), most of them in its
    hidden dense layer, so it trains fast on a CPU), its initial weights a function of
    ``seed`` only. torch's global random state is left untouched."""
    torch = require_torch()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return _build(str(task).lower())


def get_params(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The model's state_dict as numpy copies, in state_dict order: floating
    tensors as float32, integer tensors (e.g. BatchNorm counters) keep their dtype.
    A numpy ``MLP`` gives its parameters."""
    if isinstance(model, MLP):
        return model.get_params()
    torch = require_torch()
    out: dict[str, np.ndarray] = {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu()
        if t.is_floating_point():
            t = t.to(torch.float32)
        out[name] = t.numpy().copy()
    return out


def init_params(task: str, seed: int = 0) -> dict[str, np.ndarray]:
    """get_params(make_model(task, seed)): a task's initial global parameters."""
    return get_params(make_model(task, seed))


def set_params(model: torch.nn.Module, params: Mapping[str, Any]) -> None:
    """Copy ``params`` (name -> numpy array or tensor) into the model, in place.

    The names must be exactly the state_dict's and every shape must match. Each value
    goes into its tensor's own dtype as an update would (``fedpress._update_math``):
    into integers rounded and clamped to the dtype's range (a uint8 given -1 is 0, not
    255), into bools True above 0.5, floats at their own precision (bfloat16 tensors
    and arrays accepted). Otherwise (a NaN for an integer tensor, a non-numeric value)
    ValueError lists every difference and the model is left unchanged."""
    if isinstance(model, MLP):
        model.set_params(params)
        return
    torch = require_torch()
    state = model.state_dict()
    missing = [k for k in state if k not in params]
    unexpected = [k for k in params if k not in state]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if unexpected:
            parts.append(f"unexpected {unexpected}")
        raise ValueError("set_params: parameter names do not match the model: " + "; ".join(parts))
    converted = {}
    bad = []
    for name, target in state.items():
        try:
            arr, _ = to_numpy(name, params[name])  # torch (bfloat16 too), numpy or nested lists
        except TypeError as exc:
            bad.append(f"{name}: {exc}")
            continue
        if tuple(arr.shape) != tuple(target.shape):
            bad.append(f"{name}: got {tuple(arr.shape)}, model has {tuple(target.shape)}")
            continue
        # Into the tensor's own dtype as every update is converted (_update_math.to_dtype):
        # integers and bools saturate and round, NaN into an integer is refused, floats
        # keep their precision (a float64 buffer is not rounded through float32).
        staged = np.float32 if target.dtype == torch.bfloat16 else str(target.dtype).replace("torch.", "", 1)
        try:
            arr = np.array(to_dtype(arr, staged), copy=True)
        except (TypeError, ValueError) as exc:
            bad.append(f"{name}: {exc}")
            continue
        converted[name] = torch.from_numpy(arr)
    if bad:
        raise ValueError("set_params: " + "; ".join(bad))
    with torch.no_grad():
        for name, target in state.items():
            target.copy_(converted[name].to(dtype=target.dtype, device=target.device))
