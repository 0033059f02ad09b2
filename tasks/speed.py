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
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

import model as mp
from model import store as st
from model.layers import KVCache
from model.ltm import EntryBank, LayerLTM, LongTermMemory
from model.memory import new_generator
from model.mplus import order_oldest_first
from model.presets import TINY_CONFIG, TINY_MPLUS_CONFIG, UNTRAINED_LABEL, random_model
from model.rows import FileArray

# -- shapes -----------------------------------------------------------------------------------------
LORA = {
    "r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
}

SMALL_CONFIG: dict[str, Any] = {
    "architectures": ["MemoryLLM"],
    "vocab_size": 32000,
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "num_tokens": 64,
    "num_blocks": 160,  # 10240 memory rows per layer
    "add_bos_embedding": True,
    "drop_memory_per_layer": True,
    "add_decoder_lora": True,
    "lora_config": LORA,
    "eos_token_id": 2,
}
# M+ flavour, mplus-8b's proportions scaled down: 128 short-term + 32 retrieved blocks, selector 256 * 512/4096
SMALL_MPLUS_CONFIG = SMALL_CONFIG | {
    "architectures": ["MPlus"],
    "num_ltm_blocks": 32,
    "selector_hidden_dim": 32,
    "num_selector_layers": 2,
    "update_ltm_frequency": 60,
    "decay_frequency": 1,
    "initial_rf_when_moving_stm_to_ltm": 10,
}
# memoryllm-8b (spec §2.4) and mplus-8b (Llama-3.1 rope, 40 short-term + 10 retrieved blocks, spec §2.5)
MEMORYLLM_8B_CONFIG: dict[str, Any] = SMALL_CONFIG | {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rope_theta": 500000.0,
    "rope_scaling": {"type": "linear", "factor": 1.8125},
    "num_tokens": 256,
    "num_blocks": 50,  # 12800 memory rows per layer
    "eos_token_id": 128001,
}
MPLUS_8B_CONFIG = MEMORYLLM_8B_CONFIG | {
    "architectures": ["MPlus"],
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "num_ltm_blocks": 10,
    "selector_hidden_dim": 256,
    "num_selector_layers": 2,
    "update_ltm_frequency": 60,
    "decay_frequency": 1,
    "initial_rf_when_moving_stm_to_ltm": 10,
}


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


SHAPES = {
    "tiny": Shape("tiny", TINY_CONFIG, TINY_MPLUS_CONFIG, 64, 8, 8, (64, 256, 960)),
    "small": Shape("small", SMALL_CONFIG, SMALL_MPLUS_CONFIG, 512, 32, 16, (10_000, 40_000, 150_000)),
    "8b": Shape("8b", MEMORYLLM_8B_CONFIG, MPLUS_8B_CONFIG, 512, 32, 32, (10_000, 40_000, 150_000)),
}


# -- figures ----------------------------------------------------------------------------------------
@dataclass
class Figure:
    """One measured pair. `compare` says what the ratio is and what `target` bounds:
    - "speedup": ratio = how many times better the optimized path is (baseline/optimized for seconds and
      bytes, optimized/baseline for tok/s); passes when ratio >= target;
    - "growth": ratio = optimized/baseline (the same code path under a larger load over a smaller one, or a
      cost over what it must at least cost); passes when ratio <= target;
    - "limit": ratio = optimized/baseline (shown only); passes when optimized <= target, in `unit`;
    - "increase": ratio = optimized/baseline; passes when optimized - baseline <= target, in `unit`."""

    name: str
    unit: str  # "s", "tok/s" or "B"
    optimized: float
    baseline: float
    compare: str = "speedup"
    target: float | None = None
    detail: str = ""  # what the two numbers are

    @property
    def ratio_of(self) -> str:
        return "baseline/optimized" if self.compare == "speedup" and self.unit != "tok/s" else "optimized/baseline"

    @property
    def ratio(self) -> float:
        if self.ratio_of == "optimized/baseline":
            return self.optimized / self.baseline
        return self.baseline / self.optimized

    @property
    def increase(self) -> float:
        return self.optimized - self.baseline

    @property
    def passed(self) -> bool | None:
        if self.target is None:
            return None
        measured = {"limit": self.optimized, "increase": self.increase}.get(self.compare, self.ratio)
        return measured >= self.target if self.compare == "speedup" else measured <= self.target

    def target_text(self) -> str:
        if self.target is None:
            return ""
        if self.compare == "limit":
            return f"<= {show(self.target, self.unit)}"
        if self.compare == "increase":
            return f"+ <= {show(self.target, self.unit)}"
        return f"{'>=' if self.compare == 'speedup' else '<='} {self.target:g}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {
            "ratio": self.ratio,
            "ratio_of": self.ratio_of,
            "target": self.target_text() or None,
            "target_value": self.target,
            "passed": self.passed,
        }


def show(value: float, unit: str) -> str:
    """A value in its unit, scaled for reading."""
    if unit == "tok/s":
        return f"{value:,.0f} tok/s" if value >= 100 else f"{value:.1f} tok/s"
    if unit == "B":
        for scale, name in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
            if abs(value) >= scale:
                return f"{value / scale:.2f} {name}"
        return f"{value:.0f} B"
    for scale, name in ((1, "s"), (1e-3, "ms")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {name}"
    return f"{value * 1e6:.0f} µs"


@dataclass
class Report:
    machine: dict[str, Any]
    setup: dict[str, Any]
    figures: list[Figure] = field(default_factory=list)
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "setup": self.setup,
            "figures": [f.to_dict() for f in self.figures],
            "elapsed_s": self.elapsed_s,
        }


def machine_info(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """What the numbers were measured on."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    return {
        "cpu": names[0] if names else platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
    }


# -- timing -----------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds `fn()` takes, with the device synchronized before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def paired(
    optimized: Callable[[], object], baseline: Callable[[], object], device: torch.device, repeats: int
) -> tuple[float, float]:
    """Median seconds of `optimized()` and `baseline()`: one warm-up each, then `repeats` alternating runs."""
    optimized(), baseline()
    times = [(clock(optimized, device), clock(baseline, device)) for _ in range(repeats)]
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def random_ids(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


# -- random models and memories ---------------------------------------------------------------------
def build_model(config: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int = 0) -> mp.MemoryLLM:
    """A random model of `config` with random initial memory on `device` (M+: ages zero, no LTM yet)."""
    model = random_model(config, seed, device, dtype)
    cfg = model.cfg
    generator = torch.Generator(device).manual_seed(seed + 1)
    memory = torch.empty(cfg.num_layers, cfg.memory_rows, cfg.hidden_size, device=device, dtype=dtype)
    model.initial_state = mp.MemoryState(memory=memory.normal_(generator=generator))  # [L, N, d]
    if cfg.kind == "mplus":
        model.initial_state.memory_ages = torch.zeros(cfg.num_layers, cfg.memory_rows, dtype=torch.int64)
    model.info = {"source": f"random {cfg.kind}", "label": UNTRAINED_LABEL}
    return model


def zero_rows(path: Path, count: int, width: int, dtype: torch.dtype) -> FileArray:
    """[count, width] zeros in a sparse file at `path`: no disk is used until something is written."""
    with open(path, "wb") as f:
        f.truncate(count * width * dtype.itemsize)
    return FileArray(path, count, width, dtype)


def block_entries(n: int, first: int, layers: int, block: int) -> torch.Tensor:
    """Entry ids [L, n] of n rows per layer as injections add them from entry `first` on: each injection
    adds a block of K entries per layer, layer after layer (bank order: injection, layer, row)."""
    j = torch.arange(n)
    return first + (j // block * layers * block + j % block) + block * torch.arange(layers)[:, None]


def random_ltm(model: mp.MPlus, rows: int, cached: int, directory: Path, seed: int = 0) -> LongTermMemory:
    """An LTM of `rows` rows per layer plus `cached` dropped rows awaiting the next merge, laid out as
    injections leave it: entries in blocks of K per layer and injection (bank order: injection, layer,
    row), one recall frequency per merge of update_ltm_frequency injections, high enough that nothing is
    pruned; ages count down (oldest first). Keys are random; the rows are zeros in a sparse file in
    `directory` (their content does not change timings; as in a session, they are never all in RAM),
    under the row ids that follow the model's initial memory."""
    cfg, g = model.cfg, torch.Generator().manual_seed(seed)
    L, d, s, K, dtype = cfg.num_layers, cfg.hidden_size, cfg.selector_hidden_dim, cfg.num_tokens, model.dtype
    ltm_blocks = -(-rows // K)
    ltm_entries, cache = block_entries(rows, 0, L, K), block_entries(cached, L * K * ltm_blocks, L, K)  # [L, n], [L, C]
    count = L * K * (ltm_blocks + -(-cached // K))
    births = torch.zeros(count, dtype=torch.int64)
    births[ltm_entries] = torch.arange(rows, 0, -1) * K + cached  # oldest first, older than the cache
    births[cache] = torch.arange(cached, 0, -1)
    keys = torch.randn(count, s, generator=g).to(dtype)  # [E, s]
    space = st.initial_rows(model.initial_state).clone()
    base = space.end
    space.attach(base, zero_rows(directory / f"ltm-{rows}-{cached}.bin", count, d, dtype))
    bank = EntryBank(space, s, None, [(base + torch.arange(count), births, keys)])
    rf = 1e6 - (torch.arange(rows) // (K * cfg.update_ltm_frequency)).flip(0).double()  # one per merge
    layers = [LayerLTM(bank, entries, rf) for entries in ltm_entries]
    return LongTermMemory(bank, layers, cache, update_step=cached)


def first_rows(ltm: LongTermMemory, n: int, cache: bool = False) -> LongTermMemory:
    """The LTM cut to its first n rows per layer (same bank), with its cache (shared) or an empty one:
    entries are views (no copy), recall frequencies copies (merges decay them)."""
    layers = [LayerLTM(ltm.bank, x.entries[:n], x.recall_frequencies[:n]) for x in ltm.layers]
    cached = ltm.cached_entries if cache else torch.empty(len(layers), 0, dtype=torch.int64)
    return LongTermMemory(ltm.bank, layers, cached, ltm.update_step if cache else 0)


def with_ltm(model: mp.MPlus, ltm: LongTermMemory, seed: int = 0) -> mp.MemoryState:
    """A working state: a copy of the model's initial short-term memory and ages, with a copy of `ltm`
    (sharing its read-only parts)."""
    initial, ltm = model.initial_state, ltm.clone()
    return mp.MemoryState(
        memory=initial.memory.clone(),
        generator=new_generator(seed),
        memory_ages=initial.memory_ages.clone(),
        ltm=ltm,
        memory_ids=initial.memory_ids.clone(),
        next_row_id=ltm.rows.end,
    )


def initial_with_ltm(model: mp.MPlus, ltm: LongTermMemory) -> mp.MemoryState:
    """The model's initial state with `ltm` as its initial long-term memory (its row ids follow ltm's)."""
    initial = model.initial_state
    return mp.MemoryState(
        memory=initial.memory,
        memory_ages=initial.memory_ages,
        ltm=ltm,
        memory_ids=initial.memory_ids,
        next_row_id=ltm.rows.end,
    )


# -- baselines: the authors' procedures on our modules -------------------------------------------------
@torch.no_grad()
def authors_delta(model: mp.MemoryLLM, ids: torch.Tensor, state: mp.MemoryState) -> torch.Tensor:
    """`model.compute_delta(ids, state)` computed the way the authors' injection runs (spec §5, §11 item 18):
    every layer, the last one included, computes all max(n, K) query rows, a KV cache is filled, and the
    logits of the n tokens are computed and thrown away. Returns the same delta [L, k, d]."""
    K = model.cfg.num_tokens
    x = model.model.embed_tokens(ids.to(model.device))[None]  # [1, n, d]
    n = x.shape[1]
    memory_block = K if state.initialized else 0
    length = model.n_bos * (memory_block > 0) + memory_block + n
    cos, sin = model._cos_sin(torch.arange(length))
    cache = KVCache(model.cfg, 1, length, model.dtype, model.device)
    n_query = max(n, K) if state.initialized else n
    deltas = []
    for layer, block in enumerate(model.model.layers):
        parts = [x]
        if state.initialized:
            parts.insert(0, model._with_bos(layer, state.memory[layer, -K:])[None])
        h = torch.cat(parts, dim=1)  # [1, bos + K + n, d]
        h[:, -K:] += model.new_memory_positional_emb
        out = block(h, n_query, cos, sin, model.encoder_adapter(), cache, layer)  # [1, n_query, d]
        deltas.append(out[0, -K:])
        x = out[:, -n:]
    model._logits(model.model.norm(x))  # [1, n, V]
    return torch.stack(deltas)  # [L, k, d]


@torch.no_grad()
def authors_retrieve(model: mp.MPlus, layer: int, state: mp.MemoryState, h: torch.Tensor) -> torch.Tensor:
    """The T LTM rows [T, d] (CPU) that `model.retrieve` picks, found the way the authors' `get_ltm` does on
    every call (spec §6.5, §11 item 21): the layer's LTM keys and cached keys are copied to the model's
    device (a copy on the CPU too, standing for the host-to-device transfer) and scored there in the
    activation dtype, then the chosen rows are gathered on the CPU."""
    ltm, T = state.ltm, model.retrieved_rows
    q = model.retrieval_queries(layer, h)  # [n, s]
    keys = (ltm.layers[layer].keys, ltm.cached_keys[layer])  # [N, s], [C, s]
    scores = torch.cat([torch.sigmoid(q @ k.to(q.device, q.dtype, copy=True).T).mean(0) for k in keys])  # [N + C]
    chosen = scores.topk(T).indices.sort().values.cpu()  # [T]
    rows, ages = ltm.candidates(layer, chosen)
    return rows[order_oldest_first(ages)]


# -- measurements -----------------------------------------------------------------------------------
def measure_inject(model: mp.MemoryLLM, tokens: int, repeats: int) -> Figure:
    """Injection (new rows only) in tokens/s: compute_delta vs the authors' way."""
    state, ids = model.new_state(0), random_ids(tokens, model.cfg.vocab_size)
    fast, slow = paired(
        lambda: model.compute_delta(ids, state), lambda: authors_delta(model, ids, state), model.device, repeats
    )
    detail = "compute_delta (no logits, no KV cache, last layer: K rows) vs logits + KV cache + all rows"
    return Figure(
        f"inject tok/s ({tokens}-token chunks)", "tok/s", tokens / fast, tokens / slow, target=1.5, detail=detail
    )


def measure_ask(model: mp.MemoryLLM, prompt_tokens: int, new_tokens: int, repeats: int) -> list[Figure]:
    """Time to first token and decode tokens/s of greedy `generate`, memory keys/values reused vs recomputed."""
    state, ids = model.new_state(0), random_ids(prompt_tokens, model.cfg.vocab_size).tolist()
    settings = mp.DecodeSettings(max_new_tokens=new_tokens)

    def ask(reuse: bool) -> tuple[float, float]:
        stamps = []
        sync(model.device)
        start = time.perf_counter()  # on_token runs after an argmax was read back: synchronized
        mp.generate(
            model, state, ids, settings, on_token=lambda _: stamps.append(time.perf_counter()), reuse_memory_kv=reuse
        )
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


@dataclass
class Commit:
    """One inject committed to a session."""

    inject_s: float  # Writer.inject (the model's injection plus staging)
    commit_s: float  # Writer.commit
    bytes: int  # bytes the commit wrote
    snapshot_s: float | None = None  # baseline: saving the whole state (save_durably) instead of the commit
    snapshot_bytes: int | None = None


def file_table(directory: Path) -> dict[str, tuple[int, int]]:
    """{name: (inode, size)} of the regular files in `directory`."""
    return {p.name: (p.stat().st_ino, p.stat().st_size) for p in directory.iterdir() if p.is_file()}


def bytes_written(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> int:
    """Bytes written between two file tables: new or replaced files whole, appended files' growth."""
    total = 0
    for name, (inode, size) in after.items():
        old = before.get(name)
        total += size - old[1] if old is not None and old[0] == inode and size >= old[1] else size
    return total


def save_durably(state: mp.MemoryState, directory: Path) -> None:
    """MemoryState.save, then fsync, so that the baseline is as durable as a commit."""
    state.save(directory)
    for path in directory.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def session_commits(
    model: mp.MemoryLLM, root: Path, name: str, ids: torch.Tensor, count: int, snapshot_at: set[int] = frozenset()
) -> list[Commit]:
    """Create session `name` and commit `count` injects of `ids` one by one; after the i-th (1-based) for i
    in `snapshot_at`, also time saving the whole state instead (to `root/name.snapshot`)."""
    ref = st.binding(model, model.info.get("source", "bench"))
    session = st.Session.create(root, name, model.initial_state, ref, 0, model.dtype)
    snapshot, commits = root / f"{name}.snapshot", []
    with session.writer() as writer:
        state = writer.load_state(model.initial_state, model.device)
        for i in range(1, count + 1):
            inject_s = clock(lambda: writer.inject(model, state, ids), model.device)
            line = {"source": "bench", "sha256": "", "tokens": int(ids.numel()), "chunks": 1, "at": st.now()}
            before = file_table(session.directory)
            commit_s = clock(lambda line=line: writer.commit(state, [line]), model.device)
            commit = Commit(inject_s, commit_s, bytes_written(before, file_table(session.directory)))
            if i in snapshot_at:
                commit.snapshot_s = clock(lambda: save_durably(state, snapshot), model.device)
                commit.snapshot_bytes = sum(size for _, size in file_table(snapshot).values())
            commits.append(commit)
    return commits


def measure_store(
    model: mp.MemoryLLM, root: Path, tokens: int, checkpoints: tuple[int, ...], repeats: int
) -> list[Figure]:
    """Bytes written and wall time per inject into a session after 1, 10, 50.. injects (medians over that
    inject and the next repeats-1), and the time to open and load it; the baselines save / load the whole
    state (MemoryState.save + fsync / load)."""
    kind, name = model.cfg.kind, f"store-{model.cfg.kind}"
    windows = {i: range(i, i + repeats) for i in checkpoints}
    snapshot_at = {j for window in windows.values() for j in window}
    commits = session_commits(
        model, root, name, random_ids(tokens, model.cfg.vocab_size), max(snapshot_at), snapshot_at
    )
    figures = []
    for i, window in windows.items():
        c = [commits[j - 1] for j in window]
        store_b, snapshot_b = statistics.median(x.bytes for x in c), statistics.median(x.snapshot_bytes for x in c)
        store_s = statistics.median(x.inject_s + x.commit_s for x in c)
        snapshot_s = statistics.median(x.inject_s + x.snapshot_s for x in c)
        at = f"inject #{i}, {tokens} tokens"
        figures += [
            Figure(
                f"{kind} session bytes written per inject ({at})",
                "B",
                store_b,
                snapshot_b,
                detail="commit vs MemoryState.save + fsync",
            ),
            Figure(
                f"{kind} session time per inject ({at})",
                "s",
                store_s,
                snapshot_s,
                detail="Writer.inject + commit vs inject + MemoryState.save + fsync",
            ),
        ]
    fast, slow = paired(
        lambda: st.Session.open(root, name).load_state(model.initial_state, model.device),
        lambda: mp.MemoryState.load(root / f"{name}.snapshot", model.device).clone(),  # load maps lazily: read it all
        model.device,
        repeats,
    )
    detail = "Session.open + load_state vs MemoryState.load + reading every tensor (clone)"
    figures.append(Figure(f"{kind} session open + load ({max(snapshot_at)} injects)", "s", fast, slow, detail=detail))
    return figures


def measure_ltm_session(
    model: mp.MPlus, ltm: LongTermMemory, sizes: tuple[int, int], root: Path, tokens: int, repeats: int
) -> list[Figure]:
    """Wall time and bytes per inject into a session that holds a large vs a small LTM (medians of `repeats`
    single-inject commits after a first one)."""
    ids, initial, medians = random_ids(tokens, model.cfg.vocab_size), model.initial_state, []
    try:
        for n in sizes:
            model.initial_state = initial_with_ltm(model, first_rows(ltm, n))
            commits = session_commits(model, root, f"ltm-{n}", ids, repeats + 1)[1:]
            medians.append(
                (
                    statistics.median(c.inject_s + c.commit_s for c in commits),
                    statistics.median(c.bytes for c in commits),
                )
            )
            st.remove_session(root, f"ltm-{n}")
    finally:
        model.initial_state = initial
    (small_s, small_b), (large_s, large_b) = medians
    what = f"LTM {sizes[1]} vs {sizes[0]} rows/layer, {tokens} tokens"
    return [
        Figure(f"M+ session time per inject ({what})", "s", large_s, small_s, "growth", 1.2, "Writer.inject + commit"),
        Figure(f"M+ session bytes written per inject ({what})", "B", large_b, small_b, "growth", 1.2, "one commit"),
    ]


# -- the run ----------------------------------------------------------------------------------------
def shape_models(shape: Shape, device: torch.device, dtype: torch.dtype) -> list[mp.MemoryLLM]:
    """The random MemoryLLM and M+ models of `shape`."""
    return [build_model(shape.memoryllm, device, dtype), build_model(shape.mplus, device, dtype)]


def describe(model: mp.MemoryLLM) -> dict[str, Any]:
    cfg = model.cfg
    sizes = {"layers": cfg.num_layers, "hidden": cfg.hidden_size, "vocab": cfg.vocab_size}
    return {"source": model.info.get("source"), "kind": cfg.kind} | sizes | {"memory_rows": cfg.memory_rows}


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
            if cfg.kind == "memoryllm" or len(models) == 1:
                log(f"{cfg.kind}: inject")
                figures.append(measure_inject(model, workload.inject_tokens, repeats))
                log(f"{cfg.kind}: ask")
                figures += measure_ask(model, workload.prompt_tokens, workload.new_tokens, repeats)
            if cfg.kind == "mplus":
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
            log(f"{cfg.kind}: session store")
            figures += measure_store(model, Path(tmp), cfg.num_tokens, workload.store_injects, repeats)
    report.elapsed_s = time.perf_counter() - start
    return report
