"""The `mplus` command line: each command is a thin call into the `model` library and the session store.

Exit codes: 0 ok, 1 failure, 2 usage error, 3 not found (session, model, file), 4 conflict (session busy,
model mismatch), 130 interrupted. Expected errors print one line; `mplus --debug ...` shows the traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from safetensors.torch import save_file

import model as mp
from model.tokenizer import chat_ids, decode, encode

from . import store as st
from .bench import bench_app
from .common import (
    OPTIONS,
    JsonOpt,
    ModelOpt,
    SessionOpt,
    StoreOpt,
    TokenizerOpt,
    emit,
    handle_errors,
    note_label,
    say,
    stop_ids,
)
from .errors import ConflictError, MplusError, NotFoundError, UsageError
from .inputs import chunk_ids, read_source
from .models import (
    binding,
    check_memory,
    check_requested,
    load_bound_model,
    load_model,
    requested_model,
    with_memory,
)

app = typer.Typer(
    name="mplus",
    help="Knowledge injection and recall experiments with latent-memory language models (MemoryLLM, M+).",
    no_args_is_help=True,
    add_completion=False,
)
session_app = typer.Typer(help="List, show, remove and fork stored sessions.", no_args_is_help=True)
app.add_typer(session_app, name="session")


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of expected errors.")] = False,
) -> None:
    OPTIONS["debug"] = debug


def store_root(option: Path | None) -> Path:
    return option or st.default_root()


def open_session(store: Path | None, name: str) -> st.Session:
    return st.Session.open(store_root(store), name)


# -- inject ---------------------------------------------------------------------------------------
def progress_bar(total: int):
    """A rich progress bar on stderr, shown for more than a few chunks."""
    from rich.console import Console
    from rich.progress import Progress

    return Progress(console=Console(stderr=True), transient=True, disable=total < 4)


@app.command()
@handle_errors
def inject(
    paths: Annotated[list[str], typer.Argument(help="Text files to inject ('-' for stdin).")],
    session: SessionOpt,
    model: ModelOpt = None,
    store: StoreOpt = None,
    chunk_tokens: Annotated[int, typer.Option(help="Most tokens per injection (min 16).", min=16)] = 512,
    seed: Annotated[int | None, typer.Option(help="Drop-generator seed of a new session (default 0).")] = None,
    tokenizer: TokenizerOpt = None,
    memory: Annotated[
        str | None,
        typer.Option(help="Memory of a new session: mplus | memoryllm (picks the built-in model's flavour)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Inject text into a session's memory (the session is created on first use, bound to its model).

    Text is cut into chunks of at most --chunk-tokens tokens; a final piece under 16 tokens is merged into
    the previous chunk. All chunks of one call are committed together.
    """
    root = store_root(store)
    sources = [read_source(path) for path in paths]
    name = with_memory(requested_model(model), memory)
    existing = st.Session.open(root, session) if st.session_exists(root, st.check_name(session)) else None
    if existing:
        check_requested(session, existing.model_ref, model)
        check_memory(session, existing.model_ref, memory)
        lm = load_bound_model(session, existing.model_ref, tokenizer)
        if seed is not None and seed != existing.manifest["seed"]:
            say(f"mplus: warning: --seed ignored, session {session!r} already has seed {existing.manifest['seed']}")
    else:
        lm = load_model(name, tokenizer=tokenizer)
        if memory is not None and lm.cfg.kind != memory:
            raise UsageError(f"model {name!r} has {lm.cfg.kind} memory: --memory {memory} needs another model")
    chunked = [chunk_ids(encode(lm.tokenizer, s.text), chunk_tokens, s.name) for s in sources]
    note_label(lm)
    if not existing:
        ref = binding(name, lm, tokenizer, None)
        existing = st.create_session(root, session, lm, ref, seed or 0)
    total = sum(len(chunks) for chunks in chunked)
    with existing.writer() as writer, progress_bar(total) as bar:
        task = bar.add_task("injecting", total=total)
        state = writer.load_state(lm)
        for source, chunks in zip(sources, chunked, strict=True):
            for chunk in chunks:
                writer.inject(lm, state, torch.tensor(chunk, dtype=torch.long))
                bar.advance(task)
            tokens = sum(map(len, chunks))
            entry = {"source": source.name, "sha256": source.sha256, "tokens": tokens, "chunks": len(chunks)}
            writer.record(entry | {"at": st.now()})
        committed = writer.commit(state)
    report = {
        "session": session,
        "model": committed.model_ref["id"],
        "label": committed.model_ref["label"],
        "sources": committed.log()[-len(sources) :],
        "tokens": sum(sum(map(len, chunks)) for chunks in chunked),
        "chunks": total,
        "commit": committed.manifest["commit"],
        "injections": state.injections,
        "tokens_injected": state.tokens_injected,
    }
    if as_json:
        emit(report)
    else:
        typer.echo(
            f"injected {report['tokens']} tokens in {total} chunks into session {session!r} "
            f"(now {state.injections} injections, {state.tokens_injected} tokens)"
        )


# -- ask ------------------------------------------------------------------------------------------
def prompt_ids(lm: mp.MemoryLLM, question: str, chat: bool) -> list[int]:
    """The question's token ids; --chat applies the tokenizer's chat template (without a BOS it inserts)."""
    if not question.strip():
        raise UsageError("the question is empty")
    if not chat:
        return encode(lm.tokenizer, question)
    try:
        return chat_ids(lm.tokenizer, question)
    except ValueError as e:
        raise UsageError(f"{e}: drop --chat") from e


class Streamer:
    """Prints the decoded answer as tokens arrive (holding back an incomplete UTF-8 sequence)."""

    def __init__(self, tokenizer, enabled: bool):
        self.tokenizer, self.enabled, self.ids, self.shown = tokenizer, enabled, [], ""

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        text = decode(self.tokenizer, self.ids)
        if self.enabled and not text.endswith("\ufffd"):
            sys.stdout.write(text[len(self.shown) :])
            sys.stdout.flush()
            self.shown = text


@app.command()
@handle_errors
def ask(
    question: Annotated[str, typer.Argument(help="The question to answer from memory.")],
    session: SessionOpt,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    sample: Annotated[bool, typer.Option(help="Sample instead of greedy decoding.")] = False,
    temperature: Annotated[float, typer.Option(min=0.0)] = 1.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    chat: Annotated[bool, typer.Option(help="Apply the tokenizer's chat template (without its BOS).")] = False,
    model: ModelOpt = None,
    store: StoreOpt = None,
    tokenizer: TokenizerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Answer a question from a session's memory, streamed to stdout (the session is not changed)."""
    found = open_session(store, session)
    check_requested(session, found.model_ref, model)
    lm = load_bound_model(session, found.model_ref, tokenizer)
    state = found.load_state(lm)
    try:
        settings = mp.DecodeSettings(
            max_new_tokens=max_new_tokens,
            sample=sample,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop_token_ids=stop_ids(lm),
        )
    except ValueError as e:
        raise UsageError(str(e)) from e
    ids = prompt_ids(lm, question, chat)
    note_label(lm)
    streamer = Streamer(lm.tokenizer, enabled=not as_json)
    out = mp.generate(lm, state, ids, settings, on_token=streamer)
    answer = decode(lm.tokenizer, out.token_ids)
    if as_json:
        emit(
            {
                "session": session,
                "model": found.model_ref["id"],
                "label": found.model_ref["label"],
                "question": question,
                "answer": answer,
                "token_ids": out.token_ids,
                "finish_reason": out.finish_reason,
                "settings": settings.to_dict(),
            }
        )
    else:
        sys.stdout.write(answer[len(streamer.shown) :] + "\n")


# -- export ---------------------------------------------------------------------------------------
def manifest_path(out: Path) -> Path:
    """The JSON manifest written beside a memory export: memory.safetensors -> memory.json."""
    return out.with_suffix(".json")


def export_memory(found: st.Session, state: mp.MemoryState, out: Path) -> None:
    """One safetensors file with the whole state, and a JSON manifest beside it (the session manifest and
    the state meta, also kept in the file's metadata so the file stands alone)."""
    document = {"session": found.manifest, "state": state.to_meta(), "exported": st.now(), "file": out.name}
    metadata = {"mplus.manifest": json.dumps(found.manifest), "mplus.state": json.dumps(state.to_meta())}
    tmp = out.with_name(f".{out.name}.tmp")
    save_file({k: v.cpu().contiguous() for k, v in state.to_tensors().items()}, tmp, metadata=metadata)
    st.write_atomic(manifest_path(out), json.dumps(document, indent=1).encode())
    os.replace(tmp, out)


def load_exported_memory(path: Path) -> tuple[mp.MemoryState, dict[str, Any]]:
    """(state, session manifest) of a `--format memory` export."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    state = mp.MemoryState.from_tensors(load_file(path), json.loads(metadata["mplus.state"]))
    return state, json.loads(metadata["mplus.manifest"])


def export_checkpoint(lm: mp.MemoryLLM, state: mp.MemoryState, out: Path) -> None:
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    mp.save_checkpoint(lm, state, tmp)
    os.replace(tmp, out)


@app.command()
@handle_errors
def export(
    session: SessionOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output file (memory) or directory (checkpoint).")],
    format: Annotated[str, typer.Option("--format", help="memory | checkpoint")] = "memory",
    force: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
    store: StoreOpt = None,
    tokenizer: TokenizerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Export a session's memory (one safetensors file) or a knowledge-injected checkpoint directory."""
    if format not in ("memory", "checkpoint"):
        raise UsageError(f"unknown --format {format!r}: use memory or checkpoint")
    found = open_session(store, session)
    if not out.parent.is_dir():
        raise NotFoundError(f"no directory {out.parent} to write {out.name} into: create it first")
    if out.exists() and not force:
        raise ConflictError(f"{out} already exists: pass --force to replace it or choose another -o")
    lm = load_bound_model(session, found.model_ref, tokenizer)
    state = found.load_state(lm)
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    if format == "memory":
        if out.suffix == ".json":
            raise UsageError(f"{out} would collide with its JSON manifest: name it e.g. {out.stem}.safetensors")
        export_memory(found, state, out)
    else:
        export_checkpoint(lm, state, out)
    if as_json:
        files = [str(out)] + ([str(manifest_path(out))] if format == "memory" else [])
        emit(
            {"session": session, "format": format, "out": str(out), "files": files, "commit": found.manifest["commit"]}
        )
    else:
        typer.echo(f"exported session {session!r} ({format}) to {out}")


# -- session ls | show | rm | fork ------------------------------------------------------------------
def summary(found: st.Session) -> dict[str, Any]:
    """What `session show` reports; reads the manifest and the log, never the rows."""
    meta = found.manifest["state"]
    L, N, d = meta["memory_shape"]
    memory = {"layers": L, "short_term_rows": N, "hidden_size": d, "dtype": meta["dtype"]}
    if "ltm" in meta:
        memory |= {"ltm_rows": meta["ltm"]["sizes"], "ltm_cached_rows": meta["ltm"]["cached_rows"]}
    return {
        "session": found.name,
        "model": found.model_ref,
        "label": found.model_ref.get("label", ""),
        "seed": found.manifest["seed"],
        "created": found.manifest["created"],
        "updated": found.manifest["updated"],
        "commit": found.manifest["commit"],
        "injections": meta["injections"],
        "tokens": meta["tokens_injected"],
        "chunks": found.manifest["chunks"],
        "memory": memory,
        "disk_bytes": found.disk_bytes(),
        "forked_from": found.manifest.get("forked_from"),
        "log": found.log(),
    }


@session_app.command("ls")
@handle_errors
def session_ls(store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """List sessions."""
    root = store_root(store)
    rows = []
    for name in st.list_sessions(root):
        try:
            found = st.Session.open(root, name)
            tokens = found.manifest["state"]["tokens_injected"]
            rows.append({"session": name, "model": found.model_ref["id"], "tokens": tokens})
        except MplusError as e:
            rows.append({"session": name, "error": str(e)})
    if as_json:
        emit({"store": str(root), "sessions": rows})
        return
    for row in rows:
        typer.echo(f"{row['session']}\t{row.get('model', 'corrupted')}\t{row.get('tokens', '-')} tokens")


@session_app.command("show")
@handle_errors
def session_show(name: Annotated[str, typer.Argument()], store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """Model, counts, memory sizes, disk size and injection log of a session."""
    info = summary(open_session(store, name))
    if as_json:
        emit(info)
        return
    memory, bound = info["memory"], info["model"]
    lines = [
        f"session   {info['session']}" + (f" (forked from {info['forked_from']})" if info["forked_from"] else ""),
        f"model     {bound['id']} [{bound['kind']}, {memory['dtype']}, config {bound['fingerprint']}]",
        *([f"note      {info['label']}"] if info["label"] else []),
        f"seed      {info['seed']}",
        f"injected  {info['tokens']} tokens in {info['chunks']} chunks from {len(info['log'])} sources",
        f"commit    {info['commit']} ({info['updated']})",
        f"memory    {memory['layers']} layers x {memory['short_term_rows']} short-term rows x {memory['hidden_size']}",
        *(
            [f"ltm       {memory['ltm_rows']} rows per layer, {memory['ltm_cached_rows']} cached"]
            if bound["kind"] == "mplus"
            else []
        ),
        f"disk      {info['disk_bytes']} bytes",
    ]
    for e in info["log"]:
        lines.append(f"  {e['at']} {e['tokens']:>8} tokens {e['chunks']:>4} chunks  {e['sha256'][:12]}  {e['source']}")
    typer.echo("\n".join(lines))


@session_app.command("rm")
@handle_errors
def session_rm(
    name: Annotated[str, typer.Argument()],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove a session."""
    root = store_root(store)
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError(f"pass --yes to remove session {name!r} without a prompt")
        typer.confirm(f"remove session {name!r}?", abort=True)
    st.remove_session(root, name)
    if as_json:
        emit({"removed": name})
    else:
        typer.echo(f"removed session {name!r}")


@session_app.command("fork")
@handle_errors
def session_fork(
    name: Annotated[str, typer.Argument()],
    new_name: Annotated[str, typer.Argument()],
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Copy a session under a new name."""
    forked = st.fork_session(store_root(store), name, st.check_name(new_name))
    if as_json:
        emit({"session": forked.name, "forked_from": name, "commit": forked.manifest["commit"]})
    else:
        typer.echo(f"forked session {name!r} into {forked.name!r}")


app.add_typer(bench_app, name="bench")


@app.command()
def parity(
    directories: Annotated[list[Path], typer.Argument(help="Reference-output directories (fixtures format).")],
) -> None:
    """Replay reference outputs of the authors' code and compare every tensor (exit 1 on any mismatch)."""
    from model.parity import main as parity_main

    raise typer.Exit(parity_main([str(d) for d in directories]))


def main() -> None:
    app()
