"""`mplus inject`: texts into a session, a commit per chunk, resumable."""

from __future__ import annotations

import contextlib
import errno
import time
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

import model as mp
from model import store as st
from model.core.config import MemoryKind
from model.memory.dtypes import DtypeName
from model.text.chunking import MIN_CHUNK_TOKENS
from model.text.sources import plan_source

from .. import inputs
from ..common import SEED_MAX, handle_errors, json_output, note_label, store_root
from ..devices import dtype_option, pick_device
from ..errors import ConflictError, Interrupted, MplusError, UsageError
from ..models import (
    binding,
    check_memory,
    check_requested,
    load_bound_model,
    load_model,
    requested_model,
    with_memory,
)
from ..options import DeviceOpt, ModelOpt, SessionOpt, StoreOpt, TokenizerOpt
from ..output import done_counter, emit, plural, progress
from ..root import say


def bound_session(
    root: Path, name: str, model: str | None, memory: str | None, tokenizer, seed, dtype, device: torch.device
):
    """(session, model) for an inject: the existing session with its own model (checked against the
    options), or the model the options name, with no session yet (None). The model runs on `device` in `dtype`
    (default: the device's), which must be the storage dtype of an existing session when given."""
    compute = dtype or mp.default_dtype(device)
    if not st.session_exists(root, st.check_name(name)):
        lm = load_model(with_memory(requested_model(model), memory), compute, tokenizer, device=device)
        if memory is not None and lm.cfg.kind != memory:
            raise UsageError(
                f"model {lm.info.source!r} has {lm.cfg.kind} memory: --memory {memory} needs another model"
            )
        return None, lm
    session = st.Session.open(root, name)
    check_requested(name, session.model_ref, model)
    check_memory(name, session.model_ref, memory)
    if dtype is not None and dtype != session.dtype:
        raise ConflictError(
            f"session {name!r} keeps {session.manifest['dtype']} rows: drop --dtype or use another session"
        )
    if seed is not None and seed != session.manifest["seed"]:
        raise ConflictError(f"session {name!r} was created with --seed {session.manifest['seed']}: drop --seed")
    return session, load_bound_model(name, session.model_ref, tokenizer, device, compute)


def create_or_join(root: Path, name: str, lm: mp.MemoryLLM, ref: dict, seed: int, dtype: torch.dtype) -> st.Session:
    """Create the session; if another process created it meanwhile, use it when it is bound to the same model."""
    try:
        return st.Session.create(root, name, lm.initial_state, ref, seed, dtype)
    except st.SessionExists:
        session = st.Session.open(root, name)
        same = {k: session.model_ref.get(k) for k in ("id", "fingerprint")} == {
            k: ref[k] for k in ("id", "fingerprint")
        }
        if not same or session.dtype != dtype or session.manifest["seed"] != seed:
            raise ConflictError(
                f"session {name!r} was just created by another command with other settings "
                f"(model {session.model_ref['id']}, {session.manifest['dtype']}, seed {session.manifest['seed']})"
            ) from None
        return session


OUT_OF_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # disk full, file-size limit, quota


def kept(run: st.InjectRun) -> str:
    """What the session holds after a cut inject, read back from its committed manifest (the cut can come
    right after a commit, before the run counted it), and how to continue."""
    if run.first_commit is None:
        return f"nothing was injected into session {run.session!r}"
    found = st.Session.open(run.root, run.session)
    partial, source = found.partial, run.current
    if partial and source is not None and partial["sha256"] == source.sha256:
        again = f"{'-' if source.name == '<stdin>' else source.name} --session {run.session} --resume`"
        again += " with the same input on stdin" if source.name == "<stdin>" else ""
        return (
            f"session {run.session!r} keeps {partial['chunks_done']} of {partial['chunks_total']} "
            f"chunks of {source.name}: continue with `mplus inject {again}"
        )
    new = found.manifest["commit"] - run.first_commit
    return (
        f"session {run.session!r} keeps the {new} chunks this command committed"
        if new
        else (f"session {run.session!r} is unchanged")
    )


def inject_with_progress(writer: st.Writer, lm: mp.MemoryLLM, sources, skips, chunk_tokens: int, run) -> mp.MemoryState:
    """st.inject_sources under a progress bar of the chunks to inject."""
    total = sum(s.chunks - skip for s, skip in zip(sources, skips, strict=True))
    with progress(total >= 4, done_counter()) as bar:
        task = bar.add_task("injecting", total=total)

        def advance(source) -> None:
            bar.update(task, advance=1, description=Path(source.name).name)

        return st.inject_sources(writer, lm, sources, skips, chunk_tokens, run, advance, say)


def check_chunk_tokens(lm: mp.MemoryLLM, chunk_tokens: int) -> None:
    """Refuse chunks the model cannot take in one injection: model.inject places a chunk after bos and the
    last K memory rows (training-free: after bos alone), within the context window; a chunk can exceed
    --chunk-tokens by a merged tail of up to MIN_CHUNK_TOKENS - 1 tokens."""
    window = lm.cfg.context_window
    if window is None:
        return
    prefix = 1 if lm.cfg.training_free is not None else lm.n_bos + lm.cfg.num_tokens
    limit = window - prefix - (MIN_CHUNK_TOKENS - 1)
    if chunk_tokens > limit:
        raise UsageError(f"--chunk-tokens {chunk_tokens} exceeds the model's limit of {limit} tokens per injection")


@handle_errors
def inject(
    paths: Annotated[list[str], typer.Argument(help="Text files to inject ('-' for stdin).")],
    session: SessionOpt,
    model: ModelOpt = None,
    store: StoreOpt = None,
    chunk_tokens: Annotated[
        int, typer.Option(help="Most tokens per injection (min 16, max the model's limit).", min=16)
    ] = 512,
    seed: Annotated[
        int | None,
        typer.Option(
            help="Drop-generator seed of a new session (default 0, or what a checkpoint carries).", min=0, max=SEED_MAX
        ),
    ] = None,
    tokenizer: TokenizerOpt = None,
    memory: Annotated[
        MemoryKind | None,
        typer.Option(help="Memory of a new session (picks the built-in model's flavour)."),
    ] = None,
    dtype: Annotated[
        DtypeName | None,
        typer.Option(
            help="The model's dtype and a new session's storage dtype (default: "
            "bfloat16 on CUDA, float32 on the CPU; a new session then keeps its rows in the model's storage dtype)."
        ),
    ] = None,
    device: DeviceOpt = "auto",
    resume: Annotated[
        bool,
        typer.Option(help="Continue an interrupted inject: skip sources already injected, finish a partial one."),
    ] = False,
) -> None:
    """Inject text into a session's memory (the session is created on first use, bound to its model).

    Text is read and tokenized as a stream and cut into chunks of at most --chunk-tokens tokens (a final
    piece under 16 tokens is merged into the previous chunk). Each chunk is committed as it finishes: a
    crash or Ctrl-C loses at most the chunk in flight, and --resume continues after the last committed one.

    Example: mplus inject notes.txt --session s1 --model tiny-mplus
    """
    as_json = json_output()
    storage, target = dtype_option(dtype), pick_device(device)
    run = st.InjectRun(store_root(store), session)
    try:
        with contextlib.ExitStack() as stack:
            existing, lm = bound_session(run.root, session, model, memory, tokenizer, seed, storage, target)
            run.load_s = time.perf_counter() - run.started
            check_chunk_tokens(lm, chunk_tokens)
            sources = plan_sources(stack, paths, lm, chunk_tokens)
            note_label(lm)
            if existing is None:
                existing = new_session(run.root, session, lm, tokenizer, seed, storage)
            with existing.writer() as writer:
                skips = st.resume_plan(writer.session, sources, resume, chunk_tokens, say)
                state = inject_with_progress(writer, lm, sources, skips, chunk_tokens, run)
                committed = writer.session
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; {kept(run)}") from None
    except OSError as e:
        if e.errno not in OUT_OF_SPACE:
            raise
        again = "" if "--resume" in (held := kept(run)) else ": run the command again"
        raise MplusError(f"{e.strerror} while writing session {session!r}; {held}{again} once there is room") from None
    if as_json:
        emit(inject_report(run, committed, state))
    else:
        typer.echo(
            f"injected {plural(run.tokens, 'token')} in {plural(run.chunks, 'chunk')} into session {session!r} "
            f"(now {plural(state.injections, 'injection')}, {plural(state.tokens_injected, 'token')})"
        )


def plan_sources(stack: contextlib.ExitStack, paths: list[str], lm: mp.MemoryLLM, chunk_tokens: int):
    """Each path ('-': stdin, spooled) read once, checked and cut into chunks of the model's tokens."""
    files = [stack.enter_context(inputs.spooled_stdin()) if p == "-" else inputs.check_path(p) for p in paths]
    names = ["<stdin>" if p == "-" else p for p in paths]
    return [plan_source(n, f, lm.tokenizer, chunk_tokens) for n, f in zip(names, files, strict=True)]


def new_session(
    root: Path, name: str, lm: mp.MemoryLLM, tokenizer: str | None, seed: int | None, storage: torch.dtype | None
) -> st.Session:
    """The session, created for `lm` (seed 0 unless the checkpoint carries its drop generator)."""
    ref = binding(lm.info.source, lm, tokenizer, None)
    seed = seed if seed is not None else None if lm.info.carried_state else 0
    return create_or_join(root, name, lm, ref, seed, storage or mp.storage_dtype(lm))


def inject_report(run: st.InjectRun, committed: st.Session, state: mp.MemoryState) -> dict[str, Any]:
    """inject --json."""
    return {
        "session": run.session,
        "model": committed.model_ref["id"],
        "label": committed.model_ref["label"],
        "dtype": committed.manifest["dtype"],
        "sources": run.logged,
        "tokens": run.tokens,
        "chunks": run.chunks,
        "commit": committed.manifest["commit"],
        "injections": state.injections,
        "tokens_injected": state.tokens_injected,
        "timing": run.timing(),
    }
