"""Durable file primitives: atomic writes, appends after the committed length, locks, checksums."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from ..memory.rows import SUM_BLOCK_BYTES, DamagedFile, block_sums
from .errors import SessionBusy, SessionDamaged, SessionNotFound

LOCK_TIMEOUT_S = 5.0
HOLE_BYTES = 1 << 20  # an appended run of zeros this long (aligned in the data) is left as a hole, not written

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


# -- durable file primitives ------------------------------------------------------------------------
def fsync_path(path: Path) -> None:
    """fsync a file or a directory (its entries: a rename in it) by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path, mode: int = 0o600) -> Iterator[BinaryIO]:
    """A file to write `path` through: a temp file (`mode`, under the umask) that is fsync'ed and renamed
    over `path` when the block ends, removed if it fails. Readers see the old file or the new one, never a
    mix or a part."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    fsync_path(path.parent)


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """`data` as the whole of `path`, atomically (atomic_file)."""
    with atomic_file(path, mode) as f:
        f.write(data)


def append_after(path: Path, committed: int, data: bytes | memoryview) -> int:
    """Drop whatever follows the first `committed` bytes of `path`, append `data`, fsync; the new length.
    Whole HOLE_BYTES blocks of zeros are not written: the file keeps them as holes, read back as zeros."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o600)
    try:
        os.ftruncate(fd, committed)
        view = memoryview(data).cast("B") if len(data) else memoryview(b"")
        for start, end in data_runs(view):
            done = start
            while done < end:
                done += os.pwrite(fd, view[done:end], committed + done)
        os.ftruncate(fd, committed + view.nbytes)
        os.fsync(fd)
    finally:
        os.close(fd)
    return committed + len(data)


def data_runs(view: memoryview) -> Iterator[tuple[int, int]]:
    """(start, end) of the parts of `view` to write: all of it but its whole HOLE_BYTES blocks of zeros."""
    start = 0
    for at in range(0, view.nbytes - HOLE_BYTES + 1, HOLE_BYTES):
        if all_zero(view[at : at + HOLE_BYTES]):
            if start < at:
                yield start, at
            start = at + HOLE_BYTES
    if start < view.nbytes:
        yield start, view.nbytes


def all_zero(view: memoryview) -> bool:
    """Whether every byte of `view` is zero."""
    return not np.count_nonzero(np.frombuffer(view, dtype=np.uint8))


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
    """Hold an flock on `path`; wait up to `timeout_s` (default LOCK_TIMEOUT_S), then raise SessionBusy. Once
    held, `path` must still be the file locked: a session removed or moved meanwhile raises SessionNotFound."""
    gone = SessionNotFound(f"session {name!r} was removed or moved while this command waited for it")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o600)
    except FileNotFoundError:
        raise gone from None
    with os.fdopen(fd, "r+b") as f:
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
            if not still_there(path, f.fileno()):
                raise gone
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def still_there(path: Path, fd: int) -> bool:
    """Whether `path` still names the open file `fd` (not removed, renamed away or replaced)."""
    try:
        return os.path.samestat(os.stat(path, follow_symlinks=False), os.fstat(fd))
    except FileNotFoundError:
        return False


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
