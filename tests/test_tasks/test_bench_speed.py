"""`mplus bench speed`: the baselines compute what the optimized paths compute, and the report is consistent.
No timed assertions: the figures themselves are machine-dependent."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import speed_cli, token_ids

import model as mp
from model.zoo.presets import build_preset, random_model
from model.zoo.registry import TINY_CONFIG
from mplus_cli.commands.speed import check_options
from tasks import speed as sp
from tasks.baselines import authors_delta, authors_inject, authors_retrieve
from tasks.random_models import first_rows, random_ltm, random_model_with_memory, with_ltm
from tasks.speed_store import bytes_written, file_table


@pytest.fixture(scope="module")
def tiny_mplus() -> mp.MPlus:
    torch.set_num_threads(1)
    return mp.load("tiny-mplus")


def test_random_model_hook_gives_the_preset_weights():
    a, b = random_model(TINY_CONFIG, seed=0).state_dict(), build_preset("tiny", seed=0).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("n", [40, 9])  # more and fewer tokens than a block (K = 16)
def test_authors_injection_gives_the_same_delta(tiny, tiny_mplus, n):
    for lm in (tiny, tiny_mplus):
        state, ids = lm.new_state(0), token_ids(n, seed=n)
        torch.testing.assert_close(authors_delta(lm, ids, state), lm.compute_delta(ids, state))


@pytest.mark.parametrize("per_layer", [True, False], ids=["a-drop-per-layer", "one-drop"])
def test_authors_injection_leaves_the_same_memory(per_layer):
    config = TINY_CONFIG | {"drop_memory_per_layer": per_layer}
    lm = random_model_with_memory(config, torch.device("cpu"), torch.float32, seed=4)
    ours, theirs = lm.new_state(7), lm.new_state(7)
    for n in (40, 9, 23):
        lm.inject(ours, token_ids(n, seed=n))
        authors_inject(lm, token_ids(n, seed=n), theirs)
    assert not torch.equal(ours.memory, lm.initial_state.memory)
    assert torch.equal(theirs.memory, ours.memory)  # bit-identical: the K new rows come out of the same sums


def test_generate_gives_the_same_tokens_with_and_without_the_memory_kv_cache(tiny, state):
    settings, prompt = mp.DecodeSettings(max_new_tokens=12), token_ids(10, seed=1).tolist()
    cold = mp.generate(tiny, state, prompt, settings).token_ids  # fills the cache
    warm = mp.generate(tiny, state, prompt, settings).token_ids  # reuses it
    assert state.kv_cache is not None
    assert cold == warm == mp.generate(tiny, state, prompt, settings, reuse_memory_kv=False).token_ids


def test_authors_retrieval_picks_the_same_rows(tiny_mplus, tmp_path):
    ltm = random_ltm(tiny_mplus, rows=200, cached=24, directory=tmp_path)
    rows = ltm.rows.segments[-1][1]  # the sparse row file: give it distinct rows
    random_rows = torch.randn(rows.count, rows.width, generator=torch.Generator().manual_seed(1))
    rows.path.write_bytes(random_rows.numpy().tobytes())
    state = with_ltm(tiny_mplus, first_rows(ltm, 150, cache=True))
    h = torch.randn(7, tiny_mplus.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    for layer in range(tiny_mplus.cfg.num_layers):
        assert torch.equal(authors_retrieve(tiny_mplus, layer, state, h), tiny_mplus.retrieve(layer, state, h).rows)


def test_first_rows_views_the_ltm_without_copying(tiny_mplus, tmp_path):
    ltm = random_ltm(tiny_mplus, rows=100, cached=16, directory=tmp_path)
    cut = first_rows(ltm, 40)
    assert cut.sizes() == [40, 40] and cut.cache_size == 0 and cut.bank is ltm.bank
    for a, b in zip(cut.layers, ltm.layers, strict=True):
        assert a.entries.data_ptr() == b.entries.data_ptr() and torch.equal(a.entries, b.entries[:40])


def test_the_random_ltm_is_laid_out_as_injections_leave_it_with_its_rows_on_disk(tiny_mplus, tmp_path):
    ltm = random_ltm(tiny_mplus, rows=96, cached=32, directory=tmp_path)
    (path,) = tmp_path.iterdir()
    cfg = tiny_mplus.cfg
    L, K, d = cfg.num_layers, cfg.num_tokens, cfg.hidden_size
    assert path.stat().st_size == L * (96 + 32) * d * 4 and path.stat().st_blocks == 0  # sparse: nothing written
    assert not ltm.layers[1].rows.any()
    everything = torch.cat([*(x.entries for x in ltm.layers), ltm.cached_entries.reshape(-1)])
    assert torch.equal(everything.sort().values, torch.arange(L * (96 + 32)))  # each entry in one place
    assert ltm.layers[1].entries[:K].tolist() == list(range(K, 2 * K))  # injection 0, layer 1
    assert ltm.layers[0].entries[K : 2 * K].tolist() == list(range(L * K, L * K + K))  # injection 1, layer 0
    ages = torch.cat([ltm.layers[0].ages, ltm.cached_ages[0]])
    assert torch.equal(ages, ages.sort(descending=True).values) and len(set(ages.tolist())) == len(ages)
    rf = ltm.layers[0].recall_frequencies  # one value per merge of update_ltm_frequency injections
    assert torch.unique_consecutive(rf).numel() == -(-96 // (K * cfg.update_ltm_frequency))


def test_bytes_written_counts_appends_and_replacements(tmp_path):
    (tmp_path / "log").write_bytes(b"x" * 10)
    (tmp_path / "index").write_bytes(b"y" * 7)
    before = file_table(tmp_path)
    with open(tmp_path / "log", "ab") as f:
        f.write(b"z" * 5)
    (tmp_path / "new").write_bytes(b"n" * 3)
    (tmp_path / "index").write_bytes(b"w" * 4)
    (tmp_path / "index").unlink()  # replaced by a new file (a rename gives a new inode)
    (tmp_path / "index").write_bytes(b"v" * 4)
    assert bytes_written(before, file_table(tmp_path)) == 5 + 3 + 4


@pytest.fixture(scope="module")
def report() -> dict:
    torch.set_num_threads(1)
    result = speed_cli(["--shape", "tiny", "--repeats", "1", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_the_json_report_has_every_figure_with_consistent_ratios(report):
    assert {"cpu", "torch", "torch_threads", "device", "dtype"} <= report["machine"].keys()
    names = [f["name"] for f in report["figures"]]
    for prefix in (
        "inject tok/s",
        "ask time to first token",
        "ask decode tok/s",
        "LTM retrieval per layer (64 ",
        "LTM retrieval per layer (960 ",
        "M+ inject (LTM 960 vs 64",
        "M+ session time per inject",
        "M+ session bytes written per inject",
        "memoryllm session bytes written per inject (inject #50",
        "mplus session time per inject (inject #1,",
        "mplus session open + load",
        "cold ask: open + first token",  # the default groups: core and the cold path
        "cold open: session vs MemoryState.load",
    ):
        assert any(name.startswith(prefix) for name in names), prefix
    for f in report["figures"]:
        assert f["optimized"] > 0 and f["baseline"] > 0, f
        num, den = f["ratio_of"].split("/")
        assert f["ratio"] == pytest.approx(f[num] / f[den]), f
        if f["unit"] != "tok/s" and f["compare"] == "speedup":
            assert f["ratio_of"] == "baseline/optimized"  # a time or a size: the baseline over ours
        if f["target"] is None:
            assert f["passed"] is None
        else:
            op, value = f["target"].split()
            assert f["passed"] == (f["ratio"] >= float(value) if op == ">=" else f["ratio"] <= float(value))


def test_the_table_shows_the_figures():
    result = speed_cli(["--shape", "tiny", "--repeats", "1", "--ltm-rows", "40,80"])
    assert result.exit_code == 0, result.output
    assert "inject tok/s" in result.stdout and "LTM retrieval per layer (80 LTM rows/layer)" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--device", "tpu"], "--device"),
        (["--device", "cuda"], "no CUDA"),
        (["--shape", "8b"], "GPU"),
        (["--ltm-rows", "10000"], "--ltm-rows"),
        (["--ltm-rows", "a,b"], "--ltm-rows"),
    ],
)
def test_bad_options_are_one_line_usage_errors(args, message, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = speed_cli([*args, "--json"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert json.loads(result.stdout)["exit_code"] == 2


def test_the_default_groups_are_core_and_the_cold_path_where_the_cold_path_fits():
    assert check_options(None, "small", "cpu", None, None, "10k,40k", "1k,2k").groups == ["core", "cold"]
    assert check_options(None, "8b", "cpu", None, None, "10k,40k", "1k,2k").groups == ["core"]  # sized for a GPU


@pytest.mark.parametrize("args", [["--shape", "huge"], ["--dtype", "int8"]])
def test_a_choice_not_offered_is_clicks_usage_error_on_one_line(args):
    result = speed_cli([*args, "--json"])
    assert result.exit_code == 2
    option, value = args
    assert result.stderr.startswith(f"mplus: error: invalid value for '{option}': '{value}' is not one of '")
    assert result.stderr.count("\n") == 1 and result.stdout == ""


@pytest.mark.parametrize("name", ["tiny-free", "tiny-free-mplus"])
def test_a_training_free_model_reports_its_inject_next_to_a_plain_forward(name):
    result = speed_cli(["--model", name, "--groups", "core", "--repeats", "1", "--json"])
    assert result.exit_code == 0, result.output
    figure, batch, *per_question = json.loads(result.stdout)["figures"]
    assert figure["name"].startswith("inject vs a plain forward") and figure["target"] == ">= 0.8"
    assert batch["name"] == "8 samples at once (bench retention --batch-size)" and batch["target"] == ">= 1"
    assert [f["name"].split(" (")[0] for f in per_question] == [
        "per question: memory vs bm25:k=8,part=512",
        "per question: memory vs truncate:tokens=4096",
        "per question: memory vs snapkv:budget=2048,kernel=5,question=blind,window=32",
        "per question: memory vs snapkv:budget=2048,kernel=5,question=aware,window=32",
    ]
    assert figure["optimized"] > 0 and figure["baseline"] > 0 and figure["unit"] == "tok/s"


def test_the_baseline_systems_are_timed_per_question_beside_memory():
    lm = mp.load("tiny-free-mplus")
    figures = sp.system_figures(lm, sp.SHAPES["tiny"], 1, log=lambda message: None)
    tokens = min(4 * sp.SHAPES["tiny"].inject_tokens, lm.cfg.context_window // 2)
    assert [f.name for f in figures] == [
        f"per question: memory vs bm25:k=8,part=512 ({tokens} tokens injected)",
        f"per question: memory vs truncate:tokens={lm.cfg.context_window} ({tokens} tokens injected)",
        f"per question: memory vs snapkv:budget=2048,kernel=5,question=blind,window=32 ({tokens} tokens injected)",
        f"per question: memory vs snapkv:budget=2048,kernel=5,question=aware,window=32 ({tokens} tokens injected)",
    ]
    assert all(f.unit == "s" and f.optimized > 0 and f.baseline > 0 and f.target is None for f in figures)
    lm.tokenizer = None  # a random model of a checkpoint's shape has none: the baselines cannot read text
    assert sp.system_figures(lm, sp.SHAPES["tiny"], 1, log=lambda message: None) == []
