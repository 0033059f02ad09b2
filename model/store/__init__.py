"""Sessions on disk. Floors, lowest first: errors, files (durable primitives), format (names, manifest),
session (open, load, write), inject (texts in, resumable), export (one file), verify (check and roll back)."""

from ..memory.dtypes import dtype_name
from ..memory.rows import DamagedFile
from . import files, format
from .errors import (
    InvalidName,
    SessionBusy,
    SessionDamaged,
    SessionExists,
    SessionMismatch,
    SessionNotFound,
    StoreError,
)
from .export import load_exported_memory, write_memory_export
from .files import write_atomic
from .format import check_name, default_root, now
from .inject import InjectRun, inject_sources, resume_plan
from .session import Session, Writer, binding, initial_rows, kept_commits, list_sessions, remove_session, session_exists
from .verify import check_session, rollback_session

__all__ = [
    "files",
    "format",
    "load_exported_memory",
    "write_memory_export",
    "InjectRun",
    "inject_sources",
    "resume_plan",
    "DamagedFile",
    "InvalidName",
    "Session",
    "SessionBusy",
    "SessionDamaged",
    "SessionExists",
    "SessionMismatch",
    "SessionNotFound",
    "StoreError",
    "Writer",
    "binding",
    "check_name",
    "check_session",
    "default_root",
    "dtype_name",
    "initial_rows",
    "kept_commits",
    "list_sessions",
    "now",
    "remove_session",
    "rollback_session",
    "session_exists",
    "write_atomic",
]
