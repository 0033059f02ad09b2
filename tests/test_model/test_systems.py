"""Memory systems behind one interface: the built-in baselines, the model's own memory, and a system that
another package registers through the `mplus.systems` entry point group."""

from __future__ import annotations

import csv
import json
import textwrap

import pytest
import torch
from typer.testing import CliRunner

import model as mp
from model.systems import SpecError, build_system, label, parse_spec
from model.text.tokenizer import encode
from mplus_cli.app import app
from tasks.results import holds_results

GREEDY = mp.DecodeSettings(max_new_tokens=4)


@pytest.fixture(scope="module")
def lm():
    return mp.load("tiny-free-mplus")


def ids(lm, text: str) -> torch.Tensor:
    return torch.tensor(encode(lm.tokenizer, text))


def test_a_spec_is_a_name_and_parameters_and_its_label_lists_every_parameter(lm):
    assert parse_spec("bm25:part=256, k=4") == ("bm25", {"part": "256", "k": "4"})
    assert label(build_system("bm25:part=256,k=4", lm)) == "bm25:k=4,part=256"
    assert label(build_system("bm25", lm)) == "bm25:k=8,part=512"  # the MemoryLLM paper's 512 x 8
    assert label(build_system("truncate", lm)) == f"truncate:tokens={lm.cfg.context_window}"
    assert label(build_system("memory", lm)) == "memory"
    for spec, says in [
        ("bm25:part", "bad system parameter"),
        ("colbert", "unknown system 'colbert'"),
        ("bm25:size=4", r"does not take these parameters \(size\)"),
        ("truncate:tokens=0", "must be a positive"),
    ]:
        with pytest.raises(SpecError, match=says):
            build_system(spec, lm)


def test_truncate_reads_the_last_tokens_and_bm25_the_parts_with_the_question_words(lm):
    first, second = "Apples grow on the old tree. " * 2, "Zebras graze by the river. " * 2  # 58 and 54 bytes
    truncate, bm25 = build_system("truncate:tokens=40", lm), build_system("bm25:part=58,k=1", lm)
    for system in (truncate, bm25):
        system.reset(0)
        system.inject(ids(lm, first))
        system.inject(ids(lm, second))
    assert truncate.context(encode(lm.tokenizer, "Where?"), 1000) == encode(lm.tokenizer, first + second)[-40:]
    injected = encode(lm.tokenizer, first + second)
    apples = bm25.context(encode(lm.tokenizer, "Where do apples grow?"), 1000)
    zebras = bm25.context(encode(lm.tokenizer, "Where do zebras graze?"), 1000)
    assert apples == injected[:58] and zebras == injected[58:]  # one part each (a token is a byte)
    assert bm25.context(encode(lm.tokenizer, "Where do zebras graze?"), 53) == []  # a part is whole or absent
    answer = truncate.ask(encode(lm.tokenizer, "Where?"), GREEDY)
    assert answer.context_tokens == 40 and 0 < answer.first_token_s <= answer.seconds
    plain = mp.generate(
        lm,
        mp.MemoryState(torch.empty(lm.cfg.num_layers, 0, lm.cfg.hidden_size), False),
        injected[-40:] + encode(lm.tokenizer, "Where?"),
        GREEDY,
    )
    assert answer.token_ids == plain.token_ids  # the plain model with that prompt


def test_a_system_saved_and_loaded_answers_as_before(lm, tmp_path):
    for spec in ("bm25:part=32,k=2", "memory"):
        system = build_system(spec, lm)
        system.reset(3)
        system.inject(ids(lm, "The lamp room code is 73914. " * 4))
        before = system.ask(encode(lm.tokenizer, "What is the code?"), GREEDY)
        system.save(tmp_path / spec)
        again = build_system(spec, lm)
        again.load(tmp_path / spec)
        assert again.ask(encode(lm.tokenizer, "What is the code?"), GREEDY).token_ids == before.token_ids


def test_the_memory_system_is_the_models_own_memory(lm):
    system = build_system("memory", lm)
    system.reset(5)
    text = ids(lm, "Marta's soup has smoked paprika in it. " * 6)
    system.inject(text)
    state = lm.new_state(5, mp.storage_dtype(lm))
    lm.inject(state, text)
    question = encode(lm.tokenizer, "What is in the soup?")
    assert system.ask(question, GREEDY).token_ids == mp.generate(lm, state, question, GREEDY).token_ids
    assert system.capabilities.provenance and system.capabilities.persistent


def test_the_memory_system_says_which_injections_an_answer_read(lm):
    system = build_system("memory", lm)
    system.reset(0)
    for text in ["The lamp room code is 73914. " * 4, "Zebras graze by the river. " * 40, "The kettle is blue. " * 40]:
        system.inject(ids(lm, text))  # injections 1, 2, 3
    answer = system.ask(encode(lm.tokenizer, "What is the lamp room code?"), GREEDY)
    window, retrieved = lm.cfg.training_free.capacity, lm.cfg.training_free.retrieved
    assert answer.provenance == {1: retrieved, 3: window}  # the code's block found; the window holds the last text
    assert sum(answer.provenance.values()) == lm.prefix_length(system.state) - 1  # every row but bos
    assert build_system("bm25", lm).ask(encode(lm.tokenizer, "x?"), GREEDY).provenance is None


PLUGIN = """
    from model.systems.baselines import InPrompt


    class Parrot(InPrompt):
        \"\"\"Puts the first `tokens` injected tokens before the question.\"\"\"

        name = "parrot"

        def __init__(self, model, tokens="8"):
            super().__init__(model)
            self.params = {"tokens": int(tokens)}

        def context(self, question_ids, budget):
            return self.injected()[: min(self.params["tokens"], budget)].tolist()
"""


def test_a_package_registers_a_system_that_bench_retention_sweeps(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "parrot_memory").mkdir(parents=True)
    (site / "parrot_memory" / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    info = site / "parrot_memory-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: parrot-memory\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[mplus.systems]\nparrot = parrot_memory:Parrot\n")
    monkeypatch.syspath_prepend(str(site))
    out = tmp_path / "run"
    args = ["bench", "retention", "--model", "tiny-free-mplus", "--max-distance", "512", "--limit", "2"]
    result = CliRunner().invoke(app, [*args, "--system", "parrot:tokens=16", "--system", "truncate", "-o", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "results.csv").open()))
    by_control = {control: [r for r in rows if r["control"] == control] for control in {r["control"] for r in rows}}
    assert set(by_control) == {"memory", "parrot:tokens=16", f"truncate:tokens={4096}"}
    assert all(len(found) == 2 * 2 for found in by_control.values())  # 2 samples x 2 distances
    details = json.loads((out / "config.json").read_text())["model_details"]["tiny-free-mplus"]["systems"]
    assert details["parrot:tokens=16"] == {
        "params": {"tokens": 16},
        "capabilities": {"persistent": True, "incremental": True, "question_aware_write": False, "provenance": False},
    }
    resumed = CliRunner().invoke(app, [*args, "--system", "parrot:tokens=16", "-o", str(out), "--resume"])
    assert resumed.exit_code == 0 and len(list(csv.DictReader((out / "results.csv").open()))) == len(rows)


@pytest.mark.parametrize(
    ("system", "says"),
    [("colbert", "unknown system 'colbert'"), ("bm25:k=two", "invalid literal"), ("truncate:size=3", "size")],
)
def test_a_system_that_cannot_run_is_one_line_and_exit_2(tmp_path, system, says):
    args = ["bench", "retention", "--model", "tiny", "--max-distance", "512", "--limit", "1", "--system", system]
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output  # found once the model is loaded: its defaults are the model's
    last = result.stderr.splitlines()[-1]
    assert last.startswith("mplus: error: ") and says in last
    assert not holds_results(tmp_path / "run" / "results.csv")  # no results: run it again without --resume
