"""Local training and evaluation, and the closures a federation calls each round.

    train_fn = make_train_fn("digits", client_data, epochs=1, lr=0.1, seed=7)
    update, num_examples, metrics = train_fn(global_params, {"round": 3})
    evaluate_fn = make_evaluate_fn("digits", test_data)
    evaluate_fn(global_params)   # {"loss": ..., "accuracy": ..., "num_examples": ...}

torch is imported inside the functions; the torch thread count is left as it is.
"""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

import numpy as np

from .._seeds import PURPOSE_SHUFFLE, derive_seed
from .._update_math import subtract
from ._deps import require_torch
from .datasets import Dataset
from .mlp import MLP
from .models import get_params, make_model, set_params

if TYPE_CHECKING:
    import torch

__all__ = ["train_local", "evaluate", "make_train_fn", "make_evaluate_fn", "round_seed", "param_delta"]

TrainFn = Callable[..., "tuple[dict[str, np.ndarray], int, dict[str, Any]]"]
EvaluateFn = Callable[[Mapping[str, Any]], "dict[str, float]"]


def _tensor(arr: np.ndarray) -> torch.Tensor:
    """A CPU tensor over ``arr`` without a copy when it is writable (torch warns on
    read-only arrays, so those are copied)."""
    torch = require_torch()
    arr = np.ascontiguousarray(arr)
    return torch.from_numpy(arr) if arr.flags.writeable else torch.tensor(arr)


def _device(model: torch.nn.Module) -> Any:
    for p in model.parameters():
        return p.device
    return require_torch().device("cpu")


def train_local(
    model: torch.nn.Module,
    dataset: Dataset,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 0.05,
    momentum: float = 0.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Plain minibatch SGD with cross-entropy on ``dataset``, in place.

    The example order of every epoch comes from a torch.Generator seeded with
    ``seed`` (torch's global random state is restored afterwards), so the same
    call on the same model gives the same weights. Returns ``loss``: the mean
    training loss over the last epoch, ``num_examples``: len(dataset) (the FedAvg
    weight), and ``steps``: the number of SGD steps. A numpy
    ``MLP`` trains with the same rule in numpy."""
    epochs, batch_size = int(epochs), int(batch_size)
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not (math.isfinite(lr) and lr >= 0.0):
        raise ValueError(f"lr must be a non-negative number, got {lr}")
    n = len(dataset)
    if n == 0:
        raise ValueError("train_local: the data set is empty")
    if isinstance(model, MLP):
        return model.fit(
            dataset.x,
            dataset.y,
            epochs=epochs,
            batch_size=batch_size,
            lr=float(lr),
            momentum=float(momentum),
            seed=int(seed) % (1 << 63),
        )
    torch = require_torch()
    device = _device(model)
    x = _tensor(dataset.x).to(device)
    y = _tensor(dataset.y).to(device)
    generator = torch.Generator().manual_seed(int(seed) % (1 << 63))
    optimizer = torch.optim.SGD(model.parameters(), lr=float(lr), momentum=float(momentum))
    was_training = model.training
    model.train()
    steps = 0
    loss_sum = 0.0
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed) % (1 << 63))  # any dropout in a model is seeded too
            for _ in range(epochs):
                order = torch.randperm(n, generator=generator).to(device)
                loss_sum = 0.0
                for start in range(0, n, batch_size):
                    idx = order[start : start + batch_size]
                    optimizer.zero_grad(set_to_none=True)
                    loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
                    loss.backward()
                    optimizer.step()
                    loss_sum += float(loss.detach()) * int(idx.shape[0])
                    steps += 1
    finally:
        model.train(was_training)
    return {"loss": loss_sum / n, "num_examples": n, "steps": steps}


def evaluate(model: torch.nn.Module, dataset: Dataset, batch_size: int = 512) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy in [0, 1]) of ``model`` on ``dataset``."""
    n = len(dataset)
    if n == 0:
        raise ValueError("evaluate: the data set is empty")
    batch_size = max(int(batch_size), 1)
    if isinstance(model, MLP):
        return model.evaluate(dataset.x, dataset.y, batch_size)
    torch = require_torch()
    device = _device(model)
    x = _tensor(dataset.x)
    y = _tensor(dataset.y)
    was_training = model.training
    model.eval()
    loss_sum = 0.0
    correct = 0
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                xb = x[start : start + batch_size].to(device)
                yb = y[start : start + batch_size].to(device)
                logits = model(xb)
                loss_sum += float(torch.nn.functional.cross_entropy(logits, yb, reduction="sum"))
                correct += int((logits.argmax(dim=1) == yb).sum())
    finally:
        model.train(was_training)
    return loss_sum / n, correct / n


def round_seed(seed: int, round_number: int) -> int:
    """A seed mixing a base seed and a round number (a 63-bit integer), so each round
    of a client shuffles differently but reproducibly."""
    return derive_seed(seed, PURPOSE_SHUFFLE, round_number) >> 1


def param_delta(new: np.ndarray, old: Any) -> np.ndarray:
    """One tensor's update, ``new - old``: the float32 difference (float64 for float64
    tensors), the int64 difference for integer tensors (``old`` rounded; a decrease of a
    uint8 buffer is negative, never wrapped around), the new values for bool tensors."""
    return subtract(new, old)


def _build_model(task: Any, seed: int) -> torch.nn.Module:
    """A fresh model of ``task``: a built-in task's name, a ``Task``
    (its ``model_fn``) or a model factory ``seed -> torch.nn.Module``."""
    if isinstance(task, str):
        return make_model(task, seed=seed)
    model_fn = getattr(task, "model_fn", task)
    if not callable(model_fn):
        raise TypeError(
            f"task must be a task name, a fedpress.train.Task or a model factory, got {type(task).__name__}"
        )
    return model_fn(int(seed))


def make_train_fn(
    task: Any,
    dataset: Dataset,
    epochs: int = 1,
    lr: float = 0.05,
    batch_size: int = 32,
    momentum: float = 0.0,
    seed: int = 0,
) -> TrainFn:
    """``train_fn(global_params, config=None) -> (update, num_examples, metrics)``.

    ``task``: a built-in task's name, a ``Task`` or a model
    factory ``seed -> torch.nn.Module``.

    Loads ``global_params`` into a model built once (and kept), trains it with
    train_local on ``dataset`` and returns ``update`` = local params − global params
    (``param_delta``: float32 for floating tensors, int64 for integer tensors),
    ``num_examples`` = len(dataset) and ``metrics`` (``train_loss``, its alias
    ``loss``, ``num_examples``, ``epochs``, ``lr``, ``steps``, ``seed``), all plain
    Python numbers.

    ``config`` may override ``epochs``, ``lr``, ``batch_size``, ``momentum`` and
    ``seed``; a ``round`` entry is mixed into the seed (round_seed), so each round
    shuffles differently. Calls are serialised by a lock.
    """
    model = _build_model(task, seed)
    lock = threading.Lock()
    # Each value is cast to its own type below (int or float): Any, not their join (float).
    defaults: dict[str, Any] = {
        "epochs": int(epochs),
        "lr": float(lr),
        "batch_size": int(batch_size),
        "momentum": float(momentum),
        "seed": int(seed),
    }

    def train_fn(
        global_params: Mapping[str, Any], config: Optional[Mapping[str, Any]] = None
    ) -> tuple[dict[str, np.ndarray], int, dict[str, Any]]:
        cfg = dict(defaults)
        config = dict(config or {})
        for key, cast in (("epochs", int), ("lr", float), ("batch_size", int), ("momentum", float), ("seed", int)):
            if config.get(key) is not None:
                cfg[key] = cast(config[key])
        run_seed = cfg["seed"]
        if config.get("round") is not None:
            run_seed = round_seed(run_seed, int(config["round"]))
        with lock:
            set_params(model, global_params)
            stats = train_local(
                model,
                dataset,
                epochs=cfg["epochs"],
                batch_size=cfg["batch_size"],
                lr=cfg["lr"],
                momentum=cfg["momentum"],
                seed=run_seed,
            )
            local = get_params(model)
        update = {name: param_delta(value, global_params[name]) for name, value in local.items()}
        metrics = {
            "train_loss": float(stats["loss"]),
            "loss": float(stats["loss"]),
            "num_examples": int(stats["num_examples"]),
            "epochs": cfg["epochs"],
            "lr": cfg["lr"],
            "steps": int(stats["steps"]),
            "seed": int(run_seed),
        }
        return update, int(stats["num_examples"]), metrics

    return train_fn


def make_evaluate_fn(task: Any, test_dataset: Dataset, batch_size: int = 512) -> EvaluateFn:
    """``evaluate_fn(params) -> {"loss", "accuracy", "num_examples"}`` on ``test_dataset``,
    with one model built once and reused (calls serialised by a lock); ``task`` as for
    ``make_train_fn``."""
    model = _build_model(task, 0)
    lock = threading.Lock()

    def evaluate_fn(params: Mapping[str, Any]) -> dict[str, float]:
        with lock:
            set_params(model, params)
            loss, accuracy = evaluate(model, test_dataset, batch_size=batch_size)
        return {"loss": float(loss), "accuracy": float(accuracy), "num_examples": len(test_dataset)}

    return evaluate_fn
