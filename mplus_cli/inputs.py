"""Reading the texts to inject and cutting them into chunks on token boundaries."""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import MplusError, NotFoundError

MIN_CHUNK_TOKENS = 16  # the authors' models need at least 16 tokens per injection


@dataclass
class Source:
    name: str  # the path as given, or "<stdin>"
    text: str
    sha256: str


def read_source(path: str) -> Source:
    """The UTF-8 text of a file (or stdin for '-'); refuses missing, directory, empty and binary input."""
    name = "<stdin>" if path == "-" else path
    if path == "-":
        data = sys.stdin.buffer.read()
    else:
        file = Path(path)
        if not file.exists():
            raise NotFoundError(f"no such file: {path}")
        if file.is_dir():
            raise MplusError(f"{path} is a directory: pass the text files inside it")
        data = file.read_bytes()
    if not data.strip():
        raise MplusError(f"{name} is empty: nothing to inject")
    if b"\0" in data:
        raise MplusError(f"{name} looks binary (it contains NUL bytes): inject text files only")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MplusError(f"{name} is not valid UTF-8 (byte {e.start}): convert it to UTF-8 first") from e
    return Source(name, text, hashlib.sha256(data).hexdigest())


def chunk_ids(ids: list[int], chunk_tokens: int, name: str) -> list[list[int]]:
    """Chunks of at most `chunk_tokens` ids; a final piece under 16 ids is merged into the previous chunk
    (which can then exceed `chunk_tokens` by up to 15). An input under 16 ids is refused."""
    if len(ids) < MIN_CHUNK_TOKENS:
        raise MplusError(
            f"{name} has {len(ids)} tokens; the model needs at least {MIN_CHUNK_TOKENS} per injection: add more text"
        )
    chunks = [ids[i : i + chunk_tokens] for i in range(0, len(ids), chunk_tokens)]
    if len(chunks) > 1 and len(chunks[-1]) < MIN_CHUNK_TOKENS:
        tail = chunks.pop()
        chunks[-1] = chunks[-1] + tail
    return chunks
