"""M+: MemoryLLM plus a CPU long-term memory of evicted rows, read back by a retrieval policy (docs/algorithm.md §6)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch

from ..memory.ltm import LongTermMemory
from ..memory.state import MemoryState
from .config import ModelConfig
from .memoryllm import AnswerBias, EvictionPolicy, InjectResult, MemoryLLM, WritePolicy


@dataclass
class Retrieval:
    """The LTM rows one layer placed after bos for a question."""

    rows: torch.Tensor  # [T, d] oldest first; CPU, or the model's device when scored there (Selectors)
    indices: torch.Tensor  # [T] CPU: their candidate indices (LTM rows 0..n-1, then cached rows n..), same order
    scores: torch.Tensor | None  # [n + C] CPU float32 score of every candidate; None on the tiled path
    num_ltm: int  # n: candidates that are LTM rows (the rest are cached dropped rows)
    row_ids: torch.Tensor  # [T] the rows' ids (see MemoryState), same order


RetrievalObserver = Callable[[int, MemoryState, Retrieval], None]  # (layer, state, what it read)


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

    def answer_bias(self, model: MPlus, state: MemoryState) -> AnswerBias | None:
        """How what the last question read shifts its answer's logits (None: not at all)."""

    def answer_reading(self) -> str | None:
        """The answer bias in words, for a run's record (None: there is none)."""


class MPlus(MemoryLLM):
    """MemoryLLM whose question prefix is [bos, T retrieved LTM rows, STM rows] and whose injections move
    evicted STM rows into a long-term memory, as its retrieval policy keeps and reads them (the authors'
    `Selectors` in model.policies.authors, the demo's lexical blocks in model.policies.training_free)."""

    def __init__(
        self,
        cfg: ModelConfig,
        write: WritePolicy,
        eviction: EvictionPolicy,
        retrieval: RetrievalPolicy,
    ):
        super().__init__(cfg, write, eviction)
        self.retrieval = retrieval
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

    def answer_bias(self, state: MemoryState) -> AnswerBias | None:
        return self.retrieval.answer_bias(self, state) if state.initialized else None

    def answer_reading(self) -> str | None:
        return self.retrieval.answer_reading()

    # -- writing -------------------------------------------------------------------------------
    def check_updatable(self, state: MemoryState) -> None:
        if state.ltm is None or state.memory_ages is None:
            raise ValueError("an M+ model needs an M+ memory state (with memory_ages and ltm): use model.new_state()")

    def keep_update(self, state: MemoryState, result: InjectResult) -> None:
        """The M+ bookkeeping of an update: the new rows get ages k-1..0 (the first is the oldest), the evicted
        rows keep theirs, and the retrieval policy takes them into the LTM."""
        L, k = result.delta.shape[:2]
        grown = state.memory_ages + (k if self.retrieval.stm_rows_age else 0)
        hold_rows(state.ltm, result)
        memory_ages, dropped_ages = result.carry(grown, torch.arange(k - 1, -1, -1).expand(L, k))
        state.memory_ages = memory_ages.contiguous()
        self.retrieval.admit(self, state, result, dropped_ages)


def hold_rows(ltm: LongTermMemory, result: InjectResult) -> None:
    """Keep an injection's delta rows in the LTM's row space (unless they were given under ids it holds):
    they join the LTM when they are dropped. New rows have consecutive ids, layer by layer."""
    first, last = int(result.row_ids.min()), int(result.row_ids.max())
    if not ltm.rows.holds(first, last - first + 1):
        ltm.rows.add(first, result.delta.reshape(result.row_ids.numel(), -1))
