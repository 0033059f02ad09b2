"""The memory state: an explicit, serializable object that every injection updates (docs/algorithm.md §5.5)."""

from __future__ import annotations

import ctypes
import json
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .dtypes import dtype_name
from .ltm import LongTermMemory
from .provenance import Origins
from .rows import RowSpace, Source

STATE_FORMAT = 1


def new_generator(seed: int) -> torch.Generator:
    """The CPU generator that decides which rows are dropped (CPU keeps the authors' draws)."""
    return torch.Generator(device="cpu").manual_seed(seed)


@dataclass
class MemoryKV:
    """Keys (after RoPE) and values of bos and the memory rows at their question-prefix positions, per
    layer, computed by `model` for the memory's `version`: {layer: (k, v)}, each [1, H_kv, room, D] with
    room past the prefix for a question (see MemoryLLM.memory_kv). The prefix positions are fixed, so a
    question reuses the rotated keys as they are. An M+ question writes its retrieved rows into the
    buffers' slot between bos and the memory, so one state serves one question at a time. Never serialized."""

    model: weakref.ref
    version: int
    layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def valid_for(self, model: torch.nn.Module, version: int) -> bool:
        return self.model() is model and self.version == version


@dataclass
class MemoryState:
    """Everything that changes when text is injected.

    memory: [L, N, d] short-term rows per layer, oldest surviving rows first, newest block last.
    initialized: False only for a model whose memory was never written (first injection tiles).
    generator: CPU generator for the random drops; its state is part of the saved state.
    memory_ages, ltm: M+ only (None for MemoryLLM): the short-term rows' ages [L, N] int64 and the
    long-term memory with its dropped-row cache, both on the CPU.
    memory_ids: [L, N] int64 the row id of each short-term row. Every row ever written gets the next id
    (`next_row_id`), layer by layer: an injection's delta [L, k, d] takes k ids per layer. The ids of a
    model's initial memory are 0..L*N-1 (layer by layer). An M+ state's LTM holds its entries' rows by id
    in its row space (`ltm.rows`), which also holds every short-term row (a dropped row stays where it is).
    origins: where each row id came from (injection, layer, position: see model.memory.provenance).
    version: counts the changes of the memory (`memory_changed`); kv_cache: the memory rows' keys/values
    for one version, derived data that every change discards.
    """

    memory: torch.Tensor
    generator: torch.Generator = field(default_factory=lambda: new_generator(0))
    initialized: bool = True
    injections: int = 0
    tokens_injected: int = 0
    memory_ages: torch.Tensor | None = None
    ltm: LongTermMemory | None = None
    memory_ids: torch.Tensor | None = None
    next_row_id: int = 0
    origins: Origins = field(default_factory=Origins.empty, repr=False, compare=False)
    version: int = field(default=0, repr=False, compare=False)
    kv_cache: MemoryKV | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.memory_ids is None:
            self.memory_ids = initial_ids(*self.memory.shape[:2])
        if self.next_row_id == 0:
            self.next_row_id = self.ltm.rows.end if self.ltm is not None else self.memory_ids.numel()

    @property
    def num_layers(self) -> int:
        return self.memory.shape[0]

    @property
    def rows_per_layer(self) -> int:
        return self.memory.shape[1]

    def clone(self) -> MemoryState:
        generator = torch.Generator(device="cpu")
        generator.set_state(self.generator.get_state())
        return MemoryState(
            memory=self.memory.clone(),
            generator=generator,
            initialized=self.initialized,
            injections=self.injections,
            tokens_injected=self.tokens_injected,
            memory_ages=None if self.memory_ages is None else self.memory_ages.clone(),
            ltm=None if self.ltm is None else self.ltm.clone(),
            memory_ids=self.memory_ids.clone(),
            next_row_id=self.next_row_id,
            origins=self.origins.clone(),
        )

    def memory_changed(self) -> None:
        """The one place a change of the memory is announced: derived keys/values are dropped."""
        self.version += 1
        self.kv_cache = None

    def memory_kv(self, model: torch.nn.Module) -> MemoryKV:
        """The cached memory keys/values `model` computes for this version (a new, empty one if stale)."""
        if self.kv_cache is None or not self.kv_cache.valid_for(model, self.version):
            self.kv_cache = MemoryKV(weakref.ref(model), self.version)
        return self.kv_cache

    def new_row_ids(self, k: int) -> torch.Tensor:
        """Ids [L, k] for the next injection's delta rows (layer by layer), taken from the counter."""
        ids = self.next_row_id + torch.arange(self.num_layers * k).view(self.num_layers, k)
        self.next_row_id += self.num_layers * k
        return ids

    def attach_rows(self, source: Source) -> int:
        """Hold the rows of `source` (a RAM tensor [c, d] or a FileArray: rows computed once, e.g. text that
        many states read) under the next c row ids, for `MemoryLLM.inject_rows`; returns the first id. Only an
        M+ state keeps rows (in its LTM's row space); a MemoryLLM state just reserves the ids."""
        first = self.next_row_id
        if self.ltm is not None:
            self.ltm.rows.attach(first, source)
        self.next_row_id += len(source)
        return first

    def to(self, device: torch.device | str, dtype: torch.dtype) -> MemoryState:
        """The same state with the short-term memory on `device` in `dtype`; the LTM is cast but stays on
        the CPU, its rows copied into a new row space (an M+ state's rows get new ids, as from `load`).
        Shares the generator."""
        memory = self.memory.to(device=device, dtype=dtype)
        if self.ltm is None:
            return replace(self, memory=memory, kv_cache=None)
        ltm = self.ltm.to(dtype, stm_rows(memory, copy=True))
        moved = replace(self, memory=memory, kv_cache=None, ltm=ltm, memory_ids=None, next_row_id=0)
        moved.origins = self.renumbered_origins()
        return moved

    def saved_row_ids(self) -> torch.Tensor:
        """[m] the ids of the rows in the order `to_tensors` lays them out (and `from_tensors` numbers them
        0..m-1): the short-term rows layer by layer, then an M+ state's LTM rows layer by layer and its cache."""
        ids = [self.memory_ids.reshape(-1)]
        if self.ltm is not None:
            ids += [layer.row_ids for layer in self.ltm.layers]
            ids.append(self.ltm.bank.row_ids(self.ltm.cached_entries.reshape(-1)))
        return torch.cat(ids)

    def renumbered_origins(self) -> Origins:
        """The origins of the rows once renumbered 0..m-1 in `saved_row_ids` order."""
        ids = self.saved_row_ids()
        return Origins.of_rows(torch.arange(ids.numel()), self.origins.lookup(ids))

    # -- serialization -------------------------------------------------------------------------
    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"memory": self.memory.contiguous(), "generator_state": self.generator.get_state()}
        if self.memory_ages is not None:
            tensors["memory_ages"] = self.memory_ages.contiguous()
        if self.ltm is not None:
            tensors |= self.ltm.to_tensors()
        if len(self.origins):
            tensors["row_origins"] = self.origins.lookup(self.saved_row_ids()).to(torch.int32)  # [m, 3]
        return tensors

    def to_meta(self) -> dict[str, Any]:
        meta = {
            "format": STATE_FORMAT,
            "initialized": self.initialized,
            "injections": self.injections,
            "tokens_injected": self.tokens_injected,
            "memory_shape": list(self.memory.shape),
            "dtype": dtype_name(self.memory.dtype),
        }
        if self.ltm is not None:
            meta["ltm"] = self.ltm.to_meta()
        return meta

    @classmethod
    def from_tensors(
        cls,
        tensors: dict[str, torch.Tensor],
        meta: dict[str, Any],
        device: torch.device | str = "cpu",
        ltm: LongTermMemory | None = None,
        memory_ids: torch.Tensor | None = None,
        next_row_id: int = 0,
    ) -> MemoryState:
        """The state of `to_tensors()` and `to_meta()`, its rows numbered afresh (0..L*N-1 the short-term
        rows, then an M+ state's LTM rows); an M+ state's `ltm` may be given instead, with the ids of its
        short-term rows and the next free id (a session keeps them elsewhere)."""
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown memory-state format {meta.get('format')!r} (expected {STATE_FORMAT})")
        generator = torch.Generator(device="cpu")
        generator.set_state(tensors["generator_state"])
        memory = tensors["memory"]
        renumbered = ltm is None
        if renumbered and "ltm" in meta:
            ltm = LongTermMemory.from_tensors(tensors, meta["ltm"], stm_rows(memory, copy=True))
        origins = tensors.get("row_origins")
        if renumbered and origins is not None:
            origins = Origins.of_rows(torch.arange(origins.shape[0]), origins)
        state = cls(
            memory=memory.to(device),
            generator=generator,
            initialized=bool(meta["initialized"]),
            injections=int(meta["injections"]),
            tokens_injected=int(meta["tokens_injected"]),
            memory_ages=tensors.get("memory_ages"),
            ltm=ltm,
            memory_ids=memory_ids,
            next_row_id=next_row_id,
        )
        if isinstance(origins, Origins):
            state.origins = origins
        return state

    def save(self, directory: str | Path) -> None:
        """Write `state.safetensors` + `state.json` into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.cpu() for k, v in self.to_tensors().items()}, directory / "state.safetensors")
        (directory / "state.json").write_text(json.dumps(self.to_meta(), indent=1))

    @classmethod
    def load(cls, directory: str | Path, device: torch.device | str = "cpu") -> MemoryState:
        directory = Path(directory)
        meta = json.loads((directory / "state.json").read_text())
        return cls.from_tensors(load_file(directory / "state.safetensors"), meta, device)


def initial_ids(layers: int, rows: int) -> torch.Tensor:
    """Row ids [L, N] of a memory's first rows: 0..L*N-1, layer by layer."""
    return torch.arange(layers * rows).view(layers, rows)


def stm_rows(memory: torch.Tensor, copy: bool = False) -> RowSpace:
    """A row space holding the short-term rows memory [L, N, d] at ids 0..L*N-1, layer by layer (a copy
    with `copy`: a working state's memory changes in place, a model's initial memory never does)."""
    L, N, d = memory.shape
    rows = memory.reshape(L * N, d)
    space = RowSpace(d, memory.dtype)
    space.attach(0, rows.clone() if copy else rows)
    return space


def draw_permutations(generator: torch.Generator, draws: int, rows: int) -> torch.Tensor:
    """[draws, rows] permutations, one `randperm` call each, in order (the authors' RNG sequence)."""
    return torch.stack([torch.randperm(rows, generator=generator) for _ in range(draws)])


def split_permutation(perm: torch.Tensor, drop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, dropped) row indices, each ascending: dropped = sort(perm[N-drop:]) and kept the others, which is
    sort(perm[:N-drop]) found in one pass over the N rows rather than by a sort."""
    rows = perm.shape[0]
    dropped = perm[rows - drop :].sort().values  # [drop]
    return kept_rows(dropped, rows), dropped


def kept_rows(dropped: torch.Tensor, rows: int) -> torch.Tensor:
    """The indices of 0..rows-1 not in dropped [k], ascending: [rows - k] on dropped's device."""
    return torch.ones(rows, dtype=torch.bool, device=dropped.device).index_fill_(0, dropped, False).nonzero()[:, 0]


def tile_first_delta(delta: torch.Tensor, rows: int) -> torch.Tensor:
    """The uninitialized-memory rule: repeat the first delta [L, k, d] to fill [L, rows, d]."""
    k = delta.shape[1]
    if k >= rows:
        return delta[:, -rows:]
    reps, rest = divmod(rows, k)
    pieces = [delta] * reps + ([delta[:, k - rest :]] if rest else [])
    return torch.cat(pieces, dim=1)


def append_sources(perms: torch.Tensor, layers: int, rows: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the rows after `drop_and_append` come from, as indices into [old N rows, k new rows]: the
    survivors [L, N] (the kept old rows, then N + 0..k-1) and the dropped rows [L, k] (ascending)."""
    split = [split_permutation(perms[layer if perms.shape[0] > 1 else 0], k) for layer in range(layers)]
    kept, dropped = (torch.stack(part) for part in zip(*split, strict=True))
    return torch.cat([kept, (rows + torch.arange(k)).expand(layers, k)], dim=1), dropped


def drop_and_append(memory: torch.Tensor, delta: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Drop the rows at drop [L, k] (each layer's, ascending, on the CPU: `append_sources`' second result) and
    append the delta; returns the dropped rows [L, k, d].

    memory: [L, N, d] updated in place; delta: [L, k, d]. Survivors keep their order; the new rows go last.
    """
    N, k = memory.shape[1], delta.shape[1]
    dropped = []
    for layer, rows in enumerate(drop):
        dropped.append(memory[layer, rows.to(memory.device)])
        close_gaps(memory[layer], rows)
        memory[layer, N - k :] = delta[layer].to(memory.dtype)
    return torch.stack(dropped)


def close_gaps(rows: torch.Tensor, drop: torch.Tensor) -> None:
    """Move the rows of rows [N, d] that are not at drop [k] (a CPU tensor, ascending, distinct) to its front, in
    order, in place. On the CPU each run of survivors between two dropped rows moves once, by memmove (which
    may overlap): no buffer, one copy of the rows instead of a gather and a copy back."""
    N, k = rows.shape[0], drop.numel()
    if rows.device.type != "cpu" or not rows.is_contiguous():
        rows[: N - k] = rows[kept_rows(drop, N).to(rows.device)]  # the gather is a new tensor: safe to copy back
        return
    row_bytes, base, at = rows.stride(0) * rows.element_size(), rows.data_ptr(), drop.tolist()
    for shift, (gap, end) in enumerate(zip(at, [*at[1:], N], strict=True), start=1):
        ctypes.memmove(base + (gap + 1 - shift) * row_bytes, base + (gap + 1) * row_bytes, (end - gap - 1) * row_bytes)
