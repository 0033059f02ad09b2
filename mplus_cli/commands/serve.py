"""`mplus serve`: an OpenAI-compatible HTTP server that answers from a session's memory."""

from __future__ import annotations

from typing import Annotated

import typer

from ..common import handle_errors, note_label, stop_ids
from ..devices import pick_device, pick_dtype
from ..errors import UsageError
from ..options import DeviceOpt, DtypeOpt, ModelOpt, StoreOpt, TokenizerOpt
from ..root import say
from ..server import LOCAL_HOSTS, Answerer, Server
from .ask import asking_model, memory_of


@handle_errors(has_json=False)
def serve(
    session: Annotated[
        str | None,
        typer.Option("--session", "-s", help="Session to answer from (default: none, the model's own memory)."),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (other than localhost: needs --remote).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one, printed).")] = 8000,
    token: Annotated[
        str | None,
        typer.Option(envvar="MPLUS_SERVE_TOKEN", help="Bearer token every request must carry (Authorization)."),
    ] = None,
    remote: Annotated[
        bool, typer.Option("--remote", help="Allow --host to be reachable from other machines (needs --token).")
    ] = False,
    store: StoreOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    tokenizer: TokenizerOpt = None,
) -> None:
    """Serve a session's memory over HTTP as an OpenAI-compatible API (on localhost unless told otherwise).

    Completions and chat completions, streamed on request, greedy unless a request sets a temperature: for
    harnesses that call a model over HTTP (lm-eval local-completions, RULER, needle-in-a-haystack scripts).

    Example: mplus serve --session s1, then: curl localhost:8000/v1/completions -d '{"prompt": "Where is the key?"}'
    """
    if host not in LOCAL_HOSTS and not (remote and token):
        raise UsageError(f"--host {host} reaches other machines: pass --remote and --token (or keep 127.0.0.1)")
    target = pick_device(device)
    found, lm, head = asking_model(store, session, model, tokenizer, target, pick_dtype(dtype, target))
    state = memory_of(found, lm)
    note_label(lm)
    answerer = Answerer(lm, state, session or head["model"], stop_ids(lm))
    try:
        server = Server((host, port), answerer, token)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port} ({e.strerror}): choose another --port") from e
    what = f"session {session!r}" if session else f"model {head['model']} (its own memory)"
    say(f"mplus: serving {what} at http://{host}:{server.server_port}/v1 (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        say("mplus: stopped serving")
    finally:
        server.server_close()
