"""MemoryLLM, M+ and the training-free demo as memory systems: the model's own memory state."""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.generate import DecodeSettings
from ..core.memoryllm import MemoryLLM
from ..core.mplus import MPlus
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
        return timed_answer(self.model, self.state, question_ids, settings, self.model.prefix_length(self.state))

    def save(self, directory: Path) -> None:
        self.state.save(directory)

    def load(self, directory: Path) -> None:
        self.state = MemoryState.load(directory, self.model.device)
