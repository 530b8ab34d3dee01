"""`Warmer`: a loaded session's chunk files read into host memory on a thread.

A session opens with its KV as the disk tier: nothing is read at load, and a
question reads the chunks it needs when it needs them. Meanwhile the warmer reads
the other files, layer by layer, each in one bulk read with its checksums verified,
into the free slots of the host tier, so that questions after it read memory: on a
CPU the layers are in place for exact attention; on CUDA the sparse prompt chunks
and decode steps gather from the pinned slab instead of files.

It takes the store's lock only to put what it read (chunks a question brought in
meanwhile are skipped, and so are chunks cut away by a truncation), stops when the
host budget is full, and is stopped before the store closes. A file it cannot read is
left to the question that needs it, which reports it by name.
"""

from __future__ import annotations

import threading


class Warmer:
    def __init__(self, store):
        self.store = store
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Warmer:
        self._thread = threading.Thread(target=self.run, name="offload-warm", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.wait()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def files(self) -> list[tuple[int, str]]:
        """(layer, file) of every chunk on disk and not on the host, in layer order."""
        store = self.store
        with store.lock:
            out = {
                (layer, rec.file): (layer, chunk)
                for (layer, chunk), rec in store.directory.disk.items()
                if not store.directory.on_host((layer, chunk))
            }
        return sorted(out, key=lambda f: out[f])

    def run(self) -> None:
        store = self.store
        for layer, name in self.files():
            if self._stop.is_set():
                return
            with store.lock:
                room = store.directory.host_capacity - store.directory.host_count
                want = [c for (lay, c), rec in store.directory.disk.items()
                        if lay == layer and rec.file == name
                        and not store.directory.on_host((lay, c))]  # fmt: skip
            if len(want) > room:
                return  # the budget is full: the rest stays on disk
            if not want:
                continue
            try:
                data = store.disk.read_all(name)
            except Exception:  # (StorageError: the question that needs it reports it)
                return
            with store.lock:
                if self._stop.is_set():
                    return
                # (a chunk cut away meanwhile is gone; one appended again under its
                # index since, and spilled, has another file)
                records = [(c, store.directory.disk.get((layer, c))) for c in want]
                pairs = [(c, data[r.batch]) for c, r in records if r is not None and r.file == name]
                kept = store.keep_on_host(layer, pairs)
                store.reads.add("disk", len(pairs), len(pairs) * store.layout.chunk_bytes)
            if kept < len(pairs):
                return
