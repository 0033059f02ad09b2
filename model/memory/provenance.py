"""Where every memory row came from: the injection that wrote it, the layer, and its place in that injection.

Every row a state writes gets the next row id (see MemoryState), and an injection writes its rows layer by
layer in runs of consecutive ids. `Origins` keeps one record per run, (first id, rows, injection, layer,
first position), so provenance costs O(injections x layers), not O(rows), and survives every operation
that moves rows by id: drops, moves to the long-term memory, merges, pruning, forks. Position j of an
injection's rows in a layer is its j-th new row: for the training-free demo, the j-th token of the chunk.
Ids no run holds (the model's own initial rows) have injection 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

FIELDS = 5  # first id, rows, injection, layer, first position


@dataclass
class Origins:
    runs: torch.Tensor  # [R, FIELDS] int64, in the order they were recorded

    @classmethod
    def empty(cls) -> Origins:
        return cls(torch.empty(0, FIELDS, dtype=torch.int64))

    def __len__(self) -> int:
        return self.runs.shape[0]

    def clone(self) -> Origins:
        return Origins(self.runs.clone())

    def record(self, row_ids: torch.Tensor, injection: int) -> None:
        """Rows row_ids [L, k] (layer by layer, position j = column j) were written by `injection`."""
        L, k = row_ids.shape
        ids = row_ids.cpu()
        if k and bool((ids.diff(dim=1) == 1).all()):  # one run per layer (always, for model.inject)
            runs = torch.stack([ids[:, 0], torch.full((L,), k), torch.full((L,), injection), torch.arange(L)], 1)
            runs = torch.cat([runs, torch.zeros(L, 1, dtype=torch.int64)], 1)  # [L, FIELDS]
        else:  # a run per row
            layer, position = torch.meshgrid(torch.arange(L), torch.arange(k), indexing="ij")
            columns = [ids, torch.ones_like(ids), torch.full_like(ids, injection), layer, position]
            runs = torch.stack([c.reshape(-1) for c in columns], 1)
        self.runs = torch.cat([self.runs, runs.to(torch.int64)])

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """[m, 3] (injection, layer, position) of row ids [m]; (0, -1, -1) for ids no run holds."""
        ids = ids.reshape(-1).to(torch.int64).cpu()
        found = torch.tensor([0, -1, -1]).repeat(ids.numel(), 1)
        if not len(self) or not ids.numel():
            return found
        order = self.runs[:, 0].argsort()
        runs = self.runs[order]  # [R, FIELDS] by first id
        at = (
            torch.searchsorted(runs[:, 0].contiguous(), ids, right=True) - 1
        )  # [m] the run starting at or before each id
        run = runs[at.clamp_min(0)]  # [m, FIELDS]
        inside = (at >= 0) & (ids < run[:, 0] + run[:, 1])
        found[inside] = torch.stack([run[:, 2], run[:, 3], run[:, 4] + ids - run[:, 0]], 1)[inside]
        return found

    def injections(self, ids: torch.Tensor) -> torch.Tensor:
        """[m] the injection that wrote each row id (0: the model's own rows)."""
        return self.lookup(ids)[:, 0]

    @classmethod
    def of_rows(cls, ids: torch.Tensor, origins: torch.Tensor) -> Origins:
        """Origins for row ids [m] whose (injection, layer, position) are origins [m, 3] (e.g. rows renumbered
        on load): consecutive ids of one injection and layer with consecutive positions share a run."""
        ids, origins = ids.reshape(-1).to(torch.int64), origins.to(torch.int64)
        keep = origins[:, 0] > 0
        ids, origins = ids[keep], origins[keep]
        order = ids.argsort()
        ids, origins = ids[order], origins[order]
        if not ids.numel():
            return cls.empty()
        consecutive = (ids.diff() == 1) & (origins[:, 2].diff() == 1)  # [m - 1]
        same = consecutive & (origins[1:, :2] == origins[:-1, :2]).all(1)
        starts = torch.cat([torch.tensor([True]), ~same])  # [m]
        first = torch.nonzero(starts)[:, 0]  # [R]
        counts = torch.diff(first, append=torch.tensor([ids.numel()]))
        runs = torch.stack([ids[first], counts, origins[first, 0], origins[first, 1], origins[first, 2]], 1)
        return cls(runs)


@contextlib.contextmanager
def retrievals_by_state(model) -> Iterator[dict[int, dict[int, torch.Tensor]]]:
    """{id(state): {layer: row ids [T]}} of what each layer's M+ retrieval reads inside the block, for every
    state a question reads (the latest question's of each: a batch reads several states at once)."""
    read: dict[int, dict[int, torch.Tensor]] = {}

    def record(layer, state, found) -> None:
        read.setdefault(id(state), {})[layer] = found.row_ids

    with model.observing_retrievals(record):
        yield read


@contextlib.contextmanager
def retrievals(model) -> Iterator[dict[int, torch.Tensor]]:
    """{layer: row ids [T]} of what each layer's M+ retrieval reads inside the block (the latest question's),
    filled when the block ends."""
    read: dict[int, torch.Tensor] = {}
    with retrievals_by_state(model) as by_state:
        yield read
    for layers in by_state.values():
        read.update(layers)


def share(origins: Origins, ids: torch.Tensor, wanted: torch.Tensor) -> float:
    """The fraction of row ids [m] that injections `wanted` [w] wrote (0.0 for no ids)."""
    if not ids.numel():
        return 0.0
    return float(torch.isin(origins.injections(ids), wanted).float().mean())


def survival(state, injections: torch.Tensor) -> dict[str, float]:
    """How much of what `injections` [w] wrote the state still holds: the fraction of their rows in the
    short-term memory and (M+) in the long-term memory, each the mean over layers."""
    runs = state.origins.runs
    mine = torch.isin(runs[:, 2], injections)
    written = torch.zeros(state.num_layers, dtype=torch.int64).index_add_(0, runs[mine, 3], runs[mine, 1])  # [L]
    written = written.clamp_min(1).double()

    def held(ids_per_layer) -> float:
        counts = [int(torch.isin(state.origins.injections(ids), injections).sum()) for ids in ids_per_layer]
        return float((torch.tensor(counts, dtype=torch.float64) / written).mean())

    found = {"stm": held(state.memory_ids)}
    if state.ltm is not None:
        found["ltm"] = held([layer.row_ids for layer in state.ltm.layers])
    return found
