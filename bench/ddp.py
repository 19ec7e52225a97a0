"""DDP benchmark: fedpress's compress_hook next to torch's own communication hooks.

    python bench/ddp.py [--steps 100] [--hidden 512] [--specs q8 topk:0.01+q8+zstd ...]

Two gloo processes on this machine's CPU train the same MLP (64-H-H-10, about
300k parameters at H=512) on scikit-learn's digits (fedpress.train's "digits"
task) from the same initial weights, batches and seeds, once per method:

* DDP's default all-reduce (no hook);
* torch's fp16_compress_hook;
* torch's PowerSGD (powerSGD_hook) at rank 1 and 2, start_powerSGD_iter=2;
* fedpress's compress_hook with each spec, start_iter=2, error feedback on.

Bytes are the bytes each rank puts into collectives per step (the collective's
input), averaged over the steps from 2 on (after every method's warm-up):
the all-reduce's float32 buffer, 4 per parameter; for fp16 and PowerSGD the
tensors their hooks all-reduce, measured by wrapping torch.distributed.all_reduce
while they run (PowerSGD's P and Q factors, (rows + cols) x rank floats per
compressed matrix, plus its uncompressed 1-D tensors); for fedpress the state's
``sent_bytes`` (each bucket's payload padded to the longer rank's, plus an
8-byte size). A ring all-reduce sends 2(n-1)/n times its input per rank and a
ring all-gather (n-1) times; both factors are 1 at the two ranks run here.
The final loss is over the training set, the accuracy over the test set; both
ranks' parameters are checked to be bit-identical after every run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any, Optional

import numpy as np

WORLD_SIZE = 2
START_ITER = 2  # PowerSGD's start_powerSGD_iter and fedpress's start_iter
BUCKET_CAP_MB = 64
DEFAULT_SPECS = ["q8", "q8+zstd", "eden4", "eden4:shared", "topk:0.1+q8+zstd", "topk:0.01+q8+zstd", "topk:0.01+q4+zstd"]


@contextlib.contextmanager
def counting_all_reduce(counter: list[int]) -> Iterator[None]:
    """Adds the bytes of every tensor passed to torch.distributed.all_reduce to counter[0]
    (torch's hooks call it through the module, so replacing the attribute sees them all,
    including PowerSGD's calls from its future callbacks on other threads)."""
    import torch.distributed as dist

    original = dist.all_reduce
    lock = threading.Lock()

    def all_reduce(tensor: Any, *args: Any, **kwargs: Any) -> Any:
        with lock:
            counter[0] += tensor.numel() * tensor.element_size()
        return original(tensor, *args, **kwargs)

    dist.all_reduce = all_reduce
    try:
        yield
    finally:
        dist.all_reduce = original


def make_model(hidden: int) -> Any:
    import torch

    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
    )


def register(method: str, model: Any) -> Optional[Any]:
    """Registers the method's hook on the DDP model; returns the hook's state."""
    from fedpress.ddp import CompressionState, compress_hook
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if method == "allreduce":
        return None
    if method == "fp16":
        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
        return None
    if method.startswith("powersgd:"):
        state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=int(method.split(":")[1]), start_powerSGD_iter=START_ITER
        )
        model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        return state
    state = CompressionState(method, start_iter=START_ITER)
    model.register_comm_hook(state, compress_hook)
    return state


def run_method(method: str, rank: int, steps: int, hidden: int, batch: int, data: tuple) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    from fedpress.ddp import CompressionState
    from torch.nn.parallel import DistributedDataParallel

    x_train, y_train, x_test, y_test = data
    # One bucket for every method: PowerSGD's future callbacks issue all-reduces from gloo's
    # threads, and with several buckets in flight the two ranks can issue them in different
    # orders (gloo then aborts with a size mismatch). An explicit cap also lifts DDP's 1 MiB
    # cap on the first bucket.
    model = DistributedDataParallel(make_model(hidden), bucket_cap_mb=BUCKET_CAP_MB)
    state = register(method, model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    counted = [0]
    per_step = []
    start = 0.0
    with counting_all_reduce(counted):
        for step in range(steps):
            if step == START_ITER:  # time the steady state: buckets rebuilt, hooks compressing
                dist.barrier()
                start = time.perf_counter()
            order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(step))
            idx = order[rank * batch : (rank + 1) * batch]
            optimizer.zero_grad()
            loss_fn(model(x_train[idx]), y_train[idx]).backward()
            optimizer.step()
            per_step.append(counted[0])
    dist.barrier()
    seconds = (time.perf_counter() - start) / (steps - START_ITER)

    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if method == "allreduce":
        sent = [4 * num_params] * steps
    elif isinstance(state, CompressionState):
        sent = [r.sent_bytes for r in state.history]
    else:
        sent = list(np.diff([0, *per_step]))
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    replicas = [torch.empty_like(flat) for _ in range(WORLD_SIZE)]
    dist.all_gather(replicas, flat)
    identical = all(torch.equal(replicas[0], r) for r in replicas[1:])
    with torch.no_grad():
        train_loss = float(loss_fn(model(x_train), y_train))
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    return {
        "method": method,
        "bytes": float(np.mean(sent[START_ITER:])),
        "raw": 4 * num_params,
        "loss": train_loss,
        "accuracy": accuracy,
        "ms": 1e3 * seconds,
        "identical": identical,
        "params": num_params,
    }


def worker(rank: int, store: str, methods: list[str], steps: int, hidden: int, batch: int) -> None:
    import torch
    import torch.distributed as dist
    from fedpress.train import load_task

    torch.set_num_threads(1)  # two ranks on two cores
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=300)
    )
    try:
        train, test = load_task("digits", seed=0)
        data = (
            torch.from_numpy(train.x),
            torch.from_numpy(train.y),
            torch.from_numpy(test.x),
            torch.from_numpy(test.y),
        )
        rows = []
        for method in methods:
            rows.append(run_method(method, rank, steps, hidden, batch, data))
            if rank == 0:
                r = rows[-1]
                print(f"  {method}: {r['ms']:.1f} ms/step", flush=True)
        if rank == 0:
            print_table(rows, steps, hidden, batch)
    finally:
        dist.destroy_process_group()


def label(method: str) -> str:
    if method == "allreduce":
        return "allreduce (DDP default)"
    if method == "fp16":
        return "fp16_compress_hook"
    if method.startswith("powersgd:"):
        return f"PowerSGD rank {method.split(':')[1]}"
    return f"fedpress {method}"


def print_table(rows: list[dict[str, Any]], steps: int, hidden: int, batch: int) -> None:
    base = rows[0]
    print(
        f"\nDDP, {WORLD_SIZE} gloo ranks on CPU, MLP 64-{hidden}-{hidden}-10 ({base['params']:,} params), "
        f"digits, {steps} steps, batch {batch} per rank, SGD lr 0.05 momentum 0.9"
    )
    print(
        f"{'method':30s} {'bytes/rank/step':>16s} {'vs allreduce':>13s} {'train loss':>11s} "
        f"{'test acc':>9s} {'ms/step':>8s} {'replicas':>9s}"
    )
    for r in rows:
        print(
            f"{label(r['method']):30s} {r['bytes']:16,.0f} {base['bytes'] / r['bytes']:12.1f}x "
            f"{r['loss']:11.4f} {100 * r['accuracy']:8.1f}% {r['ms']:8.1f} "
            f"{'same' if r['identical'] else 'DIFFER':>9s}"
        )
    print(
        f"bytes and ms: means over steps {START_ITER}..{steps - 1}; bytes are each rank's input to "
        "the collectives (see the module docstring)"
    )
    if not all(r["identical"] for r in rows):
        print("FAIL: replicas differ after a run", file=sys.stderr)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64, help="examples per rank per step")
    parser.add_argument("--specs", nargs="+", default=DEFAULT_SPECS, help="fedpress specs to run")
    args = parser.parse_args(argv)
    if args.steps <= START_ITER:
        parser.error(f"--steps must exceed {START_ITER}")
    try:
        import torch.distributed as dist
        import torch.multiprocessing as mp
    except ImportError as exc:
        print(f"needs torch: {exc}")
        return 1
    if not dist.is_available() or not dist.is_gloo_available():
        print("needs torch.distributed with the gloo backend")
        return 1
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import fedpress as fp

    for spec in args.specs:
        fp.parse_spec(spec)  # a bad spec fails here, not in both workers
    methods = ["allreduce", "fp16", "powersgd:1", "powersgd:2", *args.specs]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(
            worker,
            args=(os.path.join(tmp, "store"), methods, args.steps, args.hidden, args.batch),
            nprocs=WORLD_SIZE,
            join=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
