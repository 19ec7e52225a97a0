"""The ``fedpress sweep`` command: options, and one line per user mistake."""

from __future__ import annotations

import argparse
import logging
import sys

from .cell import OPTIONS, parse_cell

__all__ = ["add_arguments", "run_from_args"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options = "; ".join(f"{k}: {v}" for k, v in OPTIONS.items())
    parser.add_argument(
        "--task",
        nargs="+",
        default=["mnist"],
        metavar="TASK",
        help="digits, mnist, or module:function returning a fedpress.train.Task",
    )
    parser.add_argument("--data-dir", default=None, help="MNIST IDX folder (default ../shared/data/mnist)")
    parser.add_argument(
        "--cells", nargs="+", required=True, metavar="CELL", help=f"SPEC[@key=value,...]; options: {options}"
    )
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[0, 1, 2],
        metavar="SEED",
        help="one run per cell and seed; gaps are paired by seed",
    )
    parser.add_argument("--clients", type=int, default=50, help="clients the training set is split over")
    parser.add_argument("--per-round", type=int, default=10, help="clients sampled each round")
    parser.add_argument(
        "--partition",
        choices=["dirichlet", "iid", "shards"],
        default="dirichlet",
        help="how the training set is split over the clients",
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label-skew concentration")
    parser.add_argument("--rounds", type=int, default=100, help="federated rounds per run")
    parser.add_argument("--local-epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument("--lr", type=float, default=0.05, help="local SGD learning rate")
    parser.add_argument("--batch-size", type=int, default=32, help="local minibatch size")
    parser.add_argument("--local-momentum", type=float, default=0.0, help="SGD momentum inside local training")
    parser.add_argument("--eval-every", type=int, default=5, help="evaluate every N rounds (and the last)")
    parser.add_argument("--target", type=float, default=0.95, help="accuracy whose cost in bytes is reported")
    parser.add_argument(
        "--downlink-history",
        type=int,
        default=0,
        help="downlink deltas the server keeps for clients that skipped rounds (0: all)",
    )
    parser.add_argument("--baseline", default="fp32", metavar="CELL", help="the cell ratios are taken against")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (one torch thread each)")
    parser.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="runs.jsonl, summary.json, summary.md and the plots; runs already there are kept",
    )
    parser.add_argument("--overwrite", action="store_true", help="discard the runs already in DIR")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_from_args(args: argparse.Namespace) -> int:
    from ..train.task import BUILTIN_TASKS, resolve_task
    from .runner import SweepError, run_sweep
    from .simulate import Settings

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        cells = [parse_cell(c) for c in args.cells]
        parse_cell(args.baseline)
        settings = Settings(
            clients=args.clients,
            per_round=args.per_round,
            alpha=args.alpha,
            partition=args.partition,
            rounds=args.rounds,
            local_epochs=args.local_epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            local_momentum=args.local_momentum,
            eval_every=args.eval_every,
            target=args.target,
            downlink_history=args.downlink_history,
        )
        for t in args.task:
            if ":" not in t and t.lower() not in BUILTIN_TASKS:
                raise ValueError(f"--task {t}: unknown task; use digits, mnist or module:function")
        tasks = [resolve_task(t) if ":" in t else t for t in args.task]
        summary = run_sweep(
            tasks,
            cells,
            args.seeds,
            settings,
            args.out,
            jobs=args.jobs,
            data_dir=args.data_dir,
            baseline=args.baseline,
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
    except (SweepError, ValueError, FileNotFoundError, TypeError) as exc:
        print(f"fedpress sweep: {exc}", file=sys.stderr)
        return 2
    from .runner import SUMMARY_MD

    print((__import__("pathlib").Path(args.out) / SUMMARY_MD).read_text())
    print(
        f"{len(summary['runs'])} runs in {args.out}: runs.jsonl, summary.json, summary.md, "
        "accuracy_vs_uplink.png, accuracy_vs_total_bytes.png",
        file=sys.stderr,
    )
    return 0
