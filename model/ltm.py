"""M+ long-term memory: per-layer rows with retrieval keys, recall frequencies and ages, plus the cache
of rows dropped from short-term memory since the last merge (spec §6.1, §6.3-6.4).

All of it lives on the CPU and grows with use; only the rows retrieved for a question move to the
model's device. Tensor names follow the authors' checkpoint keys (`ltm.{l}`, `ltm_keys.{l}`, ...).
"""

from __future__ import annotations

from typing import Any

import torch

PRUNE_AT_OR_BELOW = 0.01  # rows whose recall frequency decays to this are pruned at a merge
CACHE_KEYS = ("cached_dropped_memories", "cached_dropped_keys", "cached_dropped_memory_ages")


def layer_keys(layer: int) -> tuple[str, str, str, str]:
    """The names of layer `layer`'s rows, keys, recall frequencies and ages (authors' layout)."""
    return f"ltm.{layer}", f"ltm_keys.{layer}", f"ltm_recall_frequencies.{layer}", f"ltm_ages.{layer}"


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


class LayerLTM:
    """One layer's long-term memory; the four tensors share their first dimension n. Ages are stored
    relative to an offset so that aging every row is O(1)."""

    def __init__(self, rows: torch.Tensor, keys: torch.Tensor, recall_frequencies: torch.Tensor, ages: torch.Tensor):
        self._rows, self._keys = Growing(rows), Growing(keys)  # [n, d] rows, [n, s] key_proj(norm(row))
        self._rf = Growing(recall_frequencies.clone())  # [n] float64, decayed in place at every merge
        self._ages = Growing(ages.to(torch.int64))  # [n] tokens written since the row entered the STM - offset
        self._age_offset = 0

    rows = property(lambda self: self._rows.value)
    keys = property(lambda self: self._keys.value)
    recall_frequencies = property(lambda self: self._rf.value)

    @property
    def ages(self) -> torch.Tensor:
        return self._ages.value + self._age_offset

    @ages.setter
    def ages(self, ages: torch.Tensor) -> None:
        self._ages, self._age_offset = Growing(ages.to(torch.int64).clone()), 0

    def __len__(self) -> int:
        return self._rows.length

    def add_age(self, tokens: int) -> None:
        self._age_offset += tokens

    def ages_at(self, index: torch.Tensor) -> torch.Tensor:
        return self._ages.value[index] + self._age_offset

    def append(self, rows: torch.Tensor, keys: torch.Tensor, rf: torch.Tensor, ages: torch.Tensor) -> None:
        """Add rows [m, d] with their keys [m, s], recall frequencies [m] and ages [m] at the end."""
        self._rows.append(rows.to(self._rows.storage.dtype))
        self._keys.append(keys.to(self._keys.storage.dtype))
        self._rf.append(rf)
        self._ages.append(ages.to(torch.int64) - self._age_offset)

    def keep(self, mask: torch.Tensor) -> None:
        """Keep the rows where mask [n] is true, in order; O(1) when the dropped rows are the first ones."""
        dropped_first = int(mask.long().argmax()) if bool(mask.any()) else len(self)
        if bool(mask[dropped_first:].all()):
            for part in (self._rows, self._keys, self._rf, self._ages):
                part.drop_first(dropped_first)
            return
        kept = self.select(mask)
        self._rows, self._keys, self._rf, self._ages = kept._rows, kept._keys, kept._rf, kept._ages
        self._age_offset = kept._age_offset

    def select(self, mask: torch.Tensor) -> LayerLTM:
        """The rows where mask [n] is true, in their order."""
        return LayerLTM(self.rows[mask], self.keys[mask], self.recall_frequencies[mask], self.ages[mask])

    def clone(self) -> LayerLTM:
        return LayerLTM(self.rows.clone(), self.keys.clone(), self.recall_frequencies.clone(), self.ages.clone())


class LongTermMemory:
    """Every layer's LTM plus the dropped-row cache that the next merge moves into it."""

    def __init__(
        self,
        layers: list[LayerLTM],
        cached_rows: torch.Tensor,
        cached_keys: torch.Tensor,
        cached_ages: torch.Tensor,
        update_step: int = 0,
    ):
        self.layers = layers
        self._cached_rows = Growing(cached_rows, dim=1)  # [L, C, d] rows dropped from the STM since the last merge
        self._cached_keys = Growing(cached_keys, dim=1)  # [L, C, s]
        self._cached_ages = Growing(cached_ages.to(torch.int64), dim=1)  # [L, C] - offset
        self._cache_age_offset = 0
        self.update_step = update_step  # tokens written since the last merge (K per injection)

    cached_rows = property(lambda self: self._cached_rows.value)
    cached_keys = property(lambda self: self._cached_keys.value)
    cached_ages = property(lambda self: self._cached_ages.value + self._cache_age_offset)

    @classmethod
    def with_empty_cache(cls, layers: list[LayerLTM]) -> LongTermMemory:
        rows, keys = layers[0].rows, layers[0].keys
        L = len(layers)
        return cls(
            layers=layers,
            cached_rows=rows.new_empty(L, 0, rows.shape[1]),
            cached_keys=keys.new_empty(L, 0, keys.shape[1]),
            cached_ages=torch.empty(L, 0, dtype=torch.int64),
        )

    @property
    def cache_size(self) -> int:
        return self._cached_rows.length

    def sizes(self) -> list[int]:
        return [len(layer) for layer in self.layers]

    # -- the bookkeeping of one injection (spec §6.3 (b)-(d)) --------------------------------------
    def age(self, tokens: int) -> None:
        """Every LTM row and every row already cached gets `tokens` older (O(layers))."""
        for layer in self.layers:
            layer.add_age(tokens)
        self._cache_age_offset += tokens

    def cache_dropped(self, rows: torch.Tensor, keys: torch.Tensor, ages: torch.Tensor) -> None:
        """Append one injection's dropped rows [L, k, d], their keys [L, k, s] and ages [L, k]."""
        self._cached_rows.append(rows.to(self._cached_rows.storage.dtype).cpu())
        self._cached_keys.append(keys.to(self._cached_keys.storage.dtype).cpu())
        self._cached_ages.append(ages.to(torch.int64).cpu() - self._cache_age_offset)

    def merge(self, initial_rf: float, decay: float, min_survivors: int) -> None:
        """Move the cache into the LTM with recall frequency `initial_rf`, decay every row by `decay`,
        and prune rows at or below 0.01 unless `min_survivors` or fewer rows would remain, in which case
        the decay is undone and nothing is pruned (spec §6.4). Empties the cache. Costs O(cache + n)
        scalar work per layer; rows move only when a prune is not of the oldest rows."""
        C = self.cache_size
        cached_rows, cached_keys, cached_ages = self.cached_rows, self.cached_keys, self.cached_ages
        for i, layer in enumerate(self.layers):
            layer.append(
                cached_rows[i], cached_keys[i], torch.full((C,), initial_rf, dtype=torch.float64), cached_ages[i]
            )
            rf = layer.recall_frequencies  # a view: decays in place
            rf -= decay
            survivors = rf > PRUNE_AT_OR_BELOW
            if int(survivors.sum()) > min_survivors:
                layer.keep(survivors)
            else:
                rf += decay  # as the authors: subtract, then add back
        for part in (self._cached_rows, self._cached_keys, self._cached_ages):
            part.clear()
        self._cache_age_offset = 0
        self.update_step = 0

    # -- retrieval support -----------------------------------------------------------------------
    def candidates(self, layer: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows [T, d], ages [T]) of candidates `index` [T], numbered LTM rows first, then cached rows."""
        ltm = self.layers[layer]
        n = len(ltm)
        from_ltm = index < n
        rows = ltm.rows.new_empty(index.shape[0], ltm.rows.shape[1])
        ages = torch.empty(index.shape[0], dtype=torch.int64)
        rows[from_ltm], ages[from_ltm] = ltm.rows[index[from_ltm]], ltm.ages_at(index[from_ltm])
        cached = index[~from_ltm] - n
        rows[~from_ltm] = self.cached_rows[layer, cached].to(rows.dtype)
        ages[~from_ltm] = self._cached_ages.value[layer, cached] + self._cache_age_offset
        return rows, ages

    # -- copies, casts, serialization ------------------------------------------------------------
    def clone(self) -> LongTermMemory:
        return LongTermMemory(
            layers=[layer.clone() for layer in self.layers],
            cached_rows=self.cached_rows.clone(),
            cached_keys=self.cached_keys.clone(),
            cached_ages=self.cached_ages.clone(),
            update_step=self.update_step,
        )

    def to(self, dtype: torch.dtype) -> LongTermMemory:
        """This LTM with rows and keys cast to `dtype` (still on the CPU; other tensors are shared)."""
        layers = [
            LayerLTM(layer.rows.to(dtype), layer.keys.to(dtype), layer.recall_frequencies, layer.ages)
            for layer in self.layers
        ]
        return LongTermMemory(
            layers, self.cached_rows.to(dtype), self.cached_keys.to(dtype), self.cached_ages, self.update_step
        )

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for i, layer in enumerate(self.layers):
            names = layer_keys(i)
            values = (layer.rows, layer.keys, layer.recall_frequencies, layer.ages)
            tensors |= {name: value.contiguous() for name, value in zip(names, values, strict=True)}
        cache = (self.cached_rows, self.cached_keys, self.cached_ages)
        return tensors | {name: value.contiguous() for name, value in zip(CACHE_KEYS, cache, strict=True)}

    def to_meta(self) -> dict[str, Any]:
        return {"update_step": self.update_step, "sizes": self.sizes(), "cached_rows": self.cache_size}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> LongTermMemory:
        cached_rows, cached_keys, cached_ages = (tensors[name].cpu() for name in CACHE_KEYS)
        layers = [LayerLTM(*(tensors[name].cpu() for name in layer_keys(i))) for i in range(cached_rows.shape[0])]
        return cls(layers, cached_rows, cached_keys, cached_ages, int(meta["update_step"]))

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The LTM in the authors' checkpoint layout: recall frequencies and ages as float32."""
        tensors = {}
        for i, layer in enumerate(self.layers):
            rows, keys, rf, ages = layer_keys(i)
            tensors |= {rows: layer.rows, keys: layer.keys}
            tensors |= {rf: layer.recall_frequencies.float(), ages: layer.ages.float()}
        return tensors

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, torch.Tensor], num_layers: int, dtype: torch.dtype) -> LongTermMemory:
        """The LTM of a checkpoint: rows and keys in `dtype`, recall frequencies as float64, ages
        truncated to int64 (the stored float ages hold integers); the cache starts empty."""
        layers = []
        for i in range(num_layers):
            rows, keys, rf, ages = (tensors[name].cpu() for name in layer_keys(i))
            layers.append(LayerLTM(rows.to(dtype), keys.to(dtype), rf.to(torch.float64), ages.to(torch.int64)))
        return cls.with_empty_cache(layers)
