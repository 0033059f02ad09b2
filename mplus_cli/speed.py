"""`mplus bench speed`: a thin command over `tasks.speed` that prints its figures as a table or JSON."""

from __future__ import annotations

import time
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.table import Table

import model as mp
from tasks import speed as sp

from .common import JsonOpt, emit, handle_errors, say
from .errors import MplusError, NotFoundError, UsageError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_rows(text: str) -> tuple[int, ...]:
    try:
        rows = tuple(int(part) for part in text.split(","))
    except ValueError:
        rows = ()
    if len(rows) < 2 or min(rows) < 1:
        raise UsageError(f"--ltm-rows {text!r}: give two or more positive row counts, e.g. 10000,40000,150000")
    return rows


def pick_device(device: str) -> torch.device:
    if device not in ("cpu", "cuda"):
        raise UsageError(f"unknown --device {device!r}: use cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here (use --device cpu)")
    return torch.device(device)


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


def show(value: float, unit: str) -> str:
    """A value in its unit, scaled for reading."""
    if unit == "tok/s":
        return f"{value:,.0f} tok/s" if value >= 100 else f"{value:.1f} tok/s"
    if unit == "B":
        for scale, name in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
            if value >= scale:
                return f"{value / scale:.2f} {name}"
        return f"{value:.0f} B"
    for scale, name in ((1, "s"), (1e-3, "ms")):
        if value >= scale:
            return f"{value / scale:.3g} {name}"
    return f"{value * 1e6:.0f} µs"


def table(report: sp.Report) -> Table:
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
            f.name, show(f.optimized, f.unit), show(f.baseline, f.unit), f"{f.ratio:.2f}x", f.target_text(), verdict
        )
    return out


@handle_errors
def speed(
    model: Annotated[str | None, typer.Option("--model", "-m", help="Benchmark this preset or checkpoint.")] = None,
    shape: Annotated[
        str, typer.Option(help="Random models: tiny | small (CPU) | 8b (GPU); with --model, the workload sizes.")
    ] = "small",
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    dtype: Annotated[
        str | None, typer.Option(help="float32 | bfloat16 | float16 (default: bfloat16 on cuda, float32 on cpu).")
    ] = None,
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs per figure (the median is reported).")] = 3,
    threads: Annotated[
        int | None, typer.Option(min=1, help="CPU threads for torch (default: torch's choice, one per core).")
    ] = None,
    ltm_rows: Annotated[
        str | None,
        typer.Option(
            help="M+ LTM sizes per layer, comma-separated (default: per shape; small, 8b: 10000,40000,150000)."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Inject and ask throughput, LTM retrieval and session-store costs, each next to its baseline."""
    if shape not in sp.SHAPES:
        raise UsageError(f"unknown --shape {shape!r}: use {', '.join(sp.SHAPES)}")
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"unknown --dtype {dtype!r}: use {', '.join(DTYPES)}")
    rows = parse_rows(ltm_rows) if ltm_rows else None
    target = pick_device(device)
    if threads is not None:
        torch.set_num_threads(threads)
    models = load_models(model, shape, target, DTYPES[dtype] if dtype else mp.default_dtype(target))
    start = time.perf_counter()
    report = sp.run(
        models, sp.SHAPES[shape], repeats, rows, log=lambda m: say(f"[{time.perf_counter() - start:4.0f} s] {m}")
    )
    if as_json:
        emit(report.to_dict())
    else:
        console = Console()
        if not console.is_terminal:  # piped: keep one figure per line
            console.width = 160
        console.print(table(report))
