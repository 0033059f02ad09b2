"""The `mplus` entry point. It imports nothing heavy itself, so that Ctrl-C at any moment, during the imports of
torch and the app as well as while the interpreter shuts down, ends with one line and exit 130."""

from __future__ import annotations

import os
import signal
import sys

EXIT_INTERRUPTED = 130  # as mplus_cli.errors, which is not imported here: it would be one more import to cut


def main() -> None:
    """Run the app; a Ctrl-C that no command handles prints `mplus: interrupted` and exits 130."""
    try:
        try:
            from mplus_cli.app import app

            app(prog_name="mplus")
        finally:  # the command is done (its exit is under way): a Ctrl-C from here on ends the process at once
            signal.signal(signal.SIGINT, interrupted_while_exiting)
    except KeyboardInterrupt:
        sys.stderr.write("mplus: interrupted\n")
        sys.exit(EXIT_INTERRUPTED)


def interrupted_while_exiting(signum: int, frame: object) -> None:
    """SIGINT during the interpreter's shutdown: flush what was written, say so, exit 130 (no traceback)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, RuntimeError, ValueError):  # closed, or a write that this signal cut short
            pass
    os.write(2, b"mplus: interrupted while exiting\n")
    os._exit(EXIT_INTERRUPTED)
