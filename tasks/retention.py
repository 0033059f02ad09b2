"""Retention sweeps: inject a sample's evidence, then distractor text, and ask its question at set distances.

Distance is the number of tokens (counted with the model's tokenizer) injected after the evidence; each
row also records how many distractor chunks that took. Two protocols:
- `clean`: every sample starts from the model's initial memory, with a drop generator and a distractor
  order seeded from (seed, sample id), so any sample can be rerun alone; distractors are the passages in
  that order, cut into chunks of at most 512 tokens that land exactly on the distance points.
- `authors` (official-spec §9.1): memory is carried from sample to sample, the evidence is
  "Context: ..." truncated to 512 tokens, the question "Questions: ... Answer:", 10 new tokens, and the
  same distractor list for every sample (passages concatenated to >= 768 tokens, cut back to 512).
  A question is asked after the first distractor that reaches each point. Decoding stays greedy.
Controls: `closed-book` asks from the initial memory with nothing injected; `full-context` runs the model
without memory, with evidence + distractors + question in its prompt, cut to its context window.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import torch

import model as mp
from model.tokenizer import chat_ids, decode, encode

from .data import DataError, QAData, Sample
from .metrics import score
from .results import ResultsLog, ResumeError
from .sizes import format_size

CHUNK_TOKENS = 512  # distractor chunk size, as the authors
MIN_CHUNK_TOKENS = 16  # the authors' models need at least 16 tokens per injection
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


CLEAN = Protocol("clean", 16, False, "{context}", "Question: {question}\nAnswer:", None)
AUTHORS = Protocol("authors", 10, True, "Context: {context}", "Questions: {question} Answer:", 512)
PROTOCOLS = ("clean", "authors")


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
    chunk_tokens: int = CHUNK_TOKENS


@dataclass
class Stage:
    chunks: list[torch.Tensor]  # distractor chunks injected just before this question
    distance: int  # tokens injected after the evidence, these chunks included
    n_distractors: int  # chunks injected after the evidence, these included


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
    pieces = [ids[i : i + chunk_tokens] for i in range(0, len(ids), chunk_tokens)] or [[]]
    if len(pieces) > 1 and len(pieces[-1]) < MIN_CHUNK_TOKENS:
        tail = pieces.pop()
        pieces[-1] = pieces[-1] + tail
    return [torch.tensor(piece, dtype=torch.long) for piece in pieces]


def gap_sizes(points: Sequence[int], chunk_tokens: int) -> list[list[int]]:
    """Chunk sizes injected before each point: the gap to the previous point in near-equal chunks."""
    sizes, previous = [], 0
    for point in points:
        gap = point - previous
        n = -(-gap // chunk_tokens)
        sizes.append([gap // n + (i < gap % n) for i in range(n)])
        previous = point
    return sizes


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
    """The token ids one model injects and asks for each sample (caches the tokenized distractors)."""

    def __init__(self, sweep: Sweep, tokenizer):
        self.sweep, self.tokenizer = sweep, tokenizer
        self.encoded: dict[int, torch.Tensor] = {}
        self.authors_plan: list[Stage] | None = None

    def evidence(self, sample: Sample) -> list[torch.Tensor]:
        p = self.sweep.protocol
        ids = p.ids(self.tokenizer, p.context_template, context=sample.context)
        return split_evidence(ids, self.sweep.chunk_tokens)

    def question(self, sample: Sample) -> list[int]:
        p = self.sweep.protocol
        if p.chat:
            return chat_ids(self.tokenizer, sample.question)[: p.truncate_tokens]
        return p.ids(self.tokenizer, p.question_template, question=sample.question)

    def stages(self, sample: Sample) -> list[Stage]:
        if self.sweep.protocol.carry_memory:
            if self.authors_plan is None:
                self.authors_plan = self._authors_stages()
            return self.authors_plan
        order = random.Random(sample_seed(self.sweep.seed, sample.id)).sample(
            range(len(self.sweep.data.distractors)), len(self.sweep.data.distractors)
        )
        tokens = self._distractor_tokens(order, self.sweep.points[-1])
        stages, previous, count = [], 0, 0
        for point, sizes in zip(self.sweep.points, gap_sizes(self.sweep.points, self.sweep.chunk_tokens), strict=True):
            chunks = list(tokens[previous:point].split(sizes)) if sizes else []
            previous, count = point, count + len(chunks)
            stages.append(Stage(chunks, point, count))
        return stages

    def _distractor_tokens(self, order: list[int], count: int) -> torch.Tensor:
        """The first `count` tokens of the distractor passages taken in `order`."""
        parts, total = [torch.empty(0, dtype=torch.long)], 0
        for i in order:
            if total >= count:
                break
            if i not in self.encoded:
                text = self.sweep.data.distractors[i] + "\n\n"
                self.encoded[i] = torch.tensor(encode(self.tokenizer, text), dtype=torch.long)
            parts.append(self.encoded[i])
            total += len(self.encoded[i])
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


def no_memory(lm: mp.MemoryLLM) -> mp.MemoryState:
    """A state with no memory rows: forward then reads no prefix at all (the plain base model)."""
    cfg = lm.cfg
    return mp.MemoryState(memory=torch.empty(cfg.num_layers, 0, cfg.hidden_size, dtype=lm.dtype), initialized=False)


def context_window(lm: mp.MemoryLLM) -> int:
    """The base model's context window (config.json max_position_embeddings)."""
    window = lm.cfg.raw.get("max_position_embeddings")
    if window is None:
        raise DataError("the model's config.json has no max_position_embeddings: cannot run full-context")
    return int(window)


class Runner:
    """Runs one model over the samples, appending each finished (sample, model, control) unit to the log."""

    def __init__(
        self,
        lm: mp.MemoryLLM,
        model_name: str,
        sweep: Sweep,
        log: ResultsLog,
        stop_ids: Sequence[int] = (),
        memory_dir: Path | None = None,
    ):
        if sweep.protocol.carry_memory and memory_dir is None:
            raise ValueError("a protocol that carries memory across samples needs a memory_dir to resume from")
        self.lm, self.name, self.sweep, self.log, self.memory_dir = lm, model_name, sweep, log, memory_dir
        self.planner = Planner(sweep, lm.tokenizer)
        self.settings = mp.DecodeSettings(max_new_tokens=sweep.protocol.max_new_tokens, stop_token_ids=tuple(stop_ids))

    @cached_property
    def initial(self) -> mp.MemoryState:
        """The model's initial memory, for closed-book questions (asking never changes a state)."""
        return self.lm.new_state(self.sweep.seed)

    def run(
        self,
        samples: Sequence[Sample],
        on_status: Callable[[str], None] = lambda text: None,
        on_unit: Callable[[], None] = lambda: None,
    ) -> None:
        """Skip the units already in the log (dropping incomplete ones first), run the rest in order."""
        n_stages = len(self.planner.stages(samples[0])) if samples else 0
        expected = {MEMORY: n_stages, FULL_CONTEXT: n_stages, CLOSED_BOOK: 1}
        done = self.log.complete_units(self.name, expected)
        carried = self._resume_carried(samples, done) if self.sweep.protocol.carry_memory else None
        for index, sample in enumerate(samples):
            where = f"{self.name} · sample {index + 1}/{len(samples)}"
            for control in (MEMORY, *self.sweep.controls):
                if (sample.id, control) in done:
                    continue
                on_status(f"{where} · {control}")
                if control == CLOSED_BOOK:
                    self.log.append([self.ask(sample, self.initial, self.planner.question(sample), CLOSED_BOOK)])
                elif control == FULL_CONTEXT:
                    self.log.append(self.full_context_unit(sample))
                else:
                    fresh = carried is None
                    state = self.lm.new_state(sample_seed(self.sweep.seed, sample.id)) if fresh else carried
                    rows = self.memory_unit(sample, state, lambda d, at=where: on_status(f"{at} · {format_size(d)}"))
                    if fresh:
                        self.log.append(rows)
                    else:  # memory first: a crash before the rows are written redoes this sample from after-{index}
                        self._save_carried(index + 1, carried)
                        self.log.append(rows)
                        shutil.rmtree(self._carried_path(index), ignore_errors=True)
                on_unit()

    # -- the three kinds of unit ---------------------------------------------------------------
    def memory_unit(self, sample: Sample, state: mp.MemoryState, on_distance: Callable[[int], None]) -> list[dict]:
        for chunk in self.planner.evidence(sample):
            self.lm.inject(state, chunk)
        after_evidence, rows = state.tokens_injected, []
        question = self.planner.question(sample)
        for stage in self.planner.stages(sample):
            on_distance(stage.distance)
            for chunk in stage.chunks:
                self.lm.inject(state, chunk)
            distance = state.tokens_injected - after_evidence  # measured on the state, not assumed
            rows.append(self.ask(sample, state, question, MEMORY, distance, stage.n_distractors))
        return rows

    def full_context_unit(self, sample: Sample) -> list[dict]:
        """Evidence, the distractors up to each point and the question as one prompt; the context keeps its
        last (window - question - answer) tokens."""
        question, rows = self.planner.question(sample), []
        chunks = self.planner.evidence(sample)
        budget = context_window(self.lm) - len(question) - self.settings.max_new_tokens
        if budget <= 0:
            raise DataError(f"the question of sample {sample.id} does not fit the model's context window")
        for stage in self.planner.stages(sample):
            chunks = chunks + stage.chunks
            context = torch.cat(chunks).tolist()[-budget:]
            prompt = context + question
            rows.append(self.ask(sample, no_memory(self.lm), prompt, FULL_CONTEXT, stage.distance, stage.n_distractors))
        return rows

    def ask(
        self,
        sample: Sample,
        state: mp.MemoryState,
        prompt: list[int],
        control: str,
        distance: int = 0,
        n_distractors: int = 0,
    ) -> dict:
        start = time.perf_counter()
        out = mp.generate(self.lm, state, prompt, self.settings)
        latency_ms = (time.perf_counter() - start) * 1000
        prediction = decode(self.lm.tokenizer, out.token_ids)
        metrics = score(prediction, sample.answer)
        return {
            "dataset": self.sweep.data.name,
            "sample_id": sample.id,
            "model": self.name,
            "memory_kind": self.lm.cfg.kind,
            "control": control,
            "distance_tokens": distance,
            "n_distractors": n_distractors,
            "question": sample.question,
            "gold": sample.answer,
            "prediction": prediction,
            "exact_hit": int(metrics["exact_hit"]),
            "em": int(metrics["em"]),
            "f1": round(metrics["f1"], 6),
            "latency_ms": round(latency_ms, 1),
            "seed": self.sweep.seed,
        }

    # -- memory carried across samples (authors protocol) ----------------------------------------
    def _carried_path(self, n_samples: int) -> Path:
        return self.memory_dir / f"after-{n_samples}"

    def _save_carried(self, n_samples: int, state: mp.MemoryState) -> None:
        """Memory after the first n samples, written before their rows (atomic rename)."""
        final = self._carried_path(n_samples)
        tmp = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        state.save(tmp)
        os.replace(tmp, final)

    def _resume_carried(self, samples: Sequence[Sample], done: set[tuple[str, str]]) -> mp.MemoryState:
        """The carried memory after the samples whose memory unit is done (they must be the first ones)."""
        finished = [(sample.id, MEMORY) in done for sample in samples]
        n = finished.index(False) if False in finished else len(finished)
        if any(finished[n:]):
            raise ResumeError("results.csv has memory results out of sample order: the authors protocol cannot resume")
        if n == 0:
            state = self.lm.new_state(self.sweep.seed)
        elif self._carried_path(n).is_dir():
            state = mp.MemoryState.load(self._carried_path(n), device=self.lm.device)
        else:
            raise ResumeError(f"the memory after {n} samples is missing ({self._carried_path(n)}): cannot resume")
        if self.memory_dir.is_dir():
            for stale in self.memory_dir.iterdir():
                if stale.name != f"after-{n}":
                    shutil.rmtree(stale, ignore_errors=True)
        return state
