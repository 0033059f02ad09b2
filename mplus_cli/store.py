"""The session store: named, durable memory states that many `inject` and `ask` calls build on.

A session is a directory under the store root:

    manifest.json            the committed state: model binding, seed, counters, and the names and
                             committed lengths of the files below (replaced atomically at each commit)
    rows.bin                 append-only delta rows: every injection appends its [L, k, d] block in the
                             model dtype (raw bytes; read with torch.from_file / numpy.memmap)
    log.jsonl                append-only injection log, one JSON line per injected source
    index-NNNNNN.safetensors the live rows of commit NNNNNN: `ids` [L, N] int64 (id < N: row id of the
                             model's initial memory of that layer, never copied here; id >= N: row
                             id - N of rows.bin viewed as [R, d]) and the drop generator's state;
                             M+: the short-term rows' ages and the LTM's layout (below)
    ltm_rows.bin, ltm_keys.bin, ltm_births.bin
                             M+ only, append-only: the LTM's bank entries past the model's initial LTM
                             (every row that entered the LTM or its cache: row [d], retrieval key [s],
                             birth int64), in bank order
    lock                     flock'ed by the one writer

An inject therefore writes its new rows plus an index of L*N ids, never the pool. An M+ inject also
appends the rows it dropped into the LTM (so those rows are stored twice: once as new rows, once as
LTM entries) and writes the LTM's layout: per layer the runs of consecutive entry ids of its rows and
its recall frequencies run-length encoded (see LongTermMemory.layout), O(runs), never the LTM itself.
Loading memory-maps the entry files: keys are read, rows only when a question retrieves them.

A commit appends rows, log and LTM entries (fsync), writes the new index (fsync, rename), then replaces
the manifest (temp file, fsync, os.replace). Bytes past the committed lengths belong to an interrupted
commit: they are ignored and truncated before the next append. Readers only follow the committed manifest.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

import model as mp
from model.ltm import LongTermMemory, RowBank

from .errors import ConflictError, MplusError, NotFoundError, UsageError

STORE_FORMAT = 2
SESSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MANIFEST, ROWS, LOG, LOCK = "manifest.json", "rows.bin", "log.jsonl", "lock"
LTM_FILES = ("ltm_rows.bin", "ltm_keys.bin", "ltm_births.bin")  # M+: bank entries' rows, keys, births
LOCK_TIMEOUT_S = 5.0
INDEX_RETRIES = 5  # a reader retries when a writer retired the index it was about to read


def default_root() -> Path:
    """$MPLUS_HOME, else the user cache directory's mplus/sessions."""
    if os.environ.get("MPLUS_HOME"):
        return Path(os.environ["MPLUS_HOME"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "mplus" / "sessions"


def check_name(name: str) -> str:
    if not SESSION_NAME.fullmatch(name) or name in (".", ".."):
        raise UsageError(
            f"invalid session name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def append_after(path: Path, committed: int, data: bytes | memoryview) -> int:
    """Drop whatever follows the first `committed` bytes of `path`, append `data`, fsync; the new length."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, committed)
        os.lseek(fd, committed, os.SEEK_SET)
        with os.fdopen(os.dup(fd), "wb", closefd=True) as f:
            f.write(data)
            f.flush()
        os.fsync(fd)
    finally:
        os.close(fd)
    return committed + len(data)


def mapped(path: Path, count: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """The first `count` rows [count, width] (or [count] for width 0) of `path`, memory-mapped: pages are
    read only when indexed."""
    shape = (count, width) if width else (count,)
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.from_file(str(path), shared=False, size=count * max(width, 1), dtype=dtype).view(shape)


def read_prefix(path: Path, length: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(length)


@contextlib.contextmanager
def exclusive_lock(path: Path, name: str, timeout_s: float | None = None) -> Iterator[None]:
    """Hold an flock on `path`; wait up to `timeout_s` (default LOCK_TIMEOUT_S), then raise ConflictError."""
    with open(path, "a") as f:
        deadline = time.monotonic() + (LOCK_TIMEOUT_S if timeout_s is None else timeout_s)
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ConflictError(
                        f"session {name!r} is busy: another mplus command is writing to it; retry when it finishes"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# -- row ids ----------------------------------------------------------------------------------------
def track_injection(ids: torch.Tensor, result: mp.InjectResult, first_id: int) -> torch.Tensor:
    """The live row ids [L, N'] after an injection whose delta [L, k, d] got the row ids first_id.. ."""
    L, k = result.delta.shape[:2]
    new = first_id + torch.arange(L * k).view(L, k)
    return torch.cat([ids, new], dim=1).gather(1, result.sources)


def gather_rows(ids: torch.Tensor, initial: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Memory [L, N, d] from ids [L, N]: ids below the model's initial row count I (initial: [L, I, d]) are
    initial rows, the others index the appended rows [R, d] at id - I."""
    I = initial.shape[1]
    memory = torch.empty(*ids.shape, initial.shape[-1], dtype=initial.dtype)
    for layer in range(ids.shape[0]):
        from_initial = ids[layer] < I
        memory[layer, from_initial] = initial[layer, ids[layer, from_initial]].cpu()
        memory[layer, ~from_initial] = rows[ids[layer, ~from_initial] - I]
    return memory.to(initial.device)


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

    @classmethod
    def open(cls, root: Path, name: str) -> Session:
        directory = Path(root) / check_name(name)
        path = directory / MANIFEST
        if not path.is_file():
            raise NotFoundError(f"no session {name!r} in {root}: list them with `mplus session ls`")
        try:
            manifest = json.loads(path.read_text())
            if manifest.get("format") != STORE_FORMAT:
                raise ValueError(f"unknown format {manifest.get('format')!r}")
            missing = [key for key in ("model", "rows", "log", "index", "state", "commit") if key not in manifest]
            if missing:
                raise ValueError(f"missing {', '.join(missing)}")
        except (ValueError, AttributeError, UnicodeDecodeError) as e:
            raise MplusError(
                f"session {name!r} has a corrupted manifest ({type(e).__name__}: {e}); "
                f"remove it with `mplus session rm {name}`"
            ) from e
        return cls(directory, manifest)

    def reopen(self) -> Session:
        return Session.open(self.directory.parent, self.name)

    # -- reading -------------------------------------------------------------------------------------
    def rows(self, row_width: int, dtype: torch.dtype) -> torch.Tensor:
        """The committed appended rows [R, d], memory-mapped (pages are read only when indexed)."""
        count = self.manifest["rows"]["bytes"] // (dtype.itemsize * row_width)
        return mapped(self.directory / ROWS, count, row_width, dtype)

    def index(self) -> dict[str, torch.Tensor]:
        return load_file(self.directory / self.manifest["index"])

    def log(self) -> list[dict[str, Any]]:
        data = read_prefix(self.directory / LOG, self.manifest["log"]["bytes"])
        return [json.loads(line) for line in data.decode().splitlines()]

    def load_state(self, model: mp.MemoryLLM) -> mp.MemoryState:
        """The committed memory state, rebuilt from the model's initial memory and the appended rows."""
        session = self
        for _ in range(INDEX_RETRIES):
            try:
                return session.build_state(model, session.index())
            except FileNotFoundError:
                session = session.reopen()
        return session.build_state(model, session.index())

    def build_state(self, model: mp.MemoryLLM, index: dict[str, torch.Tensor]) -> mp.MemoryState:
        initial = model.initial_state.memory
        rows = self.rows(initial.shape[-1], initial.dtype)
        tensors = {"memory": gather_rows(index["ids"], initial, rows), "generator_state": index["generator_state"]}
        meta = self.manifest["state"]
        if "ltm" not in meta:
            return mp.MemoryState.from_tensors(tensors, meta, device=initial.device)
        ltm = LongTermMemory.from_layout(self.ltm_bank(model), index, meta["ltm"])
        tensors["memory_ages"] = index["memory_ages"]
        return mp.MemoryState.from_tensors(tensors, meta, device=initial.device, ltm=ltm)

    def ltm_bank(self, model: mp.MemoryLLM) -> RowBank:
        """The M+ bank: the model's initial LTM entries (never copied here), then the committed entry
        files, memory-mapped."""
        bank, info = model.initial_state.ltm.bank, self.manifest["ltm"]
        if len(bank) != info["initial_entries"]:
            raise MplusError(
                f"session {self.name!r} was created with {info['initial_entries']} initial LTM rows, the model has "
                f"{len(bank)}: use the model it was created with"
            )
        (d, s), count = bank.widths, info["entries"]
        names = [self.directory / name for name in LTM_FILES]
        files = (mapped(names[0], count, d, bank.dtype), mapped(names[1], count, s, bank.parts[0][1].dtype))
        part = (*files, mapped(names[2], count, 0, torch.int64))
        return RowBank([*bank.frozen(len(bank)), part], aged=self.manifest["state"]["ltm"]["aged"])

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.directory.iterdir() if p.is_file())

    # -- writing -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def writer(self, timeout_s: float | None = None) -> Iterator[Writer]:
        """The one writer: holds the session lock and starts from the manifest committed under it."""
        with exclusive_lock(self.directory / LOCK, self.name, timeout_s):
            yield Writer(self.reopen())


@dataclass
class Writer:
    """Stages injections (rows, ids, log lines) and commits them as one atomic step."""

    session: Session
    pending_rows: list[torch.Tensor] = field(default_factory=list)
    pending_log: list[dict[str, Any]] = field(default_factory=list)
    ids: torch.Tensor | None = None
    row_width: int = 0

    def load_state(self, model: mp.MemoryLLM) -> mp.MemoryState:
        index = self.session.index()
        self.ids, self.row_width = index["ids"], model.cfg.hidden_size
        return self.session.build_state(model, index)

    def staged_rows(self) -> int:
        committed = self.session.manifest["rows"]["bytes"] // (self.row_width * self.itemsize())
        return committed + sum(block.shape[0] * block.shape[1] for block in self.pending_rows)

    def itemsize(self) -> int:
        return getattr(torch, self.session.model_ref["dtype"]).itemsize

    def inject(self, model: mp.MemoryLLM, state: mp.MemoryState, ids: torch.Tensor) -> mp.InjectResult:
        """model.inject on `state`, staging the new rows and the new row ids."""
        result = model.inject(state, ids)
        self.ids = track_injection(self.ids, result, model.initial_state.rows_per_layer + self.staged_rows())
        self.pending_rows.append(result.delta.to(state.memory.dtype).cpu().contiguous())
        return result

    def record(self, entry: dict[str, Any]) -> None:
        self.pending_log.append(entry)

    def commit(self, state: mp.MemoryState) -> Session:
        """Append rows and log, write the index, then atomically replace the manifest."""
        session, manifest = self.session, dict(self.session.manifest)
        directory = session.directory
        rows = b"".join(block.view(torch.uint8).numpy().tobytes() for block in self.pending_rows)
        log = "".join(json.dumps(entry) + "\n" for entry in self.pending_log).encode()
        commit = manifest["commit"] + 1
        index_name = f"index-{commit:06d}.safetensors"
        manifest["rows"] = manifest["rows"] | {"bytes": append_after(directory / ROWS, manifest["rows"]["bytes"], rows)}
        log_bytes = append_after(directory / LOG, manifest["log"]["bytes"], log)
        manifest["log"] = {"bytes": log_bytes, "entries": manifest["log"]["entries"] + len(self.pending_log)}
        meta = state.to_meta()
        if state.ltm is not None:
            manifest["ltm"] = append_ltm_entries(directory, manifest["ltm"], state.ltm.bank)
            meta["ltm"] = state.ltm.layout_meta()
        write_atomic(directory / index_name, safetensors_bytes(index_tensors(state, self.ids)))
        manifest |= {"commit": commit, "index": index_name, "state": meta, "updated": now()}
        manifest["chunks"] = manifest["chunks"] + len(self.pending_rows)
        write_atomic(directory / MANIFEST, json.dumps(manifest, indent=1).encode())
        retire_indexes(directory, keep={index_name, session.manifest["index"]})
        self.session = Session(directory, manifest)
        self.pending_rows, self.pending_log = [], []
        return self.session


def append_ltm_entries(directory: Path, info: dict[str, Any], bank: RowBank) -> dict[str, Any]:
    """Append the bank entries added since the last commit to the entry files; the new `ltm` manifest entry."""
    committed = info["initial_entries"] + info["entries"]
    new = bank.added_since(committed)  # rows [m, d], keys [m, s], births [m]
    for (name, nbytes), tensor in zip(entry_bytes(info), new, strict=True):
        append_after(directory / name, nbytes, tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return info | {"entries": info["entries"] + new[0].shape[0]}


def entry_bytes(info: dict[str, Any]) -> list[tuple[str, int]]:
    """(file, committed bytes) of the entry files."""
    sizes = (info["row_bytes"], info["key_bytes"], 8)
    return [(name, info["entries"] * size) for name, size in zip(LTM_FILES, sizes, strict=True)]


def index_tensors(state: mp.MemoryState, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """What a commit's index file holds: the live ids, the drop generator, and for M+ the short-term ages
    and the LTM layout."""
    tensors = {"ids": ids.contiguous(), "generator_state": state.generator.get_state()}
    if state.ltm is not None:
        tensors |= {"memory_ages": state.memory_ages.contiguous()} | state.ltm.layout()
    return tensors


def retire_indexes(directory: Path, keep: set[str]) -> None:
    """Delete index files other than the new and the previous commit's (readers may still be on it)."""
    for path in directory.glob("index-*.safetensors"):
        if path.name not in keep:
            path.unlink(missing_ok=True)


# -- the store: create, list, fork, remove ---------------------------------------------------------
def session_exists(root: Path, name: str) -> bool:
    return (Path(root) / check_name(name) / MANIFEST).is_file()


def create_session(root: Path, name: str, model: mp.MemoryLLM, model_ref: dict[str, Any], seed: int) -> Session:
    """A new session at the model's initial memory with a drop generator seeded by `seed`.

    Built in a hidden temp directory and renamed into place; if another process created the session
    first, that one is returned.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    target = root / check_name(name)
    tmp = root / f".{name}.new-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    state = model.new_state(seed)
    L, N = state.memory.shape[:2]
    ids = torch.arange(N).repeat(L, 1)
    index_name = "index-000000.safetensors"
    write_atomic(tmp / index_name, safetensors_bytes(index_tensors(state, ids)))
    for filename in (ROWS, LOG, LOCK) + (LTM_FILES if state.ltm is not None else ()):
        (tmp / filename).touch()
    manifest = {
        "format": STORE_FORMAT,
        "name": name,
        "created": now(),
        "updated": now(),
        "model": model_ref,
        "seed": seed,
        "commit": 0,
        "chunks": 0,
        "rows": {"file": ROWS, "bytes": 0, "dtype": model_ref["dtype"], "row_width": state.memory.shape[-1]},
        "log": {"bytes": 0, "entries": 0},
        "index": index_name,
        "state": state.to_meta(),
    }
    if state.ltm is not None:
        bank = state.ltm.bank
        (d, s), (rows, keys, _) = bank.widths, bank.parts[0]
        manifest["ltm"] = {
            "initial_entries": len(bank),
            "entries": 0,
            "row_bytes": d * rows.dtype.itemsize,
            "key_bytes": s * keys.dtype.itemsize,
        }
        manifest["state"]["ltm"] = state.ltm.layout_meta()
    write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    try:
        os.rename(tmp, target)
    except OSError:  # created meanwhile by another process
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(root)
    return Session.open(root, name)


def list_sessions(root: Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if SESSION_NAME.fullmatch(p.name) and (p / MANIFEST).is_file())


def fork_session(root: Path, name: str, new_name: str) -> Session:
    """A copy of `name` as committed now, under `new_name` (which must not exist)."""
    root = Path(root)
    if session_exists(root, new_name):
        raise ConflictError(f"session {new_name!r} already exists: pick another name or remove it first")
    source = Session.open(root, name)
    with source.writer() as writer:
        source = writer.session
        tmp = root / f".{new_name}.fork-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        lengths = [(ROWS, source.manifest["rows"]["bytes"]), (LOG, source.manifest["log"]["bytes"])]
        lengths += entry_bytes(source.manifest["ltm"]) if "ltm" in source.manifest else []
        for filename, nbytes in lengths:
            (tmp / filename).write_bytes(read_prefix(source.directory / filename, nbytes))
        shutil.copyfile(source.directory / source.manifest["index"], tmp / source.manifest["index"])
    (tmp / LOCK).touch()
    manifest = source.manifest | {"name": new_name, "forked_from": name, "updated": now()}
    write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    try:
        os.rename(tmp, root / new_name)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConflictError(f"session {new_name!r} already exists: pick another name or remove it first") from None
    return Session.open(root, new_name)


def remove_session(root: Path, name: str) -> None:
    """Remove a session once no writer holds it (renamed away first, so it vanishes at once); works on a
    session whose manifest is corrupted."""
    directory = Path(root) / check_name(name)
    if not directory.is_dir():
        raise NotFoundError(f"no session {name!r} in {root}: list them with `mplus session ls`")
    trash = Path(root) / f".{name}.rm-{os.getpid()}"
    with exclusive_lock(directory / LOCK, name):
        os.rename(directory, trash)
    shutil.rmtree(trash)
