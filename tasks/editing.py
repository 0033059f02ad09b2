"""Model editing by injection (MemoryLLM Table 1): zsRE and CounterFact, scored as ROME's evaluation scores them.

An edit is the fact written as text and injected into a fresh copy of the memory (or, `sequential`, into one
memory after the edits before it); then the record's prompts are read from that memory:
- zsRE (token level): Efficacy and Generalization are the share of the new answer's tokens predicted (argmax,
  teacher forced) after the question and after its paraphrase; Specificity the share of the unrelated NQ
  question's answer tokens still predicted.
- CounterFact (probabilities): a prompt succeeds when the new target is more likely than the true one (mean
  per-token negative log-likelihood lower), Efficacy on the rewrite prompt, Generalization on its
  paraphrases; Specificity when the true target stays more likely on the neighbourhood prompts.
Each is averaged per record, then over records, in points; Score is their harmonic mean. The unedited model
(nothing injected) is the reference row.

Files: ROME's layout, `zsre_mem_eval.json` (or `zsre_mend_eval.json`) and `counterfact.json`, from a directory
or, without one, from ROME's site through `datasets` (downloaded once into its cache). Offline,
`synthetic` stands in for CounterFact: the synthetic facts (made-up entities with four-digit codes) as edits
scored by probability, the next fact's code as the competing "true" target, two other facts' prompts as the
neighbourhood.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from model.core.memoryllm import MemoryLLM
from model.memory.state import MemoryState
from model.text.tokenizer import encode

Dataset = Literal["zsre", "counterfact", "synthetic"]
FILES = {"zsre": ("zsre_mem_eval.json", "zsre_mend_eval.json"), "counterfact": ("counterfact.json",)}
ROME_DATA = "https://rome.baulab.info/data/dsets"  # where ROME's evaluation downloads the same files
METRICS = ("efficacy", "generalization", "specificity")
PAPER_LIMITS = {"zsre": 10_000, "counterfact": 2_000}  # MemoryLLM Table 1: the first records of each


@dataclass(frozen=True)
class Edit:
    """One record: the fact injected, and the prompts its three metrics read."""

    id: str
    fact: str  # the edit as text: the prompt with the new target
    prompt: str  # the rewrite prompt (zsRE: the question)
    paraphrases: tuple[str, ...]
    target_new: str
    target_true: str  # CounterFact's true target ("" for zsRE)
    neighbours: tuple[tuple[str, str], ...]  # (prompt, the answer it should keep)


def data_file(data_dir: Path, dataset: Dataset) -> Path:
    for name in FILES[dataset]:
        if (data_dir / name).is_file():
            return data_dir / name
    raise FileNotFoundError(f"no {' or '.join(FILES[dataset])} in {data_dir} (ROME's data files)")


def load(dataset: Dataset, data_dir: Path | None, limit: int | None) -> list[Edit]:
    """The first `limit` records of ROME's file, from `data_dir` or ROME's site (`synthetic`: built offline)."""
    if dataset == "synthetic":
        return synthetic_edits(limit or 100)
    if data_dir is None:
        records = downloaded(dataset)[:limit]
    else:
        records = json.loads(data_file(data_dir, dataset).read_text(encoding="utf-8"))[:limit]
    return [zsre_edit(i, r) if dataset == "zsre" else counterfact_edit(r) for i, r in enumerate(records)]


def downloaded(dataset: Dataset) -> list[dict]:
    """ROME's file of `dataset` from its site, read by `datasets` (cached after the first download)."""
    import datasets

    from .samples import from_hub

    url = f"{ROME_DATA}/{FILES[dataset][0]}"
    with from_hub(url, "pass --data-dir with ROME's files, or use --dataset synthetic"):
        return list(datasets.load_dataset("json", data_files=url, split="train"))


def zsre_edit(i: int, record: dict) -> Edit:
    answer = record["answers"][0]
    neighbour = (record["loc"] + "?", record["loc_ans"])
    return Edit(str(i), f"{record['src']} {answer}", record["src"], (record["rephrase"],), answer, "", (neighbour,))


def counterfact_edit(record: dict) -> Edit:
    rewrite = record["requested_rewrite"]
    prompt, new, true = (
        rewrite["prompt"].format(rewrite["subject"]),
        rewrite["target_new"]["str"],
        rewrite["target_true"]["str"],
    )
    neighbours = tuple((p, true) for p in record["neighborhood_prompts"])
    return Edit(
        str(record["case_id"]), f"{prompt} {new}.", prompt, tuple(record["paraphrase_prompts"]), new, true, neighbours
    )


def synthetic_edits(limit: int) -> list[Edit]:
    """The first `limit` synthetic facts as CounterFact-style edits: "The <attribute> of the <entity> is" -> its
    code, against the next fact's code; paraphrased as its question; the next two facts' prompts as neighbours."""
    from .data import synthetic

    samples = synthetic(limit + 2, 0).samples
    prompts = [f"The {s.question.removeprefix('What is the ').removesuffix('?')} is" for s in samples]
    edits = []
    for i, sample in enumerate(samples[:limit]):
        neighbours = tuple((prompts[j], samples[j].answer) for j in (i + 1, i + 2))
        fact = f"{prompts[i]} {sample.answer}."
        rival = samples[i + 1].answer
        edits.append(Edit(sample.id, fact, prompts[i], (f"{sample.question} It is",), sample.answer, rival, neighbours))
    return edits


@torch.no_grad()
def target_logits(
    model: MemoryLLM, state: MemoryState, tokenizer, prompt: str, target: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits [t, V] that predict each token of " " + target after the prompt and the target's earlier
    tokens (teacher forced), read from `state`, and those t tokens."""
    prompt_ids, target_ids = encode(tokenizer, prompt), encode(tokenizer, " " + target)
    logits = model(torch.tensor([prompt_ids + target_ids[:-1]]), state).logits[0, len(prompt_ids) - 1 :].float()
    return logits, torch.tensor(target_ids, device=logits.device)


def token_accuracy(model: MemoryLLM, state: MemoryState, tokenizer, prompt: str, target: str) -> float:
    """The share of the target's tokens (after a space) that are the argmax after the prompt and the ones
    before them."""
    logits, targets = target_logits(model, state, tokenizer, prompt, target)
    return float((logits.argmax(-1) == targets).float().mean())


def mean_nll(model: MemoryLLM, state: MemoryState, tokenizer, prompt: str, target: str) -> float:
    """The mean negative log-likelihood per token of " " + target after the prompt."""
    return float(F.cross_entropy(*target_logits(model, state, tokenizer, prompt, target)))


def new_beats_true(model: MemoryLLM, state: MemoryState, tokenizer, prompt: str, new: str, true: str) -> bool:
    """Whether the new target is the more likely after the prompt (the lower mean NLL per token)."""
    return mean_nll(model, state, tokenizer, prompt, new) < mean_nll(model, state, tokenizer, prompt, true)


def edit_scores(model: MemoryLLM, state: MemoryState, tokenizer, dataset: Dataset, edit: Edit) -> dict[str, float]:
    """The record's Efficacy, Generalization and Specificity (0-1) read from `state`."""
    if dataset == "zsre":
        return {
            "efficacy": token_accuracy(model, state, tokenizer, edit.prompt, edit.target_new),
            "generalization": mean(
                token_accuracy(model, state, tokenizer, p, edit.target_new) for p in edit.paraphrases
            ),
            "specificity": mean(token_accuracy(model, state, tokenizer, p, answer) for p, answer in edit.neighbours),
        }

    def beats(prompt: str, true: str = edit.target_true) -> float:
        return float(new_beats_true(model, state, tokenizer, prompt, edit.target_new, true))

    return {
        "efficacy": beats(edit.prompt),
        "generalization": mean(beats(p) for p in edit.paraphrases),
        "specificity": mean(1 - beats(p, true) for p, true in edit.neighbours),  # each keeps its own answer
    }


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def score(efficacy: float, generalization: float, specificity: float) -> float:
    """The harmonic mean of the three (0 when any is 0)."""
    parts = (efficacy, generalization, specificity)
    return 0.0 if min(parts) <= 0 else statistics.harmonic_mean(parts)


def summarize(rows: Sequence[dict]) -> list[dict]:
    """Per dataset and condition: n and the three metrics in points (the mean over records) and their Score."""
    summary = []
    for key in dict.fromkeys((row["dataset"], row["model"], row["condition"]) for row in rows):
        mine = [row for row in rows if (row["dataset"], row["model"], row["condition"]) == key]
        means = {m: 100 * mean(float(row[m]) for row in mine) for m in METRICS}
        summary.append(dict(zip(("dataset", "model", "condition"), key, strict=True)) | {"n": len(mine)} | means)
        summary[-1]["score"] = score(*means.values())
    return summary
