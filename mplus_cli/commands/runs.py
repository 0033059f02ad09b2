"""What every benchmark run shares: its errors, its --output / --resume / --shard, its shard and output
directory, the versions and models it records (a resumed run must find the same models), its config on
resume and how a sharded run finishes."""

from __future__ import annotations

import fcntl
import json
import os
import platform
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from model.systems import factory_of
from tasks import data as qa
from tasks import results as res
from tasks.launch import SLURM, TORCHRUN, Launch, barrier, detect
from tasks.merge import Finished, MergeConflict, MergeError, merge_runs
from tasks.plan import parse_shard

from ..devices import pick_device
from ..errors import ConflictError, MplusError, NotFoundError, UsageError
from ..root import say

if TYPE_CHECKING:
    import torch

    import model as mp

PACKAGES = ("mplus", "torch", "transformers", "tokenizers", "datasets", "numpy", "pandas", "matplotlib")
LAUNCHERS = {TORCHRUN: "torchrun processes", SLURM: "Slurm array tasks"}
RunDirOpt = Annotated[Path, typer.Option("--output", "-o", help="Output directory.")]
RunResumeOpt = Annotated[bool, typer.Option(help="Continue the run in the output directory, skipping what it did.")]
RunShardOpt = Annotated[
    str | None, typer.Option(help="Run only the i-th of n contiguous slices of the work, e.g. 2/4.")
]


@contextmanager
def task_errors() -> Iterator[None]:
    """The library's errors as the CLI's one-line errors and exit codes."""
    try:
        yield
    except FileNotFoundError as e:
        raise NotFoundError(str(e)) from e
    except qa.DataError as e:
        raise MplusError(str(e)) from e
    except res.ResumeError as e:
        raise ConflictError(f"{e}: choose another --output") from e
    except MergeConflict as e:
        raise ConflictError(str(e)) from e
    except MergeError as e:
        raise UsageError(str(e)) from e


def check_systems(specs: list[str]) -> None:
    """--system specs that name known systems, each given once (their parameters are checked once a model is
    loaded: a system's defaults may depend on the model)."""
    for spec in specs:
        factory_of(spec)
    if len(set(specs)) < len(specs):
        raise ValueError("a --system is given twice")


def versions() -> dict[str, str | None]:
    found = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def merged_config(
    path: Path, config: dict[str, Any], keys: tuple[str, ...] = ("models", "controls", "systems")
) -> dict[str, Any]:
    """This run's config; on resume it keeps the creation time, the model details and what the run before
    listed under `keys` (the models, controls and systems it ran)."""
    if not path.exists():
        return config
    old = json.loads(path.read_text())
    union = {k: old.get(k, []) + [v for v in config[k] if v not in old.get(k, [])] for k in keys}
    return (
        config
        | union
        | {"created": old.get("created", config["created"]), "model_details": old.get("model_details", {})}
    )


def pick_shard(shard: str | None) -> tuple[Launch, int, int]:
    """The launch and this process's shard: the launcher's (torchrun, a Slurm array), else --shard's, else 1/1."""
    launch = detect()
    if not launch.launcher:
        return (launch, *parse_shard(shard or "1/1"))
    if shard is not None:
        raise ValueError(f"--shard conflicts with {LAUNCHERS[launch.launcher]}, which shard the run: drop --shard")
    return launch, launch.index, launch.count


def shard_run(
    shard: str | None, out: Path, device: str, resume: bool
) -> tuple[Launch, tuple[int, int], Path, torch.device]:
    """A benchmark's launch, this process's shard (i, n), the directory it writes (OUT, or its shard's under a
    launcher) and its device; a usage error for a bad --shard, a conflict for a directory that holds
    results without --resume."""
    try:
        launch, i, n = pick_shard(shard)
    except ValueError as e:
        raise UsageError(str(e)) from None
    run_dir = launch.directory(out)
    if res.holds_results(run_dir / "results.csv") and not resume:
        raise ConflictError(f"{run_dir} already holds results: pass --resume to continue them or choose another -o")
    return launch, (i, n), run_dir, pick_device(device, launch.local_rank)


@contextmanager
def writing_into(directory: Path) -> Iterator[None]:
    """The run directory, held by this process alone (an flock on the directory itself, which leaves no file):
    a second run into it (another --shard given the same --output) is refused instead of writing the same
    results.csv and cache files. A directory this run created and left empty is removed when it fails."""
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConflictError(
                f"{directory} is busy: another run is writing into it; wait for it or choose another --output"
            ) from None
        yield
    except BaseException:
        if created and not any(directory.iterdir()):
            directory.rmdir()
        raise
    finally:
        os.close(fd)


def finish_shards(
    launch: Launch, out: Path, device: torch.device, config: dict[str, Any], finish: Callable[[Path, dict], Finished]
) -> Finished | None:
    """`finish(directory, finished config)` of this process's run. Under torchrun every rank marks its shard
    finished and waits at the barrier; rank 0 then merges the shards into `out` (finishing the whole run) and
    the other ranks say so and return None."""
    finished = config | {"finished": res.now()}
    if not launch.group:
        return finish(launch.directory(out), finished)
    res.write_config(launch.directory(out) / "config.json", finished)
    barrier(launch, device)
    if not launch.merges:
        shard = f"shard {launch.index}/{launch.count}"
        say(f"wrote {launch.directory(out)}/results.csv ({shard}); rank 0 merges the shards into {out}")
        return None
    return merge_runs(launch.directories(out), out, force=True, finish=finish)[0]


def model_identity(lm: mp.MemoryLLM, chat: bool) -> dict[str, Any]:
    """What a run records of a model that a resumed run must find again (see `check_same_model`): its label, its
    config's fingerprint, whether it is asked in its chat template and how its answers are read."""
    identity = {"label": lm.info.label, "fingerprint": lm.cfg.fingerprint(), "chat": chat}
    return identity | ({"answer_reading": reading} if (reading := lm.answer_reading()) else {})


def check_same_model(before: dict[str, Any] | None, details: dict[str, Any], name: str, out: Path) -> None:
    """Refuse to add answers of model `name` (its `details`) to the run in `out` whose answers of it (`before`, its
    details there) came from another model: another config, another way of reading its answers, another chat
    choice."""
    if not before:
        return
    if before.get("fingerprint", details["fingerprint"]) != details["fingerprint"]:
        raise ConflictError(f"{out} holds results of another {name!r} (config {before['fingerprint']})")
    if before.get("answer_reading") != details.get("answer_reading"):
        then = before.get("answer_reading") or "no answer bias"
        raise ConflictError(f"{out} holds answers of {name!r} read another way ({then}): write to a new --output")
    if before.get("chat", details["chat"]) != details["chat"]:
        asked = "with" if before["chat"] else "without"
        raise ConflictError(f"{out} holds results of {name!r} asked {asked} a chat template: use its tokenizer")
