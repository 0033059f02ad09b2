"""`mplus bench editing`: zsRE and CounterFact edits made by injecting the fact (MemoryLLM Table 1)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import torch
import typer

import model as mp
from model.text.tokenizer import encode
from tasks import editing as ed
from tasks import results as res
from tasks.launch import process_group
from tasks.plan import shard_slice

from ..common import SEED_MAX, handle_errors, json_output, note_label
from ..devices import pick_dtype
from ..errors import UsageError
from ..models import load_model, model_id, requested_model
from ..options import BenchModelOpt, DeviceOpt, DtypeOpt, TokenizerOpt
from ..output import run_written
from ..root import say
from .runs import RunDirOpt, RunResumeOpt, RunShardOpt, finish_shards, shard_run, task_errors, versions, writing_into

COMMAND = "mplus bench editing"
COLUMNS = ("dataset", "record_id", "model", "condition", *ed.METRICS)
RESUME_KEYS = ("dataset", "data", "limit", "sequential", "seed", "shard", "models")  # a resumed run must match
UNEDITED, INJECTED = "unedited", "injected"


@handle_errors
def editing(
    dataset: Annotated[
        ed.Dataset, typer.Option(help="zsre, counterfact (ROME's files in --data-dir) or synthetic (offline).")
    ],
    data_dir: Annotated[
        Path | None,
        typer.Option(
            envvar="MPLUS_DATA_DIR",
            help="Directory with zsre_mem_eval.json / counterfact.json (default: downloaded from ROME's site).",
        ),
    ] = None,
    limit: Annotated[
        int | None, typer.Option(min=1, help="The first N records (the paper: 10,000 zsRE, 2,000 CounterFact).")
    ] = None,
    sequential: Annotated[
        int, typer.Option(min=1, help="Edits injected one after another into one memory before they are read.")
    ] = 1,
    model: BenchModelOpt = None,
    seed: Annotated[int, typer.Option(min=0, max=SEED_MAX, help="Seed of every fresh memory.")] = 0,
    shard: RunShardOpt = None,
    output_path: RunDirOpt = Path("editing"),
    resume: RunResumeOpt = False,
    tokenizer: TokenizerOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
) -> None:
    """Knowledge editing by injection, scored as ROME's evaluation scores it (MemoryLLM Table 1).

    Each record's fact (its prompt with the new target) is injected into a fresh memory (or, --sequential N,
    N records' facts one after another into one memory), then its prompts are read from that memory:
    Efficacy, Generalization (paraphrases), Specificity (neighbourhood prompts) and Score, their harmonic mean
    (zsRE token-level, CounterFact new-vs-true probability). The unedited model is the reference row. Writes
    results.csv (appended as records are scored), summary.csv and config.json.

    Under torchrun each rank runs its slice of the records into OUT/shard-<r+1>-of-<n> and rank 0 merges them
    into OUT; each task of a Slurm array runs its slice into OUT/shard-<i>-of-<n>: combine them (or the
    directories of --shard i/n runs) with mplus bench merge.

    Example: mplus bench editing --dataset counterfact --data-dir rome/data --limit 2000 --model memoryllm-7b
    """
    as_json = json_output()
    name = model or requested_model(None)
    launch, part, run_dir, where = shard_run(shard, output_path, device, resume)
    with task_errors():
        edits = ed.load(dataset, data_dir, limit)
        groups = shard_slice([edits[i : i + sequential] for i in range(0, len(edits), sequential)], *part)
        config = {
            "command": COMMAND,
            "dataset": dataset,
            "data": data_origin(dataset, data_dir),
            "limit": limit,
            "sequential": sequential,
            "seed": seed,
            "shard": f"{part[0]}/{part[1]}",
            "models": [model_id(name)],
            "versions": versions(),
            "created": res.now(),
        }
        with writing_into(run_dir), process_group(launch, where):
            if resume:
                res.check_resumable(run_dir / "config.json", config, RESUME_KEYS)
            lm = load_model(name, pick_dtype(dtype, where), tokenizer, device=where)
            note_label(lm)
            if lm.tokenizer is None:
                raise UsageError(f"{name} has no tokenizer: pass --tokenizer")
            config["label"] = lm.info.label
            res.write_config(run_dir / "config.json", config)
            records = sum(map(len, groups))
            say(f"{model_id(name)}: {records} {dataset} records, unedited then injected ({sequential} per memory)")
            log = res.ResultsLog(run_dir / "results.csv", COLUMNS)
            edit_rows(lm, model_id(name), dataset, groups, sequential, seed, log)
            summary = finish_shards(launch, output_path, where, config, finish)
    if summary is not None:  # None: another rank merges
        report(summary, output_path, as_json)


def data_origin(dataset: ed.Dataset, data_dir: Path | None) -> str:
    if dataset == "synthetic":
        return "synthetic facts"
    return str(ed.data_file(data_dir, dataset).resolve()) if data_dir else f"{ed.ROME_DATA}/{ed.FILES[dataset][0]}"


def edit_rows(
    lm: mp.MemoryLLM,
    model: str,
    dataset: ed.Dataset,
    groups: list[list[ed.Edit]],
    sequential: int,
    seed: int,
    log: res.ResultsLog,
) -> None:
    """Per group of records: each record scored by the unedited model, then, the group's facts injected into
    one fresh memory, scored again; the group's rows appended to `log` at once. Groups whose rows are all in
    the log are skipped; the rows of one cut short are dropped and it runs again."""
    condition = INJECTED if sequential == 1 else f"{INJECTED}, {sequential} in sequence"
    group_of = {edit.id: i for i, group in enumerate(groups) for edit in group}
    complete = log.whole_units(
        lambda row: group_of.get(row["record_id"]) if row["model"] == model else None, lambda i: 2 * len(groups[i])
    )
    unedited = lm.new_state(seed, mp.storage_dtype(lm))

    def row(condition: str, state: mp.MemoryState, edit: ed.Edit) -> dict[str, Any]:
        scores = ed.edit_scores(lm, state, lm.tokenizer, dataset, edit)
        return {"dataset": dataset, "record_id": edit.id, "model": model, "condition": condition} | scores

    for i, group in enumerate(groups):
        if i in complete:
            continue
        rows = [row(UNEDITED, unedited, edit) for edit in group]
        state = lm.new_state(seed, mp.storage_dtype(lm))
        for edit in group:
            lm.inject(state, torch.tensor(encode(lm.tokenizer, edit.fact)))
        log.append(rows + [row(condition, state, edit) for edit in group])


def finish(directory: Path, config: dict[str, Any]) -> list[dict[str, Any]]:
    """summary.csv and the finished config.json from the run's results.csv; returns the summary."""
    summary = ed.summarize(res.read_rows(directory / "results.csv")[1])
    columns = list(summary[0]) if summary else ["dataset", "model", "condition", "n", *ed.METRICS, "score"]
    res.write_atomic(directory / "summary.csv", res.csv_text(summary, header=True, columns=columns).encode())
    res.write_config(directory / "config.json", config | {"finished": res.now()})
    return summary


def report(summary: list[dict[str, Any]], directory: Path, as_json: bool) -> None:
    if run_written(directory, summary, as_json):
        return
    for row in summary:
        figures = "  ".join(f"{m} {row[m]:.1f}" for m in ed.METRICS)
        typer.echo(f"{row['dataset']}  {row['condition']}: score {row['score']:.1f}  {figures}  (n {row['n']})")
