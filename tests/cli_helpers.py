"""Running ``fedpress`` in-process as a user would meet it: its exit status and stderr."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Sequence

from fedpress import cli


def run_cli(argv: Sequence[str]) -> int:
    """``cli.main(argv)``; a non-zero status raises SystemExit whose message is
    ``[status] <stderr>``, so ``pytest.raises(SystemExit, match=...)`` reads the
    one-line error the user sees."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = cli.main(list(argv))
    if status:
        raise SystemExit(f"[{status}] {err.getvalue()}")
    return status


def server_args(tmp_path: Path, token: str, *extra: str, port: int = 0, insecure: bool = True) -> list:
    """A one-round ``fedpress server`` command line on loopback with ``token`` (a token
    file's path), its run in ``tmp_path / "run"``, then ``extra``."""
    return [
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--rounds",
        "1",
        "--clients-per-round",
        "1",
        "--min-clients",
        "1",
        "--codec",
        "q8",
        "--token-file",
        token,
        "--out",
        str(tmp_path / "run"),
        *(["--insecure"] if insecure else []),
        "--log-level",
        "error",
        *extra,
    ]
