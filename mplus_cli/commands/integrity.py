"""`mplus bench integrity`: answers about the latest injection as the updates pile up (MemoryLLM Fig. 6)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer

import model as mp
from model import store as st
from tasks import data as qa
from tasks import integrity as ig
from tasks import results as res
from tasks.plan import CLEAN
from tasks.sizes import parse_size

from ..common import SEED_MAX, asks_in_chat, handle_errors, json_output, note_label, stop_ids
from ..devices import pick_device, pick_dtype
from ..errors import ConflictError, UsageError
from ..models import load_model, model_id, requested_model
from ..options import BenchModelOpt, ChatOpt, DeviceOpt, DtypeOpt, TokenizerOpt
from ..output import emit
from ..root import say
from .runs import RunDirOpt, task_errors, versions, writing_into

if TYPE_CHECKING:
    import pandas as pd

StreamDataset = Literal["synthetic", "news", "squad", "nq"]
RESUME_KEYS = ("model", "dataset", "every", "ago", "seed", "chunk_tokens", "chat", "limit")


@handle_errors
def integrity(
    updates: Annotated[str, typer.Option(help="Updates (samples injected) in all: 10k, 1M (k = 1000).")] = "10k",
    every: Annotated[int, typer.Option(min=1, help="Ask after every this many updates.")] = 100,
    ago: Annotated[int, typer.Option(min=1, help="Also ask about the sample injected this many updates before.")] = 10,
    dataset: Annotated[
        StreamDataset, typer.Option(help="synthetic, news (both offline), squad or nq: the samples streamed in order.")
    ] = "synthetic",
    limit: Annotated[
        int, typer.Option(min=1, help="Samples of the dataset streamed (then from the first again).")
    ] = 1000,
    model: BenchModelOpt = None,
    seed: Annotated[int, typer.Option(min=0, max=SEED_MAX, help="Seed of the memory (its drops).")] = 0,
    chunk_tokens: Annotated[int, typer.Option(min=16, help="Most tokens per injection.")] = 512,
    chat: ChatOpt = None,
    save_every: Annotated[
        int, typer.Option(min=1, help="Commit the memory (what --resume continues from) every this many updates.")
    ] = 100,
    data_dir: Annotated[Path | None, typer.Option(envvar="MPLUS_DATA_DIR", help="As for bench retention.")] = None,
    output_path: RunDirOpt = Path("integrity"),
    resume: Annotated[bool, typer.Option(help="Continue from the memory the run saved last.")] = False,
    tokenizer: TokenizerOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
) -> None:
    """Answers about the most recent injection (and one --ago updates back) as updates accumulate.

    Each update injects one sample's evidence; after every --every updates both questions are asked from the
    memory, greedy (the retention sweep's clean prompt, or its chat turn). Writes results.csv (one row per
    question: the update, the answer, exact hit / EM / F1, the memory's mean row norm and long-term rows),
    integrity.png (the answers against the updates with an EMA line) and config.json; the memory is a store
    session in the output directory (`mplus session show memory --store OUT`), committed every --save-every
    updates, which --resume continues from.

    Example: mplus bench integrity --model smollm2-135m --updates 10k --every 100
    """
    as_json = json_output()
    try:
        total = parse_size(updates)
    except ValueError as e:
        raise UsageError(f"bad --updates {updates!r}: {e}") from None
    name = model or requested_model(None)
    results_path = output_path / "results.csv"
    if res.holds_results(results_path) and not resume:
        raise ConflictError(f"{output_path} already holds results: pass --resume to continue them or choose another -o")
    with task_errors():
        data = qa.load(dataset, limit=limit, data_dir=data_dir)
        where = pick_device(device)
        lm = load_model(name, pick_dtype(dtype, where), tokenizer, device=where)
        if lm.tokenizer is None:
            raise UsageError(f"{name} has no tokenizer: pass --tokenizer")
        use_chat = asks_in_chat(lm, chat, name)
        note_label(lm)
        config = {
            "command": "mplus bench integrity",
            "model": model_id(name),
            "dataset": dataset,
            "data": data.source,
            "limit": limit,
            "updates": total,
            "every": every,
            "ago": ago,
            "seed": seed,
            "chunk_tokens": chunk_tokens,
            "chat": use_chat,
            "label": lm.info.label,
            "versions": versions(),
        }
        with writing_into(output_path):
            if resume:
                res.check_resumable(output_path / "config.json", config, RESUME_KEYS)
            res.write_config(output_path / "config.json", config)
            session = open_session(output_path, lm, model_id(name), seed)
            start = len(session.log())  # one log line per committed update
            log = res.ResultsLog(results_path, ig.COLUMNS)
            log.rewrite([row for row in log.rows if int(row["update"]) <= start])  # past the commit: asked again
            stream = ig.Stream(data.samples, every, ago)
            protocol = replace(CLEAN, chat=use_chat)  # the retention sweep's clean prompt, or its chat turn
            settings = mp.DecodeSettings(max_new_tokens=protocol.max_new_tokens, stop_token_ids=stop_ids(lm))
            say(f"{config['model']}: {total - start} updates from update {start + 1}, questions every {every}")
            ig.run(lm, session, stream, protocol, settings, range(start + 1, total + 1), save_every, chunk_tokens, log)
            results = read_results(results_path)
            ig.plot(results, output_path / "integrity.png", f"{config['model']}, {dataset}: every {every} updates")
            res.write_config(output_path / "config.json", config | {"finished": res.now()})
    report(results, output_path, as_json)


def read_results(path: Path) -> pd.DataFrame:
    import pandas as pd

    text = ("asked", "sample_id", "question", "gold", "prediction", "ltm_rows")
    return pd.read_csv(path, dtype=dict.fromkeys(text, str), keep_default_na=False)


def open_session(directory: Path, lm: mp.MemoryLLM, model: str, seed: int) -> st.Session:
    """The stream's memory session in the output directory: the one a run left, else a new one."""
    if st.session_exists(directory, ig.SESSION):
        return st.Session.open(directory, ig.SESSION)
    return st.Session.create(directory, ig.SESSION, lm.initial_state, st.binding(lm, model), seed, mp.storage_dtype(lm))


def report(results: pd.DataFrame, directory: Path, as_json: bool) -> None:
    """The exact hit of the recent and the earlier sample over the first and the last tenth of the run."""
    summary = {}
    for kind in (ig.RECENT, ig.AGO):
        rows = results[results.asked == kind].sort_values("update")
        tenth = max(len(rows) // 10, 1)
        summary[kind] = {
            "questions": len(rows),
            "exact_hit_first_tenth": float(rows.exact_hit[:tenth].mean()) if len(rows) else None,
            "exact_hit_last_tenth": float(rows.exact_hit[-tenth:].mean()) if len(rows) else None,
        }
    if as_json:
        emit({"output": str(directory), "summary": summary})
        return
    say(f"wrote {directory}/results.csv, integrity.png and config.json")
    for kind, row in summary.items():
        typer.echo(
            f"{kind}: exact hit {row['exact_hit_first_tenth']} (first tenth) -> {row['exact_hit_last_tenth']} "
            f"(last tenth), {row['questions']} questions"
        )
