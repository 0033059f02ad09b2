"""The `mplus` command line: each command is a thin call into the `model` library and the session store.

Exit codes: 0 ok, 1 failure, 2 usage error, 3 not found (session, model, file), 4 conflict (session busy,
model mismatch), 130 interrupted. Expected errors print one line; `mplus --debug ...` shows the traceback.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Annotated

import typer

from .commands import ask, inject, session
from .commands.bench import bench_app
from .commands.export import export
from .commands.export import load_exported_memory as load_exported_memory  # re-exported for callers
from .commands.models import models
from .common import (
    OPTIONS,
    MplusGroup,
    handle_errors,
)

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
    OPTIONS["debug"], OPTIONS["json"] = debug, as_json


app.command()(inject.inject)
app.command()(ask.ask)
app.command()(export)
app.command()(models)
app.add_typer(session.session_app, name="session")
app.add_typer(bench_app, name="bench")


@app.command()
@handle_errors
def parity(
    directories: Annotated[
        list[Path], typer.Argument(help="Reference-output directories (fixtures format).", metavar="DIR")
    ],
) -> None:
    """Replay reference outputs of the authors' code and compare every tensor (exit 1 on any mismatch).

    Example: mplus parity tests/fixtures/official/memoryllm
    """
    from model.testing.parity import main as parity_main

    raise typer.Exit(parity_main([str(d) for d in directories]))
