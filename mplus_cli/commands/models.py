"""`mplus models`: the models --model takes by name, and what this machine holds of each."""

from __future__ import annotations

import dataclasses

import typer

from model.zoo import catalog

from ..common import handle_errors, json_output
from ..models import requested_model
from ..output import columns, emit, human_bytes, human_count


def models_table(entries: list[catalog.Entry]) -> list[str]:
    """One model a line; the place and the label last (they can be long)."""
    rows = [["name", "kind", "flavour", "size", "where", "label"]]
    for e in entries:
        sizes = [f"{human_count(e.parameters)} params"] if e.parameters is not None else []
        sizes += [human_bytes(e.bytes)] if e.bytes is not None else []
        rows.append([e.name, e.kind, e.flavour, ", ".join(sizes) or "-", e.where, e.label])
    return columns(rows)


@handle_errors
def models() -> None:
    """List the models --model takes by name, and their copies on this machine (never the network).

    Built-in presets, the SmolLM2 demo (its converted cache) and the authors' checkpoints by alias (a copy in
    the Hugging Face hub cache). Size: parameters and bytes on disk, where known.

    Example: mplus models --json
    """
    as_json = json_output()
    found = catalog.entries()
    if as_json:
        emit({"default": requested_model(None), "models": [dataclasses.asdict(e) for e in found]})
    else:
        typer.echo("\n".join(models_table(found)))
