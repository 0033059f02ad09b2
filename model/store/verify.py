"""Checking a session's kept commits against their checksums, and rolling back to the newest sound one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..memory.rows import DamagedFile
from .errors import SessionDamaged, SessionNotFound
from .files import exclusive_lock, fsync_path, read_prefix, refuse_links, write_atomic
from .format import LOCK, MANIFEST, check_name, parse_manifest
from .session import Session, commit_files, commit_number, kept_commits, session_exists


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
        checks = session.integrity_checks()
    except damage as e:
        return Verdict(manifest_path.name, None, [problem(e)])
    verdict = Verdict(manifest_path.name, session.manifest["commit"], [])
    for check in checks:
        try:
            check()
        except damage as e:
            if problem(e) not in verdict.problems:
                verdict.problems.append(problem(e))
    sums = session.sums()  # read once, above
    verdict.checked_bytes = sum(nbytes for name, nbytes in session.committed_lengths() if sums[name] is not None)
    return verdict


def check_session(root: Path, name: str, quick: bool = False) -> list[Verdict]:
    """Verdicts of the committed manifest, then (unless `quick`) of each kept commit a rollback may need,
    newest first."""
    directory = Path(root) / check_name(name)
    if not session_exists(root, name):
        raise SessionNotFound(f"no session {name!r} in {root}: list them with `mplus session ls`")
    refuse_links(directory, name)
    kept = [] if quick else kept_commits(directory)
    return [verify_commit(directory, path) for path in [directory / MANIFEST, *kept]]


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
        for path in commit_files(directory):
            if commit_number(path) > good.commit:
                path.unlink()
        fsync_path(directory)
        return current.commit, good.commit
