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

Files: ROME's layout, `zsre_mem_eval.json` (or `zsre_mend_eval.json`) and `counterfact.json`.
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

Dataset = Literal["zsre", "counterfact"]
FILES = {"zsre": ("zsre_mem_eval.json", "zsre_mend_eval.json"), "counterfact": ("counterfact.json",)}
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


def load(dataset: Dataset, data_dir: Path, limit: int | None) -> list[Edit]:
    """The first `limit` records of ROME's file."""
    records = json.loads(data_file(data_dir, dataset).read_text(encoding="utf-8"))[:limit]
    return [zsre_edit(i, r) if dataset == "zsre" else counterfact_edit(r) for i, r in enumerate(records)]


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


@torch.no_grad()
def target_logits(model: MemoryLLM, state: MemoryState, prompt: list[int], target: list[int]) -> torch.Tensor:
    """The logits [len(target), V] that predict each target token after the prompt and the target's earlier
    tokens (teacher forced), read from `state`."""
    ids = torch.tensor([prompt + target[:-1]])
    return model(ids, state).logits[0, len(prompt) - 1 :].float()


def token_accuracy(model: MemoryLLM, state: MemoryState, tokenizer, prompt: str, target: str) -> float:
    """The share of the target's tokens (after a space) that are the argmax after the prompt and the ones
    before them."""
    target_ids = encode(tokenizer, " " + target)
    logits = target_logits(model, state, encode(tokenizer, prompt), target_ids)
    return float((logits.argmax(-1) == torch.tensor(target_ids, device=logits.device)).float().mean())


def mean_nll(model: MemoryLLM, state: MemoryState, tokenizer, prompt: str, target: str) -> float:
    """The mean negative log-likelihood per token of " " + target after the prompt."""
    target_ids = encode(tokenizer, " " + target)
    logits = target_logits(model, state, encode(tokenizer, prompt), target_ids)
    return float(F.cross_entropy(logits, torch.tensor(target_ids, device=logits.device)))


def new_beats_true(model: MemoryLLM, state: MemoryState, tokenizer, prompt: str, edit: Edit) -> bool:
    return mean_nll(model, state, tokenizer, prompt, edit.target_new) < mean_nll(
        model, state, tokenizer, prompt, edit.target_true
    )


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
    return {
        "efficacy": float(new_beats_true(model, state, tokenizer, edit.prompt, edit)),
        "generalization": mean(float(new_beats_true(model, state, tokenizer, p, edit)) for p in edit.paraphrases),
        "specificity": mean(float(not new_beats_true(model, state, tokenizer, p, edit)) for p, _ in edit.neighbours),
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
