"""Expected errors: click exceptions that print one line that says what to do, and exit with the documented
code."""

from __future__ import annotations

from .clicklib import ClickException, echo

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_CONFLICT = 4
EXIT_INTERRUPTED = 130


class MplusError(ClickException):
    """An expected failure: click prints `mplus: error: <message>` (one line) and exits with `exit_code`."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code

    def show(self, file=None) -> None:
        echo(f"mplus: error: {self.format_message()}", file=file, err=True)


class UsageError(MplusError):
    exit_code = EXIT_USAGE


class NotFoundError(MplusError):
    exit_code = EXIT_NOT_FOUND


class ConflictError(MplusError):
    exit_code = EXIT_CONFLICT


class Interrupted(MplusError):
    """Ctrl-C: the message says what was kept."""

    exit_code = EXIT_INTERRUPTED
