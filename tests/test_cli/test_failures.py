"""Every failure a user can cause or meet: one line that says what happened and what to do, the documented
exit code, no exception class name, and every stored session as it was (the README's reliability table)."""

from __future__ import annotations

import errno
import hashlib
import json
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from model import store as st
from model.store.files import digest
from model.store.format import canonical
from mplus_cli.app import app

runner = CliRunner()
TEXT = "The ferry to the island leaves at seven from the north pier, and the ticket office opens at six. " * 20


def mplus(*args: object, input: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def one_line(stderr: str) -> str:
    """The error line; there is exactly one, and it names no exception class."""
    lines = [line for line in stderr.strip().splitlines() if not line.startswith("note: ")]
    assert len(lines) == 1 and lines[0].startswith("mplus: error: "), stderr
    assert not any(word in lines[0] for word in ("Error:", "Exception", "Traceback", "Errno")), lines[0]
    return lines[0]


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


@pytest.fixture
def store(tmp_path) -> Path:
    text = tmp_path / "notes.txt"
    text.write_text(TEXT)
    root = tmp_path / "store"
    result = mplus("inject", text, "-s", "s", "--store", root, "--model", "tiny-mplus", "--chunk-tokens", "64")
    assert result.exit_code == 0, result.output
    return root


def test_disk_full_mid_inject_says_what_the_session_kept_and_resume_finishes_it(store, tmp_path, monkeypatch):
    more = tmp_path / "more.txt"
    more.write_text(TEXT.replace("ferry", "boat") * 3)
    append, calls = st.session.append_after, []

    def full_after_one_commit(path, committed, data):
        if Path(path).name == st.format.ROWS:
            calls.append(path)
        if len(calls) == 2:  # the second chunk's rows find the disk full
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return append(path, committed, data)

    monkeypatch.setattr(st.session, "append_after", full_after_one_commit)
    result = mplus("inject", more, "-s", "s", "--store", store, "--chunk-tokens", "64")
    line = one_line(result.stderr)
    assert result.exit_code == 1 and "No space left on device" in line and "keeps 1 of" in line and "--resume" in line
    monkeypatch.setattr(st.session, "append_after", append)
    assert mplus("session", "check", "s", "--store", store).exit_code == 0
    resumed = mplus("inject", more, "-s", "s", "--store", store, "--chunk-tokens", "64", "--resume")
    assert resumed.exit_code == 0 and "resuming after chunk 1" in resumed.stderr, resumed.output


def test_a_file_size_limit_mid_inject_is_one_line_and_the_session_verifies(store, tmp_path):
    more = tmp_path / "more.txt"
    more.write_text(TEXT * 8)
    session = st.Session.open(store, "s")
    rows, commits = (store / "s" / st.format.ROWS).stat().st_size, session.manifest["commit"]
    limit = rows + rows * 3 // (2 * commits)  # room for one more chunk's rows, not two

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    command = [sys.executable, "-m", "mplus_cli", "inject", str(more), "-s", "s", "--store", str(store)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, preexec_fn=limited)
    line = one_line(proc.stderr)
    assert proc.returncode == 1 and "File too large" in line and "keeps 1 of" in line and "--resume" in line, line
    assert mplus("session", "check", "s", "--store", store).exit_code == 0


@pytest.mark.parametrize(
    "command", [["session", "ls"], ["inject", "notes.txt", "-s", "s"], ["ask", "Where?", "-s", "s"]]
)
def test_a_store_that_is_a_file_is_a_usage_error(tmp_path, command):
    (tmp_path / "notes.txt").write_text(TEXT)
    path = tmp_path / "a-file"
    path.write_text("not a store")
    args = [tmp_path / c if c == "notes.txt" else c for c in command]
    result = mplus(*args, "--store", path)
    assert result.exit_code == 2 and "is a file, not a directory" in one_line(result.stderr)
    assert path.read_text() == "not a store"


@pytest.mark.parametrize(
    "content, code, says",
    [(b"\xff\xfe\x00binary", 1, "is not UTF-8 text"), (None, 2, "is a directory")],
)
def test_a_questions_file_that_is_not_text_is_one_line(store, tmp_path, content, code, says):
    path = tmp_path / "questions"
    path.mkdir() if content is None else path.write_bytes(content)
    before = snapshot(store)
    result = mplus("ask", "-s", "s", "--store", store, "--questions", path)
    assert result.exit_code == code and says in one_line(result.stderr)
    assert snapshot(store) == before


def test_a_device_file_that_cannot_be_read_is_one_line(store):
    before = snapshot(store)
    result = mplus("inject", "/proc/self/mem", "-s", "s", "--store", store)
    assert result.exit_code == 1 and "cannot read /proc/self/mem" in one_line(result.stderr)
    assert snapshot(store) == before


def test_a_temperature_that_is_not_a_number_is_a_usage_error(store):
    result = mplus("ask", "Where?", "-s", "s", "--store", store, "--sample", "--temperature", "nan")
    assert result.exit_code == 2 and "nan is not a number" in result.output


@pytest.mark.parametrize(
    "field, value",
    [
        ("commit", "x"),
        ("dtype", "int8"),
        ("state", None),
        ("model", "tiny"),
        ("seed", -1),
        ("index", "../other/index-000001.safetensors"),
        ("index", "/etc/passwd"),
        ("partial", {"source": "a"}),
        ("rows", {"base": 0, "count": -5, "width": 8}),
    ],
)
def test_a_manifest_field_of_the_wrong_type_or_range_is_damage_for_every_command(store, tmp_path, field, value):
    """The checksum recomputed (it is unkeyed): check, ask and inject all exit 1 naming the field; nothing
    written, nothing outside the session read."""
    path = store / "s" / st.format.MANIFEST
    manifest = json.loads(path.read_text())
    body = {key: val for key, val in manifest.items() if key != "checksum"} | {field: value}
    path.write_text(json.dumps(body | {"checksum": digest(canonical(body))}))
    (tmp_path / "more.txt").write_text(TEXT)
    before = snapshot(store)
    for command in (
        ["session", "check", "s"],
        ["ask", "Where?", "-s", "s"],
        ["inject", tmp_path / "more.txt", "-s", "s"],
    ):
        result = mplus(*command, "--store", store)
        line = result.stderr if command[0] == "session" else one_line(result.stderr)  # check: a report, then the error
        assert result.exit_code == 1 and "damaged" in line and field in line, (command, line)
    assert snapshot(store) == before
