"""The session store: exact states, atomic commits, O(new rows) writes, one writer, crash safety."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import model as mp
from model.ltm import RowBank
from mplus_cli import store as st
from mplus_cli.app import summary
from mplus_cli.errors import ConflictError, UsageError
from mplus_cli.models import binding


@pytest.fixture(scope="module")
def models() -> dict[str, mp.MemoryLLM]:
    torch.set_num_threads(1)
    return {"tiny": mp.load("tiny"), "tiny-mplus": mp.load("tiny-mplus")}


def chunk(n: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


def new_session(root: Path, lm: mp.MemoryLLM, name: str = "s", seed: int = 0) -> st.Session:
    return st.create_session(root, name, lm, binding(lm.info["source"], lm, None, None), seed)


def inject(session: st.Session, lm: mp.MemoryLLM, chunks: list[torch.Tensor]) -> st.Session:
    """One commit of `chunks`, as `mplus inject` makes it."""
    with session.writer() as writer:
        state = writer.load_state(lm)
        for ids in chunks:
            writer.inject(lm, state, ids)
        writer.record({"source": "test", "sha256": "", "tokens": sum(map(len, chunks)), "chunks": len(chunks)})
        return writer.commit(state)


def assert_same_state(a: mp.MemoryState, b: mp.MemoryState) -> None:
    ta, tb = a.to_tensors(), b.to_tensors()
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    assert a.to_meta() == b.to_meta()


def tree_bytes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", ["", "../x", ".hidden", "a/b", "x" * 65, "-flag", "a b"])
def test_session_names_are_validated(tmp_path, name):
    with pytest.raises(UsageError):
        st.check_name(name)


@pytest.mark.parametrize("preset", ["tiny", "tiny-mplus"])
def test_session_state_equals_the_library_state(tmp_path, models, preset):
    lm = models[preset]
    chunks = [chunk(40, i) for i in range(6)]
    session = new_session(tmp_path, lm, seed=7)
    session = inject(session, lm, chunks[:2])
    session = inject(session, lm, chunks[2:])
    expected = lm.new_state(seed=7)
    for ids in chunks:
        lm.inject(expected, ids)
    assert_same_state(st.Session.open(tmp_path, "s").load_state(lm), expected)


def test_an_uninitialized_memory_is_tiled_and_tracked(tmp_path, models):
    lm = models["tiny"]
    lm.initial_state.initialized = False
    try:
        session = inject(new_session(tmp_path, lm), lm, [chunk(20, 1), chunk(24, 2)])
        expected = lm.new_state(seed=0)
        lm.inject(expected, chunk(20, 1))
        lm.inject(expected, chunk(24, 2))
        assert_same_state(session.load_state(lm), expected)
    finally:
        lm.initial_state.initialized = True


def test_opening_and_showing_does_not_read_rows(tmp_path, models, monkeypatch):
    lm = models["tiny"]
    inject(new_session(tmp_path, lm), lm, [chunk()])

    def no_rows(*args, **kwargs):
        raise AssertionError("rows were read")

    monkeypatch.setattr(st.Session, "rows", no_rows)
    info = summary(st.Session.open(tmp_path, "s"))
    assert info["injections"] == 1 and info["memory"]["short_term_rows"] == lm.cfg.memory_rows


def test_bytes_past_the_committed_length_are_ignored_then_truncated(tmp_path, models):
    lm = models["tiny"]
    session = inject(new_session(tmp_path, lm), lm, [chunk()])
    before = session.load_state(lm)
    committed = session.manifest["rows"]["bytes"]
    for name in (st.ROWS, st.LOG):
        with open(session.directory / name, "ab") as f:
            f.write(b"\x7f" * 1000)  # a crashed commit's leftovers
    reopened = st.Session.open(tmp_path, "s")
    assert_same_state(reopened.load_state(lm), before)
    assert len(reopened.log()) == 1
    after = inject(reopened, lm, [chunk(32, 1)])
    assert (session.directory / st.ROWS).stat().st_size == after.manifest["rows"]["bytes"] > committed
    assert (session.directory / st.LOG).stat().st_size == after.manifest["log"]["bytes"]
    assert len(after.log()) == 2


def test_bytes_written_per_inject_stay_proportional_to_new_rows(tmp_path, models):
    """The growth of the store per one-chunk inject is the same after 1 and after 30 injects (MemoryLLM)."""
    lm = models["tiny"]
    cfg = lm.cfg
    new_rows = cfg.num_layers * cfg.num_tokens * cfg.hidden_size * 4  # [L, K, d] float32
    pool = cfg.num_layers * cfg.memory_rows * cfg.hidden_size * 4
    session = new_session(tmp_path, lm)
    written = []
    for i in range(31):
        before = tree_bytes(session.directory)
        session = inject(session, lm, [chunk(32, i)])
        after = tree_bytes(session.directory)
        rows_growth = after[st.ROWS] - before[st.ROWS]
        log_growth = after[st.LOG] - before[st.LOG]
        index_bytes = after[session.manifest["index"]]
        written.append(rows_growth + log_growth + index_bytes + after[st.MANIFEST])
        assert rows_growth == new_rows
    print(f"\nbytes per inject: after 1: {written[1]}, after 30: {written[30]}; new rows {new_rows}, pool {pool}")
    assert abs(written[30] - written[1]) <= 16  # only the digits of the counters grow
    assert written[30] < new_rows + pool // 4


def test_mplus_bytes_written_per_inject_stay_proportional_to_new_rows_as_the_ltm_grows(tmp_path, models):
    """An M+ inject appends its new rows and the rows it dropped into the LTM (entries: row, key, birth);
    the index holds only the LTM's layout, so writes stay flat while merges grow the LTM tenfold."""
    lm = models["tiny-mplus"]
    cfg = lm.cfg
    L, K, d, s = cfg.num_layers, cfg.num_tokens, cfg.hidden_size, cfg.selector_hidden_dim
    session = new_session(tmp_path, lm)
    written, ltm_rows = [], []
    for i in range(31):
        before = tree_bytes(session.directory)
        session = inject(session, lm, [chunk(32, i)])
        after = tree_bytes(session.directory)
        growth = {name: after[name] - before[name] for name in (st.ROWS, st.LOG, *st.LTM_FILES)}
        assert growth[st.ROWS] == L * K * d * 4
        assert growth["ltm_rows.bin"] + growth["ltm_keys.bin"] + growth["ltm_births.bin"] == L * K * (4 * d + 4 * s + 8)
        written.append(sum(growth.values()) + after[session.manifest["index"]] + after[st.MANIFEST])
        ltm_rows.append(sum(session.manifest["state"]["ltm"]["sizes"]))
    whole_ltm = ltm_rows[30] * (4 * d + 4 * s + 16)
    print(f"\nM+ bytes per inject: after 1: {written[1]}, after 30: {written[30]}; LTM rows: {ltm_rows[1::29]}")
    assert ltm_rows[30] >= 8 * ltm_rows[1]
    assert written[30] <= 1.15 * written[1] and written[30] < whole_ltm / 2


def test_loading_an_mplus_session_reads_no_ltm_rows(tmp_path, models, monkeypatch):
    lm = models["tiny-mplus"]
    session = inject(new_session(tmp_path, lm), lm, [chunk(32, i) for i in range(6)])  # merged, with a cache
    expected = session.load_state(lm)
    real_rows = RowBank.rows

    def no_rows(*args, **kwargs):
        raise AssertionError("LTM rows were read")

    monkeypatch.setattr(RowBank, "rows", no_rows)
    state = st.Session.open(tmp_path, "s").load_state(lm)
    monkeypatch.setattr(RowBank, "rows", real_rows)
    assert state.ltm.cache_size > 0 and sum(state.ltm.sizes()) > 0
    assert_same_state(state, expected)


def test_a_second_writer_waits_then_gets_a_conflict(tmp_path, models):
    session = new_session(tmp_path, models["tiny"])
    with session.writer():
        start = time.monotonic()
        with pytest.raises(ConflictError, match="busy"):
            with session.writer(timeout_s=0.3):
                pass
        assert time.monotonic() - start >= 0.3


def test_fork_copies_the_committed_state_and_rm_removes(tmp_path, models):
    lm = models["tiny"]
    session = inject(new_session(tmp_path, lm), lm, [chunk()])
    forked = st.fork_session(tmp_path, "s", "copy")
    assert_same_state(forked.load_state(lm), session.load_state(lm))
    inject(forked, lm, [chunk(32, 5)])
    assert_same_state(st.Session.open(tmp_path, "s").load_state(lm), session.load_state(lm))
    with pytest.raises(ConflictError):
        st.fork_session(tmp_path, "s", "copy")
    st.remove_session(tmp_path, "copy")
    assert st.list_sessions(tmp_path) == ["s"]


@pytest.mark.parametrize("preset", ["tiny", "tiny-mplus"])
def test_sigkill_at_any_moment_leaves_the_before_or_the_after_state(tmp_path, models, preset):
    """20 times: fork a process that injects, SIGKILL it at a random moment; the session opens at the state
    before or after that inject."""
    lm = models[preset]
    new_session(tmp_path, lm)
    chunks = [chunk(200, 100 + i) for i in range(3)]  # 3 chunks: kills land in compute and in commit

    def run_child() -> int:
        pid = os.fork()
        if pid == 0:
            try:
                inject(st.Session.open(tmp_path, "s"), lm, chunks)
            finally:
                os._exit(0)
        return pid

    start = time.monotonic()
    os.waitpid(run_child(), 0)
    duration = time.monotonic() - start
    outcomes, torn = set(), 0
    for _ in range(20):
        current = st.Session.open(tmp_path, "s")
        before = current.load_state(lm)
        after = before.clone()
        for ids in chunks:
            lm.inject(after, ids)
        pid = run_child()
        time.sleep(random.uniform(0, duration * 1.2))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        reopened = st.Session.open(tmp_path, "s")
        torn += (reopened.directory / st.ROWS).stat().st_size != reopened.manifest["rows"]["bytes"]
        state = reopened.load_state(lm)
        is_after = torch.equal(state.memory, after.memory)
        assert is_after or torch.equal(state.memory, before.memory)
        assert_same_state(state, after if is_after else before)
        outcomes.add(is_after)
    print(f"\noutcomes seen (True = after): {outcomes}; kills that left uncommitted rows: {torn}")


def test_two_concurrent_injects_never_lose_an_update(tmp_path, models):
    lm = models["tiny"]
    new_session(tmp_path, lm)
    texts = []
    for i in range(2):
        path = tmp_path / f"t{i}.txt"
        path.write_text(f"document {i}: " + "some words to remember " * 20)
        texts.append(path)
    command = [sys.executable, "-m", "mplus_cli", "inject", "--session", "s", "--store", str(tmp_path)]
    procs = [subprocess.Popen([*command, str(p)], stderr=subprocess.PIPE, text=True) for p in texts]
    codes = [p.wait(timeout=60) for p in procs]
    assert set(codes) <= {0, 4}, [p.stderr.read() for p in procs]
    session = st.Session.open(tmp_path, "s")
    assert len(session.log()) == codes.count(0) == session.manifest["state"]["injections"]
