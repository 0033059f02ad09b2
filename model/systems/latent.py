"""MemoryLLM, M+ and the training-free demo as memory systems: the model's own memory state."""

from __future__ import annotations

from collections import Counter
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch

from ..core.generate import DecodeSettings
from ..core.memoryllm import MemoryLLM
from ..core.mplus import MPlus
from ..memory.provenance import retrievals
from ..memory.state import MemoryState
from ..zoo.load import storage_dtype
from . import Answer, Capabilities
from .timing import timed_answer


class LatentMemory:
    """The model's memory: inject writes rows, a question reads the memory prefix (M+: and what it retrieves)."""

    name = "memory"

    def __init__(self, model: MemoryLLM):
        self.model, self.params = model, {}
        self.capabilities = Capabilities(True, True, False, provenance=isinstance(model, MPlus))
        self.state = model.new_state(0, storage_dtype(model))

    def reset(self, seed: int = 0) -> None:
        self.state = self.model.new_state(seed, storage_dtype(self.model))

    def inject(self, ids: torch.Tensor) -> None:
        self.model.inject(self.state, ids.reshape(-1))

    def ask(self, question_ids: list[int], settings: DecodeSettings) -> Answer:
        """The answer, and which injections wrote the rows it read (the short-term memory and, M+, what the
        question retrieved)."""
        prefix = self.model.prefix_length(self.state)
        with retrievals(self.model) if isinstance(self.model, MPlus) else nullcontext({}) as retrieved:
            answer = timed_answer(self.model, self.state, question_ids, settings, prefix)
        return replace(answer, provenance=rows_read(self.state, retrieved))

    def save(self, directory: Path) -> None:
        self.state.save(directory)

    def load(self, directory: Path) -> None:
        self.state = MemoryState.load(directory, self.model.device)


def rows_read(state: MemoryState, retrieved: dict[int, torch.Tensor]) -> dict[int, float]:
    """{injection: rows of it a question read, the mean over layers} (0: the model's own rows), from the
    short-term rows of every layer and the long-term rows each layer retrieved."""
    counts: Counter[int] = Counter()
    for layer, ids in enumerate(state.memory_ids):  # [N] row ids per layer
        found = torch.cat([ids, retrieved.get(layer, ids[:0])])
        counts.update(state.origins.injections(found).tolist())
    return {injection: n / state.num_layers for injection, n in sorted(counts.items())}
