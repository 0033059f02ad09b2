"""Expected errors: one line that says what to do, and the documented exit code."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_CONFLICT = 4
EXIT_INTERRUPTED = 130


class MplusError(Exception):
    """An expected failure; the command prints its message (one line) and exits with `exit_code`."""

    exit_code = EXIT_FAILURE


class UsageError(MplusError):
    exit_code = EXIT_USAGE


class NotFoundError(MplusError):
    exit_code = EXIT_NOT_FOUND


class ConflictError(MplusError):
    exit_code = EXIT_CONFLICT


class Interrupted(MplusError):
    """Ctrl-C: the message says what was kept."""

    exit_code = EXIT_INTERRUPTED
