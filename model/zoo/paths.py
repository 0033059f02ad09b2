"""Where mplus keeps its files by default."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(name: str, override: str) -> Path:
    """$`override` when set, else `name` under the user cache directory's mplus/ ($XDG_CACHE_HOME or ~/.cache)."""
    if os.environ.get(override):
        return Path(os.environ[override]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "mplus" / name
