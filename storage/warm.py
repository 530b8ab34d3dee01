"""`Warmer`: a loaded session's chunk files read into host memory on a thread.

A session opens with its KV as the disk tier: nothing is read at load, and a
question reads the chunks it needs when it needs them. Meanwhile the warmer reads
the other files, layer by layer from the last, each in one bulk read with its checksums verified,
into the free slots of the host tier, so that questions after it read memory: on a
CPU the layers are in place for exact attention; on CUDA the sparse prompt chunks
and decode steps gather from the pinned slab instead of files, and once every layer
is read in, each in slot order, decode steps run as captured CUDA graphs again.

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
        self.error: Exception | None = None  # what stopped it early, if anything

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

    def files(self) -> dict[tuple[int, str], list[int]]:
        """The chunks on disk and not on the host, by (layer, file), the last layer first:
        a question asked at once reads from the first layer up, so the two meet halfway
        instead of reading the same files twice."""
        store = self.store
        out: dict[tuple[int, str], list[int]] = {}
        with store.lock:
            for (layer, chunk), rec in store.directory.disk.items():
                if not store.directory.on_host((layer, chunk)):
                    out.setdefault((layer, rec.file), []).append(chunk)
        order = sorted(out, key=lambda f: (-f[0], min(out[f])))
        return {f: out[f] for f in order}

    def run(self) -> None:
        try:
            files = list(self.files().items())
            for i, ((layer, name), chunks) in enumerate(files):
                if self._stop.is_set() or not self._read(layer, name, chunks):
                    return
                if i + 1 == len(files) or files[i + 1][0][0] != layer:
                    self._put_in_order(layer)
        except Exception as e:  # (a warm-up is an optimization: what it could not do,
            self.error = e  # the reads that need the chunks do, and report)

    def _read(self, layer: int, name: str, chunks: list[int]) -> bool:
        """Put the file's chunks that are still wanted on the host; False to stop."""
        store = self.store
        with store.lock:
            room = store.directory.host_capacity - store.directory.host_count
            want = [c for c in chunks if not store.directory.on_host((layer, c))]
        if len(want) > room:
            return False  # the budget is full: the rest stays on disk
        if not want:
            return True
        data = store.disk.read_all(name)  # (StorageError: stops the warm-up, see `run`)
        with store.lock:
            if self._stop.is_set():
                return False
            # (a chunk cut away meanwhile is gone; one appended again under its index
            # since, and spilled, has another file)
            records = [(c, store.directory.disk.get((layer, c))) for c in want]
            pairs = [(c, data[r.batch]) for c, r in records if r is not None and r.file == name]
            kept = store.keep_on_host(layer, pairs)
            store.reads.add("disk", len(pairs), len(pairs) * store.layout.chunk_bytes)
        return kept == len(pairs)

    def _put_in_order(self, layer: int) -> None:
        """A layer read in whole: each chunk to the slot of its index (what the fixed-shape
        CUDA step and in-place attention read). The new slab is allocated (pinned, on
        CUDA) outside the lock; only the copy into it holds the lock."""
        store = self.store
        host = store.host[layer]
        if host.in_order(store.lengths[layer]):
            return
        slab = host.same_size_slab()
        with store.lock:
            host.put_in_order(store.lengths[layer], slab)
