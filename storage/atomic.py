"""Files written whole or not at all: a temporary name, fsync, rename, the directory
fsynced. A crash or a full disk leaves the old file (or none), never a part of one."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, payload) -> None:
    """Write `payload` to `path` via a temporary file, fsync, rename, fsync the directory.
    `payload`: bytes, or a function that writes the file at the path it is given (and
    may raise to leave nothing behind)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        if callable(payload):
            payload(tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            with open(tmp, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def existing_ancestor(path: Path) -> Path:
    """`path`, or the nearest folder above it that exists (where it would be made): what
    a file system's free space is asked of."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe
