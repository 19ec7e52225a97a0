"""``fedpress demo``: a real federation on loopback, one run per codec, and the
bytes-versus-accuracy picture it produces.

For each codec a server and several clients run in one process but talk over
real TCP sockets on 127.0.0.1, so every byte in the table crossed a socket.
The task is scikit-learn's bundled digits (an MLP, IID clients); the clients
use error feedback. The output folder gets ``results.json``, each run's
``rounds.jsonl`` and ``accuracy_vs_uplink.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Optional

__all__ = ["DEFAULT_CODECS", "run_demo", "add_arguments", "run_from_args"]

DEFAULT_CODECS = ("fp32", "fp16", "q8+zstd", "q4", "eden4", "topk:0.01+q4+zstd", "sign")


def _progress(text: str, done: int, total: int, stream=sys.stderr) -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    stream.write(f"\r{text:28s} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    if done >= total:
        stream.write("\n")
    stream.flush()


async def _one_run(codec: str, *, task: str, rounds: int, clients: int, clients_per_round: int,
                   out_dir: Path, seed: int, lr: float, epochs: int, downlink: Optional[str],
                   data_dir: Optional[str], show_progress: bool) -> dict[str, Any]:
    from .federation import Client, Server
    from .sweep.cell import parse_cell
    from .train import client_partition, get_params, load_task, make_evaluate_fn, make_model, make_train_fn

    cell = parse_cell(codec)
    train, test = load_task(task, data_dir=data_dir, seed=seed)
    token = secrets.token_bytes(32)
    model = make_model(task, seed=seed)
    run_dir = out_dir / re.sub(r"[^A-Za-z0-9._-]+", "_", str(cell).replace("+", "-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("rounds.jsonl",):
        if (run_dir / stale).exists():
            (run_dir / stale).unlink()
    server = Server(host="127.0.0.1", port=0, initial_params=get_params(model), rounds=rounds,
                    clients_per_round=clients_per_round, min_clients=clients, codec=cell.spec,
                    downlink=cell.downlink or downlink, token=token, round_timeout=60.0, min_fit=1,
                    server_lr=cell.server_lr, server_momentum=cell.server_momentum, server_lr_decay=cell.server_decay,
                    downlink_mode=cell.downlink_mode,
                    evaluate_fn=make_evaluate_fn(task, test), out_dir=str(run_dir), seed=seed,
                    insecure=True)  # loopback only: nothing leaves this machine
    label = f"{codec}"
    started = time.perf_counter()
    server_task = asyncio.create_task(server.run())
    while getattr(server, "port", 0) in (0, None):
        if server_task.done():
            await server_task
        await asyncio.sleep(0.01)
    client_tasks = []
    for i in range(clients):
        part = client_partition(train, i, clients, scheme="iid", seed=seed)
        train_fn = make_train_fn(task, part, epochs=epochs, lr=lr, momentum=0.9, seed=seed * 1000 + i)
        options = cell.encoder_options()
        table = options.pop("table", None)
        c = Client(f"127.0.0.1:{server.port}", token=token, train_fn=train_fn, codec=cell.spec,
                   client_id=f"client-{i}", codec_options={"table": table} if table else None, insecure=True,
                   **options)
        client_tasks.append(asyncio.create_task(c.run()))
    if show_progress:
        while not server_task.done():
            _progress(label, sum(1 for r in server.history if r.get("round", 0) >= 1), rounds)
            await asyncio.sleep(0.1)
    await server_task
    await asyncio.wait_for(asyncio.gather(*client_tasks, return_exceptions=True), timeout=30)
    if show_progress:
        _progress(label, rounds, rounds)
    seconds = time.perf_counter() - started
    history = list(server.history)
    trained = [r for r in history if r.get("round", 0) >= 1]
    uplink = sum(r.get("uplink_wire_bytes", 0) for r in history)
    downlink_bytes = sum(r.get("downlink_wire_bytes", 0) for r in history)
    cumulative, curve = 0, []
    for r in history:
        cumulative += r.get("uplink_wire_bytes", 0)
        if r.get("round", 0) >= 1 and r.get("test_accuracy") is not None:
            curve.append((cumulative, r["test_accuracy"]))
    final = trained[-1].get("test_accuracy") if trained else None
    return {"codec": codec, "final_accuracy": final, "uplink_wire_bytes": uplink,
            "uplink_payload_bytes": sum(r.get("uplink_payload_bytes", 0) for r in history),
            "downlink_wire_bytes": downlink_bytes, "seconds": seconds, "rounds": len(trained),
            "curve": curve, "run_dir": str(run_dir)}


def _plot(results: list[dict], path: Path) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install 'fedpress[demo]')"
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for r in results:
        if r["curve"]:
            xs, ys = zip(*r["curve"])
            ax.plot(xs, ys, marker="o", markersize=3, label=r["codec"])
    ax.set_xscale("log")
    ax.set_xlabel("cumulative uplink bytes on the wire (all clients)")
    ax.set_ylabel("test accuracy")
    ax.set_title("fedpress demo: accuracy against bytes sent")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return None


def run_demo(*, codecs=DEFAULT_CODECS, task: str = "digits", rounds: int = 20, clients: int = 8,
             clients_per_round: Optional[int] = None, out_dir: str = "fedpress-demo", seed: int = 0,
             lr: float = 0.05, epochs: int = 2, downlink: Optional[str] = None,
             data_dir: Optional[str] = None, show_progress: bool = True) -> list[dict]:
    """Runs the demo and returns one result dict per codec (also written to out_dir)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for codec in codecs:
        results.append(asyncio.run(_one_run(
            codec, task=task, rounds=rounds, clients=clients,
            clients_per_round=clients_per_round or clients, out_dir=out, seed=seed, lr=lr,
            epochs=epochs, downlink=downlink, data_dir=data_dir, show_progress=show_progress)))
    base = next((r["uplink_wire_bytes"] for r in results if r["codec"] == "fp32"), None)
    for r in results:
        r["uplink_ratio_vs_fp32"] = (base / r["uplink_wire_bytes"]) if base and r["uplink_wire_bytes"] else None
    note = _plot(results, out / "accuracy_vs_uplink.png")
    summary = {"task": task, "rounds": rounds, "clients": clients, "seed": seed, "results": results}
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out / "results.json")
    _print_table(results, out, note)
    return results


def _print_table(results: list[dict], out: Path, note: Optional[str]) -> None:
    width = max([20] + [len(r["codec"]) for r in results])
    print(f"{'codec':{width}s} {'accuracy':>9s} {'uplink MB':>10s} {'downlink MB':>12s} {'uplink vs fp32':>15s} {'seconds':>8s}")
    for r in results:
        acc = f"{r['final_accuracy']:.3f}" if r["final_accuracy"] is not None else "n/a"
        ratio = f"{r['uplink_ratio_vs_fp32']:.1f}x" if r.get("uplink_ratio_vs_fp32") else "n/a"
        print(f"{r['codec']:{width}s} {acc:>9s} {r['uplink_wire_bytes'] / 1e6:10.3f} "
              f"{r['downlink_wire_bytes'] / 1e6:12.3f} {ratio:>15s} {r['seconds']:8.1f}")
    print(f"results: {out / 'results.json'}; plot: {out / 'accuracy_vs_uplink.png'}")
    if note:
        print(note)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="few rounds and clients (under 30 s)")
    parser.add_argument("--codecs", nargs="+", default=list(DEFAULT_CODECS), metavar="CELL",
                        help="uplink specs, each optionally with sweep cell options: SPEC[@key=value,...], "
                             "e.g. topk:0.01+q4+zstd@momentum=0.9,downlink=topk:0.05+q8+zstd")
    parser.add_argument("--task", default="digits", choices=["digits", "mnist"])
    parser.add_argument("--data-dir", default=None, help="MNIST IDX folder for --task mnist")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--clients", type=int, default=None)
    parser.add_argument("--downlink", default=None, metavar="SPEC", help="compress the downlink too")
    parser.add_argument("--out", default="fedpress-demo", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")


def run_from_args(args: argparse.Namespace) -> int:
    from .sweep.cell import parse_cell

    for text in args.codecs:
        try:
            parse_cell(text)
        except ValueError as exc:
            print(f"fedpress demo: {exc}", file=sys.stderr)
            return 2
    rounds = args.rounds or (4 if args.quick else 30)
    clients = args.clients or (4 if args.quick else 8)
    run_demo(codecs=args.codecs, task=args.task, rounds=rounds, clients=clients, out_dir=args.out,
             seed=args.seed, downlink=args.downlink, data_dir=args.data_dir,
             show_progress=not args.no_progress)
    return 0
