"""A multilayer perceptron in numpy: the model of the built-in ``digits`` task, so that
``fedpress demo`` (and a server or client on digits) needs no torch.

The architecture and parameter names are those of ``make_model("digits")`` in torch
(``Flatten -> Linear(64, 64) -> ReLU -> Linear(64, 10)``: ``1.weight`` of shape
(out, in), ``1.bias``, ``3.weight``, ``3.bias``), and training is torch's minibatch SGD
with momentum on the mean cross-entropy, so a digits model moves between the two
freely. The generic training functions (``fedpress.train.train_local``,
``evaluate``, ``get_params``, ``set_params``) accept an ``MLP`` wherever they
accept a torch module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["MLP", "digits_mlp"]


class MLP:
    """``Linear -> ReLU -> ... -> Linear`` on flattened float32 inputs, with the
    parameters in float32; initialised as torch initialises ``nn.Linear`` (weights
    and biases uniform in ``±1/sqrt(fan_in)``), from ``seed`` only."""

    def __init__(self, sizes: Sequence[int], seed: int = 0) -> None:
        self.sizes = tuple(int(s) for s in sizes)
        if len(self.sizes) < 2 or min(self.sizes) < 1:
            raise ValueError(f"sizes must be at least two positive layer widths, got {sizes!r}")
        rng = np.random.default_rng(int(seed) & ((1 << 64) - 1))
        self.params: dict[str, np.ndarray] = {}
        for i, (fan_in, fan_out) in enumerate(zip(self.sizes, self.sizes[1:])):
            bound = 1.0 / np.sqrt(fan_in)
            self.params[f"{2 * i + 1}.weight"] = rng.uniform(-bound, bound, (fan_out, fan_in)).astype(np.float32)
            self.params[f"{2 * i + 1}.bias"] = rng.uniform(-bound, bound, fan_out).astype(np.float32)

    def _layers(self) -> list[tuple[np.ndarray, np.ndarray]]:
        names = list(self.params)
        return [(self.params[w], self.params[b]) for w, b in zip(names[::2], names[1::2])]

    def get_params(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.params.items()}

    def set_params(self, params: Mapping[str, Any]) -> None:
        """Copies ``params`` in; names and shapes must be the model's (ValueError
        otherwise, and the model is left unchanged)."""
        missing = [k for k in self.params if k not in params]
        unexpected = [k for k in params if k not in self.params]
        if missing or unexpected:
            raise ValueError(
                f"set_params: parameter names do not match the model: missing {missing}, unexpected {unexpected}"
            )
        new = {}
        for name, mine in self.params.items():
            value = np.asarray(params[name], dtype=np.float32)
            if value.shape != mine.shape:
                raise ValueError(f"set_params: shape mismatch: {name}: got {value.shape}, model has {mine.shape}")
            new[name] = value.copy()
        self.params = new

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """(logits, the input of every layer) for a batch."""
        h = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
        inputs = []
        layers = self._layers()
        for i, (w, b) in enumerate(layers):
            inputs.append(h)
            h = h @ w.T + b
            if i < len(layers) - 1:
                h = np.maximum(h, 0.0)
        return h, inputs

    def loss_and_grads(self, x: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """Mean cross-entropy over the batch and its gradient for every parameter."""
        logits, inputs = self.forward(x)
        n = len(y)
        shifted = logits - logits.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        total = exp.sum(axis=1, keepdims=True)
        loss = float(np.mean(np.log(total[:, 0]) - shifted[np.arange(n), y]))
        grad = exp / total
        grad[np.arange(n), y] -= 1.0
        grad /= np.float32(n)
        grads: dict[str, np.ndarray] = {}
        names = list(self.params)
        layers = self._layers()
        for i in range(len(layers) - 1, -1, -1):
            w, _ = layers[i]
            grads[names[2 * i]] = grad.T @ inputs[i]
            grads[names[2 * i + 1]] = grad.sum(axis=0)
            if i:
                grad = (grad @ w) * (inputs[i] > 0)
        return loss, grads

    def fit(
        self, x: np.ndarray, y: np.ndarray, *, epochs: int, batch_size: int, lr: float, momentum: float, seed: int
    ) -> dict[str, Any]:
        """Minibatch SGD with momentum (torch's rule: ``v = momentum * v + g``,
        ``p -= lr * v``), the example order of each epoch from ``seed``. Returns
        ``loss`` (the mean over the last epoch), ``num_examples`` and ``steps``."""
        n = len(y)
        rng = np.random.default_rng(int(seed) & ((1 << 64) - 1))
        velocity = {k: np.zeros_like(v) for k, v in self.params.items()}
        steps, loss_sum = 0, 0.0
        for _ in range(epochs):
            order = rng.permutation(n)
            loss_sum = 0.0
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                loss, grads = self.loss_and_grads(x[idx], y[idx])
                for name, g in grads.items():
                    v = velocity[name]
                    if momentum:
                        v *= np.float32(momentum)
                        v += g
                    else:
                        v[...] = g
                    self.params[name] -= np.float32(lr) * v
                loss_sum += loss * len(idx)
                steps += 1
        return {"loss": loss_sum / n, "num_examples": n, "steps": steps}

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int = 512) -> tuple[float, float]:
        """(mean cross-entropy, accuracy)."""
        loss_sum, correct = 0.0, 0
        for start in range(0, len(y), batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            logits, _ = self.forward(xb)
            shifted = logits - logits.max(axis=1, keepdims=True)
            log_total = np.log(np.exp(shifted).sum(axis=1))
            loss_sum += float(np.sum(log_total - shifted[np.arange(len(yb)), yb]))
            correct += int((logits.argmax(axis=1) == yb).sum())
        return loss_sum / len(y), correct / len(y)


def digits_mlp(seed: int = 0) -> MLP:
    """The digits task's model: 64 -> 64 -> 10 (module-level, so it pickles)."""
    return MLP((64, 64, 10), seed=seed)
