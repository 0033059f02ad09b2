"""The session commands end to end: inject / ask / session / export, --json, exit codes, bad inputs."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES
from typer.testing import CliRunner

import model as mp
from model import store as st
from model.store.export import load_exported_memory
from model.text.sources import plan_source
from mplus_cli.app import app

runner = CliRunner()
TEXT = "Alice keeps the spare key under the blue flowerpot by the back door. " * 12


def mplus(*args: str, input: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def run_mplus(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mplus_cli", *map(str, args)]
    return subprocess.run(command, input=input, capture_output=True, text=True, timeout=120)


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under the store root."""
    files = [p for p in root.rglob("*") if p.is_file()]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


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
    result = mplus("inject", text_file, "--session", "s", "--store", store, "--chunk-tokens", "256", "--json")
    assert result.exit_code == 0, result.output
    return "s"


def test_inject_show_ask_flow(store, text_file, session):
    show = json.loads(mplus("session", "show", session, "--store", store, "--json").stdout)
    tokens = len(TEXT.encode())  # byte tokenizer
    assert show["tokens"] == tokens and show["chunks"] == -(-tokens // 256)
    assert show["model"]["id"] == "tiny" and "untrained" in show["label"]
    assert show["log"][0]["source"] == str(text_file)
    assert show["log"][0]["sha256"] == hashlib.sha256(TEXT.encode()).hexdigest()
    assert show["disk_bytes"] > 0 and show["memory"]["short_term_rows"] == 128
    assert "untrained" in mplus("session", "show", session, "--store", store).stdout

    before = snapshot(store)
    ask = mplus("ask", "Where is the key?", "--session", session, "--store", store, "--json", "--max-new-tokens", 5)
    answer = json.loads(ask.stdout)
    assert ask.exit_code == 0 and len(answer["token_ids"]) <= 5 and "untrained" in answer["label"]
    sampling = ["--sample", "--temperature", "0.7", "--top-p", "0.9", "--seed", "1"]
    sampled = mplus("ask", "Where?", "-s", session, "--store", store, *sampling)
    assert sampled.exit_code == 0, sampled.output
    assert snapshot(store) == before  # asking never changes the session

    again = json.loads(mplus("inject", text_file, "-s", session, "--store", store, "--json").stdout)
    assert again["injections"] == show["injections"] + again["chunks"]
    assert again["commit"] == show["commit"] + again["chunks"]  # one commit per chunk
    listing = json.loads(mplus("session", "ls", "--store", store, "--json").stdout)
    assert [row["session"] for row in listing["sessions"]] == ["s"]


def test_chunking_merges_a_short_tail_and_refuses_short_inputs(store, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("x" * 70)  # 64 + 6: the 6-token tail joins the first chunk
    result = json.loads(mplus("inject", path, "-s", "c", "--store", store, "--chunk-tokens", 64, "--json").stdout)
    assert result["chunks"] == 1 and result["tokens"] == 70
    assert mplus("inject", path, "-s", "c", "--store", store, "--chunk-tokens", 8).exit_code == 2


def test_fork_and_rm(store, session):
    assert mplus("session", "fork", session, "copy", "--store", store).exit_code == 0
    assert mplus("session", "fork", session, "copy", "--store", store).exit_code == 4
    shown = json.loads(mplus("session", "show", "copy", "--store", store, "--json").stdout)
    assert shown["forked_from"] == session
    assert mplus("session", "rm", "copy", "--store", store).exit_code == 2  # no --yes, no terminal
    assert mplus("session", "rm", "copy", "--store", store, "--yes").exit_code == 0
    assert mplus("session", "show", "copy", "--store", store).exit_code == 3
    assert st.list_sessions(store) == [session]


def test_export_memory_round_trip_equals_the_session_state(store, session, tmp_path):
    out = tmp_path / "memory.safetensors"
    assert mplus("export", "-s", session, "--store", store, "-o", out).exit_code == 0
    exported, manifest = load_exported_memory(out)
    lm = mp.load("tiny")
    state = st.Session.open(store, session).load_state(lm.initial_state)
    assert manifest["name"] == session
    beside = json.loads(out.with_suffix(".json").read_text())  # the JSON manifest next to the file
    assert beside["session"] == manifest and beside["state"] == state.to_meta() and beside["file"] == out.name
    for key, value in state.to_tensors().items():
        assert torch.equal(exported.to_tensors()[key], value), key
    assert mplus("export", "-s", session, "--store", store, "-o", out).exit_code == 4  # exists, no --force
    assert mplus("export", "-s", session, "--store", store, "-o", out, "--force").exit_code == 0


@pytest.mark.parametrize("preset", ["tiny", "tiny-mplus"])
def test_export_checkpoint_loads_with_the_same_memory(store, text_file, tmp_path, preset):
    assert mplus("inject", text_file, "-s", "k", "--store", store, "--model", preset).exit_code == 0
    out = tmp_path / "checkpoint"
    result = mplus("export", "-s", "k", "--store", store, "-o", out, "--format", "checkpoint", "--json")
    assert result.exit_code == 0, result.output
    loaded = mp.load(out)
    state = st.Session.open(store, "k").load_state(mp.load(preset).initial_state)
    assert torch.equal(loaded.initial_state.memory, state.memory)
    if state.ltm is not None:
        assert loaded.initial_state.ltm.sizes() == state.ltm.sizes()
    assert mplus("ask", "q", "-s", "k", "--store", store, "--max-new-tokens", 3).exit_code == 0


@pytest.mark.parametrize("scenario", ["memoryllm", "mplus"])
def test_a_checkpoint_directory_without_tokenizer_needs_tokenizer(store, text_file, tmp_path, scenario):
    checkpoint = FIXTURES / scenario / "model"
    no_tokenizer = mplus("inject", text_file, "-s", "f", "--store", store, "--model", checkpoint)
    assert no_tokenizer.exit_code == 1 and "--tokenizer" in no_tokenizer.stderr
    tokenizer = tmp_path / "tokenizer"
    mp.load("tiny").tokenizer.save_pretrained(tokenizer)
    args = ["-s", "f", "--store", store]
    assert mplus("inject", text_file, *args, "--model", checkpoint, "--tokenizer", tokenizer).exit_code == 0
    assert mplus("ask", "Where is the key?", *args, "--max-new-tokens", 3).exit_code == 0  # tokenizer remembered
    assert mplus("inject", text_file, *args, "--model", str(checkpoint) + "/").exit_code == 0  # same directory
    out = tmp_path / "exported"
    assert mplus("export", *args, "-o", out, "--format", "checkpoint").exit_code == 0
    session_state = st.Session.open(store, "f").load_state(mp.load(checkpoint, tokenizer=False).initial_state)
    assert torch.equal(mp.load(out).initial_state.memory, session_state.memory)


def test_same_inputs_and_seed_give_bit_identical_memory(store, text_file, tmp_path):
    exported = []
    for name in ("a", "b"):
        for _ in range(2):
            result = mplus("inject", text_file, "-s", name, "--store", store, "--seed", 3, "--chunk-tokens", 64)
            assert result.exit_code == 0
        out = tmp_path / f"{name}.safetensors"
        assert mplus("export", "-s", name, "--store", store, "-o", out).exit_code == 0
        exported.append(load_exported_memory(out)[0].to_tensors())
    assert all(torch.equal(exported[0][key], exported[1][key]) for key in exported[0])


def bad_input(tmp_path: Path, kind: str) -> tuple[list[str], int]:
    """(inject arguments, expected exit code) for one kind of bad input."""
    path = tmp_path / f"{kind}.txt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "non-utf8":
        path.write_bytes("caf\u00e9 ".encode("latin-1") * 20)
    elif kind == "short":
        path.write_text("too short")
    elif kind == "directory":
        path = tmp_path
    elif kind == "missing":
        return [str(tmp_path / "nope.txt")], 3
    return [str(path)], 1


@pytest.mark.parametrize("kind", ["empty", "binary", "non-utf8", "short", "directory", "missing"])
def test_bad_inputs_give_one_line_and_leave_the_store_unchanged(store, session, tmp_path, kind):
    args, code = bad_input(tmp_path, kind)
    before = snapshot(store)
    for name in (session, "fresh"):  # an existing session, and one the inject would create
        result = mplus("inject", *args, "-s", name, "--store", store)
        assert result.exit_code == code, result.output
        assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.output
    assert snapshot(store) == before


def test_session_errors_and_exit_codes(store, session, text_file):
    before = snapshot(store)
    unknown = mplus("ask", "q", "-s", "nobody", "--store", store)
    assert unknown.exit_code == 3 and "session ls" in unknown.stderr
    wrong = mplus("inject", text_file, "-s", session, "--store", store, "--model", "tiny-mplus")
    assert wrong.exit_code == 4 and "belongs to model" in wrong.stderr
    assert mplus("ask", "q", "-s", session, "--store", store, "--model", "tiny-mplus").exit_code == 4
    assert mplus("session", "show", "../etc", "--store", store).exit_code == 2
    assert mplus("ask", "q", "-s", session, "--store", store, "--chat").exit_code == 2  # no chat template
    assert mplus("ask", " ", "-s", session, "--store", store).exit_code == 2
    missing_model = mplus("inject", text_file, "-s", "m", "--store", store, "--model", str(store / "no-such-dir"))
    assert missing_model.exit_code == 3
    as_json = mplus("ask", "q", "-s", "nobody", "--store", store, "--json")
    assert json.loads(as_json.stdout)["exit_code"] == 3
    assert snapshot(store) == before


@pytest.mark.parametrize("content", ["{not json", "[]", '{"format": 1}', "\xff"])
def test_a_corrupted_manifest_is_reported_and_removable(store, session, text_file, content):
    manifest = store / session / st.format.MANIFEST
    manifest.write_text(content, encoding="latin-1")
    before = snapshot(store)
    for args in (["session", "show", session], ["ask", "q", "-s", session], ["inject", text_file, "-s", session]):
        result = mplus(*args, "--store", store)
        damaged = "manifest.json is damaged" in result.stderr and "session check s --rollback" in result.stderr
        assert result.exit_code == 1 and (damaged or "store format 1" in result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1
    assert snapshot(store) == before
    assert mplus("session", "rm", session, "--store", store, "--yes").exit_code == 0


def test_a_busy_session_exits_4(store, session, text_file, monkeypatch):
    monkeypatch.setattr(st.files, "LOCK_TIMEOUT_S", 0.2)
    with st.Session.open(store, session).writer():
        result = mplus("inject", text_file, "-s", session, "--store", store)
    assert result.exit_code == 4 and "busy" in result.stderr


def test_real_processes_stdin_streaming_and_debug(store):
    env_store = ["--store", str(store)]
    injected = run_mplus("inject", "-", "-s", "p", *env_store, "--json", input=TEXT)
    assert injected.returncode == 0, injected.stderr
    assert json.loads(injected.stdout)["sources"][0]["source"] == "<stdin>"
    asked = run_mplus("ask", "Where is the key?", "-s", "p", *env_store, "--max-new-tokens", 4)
    assert asked.returncode == 0 and "untrained" in asked.stderr
    unknown = run_mplus("session", "show", "nobody", *env_store)
    assert unknown.returncode == 3 and len(unknown.stderr.strip().splitlines()) == 1


def test_debug_shows_the_traceback(store):
    debug = mplus("--debug", "session", "show", "nobody", "--store", store)
    assert debug.exit_code == 3 and "Traceback" in debug.stderr


def test_the_model_comes_from_mplus_model_for_new_sessions(store, text_file, monkeypatch):
    monkeypatch.setenv("MPLUS_MODEL", "tiny-mplus")
    result = json.loads(mplus("inject", text_file, "-s", "e", "--store", store, "--json").stdout)
    assert result["model"] == "tiny-mplus"
    monkeypatch.setenv("MPLUS_MODEL", "tiny")  # an existing session keeps its model
    assert mplus("inject", text_file, "-s", "e", "--store", store).exit_code == 0
    assert mplus("export", "-s", "e", "--store", store, "-o", store / "no" / "out").exit_code == 3


def test_ctrl_c_during_an_inject_keeps_whole_chunks_and_resume_finishes_it(store, session, tmp_path):
    """Ctrl-C: exit 130 with one line that says what was kept; the session holds whole chunks and records
    the partial injection; --resume continues it, and the result equals an uninterrupted inject."""
    big = tmp_path / "big.txt"
    big.write_text(TEXT * 20)  # hundreds of 32-token chunks: seconds of work on the tiny model
    assert mplus("session", "fork", session, "reference", "--store", store).exit_code == 0
    command = [sys.executable, "-m", "mplus_cli", "inject", str(big), "-s", session, "--store", str(store)]
    proc = subprocess.Popen([*command, "--chunk-tokens", "32"], stderr=subprocess.PIPE, text=True)
    assert "untrained" in proc.stderr.readline()  # the model is loaded: the command is running
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "--resume" in err
    partial = json.loads(mplus("session", "show", session, "--store", store, "--json").stdout)["partial"]
    assert 0 < partial["chunks_done"] < partial["chunks_total"] and f"keeps {partial['chunks_done']} of" in err

    again = mplus("inject", big, "-s", session, "--store", store, "--chunk-tokens", 32)
    assert again.exit_code == 4 and "--resume" in again.stderr  # it would inject the first chunks twice
    resumed = json.loads(
        mplus("inject", big, "-s", session, "--store", store, "--chunk-tokens", 32, "--resume", "--json").stdout
    )
    assert resumed["chunks"] == partial["chunks_total"] - partial["chunks_done"]
    whole = mplus("inject", big, "-s", "reference", "--store", store, "--chunk-tokens", 32)
    assert whole.exit_code == 0
    lm = mp.load("tiny")
    a, b = (st.Session.open(store, name).load_state(lm.initial_state) for name in (session, "reference"))
    assert torch.equal(a.memory, b.memory) and a.tokens_injected == b.tokens_injected
    shown = json.loads(mplus("session", "show", session, "--store", store, "--json").stdout)
    assert shown["partial"] is None and shown["log"][-1]["resumed"] is True
    skipped = mplus("inject", big, "-s", session, "--store", store, "--chunk-tokens", 32, "--resume", "--json")
    assert skipped.exit_code == 0 and json.loads(skipped.stdout)["chunks"] == 0  # already injected: nothing to do


def test_ask_answers_several_questions_in_one_process(store, session, tmp_path):
    args = ["-s", session, "--store", store, "--max-new-tokens", 3, "--json"]
    one = [json.loads(mplus("ask", q, *args).stdout)["answer"] for q in ("Where?", "Who?")]
    both = json.loads(mplus("ask", "Where?", "Who?", *args).stdout)
    assert [a["answer"] for a in both["answers"]] == one  # the cached memory keys/values change nothing
    questions = tmp_path / "q.txt"
    questions.write_text("Where?\n\nWho?\n")
    from_file = json.loads(mplus("ask", "--questions", questions, *args).stdout)
    from_stdin = json.loads(mplus("ask", *args, input="Where?\nWho?\n").stdout)
    assert [a["answer"] for a in from_file["answers"]] == [a["answer"] for a in from_stdin["answers"]] == one
    plain = mplus("ask", "Where?", "Who?", "-s", session, "--store", store, "--max-new-tokens", 3)
    assert plain.stdout.count("Q: ") == 2 and plain.stdout.count("A: ") == 2


def test_the_storage_dtype_is_chosen_for_a_new_session_and_kept(store, text_file):
    args = ["-s", "h", "--store", store]
    assert mplus("inject", text_file, *args, "--dtype", "bfloat16").exit_code == 0
    shown = json.loads(mplus("session", "show", "h", "--store", store, "--json").stdout)
    assert shown["memory"]["dtype"] == "bfloat16"
    written = shown["chunks"] * 2 * 16 * 64  # each chunk writes K = 16 rows of 64 values per layer (2 layers)
    assert (store / "h" / st.format.ROWS).stat().st_size == written * 2  # bfloat16: 2 bytes per value
    assert mplus("inject", text_file, *args, "--dtype", "float32").exit_code == 4
    assert mplus("inject", text_file, *args, "--dtype", "int8").exit_code == 2
    assert mplus("inject", text_file, *args, "--seed", "5").exit_code == 4  # another seed is not silently dropped
    assert mplus("ask", "Where?", *args, "--max-new-tokens", 2).exit_code == 0


def test_a_session_injected_from_python_resumes_and_explains_like_one_injected_by_the_cli(store, tmp_path):
    """The library's inject (what `mplus inject` calls) writes the same log: a Python run stopped part-way
    is finished by `mplus inject --resume`, which skips what Python injected whole; the memory equals one
    `mplus inject` of both files, and --explain names the sources."""
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text(TEXT)
    second.write_text(TEXT.replace("Alice", "Bob") * 4)
    lm = mp.load("tiny")
    sources = [plan_source(str(p), p, lm.tokenizer, 32) for p in (first, second)]
    session = st.Session.create(store, "py", lm.initial_state, st.binding(lm, "tiny"), 0, torch.float32)
    run, done = st.InjectRun(store, "py"), []

    def stop_in_the_second(source) -> None:
        done.append(source.name)
        if done.count(str(second)) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), session.writer() as writer:
        skips = st.resume_plan(writer.session, sources, False, 32)
        st.inject_sources(writer, lm, sources, skips, 32, run, stop_in_the_second)
    assert st.Session.open(store, "py").partial["chunks_done"] == 2

    resumed = mplus("inject", first, second, "-s", "py", "--store", store, "--chunk-tokens", 32, "--resume", "--json")
    assert resumed.exit_code == 0, resumed.output
    assert "first.txt: already injected" in resumed.stderr and "second.txt: resuming after chunk 2" in resumed.stderr
    whole = mplus("inject", first, second, "-s", "cli", "--store", store, "--model", "tiny", "--chunk-tokens", 32)
    assert whole.exit_code == 0, whole.output
    a, b = (st.Session.open(store, name).load_state(lm.initial_state) for name in ("py", "cli"))
    assert torch.equal(a.memory, b.memory) and a.tokens_injected == b.tokens_injected
    log = json.loads(mplus("session", "show", "py", "--store", store, "--json").stdout)["log"]
    assert [Path(entry["source"]).name for entry in log] == ["first.txt", "second.txt"] and log[1]["resumed"]
    explained = mplus("ask", "Where is the key?", "-s", "py", "--store", store, "--explain", "--max-new-tokens", 2)
    assert explained.exit_code == 0, explained.output
    assert "second.txt" in explained.stdout + explained.stderr
