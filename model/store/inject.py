"""Texts into a session: chunk by chunk, a commit after each, with the log lines that let a later call skip
what is injected, finish a partial injection, and explain each source. `mplus inject` is this, plus printing."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.memoryllm import MemoryLLM
from ..memory.state import MemoryState
from ..text.sources import Source, source_chunks
from .errors import SessionMismatch
from .format import now
from .session import Session, Writer

log = logging.getLogger(__name__)  # notes: a source skipped, a partial injection resumed or left


@dataclass
class InjectRun:
    """What an inject call has done: its counts, its log lines, its timings, the source it is in."""

    root: Path
    session: str
    tokens: int = 0
    chunks: int = 0
    first_commit: int | None = None  # the session's commit when this call took the writer lock
    current: Source | None = None
    logged: list[dict] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    load_s: float = 0.0  # loading the model and the session's memory
    inject_s: float = 0.0  # injecting and committing
    first_commit_s: float | None = None  # from the start to the first committed chunk

    def timing(self) -> dict[str, float | None]:
        """Seconds and injected tokens per second."""
        rate = self.tokens / self.inject_s if self.inject_s > 0 else 0.0
        return {
            "load_s": round(self.load_s, 4),
            "first_commit_s": None if self.first_commit_s is None else round(self.first_commit_s, 4),
            "inject_s": round(self.inject_s, 4),
            "total_s": round(time.perf_counter() - self.started, 4),
            "tokens_per_s": round(rate, 2),
        }


def resume_plan(
    session: Session, sources: list[Source], resume: bool, chunk_tokens: int, note: Callable[[str], None] = log.info
) -> list[int]:
    """Chunks to skip per source. With `resume`: a source the log records as injected is skipped whole, the
    source of the session's partial injection continues after its committed chunks. Without it, a source
    that is the session's partial injection is refused (it would be injected twice)."""
    partial = session.partial
    if not resume:
        if partial and any(s.sha256 == partial["sha256"] for s in sources):
            raise SessionMismatch(
                f"session {session.name!r} holds a partial injection of {partial['source']} "
                f"({partial['chunks_done']} of {partial['chunks_total']} chunks committed): add --resume to continue it"
            )
        return [0] * len(sources)
    injected = {entry["sha256"] for entry in session.log() if not entry.get("partial")}
    skips = []
    for source in sources:
        if source.sha256 in injected:
            note(f"mplus: {source.name}: already injected into session {session.name!r}, skipped")
            skips.append(source.chunks)
        elif partial and partial["sha256"] == source.sha256:
            if partial["chunk_tokens"] != chunk_tokens:
                raise SessionMismatch(
                    f"the partial injection of {source.name} was cut into chunks of {partial['chunk_tokens']} "
                    f"tokens: add --chunk-tokens {partial['chunk_tokens']} to resume it"
                )
            note(f"mplus: {source.name}: resuming after chunk {partial['chunks_done']} of {partial['chunks_total']}")
            skips.append(partial["chunks_done"])
        else:
            skips.append(0)
    return skips


def inject_sources(
    writer: Writer,
    lm: MemoryLLM,
    sources: list[Source],
    skips: list[int],
    chunk_tokens: int,
    run: InjectRun,
    on_chunk: Callable[[Source], None] = lambda source: None,
    note: Callable[[str], None] = log.info,
) -> MemoryState:
    """Inject every chunk not skipped, committing after each: a crash or Ctrl-C loses at most one chunk.
    `on_chunk(source)` after each commit; the state injected into is returned."""
    loading = time.perf_counter()
    state = writer.load_state(lm.initial_state, lm.device)
    begun = time.perf_counter()
    run.load_s += begun - loading
    run.first_commit, abandoned = writer.session.manifest["commit"], writer.session.partial
    for source, skip in zip(sources, skips, strict=True):
        if skip == source.chunks:
            continue
        run.current = source
        for i, chunk in enumerate(source_chunks(source, lm.tokenizer, chunk_tokens)):
            if i < skip:
                continue
            writer.inject(lm, state, torch.tensor(chunk, dtype=torch.long))
            log, done = [], i + 1
            if abandoned and abandoned["sha256"] != source.sha256:  # another source stopped part-way before
                log.append(abandoned_entry(abandoned))
                note(f"mplus: note: the partial injection of {abandoned['source']} stays partial (see the log)")
            abandoned = None
            partial = partial_entry(source, chunk_tokens, done, sum(source.chunk_sizes[:done]))
            if done == source.chunks:
                log.append(source_entry(source, chunk_tokens, resumed=skip > 0))
                partial = None
            writer.commit(state, log, partial)
            run.tokens, run.chunks = run.tokens + len(chunk), run.chunks + 1
            run.logged += [entry for entry in log if not entry.get("partial")]
            if run.first_commit_s is None:
                run.first_commit_s = time.perf_counter() - run.started
            on_chunk(source)
    run.inject_s = time.perf_counter() - begun
    return state


# -- the log lines (`mplus ask --explain` reads them back through session_chunks) --------------------------------
def source_entry(source: Source, chunk_tokens: int, resumed: bool) -> dict:
    """The log line of a source injected whole."""
    entry = {"source": source.name, "sha256": source.sha256, "tokens": source.tokens, "chunks": source.chunks}
    return entry | {"chunk_tokens": chunk_tokens, "at": now()} | ({"resumed": True} if resumed else {})


def partial_entry(source: Source, chunk_tokens: int, done: int, tokens_done: int) -> dict:
    """The manifest's record of a source injected part-way."""
    return {
        "source": source.name,
        "sha256": source.sha256,
        "chunk_tokens": chunk_tokens,
        "chunks_done": done,
        "chunks_total": source.chunks,
        "tokens_done": tokens_done,
        "tokens_total": source.tokens,
        "at": now(),
    }


def abandoned_entry(partial: dict) -> dict:
    """The log line of a partial injection that another source follows."""
    return {
        "source": partial["source"],
        "sha256": partial["sha256"],
        "tokens": partial["tokens_done"],
        "chunks": partial["chunks_done"],
        "chunks_total": partial["chunks_total"],
        "chunk_tokens": partial["chunk_tokens"],
        "partial": True,
        "at": partial["at"],
    }


@dataclass(frozen=True)
class Chunk:
    """Injection i of a session: chunk `index` (0-based) of `source`."""

    source: str
    sha256: str
    index: int
    chunks: int
    chunk_tokens: int


def session_chunks(session: Session, injections: int) -> dict[int, Chunk]:
    """{injection number: Chunk} of a session whose state counts `injections`: its log's sources in order,
    then a partial one, took the last injections one chunk each."""
    partial = [session.partial | {"chunks": session.partial["chunks_done"]}] if session.partial else []
    entries = [*session.log(), *partial]
    first = injections - sum(entry["chunks"] for entry in entries) + 1
    found, number = {}, first
    for entry in entries:
        total = entry.get("chunks_total", entry["chunks"])
        for index in range(entry["chunks"]):
            found[number] = Chunk(entry["source"], entry["sha256"], index, total, entry.get("chunk_tokens", 512))
            number += 1
    return found
