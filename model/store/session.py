"""Sessions: open one as committed, load its memory, write injections to it as atomic commits."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes

from ..core.memoryllm import InjectResult, MemoryLLM
from ..memory.dtypes import dtype_name, dtype_of
from ..memory.ltm import EntryBank, LongTermMemory
from ..memory.provenance import FIELDS, Origins
from ..memory.rows import BlockSums, DamagedFile, FileArray, RowSpace, block_sums, populated_empty
from ..memory.state import MemoryState, new_generator, stm_rows
from .errors import SessionBusy, SessionDamaged, SessionExists, SessionMismatch, SessionNotFound, rollback_hint
from .files import (
    NOFOLLOW,
    append_after,
    copy_prefix,
    digest,
    exclusive_lock,
    file_sums,
    fsync_path,
    read_prefix,
    refuse_links,
    staged_directory,
    tensor_bytes,
    uninterrupted,
    write_atomic,
)
from .format import (
    APPENDED,
    INDEX_RETRIES,
    KEEP_COMMITS,
    LOCK,
    LOG,
    LTM_FILES,
    MANIFEST,
    ORIGINS,
    ROWS,
    SESSION_NAME,
    STORE_FORMAT,
    SUM_RECORD,
    SUMS,
    check_name,
    manifest_bytes,
    now,
    parse_manifest,
    sum_records,
)

INT32 = torch.iinfo(torch.int32)


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
        "label": model.info.label,
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
        return dtype_of(self.manifest["dtype"])

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
        key_dtype = dtype_of(info["key_dtype"])
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
            return safetensors_load(zlib.decompress(data) if path.suffix == ".zlib" else data)
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
        ids = index["memory_ids"].long()  # [L, N]
        memory = populated_empty((*ids.shape, space.width), space.dtype)  # [L, N, d]
        for layer, layer_ids in enumerate(ids):  # a layer's ids ascend (rows keep their order): read in place
            space.gather(layer_ids, out=memory[layer])
        tensors = {"memory": memory, "generator_state": index["generator_state"]}
        meta = self.manifest["state"]
        next_row_id = self.base + self.manifest["rows"]["count"]
        ltm = None
        if "ltm" in meta:
            tensors["memory_ages"] = index["memory_ages"].long()
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
        key_dtype = None if info.get("keys_follow_rows", True) else dtype_of(info["key_dtype"])
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
        checking every byte it builds on (a damaged session is never written to: no byte changes, and the
        error points at `session check`). A format-3 session is upgraded first."""
        with exclusive_lock(self.directory / LOCK, self.name, timeout_s):
            session = self.reopen()
            if "sums" not in session.manifest:
                session = session.upgraded()
            session.verify()
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
        index_name, index = index_file(0), index_bytes(state)
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

    def integrity_checks(self) -> list[Callable[[], object]]:
        """A check for everything this commit is built from: its index, its log, and every committed byte of
        the append-only files against their block checksums. A check raises SessionDamaged or DamagedFile
        naming the file; `session check` and every writer run them all."""
        sums = self.sums()
        checks: list[Callable[[], object]] = [self.index, self.log]
        lengths = [(name, n) for name, n in self.committed_lengths() if sums[name] is not None]
        checks += [functools.partial(sums[name].verify_all, n) for name, n in lengths]
        return checks

    def verify(self) -> None:
        """Run every integrity check; the first failure as SessionDamaged, pointing at `session check`."""
        try:
            for check in self.integrity_checks():
                check()
        except (DamagedFile, OSError) as e:
            message = str(e) if "session check" in str(e) else str(e) + self.hint
            raise SessionDamaged(message) from e

    def committed_lengths(self) -> list[tuple[str, int]]:
        """(file, committed bytes) of the append-only files."""
        info = self.manifest["rows"]
        lengths = [(ROWS, info["count"] * info["width"] * self.dtype.itemsize), (LOG, self.manifest["log"]["bytes"])]
        lengths.append((ORIGINS, self.manifest.get("origins", {}).get("runs", 0) * FIELDS * 8))
        if "ltm" in self.manifest:
            ltm = self.manifest["ltm"]
            key_bytes = max(ltm["key_width"], 1) * dtype_of(ltm["key_dtype"]).itemsize
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
    tensors = {"memory_ids": narrowed(state.memory_ids), "generator_state": state.generator.get_state()}
    if state.ltm is not None:
        tensors |= {"memory_ages": narrowed(state.memory_ages)} | state.ltm.layout()
    return tensors


def index_bytes(state: MemoryState) -> bytes:
    """A commit's index file: the safetensors of `index_tensors`, zlib-compressed at level 1 (a few ms; the
    ids and ages a commit rewrites shrink about 4x)."""
    return zlib.compress(safetensors_bytes(index_tensors(state)), 1)


def index_file(commit: int) -> str:
    return f"index-{commit:06d}.safetensors.zlib"


def narrowed(values: torch.Tensor) -> torch.Tensor:
    """int64 ids or ages as int32 when they fit (half the bytes of the index every commit rewrites); read
    back as int64."""
    fits = values.numel() == 0 or (int(values.min()) >= INT32.min and int(values.max()) <= INT32.max)
    return values.to(torch.int32 if fits else torch.int64).contiguous()


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
        index_name, index = index_file(commit), index_bytes(state)
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
    key_dtype = dtype_of(info["key_dtype"])
    tensors = (new[0], new[1], new[2].to(key_dtype))
    appends = [(name, tensor_bytes(tensor)) for name, tensor in zip(LTM_FILES, tensors, strict=True)]
    return appends, info | {"entries": info["entries"] + new[0].shape[0]}


def commit_number(path: Path) -> int:
    """NNNNNN of commit-NNNNNN.json or index-NNNNNN.safetensors[.zlib]."""
    return int(path.name.split("-")[1].split(".")[0])


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Keep a copy of the commit's manifest (for rollback), then make it the committed one."""
    data = manifest_bytes(manifest)
    write_atomic(directory / f"commit-{manifest['commit']:06d}.json", data)
    write_atomic(directory / MANIFEST, data)


def kept_commits(directory: Path) -> list[Path]:
    """The kept manifest copies, newest first."""
    return sorted(directory.glob("commit-[0-9]*.json"), key=commit_number, reverse=True)


def commit_files(directory: Path) -> list[Path]:
    """Every commit's manifest copy and index file (index-NNNNNN.safetensors[.zlib])."""
    return [*directory.glob("commit-[0-9]*.json"), *directory.glob("index-[0-9]*.safetensors*")]


def retire_commits(directory: Path, commit: int) -> None:
    """Delete the manifest copies and index files of commits older than the last KEEP_COMMITS (readers may
    still be on the previous one)."""
    for path in commit_files(directory):
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
