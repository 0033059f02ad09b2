"""The root of the `mplus` command line, light enough for `mplus --help` to import no torch: the global
options, one-line usage errors, and the commands by name, each imported only when it runs or shows its own
help."""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator
from typing import Any

import typer
from typer.core import TyperGroup

from .clicklib import click_errors, make_default_short_help
from .errors import EXIT_INTERRUPTED, EXIT_USAGE

GLOBAL_FLAGS = ("--debug", "--json")  # accepted before or after the command's name
OPTION_ALIASES = {"--out": "--output", "--output-path": "--output"}  # old spellings, kept out of the help
COMMANDS = {  # name: (module, its Typer app or command function, its help's first line: a test keeps them equal)
    "inject": (
        "mplus_cli.commands.inject",
        "inject",
        "Inject text into a session's memory (the session is created on first use, bound to its model).",
    ),
    "ask": (
        "mplus_cli.commands.ask",
        "ask",
        "Answer questions from a session's memory, streamed to stdout (the session is not changed).",
    ),
    "export": (
        "mplus_cli.commands.export",
        "export",
        "Export a session's memory (one safetensors file) or a knowledge-injected checkpoint directory.",
    ),
    "models": (
        "mplus_cli.commands.models",
        "models",
        "List the models --model takes by name, and their copies on this machine (never the network).",
    ),
    "parity": (
        "mplus_cli.commands.parity",
        "parity",
        "Replay reference outputs of the authors' code and compare every tensor (exit 1 on any mismatch).",
    ),
    "serve": (
        "mplus_cli.commands.serve",
        "serve",
        "Serve a session's memory over HTTP as an OpenAI-compatible API (on localhost unless told otherwise).",
    ),
    "session": ("mplus_cli.commands.session", "session_app", "List, show, check, remove and fork stored sessions."),
    "bench": ("mplus_cli.commands.bench", "bench_app", "Retention, LongBench, editing, integrity, perplexity, speed."),
}


def say(message: str) -> None:
    """A line on stderr (stdout stays for answers and JSON)."""
    print(message, file=sys.stderr, flush=True)


def load_command(name: str) -> Any:
    """The click command of `name`, built from its module (imported now)."""
    module, attribute, _ = COMMANDS[name]
    target = getattr(importlib.import_module(module), attribute)
    if not isinstance(target, typer.Typer):
        target, function = typer.Typer(rich_markup_mode=None, add_completion=False), target
        target.command(name=name)(function)
    command = typer.main.get_command(target)
    command.name = name
    return command


class MplusGroup(TyperGroup):
    """The root command. Click's usage errors in any command (a bad option value, an unknown option, a missing
    argument) print one line and exit 2; an aborted prompt, and Ctrl-C outside a command's own handler, print
    one line and exit 130. The command line is read `normalized` first. Its commands load on first use."""

    def list_commands(self, ctx: typer.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: typer.Context, name: str) -> Any:
        if name not in self.commands and name in COMMANDS:
            self.commands[name] = load_command(name)
        return self.commands.get(name)

    def format_commands(self, ctx: typer.Context, formatter: Any) -> None:
        """The command list from COMMANDS, loading none of them."""
        limit = formatter.width - 6 - max(map(len, COMMANDS))
        rows = [(name, make_default_short_help(help, limit)) for name, (_, _, help) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def make_context(self, info_name: str | None, args: list[str], parent: typer.Context | None = None, **extra):
        with one_line_errors():
            return super().make_context(info_name, normalized(args), parent, **extra)

    def invoke(self, ctx: typer.Context) -> Any:
        with one_line_errors():
            return super().invoke(ctx)


def normalized(args: list[str]) -> list[str]:
    """The command line as click reads it: --debug and --json moved to the front (the root takes them, wherever
    they were given), the old spellings of --output renamed. Nothing after `--` is touched."""
    end = args.index("--") if "--" in args else len(args)
    head, flags, renamed = args[:end], [], []
    for arg in head:
        name, equals, value = arg.partition("=")
        if arg in GLOBAL_FLAGS:
            flags += [] if arg in flags else [arg]
        else:
            renamed.append(OPTION_ALIASES[name] + equals + value if name in OPTION_ALIASES else arg)
    return [*flags, *renamed, *args[end:]]


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    try:
        yield
    except getattr(click_errors, "NoArgsIsHelpError", ()):  # click >= 8.2
        raise  # `mplus` or `mplus session` alone: the help
    except click_errors.UsageError as e:
        say(f"mplus: error: {usage_line(e)}")
        raise typer.Exit(EXIT_USAGE) from None
    except typer.Abort:
        say("mplus: aborted")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except KeyboardInterrupt:
        say("mplus: interrupted")
        raise typer.Exit(EXIT_INTERRUPTED) from None


def usage_line(error: click_errors.UsageError) -> str:
    """Click's message on one line, and where the command's help is."""
    message = " ".join(error.format_message().replace("Value error, ", "").split()).rstrip(".")  # typer >= 0.2x
    command = error.ctx.command_path if error.ctx is not None else "mplus"
    return f"{message[:1].lower()}{message[1:]} (see {command} --help)"
