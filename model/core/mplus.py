"""M+: MemoryLLM plus a CPU long-term memory of evicted rows, read back by a retrieval policy (docs/algorithm.md §6)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from ..memory.ltm import LongTermMemory
from ..memory.state import MemoryState, stm_rows
from .config import ModelConfig
from .memoryllm import EvictionPolicy, InjectResult, MemoryLLM, WritePolicy

SCORE_ROWS = 1 << 16  # candidates scored per batch on a device: a [65536, s] float32 copy of their keys


@dataclass
class Retrieval:
    """The LTM rows one layer placed after bos for a question."""

    rows: torch.Tensor  # [T, d] oldest first; CPU, or the model's device when scored there (Selectors)
    indices: torch.Tensor  # [T] CPU: their candidate indices (LTM rows 0..n-1, then cached rows n..), same order
    scores: torch.Tensor | None  # [n + C] CPU float32 score of every candidate; None on the tiled path
    num_ltm: int  # n: candidates that are LTM rows (the rest are cached dropped rows)
    row_ids: torch.Tensor  # [T] the rows' ids (see MemoryState), same order


RetrievalObserver = Callable[[int, MemoryState, Retrieval], None]  # (layer, state, what it read)


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


def device_scores(q: torch.Tensor, keys: torch.Tensor, entries: torch.Tensor, batch: int = SCORE_ROWS) -> torch.Tensor:
    """Scores [m] float32 = mean over queries of sigmoid(q . key) for the rows entries [m] of keys [E, s] (any
    dtype), with q [n_q, s] float32, all on one device; `batch` rows at a time, so the float32 copy of the keys
    holds at most [batch, s]."""
    scores = torch.empty(entries.numel(), device=q.device)
    for start in range(0, entries.numel(), batch):
        chosen = keys[entries[start : start + batch]].float()  # [b, s]
        scores[start : start + batch] = torch.sigmoid(q @ chosen.T).mean(0)
    return scores


def tiled_indices(n: int, T: int) -> torch.Tensor:
    """[T] the last T entries of 0..n-1 repeated: how a layer with fewer LTM rows than T fills its slot."""
    return torch.arange(n).repeat(-(-T // n))[-T:]


class RetrievalPolicy(Protocol):
    """What M+ keeps of the rows it evicts and how a question reads them back."""

    stm_rows_age: bool  # whether short-term rows age at each injection (else they keep their write-time ages)

    def attach(self, model: MPlus) -> None:
        """Add the policy's parameters to the model (before the weights are loaded)."""

    def empty_ltm(self, model: MPlus, memory: torch.Tensor) -> LongTermMemory:
        """An empty long-term memory beside the short-term rows memory [L, N, d]."""

    def rows_read(self, model: MPlus, state: MemoryState) -> int:
        """T: the LTM rows a question places in every layer's prefix."""

    def row_keys(self, model: MPlus, layer: int, rows: torch.Tensor) -> torch.Tensor: ...

    def retrieve(self, model: MPlus, layer: int, state: MemoryState, h: torch.Tensor) -> Retrieval: ...

    def admit(self, model: MPlus, state: MemoryState, result: InjectResult, dropped_ages: torch.Tensor) -> None:
        """Take an injection's evicted rows (result.dropped, their ages [L, e]) into the LTM."""


class Selectors:
    """The authors' M+ retrieval: co-trained selector projections score every LTM row (and the cache of
    recently dropped rows) by the mean sigmoid(query . key) over the question tokens; dropped rows wait in
    the cache with their keys and are merged into the LTM every `update_ltm_frequency` injections, where
    recall frequencies decay and rarely read rows are pruned (docs/algorithm.md §6.3-§6.5)."""

    stm_rows_age = False  # the released code never ages short-term rows (docs/algorithm.md §6.3)
    device_scoring: bool | None = None  # score on the model's device; None: when the model is not on the CPU

    def attach(self, model: MPlus) -> None:
        for block in model.model.layers:  # under self_attn, as in the authors' state dict
            block.self_attn.query_proj = selector(model.cfg)  # questions -> retrieval queries
            block.self_attn.key_proj = selector(model.cfg)  # memory rows -> retrieval keys
            block.self_attn.encoder_query_proj = selector(model.cfg)  # loaded, unused at inference (§6.6)

    def empty_ltm(self, model: MPlus, memory: torch.Tensor) -> LongTermMemory:
        s = model.cfg.selector_hidden_dim
        rows, keys = torch.empty(0, model.cfg.hidden_size, dtype=memory.dtype), torch.empty(0, s)
        empty = (rows, keys, torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.int64))
        return LongTermMemory.from_rows([empty] * model.cfg.num_layers, space=stm_rows(memory))

    def rows_read(self, model: MPlus, state: MemoryState) -> int:
        return model.cfg.ltm_rows_retrieved

    @torch.no_grad()
    def row_keys(self, model: MPlus, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """Retrieval keys [.., s] of memory rows [.., d]: key_proj(input_layernorm(rows))."""
        block = model.model.layers[layer]
        return block.self_attn.key_proj(block.input_layernorm(rows.to(model.layer_device(layer), model.dtype)))

    @torch.no_grad()
    def queries(self, model: MPlus, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Queries [n, s] of question states h [n, d] entering `layer`: query_proj(input_layernorm(h))."""
        block = model.model.layers[layer]
        return block.self_attn.query_proj(block.input_layernorm(h.to(model.layer_device(layer))))

    def scores_on_device(self, model: MPlus) -> bool:
        """Whether retrieval scores on the model's device (from the bank's device keys) rather than on the CPU."""
        return model.device.type != "cpu" if self.device_scoring is None else self.device_scoring

    @torch.no_grad()
    def retrieve(self, model: MPlus, layer: int, state: MemoryState, h: torch.Tensor) -> Retrieval:
        """The T LTM rows for a question whose states entering `layer` are h [n, d] (docs/algorithm.md §6.5).

        Fewer than T LTM rows: all of them, repeated (the cache is ignored). Otherwise the T candidates
        (LTM rows, then cached dropped rows) with the highest mean sigmoid(query . key), scored in float32:
        on the CPU over the bank's keys, or on the model's device over their mirror there (`scores_on_device`),
        only the T chosen indices coming back. Either way the rows are ordered oldest first; on the device path
        they are gathered into pinned memory and sent to the device without waiting.
        """
        ltm, on_device = state.ltm, self.scores_on_device(model)
        n, T = len(ltm.layers[layer]), model.retrieved_rows
        if n == 0:
            raise ValueError(f"layer {layer} has an empty long-term memory: M+ needs at least one LTM row")
        entries = ltm.candidate_entries(layer)  # [n + C]: LTM rows, then cached rows
        pinned = on_device and model.device.type == "cuda"
        if n < T:
            chosen, scores = tiled_indices(n, T), None
        elif on_device:
            q = self.queries(model, layer, h).float().to(model.device)  # [n_q, s]
            keys = ltm.bank.device_keys(model.device, self.device_key_dtype(model))  # [E, s]
            on = device_scores(q, keys, entries.to(model.device))  # [n + C]
            scores = torch.empty(on.shape, pin_memory=pinned)
            scores.copy_(on, non_blocking=pinned)
            chosen = on.topk(T).indices.sort().values.cpu()  # [T]; waits for the scores' copy too
        else:
            q = self.queries(model, layer, h).float().cpu()  # [n_q, s]
            scores = torch.empty(entries.numel())
            for positions, keys in ltm.bank.scan_keys(entries):  # keys [b, s], a batch at a time
                scores[positions] = torch.sigmoid(q @ keys.float().T).mean(0)
            chosen = scores.topk(T).indices.sort().values  # [T]
        picked = entries[chosen]  # [T] entry ids
        order = order_oldest_first(ltm.bank.ages(picked))
        row_ids = ltm.bank.row_ids(picked[order])
        rows = ltm.rows.gather(row_ids, out=torch.empty(T, ltm.rows.width, dtype=ltm.rows.dtype, pin_memory=pinned))
        if on_device:
            rows = rows.to(model.device, non_blocking=pinned)
        return Retrieval(rows=rows, indices=chosen[order], scores=scores, num_ltm=n, row_ids=row_ids)

    @staticmethod
    def device_key_dtype(model: MPlus) -> torch.dtype:
        """bfloat16 keys on the device; float32 for a float32 model, whose GPU replay of the parity fixtures
        keeps the CPU's tolerances."""
        return torch.float32 if model.dtype == torch.float32 else torch.bfloat16

    @torch.no_grad()
    def admit(self, model: MPlus, state: MemoryState, result: InjectResult, dropped_ages: torch.Tensor) -> None:
        """The LTM and the cache age by K, the dropped rows enter the cache with their ages and keys, and
        every `update_ltm_frequency`-th injection merges the cache into the LTM (docs/algorithm.md §6.3)."""
        cfg, ltm, K = model.cfg, state.ltm, result.delta.shape[1]
        ltm.age(K)
        keys = torch.stack(
            [self.row_keys(model, layer, rows).cpu() for layer, rows in enumerate(result.dropped)]
        )  # [L, K, s]
        ltm.cache_dropped(result.dropped_ids, keys, dropped_ages)
        ltm.update_step += K
        if ltm.update_step >= cfg.update_ltm_frequency * K:
            ltm.merge(cfg.initial_rf_when_moving_stm_to_ltm, cfg.decay_frequency, min_survivors=model.retrieved_rows)


class MPlus(MemoryLLM):
    """MemoryLLM whose question prefix is [bos, T retrieved LTM rows, STM rows] and whose injections move
    evicted STM rows into a long-term memory, as its retrieval policy keeps and reads them (the authors'
    `Selectors` by default, the training-free demo's similarity scoring in model.training_free)."""

    def __init__(
        self,
        cfg: ModelConfig,
        write: WritePolicy | None = None,
        eviction: EvictionPolicy | None = None,
        retrieval: RetrievalPolicy | None = None,
    ):
        super().__init__(cfg, write, eviction)
        self.retrieval = retrieval or Selectors()
        self.retrieval.attach(self)
        self.retrieval_observers: list[RetrievalObserver] = []

    @property
    def retrieved_rows(self) -> int:
        """T: the most LTM rows placed in every layer's question prefix."""
        return self.cfg.ltm_rows_retrieved

    def row_keys(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """Retrieval keys of memory rows [.., d] at `layer`, as the retrieval policy makes them."""
        return self.retrieval.row_keys(self, layer, rows)

    def empty_state(self) -> MemoryState:
        state = super().empty_state()
        state.memory_ages = torch.zeros(self.cfg.num_layers, 0, dtype=torch.int64)
        state.ltm = self.retrieval.empty_ltm(self, state.memory)
        return state

    # -- reading -------------------------------------------------------------------------------
    def retrieve(self, layer: int, state: MemoryState, h: torch.Tensor) -> Retrieval:
        """The LTM rows for a question whose states entering `layer` are h [n, d], oldest first; every
        observer sees them."""
        found = self.retrieval.retrieve(self, layer, state, h)
        for observe in self.retrieval_observers:
            observe(layer, state, found)
        return found

    @contextmanager
    def observing_retrievals(self, observe: RetrievalObserver) -> Iterator[None]:
        """observe(layer, state, retrieval) after every retrieval inside the block (blocks nest: each sees all)."""
        self.retrieval_observers.append(observe)
        try:
            yield
        finally:
            self.retrieval_observers.remove(observe)

    @contextmanager
    def recording_retrievals(self) -> Iterator[list[tuple[int, Retrieval]]]:
        """Collect (layer, Retrieval) for every retrieval made inside the block (for inspection)."""
        log: list[tuple[int, Retrieval]] = []
        with self.observing_retrievals(lambda layer, state, found: log.append((layer, found))):
            yield log

    def prefix_length(self, state: MemoryState) -> int:
        if not state.initialized:
            return 0
        return super().prefix_length(state) + self.retrieval.rows_read(self, state)

    def ltm_prefix_rows(self, layer: int, state: MemoryState, x: torch.Tensor) -> torch.Tensor | None:
        """The retrieved LTM rows [T, d] for the question x [1, n, d], oldest first (None: it reads none)."""
        if x.shape[0] != 1:
            raise ValueError(
                f"M+ retrieves for one question at a time: got a batch of {x.shape[0]}, ask them one by one"
            )
        if self.retrieval.rows_read(self, state) == 0:
            return None
        return self.retrieve(layer, state, x[0]).rows

    # -- writing -------------------------------------------------------------------------------
    @torch.no_grad()
    def update_memory(
        self,
        state: MemoryState,
        delta: torch.Tensor,
        perms: torch.Tensor | None = None,
        row_ids: torch.Tensor | None = None,
    ) -> InjectResult:
        """The MemoryLLM update, then the M+ bookkeeping: the new rows get ages k-1..0 (the first is the
        oldest), the evicted rows keep theirs, and the retrieval policy takes them into the LTM."""
        if state.ltm is None or state.memory_ages is None:
            raise ValueError("an M+ model needs an M+ memory state (with memory_ages and ltm): use model.new_state()")
        L, k = delta.shape[:2]
        grown = state.memory_ages + (k if self.retrieval.stm_rows_age else 0)
        result = super().update_memory(state, delta, perms, row_ids)
        hold_rows(state.ltm, result)
        memory_ages, dropped_ages = result.carry(grown, torch.arange(k - 1, -1, -1).expand(L, k))
        state.memory_ages = memory_ages.contiguous()
        self.retrieval.admit(self, state, result, dropped_ages)
        return result


def hold_rows(ltm: LongTermMemory, result: InjectResult) -> None:
    """Keep an injection's delta rows in the LTM's row space (unless they were given under ids it holds):
    they join the LTM when they are dropped. New rows have consecutive ids, layer by layer."""
    first, last = int(result.row_ids.min()), int(result.row_ids.max())
    if not ltm.rows.holds(first, last - first + 1):
        ltm.rows.add(first, result.delta.reshape(result.row_ids.numel(), -1))
