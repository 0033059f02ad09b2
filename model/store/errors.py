"""What goes wrong with a session, each error with a message that says what to do."""

from __future__ import annotations


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
