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

import torch
import torch.nn.functional as F

from .config import MemoryKind, ModelConfig, rope_from_hf
from .ltm import LongTermMemory
from .memory import MemoryState, draw_permutations, stm_rows
from .memoryllm import InjectResult, MemoryLLM
from .mplus import Retrieval, hold_rows, order_oldest_first
from .presets import TINY_CONFIG

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
    """The ModelConfig of a Llama config dict (HF names) with training-free memory. A config block is one
    block of B rows (num_tokens = B), so memory_rows = capacity and ltm_rows_retrieved = retrieved."""
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
        num_tokens=block,
        num_blocks=(capacity + retrieved) // block,
        kind=memory,
        tie_word_embeddings=bool(llama.get("tie_word_embeddings", False)),
        num_ltm_blocks=retrieved // block,
        bos_token_id=int(llama["bos_token_id"]),
        eos_token_id=llama.get("eos_token_id"),
        raw=llama | {"mplus_training_free": dict(memory=memory, capacity=capacity, retrieved=retrieved, block=block)},
    )


class TrainingFreeMemoryLLM(MemoryLLM):
    """MemoryLLM flavour: up to `capacity` rows of layer inputs per layer, evicted in random blocks."""

    writes_read_memory = False  # each chunk is encoded on its own: its rows can be computed once and reused

    @property
    def capacity(self) -> int:
        return self.cfg.memory_rows

    @property
    def block(self) -> int:
        """B: rows are evicted (and, M+, retrieved) in blocks of B consecutive tokens."""
        return self.cfg.num_tokens

    def empty_state(self) -> MemoryState:
        """No rows yet (memory [L, 0, d]): the bos rows alone make a question a plain prompt."""
        cfg = self.cfg
        return MemoryState(memory=torch.empty(cfg.num_layers, 0, cfg.hidden_size, dtype=self.dtype, device=self.device))

    @torch.no_grad()
    def layer_inputs(self, ids: torch.Tensor) -> torch.Tensor:
        """[L, n, d]: the input of every layer at each position of the plain prompt ids [n] (no memory)."""
        x = self.model.embed_tokens(ids.to(self.device))[None]  # [1, n, d]
        n = x.shape[1]
        cos, sin = self._cos_sin(torch.arange(n))
        inputs = []
        for layer, block in enumerate(self.model.layers):
            inputs.append(x[0])
            if layer < self.cfg.num_layers - 1:  # the last layer's output is never stored
                x = block(x, n, cos, sin, None, None, layer)
        return torch.stack(inputs)

    @torch.no_grad()
    def set_bos_rows(self) -> None:
        """bos_embedding [L, 1, d] = every layer's input for the prompt [bos]."""
        self.bos_embedding.copy_(self.layer_inputs(torch.tensor([self.cfg.bos_token_id])))

    @torch.no_grad()
    def compute_delta(self, ids: torch.Tensor, state: MemoryState) -> torch.Tensor:
        """New rows [L, k, d]: the layer inputs of the chunk ids [k] in the prompt [bos, ids]."""
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError("inject takes one non-empty 1-D sequence of token ids")
        bos = torch.tensor([self.cfg.bos_token_id], dtype=ids.dtype, device=ids.device)
        return self.layer_inputs(torch.cat([bos, ids]))[:, 1:]

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

    @torch.no_grad()
    def update_memory(
        self,
        state: MemoryState,
        delta: torch.Tensor,
        perms: torch.Tensor | None = None,
        row_ids: torch.Tensor | None = None,
    ) -> InjectResult:
        """Append delta [L, k, d]; past the capacity evict random old blocks (the same ones at every layer).
        InjectResult.dropped holds the evicted rows [L, e, d], e >= 0."""
        state.kv_cache = None
        k = delta.shape[1]
        row_ids = state.new_row_ids(k) if row_ids is None else row_ids
        kept, dropped, perms = self.eviction(state, k, perms)
        N, delta = state.rows_per_layer, delta.to(state.memory.dtype)
        evicted = torch.cat([state.memory[:, dropped[dropped < N]], delta[:, dropped[dropped >= N] - N]], dim=1)
        ids = torch.cat([state.memory_ids, row_ids], dim=1)  # [L, N + k]
        state.memory = torch.cat([state.memory[:, kept[kept < N]], delta[:, kept[kept >= N] - N]], dim=1)  # [L, N', d]
        state.memory_ids = ids[:, kept].contiguous()
        sources = kept.expand(state.num_layers, -1)  # [L, N'] the same rows survive at every layer
        return InjectResult(delta, perms, evicted, sources, row_ids, ids[:, dropped])


def ltm_blocks(ages: torch.Tensor, block: int) -> torch.Tensor:
    """Block id [n] of every LTM row from the ages [n] in LTM order: a block is a run of at most `block`
    consecutive tokens (each row one token younger than the row before it)."""
    n = ages.shape[0]
    position = torch.arange(n)
    new_run = torch.ones(n, dtype=torch.bool)
    new_run[1:] = ages[1:] != ages[:-1] - 1
    run_start = torch.cummax(torch.where(new_run, position, 0), 0).values  # [n]
    return (new_run | ((position - run_start) % block == 0)).long().cumsum(0) - 1


class TrainingFreeMPlus(TrainingFreeMemoryLLM):
    """M+ flavour: evicted blocks move to a long-term memory that every layer searches at the question."""

    @property
    def retrieved_rows(self) -> int:
        """T: the most LTM rows placed in every layer's question prefix."""
        return self.cfg.ltm_rows_retrieved

    def empty_state(self) -> MemoryState:
        state = super().empty_state()
        L, d = self.cfg.num_layers, self.cfg.hidden_size
        state.memory_ages = torch.zeros(L, 0, dtype=torch.int64)
        rows, stats = torch.empty(0, d, dtype=self.dtype), torch.empty(0, 2)
        rf, ages, key_sums = torch.empty(0, dtype=torch.float64), torch.empty(0), torch.zeros(L, d, dtype=torch.float64)
        state.ltm = LongTermMemory.from_rows(  # rf unused: nothing decays or is pruned
            [(rows, stats, rf, ages)] * L, space=stm_rows(state.memory), key_dtype=torch.float32, key_sums=key_sums
        )
        return state

    # -- retrieval -------------------------------------------------------------------------------
    @torch.no_grad()
    def row_keys(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """Retrieval keys [.., d] of rows [.., d]: the rows as the layer's attention sees them,
        input_layernorm(row)."""
        return self.model.layers[layer].input_layernorm(rows.to(self.device, self.dtype))

    def row_stats(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What LTM entries store of their rows x [L, e, d] instead of their keys k = r * (w * x) (each layer's
        RMSNorm with its weight w): [L, e, 2] float32 (r, |w * x|^2), r = rsqrt(mean(x^2) + eps); and the sum
        of the keys per layer [L, d] float64, w * (r @ x). With them, one matmul of the rows gives the cosines
        of the centered keys (see `row_scores`). A layer at a time: a few passes over rows that stay in cache."""
        L, e, d = rows.shape
        stats, key_sums = torch.empty(L, e, 2), torch.empty(L, d, dtype=torch.float64)
        for layer, block in enumerate(self.model.layers):
            norm = block.input_layernorm
            x, w = rows[layer].float().cpu(), norm.weight.float().cpu()  # [e, d], [d]
            r = torch.rsqrt(torch.linalg.vector_norm(x, dim=-1).square() / d + norm.eps)  # [e]
            stats[layer, :, 0], stats[layer, :, 1] = r, torch.linalg.vector_norm(x * w, dim=-1).square()
            key_sums[layer] = (w * (r @ x)).double()
        return stats, key_sums

    @torch.no_grad()
    def row_scores(self, layer: int, ltm: LongTermMemory, h: torch.Tensor) -> torch.Tensor:
        """[n] attention each of layer `layer`'s LTM rows gets from the question states h [n_q, d] entering
        the layer: every question token spreads one unit by softmax(cos / tau) over the rows, both sides
        centered on the mean key c (the LTM's key sum / n). Reads the rows once, a batch at a time.

        With k_j = r_j (w * x_j) and q' = normalize(key(h_i) - c), cos_ij = (r_j (q' * w) . x_j - q' . c)
        / |k_j - c| and |k_j - c|^2 = r_j^2 |w * x_j|^2 - 2 r_j (w * c) . x_j + |c|^2: one float32 matmul of
        the rows x [b, d] with [q' * w; w * c] per batch, and no key is ever formed."""
        entries = ltm.layers[layer].entries
        n = entries.numel()
        w = self.model.layers[layer].input_layernorm.weight.float().cpu()  # [d]
        c = (ltm.key_sums[layer] / n).float()  # [d]
        q = F.normalize(self.row_keys(layer, h).float().cpu() - c, dim=-1)  # [n_q, d]
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
        spread = (cosines / RETRIEVAL_TEMPERATURE).softmax(-1).sum(0)  # [n]: each question token spreads one unit
        scores = torch.empty(n)
        scores[order] = spread
        return scores

    @torch.no_grad()
    def retrieve(self, layer: int, state: MemoryState, h: torch.Tensor) -> Retrieval:
        """The min(T, n) LTM rows of `layer` for a question whose states entering it are h [n_q, d]: the
        rows of the blocks whose best row scores highest (the last block cut to fit), oldest first."""
        ltm = state.ltm.layers[layer]
        n, T = len(ltm), self.retrieved_rows
        ages = ltm.ages  # [n]
        if n <= T:
            chosen, scores = torch.arange(n), None
        else:
            scores = self.row_scores(layer, state.ltm, h)  # [n]
            block = ltm_blocks(ages, self.block)  # [n]
            best = torch.full((int(block[-1]) + 1,), float("-inf")).scatter_reduce(0, block, scores, "amax")
            rank = best.argsort(descending=True).argsort()  # [blocks] 0 for the best block
            order = rank[block] * n + torch.arange(n)  # [n] sorts the rows by their block's rank, then in order
            chosen = order.topk(T, largest=False).indices  # [T] rows of the best blocks, in order
        chosen = chosen[order_oldest_first(ages[chosen])]
        return Retrieval(ltm.rows_at(chosen), chosen, scores, n, ltm.row_ids[chosen])

    def prefix_length(self, state: MemoryState) -> int:
        """bos + retrieved LTM rows + STM rows (every layer's LTM has the same size: evictions are shared); a
        state without LTM (the plain model of a full-context control) reads no LTM rows."""
        if state.ltm is None or not state.initialized:
            return super().prefix_length(state)
        return super().prefix_length(state) + min(self.retrieved_rows, len(state.ltm.layers[0]))

    def ltm_prefix_rows(self, layer: int, state: MemoryState, x: torch.Tensor) -> torch.Tensor | None:
        """The retrieved LTM rows [T, d] for batch element 0 of x [B, n, d], oldest first (None: no or empty LTM)."""
        if state.ltm is None or len(state.ltm.layers[layer]) == 0:
            return None
        return self.retrieve(layer, state, x[0]).rows

    # -- writing ---------------------------------------------------------------------------------
    @torch.no_grad()
    def update_memory(
        self,
        state: MemoryState,
        delta: torch.Tensor,
        perms: torch.Tensor | None = None,
        row_ids: torch.Tensor | None = None,
    ) -> InjectResult:
        """The MemoryLLM flavour's update, then: the new rows get ages k-1..0 and every older row ages by
        k; the evicted rows join the LTM (in their order) with their stats, ages and keys' sum."""
        if state.ltm is None or state.memory_ages is None:
            raise ValueError("an M+ model needs an M+ memory state (with memory_ages and ltm): use model.new_state()")
        ltm, L, k = state.ltm, delta.shape[0], delta.shape[1]
        kept, dropped, perms = self.eviction(state, k, perms)
        ages = torch.cat([state.memory_ages + k, torch.arange(k - 1, -1, -1).expand(L, k)], dim=1)  # [L, N + k]
        result = super().update_memory(state, delta, perms, row_ids)  # the same eviction: perms are now given
        hold_rows(ltm, result)
        state.memory_ages = ages[:, kept].contiguous()
        ltm.age(k)
        e = dropped.numel()
        stats, key_sums = self.row_stats(result.dropped)  # [L, e, 2], [L, d]
        entries = ltm.bank.add(result.dropped_ids.reshape(-1), stats.reshape(L * e, 2), ages[:, dropped].reshape(-1))
        for layer, layer_entries in enumerate(entries.view(L, e)):
            ltm.layers[layer].append_entries(layer_entries, torch.zeros(e, dtype=torch.float64))
        ltm.key_sums += key_sums
        return result


def config_of_export(raw: dict) -> ModelConfig:
    """The config of a training-free model's exported config.json (a Llama config + `mplus_training_free`)."""
    memory = raw["mplus_training_free"]
    llama = {key: value for key, value in raw.items() if key != "mplus_training_free"}
    block = memory.get("block", DEFAULT_BLOCK)
    return training_free_config(llama, memory["memory"], memory["capacity"], memory["retrieved"], block)


def build_training_free(
    cfg: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device | str
) -> TrainingFreeMemoryLLM:
    """The model of `cfg` with Llama `weights` under our parameter names (every key must match), its bos
    rows computed and an empty initial memory."""
    with torch.device("meta"):
        model = TrainingFreeMPlus(cfg) if cfg.kind == "mplus" else TrainingFreeMemoryLLM(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in COMPUTED}
    problems = [f"missing {k}" for k in sorted(set(expected) - set(weights))]
    problems += [f"unused {k}" for k in sorted(set(weights) - set(expected))]
    problems += [
        f"{k} {tuple(v.shape)} (expected {expected[k]})"
        for k, v in weights.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    if problems:
        raise ValueError(f"the weights do not match the Llama config: {', '.join(problems)}")
    computed = {name: torch.zeros(model.get_parameter(name).shape) for name in COMPUTED}
    state_dict = {k: v.to(device=device, dtype=dtype) for k, v in (weights | computed).items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.eval().requires_grad_(False)
    model.set_bos_rows()
    model.initial_state = model.empty_state()
    return model


# -- tiny seeded random Llamas in training-free mode (tests, offline CLI checks): the `tiny` preset's shapes --
LLAMA_KEYS = (  # the plain-Llama part of a preset config
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "rope_theta",
    "max_position_embeddings",
    "tie_word_embeddings",
    "eos_token_id",
)
TINY_LLAMA = {key: TINY_CONFIG[key] for key in LLAMA_KEYS} | {"bos_token_id": 256}  # <|eos|> doubles as bos
TINY_PRESETS: dict[str, MemoryKind] = {"tiny-free": "memoryllm", "tiny-free-mplus": "mplus"}


def random_llama_weights(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights for every Llama parameter of `cfg`: norms 1, embeddings N(0, 1), matrices
    N(0, 1/in_features)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in MemoryLLM(cfg).state_dict().items() if k not in COMPUTED}
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            weights[name] = torch.ones(shape)
        else:
            std = 1.0 if "embed_tokens" in name else shape[1] ** -0.5
            weights[name] = torch.randn(shape, generator=generator) * std
    return weights


def build_tiny(
    memory: MemoryKind = "memoryllm",
    capacity: int = 64,
    retrieved: int = 32,
    block: int = 16,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> TrainingFreeMemoryLLM:
    """A tiny seeded random Llama (TINY_LLAMA) with training-free memory and the byte tokenizer."""
    from .tokenizer import byte_tokenizer

    cfg = training_free_config(TINY_LLAMA, memory, capacity, retrieved, block)
    model = build_training_free(cfg, random_llama_weights(cfg, seed), dtype, device)
    model.tokenizer = byte_tokenizer()
    return model
