"""bench longbench: LongBench's prompts and answer lengths, its middle cut (and the authors' front cut), its
QA-F1, and a run over local files in LongBench's layout with the tiny model, a system beside its memory."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from model.text.tokenizer import byte_tokenizer, encode
from mplus_cli.app import app
from tasks import longbench as lb

pytest.importorskip("lm_eval")

STORY = "The keeper of the lamp was Edda Malmqvist. " * 6


def write_set(directory, name: str, n: int) -> None:
    answers = ["Edda Malmqvist"]
    rows = [
        {"_id": f"{name}-{i}", "input": f"Who kept lamp {i}?", "context": STORY * (i + 1), "answers": answers}
        for i in range(n)
    ]
    (directory / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_the_prompts_and_answer_lengths_are_longbenchs():
    prompts = lb.prompts()
    assert set(prompts) == {*lb.SETS, lb.OFFLINE}
    assert {name: p.max_new_tokens for name, p in prompts.items() if name in lb.SETS} == {
        "narrativeqa": 128,
        "qasper": 128,
        "multifieldqa_en": 64,
        "hotpotqa": 32,
        "2wikimqa": 32,
        "musique": 32,
    }
    story = prompts["narrativeqa"]
    assert story.head.startswith("You are given a story") and story.head.endswith("Story: ")
    assert story.tail.endswith("Question: {input}\n\nAnswer:")


def test_the_cut_keeps_both_halves_or_the_end():
    ids = list(range(10))
    assert lb.cut(ids, 6, "middle", 2) == [0, 1, 2, 7, 8, 9]
    assert lb.cut(ids, 10, "middle", 2) == ids  # fits: unchanged
    assert lb.cut(ids, 6, "front", 2) == [6, 7, 8, 9]  # the authors': the last max_length - max_new
    assert lb.cut(ids, 20, "front", 2) == ids


def test_qa_f1_is_the_best_token_f1_over_the_answers_in_points():
    assert lb.qa_f1("The Eiffel Tower.", ["Eiffel tower"]) == 100  # articles and punctuation do not count
    # "eiffel tower in paris" vs "eiffel tower": precision 2/4, recall 1 -> 2/3
    assert lb.qa_f1("Eiffel Tower, in Paris", ["Paris, France", "Eiffel Tower"]) == pytest.approx(200 / 3)
    assert lb.qa_f1("", ["Paris"]) == 0 and lb.qa_f1("the", ["a"]) == 0  # nothing left on a side: 0


def test_the_bootstrap_interval_brackets_the_mean_and_averages_sets_alike():
    lo, hi = lb.bootstrap([[0.0, 100.0] * 50])
    assert lo < 50 < hi and hi - lo < 30
    assert lb.bootstrap([[40.0] * 5, [60.0] * 7]) == (50.0, 50.0)  # the mean of the set means, not of all samples


def test_the_question_part_survives_the_cut_and_the_rest_is_injected():
    tokenizer = byte_tokenizer()
    prompt = lb.Prompt("Read this.\n\n", "\n\nQuestion: {input}\nAnswer:", 32)
    record = lb.Record("x", STORY * 20, "Who kept the lamp?", ("Edda Malmqvist",))
    tail = encode(tokenizer, "\n\nQuestion: Who kept the lamp?\nAnswer:")
    injected, question = lb.sample_ids(tokenizer, prompt, record, 512, lb.Settings((512,)))
    assert question == tail and len(injected) + len(question) == 512
    full = encode(tokenizer, "Read this.\n\n" + record.context)
    assert injected == full[:256] + full[len(full) - (256 - len(tail)) :]  # LongBench's halves, the question whole


def test_a_run_over_local_files_writes_results_summary_plots_and_resumes(tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    write_set(data, "narrativeqa", 2)
    write_set(data, "hotpotqa", 2)
    args = ["bench", "longbench", "--model", "tiny-free-mplus", "--sets", "narrativeqa,hotpotqa", "--data-dir"]
    args += [str(data), "--max-length", "512,1k", "--system", "truncate", "-o", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 2 * 2 * 2 * 2  # sets x samples x lengths x (memory, truncate)
    assert {row["control"] for row in rows} == {"memory", "truncate:tokens=4096"}
    short = [row for row in rows if row["max_length"] == "512" and row["sample_id"] == "hotpotqa-1"]
    assert all(0 < int(row["injected_tokens"]) < 512 for row in short)
    summary = list(csv.DictReader((out / "summary.csv").open()))
    averages = [row for row in summary if row["set"] == "average"]
    assert len(averages) == 4 and all(row["sets"] == "2" and row["n"] == "4" for row in averages)
    assert (out / "longbench-512.png").is_file() and (out / "longbench-1k.png").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["prompts"] == {"narrativeqa": 128, "hotpotqa": 32} and config["finished"]
    assert config["model_details"]["tiny-free-mplus"]["systems"]["truncate:tokens=4096"]["params"] == {"tokens": 4096}
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 4 and "pass --resume" in again.stderr
    resumed = CliRunner().invoke(app, [*args, "--resume"])
    assert resumed.exit_code == 0 and len(list(csv.DictReader((out / "results.csv").open()))) == len(rows)


def test_resume_refuses_a_model_whose_answers_were_read_another_way(tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    write_set(data, "hotpotqa", 2)
    args = ["bench", "longbench", "--model", "tiny-free-mplus", "--sets", "hotpotqa", "--data-dir", str(data)]
    args += ["--max-length", "512", "-o", str(out)]
    assert CliRunner().invoke(app, [*args, "--limit", "1"]).exit_code == 0
    config = json.loads((out / "config.json").read_text())
    details = config["model_details"]["tiny-free-mplus"]
    assert details["answer_reading"].startswith("copy 0.3") and details["fingerprint"]
    del details["answer_reading"]  # a run from before the copy
    (out / "config.json").write_text(json.dumps(config))
    before = (out / "results.csv").read_bytes()
    resumed = CliRunner().invoke(app, [*args, "--limit", "1", "--resume"])
    assert resumed.exit_code == 4 and "read another way (no answer bias)" in resumed.stderr
    assert (out / "results.csv").read_bytes() == before


@pytest.mark.parametrize(
    ("extra", "code", "says"),
    [
        (["--sets", "gov_report"], 2, "unknown LongBench set 'gov_report'"),
        (["--max-length", "100"], 2, "at least 256 tokens"),
        (["--system", "colbert"], 2, "unknown system 'colbert'"),
        (["--sets", "qasper"], 3, "no qasper.jsonl"),
    ],
)
def test_bad_input_is_one_line_with_its_exit_code(tmp_path, extra, code, says):
    write_set(tmp_path, "narrativeqa", 1)
    args = ["bench", "longbench", "--model", "tiny", "--data-dir", str(tmp_path), "-o", str(tmp_path / "run"), *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == code, result.output
    assert result.stderr.count("\n") == 1 and says in result.stderr


def test_the_offline_news_set_puts_each_story_among_numbered_passages_and_runs(tmp_path):
    from test_realtext import write_essays, write_news  # this folder is on the path (rootdir-less test modules)

    write_news(tmp_path)
    write_essays(tmp_path)
    records = lb.load("news", 3, tmp_path)
    assert [r.answers for r in records] == [("37",), ("38",), ("39",)]  # test stories 35.. hold the counts i + 2
    for record in records:
        story = f"Story {35 + records.index(record)} begins here."
        assert record.context.startswith("Passage 1:\n") and story in record.context
        assert len(record.context) >= lb.OFFLINE_CONTEXT_CHARS
    assert records[0].context.index("Story 35 ") != records[1].context.index("Story 36 ")  # seeded per question
    assert lb.prompts()["news"] == lb.prompts()["hotpotqa"]
    args = ["bench", "longbench", "--model", "tiny-free-mplus", "--sets", "news", "--data-dir", str(tmp_path)]
    result = CliRunner().invoke(app, [*args, "--limit", "2", "--max-length", "1k", "-o", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert len(list(csv.DictReader((tmp_path / "run" / "results.csv").open()))) == 2


def test_shards_split_each_sets_samples_into_disjoint_slices_and_merge_into_one_run(tmp_path):
    write_set(tmp_path, "musique", 3)
    args = ["bench", "longbench", "--model", "tiny-free-mplus", "--sets", "musique", "--data-dir", str(tmp_path)]
    args += ["--max-length", "512"]
    ids, shards = [], []
    for shard in ("1/1", "1/2", "2/2"):
        shards.append(tmp_path / shard.replace("/", "-of-"))
        result = CliRunner().invoke(app, [*args, "--shard", shard, "-o", str(shards[-1])])
        assert result.exit_code == 0, result.output
        ids.append([row["sample_id"] for row in csv.DictReader((shards[-1] / "results.csv").open())])
    assert ids == [["musique-0", "musique-1", "musique-2"], ["musique-0"], ["musique-1", "musique-2"]]
    merged = CliRunner().invoke(app, ["bench", "merge", str(shards[2]), str(shards[1]), "-o", str(tmp_path / "all")])
    assert merged.exit_code == 0, merged.output
    assert "QA-F1, mean over the sets" in merged.output  # printed as bench longbench prints a run

    def without_timing(directory) -> list[dict]:
        return [row | {"latency_ms": ""} for row in csv.DictReader((directory / "results.csv").open())]

    assert without_timing(tmp_path / "all") == without_timing(shards[0])  # the rows of one process
    assert (tmp_path / "all" / "summary.csv").read_text() == (shards[0] / "summary.csv").read_text()
    assert (tmp_path / "all" / "longbench-512.png").is_file()
    bad = CliRunner().invoke(app, [*args, "--shard", "3/2", "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "bad shard '3/2'" in bad.stderr
