"""`mplus bench speed`: what each speed optimization buys, measured next to its baseline in the same process.

Figures (each a pair: the optimized code path and a baseline, with their ratio):
- inject tokens/s: `compute_delta` vs the authors' injection (every layer computes all query rows, a KV
  cache is filled and the logits are computed);
- ask time to first token and decode tokens/s: `generate` reusing the memory keys/values cached on the
  state by a previous question vs recomputing them (the authors' way);
- M+ LTM retrieval per layer at several LTM sizes: `MPlus.retrieve` vs the authors' per-call procedure;
- M+ inject cost with a large vs a small LTM, in memory and into a session (time and bytes);
- the session store: bytes written and wall time per inject as the session grows, and the time to open
  and load it, vs writing / reading the whole state (`MemoryState.save` / `load`).

Every time is the median of a few repeats after a warm-up, synchronized on CUDA. Random models come in
three shapes: `tiny` (the tiny presets), `small` (hidden 512 x 8 layers, 10k memory rows per layer: CPU
sized) and `8b` (the shapes of memoryllm-8b / mplus-8b: GPU sized); or benchmark a loaded model.

This module holds the shapes, the in-memory measurements and `run`; the baselines are in `tasks.baselines`,
the store's figures in `tasks.speed_store`, the random models and LTMs in `tasks.random_models`, the clocks in
`tasks.timing` and `Figure` / `Report` in `tasks.figures`.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch

import model as mp
from model.memory.ltm import LongTermMemory
from model.systems import build_system, label
from model.systems.baselines import no_memory
from model.zoo.registry import MODELS

from .baselines import authors_ask, authors_delta, authors_inject, authors_retrieve
from .figures import Figure, Report
from .random_models import first_rows, initial_with_ltm, random_ids, random_ltm, random_model_with_memory, with_ltm
from .speed_store import measure_ltm_session, measure_store
from .timing import clock, machine_info, paired, sync


# -- shapes: the registry's bench models with their workloads ------------------------------------------
@dataclass(frozen=True)
class Shape:
    """A random-model benchmark setup: both flavours' configs and the workload sizes."""

    name: str
    memoryllm: dict[str, Any]
    mplus: dict[str, Any]
    inject_tokens: int  # tokens per injection (the CLI's default chunk is 512)
    prompt_tokens: int  # question length
    new_tokens: int  # answer length
    ltm_rows: tuple[int, ...]  # LTM sizes per layer for the M+ figures
    store_injects: tuple[int, ...] = (1, 10, 50)  # session sizes (in injects) at which the store is measured


ShapeName = Literal["tiny", "small", "8b"]
SHAPES = {
    "tiny": Shape("tiny", MODELS["tiny"].hf, MODELS["tiny-mplus"].hf, 64, 8, 8, (64, 256, 960)),
    "small": Shape("small", MODELS["small"].hf, MODELS["small-mplus"].hf, 512, 32, 16, (10_000, 40_000, 150_000)),
    "8b": Shape("8b", MODELS["8b"].hf, MODELS["8b-mplus"].hf, 512, 32, 32, (10_000, 40_000, 150_000)),
}


BATCH = 8  # samples per batch in the batched-samples figure
INJECT_ROWS = 1_280  # the smaller memory of the inject figures (rows/layer)


# -- measurements -----------------------------------------------------------------------------------
def measure_inject(model: mp.MemoryLLM, tokens: int, repeats: int) -> list[Figure]:
    """A MemoryLLM's injection in tokens/s, the new rows and the memory's update (`model.inject` vs
    `authors_inject`), into its memory and into a memory of its last INJECT_ROWS rows per layer."""
    ids = random_ids(tokens, model.cfg.vocab_size)
    detail = (
        "model.inject (no logits, no KV cache, last layer: K rows; survivors moved in place) vs logits + KV "
        "cache + all rows, survivors gathered and concatenated with the new rows; the same memory after each"
    )
    figures = []
    for rows in sorted({min(INJECT_ROWS, model.cfg.memory_rows), model.cfg.memory_rows}):
        memory = model.initial_state.memory[:, -rows:]  # [L, rows, d]
        ours, theirs = mp.MemoryState(memory.clone()), mp.MemoryState(memory.clone())
        fast, slow = paired(
            partial(model.inject, ours, ids), partial(authors_inject, model, ids, theirs), model.device, repeats
        )
        name = f"inject tok/s ({tokens}-token chunks, {rows:,} memory rows/layer)"
        figures.append(Figure(name, "tok/s", tokens / fast, tokens / slow, target=2.0, detail=detail))
    return figures


def measure_delta(model: mp.MemoryLLM, tokens: int, repeats: int) -> Figure:
    """An M+ model's new rows in tokens/s: compute_delta vs the authors' way (its update is measured with the LTM)."""
    state, ids = model.new_state(0), random_ids(tokens, model.cfg.vocab_size)
    fast, slow = paired(
        lambda: model.compute_delta(ids, state), lambda: authors_delta(model, ids, state), model.device, repeats
    )
    detail = "compute_delta (no logits, no KV cache, last layer: K rows) vs logits + KV cache + all rows"
    return Figure(
        f"new rows tok/s ({tokens}-token chunks)", "tok/s", tokens / fast, tokens / slow, target=1.5, detail=detail
    )


def measure_write(model: mp.MemoryLLM, tokens: int, chunks: int, repeats: int) -> Figure:
    """A training-free model's injection in tokens/s (`model.inject` of `chunks` chunks into one memory: the
    layer inputs, the eviction and, M+, the long-term memory's keys) vs a plain forward of the same model over
    the same chunks (no memory, logits at every position): the lower bound of a write, which must read the
    text once."""
    ids = [random_ids(tokens, model.cfg.vocab_size, seed) for seed in range(chunks)]
    plain = no_memory(model)

    def write() -> None:
        state = model.new_state(0)
        for chunk in ids:
            model.inject(state, chunk)

    fast, slow = paired(write, lambda: [model(chunk[None], plain) for chunk in ids], model.device, repeats)
    detail = f"model.inject of {chunks} chunks into one memory vs the plain model's forward over them"
    total = tokens * chunks
    return Figure(
        f"inject vs a plain forward ({tokens}-token chunks)",
        "tok/s",
        total / fast,
        total / slow,
        target=0.8,
        detail=detail,
    )


def measure_ask(model: mp.MemoryLLM, prompt_tokens: int, new_tokens: int, repeats: int) -> list[Figure]:
    """Time to first token and decode tokens/s of greedy `generate`, memory keys/values reused vs recomputed."""
    state, ids = model.new_state(0), random_ids(prompt_tokens, model.cfg.vocab_size).tolist()
    settings = mp.DecodeSettings(max_new_tokens=new_tokens)

    def ask(reuse: bool) -> tuple[float, float]:
        stamps, answer = [], mp.generate if reuse else authors_ask
        sync(model.device)
        start = time.perf_counter()  # on_token runs after an argmax was read back: synchronized
        answer(model, state, ids, settings, on_token=lambda _: stamps.append(time.perf_counter()))
        return stamps[0] - start, (len(stamps) - 1) / (stamps[-1] - stamps[0])

    ask(True), ask(False)  # warm-up; the first leaves the memory keys/values cached on the state
    runs = [(ask(True), ask(False)) for _ in range(repeats)]
    ttft = [statistics.median(run[i][0] for run in runs) for i in (0, 1)]
    decode = [statistics.median(run[i][1] for run in runs) for i in (0, 1)]
    rows = f"{state.rows_per_layer} memory rows/layer"
    detail = "memory keys/values cached by a previous question vs recomputed for every question"
    return [
        Figure(f"ask time to first token ({rows}, {prompt_tokens}-token prompt)", "s", *ttft, target=5, detail=detail),
        Figure(f"ask decode tok/s ({rows})", "tok/s", *decode, detail=detail),
    ]


BASELINES = ("bm25", "truncate", "snapkv", "snapkv:question=aware")  # timed per question beside memory


def measure_systems(model: mp.MemoryLLM, tokens: int, new_tokens: int, repeats: int) -> list[Figure]:
    """Per question, after `tokens` tokens were injected in chunks of 512: the model's memory answering vs
    each baseline system (the model without memory, reading text or kept keys before the question), greedy,
    `new_tokens` new."""
    ids = random_ids(tokens, model.cfg.vocab_size)
    question = random_ids(16, model.cfg.vocab_size, seed=1).tolist()
    settings = mp.DecodeSettings(max_new_tokens=new_tokens)
    systems = [build_system(spec, model) for spec in ("memory", *BASELINES)]
    for system in systems:
        system.reset(0)
        for chunk in ids.split(512):
            system.inject(chunk)
    memory, *baselines = systems
    figures = []
    for baseline in baselines:
        fast, slow = paired(
            lambda: memory.ask(question, settings), lambda b=baseline: b.ask(question, settings), model.device, repeats
        )
        figures.append(
            Figure(
                f"per question: memory vs {label(baseline)} ({tokens} tokens injected)",
                "s",
                fast,
                slow,
                detail=f"memory.ask vs {label(baseline)}.ask, the same text injected into both",
            )
        )
    return figures


def system_figures(model: mp.MemoryLLM, workload: Shape, repeats: int, log: Callable[[str], None]) -> list[Figure]:
    """measure_systems for a model with a tokenizer and a window (the baselines need both); none otherwise."""
    if model.tokenizer is None or model.cfg.context_window is None:
        return []
    log(f"{model.cfg.kind}: a question from memory vs the baseline systems")
    tokens = min(4 * workload.inject_tokens, model.cfg.context_window // 2)
    return measure_systems(model, tokens, workload.new_tokens, repeats)


def measure_batch(model: mp.MemoryLLM, batch: int, workload: Shape, repeats: int) -> Figure:
    """`batch` samples of a retention sweep (two chunks written into a fresh memory each, then a question)
    run in one batch (inject_batch, generate_batch) vs one sample at a time (inject, generate)."""
    V, tokens = model.cfg.vocab_size, workload.inject_tokens
    chunks = [random_ids(tokens * batch, V, seed).view(batch, tokens) for seed in (1, 2)]  # 2 x [B, tokens]
    prompts = [random_ids(workload.prompt_tokens, V, seed=10 + i).tolist() for i in range(batch)]
    settings = mp.DecodeSettings(max_new_tokens=workload.new_tokens)

    def together() -> None:
        states = [model.new_state(i) for i in range(batch)]
        for ids in chunks:
            model.inject_batch(states, ids)
        mp.generate_batch(model, states, prompts, settings)

    def one_at_a_time() -> None:
        for i in range(batch):
            state = model.new_state(i)
            for ids in chunks:
                model.inject(state, ids[i])
            mp.generate(model, state, prompts[i], settings)

    fast, slow = paired(together, one_at_a_time, model.device, repeats)
    detail = f"inject_batch + generate_batch vs inject + generate per sample ({tokens}-token chunks)"
    return Figure(f"{batch} samples at once (bench retention --batch-size)", "s", fast, slow, target=1.0, detail=detail)


def measure_retrieval(
    model: mp.MPlus, ltm: LongTermMemory, sizes: tuple[int, ...], prompt_tokens: int, repeats: int
) -> list[Figure]:
    """Seconds per layer to pick the T LTM rows for a question, at each LTM size (plus the cached rows)."""
    L, g = model.cfg.num_layers, torch.Generator(model.device).manual_seed(0)
    h = torch.empty(prompt_tokens, model.cfg.hidden_size, device=model.device, dtype=model.dtype).normal_(generator=g)
    figures = []
    for n in sizes:
        state = replace(model.initial_state, ltm=first_rows(ltm, n, cache=True))  # retrieval only reads it
        fast, slow = paired(
            lambda state=state: [model.retrieve(layer, state, h) for layer in range(L)],
            lambda state=state: [authors_retrieve(model, layer, state, h) for layer in range(L)],
            model.device,
            repeats,
        )
        detail = f"MPlus.retrieve vs the authors' get_ltm; {ltm.cache_size} cached dropped rows also scored"
        figures.append(Figure(f"LTM retrieval per layer ({n} LTM rows/layer)", "s", fast / L, slow / L, detail=detail))
    return figures


def measure_ltm_inject(model: mp.MPlus, ltm: LongTermMemory, sizes: tuple[int, int], tokens: int) -> Figure:
    """Seconds per M+ inject with a large vs a small LTM, averaged over one merge cycle (update_ltm_frequency
    injects and their merge) from a freshly built state, as each `mplus inject` starts from a loaded one."""
    ids, cycle = random_ids(tokens, model.cfg.vocab_size), model.cfg.update_ltm_frequency
    model.inject(with_ltm(model, first_rows(ltm, sizes[0])), ids)  # warm-up

    def per_inject(n: int) -> float:
        state = with_ltm(model, first_rows(ltm, n))
        return clock(lambda: [model.inject(state, ids) for _ in range(cycle)], model.device) / cycle

    small, large = per_inject(sizes[0]), per_inject(sizes[1])
    detail = f"model.inject, mean over a {cycle}-inject merge cycle from a fresh state"
    name = f"M+ inject (LTM {sizes[1]} vs {sizes[0]} rows/layer, {tokens} tokens)"
    return Figure(name, "s", large, small, "growth", 1.2, detail)


# -- the run ----------------------------------------------------------------------------------------
def shape_models(shape: Shape, device: torch.device, dtype: torch.dtype) -> list[mp.MemoryLLM]:
    """The random MemoryLLM and M+ models of `shape`."""
    return [
        random_model_with_memory(shape.memoryllm, device, dtype),
        random_model_with_memory(shape.mplus, device, dtype),
    ]


def describe(model: mp.MemoryLLM) -> dict[str, Any]:
    cfg = model.cfg
    sizes = {"layers": cfg.num_layers, "hidden": cfg.hidden_size, "vocab": cfg.vocab_size}
    return {"source": model.info.source, "kind": cfg.kind} | sizes | {"memory_rows": cfg.memory_rows}


def run(
    models: list[mp.MemoryLLM],
    workload: Shape,
    repeats: int = 3,
    ltm_rows: tuple[int, ...] | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> Report:
    """Every figure for `models` with the sizes of `workload`: inject and ask for a MemoryLLM (and for a
    lone M+ model), the LTM figures for an M+ model, the session store for both."""
    start = time.perf_counter()
    sizes = tuple(sorted(ltm_rows or workload.ltm_rows))
    setup = asdict(workload) | {"ltm_rows": list(sizes), "repeats": repeats, "models": [describe(m) for m in models]}
    del setup["memoryllm"], setup["mplus"]
    report = Report(machine_info(models[0].device, models[0].dtype), setup)
    figures = report.figures
    with tempfile.TemporaryDirectory(prefix="mplus-bench-") as tmp:
        for model in models:
            cfg = model.cfg
            if cfg.training_free is not None:  # the demo: no authors' procedure to compare with
                log(f"{cfg.kind}: inject vs a plain forward")
                figures.append(measure_write(model, workload.inject_tokens, 4, repeats))
                log(f"{cfg.kind}: {BATCH} samples at once")
                figures.append(measure_batch(model, BATCH, workload, repeats))
                figures += system_figures(model, workload, repeats, log)
                continue
            if cfg.kind == "memoryllm" or len(models) == 1:
                log(f"{cfg.kind}: inject")
                if cfg.kind == "memoryllm":
                    figures += measure_inject(model, workload.inject_tokens, repeats)
                else:
                    figures.append(measure_delta(model, workload.inject_tokens, repeats))
                log(f"{cfg.kind}: ask")
                figures += measure_ask(model, workload.prompt_tokens, workload.new_tokens, repeats)
                log(f"{cfg.kind}: {BATCH} samples at once")
                figures.append(measure_batch(model, BATCH, workload, repeats))
            if isinstance(model, mp.MPlus):
                log(f"mplus: an LTM of {sizes[-1]} rows/layer")
                ltm = random_ltm(model, sizes[-1], cfg.num_tokens * (cfg.update_ltm_frequency // 2), Path(tmp))
                if model.initial_state.ltm is None:  # a random model: sessions start with the smallest LTM
                    model.initial_state = initial_with_ltm(model, first_rows(ltm, sizes[0]).clone())
                log("mplus: LTM retrieval")
                figures += measure_retrieval(model, ltm, sizes, workload.prompt_tokens, repeats)
                log("mplus: inject with a large vs a small LTM")
                figures.append(measure_ltm_inject(model, ltm, (sizes[0], sizes[-1]), cfg.num_tokens))
                figures += measure_ltm_session(model, ltm, (sizes[0], sizes[-1]), Path(tmp), cfg.num_tokens, repeats)
                del ltm
            figures += system_figures(model, workload, repeats, log)
            log(f"{cfg.kind}: session store")
            figures += measure_store(model, Path(tmp), cfg.num_tokens, workload.store_injects, repeats)
    report.elapsed_s = time.perf_counter() - start
    return report
