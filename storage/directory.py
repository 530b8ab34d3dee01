"""Bookkeeping of the tiered store: which chunk lives where, in which LRU order.

Plain Python, no tensors: every decision (what to spill, what is resident,
what a truncation frees) is made here and tested with exact expected orders. The
disk records are also kept per layer as arrays (`DiskIndex`), for a selection that
looks up thousands of chunks at once.

A chunk is keyed `(layer, index)`. It is on the host, on disk, or both (a chunk
read back from disk keeps its disk record: KV never changes, so a later spill of
the same chunk costs no write). Host residency is ordered least to most recently
used; selection hits move a chunk to the most recent end.
"""

from __future__ import annotations

import contextlib
import gc
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

Key = tuple[int, int]  # (layer, chunk index)


@contextlib.contextmanager
def paused_gc():
    """The garbage collector off in the block (back as it was after): for code that
    makes hundreds of thousands of objects, none of them garbage. A loaded 128k session
    of the 8B shape has 262,144 chunk records, and the collections their allocations
    set off walked the runtime's heap again and again (131,072 records took 0.45 s here
    so, 0.06 s without; 2026-12-04)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@dataclass
class DiskRecord:
    file: str
    batch: int  # record batch index inside the file


class DiskIndex:
    """The disk records of each layer's chunks as arrays, kept with the directory's
    dict: a question's selection touches most of a layer's 8,192 chunks (the 8B shape
    at 128k), whose records were looked up one by one (about 10 ms a layer here)."""

    def __init__(self):
        self.names: list[str] = []  # file number -> name (never reused)
        self._number: dict[str, int] = {}
        self._file: dict[int, np.ndarray] = {}  # layer -> file number of each chunk, -1: none
        self._batch: dict[int, np.ndarray] = {}  # layer -> record batch of each chunk

    def _room(self, layer: int, end: int) -> None:
        have = self._file.get(layer)
        if have is not None and len(have) >= end:
            return
        n = max(end, 2 * len(have) if have is not None else 64)
        file, batch = np.full(n, -1, dtype=np.int32), np.zeros(n, dtype=np.int32)
        if have is not None:
            file[: len(have)], batch[: len(have)] = have, self._batch[layer]
        self._file[layer], self._batch[layer] = file, batch

    def put(self, layer: int, chunks, name: str, batches) -> None:
        number = self._number.setdefault(name, len(self.names))
        if number == len(self.names):
            self.names.append(name)
        chunks = np.asarray(chunks, dtype=np.int64)
        self._room(layer, int(chunks.max()) + 1)
        self._file[layer][chunks] = number
        self._batch[layer][chunks] = batches

    def remove(self, layer: int, chunk: int) -> None:
        file = self._file.get(layer)
        if file is not None and chunk < len(file):
            file[chunk] = -1

    def clear(self) -> None:
        self._file.clear()
        self._batch.clear()

    def by_file(self, layer: int, chunks) -> tuple[dict[str, tuple[list[int], list[int]]], list]:
        """({file: (its chunks of `chunks`, their record batches)}, the chunks with no
        record): the files in the order of their first chunk in `chunks`, each file's
        chunks in their order there (one sort, not a lookup a chunk)."""
        at = np.asarray(chunks, dtype=np.int64)
        files, batches = self.records(layer, at)
        found = files >= 0
        absent = at[~found].tolist()
        if absent:
            at, files, batches = at[found], files[found], batches[found]
        order = np.argsort(files, kind="stable")
        ends = np.flatnonzero(np.diff(files[order])) + 1
        groups = sorted(np.split(order, ends), key=lambda g: g[0]) if len(at) else []
        return {
            self.names[files[g[0]]]: (at[g].tolist(), batches[g].tolist()) for g in groups
        }, absent  # fmt: skip

    def records(self, layer: int, chunks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(file number, batch) of each chunk; file number -1 where it has no record."""
        file = self._file.get(layer)
        if file is None:
            return np.full(len(chunks), -1, dtype=np.int32), np.zeros(len(chunks), np.int32)
        inside = chunks < len(file)
        at = np.where(inside, chunks, 0)
        return np.where(inside, file[at], -1), self._batch[layer][at]


class ChunkDirectory:
    """Residency and LRU order of chunks across layers, with a host budget in chunks."""

    def __init__(self, host_capacity: int):
        assert host_capacity >= 1, "the host tier must hold at least one chunk"
        self.host_capacity = host_capacity
        # Not a list: hits move chunks from the middle to the end in O(1).
        self._host: OrderedDict[Key, None] = OrderedDict()
        self._pinned: set[Key] = set()  # chunks still being filled: never spilled
        self.disk: dict[Key, DiskRecord] = {}  # (changed here only: `index` follows it)
        self.index = DiskIndex()

    # -- questions -------------------------------------------------------------

    def on_host(self, key: Key) -> bool:
        return key in self._host

    def on_disk(self, key: Key) -> bool:
        return key in self.disk

    @property
    def host_count(self) -> int:
        return len(self._host)

    def filling(self, key: Key) -> bool:
        """Whether the chunk is still being filled (it may not leave the host)."""
        return key in self._pinned

    def lru_order(self) -> list[Key]:
        return list(self._host)

    def over_budget(self) -> int:
        """How many chunks must leave the host to meet its budget."""
        return max(0, len(self._host) - self.host_capacity)

    def spill_candidates(self, n: int, first: dict[int, int] | None = None) -> list[Key]:
        """The `n` least recently used host chunks that may leave (filled ones only); with
        `first` (layer -> count), up to that many of each of those layers before others."""
        out: list[Key] = []
        if first:
            left = {layer: m for layer, m in first.items() if m > 0}
            for key in self._host:
                if len(out) == n or not left:
                    break
                if left.get(key[0], 0) > 0 and key not in self._pinned:
                    out.append(key)
                    left[key[0]] -= 1
                    if not left[key[0]]:
                        del left[key[0]]
        taken = set(out)
        for key in self._host:
            if len(out) == n:
                break
            if key not in self._pinned and key not in taken:
                out.append(key)
        return out

    # -- actions ---------------------------------------------------------------

    def add(self, key: Key, filling: bool = True) -> None:
        """A new chunk enters the host tier as most recently used."""
        assert key not in self._host and key not in self.disk, f"chunk {key} exists already"
        self._host[key] = None
        if filling:
            self._pinned.add(key)

    def add_file_on_disk(self, layer: int, name: str, chunks: list[int]) -> None:
        """Chunks that exist only on disk, in file `name` (a saved session's, adopted):
        chunk chunks[i] is its record i (in bulk: `TieredStore.adopt` adds a session's
        files so, with the collector paused)."""
        keys = [(layer, c) for c in chunks]
        assert self.disk.keys().isdisjoint(keys) and self._host.keys().isdisjoint(keys), (
            f"chunks of layer {layer} in {name} exist already"
        )
        records = [DiskRecord(name, i) for i in range(len(keys))]
        self.disk.update(zip(keys, records, strict=True))
        if chunks:
            self.index.put(layer, chunks, name, np.arange(len(chunks)))

    def filled(self, key: Key) -> None:
        self._pinned.discard(key)

    def touch(self, keys) -> None:
        """Selection hits: move these host chunks to the most recently used end."""
        for key in keys:
            if key in self._host:
                self._host.move_to_end(key)

    def reorder(self, lru_first: list[Key]) -> None:
        """Set the LRU order of these host chunks (least recent first); others keep theirs
        and stay before them. Used when recency is tracked elsewhere in bulk."""
        for key in lru_first:
            if key in self._host:
                self._host.move_to_end(key)

    def spilled(self, key: Key, record: DiskRecord | None = None) -> None:
        """The chunk left the host; its disk record is `record` (or the one it had)."""
        assert key in self._host, f"chunk {key} is not on the host"
        assert record is not None or key in self.disk, f"chunk {key} has no disk record"
        del self._host[key]
        if record is not None:
            self.disk[key] = record
            self.index.put(key[0], [key[1]], record.file, [record.batch])

    def spilled_to(self, layer: int, chunks: list[int], name: str) -> None:
        """`spilled` of each of `chunks` of `layer`, written to file `name` as its records
        0, 1, ...: their arrays' entries set at once (a spill of the 8B shape at 128k moves
        hundreds of thousands of chunks; one at a time the arrays cost 10 us a chunk)."""
        for i, c in enumerate(chunks):
            key = (layer, c)
            assert key in self._host, f"chunk {key} is not on the host"
            del self._host[key]
            self.disk[key] = DiskRecord(name, i)
        if chunks:
            self.index.put(layer, chunks, name, np.arange(len(chunks)))

    def loaded(self, key: Key) -> None:
        """The chunk was read back to the host (its disk record stays valid)."""
        assert key in self.disk, f"chunk {key} is not on disk"
        self._host[key] = None

    def drop(self, key: Key) -> DiskRecord | None:
        """Forget a chunk (truncation); return its disk record if it had one."""
        self._host.pop(key, None)
        self._pinned.discard(key)
        self.index.remove(*key)
        return self.disk.pop(key, None)

    def forget_disk(self) -> None:
        """Forget every disk record (the store's files are gone: it closed)."""
        self.disk.clear()
        self.index.clear()

    def files_in_use(self) -> set[str]:
        return {r.file for r in self.disk.values()}
