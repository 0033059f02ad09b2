"""Sessions: named, durable memory states that many injections and questions build on.

A session is a directory under the store root (format 3):

    manifest.json             the committed state: model binding, storage dtype, seed, counters, the
                              committed lengths of the files below, and a partial injection in progress
                              (replaced atomically at each commit)
    rows.bin                  append-only: every row the session's injections wrote, [R, d] raw values of
                              the storage dtype in row-id order. Row id `base + r` is record r; ids below
                              `base` are the model's own initial rows (short-term, then long-term), never
                              copied here
    log.jsonl                 append-only: one JSON line per injected source (or a partial one, abandoned)
    index-NNNNNN.safetensors  commit NNNNNN: `memory_ids` [L, N] (the short-term rows), the drop generator;
                              M+: the short-term rows' ages and the LTM's layout (runs of entry ids, run-
                              length recall frequencies: see LongTermMemory.layout)
    ltm_row_ids.bin, ltm_births.bin, ltm_keys.bin
                              M+ only, append-only: one record per LTM entry past the model's initial ones:
                              the id of its row (in rows.bin or the model), its birth and its key
    lock                      flock'ed by the one writer

Each row is stored once, in the storage dtype (bfloat16 for real and demo models, float32 for the tiny
presets): an entry of the long-term memory refers to its row by id. An inject commits after every chunk:
it appends the chunk's rows, the LTM entries it made and its log line (fsync), writes the new index
(fsync, rename), then replaces the manifest (temp file, fsync, os.replace): a crash loses at most the chunk
in flight. Bytes past the committed lengths belong to an interrupted commit: they are ignored and
truncated before the next append. Readers only follow the committed manifest. Opening reads the manifest,
the index and the short-term rows; long-term rows and keys stay in the files and are read, a batch at a
time, only when a question scores or retrieves them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from .ltm import EntryBank, LongTermMemory
from .memory import MemoryState, new_generator, stm_rows
from .memoryllm import InjectResult, MemoryLLM
from .rows import FileArray, RowSpace, populated_empty

STORE_FORMAT = 3
SESSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MANIFEST, ROWS, LOG, LOCK = "manifest.json", "rows.bin", "log.jsonl", "lock"
LTM_FILES = ("ltm_row_ids.bin", "ltm_births.bin", "ltm_keys.bin")  # M+: entries' row id, birth, key
LOCK_TIMEOUT_S = 5.0
INDEX_RETRIES = 5  # a reader retries when a writer retired the index it was about to read
MANIFEST_KEYS = ("model", "dtype", "rows", "log", "index", "state", "commit")


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
    """The session's files cannot be read as a memory state."""


# -- names, places, time ------------------------------------------------------------------------------
def default_root() -> Path:
    """$MPLUS_HOME, else the user cache directory's mplus/sessions."""
    if os.environ.get("MPLUS_HOME"):
        return Path(os.environ["MPLUS_HOME"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "mplus" / "sessions"


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
def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temp file, fsync it, and rename it over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def append_after(path: Path, committed: int, data: bytes | memoryview) -> int:
    """Drop whatever follows the first `committed` bytes of `path`, append `data`, fsync; the new length."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
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


def read_prefix(path: Path, length: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(length)


def copy_prefix(source: Path, target: Path, length: int) -> None:
    """The first `length` bytes of `source` into a new file `target` (copied in the kernel where it can)."""
    with open(source, "rb") as src, open(target, "wb") as dst:
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
    with open(path, "a") as f:
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
        directory = Path(root) / check_name(name)
        path = directory / MANIFEST
        if not path.is_file():
            raise SessionNotFound(f"no session {name!r} in {root}: list them with `mplus session ls`")
        try:
            manifest = json.loads(path.read_text())
            found = manifest.get("format")
            if found != STORE_FORMAT:
                raise SessionDamaged(
                    f"session {name!r} was written in store format {found!r}, this mplus reads format {STORE_FORMAT}: "
                    "inject its sources into a new session"
                )
            missing = [key for key in MANIFEST_KEYS if key not in manifest]
            if missing:
                raise ValueError(f"missing {', '.join(missing)}")
        except (ValueError, AttributeError, UnicodeDecodeError) as e:
            raise SessionDamaged(
                f"session {name!r} has a corrupted manifest ({type(e).__name__}: {e}); "
                f"remove it with `mplus session rm {name}`"
            ) from e
        return cls(directory, manifest)

    def reopen(self) -> Session:
        return Session.open(self.directory.parent, self.name)

    # -- reading -------------------------------------------------------------------------------------
    @property
    def base(self) -> int:
        """Row id of rows.bin's first record: the model's initial rows take the ids below."""
        return self.manifest["rows"]["base"]

    def rows_file(self) -> FileArray:
        """The committed rows [R, d] of rows.bin (read on demand)."""
        info = self.manifest["rows"]
        return FileArray(self.directory / ROWS, info["count"], info["width"], self.dtype)

    def entry_files(self) -> tuple[FileArray, FileArray, FileArray]:
        """The committed M+ entries: row ids [E], births [E], keys [E, s] (read on demand)."""
        info = self.manifest["ltm"]
        count, names = info["entries"], [self.directory / name for name in LTM_FILES]
        key_dtype = getattr(torch, info["key_dtype"])
        return (
            FileArray(names[0], count, 0, torch.int64),
            FileArray(names[1], count, 0, torch.int64),
            FileArray(names[2], count, info["key_width"], key_dtype),
        )

    def index(self) -> dict[str, torch.Tensor]:
        return load_file(self.directory / self.manifest["index"])

    def log(self) -> list[dict[str, Any]]:
        data = read_prefix(self.directory / LOG, self.manifest["log"]["bytes"])
        return [json.loads(line) for line in data.decode().splitlines()]

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
        return MemoryState.from_tensors(tensors, meta, device, ltm, ids, next_row_id)

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

    # -- writing -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def writer(self, timeout_s: float | None = None) -> Iterator[Writer]:
        """The one writer: holds the session lock and starts from the manifest committed under it."""
        with exclusive_lock(self.directory / LOCK, self.name, timeout_s):
            yield Writer(self.reopen())

    # -- the store: create, list, fork, remove ------------------------------------------------------
    @classmethod
    def create(
        cls,
        root: Path,
        name: str,
        initial: MemoryState,
        model_ref: dict[str, Any],
        seed: int,
        dtype: torch.dtype,
    ) -> Session:
        """A new session at the model's initial memory `initial`, with a drop generator seeded by `seed`,
        keeping its rows in `dtype`. Built in a hidden temp directory and renamed into place; raises
        SessionExists if the name is taken (also when another process created it first)."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        target = root / check_name(name)
        if (target / MANIFEST).exists():
            raise SessionExists(f"session {name!r} already exists in {root}")
        tmp = root / f".{name}.new-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)
        state = initial.clone()
        state.generator = new_generator(seed)
        index_name = "index-000000.safetensors"
        write_atomic(tmp / index_name, safetensors_bytes(index_tensors(state)))
        for filename in (ROWS, LOG, LOCK) + (LTM_FILES if state.ltm is not None else ()):
            (tmp / filename).touch(mode=0o600)
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
        write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        try:
            os.rename(tmp, target)
        except OSError:  # created meanwhile by another process
            shutil.rmtree(tmp, ignore_errors=True)
            raise SessionExists(f"session {name!r} already exists in {root}") from None
        fsync_dir(root)
        return Session.open(root, name)

    def fork(self, new_name: str) -> Session:
        """A copy of this session as committed now, under `new_name` (which must not exist)."""
        root = self.directory.parent
        if (root / check_name(new_name) / MANIFEST).exists():
            raise SessionExists(f"session {new_name!r} already exists: pick another name or remove it first")
        with self.writer() as writer:
            source = writer.session
            tmp = root / f".{new_name}.fork-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(mode=0o700)
            for filename, nbytes in source.committed_lengths():
                copy_prefix(source.directory / filename, tmp / filename, nbytes)
            shutil.copyfile(source.directory / source.manifest["index"], tmp / source.manifest["index"])
        (tmp / LOCK).touch(mode=0o600)
        manifest = source.manifest | {"name": new_name, "forked_from": self.name, "updated": now()}
        write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        try:
            os.rename(tmp, root / new_name)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise SessionExists(f"session {new_name!r} already exists: pick another name or remove it first") from None
        return Session.open(root, new_name)

    def committed_lengths(self) -> list[tuple[str, int]]:
        """(file, committed bytes) of the append-only files."""
        info = self.manifest["rows"]
        lengths = [(ROWS, info["count"] * info["width"] * self.dtype.itemsize), (LOG, self.manifest["log"]["bytes"])]
        if "ltm" in self.manifest:
            lengths += [(f.path.name, f.count * f.record_bytes) for f in self.entry_files()]
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
        directory = session.directory
        rows = torch.cat(self.pending_rows) if self.pending_rows else torch.empty(0, manifest["rows"]["width"])
        committed = session.committed_lengths()
        append_after(directory / ROWS, committed[0][1], tensor_bytes(rows.to(session.dtype)))
        manifest["rows"] = manifest["rows"] | {"count": manifest["rows"]["count"] + rows.shape[0]}
        lines = "".join(json.dumps(entry) + "\n" for entry in log).encode()
        log_bytes = append_after(directory / LOG, committed[1][1], lines)
        manifest["log"] = {"bytes": log_bytes, "entries": manifest["log"]["entries"] + len(log)}
        if state.ltm is not None:
            manifest["ltm"] = append_entries(directory, manifest["ltm"], state.ltm.bank, committed[2:])
        commit = manifest["commit"] + 1
        index_name = f"index-{commit:06d}.safetensors"
        write_atomic(directory / index_name, safetensors_bytes(index_tensors(state)))
        manifest |= {"commit": commit, "index": index_name, "state": state_meta(state, session.dtype)}
        manifest |= {"updated": now(), "chunks": manifest["chunks"] + len(self.pending_rows), "partial": partial}
        write_atomic(directory / MANIFEST, json.dumps(manifest, indent=1).encode())
        retire_indexes(directory, keep={index_name, session.manifest["index"]})
        return Session(directory, manifest)


def append_entries(
    directory: Path, info: dict[str, Any], bank: EntryBank, committed: list[tuple[str, int]]
) -> dict[str, Any]:
    """Append the bank entries added since the last commit to the entry files; the new `ltm` manifest entry."""
    new = bank.added_since(info["initial_entries"] + info["entries"])  # row ids [m], births [m], keys [m, s]
    key_dtype = getattr(torch, info["key_dtype"])
    for (name, nbytes), tensor in zip(committed, (new[0], new[1], new[2].to(key_dtype)), strict=True):
        append_after(directory / name, nbytes, tensor_bytes(tensor))
    return info | {"entries": info["entries"] + new[0].shape[0]}


def retire_indexes(directory: Path, keep: set[str]) -> None:
    """Delete index files other than the new and the previous commit's (readers may still be on it)."""
    for path in directory.glob("index-*.safetensors"):
        if path.name not in keep:
            path.unlink(missing_ok=True)


def session_exists(root: Path, name: str) -> bool:
    return (Path(root) / check_name(name) / MANIFEST).is_file()


def list_sessions(root: Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if SESSION_NAME.fullmatch(p.name) and (p / MANIFEST).is_file())


def remove_session(root: Path, name: str) -> None:
    """Remove a session once no writer holds it (renamed away first, so it vanishes at once); works on a
    session whose manifest is corrupted."""
    directory = Path(root) / check_name(name)
    if not directory.is_dir():
        raise SessionNotFound(f"no session {name!r} in {root}: list them with `mplus session ls`")
    trash = Path(root) / f".{name}.rm-{os.getpid()}"
    with exclusive_lock(directory / LOCK, name):
        os.rename(directory, trash)
    shutil.rmtree(trash)
