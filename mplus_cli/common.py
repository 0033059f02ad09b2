"""What every `mplus` command shares: option types, stderr/stdout helpers and the error handler that
turns expected errors into one line and an exit code."""

from __future__ import annotations

import functools
import inspect
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

import model as mp
from model import store as st
from model.text.sources import SourceError

from .errors import EXIT_CONFLICT, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_NOT_FOUND, EXIT_USAGE, MplusError, UsageError
from .models import DEFAULT_MODEL
from .output import emit
from .root import OPTIONS, say

SEED_MAX = 2**63 - 1  # seeds go to torch.Generator.manual_seed and into JSON: non-negative 64-bit integers


def expand_user(value: Path | None) -> Path | None:
    return value.expanduser() if value is not None else None


def explicit_only(ctx: typer.Context, param: typer.CallbackParam, value: str | None) -> str | None:
    """A --model given on the line; its environment variable stays a default (requested_model reads it), so
    that it never conflicts with the model an existing session is bound to."""
    source = ctx.get_parameter_source(param.name)
    return None if source is not None and source.name == "ENVIRONMENT" else value


SessionOpt = Annotated[str, typer.Option("--session", "-s", help="Session name.")]
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
TokenizerOpt = Annotated[
    str | None, typer.Option("--tokenizer", help="Tokenizer directory or hub id, for checkpoints without one.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document to stdout and nothing else there.")]
DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device", help="Where the model runs: auto (a CUDA GPU if there is one, else the CPU) | cpu | cuda | cuda:N."
    ),
]
DtypeOpt = Annotated[
    str | None,
    typer.Option(
        help="The model's dtype: bfloat16 | float16 | float32 (default: bfloat16 on CUDA, float32 on the CPU)."
    ),
]


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


def unexpected(error: Exception) -> str:
    """One line for an error no command expected: an OS error as what the system said and the file it was
    about, anything else with its type; `mplus --debug` shows where."""
    if isinstance(error, OSError) and error.strerror:
        about = f": {error.filename}" if error.filename else ""
        return f"{error.strerror}{about} (mplus --debug shows where)"
    return f"{type(error).__name__}: {error} (traceback: mplus --debug)"


def handle_errors(command: Callable) -> Callable:
    """Turn expected errors into one line (plus a JSON error document under --json) and an exit code."""

    takes_json = "as_json" in inspect.signature(command).parameters

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        if takes_json:
            kwargs["as_json"] = kwargs.get("as_json") or OPTIONS["json"]
        try:
            if OPTIONS["json"] and not takes_json:
                raise UsageError("this command has no --json output")
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            say("mplus: interrupted; every session keeps its last committed state")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as e:
            code = exit_code(e)
            expected = isinstance(e, MplusError | st.StoreError | st.DamagedFile | SourceError)
            message = str(e) if expected else unexpected(e)
            if OPTIONS["debug"]:
                traceback.print_exc()
            say(f"mplus: error: {message}")
            if kwargs.get("as_json"):
                emit({"error": message, "exit_code": code})
            raise typer.Exit(code) from None

    return wrapper


def note_label(model: mp.MemoryLLM) -> None:
    if model.info.label:
        say(f"note: model is {model.info.label}")


def stop_ids(lm: mp.MemoryLLM) -> tuple[int, ...]:
    eos = lm.cfg.eos_token_id
    ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if lm.tokenizer.eos_token_id is not None:
        ids.add(lm.tokenizer.eos_token_id)
    return tuple(sorted(ids))


def store_root(option: Path | None) -> Path:
    """--store, else the default store; refused when it names something that is not a directory."""
    root = option or st.default_root()
    if root.exists() and not root.is_dir():
        where = f"--store {option}" if option else f"the store {root} ($MPLUS_HOME)"
        raise UsageError(f"{where} is a file, not a directory: give the folder that holds the sessions")
    return root


def open_session(store: Path | None, name: str) -> st.Session:
    return st.Session.open(store_root(store), name)
