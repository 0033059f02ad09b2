"""The session store (model.store): exact states, each row stored once, per-chunk atomic commits, O(new rows)
writes, bounded RAM, one writer, crash safety."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch

import model as mp
from model import store as st
from model.memory.rows import SUM_BLOCK_BYTES, FileArray, block_sums
from model.store.session import narrowed
from mplus_cli.commands.session import summary

PRESETS = ["tiny", "tiny-mplus", "tiny-free-mplus"]


@pytest.fixture(scope="module")
def models() -> dict[str, mp.MemoryLLM]:
    torch.set_num_threads(1)
    return {name: mp.load(name) for name in PRESETS}


def chunk(n: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


def new_session(
    root: Path, lm: mp.MemoryLLM, name: str = "s", seed: int = 0, dtype: torch.dtype = torch.float32
) -> st.Session:
    return st.Session.create(root, name, lm.initial_state, st.binding(lm, lm.info.source), seed, dtype)


def partial_record(done: int, total: int) -> dict:
    """The manifest's record of a test source injected `done` chunks of `total` (of 200 tokens) far."""
    counts = {"chunks_done": done, "chunks_total": total, "tokens_done": 200 * done, "tokens_total": 200 * total}
    return {"source": "test", "sha256": "", "chunk_tokens": 200} | counts | {"at": ""}


def inject(session: st.Session, lm: mp.MemoryLLM, chunks: list[torch.Tensor]) -> st.Session:
    """`chunks` committed one by one, as `mplus inject` does."""
    with session.writer() as writer:
        state = writer.load_state(lm.initial_state)
        for i, ids in enumerate(chunks):
            writer.inject(lm, state, ids)
            last = i == len(chunks) - 1
            log = [{"source": "test", "sha256": "", "tokens": sum(map(len, chunks)), "chunks": len(chunks)}]
            writer.commit(state, log if last else [], None if last else partial_record(i + 1, len(chunks)))
        return writer.session


def assert_same_state(a: mp.MemoryState, b: mp.MemoryState) -> None:
    ta, tb = a.to_tensors(), b.to_tensors()
    assert ta.keys() == tb.keys()
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), key
    assert a.to_meta() == b.to_meta()


def tree_bytes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", ["", "../x", ".hidden", "a/b", "x" * 65, "-flag", "a b"])
def test_session_names_are_validated(name):
    with pytest.raises(st.InvalidName):
        st.check_name(name)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_session_state_equals_the_library_state(tmp_path, models, preset, dtype):
    """Rows kept in the storage dtype: a session reopened after every chunk equals one state injected in
    RAM with the same seed and dtype, and both continue alike."""
    lm = models[preset]
    chunks = [chunk(40, i) for i in range(8)]
    session = new_session(tmp_path, lm, seed=7, dtype=dtype)
    session = inject(session, lm, chunks[:3])
    session = inject(session, lm, chunks[3:])
    expected = lm.new_state(seed=7, dtype=dtype)
    for ids in chunks:
        lm.inject(expected, ids)
    loaded = st.Session.open(tmp_path, "s").load_state(lm.initial_state)
    assert loaded.memory.dtype == dtype and session.dtype == dtype
    assert_same_state(loaded, expected)
    assert torch.equal(loaded.memory_ids, expected.memory_ids) and loaded.next_row_id == expected.next_row_id
    question = chunk(6, 99)[None]
    assert torch.equal(lm(question, loaded).logits, lm(question, expected).logits)


def test_an_uninitialized_memory_is_tiled_and_tracked(tmp_path, models):
    lm = models["tiny"]
    lm.initial_state.initialized = False
    try:
        session = inject(new_session(tmp_path, lm), lm, [chunk(20, 1), chunk(24, 2)])
        expected = lm.new_state(seed=0)
        lm.inject(expected, chunk(20, 1))
        lm.inject(expected, chunk(24, 2))
        assert_same_state(session.load_state(lm.initial_state), expected)
    finally:
        lm.initial_state.initialized = True


def record_reads(monkeypatch) -> list[tuple[str, int]]:
    """(file name, records asked for) of every read the FileArrays make from now on (rows, LTM entries)."""
    reads, real_read, real_scan = [], FileArray.read, FileArray.scan

    def read(self, index, out=None):
        reads.append((self.path.name, index.numel()))
        return real_read(self, index, out)

    def scan(self, index, batch=FileArray.scan.__defaults__[0]):
        reads.append((self.path.name, index.numel()))
        return real_scan(self, index, batch)

    monkeypatch.setattr(FileArray, "read", read)
    monkeypatch.setattr(FileArray, "scan", scan)
    real_all = FileArray.all

    def read_all(self):  # only the row origins are read whole: O(injections x layers), like the index
        return (
            real_all(self) if self.path.name == st.format.ORIGINS else pytest.fail(f"{self.path.name} was read whole")
        )

    monkeypatch.setattr(FileArray, "all", read_all)
    return reads


def test_opening_and_showing_reads_no_rows(tmp_path, models, monkeypatch):
    lm = models["tiny-mplus"]
    inject(new_session(tmp_path, lm), lm, [chunk(32, i) for i in range(3)])
    reads = record_reads(monkeypatch)
    info = summary(st.Session.open(tmp_path, "s"))
    assert reads == []
    assert info["injections"] == 3 and info["memory"]["short_term_rows"] == lm.cfg.memory_rows


@pytest.mark.parametrize("preset", ["tiny-mplus", "tiny-free-mplus"])
def test_loading_reads_the_short_term_rows_only_and_a_question_reads_each_ltm_record_once(
    tmp_path, models, monkeypatch, preset
):
    lm = models[preset]
    session = inject(new_session(tmp_path, lm), lm, [chunk(32, i) for i in range(10)])
    expected = session.load_state(lm.initial_state)
    reads = record_reads(monkeypatch)
    state = st.Session.open(tmp_path, "s").load_state(lm.initial_state)
    L, N = state.memory_ids.shape
    assert {name for name, _ in reads} == {st.format.ROWS} and sum(n for _, n in reads) <= L * N  # short-term rows only
    assert sum(state.ltm.sizes()) > 0
    assert_same_state(state, expected)
    reads.clear()
    lm(chunk(5, 50)[None], state)  # one question: scores every LTM candidate once, gathers the chosen rows
    entries = sum(state.ltm.sizes()) + L * state.ltm.cache_size
    read_keys = sum(n for name, n in reads if name == "ltm_keys.bin")
    assert read_keys <= entries + L * lm.retrieved_rows


def test_each_row_is_stored_once_and_committed_rows_leave_ram(tmp_path, models):
    """rows.bin holds every written row once; LTM entries hold a row id, a birth and a key, not the row;
    after a commit the state reads committed rows and entries from the files."""
    for preset in ("tiny-mplus", "tiny-free-mplus"):
        lm = models[preset]
        root = tmp_path / preset
        chunks = [chunk(32, i) for i in range(12)]
        session = new_session(root, lm)
        with session.writer() as writer:
            state = writer.load_state(lm.initial_state)
            for ids in chunks:
                writer.inject(lm, state, ids)
                writer.commit(state)
                assert state.ltm.rows.tail_rows == 0 and state.ltm.bank.tail[0].length == 0
            session = writer.session
        files = tree_bytes(session.directory)
        d, written = lm.cfg.hidden_size, session.manifest["rows"]["count"]
        assert files[st.format.ROWS] == written * d * 4 == (state.next_row_id - session.base) * d * 4
        entries = session.manifest["ltm"]["entries"]
        key_bytes = session.manifest["ltm"]["key_width"] * 4
        assert files["ltm_row_ids.bin"] + files["ltm_births.bin"] + files["ltm_keys.bin"] == entries * (16 + key_bytes)
        assert key_bytes < d * 4  # keys are smaller than rows (the training-free demo stores 2 numbers)
        row_ids = FileArray(session.directory / "ltm_row_ids.bin", entries, 0, torch.int64).all()
        assert row_ids.unique().numel() == entries  # no row enters the LTM twice


def test_bytes_past_the_committed_length_are_ignored_then_truncated(tmp_path, models):
    lm = models["tiny-mplus"]
    session = inject(new_session(tmp_path, lm), lm, [chunk(32, i) for i in range(5)])
    before = session.load_state(lm.initial_state)
    committed = st.Session.open(tmp_path, "s").committed_lengths()
    for name, _ in committed:
        with open(session.directory / name, "ab") as f:
            f.write(b"\x7f" * 1000)  # a crashed commit's leftovers
    reopened = st.Session.open(tmp_path, "s")
    assert_same_state(reopened.load_state(lm.initial_state), before)
    assert len(reopened.log()) == 1
    after = inject(reopened, lm, [chunk(32, 9)])
    for name, nbytes in after.committed_lengths():
        assert (session.directory / name).stat().st_size == nbytes
    assert after.committed_lengths()[0][1] > committed[0][1] and len(after.log()) == 2


def test_an_append_leaves_whole_blocks_of_zeros_as_holes_and_sums_them_as_zlib_does(tmp_path):
    hole = st.files.HOLE_BYTES
    path = tmp_path / "rows.bin"
    path.write_bytes(b"head" + b"\x7f" * 3 * hole)  # 4 committed bytes, then a crashed commit's leftovers
    rng = random.Random(0)
    data = rng.randbytes(100) + bytes(3 * hole) + rng.randbytes(100) + bytes(100)  # 2 whole zero MiB in 3
    assert st.files.append_after(path, 4, data) == 4 + len(data)
    assert path.read_bytes() == b"head" + data  # the holes read back as zeros, not as the leftovers
    assert path.stat().st_blocks * 512 <= len(data) - 2 * hole + 2 * 4096  # stored: the rest, in 4 kB blocks
    assert block_sums(data, 4) == [
        (min(4 + at + SUM_BLOCK_BYTES, 4 + len(data)), zlib.crc32(data[at : at + SUM_BLOCK_BYTES]))
        for at in range(0, len(data), SUM_BLOCK_BYTES)
    ]


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
        rows_growth = after[st.format.ROWS] - before[st.format.ROWS]
        log_growth = after[st.format.LOG] - before[st.format.LOG]
        written.append(rows_growth + log_growth + after[session.manifest["index"]] + after[st.format.MANIFEST])
        assert rows_growth == new_rows
    print(f"\nbytes per inject: after 1: {written[1]}, after 30: {written[30]}; new rows {new_rows}, pool {pool}")
    assert abs(written[30] - written[1]) <= 16  # only the digits of the counters grow
    assert written[30] < new_rows + pool // 4


def test_mplus_bytes_written_per_inject_stay_proportional_to_new_rows_as_the_ltm_grows(tmp_path, models):
    """An M+ inject appends its new rows and one entry (row id, birth, key) per row it dropped; the index
    holds only the LTM's layout, so writes stay flat while merges grow the LTM tenfold."""
    lm = models["tiny-mplus"]
    cfg = lm.cfg
    L, K, d, s = cfg.num_layers, cfg.num_tokens, cfg.hidden_size, cfg.selector_hidden_dim
    session = new_session(tmp_path, lm)
    written, ltm_rows = [], []
    for i in range(31):
        before = tree_bytes(session.directory)
        session = inject(session, lm, [chunk(32, i)])
        after = tree_bytes(session.directory)
        growth = {name: after[name] - before[name] for name in (st.format.ROWS, st.format.LOG, *st.format.LTM_FILES)}
        assert growth[st.format.ROWS] == L * K * d * 4
        assert sum(growth[name] for name in st.format.LTM_FILES) == L * K * (8 + 8 + 4 * s)
        written.append(sum(growth.values()) + after[session.manifest["index"]] + after[st.format.MANIFEST])
        ltm_rows.append(sum(session.manifest["state"]["ltm"]["sizes"]))
    whole_ltm = ltm_rows[30] * (4 * d + 4 * s + 16)
    print(f"\nM+ bytes per inject: after 1: {written[1]}, after 30: {written[30]}; LTM rows: {ltm_rows[1::29]}")
    assert ltm_rows[30] >= 8 * ltm_rows[1]
    assert written[30] <= 1.15 * written[1] and written[30] < whole_ltm / 2


def test_the_index_keeps_ids_and_ages_in_int32_when_they_fit(tmp_path, models):
    """Every commit rewrites the index: half its bytes with int32 ids and ages; the state reads int64."""
    lm = models["tiny-mplus"]
    session = inject(new_session(tmp_path, lm), lm, [chunk(32, 0), chunk(32, 1)])
    index = session.index()
    assert index["memory_ids"].dtype == index["memory_ages"].dtype == torch.int32
    state = session.load_state(lm.initial_state)
    assert state.memory_ids.dtype == state.memory_ages.dtype == torch.int64
    assert torch.equal(state.memory_ids, index["memory_ids"].long())
    beyond = torch.tensor([[0, 2**31]])  # an id past int32 keeps the whole tensor int64
    assert narrowed(beyond).dtype == torch.int64 and torch.equal(narrowed(beyond), beyond)
    assert narrowed(torch.tensor([[-(2**31), 2**31 - 1]])).dtype == torch.int32


def test_a_second_writer_waits_then_gets_busy(tmp_path, models):
    session = new_session(tmp_path, models["tiny"])
    with session.writer():
        start = time.monotonic()
        with pytest.raises(st.SessionBusy, match="busy"):
            with session.writer(timeout_s=0.3):
                pass
        assert time.monotonic() - start >= 0.3


def test_creating_an_existing_session_is_refused(tmp_path, models):
    new_session(tmp_path, models["tiny"])
    with pytest.raises(st.SessionExists):
        new_session(tmp_path, models["tiny-mplus"])


@pytest.mark.parametrize("preset", ["tiny", "tiny-free-mplus"])
def test_fork_copies_the_committed_state_and_rm_removes(tmp_path, models, preset):
    lm = models[preset]
    session = inject(new_session(tmp_path, lm), lm, [chunk(40, i) for i in range(4)])
    forked = session.fork("copy")
    assert_same_state(forked.load_state(lm.initial_state), session.load_state(lm.initial_state))
    inject(forked, lm, [chunk(32, 5)])
    assert_same_state(st.Session.open(tmp_path, "s").load_state(lm.initial_state), session.load_state(lm.initial_state))
    with pytest.raises(st.SessionExists):
        session.fork("copy")
    st.remove_session(tmp_path, "copy")
    assert st.list_sessions(tmp_path) == ["s"]


@pytest.mark.parametrize("preset", ["tiny", "tiny-mplus"])
def test_sigkill_at_any_moment_leaves_a_committed_chunk(tmp_path, models, preset):
    """20 times: fork a process that injects 3 chunks (one commit each), SIGKILL it at a random moment; the
    session opens at the state before the inject or after one of its chunks."""
    lm = models[preset]
    new_session(tmp_path, lm)
    chunks = [chunk(200, 100 + i) for i in range(3)]  # kills land in compute and in commits

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
        chain = [current.load_state(lm.initial_state)]
        for ids in chunks:
            chain.append(chain[-1].clone())
            lm.inject(chain[-1], ids)
        pid = run_child()
        time.sleep(random.uniform(0, duration * 1.2))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        reopened = st.Session.open(tmp_path, "s")
        lengths = dict(reopened.committed_lengths())
        torn += (reopened.directory / st.format.ROWS).stat().st_size != lengths[st.format.ROWS]
        state = reopened.load_state(lm.initial_state)
        done = [i for i, s in enumerate(chain) if torch.equal(state.memory, s.memory)]
        assert done, "the session is at no committed chunk"
        assert_same_state(state, chain[done[0]])
        partial = [current.partial, partial_record(1, 3), partial_record(2, 3), None]
        assert reopened.partial == partial[done[0]]
        outcomes.add(done[0])
    print(f"\nchunks committed at the kills: {sorted(outcomes)}; kills that left uncommitted rows: {torn}")


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
    assert len(session.log()) == codes.count(0) and session.manifest["state"]["injections"] >= codes.count(0)


def test_a_session_of_an_older_format_is_refused_with_a_message(tmp_path, models):
    session = new_session(tmp_path, models["tiny"])
    manifest = json.loads((session.directory / st.format.MANIFEST).read_text())
    manifest = {key: value for key, value in manifest.items() if key != "checksum"} | {"format": 2}
    (session.directory / st.format.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(st.SessionDamaged, match="store format 2"):
        st.Session.open(tmp_path, "s")
