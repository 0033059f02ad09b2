"""LongBench's six English QA sets (MemoryLLM Fig. 4 / Table 2, M+ Tables 2 and 3), read into memory.

Each sample's prompt is LongBench's for its set (read from the LongBench task files that lm-evaluation-harness
installs, with LongBench's maximum answer lengths), cut to `max_length` tokens as LongBench cuts it (the
first and last halves kept) or as the authors' script does (`front`: the last max_length - max_new tokens).
The part of the prompt up to the end of the context is injected in chunks; the rest (the instruction and the
question) is what is asked. The score is LongBench's QA-F1: the best token F1 over the gold answers of the
normalized words, in points (0-100).

Data: LongBench's files (`{set}.jsonl` with `input`, `context`, `answers`, `_id`), from a local directory in
LongBench's layout or from the hub's `THUDM/LongBench` (its data.zip, read in place). Offline, the `news` set
stands in for them: each news test question's story among other news stories and essays as numbered passages
(in a seeded order), asked with the multi-document prompt of hotpotqa.
"""

from __future__ import annotations

import io
import json
import random
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from model.core.generate import DecodeSettings
from model.systems import MemorySystem
from model.text.tokenizer import chat_ids, decode, encode

from . import realtext
from .metrics import normalize_answer, token_f1
from .samples import DataError, from_hub, take_chars

if TYPE_CHECKING:
    import pandas as pd

SETS = ("narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique")
OFFLINE = "news"  # not LongBench: the news questions (test split) in the form of its multi-document sets, offline
OFFLINE_PROMPT = "hotpotqa"  # whose prompt and answer length the offline set takes
OFFLINE_CONTEXT_CHARS = 40_000  # about 10k tokens of passages per question, as LongBench's contexts
HUB_ID = "THUDM/LongBench"
HUB_FILE = "data.zip"
Truncation = Literal["middle", "front"]
LM_EVAL_HINT = "pip install 'mplus[lm-eval]' (LongBench's prompts are read from lm-eval's LongBench task files)"


@dataclass(frozen=True)
class Prompt:
    """A set's prompt, split where the context ends: `head` + context is injected, `tail` (with the
    question) is asked; `max_new_tokens` is LongBench's answer length for the set."""

    head: str
    tail: str  # holds {input}
    max_new_tokens: int


@dataclass(frozen=True)
class Record:
    id: str
    context: str
    input: str
    answers: tuple[str, ...]


def prompts() -> dict[str, Prompt]:
    """Every set's prompt and answer length, from lm-eval's LongBench task files (`{{context}}`, and the
    question as `{{question}}`, LongBench's `input`)."""
    import yaml

    try:
        from lm_eval import tasks as lm_eval_tasks
    except ImportError as e:
        raise DataError(f"bench longbench needs lm-eval: {LM_EVAL_HINT}") from e
    directory = Path(lm_eval_tasks.__file__).parent / "longbench"

    class TaskLoader(yaml.SafeLoader):  # lm-eval's `!function` tags name scorers we do not need
        pass

    TaskLoader.add_multi_constructor("!", lambda loader, suffix, node: None)
    found = {}
    for name in SETS:
        task = yaml.load((directory / f"{name}.yaml").read_text(), Loader=TaskLoader)  # noqa: S506 (SafeLoader)
        head, marker, tail = task["doc_to_text"].partition("{{context}}")
        if not marker or "{{question}}" not in tail:
            raise DataError(f"lm-eval's LongBench task {name} has no {{{{context}}}} before its question")
        max_new = int(task["generation_kwargs"]["max_gen_toks"])
        found[name] = Prompt(head, tail.replace("{{question}}", "{input}"), max_new)
    return found | {OFFLINE: found[OFFLINE_PROMPT]}


def record_of(row: dict[str, Any]) -> Record:
    return Record(str(row["_id"]), row["context"], row["input"], tuple(row["answers"]))


def read_records(lines: Iterator[str], limit: int | None) -> list[Record]:
    records = []
    for line in lines:
        if line.strip():
            records.append(record_of(json.loads(line)))
        if limit is not None and len(records) >= limit:
            break
    return records


def local_file(data_dir: Path, name: str) -> Path:
    """`{name}.jsonl` in the directory or in its `data/` (LongBench's data.zip unpacked)."""
    for path in (data_dir / f"{name}.jsonl", data_dir / "data" / f"{name}.jsonl"):
        if path.is_file():
            return path
    raise FileNotFoundError(f"no {name}.jsonl in {data_dir} or {data_dir / 'data'} (LongBench's data.zip, unpacked)")


def load(name: str, limit: int | None, data_dir: Path | None = None) -> list[Record]:
    """The first `limit` records of a set, from `data_dir` or the hub (`news`: built offline)."""
    if name == OFFLINE:
        return offline_news(limit, data_dir)
    if name not in SETS:
        raise ValueError(f"unknown LongBench set {name!r}: use {', '.join(SETS)} or {OFFLINE}")
    if data_dir is not None:
        with open(local_file(data_dir, name), encoding="utf-8") as f:
            return read_records(f, limit)
    with zipfile.ZipFile(hub_zip()) as archive, archive.open(f"data/{name}.jsonl") as raw:
        return read_records(io.TextIOWrapper(raw, encoding="utf-8"), limit)


def offline_news(limit: int | None, data_dir: Path | None = None) -> list[Record]:
    """Each news test question with its story among other passages (the dev stories, then the essays) in a
    seeded order, numbered as LongBench's multi-document contexts: about OFFLINE_CONTEXT_CHARS characters."""
    data = realtext.news("test", limit, 4 * OFFLINE_CONTEXT_CHARS, data_dir)
    records = []
    for sample in data.samples:
        rng = random.Random(f"longbench-news-{sample.id}")
        others = take_chars(rng.sample(data.distractors, len(data.distractors)), OFFLINE_CONTEXT_CHARS)
        others.insert(rng.randint(0, len(others)), sample.context)
        context = "\n\n".join(f"Passage {i + 1}:\n{passage}" for i, passage in enumerate(others))
        records.append(Record(sample.id, context, sample.question, (sample.answer,)))
    return records


def hub_zip() -> Path:
    """LongBench's data.zip from the hub (the hub client's cache)."""
    from huggingface_hub import hf_hub_download

    with from_hub(HUB_ID, "pass --data-dir with LongBench's files"):
        return Path(hf_hub_download(HUB_ID, HUB_FILE, repo_type="dataset"))


def cut(ids: Sequence[int], max_length: int, truncation: Truncation, max_new_tokens: int) -> list[int]:
    """The prompt's ids cut to fit: LongBench keeps the first and the last max_length // 2; the authors'
    script (`front`) keeps the last max_length - max_new_tokens."""
    ids = list(ids)
    if truncation == "front":
        keep = max_length - max_new_tokens
        return ids[len(ids) - keep :] if len(ids) > keep else ids
    if len(ids) <= max_length:
        return ids
    half = max_length // 2
    return ids[:half] + ids[len(ids) - half :]


def qa_f1(prediction: str, answers: Sequence[str]) -> float:
    """LongBench's QA-F1 in points: the best token F1 over the answers of the normalized words (0 when
    either side has none)."""
    predicted = normalize_answer(prediction).split()
    return 100 * max((token_f1(predicted, normalize_answer(answer).split()) for answer in answers), default=0.0)


def bootstrap(scores: Sequence[Sequence[float]], resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean over groups of the group means, each group's samples resampled
    with replacement on its own (one group: a set's mean; six: the 6-set average)."""
    generator = np.random.default_rng(seed)
    means = np.zeros(resamples)
    for group in scores:
        values = np.asarray(group, dtype=float)
        picks = generator.integers(0, len(values), size=(resamples, len(values)))  # [resamples, n]
        means += values[picks].mean(axis=1) / len(scores)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


# -- a run: every model's memory and systems on every sample and length ----------------------------
COLUMNS = (
    "set",
    "sample_id",
    "model",
    "control",
    "max_length",
    "truncation",
    "injected_tokens",
    "answers",
    "prediction",
    "qa_f1",
    "latency_ms",
    "seed",
)
UNIT = ("set", "sample_id", "model", "control", "max_length")  # one answer
AVERAGE = "average"  # the summary's row of the mean over the sets


@dataclass(frozen=True)
class Settings:
    """What a run asks: the lengths, the cut, the chunks injected, the seed of every reset, the chat turn."""

    max_lengths: tuple[int, ...]
    truncation: Truncation = "middle"
    chunk_tokens: int = 512
    seed: int = 0
    chat: bool = False


def sample_ids(tokenizer, prompt: Prompt, record: Record, max_length: int, settings: Settings) -> tuple[list, list]:
    """(the ids injected, the question's ids) of a record's prompt cut to `max_length`: the prompt up to the
    end of its context is injected, the rest asked (alone in the chat template when `settings.chat`)."""
    head = encode(tokenizer, prompt.head + record.context)
    tail = encode(tokenizer, prompt.tail.replace("{input}", record.input))
    ids = cut(head + tail, max_length, settings.truncation, prompt.max_new_tokens)
    split = max(len(ids) - len(tail), 0)
    injected, question = ids[:split], ids[split:]
    return injected, chat_ids(tokenizer, decode(tokenizer, question).strip()) if settings.chat else question


def answer_rows(
    systems: dict[str, MemorySystem],
    model_name: str,
    tokenizer,
    set_name: str,
    record: Record,
    prompt: Prompt,
    settings: Settings,
    stop_ids: tuple[int, ...],
    done: set[tuple[str, ...]],
) -> Iterator[dict[str, Any]]:
    """One row per system (by label) and length not in `done`: the record's text injected in chunks into the
    freshly reset system, then its question asked, greedy."""
    decoding = DecodeSettings(max_new_tokens=prompt.max_new_tokens, stop_token_ids=stop_ids)
    for max_length in settings.max_lengths:
        injected, question = sample_ids(tokenizer, prompt, record, max_length, settings)
        for control, system in systems.items():
            if (set_name, record.id, model_name, control, str(max_length)) in done:
                continue
            system.reset(settings.seed)
            for chunk in torch.tensor(injected, dtype=torch.long).split(settings.chunk_tokens):
                system.inject(chunk)
            answer = system.ask(question, decoding)
            yield {
                "set": set_name,
                "sample_id": record.id,
                "model": model_name,
                "control": control,
                "max_length": max_length,
                "truncation": settings.truncation,
                "injected_tokens": len(injected),
                "answers": json.dumps(list(record.answers), ensure_ascii=False),
                "prediction": answer.text,
                "qa_f1": round(qa_f1(answer.text, record.answers), 4),
                "latency_ms": round(1000 * answer.seconds, 1),
                "seed": settings.seed,
            }


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Per model, control and length: each set's mean QA-F1 and the mean over the sets (`average`, with the
    number of sets it averages), each with n and a 95% bootstrap interval over the samples."""
    import pandas as pd

    rows = []
    for (model, control, length), group in results.groupby(["model", "control", "max_length"], sort=False):
        per_set = {name: scores.qa_f1.astype(float).tolist() for name, scores in group.groupby("set", sort=False)}
        per_set = {name: per_set[name] for name in (*SETS, OFFLINE) if name in per_set}
        key = {"model": model, "control": control, "max_length": int(length)}
        for name, scores in per_set.items():
            rows.append({"set": name} | key | mean_row([scores]))
        rows.append({"set": AVERAGE} | key | mean_row(list(per_set.values())))
    columns = ["set", "model", "control", "max_length", "sets", "n", "qa_f1", "qa_f1_lo", "qa_f1_hi"]
    return pd.DataFrame(rows, columns=columns)


def mean_row(scores: list[list[float]]) -> dict[str, float | int]:
    """The mean over the sets of each set's mean QA-F1, with its bootstrap interval."""
    lo, hi = bootstrap(scores)
    mean = float(np.mean([np.mean(group) for group in scores]))
    return {"sets": len(scores), "n": sum(map(len, scores)), "qa_f1": mean, "qa_f1_lo": lo, "qa_f1_hi": hi}


def plot_length(summary: pd.DataFrame, length: int, path: Path) -> None:
    """Bars of QA-F1 per set and the average at one max length, one bar per model and control, with the
    bootstrap intervals."""
    from matplotlib.figure import Figure

    rows = summary[summary.max_length == length]
    lines = list(dict.fromkeys(zip(rows.model, rows.control, strict=True)))
    names = [name for name in (*SETS, OFFLINE, AVERAGE) if name in set(rows.set)]
    figure = Figure(figsize=(max(6.0, 1.4 * len(names)), 4.0), layout="constrained")
    axes = figure.subplots()
    width = 0.8 / max(len(lines), 1)
    for i, (model, control) in enumerate(lines):
        line = rows[(rows.model == model) & (rows.control == control)].set_index("set").reindex(names)
        x = np.arange(len(names)) + (i - (len(lines) - 1) / 2) * width
        errors = [line.qa_f1 - line.qa_f1_lo, line.qa_f1_hi - line.qa_f1]
        axes.bar(x, line.qa_f1, width, yerr=errors, capsize=2, label=f"{model} / {control}")
    axes.set_xticks(np.arange(len(names)), names, rotation=20)
    axes.set_ylabel("QA-F1")
    axes.set_title(f"LongBench, prompts cut to {length} tokens")
    axes.legend(fontsize="small")
    figure.savefig(path, dpi=120)
