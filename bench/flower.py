"""Flower simulation on the digits task: accuracy and uplink bytes per round,
Flower's own float32 arrays against fedpress codecs, with FedAvg.

    python bench/flower.py                      # none, q8+zstd, topk:0.01+q4+zstd; 10 rounds, 3 nodes
    python bench/flower.py --specs none topk:0.05+q8+zstd --rounds 4 --json out.json

Each spec runs in its own process through Flower's Simulation Runtime
(``flwr.simulation.run_simulation``, Ray backend, needs ``fedpress[flower]``):
real ClientApps with ``compress_mod`` on the nodes, ``FedPress(FedAvg())`` on
the server. "none" is plain Flower (no mod), still wrapped so that its bytes are
counted the same way. Uplink bytes: the Array data of every train reply
(payload bytes for fedpress, Flower's npy-serialised arrays for none).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Optional

DEFAULT_SPECS = ["none", "q8+zstd", "topk:0.01+q4+zstd"]


def run_one(
    spec: str, rounds: int, nodes: int, epochs: int, lr: float, downlink: Optional[str], seed: int
) -> dict[str, Any]:
    """One simulation in this process; returns accuracies and the wrapper's byte history."""
    import torch
    from fedpress.flower import FedPress, compress_mod
    from fedpress.train import load_task, partition
    from fedpress.train.loops import evaluate, train_local
    from fedpress.train.models import make_model
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    torch.manual_seed(seed)
    train, test = load_task("digits", seed=seed)
    parts = partition(train.y, nodes, "iid", seed=seed)
    client_app = ClientApp(mods=[] if spec == "none" else [compress_mod(spec)])

    @client_app.train()
    def train_handler(msg: Message, context: Context) -> Message:
        model = make_model("digits", seed=seed)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        data = train.subset(parts[int(context.node_config["partition-id"])])
        server_round = int(msg.content["config"]["server-round"])
        stats = train_local(model, data, epochs=epochs, lr=lr, momentum=0.9, seed=seed * 1000 + server_round)
        return Message(
            content=RecordDict(
                {
                    "arrays": ArrayRecord(model.state_dict()),
                    "metrics": MetricRecord({"num-examples": len(data), "train_loss": float(stats["loss"])}),
                }
            ),
            reply_to=msg,
        )

    server_app = ServerApp()
    out: dict[str, Any] = {"spec": spec, "downlink": downlink, "rounds": rounds, "nodes": nodes}

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedPress(
            FedAvg(fraction_evaluate=0.0, min_train_nodes=nodes, min_available_nodes=nodes), downlink=downlink
        )
        accuracies: dict[int, float] = {}

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model = make_model("digits", seed=seed)
            model.load_state_dict(arrays.to_torch_state_dict())
            _, accuracy = evaluate(model, test)
            accuracies[server_round] = float(accuracy)
            return MetricRecord({"accuracy": float(accuracy)})

        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(make_model("digits", seed=seed).state_dict()),
            num_rounds=rounds,
            evaluate_fn=evaluate_fn,
        )
        out["accuracy"] = [accuracies[r] for r in sorted(accuracies)]
        out["history"] = strategy.history

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=nodes,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    if "history" not in out:
        raise RuntimeError(f"the simulation for {spec!r} did not finish")
    return out


def _table(results: list[dict[str, Any]]) -> str:
    base = next((r for r in results if r["spec"] == "none"), None)
    lines = [
        "| spec | final accuracy | uplink bytes / round (3 nodes) | vs Flower float32 | downlink / round |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        up = sum(row["uplink_payload"] for row in r["history"]) / len(r["history"])
        down = sum(row["train_downlink_payload"] for row in r["history"]) / len(r["history"])
        ratio = ""
        if base is not None:
            base_up = sum(row["uplink_payload"] for row in base["history"]) / len(base["history"])
            ratio = f"{base_up / up:.1f}x"
        lines.append(f"| {r['spec']} | {r['accuracy'][-1]:.3f} | {up:,.0f} | {ratio} | {down:,.0f} |")
    lines.append("")
    lines.append("accuracy per round (round 0 = initial model):")
    for r in results:
        lines.append(f"  {r['spec']:>22}: " + " ".join(f"{a:.3f}" for a in r["accuracy"]))
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--specs", nargs="+", default=DEFAULT_SPECS)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--downlink", default=None, help="absolute codec for the global model, e.g. fp16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child process mode
    args = parser.parse_args(argv)

    if args.one:
        result = run_one(args.specs[0], args.rounds, args.nodes, args.epochs, args.lr, args.downlink, args.seed)
        with open(args.json, "w") as f:
            json.dump(result, f)
        return 0

    results = []
    for spec in args.specs:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "result.json")
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--one",
                "--specs",
                spec,
                "--rounds",
                str(args.rounds),
                "--nodes",
                str(args.nodes),
                "--epochs",
                str(args.epochs),
                "--lr",
                str(args.lr),
                "--seed",
                str(args.seed),
                "--json",
                path,
            ]
            if args.downlink:
                cmd += ["--downlink", args.downlink]
            env = dict(os.environ, RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0", RAY_DEDUP_LOGS="0")
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0 or not os.path.exists(path):
                sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
                raise SystemExit(f"simulation for {spec!r} failed (exit {proc.returncode})")
            with open(path) as f:
                results.append(json.load(f))
        print(f"{spec}: final accuracy {results[-1]['accuracy'][-1]:.3f}", flush=True)
    print(_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
