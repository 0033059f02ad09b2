"""`mplus export`: a session's memory (one safetensors file + a JSON manifest beside it) or a checkpoint directory.

Every check runs before the model is loaded and before anything is written: the format, the names, the parent
directory, the store (never written into), and each existing target. An existing target is replaced only with
--force, and only when it is an earlier export of this tool (a memory file whose metadata holds the session
manifest, our JSON manifest, a directory save_checkpoint wrote and nothing else added to). Outputs are private
(files 0600, the checkpoint directory 0700) whatever the umask, and appear whole: they are written under a temp
name in the same directory, checked again, then renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import model as mp
from model import store as st
from model.zoo.checkpoint import is_saved_checkpoint

from ..common import JsonOpt, SessionOpt, StoreOpt, TokenizerOpt, handle_errors
from ..errors import ConflictError, NotFoundError, UsageError
from ..models import load_bound_model
from ..output import emit

FORMATS = ("memory", "checkpoint")
MANIFEST_KEYS = {"session", "state", "exported", "file"}  # the JSON manifest's keys, exactly
MANIFEST_MAX_BYTES = 1 << 24


def manifest_path(out: Path) -> Path:
    """The JSON manifest written beside a memory export: memory.safetensors -> memory.json."""
    return out.with_suffix(".json")


def is_memory_export(path: Path) -> bool:
    """A regular file whose safetensors metadata holds the session manifest."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return "mplus.manifest" in (f.metadata() or {})
    except (SafetensorError, OSError):
        return False


def is_memory_manifest(path: Path) -> bool:
    """A regular file holding the JSON manifest that export_memory writes."""
    if path.is_symlink() or not path.is_file() or path.stat().st_size > MANIFEST_MAX_BYTES:
        return False
    try:
        document = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(document, dict) and set(document) == MANIFEST_KEYS


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


def private_temp(beside: Path) -> Path:
    """An empty 0600 file in `beside`'s directory, named after it."""
    fd, name = tempfile.mkstemp(dir=beside.parent, prefix=f".{beside.name}.", suffix=".tmp")
    os.close(fd)
    return Path(name)


def export_memory(plan: Plan, found: st.Session, state: mp.MemoryState) -> None:
    """One safetensors file with the whole state, and a JSON manifest beside it (the session manifest and
    the state meta, also kept in the file's metadata so the file stands alone)."""
    out = plan.out
    document = {"session": found.manifest, "state": state.to_meta(), "exported": st.now(), "file": out.name}
    metadata = {"mplus.manifest": json.dumps(found.manifest), "mplus.state": json.dumps(state.to_meta())}
    temps = [private_temp(out), private_temp(manifest_path(out))]
    try:
        save_file({k: v.cpu().contiguous() for k, v in state.to_tensors().items()}, temps[0], metadata=metadata)
        temps[1].write_bytes(json.dumps(document, indent=1).encode())
        for temp in temps:
            st.fsync_path(temp)
        plan.check()
        os.replace(temps[1], manifest_path(out))
        os.replace(temps[0], out)
        st.fsync_path(out.parent)
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)


def load_exported_memory(path: Path) -> tuple[mp.MemoryState, dict[str, Any]]:
    """(state, session manifest) of a `--format memory` export."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    state = mp.MemoryState.from_tensors(load_file(path), json.loads(metadata["mplus.state"]))
    return state, json.loads(metadata["mplus.manifest"])


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
        if not os.path.lexists(out):
            os.rename(temp, out)
            return
        trash = temp.with_suffix(".old")
        os.rename(out, trash)
        try:
            os.rename(temp, out)
        except BaseException:
            os.rename(trash, out)
            raise
        shutil.rmtree(trash)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


@handle_errors
def export(
    session: SessionOpt,
    out: Annotated[Path, typer.Option("--output", "-o", help="Output file (memory) or directory (checkpoint).")],
    format: Annotated[str, typer.Option("--format", help="memory | checkpoint")] = "memory",
    force: Annotated[bool, typer.Option(help="Replace an earlier export of this tool (nothing else).")] = False,
    store: StoreOpt = None,
    tokenizer: TokenizerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Export a session's memory (one safetensors file) or a knowledge-injected checkpoint directory.

    Example: mplus export --session s1 -o s1.safetensors
    """
    if format not in FORMATS:
        raise UsageError(f"unknown --format {format!r}: use memory or checkpoint")
    root = store or st.default_root()
    found = st.Session.open(root, session)
    plan = Plan(out, format, force, root)
    plan.check()
    lm = load_bound_model(session, found.model_ref, tokenizer)
    state = found.load_state(lm.initial_state)
    if format == "memory":
        export_memory(plan, found, state)
    else:
        export_checkpoint(plan, lm, state)
    if as_json:
        files = [str(p) for p in plan.targets()]
        emit(
            {"session": session, "format": format, "out": str(out), "files": files, "commit": found.manifest["commit"]}
        )
    else:
        typer.echo(f"exported session {session!r} ({format}) to {out}")
