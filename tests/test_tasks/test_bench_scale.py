"""`mplus bench speed --groups sessions,cold,store` (tasks.scale): real processes measured as a user runs them, the
stand-in sessions at a model's shapes open as the states they describe, and the report is consistent. No timed
assertions: the figures themselves are machine-dependent."""

from __future__ import annotations

import json
import resource
import sys

import pytest
import torch
from conftest import speed_cli
from rich.console import Console

import model as mp
from model import store as st
from model.store import files as store_files
from model.store.verify import check_session
from model.text.tokenizer import byte_tokenizer
from mplus_cli.commands.speed import table
from tasks import children as ch
from tasks import scale as sc
from tasks import scale_store as scs
from tasks import speed as sp
from tasks.figures import Figure, Report
from tasks.random_models import random_model_with_memory
from tasks.timing import machine_info

TINY_GROUPS = ["--groups", "sessions,cold,store", "--shape", "tiny", "--repeats", "1", "--threads", "1"]
TINY_SIZES = ["--session-tokens", "2k,4k", "--interrupt-bytes", "16k,64k", "--ltm-rows", "64,256"]


# -- figures ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "compare, target, passed, text",
    [
        ("limit", 600, True, "<= 600 B"),
        ("limit", 500, False, "<= 500 B"),
        ("increase", 64, True, "+ <= 64 B"),
        ("increase", 63, False, "+ <= 63 B"),
        ("growth", 1.2, True, "<= 1.2"),
        ("speedup", 0.8, True, ">= 0.8"),  # a size: baseline/optimized
    ],
)
def test_limits_and_increases_bound_the_values_not_the_ratio(compare, target, passed, text):
    figure = Figure("f", "B", 560, 496, compare, target)
    assert figure.passed is passed and figure.target_text() == text
    assert figure.increase == 64
    assert figure.ratio == pytest.approx(560 / 496 if compare != "speedup" else 496 / 560)


def test_the_table_shows_an_increase_as_such():
    report = Report(machine_info(torch.device("cpu"), torch.float32), {})
    report.figures = [
        Figure("peak RSS", "B", 300e6, 250e6, "increase", 128e6),
        Figure("bytes per token", "B", 560, 512, "limit", 600),
    ]
    console = Console(width=200, record=True)
    console.print(table(report))
    text = console.export_text()
    assert "+50.00 MB" in text and "+ <= 128.00 MB" in text
    assert "1.09x" in text and "<= 600 B" in text and text.count("pass") == 2


# -- child processes --------------------------------------------------------------------------------
def test_a_child_reports_its_own_peak_rss_not_its_parents():
    held = torch.ones(96 << 20, dtype=torch.float32)  # 384 MB in this process: a child's ru_maxrss starts there
    parent_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    child = ch.mplus(["session", "ls", "--store", "/nonexistent-store", "--json"], ch.child_env(1)).check("ls")
    assert json.loads(child.stdout)["sessions"] == []
    assert 0 < child.peak_rss < parent_peak - 256e6 and held.sum() > 0


SLEEPER = """
import pathlib, sys, time
pathlib.Path(sys.argv[1]).touch()
try:
    while True:
        time.sleep(0.01)
except KeyboardInterrupt:
    sys.exit("interrupted")
"""


def test_a_child_is_interrupted_once_asked_and_its_failure_is_one_line(tmp_path):
    ready = tmp_path / "ready"
    child = ch.run_child([sys.executable, "-c", SLEEPER, str(ready)], interrupt=ready.exists)
    assert child.returncode == 1 and child.stderr == "interrupted\n"
    with pytest.raises(ch.ChildFailed, match="^sleeper exited with 1: interrupted$"):
        child.check("sleeper")


def test_an_interrupted_inject_exits_130_and_keeps_its_commits(tmp_path):
    text = sc.write_prose(tmp_path / "text.txt", 16_000)
    assert text.stat().st_size == 16_000 and text.read_text().isascii()
    child = sc.interrupted_inject(tmp_path, "cut", "tiny-free-mplus", text, ch.child_env(1))
    assert child.returncode == ch.INTERRUPTED and child.peak_rss > 0
    partial = st.Session.open(tmp_path, "cut").partial
    assert partial["chunks_done"] >= sc.INTERRUPT_AFTER_COMMITS and partial["chunks_total"] == 32


def test_the_prose_has_exactly_the_tokens_asked_for():
    tokenizer = byte_tokenizer()
    ids = sc.prose_ids(tokenizer, 1234)
    assert len(ids) == 1234 and len(tokenizer.encode(tokenizer.decode(ids), add_special_tokens=False)) == 1234


# -- the cold path ----------------------------------------------------------------------------------
def test_the_cold_session_and_the_saved_state_hold_the_same_memory(tmp_path):
    torch.set_num_threads(1)
    model = random_model_with_memory(sp.SHAPES["tiny"].memoryllm, torch.device("cpu"), torch.float32)
    share = sc.cold_session(model, tmp_path, injects=3, tokens=40)
    assert 0 < share < 1  # 3 blocks of K = 16 rows among 128: some rows are still the model's
    opened = st.Session.open(tmp_path, sc.COLD_SESSION).load_state(model.initial_state)
    saved = mp.MemoryState.load(tmp_path / sc.COLD_STATE)
    assert torch.equal(opened.memory, saved.memory) and opened.injections == saved.injections == 3


# -- the store at a model's shapes ------------------------------------------------------------------
def test_a_stand_in_session_opens_as_the_state_its_commits_describe(tmp_path, monkeypatch):
    monkeypatch.setattr(store_files, "HOLE_BYTES", 4096)  # the tiny shape's rows: 4 kB per inject
    cfg = scs.store_config(sp.SHAPES["tiny"])
    L, N, K, freq = cfg.num_layers, cfg.memory_rows, cfg.num_tokens, cfg.update_ltm_frequency
    initial = scs.stand_in_initial(cfg, scs.model_rows(cfg, tmp_path, create=True))
    model, state = scs.stand_in_model(cfg), initial.clone()
    with scs.history_session(tmp_path, "s", model, initial).writer() as writer:
        written = scs.store_commits(writer, model, state, ltm_rows=64)
    new_rows = L * K * cfg.hidden_size * scs.STORE_DTYPE.itemsize
    assert len(written) == scs.STORE_INJECTS and all(b >= new_rows for b in written)  # the rows, once, and more

    session = st.Session.open(tmp_path, "s")
    state = session.load_state(initial)
    ltm = state.ltm
    assert ltm.sizes() == [64 + freq * K] * L and ltm.cache_size == 0  # the last inject merged the cache
    assert ltm.update_step == 0 and state.memory.shape == (L, N, cfg.hidden_size)
    assert all(bool((ids.diff() > 0).all()) for ids in state.memory_ids)  # a layer's rows keep their order
    assert int(state.memory_ids.max()) < state.next_row_id == session.base + session.manifest["rows"]["count"]
    assert int(ltm.bank.row_ids(torch.arange(len(ltm.bank))).max()) < state.next_row_id
    alone = scs.session_ltm(session, initial)
    assert all(torch.equal(a.entries, b.entries) for a, b in zip(alone.layers, ltm.layers, strict=True))
    files = session.directory / st.format.ROWS
    assert files.stat().st_blocks * 512 < files.stat().st_size  # the history's rows were never written
    verdicts = check_session(tmp_path, "s")  # the store's own checks: the stand-in is a session of today's format
    assert verdicts and all(not v.problems for v in verdicts), [v.problems for v in verdicts]


def test_the_history_without_weights_keeps_the_books_as_the_weighted_m_plus_does():
    """The store's histories come from MPlus.update_memory on a model without weights (meta device, keys of
    zeros, no decay): it moves the same row ids, ages and recall frequencies through the same merges as the
    loaded model's update under the same config."""
    lm = mp.load("tiny-mplus")
    stand_in = scs.stand_in_model(lm.cfg)
    lm.cfg = stand_in.cfg  # no decay: the histories grow their LTM to any size
    cfg, K = lm.cfg, lm.cfg.num_tokens
    model_state = lm.new_state(0)
    stand_in_state = model_state.clone()
    stand_in_state.memory = torch.empty_like(model_state.memory, device="meta")
    for i in range(3 * cfg.update_ltm_frequency + 1):
        delta = torch.randn(cfg.num_layers, K, cfg.hidden_size, generator=torch.Generator().manual_seed(i))
        lm.update_memory(model_state, delta)
        scs.inject_zeros(stand_in, stand_in_state, delta)
        assert torch.equal(model_state.memory_ids, stand_in_state.memory_ids), i
        assert torch.equal(model_state.memory_ages, stand_in_state.memory_ages), i
        a, b = model_state.ltm, stand_in_state.ltm
        assert a.sizes() == b.sizes() and a.update_step == b.update_step and a.cache_size == b.cache_size, i
        for x, y in zip(a.layers, b.layers, strict=True):
            assert torch.equal(x.row_ids, y.row_ids) and torch.equal(x.ages, y.ages), i
            assert torch.equal(x.recall_frequencies, y.recall_frequencies), i
    grown = [n - len(layer) for n, layer in zip(b.sizes(), lm.new_state(0).ltm.layers, strict=True)]
    assert grown == [3 * cfg.update_ltm_frequency * K] * cfg.num_layers  # three merges, nothing pruned


# -- the command ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def report() -> dict:
    result = speed_cli([*TINY_GROUPS, *TINY_SIZES, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def figure(report: dict, prefix: str) -> dict:
    (found,) = [f for f in report["figures"] if f["name"].startswith(prefix)]
    return found


def test_the_json_report_has_the_scale_figures_with_consistent_verdicts(report):
    assert report["setup"]["groups"] == ["sessions", "cold", "store"]
    assert report["setup"]["sessions"]["tokens"] == [2000, 4000]
    assert not any(f["name"].startswith("inject tok/s") for f in report["figures"])  # no core group
    for f in report["figures"]:
        assert f["optimized"] > 0 and f["baseline"] > 0, f
        num, den = f["ratio_of"].split("/")
        assert f["ratio"] == pytest.approx(f[num] / f[den]), f
        measured = {"limit": f["optimized"], "increase": f["optimized"] - f["baseline"]}.get(f["compare"], f["ratio"])
        bound = f["target_value"]
        assert f["passed"] == (
            None if bound is None else measured >= bound if f["compare"] == "speedup" else measured <= bound
        )


def test_session_figures_count_the_files_the_rows_and_the_processes(report):
    disk = figure(report, "session bytes on disk per token (4k tokens, tiny-free-mplus)")
    assert disk["baseline"] == 2 * 64 * 4  # one float32 row per layer (2 x 64) per token
    assert disk["optimized"] >= disk["baseline"] and disk["compare"] == "limit"
    rss = figure(report, "inject peak RSS: session grown to 4k vs 2k tokens")
    assert rss["compare"] == "increase" and rss["optimized"] > 50e6 and rss["baseline"] > 50e6
    assert figure(report, "inject 2k tokens into a 2k-token session vs a new one")["unit"] == "s"
    assert figure(report, "ask a 4k-token session vs a 2k-token one")["unit"] == "s"
    cut = figure(report, "interrupted inject peak RSS: 64.00 kB text vs 16.00 kB")
    assert f"exited {ch.INTERRUPTED}" in cut["detail"] and cut["optimized"] > 50e6


def test_cold_and_store_figures_are_there(report):
    assert figure(report, "cold ask: open + first token (128 rows/layer")["compare"] == "speedup"
    assert figure(report, "cold open: session vs MemoryState.load")["target"] == ">= 1"
    for n in (128, 320):  # --ltm-rows 64,256: merges of 4 x 16 rows up to the size, then the measured one
        written = figure(report, f"tiny M+ store: bytes written per inject (LTM {n} rows/layer)")
        assert written["optimized"] >= written["baseline"] / 2  # at least the new rows, once
    assert figure(report, "tiny M+ store: open (LTM 320 vs 128")["target"] == "<= 1 s"
    assert figure(report, "tiny M+ store: RSS after open")["target"] == "<= 2.00 GB"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--groups", "fast"], "--groups"),
        (["--groups", "sessions", "--session-tokens", "4k"], "--session-tokens"),
        (["--groups", "sessions", "--session-tokens", "4k,2k"], "--session-tokens"),
        (["--groups", "sessions", "--interrupt-bytes", "1k,2k,3k"], "--interrupt-bytes"),
        (["--groups", "cold", "--shape", "8b"], "GPU"),
    ],
)
def test_bad_options_are_one_line_usage_errors(args, message):
    result = speed_cli([*args, "--json"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_the_store_group_runs_at_8b_shapes_on_a_cpu_without_a_model(monkeypatch):
    figures = []
    monkeypatch.setattr(scs, "store_figures", lambda shape, rows, *args, **kwargs: figures.append((shape, rows)) or [])
    result = speed_cli(["--groups", "store", "--shape", "8b", "--json"])
    assert result.exit_code == 0, result.output
    assert figures == [(sp.SHAPES["8b"], (10_000, 40_000, 150_000))]
