"""Running ``fedpress`` in-process as a user would meet it: its exit status and stderr."""

from __future__ import annotations

import contextlib
import io
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
