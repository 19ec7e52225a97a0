"""``fedpress demo``: a real federation on loopback, one run per codec, and the
bytes-versus-accuracy picture it produces.

For each codec a server and several clients run in one process but talk over
real TCP sockets on 127.0.0.1, so every byte in the table crossed a socket.
The task is scikit-learn's bundled digits (an MLP, IID clients); the clients
use error feedback. Rows whose uplink is compressed also compress the downlink
(``--downlink``, default ``DEFAULT_DOWNLINK``), so the table's total-traffic
ratio is what a deployment would see. A seed fixes every number: clients are
seeded, and the server sums each round's updates in client order (``ordered``).
The output folder gets ``results.json``, each run's ``rounds.jsonl`` and
``accuracy_vs_bytes.png`` (accuracy against uplink and against total bytes); its
files are replaced on each run.
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

DEFAULT_CODECS = (
    "fp32",
    "fp16",
    "q8+zstd",
    "q4",
    "eden4",
    "topk:0.01+q4+zstd",
    "sign",
    # Secure aggregation (the server sees only the sum), then with distributed DP at epsilon ~8.
    "int4:clip=0.05:nmax=2048@secagg=on",
    "int8:clip=0.05:nmax=2048@secagg=on,clip=0.5,dp=3.5",
)
#: The downlink codec of the rows whose uplink is compressed (the global model's
#: round-to-round difference, with the server's error feedback).
DEFAULT_DOWNLINK = "q8+zstd"


class _Progress:
    """A progress bar over a run's rounds: tqdm when it is installed, else one line
    per run."""

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.bar: Any = None
        self.done = 0
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            print(f"{label}: {total} rounds...", file=sys.stderr)
            return
        self.bar = tqdm(
            total=total, desc=f"{label:24.24s}", unit="round", leave=True, file=sys.stderr, dynamic_ncols=True
        )

    def update(self, done: int, text: str = "") -> None:
        if self.bar is not None and done > self.done:
            self.bar.update(done - self.done)
            if text:
                self.bar.set_postfix_str(text, refresh=False)
        self.done = max(self.done, done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


async def _one_run(
    codec: str,
    *,
    task: Any,
    rounds: int,
    clients: int,
    clients_per_round: int,
    out_dir: Path,
    seed: int,
    lr: float,
    epochs: int,
    downlink: Optional[str],
    data_dir: Optional[str],
    show_progress: bool,
) -> dict[str, Any]:
    from ._seeds import PURPOSE_TRAINING, derive_seed
    from .federation import Client, Server
    from .sweep.cell import parse_cell
    from .train import client_partition, get_params, make_evaluate_fn, make_train_fn

    cell = parse_cell(codec)
    spec = task
    train, test = spec.train, spec.test
    token = secrets.token_bytes(32)
    run_dir = out_dir / re.sub(r"[^A-Za-z0-9._-]+", "_", str(cell).replace("+", "-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    if cell.downlink:
        downlink = cell.downlink
    elif downlink == "auto":
        downlink = None if cell.spec == "fp32" else DEFAULT_DOWNLINK
    elif downlink == "none":
        downlink = None
    server = Server(
        host="127.0.0.1",
        port=0,
        initial_params=get_params(spec.model_fn(seed)),
        rounds=rounds,
        clients_per_round=clients_per_round,
        min_clients=clients,
        codec=cell.spec,
        downlink=downlink,
        token=token,
        round_timeout=60.0,
        min_fit=1,
        ordered=True,
        overwrite=True,
        server_lr=cell.server_lr,
        server_momentum=cell.server_momentum,
        server_lr_decay=cell.server_decay,
        downlink_mode=cell.downlink_mode,
        secure_aggregation=cell.secagg,
        clip_norm=cell.clip if cell.secagg or cell.dp is not None else None,
        dp_noise_multiplier=cell.dp,
        evaluate_fn=make_evaluate_fn(spec, test),
        out_dir=str(run_dir),
        seed=seed,
        insecure=True,
    )  # loopback only: nothing leaves this machine
    started = time.perf_counter()
    server_task = asyncio.create_task(server.run())
    while getattr(server, "port", 0) in (0, None):
        if server_task.done():
            await server_task
        await asyncio.sleep(0.01)
    client_tasks = []
    for i in range(clients):
        part = client_partition(train, i, clients, scheme="iid", seed=seed)
        train_fn = make_train_fn(
            spec, part, epochs=epochs, lr=lr, momentum=0.9, seed=derive_seed(seed, PURPOSE_TRAINING, i)
        )
        options = cell.encoder_options()
        table = options.pop("table", None)
        c = Client(
            f"127.0.0.1:{server.port}",
            token=token,
            train_fn=train_fn,
            codec=cell.spec,
            client_id=f"client-{i}",
            codec_options={"table": table} if table else None,
            insecure=True,
            seed=seed,
            **options,
        )
        client_tasks.append(asyncio.create_task(c.run()))
    progress = _Progress(codec, rounds, show_progress)
    try:
        while not server_task.done():
            trained = [r for r in server.history if r.get("round", 0) >= 1]
            if trained:
                accuracy = trained[-1].get("test_accuracy")
                progress.update(len(trained), "" if accuracy is None else f"accuracy {accuracy:.3f}")
            await asyncio.wait({server_task}, timeout=0.1)
        await server_task
        done = [r for r in server.history if r.get("round", 0) >= 1]
        accuracy = done[-1].get("test_accuracy") if done else None
        progress.update(rounds, "" if accuracy is None else f"accuracy {accuracy:.3f}")
    finally:
        progress.close()
    await asyncio.wait_for(asyncio.gather(*client_tasks, return_exceptions=True), timeout=30)
    seconds = time.perf_counter() - started
    history = list(server.history)
    trained = [r for r in history if r.get("round", 0) >= 1]
    uplink = sum(r.get("uplink_wire_bytes", 0) for r in history)
    downlink_bytes = sum(r.get("downlink_wire_bytes", 0) for r in history)
    up, total, curve = 0, 0, []
    for r in history:
        up += r.get("uplink_wire_bytes", 0)
        total += r.get("uplink_wire_bytes", 0) + r.get("downlink_wire_bytes", 0)
        if r.get("round", 0) >= 1 and r.get("test_accuracy") is not None:
            curve.append((up, total, r["test_accuracy"]))
    final = trained[-1].get("test_accuracy") if trained else None
    privacy = trained[-1].get("privacy") if trained else None
    return {
        "codec": codec,
        "epsilon": privacy["epsilon"] if privacy else None,
        "downlink": downlink,
        "final_accuracy": final,
        "uplink_wire_bytes": uplink,
        "uplink_payload_bytes": sum(r.get("uplink_payload_bytes", 0) for r in history),
        "downlink_wire_bytes": downlink_bytes,
        "total_wire_bytes": uplink + downlink_bytes,
        "seconds": seconds,
        "rounds": len(trained),
        "curve": curve,
        "run_dir": str(run_dir),
    }


def _plot(results: list[dict], path: Path) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install 'fedpress[demo]')"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=120, sharey=True)
    for ax, column, label in (
        (axes[0], 0, "cumulative uplink bytes on the wire (all clients)"),
        (axes[1], 1, "cumulative uplink + downlink bytes on the wire"),
    ):
        for r in results:
            if r["curve"]:
                xs = [point[column] for point in r["curve"]]
                ax.plot(xs, [point[2] for point in r["curve"]], marker="o", markersize=3, label=r["codec"])
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[0].set_title("accuracy against uplink bytes")
    axes[1].set_title("accuracy against total bytes")
    axes[1].legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return None


def run_demo(
    *,
    codecs=DEFAULT_CODECS,
    task: Any = "digits",
    rounds: int = 20,
    clients: int = 8,
    clients_per_round: Optional[int] = None,
    out_dir: str = "fedpress-demo",
    seed: int = 0,
    lr: float = 0.05,
    epochs: int = 2,
    downlink: Optional[str] = "auto",
    data_dir: Optional[str] = None,
    show_progress: bool = True,
) -> list[dict]:
    """Runs the demo and returns one result dict per codec (also written to out_dir).
    ``task``: ``digits``, ``mnist``, ``module:function`` or a ``fedpress.train.Task``."""
    from .train import Task, resolve_task

    spec = task if isinstance(task, Task) else resolve_task(task, data_dir=data_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for codec in codecs:
        results.append(
            asyncio.run(
                _one_run(
                    codec,
                    task=spec,
                    rounds=rounds,
                    clients=clients,
                    clients_per_round=clients_per_round or clients,
                    out_dir=out,
                    seed=seed,
                    lr=lr,
                    epochs=epochs,
                    downlink=downlink,
                    data_dir=data_dir,
                    show_progress=show_progress,
                )
            )
        )
    base = next((r for r in results if r["codec"] == "fp32"), None)
    for r in results:
        for what in ("uplink", "total"):
            mine = r[f"{what}_wire_bytes"]
            r[f"{what}_ratio_vs_fp32"] = base[f"{what}_wire_bytes"] / mine if base and mine else None
    note = _plot(results, out / "accuracy_vs_bytes.png")
    summary = {"task": spec.name, "rounds": rounds, "clients": clients, "seed": seed, "results": results}
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out / "results.json")
    _print_table(results, out, note)
    return results


def _print_table(results: list[dict], out: Path, note: Optional[str]) -> None:
    width = max([20] + [len(r["codec"]) for r in results])
    down = max([12] + [len(r["downlink"] or "fp32 model") for r in results])
    print(
        f"{'codec':{width}s} {'downlink':{down}s} {'accuracy':>9s} {'uplink MB':>10s} {'downlink MB':>12s} "
        f"{'uplink vs fp32':>15s} {'total vs fp32':>14s} {'seconds':>8s} {'epsilon':>8s}"
    )
    for r in results:
        acc = f"{r['final_accuracy']:.3f}" if r["final_accuracy"] is not None else "n/a"
        ratios = [f"{r[k]:.1f}x" if r.get(k) else "n/a" for k in ("uplink_ratio_vs_fp32", "total_ratio_vs_fp32")]
        print(
            f"{r['codec']:{width}s} {r['downlink'] or 'fp32 model':{down}s} {acc:>9s} "
            f"{r['uplink_wire_bytes'] / 1e6:10.3f} {r['downlink_wire_bytes'] / 1e6:12.3f} {ratios[0]:>15s} "
            f"{ratios[1]:>14s} {r['seconds']:8.1f} "
            + (f"{r['epsilon']:8.2f}" if r.get("epsilon") is not None else f"{'—':>8s}")
        )
    print(f"results: {out / 'results.json'}; plot: {out / 'accuracy_vs_bytes.png'}")
    if note:
        print(note)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="few rounds and clients (under 30 s)")
    parser.add_argument(
        "--codecs",
        nargs="+",
        default=list(DEFAULT_CODECS),
        metavar="CELL",
        help="uplink specs, each optionally with sweep cell options: SPEC[@key=value,...], "
        "e.g. topk:0.01+q4+zstd@momentum=0.9,downlink=topk:0.05+q8+zstd",
    )
    parser.add_argument(
        "--task",
        default="digits",
        metavar="TASK",
        help="digits (bundled with scikit-learn), mnist (--data-dir) or module:function returning "
        "a fedpress.train.Task (your model and data)",
    )
    parser.add_argument("--data-dir", default=None, help="MNIST IDX folder for --task mnist")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per codec (default 30; 4 with --quick)")
    parser.add_argument(
        "--clients", type=int, default=None, help="clients, all sampled every round (default 8; 4 with --quick)"
    )
    parser.add_argument(
        "--downlink",
        default="auto",
        metavar="SPEC",
        help=f"codec of the model updates sent to the clients: auto ({DEFAULT_DOWNLINK} for the "
        "rows whose uplink is compressed, the fp32 model for fp32), none (the fp32 model for "
        "every row), or a spec",
    )
    parser.add_argument("--out", default="fedpress-demo", help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="fixes every number of the run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--quiet", action="store_true", help="only the table and warnings: no progress bar")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="info: a progress bar per codec and the table; debug adds the federation's own "
        "log (joins, one line per round)",
    )


def run_from_args(args: argparse.Namespace) -> int:
    from ._command_errors import UsageError
    from .codec import parse_spec
    from .sweep.cell import parse_cell

    for text in args.codecs:
        try:
            parse_cell(text)
        except ValueError as exc:
            raise UsageError(f"{exc}") from None
    if args.downlink not in ("auto", "none"):
        try:
            parse_spec(args.downlink)
        except ValueError as exc:
            raise UsageError(f"--downlink: {exc}") from None
    from .train import resolve_task

    try:
        task = resolve_task(args.task, data_dir=args.data_dir)
    except ValueError as exc:  # it names --task and the fix
        raise UsageError(str(exc)) from None
    import logging

    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if args.log_level == "debug":
        logging.getLogger("fedpress").setLevel(logging.INFO)
    elif args.log_level == "error" or args.quiet:
        logging.getLogger("fedpress").setLevel(logging.ERROR)
    rounds = args.rounds or (4 if args.quick else 30)
    clients = args.clients or (4 if args.quick else 8)
    run_demo(
        codecs=args.codecs,
        task=task,
        rounds=rounds,
        clients=clients,
        out_dir=args.out,
        seed=args.seed,
        downlink=args.downlink,
        data_dir=args.data_dir,
        show_progress=not (args.no_progress or args.quiet) and args.log_level in ("debug", "info"),
    )
    return 0
