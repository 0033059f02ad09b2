"""The session store at a model's shapes, without the model: stand-in histories of LTMs of 10k .. 150k
rows per layer, what an inject writes on top, what a fresh process pays to open them."""

from __future__ import annotations

import argparse
import json
import statistics
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

from .children import child_env, child_of_this_module, peak_rss, run_child
from .figures import Figure, show
from .random_models import block_entries, zero_rows
from .speed import SHAPES, Shape
from .speed_store import bytes_written, file_table

Log = Callable[[str], None]

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
