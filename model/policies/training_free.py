"""Training-free memory for a plain pretrained Llama: a baseline and a demo, not the authors' models.

MemoryLLM and M+ store trained *output* states of their layers. A pretrained Llama has no such training,
but the same architecture works without it if row j of layer l stores the *input* of layer l at token j:
exactly what the layer itself attends to when the text is in the prompt.

- write: a chunk runs as the prompt [bos, chunk] through the plain decoder; its tokens' layer inputs
  [L, k, d] are appended to the memory (K = chunk length, no `new_memory_positional_emb`);
- read: the unchanged MemoryLLM forward. Layer l of a question attends to [bos row, memory rows] at
  positions 0..P-1 (the bos row is the layer's own input for a lone bos token), so a chunk read from
  memory gives the logits it gives in the prompt [bos, chunk, question];
- forget (MemoryLLM flavour, the forgetting baseline): memory starts empty and grows to `capacity` rows per
  layer; then each injection evicts random blocks of B consecutive old rows, one draw for all layers, so
  what stays is readable text and a block survives s full-pool injections of K tokens with probability
  about (1 - K/N)^s;
- M+ flavour: the short-term memory is a window of the last `capacity` tokens (`OldestOut`); every row
  that leaves it goes to a CPU long-term memory, which therefore holds the whole text in order. A question
  reads back T rows (`LexicalBlocks`): the long-term memory is cut into blocks of B tokens, each block
  scored by BM25 against the question's words, and the best blocks with a block of context on either side
  are placed in text order between bos and the window, the same rows at every layer. The words come from
  the rows themselves: a layer-0 row is its token's embedding, so an LTM entry's key is its token's term.
  A retrieved passage then reads as it would in the prompt, right before the question, instead of behind
  a long stretch of unrelated text: on SmolLM2-135M the full context loses a fact once about 1k tokens
  of other text follow it, and the earlier design (per-row cosine scoring at every layer, 6 blocks of 16
  rows behind a 1,024-row window) answered 0 of 12 questions on real articles. No pruning.
  An answer then copies from what it read (`CopyHead`): once its last words occur in the rows read, the
  words that follow them there are mixed into each token's distribution, up to the end of that sentence.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..core.config import MemoryKind, ModelConfig, TrainingFreeConfig, llama_trunk, rope_from_hf
from ..core.memoryllm import AnswerBias, InjectResult, MemoryLLM, NewRows
from ..core.mplus import MPlus, Retrieval
from ..memory.ltm import LongTermMemory
from ..memory.state import MemoryState, draw_permutations, stm_rows

TRAINING_FREE_LABEL = "training-free memory, demo"
DEFAULT_CAPACITY = 1024  # MemoryLLM flavour: short-term rows per layer
DEFAULT_BLOCK = 16  # MemoryLLM flavour: rows are evicted in blocks of consecutive tokens
MPLUS_WINDOW = 32  # M+ flavour: the short-term memory, a window of the last tokens
MPLUS_RETRIEVED = 256  # M+ flavour: long-term rows read back per layer at a question
MPLUS_BLOCK = 32  # M+ flavour: the long-term memory is searched in blocks of this many tokens
DEFAULT_CONTEXT = 1  # M+ flavour: blocks read on either side of a block the question found
COPY_WEIGHT = 0.3  # M+ flavour: the weight of copying from the text read (see CopyHead); 0: none
COPY_MIN_MATCH = 3  # M+ flavour: tokens of the answer so far that must match the text read to copy
COPY_LONG_WEIGHT, COPY_LONG_MATCH = 0.7, 8  # M+ flavour: the copy's weight after a match of 8 tokens or more
COMPUTED = ("bos_embedding", "new_memory_positional_emb")  # parameters not read from the weights


def default_memory(memory: MemoryKind) -> dict[str, int]:
    """The demo's memory of each flavour: capacity, rows retrieved, block size."""
    if memory == "mplus":
        return {"capacity": MPLUS_WINDOW, "retrieved": MPLUS_RETRIEVED, "block": MPLUS_BLOCK}
    return {"capacity": DEFAULT_CAPACITY, "retrieved": 0, "block": DEFAULT_BLOCK}


def training_free_config(
    llama: dict,
    memory: MemoryKind = "mplus",
    capacity: int | None = None,
    retrieved: int | None = None,
    block: int | None = None,
) -> ModelConfig:
    """The ModelConfig of a Llama config dict (HF names) with training-free memory (`training_free`: the
    capacity, rows retrieved and block size, by default the flavour's `default_memory`; the authors' K and
    block counts are 0)."""
    if memory not in ("memoryllm", "mplus"):
        raise ValueError(f"memory must be 'memoryllm' or 'mplus', got {memory!r}")
    defaults = default_memory(memory)
    capacity = defaults["capacity"] if capacity is None else capacity
    retrieved = defaults["retrieved"] if retrieved is None else retrieved
    block = defaults["block"] if block is None else block
    retrieved = retrieved if memory == "mplus" else 0
    if block < 1 or capacity < block or capacity % block or retrieved % block or (memory == "mplus" and not retrieved):
        raise ValueError(f"capacity (and for M+ retrieved) must be positive multiples of the block size {block}")
    return ModelConfig(
        **llama_trunk(llama),
        rope=rope_from_hf(llama, "memoryllm"),  # float32 inverse frequencies
        num_tokens=0,
        num_blocks=0,
        kind=memory,
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

    def update(self, model: MemoryLLM, state: MemoryState, new: NewRows) -> InjectResult:
        """Append delta [L, k, d]; past the capacity evict random old blocks (the same ones at every layer).
        InjectResult.dropped holds the evicted rows [L, e, d], e >= 0."""
        k = new.delta.shape[1]
        kept, dropped, perms = self.eviction(state, k, new.perms)
        N, L, delta = state.rows_per_layer, state.num_layers, new.delta.to(state.memory.dtype)
        evicted = torch.cat([state.memory[:, dropped[dropped < N]], delta[:, dropped[dropped >= N] - N]], dim=1)
        state.memory = torch.cat([state.memory[:, kept[kept < N]], delta[:, kept[kept >= N] - N]], dim=1)  # [L, N', d]
        sources, dropped = kept.expand(L, -1), dropped.expand(L, -1)  # the same rows at every layer
        return InjectResult(delta, perms, evicted, sources, new.row_ids, dropped)


def ltm_blocks(ages: torch.Tensor, block: int) -> torch.Tensor:
    """Block id [n] of every LTM row from the ages [n] in LTM order: a block is a run of at most `block`
    consecutive tokens (each row one token younger than the row before it)."""
    n = ages.shape[0]
    position = torch.arange(n)
    new_run = torch.ones(n, dtype=torch.bool)
    new_run[1:] = ages[1:] != ages[:-1] - 1
    run_start = torch.cummax(torch.where(new_run, position, 0), 0).values  # [n]
    return (new_run | ((position - run_start) % block == 0)).long().cumsum(0) - 1


class OldestOut:
    """The M+ flavour's eviction: the short-term memory is a window of the last `capacity` tokens; the rows
    that leave it, oldest first, all go to the long-term memory, which therefore holds the text in order."""

    def __init__(self, capacity: int):
        self.capacity = capacity

    def update(self, model: MemoryLLM, state: MemoryState, new: NewRows) -> InjectResult:
        """Append delta [L, k, d] and evict the oldest rows past the capacity (InjectResult.dropped [L, e, d])."""
        (L, k), N = new.delta.shape[:2], state.rows_per_layer
        excess = max(0, N + k - self.capacity)
        both = torch.cat([state.memory, new.delta.to(state.memory.dtype)], dim=1)  # [L, N + k, d]
        evicted, state.memory = both[:, :excess], both[:, excess:].contiguous()
        order = torch.arange(N + k)
        no_draw = torch.empty(0, N, dtype=torch.long)
        return InjectResult(
            new.delta, no_draw, evicted, order[excess:].expand(L, -1), new.row_ids, order[:excess].expand(L, -1)
        )


class TokenTerms:
    """The token behind a layer-0 row, and the search term of a token.

    A layer-0 row is its token's input embedding, so the text of the memory is known from its rows: a row's
    bits are hashed and looked up among the embedding table's (rounded to the rows' dtype), and checked
    equal. A token's term is the English stem of its text lower-cased without spaces and punctuation; stop
    words, punctuation and unknown rows have none (-1)."""

    def __init__(self, model: MemoryLLM):
        self.embedding = model.model.embed_tokens.weight.detach().cpu()  # [V, d]
        words = 2 * self.embedding.shape[1]  # 16-bit words of a float32 row, the widest kept
        self.weights = torch.randint(0, 1 << 20, (words,), generator=torch.Generator().manual_seed(0)).double()
        self.tables: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.terms = term_table(model.tokenizer, self.embedding.shape[0])  # [V]

    def hash(self, rows: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """[n] int64 of rows [n, d] (2- or 4-byte floats): their 16-bit words dotted with weights under 2^20, in
        float64. Every product and partial sum is an integer under 2^53 (d * 2^36 at most), so exact in any
        order: a BLAS product gives every row the same hash in any batch. `batch` rows at a time: their float64
        words (4 or 8 times the rows) stay in cache; the demo's vocabulary hashes in 25 ms, against 250 ms with
        int64 products 4,096 rows at a time."""
        out = torch.empty(rows.shape[0], dtype=torch.long)
        for start in range(0, rows.shape[0], batch):
            words = rows[start : start + batch].contiguous().view(torch.int16).double()  # [b, d * itemsize / 2]
            out[start : start + batch] = (words @ self.weights[: words.shape[1]]).long()
        return out

    def table(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(embeddings in dtype [V, d], their hashes sorted [V], the token of each sorted hash [V])."""
        if dtype not in self.tables:
            rounded = self.embedding.to(dtype)
            hashes, tokens = self.hash(rounded).sort()
            self.tables[dtype] = (rounded, hashes, tokens)
        return self.tables[dtype]

    def tokens(self, rows: torch.Tensor) -> torch.Tensor:
        """The token id [n] of each layer-0 row [n, d] (-1 where a row is no token's embedding)."""
        rows = rows.cpu()
        rounded, hashes, tokens = self.table(rows.dtype)
        h = self.hash(rows)
        where = torch.searchsorted(hashes, h).clamp_max(len(hashes) - 1)
        found = tokens[where]
        same = (hashes[where] == h) & (rounded[found] == rows).all(-1)
        return torch.where(same, found, -1)

    def of_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The term [n] of each layer-0 row [n, d]."""
        tokens = self.tokens(rows)
        return torch.where(tokens >= 0, self.terms[tokens.clamp_min(0)], -1)


STOP_WORDS = frozenset(
    "a an and are as at be been but by did do does for from had has have he her his how i in is it its my no not "
    "of on or our she so than that the their them there these they this those to was we were what when where "
    "which who whom why will with would you your says said say about after also into more most over some such "
    "then up out if can could may might should".split()
)


def term_table(tokenizer, vocab: int) -> torch.Tensor:
    """[V] the term id of every token: equal for tokens whose text has the same English stem in any case or
    spacing (Snowball: "died" and "die"), numbered in order of first token; -1 for stop words, punctuation and
    special tokens. Without a tokenizer every token is its own term."""
    import snowballstemmer  # PyStemmer's C stemmer when installed: the same stems, 50x faster

    if tokenizer is None:
        return torch.arange(vocab)
    texts = tokenizer.convert_ids_to_tokens(list(range(min(vocab, len(tokenizer)))))
    specials = set(getattr(tokenizer, "all_special_tokens", []))
    words = [
        "" if text is None or text in specials else plain_word(tokenizer.convert_tokens_to_string([text]))
        for text in texts
    ]
    kept = sorted({word for word in words if word and word not in STOP_WORDS})
    stems = dict(zip(kept, snowballstemmer.stemmer("english").stemWords(kept), strict=True))
    ids: dict[str, int] = {}
    terms = [ids.setdefault(stems[word], len(ids)) if word in stems else -1 for word in words]
    return torch.tensor(terms + [-1] * (vocab - len(terms)), dtype=torch.long)


def plain_word(text: str) -> str:
    """`text` lower-cased, without spaces and punctuation."""
    return "".join(ch for ch in text.lower() if ch.isalnum())


def bm25(
    terms: torch.Tensor, blocks: torch.Tensor, query: torch.Tensor, k1: float = 1.2, b: float = 0.75
) -> torch.Tensor:
    """Okapi BM25 score [G] of each block against the query terms [q] (distinct, >= 0), the blocks given by
    the terms [n] (-1: no term) and the block id [n] of each position (G = blocks[-1] + 1)."""
    G = int(blocks[-1]) + 1
    has_term = (terms >= 0).float()
    length = torch.zeros(G).index_add_(0, blocks, has_term)  # [G] terms per block
    hits = (terms[:, None] == query[None, :]).float()  # [n, q]
    tf = torch.zeros(G, query.numel()).index_add_(0, blocks, hits)  # [G, q]
    df = (tf > 0).sum(0).float()  # [q]
    idf = torch.log1p((G - df + 0.5) / (df + 0.5))  # [q]
    norm = k1 * (1 - b + b * length / length.mean().clamp_min(1))  # [G]
    return (idf * tf * (k1 + 1) / (tf + norm[:, None])).sum(-1)


def continuations(text: Sequence[int], context: Sequence[int], min_match: int) -> tuple[list[int], int]:
    """(the position after each occurrence in `text` of the longest suffix of `context` (at least `min_match`
    tokens) that occurs there with a token after it, that suffix's length): where an infinity-gram over `text`
    continues, and on how many tokens."""
    m = min_match
    if len(context) < m:
        return [], 0
    suffix = list(context[-m:])
    ends = [i for i in range(m, len(text)) if list(text[i - m : i]) == suffix]
    while ends and m < len(context):
        longer = [i for i in ends if i > m and text[i - m - 1] == context[-m - 1]]
        if not longer:
            break
        ends, m = longer, m + 1
    return ends, m if ends else 0


def sentence_starts(tokenizer, tokens: Sequence[int]) -> frozenset[int]:
    """Positions of `tokens` that start a sentence or a line: a token starting with a space or a capital after
    one ending in . ! or ? (texts injected one after another meet without a space), or a token holding a line
    break (none without a tokenizer)."""
    if tokenizer is None:
        return frozenset()
    texts = [tokenizer.decode([t]) if t >= 0 else "" for t in tokens]
    return frozenset(
        i
        for i in range(1, len(texts))
        if "\n" in texts[i]
        or (texts[i - 1].rstrip().endswith((".", "!", "?")) and (texts[i][:1].isspace() or texts[i][:1].isupper()))
    )


@dataclass(frozen=True)
class CopyHead:
    """Copy from the text the memory read: each answer token's distribution is the model's, mixed with weight
    `weight` (`long_weight` once it is `long_match` tokens or longer) with the tokens that follow, in that text,
    the longest suffix of the prompt and answer so far (an infinity-gram over the rows read, as Liu et al. 2024
    mix one into a neural model, trusting a longer match more), when that suffix has at least `min_match`
    tokens. A copy ends with its sentence: it never proposes a token at one of `stops` (see
    `sentence_starts`), nor a row that is no token (-1). It reads a name or a number exactly as it stands after
    the words that lead to it, where the model alone would invent a likelier one."""

    text: list[int]  # the tokens of the rows placed before the question, in order (-1: not a token)
    stops: frozenset[int]  # positions of `text` the copy never proposes
    weight: float
    min_match: int
    long_weight: float = COPY_LONG_WEIGHT
    long_match: int = COPY_LONG_MATCH

    def weight_after(self, matched: int) -> float:
        """The copy's weight after a match of `matched` tokens: a long one is trusted more."""
        return self.long_weight if matched >= self.long_match else self.weight

    def __call__(self, context: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [V] (logits [V] when nothing is copied)."""
        ends, matched = continuations(self.text, context, self.min_match)
        follow = [self.text[i] for i in ends if i not in self.stops and self.text[i] >= 0]
        if not follow:
            return logits
        copy = torch.bincount(torch.tensor(follow, device=logits.device), minlength=logits.numel()).float()  # [V]
        w = self.weight_after(matched)
        mixed = (1 - w) * torch.softmax(logits.float(), -1) + w * copy / len(follow)
        return mixed.log()


class LexicalBlocks:
    """The M+ flavour's retrieval: the long-term memory holds the text in order (see `OldestOut`), cut into
    blocks of `block` tokens. A question's tokens score every block by BM25 over the tokens the rows hold
    (see `TokenTerms`); the best blocks, each with `context` blocks on either side, fill the T retrieved rows,
    in text order. One choice for all layers: a retrieved passage reads as it would in the prompt."""

    stm_rows_age = True  # every row ages: blocks are found again as runs of consecutive ages

    def __init__(
        self, block: int, context: int = DEFAULT_CONTEXT, copy: float = COPY_WEIGHT, min_match: int = COPY_MIN_MATCH
    ):
        self.block, self.context, self.copy, self.min_match = block, context, copy, min_match
        self.terms: TokenTerms | None = None
        self.chosen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # LTM -> the question's rows
        self.read: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # LTM -> the question's tokens read

    def attach(self, model: MPlus) -> None:
        pass  # no parameters: the keys are the rows' tokens

    def token_terms(self, model: MPlus) -> TokenTerms:
        if self.terms is None:
            self.terms = TokenTerms(model)
        return self.terms

    def empty_ltm(self, model: MPlus, memory: torch.Tensor) -> LongTermMemory:
        L, d = model.cfg.num_layers, model.cfg.hidden_size
        rows, keys = torch.empty(0, d, dtype=memory.dtype), torch.empty(0, 1)
        rf, ages = torch.empty(0, dtype=torch.float64), torch.empty(0)
        return LongTermMemory.from_rows([(rows, keys, rf, ages)] * L, space=stm_rows(memory), key_dtype=torch.float32)

    def rows_read(self, model: MPlus, state: MemoryState) -> int:
        """min(T, LTM rows) (every layer's LTM has the same size); a state without LTM (the plain model of a
        full-context control) reads none."""
        return 0 if state.ltm is None else min(model.retrieved_rows, len(state.ltm.layers[0]))

    def row_keys(self, model: MPlus, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """Keys [n, 1] float32 of layer-0 rows [n, d]: their tokens' terms (the same key serves every layer)."""
        return self.token_terms(model).of_rows(rows).float()[:, None]

    @torch.no_grad()
    def choose(self, model: MPlus, ltm: LongTermMemory, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows [T] in text order, block scores [G]) for the question whose layer-0 input is h [n_q, d]."""
        layer = ltm.layers[0]
        T, ages = model.retrieved_rows, layer.ages
        terms = layer.keys[:, 0].long()  # [n]
        blocks = ltm_blocks(ages, self.block)  # [n]
        query = self.token_terms(model).of_rows(h.to(model.dtype)).unique()
        scores = bm25(terms, blocks, query[query >= 0])  # [G]
        G = scores.numel()
        ranked = torch.argsort(scores.flip(0), stable=True, descending=True)  # best first, later blocks on ties
        ranked = G - 1 - ranked
        picked = torch.zeros(G, dtype=torch.bool)
        sizes = torch.bincount(blocks, minlength=G)
        for best in ranked.tolist():
            for g in range(max(0, best - self.context), min(G, best + self.context + 1)):
                picked[g] = True
            if int(sizes[picked].sum()) >= T:
                break
        rows = torch.nonzero(picked[blocks])[:, 0]  # [>= T] in text order
        return trim(rows, blocks, scores, T), scores

    @torch.no_grad()
    def retrieve(self, model: MPlus, layer: int, state: MemoryState, h: torch.Tensor) -> Retrieval:
        """The min(T, n) LTM rows of `layer` for a question whose states entering it are h [n_q, d]: chosen
        at layer 0 (its inputs are the question's token embeddings) and reused by the layers above."""
        ltm = state.ltm.layers[layer]
        n, T = len(ltm), model.retrieved_rows
        if n <= T:
            chosen, scores = torch.arange(n), None
        elif layer == 0 or state.ltm not in self.chosen:
            chosen, scores = self.choose(model, state.ltm, h)
            self.chosen[state.ltm] = (chosen, scores)
        else:
            chosen, scores = self.chosen[state.ltm]
        rows = ltm.rows_at(chosen)  # [T, d]
        if layer == 0:
            self.read[state.ltm] = self.token_terms(model).tokens(rows)
        return Retrieval(rows, chosen, scores, n, ltm.row_ids[chosen])

    def answer_reading(self) -> str | None:
        if not self.copy:
            return None
        long = f"{COPY_LONG_WEIGHT:g} after {COPY_LONG_MATCH}+"
        return f"copy {self.copy:g} after {self.min_match}+ matching tokens ({long}), to the sentence's end"

    def answer_bias(self, model: MPlus, state: MemoryState) -> AnswerBias | None:
        """A CopyHead over the text before the last question: the LTM rows it read, then the window."""
        if self.copy == 0 or state.ltm is None:  # (a plain model's state: a system's prompt, no memory)
            return None
        read = self.read.get(state.ltm, torch.empty(0, dtype=torch.long))
        text = torch.cat([read, self.token_terms(model).tokens(state.memory[0])]).tolist()  # T + N, -1: no token
        return CopyHead(text, sentence_starts(model.tokenizer, text), self.copy, self.min_match)

    @torch.no_grad()
    def admit(self, model: MPlus, state: MemoryState, result: InjectResult, dropped_ages: torch.Tensor) -> None:
        """Every older LTM row ages by k; the evicted rows join the LTM in text order, keyed by their tokens."""
        ltm, (L, e) = state.ltm, result.dropped_ids.shape
        ltm.age(result.delta.shape[1])
        keys = self.row_keys(model, 0, result.dropped[0]).repeat(L, 1)  # [L * e, 1]
        entries = ltm.bank.add(result.dropped_ids.reshape(-1), keys, dropped_ages.reshape(-1))
        for layer, layer_entries in enumerate(entries.view(L, e)):
            ltm.layers[layer].append_entries(layer_entries, torch.zeros(e, dtype=torch.float64))


def trim(rows: torch.Tensor, blocks: torch.Tensor, scores: torch.Tensor, T: int) -> torch.Tensor:
    """The T of rows [>= T] (text order) that keep the best blocks: rows of the lowest-scoring blocks go first."""
    if rows.numel() == T:
        return rows
    rank = scores[blocks[rows]]  # [r]
    keep = torch.argsort(rank, descending=True, stable=True)[:T]
    return rows[keep.sort().values]


def policies(cfg: ModelConfig) -> dict:
    """The write, eviction and (M+) retrieval policies of a training-free config."""
    free = cfg.training_free
    if cfg.kind == "mplus":
        return {"write": LayerInputs(), "eviction": OldestOut(free.capacity), "retrieval": LexicalBlocks(free.block)}
    return {"write": LayerInputs(), "eviction": RandomBlocks(free.capacity, free.block)}


def config_of_export(raw: dict) -> ModelConfig:
    """The config of a training-free model's exported config.json (a Llama config + `mplus_training_free`)."""
    memory = raw["mplus_training_free"]
    llama = {key: value for key, value in raw.items() if key != "mplus_training_free"}
    return training_free_config(llama, memory["memory"], memory["capacity"], memory["retrieved"], memory.get("block"))
