"""compress_hook under DistributedDataParallel: two gloo processes on 127.0.0.1.

The module runs one pair of worker processes (this file run as a script, one per
rank, rendezvous through a FileStore, gloo's sockets on the loopback interface
with ports the OS picks) and the tests assert on what they wrote:

* the hook called directly on stand-in buckets, against a numpy reference of the
  mean of every rank's decoded payload (the encoders replayed with the same seeds);
* a small MLP trained 30 steps with plain DDP and with compress_hook: losses,
  final parameters of both ranks, the state's byte accounting and its pickle.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

import fedpress as fp  # noqa: E402
from fedpress.ddp import CompressionState, StepBytes, compress_hook  # noqa: E402

WORLD_SIZE = 2
WORKER_TIMEOUT_S = 120  # the whole pair of workers; gloo collectives time out after COLLECTIVE_TIMEOUT_S
COLLECTIVE_TIMEOUT_S = 60

# Direct hook calls: two stand-in buckets, the first step an all-reduce.
DIRECT_SPEC = "topk:0.1+q8"
DIRECT_SIZES = (3000, 1000)
DIRECT_STEPS = 3
DIRECT_START_ITER = 1

# Training: an MLP fitting a random teacher network.
TRAIN_STEPS = 30
TRAIN_START_ITER = 2
BATCH_PER_RANK = 64
FEATURES, HIDDEN = 32, 64
TRAIN_RUNS: dict[str, Optional[str]] = {
    "allreduce": None,
    "topk": "topk:0.1+q8",
    "q8": "q8+zstd",
    "eden": "eden4:shared",
}  # ranks share a rotation per step


# ------------------------------------------------------------------ worker --
def _direct_grad(rank: int, step: int, bucket_index: int, size: int) -> np.ndarray:
    rng = np.random.default_rng([rank, step, bucket_index])
    return (rng.standard_normal(size) * 1e-2).astype(np.float32)


class _StandInBucket:
    """The GradBucket methods compress_hook uses, over a given flat tensor."""

    def __init__(self, index: int, buffer: Any, last: bool) -> None:
        self._index, self._buffer, self._last = index, buffer, last

    def index(self) -> int:
        return self._index

    def buffer(self) -> Any:
        return self._buffer

    def is_last(self) -> bool:
        return self._last


def _run_direct(rank: int, out: Path) -> None:
    """compress_hook on stand-in buckets: float32 with error feedback, float16, int."""
    state = CompressionState(DIRECT_SPEC, start_iter=DIRECT_START_ITER)
    results = {}
    for step in range(DIRECT_STEPS):
        for index, size in enumerate(DIRECT_SIZES):
            grad = torch.from_numpy(_direct_grad(rank, step, index, size))
            bucket = _StandInBucket(index, grad, last=index == len(DIRECT_SIZES) - 1)
            averaged = compress_hook(state, bucket).wait()
            assert averaged.data_ptr() == grad.data_ptr(), "the hook must return the bucket's buffer"
            results[f"step{step}_bucket{index}"] = averaged.numpy().copy()
    half = torch.from_numpy(_direct_grad(rank, 0, 0, 500)).half()
    results["half"] = (
        compress_hook(CompressionState("q8", start_iter=0), _StandInBucket(0, half, last=True)).wait().float().numpy()
    )
    try:
        compress_hook(
            CompressionState("q8", start_iter=0), _StandInBucket(0, torch.zeros(10, dtype=torch.int32), last=True)
        )
        int_error = ""
    except TypeError as exc:
        int_error = str(exc)
    np.savez(out / f"direct_rank{rank}.npz", **results)
    (out / f"direct_rank{rank}.json").write_text(
        json.dumps({"int_error": int_error, "history": [vars(r) for r in state.history]})
    )


def _teacher_data(n: int = 4096) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n, FEATURES, generator=g)
    w1 = torch.randn(FEATURES, HIDDEN, generator=g) / FEATURES**0.5
    w2 = torch.randn(HIDDEN, 1, generator=g) / HIDDEN**0.5
    return x, torch.tanh(x @ w1) @ w2


def _mlp() -> Any:
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(
        nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1)
    )


def _run_training(rank: int, name: str, spec: Optional[str], out: Path) -> None:
    from torch.nn.parallel import DistributedDataParallel

    x, y = _teacher_data()
    # A small bucket cap so the model spans several buckets, each with its own residual.
    model = DistributedDataParallel(_mlp(), bucket_cap_mb=0.01)
    state = None
    if spec is not None:
        state = CompressionState(spec, start_iter=TRAIN_START_ITER)
        model.register_comm_hook(state, compress_hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = torch.nn.MSELoss()
    with torch.no_grad():
        initial = float(loss_fn(model(x), y))
    for step in range(TRAIN_STEPS):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(step))
        batch = order[rank * BATCH_PER_RANK : (rank + 1) * BATCH_PER_RANK]
        optimizer.zero_grad()
        loss_fn(model(x[batch]), y[batch]).backward()
        optimizer.step()
    with torch.no_grad():
        final = float(loss_fn(model(x), y))
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
    np.save(out / f"{name}_params_rank{rank}.npy", params)
    record: dict[str, Any] = {"initial_loss": initial, "final_loss": final}
    if state is not None:
        record["history"] = [vars(r) for r in state.history]
        record["totals"] = state.totals()
        record["num_buckets"] = len(state.encoders)
        state.process_group = dist.group.WORLD  # pickling must drop it
        (out / f"{name}_state_rank{rank}.pkl").write_bytes(pickle.dumps(state))
        np.savez(
            out / f"{name}_residuals_rank{rank}.npz",
            **{str(k): e.residuals["bucket"] for k, e in state.encoders.items()},
        )
    (out / f"{name}_rank{rank}.json").write_text(json.dumps(record))


def _worker_main(argv: list[str]) -> None:
    from datetime import timedelta

    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{args.store}",
        rank=args.rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    try:
        _run_direct(args.rank, args.out)
        for name, spec in TRAIN_RUNS.items():
            _run_training(args.rank, name, spec, args.out)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------ parent --
@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Runs the two workers once; returns the folder they wrote to."""
    out = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if sys.platform.startswith("linux"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo on 127.0.0.1, whatever the host name resolves to
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--rank", str(rank), "--store", str(out / "store"), "--out", str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(WORLD_SIZE)
    ]
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
            proc.wait()
        pytest.fail(f"DDP workers did not finish within {WORKER_TIMEOUT_S} s")
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        if proc.returncode != 0:
            pytest.fail(f"DDP worker {rank} exited with {proc.returncode}:\n{log}")
    return out


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


# -- the hook on stand-in buckets
def test_allreduce_steps_average(runs: Path) -> None:
    got = np.load(runs / "direct_rank0.npz")
    for index, size in enumerate(DIRECT_SIZES):
        expected = sum(_direct_grad(r, 0, index, size) / WORLD_SIZE for r in range(WORLD_SIZE))
        np.testing.assert_allclose(got[f"step0_bucket{index}"], expected, rtol=1e-6, atol=1e-9)


def test_compressed_steps_are_mean_of_decoded_payloads(runs: Path) -> None:
    """Replays every rank's encoder (same spec, seeds and error feedback) and averages
    the decoded payloads in numpy."""
    got = np.load(runs / "direct_rank0.npz")
    seeds = CompressionState(DIRECT_SPEC)
    encoders = {(r, i): fp.Encoder(DIRECT_SPEC) for r in range(WORLD_SIZE) for i in range(len(DIRECT_SIZES))}
    for step in range(DIRECT_START_ITER, DIRECT_STEPS):
        seeds.iter = step
        for index, size in enumerate(DIRECT_SIZES):
            decoded = [
                fp.decode(
                    encoders[r, index].encode(
                        {"bucket": _direct_grad(r, step, index, size)}, seed=seeds._payload_seed(r, index)
                    )
                )["bucket"]
                for r in range(WORLD_SIZE)
            ]
            expected = np.mean(decoded, axis=0, dtype=np.float64)
            np.testing.assert_allclose(got[f"step{step}_bucket{index}"], expected, rtol=1e-5, atol=1e-9)
            assert np.count_nonzero(got[f"step{step}_bucket{index}"]) <= WORLD_SIZE * round(0.1 * size)


def test_ranks_decode_identical_bits(runs: Path) -> None:
    a, b = np.load(runs / "direct_rank0.npz"), np.load(runs / "direct_rank1.npz")
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_half_bucket_is_averaged_in_its_dtype(runs: Path) -> None:
    got = np.load(runs / "direct_rank0.npz")["half"]
    expected = np.mean(
        [_direct_grad(r, 0, 0, 500).astype(np.float16).astype(np.float32) for r in range(WORLD_SIZE)], axis=0
    )
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, atol=0.02 * scale)


def test_integer_bucket_is_rejected(runs: Path) -> None:
    message = _json(runs / "direct_rank0.json")["int_error"]
    assert "only floating-point buckets can be compressed" in message
    assert "torch.int32" in message


def test_direct_history_counts_steps(runs: Path) -> None:
    history = _json(runs / "direct_rank0.json")["history"]
    assert [r["step"] for r in history] == list(range(DIRECT_STEPS))
    assert [r["compressed"] for r in history] == [s >= DIRECT_START_ITER for s in range(DIRECT_STEPS)]
    assert history[0]["raw_bytes"] == 4 * sum(DIRECT_SIZES)


# -- training
def test_training_converges_close_to_allreduce(runs: Path) -> None:
    baseline = _json(runs / "allreduce_rank0.json")
    assert baseline["final_loss"] < baseline["initial_loss"] / 3
    for name in ("topk", "q8", "eden"):
        run = _json(runs / f"{name}_rank0.json")
        assert run["initial_loss"] == pytest.approx(baseline["initial_loss"], rel=1e-6)
        assert run["final_loss"] < run["initial_loss"] / 3, name
        assert run["final_loss"] < 1.5 * baseline["final_loss"], name


@pytest.mark.parametrize("name", list(TRAIN_RUNS))
def test_replicas_stay_identical(runs: Path, name: str) -> None:
    params = [np.load(runs / f"{name}_params_rank{r}.npy") for r in range(WORLD_SIZE)]
    np.testing.assert_array_equal(params[0], params[1])


def test_bytes_per_step(runs: Path) -> None:
    num_params = sum(p.numel() for p in _mlp().parameters())
    for name, spec, min_ratio in (("topk", "topk:0.1+q8", 10.0), ("q8", "q8+zstd", 3.0), ("eden", "eden4:shared", 6.0)):
        run = _json(runs / f"{name}_rank0.json")
        history = [StepBytes(**r) for r in run["history"]]
        assert run["num_buckets"] > 1, "the bucket cap should split the model"
        assert [r.step for r in history] == list(range(TRAIN_STEPS))
        for record in history[:TRAIN_START_ITER]:  # plain all-reduce
            assert not record.compressed
            assert record.raw_bytes == record.payload_bytes == record.sent_bytes == 4 * num_params
        for record in history[TRAIN_START_ITER:]:
            assert record.compressed
            assert record.raw_bytes == 4 * num_params
            assert record.payload_bytes <= record.sent_bytes - 8 * run["num_buckets"]
            assert record.gathered_bytes == WORLD_SIZE * record.sent_bytes  # two ranks, same padding
            assert record.ratio > min_ratio, (spec, record)
        totals = run["totals"]
        assert totals["steps"] == TRAIN_STEPS
        assert totals["compressed_steps"] == TRAIN_STEPS - TRAIN_START_ITER
        assert totals["sent_bytes"] == sum(r.sent_bytes for r in history)


def test_state_pickles_without_process_group(runs: Path) -> None:
    state = pickle.loads((runs / "topk_state_rank0.pkl").read_bytes())
    assert isinstance(state, CompressionState)
    assert state.process_group is None
    assert state.spec == "topk:0.1+q8" and state.iter == TRAIN_STEPS
    assert state.totals() == _json(runs / "topk_rank0.json")["totals"]
    residuals = np.load(runs / "topk_residuals_rank0.npz")
    assert sorted(int(k) for k in residuals.files) == sorted(state.encoders)
    for key in residuals.files:
        np.testing.assert_array_equal(state.encoders[int(key)].residuals["bucket"], residuals[key])


# -- construction
@pytest.mark.parametrize("spec", ["topk:2+q8", "q9", "", "zstd+q8"])
def test_bad_spec_raises(spec: str) -> None:
    with pytest.raises(ValueError):
        CompressionState(spec)


def test_bad_start_iter_raises() -> None:
    with pytest.raises(ValueError, match="start_iter"):
        CompressionState("q8", start_iter=-1)


def test_hook_passes_ddp_annotation_check() -> None:
    """register_comm_hook compares these objects; string annotations would fail."""
    import inspect

    signature = inspect.signature(compress_hook)
    assert signature.parameters["bucket"].annotation is dist.GradBucket
    assert signature.return_annotation == torch.futures.Future[torch.Tensor]


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
