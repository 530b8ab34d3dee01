"""`SpillWriter`: the background thread that writes spilled chunks to disk.

`TieredStore.spill` hands it jobs (copies of the chunks' KV and abstracts, one job
per layer) and goes on; `TieredStore.settle` takes the finished write and applies it
(the chunks leave the host only then, so a failed write loses nothing). One spill is
in flight at most. Holds no store state: what a job means is the store's business.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from storage.disk import DiskTier, StorageError

# (layer, chunks leaving the host, those of them not on disk yet, their KV, abstracts)
Job = tuple


class SpillWriter:
    def __init__(self, disk: DiskTier):
        self.disk = disk
        self._pool: ThreadPoolExecutor | None = None  # started by the first `submit`
        self._inflight = None  # (jobs, future) of the spill being written

    @property
    def busy(self) -> bool:
        return self._inflight is not None

    def submit(self, jobs: list[Job]) -> None:
        assert self._inflight is None, "one spill in flight at most: take the last one first"
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="offload-spill")
        self._inflight = (jobs, self._pool.submit(self._write, jobs))

    def take(
        self, wait: bool = True
    ) -> tuple[list[Job], list[str | None], StorageError | None] | None:
        """The spill in flight, once written: (jobs, file name of each written job, the
        error that stopped the writer or None); it is then no longer in flight. None when
        none is in flight, or (without `wait`) its write has not finished. An interrupt
        while waiting leaves it in flight, to be taken later."""
        if self._inflight is None:
            return None
        jobs, future = self._inflight
        if not wait and not future.done():
            return None
        names, error = future.result()
        self._inflight = None
        return jobs, names, error

    def _write(self, jobs: list[Job]) -> tuple[list[str | None], StorageError | None]:
        """(In the writer thread.) One file per layer; stops at the first failure."""
        names: list[str | None] = []
        for layer, _, fresh, data, abstracts in jobs:
            if not fresh:
                names.append(None)
                continue
            try:
                names.append(self.disk.write_chunks(layer, fresh, data, abstracts))
            except StorageError as e:
                return names, e
        return names, None

    def close(self) -> None:
        """Wait for a write still running and stop the thread."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
