"""Spills: which chunks leave the host for disk, and the thread that writes them.

    StoreSpills   `TieredStore`'s spills (mixed in): least recently used chunks past the
                  host budget; on CUDA, once the context outgrows the budget, each
                  layer kept to an equal share of it, so the pinned slabs stay within it
    SpillWriter   the background thread that writes spilled chunks to disk

`spill` hands the writer jobs (copies of the chunks' KV and abstracts, one job per
layer) and goes on; `settle` takes the finished write and applies it (the chunks leave
the host only then, so a failed write loses nothing). One spill is in flight at most.
The writer holds no store state: what a job means is the store's business.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from storage import threads
from storage.abstracts import ChunkAbstracts
from storage.disk import DiskTier, StorageError

PIECE_SHARE = 16  # an append past the host budget: pieces of 1/16 of a layer's share

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

    def leaving(self) -> set[tuple[int, int]]:
        """(layer, chunk) of the chunks the spill in flight moves."""
        jobs = self._inflight[0] if self._inflight is not None else []
        return {(layer, c) for layer, chunks, *_ in jobs for c in chunks}

    def submit(self, jobs: list[Job]) -> None:
        assert self._inflight is None, "one spill in flight at most: take the last one first"
        if self._pool is None:
            self._pool = threads.pool(1, "offload-spill")
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


class StoreSpills:
    """`TieredStore`'s spills: which chunks leave the host and when (mixed in; the state is
    the store's: its directory, tiers, recency, lengths and writer)."""

    def _outgrown(self, tokens: int) -> bool:
        """Whether, on CUDA, a context of `tokens` in every layer passes the host budget:
        each layer then keeps to its share of it (`_share`). A slab's slots serve its own
        layer only, and a pinned slab does not shrink: where one layer's spilled chunks
        made room for another's, every slab would grow in turn to its layer's whole KV (a
        layer-by-layer prefill appends a layer at once; a global LRU spill takes the older
        layers' chunks), pinning the context's KV whatever the budget. With shares the
        slabs stay within the budget and a few pieces a layer (`_piece`) and a step's
        reads. A CPU keeps its layers whole on the host as long as they fit instead: a
        layer held in place is attended exactly."""
        L = self.layout
        pinned = bool(self.host) and self.host[0].pin
        return pinned and L.num_layers * L.num_chunks(tokens) > self.directory.host_capacity

    @property
    def _share(self) -> int:
        return self.directory.host_capacity // self.layout.num_layers

    @property
    def _piece_chunks(self) -> int:
        return max(self.spill_batch, self._share // PIECE_SHARE)

    def _slab_limit(self) -> int:
        """The slots a pinned slab grows to at most, unless a request needs more: its
        layer's share of the budget and two pieces (`_piece`: one appended, one being
        written). Within the budget every layer needs at most its share."""
        return self._share + 2 * self._piece_chunks

    def share_left(self, layer: int) -> int | None:
        """The chunks `layer` may take on the host before its share is full, where the
        context outgrows the budget (`_outgrown`); None where shares do not apply."""
        if not self._outgrown(max(self.lengths)):
            return None
        return self._share - self.host[layer].num_chunks

    def room_left(self, layer: int, n: int) -> int | None:
        """The chunks of `layer` the host may take now, where `n` chunks of it read from
        disk do not all fit: on CUDA past the budget, what is left of the layer's share;
        elsewhere (a CPU: one LRU over every layer), the budget's free slots. None where
        they all fit."""
        share = self.share_left(layer)
        if share is not None:
            return share
        free = self.directory.host_capacity - self.directory.host_count
        return None if n <= free else free

    def _piece(self, layer: int, S: int) -> int | None:
        """Tokens an append of S tokens to `layer` goes in (whole chunks: `PIECE_SHARE` of
        a layer's share, a spill batch at least; two pieces in flight, one appended and
        one being written, take that much more memory, and a piece is a file), or None:
        at once, where the context with them fits the host budget, or they keep the
        layer within its share and a piece."""
        start, C = self.lengths[layer], self.layout.chunk_size
        piece = self._piece_chunks
        if start % C or not self._outgrown(start + S):  # (a piece must start a chunk)
            return None
        if self.host[layer].num_chunks + self.layout.num_chunks(S) <= self._share + piece:
            return None
        return piece * C

    def _sync_lru(self) -> None:
        keys = self.directory.lru_order()
        # (a chunk never selected, one loaded from a session, has clock 0; the clocks as
        # lists: an element of a tensor read one by one costs a us, and a spill past the
        # budget on a CPU sorts every host chunk)
        rec = [r.tolist() for r in self._recency]
        clock = torch.tensor(
            [rec[layer][chunk] if chunk < len(rec[layer]) else 0 for layer, chunk in keys]
        )
        self.directory.reorder([keys[i] for i in torch.argsort(clock, stable=True).tolist()])

    def spill(self, layer: int | None = None) -> None:
        """Move least recently used chunks to disk until the host is within budget (on
        CUDA, those of the layers past their shares first: `_outgrown`); with `layer`, that
        layer's until it is within its share (`append` in pieces).

        The files are written by a background thread (`settle` applies them): the
        chunks stay on the host, readable, until their file is complete, so a failed
        write (a full disk) loses nothing, and the write overlaps what the caller
        computes next (the next layer of a prefill). One spill is in flight at most:
        a spill first waits for the previous one, which bounds how far the host goes
        past its budget meanwhile to one spill's chunks."""
        self.settle()
        if layer is not None:  # (the context outgrows the budget: `_piece` found so)
            keys = self._layer_candidates(layer, self.host[layer].num_chunks - self._share)
        else:
            self._sync_lru()
            need = self.directory.over_budget()
            if not need:
                return
            first = None
            if self._outgrown(max(self.lengths)):  # the layers past their shares give first
                first = {i: h.num_chunks - self._share for i, h in enumerate(self.host)}
            keys = self.directory.spill_candidates(max(need, self.spill_batch), first)
            if len(keys) < need:
                raise StorageError(f"host tier: {need} chunks must leave but only {len(keys)} can")
        if not keys:
            return
        by_layer: dict[int, list[int]] = {}
        for i, chunk in keys:
            by_layer.setdefault(i, []).append(chunk)
        jobs = []
        for i, chunks in sorted(by_layer.items()):
            fresh = [c for c in chunks if not self.directory.on_disk((i, c))]
            data = abstracts = None
            if fresh:  # copies: the writer never reads the store's own tensors
                data = self.host[i].gather_chunks(fresh)
                a = self.dev[i].abstracts(fresh)
                abstracts = ChunkAbstracts(a.kmin.cpu(), a.kmax.cpu(), a.kmean.cpu())
            jobs.append((i, chunks, fresh, data, abstracts))
        self._writer.submit(jobs)

    def _layer_candidates(self, layer: int, n: int) -> list[tuple[int, int]]:
        """The `n` least recently used host chunks of `layer` that may leave."""
        if n <= 0:
            return []
        clock = self._recency[layer].tolist()
        chunks = [c for c in self.host[layer].slot_of if not self.directory.filling((layer, c))]
        chunks.sort(key=lambda c: clock[c] if c < len(clock) else 0)
        return [(layer, c) for c in chunks[:n]]

    def settle(self, wait: bool = True) -> None:
        """Apply the spill written in the background: its chunks leave the host. Raises
        the write's error (DiskFullError) with the chunks it could not write still on
        the host. Without `wait`, only if the write has finished."""
        if not self._writer.busy:
            return
        with self.lock:  # (tier_bytes may call this while a prefetch worker reads the store)
            done = self._writer.take(wait)  # (an interrupt here keeps the job for later)
            if done is None:
                return
            jobs, names, error = done
            written = jobs[: len(names)]  # a failure stops the writer: the rest stay on the host
            for (layer, chunks, fresh, _, _), name in zip(written, names, strict=True):
                self.directory.spilled_to(layer, fresh, name)
                written_now = set(fresh)
                for c in chunks:
                    if c not in written_now:
                        self.directory.spilled((layer, c))
                    self.host[layer].free(c)
                self.host[layer].give_back()
                self._spilled += len(chunks)
        if error is not None:
            raise error
