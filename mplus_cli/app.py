"""The `mplus` command line: each command is a thin call into the `model` library and the session store; the
commands themselves are in mplus_cli/commands/, loaded by name when they run (mplus_cli/root.py).

Exit codes: 0 ok, 1 failure, 2 usage error, 3 not found (session, model, file), 4 conflict (session busy,
model mismatch), 130 interrupted. Expected errors print one line; `mplus --debug ...` shows the traceback.
"""

from __future__ import annotations

from importlib import metadata
from typing import Annotated

import typer

from .root import MplusGroup

app = typer.Typer(
    name="mplus",
    help="Knowledge injection and recall experiments with latent-memory language models (MemoryLLM, M+).\n\n"
    "--debug and --json go before or after a command's name.\n\n"
    'Example: mplus inject notes.txt --session s1 && mplus ask "Where is the key?" --session s1',
    no_args_is_help=True,
    add_completion=False,
    cls=MplusGroup,
    rich_markup_mode=None,  # click's plain help: wrapped, never truncated, no <bool> on flags
)


def print_version(value: bool) -> None:
    if value:
        typer.echo(f"mplus {metadata.version('mplus')}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks of expected errors (before or after the command).")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON document on stdout, for every command that has one.")
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """The root's options; commands read --debug and --json from the click context (common.root_flag)."""
