"""What every `mplus` command shares besides its option types (mplus_cli/options.py): the error handler that
turns expected errors into one line and an exit code, --json and --debug from the root, and the helpers that
pick a session, a model's chat and stop tokens."""

from __future__ import annotations

import functools
import inspect
import traceback
from collections.abc import Callable
from pathlib import Path

import typer

import model as mp
from model import store as st
from model.text.sources import SourceError
from model.text.tokenizer import has_chat_template

from .clicklib import get_current_context
from .errors import EXIT_CONFLICT, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_NOT_FOUND, EXIT_USAGE, MplusError, UsageError
from .output import emit
from .root import say

SEED_MAX = 2**63 - 1  # seeds go to torch.Generator.manual_seed and into JSON: non-negative 64-bit integers


STORE_EXIT_CODES = {  # the session store's errors as exit codes
    st.InvalidName: EXIT_USAGE,
    st.SessionNotFound: EXIT_NOT_FOUND,
    st.SessionExists: EXIT_CONFLICT,
    st.SessionBusy: EXIT_CONFLICT,
    st.SessionMismatch: EXIT_CONFLICT,
    st.SessionDamaged: EXIT_FAILURE,
}


def as_mplus_error(error: Exception) -> MplusError:
    """The click exception that reports `error`: its own message when some layer expected it (with the store's
    exit code for the store's errors), else `unexpected`."""
    if isinstance(error, MplusError):
        return error
    if isinstance(error, st.StoreError | st.DamagedFile | SourceError):
        code = next((code for kind, code in STORE_EXIT_CODES.items() if isinstance(error, kind)), EXIT_FAILURE)
        return MplusError(str(error), code)
    return MplusError(unexpected(error))


def unexpected(error: Exception) -> str:
    """One line for an error no command expected: an OS error as what the system said and the file it was
    about, anything else with its type; `mplus --debug` shows where."""
    if isinstance(error, OSError) and error.strerror:
        about = f": {error.filename}" if error.filename else ""
        return f"{error.strerror}{about} (mplus --debug shows where)"
    return f"{type(error).__name__}: {error} (traceback: mplus --debug)"


def root_flag(name: str) -> bool:
    """The root's --debug or --json (`debug`, `as_json`), from the click context of the running command."""
    ctx = get_current_context(silent=True)
    return bool(ctx is not None and ctx.find_root().params.get(name))


JSON_HELP = "--json (before or after the command's name): print one JSON document to stdout and nothing else there."


def json_output() -> bool:
    """Whether the running command was given --json (the root takes it before or after the command's name)."""
    return root_flag("as_json")


def handle_errors(command: Callable | None = None, *, has_json: bool = True) -> Callable:
    """Raise every error of a command as a click exception with its exit code (an `MplusError`: one line), after
    a JSON error document under --json and the traceback under --debug. A command without a JSON document
    (`@handle_errors(has_json=False)`) refuses --json."""
    if command is None:
        return functools.partial(handle_errors, has_json=has_json)

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            if json_output() and not has_json:
                raise UsageError("this command has no --json output")
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            say("mplus: interrupted; every session keeps its last committed state")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as e:
            error = as_mplus_error(e)
            if root_flag("debug"):
                traceback.print_exc()
            if json_output() and has_json:
                emit({"error": error.message, "exit_code": error.exit_code})
            raise error from None

    if has_json:  # the root takes --json; a command's help says it has one
        wrapper.__doc__ = f"{inspect.cleandoc(command.__doc__ or '')}\n\n{JSON_HELP}"
    return wrapper


def note_label(model: mp.MemoryLLM) -> None:
    if model.info.label:
        say(f"note: model is {model.info.label}")


def asks_in_chat(lm: mp.MemoryLLM, chat: bool | None, name: str) -> bool:
    """--chat / --no-chat as given, by default whether the tokenizer has a chat template; --chat for a tokenizer
    without one is a usage error."""
    with_chat = has_chat_template(lm.tokenizer) if chat is None else chat
    if with_chat and not has_chat_template(lm.tokenizer):
        raise UsageError(f"the tokenizer of {name!r} has no chat template: drop --chat")
    return with_chat


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
