"""The session store at a model's shapes, without weights: histories of LTMs of 10k .. 150k rows per layer
made by the real M+ update of zero rows, what an inject writes on top, what a fresh process pays to open them."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

import model as mp
from model import store as st
from model.core.config import ModelConfig, config_from_hf
from model.core.memoryllm import InjectResult
from model.memory.ltm import EntryBank, LayerLTM, LongTermMemory
from model.memory.rows import FileArray, RowSpace
from model.policies.authors import Selectors, authors_policies

from .children import child_env, child_of_this_module, peak_rss, run_child
from .figures import Figure, show
from .random_models import zero_rows
from .speed import SHAPES, Shape
from .speed_store import bytes_written, file_table

Log = Callable[[str], None]

# -- the session store at a model's shapes, without the model ---------------------------------------
STORE_DTYPE = torch.bfloat16
STORE_INJECTS = 2  # measured injects per LTM size; the cache is filled so that the last one merges
MODEL_ROWS = "model-rows.bin"
OPEN_S_LIMIT, OPEN_RSS_LIMIT = 1.0, 2e9
HISTORY_COMMIT_BYTES = 64 << 20  # a history commits once its staged rows reach this size


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


class ZeroKeys(Selectors):
    """The authors' retrieval with every row's key zero: what the store keeps of a key is its bytes."""

    def row_keys(self, model: mp.MPlus, layer: int, rows: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*rows.shape[:-1], model.cfg.selector_hidden_dim, dtype=STORE_DTYPE)


def stand_in_model(cfg: ModelConfig) -> mp.MPlus:
    """The M+ model of `cfg` without weights (on the meta device), whose real update grows an LTM to any size:
    keys of zeros (ZeroKeys) and no decay, so that no row is ever pruned."""
    with torch.device("meta"):
        return mp.MPlus(replace(cfg, decay_frequency=0.0), **authors_policies(cfg) | {"retrieval": ZeroKeys()})


def grow_history(writer: st.Writer, model: mp.MPlus, state: mp.MemoryState, ltm_rows: int, cached: int) -> None:
    """Inject rows of zeros into `state` by the model's update, staging and committing them through `writer`
    (zeros are holes in the session's files), until its LTM holds `ltm_rows` rows per layer or more (a merge
    moves update_ltm_frequency x K) and `cached` injects' dropped rows wait in its cache."""
    K, staged, delta = model.cfg.num_tokens, 0, zero_delta(model.cfg)
    every = max(1, HISTORY_COMMIT_BYTES // delta.nbytes)

    def grown() -> bool:
        return min(state.ltm.sizes()) >= ltm_rows and state.ltm.update_step >= cached * K

    while not grown():
        writer.stage(inject_zeros(model, state, delta))
        staged += 1
        if staged == every or grown():
            writer.commit(state, [{"source": "history", "sha256": "", "tokens": staged * K, "chunks": staged}])
            staged = 0


def zero_delta(cfg: ModelConfig) -> torch.Tensor:
    """The rows of one injection [L, K, d], zeros."""
    return torch.zeros(cfg.num_layers, cfg.num_tokens, cfg.hidden_size, dtype=STORE_DTYPE)


def inject_zeros(model: mp.MPlus, state: mp.MemoryState, delta: torch.Tensor) -> InjectResult:
    """One injection of the rows `delta` [L, K, d] by the model's own update and bookkeeping."""
    result = model.update_memory(state, delta)
    model.count_injection(state, result, delta.shape[1])
    return result


def history_session(root: Path, name: str, model: mp.MPlus, initial: mp.MemoryState) -> st.Session:
    """A new session `name` for a history of the stand-in model, bf16 rows."""
    ref = {"id": "stand-in", "fingerprint": model.cfg.fingerprint(), "kind": model.cfg.kind}
    return st.Session.create(root, name, initial, ref, 0, STORE_DTYPE)


def store_commits(writer: st.Writer, model: mp.MPlus, state: mp.MemoryState, ltm_rows: int) -> list[int]:
    """Bytes written by each of STORE_INJECTS commits once the history holds an LTM of `ltm_rows` rows per
    layer or more (see grow_history) and a cache that the last of them merges."""
    cfg, written = model.cfg, []
    grow_history(writer, model, state, ltm_rows, cfg.update_ltm_frequency - STORE_INJECTS)
    for _ in range(STORE_INJECTS):
        writer.stage(inject_zeros(model, state, zero_delta(cfg)))
        before = file_table(writer.session.directory)
        writer.commit(state, [{"source": "bench", "sha256": "", "tokens": cfg.num_tokens, "chunks": 1}])
        written.append(bytes_written(before, file_table(writer.session.directory)))
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
    env, figures, opened, held = child_env(threads), [], {}, {}
    model = stand_in_model(cfg)
    with tempfile.TemporaryDirectory(prefix="mplus-store-") as tmp:
        initial = stand_in_initial(cfg, model_rows(cfg, Path(tmp), create=True))
        state, name = initial.clone(), "history"
        with history_session(Path(tmp), name, model, initial).writer() as writer:
            for n in sizes:  # one history, grown through the sizes
                log(f"store: {label}, an LTM of {n:,} rows/layer or more")
                written = store_commits(writer, model, state, n)
                held[n] = min(state.ltm.sizes())
                once = 2 * L * K * d * STORE_DTYPE.itemsize  # K new and K dropped rows per layer, one copy each
                detail = (
                    f"one commit: {K} new rows/layer and {K} dropped rows/layer into the LTM cache (a merge every "
                    f"{cfg.update_ltm_frequency} injects: the last of the {len(written)} measured) vs one "
                    f"{st.dtype_name(STORE_DTYPE)} copy of the new rows and of the rows moved to the LTM"
                )
                name_n = f"{label} store: bytes written per inject (LTM {held[n]:,} rows/layer)"
                figures.append(Figure(name_n, "B", statistics.mean(written), once, "growth", 1.2, detail))
                if n in (sizes[0], sizes[-1]):
                    args = child_of_this_module("open", "--shape", shape.name, "--root", tmp, "--session", name)
                    runs = [json.loads(run_child(args, env).check("open").stdout) for _ in range(repeats)]
                    if n == sizes[-1]:
                        runs.append(json.loads(run_child([*args, "--stm"], env).check("open --stm").stdout))
                    opened[n] = runs

    def median(n: int, key: str) -> float:
        return statistics.median(run[key] for run in opened[n][:repeats])

    large, small = sizes[-1], sizes[0]
    stm = opened[large][-1]
    where = f"LTM {held[large]:,} vs {held[small]:,} rows/layer"
    stm_bytes = L * N * d * STORE_DTYPE.itemsize
    open_detail = (
        f"Session.open + the state's LTM (index, entry bank, layout: what load_state does) without reading the "
        f"{N:,} x {L} short-term rows; with them (load_state, {show(stm_bytes, 'B')} read from the sparse file "
        f"for the first time): {stm['load_s']:.2f} s, peak RSS {show(stm['rss_load'], 'B')}; median of {repeats} "
        f"fresh processes; the LTM's rows: {show(held[large] * L * d * STORE_DTYPE.itemsize, 'B')} (sparse)"
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
