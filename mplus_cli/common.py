"""What every `mplus` command shares: option types, stderr/stdout helpers and the error handler that
turns expected errors into one line and an exit code."""

from __future__ import annotations

import contextlib
import functools
import json
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

try:  # typer >= 0.2x carries its own copy of click
    from typer._click import exceptions as click_errors
except ImportError:
    from click import exceptions as click_errors

import model as mp
from model import store as st

from .errors import EXIT_CONFLICT, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_NOT_FOUND, EXIT_USAGE, MplusError
from .models import DEFAULT_MODEL

OPTIONS = {"debug": False}
SEED_MAX = 2**63 - 1  # seeds go to torch.Generator.manual_seed and into JSON: non-negative 64-bit integers

SessionOpt = Annotated[str, typer.Option("--session", "-s", help="Session name.")]
StoreOpt = Annotated[
    Path | None, typer.Option("--store", help="Store root (default: $MPLUS_HOME, else ~/.cache/mplus/sessions).")
]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help=f"Built-in model, checkpoint directory or hub id (default: $MPLUS_MODEL, else {DEFAULT_MODEL}).",
    ),
]
TokenizerOpt = Annotated[
    str | None, typer.Option("--tokenizer", help="Tokenizer directory or hub id, for checkpoints without one.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document to stdout and nothing else there.")]


def say(message: str) -> None:
    typer.echo(message, err=True)


def emit(document: dict[str, Any]) -> None:
    typer.echo(json.dumps(document, indent=1))


STORE_EXIT_CODES = {  # the session store's errors as exit codes
    st.InvalidName: EXIT_USAGE,
    st.SessionNotFound: EXIT_NOT_FOUND,
    st.SessionExists: EXIT_CONFLICT,
    st.SessionBusy: EXIT_CONFLICT,
    st.SessionMismatch: EXIT_CONFLICT,
    st.SessionDamaged: EXIT_FAILURE,
}


def exit_code(error: Exception) -> int:
    if isinstance(error, MplusError):
        return error.exit_code
    return next((code for kind, code in STORE_EXIT_CODES.items() if isinstance(error, kind)), EXIT_FAILURE)


def handle_errors(command: Callable) -> Callable:
    """Turn expected errors into one line (plus a JSON error document under --json) and an exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            say("mplus: interrupted; every session keeps its last committed state")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as e:
            code = exit_code(e)
            expected = isinstance(e, MplusError | st.StoreError | st.DamagedFile)
            message = str(e) if expected else f"{type(e).__name__}: {e} (traceback: mplus --debug)"
            if OPTIONS["debug"]:
                traceback.print_exc()
            say(f"mplus: error: {message}")
            if kwargs.get("as_json"):
                emit({"error": message, "exit_code": code})
            raise typer.Exit(code) from None

    return wrapper


class MplusGroup(TyperGroup):
    """The root command. Click's usage errors in any command (a bad option value, an unknown option, a missing
    argument) print one line and exit 2; an aborted prompt, and Ctrl-C outside a command's own handler, print
    one line and exit 130."""

    def make_context(self, info_name: str | None, args: list[str], parent: typer.Context | None = None, **extra):
        with one_line_errors():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: typer.Context) -> Any:
        with one_line_errors():
            return super().invoke(ctx)


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    try:
        yield
    except getattr(click_errors, "NoArgsIsHelpError", ()):  # click >= 8.2
        raise  # `mplus` or `mplus session` alone: the help
    except click_errors.UsageError as e:
        say(f"mplus: error: {usage_line(e)}")
        raise typer.Exit(EXIT_USAGE) from None
    except typer.Abort:
        say("mplus: aborted")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except KeyboardInterrupt:
        say("mplus: interrupted")
        raise typer.Exit(EXIT_INTERRUPTED) from None


def usage_line(error: click_errors.UsageError) -> str:
    """Click's message on one line, and where the command's help is."""
    message = " ".join(error.format_message().split()).rstrip(".")
    command = error.ctx.command_path if error.ctx is not None else "mplus"
    return f"{message[:1].lower()}{message[1:]} (see {command} --help)"


def note_label(model: mp.MemoryLLM) -> None:
    if model.info.get("label"):
        say(f"note: model is {model.info['label']}")


def stop_ids(lm: mp.MemoryLLM) -> tuple[int, ...]:
    eos = lm.cfg.eos_token_id
    ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if lm.tokenizer.eos_token_id is not None:
        ids.add(lm.tokenizer.eos_token_id)
    return tuple(sorted(ids))
