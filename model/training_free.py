"""Training-free memory for a plain pretrained Llama: a baseline and a demo, not the authors' models.

MemoryLLM and M+ store trained *output* states of their layers. A pretrained Llama has no such training,
but the same architecture works without it if row j of layer l stores the *input* of layer l at token j:
exactly what the layer itself attends to when the text is in the prompt.

- write: a chunk runs as the prompt [bos, chunk] through the plain decoder; its tokens' layer inputs
  [L, k, d] are appended to the memory (K = chunk length, no `new_memory_positional_emb`);
- read: the unchanged MemoryLLM forward. Layer l of a question attends to [bos row, memory rows] at
  positions 0..P-1 (the bos row is the layer's own input for a lone bos token), so a chunk read from
  memory gives the logits it gives in the prompt [bos, chunk, question];
- forget: memory starts empty and grows to `capacity` rows per layer; then each injection evicts random
  blocks of B consecutive old rows, one draw for all layers, so what stays is readable text and a block
  survives s full-pool injections of K tokens with probability about (1 - K/N)^s;
- M+ flavour: evicted blocks go to a CPU long-term memory. At the question prefill, layer l lets every
  question token spread one unit of attention over the LTM rows, softmax(cos(question state, row) / tau)
  on the layer's input-normed states centered on the LTM mean; a block scores the most any of its rows
  got, and the best blocks (T rows) are placed oldest first between bos and the short-term rows. No
  pruning. (The layer's own q/k projections without RoPE were tried as scores: on SmolLM2-135M they
  ranked the evidence no better than chance.) The keys are derived from the rows, not stored: an LTM entry
  keeps two numbers of its row (see `row_stats`) and the LTM the running sum of its keys, so the scores
  need one pass over the rows, a batch at a time, with one matmul each.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .config import MemoryKind, ModelConfig, TrainingFreeConfig, rope_from_hf
from .ltm import LongTermMemory
from .memory import MemoryState, draw_permutations, stm_rows
from .memoryllm import InjectResult, MemoryLLM
from .mplus import MPlus, Retrieval, order_oldest_first

TRAINING_FREE_LABEL = "training-free memory, demo"
DEFAULT_CAPACITY = 1024  # short-term rows per layer
DEFAULT_RETRIEVED = 96  # M+ flavour: long-term rows read back per layer at a question (6 blocks)
DEFAULT_BLOCK = 16  # rows are evicted and retrieved in blocks of consecutive tokens
RETRIEVAL_TEMPERATURE = 0.1  # tau of the softmax over cosine similarities
SCORE_BATCH = 4096  # LTM rows per matmul when scoring (cast to float32 a batch at a time)
COMPUTED = ("bos_embedding", "new_memory_positional_emb")  # parameters not read from the weights


def training_free_config(
    llama: dict,
    memory: MemoryKind = "mplus",
    capacity: int = DEFAULT_CAPACITY,
    retrieved: int = DEFAULT_RETRIEVED,
    block: int = DEFAULT_BLOCK,
) -> ModelConfig:
    """The ModelConfig of a Llama config dict (HF names) with training-free memory (`training_free`: the
    capacity, rows retrieved and block size; the authors' K and block counts are 0)."""
    if memory not in ("memoryllm", "mplus"):
        raise ValueError(f"memory must be 'memoryllm' or 'mplus', got {memory!r}")
    if llama.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {llama['hidden_act']!r}: only silu (SwiGLU) Llama models")
    retrieved = retrieved if memory == "mplus" else 0
    if block < 1 or capacity < block or capacity % block or retrieved % block or (memory == "mplus" and not retrieved):
        raise ValueError(f"capacity (and for M+ retrieved) must be positive multiples of the block size {block}")
    heads, hidden = int(llama["num_attention_heads"]), int(llama["hidden_size"])
    return ModelConfig(
        vocab_size=int(llama["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(llama["intermediate_size"]),
        num_layers=int(llama["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(llama.get("num_key_value_heads") or heads),
        head_dim=int(llama.get("head_dim") or hidden // heads),
        rms_norm_eps=float(llama.get("rms_norm_eps", 1e-6)),
        rope=rope_from_hf(llama, "memoryllm"),  # float32 inverse frequencies
        num_tokens=0,
        num_blocks=0,
        kind=memory,
        tie_word_embeddings=bool(llama.get("tie_word_embeddings", False)),
        training_free=TrainingFreeConfig(capacity, retrieved, block),
        bos_token_id=int(llama["bos_token_id"]),
        eos_token_id=llama.get("eos_token_id"),
        raw=llama | {"mplus_training_free": dict(memory=memory, capacity=capacity, retrieved=retrieved, block=block)},
    )


class LayerInputs:
    """The write: a chunk's new rows are its tokens' layer inputs in the plain prompt [bos, chunk]; the
    bos rows are every layer's input for the lone bos token."""

    reads_memory = False  # each chunk is encoded on its own: its rows can be computed once and reused

    @torch.no_grad()
    def prepare(self, model: MemoryLLM) -> None:
        """bos_embedding [L, 1, d] = every layer's input for the prompt [bos]; no positional embedding."""
        model.bos_embedding.copy_(model.layer_inputs(torch.tensor([model.cfg.bos_token_id])))
        model.new_memory_positional_emb.zero_()

    @torch.no_grad()
    def delta(
        self, model: MemoryLLM, ids: torch.Tensor, states: Sequence[MemoryState], like_authors: bool = False
    ) -> torch.Tensor:
        """New rows [B, L, k, d]: the layer inputs of each chunk ids[i] [k] in the prompt [bos, ids[i]]."""
        if like_authors:
            raise ValueError("the authors' procedure writes trained delta rows: not a training-free model's")
        bos = torch.full((ids.shape[0], 1), model.cfg.bos_token_id, dtype=ids.dtype, device=ids.device)
        return model.layer_inputs(torch.cat([bos, ids], dim=1))[:, :, 1:]


class RandomBlocks:
    """The eviction: the memory grows to `capacity` rows per layer; then each injection evicts random
    blocks of `block` consecutive old rows, one draw for all layers, so what stays is readable text."""

    def __init__(self, capacity: int, block: int):
        self.capacity, self.block = capacity, block

    def eviction(
        self, state: MemoryState, k: int, perms: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(kept, dropped, perms) for appending k rows to the N rows of `state`; kept and dropped index
        [old rows, new rows] (0..N+k-1, ascending).

        The old rows form G = ceil(N / B) blocks of B consecutive rows (the last may be shorter; rows are
        in text order, so a block is consecutive text). Past the capacity, whole blocks are dropped in the
        order of a random permutation perms [1, G] (drawn from state.generator unless given) until enough
        rows are gone; a chunk longer than the capacity also loses its own first rows.
        """
        N, B = state.rows_per_layer, self.block
        G = -(-N // B)
        excess = N + k - self.capacity
        if excess <= 0:
            return torch.arange(N + k), torch.empty(0, dtype=torch.long), torch.empty(0, G, dtype=torch.long)
        if perms is None:
            perms = draw_permutations(state.generator, 1, G)
        elif tuple(perms.shape) != (1, G):
            raise ValueError(f"perms must have shape (1, {G}), got {tuple(perms.shape)}")
        block_of_row = torch.arange(N) // B  # [N]
        sizes = torch.bincount(block_of_row, minlength=G)[perms[0]]  # [G] in drop order
        count = min(G, int((sizes.cumsum(0) < excess).sum()) + 1)  # blocks to drop
        gone = torch.isin(block_of_row, perms[0, :count])  # [N]
        lost = max(0, excess - N)  # new rows that do not fit at all
        kept = torch.cat([torch.nonzero(~gone)[:, 0], N + torch.arange(lost, k)])
        dropped = torch.cat([torch.nonzero(gone)[:, 0], N + torch.arange(lost)])
        return kept, dropped, perms

    def update(
        self,
        model: MemoryLLM,
        state: MemoryState,
        delta: torch.Tensor,
        perms: torch.Tensor | None,
        row_ids: torch.Tensor,
    ) -> InjectResult:
        """Append delta [L, k, d]; past the capacity evict random old blocks (the same ones at every layer).
        InjectResult.dropped holds the evicted rows [L, e, d], e >= 0."""
        k = delta.shape[1]
        kept, dropped, perms = self.eviction(state, k, perms)
        N, L, delta = state.rows_per_layer, state.num_layers, delta.to(state.memory.dtype)
        evicted = torch.cat([state.memory[:, dropped[dropped < N]], delta[:, dropped[dropped >= N] - N]], dim=1)
        state.memory = torch.cat([state.memory[:, kept[kept < N]], delta[:, kept[kept >= N] - N]], dim=1)  # [L, N', d]
        sources, dropped = kept.expand(L, -1), dropped.expand(L, -1)  # the same rows at every layer
        return InjectResult(delta, perms, evicted, sources, row_ids, dropped)


def ltm_blocks(ages: torch.Tensor, block: int) -> torch.Tensor:
    """Block id [n] of every LTM row from the ages [n] in LTM order: a block is a run of at most `block`
    consecutive tokens (each row one token younger than the row before it)."""
    n = ages.shape[0]
    position = torch.arange(n)
    new_run = torch.ones(n, dtype=torch.bool)
    new_run[1:] = ages[1:] != ages[:-1] - 1
    run_start = torch.cummax(torch.where(new_run, position, 0), 0).values  # [n]
    return (new_run | ((position - run_start) % block == 0)).long().cumsum(0) - 1


class SimilarityScoring:
    """The M+ flavour's retrieval: evicted blocks move to a long-term memory (no pruning) that every layer
    searches at the question by the attention its question tokens would give each row (see the module's
    docstring); the best `block`-row blocks are read back."""

    stm_rows_age = True  # every row ages: blocks are found again as runs of consecutive ages

    def __init__(self, block: int, temperature: float = RETRIEVAL_TEMPERATURE):
        self.block, self.temperature = block, temperature

    def attach(self, model: MPlus) -> None:
        pass  # no parameters: the keys are the rows as the layer's attention sees them

    def empty_ltm(self, model: MPlus, memory: torch.Tensor) -> LongTermMemory:
        L, d = model.cfg.num_layers, model.cfg.hidden_size
        rows, stats = torch.empty(0, d, dtype=memory.dtype), torch.empty(0, 2)
        rf, ages, key_sums = torch.empty(0, dtype=torch.float64), torch.empty(0), torch.zeros(L, d, dtype=torch.float64)
        return LongTermMemory.from_rows(  # rf unused: nothing decays or is pruned
            [(rows, stats, rf, ages)] * L, space=stm_rows(memory), key_dtype=torch.float32, key_sums=key_sums
        )

    def rows_read(self, model: MPlus, state: MemoryState) -> int:
        """min(T, LTM rows) (every layer's LTM has the same size: evictions are shared); a state without
        LTM (the plain model of a full-context control) reads none."""
        return 0 if state.ltm is None else min(model.retrieved_rows, len(state.ltm.layers[0]))

    @torch.no_grad()
    def row_keys(self, model: MPlus, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """Retrieval keys [.., d] of rows [.., d]: the rows as the layer's attention sees them,
        input_layernorm(row)."""
        return model.model.layers[layer].input_layernorm(rows.to(model.layer_device(layer), model.dtype))

    def row_stats(self, model: MPlus, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What LTM entries store of their rows x [L, e, d] instead of their keys k = r * (w * x) (each layer's
        RMSNorm with its weight w): [L, e, 2] float32 (r, |w * x|^2), r = rsqrt(mean(x^2) + eps); and the sum
        of the keys per layer [L, d] float64, w * (r @ x). With them, one matmul of the rows gives the cosines
        of the centered keys (see `row_scores`). A layer at a time: a few passes over rows that stay in cache."""
        L, e, d = rows.shape
        stats, key_sums = torch.empty(L, e, 2), torch.empty(L, d, dtype=torch.float64)
        for layer, block in enumerate(model.model.layers):
            norm = block.input_layernorm
            x, w = rows[layer].float().cpu(), norm.weight.float().cpu()  # [e, d], [d]
            r = torch.rsqrt(torch.linalg.vector_norm(x, dim=-1).square() / d + norm.eps)  # [e]
            stats[layer, :, 0], stats[layer, :, 1] = r, torch.linalg.vector_norm(x * w, dim=-1).square()
            key_sums[layer] = (w * (r @ x)).double()
        return stats, key_sums

    @torch.no_grad()
    def row_scores(self, model: MPlus, layer: int, ltm: LongTermMemory, h: torch.Tensor) -> torch.Tensor:
        """[n] attention each of layer `layer`'s LTM rows gets from the question states h [n_q, d] entering
        the layer: every question token spreads one unit by softmax(cos / tau) over the rows, both sides
        centered on the mean key c (the LTM's key sum / n). Reads the rows once, a batch at a time.

        With k_j = r_j (w * x_j) and q' = normalize(key(h_i) - c), cos_ij = (r_j (q' * w) . x_j - q' . c)
        / |k_j - c| and |k_j - c|^2 = r_j^2 |w * x_j|^2 - 2 r_j (w * c) . x_j + |c|^2: one float32 matmul of
        the rows x [b, d] with [q' * w; w * c] per batch, and no key is ever formed."""
        entries = ltm.layers[layer].entries
        n = entries.numel()
        w = model.model.layers[layer].input_layernorm.weight.float().cpu()  # [d]
        c = (ltm.key_sums[layer] / n).float()  # [d]
        q = F.normalize(self.row_keys(model, layer, h).float().cpu() - c, dim=-1)  # [n_q, d]
        a = torch.cat([q * w, (w * c)[None]])  # [n_q + 1, d]
        stats = ltm.bank.keys(entries)  # [n, 2]
        q_c, c_c = q @ c, c.square().sum()  # [n_q], []
        cosines, order, filled = torch.empty(q.shape[0], n), torch.empty(n, dtype=torch.int64), 0  # in read order
        for positions, x in ltm.bank.scan_rows(entries, batch=SCORE_BATCH):  # x: [b, d], rows in storage order
            for where, rows in zip(positions.split(SCORE_BATCH), x.split(SCORE_BATCH), strict=True):
                m = rows.float() @ a.T  # [b, n_q + 1]
                r, square = stats[where, 0], stats[where, 1]
                distance = (r.square() * square - 2 * r * m[:, -1] + c_c).clamp_min(1e-24).sqrt()  # [b]
                b = where.numel()
                cosines[:, filled : filled + b] = (torch.addcmul(-q_c, r[:, None], m[:, :-1]) / distance[:, None]).T
                order[filled : filled + b] = where
                filled += b
        spread = (cosines / self.temperature).softmax(-1).sum(0)  # [n]: each question token spreads one unit
        scores = torch.empty(n)
        scores[order] = spread
        return scores

    @torch.no_grad()
    def retrieve(self, model: MPlus, layer: int, state: MemoryState, h: torch.Tensor) -> Retrieval:
        """The min(T, n) LTM rows of `layer` for a question whose states entering it are h [n_q, d]: the
        rows of the blocks whose best row scores highest (the last block cut to fit), oldest first."""
        ltm = state.ltm.layers[layer]
        n, T = len(ltm), model.retrieved_rows
        ages = ltm.ages  # [n]
        if n <= T:
            chosen, scores = torch.arange(n), None
        else:
            scores = self.row_scores(model, layer, state.ltm, h)  # [n]
            block = ltm_blocks(ages, self.block)  # [n]
            best = torch.full((int(block[-1]) + 1,), float("-inf")).scatter_reduce(0, block, scores, "amax")
            rank = best.argsort(descending=True).argsort()  # [blocks] 0 for the best block
            order = rank[block] * n + torch.arange(n)  # [n] sorts the rows by their block's rank, then in order
            chosen = order.topk(T, largest=False).indices  # [T] rows of the best blocks, in order
        chosen = chosen[order_oldest_first(ages[chosen])]
        return Retrieval(ltm.rows_at(chosen), chosen, scores, n, ltm.row_ids[chosen])

    @torch.no_grad()
    def admit(self, model: MPlus, state: MemoryState, result: InjectResult, dropped_ages: torch.Tensor) -> None:
        """Every older LTM row ages by k; the evicted rows join the LTM (in their order) with their stats,
        ages and keys' sum."""
        ltm, (L, e) = state.ltm, result.dropped_ids.shape
        ltm.age(result.delta.shape[1])
        stats, key_sums = self.row_stats(model, result.dropped)  # [L, e, 2], [L, d]
        entries = ltm.bank.add(result.dropped_ids.reshape(-1), stats.reshape(L * e, 2), dropped_ages.reshape(-1))
        for layer, layer_entries in enumerate(entries.view(L, e)):
            ltm.layers[layer].append_entries(layer_entries, torch.zeros(e, dtype=torch.float64))
        ltm.key_sums += key_sums


def policies(cfg: ModelConfig) -> dict:
    """The write, eviction and (M+) retrieval policies of a training-free config."""
    free = cfg.training_free
    chosen = {"write": LayerInputs(), "eviction": RandomBlocks(free.capacity, free.block)}
    return chosen | ({"retrieval": SimilarityScoring(free.block)} if cfg.kind == "mplus" else {})


def config_of_export(raw: dict) -> ModelConfig:
    """The config of a training-free model's exported config.json (a Llama config + `mplus_training_free`)."""
    memory = raw["mplus_training_free"]
    llama = {key: value for key, value in raw.items() if key != "mplus_training_free"}
    block = memory.get("block", DEFAULT_BLOCK)
    return training_free_config(llama, memory["memory"], memory["capacity"], memory["retrieved"], block)
