"""The `mplus` command line: each command is a thin call into the `model` and `tasks` libraries."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="mplus",
    help="Knowledge injection and recall experiments with latent-memory language models (MemoryLLM, M+).",
    no_args_is_help=True,
    add_completion=False,
)
session_app = typer.Typer(help="List, show, remove and fork stored sessions.", no_args_is_help=True)
bench_app = typer.Typer(help="Retention sweeps and speed benchmarks.", no_args_is_help=True)
app.add_typer(session_app, name="session")
app.add_typer(bench_app, name="bench")

EXIT_FAILURE = 1


def not_implemented(what: str) -> None:
    typer.echo(f"mplus: {what} is not implemented yet in this version", err=True)
    raise typer.Exit(EXIT_FAILURE)


@app.command()
def inject(paths: Annotated[list[Path], typer.Argument(help="Text files to inject ('-' for stdin).")]) -> None:
    """Inject text into a session's memory."""
    not_implemented("inject")


@app.command()
def ask(question: Annotated[str, typer.Argument(help="The question to answer from memory.")]) -> None:
    """Answer a question from a session's memory."""
    not_implemented("ask")


@app.command()
def export() -> None:
    """Export a session's memory or a knowledge-injected checkpoint."""
    not_implemented("export")


@session_app.command("ls")
def session_ls() -> None:
    """List sessions."""
    not_implemented("session ls")


@bench_app.command("retention")
def bench_retention() -> None:
    """Recall of an injected fact as a function of tokens injected after it."""
    not_implemented("bench retention")


@bench_app.command("speed")
def bench_speed() -> None:
    """Inject and ask throughput against in-process baselines."""
    not_implemented("bench speed")


@app.command()
def parity(
    directories: Annotated[list[Path], typer.Argument(help="Reference-output directories (fixtures format).")],
) -> None:
    """Replay reference outputs of the authors' code and compare every tensor (exit 1 on any mismatch)."""
    from model.parity import main as parity_main

    raise typer.Exit(parity_main([str(d) for d in directories]))


def main() -> None:
    app()
