"""The prefetch pipeline of the sparse decode path, and the device hit cache.

    HitCache      per layer: the K/V of tokens fetched earlier, kept on the compute
                  device, least recently used evicted per KV head. A step's
                  selection is looked up; only the misses are copied in.
    Pipeline      one worker thread that runs the fetch jobs of layer L+1 while
                  layer L computes. On CUDA the jobs' copies go through a copy
                  stream and pinned staging buffers, and the compute stream
                  waits on an event; on the CPU the worker's host gathers run
                  beside the main thread's matmuls (torch releases the GIL).
    Prefetcher    ties them to the model: when block L starts, it predicts layer
                  L+1's query from block L's input and layer L+1's own norm and
                  query weights (InfiniGen's observation: the residual stream
                  changes little between adjacent layers), runs layer L+1's
                  selector on it and has the worker bring those tokens into layer
                  L+1's hit cache. When layer L+1 attends, its true selection
                  fetches only what the speculation missed.

The pipeline is started and stopped explicitly (`with cache.decoding():`, which
`generate_steps` does); a cache that is not decoding fetches synchronously, with
the hit cache. Every store access is made under the store's lock, since a spill
triggered by one layer's append moves chunks of every layer.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from offload.errors import OffloadError
from storage import threads


class PrefetchError(OffloadError):
    """A prefetch job failed in the worker; the cause is chained."""


@dataclass
class PrefetchStats:
    lookups: int = 0  # token-heads looked up in the hit caches by true selections
    hits: int = 0  # ... of which were already on the device
    copied: int = 0  # token-heads copied into the hit caches (speculative and on demand)
    copied_bytes: int = 0
    spec_copied: int = 0  # ... of which by speculative jobs
    spec_selected: int = 0  # token-heads predicted by speculation
    spec_correct: int = 0  # ... that the true selection then chose
    true_selected: int = 0  # token-heads of true selections that had a speculation
    jobs: int = 0
    dropped: int = 0  # jobs whose layer then reused its last selection (selection.reuse)
    job_seconds: float = 0.0  # worker time spent in jobs
    wait_seconds: float = 0.0  # main-thread time blocked waiting for jobs

    def summary(self) -> dict:
        hidden = max(0.0, self.job_seconds - self.wait_seconds)
        return {
            "hit_rate": self.hits / self.lookups if self.lookups else None,
            "copied_bytes": self.copied_bytes,
            "speculation_precision": (
                self.spec_correct / self.spec_selected if self.spec_selected else None
            ),
            "speculation_recall": (
                self.spec_correct / self.true_selected if self.true_selected else None
            ),
            "jobs": self.jobs,
            "dropped_jobs": self.dropped,
            "wait_seconds": self.wait_seconds,
            "hidden_seconds": hidden,
        }


class HitCache:
    """Token K/V `[2, H, capacity, D]` of one layer on the compute device.

    slot_of[h, t]   the slot of token t of head h, or -1
    token_of[h, s]  the token in slot s of head h, or -1
    used[h, s]      the clock of the last lookup that touched slot s
    """

    def __init__(self, num_heads: int, head_dim: int, dtype: torch.dtype, device):
        self.H, self.D, self.dtype, self.device = num_heads, head_dim, dtype, device
        self.kv = torch.empty(2, num_heads, 0, head_dim, dtype=dtype, device=device)
        self.slot_of = torch.full((num_heads, 0), -1, dtype=torch.long, device=device)
        self.token_of = torch.full((num_heads, 0), -1, dtype=torch.long, device=device)
        self.used = torch.full((num_heads, 0), -1, dtype=torch.long, device=device)
        self.clock = 0

    @property
    def capacity(self) -> int:
        return self.kv.shape[2]

    def reserve(self, capacity: int, num_tokens: int) -> None:
        """Room for `capacity` tokens per head, and ids below `num_tokens`."""
        if capacity > self.capacity:
            grow = capacity - self.capacity
            self.kv = torch.cat([self.kv, self.kv.new_empty(2, self.H, grow, self.D)], dim=2)
            self.token_of = torch.cat(
                [self.token_of, self.token_of.new_full((self.H, grow), -1)], 1
            )
            self.used = torch.cat([self.used, self.used.new_full((self.H, grow), -1)], 1)
        if num_tokens > self.slot_of.shape[1]:
            grow = max(num_tokens, 2 * self.slot_of.shape[1]) - self.slot_of.shape[1]
            self.slot_of = torch.cat([self.slot_of, self.slot_of.new_full((self.H, grow), -1)], 1)

    def ensure(self, ids: torch.Tensor, fetch) -> tuple[torch.Tensor, int]:
        """Make the tokens ids [H, k] (distinct per head) resident; return their slots
        [H, k] and how many token-heads were copied. `fetch(miss_ids [H, m])` returns
        their K/V [2, H, m, D]; rows with fewer misses are padded with a valid id."""
        H, k = ids.shape
        assert self.capacity >= 2 * k, "reserve() at least twice the selection"
        self.clock += 1
        slots = self.slot_of.gather(1, ids)
        hit = slots >= 0
        # Touch the hits first, so that they cannot be chosen as victims below.
        self.used.scatter_reduce_(
            1, slots.clamp_min(0), torch.where(hit, self.clock, -1), reduce="amax"
        )
        miss = ~hit
        n_miss = miss.sum(1)
        M = int(n_miss.max())
        if M == 0:
            return slots, 0
        # Compact each head's misses to the front (in id order); pad with the head's first id.
        column = torch.where(miss, miss.cumsum(1) - 1, M)
        miss_ids = ids[:, :1].repeat(1, M + 1).scatter_(1, column, ids)[:, :M]
        valid = torch.arange(M, device=ids.device)[None, :] < n_miss[:, None]
        victims = torch.topk(self.used, M, dim=1, largest=False).indices  # least recent first
        heads = torch.arange(H, device=ids.device)[:, None].expand(H, M)[valid]
        new_slots, new_ids = victims[valid], miss_ids[valid]
        old = self.token_of[heads, new_slots]
        evicted = old >= 0
        self.slot_of[heads[evicted], old[evicted]] = -1
        self.slot_of[heads, new_ids] = new_slots
        self.token_of[heads, new_slots] = new_ids
        self.used[heads, new_slots] = self.clock
        data = fetch(miss_ids)  # [2, H, M, D]
        self.kv[:, heads, new_slots] = data[:, valid]
        return self.slot_of.gather(1, ids), int(valid.sum())

    def read(self, slots: torch.Tensor) -> torch.Tensor:
        """K/V [2, H, k, D] of the slots [H, k] (in their order)."""
        heads = torch.arange(self.H, device=slots.device)[:, None].expand_as(slots)
        return self.kv[:, heads, slots]

    def truncate(self, num_tokens: int) -> None:
        """Forget tokens from `num_tokens` on (their ids will hold other tokens)."""
        gone = self.token_of >= num_tokens
        if bool(gone.any()):
            heads = torch.arange(self.H, device=gone.device)[:, None].expand_as(gone)
            self.slot_of[heads[gone], self.token_of[gone]] = -1
            self.token_of[gone] = -1
            self.used[gone] = -1


class Pipeline:
    """One worker thread for fetch jobs, keyed by layer. `start()`/`stop()` or `with`."""

    def __init__(self, device: torch.device):
        self.device = device
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[int, Future] = {}
        self._stream = None

    @property
    def running(self) -> bool:
        return self._pool is not None

    @property
    def stream(self):
        """The copy stream the jobs run on (CUDA), else None."""
        return self._stream

    def start(self) -> Pipeline:
        assert self._pool is None, "pipeline already started"
        if self.device.type == "cuda":
            self._stream = torch.cuda.Stream(self.device)
        self._pool = threads.pool(1, "offload-prefetch")
        return self

    def submit(self, layer: int, job) -> None:
        assert self._pool is not None, "submit() on a pipeline that is not started"
        assert layer not in self._pending, f"layer {layer} has a job in flight already"
        ready = None
        if self._stream is not None:
            # The job reads tensors the compute stream produced (the hidden state) and
            # overwrites hit-cache slots earlier steps may still be reading: order it after.
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        self._pending[layer] = self._pool.submit(self._run, job, ready)

    def _run(self, job, ready):
        t = time.perf_counter()
        if self._stream is None:
            job()
            return None, time.perf_counter() - t
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(ready)
            job()
            event = torch.cuda.Event()
            event.record(self._stream)
        return event, time.perf_counter() - t

    def wait(self, layer: int) -> float | None:
        """Block until layer's job is done (its copies ordered before later compute);
        return the job's worker time, or None when there was no job."""
        fut = self._pending.pop(layer, None)
        if fut is None:
            return None
        try:
            event, seconds = fut.result()
        except Exception as e:
            if self._stream is not None:  # (what the job queued before it failed comes first)
                torch.cuda.current_stream(self.device).wait_stream(self._stream)
            raise PrefetchError(f"prefetch for layer {layer} failed: {e}") from e
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        return seconds

    def stop(self) -> None:
        """Finish every job, join the worker; a job's error is raised here, not lost."""
        if self._pool is None:
            return
        error = None
        for layer in list(self._pending):
            try:
                self.wait(layer)
            except PrefetchError as e:
                error = error or e
        self._pool.shutdown(wait=True)
        self._pool, self._stream = None, None
        if error is not None:
            raise error

    def __enter__(self) -> Pipeline:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Prefetcher:
    """Hit caches of every layer, the pipeline, and next-layer speculation."""

    def __init__(self, model, store, policy, cache_factor: float, speculate: bool):
        a = model.args
        self.model, self.store, self.policy = model, store, policy
        self.cache_factor, self.speculate = cache_factor, speculate
        self.caches = [
            HitCache(a.num_kv_heads, a.head_dim, store.dtype, store.device)
            for _ in range(a.num_layers)
        ]
        self.pipeline = Pipeline(store.device)
        self.stats = PrefetchStats()
        self._spec: dict[int, torch.Tensor] = {}  # layer -> speculated ids [H, k]
        self._lock = threading.Lock()  # guards stats updated by the worker

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        if self.speculate:
            self.pipeline.start()

    def stop(self) -> None:
        self._spec.clear()
        self.pipeline.stop()

    def truncate(self, num_tokens: int) -> None:
        for c in self.caches:
            c.truncate(num_tokens)

    # -- fetching --------------------------------------------------------------------

    def _fetch_into(self, layer: int, ids: torch.Tensor, num_tokens: int) -> tuple:
        cache = self.caches[layer]
        cache.reserve(max(2 * ids.shape[1], int(self.cache_factor * ids.shape[1])), num_tokens)

        def fetch(miss_ids):
            with self.store.lock:
                return self.store.gather_selected(layer, miss_ids)

        return cache.ensure(ids, fetch)

    def fetch(self, layer: int, ids: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """K/V [2, H, k, D] of the true selection ids [H, k], via the hit cache."""
        t = time.perf_counter()
        job = self.pipeline.wait(layer)
        if job is not None:
            with self._lock:
                self.stats.wait_seconds += time.perf_counter() - t
                self.stats.job_seconds += job
                self.stats.jobs += 1
        spec = self._spec.pop(layer, None)
        if spec is not None:
            self._score_speculation(spec, ids, num_tokens)
        slots, copied = self._fetch_into(layer, ids, num_tokens)
        self.count_lookups(ids.numel(), copied)
        return self.caches[layer].read(slots)

    def skip(self, layer: int) -> None:
        """A step that reuses its last selection (`selection.reuse`) fetches nothing here:
        a speculative job for the layer is waited for (its copies land first) and dropped.
        (`ahead` submits none where it knows the layer will reuse: `reuse_next`.)"""
        if self.pipeline.wait(layer) is not None:
            with self._lock:
                self.stats.dropped += 1
        self._spec.pop(layer, None)

    def count_lookups(self, lookups: int, copied: int) -> None:
        """Token-head lookups of the hit caches, `copied` of them misses (also called by
        the captured tiered step, whose own hit caches count on the device)."""
        self.stats.lookups += lookups
        self.stats.hits += lookups - copied
        self._count_copy(copied)

    def _count_copy(self, copied: int, speculative: bool = False) -> None:
        L = self.store.layout
        with self._lock:
            self.stats.copied += copied
            self.stats.copied_bytes += copied * L.row_bytes
            if speculative:
                self.stats.spec_copied += copied

    def _score_speculation(self, spec: torch.Tensor, ids: torch.Tensor, T: int) -> None:
        H = ids.shape[0]
        offset = torch.arange(H, device=ids.device)[:, None] * (T + 1)
        correct = int(torch.isin(spec + offset, ids + offset).sum())
        s = self.stats
        s.spec_selected += spec.numel()
        s.spec_correct += correct
        s.true_selected += ids.numel()

    # -- speculation -----------------------------------------------------------------

    def ahead(
        self, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, reuse_next: bool
    ) -> None:
        """Block `layer - 1` is starting with input x [1, dim]: speculate for `layer`,
        unless its step will reuse its last selection (`reuse_next`: it selects nothing)."""
        policy, store = self.policy, self.store
        if not self.pipeline.running or layer >= len(self.caches) or reuse_next:
            return
        T = store.lengths[layer] + 1  # the layer will hold this step's token too
        if not policy.use_sparse(layer, T, store) or not policy.indexed[layer]:
            return
        block = self.model.layers[layer]
        lo, hi, k = policy.bounds(T)

        def job():
            stream = self.pipeline.stream
            if stream is not None:  # (x, cos, sin come from the compute stream, which may
                for t in (x, cos, sin):  # free them before this stream has read them)
                    t.record_stream(stream)
            q = block.attention.query(block.attention_norm(x), cos, sin)  # [Hq, 1, D]
            H = store.layout.num_kv_heads
            qg = q.reshape(H, q.shape[0] // H, q.shape[-1])
            with store.lock:
                view = policy.view(store, layer)
            ids = policy.selectors[layer].select(qg, view, lo, hi, k)
            self._spec[layer] = ids
            _, copied = self._fetch_into(layer, ids, T)
            self._count_copy(copied, speculative=True)

        self.pipeline.submit(layer, job)
