"""`mplus bench retention` / `bench plot`: distance accounting, shards, output files, resume after a crash."""

from __future__ import annotations

import csv
import fcntl
import importlib
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import model as mp
from mplus_cli.app import app
from mplus_cli.commands import sweep as bench
from tasks import data as qa
from tasks import results as res
from tasks.plan import (
    CLEAN,
    Sweep,
)
from tasks.results import COLUMNS, ResultsLog
from tasks.retention import Runner
from tasks.sizes import parse_size

runner = CliRunner()
DECODING = importlib.import_module("model.core.generate")  # the module: model.generate is the function

SYNTHETIC = ["bench", "retention", "--dataset", "synthetic", "--model", "tiny"]


def mplus(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def rows(directory: Path) -> list[dict[str, str]]:
    """results.csv rows without the timing column."""
    with open(directory / "results.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "latency_ms"} for row in csv.DictReader(f)]


# -- the command ---------------------------------------------------------------------------------------


ISSUE_RUN = [*SYNTHETIC, "--max-distance", "4k", "--limit", "5", "--controls", "closed-book"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """The issue's run (synthetic, tiny, 4k, 5 samples) with the closed-book control."""
    out = tmp_path_factory.mktemp("bench") / "run"
    result = mplus(*ISSUE_RUN, "-o", out)
    assert result.exit_code == 0, result.output
    return out


def test_a_run_writes_the_four_files(finished):
    assert sorted(p.name for p in finished.iterdir()) == ["config.json", "results.csv", "retention.png", "summary.csv"]
    assert (finished / "retention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(finished / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == COLUMNS
    assert len(table) == 5 * (4 + 1)  # 5 samples x (4 distances with memory + closed-book)
    assert [(r["control"], int(r["distance_tokens"]), int(r["n_distractors"])) for r in table[:5]] == [
        ("memory", 0, 0),
        ("memory", 1000, 2),
        ("memory", 2000, 4),
        ("memory", 4000, 8),
        ("closed-book", 0, 0),
    ]
    assert {r["memory_kind"] for r in table} == {"memoryllm"} and {r["seed"] for r in table} == {"0"}
    assert all(r["exact_hit"] in "01" and 0 <= float(r["f1"]) <= 1 for r in table)
    summary = (finished / "summary.csv").read_text().splitlines()
    assert summary[0].startswith("dataset,model,memory_kind,control,distance_tokens,n_distractors,n,exact_hit,")
    assert len(summary) == 1 + 1 + 4
    config = json.loads((finished / "config.json").read_text())
    assert config["points"] == [0, 1000, 2000, 4000] and config["max_distance"] == 4000
    assert config["decoding"] == {
        "greedy": True,
        "max_new_tokens": 16,
        "context_template": "{context}",
        "question_template": "Question: {question}\nAnswer:",
        "truncate_tokens": None,
        "chat": "auto",
    }
    assert config["model_details"]["tiny"]["kind"] == "memoryllm"
    assert config["model_details"]["tiny"]["chat"] is False  # the byte tokenizer has no chat template
    assert config["versions"]["torch"] == torch.__version__ and "finished" in config


def test_resume_of_a_finished_run_adds_nothing(finished):
    before = (finished / "results.csv").read_bytes()
    result = mplus(*ISSUE_RUN, "-o", finished)
    assert result.exit_code == 4 and "already holds results: pass --resume" in result.output
    result = mplus(*ISSUE_RUN, "-o", finished, "--resume")
    assert result.exit_code == 0, result.output
    assert (finished / "results.csv").read_bytes() == before


def test_resume_refuses_other_settings(finished):
    result = mplus(*SYNTHETIC, "--max-distance", "4k", "--limit", 5, "--seed", 1, "-o", finished, "--resume")
    assert result.exit_code == 4
    assert "seed: 0 then, 1 now" in result.output


def test_resume_refuses_a_run_whose_answers_were_read_another_way(tmp_path):
    args = ["bench", "retention", "--dataset", "synthetic", "--model", "tiny-free-mplus", "--max-distance", "1k"]
    out = tmp_path / "run"
    assert mplus(*args, "--limit", 1, "-o", out).exit_code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_details"]["tiny-free-mplus"]["answer_reading"].startswith("copy 0.3 after 3+")
    del config["model_details"]["tiny-free-mplus"]["answer_reading"]  # a run from before the copy
    (out / "config.json").write_text(json.dumps(config))
    before = (out / "results.csv").read_bytes()
    result = mplus(*args, "--limit", 2, "-o", out, "--resume")
    assert result.exit_code == 4 and "read another way (no answer bias)" in result.output
    assert (out / "results.csv").read_bytes() == before


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--dataset", "trivia", "--max-distance", "4k"], 2, "'trivia' is not one of 'synthetic', 'news', 'niah'"),
        (["--dataset", "synthetic", "--max-distance", "4q"], 2, "bad size '4q'"),
        (["--dataset", "synthetic", "--max-distance", "4k", "--shard", "3/2"], 2, "bad shard '3/2'"),
        (["--dataset", "synthetic", "--max-distance", "4k", "--points", "0,8k"], 2, "beyond --max-distance"),
        (["--dataset", "synthetic", "--max-distance", "4k", "--controls", "open-book"], 2, "unknown control"),
        (["--dataset", "synthetic", "--max-distance", "4k", "--protocol", "mine"], 2, "'mine' is not one of 'clean'"),
        (["--dataset", "synthetic", "--max-distance", "4k", "--protocol", "authors", "--shard", "1/2"], 2, "--shard"),
        (["--dataset", "squad", "--max-distance", "4k", "--data-dir", "/nonexistent/dir"], 3, "no data directory"),
        (["--max-distance", "4k", "--seeds", "0,x"], 2, "bad --seeds '0,x'"),
        (["--max-distance", "4k", "--seeds", "1,1"], 2, "distinct seeds"),
        (["--max-distance", "4k", "--seeds", "0,1", "--seed", "2"], 2, "--seed and --seeds both given"),
    ],
)
def test_bad_input_is_one_line_and_an_exit_code(tmp_path, args, code, message):
    result = mplus("bench", "retention", "--model", "tiny", *args, "-o", tmp_path / "out")
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_the_data_dir_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MPLUS_DATA_DIR", str(tmp_path / "missing"))
    result = mplus("bench", "retention", "--model", "tiny", "--dataset", "nq", "--max-distance", "1k", "-o", tmp_path)
    assert result.exit_code == 3 and "missing" in result.output


def test_shards_merge_into_the_whole_run(tmp_path):
    common = [*SYNTHETIC, "--max-distance", "1k", "--limit", 5, "--controls", "closed-book"]
    assert mplus(*common, "-o", tmp_path / "all").exit_code == 0
    for i in (1, 2):
        assert mplus(*common, "--shard", f"{i}/2", "-o", tmp_path / f"part{i}").exit_code == 0
    parts = [rows(tmp_path / f"part{i}") for i in (1, 2)]
    ids = [{r["sample_id"] for r in part} for part in parts]
    assert ids[0].isdisjoint(ids[1]) and len(ids[0]) + len(ids[1]) == 5
    key = lambda r: (r["sample_id"], r["control"], int(r["distance_tokens"]))  # noqa: E731
    assert sorted(parts[0] + parts[1], key=key) == sorted(rows(tmp_path / "all"), key=key)
    # bench plot pools the shards into one line per model/control, like the whole run
    result = mplus("bench", "plot", tmp_path / "part1", tmp_path / "part2", "-o", tmp_path / "shards.png")
    assert result.exit_code == 0, result.output
    assert "2 lines" in result.output and (tmp_path / "shards.png").stat().st_size > 10_000


def test_plot_overlays_runs_and_checks_its_input(finished, tmp_path):
    out = tmp_path / "both.png"
    result = mplus("bench", "plot", finished, finished, "-o", out, "--metric", "f1")
    assert result.exit_code == 0, result.output
    assert "2 lines" in result.output and out.read_bytes()[:4] == b"\x89PNG"
    assert mplus("bench", "plot", tmp_path / "none", "-o", out).exit_code == 3
    assert mplus("bench", "plot", finished, "-o", out, "--metric", "bleu").exit_code == 2


def test_a_sample_two_runs_measured_counts_once(finished, tmp_path):
    """Runs that overlap (a control run that also asked from memory, say) pool each sample once."""
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("results.csv", "config.json"):
        (copy / name).write_bytes((finished / name).read_bytes())
    once, twice = res.load_runs([finished]), res.load_runs([finished, copy])
    assert len(once) == len(rows(finished)) and twice.equals(once)


def test_a_torn_last_record_is_dropped_and_redone(finished, tmp_path):
    out = tmp_path / "torn"
    out.mkdir()
    for name in ("results.csv", "config.json"):
        (out / name).write_bytes((finished / name).read_bytes())
    text = (finished / "results.csv").read_bytes()
    (out / "results.csv").write_bytes(text[: len(text) - 40])  # a crash in the middle of the last record
    result = mplus(*ISSUE_RUN, "-o", out, "--resume")
    assert result.exit_code == 0, result.output
    assert rows(out) == rows(finished)


def test_the_authors_protocol_resumes_its_carried_memory(tmp_path, monkeypatch):
    args = [*SYNTHETIC, "--protocol", "authors", "--max-distance", "1k", "--limit", 4, "--controls", "closed-book"]
    assert mplus(*args, "-o", tmp_path / "whole").exit_code == 0

    appends = {"n": 0}
    append = ResultsLog.append

    def crash_on_the_third(self, new_rows):
        appends["n"] += 1
        if appends["n"] == 3:  # the memory after sample 2 is saved, its rows are not written yet
            raise RuntimeError("simulated crash")
        append(self, new_rows)

    monkeypatch.setattr(ResultsLog, "append", crash_on_the_third)
    assert mplus(*args, "-o", tmp_path / "crashed").exit_code == 1
    assert len(rows(tmp_path / "crashed")) == 2 + 1  # sample 1: distances 0 and 1k, closed-book
    assert sorted(p.name for p in (tmp_path / "crashed" / "memory" / "tiny").iterdir()) == ["after-1", "after-2"]
    monkeypatch.setattr(ResultsLog, "append", append)
    result = mplus(*args, "-o", tmp_path / "crashed", "--resume")
    assert result.exit_code == 0, result.output
    assert rows(tmp_path / "crashed") == rows(tmp_path / "whole")
    assert [p.name for p in (tmp_path / "crashed" / "memory" / "tiny").iterdir()] == ["after-4"]


def test_killed_mid_run_then_resumed_equals_an_uninterrupted_run(finished, tiny, tmp_path):
    """A real process, killed with SIGKILL while it writes results, then resumed in a new process, gives the
    rows of the uninterrupted in-process run (`tiny` pins this process to one thread, like OMP_NUM_THREADS)."""
    command = [sys.executable, "-m", "mplus_cli", *ISSUE_RUN, "-o", str(tmp_path)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    results, deadline = tmp_path / "results.csv", time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if results.exists() and results.read_text().count("\n") > 1 + 5:  # past the first sample
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL  # it was still running
    assert 0 < len(rows(tmp_path)) < len(rows(finished))

    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert rows(tmp_path) == rows(finished)


# -- defaults, plan, chat, warnings, plot ------------------------------------------------------------


def test_the_dataset_defaults_to_synthetic(tmp_path):
    result = mplus("bench", "retention", "--model", "tiny", "--max-distance", "1k", "--limit", 1, "-o", tmp_path / "o")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config["dataset"] == "synthetic" and config["data"] == "synthetic"
    assert {r["dataset"] for r in rows(tmp_path / "o")} == {"synthetic"}


def test_the_plan_and_the_estimates_come_before_the_results(tmp_path, monkeypatch):
    figures = []
    figure = res.figure
    monkeypatch.setattr(res, "figure", lambda *args, **kwargs: figures.append(figure(*args, **kwargs)) or figures[-1])
    limit, models, points = 3, ["tiny", "tiny-free"], [0, 1000, 2000]
    args = ["--max-distance", "2k", "--limit", limit, "--controls", "closed-book,full-context"]
    result = mplus("bench", "retention", "-m", models[0], "-m", models[1], *args, "-o", tmp_path / "o")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    plan = next(line for line in lines if line.startswith("plan: "))
    numbers = re.fullmatch(
        r"plan: (\d+) samples x (\d+) distances \(0 to 2k\) x (\d+) models x (\d+) conditions "
        r"\(memory, closed-book, full-context\) = (\d+) questions, (\S+) distractor tokens to inject",
        plan,
    )
    assert numbers, plan
    questions_per_sample = len(points) + 1 + len(points)  # memory at each distance, closed-book, full-context
    assert [int(n) for n in numbers.groups()[:5]] == [limit, len(points), 2, 3, limit * 2 * questions_per_sample]
    assert parse_size(numbers[6]) == limit * points[-1] * len(models)  # each sample gets max-distance tokens
    with open(tmp_path / "o" / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == limit * 2 * questions_per_sample  # the plan's questions are the rows written
    for model in models:  # a rough estimate once loaded, a firmer one after the first sample, before the end
        rough = lines.index(next(line for line in lines if line.startswith(f"{model}: about ")))
        firmer = next(line for line in lines if line.startswith(f"{model}: first sample in "))
        assert re.search(r"tokens/s\): about .* for the other 2 samples$", firmer), firmer
        assert lines.index(plan) < rough < lines.index(firmer) < lines.index(next(x for x in lines if "wrote" in x))
    assert "warning" not in result.output  # the untrained models do answer (noise)
    legend = [text.get_text() for text in figures[0].legends[0].get_texts()]
    untrained = "untrained: seeded random weights, answers are noise"
    assert f"tiny ({untrained}), memory, n=3" in legend
    assert f"tiny-free ({untrained}; training-free memory, demo), closed-book, n=3" in legend
    assert len(legend) == 2 * 3


def test_the_plot_names_model_label_control_and_n_on_a_symlog_axis_to_160k():
    distances = [0, 1000, 2000, 4000, 8000, 16000, 32000, 64000, 128000, 160000]
    results = pd.DataFrame(
        [
            {"dataset": "synthetic", "sample_id": f"s{i}", "model": "smollm2-135m", "memory_kind": "mplus"}
            | {"control": "memory", "distance_tokens": d, "n_distractors": 0, "exact_hit": i % 2, "em": 0, "f1": 0.5}
            for i in range(4)
            for d in distances
        ]
        + [
            {"dataset": "synthetic", "sample_id": f"s{i}", "model": "smollm2-135m", "memory_kind": "mplus"}
            | {"control": "closed-book", "distance_tokens": 0, "n_distractors": 0, "exact_hit": 0, "em": 0, "f1": 0.0}
            for i in range(4)
        ]
    )
    fig = res.figure(res.summarize(results), labels={"smollm2-135m": "training-free memory, demo"})
    assert [text.get_text() for text in fig.legends[0].get_texts()] == [
        "smollm2-135m (training-free memory, demo), closed-book, n=4",
        "smollm2-135m (training-free memory, demo), memory, n=4",
    ]
    ax = fig.axes[0]
    assert ax.get_xscale() == "symlog" and ax.get_xlim() == (0, 160000)
    assert list(ax.get_xticks()) == distances
    formatter = ax.xaxis.get_major_formatter()
    labels = ["0", "1k", "2k", "4k", "8k", "16k", "32k", "64k", "128k", "160k"]
    assert [formatter(x, i) for i, x in enumerate(distances)] == labels


def with_chat_template(monkeypatch, template: str) -> None:
    """Models loaded by the bench get a chat template (the byte tokenizer has none)."""
    load = bench.load_model

    def load_with_template(*args, **kwargs):
        lm = load(*args, **kwargs)
        lm.tokenizer.chat_template = template
        return lm

    monkeypatch.setattr(bench, "load_model", load_with_template)


def test_the_chat_template_is_used_by_default_when_the_tokenizer_has_one(tmp_path, monkeypatch, chat_template):
    load = bench.load_model
    with_chat_template(monkeypatch, chat_template)
    prompts, generate = [], mp.generate

    def spy(lm, state, ids, settings, **options):
        prompts.append(list(ids))
        return generate(lm, state, ids, settings, **options)

    monkeypatch.setattr(DECODING, "generate", spy)  # what a question of a batch of one runs
    args = [*SYNTHETIC, "--max-distance", "1k", "--limit", 2, "--controls", "closed-book"]
    questions = {s.question for s in qa.synthetic(2, 0).samples}
    tokenizer = mp.load("tiny").tokenizer

    assert mplus(*args, "-o", tmp_path / "auto").exit_code == 0
    config = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert config["decoding"]["chat"] == "auto" and config["model_details"]["tiny"]["chat"] is True
    asked = {tokenizer.decode(p) for p in prompts}
    assert asked == {f"<u>{q}</u><a>" for q in questions}

    prompts.clear()
    assert mplus(*args, "--no-chat", "-o", tmp_path / "plain").exit_code == 0
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert config["decoding"]["chat"] is False and config["model_details"]["tiny"]["chat"] is False
    assert {tokenizer.decode(p) for p in prompts} == {f"Question: {q}\nAnswer:" for q in questions}

    result = mplus(*args, "--no-chat", "-o", tmp_path / "auto", "--resume")  # a resumed run keeps its setting
    assert result.exit_code == 4 and "'chat': 'auto'} then" in result.output and "'chat': False} now" in result.output
    monkeypatch.setattr(bench, "load_model", load)  # the same option, but now the tokenizer has no template
    result = mplus(*args, "-o", tmp_path / "auto", "--resume")
    assert result.exit_code == 4 and "of 'tiny' asked with a chat template: use its tokenizer" in result.output


@pytest.mark.parametrize(
    ("template", "option", "hint"),
    [
        (False, [], "check the model and its --tokenizer"),
        (True, [], "try --no-chat"),
        (True, ["--no-chat"], "try without --no-chat"),
    ],
)
def test_mostly_empty_predictions_warn_with_what_to_try(tmp_path, monkeypatch, chat_template, template, option, hint):
    if template:
        with_chat_template(monkeypatch, chat_template)
    monkeypatch.setattr(DECODING, "generate", lambda *args, **options: mp.Generation([], "stop"))
    result = mplus(*SYNTHETIC, "--max-distance", "1k", "--limit", 2, *option, "-o", tmp_path / "o")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if "warning" in line]
    assert len(warnings) == 1  # 2 samples x 2 distances, all empty
    assert warnings[0].startswith(f"mplus: warning: 4 of 4 predictions of tiny are empty: {hint}")


def test_the_empty_prediction_warning_needs_more_than_half():
    assert bench.empty_warning("m", ["", "a"], chat=False, has_template=False) is None
    assert bench.empty_warning("m", ["a", "b", "c"], chat=True, has_template=True) is None
    warning = bench.empty_warning("m", ["", " \n", "a"], chat=True, has_template=True)
    assert warning.startswith("mplus: warning: 2 of 3 predictions of m are empty: try --no-chat")


def test_a_second_run_into_a_directory_being_written_is_refused(tmp_path):
    """Two processes (say --shard 1/2 and 2/2 given one --output) never write one results.csv: the one that
    finds the directory held stops with exit 4 and writes nothing."""
    out = tmp_path / "out"
    out.mkdir()
    held = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        result = mplus(*SYNTHETIC, "--max-distance", "1k", "--limit", "1", "-o", out)
    finally:
        os.close(held)
    assert result.exit_code == 4 and "busy" in result.stderr, result.output
    assert not (out / "results.csv").exists()
    assert mplus(*SYNTHETIC, "--max-distance", "1k", "--limit", "1", "-o", out).exit_code == 0  # free again


def test_seeds_run_every_sample_under_each_seed_and_the_summary_gives_their_spread(tmp_path):
    out = tmp_path / "run"
    args = ["bench", "retention", "--model", "tiny", "--max-distance", "1k", "--limit", "3", "--seeds", "0,1"]
    result = mplus(*args, "-o", out)
    assert result.exit_code == 0, result.output
    found = rows(out)
    assert sorted({(r["sample_id"], r["seed"]) for r in found}) == [(f"syn-0000{i}", s) for i in range(3) for s in "01"]
    at_1k = {(r["sample_id"], r["seed"]): float(r["evidence_stm"]) for r in found if r["distance_tokens"] == "1000"}
    assert any(at_1k[(sample, "0")] != at_1k[(sample, "1")] for sample, _ in at_1k)  # the drops differ by seed
    summary = pd.read_csv(out / "summary.csv")
    assert (summary.n == 6).all() and (summary.n_seeds == 2).all()
    memory_1k = summary[(summary.control == "memory") & (summary.distance_tokens == 1000)].iloc[0]
    assert memory_1k.evidence_stm == pytest.approx(sum(at_1k.values()) / 6)
    assert json.loads((out / "config.json").read_text())["seed"] == [0, 1]
    again = mplus(*args, "-o", out, "--resume")
    assert again.exit_code == 0 and len(rows(out)) == len(found)


def test_the_seed_spread_is_the_deviation_of_the_per_seed_means():
    answers = pd.DataFrame(
        {"seed": [0, 0, 1, 1, 2, 2], "exact_hit": [1, 1, 1, 0, 0, 0], "em": [0] * 6, "f1": [1.0, 0.5, 0, 0, 0, 0]}
    )
    spread = res.seed_spread(answers)
    assert spread["n_seeds"] == 3
    assert spread["exact_hit_seed_sd"] == pytest.approx(0.5)  # per-seed means 1, 0.5, 0: sd 0.5
    assert spread["em_seed_sd"] == 0.0 and spread["f1_seed_sd"] == pytest.approx(0.4330127, rel=1e-6)
    assert math.isnan(res.seed_spread(answers[answers.seed == 0])["exact_hit_seed_sd"])


def test_resuming_one_seed_keeps_the_rows_of_the_others(tmp_path):
    log = res.ResultsLog(tmp_path / "results.csv")
    row = dict.fromkeys(res.COLUMNS, "") | {"model": "m", "control": "memory", "sample_id": "s"}
    log.append([row | {"seed": 0, "distance_tokens": 0}, row | {"seed": 1, "distance_tokens": 0}])
    assert log.complete_units("m", {"memory": 2}, seed=1) == set()  # seed 1's unit is torn: dropped
    assert [r["seed"] for r in res.ResultsLog(tmp_path / "results.csv").rows] == ["0"]


def test_the_time_estimate_counts_only_the_units_left(word_model, tmp_path, monkeypatch):
    clock = itertools.count()  # every timed step takes one second: the estimates compare exactly
    monkeypatch.setattr("tasks.retention.time.perf_counter", lambda: float(next(clock)))
    data = qa.synthetic(3, distractor_chars=60_000)
    sweep = Sweep(data, CLEAN, [0, 700], controls=("closed-book",), systems=("truncate",))
    runner = Runner(word_model, "words", sweep, ResultsLog(tmp_path / "results.csv"))
    samples = data.samples
    every = {(s.id, c) for s in samples for c in ("memory", "closed-book", *runner.systems)}
    assert runner.rough_seconds(samples, every) == 0.0
    memory_done = {(s.id, "memory") for s in samples}
    only_truncate = runner.rough_seconds(samples, memory_done | {(s.id, "closed-book") for s in samples})
    assert 0 < only_truncate < runner.rough_seconds(samples, memory_done) < runner.rough_seconds(samples)


@pytest.mark.parametrize(
    ("name", "shared"), [("tiny-free", {"closed-book", "full-context"}), ("tiny", {"full-context"})]
)
def test_a_model_with_an_earlier_ones_base_copies_the_controls_it_would_ask_alike(tmp_path, monkeypatch, name, shared):
    """Closed-book is copied only when the initial memory is empty (`tiny` starts with 128 rows per layer)."""
    lm = mp.load(name)
    data = qa.synthetic(2, distractor_chars=20_000)
    sweep = Sweep(data, CLEAN, [0, 600], controls=("closed-book", "full-context"))
    log = ResultsLog(tmp_path / "results.csv")
    first, second = Runner(lm, "a", sweep, log), Runner(lm, "b", sweep, log)
    assert first.base is None  # a model built in memory: no files name its weights
    monkeypatch.setattr(lm, "info", replace(lm.info, path=str(tmp_path / "weights")))
    chat = replace(sweep, protocol=replace(CLEAN, chat=True))
    assert first.base == second.base and first.base != Runner(lm, "c", chat, log).base
    first.run(data.samples)
    second.twin, asked, ask = "a", [], second.ask
    second.ask = lambda samples, states, prompts, control, *rest: (
        asked.append(control) or ask(samples, states, prompts, control, *rest)
    )
    second.run(data.samples)
    assert set(asked) == {"memory"} | ({"closed-book", "full-context"} - shared)

    def control_rows(model: str, control: str) -> list[dict]:
        return [r | {"model": ""} for r in log.rows if (r["model"], r["control"]) == (model, control)]

    for control in shared:  # copied: the latency too
        assert control_rows("a", control) == control_rows("b", control) != []
    assert len(log.rows) == 2 * (2 * 2 + 2 * 2 + 2)  # a model: memory and full-context 2 samples x 2, closed-book 2
