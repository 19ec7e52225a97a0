"""The errors a ``fedpress`` command ends with: one line on stderr and an exit status
(see ``fedpress.cli.main``). In their own module so that every subcommand raises
the same classes, also when the command line runs as ``python -m fedpress.cli``
(whose ``__main__`` is a second copy of the cli module)."""

from __future__ import annotations

__all__ = ["CommandError", "UsageError", "Interrupted"]


class CommandError(Exception):
    """A failure the user can act on: printed as one line ``fedpress CMD: message``,
    exit status 1, no traceback (``--debug`` shows it)."""

    status = 1


class UsageError(CommandError):
    """A mistake in the command line or its files: exit status 2."""

    status = 2


class Interrupted(CommandError):
    """Ctrl-C: exit status 130, as a shell reports a process killed by SIGINT."""

    status = 130
