"""`mplus export`: a session's memory (one safetensors file + a JSON manifest beside it) or a checkpoint directory.

Every check runs before the model is loaded and before anything is written: the format, the names, the parent
directory, the store (never written into), and each existing target. An existing target is replaced only with
--force, and only when it is an earlier export of this tool (a memory file whose metadata holds the session
manifest, our JSON manifest, a directory save_checkpoint wrote and nothing else added to). Outputs are private
(files 0600, the checkpoint directory 0700) whatever the umask, and appear whole: they are written under a temp
name in the same directory, checked again, then renamed into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import typer

import model as mp
from model import store as st
from model.store.export import is_memory_export, is_memory_manifest, manifest_path, write_memory_export
from model.zoo.checkpoint import is_saved_checkpoint
from model.zoo.paths import swap_in

from ..common import handle_errors, json_output
from ..errors import ConflictError, NotFoundError, UsageError
from ..models import load_bound_model
from ..options import SessionOpt, StoreOpt, TokenizerOpt
from ..output import emit

ExportFormat = Literal["memory", "checkpoint"]


@dataclass(frozen=True)
class Plan:
    """Where an export goes; `check()` runs before anything is written and again just before the rename."""

    out: Path
    format: str
    force: bool
    store: Path

    def targets(self) -> list[Path]:
        return [self.out, manifest_path(self.out)] if self.format == "memory" else [self.out]

    def check(self) -> None:
        out = self.out
        if self.format == "memory" and out.suffix == ".json":
            raise UsageError(f"{out} would collide with its JSON manifest: name it e.g. {out.stem}.safetensors")
        if not out.parent.is_dir():
            raise NotFoundError(f"no directory {out.parent} to write {out.name} into: create it first")
        root = self.store.resolve()
        for target in self.targets():
            real = target.resolve()
            if real == root or root in real.parents:
                raise UsageError(f"{target} is inside the session store {root}: choose an -o outside it")
            if real in root.parents:
                raise UsageError(f"{target} holds the session store {root}: choose another -o")
        for target in self.targets():
            if not os.path.lexists(target):
                continue
            if target == out:
                ours = is_saved_checkpoint(out) if self.format == "checkpoint" else is_memory_export(out)
            else:
                ours = is_memory_manifest(target)
            if not ours:
                kind = f"an mplus {self.format} export" if target == out else "the JSON manifest of an mplus export"
                raise ConflictError(f"{target} exists and is not {kind}: it will not be replaced; choose another -o")
            if not self.force:
                raise ConflictError(f"{target} already exists: pass --force to replace it or choose another -o")


def export_checkpoint(plan: Plan, lm: mp.MemoryLLM, state: mp.MemoryState) -> None:
    """save_checkpoint into a private temp directory, then swap it in (an earlier export goes to a trash name
    first, and is deleted once the new one is in place)."""
    out = plan.out
    temp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        mp.save_checkpoint(lm, state, temp)
        for path in temp.rglob("*"):
            os.chmod(path, 0o700 if path.is_dir() else 0o600)
        plan.check()
        swap_in(temp, out)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


@handle_errors
def export(
    session: SessionOpt,
    out: Annotated[Path, typer.Option("--output", "-o", help="Output file (memory) or directory (checkpoint).")],
    format: Annotated[
        ExportFormat, typer.Option("--format", help="memory: one safetensors file; checkpoint: a directory.")
    ] = "memory",
    force: Annotated[bool, typer.Option(help="Replace an earlier export of this tool (nothing else).")] = False,
    store: StoreOpt = None,
    tokenizer: TokenizerOpt = None,
) -> None:
    """Export a session's memory (one safetensors file) or a knowledge-injected checkpoint directory.

    Example: mplus export --session s1 -o s1.safetensors
    """
    as_json = json_output()
    root = store or st.default_root()
    found = st.Session.open(root, session)
    plan = Plan(out, format, force, root)
    plan.check()
    lm = load_bound_model(session, found.model_ref, tokenizer)
    state = found.load_state(lm.initial_state)
    if format == "memory":
        write_memory_export(plan.out, found, state, plan.check)
    else:
        export_checkpoint(plan, lm, state)
    if as_json:
        files = [str(p) for p in plan.targets()]
        emit(
            {"session": session, "format": format, "out": str(out), "files": files, "commit": found.manifest["commit"]}
        )
    else:
        typer.echo(f"exported session {session!r} ({format}) to {out}")
