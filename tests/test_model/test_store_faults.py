"""Fault injection on the session store: a kill at every commit point, a byte flip in every file, links.

Each fault leaves the session at a committed state, or refuses with one line that names the damaged file;
`session check --rollback` returns a damaged session to a commit that verifies.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import model as mp
from model import store as st
from mplus_cli.app import app

runner = CliRunner()
TEXT = "The vault code is 4417. The ferry leaves at 7:45 from the north pier. " * 8
DURABLE_CALLS = ("ftruncate", "pwrite", "fsync", "replace", "unlink", "rename")  # a kill may land before each


def mplus(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def error_lines(stderr: str) -> list[str]:
    """stderr without the model's label note."""
    return [line for line in stderr.strip().splitlines() if not line.startswith("note: ")]


@pytest.fixture(scope="module")
def models() -> dict[str, mp.MemoryLLM]:
    torch.set_num_threads(1)
    return {name: mp.load(name) for name in ("tiny", "tiny-mplus")}


def chunk(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


def partial_record(done: int, total: int) -> dict:
    """The manifest's record of a source `t` injected `done` chunks of `total` far."""
    counts = {"chunks_done": done, "chunks_total": total, "tokens_done": done, "tokens_total": total}
    return {"source": "t", "sha256": str(total), "chunk_tokens": 16} | counts | {"at": ""}


def inject(session: st.Session, lm: mp.MemoryLLM, chunks: list[torch.Tensor]) -> None:
    """`chunks` committed one by one (the last with its log line), as `mplus inject` does."""
    with session.writer() as writer:
        state = writer.load_state(lm.initial_state)
        for i, ids in enumerate(chunks):
            writer.inject(lm, state, ids)
            last = i == len(chunks) - 1
            log = [{"source": "t", "sha256": str(len(chunks)), "tokens": 0, "chunks": len(chunks)}] if last else []
            writer.commit(state, log, None if last else partial_record(i + 1, len(chunks)))


def killed_at(event: int, root: Path, lm: mp.MemoryLLM, chunks: list[torch.Tensor]) -> int:
    """Fork a child that injects `chunks` and SIGKILLs itself just before its `event`-th durable call
    (ftruncate, pwrite, fsync, replace, unlink, rename); the number of such calls it made (when it ran to the end)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        calls = [0]

        def counted(call):
            def wrapper(*args, **kwargs):
                calls[0] += 1
                if calls[0] == event:
                    os.kill(os.getpid(), signal.SIGKILL)
                return call(*args, **kwargs)

            return wrapper

        try:
            for name in DURABLE_CALLS:
                setattr(os, name, counted(getattr(os, name)))
            inject(st.Session.open(root, "s"), lm, chunks)
            os.write(write_end, str(calls[0]).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end) as f:
        return int(f.read() or 0)


@pytest.mark.parametrize("preset", ["tiny", "tiny-mplus"])
def test_a_kill_at_every_commit_point_leaves_a_committed_state_that_verifies(tmp_path, models, preset):
    """Kill an inject of 2 chunks before each of its durable calls, in turn: the session opens at the state
    before the inject or after one of its chunks, every file verifies, and the next inject commits."""
    lm = models[preset]
    pristine, root = tmp_path / "pristine", tmp_path / "store"
    st.Session.create(pristine, "s", lm.initial_state, st.binding(lm, lm.info.source), 0, torch.float32)
    inject(st.Session.open(pristine, "s"), lm, [chunk(80, 1)])
    chunks = [chunk(80, 2), chunk(80, 3)]
    chain = [st.Session.open(pristine, "s").load_state(lm.initial_state)]
    for ids in chunks:
        chain.append(chain[-1].clone())
        lm.inject(chain[-1], ids)
    shutil.copytree(pristine, root)
    events = killed_at(0, root, lm, chunks)  # a full run: how many durable calls
    outcomes = []
    for event in range(1, events + 1):
        shutil.rmtree(root)
        shutil.copytree(pristine, root)
        killed_at(event, root, lm, chunks)
        session = st.Session.open(root, "s")
        state = session.load_state(lm.initial_state)
        done = next(i for i, s in enumerate(chain) if torch.equal(state.memory, s.memory))
        assert state.to_meta() == chain[done].to_meta()
        assert [v.problems for v in st.check_session(root, "s")][0] == [], event
        outcomes.append(done)
        inject(session, lm, [chunk(40, 4)])  # the store takes the next commit
        assert st.Session.open(root, "s").manifest["commit"] == session.manifest["commit"] + 1
    assert events > 20 and outcomes[0] == 0 and outcomes[-1] == 2 and outcomes == sorted(outcomes)
    print(f"\n{preset}: {events} kill points, chunks committed at each: {outcomes}")


# -- byte flips ------------------------------------------------------------------------------------------
@pytest.fixture
def grown(tmp_path) -> Path:
    """A tiny-mplus session with long-term entries, committed in several chunks; returns its store root."""
    root, text = tmp_path / "store", tmp_path / "notes.txt"
    text.write_text(TEXT)
    result = mplus("inject", text, "-s", "s", "--store", root, "--model", "tiny-mplus", "--chunk-tokens", "64")
    assert result.exit_code == 0, result.output
    assert st.Session.open(root, "s").manifest["ltm"]["entries"] > 0
    return root


def flip(path: Path, at: int, count: int = 16) -> None:
    data = bytearray(path.read_bytes())
    for i in range(at, min(at + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def committed(session: st.Session) -> dict[str, int]:
    """Committed bytes of every file of the current commit."""
    lengths = dict(session.committed_lengths())
    lengths[st.format.SUMS] = session.manifest["sums"]["records"] * st.format.SUM_RECORD * 8
    for name in (st.format.MANIFEST, session.manifest["index"]):
        lengths[name] = (session.directory / name).stat().st_size
    return lengths


def small_files(session: st.Session) -> set[str]:
    return {st.format.MANIFEST, session.manifest["index"], st.format.SUMS, st.format.LOG}


def ask(root: Path):
    return mplus("ask", "What is the vault code?", "-s", "s", "--store", root, "--max-new-tokens", "4")


def test_a_byte_flip_in_any_file_is_detected_and_named_never_a_different_memory(grown):
    """16 flipped bytes in the middle of each file of the current commit: `session check` exits 1 naming it;
    `ask` either exits 1 naming it or (damage in bytes it does not read) answers as before."""
    answer = ask(grown)
    assert answer.exit_code == 0
    session = st.Session.open(grown, "s")
    pristine = grown.parent / "pristine"
    shutil.copytree(grown, pristine)
    detected = []
    for name, nbytes in committed(session).items():
        shutil.rmtree(grown)
        shutil.copytree(pristine, grown)
        flip(grown / "s" / name, nbytes // 2)
        check = mplus("session", "check", "s", "--store", grown)
        assert check.exit_code == 1 and name in check.stderr, (name, check.stderr)
        asked = ask(grown)
        if asked.exit_code == 0:
            assert asked.stdout == answer.stdout, name
        else:
            assert asked.exit_code == 1 and name in asked.stderr and len(error_lines(asked.stderr)) == 1
        detected.append(name)
    print(f"\nflips detected by `session check`: {len(detected)} of {len(committed(session))} files")


def damage(path: Path, how: str) -> None:
    """cut: the file halved; flip: 16 bytes inverted in its middle; zero: the first 16 bytes from its middle
    that are not all zeros set to zero."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    if how == "cut":
        data = data[:middle]
    elif how == "flip":
        data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    else:
        at = next(i for i in range(middle, len(data)) if any(data[i : i + 16]))
        data[at : at + 16] = bytes(len(data[at : at + 16]))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("preset", ["tiny", "tiny-mplus"])
def test_an_inject_never_builds_on_damage_and_changes_no_byte(tmp_path, preset):
    """Every file of the current commit cut, flipped or zeroed, in both flavours: `mplus inject` refuses with
    exit 1 (damaged) in one line that names the file and points at `session check`; every file of the session
    stays byte-identical."""
    root, text, more = tmp_path / "store", tmp_path / "notes.txt", tmp_path / "more.txt"
    text.write_text(TEXT)
    more.write_text("more text " * 20)
    result = mplus("inject", text, "-s", "s", "--store", root, "--model", preset, "--chunk-tokens", "64")
    assert result.exit_code == 0, result.output
    pristine = tmp_path / "pristine"
    shutil.copytree(root, pristine)
    files = committed(st.Session.open(root, "s"))
    tried = 0
    for name in files:
        for how in ("cut", "flip", "zero"):
            shutil.rmtree(root)
            shutil.copytree(pristine, root)
            damage(root / "s" / name, how)
            before = {p.name: p.read_bytes() for p in (root / "s").iterdir()}
            injected = mplus("inject", more, "-s", "s", "--store", root)
            assert injected.exit_code == 1, (name, how, injected.output)
            [line] = error_lines(injected.stderr)
            assert name in line and "session check" in line, (name, how, line)
            assert {p.name: p.read_bytes() for p in (root / "s").iterdir()} == before, (name, how)
            tried += 1
    assert tried == 3 * len(files) and (preset == "tiny") == (st.format.LTM_FILES[0] not in files)
    print(f"\n{preset}: {tried} damaged files, every inject refused")


def test_rollback_returns_a_session_damaged_in_its_last_commit_to_the_commit_before(grown):
    """A flip in the bytes the last commit added to each file, or in its index: `check --rollback` returns to
    the previous commit, which verifies and answers. A damaged manifest is restored from its commit's copy."""
    session = st.Session.open(grown, "s")
    before = st.Session(session.directory, json.loads((session.directory / kept(session)[1]).read_text()))
    pristine = grown.parent / "pristine"
    shutil.copytree(grown, pristine)
    now, then = committed(session), dict(before.committed_lengths())
    targets = {name: (then[name] + now[name]) // 2 for name in then if now[name] > then[name]}
    targets |= {
        st.format.MANIFEST: now[st.format.MANIFEST] // 2,
        session.manifest["index"]: now[session.manifest["index"]] // 2,
    }
    for name, at in targets.items():
        shutil.rmtree(grown)
        shutil.copytree(pristine, grown)
        flip(grown / "s" / name, at)
        result = mplus("session", "check", "s", "--store", grown, "--rollback", "--json")
        assert result.exit_code == 0, (name, result.output)
        back_to = session if name == st.format.MANIFEST else before  # the manifest's own copy verifies: nothing lost
        assert json.loads(result.stdout)["commit"] == back_to.manifest["commit"], name
        assert mplus("session", "check", "s", "--store", grown).exit_code == 0
        assert ask(grown).exit_code == 0
        reopened = st.Session.open(grown, "s")
        assert reopened.manifest["state"] == back_to.manifest["state"]


def kept(session: st.Session) -> list[str]:
    return [path.name for path in st.kept_commits(session.directory)]


def test_damage_every_kept_commit_shares_is_named_and_not_rolled_back(grown):
    session = st.Session.open(grown, "s")
    flip(session.directory / st.format.ROWS, 0)  # the first rows: in every kept commit
    result = mplus("session", "check", "s", "--store", grown, "--rollback")
    assert result.exit_code == 1 and "no kept commit" in result.stderr and st.format.ROWS in result.stderr
    assert st.Session.open(grown, "s").manifest["commit"] == session.manifest["commit"]


# -- links -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [st.format.ROWS, st.format.LOG, st.format.MANIFEST, st.format.LOCK])
def test_a_linked_file_is_refused_and_the_outside_file_untouched(grown, tmp_path, name):
    directory = grown / "s"
    outside = tmp_path / "outside.bin"
    outside.write_bytes((directory / name).read_bytes() + b"user data")
    (directory / name).unlink()
    (directory / name).symlink_to(outside)
    original = outside.read_bytes()
    text = tmp_path / "more.txt"
    text.write_text("more text " * 20)
    for args in (["inject", text, "-s", "s"], ["ask", "q", "-s", "s"], ["session", "rm", "s", "--yes"]):
        result = mplus(*args, "--store", grown)
        assert result.exit_code == 1 and "symbolic link" in result.stderr, (args, result.output)
        assert len(error_lines(result.stderr)) == 1
    assert outside.read_bytes() == original and (directory / name).is_symlink()


def test_a_linked_session_directory_is_refused_by_every_command(grown, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    shutil.move(grown / "s", elsewhere)
    (grown / "s").symlink_to(elsewhere, target_is_directory=True)
    files = {p.name: p.read_bytes() for p in elsewhere.iterdir()}
    text = tmp_path / "more.txt"
    text.write_text("more text " * 20)
    for args in (["inject", text, "-s", "s"], ["ask", "q", "-s", "s"], ["session", "rm", "s", "--yes"]):
        result = mplus(*args, "--store", grown)
        assert result.exit_code == 1 and "symbolic link" in result.stderr, (args, result.output)
    assert {p.name: p.read_bytes() for p in elsewhere.iterdir()} == files and (grown / "s").is_symlink()


# -- privacy ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_store_directories_are_0700_and_files_0600_whatever_the_umask(tmp_path, umask):
    text = tmp_path / "notes.txt"
    text.write_text(TEXT)
    previous = os.umask(umask)
    try:
        root = tmp_path / "new" / "store"
        assert mplus("inject", text, "-s", "s", "--store", root, "--model", "tiny-mplus").exit_code == 0
        assert mplus("session", "fork", "s", "t", "--store", root).exit_code == 0
    finally:
        os.umask(previous)
    assert root.stat().st_mode & 0o777 == 0o700
    for session in ("s", "t"):
        assert (root / session).stat().st_mode & 0o777 == 0o700
        modes = {p.name: p.stat().st_mode & 0o777 for p in (root / session).iterdir()}
        assert set(modes.values()) == {0o600}, modes


# -- races -----------------------------------------------------------------------------------------------
def test_concurrent_creation_with_other_settings_ends_in_one_session_and_exit_4(tmp_path):
    """4 processes create one session at once with different models or seeds: one wins, the others exit 4
    with the conflict line, and the session is the winner's."""
    text = tmp_path / "notes.txt"
    text.write_text(TEXT)
    root = tmp_path / "store"
    settings = [["--model", "tiny"], ["--model", "tiny-mplus"], ["--model", "tiny-free-mplus"], ["--seed", "7"]]
    command = [sys.executable, "-m", "mplus_cli", "inject", str(text), "-s", "s", "--store", str(root)]
    procs = [subprocess.Popen([*command, *extra], stderr=subprocess.PIPE, text=True) for extra in settings]
    codes = [p.wait(timeout=120) for p in procs]
    errors = [error_lines(p.stderr.read()) for p in procs]
    assert sorted(codes) == [0, 4, 4, 4], errors
    for code, lines in zip(codes, errors, strict=True):
        assert code == 0 or (len(lines) == 1 and "session 's'" in lines[0]), lines
    winner = settings[codes.index(0)]
    session = st.Session.open(root, "s")
    assert session.manifest["seed"] == (7 if winner == ["--seed", "7"] else 0)
    assert session.model_ref["id"] == (winner[1] if winner[0] == "--model" else "tiny")


def test_a_format_3_session_is_read_as_is_and_upgraded_by_its_next_inject(grown, tmp_path):
    """A session as the previous store format left it (no checksums, no commit copies) answers as before;
    the next inject adds checksums for every committed byte, and then it verifies."""
    directory = grown / "s"
    answer = ask(grown).stdout
    manifest = json.loads((directory / st.format.MANIFEST).read_text())
    index = directory / manifest["index"]
    plain = index.with_suffix("")  # index-NNNNNN.safetensors, uncompressed, as that format wrote it
    plain.write_bytes(zlib.decompress(index.read_bytes()))
    index.unlink()
    old = {k: v for k, v in manifest.items() if k not in ("checksum", "sums", "index_sum")}
    old |= {"format": 3, "index": plain.name}
    (directory / st.format.MANIFEST).write_text(json.dumps(old))
    for path in [directory / st.format.SUMS, *st.kept_commits(directory)]:
        path.unlink()
    assert ask(grown).stdout == answer
    text = tmp_path / "more.txt"
    text.write_text("more text " * 20)
    assert mplus("inject", text, "-s", "s", "--store", grown).exit_code == 0
    upgraded = st.Session.open(grown, "s")
    assert (
        upgraded.manifest["format"] == st.format.STORE_FORMAT and upgraded.manifest["commit"] == manifest["commit"] + 1
    )
    assert upgraded.manifest["index"].endswith(".safetensors.zlib")  # its next commits write compressed ones
    assert mplus("session", "check", "s", "--store", grown).exit_code == 0
    flip(directory / st.format.ROWS, 0)  # bytes the format-3 session wrote are covered too
    assert mplus("session", "check", "s", "--store", grown).exit_code == 1


@pytest.mark.parametrize("operation", ["create", "fork"])
def test_ctrl_c_while_a_session_is_built_leaves_nothing_behind(tmp_path, models, monkeypatch, operation):
    lm = models["tiny-mplus"]
    root = tmp_path / "store"
    if operation == "fork":
        st.Session.create(root, "s", lm.initial_state, st.binding(lm, "tiny-mplus"), 0, torch.float32)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(st.session, "write_manifest", interrupted)
    with pytest.raises(KeyboardInterrupt):
        if operation == "create":
            st.Session.create(root, "s", lm.initial_state, st.binding(lm, "tiny-mplus"), 0, torch.float32)
        else:
            st.Session.open(root, "s").fork("t")
    assert sorted(p.name for p in root.iterdir()) == ([] if operation == "create" else ["s"])


@pytest.mark.parametrize("order", ["rm-between-open-and-lock", "rm-holds-the-lock", "inject-first", "rm-first"])
def test_rm_and_inject_in_every_order_never_report_a_write_to_a_removed_session(grown, order):
    """`session rm` against an inject that opened the session before it locked it: the inject is refused
    (SessionNotFound) or both succeed one after the other; never a commit reported on a removed session."""
    lm = mp.load("tiny-mplus")
    opened = st.Session.open(grown, "s")
    outcome: list[object] = []

    def write() -> None:
        try:
            inject(opened, lm, [chunk(40, 7)])
            outcome.append("committed")
        except st.StoreError as e:
            outcome.append(e)

    if order == "rm-between-open-and-lock":
        st.remove_session(grown, "s")
        write()
    elif order == "rm-holds-the-lock":  # the inject opens the lock file, then waits while rm renames the folder
        directory = grown / "s"
        with st.files.exclusive_lock(directory / st.format.LOCK, "s"):
            writer = threading.Thread(target=write)
            writer.start()
            time.sleep(0.3)
            os.rename(directory, grown / ".s.rm")
        writer.join()
        shutil.rmtree(grown / ".s.rm")
    elif order == "inject-first":
        write()
        st.remove_session(grown, "s")
    else:
        st.remove_session(grown, "s")
        with pytest.raises(st.SessionNotFound):
            st.Session.open(grown, "s")
        outcome.append(st.SessionNotFound())
    [result] = outcome
    if order == "inject-first":
        assert result == "committed"
    else:
        assert isinstance(result, st.SessionNotFound), result
    assert not st.session_exists(grown, "s") and not (grown / "s").exists()


@pytest.mark.parametrize("how", ["cut", "flip"])
def test_check_checks_every_kept_commit_a_rollback_may_need(grown, how):
    """A damaged copy of an older commit (its manifest copy or its index) fails `session check` by name,
    though the session itself is sound; `--quick` checks the committed state alone and says so."""
    directory = grown / "s"
    oldest = min(st.kept_commits(directory), key=lambda path: path.name)
    index = json.loads(oldest.read_text())["index"]
    for name in (oldest.name, index):
        kept = directory / name
        pristine = kept.read_bytes()
        damage(kept, how)
        check = mplus("session", "check", "s", "--store", grown)
        assert check.exit_code == 1 and "kept commit" in check.stderr and "sound" in check.stderr, check.output
        quick = mplus("session", "check", "s", "--store", grown, "--quick")
        assert quick.exit_code == 0 and "kept commits not checked (--quick)" in quick.stdout, quick.output
        assert ask(grown).exit_code == 0  # the session itself is sound
        kept.write_bytes(pristine)
    assert mplus("session", "check", "s", "--store", grown).exit_code == 0
