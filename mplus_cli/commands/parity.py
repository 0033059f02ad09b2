"""`mplus parity`: replay the authors' reference outputs (model.testing.parity)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..common import handle_errors


@handle_errors(has_json=False)
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
