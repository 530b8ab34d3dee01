"""The reading half of `TieredStore` (storage/tiered.py): K and V of tokens wherever
they live, brought to the compute device.

    read_range(layer, a, b)     tokens a..b-1 (host chunks, disk chunks read back)
    gather_selected(layer, ids) per-head selections (sparse attention)
    gather_all(layer)           every token (dense attention): in place where the host
                                tier is the compute device's memory
    keep_on_host(layer, chunks, kv)  chunks read from disk kept in free host slots
    read_chunks(layer, chunks)  whole chunks on the host, wherever they live (a save)
    file_holding(layer, chunks) the disk file of exactly those chunks (a save links it)

Chunks read from disk are kept on the host while it has room (a loaded session is
read once); a selection's rows past that room, or while a loaded session's warm-up
runs, are taken from the mapped chunk files where they lie (`DiskTier.read_batches`).
`TierReads` counts what each tier served.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from dataclasses import dataclass, field

import torch

from storage import threads as torch_threads
from storage.disk import BULK_READ_MIN, StorageError
from storage.layout import HeadRows

RESERVE_MIN = 64  # chunks read back at once that size the layer's slab for all its chunks
READ_THREADS = min(8, os.cpu_count() or 1)  # files read at once by a question, at most


def read_files(disk, jobs: list[tuple[str, list[int]]], threads: int | None = None):
    """(name, `disk.read_batches(name, batches)`) of each (name, batches) in order; several
    files are read on `threads` threads, that many ahead of the consumer (a question on a
    loaded session reads most files of each layer: the checksums release the GIL)."""
    threads = min(threads or READ_THREADS, len(jobs))
    if threads < 2:
        yield from ((name, disk.read_batches(name, batches)) for name, batches in jobs)
        return
    with torch_threads.pool(threads, "offload-read") as pool:
        ahead = deque(pool.submit(disk.read_batches, *job) for job in jobs[:threads])
        try:
            for i, (name, _) in enumerate(jobs):
                data = ahead.popleft().result()
                if i + threads < len(jobs):
                    ahead.append(pool.submit(disk.read_batches, *jobs[i + threads]))
                yield name, data
        finally:
            for f in ahead:  # (a consumer that stopped early: the rest is not read)
                f.cancel()


def take_rows(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """t[rows]: a view (no copy) when rows are consecutive and ascending (a file's chunks
    but a few at either end, the sink's or the recent window's, already read)."""
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return t[rows[0] : rows[0] + len(rows)]
    return t[torch.tensor(rows, dtype=torch.long)]


@dataclass
class TierReads:
    """Reads served by each tier since the last reset (count of reads, bytes)."""

    count: dict[str, int] = field(default_factory=lambda: {"device": 0, "host": 0, "disk": 0})
    nbytes: dict[str, int] = field(default_factory=lambda: {"device": 0, "host": 0, "disk": 0})

    def add(self, tier: str, n: int, nbytes: int) -> None:
        self.count[tier] += n
        self.nbytes[tier] += nbytes


class StoreReads:
    """Mixed into `TieredStore`, whose state (layout, tiers, directory, lock, lengths,
    reads) these methods read; callers hold the store's lock where a worker may run."""

    def _chunk_kv(self, layer: int, chunk: int) -> tuple[str, torch.Tensor]:
        if self.directory.on_host((layer, chunk)):
            return "host", self.host[layer].chunk(chunk)
        rec = self.directory.disk.get((layer, chunk))
        if rec is None:
            raise StorageError(f"chunk {chunk} of layer {layer} is in no tier")
        return "disk", self.disk.read_chunk(rec.file, rec.batch)

    def read_range(self, layer: int, t0: int, t1: int, device=None) -> torch.Tensor:
        """[2, H, t1-t0, D] on the compute device (or `device`), from host and disk chunks."""
        L = self.layout
        C = L.chunk_size
        if t1 <= t0:
            return torch.empty(
                2, L.num_kv_heads, 0, L.head_dim, dtype=self.dtype, device=device or self.device
            )
        c0, c1 = t0 // C, (t1 - 1) // C + 1
        chunks = list(range(c0, c1))
        on_host = [c for c in chunks if self.directory.on_host((layer, c))]
        buf = torch.empty(len(chunks), 2, L.num_kv_heads, C, L.head_dim, dtype=self.dtype)
        if on_host:
            idx = torch.tensor([c - c0 for c in on_host], dtype=torch.long)
            buf.index_copy_(0, idx, self.host[layer].gather_chunks(on_host))
            self.reads.add("host", len(on_host), len(on_host) * L.chunk_bytes)
        on_disk = [c for c in chunks if not self.directory.on_host((layer, c))]
        if on_disk:
            for c, kv in self._read_disk_chunks(layer, on_disk):
                buf[c - c0] = kv
        kv = buf.permute(1, 2, 0, 3, 4).reshape(2, L.num_kv_heads, len(chunks) * C, L.head_dim)
        return kv[:, :, t0 - c0 * C : t1 - c0 * C].to(device or self.device)

    def _read_disk_chunks(
        self, layer: int, chunks: list[int], keep_all: bool = False, each: bool = True
    ):
        """Yield (chunk, kv) for chunks on disk (with `each` off, nothing: for a caller that
        wants them on the host only; the views of the 131,072 chunks a question on a 128k
        session reads take 0.14 s to make here). What was read is kept on the host while
        it has free slots (or all, with `keep_all`: the caller restores the budget), so a
        loaded session is read from disk once, when first needed."""
        keep = set(chunks) if keep_all else None
        for group, data, rows in self._read_disk_groups(layer, chunks, keep, whole=each):
            if each:
                yield from zip(group, take_rows(data, rows), strict=True)

    def _read_disk_groups(
        self, layer: int, chunks: list[int], keep: set[int] | None = None, whole: bool = True
    ):
        """Yield (group, data, rows) for chunks on disk, a file at a time: chunk group[i] is
        data[rows[i]] ([2, H, C, D]; data is the whole file, mapped, or read in one bulk
        read: `DiskTier.read_batches`). Those in `keep` are put on the host (promoted), or
        with `keep` None, as many as it has free slots for. Counted as read: every chunk,
        and the bytes of those put on the host, or (`whole`: the caller takes them all
        whole) of all."""
        L = self.layout
        by_file = self._by_file(layer, chunks)
        # Files with many chunks to check (first read in this process) on threads; the
        # others, their chunks checked already or few, where they are consumed.
        heavy = {
            name for name, (_, batches) in by_file.items()
            if self.disk.unchecked(name, batches) >= BULK_READ_MIN
        }  # fmt: skip
        jobs = [(name, batches) for name, (_, batches) in by_file.items() if name in heavy]
        with contextlib.closing(read_files(self.disk, jobs)) as files:
            for name, (group, batches) in by_file.items():  # (the heavy ones in this order)
                if name in heavy:
                    data, rows = next(files)[1]
                else:
                    data, rows = self.disk.read_batches(name, batches)
                if keep is None:
                    kept = list(range(len(group)))
                else:  # (none while a warm-up runs: no look at each chunk)
                    kept = [i for i, c in enumerate(group) if c in keep] if keep else []
                n = 0
                if kept:
                    room = None if keep is None else len(kept)
                    kv = take_rows(data, [rows[i] for i in kept])
                    n = self.keep_on_host(layer, [group[i] for i in kept], kv, room)
                self.reads.add("disk", len(group), (len(group) if whole else n) * L.chunk_bytes)
                yield group, data, rows

    def _by_file(self, layer: int, chunks: list[int]) -> dict[str, tuple[list[int], list[int]]]:
        """{file: (its chunks of `chunks`, their record batches)} (`DiskIndex.by_file`)."""
        groups, absent = self.directory.index.by_file(layer, chunks)
        if absent:
            raise StorageError(f"chunk {absent[0]} of layer {layer} is in no tier")
        return groups

    def rows_in_file(self, layer: int, name: str, chunks: list[int]) -> tuple[list[int], list[int]]:
        """Of `chunks`, those on disk in file `name` and not on the host, and their rows in
        it (a file read without the lock, checked under it: a chunk cut away meanwhile is
        gone, one appended again since and spilled has another file, one a question read
        in is on the host)."""
        kept, rows = [], []
        for c in chunks:
            rec = self.directory.disk.get((layer, c))
            if rec is not None and rec.file == name and not self.directory.on_host((layer, c)):
                kept.append(c)
                rows.append(rec.batch)
        return kept, rows

    def chunk_buffer(self, n: int) -> torch.Tensor:
        """An empty [n, 2, H, C, D] host tensor of whole chunks."""
        L = self.layout
        return torch.empty(n, 2, L.num_kv_heads, L.chunk_size, L.head_dim, dtype=self.dtype)

    def read_chunks(self, layer: int, chunks: list[int], out: torch.Tensor | None = None):
        """[len(chunks), 2, H, C, D] of whole chunks, wherever they live, into `out` if
        given (for saving; under the lock, since a loaded session's warmer may be moving
        chunks meanwhile)."""
        out = self.chunk_buffer(len(chunks)) if out is None else out
        at = {c: i for i, c in enumerate(chunks)}
        with self.lock:
            # Host chunks a run of slots at a time, disk chunks a file at a time: a save
            # copies every chunk (262,144 for the 8B shape at 128k; about 50 us each, one
            # by one).
            on_host = [c for c in chunks if self.directory.on_host((layer, c))]
            self.host[layer].copy_out(on_host, out, [at[c] for c in on_host])
            on_disk = [c for c in chunks if not self.directory.on_host((layer, c))]
            for c, kv in self._read_disk_chunks(layer, on_disk):
                out[at[c]] = kv
        return out

    def file_holding(self, layer: int, chunks: list[int]) -> str | None:
        """The disk file that holds exactly `chunks` of `layer`, in that order (a loaded
        session's, whose chunks are unchanged: a save can link it instead of writing it
        again), or None."""
        with self.lock:
            rec = self.directory.disk.get((layer, chunks[0]))
            if rec is None or self.disk.num_chunks(rec.file) != len(chunks):
                return None
            for i, c in enumerate(chunks):
                r = self.directory.disk.get((layer, c))
                if r is None or r.file != rec.file or r.batch != i:
                    return None
            return rec.file

    def may_link(self, layer: int, chunks: list[int]) -> bool:
        """Whether `file_holding(layer, chunks)` may find a file, by the first chunk's
        record alone: never False where it would find one (a save's least bytes to
        write, `storage.saving.least_written`, count on that)."""
        with self.lock:
            rec = self.directory.disk.get((layer, chunks[0]))
            return (
                rec is not None and rec.batch == 0 and self.disk.num_chunks(rec.file) == len(chunks)
            )

    def keep_on_host(
        self, layer: int, chunks: list[int], kv: torch.Tensor, room: int | None = None
    ) -> int:
        """Put chunks read from disk (kv[i]: [2, H, C, D] of chunks[i]) into host memory:
        those not there already, `room` at most (by default the free slots, within the
        layer's share where it keeps to one), with one copy. Their disk records stay (KV
        never changes: a later spill writes nothing). Returns how many."""
        if room is None:
            room = self.directory.host_capacity - self.directory.host_count
            share = self.share_left(layer)  # (CUDA, past the budget: within the layer's share)
            room = room if share is None else min(room, share)
        rows = [i for i, c in enumerate(chunks) if not self.directory.on_host((layer, c))]
        rows = rows[: max(room, 0)]
        if len(rows) >= RESERVE_MIN:
            # A bulk read-back (a question on a loaded session) where the budget holds the
            # whole cache: the layer's slab is sized for all its chunks at once. On CUDA it
            # is pinned memory, and growing it 1.25x at a time as files come in would pin
            # several times its size. (A few chunks, as the recent window read at a load,
            # grow it as before: a load pins nothing.)
            self.reserve_host(layer, self.lengths[layer])
        if rows:
            keep = [chunks[i] for i in rows]
            self.host[layer].put_many(keep, take_rows(kv, rows))
            for c in keep:
                self.directory.loaded((layer, c))
        return len(rows)

    def read_keys(self, layer: int, t0: int, t1: int, device=None) -> torch.Tensor:
        """Full-precision keys [H, t1-t0, D] (index builds, the exact selector), on the
        compute device or `device`."""
        return self.read_range(layer, t0, t1, device)[0]

    def key_rows(self, layer: int) -> HeadRows | None:
        """Every token's key in place (no copy) when the host tier is the compute device's
        memory and holds the layer's chunks in order; None otherwise."""
        if self.device.type != "cpu":
            return None
        return self.host[layer].key_rows(self.lengths[layer])

    def gather_selected(self, layer: int, ids: torch.Tensor) -> torch.Tensor:
        """K and V [2, H, k, D] of per-head token ids [H, k] on the compute device.

        Chunks only on disk are brought back to the host first (a selection hit is
        a reason to keep them near), every touched chunk becomes most recently used,
        and the host budget is restored afterwards. Where the layer keeps to its share
        of the budget (CUDA, past it: storage/spill.py), or they do not all fit in the
        host budget, it keeps the most selected of them within that room and the rows
        of the rest come from what was read; while a loaded session's warm-up runs, it
        keeps none (the warm-up puts them in their slots).
        """
        L = self.layout
        ids_cpu = ids.to("cpu")
        host = self.host[layer]
        if host.in_order(self.lengths[layer]):  # all on the host, in place: the fast path
            self._mark_recent(layer, ids_cpu.reshape(-1) // L.chunk_size)
            self.reads.add("host", ids.numel(), ids.numel() * L.row_bytes)
            if host.pin:  # (CUDA) the device reads just these rows from the pinned slab
                return host.gather_in_order(ids.to(self.device), host.device_view(self.device))
            return self.to_device(host.gather_in_order(ids_cpu))
        chunks, hits = torch.unique(ids_cpu // L.chunk_size, return_counts=True)
        self._mark_recent(layer, chunks)
        missing = host.missing(chunks)  # only chunks on disk take the slow path
        room = self.room_left(layer, len(missing)) if missing else None
        if room is None and self.warming:
            # A session's warm-up puts every chunk into its slot (on CUDA into the layer's
            # pinned slab, which the grower thread pins meanwhile, 1.5 GB/s on the H100
            # machine): the rows come from the files until then. Kept here, the chunks a
            # question touches (most of every layer) would have it pin, or wait for, each
            # layer's slab before its first token.
            room = 0
        if room is None:
            for _ in self._read_disk_chunks(layer, missing, keep_all=True, each=False):
                pass
            kv, from_files = host.gather_heads(ids_cpu), 0
        else:
            kv, from_files = self._gather_within(layer, ids_cpu, chunks, hits, missing, room)
        n = ids.numel() - from_files
        self.reads.add("host", n, n * L.row_bytes)
        if self.directory.over_budget():
            self.spill()
        return self.to_device(kv)

    def _gather_within(
        self, layer: int, ids: torch.Tensor, chunks, hits, missing: list[int], room: int
    ) -> tuple[torch.Tensor, int]:
        """gather_selected's rows [2, H, k, D] where the `missing` chunks (on disk) do not
        all fit on the host (`room`: the slots it may take, `room_left`): the most
        selected (`hits`) take those, the others' rows are taken from what was read,
        which is then let go. No chunk leaves the host to make room for a selection's
        reads: a step's selection touches most chunks of every layer, far more than the
        budget holds, and the chunks kept for one step were seldom the next one's (made
        room for, they cost more chunks read from the files and more time, measured:
        docs/storage.md). So the host does not take a question's reads (most of the
        layer, on a session past the budget) to spill them again right after: on CUDA a
        layer's pinned slab does not grow by them, on a CPU the host keeps to its
        budget."""
        take = min(self._share, max(room, 0))
        keep = set()
        if take:  # (none while a warm-up runs: no sort of the layer's chunks)
            hits = dict(zip(chunks.tolist(), hits.tolist(), strict=True))
            keep = set(sorted(missing, key=lambda c: -hits[c])[:take])
        return self._gather_read(layer, ids, chunks, missing, keep)

    def _gather_read(self, layer: int, ids, chunks, missing: list[int], keep: set[int]):
        """The rows [2, H, k, D] of `ids`: from the host, and from the `missing` chunks'
        files as read, `keep` of them put on the host on the way; and how many rows came
        from the files."""
        host, C, D = self.host[layer], self.layout.chunk_size, self.layout.head_dim
        parts = []  # (a file's data, the chunks of it not kept, their rows there)
        for group, data, rows in self._read_disk_groups(layer, missing, keep, whole=False):
            if keep:
                left = [i for i, c in enumerate(group) if c not in keep]
                group, rows = [group[i] for i in left], [rows[i] for i in left]
            if group:
                parts.append((data, group, rows))
        if not parts:
            return host.gather_heads(ids), 0
        part_of = torch.full((int(chunks.max()) + 1,), -1, dtype=torch.long)
        row_of = torch.zeros_like(part_of)
        for p, (_, group, rows) in enumerate(parts):
            at = torch.tensor(group, dtype=torch.long)
            part_of[at] = p
            row_of[at] = torch.tensor(rows, dtype=torch.long)
        H, k = ids.shape
        flat = ids.reshape(-1)
        heads = torch.arange(H).repeat_interleave(k)
        part = part_of[flat // C]  # the part each row is read from, -1: on the host
        # The rows grouped by part (one sort), each part's taken from its file's mapped
        # chunks at once (no copy of the file: its pages are read where they lie), as
        # [2, n, D] rows of the file seen as [chunks, 2 * H * C, D].
        order = torch.argsort(part, stable=True)
        counts = torch.bincount(part + 1, minlength=len(parts) + 1).tolist()
        out = self.host_out((2, H * k, D))  # (on CUDA: the staging buffer it goes from)
        from_files = H * k - counts[0]
        self.reads.add("disk", 0, from_files * self.layout.row_bytes)
        pieces = torch.split(order, counts)
        if counts[0]:
            there = pieces[0]
            out[:, there] = host.gather_rows(heads[there], flat[there])
        for (data, _, _), at in zip(parts, pieces[1:], strict=True):  # (each has rows)
            t = flat[at]
            inner = heads[at] * C + t % C  # (K's row; V's is H * C further)
            rows = row_of[t // C]
            chunk_rows = data.flatten(1, 3)
            out[:, at] = chunk_rows[torch.stack([rows, rows]), torch.stack([inner, inner + H * C])]
        return out.view(2, H, k, D), from_files

    def host_out(self, shape: tuple[int, ...]) -> torch.Tensor:
        """An empty host tensor for rows bound for the compute device: on CUDA the pinned
        staging buffer `to_device` copies from (no copy into it), elsewhere a new one."""
        if self._staging is None:
            return torch.empty(shape, dtype=self.dtype)
        return self._staging.empty(shape, self.dtype)

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """Host tensor -> compute device; on CUDA through pinned staging, asynchronously
        on the current stream (the prefetch worker's copy stream when it runs there)."""
        if self._staging is None:
            return t.to(self.device)
        return self._staging.to_device(t, self.device)

    def in_place(self, layer: int) -> bool:
        """Can dense attention read every token of `layer` where it lies, without a copy?
        (CPU: the host tier is the compute device's memory and holds them all, in order;
        all there but out of order, as after loading a session, they are put in order.
        A loaded session's chunks still on disk are read into host memory first, once,
        when the host budget holds the whole cache: its prompts and steps are then
        exact, as they were before the save, and not sparse for want of a read. A cache
        that spilled for want of room is not read back: it would spill again.)"""
        if self.device.type != "cpu":
            return False
        with self.lock:
            host, T = self.host[layer], self.lengths[layer]
            if not host.in_order(T):
                missing = host.missing(torch.arange(self.layout.num_chunks(T)))
                room = self.directory.host_capacity - self.directory.host_count
                fits = (
                    sum(map(self.layout.num_chunks, self.lengths)) <= self.directory.host_capacity
                )
                if missing and fits and len(missing) <= room:
                    for _ in self._read_disk_chunks(layer, missing, each=False):
                        pass
            return host.put_in_order(T)

    def gather_all(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [H, T, D] of every token of `layer`, in order."""
        T = self.lengths[layer]
        if self.in_place(layer):  # the host tier is the compute device's memory: no copy
            view = self.host[layer].tokens_view(T)
            self.reads.add("host", 1, T * self.layout.token_bytes_per_layer)
            return view[0], view[1]
        host = self.host[layer]
        if host.pin and host.in_order(T):
            # All in the pinned slab, in order: the device gathers it where it lies, in one
            # pass over PCIe (no host-side gather, no pageable staging; a kernel, which
            # reads across the slab's registrations as a memcpy may not).
            ids = torch.arange(T, device=self.device).expand(self.layout.num_kv_heads, T)
            kv = host.gather_in_order(ids, host.device_view(self.device))
            self.reads.add("host", 1, T * self.layout.token_bytes_per_layer)
            return kv[0], kv[1]
        dev = self.dev[layer]
        n_sink = min(self.sink, T)
        w0 = max(n_sink, T - self.window)
        parts = [
            dev.sink_kv[:, :, :n_sink],
            self.read_range(layer, n_sink, w0),
            dev.read_window(w0, T),
        ]
        self.reads.add("device", 1, (n_sink + T - w0) * self.layout.token_bytes_per_layer)
        kv = torch.cat(parts, dim=2)
        return kv[0], kv[1]
