"""Sessions: named, durable memory states that many injections and questions build on.

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
                              (first id, rows, injection, layer, first position: see model.provenance)
    index-NNNNNN.safetensors  commit NNNNNN: `memory_ids` [L, N] (the short-term rows), the drop generator;
                              M+: the short-term rows' ages and the LTM's layout (runs of entry ids, run-
                              length recall frequencies: see LongTermMemory.layout)
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

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes

from .ltm import EntryBank, LongTermMemory
from .memory import MemoryState, new_generator, stm_rows
from .memoryllm import InjectResult, MemoryLLM
from .paths import cache_dir
from .provenance import FIELDS, Origins
from .rows import SUM_BLOCK_BYTES, BlockSums, DamagedFile, FileArray, RowSpace, block_sums, populated_empty

STORE_FORMAT = 4
READABLE_FORMATS = (3, 4)  # format 3 (no checksums) is read as is and upgraded by its next writer
SESSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MANIFEST, ROWS, LOG, LOCK, SUMS = "manifest.json", "rows.bin", "log.jsonl", "lock", "sums.bin"
ORIGINS = "origins.bin"
LTM_FILES = ("ltm_row_ids.bin", "ltm_births.bin", "ltm_keys.bin")  # M+: entries' row id, birth, key
APPENDED = (ROWS, LOG, *LTM_FILES, ORIGINS)  # the append-only files, numbered in sums.bin by their place here
SUM_RECORD = 3  # int64s per sums.bin record: file number, end, crc32
LOCK_TIMEOUT_S = 5.0
INDEX_RETRIES = 5  # a reader retries when a writer retired the index it was about to read
KEEP_COMMITS = 3  # commits (manifest copy + index) kept for rollback
MANIFEST_KEYS = ("model", "dtype", "rows", "log", "index", "state", "commit")
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


# -- errors -------------------------------------------------------------------------------------------
class StoreError(Exception):
    """A session cannot be used as asked; the message says what to do."""


class InvalidName(StoreError, ValueError):
    """A session name that could escape the store or is not portable."""


class SessionNotFound(StoreError):
    pass


class SessionExists(StoreError):
    pass


class SessionBusy(StoreError):
    """Another process holds the session's writer lock."""


class SessionMismatch(StoreError):
    """The session was made for other settings (model, memory, dtype, source)."""


class SessionDamaged(StoreError):
    """The session's files cannot be read as a memory state (damaged, or not what the store wrote)."""


def rollback_hint(name: str) -> str:
    return f"; `mplus session check {name} --rollback` returns session {name!r} to its last commit that verifies"


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


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- durable file primitives ------------------------------------------------------------------------
def fsync_path(path: Path) -> None:
    """fsync a file or a directory (its entries: a rename in it) by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write `data` to a temp file (`mode`, under the umask), fsync it, and rename it over `path`: readers
    see the old file or the new one, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def append_after(path: Path, committed: int, data: bytes | memoryview) -> int:
    """Drop whatever follows the first `committed` bytes of `path`, append `data`, fsync; the new length."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o600)
    try:
        os.ftruncate(fd, committed)
        view, done = memoryview(data).cast("B") if len(data) else memoryview(b""), 0
        while done < view.nbytes:
            done += os.pwrite(fd, view[done:], committed + done)
        os.fsync(fd)
    finally:
        os.close(fd)
    return committed + len(data)


def tensor_bytes(tensor: torch.Tensor) -> bytes | memoryview:
    if tensor.numel() == 0:
        return b""
    return memoryview(tensor.contiguous().view(torch.uint8).numpy()).cast("B")


def read_prefix(path: Path, length: int | None = None) -> bytes:
    """The first `length` bytes of `path` (all of it by default), without following a link."""
    with os.fdopen(os.open(path, os.O_RDONLY | NOFOLLOW), "rb") as f:
        data = f.read(length if length is not None else -1)
    if length is not None and len(data) < length:
        raise DamagedFile(f"{path} is shorter than its committed {length} bytes")
    return data


def copy_prefix(source: Path, target: Path, length: int) -> None:
    """The first `length` bytes of `source` into a new file `target` (copied in the kernel where it can)."""
    src_fd = os.open(source, os.O_RDONLY | NOFOLLOW)
    dst_fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o600)
    with os.fdopen(src_fd, "rb") as src, os.fdopen(dst_fd, "wb") as dst:
        done = 0
        while done < length:
            try:
                moved = os.copy_file_range(src.fileno(), dst.fileno(), length - done, done, done)
            except OSError:  # not supported between these files: copy through user space
                moved = os.pwrite(dst.fileno(), os.pread(src.fileno(), min(length - done, 1 << 24), done), done)
            if moved == 0:
                raise SessionDamaged(f"{source} is shorter than its committed {length} bytes")
            done += moved
        os.fsync(dst.fileno())


@contextlib.contextmanager
def exclusive_lock(path: Path, name: str, timeout_s: float | None = None) -> Iterator[None]:
    """Hold an flock on `path`; wait up to `timeout_s` (default LOCK_TIMEOUT_S), then raise SessionBusy."""
    with os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o600), "r+b") as f:
        deadline = time.monotonic() + (LOCK_TIMEOUT_S if timeout_s is None else timeout_s)
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SessionBusy(
                        f"session {name!r} is busy: another mplus command is writing to it; retry when it finishes"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) back for the duration and raise it afterwards: a commit is never cut half-way.
    (Only the main thread can install signal handlers; elsewhere this does nothing.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


# -- checksums and links ------------------------------------------------------------------------------
def digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


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
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise SessionDamaged(f"{path} is damaged (missing {', '.join(missing)})" + rollback_hint(name))
    return manifest


def refuse_links(directory: Path, name: str) -> None:
    """SessionDamaged if the session directory or any file in it is a symbolic link."""
    if directory.is_symlink():
        raise SessionDamaged(
            f"session {name!r} is a symbolic link ({directory}); the store never follows links: "
            "move the session directory itself into the store"
        )
    for entry in os.scandir(directory):
        if entry.is_symlink():
            raise SessionDamaged(
                f"{entry.path} is a symbolic link; the store never follows links: put the file itself there, "
                f"or remove session {name!r}"
            )


def file_sums(path: Path, start: int, length: int) -> list[tuple[int, int]]:
    """(end, crc32) blocks of bytes start..start+length-1 of `path`, read a block at a time."""
    fd, records = os.open(path, os.O_RDONLY | NOFOLLOW), []
    try:
        for at in range(start, start + length, SUM_BLOCK_BYTES):
            data = os.pread(fd, min(SUM_BLOCK_BYTES, start + length - at), at)
            records += block_sums(data, at)
    finally:
        os.close(fd)
    return records


def sum_records(records: list[tuple[str, int, int]]) -> bytes:
    """sums.bin records (file number, end, crc32) of (file name, end, crc32)."""
    flat = [value for name, end, crc in records for value in (APPENDED.index(name), end, crc)]
    return tensor_bytes(torch.tensor(flat, dtype=torch.int64)) if flat else b""


@contextlib.contextmanager
def staged_directory(tmp: Path) -> Iterator[Path]:
    """A fresh private directory to build a session in and rename into place; removed if anything (Ctrl-C
    included) stops it first."""
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- the model's part of a session --------------------------------------------------------------------
def initial_rows(initial: MemoryState) -> RowSpace:
    """The rows of a model's initial memory (short-term, then M+ long-term) under their ids 0..base-1."""
    return initial.ltm.rows if initial.ltm is not None else stm_rows(initial.memory)


def binding(model: MemoryLLM, model_id: str, tokenizer: str | None = None, revision: str | None = None) -> dict:
    """What a session records about its model: how to load it again (`model_id`: a built-in name, a
    checkpoint directory or a hub id; `tokenizer`, `revision`) and what must not have changed."""
    return {
        "id": model_id,
        "revision": revision,
        "fingerprint": model.cfg.fingerprint(),
        "dtype": dtype_name(model.dtype),
        "kind": model.cfg.kind,
        "tokenizer": tokenizer,
        "label": model.info.get("label", ""),
    }


def entry_widths(initial: MemoryState) -> tuple[int, torch.dtype | None]:
    bank = initial.ltm.bank
    return bank.key_width, bank.key_dtype


# -- sessions ---------------------------------------------------------------------------------------
@dataclass
class Session:
    """A session as of its committed manifest. Opening reads only the manifest."""

    directory: Path
    manifest: dict[str, Any]
    _sums: dict[str, BlockSums] | None = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.directory.name

    @property
    def model_ref(self) -> dict[str, Any]:
        return self.manifest["model"]

    @property
    def dtype(self) -> torch.dtype:
        """The storage dtype of the session's rows (and M+ keys)."""
        return getattr(torch, self.manifest["dtype"])

    @property
    def partial(self) -> dict[str, Any] | None:
        """The source an interrupted inject was writing: name, sha256, chunks done of total, ..."""
        return self.manifest.get("partial")

    @classmethod
    def open(cls, root: Path, name: str) -> Session:
        """The session as committed; SessionDamaged if its manifest is damaged or anything in it is a link."""
        directory = Path(root) / check_name(name)
        path = directory / MANIFEST
        if not (directory.is_symlink() or os.path.lexists(path)):
            raise SessionNotFound(f"no session {name!r} in {root}: list them with `mplus session ls`")
        refuse_links(directory, name)
        return cls(directory, parse_manifest(read_prefix(path), path, name))

    def reopen(self) -> Session:
        return Session.open(self.directory.parent, self.name)

    # -- reading -------------------------------------------------------------------------------------
    @property
    def base(self) -> int:
        """Row id of rows.bin's first record: the model's initial rows take the ids below."""
        return self.manifest["rows"]["base"]

    def sums(self) -> dict[str, BlockSums | None]:
        """The checksums of each append-only file's committed blocks (None for a format-3 session), read
        from sums.bin once and checked against the manifest's crc32 of it."""
        if self._sums is None:
            info = self.manifest.get("sums")
            if info is None:
                return dict.fromkeys(APPENDED)
            data = read_prefix(self.directory / SUMS, info["records"] * SUM_RECORD * 8)
            if zlib.crc32(data) != info["crc"]:
                raise SessionDamaged(f"{self.directory / SUMS} is damaged (its crc32 does not match)" + self.hint)
            records = torch.frombuffer(bytearray(data), dtype=torch.int64).view(-1, SUM_RECORD) if data else None
            self._sums = {
                name: BlockSums(self.directory / name, *self._file_records(records, number), hint=self.hint)
                for number, name in enumerate(APPENDED)
            }
        return self._sums

    @staticmethod
    def _file_records(records: torch.Tensor | None, number: int) -> tuple[torch.Tensor, torch.Tensor]:
        if records is None:
            return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)
        mine = records[records[:, 0] == number]  # [B, 3]
        return mine[:, 1].contiguous(), mine[:, 2].contiguous()

    @property
    def hint(self) -> str:
        return rollback_hint(self.name)

    def rows_file(self) -> FileArray:
        """The committed rows [R, d] of rows.bin (read on demand, checked as read)."""
        info = self.manifest["rows"]
        return FileArray(self.directory / ROWS, info["count"], info["width"], self.dtype, sums=self.sums()[ROWS])

    def entry_files(self) -> tuple[FileArray, FileArray, FileArray]:
        """The committed M+ entries: row ids [E], births [E], keys [E, s] (read on demand, checked as read)."""
        info, sums = self.manifest["ltm"], self.sums()
        count, names = info["entries"], [self.directory / name for name in LTM_FILES]
        key_dtype = getattr(torch, info["key_dtype"])
        return (
            FileArray(names[0], count, 0, torch.int64, sums=sums[LTM_FILES[0]]),
            FileArray(names[1], count, 0, torch.int64, sums=sums[LTM_FILES[1]]),
            FileArray(names[2], count, info["key_width"], key_dtype, sums=sums[LTM_FILES[2]]),
        )

    def origins(self, initial: MemoryState) -> Origins:
        """Where the session's rows came from: the model's initial rows' own origins (a checkpoint may carry
        them), then the runs its injections wrote (none for sessions older than provenance)."""
        runs = self.manifest.get("origins", {}).get("runs", 0)
        if not runs:
            return initial.origins.clone()
        written = FileArray(self.directory / ORIGINS, runs, FIELDS, torch.int64, sums=self.sums()[ORIGINS]).all()
        return Origins(torch.cat([initial.origins.runs, written]))

    def index(self) -> dict[str, torch.Tensor]:
        """The committed index's tensors, checked against the manifest's blake2b of the file."""
        path = self.directory / self.manifest["index"]
        data = read_prefix(path)
        if "index_sum" in self.manifest and digest(data) != self.manifest["index_sum"]:
            raise SessionDamaged(f"{path} is damaged (its checksum does not match)" + self.hint)
        try:
            return safetensors_load(data)
        except Exception as e:  # a format-3 index without a checksum
            raise SessionDamaged(f"{path} is damaged ({e})" + self.hint) from e

    def log(self) -> list[dict[str, Any]]:
        """The committed log lines (checked)."""
        path, length = self.directory / LOG, self.manifest["log"]["bytes"]
        sums = self.sums()[LOG]
        if sums is not None:
            sums.verify_all(length)
        try:
            return [json.loads(line) for line in read_prefix(path, length).decode().splitlines()]
        except (ValueError, UnicodeDecodeError) as e:
            raise SessionDamaged(f"{path} is damaged ({type(e).__name__})" + self.hint) from e

    def load_state(self, initial: MemoryState, device: torch.device | str = "cpu") -> MemoryState:
        """The committed memory state, rebuilt from the model's initial memory `initial` and the session's
        files: the short-term rows are read, the long-term ones stay in the files."""
        session = self
        for _ in range(INDEX_RETRIES):
            try:
                return session.build_state(initial, session.index(), device)
            except FileNotFoundError:
                session = session.reopen()
        return session.build_state(initial, session.index(), device)

    def row_space(self, initial: MemoryState) -> RowSpace:
        """Every row of the session by id: the model's initial rows, then rows.bin."""
        model_rows = initial_rows(initial)
        if model_rows.end != self.base:
            raise SessionMismatch(
                f"session {self.name!r} was created with {self.base} initial memory rows, the model has "
                f"{model_rows.end}: use the model it was created with"
            )
        space = RowSpace(model_rows.width, self.dtype, model_rows.segments)
        space.attach(self.base, self.rows_file())
        return space

    def build_state(
        self, initial: MemoryState, index: dict[str, torch.Tensor], device: torch.device | str = "cpu"
    ) -> MemoryState:
        space = self.row_space(initial)
        ids = index["memory_ids"]  # [L, N]
        memory = populated_empty((*ids.shape, space.width), space.dtype)  # [L, N, d]
        for layer, layer_ids in enumerate(ids):  # a layer's ids ascend (rows keep their order): read in place
            space.gather(layer_ids, out=memory[layer])
        tensors = {"memory": memory, "generator_state": index["generator_state"]}
        meta = self.manifest["state"]
        next_row_id = self.base + self.manifest["rows"]["count"]
        ltm = None
        if "ltm" in meta:
            tensors["memory_ages"] = index["memory_ages"]
            ltm = LongTermMemory.from_layout(self.entry_bank(initial, space), index, meta["ltm"])
        state = MemoryState.from_tensors(tensors, meta, device, ltm, ids, next_row_id)
        state.origins = self.origins(initial)
        return state

    def entry_bank(self, initial: MemoryState, space: RowSpace) -> EntryBank:
        """The M+ bank: the model's initial LTM entries (never copied here), then the committed entry files."""
        bank, info = initial.ltm.bank, self.manifest["ltm"]
        if len(bank) != info["initial_entries"]:
            raise SessionMismatch(
                f"session {self.name!r} was created with {info['initial_entries']} initial LTM rows, the model has "
                f"{len(bank)}: use the model it was created with"
            )
        key_dtype = None if info.get("keys_follow_rows", True) else getattr(torch, info["key_dtype"])
        parts = [*bank.frozen(), self.entry_files()]
        return EntryBank(space, info["key_width"], key_dtype, parts, aged=self.manifest["state"]["ltm"]["aged"])

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.directory.iterdir() if p.is_file())

    def busy(self) -> bool:
        """Whether a writer holds the session's lock now (a non-blocking probe)."""
        try:
            with exclusive_lock(self.directory / LOCK, self.name, timeout_s=0):
                return False
        except SessionBusy:
            return True

    # -- writing -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def writer(self, timeout_s: float | None = None) -> Iterator[Writer]:
        """The one writer: holds the session lock and starts from the manifest committed under it, after
        checking its log (a damaged session is never written to). A format-3 session is upgraded first."""
        with exclusive_lock(self.directory / LOCK, self.name, timeout_s):
            session = self.reopen()
            if "sums" not in session.manifest:
                session = session.upgraded()
            session.log()
            yield Writer(session)

    def upgraded(self) -> Session:
        """This format-3 session as format 4: checksums of its committed bytes and index (writer lock held)."""
        records = [
            (name, end, crc)
            for name, nbytes in self.committed_lengths()
            for end, crc in file_sums(self.directory / name, 0, nbytes)
        ]
        data = sum_records(records)
        append_after(self.directory / SUMS, 0, data)
        index = read_prefix(self.directory / self.manifest["index"])
        manifest = self.manifest | {"format": STORE_FORMAT, "index_sum": digest(index)}
        manifest["sums"] = {"records": len(records), "crc": zlib.crc32(data)}
        write_manifest(self.directory, manifest)
        return Session(self.directory, manifest)

    # -- the store: create, list, fork, remove ------------------------------------------------------
    @classmethod
    def create(
        cls,
        root: Path,
        name: str,
        initial: MemoryState,
        model_ref: dict[str, Any],
        seed: int | None,
        dtype: torch.dtype,
    ) -> Session:
        """A new session at the model's initial memory `initial`, with a drop generator seeded by `seed` (None:
        the initial memory's own, which a checkpoint may carry), keeping its rows in `dtype`. Built in a hidden
        temp directory and renamed into place; raises SessionExists if the name is taken (also when another
        process created it first)."""
        root = Path(root)
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        target = root / check_name(name)
        if os.path.lexists(target / MANIFEST):
            raise SessionExists(f"session {name!r} already exists in {root}")
        state = initial.clone()
        if seed is not None:
            state.generator = new_generator(seed)
        index_name, index = "index-000000.safetensors", safetensors_bytes(index_tensors(state))
        width = state.memory.shape[-1]
        manifest = {
            "format": STORE_FORMAT,
            "name": name,
            "created": now(),
            "updated": now(),
            "model": model_ref,
            "dtype": dtype_name(dtype),
            "seed": seed,
            "commit": 0,
            "chunks": 0,
            "rows": {"file": ROWS, "base": initial.next_row_id, "count": 0, "width": width},
            "log": {"bytes": 0, "entries": 0},
            "index": index_name,
            "index_sum": digest(index),
            "sums": {"records": 0, "crc": 0},
            "origins": {"initial": len(initial.origins), "runs": 0},
            "state": state_meta(state, dtype),
            "partial": None,
        }
        if state.ltm is not None:
            key_width, key_dtype = entry_widths(initial)
            manifest["ltm"] = {
                "initial_entries": len(state.ltm.bank),
                "entries": 0,
                "key_width": key_width,
                "key_dtype": dtype_name(key_dtype or dtype),
                "keys_follow_rows": key_dtype is None,
            }
        with staged_directory(root / f".{name}.new-{os.getpid()}") as tmp:
            write_atomic(tmp / index_name, index)
            for filename in (ROWS, LOG, LOCK, SUMS, ORIGINS) + (LTM_FILES if state.ltm is not None else ()):
                os.close(os.open(tmp / filename, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o600))
            write_manifest(tmp, manifest)
            try:
                os.rename(tmp, target)
            except OSError:  # created meanwhile by another process
                raise SessionExists(f"session {name!r} already exists in {root}") from None
        fsync_path(root)
        return Session.open(root, name)

    def fork(self, new_name: str) -> Session:
        """A copy of this session as committed now, under `new_name` (which must not exist)."""
        root = self.directory.parent
        if os.path.lexists(root / check_name(new_name) / MANIFEST):
            raise SessionExists(f"session {new_name!r} already exists: pick another name or remove it first")
        with self.writer() as writer, staged_directory(root / f".{new_name}.fork-{os.getpid()}") as tmp:
            source = writer.session
            index = source.manifest["index"]
            lengths = [(SUMS, source.manifest["sums"]["records"] * SUM_RECORD * 8)]
            lengths += [(index, os.stat(source.directory / index, follow_symlinks=False).st_size)]
            for filename, nbytes in [*source.committed_lengths(), *lengths]:
                copy_prefix(source.directory / filename, tmp / filename, nbytes)
            os.close(os.open(tmp / LOCK, os.O_WRONLY | os.O_CREAT | NOFOLLOW, 0o600))
            write_manifest(tmp, source.manifest | {"name": new_name, "forked_from": self.name, "updated": now()})
            try:
                os.rename(tmp, root / new_name)
            except OSError:
                raise SessionExists(
                    f"session {new_name!r} already exists: pick another name or remove it first"
                ) from None
        fsync_path(root)
        return Session.open(root, new_name)

    def committed_lengths(self) -> list[tuple[str, int]]:
        """(file, committed bytes) of the append-only files."""
        info = self.manifest["rows"]
        lengths = [(ROWS, info["count"] * info["width"] * self.dtype.itemsize), (LOG, self.manifest["log"]["bytes"])]
        lengths.append((ORIGINS, self.manifest.get("origins", {}).get("runs", 0) * FIELDS * 8))
        if "ltm" in self.manifest:
            ltm = self.manifest["ltm"]
            key_bytes = max(ltm["key_width"], 1) * getattr(torch, ltm["key_dtype"]).itemsize
            lengths += [(LTM_FILES[0], ltm["entries"] * 8), (LTM_FILES[1], ltm["entries"] * 8)]
            lengths += [(LTM_FILES[2], ltm["entries"] * key_bytes)]
        return lengths


def state_meta(state: MemoryState, dtype: torch.dtype) -> dict[str, Any]:
    """What the manifest records of a state: its counters and shapes, the storage dtype, the LTM's layout meta."""
    meta = state.to_meta() | {"dtype": dtype_name(dtype)}
    if state.ltm is not None:
        meta["ltm"] = state.ltm.layout_meta()
    return meta


def index_tensors(state: MemoryState) -> dict[str, torch.Tensor]:
    """What a commit's index file holds: the short-term rows' ids, the drop generator, and for M+ the
    short-term ages and the LTM layout."""
    tensors = {"memory_ids": state.memory_ids.contiguous(), "generator_state": state.generator.get_state()}
    if state.ltm is not None:
        tensors |= {"memory_ages": state.memory_ages.contiguous()} | state.ltm.layout()
    return tensors


@dataclass
class Writer:
    """Stages injections (their new rows) and commits them, with log lines, as one atomic step."""

    session: Session
    pending_rows: list[torch.Tensor] = field(default_factory=list)
    commits: int = 0  # commits made by this writer

    def load_state(self, initial: MemoryState, device: torch.device | str = "cpu") -> MemoryState:
        return self.session.build_state(initial, self.session.index(), device)

    @property
    def staged_rows(self) -> int:
        return self.session.manifest["rows"]["count"] + sum(block.shape[0] for block in self.pending_rows)

    def inject(self, model: MemoryLLM, state: MemoryState, ids: torch.Tensor) -> InjectResult:
        """model.inject on `state`, staging its new rows."""
        result = model.inject(state, ids)
        self.stage(result)
        return result

    def stage(self, result: InjectResult) -> None:
        """Stage the new rows of an injection made on a state of this session."""
        expected, first = self.session.base + self.staged_rows, int(result.row_ids[0, 0])
        if first != expected:
            raise ValueError(f"the injection's rows start at id {first}, the session's next is {expected}")
        L, k, d = result.delta.shape
        self.pending_rows.append(result.delta.reshape(L * k, d).to(self.session.dtype).cpu())

    def commit(
        self, state: MemoryState, log: list[dict[str, Any]] = (), partial: dict[str, Any] | None = None
    ) -> Session:
        """Append the staged rows, the new LTM entries and `log` lines, write the index, then atomically
        replace the manifest (which records `partial`: the source an inject is part-way through, or None).
        SIGINT waits until the commit is done. Afterwards the state's committed rows and entries are read
        from the files: RAM holds what is not committed yet."""
        with uninterrupted():
            session = self._write(state, log, partial)
        info = session.manifest["rows"]
        if state.ltm is not None:
            state.ltm.rows.persisted(session.base, session.rows_file())
            state.ltm.bank.persisted(session.manifest["ltm"]["initial_entries"], session.entry_files())
        self.session, self.pending_rows = session, []
        self.commits += 1
        assert state.next_row_id == session.base + info["count"], "staged rows and the state's row ids disagree"
        return session

    def _write(self, state: MemoryState, log: list[dict[str, Any]], partial: dict[str, Any] | None) -> Session:
        session, manifest = self.session, dict(self.session.manifest)
        directory, committed = session.directory, dict(session.committed_lengths())
        rows = torch.cat(self.pending_rows) if self.pending_rows else torch.empty(0, manifest["rows"]["width"])
        lines = "".join(json.dumps(entry) + "\n" for entry in log).encode()
        appends = [(ROWS, tensor_bytes(rows.to(session.dtype))), (LOG, lines)]
        manifest["rows"] = manifest["rows"] | {"count": manifest["rows"]["count"] + rows.shape[0]}
        manifest["log"] = {"bytes": committed[LOG] + len(lines), "entries": manifest["log"]["entries"] + len(log)}
        origins = manifest.get("origins", {"initial": 0, "runs": 0})  # initial: the model's own runs, not stored
        appends.append((ORIGINS, tensor_bytes(state.origins.runs[origins["initial"] + origins["runs"] :])))
        manifest["origins"] = origins | {"runs": len(state.origins) - origins["initial"]}
        if state.ltm is not None:
            entries, manifest["ltm"] = new_entries(manifest["ltm"], state.ltm.bank)
            appends += entries
        records = []
        for name, data in appends:
            append_after(directory / name, committed[name], data)
            records += [(name, end, crc) for end, crc in block_sums(data, committed[name])]
        sums, new_sums = manifest["sums"], sum_records(records)
        append_after(directory / SUMS, sums["records"] * SUM_RECORD * 8, new_sums)
        manifest["sums"] = {"records": sums["records"] + len(records), "crc": zlib.crc32(new_sums, sums["crc"])}
        commit = manifest["commit"] + 1
        index_name, index = f"index-{commit:06d}.safetensors", safetensors_bytes(index_tensors(state))
        write_atomic(directory / index_name, index)
        manifest |= {"commit": commit, "index": index_name, "index_sum": digest(index)}
        manifest |= {"state": state_meta(state, session.dtype), "updated": now(), "partial": partial}
        manifest["chunks"] += len(self.pending_rows)
        write_manifest(directory, manifest)
        retire_commits(directory, commit)
        return Session(directory, manifest)


def new_entries(info: dict[str, Any], bank: EntryBank) -> tuple[list[tuple[str, bytes | memoryview]], dict[str, Any]]:
    """(file, bytes) of the bank entries added since the last commit, and the new `ltm` manifest entry."""
    new = bank.added_since(info["initial_entries"] + info["entries"])  # row ids [m], births [m], keys [m, s]
    key_dtype = getattr(torch, info["key_dtype"])
    tensors = (new[0], new[1], new[2].to(key_dtype))
    appends = [(name, tensor_bytes(tensor)) for name, tensor in zip(LTM_FILES, tensors, strict=True)]
    return appends, info | {"entries": info["entries"] + new[0].shape[0]}


def commit_number(path: Path) -> int:
    """NNNNNN of commit-NNNNNN.json or index-NNNNNN.safetensors."""
    return int(path.name.split("-")[1].split(".")[0])


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Keep a copy of the commit's manifest (for rollback), then make it the committed one."""
    data = manifest_bytes(manifest)
    write_atomic(directory / f"commit-{manifest['commit']:06d}.json", data)
    write_atomic(directory / MANIFEST, data)


def kept_commits(directory: Path) -> list[Path]:
    """The kept manifest copies, newest first."""
    return sorted(directory.glob("commit-[0-9]*.json"), key=commit_number, reverse=True)


def retire_commits(directory: Path, commit: int) -> None:
    """Delete the manifest copies and index files of commits older than the last KEEP_COMMITS (readers may
    still be on the previous one)."""
    for path in [*directory.glob("commit-[0-9]*.json"), *directory.glob("index-[0-9]*.safetensors")]:
        if commit_number(path) <= commit - KEEP_COMMITS:
            path.unlink(missing_ok=True)


def session_exists(root: Path, name: str) -> bool:
    """Whether the name is taken (by a session, or by a link where one would be)."""
    directory = Path(root) / check_name(name)
    return directory.is_symlink() or os.path.lexists(directory / MANIFEST)


def list_sessions(root: Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if SESSION_NAME.fullmatch(p.name) and os.path.lexists(p / MANIFEST))


def remove_session(root: Path, name: str) -> None:
    """Remove a session once no writer holds it (renamed away first, so it vanishes at once); works on a
    damaged session. A session that is a link, or holds one, is refused before anything changes."""
    directory = Path(root) / check_name(name)
    if not directory.is_symlink() and not directory.is_dir():
        raise SessionNotFound(f"no session {name!r} in {root}: list them with `mplus session ls`")
    refuse_links(directory, name)
    trash = Path(root) / f".{name}.rm-{os.getpid()}"
    with exclusive_lock(directory / LOCK, name):
        os.rename(directory, trash)
    shutil.rmtree(trash)


# -- verification and rollback ----------------------------------------------------------------------
@dataclass
class Verdict:
    """What checking one commit found: its number (None if its manifest is unreadable) and the problems."""

    manifest: str
    commit: int | None
    problems: list[str]
    checked_bytes: int = 0


def problem(error: Exception) -> str:
    return str(error).split("; `mplus session check")[0]


def verify_commit(directory: Path, manifest_path: Path) -> Verdict:
    """Check one commit: its manifest, index, checksums, every committed byte of the append-only files
    (against their block checksums) and the log."""
    damage = (SessionDamaged, DamagedFile, OSError)
    try:
        session = Session(directory, parse_manifest(read_prefix(manifest_path), manifest_path, directory.name))
        sums = session.sums()
    except damage as e:
        return Verdict(manifest_path.name, None, [problem(e)])
    verdict = Verdict(manifest_path.name, session.manifest["commit"], [])
    lengths = [(name, nbytes) for name, nbytes in session.committed_lengths() if sums[name] is not None]
    checks = [session.index, session.log, *(functools.partial(sums[name].verify_all, n) for name, n in lengths)]
    for check in checks:
        try:
            check()
        except damage as e:
            verdict.problems.append(problem(e))
    verdict.checked_bytes = sum(nbytes for _, nbytes in lengths)
    return verdict


def check_session(root: Path, name: str) -> list[Verdict]:
    """Verdicts of the committed manifest, then of each kept commit, newest first."""
    directory = Path(root) / check_name(name)
    if not session_exists(root, name):
        raise SessionNotFound(f"no session {name!r} in {root}: list them with `mplus session ls`")
    refuse_links(directory, name)
    return [verify_commit(directory, path) for path in [directory / MANIFEST, *kept_commits(directory)]]


def rollback_session(root: Path, name: str) -> tuple[int | None, int]:
    """Return the session to its newest kept commit that verifies, under the writer lock: (commit it was
    at, None if its manifest was unreadable; commit it is at now). Newer commits' files are removed."""
    directory = Path(root) / check_name(name)
    check_session(root, name)  # found, and no links
    with exclusive_lock(directory / LOCK, name):
        current, *kept = check_session(root, name)
        if not current.problems:
            return current.commit, current.commit
        good = next((verdict for verdict in kept if not verdict.problems), None)
        if good is None:
            raise SessionDamaged(
                f"no kept commit of session {name!r} verifies ({current.problems[0]}): the damage is in data "
                f"every kept commit shares; remove the session with `mplus session rm {name}`"
            )
        write_atomic(directory / MANIFEST, read_prefix(directory / good.manifest))
        for path in [*directory.glob("commit-[0-9]*.json"), *directory.glob("index-[0-9]*.safetensors")]:
            if commit_number(path) > good.commit:
                path.unlink()
        fsync_path(directory)
        return current.commit, good.commit
