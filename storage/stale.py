"""Spill directories of processes that died without cleaning up: each tiered store
spills into a directory of its own (`cache_dir_name`) and holds a lock file in it while
its process lives (`DiskTier.start`); a later process removes those nobody holds
(`sweep_stale`)."""

from __future__ import annotations

import fcntl
import os
import re
import uuid
from pathlib import Path

OWNER_LOCK = ".owner"
CACHE_DIR_NAME = re.compile(r"cache-([0-9]+)-[0-9a-f]{8}")


def cache_dir_name() -> str:
    """The name of this process's own spill directory (one per tiered store)."""
    return f"cache-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def sweep_stale(base: Path) -> int:
    """Remove the spill directories under `base` of processes that died without cleaning
    up (killed, out of memory): those whose owner lock nobody holds, or, without a lock
    file, whose process is gone. Returns how many were removed. Only names this module
    makes are touched, and only chunk files and the lock inside them."""
    removed = 0
    try:
        entries = list(Path(base).iterdir())
    except OSError:
        return 0
    for d in entries:
        m = CACHE_DIR_NAME.fullmatch(d.name)
        if not m or d.is_symlink() or not d.is_dir() or int(m.group(1)) == os.getpid():
            continue
        if not _owner_gone(d, int(m.group(1))):
            continue
        try:  # (another process may be sweeping the same folder)
            for f in d.iterdir():
                if f.name == OWNER_LOCK or f.suffix in (".arrow", ".tmp"):
                    f.unlink(missing_ok=True)
            d.rmdir()
            removed += 1
        except OSError:
            pass  # something else is in there, or it is gone already: leave it
    return removed


def process_gone(pid: int) -> bool:
    """No process has this id (one of another user's counts as there)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


def _owner_gone(d: Path, pid: int) -> bool:
    try:
        fd = os.open(d / OWNER_LOCK, os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        return process_gone(pid)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
