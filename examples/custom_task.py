"""Your own model and data behind ``--task``: a small MLP on a synthetic two-moons-like
problem, made without downloading anything.

    fedpress demo --task examples.custom_task:build --codecs fp32 topk:0.05+q4+zstd
    fedpress server --task examples.custom_task:build ...      # evaluates on `test`
    fedpress client --task examples.custom_task:build --partition 2/8 ...

Run from the repository root (the current directory is searched for the module), or
put the file anywhere on PYTHONPATH. The contract is in ``fedpress.train.task``:
``build()`` takes no arguments and returns a ``fedpress.train.Task``; ``model_fn(seed)``
returns a fresh ``torch.nn.Module`` mapping a batch of inputs to class logits, its
initial weights a function of ``seed`` only (the server and every client build the same
initial model from the same ``--seed``).
"""

from __future__ import annotations

import numpy as np
import torch
from fedpress.train import Task


def make_model(seed: int) -> torch.nn.Module:
    """A 2-32-32-3 MLP; module-level, so that `fedpress sweep --jobs N` can send it to workers."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.nn.Sequential(
            torch.nn.Linear(2, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3)
        )


def spirals(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three interleaved noisy spirals: (n, 2) float32 points and int64 labels 0..2."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    t = rng.uniform(0.2, 1.0, n)
    angle = 3.0 * t + y * (2 * np.pi / 3)
    x = np.stack([t * np.cos(angle), t * np.sin(angle)], axis=1) + rng.normal(0, 0.04, (n, 2))
    return x.astype(np.float32), y.astype(np.int64)


def build() -> Task:
    """The same data on every machine: fixed seeds, nothing read from disk."""
    x, y = spirals(3000, seed=1234)
    return Task("spirals", model_fn=make_model, train=(x[:2400], y[:2400]), test=(x[2400:], y[2400:]), num_classes=3)
