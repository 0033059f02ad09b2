"""Integrity (MemoryLLM Fig. 6): does the model still answer about what it was just told after many updates?

A stream of samples is injected, one sample's evidence per update (cut into chunks when longer than one);
after every `every` updates the question of the most recent sample is asked, and the question of the sample
injected `ago` updates before. The samples are taken in order and again from the first when the stream is
longer than the dataset (so past the dataset's size a fact may also have been told one cycle before).
Beside each answer: the memory's mean row norm and (M+) its long-term rows per layer, so drift is visible.
The memory is a store session: its rows live in its files (a million updates do not fit in RAM), and its
commits are what a resumed run continues from.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from model import store as st
from model.core.generate import DecodeSettings, generate
from model.core.memoryllm import MemoryLLM
from model.memory.state import MemoryState
from model.text.tokenizer import decode, encode

from .metrics import score
from .plan import Protocol
from .results import METRICS, ResultsLog
from .samples import Sample

if TYPE_CHECKING:
    import pandas as pd

COLUMNS = (
    "update",
    "asked",
    "sample_id",
    "question",
    "gold",
    "prediction",
    *METRICS,
    "row_norm",
    "ltm_rows",
    "seconds",
)
RECENT, AGO = "recent", "ago"
SESSION = "memory"  # the stream's memory: a store session in the output directory (rows on disk, not in RAM)


@dataclass(frozen=True)
class Stream:
    samples: list[Sample]
    every: int  # ask after every `every` updates
    ago: int  # and about the sample `ago` updates back

    def sample_at(self, update: int) -> Sample:
        """The sample injected at update `update` (1-based)."""
        return self.samples[(update - 1) % len(self.samples)]


def memory_stats(state: MemoryState) -> dict[str, float | str]:
    """The mean L2 norm of the short-term rows, and the long-term rows per layer (M+; "" otherwise)."""
    norm = float(state.memory.float().norm(dim=-1).mean()) if state.memory.numel() else 0.0
    ltm = "" if state.ltm is None else sum(len(layer.row_ids) for layer in state.ltm.layers) / len(state.ltm.layers)
    return {"row_norm": round(norm, 4), "ltm_rows": ltm}


def inject_update(writer: st.Writer, model: MemoryLLM, state: MemoryState, ids: list[int], chunk_tokens: int) -> None:
    """One update: a sample's evidence ids, in chunks of at most `chunk_tokens`, staged in the session."""
    for start in range(0, len(ids), chunk_tokens):
        writer.inject(model, state, torch.as_tensor(ids[start : start + chunk_tokens], dtype=torch.long))


def checkpoint_rows(
    model: MemoryLLM,
    state: MemoryState,
    stream: Stream,
    update: int,
    protocol: Protocol,
    settings: DecodeSettings,
) -> list[dict[str, Any]]:
    """The answers after update `update`: about its sample, and about the one `ago` updates back (once there
    is one), each asked as `protocol` asks, with the memory's statistics."""
    stats = memory_stats(state)
    asked = [(RECENT, update)] + ([(AGO, update - stream.ago)] if update > stream.ago else [])
    rows = []
    for kind, told in asked:
        sample, start = stream.sample_at(told), time.perf_counter()
        question = protocol.question_ids(model.tokenizer, sample.question)
        prediction = decode(model.tokenizer, generate(model, state, question, settings).token_ids)
        row = {"update": update, "asked": kind, "sample_id": sample.id, "question": sample.question}
        row |= {"gold": sample.answer, "prediction": prediction} | score(prediction, sample.answer) | stats
        rows.append(row | {"seconds": round(time.perf_counter() - start, 3)})
    return rows


def run(
    model: MemoryLLM,
    session: st.Session,
    stream: Stream,
    protocol: Protocol,
    settings: DecodeSettings,
    updates: range,
    save_every: int,
    chunk_tokens: int,
    log: ResultsLog,
) -> None:
    """The `updates` of the stream injected into the session's memory, committed every `save_every` updates
    and after the last; after every `stream.every` updates the questions asked, their rows appended to `log`."""
    with session.writer() as writer:
        state, entries = writer.load_state(model.initial_state, model.device), []
        for update in updates:
            sample = stream.sample_at(update)
            ids = encode(model.tokenizer, sample.context)
            inject_update(writer, model, state, ids, chunk_tokens)
            entries.append(update_entry(update, sample, ids, chunk_tokens))
            if update % save_every == 0 or update == updates[-1]:
                writer.commit(state, entries)
                entries = []
            if update % stream.every == 0:
                log.append(checkpoint_rows(model, state, stream, update, protocol, settings))


def update_entry(update: int, sample: Sample, ids: list[int], chunk_tokens: int) -> dict[str, Any]:
    """The session log's line for one update (what `mplus session show` lists; its count is where a resumed
    run starts)."""
    sha = hashlib.sha256(sample.context.encode()).hexdigest()
    chunks = -(-len(ids) // chunk_tokens)
    return {
        "source": f"update {update}: {sample.id}",
        "sha256": sha,
        "tokens": len(ids),
        "chunks": chunks,
        "chunk_tokens": chunk_tokens,
        "at": st.now(),
    }


def ema(values: Sequence[float], alpha: float = 0.1) -> list[float]:
    """The exponential moving average of `values` (the first value starts it)."""
    out: list[float] = []
    for value in values:
        out.append(value if not out else alpha * value + (1 - alpha) * out[-1])
    return out


def plot(results: pd.DataFrame, path: Path, title: str, metric: str = "exact_hit") -> None:
    """`metric` of the recent and the earlier sample against the updates: the answers as dots, an EMA line
    through them; under it the memory's mean row norm."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8.0, 5.0), layout="constrained")
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    for kind, color in ((RECENT, "tab:blue"), (AGO, "tab:orange")):
        rows = results[results.asked == kind].sort_values("update")
        if len(rows):
            top.scatter(rows["update"], rows[metric], s=6, alpha=0.3, color=color)
            top.plot(rows["update"], ema(rows[metric].astype(float).tolist()), color=color, label=f"{kind} (EMA)")
    top.set_ylabel(metric)
    top.set_ylim(-0.05, 1.05)
    top.set_title(title)
    top.legend(fontsize="small")
    norms = results[results.asked == RECENT].sort_values("update")
    bottom.plot(norms["update"], norms.row_norm, color="tab:gray")
    bottom.set_ylabel("row norm")
    bottom.set_xlabel("updates")
    figure.savefig(path, dpi=120)
