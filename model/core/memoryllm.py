"""MemoryLLM: a Llama decoder that reads a per-layer memory prefix and writes to it by injection.

What a model writes and how it evicts are policies it is built with (the protocols are here): the authors'
`TrainedDelta` and `RandomRows` in model.policies.authors, the demo's `LayerInputs` and `RandomBlocks` in
model.policies.training_free.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..memory.rows import populated_empty
from ..memory.state import (
    MemoryState,
    new_generator,
)
from .config import ModelConfig, ModelInfo
from .layers import DECODER, ENCODER, Block, KVCache, Pass, RMSNorm
from .rope import apply_rope, cos_sin, inverse_frequencies, rope_into

ROPE_TABLE_STEP = 4096  # positions the model's cos/sin table grows by

AnswerBias = Callable[[Sequence[int], torch.Tensor], torch.Tensor]  # (prompt + answer so far, logits [V]) -> [V]


@dataclass
class InjectResult:
    delta: torch.Tensor  # [L, k, d] new rows written per layer
    perms: torch.Tensor  # [draws, N] permutations used for the drop (empty on the first, tiling injection)
    dropped: torch.Tensor | None  # [L, k, d] rows removed from short-term memory
    sources: torch.Tensor  # [L, N'] where each new memory row came from: i < N old row i, N + j delta row j
    row_ids: torch.Tensor  # [L, k] the ids of the delta rows
    dropped_sources: torch.Tensor  # [L, e] where each dropped row was, indexed as `sources`
    dropped_ids: torch.Tensor | None = None  # [L, e] the ids of the dropped rows, in the order of `dropped`

    def carry(self, old: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A per-row tensor through this update: old [L, N] and new [L, k] values -> (the memory's [L, N'],
        the dropped rows' [L, e])."""
        both = torch.cat([old, new], dim=1)  # [L, N + k]
        return both.gather(1, self.sources), both.gather(1, self.dropped_sources)


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # [B, n, V] float32
    hidden_states: list[torch.Tensor] | None = None  # L+1 entries of [B, n, d]: layer inputs, then final norm


class WritePolicy(Protocol):
    """What an injection writes: new rows [L, k, d] for a context."""

    reads_memory: bool  # whether the new rows depend on the memory (False: compute once, reuse)

    def prepare(self, model: MemoryLLM) -> None:
        """Fill the parameters the policy derives from the weights (called once they are in place)."""

    def delta(
        self, model: MemoryLLM, ids: torch.Tensor, states: Sequence[MemoryState], like_authors: bool
    ) -> torch.Tensor:
        """New rows [B, L, k, d] for contexts ids [B, n] (context i written into states[i])."""


@dataclass(frozen=True)
class NewRows:
    """An injection's rows on their way into the short-term memory."""

    delta: torch.Tensor  # [L, k, d]
    row_ids: torch.Tensor  # [L, k] their ids
    perms: torch.Tensor | None  # [draws, N] the random drops to make (None: the policy draws them)


class EvictionPolicy(Protocol):
    """How new rows enter the short-term memory and which old rows leave it (the memory's rows; the update
    carries row ids and ages by the result's sources)."""

    def update(self, model: MemoryLLM, state: MemoryState, new: NewRows) -> InjectResult: ...


class Decoder(nn.Module):
    """Holds the Llama trunk under the authors' `model.` parameter prefix."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # uninitialised, as every weight here (the builder fills them): a random init of a meta embedding
        # would import torch._dynamo, 0.5 s of every process start
        self.embed_tokens = nn.Embedding.from_pretrained(torch.empty(cfg.vocab_size, cfg.hidden_size), freeze=False)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MemoryLLM(nn.Module):
    """The model; memory lives in a separate MemoryState that `forward` reads and `inject` updates, with the
    write and eviction policies it is built with (model.policies; the registry picks them)."""

    def __init__(self, cfg: ModelConfig, write: WritePolicy, eviction: EvictionPolicy):
        super().__init__()
        self.cfg = cfg
        self.write, self.eviction = write, eviction
        d = cfg.hidden_size
        self.model = Decoder(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(d, cfg.vocab_size, bias=False)
        self.bos_embedding = nn.Parameter(torch.empty(cfg.num_layers, 1, d)) if cfg.add_bos_embedding else None
        self.new_memory_positional_emb = nn.Parameter(torch.empty(1, 1, d))
        self.inv_freq = inverse_frequencies(cfg.rope, cfg.head_dim)  # float32, never cast with the weights
        self.rope_tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self.initial_state: MemoryState | None = None  # the checkpoint's memory, set by the loader
        self.tokenizer = None
        self.info = ModelInfo()

    # -- basics --------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def n_bos(self) -> int:
        return int(self.cfg.add_bos_embedding)

    def encoder_adapter(self) -> str | None:
        return ENCODER if self.cfg.lora else None

    def decoder_adapter(self) -> str | None:
        """Questions use `decoder_adapter` when the checkpoint has one, else the only adapter."""
        if self.cfg.lora is None:
            return None
        return DECODER if self.cfg.lora.decoder_adapter else ENCODER

    def new_state(self, seed: int | None = None, dtype: torch.dtype | None = None) -> MemoryState:
        """A fresh copy of the checkpoint memory with a drop generator seeded by `seed` (None: the checkpoint's
        own, seed 0 unless it carries one: see checkpoint.CARRIED_STATE); its rows are kept in `dtype`
        (default: the model's)."""
        if self.initial_state is None:
            raise RuntimeError("this model has no initial memory: load it with model.load()")
        state = self.initial_state.clone()
        if dtype is not None and dtype != state.memory.dtype:
            state = state.to(state.memory.device, dtype)
        if seed is not None:
            state.generator = new_generator(seed)
        return state

    @property
    def writes_read_memory(self) -> bool:
        """Whether new rows depend on the memory (False: a text's rows can be computed once and reused)."""
        return self.write.reads_memory

    def empty_state(self) -> MemoryState:
        """No rows yet (memory [L, 0, d]): the bos rows alone make a question a plain prompt."""
        cfg = self.cfg
        return MemoryState(memory=torch.empty(cfg.num_layers, 0, cfg.hidden_size, dtype=self.dtype, device=self.device))

    def layer_device(self, layer: int) -> torch.device:
        """Where layer `layer` runs: the model's device, or the layer's own when they are spread over several
        GPUs (`model.load(..., device_map=...)`)."""
        return self.model.layers[layer].input_layernorm.weight.device

    def cos_sin(self, positions: torch.Tensor, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        device = device or self.device
        return cos_sin(self.cfg.rope, self.inv_freq.to(device), positions.to(device), self.dtype)

    def rope_range(self, start: int, end: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [end - start, D] of positions start..end-1, sliced from a table of positions 0.. kept per device
        and dtype and grown ROPE_TABLE_STEP at a time: every layer of a question reads the same prefix positions.
        Each entry depends on its position alone, so the slices hold `cos_sin`'s bits."""
        table = self.rope_tables.get((device, self.dtype))
        if table is None or table[0].shape[0] < end:
            table = self.cos_sin(torch.arange(-(-end // ROPE_TABLE_STEP) * ROPE_TABLE_STEP), device)  # [>= end, D] each
            self.rope_tables[device, self.dtype] = table
        return table[0][start:end], table[1][start:end]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x.to(weight.device), weight).float()

    def with_bos(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """[bos_embedding[layer], rows]: [R, d] -> [bos + R, d], on the rows' device."""
        if self.bos_embedding is None:
            return rows
        return torch.cat([self.bos_embedding[layer].to(rows.device), rows.to(self.dtype)], dim=0)

    # -- reading: question forward ---------------------------------------------------------------
    def prefix_length(self, state: MemoryState) -> int:
        """Rows placed before the question at every layer (bos + memory)."""
        return self.n_bos + state.rows_per_layer if state.initialized else 0

    def answer_bias(self, state: MemoryState) -> AnswerBias | None:
        """How the memory last read for a question shifts each answer token's logits (None: it does not)."""
        return None

    def answer_reading(self) -> str | None:
        """`answer_bias` in words, for a run's record (None: there is none)."""
        return None

    def ltm_prefix_rows(self, layer: int, state: MemoryState, x: torch.Tensor) -> torch.Tensor | None:
        """Rows [T, d] that a question whose layer input is x [B, n, d] places between bos and the memory
        (M+ retrieval); None for MemoryLLM."""
        return None

    def rotated_kv(self, layer: int, rows: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (after RoPE, at `positions` [R]) and values of prefix rows [R, d] at `layer`, decoder
        adapter: two [1, H_kv, R, D]."""
        block, device = self.model.layers[layer], self.layer_device(layer)
        h = block.input_layernorm(rows[None].to(device, self.dtype))  # [1, R, d]
        k, v = block.self_attn.project_kv(h, self.decoder_adapter())
        cos, sin = self.cos_sin(positions, device)
        return apply_rope(k, cos, sin), v

    def memory_kv(self, layer: int, state: MemoryState, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Buffers [1, H_kv, >= capacity, D] holding the keys (after RoPE) and values of bos and the memory
        rows at their prefix positions (0 and P - N..P-1; an M+ question fills the retrieved rows between).
        Computed once per version of the memory and kept on the state; a longer question grows them."""
        cache = state.memory_kv(self)
        buffers = cache.layers.get(layer)
        if buffers is not None and buffers[0].shape[2] >= capacity:
            return buffers
        P, N, b = self.prefix_length(state), state.rows_per_layer, self.n_bos
        room = -(-capacity // 256) * 256  # [P, room): the question and its answer
        shape, device = (1, self.cfg.num_kv_heads, room, self.cfg.head_dim), self.layer_device(layer)
        if device.type == "cpu":  # pages mapped in one call: the buffers are filled at once
            k, v = (populated_empty(shape, self.dtype) for _ in range(2))
        else:
            k, v = (torch.empty(shape, dtype=self.dtype, device=device) for _ in range(2))
        if buffers is not None:  # grown: the prefix is already computed
            k[:, :, :P], v[:, :, :P] = buffers[0][:, :, :P], buffers[1][:, :, :P]
        else:
            if b:
                k[:, :, :b], v[:, :, :b] = self.rotated_kv(layer, self.bos_embedding[layer], torch.arange(b))
            self.project_rows_into(layer, state.memory[layer], P - N, k[:, :, P - N : P], v[:, :, P - N : P])
        cache.layers[layer] = (k, v)
        return k, v

    def project_rows_into(
        self, layer: int, rows: torch.Tensor, first: int, k_out: torch.Tensor, v_out: torch.Tensor, chunk: int = 2048
    ) -> None:
        """Keys (after RoPE, at positions first..) and values of rows [R, d] at `layer` with the decoder
        adapter, written into k_out, v_out [1, H_kv, R, D]: what `rotated_kv` computes, in fewer passes over
        the rows. The adapter and the norm's weight are folded into one matrix ([W_k; W_v] + LoRA) * w, and
        the norm's 1/rms scales the matmul's output: kv = (x @ (W * w).T) / rms(x). `chunk` rows at a time."""
        block, device = self.model.layers[layer], self.layer_device(layer)
        attn, norm = block.self_attn, block.input_layernorm
        weight = attn.kv_weight(self.decoder_adapter()) * norm.weight  # [2 * H_kv * D, d]
        H, D = attn.n_kv_heads, attn.head_dim
        for start in range(0, rows.shape[0], chunk):
            x = rows[start : start + chunk].to(device, self.dtype)  # [r, d]
            r, d = x.shape
            mean_square = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).square() / d  # [r]
            kv = F.linear(x, weight).mul_(torch.rsqrt(mean_square + norm.eps).to(self.dtype)[:, None])  # [r, 2HD]
            kv = kv.view(r, 2, H, D).permute(1, 2, 0, 3)  # [2, H, r, D]
            cos, sin = self.rope_range(first + start, first + start + r, device)
            rope_into(kv[0:1], cos, sin, k_out[:, :, start : start + r])
            v_out[:, :, start : start + r] = kv[1:2]

    def prefix_kv(
        self, layer: int, state: MemoryState, x: torch.Tensor, reuse: bool, capacity: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values [1, H_kv, >= P, D] of the question prefix [bos, retrieved LTM rows, memory] at positions
        0..P-1 for `layer` (x [B, n, d]: the question's layer input, for M+ retrieval). With `reuse` the
        state's cached memory buffers (room for `capacity` positions) with the retrieved rows written in;
        otherwise every row is recomputed, as the authors do."""
        P, b = self.prefix_length(state), self.n_bos
        extra = self.ltm_prefix_rows(layer, state, x)  # [T', d] or None
        if reuse:
            k, v = self.memory_kv(layer, state, capacity)
            if extra is not None:
                T = extra.shape[0]
                self.project_rows_into(layer, extra, b, k[:, :, b : b + T], v[:, :, b : b + T])
            return k, v
        parts = [] if extra is None else [extra.to(self.dtype)]
        rows = self.with_bos(layer, torch.cat([*parts, state.memory[layer].to(self.dtype)]))  # [P, d]
        return self.rotated_kv(layer, rows, torch.arange(P))  # [1, H_kv, P, D]

    def fill_prefix(self, layer: int, state: MemoryState, x: torch.Tensor, reuse: bool) -> None:
        """Put the question prefix at positions 0..P-1 of the layer's cache (see `prefix_kv`): a batch of one
        adopts the state's memory buffers as they are, a batch of questions gets a copy each."""
        cache = self.model.layers[layer].self_attn.kv_cache
        reuse = reuse and cache.batch == 1
        k, v = self.prefix_kv(layer, state, x, reuse, cache.max_len)
        if reuse:
            cache.adopt(k, v)
            return
        B = x.shape[0]
        cache.update(torch.arange(k.shape[2]), k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1))

    @contextmanager
    def caches(self, batch: int, max_len: int) -> Iterator[None]:
        """Give every attention layer a KV cache of `max_len` positions for the block (gpt-fast's
        setup_caches); forward calls with `input_pos` read and extend them."""
        shape = (batch, self.cfg.num_kv_heads, max_len, self.cfg.head_dim)
        for layer, block in enumerate(self.model.layers):
            block.self_attn.kv_cache = KVCache(shape, self.dtype, self.layer_device(layer))
        try:
            yield
        finally:
            for block in self.model.layers:
                block.self_attn.kv_cache = None

    def put_prefix(self, prefix_kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write each layer's keys (after RoPE) and values [1, H_kv, P, D] at slots 0..P-1 of its cache
        (inside `caches()`): a prefix that no memory state computes."""
        for block, (k, v) in zip(self.model.layers, prefix_kv, strict=True):
            block.self_attn.kv_cache.put(0, 0, k, v)

    def cached_kv(self, end: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's cached keys (after RoPE) and values of slots 0..end-1 (inside `caches()`): two
        [B, H_kv, end, D] per layer."""
        return [(b.self_attn.kv_cache.k[:, :, :end], b.self_attn.kv_cache.v[:, :, :end]) for b in self.model.layers]

    @torch.no_grad()
    def forward(
        self,
        ids: torch.Tensor,
        state: MemoryState,
        input_pos: torch.Tensor | None = None,
        return_hidden: bool = False,
        reuse_memory_kv: bool = True,
        last_only: bool = False,
    ) -> ForwardOutput:
        """Logits for ids [B, n] read against `state` (`last_only`: for the last position only).

        Without `input_pos` the prompt is read once after the memory prefix. With input_pos [n] (their
        positions, inside `caches()`) the keys/values stay in the layers' caches: the call whose first
        position is the prefix length P (the prefill) adds the prefix, later calls continue after it.
        `reuse_memory_kv` keeps the memory rows' keys/values on the state between questions (False
        recomputes them, as the authors do)."""
        B, n = ids.shape
        P = self.prefix_length(state)
        if input_pos is None:
            with self.caches(B, P + n):
                return self(ids, state, torch.arange(P, P + n), return_hidden, reuse_memory_kv, last_only)
        prefill = P > 0 and int(input_pos[0]) == P
        x = self.model.embed_tokens(ids.to(self.device))  # [B, n, d]
        at = Pass(*self.cos_sin(input_pos), self.decoder_adapter(), input_pos)
        hidden = [] if return_hidden else None
        for layer, block in enumerate(self.model.layers):
            if hidden is not None:
                hidden.append(x)
            if prefill:
                self.fill_prefix(layer, state, x, reuse_memory_kv)
            x = block(x, n, at)
        x = self.model.norm(x)
        if hidden is not None:
            hidden.append(x)
        return ForwardOutput(logits=self.logits(x[:, -1:] if last_only else x), hidden_states=hidden)

    @torch.no_grad()
    def forward_states(
        self,
        ids: torch.Tensor,
        states: Sequence[MemoryState],
        slots: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        pads: Sequence[int] | None = None,
        reuse_memory_kv: bool = True,
    ) -> torch.Tensor:
        """Last-position logits [B, V] of ids [B, n], element i read against states[i], inside `caches()`
        (see generate.generate_batch for the layout). The tokens go to the cache slots `slots` [n] at the
        RoPE positions `positions` [B, n] and see what `mask` [B, 1, n, end] shows. With `pads` (element i's
        first pads[i] tokens are padding) the call is the prefill: element i's prefix first takes the P_i
        slots before slots[0]."""
        x = self.model.embed_tokens(ids.to(self.device))  # [B, n, d]
        cos, sin = (t[:, None] for t in self.cos_sin(positions))  # [B, 1, n, D]
        at = Pass(cos, sin, self.decoder_adapter(), slots.to(self.device), mask)
        for layer, block in enumerate(self.model.layers):
            if pads is not None:
                for i, (state, pad) in enumerate(zip(states, pads, strict=True)):
                    P = self.prefix_length(state)
                    k, v = self.prefix_kv(layer, state, x[i : i + 1, pad:], reuse_memory_kv, P + 1)
                    block.self_attn.kv_cache.put(i, int(slots[0]) - P, k[:, :, :P], v[:, :, :P])
            x = block(x, x.shape[1], at)
        return self.logits(self.model.norm(x[:, -1]))  # [B, V]

    # -- writing: injection ----------------------------------------------------------------------
    @torch.no_grad()
    def layer_inputs(self, ids: torch.Tensor) -> torch.Tensor:
        """The input of every layer at each position of the plain prompt ids (no memory): [L, n, d] for ids
        [n], [B, L, n, d] for a batch ids [B, n]."""
        x = self.model.embed_tokens(ids.to(self.device).view(-1, ids.shape[-1]))  # [B, n, d]
        n = x.shape[1]
        at = Pass(*self.cos_sin(torch.arange(n)), None)
        inputs = []
        for layer, block in enumerate(self.model.layers):
            inputs.append(x.to(self.device))
            if layer < self.cfg.num_layers - 1:  # the last layer's output is never needed
                x = block(x, n, at)
        stacked = torch.stack(inputs, dim=1)  # [B, L, n, d]
        return stacked if ids.dim() == 2 else stacked[0]

    @torch.no_grad()
    def compute_delta(self, ids: torch.Tensor, state: MemoryState, like_authors: bool = False) -> torch.Tensor:
        """New memory rows [L, k, d] for a context ids [n], as the write policy makes them (`like_authors`:
        the authors' slower procedure, for baselines)."""
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError("inject takes one non-empty 1-D sequence of token ids")
        return self.write.delta(self, ids[None], [state], like_authors)[0]

    @torch.no_grad()
    def inject_batch(self, states: Sequence[MemoryState], ids: torch.Tensor) -> list[InjectResult]:
        """Write context ids[i] [n] into states[i] (in place), the new rows of all computed in one batch."""
        if ids.dim() != 2 or ids.numel() == 0 or ids.shape[0] != len(states):
            raise ValueError("inject_batch takes ids [B, n] with one state per row")
        deltas = self.write.delta(self, ids, states, False)  # [B, L, k, d]
        results = [self.update_memory(state, delta) for state, delta in zip(states, deltas, strict=True)]
        for state, result in zip(states, results, strict=True):
            self.count_injection(state, result, ids.shape[1])
        return results

    @torch.no_grad()
    def update_memory(
        self,
        state: MemoryState,
        delta: torch.Tensor,
        perms: torch.Tensor | None = None,
        row_ids: torch.Tensor | None = None,
    ) -> InjectResult:
        """Put delta [L, k, d] into the short-term memory as the eviction policy does (random drops from
        `state.generator` unless `perms` are given). The delta rows take the state's next row ids, or
        `row_ids` [L, k] (rows the state already holds)."""
        self.check_updatable(state)
        state.memory_changed()
        row_ids = state.new_row_ids(delta.shape[1]) if row_ids is None else row_ids
        ids = state.memory_ids
        result = self.eviction.update(self, state, NewRows(delta, row_ids, perms))
        memory_ids, result.dropped_ids = result.carry(ids, row_ids)
        state.memory_ids = memory_ids.contiguous()
        self.keep_update(state, result)
        return result

    def check_updatable(self, state: MemoryState) -> None:
        """Refuse, before anything changes, a state this model cannot update: none here."""

    def keep_update(self, state: MemoryState, result: InjectResult) -> None:
        """What the model keeps of an update besides the short-term rows and their ids: nothing (M+: ages and
        the long-term memory)."""

    @torch.no_grad()
    def inject(self, state: MemoryState, ids: torch.Tensor, perms: torch.Tensor | None = None) -> InjectResult:
        """Write the context ids [n] into `state` (in place)."""
        result = self.update_memory(state, self.compute_delta(ids, state), perms)
        self.count_injection(state, result, int(ids.numel()))
        return result

    @torch.no_grad()
    def inject_rows(self, state: MemoryState, delta: torch.Tensor, tokens: int, row_ids: torch.Tensor) -> InjectResult:
        """Write rows computed earlier: delta [L, k, d] with the ids row_ids [L, k] the state holds them under
        (see `MemoryState.attach_rows`), for `tokens` tokens of text. Only for models whose delta does not
        depend on the memory (`writes_read_memory` False)."""
        if self.writes_read_memory:
            raise ValueError("this model's new rows depend on its memory: inject the text instead")
        result = self.update_memory(state, delta, row_ids=row_ids)
        self.count_injection(state, result, tokens)
        return result

    @staticmethod
    def count_injection(state: MemoryState, result: InjectResult, tokens: int) -> None:
        state.injections += 1
        state.tokens_injected += tokens
        state.origins.record(result.row_ids, state.injections)
