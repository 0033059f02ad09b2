"""`mplus bench speed`: a thin command over `tasks.speed` and `tasks.scale` that prints their figures as a table or
JSON."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.table import Table

import model as mp
from tasks import children, scale_store
from tasks import scale as sc
from tasks import speed as sp
from tasks.figures import Figure, Report, show
from tasks.sizes import format_size, parse_size
from tasks.timing import machine_info

from ..common import handle_errors, json_output
from ..devices import dtype_option, pick_device
from ..errors import MplusError, NotFoundError, UsageError
from ..models import load_model
from ..options import DeviceOpt, DtypeOpt
from ..output import emit
from ..root import say

MAX_LTM_ROWS = 1_000_000  # per layer (the 8b shape's default sweep ends at 150000)
MAX_SESSION_TOKENS = 10_000_000  # the sessions group grows one session through these sizes
MAX_INTERRUPT_BYTES = 1_000_000_000  # the big text whose inject is interrupted is written to disk first
GROUPS = ("core", "sessions", "cold", "store")
GROUPS_HELP = (
    "Figure groups, comma-separated, or all: core (this process: inject, ask, LTM retrieval, session store), "
    "sessions (`mplus inject` / `mplus ask` processes on sessions at scale), cold (a question in a fresh process, "
    "the random MemoryLLM of --shape), store (a session at the M+ shapes of --shape, without weights). "
    "Default: core,cold (core alone for --shape 8b on the CPU)."
)


def parse_rows(text: str) -> tuple[int, ...]:
    try:
        rows = tuple(int(part) for part in text.split(","))
    except ValueError:
        rows = ()
    if len(rows) < 2 or min(rows) < 1 or max(rows) > MAX_LTM_ROWS:
        raise UsageError(
            f"--ltm-rows {text!r}: give two or more row counts from 1 to {MAX_LTM_ROWS}, e.g. 10000,40000,150000"
        )
    return rows


def load_models(model: str | None, shape: str, device: torch.device, dtype: torch.dtype) -> list[mp.MemoryLLM]:
    """The loaded model `model`, or both random flavours of `shape`."""
    where = f"{device}, {str(dtype).removeprefix('torch.')}"
    if model is None:
        if shape == "8b" and device.type == "cpu":
            raise UsageError("--shape 8b is sized for a GPU: add --device cuda, or use --shape small on a CPU")
        say(f"building random {shape} models ({where})")
        return sp.shape_models(sp.SHAPES[shape], device, dtype)
    say(f"loading {model} ({where})")
    try:
        return [mp.load(model, dtype=dtype, device=device, tokenizer=False)]
    except FileNotFoundError as e:
        raise NotFoundError(str(e)) from e
    except (mp.CheckpointError, OSError, ValueError) as e:
        raise MplusError(f"cannot load model {model!r}: {e}") from e


def table(report: Report) -> Table:
    """The figures, with the machine they were measured on as the caption."""
    m = report.machine
    hardware = (f"{m['gpu']}, " if m["gpu"] else "") + f"{m['cpu']}, {m['cpu_cores']} cores"
    caption = f"{hardware}; torch {m['torch']}, {m['torch_threads']} threads, {m['device']} {m['dtype']}"
    caption += f"; {report.elapsed_s:.0f} s"
    out = Table(title="mplus bench speed", caption=caption)
    for column in ("figure", "optimized", "baseline", "ratio", "target", ""):
        out.add_column(column, justify="left" if column == "figure" else "right")
    for f in report.figures:
        verdict = {True: "[green]pass[/]", False: "[red]FAIL[/]", None: ""}[f.passed]
        out.add_row(
            f.name, show(f.optimized, f.unit), show(f.baseline, f.unit), ratio_text(f), f.target_text(), verdict
        )
    return out


def ratio_text(figure: Figure) -> str:
    """The ratio column: the ratio, or for an "increase" figure the increase itself."""
    if figure.compare == "increase":
        return f"{'+' if figure.increase >= 0 else '-'}{show(abs(figure.increase), figure.unit)}"
    return f"{figure.ratio:.2f}x"


def parse_groups(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["all"]:
        return list(GROUPS)
    if not names or any(name not in GROUPS for name in names):
        raise UsageError(f"--groups {text!r}: use one or more of {', '.join(GROUPS)} (comma-separated), or all")
    return [name for name in GROUPS if name in names]


def parse_sizes(option: str, text: str, example: str, most: int, count: int | None = None) -> tuple[int, ...]:
    """Increasing sizes such as '10k,40k' -> (10000, 40000), at most `most`: two or more, or exactly `count`."""
    try:
        sizes = tuple(parse_size(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) < 2 or len(sizes) != (count or len(sizes)) or min(sizes) < 1 or list(sizes) != sorted(set(sizes)):
        raise UsageError(f"{option} {text!r}: give {count or 'two or more'} increasing sizes, e.g. {example}")
    if sizes[-1] > most:
        raise UsageError(f"{option} {text!r}: {format_size(sizes[-1])} is beyond the limit of {format_size(most)}")
    return sizes


@handle_errors
def speed(
    model: Annotated[str | None, typer.Option("--model", "-m", help="Benchmark this preset or checkpoint.")] = None,
    shape: Annotated[
        sp.ShapeName,
        typer.Option(help="Random models: tiny, small (CPU) or 8b (GPU); with --model, the workload sizes."),
    ] = "small",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    repeats: Annotated[
        int,
        typer.Option(
            min=1, max=1000, help="Timed runs per figure, or fresh processes per way (the median is reported)."
        ),
    ] = 3,
    threads: Annotated[
        int | None,
        typer.Option(
            min=1, max=1024, help="CPU threads for torch, here and in child processes (default: one per core)."
        ),
    ] = None,
    ltm_rows: Annotated[
        str | None,
        typer.Option(
            help="M+ LTM sizes per layer, comma-separated (default: per shape; small, 8b: 10000,40000,150000)."
        ),
    ] = None,
    groups: Annotated[str | None, typer.Option(help=GROUPS_HELP, show_default=False)] = None,
    session_model: Annotated[str, typer.Option(help="sessions: the sessions' model.")] = "tiny-free-mplus",
    session_tokens: Annotated[
        str, typer.Option(help="sessions: the sizes (tokens) one session is grown through, one inject each.")
    ] = "10k,40k,160k,200k",
    interrupt_bytes: Annotated[
        str, typer.Option(help="sessions: the sizes of the two texts whose inject is interrupted: baseline,measured.")
    ] = "200k,20M",
) -> None:
    """Inject and ask throughput, LTM retrieval and session-store costs, each next to its baseline.

    \b
    Figure groups (--groups, comma-separated, or all):
    - core (default): in this process, on the random models of --shape or --model
    - sessions: `mplus inject` / `mplus ask` processes on a session grown through
      --session-tokens (disk, peak RSS, inject and ask time vs a smaller session),
      and an inject of a big text interrupted with Ctrl-C (--interrupt-bytes)
    - cold (default): open a session and answer one token in a fresh process,
      what `mplus ask` pays first, vs MemoryState.load (the random MemoryLLM of
      --shape; --repeats processes)
    - store: the session store at the M+ shapes of --shape (8b: mplus-8b's)
      without weights: one session grown by the M+ update of zero rows through
      LTMs of --ltm-rows rows per layer or more (whole merges; 8b: ~3 min)

    \b
    Examples: mplus bench speed --groups sessions,cold --threads 1
              mplus bench speed --groups store --shape 8b --threads 1
    """
    as_json = json_output()
    options = check_options(groups, shape, device, dtype, ltm_rows, session_tokens, interrupt_bytes)
    if threads is not None:
        torch.set_num_threads(threads)
    start = time.perf_counter()

    def log(message: str) -> None:
        say(f"[{time.perf_counter() - start:4.0f} s] {message}")

    if "core" in options.groups:
        models = load_models(model, shape, options.device, options.dtype)
        report = sp.run(models, options.shape, repeats, options.ltm_rows, log=log)
    else:
        report = Report(machine_info(options.device, options.dtype), {})
    report.setup["groups"] = options.groups
    try:
        report.figures += scale_figures(options, report.setup, repeats, threads, session_model, log)
    except children.ChildFailed as e:
        raise MplusError(str(e)) from e
    report.elapsed_s = time.perf_counter() - start
    print_report(report, as_json)


@dataclass(frozen=True)
class Options:
    """The options of one run, checked."""

    groups: list[str]
    shape: sp.Shape
    device: torch.device
    dtype: torch.dtype
    ltm_rows: tuple[int, ...] | None
    session_tokens: tuple[int, ...]
    interrupt_bytes: tuple[int, ...]


def check_options(
    groups: str | None,
    shape: str,
    device: str,
    dtype: str | None,
    ltm_rows: str | None,
    session_tokens: str,
    interrupt_bytes: str,
) -> Options:
    """The options parsed, or a UsageError for the first bad one."""
    chosen = parse_groups(groups or ("core" if shape == "8b" and pick_device(device).type == "cpu" else "core,cold"))
    rows = parse_rows(ltm_rows) if ltm_rows else None
    tokens = parse_sizes("--session-tokens", session_tokens, "10k,40k,160k,200k", most=MAX_SESSION_TOKENS)
    cut = parse_sizes("--interrupt-bytes", interrupt_bytes, "200k,20M", most=MAX_INTERRUPT_BYTES, count=2)
    target, torch_dtype = pick_device(device), dtype_option(dtype)
    if shape == "8b" and target.type == "cpu" and "cold" in chosen:
        raise UsageError("--groups cold with --shape 8b is sized for a GPU: add --device cuda, or use --shape small")
    return Options(chosen, sp.SHAPES[shape], target, torch_dtype or mp.default_dtype(target), rows, tokens, cut)


def scale_figures(
    options: Options,
    setup: dict[str, Any],
    repeats: int,
    threads: int | None,
    session_model: str,
    log: Callable[[str], None],
) -> list[Figure]:
    """The figures of the sessions, cold and store groups chosen (tasks.scale), each group's setup put in `setup`."""
    figures, shape = [], options.shape
    if "sessions" in options.groups:
        tokenizer = load_model(session_model).tokenizer
        tokens, cut = options.session_tokens, options.interrupt_bytes
        setup["sessions"] = {"model": session_model, "tokens": tokens, "interrupt_bytes": cut}
        figures += sc.session_figures(session_model, tokenizer, tokens, cut, threads=threads, log=log)
    if "cold" in options.groups:
        setup["cold"] = {"shape": shape.name, "processes": repeats, "injects": sc.COLD_INJECTS}
        figures += sc.cold_figures(shape, options.device, options.dtype, repeats, threads=threads, log=log)
    if "store" in options.groups:
        store_rows = options.ltm_rows or shape.ltm_rows
        setup["store"] = {"shape": shape.name, "ltm_rows": store_rows, "processes": repeats}
        figures += scale_store.store_figures(shape, store_rows, repeats, threads=threads, log=log)
    return figures


def print_report(report: Report, as_json: bool) -> None:
    """The report as JSON, or as a table (one figure per line when piped)."""
    if as_json:
        emit(report.to_dict())
        return
    console = Console()
    if not console.is_terminal:  # piped: keep one figure per line
        console.width = 160
    console.print(table(report))
