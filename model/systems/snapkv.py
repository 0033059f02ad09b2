"""SnapKV (Li et al., 2024) as a memory system: the injected text's keys and values, compressed to a budget.

The published selection: the queries of an observation window attend to every earlier key; a key's softmax
weight, summed over the window's queries, averaged over the query heads that share its key-value head
(grouped-query attention) and smoothed by an average pool of `kernel` neighbours, ranks it; each layer and
key-value head keeps its best. Defaults SnapKV's (window 32, kernel 5); `budget` (the entries kept per layer
and head) the M+ paper's 16,384, at most half the model's window.

- `question=blind` (default), as the M+ paper ran SnapKV on retention: the cache is re-selected as text
  arrives. Each injected chunk is read after the kept entries; when the cache then holds more than `budget`
  entries, the chunk's last `window` tokens are the observation window, kept with the `budget - window` best
  earlier entries. A question reads the kept entries.
- `question=aware`, as SnapKV was published for LongBench: per question, the injected text (its last tokens
  that fit the window beside the question and the answer) is read once with the question as the observation
  window, and its `budget` best entries are what the question then reads.

Kept entries take the cache's positions 0..S-1 in their order (each key rotated by the distance it moves), as
StreamingLLM places its cache, so that a stream of any length stays inside the model's window; SnapKV keeps the
text's positions, which a stream past the window would leave. The published method answers its first token
from the whole prompt; here every answer token reads only the kept entries.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..core.generate import DecodeSettings
from ..core.memoryllm import MemoryLLM
from ..core.rope import apply_rope
from . import Answer, Capabilities, MemorySystem
from .baselines import InPrompt, no_memory, positive
from .timing import timed_answer

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys after RoPE and values, each [1, H_kv, S, D]
KV_FILE = "snapkv.safetensors"
DEFAULT_BUDGET = 16_384  # the M+ paper's Llama-3.1-8B-SnapKV cache
QUESTION_MODES = ("blind", "aware")


def snapkv(
    model: MemoryLLM,
    budget: int | str | None = None,
    window: int | str = 32,
    kernel: int | str = 5,
    question: str = "blind",
) -> MemorySystem:
    """The SnapKV system of these parameters (see the module's docstring)."""
    if model.cfg.context_window is None:
        raise ValueError("the model's config has no max_position_embeddings: snapkv needs its window")
    budget = positive("budget", budget) if budget is not None else min(DEFAULT_BUDGET, model.cfg.context_window // 2)
    window, kernel = positive("window", window), positive("kernel", kernel)
    if budget >= model.cfg.context_window:
        raise ValueError(f"budget must be below the model's window ({model.cfg.context_window} tokens), got {budget}")
    if window >= budget:
        raise ValueError(f"window must be smaller than the budget ({budget}), got {window}")
    if kernel % 2 == 0:
        raise ValueError(f"kernel must be odd (the pool keeps the length), got {kernel}")
    if question not in QUESTION_MODES:
        raise ValueError(f"question must be blind or aware, got {question!r}")
    params = {"budget": budget, "window": window, "kernel": kernel, "question": question}
    return (SnapKVAware if question == "aware" else SnapKVBlind)(model, params)


def window_queries(model: MemoryLLM, layer: int, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Queries after RoPE [1, H, w, D] of the layer inputs x [1, w, d] at `positions` [w]."""
    block = model.model.layers[layer]
    attn = block.self_attn
    q = attn.q_proj(block.input_layernorm(x), model.decoder_adapter())  # [1, w, H * D]
    q = q.view(1, x.shape[1], attn.n_heads, attn.head_dim).transpose(1, 2)
    return apply_rope(q, *model.cos_sin(positions, model.layer_device(layer)))


def cache_length(kv: KV | None) -> int:
    return 0 if kv is None else kv[0][0].shape[2]


@torch.no_grad()
def read_after(model: MemoryLLM, kept: KV | None, ids: torch.Tensor, window: int) -> tuple[KV, list[torch.Tensor]]:
    """ids [c] read after the kept entries (positions S..S+c-1): every layer's keys and values of the S + c
    entries, and the queries [1, H, w, D] of the last w = min(window, c) tokens."""
    S = cache_length(kept)
    end = S + len(ids)
    positions = torch.arange(S, end)
    with model.caches(1, end):
        if kept is not None:
            model.put_prefix(kept)
        hidden = model(ids[None], no_memory(model), positions, return_hidden=True, last_only=True).hidden_states
        kv = model.cached_kv(end)
    w = min(window, len(ids))
    return kv, [window_queries(model, layer, hidden[layer][:, -w:], positions[-w:]) for layer in range(len(kv))]


def key_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The attention the window's queries q [1, H, w, D] (the last w positions) pay to each key
    k [1, H_kv, n, D]: softmax weights summed over the window, averaged over each key head's query heads,
    [H_kv, n]."""
    H, w, D = q.shape[1:]
    H_kv, n = k.shape[1], k.shape[2]
    q = q[0].float().view(H_kv, H // H_kv, w, D)  # query heads grouped by the key head they share
    logits = q @ k[0].float().transpose(1, 2)[:, None] / D**0.5  # [H_kv, g, w, n]
    visible = torch.ones(w, n, dtype=torch.bool, device=q.device).tril(n - w)  # query i sits at n - w + i
    return logits.masked_fill(~visible, float("-inf")).softmax(-1).sum(2).mean(1)  # [H_kv, n]


def best_slots(scores: torch.Tensor, candidates: int, keep: int, kernel: int) -> torch.Tensor:
    """[H_kv, min(keep, candidates)] the slots among 0..candidates-1 whose pooled scores [H_kv, >= candidates]
    are best, in slot order."""
    if candidates <= keep:
        return torch.arange(candidates, device=scores.device).expand(scores.shape[0], -1)
    pooled = F.avg_pool1d(scores[:, None, :candidates], kernel, stride=1, padding=kernel // 2)[:, 0]
    return pooled.topk(keep, dim=-1).indices.sort(dim=-1).values


def moved(model: MemoryLLM, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The entries at `slots` [H_kv, S] of k, v [1, H_kv, n, D], placed at positions 0..S-1: each key rotated
    by the distance it moves (RoPE rotations compose)."""
    index = slots[None, :, :, None].expand(-1, -1, -1, k.shape[-1])  # [1, H_kv, S, D]
    shift = torch.arange(slots.shape[1], device=slots.device) - slots  # [H_kv, S], <= 0
    cos, sin = model.cos_sin(shift, k.device)  # [H_kv, S, D]
    return apply_rope(k.gather(2, index), cos[None], sin[None]), v.gather(2, index)


def compressed(
    model: MemoryLLM, kv: KV, queries: list[torch.Tensor], candidates: int, keep: int, kernel: int, tail: int = 0
) -> KV:
    """Each layer's `keep` best entries among its first `candidates` by the attention of its window `queries`,
    then its last `tail` entries, moved to positions 0..S-1."""
    kept = []
    for (k, v), q in zip(kv, queries, strict=True):
        slots = best_slots(key_scores(q, k), candidates, keep, kernel)  # [H_kv, <= keep]
        n = k.shape[2]
        last = torch.arange(n - tail, n, device=slots.device).expand(slots.shape[0], -1)  # [H_kv, tail]
        kept.append(moved(model, k, v, torch.cat([slots, last], dim=1)))
    return kept


class SnapKVBlind:
    """The cache re-selected as text arrives, by the attention of each chunk's last tokens."""

    name = "snapkv"
    capabilities = Capabilities(persistent=True, incremental=True, question_aware_write=False, provenance=False)

    def __init__(self, model: MemoryLLM, params: dict):
        self.model, self.params = model, params
        self.kept: KV | None = None

    def reset(self, seed: int = 0) -> None:
        self.kept = None

    def inject(self, ids: torch.Tensor) -> None:
        budget, window = self.params["budget"], self.params["window"]
        for piece in torch.split(ids.reshape(-1).cpu(), self.model.cfg.context_window - budget):
            kv, queries = read_after(self.model, self.kept, piece, window)
            n, w = cache_length(kv), queries[0].shape[2]
            if n > budget:  # the window's w, and the budget - w best entries before it
                kv = compressed(self.model, kv, queries, n - w, budget - w, self.params["kernel"], tail=w)
            self.kept = kv

    def ask(self, question_ids: list[int], settings: DecodeSettings) -> Answer:
        state, kept = no_memory(self.model), self.kept
        return timed_answer(self.model, state, question_ids, settings, cache_length(kept), prefix_kv=kept)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"{name}.{i}": t.contiguous()
            for i, kv in enumerate(self.kept or [])
            for name, t in zip("kv", kv, strict=True)
        }
        save_file(tensors, directory / KV_FILE)

    def load(self, directory: Path) -> None:
        tensors = load_file(directory / KV_FILE, device=str(self.model.device))
        layers = range(self.model.cfg.num_layers)
        self.kept = [(tensors[f"k.{i}"], tensors[f"v.{i}"]) for i in layers] if tensors else None


class SnapKVAware(InPrompt):
    """Per question, the injected text read once and cut to the budget by the question's attention."""

    name = "snapkv"
    capabilities = Capabilities(persistent=True, incremental=True, question_aware_write=True, provenance=False)

    def __init__(self, model: MemoryLLM, params: dict):
        super().__init__(model)
        self.params = params

    def ask(self, question_ids: list[int], settings: DecodeSettings) -> Answer:
        """The answer read from the kept entries; its times include reading the text and choosing them."""
        start = time.perf_counter()
        kept = self.kept_for(question_ids, settings)
        read_s = time.perf_counter() - start
        answer = timed_answer(self.model, no_memory(self.model), question_ids, settings, cache_length(kept), kept)
        return replace(answer, first_token_s=answer.first_token_s + read_s, seconds=answer.seconds + read_s)

    def kept_for(self, question_ids: list[int], settings: DecodeSettings) -> KV | None:
        room, injected = self.room(question_ids, settings), self.injected()
        context = injected[len(injected) - room :] if room else injected[:0]
        if not len(context):
            return None
        ids = torch.cat([context, torch.as_tensor(question_ids, dtype=torch.long)])
        kv, queries = read_after(self.model, None, ids, min(self.params["window"], len(question_ids)))
        return compressed(self.model, kv, queries, len(context), self.params["budget"], self.params["kernel"])
