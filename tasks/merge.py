"""Combine the shard directories of one benchmark run into one run, as if one process had run it all.

Shards are the directories of `bench retention --shard i/n` (or longbench, editing, perplexity), of the
tasks of a Slurm array or of the ranks of torchrun (OUT/shard-<i>-of-<n>). They merge when every shard 1..n
is there once, each finished, with the same settings (all of config.json but the keys in PER_SHARD) and the
same models. results.csv keeps the rows as written, in the order of a one-process run: model by model, and
within a model shard by shard.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from . import results as res
from .plan import parse_shard

PER_SHARD = (
    "shard",
    "output_path",
    "created",
    "finished",
    "device",
    "versions",
    "model_details",
    "launcher",
    "batch_size",
    "merged_from",
)
MODEL_KEYS = ("fingerprint", "chat", "dtype", "answer_reading")  # of each model's details, the same in every shard
Finished = TypeVar("Finished")


class MergeError(Exception):
    """The directories are not the shards of one split: one is missing or given twice (a usage error)."""


class MergeConflict(Exception):
    """The shards ran other settings, one is unfinished, or the output already holds results."""


@dataclass(frozen=True)
class Shard:
    directory: Path
    config: dict[str, Any]
    index: int
    count: int
    columns: list[str]  # results.csv's header
    rows: list[dict[str, str]]  # results.csv as written

    @property
    def name(self) -> str:
        return f"{self.index}/{self.count}"


def read_shard(directory: Path) -> Shard:
    """A finished shard directory: its config.json and the shard it ran."""
    for name in ("config.json", "results.csv"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"no {name} in {directory}: give the output directories of one bench run")
    config = json.loads((directory / "config.json").read_text())
    if "finished" not in config:
        raise MergeConflict(f"{directory} is not finished: complete it with the same bench command and --resume")
    try:
        columns, rows = res.read_rows(directory / "results.csv")
    except res.ResumeError as e:
        raise MergeError(f"{e}: give the output directories of one bench run") from None
    return Shard(directory, config, *parse_shard(config.get("shard", "1/1")), columns, rows)


def check_shards(shards: Sequence[Shard]) -> list[Shard]:
    """The shards in order, once each checked to be all the shards of one run."""
    splits = sorted({s.count for s in shards})
    if len(splits) > 1:
        raise MergeError(f"the directories hold shards of {' and '.join(map(str, splits))}: merge those of one split")
    by_index: dict[int, Shard] = {}
    for shard in shards:
        if shard.index in by_index:
            twice = f"{by_index[shard.index].directory} and {shard.directory}"
            raise MergeError(f"shard {shard.name} is given twice ({twice}): give each shard once")
        by_index[shard.index] = shard
    missing = [f"{i}/{splits[0]}" for i in range(1, splits[0] + 1) if i not in by_index]
    if missing:
        which = f"shard {missing[0]} is" if len(missing) == 1 else f"shards {', '.join(missing)} are"
        raise MergeError(f"{which} missing: add the directories, or run them with --shard i/n")
    ordered = [by_index[i] for i in sorted(by_index)]
    for shard in ordered[1:]:
        changed = settings_diff(ordered[0].config, shard.config)
        if shard.columns != ordered[0].columns:
            changed = f"results.csv columns {ordered[0].columns} there, {shard.columns} here"
        if changed:
            raise MergeConflict(
                f"{shard.directory} ran other settings than {ordered[0].directory} ({changed}): "
                "merge the shards of one run"
            )
    return ordered


def settings_diff(first: dict[str, Any], other: dict[str, Any]) -> str:
    """What differs between two shards' configs beyond PER_SHARD, and their models' MODEL_KEYS ("" if nothing)."""
    keys = [k for k in dict.fromkeys([*first, *other]) if k not in PER_SHARD]
    changed = [f"{k}: {first.get(k)!r} there, {other.get(k)!r} here" for k in keys if first.get(k) != other.get(k)]
    for name in first.get("models", []):
        a, b = (c.get("model_details", {}).get(name, {}) for c in (first, other))
        changed += [f"{name} {k}: {a.get(k)!r} there, {b.get(k)!r} here" for k in MODEL_KEYS if a.get(k) != b.get(k)]
    return "; ".join(changed)


def merged_rows(shards: Sequence[Shard]) -> list[dict[str, str]]:
    """Every shard's rows in one-process order: by model (in the run's order), then by shard."""
    models = dict.fromkeys([*shards[0].config.get("models", []), *(r["model"] for s in shards for r in s.rows)])
    return [r for model in models for s in shards for r in s.rows if r["model"] == model]


def merged_config(shards: Sequence[Shard], out: Path) -> dict[str, Any]:
    """The first shard's config as a whole run's: shard 1/1 in `out`, created when the first shard was, on the
    shards' devices, with where it was merged from (no `finished` yet)."""
    configs = [s.config for s in shards]
    config = {k: v for k, v in configs[0].items() if k != "finished"}
    devices = dict.fromkeys(str(c.get("device", "")) for c in configs)
    return config | {
        "shard": "1/1",
        "output_path": str(out),
        "created": min(str(c.get("created", "")) for c in configs),
        "device": "; ".join(devices),
        "merged_from": [str(s.directory) for s in shards],
    }


def command_of(directory: Path) -> str:
    """The bench command that wrote a run directory (config.json's `command`; "" if it cannot be read)."""
    try:
        return str(json.loads((Path(directory) / "config.json").read_text()).get("command", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def merge_runs(
    directories: Sequence[Path],
    out: Path,
    force: bool = False,
    finish: Callable[[Path, dict[str, Any]], Finished] = res.finish,
) -> tuple[Finished, dict[str, Any]]:
    """Merge the shard directories into `out`: results.csv, then `finish(out, config)` writes the rest as the
    run's own (retention's: summary.csv, config.json and retention.png). Refuses an `out` that holds results
    unless `force`. Returns (what finish returned, config)."""
    shards = check_shards([read_shard(Path(d)) for d in dict.fromkeys(directories)])
    inputs = {s.directory.resolve() for s in shards}
    if out.resolve() in inputs:
        raise MergeError(f"--output {out} is one of the shards: choose another --output")
    if res.holds_results(out / "results.csv") and not force:
        raise MergeConflict(f"{out} already holds results: pass --force to replace them or choose another --output")
    out.mkdir(parents=True, exist_ok=True)
    rows = res.csv_text(merged_rows(shards), header=True, columns=shards[0].columns)
    res.write_atomic(out / "results.csv", rows.encode())
    config = merged_config(shards, out) | {"finished": res.now()}
    return finish(out, config), config
