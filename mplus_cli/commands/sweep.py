"""A retention run as bench retention's options describe it: planned, checked, run over the models, finished."""

from __future__ import annotations

import math
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import typer

import model as mp
from model.memory.dtypes import dtype_name
from model.systems import SpecError, described
from model.text.tokenizer import has_chat_template
from tasks import data as qa
from tasks import results as res
from tasks.launch import Launch
from tasks.plan import (
    CHUNK_TOKENS,
    CLOSED_BOOK,
    CONTROLS,
    MEMORY,
    Protocol,
    Sweep,
    check_points,
    protocol_for,
    shard_slice,
)
from tasks.retention import Runner
from tasks.sizes import default_points, format_size, parse_points, parse_size

from ..common import SEED_MAX, asks_in_chat, note_label, stop_ids
from ..devices import describe, pick_device, pick_dtype
from ..errors import EXIT_INTERRUPTED, ConflictError, UsageError
from ..models import load_model, model_id, requested_model
from ..output import approx, duration, emit, plural, progress, token_counter
from ..root import say
from .runs import (
    LAUNCHERS,
    check_same_model,
    check_systems,
    finish_shards,
    merged_config,
    model_identity,
    pick_shard,
    versions,
)

if TYPE_CHECKING:
    import pandas as pd

RESUME_KEYS = ("dataset", "data", "protocol", "points", "seed", "shard", "chunk_tokens", "distractors", "decoding")
DISTRACTORS = "pool of chunk_tokens chunks in source order, taken in a per-sample order; a gap's last chunk is cut"
MAX_DISTANCE = 10_000_000  # tokens: the distractor text alone is about 8 characters per token


def parse_seeds(text: str) -> list[int]:
    """--seeds 0,1,2: distinct seeds in the order given."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"bad --seeds {text!r}: give seeds separated by commas, e.g. 0,1,2") from None
    if any(not 0 <= seed <= SEED_MAX for seed in seeds) or len(set(seeds)) < len(seeds):
        raise ValueError(f"bad --seeds {text!r}: distinct seeds from 0 to {SEED_MAX}")
    return seeds


def parse_controls(text: str) -> list[str]:
    controls = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in controls if c not in CONTROLS]
    if unknown:
        raise ValueError(f"unknown control {unknown[0]!r}: use {' and/or '.join(CONTROLS)}")
    return [c for c in CONTROLS if c in controls]


def data_origin(dataset: str, data_dir: Path | None, split: str = "test") -> str:
    """What identifies the data before it is loaded (compared on --resume)."""
    if dataset == "synthetic":
        return "synthetic"
    if dataset in qa.OFFLINE:
        where = str(data_dir.resolve()) if data_dir else "the installed packages"
        named = dataset == "news" or split == "dev"  # niah's test runs predate its dev needles
        return f"{dataset} ({split} split) from {where}" if named else f"{dataset} from {where}"
    return str(data_dir.resolve()) if data_dir else f"hub {qa.HUB_IDS[dataset]}"


def plan_line(
    n_samples: int,
    points: Sequence[int],
    names: Sequence[str],
    controls: Sequence[str],
    niah: bool = False,
    seeds: int = 1,
) -> str:
    """The run's size: samples x distances x models (x seeds) x conditions, its questions and distractor
    tokens (niah: each sample is one haystack, asked once)."""
    conditions = [MEMORY, *controls]
    runs = len(names) * seeds
    models = plural(len(names), "model") + (f" x {plural(seeds, 'seed')}" if seeds > 1 else "")
    if niah:
        return (
            f"plan: {plural(n_samples, 'haystack')} (needles x lengths {', '.join(map(format_size, points))} x "
            f"depths) x {models} x {plural(len(conditions), 'condition')} "
            f"({', '.join(conditions)}) = {plural(n_samples * runs * len(conditions), 'question')}"
        )
    per_sample = len(points) * (len(conditions) - (CLOSED_BOOK in controls)) + (CLOSED_BOOK in controls)
    span = f"{format_size(points[0])} to {format_size(points[-1])}"
    return (
        f"plan: {plural(n_samples, 'sample')} x {plural(len(points), 'distance')} ({span}) x "
        f"{models} x {plural(len(conditions), 'condition')} ({', '.join(conditions)}) = "
        f"{plural(n_samples * runs * per_sample, 'question')}, "
        f"{format_size(n_samples * points[-1] * runs)} distractor tokens to inject"
    )


class Pace:
    """One model's progress: advances the bar by the tokens it injects and, after its first sample, says how
    long the rest will take at the pace measured on it."""

    def __init__(self, bar, task, name: str, n_samples: int):
        self.bar, self.task, self.name, self.n_samples = bar, task, name, n_samples
        self.tokens, self.samples = 0, 0

    def on_tokens(self, n: int) -> None:
        self.tokens += n
        self.bar.advance(self.task, n)

    def on_sample(self, seconds: float) -> None:
        self.samples += 1
        left = self.n_samples - self.samples
        if self.samples == 1 and left:
            rate = f" ({approx(self.tokens / seconds)} tokens/s)" if self.tokens else ""
            say(
                f"{self.name}: first sample in {duration(seconds)}{rate}: "
                f"about {duration(seconds * left)} for the other {plural(left, 'sample')}"
            )


def empty_warning(name: str, predictions: Sequence[str], chat: bool, has_template: bool) -> str | None:
    """A one-line warning when more than half of a model's predictions are empty, with what to try."""
    empty = sum(not p.strip() for p in predictions)
    if 2 * empty <= len(predictions):
        return None
    hint = (
        "try --no-chat (the model ends its chat turn at once)"
        if chat
        else "try without --no-chat (an instruct model answers in its chat template)"
        if has_template
        else "check the model and its --tokenizer (it stops at once)"
    )
    return f"mplus: warning: {empty} of {len(predictions)} predictions of {name} are empty: {hint}"


def summary_table(summary) -> list[str]:
    """One line per model/control: exact-hit rate at each distance (niah: at each haystack length, the mean
    over depths)."""
    column = "haystack_tokens" if "haystack_tokens" in summary else "distance_tokens"
    distances = sorted(summary[column].unique())
    rows = [["model", "control", *(format_size(int(d)) for d in distances)]]
    for (model, control), group in summary.groupby(["model", "control"], sort=False):
        rate = group.groupby(column).exact_hit.mean().to_dict()
        rows.append([model, control, *(f"{rate[d]:.2f}" if d in rate else "-" for d in distances)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def json_records(summary) -> list[dict[str, Any]]:
    """Summary rows for --json (NaN intervals become null)."""
    return [
        {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
        for row in summary.to_dict("records")
    ]


@dataclass(frozen=True)
class RetentionOptions:
    """bench retention's options as the command line gives them (the one list of them)."""

    dataset: str
    max_distance: str
    models: list[str]
    protocol: str = "clean"
    points: str | None = None
    controls: str = ""
    systems: list[str] = field(default_factory=list)
    limit: int = 100
    seed: int = 0
    seeds: str | None = None
    shard: str | None = None
    output_path: Path | None = None
    device: str = "auto"
    dtype: str | None = None
    data_dir: Path | None = None
    chat: bool | None = None
    tokenizer: str | None = None
    batch_size: int = 1
    split: str = "test"


@dataclass(frozen=True)
class RetentionPlan:
    """A retention run: its options, and what they give once checked."""

    options: RetentionOptions
    proto: Protocol
    max_distance: int
    points: list[int]
    controls: list[str]
    seeds: list[int]  # each sample runs under each of these seeds (drops and distractor order)
    launch: Launch
    shard: tuple[int, int]  # this process's slice of the samples
    out: Path  # the run's directory (under torchrun, the one the shards merge into)
    device: torch.device
    dtype: torch.dtype

    @property
    def run_dir(self) -> Path:
        """Where this process writes: the output directory, or its shard's directory under a launcher."""
        return self.launch.directory(self.out)

    @property
    def shard_text(self) -> str:
        return f"{self.shard[0]}/{self.shard[1]}"


def plan_retention(options: RetentionOptions) -> RetentionPlan:
    """The run that bench retention's options describe, in the launch that started this process; one-line
    usage errors for options that do not make one."""
    o = options
    try:
        if o.dataset not in qa.DATASETS:
            raise ValueError(f"unknown dataset {o.dataset!r}: use one of {', '.join(qa.DATASETS)}")
        proto = protocol_for(o.protocol, o.dataset)
        if o.split not in ("dev", "test"):
            raise ValueError(f"unknown split {o.split!r}: use dev or test")
        largest, distances = parse_distances(o.max_distance, o.points)
        if o.dataset == "niah":  # haystack lengths, not distances
            distances = [d for d in distances if d > 0]
            if distances[0] < 64:
                raise ValueError("--points of niah are haystack lengths of at least 64 tokens")
            if o.protocol != "clean" or o.batch_size > 1:
                raise ValueError("niah runs one haystack at a time: use --protocol clean and --batch-size 1")
        launch, shard_i, shard_n = pick_shard(o.shard)
        control_list = parse_controls(o.controls)
        seeds = parse_seeds(o.seeds) if o.seeds else [o.seed]
        if o.seeds and o.seed:
            raise ValueError("--seed and --seeds both given: --seeds 0,1,2 lists every seed")
        check_systems(o.systems)
    except ValueError as e:
        raise UsageError(str(e)) from e
    if proto.carry_memory and shard_n > 1:
        how = f"sharding over {shard_n} {LAUNCHERS[launch.launcher]}" if launch.launcher else "--shard"
        raise UsageError(f"{how} needs --protocol clean: the authors protocol carries memory from sample to sample")
    if len(set(o.models)) < len(o.models):
        raise UsageError("a --model is given twice")
    if proto.carry_memory and o.batch_size > 1:
        raise UsageError(
            "--batch-size needs --protocol clean: the authors protocol carries memory from sample to sample"
        )
    target = pick_device(o.device, launch.local_rank)
    suffix = f"-shard{shard_i}of{shard_n}" if shard_n > 1 and not launch.launcher else ""
    return RetentionPlan(
        options=o,
        proto=proto,
        max_distance=largest,
        points=distances,
        controls=control_list,
        seeds=seeds,
        launch=launch,
        shard=(shard_i, shard_n),
        out=o.output_path or Path(f"retention-{o.dataset}-{o.protocol}{suffix}"),
        device=target,
        dtype=pick_dtype(o.dtype, target),
    )


def parse_distances(max_distance: str, points: str | None) -> tuple[int, list[int]]:
    """--max-distance and --points: (the largest distance, the sorted distances)."""
    largest = parse_size(max_distance)
    if largest > MAX_DISTANCE:
        raise ValueError(f"--max-distance {max_distance} is beyond the limit of {format_size(MAX_DISTANCE)} tokens")
    distances = parse_points(points) if points else default_points(largest)
    check_points(distances)
    if distances[-1] > largest:
        raise ValueError(f"--points reach {format_size(distances[-1])}, beyond --max-distance {max_distance}")
    return largest, distances


def retention_config(plan: RetentionPlan) -> dict[str, Any]:
    """config.json of the run before its data is loaded and its models run."""
    proto = plan.proto
    return {
        "command": "mplus bench retention",
        "dataset": plan.options.dataset,
        "data": data_origin(plan.options.dataset, plan.options.data_dir, plan.options.split),
        "protocol": plan.options.protocol,
        "max_distance": plan.max_distance,
        "points": plan.points,
        "limit": plan.options.limit,
        "seed": plan.seeds[0] if len(plan.seeds) == 1 else plan.seeds,
        "shard": plan.shard_text,
        "models": plan.options.models,
        "controls": plan.controls,
        "systems": plan.options.systems,
        "chunk_tokens": CHUNK_TOKENS,
        "distractors": DISTRACTORS if not proto.carry_memory else "the authors' list",
        "decoding": {
            "greedy": True,
            "max_new_tokens": proto.max_new_tokens,
            "context_template": proto.context_template,
            "question_template": proto.question_template,  # a model with "chat" in model_details: the question alone
            "truncate_tokens": proto.truncate_tokens,
            # as given; model_details: each model's choice
            "chat": "auto" if plan.options.chat is None else plan.options.chat,
        },
        "output_path": str(plan.run_dir),
        "batch_size": plan.options.batch_size,
        "launcher": plan.launch.launcher or None,
        "device": describe(plan.device),
        "versions": versions(),
        "created": res.now(),
        "model_details": {},
    }


def check_output(plan: RetentionPlan, resume: bool) -> None:
    """Refuse to write over results without --resume (under torchrun: the shard's and the merged ones)."""
    for directory in dict.fromkeys([plan.run_dir, *([plan.out] if plan.launch.group else [])]):
        if res.holds_results(directory / "results.csv") and not resume:
            raise ConflictError(
                f"{directory} already holds results: pass --resume to continue them or choose another --output"
            )


def run_sweep(plan: RetentionPlan, config: dict[str, Any]) -> tuple[int, list[str], dict[str, Any]]:
    """Load the data, run every model over this process's samples into results.csv; returns (the number of
    samples, the warnings about mostly empty predictions, the config with each model's details)."""
    data_dir = None if plan.options.dataset == "synthetic" else plan.options.data_dir
    chars, authors = 8 * plan.max_distance + 8 * CHUNK_TOKENS, plan.proto.carry_memory
    data = qa.load(
        plan.options.dataset,
        limit=plan.options.limit,
        data_dir=data_dir,
        distractor_chars=chars,
        authors=authors,
        split=plan.options.split,
        lengths=tuple(plan.points),
    )
    samples = shard_slice(data.samples, *plan.shard)
    sweep = Sweep(data, plan.proto, plan.points, tuple(plan.controls), plan.seeds[0], tuple(plan.options.systems))
    out = plan.run_dir
    out.mkdir(parents=True, exist_ok=True)
    config = merged_config(out / "config.json", config | {"data_source": data.source})
    res.write_config(out / "config.json", config)
    log = res.ResultsLog(out / "results.csv")
    conditions = [*plan.controls, *plan.options.systems]
    niah = plan.options.dataset == "niah"
    say(plan_line(len(samples), plan.points, plan.options.models, conditions, niah, len(plan.seeds)))
    try:
        warnings = run_models(plan, samples, sweep, log, config)
    except KeyboardInterrupt:
        say(f"mplus: interrupted; finished samples are kept in {out}: rerun with --resume to continue")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    shutil.rmtree(out / "cache", ignore_errors=True)  # encoded distractors: kept only for a --resume
    return len(samples), warnings, config


def finish_sweep(plan: RetentionPlan, config: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """summary.csv, retention.png and the finished config.json: (results, summary); None on torchrun's other
    ranks."""
    return finish_shards(plan.launch, plan.out, plan.device, config, res.finish)


def report_run(
    out: Path,
    results: pd.DataFrame,
    summary: pd.DataFrame,
    n_samples: int,
    title: str,
    warnings: Sequence[str],
    as_json: bool,
) -> None:
    """What a finished (or merged) run wrote, its warnings, and the exact-hit table or the --json summary."""
    niah = "haystack_tokens" in summary
    figure = "niah.png" if niah else "retention.png"
    say(f"wrote {out}/results.csv ({plural(len(results), 'row')}), summary.csv, config.json, {figure}")
    for warning in warnings:
        say(warning)
    if as_json:
        emit({"output_path": str(out), "rows": len(results), "summary": json_records(summary)})
    else:
        by = "haystack length, mean over depths" if niah else "distance"
        typer.echo(f"exact hit by {by} ({plural(n_samples, 'sample')}, {title})")
        typer.echo("\n".join(summary_table(summary)))


def drop_rate(lm: mp.MemoryLLM) -> list[float | int]:
    """[K/N, tokens per injection, tokens before the first drop] of a MemoryLLM model in this bench: each
    distractor chunk of CHUNK_TOKENS tokens writes K rows per layer into N and drops as many, once the
    memory is full (the training-free demo: one row per token, and its memory starts empty)."""
    training_free = lm.cfg.training_free is not None
    rows = CHUNK_TOKENS if training_free else lm.cfg.num_tokens
    return [min(1.0, rows / lm.cfg.memory_rows), CHUNK_TOKENS, lm.cfg.memory_rows if training_free else 0]


def run_models(
    plan: RetentionPlan, samples: list[qa.Sample], sweep: Sweep, log: res.ResultsLog, config: dict[str, Any]
) -> list[str]:
    """Each model in turn over the samples, with a rough estimate of its time once loaded; config.json records
    each model once loaded. Returns a warning for each model whose predictions are mostly empty."""
    out, planned = plan.run_dir, {s.id for s in samples}
    done = {(r["model"], r["sample_id"], r["control"], r["seed"]) for r in log.rows if r["sample_id"] in planned}
    models, seeds = plan.options.models, [str(seed) for seed in plan.seeds]
    memory_left = sum((name, s.id, MEMORY, seed) not in done for name in models for s in samples for seed in seeds)
    warnings, bases = [], {}  # (base, seed) -> the first model with it: its control rows serve the others
    with progress(plan.launch.merges or not plan.launch.group, token_counter()) as bar:  # torchrun: rank 0's bar alone
        task = bar.add_task("loading", total=memory_left * sweep.points[-1])
        for name in models:
            bar.update(task, description=f"loading {name}")
            lm, with_chat = load_for_sweep(plan, name, config)
            for seed in plan.seeds:
                memory_dir = out / "memory" / re.sub(r"[^A-Za-z0-9._-]+", "_", name)
                memory_dir = memory_dir / f"seed-{seed}" if len(plan.seeds) > 1 else memory_dir
                seed_sweep = replace(sweep, seed=seed, protocol=replace(sweep.protocol, chat=with_chat))
                runner = build_runner(lm, name, seed_sweep, log, memory_dir, out / "cache")
                record_systems(config, name, runner, out)
                twin = bases.setdefault((runner.base, seed), name) if runner.base else name
                if twin != name:
                    runner.twin = twin
                    config["model_details"][name]["controls_from"] = twin
                    res.write_config(out / "config.json", config)
                conditions = (MEMORY, *sweep.controls, *runner.systems)
                todo = [s for s in samples if any((name, s.id, c, str(seed)) not in done for c in conditions)]
                who = name if len(plan.seeds) == 1 else f"{name} (seed {seed})"
                if todo:
                    bar.update(task, description=f"timing {who}")
                    seconds = runner.rough_seconds(todo, {(s, c) for m, s, c, d in done if (m, d) == (name, str(seed))})
                    timed = "timed on one chunk and one question; firmer after a sample"
                    say(f"{who}: about {duration(seconds)} ({timed})")
                pace = Pace(bar, task, who, len(todo))
                runner.run(
                    samples,
                    on_status=lambda text: bar.update(task, description=text),
                    on_tokens=pace.on_tokens,
                    on_sample=pace.on_sample,
                    batch_size=plan.options.batch_size,
                )
            predictions = [r["prediction"] for r in log.rows if r["model"] == name and r["sample_id"] in planned]
            warning = empty_warning(name, predictions, with_chat, has_chat_template(lm.tokenizer))
            warnings += [warning] if warning else []
    return warnings


def build_runner(
    lm: mp.MemoryLLM, name: str, sweep: Sweep, log: res.ResultsLog, memory_dir: Path, cache_dir: Path
) -> Runner:
    """The runner of one model, its --system's built over it (bad parameters are a usage error)."""
    try:
        return Runner(lm, name, sweep, log, stop_ids(lm), memory_dir, cache_dir=cache_dir)
    except SpecError as e:
        raise UsageError(str(e)) from e


def record_systems(config: dict[str, Any], name: str, runner: Runner, out: Path) -> None:
    """Each system's label (what results.csv's control column says), parameters and capabilities, in the
    model's details."""
    systems = {label: described(system) for label, system in runner.systems.items()}
    if systems:
        config["model_details"][name]["systems"] = systems
        res.write_config(out / "config.json", config)


def load_for_sweep(plan: RetentionPlan, name: str, config: dict[str, Any]) -> tuple[mp.MemoryLLM, bool]:
    """Model `name` on the run's device and whether it is asked in its chat template; its details go into
    config.json, refusing a model other than the one whose results the directory holds."""
    lm = load_model(requested_model(name), plan.dtype, plan.options.tokenizer, device=plan.device)
    with_chat = asks_in_chat(lm, plan.options.chat, name)
    note_label(lm)
    details = {"id": model_id(name), "kind": lm.cfg.kind} | model_identity(lm, with_chat)
    details |= {"stop_token_ids": list(stop_ids(lm)), "dtype": dtype_name(lm.dtype)}
    details |= {"storage_dtype": dtype_name(mp.storage_dtype(lm))}
    details |= {"drop_rate": drop_rate(lm)} if lm.cfg.kind == "memoryllm" else {}
    check_same_model(config["model_details"].get(name), details, name, plan.run_dir)
    config["model_details"][name] = details
    res.write_config(plan.run_dir / "config.json", config)
    return lm, with_chat
