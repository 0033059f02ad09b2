"""`mplus bench speed` at scale: sessions as a user runs them, the cold path of a question, and the session store
at a model's shapes without the model. Each group returns `tasks.figures.Figure`s; nothing here prints.

- sessions: real `mplus inject` / `mplus ask` processes on one session grown through several sizes (10k ..
  200k tokens): bytes on disk per token, peak RSS, inject and ask wall time against a new or smaller
  session, and the peak RSS of an inject of a 20 MB file interrupted with Ctrl-C;
- cold: a fresh process opens a session and answers with one token, next to the authors' procedure on the
  same memory (MemoryState.load, memory keys/values recomputed);
- store: the files of a session whose LTM holds 10k .. 150k rows per layer (rows and keys zeros in sparse
  files) at the M+ shapes of a `tasks.speed` shape (8b: mplus-8b's), written and read by the store with no
  model: bytes written per inject, and the open time and RSS of a fresh process.

Run as `python -m tasks.scale mplus|cold|open ...`, this module is the child process of these measurements:
`mplus` runs the mplus command and records its peak RSS, `cold` and `open` print one JSON line of measurements.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import model as mp
from model import store as st
from model.memory.dtypes import dtype_of
from model.text.tokenizer import decode, encode

from .baselines import authors_cold_ask, load_snapshot
from .children import INTERRUPTED, Child, ChildFailed, child_env, child_of_this_module, measured_mplus, mplus, run_child
from .data import prose_passage
from .figures import Figure, show
from .random_models import random_ids, random_model_with_memory
from .scale_store import open_child
from .sizes import format_size
from .speed import SHAPES, Shape
from .timing import clock, sync

Log = Callable[[str], None]

# -- sessions at scale, as a user runs them ---------------------------------------------------------
SESSION_TOKENS = (10_000, 40_000, 160_000, 200_000)
INTERRUPT_BYTES = (200_000, 20_000_000)  # the interrupted injects' texts: baseline, measured
BYTES_PER_TOKEN_LIMIT = {"tiny-free-mplus": 600, "smollm2-135m": 45_000}  # float32 and bfloat16 rows
RSS_GROWTH_LIMIT = 128e6
INTERRUPTED_RSS_LIMIT = 1e9
INTERRUPT_AFTER_COMMITS = 2
QUESTION = "What did the old farmer cross before the rain began?"
ANSWER_TOKENS = 8


def prose_ids(tokenizer, tokens: int) -> list[int]:
    """The first `tokens` token ids of the distractor prose (tasks.data.prose_passage 0, 1, .., a line each)."""
    ids: list[int] = []
    for j in itertools.count():
        if len(ids) >= tokens:
            return ids[:tokens]
        ids += encode(tokenizer, prose_passage(j) + "\n")


def write_prose(path: Path, nbytes: int) -> Path:
    """A file of exactly `nbytes` bytes of distractor prose (ASCII), written a passage at a time."""
    with open(path, "w") as f:
        written = 0
        for j in itertools.count():
            if written >= nbytes:
                return path
            line = (prose_passage(j) + "\n")[: nbytes - written]
            written += f.write(line)


def committed(manifest: Path) -> int:
    """The commit number of a session's manifest (0 while it does not exist)."""
    try:
        return json.loads(manifest.read_text())["commit"]
    except (OSError, ValueError):
        return 0


@dataclass
class SessionRun:
    """An `mplus` process on a session, and the session's tokens and bytes on disk after it."""

    child: Child
    tokens: int
    disk_bytes: int


def inject(root: Path, session: str, model: str, text: Path, env: dict[str, str]) -> SessionRun:
    """`mplus inject text` (default chunks) into `session`, created on first use."""
    args = ["inject", str(text), "--session", session, "--store", str(root), "--model", model]
    child = mplus(args, env).check("mplus inject")
    found = st.Session.open(root, session)
    return SessionRun(child, found.manifest["state"]["tokens_injected"], found.disk_bytes())


def ask(root: Path, session: str, env: dict[str, str]) -> Child:
    """`mplus ask` of one short question, answered with at most ANSWER_TOKENS tokens."""
    args = ["ask", QUESTION, "--session", session, "--store", str(root), "--max-new-tokens", str(ANSWER_TOKENS)]
    return mplus(args, env).check("mplus ask")


def interrupted_inject(root: Path, session: str, model: str, text: Path, env: dict[str, str]) -> Child:
    """`mplus inject text` into a new session, sent SIGINT once it has committed INTERRUPT_AFTER_COMMITS chunks;
    it must exit as interrupted (130)."""
    manifest = root / session / st.format.MANIFEST
    args = ["inject", str(text), "--session", session, "--store", str(root), "--model", model]
    child = mplus(args, env, interrupt=lambda: committed(manifest) >= INTERRUPT_AFTER_COMMITS)
    if child.returncode == 0:
        raise ChildFailed(f"mplus inject of {text.name} finished before it was interrupted: use a larger text")
    if child.returncode != INTERRUPTED:
        raise ChildFailed(f"mplus inject exited with {child.returncode} after SIGINT, not {INTERRUPTED}")
    return child


def session_figures(
    model: str,
    tokenizer,
    tokens: tuple[int, ...] = SESSION_TOKENS,
    interrupt_bytes: tuple[int, int] = INTERRUPT_BYTES,
    threads: int | None = None,
    log: Log = lambda message: None,
) -> list[Figure]:
    """Grow one session of `model` (whose tokenizer is `tokenizer`) through the sizes `tokens` (ascending) with
    one `mplus inject` process each, inject the last step's text into a new session too, ask both one
    question, and interrupt injects of texts of `interrupt_bytes` (baseline, measured) bytes; every command
    in a fresh process (with `threads` torch threads)."""
    env = child_env(threads)
    with tempfile.TemporaryDirectory(prefix="mplus-sessions-") as tmp:
        root, ids = Path(tmp), prose_ids(tokenizer, tokens[-1])
        texts = [root / f"part-{i}.txt" for i in range(len(tokens))]
        for text, (a, b) in zip(texts, itertools.pairwise([0, *tokens]), strict=True):
            text.write_text(decode(tokenizer, ids[a:b]))
        grown = []
        for text, size in zip(texts, tokens, strict=True):
            log(f"sessions: mplus inject up to {format_size(size)} tokens")
            grown.append(inject(root, "grown", model, text, env))
        log("sessions: mplus inject into a new session, mplus ask")
        fresh = inject(root, "fresh", model, texts[-1], env)
        asks = [ask(root, "grown", env), ask(root, "fresh", env)]
        cut = []
        for nbytes in interrupt_bytes:
            log(f"sessions: mplus inject of {show(nbytes, 'B')} interrupted")
            text = write_prose(root / f"{nbytes}.txt", nbytes)
            cut.append(interrupted_inject(root, f"cut-{nbytes}", model, text, env))
        return [
            disk_figure(st.Session.open(root, "grown"), grown[-1], model),
            rss_figure(grown),
            inject_figure(grown, fresh),
            ask_figure(grown, fresh, asks),
            interrupted_figure(cut, interrupt_bytes),
        ]


def disk_figure(session: st.Session, last: SessionRun, model: str) -> Figure:
    rows, width = session.manifest["rows"]["count"], session.manifest["rows"]["width"]
    rows_bytes, layers = rows * width * session.dtype.itemsize, session.manifest["state"]["memory_shape"][0]
    detail = (
        f"every file of the session vs its {rows:,} rows of {width} stored once in {session.manifest['dtype']} "
        f"({rows / last.tokens / layers:.2f} per layer and token)"
    )
    name = f"session bytes on disk per token ({format_size(last.tokens)} tokens, {model})"
    limit = BYTES_PER_TOKEN_LIMIT.get(model)
    return Figure(name, "B", last.disk_bytes / last.tokens, rows_bytes / last.tokens, "limit", limit, detail)


def rss_figure(grown: list[SessionRun]) -> Figure:
    peak = max(grown[1:], key=lambda run: run.child.peak_rss)
    sizes = " -> ".join(format_size(run.tokens) for run in grown)
    detail = (
        f"the largest peak RSS of the injects that grew the session {sizes} tokens (at {format_size(peak.tokens)}) "
        f"vs the first inject ({format_size(grown[0].tokens)} tokens into a new session)"
    )
    name = f"inject peak RSS: session grown to {format_size(grown[-1].tokens)} vs {format_size(grown[0].tokens)} tokens"
    return Figure(name, "B", peak.child.peak_rss, grown[0].child.peak_rss, "increase", RSS_GROWTH_LIMIT, detail)


def inject_figure(grown: list[SessionRun], fresh: SessionRun) -> Figure:
    step, held = format_size(fresh.tokens), format_size(grown[-2].tokens)
    detail = "wall time of `mplus inject` of the same text (the whole process: start-up and model load included)"
    name = f"inject {step} tokens into a {held}-token session vs a new one"
    return Figure(name, "s", grown[-1].child.wall_s, fresh.child.wall_s, "growth", 1.3, detail)


def ask_figure(grown: list[SessionRun], fresh: SessionRun, asks: list[Child]) -> Figure:
    detail = f"wall time of `mplus ask` of one short question, --max-new-tokens {ANSWER_TOKENS} (the whole process)"
    name = f"ask a {format_size(grown[-1].tokens)}-token session vs a {format_size(fresh.tokens)}-token one"
    return Figure(name, "s", asks[0].wall_s, asks[1].wall_s, "growth", 1.5, detail)


def interrupted_figure(cut: list[Child], nbytes: tuple[int, int]) -> Figure:
    detail = (
        f"peak RSS of `mplus inject` sent SIGINT after its commit {INTERRUPT_AFTER_COMMITS} "
        f"(both exited {INTERRUPTED}); the text is read and tokenized a block at a time"
    )
    name = f"interrupted inject peak RSS: {show(nbytes[1], 'B')} text vs {show(nbytes[0], 'B')}"
    return Figure(name, "B", cut[1].peak_rss, cut[0].peak_rss, "limit", INTERRUPTED_RSS_LIMIT, detail)


# -- the cold path: a question in a fresh process ---------------------------------------------------
COLD_SESSION, COLD_STATE = "cold", "cold.state"
COLD_INJECTS = 32


def cold_session(model: mp.MemoryLLM, root: Path, injects: int, tokens: int, seed: int = 0) -> float:
    """Session COLD_SESSION after `injects` injects of `tokens` random tokens (committed one by one) and the
    same state saved by MemoryState.save in COLD_STATE; returns the share of the short-term rows the
    session wrote (the others are the model's initial rows, read from the model)."""
    ref = st.binding(model, model.info.source or "bench")
    session = st.Session.create(root, COLD_SESSION, model.initial_state, ref, seed, model.dtype)
    with session.writer() as writer:
        state = writer.load_state(model.initial_state, model.device)
        for i in range(injects):
            writer.inject(model, state, random_ids(tokens, model.cfg.vocab_size, seed=i))
            writer.commit(state, [{"source": "bench", "sha256": "", "tokens": tokens, "chunks": 1, "at": st.now()}])
        state.save(root / COLD_STATE)
        return float((state.memory_ids >= writer.session.base).double().mean())


def cold_prompt(model: mp.MemoryLLM, shape: Shape) -> list[int]:
    return random_ids(shape.prompt_tokens, model.cfg.vocab_size, seed=1).tolist()


def cold_figures(
    shape: Shape,
    device: torch.device,
    dtype: torch.dtype,
    repeats: int = 3,
    threads: int | None = None,
    injects: int = COLD_INJECTS,
    seed: int = 0,
    log: Log = lambda message: None,
) -> list[Figure]:
    """Open + first token and open alone, each the median of `repeats` fresh processes that rebuild the random
    MemoryLLM of `shape` first (not timed): a session vs MemoryState.load of the same state."""
    with tempfile.TemporaryDirectory(prefix="mplus-cold-") as tmp:
        log(f"cold: a session after {injects} injects")
        model = random_model_with_memory(shape.memoryllm, device, dtype, seed)
        share = cold_session(model, Path(tmp), injects, shape.inject_tokens, seed)
        rows = model.cfg.memory_rows
        del model
        args = ["cold", "--shape", shape.name, "--device", str(device), "--dtype", st.dtype_name(dtype)]
        args += ["--seed", str(seed), "--root", tmp]
        runs: dict[str, list[dict[str, float]]] = {"session": [], "load": []}
        for i in range(repeats):
            log(f"cold: fresh processes {i + 1}/{repeats}")
            for way, measured in runs.items():
                child = run_child(child_of_this_module(*args, "--way", way), child_env(threads)).check("cold")
                measured.append(json.loads(child.stdout))

    def median(way: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[way])

    where = f"{rows:,} rows/layer, fresh process"
    common = f"median of {repeats} fresh processes that first build the model (not timed); {share:.0%} of the rows"
    common += " were written by the session, the rest are the model's own (read from the model, not the file)"
    return [
        Figure(
            f"cold ask: open + first token ({where})",
            "s",
            median("session", "ask_s"),
            median("load", "ask_s"),
            target=1.0,
            detail="Session.open + load_state + generate (memory keys/values computed as cached for reuse) vs "
            f"MemoryState.load + generate(reuse_memory_kv=False), {shape.prompt_tokens}-token prompt; {common}",
        ),
        Figure(
            f"cold open: session vs MemoryState.load ({where})",
            "s",
            median("session", "open_s"),
            median("load", "open_s"),
            target=1.0,
            detail=f"Session.open + load_state vs MemoryState.load + reading every tensor (clone); {common}",
        ),
    ]


def cold_child(args: argparse.Namespace) -> dict[str, float]:
    """One fresh process of `cold_figures`: the model is built first, then the timed open and first token."""
    shape, device, dtype = SHAPES[args.shape], torch.device(args.device), dtype_of(args.dtype)
    model = random_model_with_memory(shape.memoryllm, device, dtype, args.seed)
    ids, settings, root = cold_prompt(model, shape), mp.DecodeSettings(max_new_tokens=1), Path(args.root)
    if args.way == "session":
        start = time.perf_counter()
        state = st.Session.open(root, COLD_SESSION).load_state(model.initial_state, device)
        sync(device)
        open_s = time.perf_counter() - start
        mp.generate(model, state, ids, settings)
        sync(device)
        return {"open_s": open_s, "ask_s": time.perf_counter() - start}
    open_s = clock(lambda: load_snapshot(root / COLD_STATE, device), device)
    # second in this process: a head start that the session's first token does not get
    ask_s = clock(lambda: authors_cold_ask(model, root / COLD_STATE, ids, settings, device), device)
    return {"open_s": open_s, "ask_s": ask_s}


# -- child processes' entry point -------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tasks.scale", description="A child process of tasks.scale.")
    commands = parser.add_subparsers(dest="command", required=True)
    cold = commands.add_parser("cold", help="open a session (or load a state), answer one token")
    cold.add_argument("--way", choices=("session", "load"), required=True)
    cold.add_argument("--shape", choices=tuple(SHAPES), required=True)
    cold.add_argument("--device", default="cpu")
    cold.add_argument("--dtype", default="float32")
    cold.add_argument("--seed", type=int, default=0)
    cold.add_argument("--root", required=True)
    opened = commands.add_parser("open", help="open a stand-in session of the store figures")
    opened.add_argument("--shape", choices=tuple(SHAPES), required=True)
    opened.add_argument("--root", required=True)
    opened.add_argument("--session", required=True)
    opened.add_argument("--stm", action="store_true", help="then load the whole state, short-term rows included")
    measured = commands.add_parser("mplus", help="run mplus, recording its peak RSS")
    measured.add_argument("peak_file", help="where its peak RSS (bytes) is written when it exits")
    measured.add_argument("args", nargs=argparse.REMAINDER, help="mplus's arguments")
    args = parser.parse_args(argv)
    if args.command == "mplus":
        measured_mplus(args.peak_file, args.args)
        return
    print(json.dumps(cold_child(args) if args.command == "cold" else open_child(args)))


if __name__ == "__main__":
    main()
