"""Ctrl-C at every phase of a command: exit 130, one line on stderr, no traceback, and the session is what the
line says. Each run patches a function of the phase to send SIGINT to its own process at its first call (no
sleeps), then runs the `mplus` entry point."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from model import store as st
from model.text.chunking import chunk_sizes
from mplus_cli.app import app

TEXT = "Alice keeps the spare key under the blue flowerpot by the back door. " * 12  # 828 byte tokens

# argv: TARGET HOW STAMP MPLUS-ARGS...; TARGET is module:attribute (a dotted attribute path), import:MODULE
# (SIGINT when MODULE is first imported) or exit: (SIGINT from an atexit handler, as the interpreter shuts
# down); HOW is now (send it in the patched call) or thread (send it from a new thread while the call goes on).
# STAMP receives the time the signal was sent.
WRAPPER = """
import importlib, os, signal, sys, threading, time

target, how, stamp = sys.argv[1:4]
sys.argv = ["mplus", *sys.argv[4:]]
signal.signal(signal.SIGINT, signal.default_int_handler)
fired = []


def interrupt():
    with open(stamp, "w") as f:
        f.write(repr(time.time()))
    os.kill(os.getpid(), signal.SIGINT)


def fire():
    if not fired:
        fired.append(True)
        threading.Thread(target=interrupt).start() if how == "thread" else interrupt()


where, name = target.split(":")
if where == "import":
    import builtins

    real_import = builtins.__import__

    def importing(module, *args, **kwargs):
        if module == name:
            fire()
        return real_import(module, *args, **kwargs)

    builtins.__import__ = importing
elif where == "exit":
    import atexit

    atexit.register(fire)
else:
    owner = importlib.import_module(where)
    *path, attr = name.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, attr)

    def patched(*args, **kwargs):
        fire()
        return original(*args, **kwargs)

    setattr(owner, attr, patched)

from mplus_cli.main import main

main()
"""


def interrupted(tmp_path: Path, target: str, *args, how: str = "now") -> tuple[subprocess.CompletedProcess, float]:
    """Run `mplus ARGS` with SIGINT sent at the first call of `target`: (the finished process, the time from
    the signal to the process's end)."""
    stamp = tmp_path / "sigint-sent"
    command = [sys.executable, "-c", WRAPPER, target, how, str(stamp), *map(str, args)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    ended = time.time()
    assert stamp.exists(), f"the patched {target} never ran: {proc.stderr}"
    return proc, ended - float(stamp.read_text())


def only_line(proc: subprocess.CompletedProcess) -> str:
    """The one line on stderr (besides the model's note), after checking exit 130 and no traceback."""
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("note: model is")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def committed(store: Path, name: str) -> tuple[int, int]:
    """(commit, tokens injected) of a session."""
    manifest = st.Session.open(store, name).manifest
    return manifest["commit"], manifest["state"]["tokens_injected"]


@pytest.fixture
def store(tmp_path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture
def session(store, text_file) -> str:
    result = CliRunner().invoke(app, ["inject", str(text_file), "-s", "s", "--store", str(store)])
    assert result.exit_code == 0, result.output
    return "s"


def test_ctrl_c_while_importing_at_startup(tmp_path, store):
    proc, _ = interrupted(tmp_path, "import:torch", "session", "ls", "--store", store)
    assert only_line(proc) == "mplus: interrupted"


def test_ctrl_c_while_reading_the_input_creates_no_session(tmp_path, store, text_file):
    proc, _ = interrupted(
        tmp_path, "mplus_cli.commands.inject:plan_source", "inject", text_file, "-s", "new", "--store", store
    )
    assert only_line(proc) == "mplus: error: interrupted; nothing was injected into session 'new'"
    assert not st.session_exists(store, "new")


def test_ctrl_c_during_the_model_compute_leaves_the_session_unchanged(tmp_path, store, session, text_file):
    before = committed(store, session)
    args = ["inject", text_file, "-s", session, "--store", store]
    proc, _ = interrupted(tmp_path, "model.core.memoryllm:MemoryLLM.inject", *args)
    assert only_line(proc) == f"mplus: error: interrupted; session {session!r} is unchanged"
    assert committed(store, session) == before


def test_ctrl_c_during_a_commit_finishes_it_and_says_so(tmp_path, store, session, text_file):
    """SIGINT in the middle of the first commit: the commit completes, the line says what is kept."""
    (commit, tokens), sizes = committed(store, session), chunk_sizes(len(TEXT), 256)
    other = tmp_path / "other.txt"
    other.write_text(TEXT.upper())  # a new source of len(sizes) chunks
    args = ["inject", other, "-s", session, "--store", store, "--chunk-tokens", 256]
    proc, _ = interrupted(tmp_path, "model.store.session:append_after", *args)
    line = only_line(proc)
    assert f"session {session!r} keeps 1 of {len(sizes)} chunks of {other}" in line and "--resume" in line
    assert committed(store, session) == (commit + 1, tokens + sizes[0])
    assert st.Session.open(store, session).partial["chunks_done"] == 1


def test_ctrl_c_during_an_answer_changes_nothing(tmp_path, store, session):
    before = committed(store, session)
    args = ["ask", "Where is the key?", "-s", session, "--store", store, "--max-new-tokens", 8]
    proc, _ = interrupted(tmp_path, "model.core.generate:pick_token", *args)
    assert only_line(proc) == "mplus: interrupted; every session keeps its last committed state"
    assert committed(store, session) == before


def test_ctrl_c_while_the_interpreter_exits(tmp_path, store, session):
    proc, _ = interrupted(tmp_path, "exit:", "session", "ls", "--store", store)
    assert only_line(proc) == "mplus: interrupted while exiting"
    assert proc.stdout.splitlines()[1].startswith(f"{session} ")  # what the command printed is kept


def test_ctrl_c_cuts_a_large_read_short(tmp_path, store):
    """SIGINT from another thread while a ~9 s read of a big file goes on: the read stops at once."""
    big = tmp_path / "big.txt"
    big.write_text((TEXT + "\n") * 25_000)  # 20 MB: reading and tokenizing it takes seconds
    args = ["inject", big, "-s", "big", "--store", store]
    proc, after_signal = interrupted(tmp_path, "model.text.sources:text_blocks", *args, how="thread")
    assert only_line(proc) == "mplus: error: interrupted; nothing was injected into session 'big'"
    assert after_signal < 4.0  # the read alone takes ~9 s (more on a loaded machine): cut short, not finished
    assert not st.session_exists(store, "big")
