"""What a federation trains: a model factory and the train and test data.

One contract for ``fedpress server``, ``client``, ``demo`` and ``sweep``: ``--task``
is ``digits``, ``mnist`` or ``module:function``, a function taking no arguments that
returns a ``Task``::

    # mytask.py (on PYTHONPATH, or in the directory you run fedpress from)
    import torch
    from fedpress.train import Task

    def make_model(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(20, 2))

    def build():
        x, y = ...                                    # float inputs, int64 labels 0..C-1
        return Task("mine", model_fn=make_model, train=(x[:800], y[:800]), test=(x[800:], y[800:]))

    fedpress server --task mytask:build ...   # the initial model: make_model(--seed)
    fedpress client --task mytask:build --partition 3/10 ...

The server evaluates on ``test`` and never trains; each client trains on its
``--partition`` of ``train`` (IID, Dirichlet or shards), with minibatch SGD and
cross-entropy, so ``model_fn(seed)`` must map a batch of ``train.x`` to class
logits. The function is called once per process, so it should be cheap and
deterministic (the same data on every machine).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from .datasets import Dataset, load_task
from .mlp import digits_mlp
from .models import make_model

__all__ = ["Task", "builtin_task", "resolve_task", "BUILTIN_TASKS"]

BUILTIN_TASKS = ("digits", "mnist")


@dataclass
class Task:
    """A model factory and the train and test data.

    ``model_fn(seed)`` returns a fresh ``torch.nn.Module`` (or a numpy
    ``MLP``) whose initial weights are a function of ``seed``;
    it maps a batch of ``train.x`` to class logits (trained with cross-entropy).
    ``train`` and ``test`` are ``fedpress.train.Dataset``
    or ``(x, y)`` pairs of arrays (``y``: integer labels 0..C-1). For a sweep with
    ``jobs > 1`` the task is sent to worker processes, so ``model_fn`` must be a
    module-level function (picklable).
    """

    name: str
    model_fn: Callable[[int], Any]
    train: Any
    test: Any
    num_classes: Optional[int] = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.train = _as_data(self.train, "train", self.num_classes)
        self.test = _as_data(self.test, "test", self.num_classes)
        if not callable(self.model_fn):
            raise TypeError("model_fn must be callable: seed -> torch.nn.Module")


class _Data:
    """Arrays a task trains on (any input shape; integer labels)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, name: str) -> None:
        self.x, self.y, self.name = x, y, name

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, idx: np.ndarray) -> _Data:
        return _Data(self.x[idx], self.y[idx], self.name)


def _as_data(data: Any, what: str, num_classes: Optional[int]) -> Any:
    if isinstance(data, (Dataset, _Data)):
        return data
    if isinstance(data, Sequence) and len(data) == 2:
        x, y = (np.asarray(getattr(a, "numpy", lambda a=a: a)()) for a in data)
        if x.shape[:1] != y.shape or y.ndim != 1 or not x.shape[0]:
            raise ValueError(f"{what} data: x has shape {x.shape}, y {y.shape}; need N > 0 examples in both")
        if y.dtype.kind not in "iu" or y.min() < 0 or (num_classes is not None and y.max() >= num_classes):
            raise ValueError(f"{what} data: labels must be integers in 0..C-1")
        return _Data(np.ascontiguousarray(x, dtype=np.float32), y.astype(np.int64), what)
    raise TypeError(
        f"{what} data must be a fedpress.train.Dataset or an (x, y) pair of arrays, got {type(data).__name__}"
    )


class _BuiltinModel:
    """``make_model(task, seed)`` as a picklable callable (sent to worker processes)."""

    def __init__(self, task: str) -> None:
        self.task = task

    def __call__(self, seed: int) -> Any:
        return make_model(self.task, seed=seed)


def builtin_task(name: str, data_dir: Optional[str] = None) -> Task:
    """``digits`` (scikit-learn's bundled set: 1,438 train / 359 test, a 64-64-10 MLP in
    numpy, ``fedpress.train.mlp``: no torch needed) or ``mnist`` (IDX files in
    ``data_dir``: 10,000 images split 8,000 / 2,000, stratified with seed 0, a
    214k-parameter CNN in torch). The split is the same for every run seed."""
    name = str(name).lower()
    train, test = load_task(name, data_dir=data_dir, seed=0)
    model_fn = digits_mlp if name == "digits" else _BuiltinModel(name)
    return Task(
        name=name,
        model_fn=model_fn,
        train=train,
        test=test,
        num_classes=train.num_classes,
        meta={"data_dir": None if data_dir is None else str(data_dir)},
    )


def resolve_task(text: str, data_dir: Optional[str] = None) -> Task:
    """The task ``--task`` names: ``digits``, ``mnist`` (``data_dir``) or
    ``module:function`` (the function is called with no arguments and must return a
    ``Task``; the current directory is searched for the module, as ``python -m``
    does). Every failure is a ValueError that starts with ``--task TEXT:`` and says
    what to do, ready for a command line to print."""
    text = str(text)
    if ":" not in text:
        if text.lower() not in BUILTIN_TASKS:
            raise ValueError(
                f"--task {text}: unknown task {text!r}; use digits, mnist or module:function (a "
                "function returning a fedpress.train.Task)"
            )
        try:
            return builtin_task(text.lower(), data_dir)
        except (OSError, ValueError) as exc:
            hint = " (--data-dir DIR: the folder of the MNIST IDX files)" if text.lower() == "mnist" else ""
            raise ValueError(f"--task {text}: {exc}{hint}") from None
    module_name, _, func = text.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--task {text}: cannot import {module_name!r} ({exc})") from None
    factory = getattr(module, func, None)
    if not callable(factory):
        raise ValueError(f"--task {text}: {module_name} has no function {func!r}")
    try:
        task = factory()
    except (TypeError, ValueError) as exc:  # a factory that needs arguments, or data Task refuses
        raise ValueError(f"--task {text}: {exc}") from None
    if not isinstance(task, Task):
        raise ValueError(f"--task {text}: {func}() must return a fedpress.train.Task, got {type(task).__name__}")
    return task
