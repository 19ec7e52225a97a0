"""The ``fedpress`` command line.

    fedpress --version
    fedpress bench [--quick] [--json PATH] [--sizes N ...] [--repeat N] [--threads N] [--only K ...]
    fedpress inspect FILE [--json]

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


def _add_inspect(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a payload file ('-' reads standard input)")
    parser.add_argument("--json", action="store_true", help="print the inspection as JSON")


def _run_inspect(args: argparse.Namespace) -> int:
    import json

    from .payload import DecodeError, inspect

    try:
        data = sys.stdin.buffer.read() if args.file == "-" else open(args.file, "rb").read()
    except OSError as exc:
        print(f"fedpress inspect: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        info = inspect(data)
    except DecodeError as exc:
        print(f"fedpress inspect: {args.file}: invalid payload: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"codec {info['codec']}  format v{info['format_version']}  zstd {'yes' if info['zstd'] else 'no'}"
          f"  seed {info['seed']}")
    rows = [("name", "shape", "dtype", "kind", "values", "count", "bytes", "raw bytes")]
    for t in info["tensors"]:
        rows.append((t["name"], "x".join(map(str, t["shape"])) or "()", t["dtype"], t["kind"],
                     t["values"] + ("+rht" if t["rotated"] else ""), str(t["count"]), str(t["bytes"]),
                     str(t["raw_bytes"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        print("  ".join(c.ljust(w) if i < 5 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))
    print(f"raw {info['raw_bytes']} bytes -> payload {info['payload_bytes']} bytes, ratio {info['ratio']:.1f}x")
    return 0


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
    "inspect": (
        "show what a payload file holds: codec, tensors, sections, bytes and ratio",
        _add_inspect,
        _run_inspect,
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
