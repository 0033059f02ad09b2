"""M+ long-term memory: per-layer rows with retrieval keys, recall frequencies and ages, plus the cache
of rows dropped from short-term memory since the last merge (spec §6.1, §6.3-6.4).

All of it lives on the CPU and grows with use; only the rows retrieved for a question move to the
model's device. Tensor names follow the authors' checkpoint keys (`ltm.{l}`, `ltm_keys.{l}`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

PRUNE_AT_OR_BELOW = 0.01  # rows whose recall frequency decays to this are pruned at a merge
CACHE_KEYS = ("cached_dropped_memories", "cached_dropped_keys", "cached_dropped_memory_ages")


def layer_keys(layer: int) -> tuple[str, str, str, str]:
    """The names of layer `layer`'s rows, keys, recall frequencies and ages (authors' layout)."""
    return f"ltm.{layer}", f"ltm_keys.{layer}", f"ltm_recall_frequencies.{layer}", f"ltm_ages.{layer}"


@dataclass
class LayerLTM:
    """One layer's long-term memory; the four tensors share their first dimension n."""

    rows: torch.Tensor  # [n, d] hidden-state rows, oldest merges first
    keys: torch.Tensor  # [n, s] key_proj(input_layernorm(row)), computed when the row left the STM
    recall_frequencies: torch.Tensor  # [n] float64, lowered by decay_frequency at every merge
    ages: torch.Tensor  # [n] int64, tokens written since the row was written to the STM

    def __len__(self) -> int:
        return self.rows.shape[0]

    def select(self, mask: torch.Tensor) -> LayerLTM:
        """The rows where mask [n] is true, in their order."""
        return LayerLTM(self.rows[mask], self.keys[mask], self.recall_frequencies[mask], self.ages[mask])

    def clone(self) -> LayerLTM:
        return LayerLTM(self.rows.clone(), self.keys.clone(), self.recall_frequencies.clone(), self.ages.clone())


@dataclass
class LongTermMemory:
    """Every layer's LTM plus the dropped-row cache that the next merge moves into it."""

    layers: list[LayerLTM]
    cached_rows: torch.Tensor  # [L, C, d] rows dropped from the STM since the last merge
    cached_keys: torch.Tensor  # [L, C, s]
    cached_ages: torch.Tensor  # [L, C] int64
    update_step: int = 0  # tokens written since the last merge (K per injection)

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
        return self.cached_rows.shape[1]

    def sizes(self) -> list[int]:
        return [len(layer) for layer in self.layers]

    # -- the bookkeeping of one injection (spec §6.3 (b)-(d)) --------------------------------------
    def age(self, tokens: int) -> None:
        """Every LTM row and every row already cached gets `tokens` older."""
        for layer in self.layers:
            layer.ages += tokens
        self.cached_ages += tokens

    def cache_dropped(self, rows: torch.Tensor, keys: torch.Tensor, ages: torch.Tensor) -> None:
        """Append one injection's dropped rows [L, k, d], their keys [L, k, s] and ages [L, k]."""
        self.cached_rows = torch.cat([self.cached_rows, rows.to(self.cached_rows.dtype).cpu()], dim=1)
        self.cached_keys = torch.cat([self.cached_keys, keys.to(self.cached_keys.dtype).cpu()], dim=1)
        self.cached_ages = torch.cat([self.cached_ages, ages.to(torch.int64).cpu()], dim=1)

    def merge(self, initial_rf: float, decay: float, min_survivors: int) -> None:
        """Move the cache into the LTM with recall frequency `initial_rf`, decay every row by `decay`,
        and prune rows at or below 0.01 unless `min_survivors` or fewer rows would remain, in which case
        the decay is undone and nothing is pruned (spec §6.4). Empties the cache."""
        for i, layer in enumerate(self.layers):
            C = self.cache_size
            rf = torch.cat([layer.recall_frequencies, torch.full((C,), initial_rf, dtype=torch.float64)])
            merged = LayerLTM(
                rows=torch.cat([layer.rows, self.cached_rows[i].to(layer.rows.dtype)]),  # [n + C, d]
                keys=torch.cat([layer.keys, self.cached_keys[i].to(layer.keys.dtype)]),  # [n + C, s]
                recall_frequencies=rf - decay,
                ages=torch.cat([layer.ages, self.cached_ages[i]]),
            )
            survivors = merged.recall_frequencies > PRUNE_AT_OR_BELOW
            if int(survivors.sum()) > min_survivors:
                merged = merged.select(survivors)
            else:
                merged.recall_frequencies += decay  # as the authors: subtract, then add back
            self.layers[i] = merged
        self.cached_rows = self.cached_rows[:, :0]
        self.cached_keys = self.cached_keys[:, :0]
        self.cached_ages = self.cached_ages[:, :0]
        self.update_step = 0

    # -- retrieval support -----------------------------------------------------------------------
    def candidates(self, layer: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows [T, d], ages [T]) of candidates `index` [T], numbered LTM rows first, then cached rows."""
        ltm = self.layers[layer]
        n = len(ltm)
        from_ltm = index < n
        rows = ltm.rows.new_empty(index.shape[0], ltm.rows.shape[1])
        ages = torch.empty(index.shape[0], dtype=torch.int64)
        rows[from_ltm], ages[from_ltm] = ltm.rows[index[from_ltm]], ltm.ages[index[from_ltm]]
        cached = index[~from_ltm] - n
        rows[~from_ltm] = self.cached_rows[layer, cached].to(rows.dtype)
        ages[~from_ltm] = self.cached_ages[layer, cached]
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
