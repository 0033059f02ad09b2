"""Where mplus keeps its files by default, and how a directory it builds takes its place there."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def cache_dir(name: str, override: str) -> Path:
    """$`override` when set, else `name` under the user cache directory's mplus/ ($XDG_CACHE_HOME or ~/.cache)."""
    if os.environ.get(override):
        return Path(os.environ[override]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "mplus" / name


def swap_in(built: Path, target: Path) -> None:
    """Put the fully built directory `built` at `target` by rename. A `target` already there is renamed aside
    first (a reader that opened its files keeps them), put back if the rename fails, and deleted after."""
    if not os.path.lexists(target):
        os.rename(built, target)
        return
    aside = built.with_name(f"{built.name}.old")
    os.rename(target, aside)
    try:
        os.rename(built, target)
    except BaseException:
        os.rename(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)
