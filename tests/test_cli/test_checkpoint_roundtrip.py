"""Round trips: a checkpoint exported from a session loads back with `--model DIR` and continues exactly
like the session (the drop generator, counters, short-term ages and the M+ cache travel beside the authors'
files)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import model as mp
from model import store as st
from model.zoo.checkpoint import CARRIED_STATE
from mplus_cli.app import app

runner = CliRunner()
FIRST = "The lighthouse keeper logs the tide at dawn and dusk. " * 6
LATER = "The ferry to Korsa leaves at 7:45 and returns at 16:20. " * 6


def mplus(*args: object):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def session_state(root, name: str, lm: mp.MemoryLLM) -> mp.MemoryState:
    return st.Session.open(root, name).load_state(lm.initial_state)


@pytest.mark.parametrize("preset", ["tiny", "tiny-mplus", "tiny-free", "tiny-free-mplus"])
def test_an_exported_checkpoint_continues_exactly_like_its_session(tmp_path, preset):
    root, checkpoint = tmp_path / "store", tmp_path / "checkpoint"
    first, later = tmp_path / "first.txt", tmp_path / "later.txt"
    first.write_text(FIRST)
    later.write_text(LATER)
    common = ["--store", root, "--chunk-tokens", "48"]
    mplus("inject", first, "-s", "s", "--model", preset, "--seed", "5", *common)
    mplus("export", "-s", "s", "-o", checkpoint, "--format", "checkpoint", "--store", root)
    assert (checkpoint / CARRIED_STATE).is_file()
    mplus("session", "fork", "s", "s2", "--store", root)
    mplus("inject", later, "-s", "s2", *common)
    mplus("inject", later, "-s", "c", "--model", checkpoint, *common)

    original, loaded = mp.load(preset), mp.load(str(checkpoint))
    assert type(loaded) is type(original) and loaded.cfg.fingerprint() == original.cfg.fingerprint()
    a, b = session_state(root, "s2", original), session_state(root, "c", loaded)
    ta, tb = a.to_tensors(), b.to_tensors()
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    assert a.to_meta() == b.to_meta()  # counters included: the checkpoint's injections carry on
    question = ["ask", "Where does the ferry go?", "--max-new-tokens", "6", "--store", root, "--json"]
    answers = [json.loads(mplus(*question, "-s", name).stdout)["answers"][0] for name in ("s2", "c")]
    assert answers[0]["token_ids"] == answers[1]["token_ids"]


def test_a_checkpoint_without_the_carried_file_loads_as_the_authors_do(tmp_path):
    """The authors' layout alone: the cache and short-term ages start empty, the generator at seed 0."""
    lm = mp.load("tiny-mplus")
    state = lm.new_state(seed=9)
    for seed in range(13):  # a merge every 4 injects: 1 left in the cache
        lm.inject(state, torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(seed)))
    assert state.ltm.cache_size > 0
    mp.save_checkpoint(lm, state, tmp_path)
    (tmp_path / CARRIED_STATE).unlink()
    loaded = mp.load(str(tmp_path)).new_state()
    assert torch.equal(loaded.memory, state.memory) and loaded.ltm.cache_size == 0
    assert int(loaded.memory_ages.abs().sum()) == 0 and loaded.injections == 0
    assert torch.equal(loaded.generator.get_state(), mp.MemoryState(memory=state.memory).generator.get_state())
