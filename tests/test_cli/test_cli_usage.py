"""Usage errors in every command: one line on stderr naming the problem, exit 2, and nothing written."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from mplus_cli.app import app
from mplus_cli.root import one_line_errors

runner = CliRunner()
TEXT = "Alice keeps the spare key under the blue flowerpot by the back door. " * 12
# the tiny preset: a context of 4096 positions; an injection follows bos and K = 16 memory rows, and a chunk can
# take a merged tail of up to 15 more tokens; a question follows bos and 128 memory rows
CHUNK_LIMIT = 4096 - 1 - 16 - 15
NEW_TOKENS_LIMIT = 4096 - 1 - 128

# (arguments, what the line says); TEXT_FILE, OUT and STORE stand for paths, "s" is an existing session
BAD = [
    (["inject", "TEXT_FILE", "-s", "new", "--chunk-tokens", "0"], "invalid value for '--chunk-tokens'"),
    (["inject", "TEXT_FILE", "-s", "new", "--chunk-tokens", "15"], "invalid value for '--chunk-tokens'"),
    (
        ["inject", "TEXT_FILE", "-s", "new", "--chunk-tokens", "1000000000000"],
        f"--chunk-tokens 1000000000000 exceeds the model's limit of {CHUNK_LIMIT} tokens per injection",
    ),
    (
        ["inject", "TEXT_FILE", "-s", "s", "--chunk-tokens", str(CHUNK_LIMIT + 1)],
        f"exceeds the model's limit of {CHUNK_LIMIT} tokens per injection",
    ),
    (["inject", "TEXT_FILE", "-s", "new", "--seed", "abc"], "invalid value for '--seed'"),
    (["inject", "TEXT_FILE", "-s", "new", "--seed", "-1"], "invalid value for '--seed'"),
    (["inject", "TEXT_FILE", "-s", "new", "--seed", str(2**63)], "invalid value for '--seed'"),
    (["inject", "TEXT_FILE", "-s", "new", "--bogus"], "no such option: --bogus"),
    (["inject", "-s", "new"], "missing argument"),
    (["inject", "TEXT_FILE"], "missing option '--session'"),
    (["ask", "q", "-s", "s", "--max-new-tokens", "-1"], "invalid value for '--max-new-tokens'"),
    (["ask", "q", "-s", "s", "--max-new-tokens", "0"], "invalid value for '--max-new-tokens'"),
    (
        ["ask", "q", "-s", "s", "--max-new-tokens", str(NEW_TOKENS_LIMIT + 1)],
        f"exceeds the model's limit of {NEW_TOKENS_LIMIT} new tokens",
    ),
    (
        ["ask", "x" * 4000, "-s", "s", "--max-new-tokens", "8"],
        f"a question of 4000 tokens exceeds the model's limit of {NEW_TOKENS_LIMIT - 7} tokens",
    ),
    (["ask", "q", "-s", "s", "--temperature", "nan"], "invalid value for '--temperature'"),
    (["ask", "q", "-s", "s", "--temperature", "inf"], "invalid value for '--temperature'"),
    (["ask", "q", "-s", "s", "--top-p", "1.5"], "invalid value for '--top-p'"),
    (["ask", "q", "-s", "s", "--seed", "abc"], "invalid value for '--seed'"),
    (["ask", "q", "-s"], "option '-s' requires an argument"),
    (["export", "-s", "s"], "missing option '--output'"),
    (["export", "-s", "s", "-o", "OUT", "--bogus"], "no such option: --bogus"),
    (["session", "show"], "missing argument"),
    (["session", "fork", "s"], "missing argument"),
    (["session", "ls", "--bogus"], "no such option: --bogus"),
    (["session", "bogus"], "no such command 'bogus'"),
    (["bench", "retention", "--dataset", "synthetic", "--max-distance", "1k", "--limit", "0"], "'--limit'"),
    (["bench", "retention", "--dataset", "synthetic", "--max-distance", "1k", "--seed", "-1"], "'--seed'"),
    (["bench", "retention", "--dataset", "synthetic", "--max-distance", "99M"], "beyond the limit of 10M tokens"),
    (["bench", "retention", "--dataset", "synthetic"], "missing option '--max-distance'"),
    (["bench", "speed", "--repeats", "0"], "invalid value for '--repeats'"),
    (["bench", "speed", "--threads", "0"], "invalid value for '--threads'"),
    (["bench", "speed", "--threads", "100000"], "invalid value for '--threads'"),
    (["bench", "speed", "--ltm-rows", "10,2000000"], "row counts from 1 to 1000000"),
    (["bench", "speed", "--groups", "sessions", "--session-tokens", "10k,99M"], "beyond the limit of 10M"),
    (["bench", "plot", "OUT"], "missing option '--output'"),
    (["parity"], "missing argument"),
    (["bogus"], "no such command 'bogus'"),
    (["--bogus"], "no such option: --bogus"),
]


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`."""
    files = [p for p in root.rglob("*") if p.is_file()]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture
def store(tmp_path) -> Path:
    text = tmp_path / "notes.txt"
    text.write_text(TEXT)
    result = runner.invoke(app, ["inject", str(text), "-s", "s", "--store", str(tmp_path / "store")])
    assert result.exit_code == 0, result.output
    return tmp_path / "store"


@pytest.mark.parametrize(("args", "says"), BAD, ids=[" ".join(args)[:60] for args, _ in BAD])
def test_a_usage_error_is_one_line_and_exit_2(tmp_path, store, monkeypatch, args, says):
    monkeypatch.chdir(tmp_path)  # where bench retention would write its default output directory
    paths = {"TEXT_FILE": str(tmp_path / "notes.txt"), "OUT": str(tmp_path / "out")}
    args = [paths.get(a, a) for a in args]
    if args[0] in ("inject", "ask", "export", "session"):  # --store right after the command's name
        at = 2 if args[0] == "session" else 1
        args = [*args[:at], "--store", str(store), *args[at:]]
    before, files = snapshot(store), sorted(tmp_path.iterdir())
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mplus: error: ") and says in lines[0], result.stderr
    assert snapshot(store) == before and sorted(tmp_path.iterdir()) == files  # nothing created or changed


def test_the_line_names_the_command_help():
    result = runner.invoke(app, ["session", "rm", "s", "--yes", "--bogus"])
    assert result.stderr == "mplus: error: no such option: --bogus (see mplus session rm --help)\n"


def test_the_console_entry_point_prints_one_line(tmp_path):
    command = [sys.executable, "-m", "mplus_cli", "inject", "x.txt", "-s", "a", "--store", str(tmp_path)]
    proc = subprocess.run([*command, "--chunk-tokens", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("mplus: error: invalid value for '--chunk-tokens': ")
    assert proc.stderr.endswith(" (see mplus inject --help)\n") and not list(tmp_path.iterdir())


def test_an_aborted_prompt_is_one_line_and_exit_130(capsys):
    """`session rm` without --yes asks at a terminal; answering no or Ctrl-C there raises Abort."""
    with pytest.raises(typer.Exit) as stopped, one_line_errors():
        raise typer.Abort()
    assert stopped.value.exit_code == 130 and capsys.readouterr().err == "mplus: aborted\n"
