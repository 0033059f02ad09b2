"""The papers' baselines over the model without memory: the injected text kept as token ids, and some of
it placed in the prompt before the question.

- `truncate`: the last `tokens` injected tokens (default: as many as the window holds beside the question
  and its answer), the truncated 8k / 16k windows of the M+ paper;
- `bm25`: the injected text cut into parts of `part` tokens, the `k` parts that BM25 (bm25s, English stop
  words removed) scores best for the question placed before it, best first. Defaults: the MemoryLLM paper's
  512 x 8; the M+ paper's 4,096 x 4 is `bm25:part=4096,k=4`; the authors' code asked LangChain's
  BM25Retriever for 8 parts and got its default 4, which is `bm25:part=512,k=4`.
Parts that do not fit the window are dropped from the last; the parts kept are whole.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..core.generate import DecodeSettings
from ..core.memoryllm import MemoryLLM
from ..memory.state import MemoryState
from ..text.tokenizer import decode
from . import Answer, Capabilities
from .timing import timed_answer

IDS_FILE = "injected.safetensors"


def no_memory(model: MemoryLLM) -> MemoryState:
    """A state with no memory rows: a question then reads no prefix (the plain base model)."""
    cfg = model.cfg
    memory = torch.empty(cfg.num_layers, 0, cfg.hidden_size, dtype=model.dtype, device=model.device)
    return MemoryState(memory=memory, initialized=False)


def positive(name: str, value: int | str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(f"{name} must be a positive number of tokens or parts, got {value!r}")
    return number


class InPrompt:
    """What both baselines share: the injected ids in order, and an answer from a prompt of some of them."""

    name = ""
    capabilities = Capabilities(persistent=True, incremental=True, question_aware_write=False, provenance=False)

    def __init__(self, model: MemoryLLM):
        if model.cfg.context_window is None:
            raise ValueError("the model's config has no max_position_embeddings: a baseline needs its window")
        self.model, self.chunks = model, []

    def reset(self, seed: int = 0) -> None:
        self.chunks = []

    def inject(self, ids: torch.Tensor) -> None:
        self.chunks.append(ids.reshape(-1).cpu())

    def injected(self) -> torch.Tensor:
        """[n] every injected token id in order."""
        return torch.cat(self.chunks) if self.chunks else torch.empty(0, dtype=torch.long)

    def context(self, question_ids: list[int], budget: int) -> list[int]:
        raise NotImplementedError

    def room(self, question_ids: list[int], settings: DecodeSettings) -> int:
        """The tokens of injected text the window holds beside the question and its answer."""
        room = self.model.cfg.context_window - len(question_ids) - settings.max_new_tokens
        if room < 0:
            raise ValueError("the question does not fit the model's context window")
        return room

    def ask(self, question_ids: list[int], settings: DecodeSettings) -> Answer:
        context = self.context(question_ids, self.room(question_ids, settings))
        return timed_answer(self.model, no_memory(self.model), context + question_ids, settings, len(context))

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        save_file({"ids": self.injected()}, directory / IDS_FILE)

    def load(self, directory: Path) -> None:
        self.chunks = [load_file(directory / IDS_FILE)["ids"]]


class Truncate(InPrompt):
    """The last `tokens` injected tokens before the question."""

    name = "truncate"

    def __init__(self, model: MemoryLLM, tokens: int | str | None = None):
        super().__init__(model)
        self.tokens = positive("tokens", tokens) if tokens is not None else model.cfg.context_window
        self.params = {"tokens": self.tokens}

    def context(self, question_ids: list[int], budget: int) -> list[int]:
        keep, injected = min(self.tokens, budget), self.injected()
        return injected[len(injected) - keep :].tolist() if keep else []


class BM25(InPrompt):
    """The `k` parts of `part` tokens that BM25 scores best for the question, best first."""

    name = "bm25"

    def __init__(self, model: MemoryLLM, part: int | str = 512, k: int | str = 8):
        super().__init__(model)
        if model.tokenizer is None:
            raise ValueError("bm25 scores text: the model needs a tokenizer")
        self.part, self.k = positive("part", part), positive("k", k)
        self.params = {"part": self.part, "k": self.k}

    def parts(self) -> list[torch.Tensor]:
        return [part for part in torch.split(self.injected(), self.part) if len(part)]  # none before an inject

    def best_parts(self, question_ids: list[int], parts: list[torch.Tensor]) -> list[int]:
        """Indices of the min(k, n) best parts for the question, best first."""
        import bm25s

        texts = [decode(self.model.tokenizer, part.tolist()) for part in parts]
        retriever = bm25s.BM25()
        retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
        query = bm25s.tokenize([decode(self.model.tokenizer, question_ids)], stopwords="en", show_progress=False)
        found, _ = retriever.retrieve(query, k=min(self.k, len(parts)), show_progress=False)  # [1, k]
        return found[0].tolist()

    def context(self, question_ids: list[int], budget: int) -> list[int]:
        parts = self.parts()
        if not parts:
            return []
        context: list[int] = []
        for index in self.best_parts(question_ids, parts):
            if len(context) + len(parts[index]) > budget:
                break
            context += parts[index].tolist()
        return context
