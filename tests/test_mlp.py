"""The numpy MLP of the digits task: gradients, torch's SGD rule, parameters."""

from __future__ import annotations

import numpy as np
import pytest
from fedpress.train import get_params, set_params, train_local
from fedpress.train.datasets import Dataset
from fedpress.train.mlp import MLP, digits_mlp


def batch(seed: int = 0, n: int = 9) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6)).astype(np.float32), rng.integers(0, 3, n)


def test_gradients_match_finite_differences():
    model = MLP((6, 5, 4, 3), seed=1)
    model.params = {k: v.astype(np.float64) for k, v in model.params.items()}
    x, y = batch()
    x = x.astype(np.float64)
    _, grads = model.loss_and_grads(x, y)
    for name, value in model.params.items():
        numeric = np.zeros_like(value)
        for i in np.ndindex(value.shape):
            old = value[i]
            value[i] = old + 1e-6
            plus = model.loss_and_grads(x, y)[0]
            value[i] = old - 1e-6
            minus = model.loss_and_grads(x, y)[0]
            value[i] = old
            numeric[i] = (plus - minus) / 2e-6
        np.testing.assert_allclose(grads[name], numeric, atol=1e-7)


def test_training_follows_torch_sgd_with_momentum():
    torch = pytest.importorskip("torch")
    model = MLP((6, 5, 3), seed=2)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in model.params.items()})
    x, y = batch(3)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for _ in range(6):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        optimizer.step()
    model.fit(x, y, epochs=6, batch_size=len(y), lr=0.1, momentum=0.9, seed=0)  # one batch: order moot
    for name, value in net.state_dict().items():
        np.testing.assert_allclose(model.params[name], value.numpy(), atol=1e-6)


def test_the_digits_model_has_torchs_names_and_shapes():
    params = get_params(digits_mlp(0))
    assert {k: v.shape for k, v in params.items()} == {
        "1.weight": (64, 64),
        "1.bias": (64,),
        "3.weight": (10, 64),
        "3.bias": (10,),
    }
    assert all(v.dtype == np.float32 for v in params.values())
    assert all(np.array_equal(v, get_params(digits_mlp(0))[k]) for k, v in params.items())
    assert not np.array_equal(params["1.weight"], get_params(digits_mlp(1))["1.weight"])
    pytest.importorskip("torch")
    from fedpress.train import make_model

    set_params(make_model("digits"), params)  # moves to the torch model as it is


def test_set_params_checks_and_leaves_the_model_alone():
    model = digits_mlp(0)
    before = get_params(model)
    with pytest.raises(ValueError, match="missing"):
        set_params(model, {"1.weight": before["1.weight"]})
    with pytest.raises(ValueError, match="shape mismatch"):
        set_params(model, {**before, "3.bias": np.zeros(11, np.float32)})
    assert all(np.array_equal(v, get_params(model)[k]) for k, v in before.items())


def test_train_local_is_seeded_and_learns():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(10, 64)).astype(np.float32)
    y = rng.integers(0, 10, 600)
    x = (centers[y] + 0.3 * rng.normal(size=(600, 64))).astype(np.float32).reshape(600, 1, 8, 8)
    data = Dataset(x, y.astype(np.int64), 10, "blobs")
    runs = []
    for _ in range(2):
        model = digits_mlp(0)
        stats = train_local(model, data, epochs=3, batch_size=32, lr=0.1, momentum=0.9, seed=7)
        runs.append(get_params(model))
    assert all(np.array_equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert stats["steps"] == 3 * 19 and stats["loss"] < 0.5
    from fedpress.train import evaluate

    assert evaluate(model, data)[1] > 0.9
