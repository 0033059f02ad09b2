"""Retention sweeps: inject a sample's evidence, then distractor text, and ask its question at set distances.

Distance is the number of tokens (counted with the model's tokenizer) injected after the evidence; each
row also records how many distractor chunks that took. Two protocols:
- `clean`: every sample starts from the model's initial memory, with a drop generator and a distractor
  order seeded from (seed, sample id), so any sample can be rerun alone. The distractors are a fixed pool
  of 512-token chunks (the passages in source order, tokenized and cut); a sample takes them in its
  seeded order, each gap between distance points filled with whole chunks and a last one cut to fit, so
  every question lands exactly on its point. For a model whose write does not read its memory (the
  training-free demo encodes each chunk on its own), each pool chunk's rows are computed once per run and
  reused for every sample and distance (`EncodedPool`).
- `authors` (docs/algorithm.md §9.1): memory is carried from sample to sample, the evidence is
  "Context: ..." truncated to 512 tokens, the question "Questions: ... Answer:", 10 new tokens, and the
  same distractor list for every sample (passages concatenated to >= 768 tokens, cut back to 512).
  A question is asked after the first distractor that reaches each point. Decoding stays greedy.
Controls: `closed-book` asks from the initial memory with nothing injected; `full-context` runs the model
without memory, with evidence + distractors + question in its prompt, cut to its context window.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import time
from collections.abc import Callable, Collection, Sequence
from functools import cached_property
from pathlib import Path

import torch

import model as mp
from model.memory.dtypes import dtype_name
from model.memory.provenance import retrievals_by_state, share, survival
from model.memory.rows import FileArray
from model.store.files import atomic_file
from model.systems import MemorySystem, build_system, label
from model.systems.baselines import no_memory
from model.text.tokenizer import decode

from .data import DataError, Sample
from .metrics import score
from .plan import CLOSED_BOOK, CONTROLS, FULL_CONTEXT, MEMORY, Piece, Planner, Sweep, sample_seed
from .results import SURVIVAL, ResultsLog, ResumeError
from .sizes import format_size


def pool_file(lm: mp.MemoryLLM, dtype: torch.dtype) -> str:
    """The file name of a model's encoded pool: models with the same weights and encoder share it (the demo
    model's two memory flavours encode a chunk alike)."""
    encoder = {k: v for k, v in lm.cfg.raw.items() if k != "mplus_training_free"}
    key = json.dumps([encoder, lm.info.path, lm.info.source if not lm.info.path else None])
    return f"distractors-{hashlib.sha256(key.encode()).hexdigest()[:16]}-{dtype_name(dtype)}.bin"


class EncodedPool:
    """The rows of every distractor pool chunk, computed once per run for a model whose write does not read
    its memory, in one file: chunk c's rows [L, n_c, d] are records offset_c.. (layer by layer). A sample's
    state holds the file under ids it chooses (`MemoryState.attach_rows`) and injects a chunk's first
    `tokens` rows (the same rows as encoding the cut chunk: encoding is causal)."""

    def __init__(self, file: FileArray, lengths: list[int], layers: int):
        self.file, self.lengths, self.layers = file, lengths, layers
        self.offsets = [0]
        for n in lengths:
            self.offsets.append(self.offsets[-1] + layers * n)

    @classmethod
    def build(
        cls, lm: mp.MemoryLLM, chunks: list[torch.Tensor], path: Path, dtype: torch.dtype, on_chunk=lambda: None
    ) -> EncodedPool:
        """Encode `chunks` into `path` (written atomically); reused when `path` exists
        with the same chunks (a resumed run)."""
        lengths = [len(c) for c in chunks]
        L, d = lm.cfg.num_layers, lm.cfg.hidden_size
        records = L * sum(lengths)
        if not (path.is_file() and path.stat().st_size == records * d * dtype.itemsize):
            with atomic_file(path) as f:
                for ids in chunks:
                    delta = lm.compute_delta(ids, lm.initial_state)  # [L, n, d]
                    f.write(delta.to(dtype).cpu().contiguous().view(torch.uint8).numpy().tobytes())
                    on_chunk()
        return cls(FileArray(path, records, d, dtype), lengths, L)

    def ids(self, first: int, piece: Piece) -> torch.Tensor:
        """Row ids [L, tokens] of a piece, for a state that holds the file from id `first`."""
        n = self.lengths[piece.chunk]
        start = first + self.offsets[piece.chunk]
        return start + n * torch.arange(self.layers)[:, None] + torch.arange(piece.tokens)

    def rows(self, piece: Piece) -> torch.Tensor:
        """The piece's rows [L, tokens, d]."""
        return self.file.read(self.ids(0, piece).reshape(-1)).view(self.layers, piece.tokens, self.file.width)


def evidence_survival(
    state: mp.MemoryState, evidence: torch.Tensor | None, read: dict[int, torch.Tensor]
) -> dict[str, float | str]:
    """The fraction of the evidence's rows in the short-term and (M+) long-term memory, each the mean over
    layers; the fraction of the rows the question retrieved that the evidence wrote (M+); and the evidence
    tokens the question read (its rows in the question's prefix: the short-term memory and what it retrieved,
    the mean over layers), so a miss says whether the memory lost the evidence or the model misread it;
    "" where it does not apply (controls, MemoryLLM's LTM)."""
    if evidence is None:
        return dict.fromkeys(SURVIVAL, "")
    held = survival(state, evidence)
    retrieved = [share(state.origins, ids, evidence) for ids in read.values()]
    stm = [torch.isin(state.origins.injections(ids), evidence).sum() for ids in state.memory_ids]  # per layer
    got = [torch.isin(state.origins.injections(ids), evidence).sum() for ids in read.values()]
    return {
        "evidence_stm": round(held["stm"], 6),
        "evidence_ltm": round(held["ltm"], 6) if "ltm" in held else "",
        "evidence_retrieved": round(sum(retrieved) / len(retrieved), 6) if retrieved else "",
        "evidence_read": round(float(sum(stm) + sum(got)) / len(stm), 1),
    }


def context_window(lm: mp.MemoryLLM) -> int:
    """The model's context window (ModelConfig.context_window), which full-context needs."""
    if lm.cfg.context_window is None:
        raise DataError("the model's config.json has no max_position_embeddings: cannot run full-context")
    return lm.cfg.context_window


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
        cache_dir: Path | None = None,
    ):
        """cache_dir: where the rows of the distractor pool are kept for a model whose write does not read its
        memory (None: encode every chunk again for every sample)."""
        if sweep.protocol.carry_memory and memory_dir is None:
            raise ValueError("a protocol that carries memory across samples needs a memory_dir to resume from")
        self.lm, self.name, self.sweep, self.log, self.memory_dir = lm, model_name, sweep, log, memory_dir
        self.planner = Planner(sweep, lm.tokenizer)
        self.settings = mp.DecodeSettings(max_new_tokens=sweep.protocol.max_new_tokens, stop_token_ids=tuple(stop_ids))
        self.dtype = mp.storage_dtype(lm)  # rows are kept as a session of this model keeps them
        self.cache_dir, self._encoded = cache_dir, None
        built = [build_system(spec, lm) for spec in sweep.systems]
        self.systems: dict[str, MemorySystem] = {label(system): system for system in built}  # by results label
        self.twin: str | None = None  # an earlier model of the run with this one's base: its control rows are ours

    @property
    def base(self) -> tuple | None:
        """What the controls' answers depend on: the weights' files, the tokenizer, dtype, device, window, chat
        and stop tokens. Two models of a run with the same base (two flavours of one checkpoint) ask every
        control alike. None for a model built in memory (no files name its weights)."""
        if not self.lm.info.path:
            return None
        lm, asking = self.lm, (self.sweep.protocol.chat, self.settings.stop_token_ids)
        weights = (lm.info.path, lm.info.revision, str(lm.dtype), str(lm.device), context_window(lm))
        return (*weights, getattr(lm.tokenizer, "name_or_path", ""), len(lm.tokenizer), *asking)

    def shares(self, control: str) -> bool:
        """Whether a control's rows are copied from the twin: full-context always, closed-book when this
        model's initial memory is empty (it then reads nothing but the base model)."""
        if self.twin is None or control not in CONTROLS:
            return False
        ltm = self.initial.ltm
        return control == FULL_CONTEXT or (self.initial.rows_per_layer == 0 and (ltm is None or not any(ltm.sizes())))

    @cached_property
    def initial(self) -> mp.MemoryState:
        """The model's initial memory, for closed-book questions (asking never changes a state)."""
        return self.lm.new_state(self.sweep.seed, self.dtype)

    @property
    def reuses_rows(self) -> bool:
        """Whether the distractor pool's rows are computed once per run (a model whose write does not read its
        memory, clean protocol, a cache directory)."""
        return not (self.cache_dir is None or self.lm.writes_read_memory or self.sweep.protocol.carry_memory)

    def encoded_pool(self, on_status: Callable[[str], None] = lambda text: None) -> EncodedPool | None:
        """The distractor pool's rows, encoded on first use, when this model's rows can be reused."""
        if not self.reuses_rows:
            return None
        if self._encoded is None:
            pool, encoded = self.planner.pool, itertools.count(1)

            def progress() -> None:
                on_status(f"{self.name} · encoding the distractors once: chunk {next(encoded)}/{len(pool)}")

            self.cache_dir.mkdir(parents=True, exist_ok=True)
            path = self.cache_dir / pool_file(self.lm, self.dtype)
            self._encoded = EncodedPool.build(self.lm, pool, path, self.dtype, progress)
        return self._encoded

    def rough_seconds(self, samples: Sequence[Sample], done: Collection[tuple[str, str]] = ()) -> float:
        """A rough estimate of the time the units of `samples` not `done` ((sample id, control)) take, from one
        distractor chunk encoded and written into a fresh state and one question asked from it (a fuller
        memory takes longer)."""
        if not samples:
            return 0.0
        stages = self.planner.stages(samples[0])
        chunk = next((c for stage in stages for c in stage.chunks), None)
        state = self.lm.new_state(self.sweep.seed, self.dtype)
        encode = write = 0.0  # seconds per token
        if chunk is not None:
            start = time.perf_counter()
            delta = self.lm.compute_delta(chunk, state)
            middle = time.perf_counter()
            self.lm.update_memory(state, delta)
            encode, write = (middle - start) / len(chunk), (time.perf_counter() - middle) / len(chunk)
        start = time.perf_counter()
        mp.generate(self.lm, state, self.planner.question(samples[0]), self.settings)
        per_question = time.perf_counter() - start

        def left(control: str) -> int:
            return sum((sample.id, control) not in done for sample in samples)

        distractors, memory = stages[-1].distance, left(MEMORY)  # distractor tokens per sample
        seconds = encode * distractors * (min(memory, 1) if self.reuses_rows else memory) + write * distractors * memory
        own = [control for control in self.sweep.controls if not self.shares(control)]  # the twin's are copied
        questions = len(stages) * memory + (left(CLOSED_BOOK) if CLOSED_BOOK in own else 0)
        in_prompt = [c for c in own if c == FULL_CONTEXT] + list(self.systems)  # read text each time
        read = sum(min(stage.distance, context_window(self.lm)) for stage in stages) if in_prompt else 0  # per sample
        for control in in_prompt:
            seconds += encode * left(control) * read
            questions += left(control) * len(stages)
        return seconds + questions * per_question

    def run(
        self,
        samples: Sequence[Sample],
        on_status: Callable[[str], None] = lambda text: None,
        on_tokens: Callable[[int], None] = lambda n: None,
        on_sample: Callable[[float], None] = lambda seconds: None,
        batch_size: int = 1,
    ) -> None:
        """Skip the units already in the log (dropping incomplete ones first), run the rest in order, the
        memory units of `batch_size` samples at once (clean protocol). on_tokens(n): n distractor tokens
        injected; on_sample(seconds): a sample's units ran in that time."""
        if batch_size > 1 and self.sweep.protocol.carry_memory:
            raise ValueError("the authors protocol carries one memory from sample to sample: use batch size 1")
        n_stages = len(self.planner.stages(samples[0])) if samples else 0
        expected = {MEMORY: n_stages, FULL_CONTEXT: n_stages, CLOSED_BOOK: 1} | dict.fromkeys(self.systems, n_stages)
        done = self.log.complete_units(self.name, expected, self.sweep.seed)
        carried = self._resume_carried(samples, done) if self.sweep.protocol.carry_memory else None
        if any((sample.id, MEMORY) not in done for sample in samples):
            self.encoded_pool(on_status)  # before the first sample, so that it times a sample alone
        for first in range(0, len(samples), batch_size):
            group = samples[first : first + batch_size]
            start = time.perf_counter()
            batched = {} if carried is not None else self.batched_memory_units(group, done, first, on_status, on_tokens)
            shared = (time.perf_counter() - start) / len(group)  # the batch's time, split over its samples
            for index, sample in enumerate(group, start=first):
                start = time.perf_counter()
                conditions = (MEMORY, *self.sweep.controls, *self.systems)
                todo = [control for control in conditions if (sample.id, control) not in done]
                where = f"{self.name} · sample {index + 1}/{len(samples)}"
                for control in todo:
                    on_status(f"{where} · {control}")
                    if control == MEMORY and sample.id in batched:
                        self.log.append(batched[sample.id])
                    elif control == MEMORY:
                        self.carried_memory_unit(index, sample, carried, where, on_status, on_tokens)
                    else:
                        self.control_unit(sample, control)
                if todo:
                    on_sample(time.perf_counter() - start + shared)

    def batched_memory_units(
        self,
        group: Sequence[Sample],
        done: set[tuple[str, str]],
        first: int,
        on_status: Callable[[str], None],
        on_tokens: Callable[[int], None],
    ) -> dict[str, list[dict]]:
        """{sample id: rows} of the memory units of `group` not done yet, run together from fresh memories."""
        todo = [sample for sample in group if (sample.id, MEMORY) not in done]
        if not todo:
            return {}
        states = [self.lm.new_state(sample_seed(self.sweep.seed, sample.id), self.dtype) for sample in todo]
        where = f"{self.name} · sample {first + 1}" + (f"-{first + len(group)}" if len(group) > 1 else "")
        units = self.memory_units(
            todo, states, lambda d: on_status(f"{where} · {format_size(d)}"), self.encoded_pool(on_status), on_tokens
        )
        return {sample.id: rows for sample, rows in zip(todo, units, strict=True)}

    def carried_memory_unit(
        self,
        index: int,
        sample: Sample,
        carried: mp.MemoryState,
        where: str,
        on_status: Callable[[str], None],
        on_tokens: Callable[[int], None],
    ) -> None:
        """The memory unit of the authors protocol: the memory carried from the samples before, saved before
        the rows are written (a crash before they are redoes this sample from after-{index})."""
        rows = self.memory_units(
            [sample], [carried], lambda d: on_status(f"{where} · {format_size(d)}"), None, on_tokens
        )
        self._save_carried(index + 1, carried)
        self.log.append(rows[0])
        shutil.rmtree(self._carried_path(index), ignore_errors=True)

    def control_unit(self, sample: Sample, control: str) -> None:
        if self.shares(control) and (rows := self.twin_rows(sample, control)):
            self.log.append(rows)
        elif control in self.systems:
            self.log.append(self.system_unit(sample, control))
        elif control == CLOSED_BOOK:
            self.log.append(self.ask([sample], [self.initial], [self.planner.question(sample)], CLOSED_BOOK))
        else:
            self.log.append(self.full_context_unit(sample))

    def twin_rows(self, sample: Sample, control: str) -> list[dict]:
        """The twin's rows of a control unit (an empty list if it has none), as this model's rows."""
        mine = {"model": self.name, "memory_kind": self.lm.cfg.kind}
        return [row | mine for row in self.twin_units.get((sample.id, control), [])]

    @cached_property
    def twin_units(self) -> dict[tuple[str, str], list[dict]]:
        """The twin's rows under this sweep's seed by (sample id, control), read from the log once: the twin ran
        all its units before this model started."""
        units: dict[tuple[str, str], list[dict]] = {}
        for row in self.log.rows:
            if (row["model"], row["seed"]) == (self.twin, str(self.sweep.seed)):
                units.setdefault((row["sample_id"], row["control"]), []).append(row)
        return units

    # -- the three kinds of unit ---------------------------------------------------------------
    def memory_units(
        self,
        samples: Sequence[Sample],
        states: Sequence[mp.MemoryState],
        on_distance: Callable[[int], None],
        pool: EncodedPool | None = None,
        on_tokens: Callable[[int], None] = lambda n: None,
    ) -> list[list[dict]]:
        """Each sample's evidence into its state, then the distractors, asking at every distance (the samples'
        distractor chunks have the same sizes: they are written, and the questions asked, in one batch);
        `pool`: the distractors' rows, computed once; on_tokens(n) after each distractor chunk of n tokens."""
        firsts = [state.attach_rows(pool.file) if pool is not None else 0 for state in states]
        evidence = []
        for sample, state, first in zip(samples, states, firsts, strict=True):
            for piece in self.planner.prelude(sample):
                self.inject_piece(state, piece, pool, first)
            before = state.injections
            for chunk in self.planner.evidence(sample):
                self.lm.inject(state, chunk)
            evidence.append(torch.arange(before + 1, state.injections + 1))  # the injections that wrote it
        after_evidence = [state.tokens_injected for state in states]
        questions = [self.planner.question(sample) for sample in samples]
        rows: list[list[dict]] = [[] for _ in samples]
        for stages in zip(*(self.planner.stages(sample) for sample in samples), strict=True):
            on_distance(stages[0].distance)
            for j, size in enumerate(len(chunk) for chunk in stages[0].chunks):
                if pool is None:
                    self.lm.inject_batch(states, torch.stack([stage.chunks[j] for stage in stages]))
                else:
                    for state, stage, first in zip(states, stages, firsts, strict=True):
                        self.inject_piece(state, stage.pieces[j], pool, first)
                on_tokens(size * len(states))
            distances = [state.tokens_injected - after for state, after in zip(states, after_evidence, strict=True)]
            asked = self.ask(samples, states, questions, MEMORY, distances, stages[0].n_distractors, evidence)
            for sample_rows, row in zip(rows, asked, strict=True):
                sample_rows.append(row)
        return rows

    def inject_piece(self, state: mp.MemoryState, piece: Piece, pool: EncodedPool | None, first: int) -> None:
        """Inject a piece of the pool: its rows computed once (`pool`, held by the state from id `first`) or
        its text."""
        if pool is None:
            self.lm.inject(state, self.planner.ids([piece])[0])
        else:
            self.lm.inject_rows(state, pool.rows(piece), piece.tokens, pool.ids(first, piece))

    def full_context_unit(self, sample: Sample) -> list[dict]:
        """Evidence, the distractors up to each point and the question as one prompt; the context keeps its
        last (window - question - answer) tokens."""
        question, rows = self.planner.question(sample), []
        chunks = self.planner.ids(self.planner.prelude(sample))
        chunks += self.planner.evidence(sample)
        budget = context_window(self.lm) - len(question) - self.settings.max_new_tokens
        if budget <= 0:
            raise DataError(f"the question of sample {sample.id} does not fit the model's context window")
        for stage in self.planner.stages(sample):
            chunks = chunks + stage.chunks
            context = torch.cat(chunks).tolist()[-budget:]
            prompt = context + question
            rows += self.ask(
                [sample], [no_memory(self.lm)], [prompt], FULL_CONTEXT, [stage.distance], stage.n_distractors
            )
        return rows

    def system_unit(self, sample: Sample, name: str) -> list[dict]:
        """A memory system told what the model's memory is told (the haystack before a needle, the evidence,
        then the distractors), asked at every distance; reset with the sample's seed."""
        system, question = self.systems[name], self.planner.question(sample)
        system.reset(sample_seed(self.sweep.seed, sample.id))
        for chunk in [*self.planner.ids(self.planner.prelude(sample)), *self.planner.evidence(sample)]:
            system.inject(chunk)
        rows = []
        for stage in self.planner.stages(sample):
            for chunk in stage.chunks:
                system.inject(chunk)
            answer = system.ask(question, self.settings)
            row = self.result_row(sample, answer.token_ids, name, stage.distance, stage.n_distractors, answer.seconds)
            rows.append(row | dict.fromkeys(SURVIVAL, ""))
        return rows

    def ask(
        self,
        samples: Sequence[Sample],
        states: Sequence[mp.MemoryState],
        prompts: Sequence[list[int]],
        control: str,
        distances: Sequence[int] = (0,),
        n_distractors: int = 0,
        evidence: Sequence[torch.Tensor] | None = None,
    ) -> list[dict]:
        """The results rows of questions asked together, sample i's from states[i]; with `evidence` (per
        sample, the injections that wrote it), how much of it the memory held and the question read.
        latency_ms is the batch's time over its size."""
        recording = evidence is not None and isinstance(self.lm, mp.MPlus)
        start = time.perf_counter()
        with retrievals_by_state(self.lm) if recording else contextlib.nullcontext({}) as read:
            outs = mp.generate_batch(self.lm, states, prompts, self.settings)
        seconds = (time.perf_counter() - start) / len(samples)
        evidence = evidence if evidence is not None else [None] * len(samples)
        return [
            self.result_row(sample, out.token_ids, control, distance, n_distractors, seconds)
            | evidence_survival(state, written, read.get(id(state), {}))
            for sample, state, out, distance, written in zip(samples, states, outs, distances, evidence, strict=True)
        ]

    def result_row(
        self, sample: Sample, token_ids: list[int], control: str, distance: int, n_distractors: int, seconds: float
    ) -> dict:
        prediction = decode(self.lm.tokenizer, token_ids)
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
            "latency_ms": round(seconds * 1000, 1),
            "seed": self.sweep.seed,
            "depth": "" if sample.depth is None else sample.depth,
            "haystack_tokens": "" if sample.haystack is None else sample.haystack,
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
            state = self.lm.new_state(self.sweep.seed, self.dtype)
        elif self._carried_path(n).is_dir():
            state = mp.MemoryState.load(self._carried_path(n), device=self.lm.device)
        else:
            raise ResumeError(f"the memory after {n} samples is missing ({self._carried_path(n)}): cannot resume")
        if self.memory_dir.is_dir():
            for stale in self.memory_dir.iterdir():
                if stale.name != f"after-{n}":
                    shutil.rmtree(stale, ignore_errors=True)
        return state
