"""What the speed benches measure on: random models (`model.zoo.presets.random_model` plus a random initial memory),
token ids, and long-term memories laid out as injections leave them, their rows in sparse files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import model as mp
from model import store as st
from model.core.config import ModelInfo
from model.memory.ltm import EntryBank, LayerLTM, LongTermMemory
from model.memory.rows import FileArray
from model.memory.state import new_generator
from model.zoo.presets import UNTRAINED_LABEL, random_model


def random_ids(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """n seeded random token ids [n] below `vocab`."""
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def random_model_with_memory(
    config: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int = 0
) -> mp.MemoryLLM:
    """A random model of `config` with random initial memory on `device` (M+: ages zero, no LTM yet)."""
    model = random_model(config, seed, device, dtype)
    cfg = model.cfg
    generator = torch.Generator(device).manual_seed(seed + 1)
    memory = torch.empty(cfg.num_layers, cfg.memory_rows, cfg.hidden_size, device=device, dtype=dtype)
    model.initial_state = mp.MemoryState(memory=memory.normal_(generator=generator))  # [L, N, d]
    if isinstance(model, mp.MPlus):
        model.initial_state.memory_ages = torch.zeros(cfg.num_layers, cfg.memory_rows, dtype=torch.int64)
    model.info = ModelInfo(f"random {cfg.kind}", UNTRAINED_LABEL)
    return model


def zero_rows(path: Path, count: int, width: int, dtype: torch.dtype) -> FileArray:
    """[count, width] zeros in a sparse file at `path`: no disk is used until something is written."""
    with open(path, "wb") as f:
        f.truncate(count * width * dtype.itemsize)
    return FileArray(path, count, width, dtype)


def block_entries(n: int, first: int, layers: int, block: int) -> torch.Tensor:
    """Entry ids [L, n] of n rows per layer as injections add them from entry `first` on: each injection
    adds a block of K entries per layer, layer after layer (bank order: injection, layer, row)."""
    j = torch.arange(n)
    return first + (j // block * layers * block + j % block) + block * torch.arange(layers)[:, None]


def random_ltm(model: mp.MPlus, rows: int, cached: int, directory: Path, seed: int = 0) -> LongTermMemory:
    """An LTM of `rows` rows per layer plus `cached` dropped rows awaiting the next merge, laid out as
    injections leave it: entries in blocks of K per layer and injection (bank order: injection, layer,
    row), one recall frequency per merge of update_ltm_frequency injections, high enough that nothing is
    pruned; ages count down (oldest first). Keys are random; the rows are zeros in a sparse file in
    `directory` (their content does not change timings; as in a session, they are never all in RAM),
    under the row ids that follow the model's initial memory."""
    cfg, g = model.cfg, torch.Generator().manual_seed(seed)
    L, d, s, K, dtype = cfg.num_layers, cfg.hidden_size, cfg.selector_hidden_dim, cfg.num_tokens, model.dtype
    ltm_blocks = -(-rows // K)
    ltm_entries, cache = block_entries(rows, 0, L, K), block_entries(cached, L * K * ltm_blocks, L, K)  # [L, n], [L, C]
    count = L * K * (ltm_blocks + -(-cached // K))
    births = torch.zeros(count, dtype=torch.int64)
    births[ltm_entries] = torch.arange(rows, 0, -1) * K + cached  # oldest first, older than the cache
    births[cache] = torch.arange(cached, 0, -1)
    keys = torch.randn(count, s, generator=g).to(dtype)  # [E, s]
    space = st.initial_rows(model.initial_state).clone()
    base = space.end
    space.attach(base, zero_rows(directory / f"ltm-{rows}-{cached}.bin", count, d, dtype))
    bank = EntryBank(space, s, None, [(base + torch.arange(count), births, keys)])
    rf = 1e6 - (torch.arange(rows) // (K * cfg.update_ltm_frequency)).flip(0).double()  # one per merge
    layers = [LayerLTM(bank, entries, rf) for entries in ltm_entries]
    return LongTermMemory(bank, layers, cache, update_step=cached)


def first_rows(ltm: LongTermMemory, n: int, cache: bool = False) -> LongTermMemory:
    """The LTM cut to its first n rows per layer (same bank), with its cache (shared) or an empty one:
    entries are views (no copy), recall frequencies copies (merges decay them)."""
    layers = [LayerLTM(ltm.bank, x.entries[:n], x.recall_frequencies[:n]) for x in ltm.layers]
    cached = ltm.cached_entries if cache else torch.empty(len(layers), 0, dtype=torch.int64)
    return LongTermMemory(ltm.bank, layers, cached, ltm.update_step if cache else 0)


def with_ltm(model: mp.MPlus, ltm: LongTermMemory, seed: int = 0) -> mp.MemoryState:
    """A working state: a copy of the model's initial short-term memory and ages, with a copy of `ltm`
    (sharing its read-only parts)."""
    initial, ltm = model.initial_state, ltm.clone()
    return mp.MemoryState(
        memory=initial.memory.clone(),
        generator=new_generator(seed),
        memory_ages=initial.memory_ages.clone(),
        ltm=ltm,
        memory_ids=initial.memory_ids.clone(),
        next_row_id=ltm.rows.end,
    )


def initial_with_ltm(model: mp.MPlus, ltm: LongTermMemory) -> mp.MemoryState:
    """The model's initial state with `ltm` as its initial long-term memory (its row ids follow ltm's)."""
    initial = model.initial_state
    return mp.MemoryState(
        memory=initial.memory,
        memory_ages=initial.memory_ages,
        ltm=ltm,
        memory_ids=initial.memory_ids,
        next_row_id=ltm.rows.end,
    )
