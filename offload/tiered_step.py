"""The fixed-shape decode step over the tiered store (KV in host memory, sparse layers).

Inside the step (captured as a CUDA graph on CUDA), per layer:

    dense layers (the first `dense_layers`)   K/V written at `pos` into the layer's device
                                              mirror; attention over it up to pos + 1
    sparse layers                             K/V written into the window ring at pos % window;
                                              select: DeviceClusterIndex -> ids [H, k]
                                              fetch:  gather kernel, straight from the
                                                      pinned host slab (UVA)
                                              attend: sink and window ring (one
                                                      buffer), and the selected rows
                                                      where the fetch left them (one
                                                      decode-attention kernel, no copy)

Nothing there reads a host value: the range end `hi = pos + 1 - window` is computed
on the device. With `selection.reuse` (by default on CUDA) every other step skips the
select and takes the step before's ids with their successors (retrieval/base.py
`with_successors`): a second captured graph (`variant` 1), whose rows the hit cache
looks up and attention reads as the selected ones, the unused rows left out. Those rows
are known before the step begins, so on CUDA (with hit caches, not compiled) the step
looks them up and reads the misses for every sparse layer on a side stream from its
start, beside the layers before each one (`variant` 2; `TieredPlan.side_fetch`): a
reusing layer's attention then waits only for its own rows.

Between steps (`finish`), every `flush_chunks` chunks (fewer where the window holds
fewer) the completed chunks go from the device (ring or mirror) into the store in one
append per layer: host slab (on CUDA, copies queued after the step: the host waits for
none), summaries, abstracts. The cluster index absorbs them in batches as in the eager
path, `INDEX_LAYERS_PER_STEP` sparse layers in each step after (each device index is
synced at the next step's start). So the store lags the context by less than that many
chunks, all still in the window; `flush` brings it level.

A step runs fixed-shape only while every sparse layer attends sparsely, uses the
cluster selector and has all its chunks on the host in slot order (no spill);
otherwise the store is flushed and the step is decoded eagerly (offload/attention.py).

Differences from the eager path, by design: no speculative prefetch (with
`hit_factor`, a device hit cache per sparse layer keeps what earlier steps fetched;
without, the gather reads all k rows each step); the rerank uses the low-bit
summaries (as the eager path does wherever keys are not in the CPU's memory); the
gather fills a fixed number of slots, enough for the context rounded up to
`K_BUCKET` tokens (so the step is captured again rarely), of which attention uses
the best `k_valid` (the eager path's count, computed on the device); and the index
absorbs a finished batch a few steps later than the eager path.
"""

from __future__ import annotations

import math

import torch

from offload.backend import Backend
from offload.step_cache import LookupCounts, StepHitCache
from retrieval import ClusterIndex
from retrieval.device_index import DeviceClusterIndex
from storage.quant import QuantKeys

K_BUCKET = 1024  # context tokens per step of the retrieved count (fraction mode)
# Chunks handed to the store at once between steps (at most the window's: the tokens not
# yet handed over are still in the window ring). On CUDA a hand-over is mostly a fixed
# cost (launches, Python), so it comes every 256 tokens (the default window); on the CPU
# its work grows with the tokens (every 64 here: 0.41 ms a token, every 256: 0.43).
FLUSH_CHUNKS = 4
FLUSH_CHUNKS_CUDA = 16
# Sparse layers whose index takes a hand-over's tokens in, in each step after it: in
# `finish`, once the step is launched, so on CUDA beside it (a layer's batch at 128k took
# 3.5 ms on a 2-core CPU; docs/gpu.md, "The index's updates beside the step").
INDEX_LAYERS_PER_STEP = 4
TOKEN_GROWTH = 1.25  # the device index's token capacity grows by this factor


class TieredPlan:
    def __init__(self, cache, backend: Backend, max_tokens: int, hit_factor: float | None = None):
        """`hit_factor`: each sparse layer keeps a device hit cache of that many times the
        retrieved tokens per KV head (at least 2x), and reads only its misses from the
        host; None: every selected token is read from the host at every step."""
        self.cache, self.backend, self.max_tokens = cache, backend, max_tokens
        self.store, self.policy = cache.store, cache.policy
        sel, L = self.policy.selection, self.store.layout
        self.sel, self.layout = sel, L
        chunks = FLUSH_CHUNKS_CUDA if backend.device.type == "cuda" else FLUSH_CHUNKS
        self.flush_chunks = max(1, min(chunks, sel.window // L.chunk_size))
        dev = backend.device
        self.token = torch.zeros(1, dtype=torch.long, device=dev)  # static inputs of the graph
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.length = torch.zeros(1, dtype=torch.long, device=dev)  # pos + 1
        self.hi = torch.zeros(1, dtype=torch.long, device=dev)  # pos + 1 - window
        self.ring_slot = torch.zeros(1, dtype=torch.long, device=dev)  # pos % window
        self.k_valid = torch.zeros(1, dtype=torch.long, device=dev)  # tokens retrieved
        # selection.reuse: the last selecting step's k_valid, and the rows of a reusing
        # step (2k: its ids, their successors)
        self.last_valid = torch.zeros(1, dtype=torch.long, device=dev)
        self.reused_rows = torch.zeros(1, dtype=torch.long, device=dev)
        self.variant = 0  # this step's graph: 1 or 2 (side_fetch) where it reuses the last's
        # rows of the sink and window buffer (the store's `recent`): all valid in a step
        self.recent_rows = torch.tensor([sel.sink + sel.window], device=dev)
        self.k = self.num_candidates = 0  # retrieval slots, candidate slots
        self.steps = 0  # steps this plan ran (fixed-shape)
        self.sparse = [i for i, s in enumerate(self.policy.selectors) if s is not None]
        self.dense = [i for i, s in enumerate(self.policy.selectors) if s is None]
        self.indexes = {
            i: DeviceClusterIndex(L.num_kv_heads, L.head_dim, sel.candidate_factor, dev)
            for i in self.sparse
        }
        self.hit_factor = hit_factor
        self.lookups = LookupCounts(len(self.sparse), dev)  # counted on the device in steps
        self.hit_caches = {
            i: StepHitCache(L.num_kv_heads, L.head_dim, self.store.dtype, dev, self.lookups.rows[n])
            for n, i in enumerate(self.sparse)
        } if hit_factor else {}  # fmt: skip
        # A reusing step's rows fetched on a side stream (the module docstring); settable
        # (bench_gpu.py measures the step without it)
        self.side_fetch = dev.type == "cuda" and bool(self.hit_caches) and not backend.compile
        self._side = None  # that stream, made at its first step
        self._synced = dict.fromkeys(self.sparse, -1)  # indexed tokens at the last sync
        self._index_due: list[int] = []  # sparse layers yet to index the last hand-over
        self._summary_room = 0  # chunks every sparse layer's summaries hold, at least
        self._slots: dict[int, torch.Tensor] = {}  # per sparse layer: its slab's slot ids
        self._key: tuple | None = None  # what the layers were last handed for
        self.layers = [
            cache.layers[i].mirror.step_layer(self.pos, self.length, backend)
            if i in self.dense
            else SparseStepLayer(self, i)
            for i in range(L.num_layers)
        ]

    # -- between steps -------------------------------------------------------------

    def applies(self, num_tokens: int) -> bool:
        """Can the step at this position run fixed-shape? (See the module docstring.)"""
        T = num_tokens + 1
        store, policy = self.store, self.policy
        if not self.sparse:
            return False
        for i in self.sparse:
            if not isinstance(policy.selectors[i], ClusterIndex):
                return False
            if not policy.use_sparse(i, T, store) or not policy.indexed[i]:
                return False
            if not store.host[i].in_order(store.lengths[i]):
                return False
        return True

    def prepare(self, num_tokens: int) -> tuple | None:
        if not self.applies(num_tokens):
            self.flush()
            return None
        T = num_tokens + 1
        sel = self.sel
        # Retrieval slots: enough for every context up to the next K_BUCKET boundary (the
        # step attends to the first k_valid of them, computed on the device).
        bucket = min(-(-T // K_BUCKET) * K_BUCKET, self.max_tokens)
        self.k = max(1, min(sel.retrieved_for(bucket), bucket - sel.window - sel.sink))
        for i in self.dense:
            self.cache.layers[i].mirror_kv().reserve(T, self.max_tokens)
        for i in self.sparse:  # (a reallocation shows in the addresses below)
            self.device_index(i, T)
        self._reserve_summaries(T)
        self.num_candidates = max(self.indexes[i].candidate_count(self.k) for i in self.sparse)
        slots = max(2 * self.k, math.ceil((self.hit_factor or 0) * self.k))
        for i, hc in self.hit_caches.items():
            hc.reserve(slots, self.indexes[i].token_capacity)
        key = (self.k, self.num_candidates, *self._addresses())
        if key != self._key:  # a buffer moved: the layers' views of them too
            self._refresh_layers()
            self.reused_rows.fill_(2 * self.k)
            self._key = key
        if self.policy.reuse and self._reusable(num_tokens):
            self.variant = 2 if self.side_fetch else 1
        else:
            self.variant = 0
        return key

    def fallback(self, variant: int) -> int | None:
        """Where the side stream's step (2) cannot be captured, a reusing step looks its
        rows up in line (1) from now on; where that cannot either, every step selects (0:
        `selection.reuse` off for this cache, eager steps too)."""
        if variant == 2:
            self.side_fetch = False
        elif variant == 1:
            self.policy.reuse = False
            for i in self.sparse:  # (what an eager step would otherwise reuse once)
                self.cache.layers[i].last_selection = None
        else:
            return None
        self.variant = variant - 1
        return self.variant

    def _reusable(self, num_tokens: int) -> bool:
        """Does every sparse layer's selection of the step before stand for this step
        (`selection.reuse`)? Made by this plan, it is in the layer's `last` already; by
        the eager path, it is put there (in token order, padded with the first id)."""
        lasts = [self.cache.layers[i].last_selection for i in self.sparse]
        at = (num_tokens, self.policy.truncations)
        if any(s is None or s[:2] != at or s[2].shape[1] > self.k for s in lasts):
            return False
        for i, (_, _, ids) in zip(self.sparse, lasts, strict=True):
            last = self.layers[i].last
            if ids.data_ptr() != last.data_ptr():
                last[:, : ids.shape[1]] = ids.sort(dim=1).values
                last[:, ids.shape[1] :] = last[:, :1]
                self.last_valid.fill_(ids.shape[1])
        return True

    def _reserve_summaries(self, T: int) -> None:
        """Room in the sparse layers' summaries for the chunks the next flush appends,
        made before the step: a prefill or a load sizes them exactly, and their growth
        then comes with the first step's capture instead of a capture of its own at the
        first flush (inside the first hundred tokens of an answer)."""
        need = T // self.layout.chunk_size + self.flush_chunks
        most = self.store.dev[0].max_chunks  # (the model's window: no room past it)
        if most is not None:
            need = min(need, most)
        if need <= self._summary_room:
            return
        with self.store.lock:
            for i in self.sparse:  # (with an eighth more, up to the model's window)
                self.store.dev[i].reserve_chunks(self.store.dev[i].room_for(need))
            self._summary_room = min(self.store.dev[i].chunk_capacity for i in self.sparse)

    def _addresses(self) -> tuple:
        """Every buffer address a captured step reads: it is captured again when one moves."""
        out = []
        for i in self.dense:
            out.append(self.cache.layers[i].mirror.k.data.data_ptr())
        for i in self.sparse:
            d, idx = self.store.dev[i], self.indexes[i]
            out += [d.codes.data.data_ptr(), d.scale.data.data_ptr(), d.zero.data.data_ptr()]
            out += [self.store.host[i].slab.data_ptr(), idx.centroids.data_ptr()]
            out.append(idx.assign.data_ptr())
            if i in self.hit_caches:
                out += self.hit_caches[i].addresses()
        return tuple(out)

    def device_index(self, layer: int, num_tokens: int) -> DeviceClusterIndex:
        """The layer's device index, synced with its `ClusterIndex` and with room for
        `num_tokens` tokens. Each step's `prepare` asks; so does a prefill chunk after a
        long context, which selects its far tokens with it (offload/attention.py)."""
        index, dev = self.policy.selectors[layer], self.indexes[layer]
        if self._synced[layer] != index.indexed_tokens or dev.token_capacity < num_tokens:
            C = self.layout.chunk_size
            cap = dev.token_capacity  # grown only when short (a growth means a new capture),
            if cap < num_tokens:  # by a quarter over what is asked, the first time too (a
                # prefill or load sized it exactly: the next chunk would make it grow again)
                cap = max(num_tokens + C, int(num_tokens * TOKEN_GROWTH))
            # tokens between the index end and hi (and the steps the index takes to index)
            tail = self.sel.index_refresh + 2 * C + -(-len(self.sparse) // INDEX_LAYERS_PER_STEP)
            dev.sync(index, min(cap, self.max_tokens), tail)
            self._synced[layer] = index.indexed_tokens
        return dev

    def preload(self, num_tokens: int) -> None:
        """Copy each sparse layer's index to the device now (a session just loaded, a
        document just read), where the steps and a question's chunks will select with
        it: the first question then copies only what it adds to the index, not the whole
        of it (1.35 GB from pageable memory at 128k tokens of the 8B shape)."""
        for i in self.sparse:
            index = self.policy.selectors[i]
            if (
                isinstance(index, ClusterIndex)
                and index.indexed_tokens
                and self.policy.use_sparse(i, num_tokens + 1, self.store)
            ):
                self.device_index(i, num_tokens + 1)

    def derive(self, pos: torch.Tensor) -> None:
        sel = self.sel
        torch.add(pos, 1, out=self.length)
        torch.sub(self.length, sel.window, out=self.hi)
        torch.remainder(pos, sel.window, out=self.ring_slot)
        # k_valid = min(retrieved_for(T), hi - sink), as the eager path computes it (ceil of
        # a float64 product, like Python's): budget = sink + window + retrieved.
        if sel.retrieved:
            k = torch.full_like(self.hi, sel.retrieved)
        else:
            k = torch.ceil(self.length.double() * sel.retrieve_fraction).long()
        torch.minimum(k, self.hi - sel.sink, out=self.k_valid)
        if self.policy.reuse and not self.variant:
            self.last_valid.copy_(self.k_valid)
        if self.variant == 2:
            self._fetch_reused()

    def _fetch_reused(self) -> None:
        """A reusing step's rows for every sparse layer, on the side stream from the step's
        start (the step before's ids and `last_valid` are written before it, on this
        stream): each sparse layer's attention waits for its own (`SparseStepLayer.ready`),
        and the last one's wait joins the side stream back (a capture requires it)."""
        device = self.backend.device
        if self._side is None:
            self._side = torch.cuda.Stream(device)
        self._side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self._side):
            for i in self.sparse:
                self.layers[i].fetch_reused()

    def finish(self, num_tokens: int) -> None:
        self.steps += 1
        stats = self.policy.stats  # counted as the eager path counts them
        stats.sparse_steps += len(self.sparse)
        reused = self.variant > 0
        stats.reused_steps += len(self.sparse) * reused
        stats.dense_steps += len(self.dense)
        stats.last_retrieved = min(
            self.sel.retrieved_for(num_tokens), num_tokens - self.sel.window - self.sel.sink
        )
        if self.policy.reuse:  # the next step, here or eager, may reuse what this one selected
            for i in self.sparse:
                self.cache.layers[i].last_selection = None if self.variant else (
                    num_tokens, self.policy.truncations,
                    self.layers[i].last[:, : stats.last_retrieved],
                )  # fmt: skip
        for i in self.dense:
            self.cache.layers[i].mirror.commit(1)
        if not self.hit_caches:  # every retrieved token came from the host (a reusing
            # step's rows: twice as many, the successors' among them)
            n = len(self.sparse) * self.layout.num_kv_heads * stats.last_retrieved
            n *= 1 + reused
            self.store.reads.add("host", n, n * self.layout.row_bytes)
        C = self.layout.chunk_size
        if num_tokens % (C * self.flush_chunks) == 0:
            self._hand_over(num_tokens)  # (queued after this step: its own tokens go too)
            self._index_due = list(self.sparse)
        else:
            self._update_indexes(INDEX_LAYERS_PER_STEP)

    def _update_indexes(self, most: int) -> None:
        """Up to `most` sparse layers' indexes take the handed-over tokens in (as eagerly)."""
        for _ in range(min(most, len(self._index_due))):
            self.policy.update(self.store, self._index_due[0])
            del self._index_due[0]  # (after: a layer whose update stopped stays due)

    def truncate(self, num_tokens: int) -> None:
        for hc in self.hit_caches.values():
            hc.truncate(num_tokens)
        # The index may grow back to as many tokens as it had, with other tokens: sync again.
        self._synced = dict.fromkeys(self.sparse, -1)

    def flush(self) -> None:
        """Bring the store level with the cache (`_hand_over`), the index with the store."""
        self._hand_over(self.cache.num_tokens)
        self._count_lookups(self.lookups.drain())
        self._update_indexes(len(self._index_due))

    def _hand_over(self, T: int) -> None:
        """Append the tokens before `T` the steps wrote only to the device (ring or mirror)
        since the last hand-over; count the hit caches' lookups. Waits for no step."""
        store = self.store
        self._count_lookups(self.lookups.collect())  # (the last hand-over's)
        with store.lock:
            # Usually every layer is at the same token: one append for all of them.
            by_start: dict[int, list[int]] = {}
            for i in range(self.layout.num_layers):
                if store.lengths[i] < T:
                    by_start.setdefault(store.lengths[i], []).append(i)
            for t0, layers in by_start.items():
                kv = torch.stack([self._written(i, t0, T) for i in layers])
                # (a sparse layer's tokens are in its window ring: the step wrote them there)
                store.append_layers(layers, kv, in_window=self.sparse)

    def _count_lookups(self, counted: tuple[int, int]) -> None:
        copied = counted[0] - counted[1]  # (lookups - hits)
        self.store.reads.add("host", copied, copied * self.layout.row_bytes)
        if self.cache.prefetcher is not None:  # reported with the eager path's figures
            self.cache.prefetcher.count_lookups(counted[0], copied)

    def _written(self, layer: int, t0: int, t1: int) -> torch.Tensor:
        """K and V [2, H, t1 - t0, D] of tokens the steps wrote to the device only."""
        mirror = self.cache.layers[layer].mirror
        if mirror is None:
            return self.store.dev[layer].read_window(t0, t1)
        return torch.stack([mirror.k.data[:, t0:t1], mirror.v.data[:, t0:t1]])

    # -- what the step reads ---------------------------------------------------------

    def summaries(self, layer: int) -> QuantKeys:
        """Layer's low-bit keys over their whole buffers (ids below the summarized count)."""
        d, L = self.store.dev[layer], self.layout
        return QuantKeys(L.summary_bits, L.chunk_size, d.codes.data, d.scale.data, d.zero.data)

    def _refresh_layers(self) -> None:
        """Hand each sparse step layer what its step reads (see `SparseStepLayer.take`),
        with the host slab as the device reads it (`HostTier.device_view`)."""
        for layer in self.sparse:
            slab = self.store.host[layer].device_view(self.backend.device)
            slots = self._slots.get(layer)
            if slots is None or len(slots) != slab.shape[2]:
                self._slots[layer] = slots = torch.arange(slab.shape[2], device=self.backend.device)
            self.layers[layer].take(self.summaries(layer), slab, slots)


class SparseStepLayer:
    """A sparse tiered layer inside the fixed-shape step (see the module docstring).

    The step reads only this object's attributes, which `TieredPlan.prepare` sets
    (`take`), never a table by layer number: compiled (`model.compile_step`), a lookup by
    number would make each layer's block a compile of its own."""

    def __init__(self, plan: TieredPlan, layer: int):
        self.plan, self.layer = plan, layer
        self.index = plan.indexes[layer]
        self.hit_cache = plan.hit_caches.get(layer)
        self.dev = self.summaries = self.slab = self.slots = None
        self.last = None  # [H, k]: the last selecting step's ids (selection.reuse)
        self.rows = self.ready = None  # [H, 2k], an event: a reusing step's rows (side_fetch)

    def take(self, summaries: QuantKeys, slab: torch.Tensor, slots: torch.Tensor) -> None:
        self.dev = self.plan.store.dev[self.layer]
        self.summaries, self.slab, self.slots = summaries, slab, slots
        H, k = self.plan.layout.num_kv_heads, self.plan.k
        if self.last is None or self.last.shape != (H, k):
            self.last = torch.zeros(H, k, dtype=torch.long, device=slots.device)
            self.rows = torch.full((H, 2 * k), -1, dtype=torch.long, device=slots.device)

    def rope_store(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """`DenseStepLayer.rope_store`, into the window ring at `pos % window`."""
        ring = self.dev.ring  # [2, H, window, D]
        return self.plan.backend.rope_store(qkv, cos, sin, ring[0], ring[1], self.plan.ring_slot)

    def fetch_reused(self) -> None:
        """A reusing step's rows looked up in the hit cache, its misses read into it, on
        the plan's side stream (`TieredPlan._fetch_reused`); `ready` when done."""
        self.rows.copy_(self._reused_rows())
        if self.ready is None:
            self.ready = torch.cuda.Event()
        self.ready.record()

    def _reused_rows(self) -> torch.Tensor:
        """[H, 2k]: where the hit cache holds the last step's ids and their successors
        (`with_successors`), the rows not used -1."""
        plan = self.plan
        ids, use = plan.backend.successors(self.last, plan.last_valid)
        return self.hit_cache.lookup_slots(
            ids, plan.reused_rows, self.slab, self.slots, plan.backend, use
        )

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        plan, dev = self.plan, self.dev
        Hq, _, D = q.shape
        H = dev.ring.shape[1]
        qg = q.reshape(H, Hq // H, D)
        if plan.variant == 2:  # the rows the side stream fetched
            self.ready.wait()
            chosen, at, valid = self.hit_cache.kv, self.rows, plan.reused_rows
        else:
            chosen, at, valid = self._chosen(qg)
        # sink and window, then the first `valid` selected (the length cuts the rest off)
        recent = dev.recent
        out = plan.backend.decode_attention(
            qg,
            recent[0],
            recent[1],
            plan.recent_rows,
            chosen[0],
            chosen[1],
            valid,
            at,
            skip=plan.variant > 0,
        )
        return out.reshape(Hq, 1, D)

    def _chosen(self, qg: torch.Tensor) -> tuple:
        """The selected K/V, the rows of them attention reads ([H, k], or None: all, in
        order; -1: left out) and how many: this step's selection, or the last step's ids
        and their successors (`selection.reuse`, variant 1)."""
        plan = self.plan
        slab, slots, hc = self.slab, self.slots, self.hit_cache
        if plan.variant:
            if hc is not None:  # (a reusing step's unused rows: -1, which attention leaves out)
                return hc.kv, self._reused_rows(), plan.reused_rows
            ids, use = plan.backend.successors(self.last, plan.last_valid)
            at = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
            return (
                plan.backend.gather_kv(slab, slots, ids),
                torch.where(use, at, -1),
                plan.reused_rows,
            )
        ids = self.index.select(  # in token order; sparse steps run past the sink
            qg,
            self.summaries,
            plan.sel.sink,
            plan.hi,
            plan.k,
            plan.num_candidates,
            plan.k_valid,
            backend=plan.backend,
        )
        if plan.policy.reuse:
            self.last.copy_(ids)
        if hc is None:
            return plan.backend.gather_kv(slab, slots, ids), None, plan.k_valid  # [2, H, k, D]
        # only the misses cross PCIe; attention reads the hits where they are
        return hc.kv, hc.lookup_slots(ids, plan.k_valid, slab, slots, plan.backend), plan.k_valid
