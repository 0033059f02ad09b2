"""M+ long-term memory: per-layer rows with retrieval keys, recall frequencies and ages, plus the cache
of rows dropped from short-term memory since the last merge (spec §6.1, §6.3-6.4).

Every row that enters the cache becomes an *entry* of the LTM's `RowBank`: its row, its retrieval key
and its birth (its age minus the LTM's aging clock), immutable from then on. Layers and the cache hold
entry ids, so a merge moves ids, never rows; the rows a question retrieves are gathered by id, so an LTM
whose bank is memory-mapped from a session's files never reads the rows it does not retrieve. Each
layer keeps its own contiguous copy of its keys for scoring.

All of it lives on the CPU and grows with use; only the rows retrieved for a question move to the
model's device. Tensor names of `to_tensors` follow the authors' checkpoint keys (`ltm.{l}`, ...).
"""

from __future__ import annotations

from typing import Any

import torch

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


class RowBank:
    """Every entry the LTM ever received, by id 0..: rows [E, d], keys [E, s] and births [E] (age minus
    `aged`, the clock every LTM row ages with). Read-only parts first (a checkpoint's LTM, or a session's
    files, possibly memory-mapped), then an in-RAM tail that `add` extends."""

    def __init__(self, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], aged: int = 0):
        rows, keys, _ = parts[0]
        self.parts = parts
        self.offsets = [0]
        for part in parts:
            self.offsets.append(self.offsets[-1] + part[0].shape[0])
        empty = (rows.new_empty(0, rows.shape[1]), keys.new_empty(0, keys.shape[1]), torch.empty(0, dtype=torch.int64))
        self.tail = tuple(Growing(t) for t in empty)
        self.aged = aged  # tokens every LTM row has aged by since this bank's clock started

    @classmethod
    def of(cls, rows: torch.Tensor, keys: torch.Tensor, ages: torch.Tensor, aged: int = 0) -> RowBank:
        """A bank of rows [E, d] with their keys [E, s] and current ages [E]."""
        return cls([(rows, keys, ages.to(torch.int64) - aged)], aged)

    def __len__(self) -> int:
        return self.offsets[-1] + self.tail[0].length

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0][0].dtype

    @property
    def widths(self) -> tuple[int, int]:
        """(d, s): the widths of a row and of a key."""
        return self.parts[0][0].shape[1], self.parts[0][1].shape[1]

    def add(self, rows: torch.Tensor, keys: torch.Tensor, ages: torch.Tensor) -> torch.Tensor:
        """Append entries (rows [m, d], keys [m, s], current ages [m]); returns their ids [m]."""
        first = len(self)
        self.tail[0].append(rows.to(self.dtype).cpu())
        self.tail[1].append(keys.to(self.tail[1].storage.dtype).cpu())
        self.tail[2].append(ages.to(torch.int64).cpu() - self.aged)
        return torch.arange(first, first + rows.shape[0])

    def _gather(self, field: int, ids: torch.Tensor) -> torch.Tensor:
        """Field `field` (0 rows, 1 keys, 2 births) of the entries ids [m]."""
        sources = [part[field] for part in self.parts] + [self.tail[field].value]
        out = sources[0].new_empty(ids.shape[0], *sources[0].shape[1:])
        for source, start in zip(sources, self.offsets, strict=True):
            inside = (ids >= start) & (ids < start + source.shape[0])
            if bool(inside.any()):
                out[inside] = source[ids[inside] - start]
        return out

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self._gather(0, ids)

    def keys(self, ids: torch.Tensor) -> torch.Tensor:
        return self._gather(1, ids)

    def ages(self, ids: torch.Tensor) -> torch.Tensor:
        return self._gather(2, ids) + self.aged

    def added_since(self, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, keys, births) of the entries with id >= count, all in the tail."""
        start = count - self.offsets[-1]
        if start < 0:
            raise ValueError(f"entries below {self.offsets[-1]} are not in the tail")
        return tuple(part.value[start:] for part in self.tail)

    def frozen(self, count: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Read-only parts holding entries 0..count-1 (views: no copy), for a bank that extends them."""
        sources = self.parts + [tuple(part.value for part in self.tail)]
        parts = []
        for part, start in zip(sources, self.offsets, strict=True):
            if start < count:
                parts.append(tuple(x[: count - start] for x in part))
        return parts or [tuple(x[:0] for x in self.parts[0])]

    def clone(self) -> RowBank:
        """A bank sharing the read-only parts, with its own copy of the tail."""
        bank = RowBank(self.parts, self.aged)
        bank.tail = tuple(part.clone() for part in self.tail)
        return bank


class LayerLTM:
    """One layer's long-term memory: entry ids [n] into the shared bank, their keys [n, s] (a contiguous
    copy for scoring) and recall frequencies [n] float64 (decayed in place at every merge)."""

    def __init__(self, bank: RowBank, entries: torch.Tensor, keys: torch.Tensor, recall_frequencies: torch.Tensor):
        self.bank = bank
        self._entries, self._keys = Growing(entries.to(torch.int64)), Growing(keys)
        self._rf = Growing(recall_frequencies.clone())

    entries = property(lambda self: self._entries.value)
    keys = property(lambda self: self._keys.value)
    recall_frequencies = property(lambda self: self._rf.value)

    @property
    def rows(self) -> torch.Tensor:
        """[n, d] gathered from the bank (a copy)."""
        return self.bank.rows(self.entries)

    @property
    def ages(self) -> torch.Tensor:
        return self.bank.ages(self.entries)

    def __len__(self) -> int:
        return self._entries.length

    def rows_at(self, index: torch.Tensor) -> torch.Tensor:
        return self.bank.rows(self.entries[index])

    def append_entries(self, entries: torch.Tensor, keys: torch.Tensor, rf: torch.Tensor) -> None:
        """Add bank entries [m] with their keys [m, s] and recall frequencies [m] at the end."""
        self._entries.append(entries)
        self._keys.append(keys.to(self._keys.storage.dtype))
        self._rf.append(rf)

    def append(self, rows: torch.Tensor, keys: torch.Tensor, rf: torch.Tensor, ages: torch.Tensor) -> None:
        """Add new rows [m, d] (entered into the bank) with their keys [m, s], rf [m] and ages [m]."""
        self.append_entries(self.bank.add(rows, keys, ages), keys, rf)

    def keep(self, mask: torch.Tensor) -> None:
        """Keep the rows where mask [n] is true, in order; O(1) when the dropped rows are the first ones."""
        dropped_first = int(mask.long().argmax()) if bool(mask.any()) else len(self)
        if bool(mask[dropped_first:].all()):
            for part in (self._entries, self._keys, self._rf):
                part.drop_first(dropped_first)
            return
        kept = self.select(mask)
        self._entries, self._keys, self._rf = kept._entries, kept._keys, kept._rf

    def select(self, mask: torch.Tensor) -> LayerLTM:
        """The rows where mask [n] is true, in their order (same bank)."""
        return LayerLTM(self.bank, self.entries[mask], self.keys[mask], self.recall_frequencies[mask])

    def rebound(self, bank: RowBank) -> LayerLTM:
        """A copy of this layer's lists over `bank` (a clone of its bank)."""
        return LayerLTM(bank, self.entries.clone(), self.keys.clone(), self.recall_frequencies.clone())


class LongTermMemory:
    """Every layer's LTM plus the dropped-row cache that the next merge moves into it."""

    def __init__(
        self,
        bank: RowBank,
        layers: list[LayerLTM],
        cached_entries: torch.Tensor,
        cached_keys: torch.Tensor,
        update_step: int = 0,
    ):
        self.bank, self.layers = bank, layers
        self._cached_entries = Growing(cached_entries.to(torch.int64), dim=1)  # [L, C] rows dropped since the merge
        self._cached_keys = Growing(cached_keys, dim=1)  # [L, C, s]
        self.update_step = update_step  # tokens written since the last merge (K per injection)

    cached_entries = property(lambda self: self._cached_entries.value)
    cached_keys = property(lambda self: self._cached_keys.value)

    @property
    def cached_rows(self) -> torch.Tensor:
        """[L, C, d] gathered from the bank (a copy)."""
        L, C = self.cached_entries.shape
        return self.bank.rows(self.cached_entries.reshape(-1)).view(L, C, self.bank.widths[0])

    @property
    def cached_ages(self) -> torch.Tensor:
        return self.bank.ages(self.cached_entries.reshape(-1)).view(self.cached_entries.shape)

    @classmethod
    def from_rows(
        cls,
        layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
        cached: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        update_step: int = 0,
    ) -> LongTermMemory:
        """An LTM of (rows [n_l, d], keys [n_l, s], recall frequencies [n_l], ages [n_l]) per layer and an
        optional cache (rows [L, C, d], keys [L, C, s], ages [L, C]); one bank holds all the rows."""
        L = len(layers)
        rows, keys, rf, ages = (list(field) for field in zip(*layers, strict=True))
        if cached is not None:
            rows.append(cached[0].reshape(-1, cached[0].shape[-1]))
            keys.append(cached[1].reshape(-1, cached[1].shape[-1]))
            ages.append(cached[2].reshape(-1))
        bank = RowBank.of(torch.cat(rows), torch.cat(keys), torch.cat(ages))
        starts = torch.tensor([0] + [len(r) for r, *_ in layers]).cumsum(0)
        parts = [LayerLTM(bank, torch.arange(starts[i], starts[i + 1]), layers[i][1], layers[i][2]) for i in range(L)]
        if cached is None:
            cached = (None, keys[0].new_empty(L, 0, keys[0].shape[1]), None)
        C = cached[1].shape[1]
        entries = int(starts[-1]) + torch.arange(L * C).view(L, C)  # [L, C]: the cache follows the layers
        return cls(bank, parts, entries, cached[1], update_step)

    @property
    def cache_size(self) -> int:
        return self._cached_entries.length

    def sizes(self) -> list[int]:
        return [len(layer) for layer in self.layers]

    # -- the bookkeeping of one injection (spec §6.3 (b)-(d)) --------------------------------------
    def age(self, tokens: int) -> None:
        """Every LTM row and every row already cached gets `tokens` older (O(1))."""
        self.bank.aged += tokens

    def cache_dropped(self, rows: torch.Tensor, keys: torch.Tensor, ages: torch.Tensor) -> None:
        """Enter one injection's dropped rows [L, k, d] into the bank and the cache, with their keys [L, k, s]
        and ages [L, k]."""
        L, k, _ = rows.shape
        entries = self.bank.add(rows.reshape(L * k, -1), keys.reshape(L * k, -1), ages.reshape(-1)).view(L, k)
        self._cached_entries.append(entries)
        self._cached_keys.append(keys.to(self._cached_keys.storage.dtype).cpu())

    def merge(self, initial_rf: float, decay: float, min_survivors: int) -> None:
        """Move the cache into the LTM with recall frequency `initial_rf`, decay every row by `decay`,
        and prune rows at or below 0.01 unless `min_survivors` or fewer rows would remain, in which case
        the decay is undone and nothing is pruned (spec §6.4). Empties the cache. Costs O(cache + n)
        scalar work per layer; ids move only when a prune is not of the oldest rows; rows never move."""
        C = self.cache_size
        for i, layer in enumerate(self.layers):
            rf_new = torch.full((C,), initial_rf, dtype=torch.float64)
            layer.append_entries(self.cached_entries[i], self.cached_keys[i], rf_new)
            rf = layer.recall_frequencies  # a view: decays in place
            rf -= decay
            survivors = rf > PRUNE_AT_OR_BELOW
            if int(survivors.sum()) > min_survivors:
                layer.keep(survivors)
            else:
                rf += decay  # as the authors: subtract, then add back
        self._cached_entries.clear()
        self._cached_keys.clear()
        self.update_step = 0

    # -- retrieval support -----------------------------------------------------------------------
    def candidates(self, layer: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows [T, d], ages [T]) of candidates `index` [T], numbered LTM rows first, then cached rows."""
        ltm = self.layers[layer]
        n, from_ltm = len(ltm), index < len(ltm)
        entries = torch.empty_like(index)
        entries[from_ltm] = ltm.entries[index[from_ltm]]
        entries[~from_ltm] = self.cached_entries[layer, index[~from_ltm] - n]
        return self.bank.rows(entries), self.bank.ages(entries)

    # -- copies, casts, serialization ------------------------------------------------------------
    def clone(self) -> LongTermMemory:
        bank = self.bank.clone()
        layers = [layer.rebound(bank) for layer in self.layers]
        return LongTermMemory(bank, layers, self.cached_entries.clone(), self.cached_keys.clone(), self.update_step)

    def layer_tuples(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(rows, keys, recall frequencies, ages) per layer, rows gathered from the bank."""
        return [(x.rows, x.keys, x.recall_frequencies, x.ages) for x in self.layers]

    def to(self, dtype: torch.dtype) -> LongTermMemory:
        """This LTM with rows and keys cast to `dtype` (still on the CPU), in a new bank of the live rows."""
        layers = [(r.to(dtype), k.to(dtype), rf, a) for r, k, rf, a in self.layer_tuples()]
        cached = (self.cached_rows.to(dtype), self.cached_keys.to(dtype), self.cached_ages)
        return LongTermMemory.from_rows(layers, cached, self.update_step)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for i, values in enumerate(self.layer_tuples()):
            tensors |= {name: value.contiguous() for name, value in zip(layer_keys(i), values, strict=True)}
        cache = (self.cached_rows, self.cached_keys, self.cached_ages)
        return tensors | {name: value.contiguous() for name, value in zip(CACHE_KEYS, cache, strict=True)}

    def to_meta(self) -> dict[str, Any]:
        return {"update_step": self.update_step, "sizes": self.sizes(), "cached_rows": self.cache_size}

    def layout_meta(self) -> dict[str, Any]:
        """to_meta() plus the bank's clock and size, which `layout()` needs to be read back."""
        return self.to_meta() | {"aged": self.bank.aged, "entries": len(self.bank)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> LongTermMemory:
        cached = tuple(tensors[name].cpu() for name in CACHE_KEYS)
        L = cached[0].shape[0]
        layers = [tuple(tensors[name].cpu() for name in layer_keys(i)) for i in range(L)]
        return cls.from_rows(layers, cached, int(meta["update_step"]))

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
    def from_layout(cls, bank: RowBank, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> LongTermMemory:
        """The LTM of `layout()` tensors over `bank`; keys are gathered from the bank, rows are not read."""
        L = len(meta["sizes"])
        layers = []
        for i in range(L):
            entries = from_runs(tensors[f"ltm_runs.{i}"])
            rf = tensors[f"ltm_rf.{i}"].repeat_interleave(tensors[f"ltm_rf_counts.{i}"])
            layers.append(LayerLTM(bank, entries, bank.keys(entries), rf))
        cached = torch.stack([from_runs(tensors[f"cache_runs.{i}"]) for i in range(L)])  # [L, C]
        cached_keys = bank.keys(cached.reshape(-1)).view(*cached.shape, bank.widths[1])
        return cls(bank, layers, cached, cached_keys, int(meta["update_step"]))

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The LTM in the authors' checkpoint layout: recall frequencies and ages as float32."""
        tensors = {}
        for i, (rows, keys, rf, ages) in enumerate(self.layer_tuples()):
            names = layer_keys(i)
            tensors |= {names[0]: rows, names[1]: keys, names[2]: rf.float(), names[3]: ages.float()}
        return tensors

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, torch.Tensor], num_layers: int, dtype: torch.dtype) -> LongTermMemory:
        """The LTM of a checkpoint: rows and keys in `dtype`, recall frequencies as float64, ages
        truncated to int64 (the stored float ages hold integers); the cache starts empty."""
        layers = []
        for i in range(num_layers):
            rows, keys, rf, ages = (tensors[name].cpu() for name in layer_keys(i))
            layers.append((rows.to(dtype), keys.to(dtype), rf.to(torch.float64), ages.to(torch.int64)))
        return cls.from_rows(layers)
