"""Decoding against a memory state: greedy by default, seeded sampling on request, KV cache, streaming."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from .memory import MemoryState
from .memoryllm import MemoryLLM


@dataclass(frozen=True)
class DecodeSettings:
    """How to pick tokens. Never read from a hub generation_config: callers say what they want."""

    max_new_tokens: int = 64
    sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.sample and self.temperature <= 0:
            raise ValueError("temperature must be > 0 when sampling")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Generation:
    token_ids: list[int]  # new tokens, without the stop token
    finish_reason: str  # "stop" or "length"
    step_logits: list[torch.Tensor] = field(default_factory=list)  # [V] float32 per step, if kept


def pick_token(logits: torch.Tensor, settings: DecodeSettings, generator: torch.Generator | None) -> int:
    """One token id from logits [V]: argmax, or a temperature / top-k / top-p sample."""
    if not settings.sample:
        return int(logits.argmax())
    logits = logits.float().cpu() / settings.temperature
    if settings.top_k > 0:
        kth = torch.topk(logits, min(settings.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if settings.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > settings.top_p  # keep the smallest nucleus
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(
    model: MemoryLLM,
    state: MemoryState,
    prompt_ids: Sequence[int] | torch.Tensor,
    settings: DecodeSettings = DecodeSettings(),
    on_token: Callable[[int], None] | None = None,
    keep_logits: bool = False,
    reuse_memory_kv: bool = True,
) -> Generation:
    """Answer `prompt_ids` from memory. The prefill reads the memory prefix; decode steps reuse the
    KV cache at positions prefix + prompt + t. The memory is not modified; its keys/values are kept on
    the state for the next question unless `reuse_memory_kv` is False."""
    ids = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(1, -1)
    if ids.numel() == 0:
        raise ValueError("the prompt is empty")
    P, n = model.prefix_length(state), ids.shape[1]
    generator = torch.Generator(device="cpu").manual_seed(settings.seed) if settings.sample else None
    stops = set(settings.stop_token_ids)
    out = Generation(token_ids=[], finish_reason="length")
    with model.caches(1, P + n + settings.max_new_tokens):
        input_pos = torch.arange(P, P + n)  # the prompt's positions after the memory prefix
        logits = model(ids, state, input_pos, reuse_memory_kv=reuse_memory_kv, last_only=True).logits[0, -1]
        for step in range(settings.max_new_tokens):
            if keep_logits:
                out.step_logits.append(logits.cpu())
            token = pick_token(logits, settings, generator)
            if token in stops:
                out.finish_reason = "stop"
                break
            out.token_ids.append(token)
            if on_token is not None:
                on_token(token)
            if step + 1 < settings.max_new_tokens:
                input_pos = torch.tensor([P + n + step])
                logits = model(torch.tensor([[token]]), state, input_pos, last_only=True).logits[0, -1]
    return out
