"""The texts to inject: read a block at a time (never whole), checked, hashed and planned into chunks.

A source is read twice: once to check it (UTF-8, no NUL bytes, some text), hash it and count its tokens,
so that the number of chunks is known before anything is written; then again, chunk by chunk, to inject it.
"""

from __future__ import annotations

import codecs
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .chunking import MIN_CHUNK_TOKENS, chunk_sizes, chunked, token_stream

READ_BYTES = 1 << 20


class SourceError(ValueError):
    """A text that cannot be injected; the message says what to do."""


@dataclass
class Source:
    name: str  # the path as given, or "<stdin>"
    path: Path  # the file read (for stdin, its temporary copy)
    sha256: str
    tokens: int
    chunk_sizes: list[int]

    @property
    def chunks(self) -> int:
        return len(self.chunk_sizes)


def text_blocks(path: Path, name: str, digest=None) -> Iterator[str]:
    """The UTF-8 text of `path`, a block at a time; refuses NUL bytes and invalid UTF-8 (naming the byte)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while block := read_block(f, name):
            if digest is not None:
                digest.update(block)
            if b"\0" in block:
                raise SourceError(f"{name} looks binary (it contains NUL bytes): inject text files only")
            try:
                yield decoder.decode(block)
            except UnicodeDecodeError as e:
                raise SourceError(
                    f"{name} is not valid UTF-8 (byte {offset + e.start}): convert it to UTF-8 first"
                ) from e
            offset += len(block)
    try:
        yield decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        raise SourceError(f"{name} is not valid UTF-8 (it ends inside a character): convert it to UTF-8 first") from e


def read_block(file, name: str) -> bytes:
    try:
        return file.read(READ_BYTES)
    except OSError as e:
        raise SourceError(f"cannot read {name} ({e.strerror}): inject regular text files") from None


def plan_source(name: str, path: Path, tokenizer, chunk_tokens: int) -> Source:
    """Read `path` once: check it, hash it, count its tokens and plan its chunks."""
    digest = hashlib.sha256()
    tokens = sum(len(ids) for ids in token_stream(tokenizer, checked_text(text_blocks(path, name, digest), name)))
    if tokens < MIN_CHUNK_TOKENS:
        raise SourceError(
            f"{name} has {tokens} tokens; the model needs at least {MIN_CHUNK_TOKENS} per injection: add more text"
        )
    return Source(name, path, digest.hexdigest(), tokens, chunk_sizes(tokens, chunk_tokens))


def checked_text(blocks: Iterator[str], name: str) -> Iterator[str]:
    """The blocks, refusing a text that is empty or only whitespace (checked when it ends)."""
    seen_text = False
    for block in blocks:
        seen_text = seen_text or bool(block.strip())
        yield block
    if not seen_text:
        raise SourceError(f"{name} is empty: nothing to inject")


def source_chunks(source: Source, tokenizer, chunk_tokens: int) -> Iterator[list[int]]:
    """The chunks of a planned source, read and tokenized again as they are needed."""
    return chunked(token_stream(tokenizer, text_blocks(source.path, source.name)), chunk_tokens)
