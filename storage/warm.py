"""`Warmer`: a loaded session's chunk files read into host memory on a few threads.

A session opens with its KV as the disk tier: nothing is read at load, and a
question reads the chunks it needs when it needs them. Meanwhile the warmer reads
the other files, layer by layer from the last, each file in one bulk read with its
checksums verified (a few files at once), into the free slots of the host tier, so
that questions after it read memory: on a CPU the layers are in place for exact
attention; on CUDA the sparse prompt chunks and decode steps gather from the pinned
slab instead of files, and once every layer is read in, each in slot order, decode
steps run as captured CUDA graphs again.

It takes the store's lock only to put what it read, a piece of a file at a time
(chunks a question brought in meanwhile are skipped, and so are chunks cut away by a
truncation), yielding the lock between pieces to a question waiting for it, stops when the
host budget is full (on CUDA, where the session outgrows the budget, a layer stops at
its share of it: storage/spill.py), and is stopped before the store closes. A file it
cannot read is skipped and left to the question that needs it, which reports it by
name.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter

import torch

from storage import threads
from storage.reading import take_rows

READERS = 4  # files read at once, at most (checksums and copies release the GIL); one
# core is left to the question that may be computing meanwhile
# Chunks put on the host under one hold of the store's lock: 4 MiB of the 8B shape, a few
# ms. A file's 1,024 at once held it 45-75 ms a file, most of a warm-up's time, and a
# question asked meanwhile waited that long at each of its layers' reads (2026-12-07).
PIECE = 64


class Warmer:
    def __init__(self, store, readers: int | None = None):
        self.store = store
        self.readers = readers or max(1, min(READERS, (os.cpu_count() or 2) - 1))
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()  # the work list and the files left per layer
        self.error: Exception | None = None  # the last read that failed, if any

    def start(self) -> Warmer:
        """Read on `readers` daemon threads (an exit does not wait for them; they only
        read the session's files)."""
        self._plan()
        self._threads = [
            threads.thread(self._reader, f"offload-warm-{i}", daemon=True)
            for i in range(self.readers)
        ]
        for t in self._threads:
            t.start()
        return self

    @property
    def running(self) -> bool:
        """Are its readers still reading (started, neither done nor stopped)?"""
        return any(t.is_alive() for t in self._threads)

    def stop(self) -> None:
        self._stop.set()
        self.wait()

    def wait(self) -> None:
        for t in self._threads:
            t.join()

    def files(self) -> dict[tuple[int, str], list[int]]:
        """The chunks on disk and not on the host, by (layer, file), the last layer first:
        a question asked at once reads from the first layer up (and keeps the layers it
        reads whole), so the two meet halfway instead of reading the same files twice."""
        store = self.store
        out: dict[tuple[int, str], list[int]] = {}
        with store.lock:  # (a question asked at once waits for this: arrays, not records)
            for layer in reversed(range(store.layout.num_layers)):
                chunks = torch.arange(store.layout.num_chunks(store.lengths[layer]))
                groups, _ = store.directory.index.by_file(layer, store.host[layer].missing(chunks))
                out.update(((layer, name), group) for name, (group, _) in groups.items())
        return out

    def run(self) -> None:
        """The whole warm-up on the calling thread (what the readers share out)."""
        self._plan()
        self._reader()

    def _plan(self) -> None:
        self._work = list(self.files().items())  # taken from the front by the readers
        self._left = Counter(layer for (layer, _), _ in self._work)  # files per layer
        self._begun: set[int] = set()  # layers whose slab was reserved

    def _reader(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if not self._work:
                    return
                (layer, name), chunks = self._work.pop(0)
                first = layer not in self._begun
                self._begun.add(layer)
            try:
                if first:  # the layer's whole slab at once (pinned once, on CUDA), not
                    # grown by 1.25x file after file (pinning all the sizes on the way)
                    self.store.reserve_host(layer, self.store.lengths[layer])
                if not self._read(layer, name, chunks):
                    self._stop.set()  # the host budget is full: the rest stays on disk
                    return
                with self._lock:
                    self._left[layer] -= 1
                    done = self._left[layer] == 0
                if done:
                    self._put_in_order(layer)
            except Exception as e:  # a warm-up is an optimization: what it could not read,
                self.error = e  # the reads that need it read, and report by name

    def _read(self, layer: int, name: str, chunks: list[int]) -> bool:
        """Put the file's chunks that are still wanted on the host; False to stop."""
        store = self.store
        with store.lock:
            room = store.directory.host_capacity - store.directory.host_count
            want = [c for c in chunks if not store.directory.on_host((layer, c))]
            share = store.share_left(layer)
        if share is not None:  # (on CUDA, past the budget: each layer to its share)
            want = want[: max(0, share)]
        if len(want) > room:
            return False
        if not want:
            return True
        data = store.disk.read_all(name)
        for i in range(0, len(want), PIECE):
            with store.lock:  # (a piece at a time: a question's reads wait one piece at most)
                if self._stop.is_set():
                    return False
                kept, rows = store.rows_in_file(layer, name, want[i : i + PIECE])
                store.reads.add("disk", len(kept), len(kept) * store.layout.chunk_bytes)
                n = store.keep_on_host(layer, kept, take_rows(data, rows))
            # (fewer: the budget is full; or, past it, a question filled the layer's share
            # meanwhile, which does not stop the other layers)
            if n < len(kept):
                return store.share_left(layer) is not None
            time.sleep(0)  # (a thread waiting for the lock takes it now: locks are not fair)
        return True

    def _put_in_order(self, layer: int) -> None:
        """A layer read in whole: each chunk to the slot of its index (what the fixed-shape
        CUDA step and in-place attention read)."""
        store = self.store
        with store.lock:
            store.host[layer].put_in_order(store.lengths[layer])
