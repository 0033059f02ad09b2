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

from ..common import SEED_MAX, DeviceOpt, DtypeOpt, JsonOpt, TokenizerOpt, handle_errors, note_label
from ..devices import pick_device, pick_dtype
from ..errors import ConflictError, UsageError
from ..models import load_model, model_id, requested_model
from ..output import run_written
from ..root import say
from .sweep import task_errors, versions, writing_into

COLUMNS = ("dataset", "record_id", "model", "condition", *ed.METRICS)
UNEDITED, INJECTED = "unedited", "injected"


@handle_errors
def editing(
    dataset: Annotated[
        ed.Dataset, typer.Option(help="zsre, counterfact (ROME's files in --data-dir) or synthetic (offline).")
    ],
    data_dir: Annotated[
        Path | None, typer.Option(envvar="MPLUS_DATA_DIR", help="Directory with zsre_mem_eval.json / counterfact.json.")
    ] = None,
    limit: Annotated[
        int | None, typer.Option(min=1, help="The first N records (the paper: 10,000 zsRE, 2,000 CounterFact).")
    ] = None,
    sequential: Annotated[
        int, typer.Option(min=1, help="Edits injected one after another into one memory before they are read.")
    ] = 1,
    model: Annotated[str | None, typer.Option("--model", "-m", envvar="MPLUS_MODEL", help="Model name.")] = None,
    seed: Annotated[int, typer.Option(min=0, max=SEED_MAX, help="Seed of every fresh memory.")] = 0,
    output_path: Annotated[Path, typer.Option("--output", "-o", help="Output directory.")] = Path("editing"),
    tokenizer: TokenizerOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Knowledge editing by injection, scored as ROME's evaluation scores it (MemoryLLM Table 1).

    Each record's fact (its prompt with the new target) is injected into a fresh memory (or, --sequential N,
    N records' facts one after another into one memory), then its prompts are read from that memory:
    Efficacy, Generalization (paraphrases), Specificity (neighbourhood prompts) and Score, their harmonic mean
    (zsRE token-level, CounterFact new-vs-true probability). The unedited model is the reference row. Writes
    results.csv, summary.csv and config.json.

    Example: mplus bench editing --dataset counterfact --data-dir rome/data --limit 2000 --model memoryllm-7b
    """
    name = model or requested_model(None)
    if dataset != "synthetic" and data_dir is None:
        raise UsageError(f"--dataset {dataset} reads ROME's files: pass --data-dir (or use --dataset synthetic)")
    if (output_path / "results.csv").exists():
        raise ConflictError(f"{output_path} already holds results: choose another -o")
    with task_errors():
        edits = ed.load(dataset, data_dir, limit)
        where = pick_device(device)
        lm = load_model(name, pick_dtype(dtype, where), tokenizer, device=where)
        note_label(lm)
        if lm.tokenizer is None:
            raise UsageError(f"{name} has no tokenizer: pass --tokenizer")
        say(f"{model_id(name)}: {len(edits)} {dataset} records, unedited then injected ({sequential} per memory)")
        rows = edit_rows(lm, model_id(name), dataset, edits, sequential, seed)
        summary = ed.summarize(rows)
        config = {
            "command": "mplus bench editing",
            "dataset": dataset,
            "data": "synthetic facts" if data_dir is None else str(ed.data_file(data_dir, dataset).resolve()),
            "limit": limit,
            "sequential": sequential,
            "seed": seed,
            "model": model_id(name),
            "label": lm.info.label,
            "versions": versions(),
            "finished": res.now(),
        }
        with writing_into(output_path):
            res.write_run(output_path, rows, COLUMNS, summary, config)
    report(summary, output_path, as_json)


def edit_rows(
    lm: mp.MemoryLLM, model: str, dataset: ed.Dataset, edits: list[ed.Edit], sequential: int, seed: int
) -> list[dict[str, Any]]:
    """The unedited model's scores of every record, then the scores after the injections."""
    rows = []

    def add(condition: str, state: mp.MemoryState, edit: ed.Edit) -> None:
        scores = ed.edit_scores(lm, state, lm.tokenizer, dataset, edit)
        rows.append({"dataset": dataset, "record_id": edit.id, "model": model, "condition": condition} | scores)

    unedited = lm.new_state(seed, mp.storage_dtype(lm))
    for edit in edits:
        add(UNEDITED, unedited, edit)
    condition = INJECTED if sequential == 1 else f"{INJECTED}, {sequential} in sequence"
    for start in range(0, len(edits), sequential):
        group, state = edits[start : start + sequential], lm.new_state(seed, mp.storage_dtype(lm))
        for edit in group:
            lm.inject(state, torch.tensor(encode(lm.tokenizer, edit.fact)))
        for edit in group:
            add(condition, state, edit)
    return rows


def report(summary: list[dict[str, Any]], directory: Path, as_json: bool) -> None:
    if run_written(directory, summary, as_json):
        return
    for row in summary:
        figures = "  ".join(f"{m} {row[m]:.1f}" for m in ed.METRICS)
        typer.echo(f"{row['dataset']}  {row['condition']}: score {row['score']:.1f}  {figures}  (n {row['n']})")
