"""Sessions on disk: a saved KV cache that any later process can load and continue.

    DIR/
      .lock                 flock'ed while a save runs: a second writer is refused
      CURRENT               the name of the complete version (replaced atomically)
      v-<id>/
        manifest.json       format version, model fingerprint, tokenizer hash, runtime
                            config, token ids, layout, caller metadata, and per file
                            its size and the sha256 of each 64 MiB of it (chunk files:
                            size; their chunks carry crc32s checked on every read)
        kv/L000-*.arrow     the chunks of each layer (storage.disk format)
        device.safetensors  the key summaries of every layer
        abstracts.safetensors  the chunk abstracts of every layer (read on a thread after
                            the load: only the chunk selector, spills and saves use them)
        index.safetensors   the selection index of every layer (if any)

Format 1 (before 2026-12-02; still loaded) kept the abstracts in device.safetensors and
hashed each tensor file whole, on one thread per file: the 5 GiB of summaries and
abstracts of the 8B shape at 128k took 3 s to check.

A save writes `v-<new>.tmp`, fsyncs every file, renames it to `v-<new>`, then
replaces CURRENT and removes older versions. A crash at any point leaves CURRENT
naming a complete version (the previous one), or no CURRENT at all on a first
save, which loads as "incomplete". Loading memory-maps chunk files: a 128k-token
session opens without reading its KV; chunks are read when first needed.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import uuid
import weakref
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from storage.abstracts import ABSTRACT_KEYS
from storage.atomic import fsync_dir, write_atomic
from storage.errors import DiskFullError, SessionError, SessionExistsError, SessionLockedError
from storage.hashing import file_entry, hash_checks, sha256_file  # noqa: F401 (re-exported)
from storage.layout import KVLayout
from storage.manifest import VERSION_NAME, validate_manifest
from storage.quant import PARAM_DTYPE
from storage.saving import SUMMARY_KEYS, check_space, least_written, write_files

SESSION_FORMAT = 2  # what a save writes; 1 and 2 load
FORMATS = (1, 2)
MAX_MANIFEST_BYTES = 1 << 28  # token ids and messages of a 16M-token session fit
# What a session directory holds: its lock, its pointer, its versions, and what a killed
# save left of them (`write_atomic`'s and `save_session`'s temporaries). A save goes
# only into a session or a directory holding nothing else, and removes only versions.
OWN_ENTRY = re.compile(
    rf"\.lock|CURRENT|\.CURRENT\.[0-9a-f]{{8}}\.tmp|{VERSION_NAME.pattern}(\.tmp)?"
)


class SessionLock:
    """An exclusive, non-blocking flock on DIR/.lock (released by the OS if we die)."""

    def __init__(self, directory: Path):
        self.path = directory / ".lock"
        self.fd = None

    def __enter__(self) -> SessionLock:
        try:  # O_NOFOLLOW: a symlinked .lock must not make us create its target
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise SessionError(
                f"{self.path}: cannot open the session lock ({e.strerror or e}; "
                "a symbolic link is refused)"
            ) from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise SessionLockedError(
                f"session {self.path.parent} is locked: another process is saving it"
            ) from None
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def _exists(path: Path) -> bool:
    """`path.exists()`, or SessionError where the file system cannot say (a name past its
    length limit, a folder on the way that may not be searched) or could not hold such a
    name (a NUL character: pathlib says no file is there, and mkdir then raises)."""
    if "\x00" in str(path):
        raise SessionError(f"session path {str(path)!r}: a path cannot hold a NUL character")
    try:
        return path.exists()
    except OSError as e:
        raise SessionError(f"session path {path}: {e.strerror or e}") from None


def prepare_dir(
    path: Path, replace: bool = False, continues: str | None = None, room: int = 0
) -> Path:
    """Create the session directory, or say clearly why it cannot be one (`check_dir`; a
    file system without `room` bytes free, `check_space`)."""
    path = Path(path).expanduser()
    check_dir(path, replace, continues)
    check_space(path, room)  # (before anything is made: the save would not fit)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SessionError(f"cannot create session directory {path}: {e.strerror or e}") from None
    return path


def check_dir(path: Path, replace: bool = False, continues: str | None = None) -> None:
    """Could `prepare_dir` make `path` a session directory? Creates nothing, so a
    command that fails later (an empty document, one too long) leaves nothing behind.
    An existing directory must be a session (files its user keeps beside it are left
    alone) or hold nothing but what a session's saves leave (a save into a user's folder
    would write beside the files there and take a `CURRENT` of theirs for its own), and a
    session there is replaced only when `replace` says so, or when it is still the
    version `continues` names (the one the saver loaded or last saved there: a save
    continues it unless another saver saved there since)."""
    path = Path(path).expanduser()
    if _exists(path):
        if not path.is_dir():
            raise SessionError(f"session path {path} is a file, not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise SessionError(f"session directory {path} is not writable")
        _check_contents(path, replace, continues)
        return
    parent = path.parent
    while not _exists(parent):
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise SessionError(f"cannot create session directory {path}: {parent} is not writable")


def _check_contents(path: Path, replace: bool, continues: str | None) -> None:
    try:
        names = sorted(e.name for e in os.scandir(path))
    except OSError as e:
        raise SessionError(f"cannot read session directory {path}: {e.strerror or e}") from None
    other = [n for n in names if not OWN_ENTRY.fullmatch(n)]
    current = _current_version(path, names)
    if other and current is None:  # (a session's, files its user keeps beside it)
        shown = ", ".join(repr(n) for n in other[:3])
        more = f" and {len(other) - 3} more" if len(other) > 3 else ""
        raise SessionError(
            f"{path} is not empty and is not a session directory (it holds {shown}{more}): "
            "a session is saved into a new or empty directory of its own"
        )
    if "CURRENT" in names and not replace:
        if continues is None:
            raise SessionExistsError(path)
        if current != continues:
            raise SessionExistsError(path, changed=True)


def _current_version(path: Path, names: list[str]) -> str | None:
    """The version folder the directory's CURRENT names, where it names one that is there:
    a session (whatever its user keeps beside it), not a folder with a file of that name."""
    if "CURRENT" not in names:
        return None
    try:
        name = _read_small(path / "CURRENT", 64).strip().decode("ascii")
    except (SessionError, UnicodeDecodeError):
        return None
    return name if VERSION_NAME.fullmatch(name) and name in names else None


@dataclass
class SessionContents:
    """What a save needs from the caller; the store supplies the KV itself."""

    token_ids: list[int]
    meta: dict  # model fingerprint, tokenizer hash, config, messages, ...
    index: dict[str, torch.Tensor]  # selection index tensors (names are the caller's)
    index_meta: dict


class SavedSession(NamedTuple):
    bytes: int  # of the version's files
    version: str  # its name: what a later save by the same saver `continues`


def save_session(
    path: Path, store, contents: SessionContents, replace: bool = False,
    continues: str | None = None,
) -> SavedSession:  # fmt: skip
    """Write the store's KV (all tokens of every layer) as a new version. A session
    already there is replaced only with `replace`, or where it is still the version
    `continues` names (`check_dir`).

    A save that fails (a full disk, an error) leaves the session as it was: the new
    version's folder is removed, and so is the session folder when this save created it
    (a killed save's folder is removed by the next save)."""
    created = not _exists(Path(path).expanduser())
    path = prepare_dir(path, replace, continues, least_written(store))
    L: KVLayout = store.layout
    T = store.num_tokens
    with SessionLock(path):
        if not replace:  # (again under the lock: another process may have saved there)
            _check_contents(path, replace, continues)
        version = f"v-{uuid.uuid4().hex[:12]}"
        tmp = path / f"{version}.tmp"
        try:
            tmp.mkdir()
            (tmp / "kv").mkdir()
            files = write_files(tmp, store, contents.index, contents.index_meta)
            manifest = {
                "format_version": SESSION_FORMAT,
                "num_tokens": T,
                "token_ids": list(contents.token_ids),
                "layout": dataclasses.asdict(L),
                "files": files,
                **contents.meta,
            }
            body = json.dumps(manifest, sort_keys=True).encode()
            manifest["manifest_sha256"] = hashlib.sha256(body).hexdigest()
            write_atomic(
                tmp / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode()
            )
            for sub in (tmp / "kv", tmp):
                fsync_dir(sub)
            os.replace(tmp, path / version)
            fsync_dir(path)
            write_atomic(path / "CURRENT", (version + "\n").encode())
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if created:  # under the lock: no other save is using the folder
                shutil.rmtree(path, ignore_errors=True)
            if not isinstance(e, (OSError, SafetensorError, DiskFullError)):
                raise
            # a full disk, while writing any file (the KV files' writer says it as its own)
            full = isinstance(e, DiskFullError) and isinstance(e.__context__, OSError)
            cause = e.__context__ if full else e
            reason = getattr(cause, "strerror", None) or str(cause)
            code = re.search(r"\(os error (\d+)\)", reason)  # (safetensors' I/O errors)
            reason = os.strerror(int(code.group(1))) if code else reason
            raise SessionError(f"cannot save session to {path}: {reason}") from None
        # Older versions and leftovers of killed saves are garbage now.
        for old in path.iterdir():
            if VERSION_NAME.fullmatch(old.name.removesuffix(".tmp")) and old.name != version:
                shutil.rmtree(old, ignore_errors=True)
        manifest_bytes = (path / version / "manifest.json").stat().st_size
        return SavedSession(sum(f["size"] for f in files.values()) + manifest_bytes, version)


@dataclass
class OpenedSession:
    path: Path
    version_dir: Path
    manifest: dict
    # sha256 checks of the small files still running (`open_session(verify_later=True)`)
    checks: list[Future] = field(default_factory=list, repr=False)
    # The file the abstracts are read from, held open from the load on (`hold_abstracts`):
    # they are read when first needed, maybe after another process's save of this
    # session removed this version (`_readable`).
    _held: int | None = field(default=None, repr=False)

    def hold_abstracts(self) -> None:
        name = self._abstracts_file()
        self._held = os.open(self.version_dir / name, os.O_RDONLY)
        weakref.finalize(self, os.close, self._held)

    def _abstracts_file(self) -> str:
        name = "abstracts.safetensors"
        return name if name in self.manifest["files"] else "device.safetensors"  # (format 1)

    def _readable(self, name: str) -> Path:
        """Where to read file `name` of this version: its path, unless a save since (of
        another process) removed or replaced it while it was held open; then the open
        file itself, as Linux names it (/proc/self/fd)."""
        path = self.version_dir / name
        if self._held is None or name != self._abstracts_file():
            return path
        try:
            if os.stat(path).st_ino == os.fstat(self._held).st_ino:
                return path
        except FileNotFoundError:
            pass
        held = Path(f"/proc/self/fd/{self._held}")
        return held if held.exists() else path

    def verified(self) -> None:
        """Wait for the small files' sha256 checks; SessionError naming a file that fails."""
        for check in self.checks:
            check.result()
        self.checks = []

    @property
    def layout(self) -> KVLayout:
        return KVLayout(**self.manifest["layout"])

    @property
    def token_ids(self) -> list[int]:
        return self.manifest["token_ids"]

    def chunk_files(self) -> list[dict]:
        """Each chunk file's entry with its `name`, `chunks` (the ids it holds) and
        `crc32` (their crc32s, or format 2's `crc32_digest` of them, or None)."""
        out = []
        for name, f in self.manifest["files"].items():
            if name.startswith("kv/"):
                f = dict(f, name=name)
                if "first_chunk" in f:  # format 2: a range, and a digest of the crc32s
                    f["chunks"] = list(range(f["first_chunk"], f["first_chunk"] + f["num_chunks"]))
                    f["crc32"] = f["crc32_sha256"]
                out.append({"crc32": None, **f})
        return out

    def device_tensors(self) -> dict[str, torch.Tensor]:
        """The key summaries of every layer, each checked for its name, dtype and shape
        (they cover the session's completed chunks)."""
        return self._checked("device.safetensors", SUMMARY_KEYS)

    def abstract_tensors(self) -> dict[str, torch.Tensor]:
        """The chunk abstracts of every layer, checked likewise. Format 2 keeps them in a
        file of their own, which the load does not wait for: it is hashed here (on
        threads) before it is read."""
        name = self._abstracts_file()
        if name == "device.safetensors":  # format 1
            return self._checked(name, ABSTRACT_KEYS)
        where = self._readable(name)
        try:
            for check in hash_checks([(where, self.manifest["files"][name])]):
                check.result()
        except SessionError as e:  # (named by its path, not the one it was read by)
            raise SessionError(str(e).replace(str(where), str(self.version_dir / name))) from None
        return self._checked(name, ABSTRACT_KEYS)

    def _checked(self, name: str, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
        tensors = self._tensors(name)[0]
        L = self.layout
        n = self.manifest["num_tokens"] // L.chunk_size
        H, D, C = L.num_kv_heads, L.head_dim, L.chunk_size
        # (scale and zero are float16 since 2026-12; float32 ones load as well)
        f32, params = torch.float32, (PARAM_DTYPE, torch.float32)
        want = {"codes": ((H, n * C, D * L.summary_bits // 8), (torch.uint8,)),
                "scale": ((H, n, D), params), "zero": ((H, n, D), params),
                "kmin": ((n, H, D), (f32,)), "kmax": ((n, H, D), (f32,)),
                "kmean": ((n, H, D), (f32,))}  # fmt: skip
        where = self.version_dir / name
        for layer in range(L.num_layers):
            for key in keys:
                shape, dtypes = want[key]
                t = tensors.get(f"L{layer}.{key}")
                if t is None:
                    raise SessionError(f"{where}: tensor L{layer}.{key} is missing")
                if tuple(t.shape) != shape or t.dtype not in dtypes:
                    raise SessionError(
                        f"{where}: tensor L{layer}.{key} is {t.dtype} {tuple(t.shape)}, "
                        f"expected {' or '.join(map(str, dtypes))} {shape}"
                    )
        return tensors

    def index(self) -> tuple[dict[str, torch.Tensor], dict]:
        if "index.safetensors" not in self.manifest["files"]:
            return {}, {}
        return self._tensors("index.safetensors")

    def _tensors(self, name: str):
        path = self._readable(name)
        try:
            tensors = load_file(str(path))
            with open(path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(header_len))
            meta = json.loads(header.get("__metadata__", {}).get("meta", "{}"))
        except (SafetensorError, OSError, ValueError) as e:
            raise SessionError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
        return tensors, meta


def open_session(path: Path, verify_later: bool = False) -> OpenedSession:
    """Find the complete version, read and check its manifest and small files.

    Everything a session names must be a plain file or folder inside it: CURRENT
    names a version folder (no path), the manifest's file names are the ones a save
    writes, and symbolic links are refused wherever they appear. Chunk files are
    checked for presence and size only; their own metadata (layer, chunk ids,
    crc32s) is checked against the manifest when they are mapped, and each chunk's
    crc32 as it is read, so opening does not read the KV.

    The tensor files' sha256s are computed on threads, a 64 MiB block each (the
    summaries and the index are 3 GiB for the 8B shape at 128k tokens); the abstracts'
    file is hashed when it is read (`abstract_tensors`). With `verify_later` the checks
    are left running, and the caller reads the files meanwhile and calls `verified()`
    before it uses anything read from them.
    """
    path = Path(path).expanduser()
    if not _exists(path):
        raise SessionError(f"no session at {path}")
    if not path.is_dir():
        raise SessionError(f"session path {path} is a file, not a directory")
    path = path.resolve()  # the one folder the user named; nothing below it is followed
    current = path / "CURRENT"
    if not os.path.lexists(current):
        partial = any(p.name.endswith(".tmp") for p in path.iterdir())
        raise SessionError(
            f"{path}: no complete session"
            + (
                " (a save was interrupted before it completed)"
                if partial
                else " (not a session directory)"
            )
        )
    name = _read_small(current, 64).strip()
    try:
        name = name.decode("ascii")
    except UnicodeDecodeError:
        name = ""
    if not VERSION_NAME.fullmatch(name):
        raise SessionError(f"{current}: does not name a version folder (v-<12 hex digits>)")
    version_dir = path / name
    _check_plain(version_dir, dir=True)
    mpath = version_dir / "manifest.json"
    try:
        manifest = json.loads(_read_small(mpath, MAX_MANIFEST_BYTES).decode("utf-8"))
        claimed = manifest.pop("manifest_sha256")
        body = json.dumps(manifest, sort_keys=True).encode()
    except (ValueError, KeyError, AttributeError, TypeError, RecursionError) as e:
        raise SessionError(f"{mpath}: manifest is corrupt ({type(e).__name__}: {e})") from None
    if not isinstance(claimed, str) or hashlib.sha256(body).hexdigest() != claimed:
        raise SessionError(f"{mpath}: manifest checksum mismatch: the file is corrupt")
    if manifest.get("format_version") not in FORMATS:
        raise SessionError(
            f"{mpath}: session format {manifest.get('format_version')!r}, this version of "
            f"offload reads {' and '.join(map(str, FORMATS))}"
        )
    try:
        validate_manifest(manifest)
    except ValueError as e:
        raise SessionError(f"{mpath}: manifest is invalid: {e}") from None
    if any(n.startswith("kv/") for n in manifest["files"]):
        _check_plain(version_dir / "kv", dir=True)
    hashed = []
    for fname, info in manifest["files"].items():
        f = version_dir / fname
        size = _check_plain(f)
        if size != info["size"]:
            raise SessionError(
                f"{f}: size {size}, manifest says {info['size']}: the file is corrupt"
            )
        if fname.endswith(".safetensors") and fname != "abstracts.safetensors":
            hashed.append((f, info))  # (the abstracts are hashed when they are read)
    session = OpenedSession(path, version_dir, manifest)
    session.checks = hash_checks(hashed)
    if not verify_later:
        session.verified()
    return session


def _check_plain(path: Path, dir: bool = False) -> int:
    """A plain file (its size) or folder, never a symbolic link; else SessionError."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise SessionError(
            f"{path}: {'folder' if dir else 'file'} of the session is missing"
        ) from None
    except OSError as e:
        raise SessionError(f"{path}: cannot read ({e.strerror or e})") from None
    if stat.S_ISLNK(st.st_mode):
        raise SessionError(
            f"{path}: is a symbolic link; a session's files must be inside its folder"
        )
    if dir and not stat.S_ISDIR(st.st_mode) or not dir and not stat.S_ISREG(st.st_mode):
        raise SessionError(f"{path}: is not a plain {'folder' if dir else 'file'}")
    return st.st_size


def _read_small(path: Path, limit: int) -> bytes:
    """The bytes of a plain file of at most `limit` bytes (opened without following links)."""
    size = _check_plain(path)
    if size > limit:
        raise SessionError(f"{path}: {size} bytes, more than the {limit} such a file can hold")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            return f.read(limit + 1)
    except OSError as e:
        raise SessionError(f"{path}: cannot read ({e.strerror or e})") from None
