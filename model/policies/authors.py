"""The authors' policies: MemoryLLM's trained delta write and random-row eviction (docs/algorithm.md §5), and
M+'s co-trained selectors that score the long-term memory for each question (§6). The registry builds every
trained model with them; the demo's training-free ones are in policies/training_free.py."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import nn

from ..core.config import ModelConfig
from ..core.layers import Pass
from ..core.memoryllm import InjectResult, MemoryLLM, NewRows
from ..core.mplus import MPlus, Retrieval
from ..memory.ltm import LongTermMemory
from ..memory.state import MemoryState, append_sources, draw_permutations, drop_and_append, stm_rows, tile_first_delta

SCORE_ROWS = 1 << 16  # candidates scored per batch on a device: a [65536, s] float32 copy of their keys


class TrainedDelta:
    """The authors' write: per layer the input is [bos, last K memory rows, context], with
    `new_memory_positional_emb` added to its last K rows; the last K outputs are the new rows."""

    reads_memory = True

    def prepare(self, model: MemoryLLM) -> None:
        pass

    @torch.no_grad()
    def delta(
        self, model: MemoryLLM, ids: torch.Tensor, states: Sequence[MemoryState], like_authors: bool = False
    ) -> torch.Tensor:
        """New rows [B, L, k, d] for contexts ids [B, n], context i written into states[i] (k = K, or min(n, K)
        before initialization). The last max(n, K) rows are queries (P = bos + min(n, K)). The last layer
        computes only the K delta rows and nothing is cached, unless `like_authors`: then every layer
        computes all its query rows, a KV cache is filled and the logits of the n tokens are computed and
        thrown away, as the authors' injection does."""
        initialized = {state.initialized for state in states}
        if len(initialized) > 1:
            raise ValueError("a batch of contexts is written into memories that are all initialized, or none")
        initialized = initialized.pop()
        K = model.cfg.num_tokens
        x = model.model.embed_tokens(ids.to(model.device))  # [B, n, d]
        B, n = ids.shape
        memory_block = K if initialized else 0
        length = model.n_bos * (memory_block > 0) + memory_block + n
        last, positions = model.cfg.num_layers - 1, torch.arange(length)
        at = Pass(*model.cos_sin(positions), model.encoder_adapter(), positions if like_authors else None)
        n_query = max(n, K) if initialized else n
        deltas = []
        with model.caches(B, length) if like_authors else nullcontext():
            for layer, block in enumerate(model.model.layers):
                device = model.layer_device(layer)
                parts = [x.to(device)]
                if initialized:
                    memory = [model.with_bos(layer, s.memory[layer, -K:].to(device)) for s in states]
                    parts.insert(0, torch.stack(memory))
                h = torch.cat(parts, dim=1)  # [B, bos + K + n, d] (a fresh tensor: safe to add into)
                h[:, -K:] += model.new_memory_positional_emb.to(device)
                queries = min(n_query, K) if layer == last and not like_authors else n_query
                out = block(h, queries, at)  # [B, queries, d]
                deltas.append(out[:, -K:].to(model.device))
                x = out[:, -n:]
        if like_authors:
            model.logits(model.model.norm(x))  # [B, n, V], unused
        return torch.stack(deltas, dim=1)  # [B, L, k, d]


class RandomRows:
    """The authors' eviction: the first injection tiles its rows over the whole memory; later ones drop k
    random rows per layer (one permutation per layer, or one for all with `drop_memory_per_layer` False)
    and append the k new rows."""

    def update(self, model: MemoryLLM, state: MemoryState, new: NewRows) -> InjectResult:
        delta, row_ids, perms, N, k = new.delta, new.row_ids, new.perms, state.rows_per_layer, new.delta.shape[1]
        if not state.initialized:
            state.memory = tile_first_delta(delta.to(state.memory.dtype), N).contiguous()
            state.initialized = True
            sources = N + tile_first_delta(torch.arange(k).expand(delta.shape[:2])[..., None], N)[..., 0]
            nothing = torch.empty(state.num_layers, 0, dtype=torch.long)
            return InjectResult(delta, torch.empty(0, N, dtype=torch.long), None, sources, row_ids, nothing)
        draws = model.cfg.num_layers if model.cfg.drop_memory_per_layer else 1
        if perms is None:
            perms = draw_permutations(state.generator, draws, N)
        elif tuple(perms.shape) != (draws, N):
            raise ValueError(f"perms must have shape ({draws}, {N}), got {tuple(perms.shape)}")
        sources, dropped_sources = append_sources(perms, state.num_layers, N, k)
        dropped = drop_and_append(state.memory, delta, dropped_sources)
        return InjectResult(delta, perms, dropped, sources, row_ids, dropped_sources)


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


class Selectors:
    """The authors' M+ retrieval: co-trained selector projections score every LTM row (and the cache of
    recently dropped rows) by the mean sigmoid(query . key) over the question tokens; dropped rows wait in
    the cache with their keys and are merged into the LTM every `update_ltm_frequency` injections, where
    recall frequencies decay and rarely read rows are pruned (docs/algorithm.md §6.3-§6.5)."""

    stm_rows_age = False  # the released code never ages short-term rows (docs/algorithm.md §6.3)
    device_scoring: bool | None = None  # score on the model's device; None: when the model is not on the CPU

    def __init__(self) -> None:
        self.products = torch.empty(0)  # scratch for the CPU path's batch products (see product_buffer)

    def answer_bias(self, model: MPlus, state: MemoryState) -> None:
        return None  # the authors' models read their rows only through attention

    def answer_reading(self) -> None:
        return None

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
                product = torch.mm(q, keys.float().T, out=self.product_buffer(q.shape[0], keys.shape[0]))  # [n_q, b]
                scores[positions] = product.sigmoid_().mean(0)  # [b]
            chosen = scores.topk(T).indices.sort().values  # [T]
        picked = entries[chosen]  # [T] entry ids
        order = order_oldest_first(ltm.bank.ages(picked))
        row_ids = ltm.bank.row_ids(picked[order])
        rows = ltm.rows.gather(row_ids, out=torch.empty(T, ltm.rows.width, dtype=ltm.rows.dtype, pin_memory=pinned))
        if on_device:
            rows = rows.to(model.device, non_blocking=pinned)
        return Retrieval(rows=rows, indices=chosen[order], scores=scores, num_ltm=n, row_ids=row_ids)

    def product_buffer(self, rows: int, columns: int) -> torch.Tensor:
        """A [rows, columns] float32 view of scratch that every batch of every layer and question reuses: a fresh
        product per batch pages in new memory each time, about 40 MB a question at 40,000 LTM rows per layer."""
        if self.products.numel() < rows * columns:
            self.products = torch.empty(rows * columns)
        return self.products[: rows * columns].view(rows, columns)

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


def authors_policies(cfg: ModelConfig) -> dict:
    """The write, eviction and (M+) retrieval policies a trained checkpoint of `cfg` runs with."""
    chosen = {"write": TrainedDelta(), "eviction": RandomRows()}
    return chosen | ({"retrieval": Selectors()} if cfg.kind == "mplus" else {})
