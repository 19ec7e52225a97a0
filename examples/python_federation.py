"""A federation from Python: your own torch model, a `fedpress.federation.Server` and
three `Client`s on loopback sockets, with the uplink compressed by a codec spec.

    python examples/python_federation.py                   # topk:0.05+q4+zstd, 10 rounds
    python examples/python_federation.py --codec fp32      # uncompressed, for comparison

The one thing to get right is `train_fn`: the client calls it each round with the global
model it just received (``{name: numpy array}``) and the round's config, and it returns

    (update, num_examples, metrics)

where ``update`` is the *difference* local model minus global model (same names and
shapes; the client compresses it, with error feedback), ``num_examples`` is the FedAvg
weight and ``metrics`` a small dict of numbers. The server averages the updates and adds
the mean to its model (``server_lr`` times it). `evaluate_fn(params)` runs on the server
after each round and returns ``{"accuracy": ..., "loss": ...}``.

A real deployment runs each Client in its own process or machine, with TLS
(`Server(ssl_context=server_context(cert, key))`, `Client(ssl_context=client_context(ca))`);
`insecure=True` is only for loopback, as here.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from custom_task import make_model, spirals  # noqa: E402  (this directory's task)
from fedpress.federation import Client, Server  # noqa: E402


def params_of(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def make_train_fn(x: np.ndarray, y: np.ndarray, seed: int):
    model = make_model(0)
    generator = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def train_fn(global_params: dict, config: dict) -> tuple[dict, int, dict]:
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in global_params.items()})
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for batch in torch.randperm(len(yt), generator=generator).split(32):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(xt[batch]), yt[batch])
            loss.backward()
            optimizer.step()
        local = params_of(model)
        update = {k: local[k] - global_params[k] for k in local}  # the difference, not the model
        return update, len(y), {"loss": loss.item()}

    return train_fn


def make_evaluate_fn(x: np.ndarray, y: np.ndarray):
    model = make_model(0)

    def evaluate_fn(params: dict) -> dict:
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in params.items()})
        with torch.no_grad():
            logits = model(torch.from_numpy(x))
            loss = F.cross_entropy(logits, torch.from_numpy(y))
        return {"accuracy": float((logits.argmax(1).numpy() == y).mean()), "loss": float(loss)}

    return evaluate_fn


async def federate(codec: str, rounds: int, clients: int) -> Server:
    x, y = spirals(3000, seed=1234)
    token = secrets.token_bytes(32)
    server = Server(
        "127.0.0.1",
        0,
        params_of(make_model(0)),
        rounds=rounds,
        clients_per_round=clients,
        codec=codec,
        token=token,
        evaluate_fn=make_evaluate_fn(x[2400:], y[2400:]),
        insecure=True,
    )
    await server.start()  # binds the port
    shards = np.array_split(np.arange(2400), clients)
    runs = [
        Client(
            f"127.0.0.1:{server.port}",
            token,
            make_train_fn(x[s], y[s], seed=i),
            client_id=f"site-{i}",
            insecure=True,
            seed=i,
        ).run()
        for i, s in enumerate(shards)
    ]
    await asyncio.gather(server.run(), *runs)
    return server


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--codec", default="topk:0.05+q4+zstd")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=3)
    args = parser.parse_args(argv)
    server = asyncio.run(federate(args.codec, args.rounds, args.clients))
    up = sum(r.get("uplink_wire_bytes", 0) for r in server.history)
    down = sum(r.get("downlink_wire_bytes", 0) for r in server.history)
    last = server.history[-1]
    print(
        f"{args.codec}: accuracy {last['test_accuracy']:.3f} after {last['round']} rounds; "
        f"uplink {up / 1e3:.1f} kB, downlink {down / 1e3:.1f} kB on the wire"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
