"""The session store's figures: bytes written and wall time per inject into a session as it grows, and the time
to open and load it, vs whole-state snapshots (MemoryState.save / load); M+ sessions with a large vs a small LTM."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

import model as mp
from model import store as st
from model.memory.ltm import LongTermMemory

from .baselines import load_snapshot, save_snapshot
from .figures import Figure
from .random_models import first_rows, initial_with_ltm, random_ids
from .timing import clock, paired


@dataclass
class Commit:
    """One inject committed to a session."""

    inject_s: float  # Writer.inject (the model's injection plus staging)
    commit_s: float  # Writer.commit
    bytes: int  # bytes the commit wrote
    snapshot_s: float | None = None  # baseline: saving the whole state (save_snapshot) instead of the commit
    snapshot_bytes: int | None = None


def file_table(directory: Path) -> dict[str, tuple[int, int]]:
    """{name: (inode, size)} of the regular files in `directory`."""
    return {p.name: (p.stat().st_ino, p.stat().st_size) for p in directory.iterdir() if p.is_file()}


def bytes_written(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> int:
    """Bytes written between two file tables: new or replaced files whole, appended files' growth."""
    total = 0
    for name, (inode, size) in after.items():
        old = before.get(name)
        total += size - old[1] if old is not None and old[0] == inode and size >= old[1] else size
    return total


def session_commits(
    model: mp.MemoryLLM, root: Path, name: str, ids: torch.Tensor, count: int, snapshot_at: set[int] = frozenset()
) -> list[Commit]:
    """Create session `name` and commit `count` injects of `ids` one by one; after the i-th (1-based) for i
    in `snapshot_at`, also time saving the whole state instead (to `root/name.snapshot`)."""
    ref = st.binding(model, model.info.source or "bench")
    session = st.Session.create(root, name, model.initial_state, ref, 0, model.dtype)
    snapshot, commits = root / f"{name}.snapshot", []
    with session.writer() as writer:
        state = writer.load_state(model.initial_state, model.device)
        for i in range(1, count + 1):
            inject_s = clock(lambda: writer.inject(model, state, ids), model.device)
            line = {"source": "bench", "sha256": "", "tokens": int(ids.numel()), "chunks": 1, "at": st.now()}
            before = file_table(session.directory)
            commit_s = clock(lambda line=line: writer.commit(state, [line]), model.device)
            commit = Commit(inject_s, commit_s, bytes_written(before, file_table(session.directory)))
            if i in snapshot_at:
                commit.snapshot_s = clock(lambda: save_snapshot(state, snapshot), model.device)
                commit.snapshot_bytes = sum(size for _, size in file_table(snapshot).values())
            commits.append(commit)
    return commits


def measure_store(
    model: mp.MemoryLLM, root: Path, tokens: int, checkpoints: tuple[int, ...], repeats: int
) -> list[Figure]:
    """Bytes written and wall time per inject into a session after 1, 10, 50.. injects (medians over that
    inject and the next repeats-1), and the time to open and load it; the baselines save / load the whole
    state (MemoryState.save + fsync / load)."""
    kind, name = model.cfg.kind, f"store-{model.cfg.kind}"
    windows = {i: range(i, i + repeats) for i in checkpoints}
    snapshot_at = {j for window in windows.values() for j in window}
    commits = session_commits(
        model, root, name, random_ids(tokens, model.cfg.vocab_size), max(snapshot_at), snapshot_at
    )
    figures = []
    for i, window in windows.items():
        c = [commits[j - 1] for j in window]
        store_b, snapshot_b = statistics.median(x.bytes for x in c), statistics.median(x.snapshot_bytes for x in c)
        store_s = statistics.median(x.inject_s + x.commit_s for x in c)
        snapshot_s = statistics.median(x.inject_s + x.snapshot_s for x in c)
        at = f"inject #{i}, {tokens} tokens"
        figures += [
            Figure(
                f"{kind} session bytes written per inject ({at})",
                "B",
                store_b,
                snapshot_b,
                detail="commit vs MemoryState.save + fsync",
            ),
            Figure(
                f"{kind} session time per inject ({at})",
                "s",
                store_s,
                snapshot_s,
                detail="Writer.inject + commit vs inject + MemoryState.save + fsync",
            ),
        ]
    fast, slow = paired(
        lambda: st.Session.open(root, name).load_state(model.initial_state, model.device),
        lambda: load_snapshot(root / f"{name}.snapshot", model.device),
        model.device,
        repeats,
    )
    detail = "Session.open + load_state vs MemoryState.load + reading every tensor (clone)"
    figures.append(Figure(f"{kind} session open + load ({max(snapshot_at)} injects)", "s", fast, slow, detail=detail))
    return figures


def measure_ltm_session(
    model: mp.MPlus, ltm: LongTermMemory, sizes: tuple[int, int], root: Path, tokens: int, repeats: int
) -> list[Figure]:
    """Wall time and bytes per inject into a session that holds a large vs a small LTM (medians of `repeats`
    single-inject commits after a first one)."""
    ids, initial, medians = random_ids(tokens, model.cfg.vocab_size), model.initial_state, []
    try:
        for n in sizes:
            model.initial_state = initial_with_ltm(model, first_rows(ltm, n))
            commits = session_commits(model, root, f"ltm-{n}", ids, repeats + 1)[1:]
            medians.append(
                (
                    statistics.median(c.inject_s + c.commit_s for c in commits),
                    statistics.median(c.bytes for c in commits),
                )
            )
            st.remove_session(root, f"ltm-{n}")
    finally:
        model.initial_state = initial
    (small_s, small_b), (large_s, large_b) = medians
    what = f"LTM {sizes[1]} vs {sizes[0]} rows/layer, {tokens} tokens"
    return [
        Figure(f"M+ session time per inject ({what})", "s", large_s, small_s, "growth", 1.2, "Writer.inject + commit"),
        Figure(f"M+ session bytes written per inject ({what})", "B", large_b, small_b, "growth", 1.2, "one commit"),
    ]
