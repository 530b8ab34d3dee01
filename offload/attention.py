"""Attention over the KV cache: the exact GQA kernel, and the tiered layer's two paths.

dense   every token, gathered from the tiers (prefill chunks where the KV is in
        place or the context short; decode in dense layers, below the auto
        threshold, or in mode "dense")
sparse  one decode token attends to sink + window + the `retrieved` tokens the
        layer's selector picks per KV head, fetched from host (and disk); so does
        a prefill chunk after a long context whose KV is not in place (CUDA, or
        spilled to disk): exactly to sink + the window before it + itself, and to
        one selection for the whole chunk (its queries as the selector's rows,
        `selection_queries`) in the far range, instead of reading every earlier
        token again

budget per KV head = sink + window + retrieved   (docs/budgets.md)
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from offload.quantize import chunk_dtype
from retrieval import ClusterIndex, LayerView, make_selector
from retrieval.base import with_successors
from storage.tiered import TieredStore

# A prefill chunk of at most this many queries after earlier keys attends in bf16 even on
# a CPU without fast bf16 matmuls: the keys and values converted to float32 cost more
# than float32 gains there (a question's 13 tokens over 8,046 keys of the embedded model,
# a layer: 7.8 -> 3.3 ms; 256 over 8,046: 45 -> 41; 512: 70 -> 77, so 512-token chunks
# convert). A prompt's first chunk (no earlier keys) converts as before: no gain there.
# float16's CPU flash kernel is slower than float32's at every size: it converts.
BF16_CHUNK_ROWS = 256


def gqa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Exact causal softmax attention of the S newest positions over all T keys.

    q: [H_q, S, D], the queries of positions T-S .. T-1
    k, v: [H_kv, T, D]
    valid: [H_kv, T] bool, the keys attended to (decode only; default all)
    returns [H_q, S, D]

    Both paths keep SDPA's inputs 4-D: with 3-D inputs and a mask it falls back to
    a math kernel about 10x slower on CPU (measured in docs/performance.md).
    - decode (S == 1): the G = H_q / H_kv query heads of a group become G rows,
      q -> [1, H_kv, G, D], so K/V are read once per group and no mask is needed.
    - prefill chunk (S > 1): a lower-right causal bias (row s sees keys
      0 .. T-S+s) and `enable_gqa`, which dispatch to the flash kernel.
    """
    Hq, S, D = q.shape
    Hkv, T, _ = k.shape
    # (a chunk after earlier keys: theirs converted are what a short chunk cannot repay)
    short = q.dtype == torch.bfloat16 and S < T and S <= BF16_CHUNK_ROWS
    if S > 1 and not short and chunk_dtype(q) != q.dtype:
        dt = chunk_dtype(q)  # float32: half precision on a CPU without fast matmuls in it
        return gqa_attention(q.to(dt), k.to(dt), v.to(dt)).to(q.dtype)
    if S == 1:
        if valid is None and q.device.type == "cpu":
            parts = decode_parts(Hkv, T)
            if parts > 1:
                return _split_decode_attention(q, k, v, parts)
        mask = None if valid is None else valid[None, :, None, :]
        out = F.scaled_dot_product_attention(
            q.reshape(1, Hkv, Hq // Hkv, D), k[None], v[None], attn_mask=mask
        )
        return out.reshape(Hq, 1, D)
    assert valid is None, "a prefill chunk attends to every key it is given"
    if q.device.type == "cpu" and S < T:
        return _cpu_chunk_attention(q, k, v)
    if S == T:  # lower-right is upper-left: the plain causal flag, same kernel
        out = F.scaled_dot_product_attention(
            q[None], k[None], v[None], is_causal=True, enable_gqa=True
        )
        return out[0]
    from torch.nn.attention.bias import causal_lower_right  # imports torch._dynamo: 1.3 s

    bias = causal_lower_right(S, T)
    out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=bias, enable_gqa=True)
    return out[0]


# Keys a part of a split decode attention holds at least (`decode_parts`). The embedded
# model's decode step on 2 threads, split in two (2026-12-06): the same at 2,048 keys,
# 5% faster at 3,072, 10% at 8,000 (40.5 -> 36.3 ms/token); the split's own ops cost
# about what it saves at 2,048.
SPLIT_KEYS = 1024


def decode_parts(num_kv_heads: int, num_keys: int) -> int:
    """Into how many parts a decode step's keys are split on the CPU. SDPA's CPU kernel
    gives each thread whole (KV head, query block)s, and a decode step has one query
    block: the embedded model's 3 KV heads on 2 threads left one thread idle a third
    of the time (on 8 threads, five of them all the time). Split into `parts` ranges
    of keys, KV heads x parts is a multiple of the threads; each part keeps at least
    `SPLIT_KEYS` keys (a split costs a merge). 1: not split."""
    threads = torch.get_num_threads()
    parts = threads // math.gcd(num_kv_heads, threads)
    return min(parts, num_keys // SPLIT_KEYS)


def _split_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, parts: int):
    """`gqa_attention` of one position over T keys in `parts` equal ranges of keys (the
    CPU flash kernel over them as a batch, so its threads share the ranges), merged by
    their log-sum-exps; the T % parts keys left over are one more range."""
    Hq, _, D = q.shape
    Hkv, T, _ = k.shape
    G = Hq // Hkv
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    n = T // parts
    rows = q.reshape(1, Hkv, G, D)
    o, lse = flash(rows.expand(parts, Hkv, G, D),
                   k[:, : n * parts].unflatten(1, (parts, n)).transpose(0, 1),
                   v[:, : n * parts].unflatten(1, (parts, n)).transpose(0, 1))[:2]  # fmt: skip
    if n * parts < T:
        o_rest, lse_rest = flash(rows, k[None, :, n * parts :], v[None, :, n * parts :])[:2]
        o, lse = torch.cat([o, o_rest]), torch.cat([lse, lse_rest])
    w = lse.softmax(0)  # [parts(+1), Hkv, G]: each range's share of the softmax mass
    return (o * w[..., None]).sum(0).to(q.dtype).reshape(Hq, 1, D)  # (summed in float32)


def _cpu_chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A prefill chunk after earlier tokens, on the CPU: the S queries over the T - S
    earlier keys (no mask; the query heads of a group as rows, so K/V are read once)
    and over their own S keys (causal), merged by their log-sum-exps.

    SDPA with a lower-right causal bias materializes the mask and leaves the flash
    kernel's unmasked fast path: this is 1.5x faster at 8k keys (docs/performance.md).
    The CPU flash kernel is called directly because it also returns the log-sum-exp."""
    Hq, S, D = q.shape
    Hkv, T, _ = k.shape
    G = Hq // Hkv
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    o1, lse1 = flash(q.reshape(1, Hkv, G * S, D), k[None, :, : T - S], v[None, :, : T - S])[:2]
    k2 = k[:, T - S :].repeat_interleave(G, dim=0)  # [Hq, S, D]: small
    v2 = v[:, T - S :].repeat_interleave(G, dim=0)
    o2, lse2 = flash(q[None], k2[None], v2[None], is_causal=True)[:2]
    lse1, lse2 = lse1.reshape(Hq, S, 1), lse2.reshape(Hq, S, 1)
    lse = torch.logaddexp(lse1, lse2)
    out = o1.reshape(Hq, S, D).float() * (lse1 - lse).exp() + o2[0].float() * (lse2 - lse).exp()
    return out.to(q.dtype)


SELECT_POSITIONS = 64  # a prefill chunk's selection is scored with at most this many
# A prefill chunk's one selection retrieves up to this many times a decode step's tokens:
# on the needle questions at 8k (scripts/eval_sparse_prefill.py) a question's 19 tokens
# sharing a step's 5% lost the needle that a step per token, or the shared 20%, found.
CHUNK_RETRIEVAL = 4
MIRROR_BLOCK = 8192  # tokens a dense layer's device mirror is filled with at a time


def selection_queries(q: torch.Tensor) -> torch.Tensor:
    """The queries [H_q, S', D] a selection is scored with: all S positions of a decode
    step or a short chunk; of a longer chunk, `SELECT_POSITIONS` evenly spaced ones, the
    first and the last included (the summed attention mass of a sample of the chunk's
    queries estimates the whole chunk's; scoring every query of a 2048-token chunk
    against every candidate would cost more than reading all the KV)."""
    S = q.shape[1]
    if S <= SELECT_POSITIONS:
        return q
    pos = torch.linspace(0, S - 1, SELECT_POSITIONS, device=q.device).round().long()
    return q[:, pos]


@dataclass
class SelectionStats:
    sparse_steps: int = 0  # (layer, token) decode steps that attended sparsely
    reused_steps: int = 0  # ... of which reused the step before's selection (selection.reuse)
    dense_steps: int = 0
    sparse_chunks: int = 0  # (layer, prefill chunk) passes that attended sparsely
    selection_seconds: float = 0.0
    fetch_seconds: float = 0.0
    index_seconds: float = 0.0
    last_retrieved: int = 0
    layer_selection_seconds: dict = field(default_factory=dict)  # layer -> seconds
    # Evaluation probe: per sparse step, (layer, [H] share of dense softmax mass covered).
    recall: list | None = None

    @property
    def reused_share(self) -> float | None:
        """Of the sparse decode steps, the share that reused the last selection."""
        return self.reused_steps / self.sparse_steps if self.sparse_steps else None


@dataclass
class SparsePolicy:
    """Decides per layer and step between dense and sparse attention; owns the selectors."""

    selection: object  # offload.config.SelectionSection
    num_layers: int
    num_kv_heads: int
    head_dim: int
    stats: SelectionStats = field(default_factory=SelectionStats)
    # The cluster index's k-means assignment where keys are on the compute device (a
    # layer-by-layer prefill; `Backend.nearest_centroids`: a kernel on CUDA); None: torch's.
    nearest: Callable | None = None
    # Every other decode step reuses the step before's selection, each token with its
    # successor (`selection.reuse`, resolved: on with CUDA by default).
    reuse: bool = False

    def __post_init__(self):
        sel = self.selection
        self.indexed = [False] * self.num_layers  # has the layer's selector an index yet
        self.truncations = 0  # a selection kept for reuse is of the tokens before the last
        self.selectors = [
            None
            if layer < sel.dense_layers
            else make_selector(sel.selector, self.num_kv_heads, self.head_dim, sel, self.nearest)
            for layer in range(self.num_layers)
        ]

    def use_sparse(
        self, layer: int, num_tokens: int, store: TieredStore | None = None, queries: int = 1
    ) -> bool:
        """Sparse for this layer at this context (`queries` new positions at its end)?
        Mode "auto" stays dense up to `sparse_threshold` tokens, and wherever `store` can
        hand the layer's KV to dense attention in place (on the CPU, all in host memory),
        since there reading every token costs less than selecting some
        (docs/performance.md)."""
        sel = self.selection
        if sel.mode == "dense" or self.selectors[layer] is None:
            return False
        if sel.mode == "auto" and (
            num_tokens <= sel.sparse_threshold or (store is not None and store.in_place(layer))
        ):
            return False
        return self.bounds(num_tokens, queries)[1] - min(sel.sink, num_tokens) >= 1

    def use_sparse_chunk(self, layer: int, num_tokens: int, store: TieredStore, queries: int):
        """Does a prefill chunk of `queries` positions attend sparsely? Where the layer's
        KV is in place (on the CPU, in host memory) never: every token is read where it
        lies, exactly. Elsewhere, as a decode step at this context would."""
        # (store=None below: in place was just answered, and is not asked twice)
        return not store.in_place(layer) and self.use_sparse(layer, num_tokens, None, queries)

    def bounds(self, num_tokens: int, queries: int = 1) -> tuple[int, int, int]:
        """lo, hi, k: the selection range [lo, hi) between sink and window, and its size.
        With `queries` new positions, the window is the `window` tokens the last of them
        sees (itself included), so the other queries of a prefill chunk see more, and
        the chunk's one selection takes `min(queries, CHUNK_RETRIEVAL)` times a step's."""
        sel = self.selection
        lo = min(sel.sink, num_tokens)
        hi = num_tokens - sel.window - (queries - 1)
        k = sel.retrieved_for(num_tokens) * min(queries, CHUNK_RETRIEVAL)
        return lo, hi, min(k, hi - lo)

    def update(self, store: TieredStore, layer: int) -> LayerView:
        """Bring the layer's index up to date (under the store's lock); return its view."""
        with store.lock:  # a spill by the prefetch worker may move this layer's chunks
            view = self.view(store, layer)
            self.selectors[layer].update(view)
        self.indexed[layer] = True
        return view

    def update_from_keys(self, store: TieredStore, layer: int, keys: torch.Tensor) -> None:
        """Index a layer just prefilled from its keys [H, T, D] still on the compute device
        (a layer-by-layer prefill), instead of reading them back from the host tier."""
        T = keys.shape[1]
        if not self.use_sparse(layer, T + 1, store):
            return
        t = time.perf_counter()
        with store.lock:
            # (the keys at hand on the device serve every read, the batch's too)
            view = dataclasses.replace(
                self.view(store, layer), read_keys=lambda a, b: keys[:, a:b], host_keys=None
            )
            self.selectors[layer].update(view)
        self.indexed[layer] = True
        self.stats.index_seconds += time.perf_counter() - t

    def view(self, store: TieredStore, layer: int) -> LayerView:
        dev = store.dev[layer]
        return LayerView(
            summaries=dev.summaries(),
            abstracts_of=dev.abstracts,
            chunk_size=store.layout.chunk_size,
            num_tokens=store.lengths[layer],
            read_keys=lambda a, b: store.read_keys(layer, a, b),
            keys=store.key_rows(layer),
            host_keys=lambda a, b: store.read_keys(layer, a, b, "cpu"),
        )

    def build_index(self, store: TieredStore, num_tokens: int, progress=None) -> None:
        """After a prefill: bring every selector's index up to date (a no-op when dense)."""
        layers = [
            i
            for i, s in enumerate(self.selectors)
            if s is not None and self.use_sparse(i, num_tokens + 1, store)
        ]
        t = time.perf_counter()
        for n, layer in enumerate(layers):
            self.update(store, layer)
            if progress is not None:
                progress(n + 1, len(layers), "index")
        self.stats.index_seconds += time.perf_counter() - t

    def truncate(self, num_tokens: int) -> None:
        self.truncations += 1
        for s in self.selectors:
            if s is not None:
                s.truncate(num_tokens)
        if num_tokens == 0:
            self.indexed = [False] * self.num_layers

    def release(self) -> None:
        """Let go of the selectors' indexes (a closed cache's; `stats` stays)."""
        self.selectors = [None] * self.num_layers
        self.indexed = [False] * self.num_layers


class TieredLayer:
    """One layer's view of a `TieredStore`; the object the model's attention calls."""

    def __init__(self, store: TieredStore, policy: SparsePolicy, layer: int):
        self.store, self.policy, self.layer = store, policy, layer
        self.prefetcher = None  # a `Prefetcher` when the cache prefetches
        self.mirror = None  # a device `DenseLayer` with the same KV (KVCache.mirror_dense_layers)
        self.plan = None  # the fixed-shape steps' `TieredPlan` (KVCache.use_step): its
        # device index selects a prefill chunk's far tokens too
        # (context, truncations, ids [H, k]) of the last decode step's selection where
        # `selection.reuse` may reuse it: this path's or the fixed-shape step's (the two
        # take turns alike)
        self.last_selection = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        mirror = self.mirror_kv()
        with self.store.lock:
            self.store.append(self.layer, k, v)
        if mirror is not None:
            mirror.append(k, v)

    def mirror_kv(self):
        """The device mirror, first filled with what the store holds beyond it (after a
        session load). A mirror ahead of the store (fixed-shape steps) is left alone."""
        mirror, T = self.mirror, self.store.lengths[self.layer]
        if mirror is not None and mirror.k.length < T:
            # With room to grow, as the summaries have after a load: the question's tokens
            # then copy nothing (an exact fit doubled at once, the whole KV copied on the
            # device and held twice while it is).
            # Read over in blocks: the whole layer at once would sit on the device twice,
            # in the mirror and in what was read (0.5 GiB more for the 8B shape at 128k).
            C = self.store.layout.chunk_size
            room = self.store.dev[self.layer].room_for(-(-T // C)) * C
            mirror.reserve(room, room)
            for t0 in range(mirror.k.length, T, MIRROR_BLOCK):
                with self.store.lock:
                    kv = self.store.read_range(self.layer, t0, min(T, t0 + MIRROR_BLOCK))
                mirror.append(kv[0], kv[1])
        return mirror

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        if self.mirror is not None:  # a dense layer whose KV is on the device as well
            self.policy.stats.dense_steps += q.shape[1] == 1
            return self.mirror_kv().attend(q)
        T, S = self.store.lengths[self.layer], q.shape[1]
        if S > 1 and self.policy.use_sparse_chunk(self.layer, T, self.store, S):
            return self._attend_sparse(q, T)
        if S > 1 or not self.policy.use_sparse(self.layer, T, self.store):
            self.policy.stats.dense_steps += S == 1
            with self.store.lock:
                k, v = self.store.gather_all(self.layer)
            return gqa_attention(q, k, v)
        return self._attend_sparse(q, T)

    def _attend_sparse(self, q: torch.Tensor, T: int) -> torch.Tensor:
        """The S = q.shape[1] newest positions (a decode step, or a prefill chunk) over
        sink + the selected tokens + the window (and the chunk itself, causally)."""
        store, policy, layer = self.store, self.policy, self.layer
        stats = policy.stats
        Hq, S, D = q.shape
        H = store.layout.num_kv_heads
        lo, hi, k = policy.bounds(T, S)
        # [H_kv, G x S', D]: the query heads of each group (and a chunk's positions) as rows
        qg = selection_queries(q).reshape(H, -1, D)

        t0 = time.perf_counter()
        reused = self._reused(T) if S == 1 else None
        if reused is None:
            view = policy.update(store, layer)
            ids = self._select(qg, view, lo, hi, k, T, S)  # [H_kv, k]
            if S == 1 and policy.reuse:
                self.last_selection = (T, policy.truncations, ids)
            use = None
        else:  # [H_kv, 2k]: the last step's ids and their successors, `use` the rows kept
            ids, use = reused
            stats.reused_steps += 1
        t1 = time.perf_counter()
        if self.prefetcher is not None and S == 1 and use is None:
            chosen = self.prefetcher.fetch(layer, ids, T)  # [2, H, k, D]
        else:
            if self.prefetcher is not None and S == 1:
                self.prefetcher.skip(layer)
            with store.lock:
                chosen = store.gather_selected(layer, ids)
        dev = store.dev[layer]
        if S == 1:
            near = dev.read_window(hi, T)
            store.reads.add("device", 1, (lo + T - hi) * store.layout.token_bytes_per_layer)
        else:  # the chunk has overwritten the ring's older part: read the window's tokens
            with store.lock:
                near = store.read_range(layer, hi, T)
            store.reads.add("device", 1, lo * store.layout.token_bytes_per_layer)
        kv = torch.cat([dev.sink_kv[:, :, :lo], chosen, near], dim=2)
        stats.selection_seconds += t1 - t0
        stats.layer_selection_seconds[layer] = (
            stats.layer_selection_seconds.get(layer, 0.0) + t1 - t0
        )
        stats.fetch_seconds += time.perf_counter() - t1
        if S > 1:
            stats.sparse_chunks += 1
            return gqa_attention(q, kv[0], kv[1])
        stats.sparse_steps += 1
        stats.last_retrieved = k
        if stats.recall is not None:
            stats.recall.append((layer, self._mass_covered(qg, ids, lo, hi, T)))
        if use is not None:
            valid = torch.ones(H, kv.shape[2], dtype=torch.bool, device=q.device)
            valid[:, lo : lo + use.shape[1]] = use
            return gqa_attention(q, kv[0], kv[1], valid)
        return gqa_attention(q, kv[0], kv[1])

    def reuses_next_step(self) -> bool:
        """Will this layer's next decode step reuse its last selection (`_reused`)? Asked
        before the step's token is appended."""
        return self._selected_at(self.store.lengths[self.layer])

    def _selected_at(self, T: int) -> bool:
        """Did the last decode step select at context T, with nothing between?"""
        last = self.last_selection
        return last is not None and last[:2] == (T, self.policy.truncations)

    def _reused(self, T: int):
        """With `selection.reuse`, the step after a step that selected (and nothing between
        them) takes its ids and their successors (`with_successors`) instead of selecting."""
        reusable, last, self.last_selection = self._selected_at(T - 1), self.last_selection, None
        if not reusable:
            return None
        ids = last[2].sort(dim=1).values  # (a selector lists them in any order)
        return with_successors(ids, ids.shape[1])

    def _select(self, qg, view: LayerView, lo: int, hi: int, k: int, T: int, S: int):
        """The far tokens [H_kv, k]: by the layer's selector; for a prefill chunk where the
        fixed-shape steps run (CUDA), by their device-resident copy of the cluster index,
        which returns the same tokens (tests/test_device_index.py) without the host-side
        candidate masks (tens of ms per layer at 128k) or a copy of the centroids."""
        selector = self.policy.selectors[self.layer]
        if (
            S > 1
            and self.plan is not None
            and isinstance(selector, ClusterIndex)
            and selector.candidate_factor > 1  # (with 1, the device pads heads short of k)
            and view.keys is None  # (keys in place: the host reranks exactly)
        ):
            dev = self.plan.device_index(self.layer, T)
            hi_t = torch.full((1,), hi, dtype=torch.long, device=qg.device)
            return dev.select(qg, view.summaries, lo, hi_t, k, dev.candidate_count(k),
                              backend=self.plan.backend)  # fmt: skip
        return selector.select(qg, view, lo, hi, k)

    def _mass_covered(self, qg, ids, lo, hi, T) -> torch.Tensor:
        """[H] share of the dense softmax mass (mean over the group) on sink + window + ids."""
        k_all, _ = self.store.gather_all(self.layer)
        logits = torch.einsum("hgd,htd->hgt", qg.float(), k_all.float()) / qg.shape[-1] ** 0.5
        probs = torch.softmax(logits, dim=-1)
        keep = torch.zeros(ids.shape[0], T, dtype=torch.bool)
        keep[:, :lo] = True
        keep[:, hi:] = True
        keep.scatter_(1, ids.cpu(), True)
        return (probs * keep[:, None, :].to(probs.device)).sum(-1).mean(-1).cpu()
