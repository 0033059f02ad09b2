"""Sweeps on the standard launchers: torchrun ranks and Slurm array tasks give the rows of one process;
`bench merge` combines shard directories; --device / --dtype on inject, ask and bench retention."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mplus_cli.app import app
from tasks.launch import SLURM, TORCHRUN, Launch, LaunchError, detect

ROOT = Path(__file__).resolve().parents[2]
RUN = ["--model", "tiny", "--max-distance", "1k", "--limit", "5", "--controls", "closed-book"]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")
LAUNCH_VARS += ("SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP")
runner = CliRunner()


def mplus(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def rows(directory: Path) -> list[dict[str, str]]:
    """results.csv in file order, without the timing column."""
    with open(directory / "results.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "latency_ms"} for row in csv.DictReader(f)]


@pytest.fixture(autouse=True)
def no_launcher(monkeypatch) -> None:
    """Tests start outside any launcher (CI may itself run under Slurm)."""
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The reference: the same sweep in one process, with two models."""
    out = tmp_path_factory.mktemp("one") / "run"
    result = mplus("bench", "retention", *RUN, "--model", "tiny-free", "-o", out)
    assert result.exit_code == 0, result.output
    return out


def slurm_task(monkeypatch, task_id: int, count: int, first: int = 0) -> None:
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task_id))
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", str(count))
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", str(first))


# -- the launchers -------------------------------------------------------------------------------------------
def test_the_launch_comes_from_the_environment():
    assert detect({}) == Launch()
    assert detect({"WORLD_SIZE": "1", "RANK": "0"}) == Launch()  # one process: no shards
    assert detect({"WORLD_SIZE": "8", "RANK": "11", "LOCAL_RANK": "3"}) == Launch(TORCHRUN, 12, 8, 3)
    slurm = {"SLURM_ARRAY_TASK_ID": "14", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "10"}
    assert detect(slurm | {"SLURM_ARRAY_TASK_STEP": "2"}) == Launch(SLURM, 3, 4)
    assert detect(slurm | {"SLURM_ARRAY_TASK_ID": "11"}) == Launch(SLURM, 2, 4)
    assert Launch(SLURM, 3, 4).directory(Path("o")) == Path("o/shard-3-of-4")
    assert Launch().directory(Path("o")) == Path("o")
    for env, says in [
        (slurm | {"SLURM_ARRAY_TASK_ID": "15"}, "submit a contiguous array"),  # a gap: 10, 11, 12, 15
        (slurm | {"WORLD_SIZE": "2", "RANK": "0"}, "both torchrun"),
        ({"WORLD_SIZE": "2"}, "RANK=None"),
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE=two"),
    ]:
        with pytest.raises(LaunchError, match=says):
            detect(env)


def of_tiny(lines: list) -> list:
    """The reference's rows (or summary lines) of the model `tiny` alone: a one-model run's."""
    return [line for line in lines if (line["model"] if isinstance(line, dict) else line.split(",")[1]) == "tiny"]


def test_two_torchrun_processes_write_the_rows_of_one(one_process, tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS} | {"PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "mplus_cli", "bench", "retention", *RUN, "-o", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert rows(out) == of_tiny(rows(one_process))
    summary = (one_process / "summary.csv").read_text().splitlines()
    assert (out / "summary.csv").read_text().splitlines() == summary[:1] + of_tiny(summary[1:])
    assert (out / "retention.png").stat().st_size > 10_000
    config = json.loads((out / "config.json").read_text())
    assert config["shard"] == "1/1" and config["launcher"] == TORCHRUN and "finished" in config
    assert config["merged_from"] == [str(out / "shard-1-of-2"), str(out / "shard-2-of-2")]
    assert sorted(p.name for p in (out / "shard-2-of-2").iterdir()) == ["config.json", "results.csv"]
    assert done.stdout.count("exact hit by distance (5 samples") == 1  # rank 0 reports the whole run once


def test_slurm_array_tasks_merge_into_the_rows_of_one(one_process, tmp_path, monkeypatch):
    out = tmp_path / "run"
    for task in (7, 8):  # --array=7-8
        slurm_task(monkeypatch, task, 2, first=7)
        result = mplus("bench", "retention", *RUN, "--model", "tiny-free", "-o", out)
        assert result.exit_code == 0, result.output
    shards = [out / "shard-1-of-2", out / "shard-2-of-2"]
    assert sorted(out.iterdir()) == shards and all((s / "retention.png").is_file() for s in shards)
    merged = mplus("bench", "merge", *reversed(shards), "-o", tmp_path / "all", "--json")  # any order
    assert merged.exit_code == 0, merged.output
    assert rows(tmp_path / "all") == rows(one_process)  # model by model, each in sample order
    assert json.loads(merged.stdout)["rows"] == len(rows(one_process))
    assert (tmp_path / "all" / "summary.csv").read_text() == (one_process / "summary.csv").read_text()
    again = mplus("bench", "merge", *shards, "-o", tmp_path / "all")
    assert again.exit_code == 4 and "already holds results: pass --force" in again.stderr
    assert mplus("bench", "merge", *shards, "-o", tmp_path / "all", "--force").exit_code == 0


def test_an_explicit_shard_conflicts_with_a_launcher(tmp_path, monkeypatch):
    slurm_task(monkeypatch, 0, 2)
    result = mplus("bench", "retention", *RUN, "--shard", "1/2", "-o", tmp_path / "run")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "--shard conflicts with Slurm array tasks, which shard the run: drop --shard" in result.stderr
    result = mplus("bench", "retention", *RUN, "--protocol", "authors", "-o", tmp_path / "run")
    assert result.exit_code == 2 and "sharding over 2 Slurm array tasks needs --protocol clean" in result.stderr


# -- bench merge's refusals ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Shards 1/2 and 2/2 of a small run, and shard 1/2 with another seed."""
    root = tmp_path_factory.mktemp("shards")
    small = ["--model", "tiny", "--max-distance", "64", "--limit", "2"]
    for name, extra in [
        ("1", ["--shard", "1/2"]),
        ("2", ["--shard", "2/2"]),
        ("seed1", ["--shard", "1/2", "--seed", 1]),
    ]:
        assert mplus("bench", "retention", *small, *extra, "-o", root / name).exit_code == 0
    return root


@pytest.mark.parametrize(
    ("names", "code", "says"),
    [
        (["1"], 2, "shard 2/2 is missing: add the directories, or run them with --shard i/n"),
        (["1", "2", "1-again"], 2, "shard 1/2 is given twice"),
        (["seed1", "2"], 4, "ran other settings than"),
        (["1", "unfinished"], 4, "is not finished: complete it with the same bench command"),
        (["1", "empty"], 3, "no config.json in"),
    ],
)
def test_merge_refuses_shards_that_do_not_make_one_run(shards, tmp_path, names, code, says):
    (tmp_path / "1-again").mkdir()
    for name in ("config.json", "results.csv"):
        (tmp_path / "1-again" / name).write_bytes((shards / "1" / name).read_bytes())
    (tmp_path / "unfinished").mkdir()
    config = json.loads((shards / "2" / "config.json").read_text())
    (tmp_path / "unfinished" / "config.json").write_text(
        json.dumps({k: v for k, v in config.items() if k != "finished"})
    )
    (tmp_path / "unfinished" / "results.csv").write_bytes((shards / "2" / "results.csv").read_bytes())
    (tmp_path / "empty").mkdir()
    directories = [shards / n if (shards / n).exists() else tmp_path / n for n in names]
    result = mplus("bench", "merge", *directories, "-o", tmp_path / "out")
    assert result.exit_code == code, result.output
    assert result.stderr.count("\n") == 1 and says in result.stderr, result.stderr
    assert not (tmp_path / "out" / "results.csv").exists()


def test_merge_names_the_setting_that_differs(shards, tmp_path):
    result = mplus("bench", "merge", shards / "seed1", shards / "2", "-o", tmp_path / "out")
    assert "(seed: 1 there, 0 here): merge the shards of one run" in result.stderr
    into_a_shard = mplus("bench", "merge", shards / "1", shards / "2", "-o", shards / "2")
    assert into_a_shard.exit_code == 2 and "is one of the shards: choose another --output" in into_a_shard.stderr


def test_shards_whose_answers_were_read_another_way_are_not_one_run():
    from tasks.merge import settings_diff

    details = {"fingerprint": "f", "chat": True, "dtype": "float32", "answer_reading": "copy 0.3"}
    first = {"models": ["m"], "model_details": {"m": details}}
    other = {"models": ["m"], "model_details": {"m": {k: v for k, v in details.items() if k != "answer_reading"}}}
    assert settings_diff(first, other) == "m answer_reading: 'copy 0.3' there, None here"
    assert settings_diff(first, first) == ""


# -- --device and --dtype ------------------------------------------------------------------------------------
def test_inject_and_ask_run_on_the_device_and_dtype_given(tmp_path):
    (tmp_path / "notes.txt").write_text("The spare key of the lighthouse is under the third stone of the path.")
    store = ["--store", tmp_path / "store", "-s", "s", "--device", "cpu", "--dtype", "bfloat16"]
    injected = mplus("inject", tmp_path / "notes.txt", *store, "--model", "tiny-mplus", "--json")
    assert injected.exit_code == 0, injected.output
    assert json.loads(injected.stdout)["dtype"] == "bfloat16"  # a new session's rows too
    asked = mplus("ask", "Where is the key?", *store, "--max-new-tokens", 4, "--json")
    assert asked.exit_code == 0, asked.output
    assert 1 <= len(json.loads(asked.stdout)["token_ids"]) <= 4


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["ask", "Where?", "--device", "cuda"], "--device cuda but no CUDA device is available: use --device cpu"),
        (["inject", "-", "-s", "s", "--device", "cuda:1"], "--device cuda:1 but no CUDA device is available"),
        (["bench", "retention", "--max-distance", "64", "--device", "cuda"], "use --device cpu"),
        (["ask", "Where?", "--device", "gpu"], "unknown --device 'gpu': use auto, cpu, cuda or cuda:N"),
        (["ask", "Where?", "--dtype", "fp8"], "invalid value for '--dtype': 'fp8' is not one of 'bfloat16', 'float16'"),
    ],
)
def test_an_unusable_device_or_dtype_is_one_line_and_exit_2(tmp_path, monkeypatch, args, says):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = mplus(*args, "--store" if args[0] != "bench" else "-o", tmp_path / "x")
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and says in result.stderr, result.stderr


def test_bench_retention_records_the_device_and_dtype(tmp_path):
    result = mplus(
        "bench",
        "retention",
        "--model",
        "tiny",
        "--max-distance",
        "64",
        "--limit",
        1,
        "--device",
        "cpu",
        "-o",
        tmp_path / "o",
    )
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config["device"].startswith("cpu (") and config["model_details"]["tiny"]["dtype"] == "float32"


# -- batched samples -----------------------------------------------------------------------------------------
def test_a_batch_of_samples_writes_the_rows_of_one_at_a_time(one_process, tmp_path):
    out = tmp_path / "run"
    result = mplus("bench", "retention", *RUN, "--model", "tiny-free", "--batch-size", 3, "-o", out)
    assert result.exit_code == 0, result.output
    assert rows(out) == rows(one_process)  # 5 samples in batches of 3 and 2, rows in the same order
    assert json.loads((out / "config.json").read_text())["batch_size"] == 3


def test_batched_mplus_samples_retrieve_from_their_own_memories(tmp_path):
    """M+ retrieves per sample inside a batch: the predictions and the evidence each read are a lone run's."""
    run = ["--model", "tiny-mplus", "--model", "tiny-free-mplus", "--max-distance", "1k", "--limit", "4"]
    for size in (1, 4):
        result = mplus("bench", "retention", *run, "--batch-size", size, "-o", tmp_path / f"b{size}")
        assert result.exit_code == 0, result.output
    alone, together = rows(tmp_path / "b1"), rows(tmp_path / "b4")
    assert together == alone and {row["evidence_retrieved"] != "" for row in alone} == {True}


def test_a_batch_cannot_carry_memory_across_samples(tmp_path):
    result = mplus("bench", "retention", *RUN, "--protocol", "authors", "--batch-size", 2, "-o", tmp_path / "r")
    assert result.exit_code == 2 and "--batch-size needs --protocol clean" in result.output
