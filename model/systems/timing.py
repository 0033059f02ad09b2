"""One timed answer: the question's time to its first new token, and to its last."""

from __future__ import annotations

import time

import torch

from ..core.generate import DecodeSettings, generate
from ..core.memoryllm import MemoryLLM
from ..memory.state import MemoryState
from ..text.tokenizer import decode
from . import Answer


def timed_answer(
    model: MemoryLLM,
    state: MemoryState,
    prompt: list[int],
    settings: DecodeSettings,
    context_tokens: int,
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> Answer:
    """`prompt` answered from `state` (or a KV prefix, see `generate`; greedy unless `settings` sample), timed."""
    start, first = time.perf_counter(), []

    def on_token(_: int) -> None:
        if not first:
            first.append(time.perf_counter() - start)

    out = generate(model, state, prompt, settings, on_token=on_token, prefix_kv=prefix_kv)
    seconds = time.perf_counter() - start
    text = decode(model.tokenizer, out.token_ids) if model.tokenizer is not None else ""
    return Answer(text, out.token_ids, context_tokens, first[0] if first else seconds, seconds)
