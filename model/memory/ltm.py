"""M+ long-term memory: per-layer entries with retrieval keys, recall frequencies and ages, plus the cache
of rows dropped from short-term memory since the last merge (docs/algorithm.md §6.1, §6.3-6.4).

Every row that enters the cache becomes an *entry* of the LTM's `EntryBank`: the id of the row (rows live
once, in the state's `RowSpace`: RAM, a session's row file, or a file of pre-encoded text), its retrieval
key and its birth (its age minus the LTM's aging clock), immutable from then on. Layers and the cache hold
entry ids, so a merge moves ids, never rows or keys; retrieval reads keys (and, for scores computed from
the rows themselves, rows) one batch at a time, and gathers only the rows it picks.

All of it lives on the CPU. A model on a GPU also keeps a `KeyMirror` of the bank's keys on the device (derived
data: built and extended as questions need it, never saved), scores there, and moves only the retrieved rows.
Tensor names of `to_tensors` follow the authors' checkpoint keys (`ltm.{l}`, ...).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .dtypes import dtype_name, dtype_of
from .rows import SCAN_ROWS, FileArray, RowSpace, Source

PRUNE_AT_OR_BELOW = 0.01  # rows whose recall frequency decays to this are pruned at a merge
CACHE_KEYS = ("cached_dropped_memories", "cached_dropped_keys", "cached_dropped_memory_ages")


def layer_keys(layer: int) -> tuple[str, str, str, str]:
    """The names of layer `layer`'s rows, keys, recall frequencies and ages (authors' layout)."""
    return f"ltm.{layer}", f"ltm_keys.{layer}", f"ltm_recall_frequencies.{layer}", f"ltm_ages.{layer}"


def runs_of(ids: torch.Tensor) -> torch.Tensor:
    """[R, 2] (first id, length) of the maximal runs of consecutive ids in ids [n]."""
    if ids.numel() == 0:
        return torch.empty(0, 2, dtype=torch.int64)
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[1:] = ids[1:] != ids[:-1] + 1
    where = torch.nonzero(starts)[:, 0]  # [R]
    lengths = torch.diff(where, append=torch.tensor([ids.numel()]))
    return torch.stack([ids[where], lengths], dim=1)


def from_runs(runs: torch.Tensor) -> torch.Tensor:
    """The ids [n] of runs [R, 2] (first id, length)."""
    first, lengths = runs[:, 0], runs[:, 1]
    offsets = torch.arange(int(lengths.sum())) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    return torch.repeat_interleave(first, lengths) + offsets


class Growing:
    """A tensor that grows at the end of dimension `dim` in over-allocated storage (amortized O(new) appends)
    and can lose its first rows in O(1), so merges and prunes never copy the whole long-term memory."""

    def __init__(self, data: torch.Tensor, dim: int = 0):
        self.dim, self.storage, self.start, self.length = dim, data, 0, data.shape[dim]

    @property
    def value(self) -> torch.Tensor:
        return self.storage.narrow(self.dim, self.start, self.length)

    def append(self, data: torch.Tensor) -> None:
        """Add `data` (same shape but along `dim`) at the end."""
        extra = data.shape[self.dim]
        if self.start + self.length + extra > self.storage.shape[self.dim]:
            shape = list(self.storage.shape)
            shape[self.dim] = max(2 * (self.length + extra), 64)
            grown = self.storage.new_empty(shape)
            grown.narrow(self.dim, 0, self.length).copy_(self.value)
            self.storage, self.start = grown, 0
        self.storage.narrow(self.dim, self.start + self.length, extra).copy_(data)
        self.length += extra

    def drop_first(self, count: int) -> None:
        self.start, self.length = self.start + count, self.length - count

    def clear(self) -> None:
        self.start, self.length = 0, 0

    def clone(self) -> Growing:
        return Growing(self.value.clone(), self.dim)


Part = tuple[Source, Source, Source]  # row ids [c], births [c], keys [c, s]: tensors or FileArrays


@dataclass
class MirrorStorage:
    """Device rows [capacity, s] that mirrors share: rows below `filled` are written once and never change."""

    data: torch.Tensor
    filled: int


class KeyMirror:
    """The keys [count, s] of a bank's entries 0..count-1 on a device, in storage that grows geometrically
    (appends cost O(new) amortized). Clones share the storage copy-on-write: only a mirror whose count is the
    storage's `filled` mark appends in place; any other copies its rows to new storage first, so no mirror sees
    or overwrites another's appended rows."""

    def __init__(self, storage: MirrorStorage, count: int):
        self.storage, self.count = storage, count

    @classmethod
    def empty(cls, width: int, device: torch.device, dtype: torch.dtype) -> KeyMirror:
        return cls(MirrorStorage(torch.empty(0, width, device=device, dtype=dtype), 0), 0)

    @property
    def value(self) -> torch.Tensor:
        return self.storage.data[: self.count]

    def holds(self, device: torch.device, dtype: torch.dtype) -> bool:
        return self.storage.data.device == device and self.storage.data.dtype == dtype

    def share(self, count: int | None = None) -> KeyMirror:
        """A mirror of the first `count` rows (default: all of them) on the same storage."""
        return KeyMirror(self.storage, self.count if count is None else count)

    def extend(self, bank: EntryBank) -> None:
        """Upload the keys of the bank's entries count..len(bank)-1, a scan batch at a time."""
        start, end = self.count, len(bank)
        if end == start:
            return
        data = self.storage.data
        if start != self.storage.filled or end > data.shape[0]:  # another mirror wrote past our rows, or full
            grown = data.new_empty(max(end + start, 1024), data.shape[1])  # a first build (start 0): no spare rows
            grown[:start] = self.value
            self.storage = MirrorStorage(grown, start)
        data = self.storage.data
        for positions, keys in bank.scan_keys(torch.arange(start, end)):  # keys [b, s] on the CPU
            data.index_copy_(0, (start + positions).to(data.device), keys.to(data.dtype).to(data.device))
        self.count = self.storage.filled = end


def as_slice(index: torch.Tensor) -> slice | None:
    """slice(first, last + 1) when index [m] counts up by one from first to last (m >= 1); else None."""
    if index.numel() == 0:
        return None
    first, last = int(index[0]), int(index[-1])
    if last - first + 1 != index.numel() or not bool((index[1:] > index[:-1]).all()):
        return None
    return slice(first, last + 1)


def read(source: Source, index: torch.Tensor) -> torch.Tensor:
    """source[index] along the first dimension, read-only: a view where index is a run of consecutive ids (a
    layer's entries as a checkpoint or merge lays them out), else a copy (index_select: 4x faster than indexing)."""
    if isinstance(source, FileArray):
        return source.read(index)
    run = as_slice(index)
    return source[run] if run is not None else torch.index_select(source, 0, index)


class EntryBank:
    """Every entry the LTM ever received, by id 0..: the id of its row in `rows`, its birth (age minus
    `aged`, the clock every LTM row ages with) and its key [s]. Read-only parts first (a checkpoint's LTM,
    a session's entry files), then an in-RAM tail that `add` extends.

    key_dtype: the keys' dtype, or None when they follow the rows' dtype (cast with them).
    """

    def __init__(
        self, rows: RowSpace, key_width: int, key_dtype: torch.dtype | None, parts: list[Part] = (), aged: int = 0
    ):
        self.rows, self.key_width, self.key_dtype = rows, key_width, key_dtype
        self.parts, self.offsets = list(parts), [0]
        for part in self.parts:
            self.offsets.append(self.offsets[-1] + len(part[0]))
        keys = torch.empty(0, key_width, dtype=key_dtype or rows.dtype)
        self.tail = (Growing(torch.empty(0, dtype=torch.int64)), Growing(torch.empty(0, dtype=torch.int64)))
        self.tail += (Growing(keys),)
        self.aged = aged  # tokens every LTM row has aged by since this bank's clock started
        self.mirror: KeyMirror | None = None  # the keys on a device (see device_keys)
        self.cloned_from: tuple[weakref.ref[EntryBank], int] | None = None  # (bank, its size then): shares a mirror

    def __len__(self) -> int:
        return self.offsets[-1] + self.tail[0].length

    @property
    def keys_dtype(self) -> torch.dtype:
        return self.tail[2].storage.dtype

    def add(self, row_ids: torch.Tensor, keys: torch.Tensor, ages: torch.Tensor) -> torch.Tensor:
        """Append entries for the rows row_ids [m] (held by `rows`) with keys [m, s] and current ages [m];
        returns their entry ids [m]."""
        first = len(self)
        self.tail[0].append(row_ids.to(torch.int64).cpu())
        self.tail[1].append(ages.to(torch.int64).cpu() - self.aged)
        self.tail[2].append(keys.to(self.keys_dtype).cpu())
        return torch.arange(first, first + row_ids.shape[0])

    def _split(self, ids: torch.Tensor) -> Iterator[tuple[torch.Tensor, int, torch.Tensor]]:
        """(positions in ids, part number (len(parts): the tail), local indices) of each part ids fall in."""
        ids = ids.reshape(-1)
        ends = [*self.offsets[1:], len(self)]
        if ids.numel():
            low, high = (int(bound) for bound in torch.aminmax(ids))
            for number, (start, end) in enumerate(zip(self.offsets, ends, strict=True)):
                if start <= low and high < end:  # all in one part (the common case): no search
                    yield torch.arange(ids.numel()), number, ids - start
                    return
        for number, (start, end) in enumerate(zip(self.offsets, ends, strict=True)):
            inside = (ids >= start) & (ids < end)
            if bool(inside.any()):
                positions = torch.nonzero(inside)[:, 0]
                yield positions, number, ids[positions] - start

    def _source(self, number: int, field: int) -> Source:
        return self.parts[number][field] if number < len(self.parts) else self.tail[field].value

    def _gather(self, field: int, ids: torch.Tensor) -> torch.Tensor:
        """Field `field` (0 row ids, 1 births, 2 keys) of the entries ids [m]."""
        like = self.tail[field].storage
        out = like.new_empty(ids.numel(), *like.shape[1:])
        for positions, number, local in self._split(ids):
            out[positions] = read(self._source(number, field), local).to(out.dtype)
        return out

    def row_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self._gather(0, ids)

    def ages(self, ids: torch.Tensor) -> torch.Tensor:
        return self._gather(1, ids) + self.aged

    def keys(self, ids: torch.Tensor) -> torch.Tensor:
        return self._gather(2, ids)

    def rows_of(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows [m, d] of entries ids [m] (a copy)."""
        return self.rows.gather(self.row_ids(ids))

    def scan_keys(self, ids: torch.Tensor, batch: int = SCAN_ROWS) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(positions [b], keys [b, s]) of the entries ids [m], a batch at a time (in storage order)."""
        for positions, number, local in self._split(ids):
            source = self._source(number, 2)
            if isinstance(source, FileArray):
                for where, keys in source.scan(local, batch):
                    yield positions[where], keys
            else:
                for start in range(0, local.numel(), batch):
                    yield positions[start : start + batch], read(source, local[start : start + batch])

    def device_keys(self, device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """[E, s] the keys of entries 0..E-1 on `device` in `dtype`. The mirror behind it uploads only the entries
        added since the last call; a clone starts from the mirror of the bank it was cloned from (built there
        first if need be), whose storage it shares until it appends."""
        device = torch.empty(0, device=device).device  # "cuda" -> "cuda:0"
        if self.mirror is None or not self.mirror.holds(device, dtype):
            origin = None if self.cloned_from is None else self.cloned_from[0]()
            if origin is None:
                self.mirror = KeyMirror.empty(self.key_width, device, dtype)
            else:
                origin.device_keys(device, dtype)
                self.mirror = origin.mirror.share(self.cloned_from[1])
        self.mirror.extend(self)
        return self.mirror.value

    def scan_rows(self, ids: torch.Tensor, batch: int = SCAN_ROWS) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(positions [b], rows [b, d]) of the entries ids [m], a batch at a time (in storage order)."""
        return self.rows.scan(self.row_ids(ids), batch)

    # -- persistence ---------------------------------------------------------------------------------
    def added_since(self, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row ids, births, keys) of the entries with id >= count, all in the tail."""
        start = count - self.offsets[-1]
        if start < 0:
            raise ValueError(f"entries below {self.offsets[-1]} are not in the tail")
        return tuple(part.value[start:] for part in self.tail)

    def persisted(self, first: int, part: Part) -> None:
        """Entries first..first+len(part)-1 now live in `part` (files): it replaces the part that starts at
        `first` (or follows the others), and tail entries it covers leave RAM."""
        number = self.offsets.index(first) if first in self.offsets[:-1] else len(self.parts)
        if number == len(self.parts) and first != self.offsets[-1]:
            raise ValueError(f"a part must start at an entry that starts a part, not {first}")
        covered = first + len(part[0]) - self.offsets[-1]  # tail entries now in the part
        self.parts = self.parts[:number] + [part]
        self.offsets = self.offsets[: number + 1] + [first + len(part[0])]
        for growing in self.tail:
            growing.drop_first(max(covered, 0))

    def frozen(self) -> list[Part]:
        """Read-only parts holding every entry (the tail's as views: no copy), for a bank that extends them."""
        tail = tuple(part.value for part in self.tail)
        return self.parts + ([tail] if tail[0].numel() else [])

    def clone(self) -> EntryBank:
        """A bank sharing the read-only parts and the device mirror (copy-on-write), with its own tail and its own
        copy of the row space."""
        bank = EntryBank(self.rows.clone(), self.key_width, self.key_dtype, self.parts, self.aged)
        bank.tail = tuple(part.clone() for part in self.tail)
        bank.mirror = None if self.mirror is None else self.mirror.share()
        bank.cloned_from = weakref.ref(self), len(self)
        return bank


class LayerLTM:
    """One layer's long-term memory: entry ids [n] into the shared bank and their recall frequencies [n]
    float64 (decayed in place at every merge)."""

    def __init__(self, bank: EntryBank, entries: torch.Tensor, recall_frequencies: torch.Tensor):
        self.bank = bank
        self._entries, self._rf = Growing(entries.to(torch.int64)), Growing(recall_frequencies.clone())

    entries = property(lambda self: self._entries.value)
    recall_frequencies = property(lambda self: self._rf.value)

    @property
    def rows(self) -> torch.Tensor:
        """[n, d] gathered from the row space (a copy)."""
        return self.bank.rows_of(self.entries)

    @property
    def keys(self) -> torch.Tensor:
        """[n, s] gathered from the bank (a copy)."""
        return self.bank.keys(self.entries)

    ages = property(lambda self: self.bank.ages(self.entries))  # [n]
    row_ids = property(lambda self: self.bank.row_ids(self.entries))  # [n]

    def __len__(self) -> int:
        return self._entries.length

    def rows_at(self, index: torch.Tensor) -> torch.Tensor:
        return self.bank.rows_of(self.entries[index])

    def append_entries(self, entries: torch.Tensor, rf: torch.Tensor) -> None:
        """Add bank entries [m] with their recall frequencies [m] at the end."""
        self._entries.append(entries)
        self._rf.append(rf)

    def keep(self, mask: torch.Tensor) -> None:
        """Keep the rows where mask [n] is true, in order; O(1) when the dropped rows are the first ones."""
        dropped_first = int(mask.long().argmax()) if bool(mask.any()) else len(self)
        if bool(mask[dropped_first:].all()):
            for part in (self._entries, self._rf):
                part.drop_first(dropped_first)
            return
        kept = self.select(mask)
        self._entries, self._rf = kept._entries, kept._rf

    def select(self, mask: torch.Tensor) -> LayerLTM:
        """The rows where mask [n] is true, in their order (same bank)."""
        return LayerLTM(self.bank, self.entries[mask], self.recall_frequencies[mask])

    def rebound(self, bank: EntryBank) -> LayerLTM:
        """A copy of this layer's lists over `bank` (a clone of its bank)."""
        return LayerLTM(bank, self.entries.clone(), self.recall_frequencies.clone())


class LongTermMemory:
    """Every layer's LTM plus the dropped-row cache that the next merge moves into it."""

    def __init__(
        self,
        bank: EntryBank,
        layers: list[LayerLTM],
        cached_entries: torch.Tensor,
        update_step: int = 0,
    ):
        self.bank, self.layers = bank, layers
        self._cached_entries = Growing(cached_entries.to(torch.int64), dim=1)  # [L, C] rows dropped since the merge
        self.update_step = update_step  # tokens written since the last merge (K per injection)

    cached_entries = property(lambda self: self._cached_entries.value)

    @property
    def rows(self) -> RowSpace:
        """The row space every entry's row is read from."""
        return self.bank.rows

    @property
    def cached_rows(self) -> torch.Tensor:
        """[L, C, d] gathered from the row space (a copy)."""
        L, C = self.cached_entries.shape
        return self.bank.rows_of(self.cached_entries.reshape(-1)).view(L, C, self.rows.width)

    @property
    def cached_keys(self) -> torch.Tensor:
        L, C = self.cached_entries.shape
        return self.bank.keys(self.cached_entries.reshape(-1)).view(L, C, self.bank.key_width)

    @property
    def cached_ages(self) -> torch.Tensor:
        return self.bank.ages(self.cached_entries.reshape(-1)).view(self.cached_entries.shape)

    @classmethod
    def from_rows(
        cls,
        layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
        cached: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        update_step: int = 0,
        space: RowSpace | None = None,
        key_dtype: torch.dtype | None = None,
    ) -> LongTermMemory:
        """An LTM of (rows [n_l, d], keys [n_l, s], recall frequencies [n_l], ages [n_l]) per layer and an
        optional cache (rows [L, C, d], keys [L, C, s], ages [L, C]). The rows join `space` (a new one
        if None) after the ids it holds; one bank holds all the entries, layers first, then the cache."""
        L = len(layers)
        rows, keys, rf, ages = (list(field) for field in zip(*layers, strict=True))
        d, s = rows[0].shape[1], keys[0].shape[1]
        if cached is not None:
            rows.append(cached[0].reshape(-1, d))
            keys.append(cached[1].reshape(-1, s))
            ages.append(cached[2].reshape(-1))
        space = space or RowSpace(d, rows[0].dtype)
        first = space.end
        space.attach(first, torch.cat(rows).to(space.dtype))
        bank = EntryBank(space, s, key_dtype)
        all_keys = torch.cat(keys)
        bank.add(first + torch.arange(all_keys.shape[0]), all_keys, torch.cat(ages))
        starts = torch.tensor([0] + [len(r) for r, *_ in layers]).cumsum(0)
        parts = [LayerLTM(bank, torch.arange(starts[i], starts[i + 1]), layers[i][2]) for i in range(L)]
        C = 0 if cached is None else cached[1].shape[1]
        entries = int(starts[-1]) + torch.arange(L * C).view(L, C)  # [L, C]: the cache follows the layers
        return cls(bank, parts, entries, update_step)

    @property
    def cache_size(self) -> int:
        return self._cached_entries.length

    def sizes(self) -> list[int]:
        return [len(layer) for layer in self.layers]

    # -- the bookkeeping of one injection (docs/algorithm.md §6.3 (b)-(d)) --------------------------------------
    def age(self, tokens: int) -> None:
        """Every LTM row and every row already cached gets `tokens` older (O(1))."""
        self.bank.aged += tokens

    def cache_dropped(self, row_ids: torch.Tensor, keys: torch.Tensor, ages: torch.Tensor) -> None:
        """Enter one injection's dropped rows (row ids [L, k], held by the row space) into the bank and the
        cache, with their keys [L, k, s] and ages [L, k]."""
        L, k = row_ids.shape
        entries = self.bank.add(row_ids.reshape(-1), keys.reshape(L * k, -1), ages.reshape(-1)).view(L, k)
        self._cached_entries.append(entries)

    def merge(self, initial_rf: float, decay: float, min_survivors: int) -> None:
        """Move the cache into the LTM with recall frequency `initial_rf`, decay every row by `decay`,
        and prune rows at or below 0.01 unless `min_survivors` or fewer rows would remain, in which case
        the decay is undone and nothing is pruned (docs/algorithm.md §6.4). Empties the cache. Costs O(cache + n)
        scalar work per layer; ids move only when a prune is not of the oldest rows; rows never move."""
        C = self.cache_size
        for i, layer in enumerate(self.layers):
            layer.append_entries(self.cached_entries[i], torch.full((C,), initial_rf, dtype=torch.float64))
            rf = layer.recall_frequencies  # a view: decays in place
            rf -= decay
            survivors = rf > PRUNE_AT_OR_BELOW
            if int(survivors.sum()) > min_survivors:
                layer.keep(survivors)
            else:
                rf += decay  # as the authors: subtract, then add back
        self._cached_entries.clear()
        self.update_step = 0

    # -- retrieval support -----------------------------------------------------------------------
    def candidate_entries(self, layer: int) -> torch.Tensor:
        """Entry ids [n + C] of layer `layer`'s candidates: its LTM rows, then its cached rows."""
        return torch.cat([self.layers[layer].entries, self.cached_entries[layer]])

    def candidates(self, layer: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows [T, d], ages [T]) of candidates `index` [T], numbered LTM rows first, then cached rows."""
        entries = self.candidate_entries(layer)[index]
        return self.bank.rows_of(entries), self.bank.ages(entries)

    # -- copies, casts, serialization ------------------------------------------------------------
    def clone(self) -> LongTermMemory:
        bank = self.bank.clone()
        layers = [layer.rebound(bank) for layer in self.layers]
        return LongTermMemory(bank, layers, self.cached_entries.clone(), self.update_step)

    def layer_tuples(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(rows, keys, recall frequencies, ages) per layer, gathered."""
        return [(x.rows, x.keys, x.recall_frequencies, x.ages) for x in self.layers]

    def cache_tuple(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.cached_rows, self.cached_keys, self.cached_ages

    def to(self, dtype: torch.dtype, space: RowSpace | None = None) -> LongTermMemory:
        """This LTM with rows (and keys that follow them) in `dtype`, on the CPU, its live rows gathered
        into `space` (a new RAM row space if None)."""
        key_dtype = self.bank.key_dtype
        cast = (lambda k: k) if key_dtype is not None else (lambda k: k.to(dtype))
        layers = [(r.to(dtype), cast(k), rf, a) for r, k, rf, a in self.layer_tuples()]
        rows, keys, ages = self.cache_tuple()
        space = space or RowSpace(self.rows.width, dtype)
        return LongTermMemory.from_rows(layers, (rows.to(dtype), cast(keys), ages), self.update_step, space, key_dtype)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for i, values in enumerate(self.layer_tuples()):
            tensors |= {name: value.contiguous() for name, value in zip(layer_keys(i), values, strict=True)}
        cache = {name: value.contiguous() for name, value in zip(CACHE_KEYS, self.cache_tuple(), strict=True)}
        return tensors | cache

    def to_meta(self) -> dict[str, Any]:
        meta = {"update_step": self.update_step, "sizes": self.sizes(), "cached_rows": self.cache_size}
        return meta | ({} if self.bank.key_dtype is None else {"key_dtype": dtype_name(self.bank.key_dtype)})

    def layout_meta(self) -> dict[str, Any]:
        """to_meta() plus the bank's clock and size, which `layout()` needs to be read back."""
        return self.to_meta() | {"aged": self.bank.aged, "entries": len(self.bank)}

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any], space: RowSpace | None = None
    ) -> LongTermMemory:
        """The LTM of `to_tensors()` and `to_meta()`, its rows added to `space` (a new one if None)."""
        cached = tuple(tensors[name].cpu() for name in CACHE_KEYS)
        L = cached[0].shape[0]
        layers = [tuple(tensors[name].cpu() for name in layer_keys(i)) for i in range(L)]
        key_dtype = dtype_of(meta["key_dtype"]) if "key_dtype" in meta else None
        return cls.from_rows(layers, cached, int(meta["update_step"]), space, key_dtype)

    def layout(self) -> dict[str, torch.Tensor]:
        """Everything but the bank, compactly: per layer the runs of its entry ids and its recall
        frequencies run-length encoded, and the runs of the cache's entry ids. O(runs), not O(rows):
        entries come in blocks of consecutive ids and one merge gives its rows one recall frequency."""
        tensors = {}
        for i, layer in enumerate(self.layers):
            values, counts = torch.unique_consecutive(layer.recall_frequencies, return_counts=True)
            tensors |= {f"ltm_runs.{i}": runs_of(layer.entries), f"ltm_rf.{i}": values, f"ltm_rf_counts.{i}": counts}
            tensors[f"cache_runs.{i}"] = runs_of(self.cached_entries[i])
        return tensors

    @classmethod
    def from_layout(cls, bank: EntryBank, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> LongTermMemory:
        """The LTM of `layout()` tensors over `bank`; reads no row and no key."""
        L = len(meta["sizes"])
        layers = []
        for i in range(L):
            rf = tensors[f"ltm_rf.{i}"].repeat_interleave(tensors[f"ltm_rf_counts.{i}"])
            layers.append(LayerLTM(bank, from_runs(tensors[f"ltm_runs.{i}"]), rf))
        cached = torch.stack([from_runs(tensors[f"cache_runs.{i}"]) for i in range(L)])  # [L, C]
        return cls(bank, layers, cached, int(meta["update_step"]))

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The LTM in the authors' checkpoint layout: recall frequencies and ages as float32."""
        tensors = {}
        for i, (rows, keys, rf, ages) in enumerate(self.layer_tuples()):
            names = layer_keys(i)
            tensors |= {names[0]: rows, names[1]: keys, names[2]: rf.float(), names[3]: ages.float()}
        return tensors

    @classmethod
    def from_checkpoint(
        cls,
        tensors: dict[str, torch.Tensor],
        num_layers: int,
        dtype: torch.dtype,
        space: RowSpace | None = None,
        carried: dict[str, torch.Tensor] | None = None,
        update_step: int = 0,
        key_dtype: torch.dtype | None = None,
    ) -> LongTermMemory:
        """The LTM of a checkpoint: rows in `dtype`, keys in `key_dtype` (default: `dtype`), recall frequencies
        as float64, ages truncated to int64 (the stored float ages hold integers). The cache starts empty,
        unless the checkpoint `carried` what the authors' layout lacks (see checkpoint.carried_tensors): the
        exact recall frequencies and the cache."""
        carried = carried or {}
        layers = []
        for i in range(num_layers):
            rows, keys, rf, ages = (tensors[name].cpu() for name in layer_keys(i))
            rf = carried.get(f"ltm_recall_frequencies_exact.{i}", rf)
            layers.append((rows.to(dtype), keys.to(key_dtype or dtype), rf.to(torch.float64), ages.to(torch.int64)))
        cached = tuple(carried[name] for name in CACHE_KEYS) if CACHE_KEYS[0] in carried else None
        return cls.from_rows(layers, cached, update_step, space, key_dtype)
