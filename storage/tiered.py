"""`TieredStore`: the device, host and disk tiers of every layer, composed.

    append(layer, k, v)      new tokens: full copy to the host chunk being filled,
                             sink/window copy on the device; a completed chunk gets
                             its summary and abstract on the device
    read_range(layer, a, b)  K/V of tokens a..b-1 from wherever they live
    gather_all(layer)        all tokens (dense attention): sink and window from the
                             device, the rest from host and disk
                             (the reads: storage/reading.py, mixed in)
    truncate(n)              keep the first n tokens (reuse of a shared prefix)
    adopt(...), warm()       a loaded session's files as the disk tier, read into
                             host memory on a thread (storage/warm.py)

When the host holds more chunks than its budget, the least recently used filled
chunks are spilled to disk, `spill_batch` at a time and one file per layer, so
files stay few (storage/spill.py, mixed in; on CUDA a context past the budget keeps
each layer to its share of it). A chunk read back keeps its disk record: KV never
changes, so spilling it again writes nothing.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Collection
from pathlib import Path

import torch

from storage import threads
from storage.abstracts import ChunkAbstracts, SavedAbstracts, chunk_abstracts
from storage.device import DeviceTier
from storage.directory import ChunkDirectory, paused_gc
from storage.disk import DiskTier, StorageError
from storage.host import HostTier
from storage.layout import KVLayout
from storage.quant import QuantKeys, quantize_keys
from storage.reading import StoreReads, TierReads
from storage.spill import SpillWriter, StoreSpills
from storage.staging import PinnedStaging
from storage.warm import Warmer

BULK_APPEND_MIN = 64  # tokens: appends with fewer whole chunks go chunk by chunk
SUMMARY_BLOCK = 16384  # tokens of whole chunks summarized at a time, at most


class TieredStore(StoreReads, StoreSpills):
    def __init__(
        self,
        layout: KVLayout,
        dtype: torch.dtype,
        device: torch.device,
        host_bytes: int,
        disk_dir: Path,
        disk_bytes: int,
        sink: int = 16,
        window: int = 256,
        spill_batch: int = 64,
        abstracts_on_device: bool = True,
        max_tokens: int | None = None,
    ):
        """`max_tokens`: the most a layer will hold (the model's window); the host slabs
        and the summaries' buffers grow geometrically but never past it."""
        L = layout
        capacity = host_bytes // L.chunk_bytes
        if capacity < 2 * L.num_layers:
            raise StorageError(
                f"host budget (kv.host_bytes) of {host_bytes} bytes holds {capacity} chunks; "
                f"at least {2 * L.num_layers} ({2 * L.num_layers * L.chunk_bytes} bytes) are "
                "needed (two chunks per layer)"
            )
        self.layout, self.dtype, self.device = layout, dtype, device
        self.sink, self.window, self.spill_batch = sink, window, spill_batch
        pin = device.type == "cuda"
        self.directory = ChunkDirectory(capacity)
        most = None if max_tokens is None else L.num_chunks(max_tokens)
        self.host = [HostTier(layout, dtype, pin, most) for _ in range(L.num_layers)]
        where = device if abstracts_on_device else torch.device("cpu")
        self.dev = [DeviceTier(layout, dtype, device, sink, window, where, most)
                    for _ in range(L.num_layers)]  # fmt: skip
        self.abstracts_on_device = self.dev[0].abstracts_on_device
        self.disk = DiskTier(disk_dir, layout, dtype, disk_bytes)
        self.lengths = [0] * L.num_layers
        # Recency of each chunk (a clock value per layer and chunk), kept as tensors so a
        # selection touching hundreds of chunks costs one indexing op; the directory's
        # LRU order is brought in line from it only when a spill needs it.
        self._clock = 0
        self._recency = [torch.zeros(64, dtype=torch.long) for _ in range(L.num_layers)]
        self.reads = TierReads()
        self._spilled = 0  # chunks moved to disk (`spilled_chunks`)
        # Held by every caller that reads or changes the store while a prefetch worker
        # may be running (offload/pipeline.py); re-entrant for nested store calls.
        self.lock = threading.RLock()
        self._staging = PinnedStaging() if device.type == "cuda" else None
        self._writer = SpillWriter(self.disk)  # writes spilled chunks (`spill`)
        # Grows the pinned slabs ahead of need (`HostTier.ahead`), one layer at a time.
        self._grower = threads.pool(1, "offload-grow") if pin else None
        for host in self.host:
            host.ahead = None if self._grower is None else self._grower.submit
            host.limit = self._slab_limit() if pin else None
        self._warmer: Warmer | None = None  # reads a loaded session's files (`warm`)
        self._pid = os.getpid()  # the process whose threads and files these are (`close`)

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> TieredStore:
        self.disk.start()
        return self

    def close(self) -> None:
        """Delete this store's chunk files (and its directory when left empty). Idempotent.

        In a process forked from the one that made it (a copy the child let go of), the
        files and threads are the parent's: the store only lets go of them."""
        if self._pid != os.getpid():
            self.disk.disown()
            return
        if self._warmer is not None:
            self._warmer.stop()
        try:
            self.settle()
        except StorageError:
            pass  # what could not be written is being discarded anyway
        self._writer.close()
        if self._grower is not None:
            self._grower.shutdown(wait=True, cancel_futures=True)  # (what is queued: dropped)
        # Every file this store wrote, recorded or not (an interrupt may have come between
        # a write and its record); a loaded session's files are not among them.
        for name in self.disk.own_files():
            self.disk.delete(name)
        self.directory.forget_disk()
        self.disk.close()

    def release(self) -> None:
        """Let go of the tiers' memory (pinned slabs, device buffers), after `close`."""
        if self._staging is not None:
            torch.cuda.synchronize()  # (no queued device read of a slab freed here)
        self.host, self.dev = [], []

    def __enter__(self) -> TieredStore:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writing -----------------------------------------------------------------

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [H, S, D] of tokens lengths[layer] .. +S-1.

        Whole chunks in the middle of a long append take a run of host slots at once
        and are copied there per head, straight from where k and v are (a GPU to the
        pinned slab: no staging), and their summaries are computed from k as given;
        the partial chunks at either end go chunk by chunk."""
        piece = self._piece(layer, k.shape[1])
        if piece is None:
            self._append(layer, k, v)
            if self.directory.over_budget():
                self.spill()
            return
        # Past the layer's share of a host budget the context outgrows (a layer-by-layer
        # prefill's whole layer): in pieces, each followed by a spill of the layer's own
        # oldest chunks past its share (`_outgrown`).
        for s in range(0, k.shape[1], piece):
            self._append(layer, k[:, s : s + piece], v[:, s : s + piece])
            self.spill(layer)

    def _append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """`append` without the spill after it."""
        C = self.layout.chunk_size
        start = self.lengths[layer]
        S = k.shape[1]
        self.dev[layer].write_recent(start, k, v)
        a = min(S, -start % C)  # the end of the partial first chunk, in k
        b = a + (S - a) // C * C  # the end of the whole chunks
        run = None
        if b - a >= BULK_APPEND_MIN:
            c0 = (start + a) // C
            run = self.host[layer].put_run(c0, (b - a) // C)
        if run is None:  # chunk by chunk
            a = b = S
        new, filled = self._append_pieces(layer, start, k[:, :a], v[:, :a])
        # Keys of the chunks completed here, in order, for their summaries and abstracts:
        # those completed chunk by chunk in one call, the whole chunks in blocks (their
        # float32 temporaries stay small).
        keys = [torch.cat([self.host[layer].chunk(c)[0] for c in filled], dim=1)] if filled else []
        if run is not None:
            n = (b - a) // C
            self._write_run(layer, c0, run, k[:, a:b], v[:, a:b])
            block = max(C, SUMMARY_BLOCK // C * C)
            keys += [k[:, s : min(b, s + block)] for s in range(a, b, block)]
            # (the rest, fewer than C tokens from a chunk's start, completes no chunk)
            tail, _ = self._append_pieces(layer, start + b, k[:, b:], v[:, b:])
            new += [*range(c0, c0 + n), *tail]
        if new:
            self._mark_recent(layer, torch.tensor(new))
        if len(keys) > 1:
            self.dev[layer].reserve_chunks((start + b) // C)
        for part in keys:
            self.dev[layer].add_chunks(part.to(self.device, self.dtype))
        self.lengths[layer] = start + S

    def append_layers(
        self, layers: list[int], kv: torch.Tensor, in_window: Collection[int] = ()
    ) -> None:
        """`append(layer, kv[j, 0], kv[j, 1])` for each of `layers` (kv [n, 2, H, S, D]), all
        at the same token: what a decode loop over the fixed-shape step hands over every
        few chunks. When that token starts a chunk and S is whole chunks, the KV goes to
        the host slots in runs (from CUDA: copies queued into the pinned slabs, which the
        host does not wait for, `HostTier.write_run`) and the summaries and abstracts of
        every layer are computed at once: 32 layers of the 8B shape cost about a fifth of
        the device calls of an append per layer (copies per head and layer, summaries per
        layer), each a launch on CUDA. `in_window`: layers whose window holds the tokens
        already."""
        C = self.layout.chunk_size
        start, S = self.lengths[layers[0]], kv.shape[3]
        if start % C or S % C or any(self.lengths[i] != start for i in layers):
            for j, layer in enumerate(layers):
                self.append(layer, kv[j, 0], kv[j, 1])
            return
        n, _, H, _, D = kv.shape
        queued = kv.is_cuda and self.host[layers[0]].pin  # (copies the host does not wait for)
        keys = kv[:, 0].reshape(n * H, S, D).to(self.device, self.dtype)
        qk = quantize_keys(keys, self.layout.summary_bits, C)
        per = [t.view(n, H, *t.shape[1:]) for t in (qk.codes, qk.scale, qk.zero)]
        a = chunk_abstracts(keys, C)  # (computed where an append computes them)
        where = self.dev[0].kmin.data.device
        a = [t.to(where, non_blocking=queued).view(-1, n, H, D) for t in (a.kmin, a.kmax, a.kmean)]
        ready = None
        if queued and where.type == "cpu":  # (the abstracts' copies: `add_summaries`)
            ready = torch.cuda.current_stream(kv.device).record_event()
        src = kv.to(dtype=self.dtype) if queued else kv.to("cpu", self.dtype)
        c0 = start // C
        chunks = torch.arange(c0, c0 + S // C)
        for j, layer in enumerate(layers):
            run = self.host[layer].put_run(c0, S // C)
            if run is None:  # freed slots come first: this layer chunk by chunk
                self.append(layer, kv[j, 0], kv[j, 1])
                continue
            if layer not in in_window:
                self.dev[layer].write_recent(start, kv[j, 0], kv[j, 1])
            self._write_run(layer, c0, run, src[j, 0], src[j, 1])
            self._mark_recent(layer, chunks)
            summary = QuantKeys(qk.bits, C, *(t[j] for t in per))
            self.dev[layer].add_summaries(summary, ChunkAbstracts(*(t[:, j] for t in a)), ready)
            self.lengths[layer] = start + S
        if self.directory.over_budget():
            self.spill()

    def _write_run(self, layer: int, c0: int, run: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Whole chunks c0 .. (k [H, n * C, D] and v) into the host slots `put_run` gave
        them, from slot `run` on, as filled chunks."""
        for c in range(c0, c0 + k.shape[1] // self.layout.chunk_size):
            self.directory.add((layer, c), filling=False)
        self.host[layer].write_run(run, k, v)

    def reserve_host(self, layer: int, num_tokens: int) -> bool:
        """Make `layer`'s host slab hold its first `num_tokens` tokens (on CUDA: pinned)
        ahead of the appends that fill it, when the host budget holds that many tokens of
        every layer. A reserved slab grows where it is, without the lock; a slab that
        moves takes the lock only to swap. So a thread can do it while a layer computes
        (a layer-by-layer prefill; offload/generate.py). Returns whether it reserved."""
        n = self.layout.num_chunks(num_tokens)
        host = self.host[layer]
        with self.lock:
            missing = sum(max(0, n - h.num_chunks) for h in self.host)
            room = self.directory.host_capacity - self.directory.host_count
        if n <= host.capacity or missing > room:
            return False
        if not host.grow_in_place(n):
            slab = host.new_slab(n)
            with self.lock:
                host.take_slab(slab)
        return True

    def _append_pieces(
        self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[list[int], list[int]]:
        """Write k, v [H, S, D] at token `start` chunk by chunk; return the chunks begun
        and the chunks completed."""
        C = self.layout.chunk_size
        S = k.shape[1]
        host = self.host[layer]
        kc, vc = k.to("cpu", self.dtype), v.to("cpu", self.dtype)
        pos = start
        new, filled = [], []
        while pos < start + S:
            chunk, offset = divmod(pos, C)
            n = min(C - offset, start + S - pos)
            if offset == 0:
                self.directory.add((layer, chunk))
                host.put(chunk)
                new.append(chunk)
            host.write(
                chunk,
                offset,
                kc[:, pos - start : pos - start + n],
                vc[:, pos - start : pos - start + n],
            )
            if offset + n == C:
                self.directory.filled((layer, chunk))
                filled.append(chunk)
            pos += n
        return new, filled

    def _mark_recent(self, layer: int, chunks: torch.Tensor) -> None:
        self._clock += 1
        rec = self._recency[layer]
        top = int(chunks.max()) + 1
        if top > rec.shape[0]:
            grown = torch.zeros(max(2 * rec.shape[0], top), dtype=torch.long)
            grown[: rec.shape[0]] = rec
            rec = self._recency[layer] = grown
        rec[chunks] = self._clock

    # -- truncation --------------------------------------------------------------

    def truncate(self, n: int) -> None:
        """Keep the first n tokens of every layer. Under the lock: a loaded session's
        warmer may be putting chunks on the host meanwhile (it skips those cut away)."""
        self.settle()
        with self.lock:
            self._truncate(n)

    def _truncate(self, n: int) -> None:
        C = self.layout.chunk_size
        keep_chunks = -(-n // C)
        live_files_before = self.directory.files_in_use()
        for layer in range(self.layout.num_layers):
            T = self.lengths[layer]
            assert n <= T, f"cannot truncate layer {layer} of {T} tokens to {n}"
            for chunk in range(keep_chunks, -(-T // C)):
                if self.directory.on_host((layer, chunk)):
                    self.host[layer].free(chunk)
                self.directory.drop((layer, chunk))
            self.host[layer].give_back()
            if n % C:  # the last kept chunk is partial again: it must be on the host, filling
                self._reopen_partial(layer, n // C)
            self.dev[layer].truncate_chunks(n // C)
            self.lengths[layer] = n
            self._refill_recent(layer)
        for name in live_files_before - self.directory.files_in_use():
            self.disk.delete(name)

    def _reopen_partial(self, layer: int, chunk: int) -> None:
        """Make `chunk` the host chunk being filled (its disk record, if any, is dropped)."""
        key = (layer, chunk)
        if not self.directory.on_host(key):
            _, kv = self._chunk_kv(layer, chunk)
            self.host[layer].put(chunk, kv)
            self.directory.loaded(key)
        self.directory.drop(key)
        self.directory.add(key)

    def _refill_recent(self, layer: int, with_sink: bool = False) -> None:
        """Rebuild the device's window copy (and, after a load, its sink copy) from
        host/disk. A cut never changes the sink tokens it keeps, so it skips them."""
        n = self.lengths[layer]
        if n == 0:
            return
        if with_sink:
            kv = self.read_range(layer, 0, min(self.sink, n))
            self.dev[layer].write_recent(0, kv[0], kv[1])
        w0 = max(min(self.sink, n), n - self.window)
        if n > w0:
            kv = self.read_range(layer, w0, n)
            self.dev[layer].write_recent(w0, kv[0], kv[1])

    # -- sessions ------------------------------------------------------------------

    def adopt(
        self, num_tokens: int, files: list[tuple[int, Path, list[int]]], device: dict,
        abstracts: Callable[[], dict],
    ) -> None:  # fmt: skip
        """Take a saved session's KV as this (empty) store's content.

        files: (layer, path, chunk indices, crc32s or None) of each chunk file; they become
        disk records (memory-mapped and checked now, never deleted by this store), read
        when first needed.
        device: the saved summaries per layer (`L<layer>.codes`, `.scale`, `.zero`).
        abstracts: reads the saved abstracts per layer (`L<layer>.kmin`, ...); it runs when
        they are first asked for (`SavedAbstracts`), which a question never does.
        """
        assert self.num_tokens == 0, "adopt needs an empty store"
        L = self.layout
        C = L.chunk_size
        with paused_gc():  # (one collection after every file's records, not many)
            for layer, path, chunks, crc32 in files:
                name = str(path)
                self.disk.open(name, layer, chunks, crc32)
                self.directory.add_file_on_disk(layer, name, chunks)
        n = num_tokens // C
        room = self.dev[0].room_for(n)  # the first appends copy nothing
        for layer in range(L.num_layers):
            dev = self.dev[layer]
            dev.reserve_chunks(room)
            for key, g in (("codes", dev.codes), ("scale", dev.scale), ("zero", dev.zero)):
                g.append(device[f"L{layer}.{key}"])  # (copied into place: no device temporary)
            self.lengths[layer] = num_tokens
        saved = SavedAbstracts(abstracts)
        for layer in range(L.num_layers):
            self.dev[layer].abstracts_later(saved.layer(layer), n, room)
        for layer in range(L.num_layers):
            if num_tokens % C:
                self._reopen_partial(layer, num_tokens // C)
            self._refill_recent(layer, with_sink=True)

    def warm(self) -> Warmer:
        """Start reading the chunks still on disk into host memory on threads, while the
        host budget has room (a session just loaded; storage/warm.py). On CUDA the
        grower thread pins each layer's whole slab meanwhile, from the first layer, which
        a question asked at once reads first (the warmer reads from the last): the
        question then finds its slabs pinned instead of pinning them on its own path (on
        the H200 that was 4.4 s of a cold question's 11.4 on a 128k session)."""
        if self._warmer is None:
            if self._grower is not None:
                for layer in range(self.layout.num_layers):
                    self._grower.submit(self.reserve_host, layer, self.lengths[layer])
            self._warmer = Warmer(self).start()
        return self._warmer

    @property
    def warming(self) -> bool:
        """Is a loaded session's warm-up reading its files meanwhile (`warm`)?"""
        return self._warmer is not None and self._warmer.running

    # -- accounting --------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        return self.lengths[-1]

    @property
    def spilled_chunks(self) -> int:
        """Chunks moved to disk so far (the spill being written included, once done)."""
        self.settle()
        return self._spilled

    def tier_bytes(self) -> dict[str, int]:
        self.settle()  # figures of a finished spill, whatever the writer's timing
        L = self.layout
        T = self.num_tokens
        return {
            "device": L.device_bytes(T, self.sink, self.window, self.abstracts_on_device),
            "host": self.directory.host_count * L.chunk_bytes
            + (0 if self.abstracts_on_device else L.abstracts_bytes(T)),
            "disk": self.disk.used_bytes,
        }
