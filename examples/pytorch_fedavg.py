"""FedAvg in plain PyTorch with compressed uplink updates: the lines marked ``# fedpress``
are all that compression adds to a hand-written federated loop.

Each round every client copies the global model, trains it for a local epoch of SGD on its
own shard of scikit-learn's digits, and uploads ``state_delta(local_model, global_model)``
through its own ``fp.Encoder`` (which keeps what it did not send for the next round); the
server averages the payloads, weighted by shard size, and adds the mean to the global model.

    python examples/pytorch_fedavg.py                       # topk:0.01+q4+zstd
    python examples/pytorch_fedavg.py --spec fp32           # uncompressed, for comparison

Needs torch and scikit-learn (``pip install 'fedpress[train]'``).
"""

from __future__ import annotations

import argparse
import copy
from typing import Optional, Sequence

import fedpress as fp  # fedpress
import torch
import torch.nn.functional as F
from fedpress.torch import apply_delta, state_delta  # fedpress
from fedpress.train import load_task, make_model, partition_iid


def train_locally(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=generator).split(batch_size):
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--spec", default="topk:0.01+q4+zstd", help="codec spec of the uplink")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2, help="local epochs per round")
    parser.add_argument("--lr", type=float, default=0.2, help="client SGD learning rate")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads: a model this small runs fastest on one")
    args = parser.parse_args(argv)
    for flag in ("rounds", "clients", "epochs", "batch_size", "threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Runs the loop and returns ``initial_accuracy``, ``accuracy`` (one per round),
    ``uplink_bytes`` and ``raw_bytes`` (the same updates as plain float32) in total."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    train, test = load_task("digits", seed=args.seed)
    shards = [
        (torch.from_numpy(train.x[idx]), torch.from_numpy(train.y[idx]))
        for idx in partition_iid(train.y, args.clients, seed=args.seed)
    ]
    x_test, y_test = torch.from_numpy(test.x), torch.from_numpy(test.y)

    global_model = make_model("digits", seed=args.seed)
    encoders = [fp.Encoder(args.spec) for _ in shards]  # fedpress
    raw_update_bytes = sum(t.numel() * 4 for t in global_model.state_dict().values())
    history = {
        "initial_accuracy": accuracy(global_model, x_test, y_test),
        "accuracy": [],
        "uplink_bytes": 0,
        "raw_bytes": 0,
    }
    print(
        f"spec {args.spec}: {args.clients} clients, {raw_update_bytes:,} bytes per float32 "
        f"update, initial accuracy {history['initial_accuracy']:.3f}"
    )
    for round_number in range(1, args.rounds + 1):
        agg = fp.Aggregator()  # fedpress
        uplink = 0
        for i, (x, y) in enumerate(shards):
            local_model = copy.deepcopy(global_model)
            seed = args.seed * 1_000_003 + round_number * 1_009 + i
            generator = torch.Generator().manual_seed(seed)
            train_locally(local_model, x, y, args.epochs, args.lr, args.batch_size, generator)
            payload = encoders[i].encode(state_delta(local_model, global_model))  # fedpress
            agg.add(payload, weight=len(y))  # fedpress
            uplink += len(payload)
        apply_delta(global_model, agg.result())  # fedpress

        acc = accuracy(global_model, x_test, y_test)
        raw = raw_update_bytes * len(shards)
        history["accuracy"].append(acc)
        history["uplink_bytes"] += uplink
        history["raw_bytes"] += raw
        print(
            f"round {round_number:3d}  accuracy {acc:.3f}  uplink {uplink:9,} bytes  "
            f"(float32 {raw:,}: {raw / uplink:5.1f}x smaller)"
        )
    print(
        f"final accuracy {history['accuracy'][-1]:.3f} after {args.rounds} rounds; uplink "
        f"{history['uplink_bytes']:,} bytes vs {history['raw_bytes']:,} as float32 "
        f"({history['raw_bytes'] / history['uplink_bytes']:.1f}x smaller)"
    )
    return history


if __name__ == "__main__":
    main()
