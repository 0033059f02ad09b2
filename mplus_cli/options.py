"""The option types the `mplus` commands share (typer annotations): session, store, model(s), tokenizer, chat,
device, dtype."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from model.memory.dtypes import DtypeName

from .models import DEFAULT_MODEL


def expand_user(value: Path | None) -> Path | None:
    return value.expanduser() if value is not None else None


def explicit_only(ctx: typer.Context, param: typer.CallbackParam, value: str | None) -> str | None:
    """A --model given on the line; its environment variable stays a default (requested_model reads it), so
    that it never conflicts with the model an existing session is bound to."""
    source = ctx.get_parameter_source(param.name)
    return None if source is not None and source.name == "ENVIRONMENT" else value


SessionOpt = Annotated[str, typer.Option("--session", "-s", help="Session name.")]
SessionNameArg = Annotated[str, typer.Argument(help="Session name (see `mplus session ls`).", show_default=False)]
StoreOpt = Annotated[
    Path | None,
    typer.Option(
        "--store", envvar="MPLUS_HOME", callback=expand_user, help="Session store (default: ~/.cache/mplus/sessions)."
    ),
]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        envvar="MPLUS_MODEL",
        callback=explicit_only,
        help=f"Model name (see `mplus models`), checkpoint directory or hub id (default: {DEFAULT_MODEL}).",
    ),
]
ModelsOpt = Annotated[
    list[str] | None,
    typer.Option("--model", "-m", envvar="MPLUS_MODEL", help="Model name, checkpoint or hub id; repeatable."),
]
BenchModelOpt = Annotated[str | None, typer.Option("--model", "-m", envvar="MPLUS_MODEL", help="Model name.")]
TokenizerOpt = Annotated[
    str | None, typer.Option("--tokenizer", help="Tokenizer directory or hub id, for checkpoints without one.")
]
ChatOpt = Annotated[
    bool | None,
    typer.Option(
        "--chat/--no-chat",
        help="Ask each question alone in the chat template, or not (default: when the tokenizer has one).",
        show_default=False,
    ),
]

DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device", help="Where the model runs: auto (a CUDA GPU if there is one, else the CPU) | cpu | cuda | cuda:N."
    ),
]
DtypeOpt = Annotated[
    DtypeName | None,
    typer.Option(help="The model's dtype (default: bfloat16 on CUDA, float32 on the CPU)."),
]
