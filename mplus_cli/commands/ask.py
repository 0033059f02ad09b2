"""`mplus ask`: questions answered from a session's memory, streamed."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

import model as mp
from model import store as st
from model.memory.provenance import retrievals
from model.text.tokenizer import chat_ids, decode, encode, has_chat_template, wants_chat

from ..common import SEED_MAX, handle_errors, json_output, note_label, open_session, stop_ids
from ..devices import pick_device, pick_dtype
from ..errors import MplusError, NotFoundError, UsageError
from ..explain import explanation, explanation_lines
from ..models import (
    check_requested,
    load_bound_model,
    load_model,
    model_id,
    requested_model,
)
from ..options import DeviceOpt, DtypeOpt, ModelOpt, StoreOpt, TokenizerOpt
from ..output import emit
from ..root import say


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
    window = lm.cfg.context_window
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
        given += [line for line in question_lines(questions_file) if line.strip()]
    if not given:
        raise UsageError("no question given (the input holds no non-empty line)")
    return given


def temperature_range(value: float) -> float:
    """--temperature from 0 to 10 (nan, which no range check catches, is refused as not a number)."""
    if math.isnan(value):
        raise typer.BadParameter("nan is not a number: give one from 0 to 10")
    if not 0.0 <= value <= 10.0:
        raise typer.BadParameter(f"{value} is not from 0 to 10")
    return value


def question_lines(path: Path) -> list[str]:
    """The lines of a --questions file: UTF-8 text, one question per line."""
    if path.is_dir():
        raise UsageError(f"--questions {path} is a directory: give a text file with one question per line")
    if not path.exists():
        raise NotFoundError(f"no such file: {path}")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise MplusError(f"--questions {path} is not UTF-8 text (byte {e.start}): give a text file") from None
    except OSError as e:
        raise MplusError(f"cannot read --questions {path} ({e.strerror}): give a readable text file") from None


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
    temperature: Annotated[float, typer.Option(callback=temperature_range, help="From 0 to 10.")] = 1.0,
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
) -> None:
    """Answer questions from a session's memory, streamed to stdout (the session is not changed).

    A plain question is asked as a user turn of the model's chat template when its tokenizer has one
    (--chat / --no-chat decide it either way). Without --session the model's own memory answers and
    nothing is created: the model is --model, else $MPLUS_MODEL, else smollm2-135m. Several questions
    are answered in one process: the memory is read once and its keys/values are reused by every question.

    Example: mplus ask "Where is the spare key?" --session s1
    """
    as_json = json_output()
    asked = gather_questions(questions, questions_file)
    start = time.perf_counter()
    target = pick_device(device)
    found, lm, head = asking_model(store, session, model, tokenizer, target, pick_dtype(dtype, target))
    settings = decode_settings(lm, max_new_tokens, sample, temperature, top_p, seed)
    prompts = [prompt_ids(lm, question, chat, system) for question in asked]
    state = memory_of(found, lm)
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
        return None, lm, {"session": None, "model": model_id(name), "label": lm.info.label}
    found = open_session(store, session)
    check_requested(session, found.model_ref, model)
    lm = load_bound_model(session, found.model_ref, tokenizer, device, dtype)
    return found, lm, {"session": session, "model": found.model_ref["id"], "label": found.model_ref["label"]}


def memory_of(found: st.Session | None, lm: mp.MemoryLLM) -> mp.MemoryState:
    """What a question reads (never changed): the session's memory, or the model's own without one."""
    return lm.initial_state if found is None else found.load_state(lm.initial_state, lm.device)


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
            record["explain"] = report = explanation(lm, self.state, read, self.found, out)
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
