"""bench integrity: a stream of updates, the latest sample and one further back asked every n updates, the
memory's statistics beside each answer, and a run continued from its saved memory exactly as if unbroken."""

from __future__ import annotations

import csv

import pytest
from typer.testing import CliRunner

from model import store as st
from model.store.inject import session_chunks
from mplus_cli.app import app
from tasks import integrity as ig
from tasks.samples import Sample


def test_the_ema_starts_at_the_first_value_and_follows_by_alpha():
    assert ig.ema([1.0, 0.0, 0.0, 1.0], alpha=0.5) == [1.0, 0.5, 0.25, 0.625]


def test_the_stream_takes_the_samples_in_order_then_again_from_the_first():
    samples = [Sample(f"s{i}", f"fact {i}", f"q{i}?", str(i)) for i in range(3)]
    stream = ig.Stream(samples, every=2, ago=1)
    assert [stream.sample_at(update).id for update in range(1, 8)] == ["s0", "s1", "s2", "s0", "s1", "s2", "s0"]


def run(tmp_path, name: str, *extra: str):
    args = ["bench", "integrity", "--model", "tiny-free-mplus", "--every", "40", "--ago", "50", "--save-every", "80"]
    return CliRunner().invoke(app, [*args, "-o", str(tmp_path / name), *extra])


def rows_of(tmp_path, name: str) -> list[dict[str, str]]:
    return list(csv.DictReader((tmp_path / name / "results.csv").open()))


def test_a_run_asks_the_latest_and_the_earlier_sample_with_the_memorys_statistics(tmp_path):
    result = run(tmp_path, "straight", "--updates", "120")
    assert result.exit_code == 0, result.output
    rows = rows_of(tmp_path, "straight")
    assert [(row["update"], row["asked"]) for row in rows] == [
        ("40", "recent"),  # nothing 50 updates back yet
        ("80", "recent"),
        ("80", "ago"),
        ("120", "recent"),
        ("120", "ago"),
    ]
    assert [row["sample_id"] for row in rows[-2:]] == ["syn-00119", "syn-00069"]  # synthetic sample i at update i+1
    norms, ltm = [float(row["row_norm"]) for row in rows], [float(row["ltm_rows"]) for row in rows]
    assert all(norm > 0 for norm in norms) and ltm[0] < ltm[-1]  # M+: the long-term memory grows with the updates
    assert (tmp_path / "straight" / "integrity.png").is_file()
    again = run(tmp_path, "straight", "--updates", "120")
    assert again.exit_code == 4 and "pass --resume" in again.stderr


def test_a_resumed_run_continues_from_its_saved_memory_as_if_unbroken(tmp_path):
    assert run(tmp_path, "straight", "--updates", "160").exit_code == 0
    assert run(tmp_path, "broken", "--updates", "80").exit_code == 0
    resumed = run(tmp_path, "broken", "--updates", "160", "--resume")
    assert resumed.exit_code == 0, resumed.output
    keep = ("update", "asked", "sample_id", "prediction", "row_norm", "ltm_rows")
    straight, broken = ([{k: row[k] for k in keep} for row in rows_of(tmp_path, d)] for d in ("straight", "broken"))
    assert broken == straight and len(straight) == 7


def test_the_sessions_log_says_how_each_update_was_cut_into_chunks(tmp_path):
    assert run(tmp_path, "cut", "--updates", "3", "--chunk-tokens", "16").exit_code == 0
    session = st.Session.open(tmp_path / "cut", ig.SESSION)
    entries = list(session.log())
    assert [entry["chunks"] for entry in entries] == [-(-entry["tokens"] // 16) for entry in entries]
    assert sum(entry["chunks"] for entry in entries) > 3  # updates longer than one chunk
    chunks = session_chunks(session, session.manifest["state"]["injections"])
    assert len(chunks) == sum(entry["chunks"] for entry in entries)
    assert {chunk.chunk_tokens for chunk in chunks.values()} == {16}  # what `ask --explain` cuts the text by


@pytest.mark.parametrize(("extra", "code"), [(["--updates", "ten"], 2), (["--dataset", "trivia"], 2), (["--chat"], 2)])
def test_bad_options_are_one_line(tmp_path, extra, code):
    result = run(tmp_path, "bad", *extra)
    assert result.exit_code == code, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("mplus: error: ")
