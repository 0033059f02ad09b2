"""What a retention sweep injects and asks for each sample, in what order: protocols, points, shards,
pieces and stages."""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Literal, get_args

import torch

from model.text.chunking import MIN_CHUNK_TOKENS, chunk_sizes
from model.text.tokenizer import chat_text, decode, encode

from .data import DataError, QAData, Sample

CHUNK_TOKENS = 512  # distractor chunk size, as the authors
MEMORY, CLOSED_BOOK, FULL_CONTEXT = "memory", "closed-book", "full-context"
CONTROLS = (CLOSED_BOOK, FULL_CONTEXT)


@dataclass(frozen=True)
class Protocol:
    name: str
    max_new_tokens: int
    carry_memory: bool  # memory carried across samples (authors) instead of restored per sample (clean)
    context_template: str
    question_template: str
    truncate_tokens: int | None  # evidence and question cut to this many tokens (the authors' collate)
    chat: bool = False  # the question alone as a user turn of the tokenizer's chat template

    def ids(self, tokenizer, template: str, **fields: str) -> list[int]:
        return encode(tokenizer, template.format(**fields))[: self.truncate_tokens]

    def question_ids(self, tokenizer, question: str, answer_prefix: str = "") -> list[int]:
        """A question as this protocol asks it: alone in the chat template, or in its question template; then
        the start of the answer, if the sample has one (the model continues it)."""
        if self.chat:
            text = chat_text(tokenizer, question) + answer_prefix
        else:
            text = self.question_template.format(question=question) + (" " + answer_prefix if answer_prefix else "")
        return encode(tokenizer, text)[: self.truncate_tokens]


CLEAN = Protocol("clean", 16, False, "{context}", "Question: {question}\nAnswer:", None)
AUTHORS = Protocol("authors", 10, True, "Context: {context}", "Questions: {question} Answer:", 512)
ProtocolName = Literal["clean", "authors"]
PROTOCOLS = get_args(ProtocolName)


def protocol_for(name: str, dataset: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}: use clean or authors")
    if name == "clean":
        return CLEAN
    return replace(AUTHORS, question_template="Questions: {question}? Answer:") if dataset == "nq" else AUTHORS


@dataclass
class Sweep:
    """What one retention run measures (the same for every model)."""

    data: QAData
    protocol: Protocol
    points: list[int]  # sorted distances in tokens
    controls: tuple[str, ...] = ()
    seed: int = 0
    systems: tuple[str, ...] = ()  # specs of memory systems run beside each model's memory (model.systems)
    chunk_tokens: int = CHUNK_TOKENS


@dataclass(frozen=True)
class Piece:
    """The first `tokens` tokens of distractor pool chunk `chunk`."""

    chunk: int
    tokens: int


@dataclass
class Stage:
    chunks: list[torch.Tensor]  # distractor chunks injected just before this question
    distance: int  # tokens injected after the evidence, these chunks included
    n_distractors: int  # chunks injected after the evidence, these included
    pieces: list[Piece] | None = None  # where the chunks come from in the pool (clean protocol)


def check_points(points: Sequence[int]) -> None:
    """Distances must be sorted, distinct and at least 16 tokens apart (the smallest injection)."""
    for before, after in zip([0, *points], points, strict=False):
        if after < 0 or (after != before and after - before < MIN_CHUNK_TOKENS):
            raise ValueError(f"distance points must be at least {MIN_CHUNK_TOKENS} tokens apart: {list(points)}")


def parse_shard(text: str) -> tuple[int, int]:
    """'2/4' -> (2, 4): the second of four slices (1-based)."""
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"bad shard {text!r}: use i/n such as 1/4") from None
    if not 1 <= i <= n:
        raise ValueError(f"bad shard {text!r}: i/n needs 1 <= i <= n")
    return i, n


def shard_slice(samples: Sequence[Sample], i: int, n: int) -> list[Sample]:
    """The i-th of n contiguous, disjoint slices; together they are `samples`, in order."""
    return list(samples[len(samples) * (i - 1) // n : len(samples) * i // n])


def sample_seed(seed: int, sample_id: str) -> int:
    """A 63-bit seed for one sample: the same in every process and on resume."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()[:8], "little") >> 1


def split_evidence(ids: list[int], chunk_tokens: int) -> list[torch.Tensor]:
    """Evidence cut into chunks of at most chunk_tokens; a final piece under 16 joins the previous one."""
    sizes = chunk_sizes(len(ids), chunk_tokens) or [0]
    return list(torch.tensor(ids, dtype=torch.long).split(sizes))


def piece_sizes(points: Sequence[int], chunk_tokens: int) -> list[list[int]]:
    """Chunk sizes injected before each point: the gap since the previous point in chunks of 16 to
    chunk_tokens tokens (a rest under 16 takes what it lacks from the chunk before it)."""
    pairs = itertools.pairwise([0, *points])
    return [chunk_sizes(after - before, chunk_tokens, within_limit=True) for before, after in pairs]


def authors_unrelated(passages: Sequence[str], tokenizer, nq: bool) -> Iterator[str]:
    """The authors' distractor texts: passages joined with ' ' until one holds >= 768 tokens (NQ: > 512),
    then cut to 512 tokens and decoded back to text."""
    current = None
    for passage in passages:
        if current is None:
            current = passage
            continue
        n = len(encode(tokenizer, current))
        if (n <= 512) if nq else (n < 768):
            current += " " + passage
        else:
            yield decode(tokenizer, encode(tokenizer, current)[:512])
            current = passage
    if current is not None:
        yield decode(tokenizer, encode(tokenizer, current)[:512])


class Planner:
    """The token ids one model injects and asks for each sample (caches the tokenized distractor pool)."""

    def __init__(self, sweep: Sweep, tokenizer):
        self.sweep, self.tokenizer = sweep, tokenizer
        self.authors_plan: list[Stage] | None = None
        self._pool: list[torch.Tensor] | None = None

    def evidence(self, sample: Sample) -> list[torch.Tensor]:
        p = self.sweep.protocol
        ids = p.ids(self.tokenizer, p.context_template, context=sample.context)
        return split_evidence(ids, self.sweep.chunk_tokens)

    def question(self, sample: Sample) -> list[int]:
        return self.sweep.protocol.question_ids(self.tokenizer, sample.question, sample.answer_prefix)

    @property
    def pool(self) -> list[torch.Tensor]:
        """The distractor pool: the passages in source order, tokenized by the model and cut into chunks of
        chunk_tokens, as many as one sample injects (every sample takes all of them, in its own order)."""
        if self._pool is None:
            count = sum(map(len, piece_sizes(self.sweep.points, self.sweep.chunk_tokens)))
            count += 1 if self.sweep.data.name == "niah" else 0  # a needle skips the rest of a chunk
            self._pool = list(self._stream(count * self.sweep.chunk_tokens).split(self.sweep.chunk_tokens))
        return self._pool

    def haystack(self, sample: Sample) -> tuple[list[Piece], list[Piece]]:
        """Needle in a haystack: the pool's pieces before the needle (depth% of the haystack's tokens) and
        after it, both in text order; the haystack after the needle starts at the next chunk."""
        size = self.sweep.chunk_tokens
        before = round(sample.haystack * sample.depth / 100)
        sizes = (
            chunk_sizes(before, size, within_limit=True),
            chunk_sizes(sample.haystack - before, size, within_limit=True),
        )
        chunks = itertools.count()
        return [Piece(next(chunks), n) for n in sizes[0]], [Piece(next(chunks), n) for n in sizes[1]]

    def prelude(self, sample: Sample) -> list[Piece]:
        """Pieces of the pool injected before the evidence (needle in a haystack only)."""
        return self.haystack(sample)[0] if sample.haystack is not None else []

    def ids(self, pieces: Sequence[Piece]) -> list[torch.Tensor]:
        """The token ids of each piece of the pool."""
        return [self.pool[p.chunk][: p.tokens] for p in pieces]

    def stages(self, sample: Sample) -> list[Stage]:
        if sample.haystack is not None:
            after = self.haystack(sample)[1]
            return [Stage(self.ids(after), sum(p.tokens for p in after), len(after), after)]
        if self.sweep.protocol.carry_memory:
            if self.authors_plan is None:
                self.authors_plan = self._authors_stages()
            return self.authors_plan
        pool = self.pool
        order = iter(random.Random(sample_seed(self.sweep.seed, sample.id)).sample(range(len(pool)), len(pool)))
        stages, count = [], 0
        for point, sizes in zip(
            self.sweep.points, piece_sizes(self.sweep.points, self.sweep.chunk_tokens), strict=True
        ):
            pieces = [Piece(next(order), size) for size in sizes]
            count += len(pieces)
            stages.append(Stage(self.ids(pieces), point, count, pieces))
        return stages

    def _stream(self, count: int) -> torch.Tensor:
        """The first `count` tokens of the distractor passages in source order (each followed by a blank line)."""
        parts, total = [torch.empty(0, dtype=torch.long)], 0
        for passage in self.sweep.data.distractors:
            if total >= count:
                break
            parts.append(torch.tensor(encode(self.tokenizer, passage + "\n\n"), dtype=torch.long))
            total += len(parts[-1])
        if total < count:
            raise DataError(f"the distractor passages hold {total} tokens, fewer than the {count} needed")
        return torch.cat(parts)[:count]

    def _authors_stages(self) -> list[Stage]:
        texts = authors_unrelated(self.sweep.data.distractors, self.tokenizer, self.sweep.data.name == "nq")
        chunks, distances = [], [0]
        stages: list[Stage] = []
        for point in self.sweep.points:
            while distances[-1] < point:
                text = next(texts, None)
                if text is None:
                    raise DataError(f"the distractor passages hold {distances[-1]} tokens, fewer than {point}")
                chunks.append(torch.tensor(encode(self.tokenizer, text)[:512], dtype=torch.long))
                distances.append(distances[-1] + len(chunks[-1]))
            done = stages[-1].n_distractors if stages else 0
            if not stages or len(chunks) > done:
                stages.append(Stage(chunks[done:], distances[-1], len(chunks)))
        return stages
