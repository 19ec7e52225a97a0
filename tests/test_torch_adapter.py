"""fedpress.torch: state_delta / apply_delta against numpy references, and the PyTorch example."""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fedpress as fp  # noqa: E402
import fedpress.torch as fpt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "pytorch_fedavg.py"


def _bn_model(seed: int = 0) -> torch.nn.Module:
    """A model with float parameters, float running statistics and an int64 step counter."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def _train_steps(model: torch.nn.Module, steps: int, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(steps):
        x = torch.randn(8, 6, generator=generator)
        y = torch.randint(0, 3, (8,), generator=generator)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def _numpy_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Copies of the state (bfloat16, which numpy lacks, as float32)."""
    return {
        k: (v.float() if v.dtype == torch.bfloat16 else v).detach().cpu().numpy().copy()
        for k, v in model.state_dict().items()
    }


class _WithBuffers(torch.nn.Module):
    """A float16 weight, a bfloat16 weight, a float64 scalar, a uint8 and a bool buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.weight16 = torch.nn.Parameter(torch.linspace(-2, 2, 12).view(3, 4).half())
        self.weight_bf16 = torch.nn.Parameter(torch.linspace(-1, 3, 6, dtype=torch.bfloat16))
        self.scale = torch.nn.Parameter(torch.tensor(0.1, dtype=torch.float64))
        self.register_buffer("level", torch.tensor([3, 200, 7], dtype=torch.uint8))
        self.register_buffer("mask", torch.tensor([True, False, True, False]))


# ------------------------------------------------------------------ imports --
def test_import_fedpress_does_not_import_torch():
    code = "import fedpress, sys; assert 'torch' not in sys.modules, 'fedpress imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_adapter_imports_the_real_torch():
    code = (
        "import fedpress.torch as fpt, torch, sys\n"
        "assert fpt.torch is torch and torch is sys.modules['torch']\n"
        "assert 'fedpress' not in torch.__file__, torch.__file__\n"
        "assert hasattr(torch, 'nn') and torch.zeros(2).sum().item() == 0\n"
        "import fedpress\n"
        "assert fedpress.torch is fpt\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert fpt.torch is torch


def test_public_surface():
    assert fpt.__all__ == ["state_delta", "apply_delta"]


# -------------------------------------------------------------- state_delta --
def test_state_delta_of_mixed_dtypes_matches_numpy():
    rng = np.random.default_rng(0)
    current = {
        "f32": torch.from_numpy(rng.standard_normal((4, 5)).astype(np.float32)),
        "f16": torch.from_numpy(rng.standard_normal(7).astype(np.float16) * np.float16(1000)),
        "bf16": torch.from_numpy(rng.standard_normal(9).astype(np.float32)).to(torch.bfloat16),
        "f64": torch.from_numpy(1.0 + rng.standard_normal(6) * 1e-12),
        "scalar": torch.tensor(2.5),
        "count": torch.tensor(17, dtype=torch.int64),
        "u8": torch.tensor([0, 5, 255], dtype=torch.uint8),
        "flag": torch.tensor([True, False, True]),
    }
    reference = {
        "f32": rng.standard_normal((4, 5)).astype(np.float32),
        "f16": torch.from_numpy(rng.standard_normal(7).astype(np.float16) * np.float16(-1000)),
        "bf16": torch.from_numpy(rng.standard_normal(9).astype(np.float32)).to(torch.bfloat16),
        "f64": np.ones(6),
        "scalar": np.float32(1.0),
        "count": np.array(12, dtype=np.int64),
        "u8": np.array([3, 5, 0], dtype=np.uint8),
        "flag": np.array([False, False, True]),
    }
    delta = fpt.state_delta(current, reference)
    assert list(delta) == list(current)

    f16_now, f16_then = current["f16"].numpy(), reference["f16"].numpy()
    expected = {
        "f32": current["f32"].numpy() - reference["f32"],
        # In float32: the float16 difference would overflow (|x| up to ~4000 each side).
        "f16": f16_now.astype(np.float32) - f16_then.astype(np.float32),
        "bf16": current["bf16"].float().numpy() - reference["bf16"].float().numpy(),
        "f64": current["f64"].numpy() - reference["f64"],
        "scalar": np.array(2.5 - 1.0, dtype=np.float32),
        "count": np.array(5, dtype=np.int64),
        "u8": np.array([-3, 0, 255], dtype=np.int64),
        "flag": np.array([True, False, True]),
    }
    for name, want in expected.items():
        got = delta[name]
        assert isinstance(got, np.ndarray), name
        assert got.dtype == want.dtype and got.shape == want.shape, (name, got.dtype, got.shape)
        np.testing.assert_array_equal(got, want, err_msg=name)
    # float64 keeps the 1e-12 differences a float32 delta would lose.
    assert np.abs(delta["f64"]).max() < 1e-10 and np.count_nonzero(delta["f64"]) == 6


def test_state_delta_of_a_batchnorm_model():
    reference = _bn_model()
    model = copy.deepcopy(reference)
    _train_steps(model, steps=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref_arrays = _numpy_state(reference)

    for ref in (reference, ref_arrays, reference.state_dict()):
        delta = fpt.state_delta(model, ref)
        assert list(delta) == list(model.state_dict())
        for name, t in model.state_dict().items():
            want = t.numpy() - ref_arrays[name]
            assert delta[name].dtype == want.dtype, name
            np.testing.assert_array_equal(delta[name], want, err_msg=name)
    assert delta["1.num_batches_tracked"].dtype == np.int64
    assert int(delta["1.num_batches_tracked"]) == 4
    assert np.abs(delta["1.running_mean"]).max() > 0
    for name, t in model.state_dict().items():  # inputs untouched
        assert torch.equal(t, before[name]), name
    for name, arr in ref_arrays.items():
        np.testing.assert_array_equal(arr, reference.state_dict()[name].numpy())


def test_inputs_are_read_without_copies():
    t = torch.randn(3, 4)
    arr, dtype = fpt._as_numpy("w", t, "model")
    assert dtype == "float32" and np.shares_memory(arr, t.numpy())
    ref = np.zeros((3, 4), np.float32)
    view, _ = fpt._as_numpy("w", ref, "reference")
    assert view is ref or np.shares_memory(view, ref)
    model = torch.nn.Linear(4, 3)
    weight, _ = fpt._as_numpy("weight", model.state_dict()["weight"], "model")
    assert np.shares_memory(weight, model.weight.detach().numpy())


def test_the_delta_does_not_alias_the_model():
    model = _WithBuffers()
    delta = fpt.state_delta(model, _numpy_state(model))
    for name, t in model.state_dict().items():
        if t.dtype != torch.bfloat16:
            assert not np.shares_memory(delta[name], t.numpy()), name
    np.testing.assert_array_equal(delta["mask"], [True, False, True, False])
    with torch.no_grad():
        model.mask.fill_(False)
    np.testing.assert_array_equal(delta["mask"], [True, False, True, False])


def test_state_delta_rejects_different_names():
    current = {"a": torch.zeros(2), "b": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"missing from the reference: \['b'\]; not in the model: \['c'\]"):
        fpt.state_delta(current, {"a": np.zeros(2), "c": np.zeros(2)})
    with pytest.raises(ValueError, match=r"missing from the reference: \['b'\]; not in the model: \[\]$"):
        fpt.state_delta(current, {"a": np.zeros(2)})


def test_state_delta_rejects_different_shapes():
    message = r"tensor 'w' has shape \(3, 4\) in the model but \(4, 3\) in the reference"
    with pytest.raises(ValueError, match=message):
        fpt.state_delta({"w": torch.zeros(3, 4)}, {"w": np.zeros((4, 3), np.float32)})


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([1.0, 2.0], r"model entry 'x' is a list; expected a torch.Tensor or a numpy array"),
        (None, r"model entry 'x' is a NoneType"),
        (np.array(["a", "b"]), r"model tensor 'x' has unsupported dtype <U1; expected a floating"),
        (np.zeros(2, np.complex64), r"model tensor 'x' has unsupported dtype complex64"),
        (torch.zeros(2, dtype=torch.float8_e4m3fn), r"tensor 'x' has unsupported dtype float8_e4m3fn"),
        (torch.zeros(2, dtype=torch.complex64), r"model tensor 'x' has unsupported dtype complex64"),
    ],
)
def test_state_delta_rejects_unsupported_values(value, message):
    with pytest.raises(TypeError, match=message):
        fpt.state_delta({"x": value}, {"x": np.zeros(2, np.float32)})


def test_state_delta_rejects_sparse_tensors_and_mixed_kinds():
    with pytest.raises(TypeError, match=r"tensor 'x' has layout torch.sparse_coo"):
        fpt.state_delta({"x": torch.zeros(2).to_sparse()}, {"x": np.zeros(2, np.float32)})
    with pytest.raises(TypeError, match=r"'n' is int64 in the model but float32 in the reference"):
        fpt.state_delta({"n": torch.tensor(3)}, {"n": np.float32(3.0)})
    with pytest.raises(TypeError, match=r"must be an nn.Module or a mapping"):
        fpt.state_delta([torch.zeros(1)], {"x": np.zeros(1)})
    with pytest.raises(TypeError, match=r"tensor names must be strings, got int"):
        fpt.state_delta({0: torch.zeros(1)}, {0: np.zeros(1)})


# -------------------------------------------------------------- apply_delta --
def test_apply_delta_round_trip_makes_the_reference_equal_to_the_model():
    reference = _bn_model()
    model = copy.deepcopy(reference)
    _train_steps(model, steps=3)
    delta = fpt.state_delta(model, reference)
    fpt.apply_delta(reference, delta)
    for name, want in model.state_dict().items():
        got = reference.state_dict()[name]
        if want.is_floating_point():
            # (a - b) + b is within an ulp of a in float32.
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, atol=1e-7, err_msg=name)
        else:
            assert torch.equal(got, want), name
    # The parameters themselves moved, not only the state_dict's tensors.
    np.testing.assert_allclose(
        reference[0].weight.detach().numpy(), model[0].weight.detach().numpy(), rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("lr", [0.5, -1.25, 0.0])
def test_apply_delta_scales_floats_by_lr_and_not_integer_buffers(lr):
    model = _bn_model()
    rng = np.random.default_rng(3)
    before = _numpy_state(model)
    delta = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in before.items() if v.dtype.kind == "f"}
    delta["1.num_batches_tracked"] = np.array(2.6)  # a float mean of step counts: rounded to 3
    fpt.apply_delta(model, delta, lr=lr)
    after = _numpy_state(model)
    for name, d in delta.items():
        if before[name].dtype.kind == "f":
            want = before[name] + np.float32(lr) * d
            np.testing.assert_allclose(after[name], want, rtol=1e-6, atol=1e-6, err_msg=name)
    assert after["1.num_batches_tracked"].dtype == np.int64
    assert int(after["1.num_batches_tracked"]) == int(before["1.num_batches_tracked"]) + 3


def test_apply_delta_to_low_precision_and_bool_tensors():
    model = _WithBuffers()
    before = _numpy_state(model)
    rng = np.random.default_rng(4)
    delta = {
        "weight16": rng.standard_normal((3, 4)).astype(np.float32) * np.float32(1e-3),
        "weight_bf16": torch.from_numpy(rng.standard_normal(6).astype(np.float32)),
        "scale": np.array(1e-12),
        "level": np.array([-2, 50, 0], dtype=np.int64),
        "mask": np.array([False, True, True, True]),
    }
    lr = 0.75
    fpt.apply_delta(model, delta, lr=lr)
    # float16: updated in float32 and rounded once (1e-3 steps would vanish in float16 arithmetic).
    want16 = (before["weight16"] + np.float32(lr) * delta["weight16"]).astype(np.float16)
    np.testing.assert_array_max_ulp(model.weight16.detach().numpy(), want16, maxulp=1)
    assert not np.array_equal(model.weight16.detach().numpy(), before["weight16"])
    want_bf16 = before["weight_bf16"] + np.float32(lr) * delta["weight_bf16"].numpy()
    want_bf16 = torch.from_numpy(want_bf16).to(torch.bfloat16).float().numpy()
    np.testing.assert_allclose(model.weight_bf16.detach().float().numpy(), want_bf16, rtol=1e-2)
    assert model.scale.dtype == torch.float64
    np.testing.assert_allclose(model.scale.item(), 0.1 + lr * 1e-12, rtol=0, atol=1e-18)
    np.testing.assert_array_equal(model.level.numpy(), before["level"] + delta["level"])
    assert model.level.dtype == torch.uint8
    np.testing.assert_array_equal(model.mask.numpy(), delta["mask"])


def test_apply_delta_accepts_decoded_and_aggregated_payloads():
    reference = _bn_model()
    clients = [copy.deepcopy(reference) for _ in range(2)]
    for seed, client in enumerate(clients):
        _train_steps(client, steps=2 + seed, seed=seed + 10)
    deltas = [fpt.state_delta(client, reference) for client in clients]

    decoded = fp.decode(fp.Codec("fp32").encode(deltas[0]))
    target = copy.deepcopy(reference)
    fpt.apply_delta(target, decoded)
    for name, t in clients[0].state_dict().items():
        np.testing.assert_allclose(target.state_dict()[name].numpy(), t.numpy(), rtol=1e-6, atol=1e-7, err_msg=name)

    agg = fp.Aggregator()
    weights = [30.0, 10.0]
    for d, w in zip(deltas, weights):
        agg.add(fp.Codec("fp32").encode(d), weight=w)
    mean = agg.result()
    before = _numpy_state(reference)
    fpt.apply_delta(reference, mean)
    after = _numpy_state(reference)
    for name in before:
        want_mean = (
            weights[0] * deltas[0][name].astype(np.float64) + weights[1] * deltas[1][name].astype(np.float64)
        ) / sum(weights)
        if before[name].dtype.kind == "f":
            np.testing.assert_allclose(after[name], before[name] + want_mean, rtol=1e-5, atol=1e-6, err_msg=name)
        else:  # (30 * 2 + 10 * 3) / 40 = 2.25 steps: the aggregator and apply_delta round to 2
            assert int(after[name]) == int(before[name]) + int(np.rint(want_mean)) == 2


def test_apply_delta_leaves_tensors_missing_from_the_delta_alone():
    model = _bn_model()
    before = _numpy_state(model)
    fpt.apply_delta(model, {"0.bias": np.ones(5, np.float32)})
    after = _numpy_state(model)
    np.testing.assert_allclose(after["0.bias"], before["0.bias"] + 1, rtol=1e-6)
    for name in before:
        if name != "0.bias":
            np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def test_apply_delta_updates_tied_weights_once():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3, bias=False), torch.nn.Linear(3, 3, bias=False))
    model[1].weight = model[0].weight
    assert list(model.state_dict()) == ["0.weight", "1.weight"]
    before = model[0].weight.detach().numpy().copy()
    step = np.full((3, 3), 0.5, np.float32)
    fpt.apply_delta(model, {"0.weight": step, "1.weight": step})
    np.testing.assert_allclose(model[1].weight.detach().numpy(), before + step, rtol=1e-6)


def test_apply_delta_accepts_read_only_arrays_without_warnings():
    model = torch.nn.Linear(2, 2)
    before = _numpy_state(model)
    step = np.ones((2, 2), np.float32)
    step.flags.writeable = False
    fpt.apply_delta(model, {"weight": step})  # torch.from_numpy would warn (warnings are errors)
    np.testing.assert_allclose(_numpy_state(model)["weight"], before["weight"] + 1, rtol=1e-6)


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (
            {"2.weight": np.zeros((3, 5), np.float32)},
            ValueError,
            r"delta holds tensors the model does not have: \['2.weight'\]",
        ),
        (
            {"3.weight": np.zeros((5, 3), np.float32)},
            ValueError,
            r"delta for '3.weight' has shape \(5, 3\), the model's tensor \(3, 5\)",
        ),
        ({"3.bias": np.array([0.0, np.nan, 0.0], np.float32)}, ValueError, r"delta for '3.bias' holds NaN"),
        (
            {"3.bias": np.array([True, False, True])},
            TypeError,
            r"delta for '3.bias' is bool but the model's tensor is float32",
        ),
        ({"3.bias": "abc"}, TypeError, r"delta entry '3.bias' is a str"),
    ],
)
def test_apply_delta_validates_everything_before_changing_anything(bad, error, message):
    model = _bn_model()
    before = _numpy_state(model)
    # A valid entry that comes first in state_dict order must not be applied either.
    delta = {"0.weight": np.ones((5, 6), np.float32), **bad}
    with pytest.raises(error, match=message):
        fpt.apply_delta(model, delta)
    for name, arr in _numpy_state(model).items():
        np.testing.assert_array_equal(arr, before[name], err_msg=name)


def test_apply_delta_rejects_bad_lr_and_arguments():
    model = torch.nn.Linear(2, 2)
    delta = {"bias": np.ones(2, np.float32)}
    for lr in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match=r"lr must be finite"):
            fpt.apply_delta(model, delta, lr=lr)
    with pytest.raises(TypeError, match=r"lr must be a real number, got str"):
        fpt.apply_delta(model, delta, lr="0.5")
    with pytest.raises(TypeError, match=r"model must be an nn.Module, got dict"):
        fpt.apply_delta(dict(model.state_dict()), delta)
    with pytest.raises(TypeError, match=r"delta must be a mapping"):
        fpt.apply_delta(model, [np.ones(2)])
    with pytest.raises(TypeError, match=r"'mask' is a bool buffer; its delta must hold bool"):
        fpt.apply_delta(_WithBuffers(), {"mask": np.ones(4, np.float32)})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model():
    reference = _bn_model().cuda()
    model = copy.deepcopy(reference)
    _train_steps(model.cpu(), steps=2)
    model.cuda()
    delta = fpt.state_delta(model, reference)
    assert all(isinstance(v, np.ndarray) for v in delta.values())
    fpt.apply_delta(reference, fp.decode(fp.Codec("fp32").encode(delta)))
    for name, t in model.state_dict().items():
        np.testing.assert_allclose(
            reference.state_dict()[name].cpu().numpy(), t.cpu().numpy(), rtol=1e-6, atol=1e-7, err_msg=name
        )


# ------------------------------------------------------------------ example --
def test_pytorch_fedavg_example_learns(capsys):
    pytest.importorskip("sklearn")
    spec = importlib.util.spec_from_file_location("pytorch_fedavg_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    threads = torch.get_num_threads()
    try:  # main() runs torch on one thread (--threads 1)
        history = example.main(["--rounds", "4", "--clients", "4", "--seed", "1"])
    finally:
        torch.set_num_threads(threads)
    assert len(history["accuracy"]) == 4
    assert history["accuracy"][-1] > history["initial_accuracy"] + 0.3
    assert history["uplink_bytes"] * 20 < history["raw_bytes"]
    out = capsys.readouterr().out
    assert "round   4  accuracy" in out and "final accuracy" in out
