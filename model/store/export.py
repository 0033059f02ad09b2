"""A session's memory exported as one file: a safetensors file with the whole state (the session manifest and
the state meta in its metadata, so it stands alone) and a JSON manifest beside it; and its loader."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..memory.state import MemoryState
from .files import fsync_path
from .format import now
from .session import Session

EXPORT_KEYS = {"session", "state", "exported", "file"}  # the JSON manifest's keys, exactly
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
    return isinstance(document, dict) and set(document) == EXPORT_KEYS


def private_temp(beside: Path) -> Path:
    """An empty 0600 file in `beside`'s directory, named after it."""
    fd, name = tempfile.mkstemp(dir=beside.parent, prefix=f".{beside.name}.", suffix=".tmp")
    os.close(fd)
    return Path(name)


def write_memory_export(
    out: Path, found: Session, state: MemoryState, check: Callable[[], None] = lambda: None
) -> None:
    """One safetensors file with the whole state at `out`, and a JSON manifest beside it (the session manifest
    and the state meta, also kept in the file's metadata so the file stands alone). Both are written under
    private temp names, `check()` runs once they are whole, then both are renamed into place."""
    document = {"session": found.manifest, "state": state.to_meta(), "exported": now(), "file": out.name}
    metadata = {"mplus.manifest": json.dumps(found.manifest), "mplus.state": json.dumps(state.to_meta())}
    temps = [private_temp(out), private_temp(manifest_path(out))]
    try:
        save_file({k: v.cpu().contiguous() for k, v in state.to_tensors().items()}, temps[0], metadata=metadata)
        temps[1].write_bytes(json.dumps(document, indent=1).encode())
        for temp in temps:
            fsync_path(temp)
        check()
        os.replace(temps[1], manifest_path(out))
        os.replace(temps[0], out)
        fsync_path(out.parent)
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)


def load_exported_memory(path: Path) -> tuple[MemoryState, dict[str, Any]]:
    """(state, session manifest) of a `--format memory` export."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    state = MemoryState.from_tensors(load_file(path), json.loads(metadata["mplus.state"]))
    return state, json.loads(metadata["mplus.manifest"])
