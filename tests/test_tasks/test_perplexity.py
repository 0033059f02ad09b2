"""bench perplexity: the summed NLL read through the KV cache in pieces equals one full forward's, with a memory
prefix and without; the run scores every text both ways and records where the texts came from."""

from __future__ import annotations

import csv
import hashlib
import json
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import model as mp
from model.systems.baselines import no_memory
from mplus_cli.app import app
from tasks import perplexity as pp


def full_forward_nll(lm, state, ids: list[int]) -> float:
    logits = lm(torch.tensor([ids]), state).logits[0]  # [n, V], one forward
    return -float(F.log_softmax(logits[:-1].float(), dim=-1).gather(1, torch.tensor(ids[1:])[:, None]).sum())


@pytest.mark.parametrize("name", ["tiny-mplus", "tiny-free"])
def test_the_nll_is_one_full_forwards_whatever_the_piece_its_logits_are_computed_in(name):
    torch.manual_seed(0)
    lm = mp.load(name)
    ids = torch.randint(0, 256, (41,)).tolist()
    state = lm.new_state(0)
    assert lm.prefix_length(state) > 0  # a memory prefix is read
    for reading in (state, no_memory(lm)):
        expected = full_forward_nll(lm, reading, ids)
        assert pp.text_nll(lm, reading, ids, piece=7) == pytest.approx(expected, rel=1e-5)
    assert abs(pp.text_nll(lm, state, ids) - pp.text_nll(lm, no_memory(lm), ids)) > 1e-3  # the memory counts


def test_perplexity_is_exp_of_the_mean_nll_per_token():
    assert pp.perplexity(math.log(4) * 10, 10) == pytest.approx(4.0)
    assert math.isnan(pp.perplexity(0.0, 0))


def test_a_run_scores_every_text_with_and_without_memory_token_weighted(tmp_path):
    files = []
    for i, words in enumerate(["The ferry leaves at seven. " * 5, "Rain is due on Tuesday. " * 25]):
        files.append(tmp_path / f"t{i}.txt")
        files[-1].write_text(words)
    out = tmp_path / "run"
    args = ["bench", "perplexity", "--model", "tiny-free-mplus", "--max-tokens", "200", "-o", str(out)]
    result = CliRunner().invoke(app, [*args, "--text", str(files[0]), "--text", str(files[1])])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "results.csv").open()))
    # a token per byte (the byte tokenizer has no bos): every token after the first is scored
    assert [(row["reading"], row["tokens"]) for row in rows] == [
        ("memory", "134"),
        ("base", "134"),
        ("memory", "199"),
        ("base", "199"),
    ]
    summary = {row["reading"]: row for row in csv.DictReader((out / "summary.csv").open())}
    for reading in ("memory", "base"):
        mine = [row for row in rows if row["reading"] == reading]
        mean = sum(float(row["nll"]) for row in mine) / sum(int(row["tokens"]) for row in mine)
        assert float(summary[reading]["perplexity"]) == pytest.approx(math.exp(mean))
    ratio = float(summary["memory"]["perplexity"]) / float(summary["base"]["perplexity"])
    assert float(summary["memory"]["memory_vs_base"]) == pytest.approx(ratio)
    config = json.loads((out / "config.json").read_text())
    assert config["texts"][str(files[1])] == hashlib.sha256(files[1].read_bytes()).hexdigest()
    fill = tmp_path / "fill.txt"
    fill.write_text("Old harbour notes. " * 60)  # 1,140 bytes: of its first 1k tokens, one chunk of 512 injected
    args_filled = [*args[:-1], str(tmp_path / "filled"), "--text", str(files[0]), "--fill", str(fill)]
    filled = CliRunner().invoke(app, [*args_filled, "--fill-tokens", "1k"])
    assert filled.exit_code == 0, filled.output
    after = {row["reading"]: float(row["nll"]) for row in csv.DictReader((tmp_path / "filled" / "results.csv").open())}
    assert after["base"] == pytest.approx(float(rows[1]["nll"]))  # the base model reads as before
    assert abs(after["memory"] - float(rows[0]["nll"])) > 1e-3  # the filled memory is read
    assert json.loads((tmp_path / "filled" / "config.json").read_text())["fill"] == str(fill)
    again = CliRunner().invoke(app, [*args, "--text", str(files[0])])
    assert again.exit_code == 4 and "already holds results" in again.stderr
    missing = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "other"), "--text", str(tmp_path / "nope.txt")])
    assert missing.exit_code == 2 and "no text file" in missing.stderr


def test_a_run_cut_short_resumes_and_shards_merge_into_the_rows_of_one_run(tmp_path, monkeypatch):
    files = []
    for i in range(3):
        files.append(tmp_path / f"t{i}.txt")
        files[-1].write_text(f"Story {i}: the ferry leaves at seven. " * (3 + i))
    args = ["bench", "perplexity", "--model", "tiny-free-mplus", "--max-tokens", "100"]
    args += [part for path in files for part in ("--text", str(path))]
    whole = tmp_path / "whole"
    assert CliRunner().invoke(app, [*args, "-o", str(whole)]).exit_code == 0
    lines = (whole / "results.csv").read_text().splitlines(keepends=True)  # header, two rows per text
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "results.csv").write_text("".join(lines[:4]))  # the second text has one reading of two
    config = json.loads((whole / "config.json").read_text())
    (cut / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "finished"}))
    scored, text_nll = [], pp.text_nll
    monkeypatch.setattr(pp, "text_nll", lambda lm, state, ids: scored.append(len(ids)) or text_nll(lm, state, ids))
    resumed = CliRunner().invoke(app, [*args, "-o", str(cut), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert len(scored) == 2 * 2  # the second and third texts, both readings; not the first
    assert (cut / "results.csv").read_text() == "".join(lines)
    assert (cut / "summary.csv").read_text() == (whole / "summary.csv").read_text()

    shards = [tmp_path / "s1", tmp_path / "s2"]
    for i, out in enumerate(shards, start=1):
        assert CliRunner().invoke(app, [*args, "--shard", f"{i}/2", "-o", str(out)]).exit_code == 0
    merged = CliRunner().invoke(app, ["bench", "merge", *map(str, shards), "-o", str(tmp_path / "all")])
    assert merged.exit_code == 0, merged.output
    assert "perplexity" in merged.output  # printed as bench perplexity prints a run
    assert (tmp_path / "all" / "results.csv").read_text() == "".join(lines)
    assert (tmp_path / "all" / "summary.csv").read_text() == (whole / "summary.csv").read_text()
