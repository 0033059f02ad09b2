"""The session format: named, durable memory states that many injections and questions build on.

A session is a directory under the store root (format 4):

    manifest.json             the committed state: model binding, storage dtype, seed, counters, the
                              committed lengths of the files below, their checksums' count and crc32, the
                              index file's blake2b, a partial injection in progress, and its own blake2b
                              (replaced atomically at each commit)
    commit-NNNNNN.json        copies of the manifests of the last KEEP_COMMITS commits: what
                              `session check --rollback` returns to
    rows.bin                  append-only: every row the session's injections wrote, [R, d] raw values of
                              the storage dtype in row-id order. Row id `base + r` is record r; ids below
                              `base` are the model's own initial rows (short-term, then long-term), never
                              copied here
    log.jsonl                 append-only: one JSON line per injected source (or a partial one, abandoned)
    origins.bin               append-only: where the rows came from, a record per run of row ids
                              (first id, rows, injection, layer, first position: see model.memory.provenance)
    index-NNNNNN.safetensors.zlib
                              commit NNNNNN, a safetensors file compressed with zlib (format-3 and older
                              format-4 sessions: index-NNNNNN.safetensors, uncompressed, read as they
                              are): `memory_ids` [L, N] (the short-term rows), the drop
                              generator; M+: the short-term rows' ages and the LTM's layout (runs of entry
                              ids, run-length recall frequencies: see LongTermMemory.layout); ids and ages
                              are int32 when they fit (int64 otherwise; read back as int64)
    ltm_row_ids.bin, ltm_births.bin, ltm_keys.bin
                              M+ only, append-only: one record per LTM entry past the model's initial ones:
                              the id of its row (in rows.bin or the model), its birth and its key
    sums.bin                  append-only: (file, end, crc32) of each block of at most SUM_BLOCK_BYTES
                              appended to the files above; a read checks the blocks it touches
    lock                      flock'ed by the one writer

Each row is stored once, in the storage dtype (bfloat16 for real and demo models, float32 for the tiny
presets): an entry of the long-term memory refers to its row by id. An inject commits after every chunk:
it appends the chunk's rows, the LTM entries it made and its log line (fsync), writes the new index
(fsync, rename), then replaces the manifest (temp file, fsync, os.replace): a crash loses at most the chunk
in flight. Bytes past the committed lengths belong to an interrupted commit: they are ignored and
truncated before the next append. Readers only follow the committed manifest. Opening reads the manifest,
the index and the short-term rows; long-term rows and keys stay in the files and are read, a batch at a
time, only when a question scores or retrieves them. Every byte read is checked against its checksum
(small files when opened, rows and keys when read): damage is an error that names the file, never a
different memory. The store never follows a symbolic link.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..memory.dtypes import FLOAT_DTYPES
from ..zoo.paths import cache_dir
from .errors import InvalidName, SessionDamaged, rollback_hint
from .files import digest, tensor_bytes

STORE_FORMAT = 4
READABLE_FORMATS = (3, 4)  # format 3 (no checksums) is read as is and upgraded by its next writer
SESSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MANIFEST, ROWS, LOG, LOCK, SUMS = "manifest.json", "rows.bin", "log.jsonl", "lock", "sums.bin"
ORIGINS = "origins.bin"
LTM_FILES = ("ltm_row_ids.bin", "ltm_births.bin", "ltm_keys.bin")  # M+: entries' row id, birth, key
APPENDED = (ROWS, LOG, *LTM_FILES, ORIGINS)  # the append-only files, numbered in sums.bin by their place here
SUM_RECORD = 3  # int64s per sums.bin record: file number, end, crc32
INDEX_RETRIES = 5  # a reader retries when a writer retired the index it was about to read
KEEP_COMMITS = 3  # commits (manifest copy + index) kept for rollback


# -- names, places, time ------------------------------------------------------------------------------
def default_root() -> Path:
    """$MPLUS_HOME, else the user cache directory's mplus/sessions."""
    return cache_dir("sessions", "MPLUS_HOME")


def check_name(name: str) -> str:
    if not SESSION_NAME.fullmatch(name) or name in (".", ".."):
        raise InvalidName(
            f"invalid session name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- the manifest ------------------------------------------------------------------------------------
def canonical(document: dict[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The manifest as written: its fields, then the blake2b of them."""
    body = {key: value for key, value in manifest.items() if key != "checksum"}
    return json.dumps(body | {"checksum": digest(canonical(body))}, indent=1).encode()


def parse_manifest(data: bytes, path: Path, name: str) -> dict[str, Any]:
    """The manifest in `data` (read from `path`); SessionDamaged if it is not one this store wrote whole."""
    try:
        manifest = json.loads(data)
        body = {key: value for key, value in manifest.items() if key != "checksum"}
    except (ValueError, AttributeError, UnicodeDecodeError) as e:
        raise SessionDamaged(f"{path} is damaged ({type(e).__name__}: {e})" + rollback_hint(name)) from e
    if "checksum" in manifest and manifest["checksum"] != digest(canonical(body)):
        raise SessionDamaged(f"{path} is damaged (its checksum does not match)" + rollback_hint(name))
    found = manifest.get("format")
    if found not in READABLE_FORMATS or (found >= 4 and "checksum" not in manifest):
        raise SessionDamaged(
            f"session {name!r} was written in store format {found!r}, this mplus reads formats "
            f"{READABLE_FORMATS[0]}-{READABLE_FORMATS[-1]}: inject its sources into a new session"
        )
    found = schema_problem(manifest, SCHEMA)
    if found is not None:
        raise SessionDamaged(f"{path} is damaged ({found})" + rollback_hint(name))
    return manifest


def sum_records(records: list[tuple[str, int, int]]) -> bytes:
    """sums.bin records (file number, end, crc32) of (file name, end, crc32)."""
    flat = [value for name, end, crc in records for value in (APPENDED.index(name), end, crc)]
    return tensor_bytes(torch.tensor(flat, dtype=torch.int64)) if flat else b""


# -- the manifest's schema -------------------------------------------------------------------------------------
Check = Callable[[Any], bool]
INDEX_NAME = re.compile(r"index-[0-9]{6}\.safetensors(\.zlib)?")  # a plain name inside the session, never a path


def count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def positive(value: Any) -> bool:
    return count(value) and value > 0


def text(value: Any) -> bool:
    return isinstance(value, str)


def floats(value: Any) -> bool:
    return value in FLOAT_DTYPES


def optional(check: Check) -> Check:
    return lambda value: value is None or check(value)


def counts(value: Any) -> bool:
    return isinstance(value, list) and all(map(count, value))


MODEL = {"id": text, "fingerprint": text, "kind": lambda v: v in ("memoryllm", "mplus"), "dtype": (floats, "optional")}
LTM_LAYOUT = {"update_step": count, "sizes": counts, "cached_rows": count, "aged": count, "entries": count}
STATE = {
    "format": count,
    "initialized": lambda v: isinstance(v, bool),
    "injections": count,
    "tokens_injected": count,
    "memory_shape": lambda v: counts(v) and len(v) == 3,
    "dtype": floats,
    "ltm": (LTM_LAYOUT, "optional"),
}
PARTIAL = {
    "source": text,
    "sha256": text,
    "chunk_tokens": positive,
    "chunks_done": count,
    "chunks_total": positive,
    "tokens_done": count,
    "tokens_total": count,
}
SCHEMA: dict[str, Any] = {
    "model": MODEL,
    "dtype": floats,
    "seed": optional(count),
    "commit": count,
    "chunks": count,
    "rows": {"base": count, "count": count, "width": positive},
    "log": {"bytes": count, "entries": count},
    "index": lambda v: text(v) and INDEX_NAME.fullmatch(v) is not None,
    "state": STATE,
    "index_sum": (text, "optional"),  # format 3 lacks the checksums, MemoryLLM the LTM
    "sums": ({"records": count, "crc": count}, "optional"),
    "origins": ({"initial": count, "runs": count}, "optional"),
    "partial": (PARTIAL, "optional"),
    "ltm": ({"initial_entries": count, "entries": count, "key_width": positive, "key_dtype": floats}, "optional"),
}


def schema_problem(document: Any, schema: dict[str, Any], where: str = "") -> str | None:
    """The first field of `document` that `schema` refuses, as "rows.count is -5"; None if it passes. A
    schema maps each key to a check or a nested schema; `(spec, "optional")` may be missing or null."""
    if not isinstance(document, dict):
        return f"{where.rstrip('.') or 'the manifest'} is {json.dumps(document)[:40]}, not an object"
    for key, spec in schema.items():
        spec, required = (spec[0], False) if isinstance(spec, tuple) else (spec, True)
        if document.get(key) is None and (not required or key not in document):
            if required:
                return f"{where}{key} is missing"
            continue
        value = document[key]
        if isinstance(spec, dict):
            found = schema_problem(value, spec, f"{where}{key}.")
        else:
            found = None if spec(value) else f"{where}{key} is {json.dumps(value)[:40]}"
        if found is not None:
            return found
    return None
