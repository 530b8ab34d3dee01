"""The storage layer's exception types (importable without torch, for the CLI)."""

from __future__ import annotations


class StorageError(Exception):
    """A tier file is missing, corrupt, or cannot be written; the message names it."""


class DiskFullError(StorageError):
    """The disk budget (or the disk) cannot take what must be spilled; nothing was lost."""


class SessionError(StorageError):
    """A session directory is missing, incomplete, corrupt or incompatible; names the file."""


class SessionLockedError(SessionError):
    """Another process is saving to this session."""


class SessionExistsError(SessionError):
    """The directory holds a saved session, and the save was not asked to replace it:
    another session, or (`changed`) the one the saver continues, saved again since it
    was loaded or saved by the saver (by another process, or another object)."""

    def __init__(self, path, hint: str = "", changed: bool = False):
        self.path, self.changed = path, changed
        what = (
            "was saved again since this session was loaded from it or saved to it (by "
            "another process or object), and that save was kept"
            if changed
            else "already holds a saved session, which was kept"
        )
        super().__init__(f"{path} {what}{hint}")

    def hinted(self, hint: str) -> SessionExistsError:
        """The same refusal, saying how the caller's user replaces the session."""
        return SessionExistsError(self.path, hint, self.changed)


class HostMemoryError(StorageError):
    """The driver refused to page-lock more host memory for the KV (a machine may allow
    less than it has); the message says how much and what to change."""


def first_line(e: BaseException, default: str = "") -> str:
    """The first line of what an exception says (a library's may run to many lines), or
    `default` where it says nothing: for one-line messages that quote it."""
    return (str(e).strip().splitlines() or [default])[0]
