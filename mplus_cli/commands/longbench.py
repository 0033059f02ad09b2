"""`mplus bench longbench`: LongBench's six English QA sets read from memory, scored with QA-F1."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

import model as mp
from model.systems import SpecError, build_system, described, label
from model.systems.latent import LatentMemory
from tasks import longbench as lb
from tasks import results as res
from tasks.launch import process_group
from tasks.plan import shard_slice
from tasks.sizes import format_size, parse_size

from ..common import SEED_MAX, asks_in_chat, handle_errors, json_output, note_label, stop_ids
from ..devices import pick_dtype
from ..errors import UsageError
from ..models import load_model, model_id, requested_model
from ..options import ChatOpt, DeviceOpt, DtypeOpt, ModelsOpt, TokenizerOpt
from ..output import emit
from ..root import say
from .runs import (
    RunDirOpt,
    RunResumeOpt,
    RunShardOpt,
    check_same_model,
    check_systems,
    finish_shards,
    merged_config,
    model_identity,
    shard_run,
    task_errors,
    versions,
    writing_into,
)

if TYPE_CHECKING:
    import pandas as pd

COMMAND = "mplus bench longbench"
RESUME_KEYS = ("truncation", "chunk_tokens", "seed", "data", "chat", "limit", "shard")  # a resumed run must match these
UNION_KEYS = ("sets", "max_lengths", "models", "systems")  # and may add to these


def parse_sets(text: str) -> tuple[str, ...]:
    if text == "all":
        return lb.SETS
    sets = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [name for name in sets if name not in (*lb.SETS, lb.OFFLINE)]
    if unknown or not sets:
        choices = f"all, {', '.join(lb.SETS)} or {lb.OFFLINE} (offline)"
        raise UsageError(f"unknown LongBench set {unknown[0] if unknown else text!r}: use {choices}")
    return sets


def parse_lengths(text: str) -> tuple[int, ...]:
    try:
        lengths = tuple(dict.fromkeys(parse_size(part.strip()) for part in text.split(",") if part.strip()))
    except ValueError as e:
        raise UsageError(f"bad --max-length {text!r}: {e}") from None
    if not lengths or min(lengths) < 256:
        raise UsageError(f"bad --max-length {text!r}: give lengths of at least 256 tokens, e.g. 4k,8k,16k")
    return lengths


@handle_errors
def longbench(
    model: ModelsOpt = None,
    system: Annotated[
        list[str] | None,
        typer.Option(
            "--system",
            help="Also run a memory system over each model, repeatable: truncate[:tokens=N], bm25[:part=P,k=K], "
            "snapkv[:budget=B,question=aware], or one an installed package adds.",
        ),
    ] = None,
    sets: Annotated[
        str,
        typer.Option(
            help=f"all, or some of {', '.join(lb.SETS)} (comma-separated); {lb.OFFLINE}: an offline stand-in built "
            "from the news stories (no hub)."
        ),
    ] = "all",
    max_length: Annotated[
        str, typer.Option(help="Prompt lengths in tokens the context is cut to, e.g. 4k,8k,16k (k = 1000).")
    ] = "4k,8k,16k",
    truncate: Annotated[
        lb.Truncation,
        typer.Option(help="middle: keep the first and last halves (LongBench); front: keep the end (the authors')."),
    ] = "middle",
    limit: Annotated[int, typer.Option(min=1, help="Samples per set (the first ones; LongBench has 150-200).")] = 200,
    seed: Annotated[int, typer.Option(min=0, max=SEED_MAX, help="Seed of every memory's reset (its drops).")] = 0,
    chunk_tokens: Annotated[int, typer.Option(min=16, help="Tokens per injection (the authors': 512).")] = 512,
    data_dir: Annotated[
        Path | None,
        typer.Option(envvar="MPLUS_DATA_DIR", help="LongBench's files ({set}.jsonl; default: the hub's data.zip)."),
    ] = None,
    shard: RunShardOpt = None,
    output_path: RunDirOpt = Path("longbench"),
    resume: RunResumeOpt = False,
    chat: ChatOpt = None,
    tokenizer: TokenizerOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
) -> None:
    """LongBench (narrativeqa, qasper, multifieldqa_en, hotpotqa, 2wikimqa, musique) read from memory.

    Each sample's prompt (LongBench's, from lm-eval's LongBench task files: pip install 'mplus[lm-eval]') is cut
    to each --max-length; the part up to the end of its context is injected in chunks into a fresh memory, the
    rest (instruction and question) is asked, greedy, with LongBench's answer length for the set; scored with
    LongBench's QA-F1. Writes results.csv (one row per sample, length and model or system, appended as answered),
    summary.csv (mean QA-F1 per set and length, the 6-set average, 95% bootstrap intervals), config.json and
    longbench-<length>.png.

    Under torchrun each rank runs its slice of every set into OUT/shard-<r+1>-of-<n> and rank 0 merges them
    into OUT; each task of a Slurm array runs its slice into OUT/shard-<i>-of-<n>: combine them (or the
    directories of --shard i/n runs) with mplus bench merge.

    Example: mplus bench longbench --model mplus-8b --max-length 8k,16k --system truncate --system bm25
    """
    as_json = json_output()
    names, specs = model or [requested_model(None)], system or []
    chosen, lengths = parse_sets(sets), parse_lengths(max_length)
    launch, part, run_dir, where = shard_run(shard, output_path, device, resume)
    with task_errors():
        try:
            check_systems(specs)
        except (SpecError, ValueError) as e:
            raise UsageError(str(e)) from e
        prompts = lb.prompts()
        data = {name: shard_slice(lb.load(name, limit, data_dir), *part) for name in chosen}
        config: dict[str, Any] = {
            "command": COMMAND,
            "sets": list(chosen),
            "max_lengths": list(lengths),
            "truncation": truncate,
            "chunk_tokens": chunk_tokens,
            "seed": seed,
            "limit": limit,
            "shard": f"{part[0]}/{part[1]}",
            "chat": chat,
            "data": str(data_dir.resolve()) if data_dir else f"hub {lb.HUB_ID} ({lb.HUB_FILE})",
            "prompts": {name: prompts[name].max_new_tokens for name in chosen},
            "models": [model_id(name) for name in names],
            "systems": specs,
            "versions": versions(),
            "created": res.now(),
            "model_details": {},
        }
        with writing_into(run_dir), process_group(launch, where):
            if resume:
                res.check_resumable(run_dir / "config.json", config, RESUME_KEYS)
                config = merged_config(run_dir / "config.json", config, UNION_KEYS)
            res.write_config(run_dir / "config.json", config)
            log = res.ResultsLog(run_dir / "results.csv", lb.COLUMNS)
            settings = lb.Settings(lengths, truncate, chunk_tokens, seed)
            for name in names:
                lm = load_model(name, pick_dtype(dtype, where), tokenizer, device=where)
                details = model_details(lm, name, chat)
                check_same_model(config["model_details"].get(model_id(name)), details, model_id(name), run_dir)
                systems = run_model(lm, name, specs, data, prompts, replace(settings, chat=details["chat"]), log)
                config["model_details"][model_id(name)] = details | {"systems": systems}
            summary = finish_shards(launch, output_path, where, config, finish)
    if summary is not None:  # None: another rank merges
        report(summary, output_path, as_json)


def model_details(lm: mp.MemoryLLM, name: str, chat: bool | None) -> dict[str, Any]:
    """What config.json records of a model before its answers (a resumed run must find the same)."""
    if lm.tokenizer is None:
        raise UsageError(f"{name} has no tokenizer: pass --tokenizer")
    return model_identity(lm, asks_in_chat(lm, chat, name))


def run_model(
    lm: mp.MemoryLLM,
    name: str,
    specs: list[str],
    data: dict[str, list[lb.Record]],
    prompts: dict[str, lb.Prompt],
    settings: lb.Settings,
    log: res.ResultsLog,
) -> dict[str, Any]:
    """One model's memory and systems on every record and length, each answer appended to `log`; returns each
    system's description."""
    try:
        systems = {"memory": LatentMemory(lm)} | {label(s): s for s in (build_system(spec, lm) for spec in specs)}
    except SpecError as e:
        raise UsageError(str(e)) from e
    note_label(lm)
    model, done = model_id(name), {tuple(row[key] for key in lb.UNIT) for row in log.rows}
    for set_name, records in data.items():
        say(f"{model}: {set_name}, {len(records)} samples x {len(settings.max_lengths)} lengths x {len(systems)} ways")
        for record in records:
            for row in lb.answer_rows(
                systems, model, lm.tokenizer, set_name, record, prompts[set_name], settings, stop_ids(lm), done
            ):
                log.append([row])
    return {key: described(system) for key, system in systems.items()}


def finish(directory: Path, config: dict[str, Any]) -> pd.DataFrame:
    """summary.csv, a plot per length and config.json from the run's results.csv; returns the summary."""
    import pandas as pd

    results = pd.read_csv(directory / "results.csv", dtype={"sample_id": str}, keep_default_na=False)
    summary = lb.summarize(results)
    res.write_atomic(directory / "summary.csv", summary.to_csv(index=False, float_format="%.4g").encode())
    for length in config["max_lengths"]:
        lb.plot_length(summary, length, directory / f"longbench-{format_size(length)}.png")
    res.write_config(directory / "config.json", config | {"finished": res.now()})
    return summary


def report(summary: pd.DataFrame, directory: Path, as_json: bool) -> None:
    """The 6-set averages (or the document under --json)."""
    if as_json:
        emit({"output": str(directory), "summary": summary.to_dict(orient="records")})
        return
    say(f"wrote {directory}/results.csv, summary.csv, config.json and a plot per length")
    averages = summary[summary.set == lb.AVERAGE]
    typer.echo("QA-F1, mean over the sets [95% bootstrap interval] (sets, n)")
    for row in averages.itertuples():
        interval = f"{row.qa_f1:.2f} [{row.qa_f1_lo:.2f}, {row.qa_f1_hi:.2f}] ({row.sets}, {row.n})"
        typer.echo(f"{row.model}  {row.control}  {format_size(row.max_length)}: {interval}")
