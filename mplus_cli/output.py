"""What the commands print: counts, sizes and durations in words, aligned columns, one JSON document, and
the one progress bar."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from .root import say


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """'1 chunk', '2 chunks' (`nouns`: an irregular plural)."""
    return f"{count:,} {noun if count == 1 else nouns or noun + 's'}"


def human_bytes(count: int) -> str:
    """Bytes in decimal units: 512 B, 1.5 kB, 23.4 MB, 16.1 GB."""
    for scale, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if count >= scale:
            return f"{count / scale:.3g} {unit}" if count < 100 * scale else f"{count / scale:,.0f} {unit}"
    return f"{count} B"


def human_count(count: int) -> str:
    """A count in short form: 950, 121.6k, 134.5M, 8.068B."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if count >= scale:
            return f"{count / scale:.4g}{unit}"
    return str(count)


def columns(rows: list[list[str]], right: tuple[int, ...] = ()) -> list[str]:
    """Rows of cells as aligned text lines (the columns in `right` right-aligned), never truncated."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    cells = [
        [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        for row in rows
    ]
    return ["  ".join(row).rstrip() for row in cells]


def emit(document: dict[str, Any]) -> None:
    typer.echo(json.dumps(document, indent=1))


def run_written(directory: Path, summary: Any, as_json: bool) -> bool:
    """Under --json the run's summary as one document (True: nothing else to print); else the line that says
    what was written (False: the caller prints its table)."""
    if as_json:
        emit({"output": str(directory), "summary": summary})
        return True
    say(f"wrote {directory}/results.csv, summary.csv and config.json")
    return False


def approx(n: float) -> str:
    """A count to three digits: 512, 1.23k, 160k, 3.2M."""
    for suffix, unit in (("M", 1e6), ("k", 1e3)):
        if n >= unit:
            return f"{n / unit:.3g}{suffix}"
    return f"{n:.0f}"


def duration(seconds: float) -> str:
    """0.4 s, 41 s, 13 min, 2 h 05 min."""
    if seconds < 90:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def progress(show: bool, *counters: Any) -> Any:
    """A rich progress bar on stderr: what it is on, the bar, `counters` (rich progress columns), the time
    left. Transient, and shown only when `show` on a terminal (elsewhere it would leave an empty line)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(bar_width=20), *counters, TimeRemainingColumn())
    return Progress(*columns, console=console, transient=True, disable=not (show and console.is_terminal))


def done_counter() -> Any:
    """A progress column of items done of all ("3/9")."""
    from rich.progress import MofNCompleteColumn

    return MofNCompleteColumn()


def token_counter() -> Any:
    """A progress column of tokens done of planned, and tokens per second."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class Tokens(ProgressColumn):
        def render(self, task) -> Text:
            speed = approx(task.speed) if task.speed else "-"
            return Text(f"{approx(task.completed)}/{approx(task.total or 0)} tokens, {speed} tokens/s")

    return Tokens()
