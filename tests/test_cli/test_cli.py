"""The command-line skeleton."""

from __future__ import annotations

from conftest import FIXTURES
from typer.testing import CliRunner

from mplus_cli.app import app

runner = CliRunner()


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("inject", "ask", "export", "session", "bench", "parity"):
        assert command in result.output


def test_parity_command_replays_a_fixture():
    result = runner.invoke(app, ["parity", str(FIXTURES / "memoryllm")])
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output
