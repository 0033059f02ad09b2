"""bench editing: ROME's records read into edits, its metrics (token-level for zsRE, new-vs-true probability for
CounterFact) on a model whose predictions are known, and a run on the tiny model with the unedited reference."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from typer.testing import CliRunner

from model.text.tokenizer import byte_tokenizer
from model.zoo import hub
from mplus_cli.app import app
from tasks import editing as ed
from tasks.samples import DataError

ZSRE = [
    {
        "subject": "Watts Humphrey",
        "src": "What university did Watts Humphrey attend?",
        "answers": ["University of Michigan"],
        "rephrase": "What university did Watts Humphrey go to?",
        "loc": "nq question: who played desmond doss father in hacksaw ridge",
        "loc_ans": "Hugo Weaving",
    }
] * 3
COUNTERFACT = [
    {
        "case_id": 7,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "subject": "Danielle Darrieux",
            "target_new": {"str": "English"},
            "target_true": {"str": "French"},
        },
        "paraphrase_prompts": ["Danielle Darrieux spoke the language", "Danielle Darrieux's mother tongue is"],
        "neighborhood_prompts": ["The native language of Montesquieu is", "Jean Gabin spoke the language"],
    }
]


class NextByte:
    """A stand-in model over bytes: after byte b it is most sure of b + 1 (logit 5), then of b (logit 1)."""

    def __call__(self, ids: torch.Tensor, state) -> object:
        logits = torch.zeros(*ids.shape, 258)
        logits.scatter_(-1, (ids + 1).clamp(max=257)[..., None], 5.0)
        logits.scatter_(-1, ids[..., None], 1.0)
        return type("Out", (), {"logits": logits})()


def test_records_become_edits_as_rome_reads_them(tmp_path):
    (tmp_path / "counterfact.json").write_text(json.dumps(COUNTERFACT))
    (tmp_path / "zsre_mend_eval.json").write_text(json.dumps(ZSRE))
    (cf,) = ed.load("counterfact", tmp_path, None)
    assert cf.fact == "The mother tongue of Danielle Darrieux is English." and cf.target_true == "French"
    assert cf.neighbours == (
        ("The native language of Montesquieu is", "French"),
        ("Jean Gabin spoke the language", "French"),
    )
    zsre = ed.load("zsre", tmp_path, 2)
    assert len(zsre) == 2 and zsre[0].fact == "What university did Watts Humphrey attend? University of Michigan"
    assert zsre[0].neighbours == (("nq question: who played desmond doss father in hacksaw ridge?", "Hugo Weaving"),)


def test_token_accuracy_is_the_share_of_target_tokens_predicted_teacher_forced():
    tokenizer = byte_tokenizer()
    # " cd" after "ab": after b it predicts c (not the space), after the space not c either, after c it predicts d
    assert ed.token_accuracy(NextByte(), None, tokenizer, "ab", "cd") == pytest.approx(1 / 3)
    # " cdef": the space and c are missed (the byte tokenizer's space is not next to b), then d, e, f are predicted
    assert ed.token_accuracy(NextByte(), None, tokenizer, "ab", "cdef") == pytest.approx(3 / 5)


def test_new_beats_true_compares_mean_nll_per_token():
    tokenizer = byte_tokenizer()
    edit = ed.Edit("0", "", "", (), target_new="bc", target_true="xz", neighbours=())
    # " bc" and " xz" after "a": neither space nor first letter is favoured; then c after b is, z after x is not
    assert ed.mean_nll(NextByte(), None, tokenizer, "a", "bc") < ed.mean_nll(NextByte(), None, tokenizer, "a", "xz")
    assert ed.new_beats_true(NextByte(), None, tokenizer, "a", edit.target_new, edit.target_true)
    assert not ed.new_beats_true(NextByte(), None, tokenizer, "a", "xz", "bc")


def test_score_is_the_harmonic_mean_and_zero_when_a_part_is():
    assert ed.score(50.0, 100.0, 100.0) == pytest.approx(75.0)
    assert ed.score(0.0, 100.0, 100.0) == 0.0


def test_the_synthetic_edits_are_the_facts_against_the_next_ones_code():
    first, second = ed.load("synthetic", None, 2)
    assert first.fact == f"{first.prompt} {first.target_new}." and first.target_true == second.target_new
    assert first.prompt.startswith("The ") and first.prompt.endswith(" is") and first.paraphrases[0].endswith("? It is")
    assert first.neighbours[0] == (second.prompt, second.target_new)  # the next fact keeps its own code


@pytest.mark.parametrize("dataset", ["zsre", "counterfact"])
def test_a_run_scores_the_unedited_model_then_the_injected_edits(tmp_path, dataset):
    (tmp_path / "zsre_mem_eval.json").write_text(json.dumps(ZSRE))
    (tmp_path / "counterfact.json").write_text(json.dumps(COUNTERFACT * 2))
    args = ["bench", "editing", "--dataset", dataset, "--data-dir", str(tmp_path), "--model", "tiny-free-mplus"]
    result = CliRunner().invoke(app, [*args, "--sequential", "2", "-o", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "run" / "results.csv").open()))
    ids, injected = [edit.id for edit in ed.load(dataset, tmp_path, None)], "injected, 2 in sequence"
    n = len(ids)
    by_group = [(i, "unedited") for i in ids[:2]] + [(i, injected) for i in ids[:2]]  # records 0 and 1, then 2
    by_group += [(ids[2], "unedited"), (ids[2], injected)] if n == 3 else []
    assert [(row["record_id"], row["condition"]) for row in rows] == by_group
    summary = list(csv.DictReader((tmp_path / "run" / "summary.csv").open()))
    assert [row["condition"] for row in summary] == ["unedited", "injected, 2 in sequence"]
    for row in summary:
        mine = [r for r in rows if r["condition"] == row["condition"]]
        assert float(row["efficacy"]) == pytest.approx(100 * sum(float(r["efficacy"]) for r in mine) / n)
    missing = CliRunner().invoke(app, ["bench", "editing", "--dataset", dataset, "--data-dir", str(tmp_path / "none")])
    assert missing.exit_code == 3 and "ROME's data files" in missing.stderr


def test_a_run_cut_short_resumes_and_shards_merge_into_the_rows_of_one_run(tmp_path, monkeypatch):
    args = ["bench", "editing", "--dataset", "synthetic", "--limit", "5", "--sequential", "2", "--model", "tiny-free"]
    whole = tmp_path / "whole"
    assert CliRunner().invoke(app, [*args, "-o", str(whole)]).exit_code == 0
    lines = (whole / "results.csv").read_text().splitlines(keepends=True)  # header, groups of 4, 4 and 2 rows
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "results.csv").write_text("".join(lines[: 1 + 4 + 3]))  # the second group cut short
    config = json.loads((whole / "config.json").read_text())
    (cut / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "finished"}))
    scored, edit_scores = [], ed.edit_scores
    monkeypatch.setattr(ed, "edit_scores", lambda *a: scored.append(a[-1].id) or edit_scores(*a))
    resumed = CliRunner().invoke(app, [*args, "-o", str(cut), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert scored == ["syn-00002", "syn-00003"] * 2 + ["syn-00004"] * 2  # the first group is not scored again
    assert (cut / "results.csv").read_text() == "".join(lines)
    assert (cut / "summary.csv").read_text() == (whole / "summary.csv").read_text()

    shards = [tmp_path / "s1", tmp_path / "s2"]
    for i, out in enumerate(shards, start=1):
        assert CliRunner().invoke(app, [*args, "--shard", f"{i}/2", "-o", str(out)]).exit_code == 0
    merged = CliRunner().invoke(app, ["bench", "merge", *map(str, shards), "-o", str(tmp_path / "all")])
    assert merged.exit_code == 0, merged.output
    assert "score" in merged.output  # printed as bench editing prints a run
    assert (tmp_path / "all" / "results.csv").read_text() == "".join(lines)
    assert (tmp_path / "all" / "summary.csv").read_text() == (whole / "summary.csv").read_text()
    again = CliRunner().invoke(app, [*args, "-o", str(whole)])
    assert again.exit_code == 4 and "pass --resume" in again.stderr


def test_the_tasks_of_a_slurm_array_run_their_slices_into_shard_directories(tmp_path, monkeypatch):
    args = ["bench", "editing", "--dataset", "synthetic", "--limit", "3", "--model", "tiny-free", "-o", str(tmp_path)]
    for task in (1, 2):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
        monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
        monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
        assert CliRunner().invoke(app, args).exit_code == 0
    ids = [
        [row["record_id"] for row in csv.DictReader((tmp_path / f"shard-{i}-of-2" / "results.csv").open())]
        for i in (1, 2)
    ]
    assert ids == [["syn-00000"] * 2, ["syn-00001"] * 2 + ["syn-00002"] * 2]  # each record: unedited, injected
    refused = CliRunner().invoke(app, [*args, "--shard", "1/2"])
    assert refused.exit_code == 2 and "--shard conflicts with" in refused.stderr


@pytest.mark.parametrize("dataset", ["zsre", "counterfact"])
def test_without_a_directory_romes_files_come_from_its_site_through_datasets(tmp_path, monkeypatch, dataset):
    import datasets

    site = tmp_path / "site"  # ROME's site as a local directory in its layout
    site.mkdir()
    (site / "zsre_mem_eval.json").write_text(json.dumps(ZSRE))
    (site / "counterfact.json").write_text(json.dumps(COUNTERFACT))
    monkeypatch.setattr(ed, "ROME_DATA", str(site))
    monkeypatch.setattr(hub, "offline", lambda: True)  # no reachability probe of the hub
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    assert ed.load(dataset, None, None) == ed.load(dataset, site, None) != []
    monkeypatch.setattr(ed, "ROME_DATA", str(tmp_path / "gone"))
    with pytest.raises(DataError, match="pass --data-dir with ROME's files"):
        ed.load(dataset, None, None)
