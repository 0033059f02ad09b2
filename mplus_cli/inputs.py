"""The paths `mplus inject` takes: files that must exist, and '-' for standard input, first copied to a private
temporary file so that it can be read twice (see model.text.sources)."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from model.text.sources import READ_BYTES

from .errors import MplusError, NotFoundError


def check_path(path: str) -> Path:
    file = Path(path)
    if not file.exists():
        raise NotFoundError(f"no such file: {path}")
    if file.is_dir():
        raise MplusError(f"{path} is a directory: pass the text files inside it")
    return file


@contextlib.contextmanager
def spooled_stdin() -> Iterator[Path]:
    """Standard input copied to a private temporary file (removed afterwards)."""
    fd, name = tempfile.mkstemp(prefix="mplus-stdin-")
    try:
        with os.fdopen(fd, "wb") as f:
            shutil.copyfileobj(sys.stdin.buffer, f, READ_BYTES)
        yield Path(name)
    finally:
        os.unlink(name)
