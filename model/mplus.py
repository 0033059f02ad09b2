"""M+: MemoryLLM plus a CPU long-term memory of dropped rows, read back through co-trained retrievers (spec §6)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .config import ModelConfig
from .ltm import LongTermMemory
from .memory import MemoryState, drop_and_append
from .memoryllm import InjectResult, MemoryLLM


@dataclass
class Retrieval:
    """The LTM rows one layer placed after bos for a question."""

    rows: torch.Tensor  # [T, d] CPU, oldest first
    indices: torch.Tensor  # [T] their candidate indices (LTM rows 0..n-1, then cached rows n..), same order
    scores: torch.Tensor | None  # [n + C] float32 score of every candidate; None on the tiled path
    num_ltm: int  # n: candidates that are LTM rows (the rest are cached dropped rows)
    row_ids: torch.Tensor  # [T] the rows' ids (see MemoryState), same order


def selector(cfg: ModelConfig) -> nn.Module:
    """A retriever projection d -> s: Linear, SiLU, Linear (2 layers) or one Linear, no biases."""
    d, s = cfg.hidden_size, cfg.selector_hidden_dim
    if cfg.num_selector_layers == 1:
        return nn.Linear(d, s, bias=False)
    if cfg.num_selector_layers == 2:
        return nn.Sequential(nn.Linear(d, 2 * s, bias=False), nn.SiLU(), nn.Linear(2 * s, s, bias=False))
    raise ValueError(f"num_selector_layers must be 1 or 2, got {cfg.num_selector_layers}")


def order_oldest_first(ages: torch.Tensor) -> torch.Tensor:
    """Permutation of ages [T] from oldest to newest; among equal ages the later entry comes first
    (a stable ascending sort, reversed)."""
    return ages.argsort(stable=True).flip(0)


class MPlus(MemoryLLM):
    """MemoryLLM whose question prefix is [bos, T retrieved LTM rows, STM rows] and whose injections
    move dropped STM rows into a long-term memory (merged every `update_ltm_frequency` injections)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        for block in self.model.layers:  # under self_attn, as in the authors' state dict
            block.self_attn.query_proj = selector(cfg)  # questions -> retrieval queries
            block.self_attn.key_proj = selector(cfg)  # memory rows -> retrieval keys
            block.self_attn.encoder_query_proj = selector(cfg)  # loaded but unused at inference (spec §6.6)
        self._retrieval_log: list[tuple[int, Retrieval]] | None = None

    @property
    def retrieved_rows(self) -> int:
        """T: LTM rows placed in every layer's question prefix."""
        return self.cfg.ltm_rows_retrieved

    @torch.no_grad()
    def row_keys(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """Retrieval keys [.., s] of memory rows [.., d]: key_proj(input_layernorm(rows))."""
        block = self.model.layers[layer]
        return block.self_attn.key_proj(block.input_layernorm(rows.to(self.device, self.dtype)))

    @torch.no_grad()
    def retrieval_queries(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Queries [n, s] of question states h [n, d] entering `layer`: query_proj(input_layernorm(h))."""
        block = self.model.layers[layer]
        return block.self_attn.query_proj(block.input_layernorm(h))

    # -- reading -------------------------------------------------------------------------------
    @torch.no_grad()
    def retrieve(self, layer: int, state: MemoryState, h: torch.Tensor) -> Retrieval:
        """The T LTM rows for a question whose states entering `layer` are h [n, d] (spec §6.5).

        Fewer than T LTM rows: all of them, repeated (the cache is ignored). Otherwise the T candidates
        (LTM rows, then cached dropped rows) with the highest mean sigmoid(query . key), scored in
        float32 on the CPU. Either way the rows are ordered oldest first.
        """
        ltm = state.ltm
        n, T = len(ltm.layers[layer]), self.retrieved_rows
        if n == 0:
            raise ValueError(f"layer {layer} has an empty long-term memory: M+ needs at least one LTM row")
        if n < T:
            chosen = torch.arange(n).repeat(-(-T // n))[-T:]  # [T]
            scores = None
        else:
            q = self.retrieval_queries(layer, h).float().cpu()  # [n_q, s]
            entries = ltm.candidate_entries(layer)  # [n + C]: LTM rows, then cached rows
            scores = torch.empty(entries.numel())
            for positions, keys in ltm.bank.scan_keys(entries):  # keys [b, s], a batch at a time
                scores[positions] = torch.sigmoid(q @ keys.float().T).mean(0)
            chosen = scores.topk(T).indices.sort().values  # [T]
        rows, ages = ltm.candidates(layer, chosen)
        order = order_oldest_first(ages)
        row_ids = ltm.bank.row_ids(ltm.candidate_entries(layer)[chosen[order]])
        return Retrieval(rows=rows[order], indices=chosen[order], scores=scores, num_ltm=n, row_ids=row_ids)

    @contextmanager
    def recording_retrievals(self) -> Iterator[list[tuple[int, Retrieval]]]:
        """Collect (layer, Retrieval) for every retrieval made inside the block (for inspection)."""
        self._retrieval_log = log = []
        try:
            yield log
        finally:
            self._retrieval_log = None

    def prefix_length(self, state: MemoryState) -> int:
        return self.n_bos + self.retrieved_rows + state.rows_per_layer

    def ltm_prefix_rows(self, layer: int, state: MemoryState, x: torch.Tensor) -> torch.Tensor:
        """The T retrieved LTM rows [T, d] for batch element 0 of x [B, n, d], oldest first."""
        retrieval = self.retrieve(layer, state, x[0])
        if self._retrieval_log is not None:
            self._retrieval_log.append((layer, retrieval))
        return retrieval.rows

    # -- writing -------------------------------------------------------------------------------
    @torch.no_grad()
    def update_memory(
        self,
        state: MemoryState,
        delta: torch.Tensor,
        perms: torch.Tensor | None = None,
        row_ids: torch.Tensor | None = None,
    ) -> InjectResult:
        """The MemoryLLM drop-and-append, then the M+ bookkeeping (spec §6.3): the new rows get STM ages
        K-1..0, the LTM and the cache age by K, the dropped rows enter the cache with their ages and keys,
        and every `update_ltm_frequency`-th injection merges the cache into the LTM."""
        if state.ltm is None or state.memory_ages is None:
            raise ValueError("an M+ model needs an M+ memory state (with memory_ages and ltm): use model.new_state()")
        cfg, ltm = self.cfg, state.ltm
        K, L = cfg.num_tokens, cfg.num_layers
        result = super().update_memory(state, delta, perms, row_ids)
        hold_rows(ltm, result)
        new_ages = torch.arange(K - 1, -1, -1).expand(L, K)  # [L, K] the first delta row is the oldest
        dropped_ages = drop_and_append(state.memory_ages[..., None], new_ages[..., None], result.perms)[..., 0]
        ltm.age(K)
        keys = torch.stack([self.row_keys(layer, rows) for layer, rows in enumerate(result.dropped)])  # [L, K, s]
        ltm.cache_dropped(result.dropped_ids, keys, dropped_ages)
        ltm.update_step += K
        if ltm.update_step >= cfg.update_ltm_frequency * K:
            ltm.merge(cfg.initial_rf_when_moving_stm_to_ltm, cfg.decay_frequency, min_survivors=self.retrieved_rows)
        return result


def hold_rows(ltm: LongTermMemory, result: InjectResult) -> None:
    """Keep an injection's delta rows in the LTM's row space (unless they were given under ids it holds):
    they join the LTM when they are dropped. New rows have consecutive ids, layer by layer."""
    first, last = int(result.row_ids.min()), int(result.row_ids.max())
    if not ltm.rows.holds(first, last - first + 1):
        ltm.rows.add(first, result.delta.reshape(result.row_ids.numel(), -1))
