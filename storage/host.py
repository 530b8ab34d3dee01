"""Host tier: full-precision K and V of one layer, in chunk slots.

Storage is a slab `[2, H_kv, slots, C, D]`: a chunk (K and V of C tokens, all KV
heads) is slot s of every (K/V, head) plane, moved to or from disk or the device
by one `copy_`. The slot axis sits inside the head axis so that, while a layer's
chunks occupy slots 0..n-1 in order (no spill or reuse yet, the common case),
`tokens_view` gives every token's K and V `[H, T, D]` as a view, and dense
attention on the CPU reads them without a copy. Slots freed by spills are
reused. The slab is reserved at the layer's largest size and grows where it is
(storage/pinning.py); with CUDA its usable part is pinned, so device copies are
asynchronous and the GPU reads it in place.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

import torch

from storage.layout import HeadRows, KVLayout
from storage.pinning import ReservedSlab, device_view, pinned_empty, slot_multiple, wait_for

COPY_RUN_MIN = 16  # consecutive slots copied as one slice (fewer: with index_copy_)


class HostTier:
    def __init__(
        self, layout: KVLayout, dtype: torch.dtype, pin: bool = False, max_slots: int | None = None
    ):
        self.layout = layout
        self.dtype = dtype
        self.pin = pin
        # Slots the layer can ever need (the model's window): growth stops there. Where it
        # is known, the slab is reserved at it and grows in place (storage/pinning.py:
        # no copy, no new address, on CUDA only the new slots pinned); else, and where
        # the driver refuses to pin more of it, a growth moves to a bigger slab.
        self.max_slots = max_slots
        # Where set (a pinned slab, by its store: the layer's share of the host budget and
        # the pieces in flight), a growth past it grants only the slots asked for: pinned
        # memory is the budget's, and growth steps past it would pin more than it.
        self.limit: int | None = None
        self.reserved: ReservedSlab | None = None
        if max_slots:
            L = layout
            m = slot_multiple(L.chunk_size * L.head_dim * dtype.itemsize) if pin else 1
            shape = (2, L.num_kv_heads, -(-max_slots // m) * m, L.chunk_size, L.head_dim)
            try:
                self.reserved = ReservedSlab(shape, dtype, pin)
            except OSError:  # (no address space to spare: a strict overcommit policy, a limit)
                pass
        self.slab = self._alloc(0) if self.reserved is None else self.reserved.tensor
        # Runs a growth on another thread (TieredStore gives its grower on CUDA), so a
        # pinned slab's next slots are registered before a decode step needs them.
        self.ahead: Callable[[Callable[[], object]], object] | None = None
        self._ahead_pending = False
        self.slot_of: dict[int, int] = {}  # chunk index -> slot
        # The same map as a tensor (-1: not on the host), so a gather of many tokens
        # looks its slots up in one indexing op instead of a Python loop.
        self.slot_table = torch.full((64,), -1, dtype=torch.long)
        # Free slots: those freed below `_next` (a min-heap, and the same as a set), and
        # every slot from `_next` up (never used since the slab last grew), so a run of
        # new chunks can take a run of slots at once (`put_run`).
        self._free: list[int] = []
        self._free_set: set[int] = set()
        self._next = 0
        self._misplaced = 0  # chunks whose slot is not their own index
        self._let_go: list[int] = []  # slots freed since the last `give_back`
        # The device's last copies into the slab (`write_run` from CUDA): an event the
        # host waits for before it reads or moves the slab (`_settle`).
        self.written: torch.cuda.Event | None = None
        self._view: tuple[int, torch.Tensor] | None = None  # (`device_view`)

    def _alloc(self, n: int) -> torch.Tensor:
        L = self.layout
        shape = (2, L.num_kv_heads, n, L.chunk_size, L.head_dim)
        if self.pin:
            return pinned_empty(shape, self.dtype)
        return torch.empty(shape, dtype=self.dtype)

    @property
    def num_chunks(self) -> int:
        return len(self.slot_of)

    def nbytes(self) -> int:
        return self.num_chunks * self.layout.chunk_bytes

    @property
    def capacity(self) -> int:
        """The slots usable now (the slab's physical size is `slab.shape[2]`)."""
        return self.slab.shape[2] if self.reserved is None else self.reserved.slots

    def _reserve(self, slots: int) -> None:
        """Room for `slots` slots (see `grow_in_place`, `new_slab`)."""
        if slots > self.capacity and not self.grow_in_place(slots):
            self.take_slab(self.new_slab(slots))
        self._grow_ahead(slots)

    def _grow_ahead(self, used: int) -> None:
        """Once `used` slots pass 7/8 of a pinned reserved slab, grow it on the `ahead`
        thread, one growth at a time (the next needs then find their slots pinned)."""
        r = self.reserved
        if self.ahead is None or r is None or self._ahead_pending or 8 * used < 7 * r.slots:
            return
        if r.slots >= min(self.max_slots, self.limit or self.max_slots):
            return
        self._ahead_pending = True
        target = self._grown(r.slots + 1)  # (at most the layer's window: within the slab)

        def grow() -> None:
            try:
                r.grow(target)  # (refused: the slots are grown where they are needed)
            finally:
                self._ahead_pending = False

        try:
            self.ahead(grow)
        except RuntimeError:  # (the grower is shut down: its store closed)
            self._ahead_pending = False

    def _grown(self, slots: int) -> int:
        """The capacity to grow to for `slots` slots: an eighth more, so that a long
        prefill's slab does not grow again at the next few chunks (geometric growth: a
        slab that moves makes O(T) copies in all; by 1.25x where memory is pinned, which
        is slow to pin and scarce; a reserved slab grows where it is, copying nothing,
        by the eighth alone)."""
        growth = 0 if self.reserved is not None else 1.25 if self.pin else 2
        grown = max(8, slots + slots // 8, int(growth * self.capacity))
        for most in (self.max_slots, self.limit):  # (a request past them is still granted)
            if most is not None:
                grown = max(slots, min(grown, most))
        return grown

    def grow_in_place(self, slots: int) -> bool:
        """Room for `slots` slots in the reserved slab, where it is: a thread may do this
        while another uses the tier. False where there is no reservation, or the driver
        refused to pin more of it: the caller then moves to a bigger slab (`new_slab`,
        `take_slab`), as it does without one."""
        r = self.reserved
        return r is not None and slots <= r.max_slots and r.grow(self._grown(slots))

    def new_slab(self, slots: int) -> torch.Tensor:
        """A slab for `slots` slots and more (`_grown`), outside any reservation. It only
        allocates (and pins): a thread may call it while another uses this tier."""
        return self._alloc(self._grown(slots))

    def take_slab(self, bigger: torch.Tensor) -> None:
        """Move to a slab from `new_slab` (the caller holds the store's lock), unless the
        slab has grown as far meanwhile."""
        n = self.capacity
        if bigger.shape[2] > n:
            self._settle()
            bigger[:, :, :n] = self.slab[:, :, :n]
            self.reserved = None
            self._swap(bigger)

    def _swap(self, slab: torch.Tensor) -> None:
        """Replace the slab (it grew). A pinned one may still have device reads queued (a
        gather through its UVA view: the host runs ahead of the GPU); they must finish
        before it is unregistered and freed, or they read unmapped memory."""
        old, self.slab, self._view = self.slab, slab, None
        if self.pin and old.numel():
            torch.cuda.synchronize()

    def _new_slot(self) -> int:
        # The lowest free slot, so that chunks re-filled after a truncation land where
        # they were and `tokens_view` keeps working (a min-heap of free slots).
        return self._lowest_free(1)[0]

    def _lowest_free(self, n: int) -> list[int]:
        """The n lowest free slots, taken: freed ones first, then from the frontier up
        (the slab grows if it must)."""
        slots = [heapq.heappop(self._free) for _ in range(min(n, len(self._free)))]
        self._free_set.difference_update(slots)
        if len(slots) < n:
            more = n - len(slots)
            self._reserve(self._next + more)
            slots += range(self._next, self._next + more)
            self._next += more
        return slots

    def _record(self, chunk: int, slot: int) -> None:
        self.slot_of[chunk] = slot
        self._misplaced += slot != chunk
        if chunk >= self.slot_table.shape[0]:
            grown = torch.full(
                (max(2 * self.slot_table.shape[0], chunk + 1),), -1, dtype=torch.long
            )
            grown[: self.slot_table.shape[0]] = self.slot_table
            self.slot_table = grown

    def put(self, chunk: int, data: torch.Tensor | None = None) -> torch.Tensor:
        """Give `chunk` a slot (filled from `data` [2, H, C, D] if given); return the slot."""
        assert chunk not in self.slot_of, f"chunk {chunk} is on the host already"
        self._settle()  # (the slot may be one the device was writing: freed since)
        slot = self._new_slot()
        self._record(chunk, slot)
        self.slot_table[chunk] = slot
        if data is None:  # a chunk to fill: its unwritten rows are zeros, not old memory
            self.slab[:, :, slot].zero_()  # (so the files a save writes are deterministic)
        else:
            self.slab[:, :, slot].copy_(data)
        return self.slab[:, :, slot]

    def put_many(self, chunks: list[int], data: torch.Tensor) -> None:
        """`put` each of `chunks` (chunks read back from disk, data [n, 2, H, C, D]) with
        one copy into the slab for all: a loaded session puts hundreds of thousands of
        chunks, and `put` costs tens of us each. A chunk whose own slot (its index) is
        free takes it, the others spare slots (`_spare_slots`): a layer read back file by
        file, in any order, into a slab sized for it is then in slot order but for a few
        chunks, which `put_in_order` moves."""
        self._settle()
        cap = self.capacity
        own = {c for c in chunks if c < cap and (c >= self._next or c in self._free_set)}
        self._take(own)
        spare = iter(self._spare_slots(len(chunks) - len(own), max(chunks)))
        slots = [c if c in own else next(spare) for c in chunks]
        for c, slot in zip(chunks, slots, strict=True):
            assert c not in self.slot_of, f"chunk {c} is on the host already"
            self._record(c, slot)
        self.slot_table[torch.tensor(chunks, dtype=torch.long)] = torch.tensor(slots)
        self._copy_in(slots, data.permute(1, 2, 0, 3, 4))

    def _take(self, slots: set[int]) -> None:
        """Mark these free slots used (the frontier moves past them: the slots it skips
        are free)."""
        if not slots:
            return
        top = max(slots) + 1
        if top > self._next:
            self._free += [x for x in range(self._next, top) if x not in slots]
            self._free_set.update(range(self._next, top))
            self._next = top
        self._free_set -= slots
        self._free = [x for x in self._free if x not in slots]
        heapq.heapify(self._free)

    def _spare_slots(self, n: int, above: int) -> list[int]:
        """n free slots for chunks that cannot have their own: the top of the slab where
        it has room past the frontier and past chunk `above` (a slab sized for the layer:
        they take no slot a chunk still to come owns), else the lowest free ones."""
        cap = self.capacity
        if n and cap - n > above and cap - n >= self._next:
            slots = list(range(cap - n, cap))
            self._take(set(slots))
            return slots
        return self._lowest_free(n)

    def _copy_in(self, slots: list[int], src: torch.Tensor) -> None:
        """src[:, :, i] ([2, H, n, C, D]) into slot slots[i]: runs of consecutive slots (a
        file into its own slots) as plain copies, 1.4-2x index_copy_'s speed here (into
        memory already touched, as pinned slabs are), the rest with one index_copy_."""
        rest, start = [], 0
        for i in range(1, len(slots) + 1):
            if i == len(slots) or slots[i] != slots[i - 1] + 1:
                if i - start >= COPY_RUN_MIN:
                    self.slab[:, :, slots[start] : slots[start] + i - start] = src[:, :, start:i]
                else:
                    rest += range(start, i)
                start = i
        if len(rest) == len(slots):
            self.slab.index_copy_(2, torch.tensor(slots), src)
        elif rest:
            index = torch.tensor([slots[i] for i in rest])
            self.slab.index_copy_(2, index, src[:, :, torch.tensor(rest)])

    def put_run(self, c0: int, n: int) -> int | None:
        """Give the new chunks c0 .. c0+n-1 the slots s0 .. s0+n-1 in one step and return
        s0, when no freed slot would come first (else None: `put` them one by one)."""
        if self._free and self._free[0] == self._next - len(self._free):
            # the freed slots are exactly the top ones (a truncated tail): unused again
            self._next, self._free = self._free[0], []
            self._free_set.clear()
        if self._free:
            return None
        s0 = self._next
        self._reserve(s0 + n)
        self._next += n
        for i in range(n):
            assert c0 + i not in self.slot_of, f"chunk {c0 + i} is on the host already"
            self._record(c0 + i, s0 + i)
        self.slot_table[c0 : c0 + n] = torch.arange(s0, s0 + n)
        return s0

    def write_run(self, s0: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v [H, n * C, D] into the slots s0 .. s0+n-1, unstaged. From CUDA into a
        pinned slab the device writes the slab itself (its UVA view: a copy kernel for
        all heads, where a `cudaMemcpy` per (K/V, head) made 16 calls a layer), queued on
        the current stream: the host waits for those copies (`written`) only before it
        reads the slab itself, and the device's own reads come after them in order."""
        H, T, D = k.shape
        C = self.layout.chunk_size
        n = T // C
        queued = self.pin and k.is_cuda
        slab = self.device_view(k.device) if queued else self.slab
        # (split at the registrations' edges: with one KV head, or all of a plane's slots,
        # a copy is contiguous, a memcpy, which must not cross one; a plane is a
        # registration of its own)
        runs = [(s0, n)] if self.reserved is None else self.reserved.runs(s0, n)
        for i, x in enumerate((k, v)):
            for a, m in runs:
                t0 = (a - s0) * C
                dst, src = slab[i, :, a : a + m], x[:, t0 : t0 + m * C].reshape(H, m, C, D)
                if H > 1 and dst.is_contiguous():
                    for h in range(H):
                        dst[h].copy_(src[h])
                else:
                    dst.copy_(src)
        if queued:
            self.written = torch.cuda.current_stream(k.device).record_event()

    def device_view(self, device: torch.device) -> torch.Tensor:
        """The slab as `device` reads and writes it in place: on CUDA its pinned memory's
        `device_view`, made once for where the slab is; elsewhere the slab itself."""
        if device.type != "cuda":
            return self.slab
        if self._view is None or self._view[0] != self.slab.data_ptr():
            self._view = (self.slab.data_ptr(), device_view(self.slab, device))
        return self._view[1]

    def _settle(self) -> None:
        """Wait for the device's copies into the slab (`write_run`) before the host reads it
        or moves it. By then they are usually done: a decode loop reads each token, queued
        after them."""
        written = self.written
        if written is not None:
            wait_for(written)
            if self.written is written:  # (not a later one, queued meanwhile by another thread)
                self.written = None

    def put_in_order(self, num_tokens: int) -> bool:
        """When every chunk of these tokens is here but some sit in other slots (a loaded
        session brings them in as they are needed), move each to the slot of its index,
        in the same slab (through one temporary copy: no new slab to allocate, which on
        CUDA means to pin), so that `in_order` holds. Returns `in_order`."""
        n = self.layout.num_chunks(num_tokens)
        if self._misplaced == 0 or len(self.slot_of) != n:
            return self.in_order(num_tokens)
        self._settle()
        # Only the chunks out of place move: the slot of each is another's own slot (or
        # past n), so all of them are copied out first, then each to its own slot.
        moved = torch.tensor([c for c, slot in self.slot_of.items() if slot != c])
        self.slab.index_copy_(2, moved, self.slab.index_select(2, self.slot_table[moved]))
        self.slot_of = {c: c for c in range(n)}
        self.slot_table[:n] = torch.arange(n)
        self._free, self._next = [], n
        self._free_set.clear()
        self._misplaced = 0
        return True

    def chunk(self, chunk: int) -> torch.Tensor:
        """The slot of `chunk`: a view [2, H, C, D]."""
        self._settle()
        return self.slab[:, :, self.slot_of[chunk]]

    def write(self, chunk: int, offset: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v [H, n, D] at token `offset` inside `chunk`."""
        n = k.shape[1]
        self._settle()
        slot = self.slot_of[chunk]
        self.slab[0, :, slot, offset : offset + n] = k
        self.slab[1, :, slot, offset : offset + n] = v

    def copy_out(self, chunks: list[int], out: torch.Tensor, rows: list[int]) -> None:
        """out[rows[i]] = chunk chunks[i] ([2, H, C, D]): a run of consecutive slots going
        to consecutive rows (a layer in slot order, saved) as one copy (2x a copy per
        chunk here, which also costs tens of us of Python each)."""
        self._settle()
        slots = [self.slot_of[c] for c in chunks]
        start = 0
        for i in range(1, len(slots) + 1):
            if i < len(slots) and slots[i] == slots[i - 1] + 1 and rows[i] == rows[i - 1] + 1:
                continue
            n = i - start
            out[rows[start] : rows[start] + n] = self.slab[
                :, :, slots[start] : slots[start] + n
            ].permute(2, 0, 1, 3, 4)
            start = i

    def gather_chunks(self, chunks: list[int]) -> torch.Tensor:
        """[len(chunks), 2, H, C, D] copied from the slots of `chunks` (one index_select)."""
        self._settle()
        slots = self.slot_table[torch.tensor(chunks, dtype=torch.long)]
        return self.slab.index_select(2, slots).permute(2, 0, 1, 3, 4)

    def in_order(self, num_tokens: int) -> bool:
        """Are chunks 0..n-1 of these tokens all here, each in the slot of its index?
        (O(1): kept up by put/free.) Then token t of head h is row h * capacity + t."""
        n = self.layout.num_chunks(num_tokens)
        return self._misplaced == 0 and len(self.slot_of) == n

    def tokens_view(self, num_tokens: int) -> torch.Tensor | None:
        """K and V [2, H, T, D] of tokens 0..T-1 as a view of the slab when `in_order`;
        None otherwise (the caller copies)."""
        if not self.in_order(num_tokens):
            return None
        self._settle()
        L = self.layout
        n = L.num_chunks(num_tokens)
        return self.slab[:, :, :n].reshape(2, L.num_kv_heads, n * L.chunk_size, L.head_dim)[
            :, :, :num_tokens
        ]

    def key_rows(self, num_tokens: int) -> HeadRows | None:
        """Keys of tokens 0..T-1 as `HeadRows` over the slab (no copy), when chunks sit in
        slots 0..n-1 in order (see `tokens_view`); None otherwise."""
        if not self.in_order(num_tokens):
            return None
        self._settle()
        L = self.layout
        keys = self.slab[0].view(L.num_kv_heads, -1, L.head_dim)  # [H, slots * C, D]
        return HeadRows(keys, num_tokens)

    def gather_in_order(self, ids: torch.Tensor, slab: torch.Tensor | None = None) -> torch.Tensor:
        """Per-head token ids [H, n] -> K and V [2, H, n, D], when `in_order` holds: one
        index_select, no slot lookups. `slab`: the slab as another device sees it (on
        CUDA its UVA view: the GPU gathers the rows from host memory itself), with `ids`
        on that device."""
        L = self.layout
        if slab is None:  # (the host reads it)
            self._settle()
            slab = self.slab
        heads = torch.arange(L.num_kv_heads, device=ids.device)[:, None]
        rows = ids + heads * (slab.shape[2] * L.chunk_size)
        flat = slab.view(2, -1, L.head_dim)
        return flat.index_select(1, rows.reshape(-1)).view(2, L.num_kv_heads, ids.shape[1], -1)

    def gather_tokens(self, token_ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """K and V of `token_ids` [n] (all on the host) into `out` [2, H, n, D]; returns out."""
        C = self.layout.chunk_size
        self._settle()
        slots = self.slot_table[token_ids // C]
        out.copy_(self.slab[:, :, slots, token_ids % C])  # [2, H, n, D]
        return out

    def missing(self, chunks: torch.Tensor) -> list[int]:
        """Which of these chunk indices are not on the host."""
        in_table = chunks < self.slot_table.shape[0]
        slots = torch.where(
            in_table, self.slot_table[chunks.clamp_max(self.slot_table.shape[0] - 1)], -1
        )
        return chunks[slots < 0].tolist()

    def gather_heads(self, ids: torch.Tensor) -> torch.Tensor:
        """Per-head token ids [H, n] (all on the host) -> K and V [2, H, n, D]."""
        H, n = ids.shape
        heads = torch.arange(H)[:, None].expand(H, n)
        return self.gather_rows(heads.reshape(-1), ids.reshape(-1)).view(2, H, n, -1)

    def gather_rows(self, heads: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """K and V [2, n, D] of token ids[i] of KV head heads[i] (their chunks on the host)."""
        C = self.layout.chunk_size
        slots = self.slot_table[ids // C]
        assert bool((slots >= 0).all()), "gather_rows: some chunks are not on the host"
        self._settle()
        # One index_select over the slab seen as [2, H * slots * C, D] rows.
        per_head = self.slab.shape[2] * C
        rows = heads * per_head + slots * C + ids % C
        flat = self.slab.view(2, -1, self.layout.head_dim)
        return flat.index_select(1, rows)

    def free(self, chunk: int) -> None:
        slot = self.slot_of.pop(chunk)
        self._misplaced -= slot != chunk
        heapq.heappush(self._free, slot)
        self._free_set.add(slot)
        self.slot_table[chunk] = -1
        if self.reserved is not None and not self.pin:
            self._let_go.append(slot)

    def give_back(self) -> int:
        """Give the memory of the slots freed since the last call back to the system
        (`ReservedSlab.release`: a CPU's reserved slab; elsewhere nothing), those pages
        of it that hold no slot in use: chunks that left for disk. Returns the bytes."""
        freed, self._let_go = self._let_go, []
        r = self.reserved
        if r is None or r.pin or not freed:
            return 0
        runs, end = [], -1  # the longest runs of free slots around those freed
        for s in sorted(freed):
            if s < end or s not in self._free_set:  # (in the last run; taken again)
                continue
            a, b = s, s + 1
            while a > 0 and a - 1 in self._free_set:
                a -= 1
            while b < r.slots and b in self._free_set:
                b += 1
            if b >= self._next:  # (the slots from there up are free too)
                b = max(b, r.slots)
            runs.append((a, b - a))
            end = b
        return r.release(runs)
