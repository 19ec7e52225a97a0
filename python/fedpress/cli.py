"""The ``fedpress`` command line.

    fedpress --version
    fedpress bench [--quick] [--json PATH] [--sizes N ...] [--repeat N] [--threads N] [--only K ...]

Each subcommand registers itself in :data:`_SUBCOMMANDS` with a function that
adds its options and one that runs it, so later ones (demo, inspect) plug in
without touching :func:`main`. Optional heavy modules (torch) are imported
only when a subcommand runs, so ``fedpress --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

from . import __version__

__all__ = ["main", "build_parser"]


def _add_bench(parser: argparse.ArgumentParser) -> None:
    from . import bench

    bench.add_arguments(parser)


def _run_bench(args: argparse.Namespace) -> int:
    from . import bench

    return bench.run_from_args(args)


# name -> (one-line help, add options, run); run returns the exit status.
_SUBCOMMANDS: dict[
    str,
    tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]],
] = {
    "bench": (
        "time every kernel against numpy / torch / zstd peers and check they agree",
        _add_bench,
        _run_bench,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per subcommand."""
    parser = argparse.ArgumentParser(
        prog="fedpress",
        description="Compress federated-learning updates: fast kernels, a safe wire format.",
    )
    parser.add_argument("--version", action="version", version=f"fedpress {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add, run) in _SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``fedpress`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    run = getattr(args, "_run", None)
    if run is None:
        parser.print_help()
        return 2
    return int(run(args))


if __name__ == "__main__":
    sys.exit(main())
