"""The `mplus` command line: each command is a thin call into the `model` library and the session store.

Exit codes: 0 ok, 1 failure, 2 usage error, 3 not found (session, model, file), 4 conflict (session busy,
model mismatch), 130 interrupted. Expected errors print one line; `mplus --debug ...` shows the traceback.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

import model as mp
from model import store as st
from model.memory.provenance import retrievals
from model.text.chunking import MIN_CHUNK_TOKENS
from model.text.sources import plan_source
from model.text.tokenizer import chat_ids, decode, encode, has_chat_template, wants_chat
from model.zoo import catalog

from . import inputs
from .bench import bench_app
from .catalog import models
from .common import (
    OPTIONS,
    SEED_MAX,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    MplusGroup,
    SessionOpt,
    StoreOpt,
    TokenizerOpt,
    columns,
    emit,
    handle_errors,
    human_bytes,
    note_label,
    plural,
    say,
    stop_ids,
)
from .devices import dtype_option, pick_device, pick_dtype
from .errors import ConflictError, Interrupted, NotFoundError, UsageError
from .explain import draw_map, explanation, explanation_lines
from .export import export
from .export import load_exported_memory as load_exported_memory  # re-exported for callers
from .models import (
    binding,
    check_memory,
    check_requested,
    load_bound_model,
    load_model,
    model_id,
    requested_model,
    with_memory,
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
session_app = typer.Typer(
    help="List, show, check, remove and fork stored sessions.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(session_app, name="session")


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


def store_root(option: Path | None) -> Path:
    return option or st.default_root()


def open_session(store: Path | None, name: str) -> st.Session:
    return st.Session.open(store_root(store), name)


# -- inject ---------------------------------------------------------------------------------------
def progress_bar(total: int):
    """A rich progress bar on stderr (chunks done of all, time left), shown for more than a few chunks on a
    terminal (elsewhere it would leave an empty line)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    console = Console(stderr=True)
    return Progress(*columns, console=console, transient=True, disable=total < 4 or not console.is_terminal)


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
                f"model {lm.info['source']!r} has {lm.cfg.kind} memory: --memory {memory} needs another model"
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


def interrupted(run: st.InjectRun) -> Interrupted:
    """What the session holds now, read back from its committed manifest (Ctrl-C can come right after a
    commit, before the run counted it)."""
    if run.first_commit is None:
        return Interrupted(f"interrupted; nothing was injected into session {run.session!r}")
    found = st.Session.open(run.root, run.session)
    partial, source = found.partial, run.current
    if partial and source is not None and partial["sha256"] == source.sha256:
        again = f"{'-' if source.name == '<stdin>' else source.name} --session {run.session} --resume`"
        again += " with the same input on stdin" if source.name == "<stdin>" else ""
        return Interrupted(
            f"interrupted; session {run.session!r} keeps {partial['chunks_done']} of {partial['chunks_total']} "
            f"chunks of {source.name}: continue with `mplus inject {again}"
        )
    new = found.manifest["commit"] - run.first_commit
    return Interrupted(
        f"interrupted; session {run.session!r} keeps the {new} chunks this command committed"
        if new
        else f"interrupted; session {run.session!r} is unchanged"
    )


def inject_with_progress(writer: st.Writer, lm: mp.MemoryLLM, sources, skips, chunk_tokens: int, run) -> mp.MemoryState:
    """st.inject_sources under a progress bar of the chunks to inject."""
    total = sum(s.chunks - skip for s, skip in zip(sources, skips, strict=True))
    with progress_bar(total) as bar:
        task = bar.add_task("injecting", total=total)

        def advance(source) -> None:
            bar.update(task, advance=1, description=Path(source.name).name)

        return st.inject_sources(writer, lm, sources, skips, chunk_tokens, run, advance, say)


def context_window(lm: mp.MemoryLLM) -> int | None:
    """The positions the model attends over: its config's max_position_embeddings, stretched by a linear RoPE
    factor or MemoryLLM-7B's position interpolation; None if the config does not say."""
    window = lm.cfg.raw.get("max_position_embeddings")
    if window is None:
        return None
    rope = lm.cfg.rope
    return round(int(window) * (rope.factor if rope.kind == "linear" else 1.0) / rope.position_scale)


def check_chunk_tokens(lm: mp.MemoryLLM, chunk_tokens: int) -> None:
    """Refuse chunks the model cannot take in one injection: model.inject places a chunk after bos and the
    last K memory rows (training-free: after bos alone), within the context window; a chunk can exceed
    --chunk-tokens by a merged tail of up to MIN_CHUNK_TOKENS - 1 tokens."""
    window = context_window(lm)
    if window is None:
        return
    prefix = 1 if lm.cfg.training_free is not None else lm.n_bos + lm.cfg.num_tokens
    limit = window - prefix - (MIN_CHUNK_TOKENS - 1)
    if chunk_tokens > limit:
        raise UsageError(f"--chunk-tokens {chunk_tokens} exceeds the model's limit of {limit} tokens per injection")


@app.command()
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
        str | None,
        typer.Option(help="Memory of a new session: mplus | memoryllm (picks the built-in model's flavour)."),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            help="The model's dtype and a new session's storage dtype: bfloat16 | float16 | float32 (default: "
            "bfloat16 on CUDA, float32 on the CPU; a new session then keeps its rows in the model's storage dtype)."
        ),
    ] = None,
    device: DeviceOpt = "auto",
    resume: Annotated[
        bool,
        typer.Option(help="Continue an interrupted inject: skip sources already injected, finish a partial one."),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Inject text into a session's memory (the session is created on first use, bound to its model).

    Text is read and tokenized as a stream and cut into chunks of at most --chunk-tokens tokens (a final
    piece under 16 tokens is merged into the previous chunk). Each chunk is committed as it finishes: a
    crash or Ctrl-C loses at most the chunk in flight, and --resume continues after the last committed one.

    Example: mplus inject notes.txt --session s1 --model tiny-mplus
    """
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
        raise interrupted(run) from None
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
    ref = binding(lm.info["source"], lm, tokenizer, None)
    seed = seed if seed is not None else None if lm.info.get("carried_state") else 0
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


# -- ask ------------------------------------------------------------------------------------------
def prompt_ids(lm: mp.MemoryLLM, question: str, chat: bool | None, system: str | None) -> tuple[list[int], bool]:
    """The question's token ids, and whether they are a user turn of the tokenizer's chat template: after the
    `system` turn if given, else with no system turn (not even one the template adds on its own, which costs
    the demo model recall), and without a BOS the template inserts. By default (chat None) the template is
    applied when the tokenizer has one and the question is not templated yet."""
    if not question.strip():
        raise UsageError("the question is empty")
    templated = wants_chat(lm.tokenizer, question, chat)
    if system is not None and not templated:
        reason = (
            "--no-chat leaves it out"
            if chat is False
            else "this model's tokenizer has none"
            if not has_chat_template(lm.tokenizer)
            else "this question is already in the chat format"
        )
        raise UsageError(f"--system adds a turn to the chat template and {reason}: drop --system")
    if not templated:
        return encode(lm.tokenizer, question), False
    try:
        return chat_ids(lm.tokenizer, question, system, default_system=False), True
    except ValueError as e:
        raise UsageError(f"{e}: drop --chat") from e


def empty_answer_hint(lm: mp.MemoryLLM, chat: bool, option: bool | None, finish_reason: str) -> str:
    """What to try after an empty answer, for the way the question was asked."""
    if finish_reason == "length":
        return "raise --max-new-tokens"
    if chat:
        return "the model ended its turn at once: rephrase the question" + ("" if option else " or try --no-chat")
    if not has_chat_template(lm.tokenizer):
        return "the model stopped at once: rephrase the question (a base model may need a 'Question: ... Answer:' form)"
    if option is False:
        return "this is an instruct model: drop --no-chat to ask in its chat format"
    return "give the plain question: ask puts it in the model's chat format itself"


def check_context(lm: mp.MemoryLLM, state: mp.MemoryState, prompts: list[list[int]], max_new_tokens: int) -> None:
    """Refuse questions that do not fit the context window after the memory prefix: a question of q tokens
    and its answer take positions P .. P + q + max_new_tokens - 2 (the last answer token is not read)."""
    window = context_window(lm)
    if window is None:
        return
    prefix = lm.prefix_length(state)
    if max_new_tokens > window - prefix:
        raise UsageError(
            f"--max-new-tokens {max_new_tokens} exceeds the model's limit of {window - prefix} new tokens "
            f"(a context of {window} positions, {prefix} of them memory)"
        )
    limit = window - prefix - (max_new_tokens - 1)
    longest = max(len(ids) for ids in prompts)
    if longest > limit:
        raise UsageError(
            f"a question of {longest} tokens exceeds the model's limit of {limit} tokens with --max-new-tokens "
            f"{max_new_tokens}: shorten the question or lower --max-new-tokens"
        )


class Streamer:
    """Prints the decoded answer as tokens arrive (holding back an incomplete UTF-8 sequence) and times it
    from its creation, just before the question is read."""

    def __init__(self, tokenizer, enabled: bool):
        self.tokenizer, self.enabled, self.ids, self.shown = tokenizer, enabled, [], ""
        self.started, self.first = time.perf_counter(), None

    def __call__(self, token: int) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        self.ids.append(token)
        text = decode(self.tokenizer, self.ids)
        if self.enabled and not text.endswith("\ufffd"):
            sys.stdout.write(text[len(self.shown) :])
            sys.stdout.flush()
            self.shown = text

    def timing(self) -> dict[str, float | int | None]:
        """Time to the first token (None without one), the answer's time and its tokens per second."""
        seconds = time.perf_counter() - self.started
        return {
            "ttft_s": None if self.first is None else round(self.first - self.started, 4),
            "total_s": round(seconds, 4),
            "tokens": len(self.ids),
            "tokens_per_s": round(len(self.ids) / seconds, 2) if seconds > 0 else 0.0,
        }


def gather_questions(questions: list[str] | None, questions_file: Path | None) -> list[str]:
    """The questions: arguments, then --questions FILE, or (with neither, or the argument '-') one per line on stdin."""
    given = list(questions or [])
    from_stdin = given == ["-"] or (not given and questions_file is None)
    if from_stdin:
        if sys.stdin.isatty():
            raise UsageError('give a question: mplus ask "..." (or --questions FILE, or lines on stdin)')
        given = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if questions_file is not None:
        if not questions_file.is_file():
            raise NotFoundError(f"no such file: {questions_file}")
        given += [line.rstrip("\n") for line in questions_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not given:
        raise UsageError("no question given (the input holds no non-empty line)")
    return given


@app.command()
@handle_errors
def ask(
    questions: Annotated[
        list[str] | None,
        typer.Argument(help="Questions to answer from memory ('-' or none: one per line on stdin)."),
    ] = None,
    session: Annotated[
        str | None,
        typer.Option("--session", "-s", help="Session name (default: none, the model's own memory)."),
    ] = None,
    questions_file: Annotated[
        Path | None, typer.Option("--questions", help="A file with one question per line.")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens per answer (max: the model's context).", min=1)] = 64,
    sample: Annotated[bool, typer.Option(help="Sample instead of greedy decoding.")] = False,
    temperature: Annotated[float, typer.Option(min=0.0, max=10.0)] = 1.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.", min=0, max=SEED_MAX)] = 0,
    chat: Annotated[
        bool | None,
        typer.Option(
            "--chat/--no-chat",
            help="Ask in the tokenizer's chat template, or not (default: when it has one and the question is plain).",
            show_default=False,
        ),
    ] = None,
    system: Annotated[
        str | None,
        typer.Option("--system", help="A system turn before each question (default: none; needs the chat template)."),
    ] = None,
    explain: Annotated[
        bool,
        typer.Option(
            "--explain",
            help="After each answer, say on stderr what it read: the injections its retrieved long-term rows came "
            "from (M+) and how much of the latest injections the short-term memory holds (also in --json).",
        ),
    ] = False,
    model: ModelOpt = None,
    store: StoreOpt = None,
    tokenizer: TokenizerOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Answer questions from a session's memory, streamed to stdout (the session is not changed).

    A plain question is asked as a user turn of the model's chat template when its tokenizer has one
    (--chat / --no-chat decide it either way). Without --session the model's own memory answers and
    nothing is created: the model is --model, else $MPLUS_MODEL, else smollm2-135m. Several questions
    are answered in one process: the memory is read once and its keys/values are reused by every question.

    Example: mplus ask "Where is the spare key?" --session s1
    """
    asked = gather_questions(questions, questions_file)
    start = time.perf_counter()
    target = pick_device(device)
    found, lm, head = asking_model(store, session, model, tokenizer, target, pick_dtype(dtype, target))
    settings = decode_settings(lm, max_new_tokens, sample, temperature, top_p, seed)
    prompts = [prompt_ids(lm, question, chat, system) for question in asked]
    state = lm.initial_state if found is None else found.load_state(lm.initial_state, lm.device)  # read only
    load_s = time.perf_counter() - start
    check_context(lm, state, [ids for ids, _ in prompts], max_new_tokens)
    note_label(lm)
    if found is None:
        say("mplus: note: no --session: the model's own memory answers (nothing injected)")
    asking = Asking(lm, state, settings, found, chat, explain, show=not as_json, several=len(asked) > 1)
    answers = [asking.answer(n, q, *prompt) for n, (q, prompt) in enumerate(zip(asked, prompts, strict=True), 1)]
    if as_json:
        single = answers[0] if len(answers) == 1 else {}
        timing = ask_timing(answers, load_s, start)
        emit(head | single | {"answers": answers, "settings": settings.to_dict(), "timing": timing})


def asking_model(
    store: Path | None,
    session: str | None,
    model: str | None,
    tokenizer: str | None,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[st.Session | None, mp.MemoryLLM, dict[str, Any]]:
    """(the session or None, its model or the one the options name, the JSON head: session, model, label)."""
    if session is None:
        name = requested_model(model)
        lm = load_model(name, dtype, tokenizer, device=device)
        return None, lm, {"session": None, "model": model_id(name), "label": lm.info.get("label", "")}
    found = open_session(store, session)
    check_requested(session, found.model_ref, model)
    lm = load_bound_model(session, found.model_ref, tokenizer, device, dtype)
    return found, lm, {"session": session, "model": found.model_ref["id"], "label": found.model_ref["label"]}


def decode_settings(
    lm: mp.MemoryLLM, max_new_tokens: int, sample: bool, temperature: float, top_p: float, seed: int
) -> mp.DecodeSettings:
    try:
        return mp.DecodeSettings(
            max_new_tokens=max_new_tokens,
            sample=sample,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop_token_ids=stop_ids(lm),
        )
    except ValueError as e:
        raise UsageError(str(e)) from e


@dataclass
class Asking:
    """Questions answered one after another from one memory state (read only)."""

    lm: mp.MemoryLLM
    state: mp.MemoryState
    settings: mp.DecodeSettings
    found: st.Session | None  # the session, for --explain
    chat: bool | None  # --chat / --no-chat, for the hint after an empty answer
    explain: bool
    show: bool  # stream the answers to stdout (not under --json)
    several: bool  # more than one question: each is printed before its answer

    def answer(self, n: int, question: str, ids: list[int], templated: bool) -> dict[str, Any]:
        """Answer question `n` (1-based), streaming it when shown; its --json record."""
        lm = self.lm
        if self.several and self.show:
            sys.stdout.write(f"Q: {question}\nA: ")
        streamer = Streamer(lm.tokenizer, enabled=self.show)
        with retrievals(lm) if isinstance(lm, mp.MPlus) else contextlib.nullcontext({}) as read:
            out = mp.generate(lm, self.state, ids, self.settings, on_token=streamer)
        timing = streamer.timing()
        answer = decode(lm.tokenizer, out.token_ids)
        if self.show:
            sys.stdout.write(answer[len(streamer.shown) :] + "\n")
            sys.stdout.flush()
        if not answer.strip():
            which = f" to question {n}" if self.several else ""
            hint = empty_answer_hint(lm, templated, self.chat, out.finish_reason)
            say(f"mplus: note: the answer{which} is empty; {hint}")
        record = {
            "question": question,
            "chat": templated,
            "prompt": lm.tokenizer.decode(ids, skip_special_tokens=False),
            "prompt_ids": ids,
            "answer": answer,
            "token_ids": out.token_ids,
            "finish_reason": out.finish_reason,
            "timing": timing,
        }
        if self.explain:
            record["explain"] = report = explanation(lm, self.state, read, self.found)
            if self.show:
                for line in explanation_lines(report):
                    say(line)
        return record


def ask_timing(answers: list[dict[str, Any]], load_s: float, start: float) -> dict[str, Any]:
    """ask --json's top-level timing: loading, the first answer's time to first token, the whole command, and
    tokens per second over all answers."""
    answering = sum(a["timing"]["total_s"] for a in answers)
    tokens = sum(len(a["token_ids"]) for a in answers)
    return {
        "load_s": round(load_s, 4),
        "ttft_s": answers[0]["timing"]["ttft_s"],
        "total_s": round(time.perf_counter() - start, 4),
        "tokens": tokens,
        "tokens_per_s": round(tokens / answering, 2) if answering > 0 else 0.0,
    }


# -- export ---------------------------------------------------------------------------------------
app.command()(export)
app.command()(models)


# -- session ls | show | rm | fork ------------------------------------------------------------------
def summary(found: st.Session) -> dict[str, Any]:
    """What `session show` reports; reads the manifest and the log, never the rows."""
    meta, bound = found.manifest["state"], found.model_ref
    L, N, d = meta["memory_shape"]
    flavour = catalog.flavour(bound.get("label", ""))
    memory = {"layers": L, "short_term_rows": N, "short_term_capacity": short_term_capacity(bound, flavour, N)}
    memory |= {"hidden_size": d, "dtype": found.manifest["dtype"]}
    if "ltm" in meta:
        sizes = meta["ltm"]["sizes"]
        memory |= {"ltm_rows": sizes, "ltm_rows_min": min(sizes), "ltm_rows_max": max(sizes)}
        memory |= {"ltm_cached_rows": meta["ltm"]["cached_rows"]}
        memory |= {"ltm_entries": found.manifest["ltm"]["initial_entries"] + found.manifest["ltm"]["entries"]}
    return {
        "session": found.name,
        "model": bound,
        "label": bound.get("label", ""),
        "flavour": flavour,
        "seed": found.manifest["seed"],
        "created": found.manifest["created"],
        "updated": found.manifest["updated"],
        "commit": found.manifest["commit"],
        "injections": meta["injections"],
        "tokens": meta["tokens_injected"],
        "chunks": found.manifest["chunks"],
        "memory": memory,
        "disk_bytes": found.disk_bytes(),
        "busy": found.busy(),
        "forked_from": found.manifest.get("forked_from"),
        "partial": found.partial,
        "log": found.log(),
    }


def short_term_capacity(bound: dict[str, Any], flavour: str, rows: int) -> int | None:
    """Short-term rows per layer the model holds at most: a trained memory is always full; a training-free one
    fills up to its model's capacity (None if the model is not on this machine)."""
    if flavour == "trained":
        return rows
    cfg = catalog.model_config(bound["id"])
    return cfg.memory_rows if cfg is not None else None


def local_time(stamp: str) -> str:
    """An ISO time stamp of the store (UTC) as local time to the minute."""
    return datetime.fromisoformat(stamp).astimezone().strftime("%Y-%m-%d %H:%M")


def ltm_range(memory: dict[str, Any]) -> str:
    low, high = memory["ltm_rows_min"], memory["ltm_rows_max"]
    return f"{low:,}" if low == high else f"{low:,}\u2013{high:,}"


@session_app.command("ls")
@handle_errors
def session_ls(store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """List the sessions: model, memory, injections, tokens, size on disk, last update, and whether a writer
    holds one now (busy).

    Example: mplus session ls --json
    """
    root = store_root(store)
    rows = []
    for name in st.list_sessions(root):
        try:
            found = st.Session.open(root, name)
            meta, bound = found.manifest["state"], found.model_ref
            rows.append(
                {
                    "session": name,
                    "model": bound["id"],
                    "kind": bound["kind"],
                    "flavour": catalog.flavour(bound.get("label", "")),
                    "injections": meta["injections"],
                    "tokens": meta["tokens_injected"],
                    "disk_bytes": found.disk_bytes(),
                    "updated": found.manifest["updated"],
                    "busy": found.busy(),
                }
            )
        except st.StoreError as e:
            rows.append({"session": name, "error": str(e)})
    if as_json:
        emit({"store": str(root), "sessions": rows})
        return
    if not rows:
        say(f"no sessions in {root}")
        return
    table = [["session", "model", "memory", "flavour", "injections", "tokens", "size", "updated", "busy"]]
    for row in rows:
        if "error" in row:
            table.append([row["session"], "damaged (see session check)", *["-"] * 7])
            continue
        counts = [f"{row['injections']:,}", f"{row['tokens']:,}", human_bytes(row["disk_bytes"])]
        table.append(
            [row["session"], row["model"], row["kind"], row["flavour"], *counts, local_time(row["updated"])]
            + ["yes" if row["busy"] else "no"]
        )
    typer.echo("\n".join(columns(table, right=(4, 5, 6))))


@session_app.command("show")
@handle_errors
def session_show(
    name: Annotated[str, typer.Argument()],
    map_path: Annotated[
        Path | None,
        typer.Option(
            "--map",
            help="Also draw the memory's composition into this PNG: per layer, the share of its rows by the "
            "injection that wrote them, short-term and long-term side by side (loads the model).",
        ),
    ] = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A session's model, counts, memory (short-term rows used of capacity, long-term rows per layer), storage
    dtype, size on disk and injection log.

    Example: mplus session show s1 --map s1.png
    """
    found = open_session(store, name)
    info = summary(found)
    if map_path is not None:
        if not map_path.parent.is_dir():
            raise NotFoundError(f"no directory {map_path.parent} to write {map_path.name} into: create it first")
        lm = load_bound_model(name, found.model_ref, None)
        draw_map(found.load_state(lm.initial_state), map_path, f"session {name}: {found.model_ref['id']}")
        info["map"] = str(map_path)
    if as_json:
        emit(info)
        return
    memory, bound = info["memory"], info["model"]
    capacity = memory["short_term_capacity"]
    used = f"{memory['short_term_rows']:,}" + (f" of {capacity:,}" if capacity is not None else "")
    sources = len(info["log"])
    lines = [
        f"session     {info['session']}" + (f" (forked from {info['forked_from']})" if info["forked_from"] else ""),
        f"model       {bound['id']} ({bound['kind']}, {info['flavour']}; config {bound['fingerprint']})",
        *([f"note        {info['label']}"] if info["label"] else []),
        f"storage     {memory['dtype']} rows, {human_bytes(info['disk_bytes'])} on disk",
        f"injected    {plural(info['tokens'], 'token')} in {plural(info['chunks'], 'chunk')} "
        f"from {plural(sources, 'source')}",
        f"commit      {info['commit']} ({local_time(info['updated'])})"
        + (", busy: a writer holds it" if info["busy"] else ""),
        f"seed        {info['seed']}",
        f"short-term  {used} rows per layer ({plural(memory['layers'], 'layer')} of width {memory['hidden_size']:,})",
    ]
    if "ltm_rows" in memory:
        lines.append(
            f"long-term   {ltm_range(memory)} rows per layer, {memory['ltm_cached_rows']:,} cached "
            f"(awaiting the next merge), {plural(memory['ltm_entries'], 'entry', 'entries')}"
        )
    partial = info["partial"]
    if partial:
        lines.append(
            f"partial     {partial['source']}: {partial['chunks_done']} of {plural(partial['chunks_total'], 'chunk')} "
            f"committed ({partial['tokens_done']:,} of {plural(partial['tokens_total'], 'token')}); "
            "`mplus inject ... --resume` continues it"
        )
    if info["log"]:
        log = [["injected at", "tokens", "chunks", "sha256", "source"]]
        for e in info["log"]:
            chunks = f"{e['chunks']:,}" + (f" of {e['chunks_total']:,} (partial)" if e.get("partial") else "")
            log.append([local_time(e["at"]), f"{e['tokens']:,}", chunks, e["sha256"][:12], e["source"]])
        lines += ["log", *(f"  {line}" for line in columns(log, right=(1,)))]
    typer.echo("\n".join(lines))


@session_app.command("rm")
@handle_errors
def session_rm(
    name: Annotated[str, typer.Argument()],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove a session.

    Example: mplus session rm s1 --yes
    """
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
    """Copy a session under a new name.

    Example: mplus session fork s1 s1-backup
    """
    forked = open_session(store, name).fork(st.check_name(new_name))
    if as_json:
        emit({"session": forked.name, "forked_from": name, "commit": forked.manifest["commit"]})
    else:
        typer.echo(f"forked session {name!r} into {forked.name!r}")


@session_app.command("check")
@handle_errors
def session_check(
    name: Annotated[str, typer.Argument()],
    rollback: Annotated[
        bool, typer.Option(help="If the committed state is damaged, return to the newest kept commit that verifies.")
    ] = False,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Verify every file of a session against its checksums (exit 1 if the committed state is damaged).

    The last few commits are kept: with --rollback a damaged session returns to the newest of them that
    verifies (what later commits added is lost; the command says which commit it returned to).

    Example: mplus session check s1 --rollback
    """
    root = store_root(store)
    verdicts = st.check_session(root, name)
    current = verdicts[0]
    report: dict[str, Any] = {"session": name, "ok": not current.problems, "commit": current.commit}
    report["commits"] = [vars(verdict) for verdict in verdicts]
    if rollback and current.problems:
        report["rolled_back_from"], report["commit"] = st.rollback_session(root, name)
        report["ok"] = True
    if as_json:
        emit(report)
    else:
        for problem in current.problems:
            say(f"mplus: damaged: {problem}")
        if "rolled_back_from" in report:
            was = report["rolled_back_from"]
            typer.echo(
                f"session {name!r} rolled back from commit {was if was is not None else '?'} to commit "
                f"{report['commit']}, which verifies"
            )
        elif not current.problems:
            typer.echo(f"session {name!r}: commit {current.commit} verifies ({current.checked_bytes} bytes checked)")
    if not report["ok"]:
        good = next((v.commit for v in verdicts[1:] if not v.problems), None)
        advice = f"`--rollback` returns to commit {good}" if good is not None else "no kept commit verifies"
        raise st.SessionDamaged(f"session {name!r} is damaged: {advice}")


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
