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
import atexit
import itertools
import json
import os
import runpy
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import model as mp
from model import store as st
from model.core.config import ModelConfig, config_from_hf
from model.memory.ltm import EntryBank, LayerLTM, LongTermMemory
from model.memory.rows import SUM_BLOCK_BYTES, FileArray, RowSpace, block_sums
from model.memory.state import draw_permutations, drop_and_append
from model.text.tokenizer import decode, encode

from .baselines import authors_cold_ask, load_snapshot
from .data import prose_passage
from .figures import Figure, show
from .random_models import block_entries, random_ids, random_model_with_memory, zero_rows
from .sizes import format_size
from .speed import SHAPES, Shape
from .speed_store import bytes_written, file_table
from .timing import clock, sync

Log = Callable[[str], None]

# -- child processes --------------------------------------------------------------------------------
INTERRUPTED = 130  # mplus's exit code after Ctrl-C
POLL_S = 0.02


class ChildFailed(RuntimeError):
    """A child process did not end as it should; the message says how it ended."""


@dataclass
class Child:
    """A finished child process: its exit code, wall seconds and output, and for `mplus` its peak RSS (bytes)."""

    returncode: int
    wall_s: float
    stdout: str
    stderr: str
    peak_rss: int = 0

    def check(self, what: str) -> Child:
        if self.returncode != 0:
            last = (self.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise ChildFailed(f"{what} exited with {self.returncode}: {last}")
        return self


def run_child(args: list[str], env: dict[str, str] | None = None, interrupt: Callable[[], bool] | None = None) -> Child:
    """Run `args` in a fresh process to its end; with `interrupt`, send it SIGINT once interrupt() is true."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        with subprocess.Popen(args, stdout=out, stderr=err, env=env) as process:
            try:
                wait(process, interrupt)
            except BaseException:
                process.kill()
                raise
        wall_s = time.perf_counter() - start
        out.seek(0), err.seek(0)
        return Child(process.returncode, wall_s, out.read().decode(), err.read().decode())


def wait(process: subprocess.Popen, interrupt: Callable[[], bool] | None) -> None:
    """Wait for `process`; with `interrupt`, polled every POLL_S while it runs, SIGINT it once that is true."""
    while interrupt is not None and process.poll() is None:
        if interrupt():
            process.send_signal(signal.SIGINT)
            interrupt = None
        else:
            time.sleep(POLL_S)
    process.wait()


def mplus(args: list[str], env: dict[str, str], interrupt: Callable[[], bool] | None = None) -> Child:
    """`mplus ARGS` in a fresh process (as `python -m mplus_cli` runs it), with its peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        peak = Path(tmp) / "peak-rss"
        child = run_child(child_of_this_module("mplus", str(peak), *args), env, interrupt)
        child.peak_rss = int(peak.read_text()) if peak.exists() else 0
        return child


def measured_mplus(peak_file: str, args: list[str]) -> None:
    """Run `mplus ARGS` in this process and write its peak RSS to `peak_file` when it exits (however it exits)."""
    atexit.register(lambda: Path(peak_file).write_text(str(peak_rss())))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as at a terminal, even if started ignoring it
    sys.argv = ["mplus", *args]
    runpy.run_module("mplus_cli", run_name="__main__")


def peak_rss() -> int:
    """This process's peak RSS in bytes: its VmHWM. (Not ru_maxrss: on Linux a child's starts at its parent's
    peak RSS, carried across fork and exec, so it would report the benchmark's own memory.)"""
    with open("/proc/self/status") as f:
        return 1024 * int(next(line.split()[1] for line in f if line.startswith("VmHWM:")))


def child_env(threads: int | None) -> dict[str, str]:
    """This process's environment, with OMP_NUM_THREADS (torch's thread count) set to `threads` if given."""
    return os.environ | ({} if threads is None else {"OMP_NUM_THREADS": str(threads)})


def child_of_this_module(*args: str) -> list[str]:
    return [sys.executable, "-m", "tasks.scale", *args]


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
    manifest = root / session / st.MANIFEST
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
    ref = st.binding(model, model.info.get("source", "bench"))
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
    shape, device, dtype = SHAPES[args.shape], torch.device(args.device), getattr(torch, args.dtype)
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


# -- the session store at a model's shapes, without the model ---------------------------------------
STORE_DTYPE = torch.bfloat16
STORE_INJECTS = 2  # measured injects per LTM size; the cache is filled so that the last one merges
MODEL_ROWS = "model-rows.bin"
OPEN_S_LIMIT, OPEN_RSS_LIMIT = 1.0, 2e9


def store_config(shape: Shape) -> ModelConfig:
    return config_from_hf(shape.mplus)


def model_rows(cfg: ModelConfig, directory: Path, create: bool = False) -> FileArray:
    """The model's initial short-term rows [L * N, d]: zeros in a sparse file in `directory` (made if `create`)."""
    shape = (directory / MODEL_ROWS, cfg.num_layers * cfg.memory_rows, cfg.hidden_size, STORE_DTYPE)
    return zero_rows(*shape) if create else FileArray(*shape)


def stand_in_initial(cfg: ModelConfig, rows: FileArray) -> mp.MemoryState:
    """A model's initial M+ state without the model: short-term rows `rows` [L * N, d] under ids 0..L*N-1,
    the memory tensor on the meta device (the store keeps row ids, never this tensor), ages zero and an
    empty LTM whose keys follow the rows' dtype."""
    L, N, d = cfg.num_layers, cfg.memory_rows, cfg.hidden_size
    bank = EntryBank(RowSpace(d, rows.dtype, [(0, rows)]), cfg.selector_hidden_dim, None)
    layers = [LayerLTM(bank, torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.float64)) for _ in range(L)]
    ltm = LongTermMemory(bank, layers, torch.empty(L, 0, dtype=torch.int64))
    memory = torch.empty(L, N, d, dtype=rows.dtype, device="meta")
    return mp.MemoryState(memory=memory, memory_ages=torch.zeros(L, N, dtype=torch.int64), ltm=ltm)


def write_history(
    writer: st.Writer, cfg: ModelConfig, initial: mp.MemoryState, ltm_rows: int, cached: int
) -> mp.MemoryState:
    """Write into a new session's files what the injects that leave an LTM of `ltm_rows` rows per layer,
    `cached` injects' dropped rows in the cache and a short-term memory of the latest rows would have written,
    with zero rows and keys in sparse files, and commit the state they leave (returned). Injection i wrote
    rows base + i*L*K .. in rows.bin (layer after layer); entry e of the bank holds row base + e."""
    L, N, K, freq = cfg.num_layers, cfg.memory_rows, cfg.num_tokens, cfg.update_ltm_frequency
    ltm_blocks = -(-ltm_rows // K)
    injects = ltm_blocks + cached + N // K
    rows, entries = injects * L * K, (ltm_blocks + cached) * L * K
    session = writer.session
    zero_rows(session.directory / st.ROWS, rows, cfg.hidden_size, STORE_DTYPE)
    e = torch.arange(entries)
    births = (injects - 1 - e // (L * K)) * K + K - 1 - e % K  # ages now (the bank's clock is at 0)
    ids_file, births_file, keys_file = (session.directory / name for name in st.LTM_FILES)
    ids_bytes, births_bytes = st.tensor_bytes(session.base + e), st.tensor_bytes(births)
    st.append_after(ids_file, 0, ids_bytes)
    st.append_after(births_file, 0, births_bytes)
    zero_rows(keys_file, entries, cfg.selector_hidden_dim, STORE_DTYPE)
    records = zero_sums(st.ROWS, rows * cfg.hidden_size * STORE_DTYPE.itemsize)
    records += [(ids_file.name, *block) for block in block_sums(ids_bytes, 0)]
    records += [(births_file.name, *block) for block in block_sums(births_bytes, 0)]
    records += zero_sums(keys_file.name, entries * cfg.selector_hidden_dim * STORE_DTYPE.itemsize)
    sums = st.sum_records(records)
    st.append_after(session.directory / st.SUMS, 0, sums)
    manifest = session.manifest | {"chunks": injects, "rows": session.manifest["rows"] | {"count": rows}}
    manifest |= {"sums": {"records": len(records), "crc": zlib.crc32(sums)}}
    history = st.Session(session.directory, manifest | {"ltm": manifest["ltm"] | {"entries": entries}})
    bank = history.entry_bank(initial, history.row_space(initial))
    rf = 1e6 - (torch.arange(ltm_rows) // (K * freq)).flip(0).double()  # one per merge, never pruned
    layers = [LayerLTM(bank, ids, rf) for ids in block_entries(ltm_rows, 0, L, K)]
    cache = block_entries(cached * K, ltm_blocks * L * K, L, K)  # [L, C]
    state = mp.MemoryState(
        memory=initial.memory,
        injections=injects,
        tokens_injected=injects * K,
        memory_ages=(N - 1 - torch.arange(N)).expand(L, N).clone(),  # [L, N] oldest first
        ltm=LongTermMemory(bank, layers, cache, update_step=cached * K),
        memory_ids=history.base + block_entries(N, entries, L, K),  # [L, N] the latest N // K injects' rows
        next_row_id=history.base + rows,
    )
    writer.session = history  # the files hold the history's rows and entries: commit writes the index and manifest
    writer.commit(state)
    return state


def zero_sums(name: str, nbytes: int) -> list[tuple[str, int, int]]:
    """sums.bin records of a file `name` that holds `nbytes` zeros (every full block has the same crc32)."""
    full, tail = zlib.crc32(bytes(SUM_BLOCK_BYTES)), zlib.crc32(bytes(nbytes % SUM_BLOCK_BYTES))
    ends = range(SUM_BLOCK_BYTES, nbytes + 1, SUM_BLOCK_BYTES)
    return [(name, end, full) for end in ends] + ([(name, nbytes, tail)] if nbytes % SUM_BLOCK_BYTES else [])


@dataclass
class NewRows:
    """What Writer.stage reads of an InjectResult."""

    row_ids: torch.Tensor  # [L, K]
    delta: torch.Tensor  # [L, K, d]


def stand_in_inject(state: mp.MemoryState, cfg: ModelConfig) -> NewRows:
    """What MPlus.update_memory does to a state's row ids, ages and LTM for one injection of K tokens, without
    the model: the new rows are zeros and the dropped rows' keys too."""
    L, N, K, ltm = cfg.num_layers, cfg.memory_rows, cfg.num_tokens, state.ltm
    row_ids = state.new_row_ids(K)  # [L, K]
    perms = draw_permutations(state.generator, L if cfg.drop_memory_per_layer else 1, N)
    dropped_ids = drop_and_append(state.memory_ids[..., None], row_ids[..., None], perms)[..., 0]  # [L, K]
    new_ages = torch.arange(K - 1, -1, -1).expand(L, K)
    dropped_ages = drop_and_append(state.memory_ages[..., None], new_ages[..., None], perms)[..., 0]
    ltm.age(K)
    ltm.cache_dropped(dropped_ids, torch.zeros(L, K, ltm.bank.key_width, dtype=ltm.bank.keys_dtype), dropped_ages)
    ltm.update_step += K
    if ltm.update_step >= cfg.update_ltm_frequency * K:
        ltm.merge(cfg.initial_rf_when_moving_stm_to_ltm, cfg.decay_frequency, min_survivors=cfg.ltm_rows_retrieved)
    state.injections, state.tokens_injected = state.injections + 1, state.tokens_injected + K
    return NewRows(row_ids, torch.zeros(1, 1, cfg.hidden_size, dtype=STORE_DTYPE).expand(L, K, -1))


def store_commits(root: Path, name: str, cfg: ModelConfig, initial: mp.MemoryState, ltm_rows: int) -> list[int]:
    """Bytes written by each of STORE_INJECTS commits into session `name`, whose history holds an LTM of
    `ltm_rows` rows per layer (see write_history) and a cache that the last of them merges."""
    ref = {"id": "stand-in", "fingerprint": cfg.fingerprint(), "kind": cfg.kind}
    session = st.Session.create(root, name, initial, ref, 0, STORE_DTYPE)
    written = []
    with session.writer() as writer:
        state = write_history(writer, cfg, initial, ltm_rows, cfg.update_ltm_frequency - STORE_INJECTS)
        for _ in range(STORE_INJECTS):
            writer.stage(stand_in_inject(state, cfg))
            before = file_table(session.directory)
            writer.commit(state, [{"source": "bench", "sha256": "", "tokens": cfg.num_tokens, "chunks": 1}])
            written.append(bytes_written(before, file_table(session.directory)))
    return written


def session_ltm(session: st.Session, initial: mp.MemoryState) -> LongTermMemory:
    """The session's long-term memory as Session.load_state builds it, without reading the short-term rows."""
    index = session.index()
    bank = session.entry_bank(initial, session.row_space(initial))
    return LongTermMemory.from_layout(bank, index, session.manifest["state"]["ltm"])


def open_child(args: argparse.Namespace) -> dict[str, float]:
    """One fresh process of `store_figures`: Session.open + its LTM, then (--stm) the whole load_state."""
    cfg = store_config(SHAPES[args.shape])
    initial = stand_in_initial(cfg, model_rows(cfg, Path(args.root)))
    measured = {"rss_start": peak_rss()}
    start = time.perf_counter()
    session = st.Session.open(Path(args.root), args.session)
    session_ltm(session, initial)
    measured |= {"open_s": time.perf_counter() - start, "rss_open": peak_rss()}
    if args.stm:
        start = time.perf_counter()
        session.load_state(initial)
        measured |= {"load_s": time.perf_counter() - start, "rss_load": peak_rss()}
    return measured


def store_figures(
    shape: Shape,
    ltm_rows: tuple[int, ...],
    repeats: int = 3,
    threads: int | None = None,
    log: Log = lambda message: None,
) -> list[Figure]:
    """At the M+ shapes of `shape`, without weights: bytes written per inject into a session holding an LTM of
    each size in `ltm_rows`, and the open time and RSS of fresh processes (median of `repeats`) at the
    smallest and the largest."""
    cfg, sizes = store_config(shape), sorted(ltm_rows)
    L, N, K, d = cfg.num_layers, cfg.memory_rows, cfg.num_tokens, cfg.hidden_size
    label = "mplus-8b" if shape.name == "8b" else f"{shape.name} M+"
    env, figures, opened = child_env(threads), [], {}
    with tempfile.TemporaryDirectory(prefix="mplus-store-") as tmp:
        initial = stand_in_initial(cfg, model_rows(cfg, Path(tmp), create=True))
        for n in sizes:
            log(f"store: {label}, an LTM of {n:,} rows/layer")
            name = f"ltm-{n}"
            written = store_commits(Path(tmp), name, cfg, initial, n)
            once = 2 * L * K * d * STORE_DTYPE.itemsize  # K new and K dropped rows per layer, one copy each
            detail = (
                f"one commit: {K} new rows/layer and {K} dropped rows/layer into the LTM cache (a merge every "
                f"{cfg.update_ltm_frequency} injects; the last of the {len(written)} measured merges) vs one "
                f"{st.dtype_name(STORE_DTYPE)} copy of the new rows and of the rows moved to the LTM"
            )
            name_n = f"{label} store: bytes written per inject (LTM {n:,} rows/layer)"
            figures.append(Figure(name_n, "B", statistics.mean(written), once, "growth", 1.2, detail))
            if n in (sizes[0], sizes[-1]):
                args = child_of_this_module("open", "--shape", shape.name, "--root", tmp, "--session", name)
                runs = [json.loads(run_child(args, env).check("open").stdout) for _ in range(repeats)]
                if n == sizes[-1]:
                    runs.append(json.loads(run_child([*args, "--stm"], env).check("open --stm").stdout))
                opened[n] = runs
            st.remove_session(Path(tmp), name)

    def median(n: int, key: str) -> float:
        return statistics.median(run[key] for run in opened[n][:repeats])

    large, small = sizes[-1], sizes[0]
    stm = opened[large][-1]
    where = f"LTM {large:,} vs {small:,} rows/layer"
    stm_bytes = L * N * d * STORE_DTYPE.itemsize
    open_detail = (
        f"Session.open + the state's LTM (index, entry bank, layout: what load_state does) without reading the "
        f"{N:,} x {L} short-term rows; with them (load_state, {show(stm_bytes, 'B')} read from the sparse file "
        f"for the first time): {stm['load_s']:.2f} s, peak RSS {show(stm['rss_load'], 'B')}; median of {repeats} "
        f"fresh processes; the LTM's rows: {show(large * L * d * STORE_DTYPE.itemsize, 'B')} (sparse)"
    )
    rss_detail = f"peak RSS (VmHWM) of the process after the open above (before it: {show(stm['rss_start'], 'B')})"
    return figures + [
        Figure(
            f"{label} store: open ({where}, fresh process)",
            "s",
            median(large, "open_s"),
            median(small, "open_s"),
            "limit",
            OPEN_S_LIMIT,
            open_detail,
        ),
        Figure(
            f"{label} store: RSS after open ({where})",
            "B",
            median(large, "rss_open"),
            median(small, "rss_open"),
            "limit",
            OPEN_RSS_LIMIT,
            rss_detail,
        ),
    ]


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
