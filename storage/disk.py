"""Disk tier: chunks written as Arrow IPC files, read back by memory-mapping.

One file holds many chunks of one layer (one record batch per chunk), written
together when the host spills, so a 128k-token context is hundreds of files,
not hundreds of thousands. Files are immutable: written under a temporary name,
fsynced, renamed, and the directory fsynced; a crash or a full disk leaves no
file that could be read as valid. Saved sessions reuse the same format.

File format (version 1):
  schema  columns `kv` (binary: [2, H_kv, C, D] in the KV dtype, little endian),
          `kmin`, `kmax`, `kmean` (binary: [H_kv, D] float32)
  schema metadata (JSON under b"offload"):
          format_version, layout (KVLayout fields), layer, chunks (chunk index per
          batch), crc32 (one per batch, over kv + kmin + kmax + kmean bytes)
Every read checks its batch's crc32; a mismatch names the file.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import threading
import uuid
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from storage.abstracts import ChunkAbstracts
from storage.atomic import write_atomic
from storage.errors import DiskFullError, StorageError  # noqa: F401 (re-exported)
from storage.layout import KVLayout
from storage.stale import OWNER_LOCK

try:  # ISA-L's crc32: zlib's checksum, bit for bit, 5-10x as fast (docs/storage.md)
    from isal.isal_zlib import crc32
except ImportError:  # (an image without the wheel, as the offline GPU machine's)
    from zlib import crc32

FORMAT_VERSION = 1
META_KEY = b"offload"
WRITE_BUFFER = 1 << 20  # bytes
ARROW_ALIGNMENT = 64  # bytes: rows of a multiple of it are written as one table
# Chunks of a file laid out otherwise than this tier writes them (`read_batches`) needed
# at once before the whole file is read: at least this many, and a quarter of the file
# (a chunk read alone costs about what one costs in a whole read, 50-60 us for the 8B
# shape here).
BULK_READ_MIN, BULK_READ_FRACTION = 8, 4
SCHEMA_FIELDS = [
    ("kv", pa.binary()),
    ("kmin", pa.binary()),
    ("kmax", pa.binary()),
    ("kmean", pa.binary()),
]


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.uint8).reshape(-1).numpy()


def crc32_digest(crcs: list[int]) -> str:
    """sha256 of a file's chunk crc32s (little-endian uint32s): what a session manifest
    lists of a chunk file instead of the crc32s themselves (262,144 numbers for the 8B
    shape at 128k: a 28 MB manifest that took 0.6 s to read and check)."""
    return hashlib.sha256(np.asarray(crcs, dtype="<u4").tobytes()).hexdigest()


def _span(chunks) -> str:
    if isinstance(chunks, list) and chunks:
        return f"{chunks[0]}..{chunks[-1]}" if len(chunks) > 1 else str(chunks[0])
    return repr(chunks)


def _chunk_batches(rows: list[np.ndarray], schema: pa.Schema):
    """A function writing one record batch per chunk whose buffers hold exactly its bytes
    (row i of each column's [n, bytes] array). Where every row is a multiple of 64 bytes
    (Arrow's alignment; every model's with a head dim that is a multiple of 16), one table
    of n rows written a row a batch: the same bytes, with no Python objects per chunk (a
    128k-token session of the 8B shape is 262,144 chunks). Arrow pads a row it slices out
    of a table to 64 bytes with the bytes after it, so other rows are batched one by one."""
    n = rows[0].shape[0]
    if all(r.shape[1] % ARROW_ALIGNMENT == 0 for r in rows):
        table = pa.Table.from_arrays([
            pa.Array.from_buffers(pa.binary(), n, [
                None,
                pa.py_buffer(np.arange(0, (n + 1) * r.shape[1], r.shape[1], dtype=np.int32)),
                pa.py_buffer(r.reshape(-1)),
            ])
            for r in rows
        ], schema=schema)  # fmt: skip
        return lambda writer: writer.write_table(table, max_chunksize=1)

    def one_by_one(writer) -> None:
        offsets = [pa.py_buffer(np.array([0, r.shape[1]], dtype=np.int32)) for r in rows]
        for i in range(n):
            cols = [pa.Array.from_buffers(pa.binary(), 1, [None, o, pa.py_buffer(r[i])])
                    for o, r in zip(offsets, rows, strict=True)]  # fmt: skip
            writer.write_batch(pa.record_batch(cols, schema=schema))

    return one_by_one


class DiskTier:
    """Chunk files of all layers under one directory, with a byte budget."""

    def __init__(self, directory: Path, layout: KVLayout, dtype: torch.dtype, budget_bytes: int):
        self.directory = Path(directory)
        self.layout = layout
        self.dtype = dtype
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self._lock = threading.Lock()  # the budget and the files written, for writing threads
        self._sizes: dict[str, int] = {}  # files this tier wrote (and may delete)
        self._crcs: dict[str, list[int]] = {}  # ... and their chunks' crc32s
        self._readers: dict[str, tuple[pa.ipc.RecordBatchFileReader, list[int]]] = {}
        self._meta: dict[str, dict] = {}
        self._mapped: dict[str, pa.Buffer] = {}  # each open file, mapped whole
        self._places: dict[str, tuple | None] = {}  # where its chunks lie, their view (`_placed`)
        self._checked: dict[str, np.ndarray] = {}  # its chunks checked in place (`view`)
        self._owner: int | None = None  # fd of the flock'ed OWNER_LOCK while started

    def start(self) -> None:
        """Create the directory and hold a lock in it while this process lives, so that
        a later process can tell a dead one's leftovers (`sweep_stale`) from a live one's."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(
                f"disk tier: cannot create directory {self.directory}: {e}"
            ) from None
        if not os.access(self.directory, os.W_OK):
            raise StorageError(f"disk tier: directory {self.directory} is not writable")
        if self._owner is None:
            lock = self.directory / OWNER_LOCK
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as e:
                raise StorageError(f"disk tier: cannot create {lock}: {e.strerror or e}") from None
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._owner = fd

    def close(self) -> None:
        """(After the store deleted its files.) The lock goes, and the directory if empty."""
        if self._owner is not None:
            (self.directory / OWNER_LOCK).unlink(missing_ok=True)
        self.disown()
        try:
            self.directory.rmdir()  # only succeeds when empty: never removes a user's files
        except OSError:
            pass

    def disown(self) -> None:
        """Let go of the directory untouched: in a child forked from the process that wrote
        it, its files and lock are the parent's (who holds the lock still)."""
        for d in (self._readers, self._mapped, self._meta, self._places, self._checked,
                  self._sizes):  # fmt: skip
            d.clear()
        if self._owner is not None:
            os.close(self._owner)  # (here: this process's copy of the descriptor)
            self._owner = None

    # -- writing ---------------------------------------------------------------

    def write_chunks(
        self, layer: int, chunks: list[int], data: torch.Tensor, abstracts: ChunkAbstracts
    ) -> str:
        """Write chunks (data [n, 2, H, C, D], abstracts [n, H, D]) as one new file.

        Returns the file name. Raises DiskFullError when the file would exceed the
        budget or the write fails (the disk is full); in both cases no file is left
        behind and the caller still holds the data. Safe to call from several threads.
        """
        n = len(chunks)
        # Each column as one [n, bytes] array; each chunk a record batch of its rows (no
        # copy of them into Python bytes), written straight into the file (no copy of it
        # in memory first: fresh pages for each file cost more than the encoding).
        rows = [
            tensor_bytes(data.to(self.dtype)).reshape(n, -1),
            *(tensor_bytes(t.float()).reshape(n, -1)
              for t in (abstracts.kmin, abstracts.kmax, abstracts.kmean)),
        ]  # fmt: skip
        crcs = []
        for i in range(n):
            crc = 0
            for r in rows:
                crc = crc32(r[i], crc)
            crcs.append(crc)
        meta = {
            "format_version": FORMAT_VERSION,
            "layout": dataclasses.asdict(self.layout),
            "layer": layer,
            "chunks": list(chunks),
            "crc32": crcs,
        }
        schema = pa.schema(SCHEMA_FIELDS, metadata={META_KEY: json.dumps(meta).encode()})
        batches = _chunk_batches(rows, schema)
        name = f"L{layer:03d}-{chunks[0]:07d}-{uuid.uuid4().hex[:8]}.arrow"
        path = self.directory / name
        size = 0

        def write(tmp: Path) -> None:
            nonlocal size
            try:
                with (
                    pa.OSFile(str(tmp), "wb") as raw,
                    pa.BufferedOutputStream(raw, WRITE_BUFFER) as f,  # (a batch's small writes)
                    pa.ipc.new_file(f, schema) as writer,
                ):
                    batches(writer)
            except OSError as e:  # (Arrow's reads "Error writing bytes to file. Detail: ...")
                if not e.errno:
                    raise
                raise OSError(e.errno, os.strerror(e.errno), str(tmp)) from None
            written = tmp.stat().st_size
            with self._lock:  # (files are written on several threads by a save)
                if self.used_bytes + written > self.budget_bytes:
                    raise DiskFullError(
                        f"disk tier budget exceeded: {self.used_bytes + written} bytes needed "
                        f"in {self.directory}, budget is {self.budget_bytes} (raise "
                        "kv.disk_bytes or kv.host_bytes)"
                    )
                self.used_bytes += written
            size = written

        try:
            write_atomic(path, write)
        except BaseException as e:
            with self._lock:
                self.used_bytes -= size  # (counted, then its fsync or rename failed)
            if isinstance(e, OSError):
                raise DiskFullError(f"disk tier: cannot write {path}: {e.strerror or e}") from None
            raise
        with self._lock:
            self._sizes[name] = size
            self._crcs[name] = crcs
        return name

    def own_files(self) -> list[str]:
        return list(self._sizes)

    def owns(self, name: str) -> bool:
        """Files the tier wrote itself; others (a loaded session's) are never deleted."""
        return name in self._sizes

    def delete(self, name: str) -> None:
        for d in (self._readers, self._mapped, self._meta, self._crcs, self._places, self._checked):
            d.pop(name, None)
        if name in self._sizes:
            self.used_bytes -= self._sizes.pop(name)
            (self.directory / name).unlink(missing_ok=True)

    def open(self, name: str, layer: int, chunks: list[int], crc32: list[int] | str | None) -> None:
        """Map a session's file now (so later deletion by another process cannot hurt this
        one) and check that its own metadata says what the manifest says: the layer, the
        chunk ids, the crc32s (a list, or their `crc32_digest`, if the manifest has them).
        Swapped or foreign files of the right size are refused here, before any of their
        KV is used."""
        reader, crcs = self._open(name)
        meta = self._meta[name]
        path = self.directory / name
        if meta.get("layer") != layer or meta.get("chunks") != chunks or len(chunks) != len(crcs):
            raise StorageError(
                f"{path}: holds layer {meta.get('layer')!r}, chunks {_span(meta.get('chunks'))}; "
                f"the manifest says layer {layer}, chunks {_span(chunks)}"
            )
        if meta.get("layout") != dataclasses.asdict(self.layout):
            raise StorageError(f"{path}: its KV layout differs from the session's")
        if crc32 is not None and (crc32_digest(crcs) if isinstance(crc32, str) else crcs) != crc32:
            raise StorageError(f"{path}: its chunk checksums differ from the manifest's")

    def num_chunks(self, name: str) -> int:
        """How many chunks file `name` holds."""
        return len(self._open(name)[1])

    def crc32s(self, name: str) -> list[int]:
        """The per-chunk crc32s of a file (kept from the write, or read from its metadata)."""
        crcs = self._crcs.get(name)
        return list(crcs if crcs is not None else self._open(name)[1])

    # -- reading ---------------------------------------------------------------

    def _open(self, name: str):
        cached = self._readers.get(name)
        if cached is not None:
            return cached
        path = self.directory / name
        try:
            source = pa.memory_map(str(path), "r")
            reader = pa.ipc.open_file(source)
            source.seek(0)
            whole = source.read_buffer()  # the mapped file (no copy): see `view`
            meta = json.loads(reader.schema.metadata[META_KEY])
            if meta.get("format_version") != FORMAT_VERSION:
                raise StorageError(
                    f"{path}: format version {meta.get('format_version')}, expected {FORMAT_VERSION}"
                )
            crcs = [int(c) for c in meta["crc32"]]
            if len(crcs) != reader.num_record_batches:
                raise StorageError(
                    f"{path}: {reader.num_record_batches} chunks but {len(crcs)} checksums"
                )
        except StorageError:
            raise
        except FileNotFoundError:
            raise StorageError(f"{path}: chunk file is missing") from None
        except Exception as e:  # ArrowInvalid, KeyError, JSONDecodeError, ...
            raise StorageError(
                f"{path}: not a valid chunk file ({type(e).__name__}: {e})"
            ) from None
        self._readers[name] = (reader, crcs)
        self._meta[name] = meta
        self._mapped[name] = whole
        return reader, crcs

    def read_all(self, name: str) -> torch.Tensor:
        """Every chunk of a file as [n, 2, H, C, D], each checksum verified: a read-only
        view of the mapped file itself where its chunks lie at one stride, as this tier
        writes them (`view`), else of the file's KV column made contiguous. The callers
        copy what they keep: one copy in all, not two or three (a copy costs 25 ms per
        1024 chunks of the 8B shape here; a 128k-token session is 256 such files)."""
        reader, crcs = self._open(name)
        kv = self.view(name, range(len(crcs)))
        if kv is not None:
            return kv
        return self._as_chunks(self._read_column(name, reader, crcs))

    def read_batches(self, name: str, batches: list[int]) -> tuple[torch.Tensor, list[int]]:
        """(data, rows): chunk `batches[i]` of file `name` is data[rows[i]] ([2, H, C, D],
        checksum verified). Where the file's chunks lie at one stride, data is the view of
        the whole mapped file (no copy: a selection's rows are read from it where they
        lie, page by page); otherwise the whole file read when many of its chunks are
        wanted (`BULK_READ_MIN`, a `BULK_READ_FRACTION` of it), else those chunks alone."""
        kv = self.view(name, batches)
        if kv is not None:
            return kv, list(batches)
        if len(batches) >= max(BULK_READ_MIN, self.num_chunks(name) // BULK_READ_FRACTION):
            return self.read_all(name), list(batches)
        return torch.stack([self.read_chunk(name, b) for b in batches]), list(range(len(batches)))

    def unchecked(self, name: str, batches: list[int]) -> int:
        """How many of `batches` a read would check (all but those this process checked
        already in a file read in place)."""
        done = self._checked.get(name)
        if done is None:
            return len(batches)
        return int((~done[np.asarray(batches, dtype=np.int64)]).sum())

    def view(self, name: str, batches) -> torch.Tensor | None:
        """[n, 2, H, C, D]: every chunk of file `name` where it lies in the mapped file
        (read-only, no copy), with `batches` checksum-verified; None where the chunks do
        not lie at one stride, or a chunk's crc32 differs (the general reads then name the
        chunk at fault). Each chunk is checked once in this process: the files are never
        written again (a question past the host budget reads its chunks at every step:
        their checks were half of what the reads cost)."""
        reader, crcs = self._open(name)
        placed = self._placed(name, reader, len(crcs))
        if placed is None:
            return None
        spans, stride, kv = placed
        whole, done = self._mapped.get(name), self._checked.get(name)
        if whole is None or done is None:  # (deleted meanwhile, on another thread)
            return None
        todo = np.asarray(batches, dtype=np.int64)
        todo = todo[~done[todo]]
        if len(todo):
            view = memoryview(whole)
            for i in todo.tolist():
                crc = 0
                for p, size in spans:
                    crc = crc32(view[p + i * stride : p + i * stride + size], crc)
                if crc != crcs[i]:
                    self._places[name] = None  # (the general reads name the chunk)
                    return None
            done[todo] = True
        return kv

    def _as_chunks(self, raw: np.ndarray) -> torch.Tensor:
        """[n, chunk bytes] uint8 -> [n, 2, H, C, D] of the KV dtype (read-only)."""
        L = self.layout
        with warnings.catch_warnings():  # (read-only: never written to)
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(raw).view(self.dtype)
        return t.reshape(raw.shape[0], 2, L.num_kv_heads, L.chunk_size, L.head_dim)

    def _placed(self, name: str, reader, n: int) -> tuple | None:
        """(where each column's bytes of chunk 0 lie in the mapped file and their size,
        the stride from one chunk to the next, the chunks' KV there as [n, 2, H, C, D])
        when the chunks' record batches lie at one stride, as this tier writes them: the
        first two and the last say where each column's bytes would be, and each chunk's
        crc32 over the bytes found there proves them its own (`view`). None otherwise (a
        file laid out some other way, or damaged). Found once a file."""
        if name in self._places:
            return self._places[name]
        whole = self._mapped.get(name)
        if whole is None:  # (deleted meanwhile, on another thread)
            return None
        spans, stride = [], None
        try:
            batches = [reader.get_batch(i) for i in sorted({0, min(1, n - 1), n - 1})]
            for col in range(len(SCHEMA_FIELDS)):
                at = []
                for b in batches:
                    arr = b.column(col)
                    o = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset : arr.offset + 2]
                    at.append(
                        (arr.buffers()[2].address - whole.address + int(o[0]), int(o[1] - o[0]))
                    )
                (p0, size), *rest = at
                # (one chunk: no stride to find, any will do)
                step = rest[0][0] - p0 if rest else self.layout.chunk_bytes
                if (
                    any(s != size for _, s in rest)
                    or (rest and rest[-1][0] != p0 + (n - 1) * step)
                    or (stride is not None and step != stride)
                ):
                    spans = None
                    break
                stride = step
                spans.append((p0, size))
        except Exception:  # (a file the general path reports on)
            spans = None
        if spans is not None and (
            stride <= 0 or spans[0][1] != self.layout.chunk_bytes or stride % self.dtype.itemsize
        ):
            spans = None
        placed = None
        if spans is not None:
            kv_at, kv_size = spans[0]
            flat = np.frombuffer(whole, dtype=np.uint8)[kv_at:]
            kv = np.lib.stride_tricks.as_strided(
                flat, shape=(n, kv_size), strides=(stride, 1), writeable=False
            )
            placed = (spans, stride, self._as_chunks(kv))
            self._checked.setdefault(name, np.zeros(n, dtype=bool))
        self._places[name] = placed
        return placed

    def _read_column(self, name: str, reader, crcs: list[int]) -> np.ndarray:
        """[n, chunk bytes] uint8 of every chunk's KV, the column made contiguous (one
        copy), checksums verified; StorageError naming the file and chunk at fault."""
        path = self.directory / name
        L = self.layout
        try:
            table = reader.read_all()
            cols = [pa.concat_arrays(table.column(i).chunks) for i in range(len(SCHEMA_FIELDS))]
            datas = [memoryview(c.buffers()[2]) for c in cols]
            offsets = [
                np.frombuffer(c.buffers()[1], dtype=np.int32)[: len(c) + 1].tolist() for c in cols
            ]
        except Exception as e:
            raise StorageError(f"{path}: cannot read chunks ({type(e).__name__}: {e})") from None
        n = len(cols[0])
        columns = list(zip(datas, offsets, strict=True))
        for i in range(n):
            crc = 0
            for d, o in columns:
                crc = crc32(d[o[i] : o[i + 1]], crc)
            if crc != crcs[i]:
                raise StorageError(f"{path}: checksum mismatch in chunk {i}: the file is corrupt")
        kv = np.frombuffer(datas[0], dtype=np.uint8)[offsets[0][0] : offsets[0][n]]
        if kv.size != n * L.chunk_bytes:
            raise StorageError(
                f"{path}: {kv.size} bytes of KV for {n} chunks, expected {n * L.chunk_bytes}"
            )
        return kv.reshape(n, L.chunk_bytes)

    def read_chunk(self, name: str, batch: int) -> torch.Tensor:
        """The KV [2, H, C, D] of record batch `batch` of file `name`, checksum verified."""
        reader, crcs = self._open(name)
        kv = self.view(name, [batch]) if 0 <= batch < len(crcs) else None
        if kv is not None:
            return kv[batch].clone()
        path = self.directory / name
        try:
            rb = reader.get_batch(batch)
            bufs = [rb.column(i)[0].as_buffer() for i in range(len(SCHEMA_FIELDS))]
        except Exception as e:
            raise StorageError(
                f"{path}: cannot read chunk {batch} ({type(e).__name__}: {e})"
            ) from None
        crc = 0
        for b in bufs:
            crc = crc32(b, crc)
        if crc != crcs[batch]:
            raise StorageError(f"{path}: checksum mismatch in chunk {batch}: the file is corrupt")
        L = self.layout
        raw = np.frombuffer(bufs[0], dtype=np.uint8)
        if raw.size != L.chunk_bytes:
            raise StorageError(
                f"{path}: chunk {batch} has {raw.size} bytes, expected {L.chunk_bytes}"
            )
        t = torch.from_numpy(raw.copy()).view(self.dtype)
        return t.reshape(2, L.num_kv_heads, L.chunk_size, L.head_dim)
