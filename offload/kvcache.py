"""The cache-layer interface the model calls, and the in-memory dense cache.

Each attention layer is handed one cache-layer object and calls two verbs:

    append(k, v)   k, v: [H_kv, S, D]   the new tokens' keys and values (after RoPE)
    attend(q)      q: [H_q, S, D]       -> [H_q, S, D] attention output of the S newest tokens

so where the keys live (one tensor, or device / host / disk tiers) and which of
them are attended (all, or a selected subset) is the cache's business, not the
model's. `KVCache` groups the layers and keeps the shared token count.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Any, Protocol

import torch

from offload.attention import SparsePolicy, TieredLayer, gqa_attention
from offload.backend import Backend
from offload.errors import OffloadError
from offload.graphs import DecodeStep, DensePlan
from offload.pipeline import Prefetcher
from offload.tiered_step import TieredPlan
from storage.closing import close_when_collected
from storage.device import CONTEXT_GROWTH, Growable
from storage.tiered import TieredStore


class CacheLayer(Protocol):
    """(A fixed-shape step's layer has `rope_store(qkv, cos, sin) -> q` instead of
    `append`: RoPE and its K/V write in one launch, `Attention.forward`.)"""

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None: ...

    def attend(self, q: torch.Tensor) -> torch.Tensor: ...


class DenseLayer:
    """All keys and values of one layer in two growable tensors `[H_kv, T, D]`, which
    grow past `most` tokens only when asked for more (a device cache's budget)."""

    def __init__(
        self, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device, most: int | None = None
    ):
        self.k = Growable((num_kv_heads, 0, head_dim), 1, dtype, device, most)
        self.v = Growable((num_kv_heads, 0, head_dim), 1, dtype, device, most)

    def as_mirror(self, most: int | None) -> DenseLayer:
        """Made the device mirror of a tiered cache's layer: it grows with the whole
        context, by an eighth as the summaries do (within what `offload plan` counts),
        never past `most` tokens (the model's window)."""
        for g in (self.k, self.v):
            g.most, g.growth = most, CONTEXT_GROWTH
        return self

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k.append(k)
        self.v.append(v)

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        return gqa_attention(q, self.k.view(), self.v.view())

    @property
    def capacity(self) -> int:
        return self.k.data.shape[1]

    def reserve(self, num_tokens: int, limit: int) -> None:
        """Room for `num_tokens` (grown geometrically, never past `limit` tokens, nor the
        layer's own bound)."""
        self.k.reserve(num_tokens, limit)
        self.v.reserve(num_tokens, limit)

    def commit(self, num_tokens: int) -> None:
        """Count `num_tokens` written by a `DenseStepLayer` (they are in the buffers already)."""
        self.k.length += num_tokens
        self.v.length += num_tokens

    def step_layer(self, pos: torch.Tensor, length: torch.Tensor, backend) -> DenseStepLayer:
        return DenseStepLayer(self, pos, length, backend)

    def truncate(self, num_tokens: int) -> None:
        self.k.truncate(num_tokens)
        self.v.truncate(num_tokens)

    def tier_bytes(self) -> dict[str, int]:
        H, _, D = self.k.data.shape  # (no view: asked after every token, `StepResult`)
        return {"device": 2 * H * self.k.length * D * self.k.data.element_size()}


class DenseStepLayer:
    """A `DenseLayer` inside a fixed-shape decode step (offload/graphs.py): the new K/V go
    to the device position `pos`, attention reads the whole buffers up to the device
    `length`. It reads the layer's buffers when called, so a step captured after they
    grew uses the new ones."""

    def __init__(self, layer: DenseLayer, pos: torch.Tensor, length: torch.Tensor, backend):
        self.layer, self.pos, self.length, self.backend = layer, pos, length, backend

    def rope_store(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The RoPE of the q and k heads of the fused projection's qkv, and the new k
        (rotated) and v written at `pos` (one launch on CUDA) -> rotated q. (Instead of
        `append`: the model calls this where a cache layer has it.)"""
        return self.backend.rope_store(qkv, cos, sin, self.layer.k.data, self.layer.v.data,
                                       self.pos)  # fmt: skip

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        Hq, _, D = q.shape
        k, v = self.layer.k.data, self.layer.v.data
        out = self.backend.decode_attention(q.reshape(k.shape[0], -1, D), k, v, self.length)
        return out.reshape(Hq, 1, D)


class KVCache:
    """One cache layer per model layer, plus the count of tokens they all hold.

    A tiered cache also owns its `TieredStore` (started here, closed by `close`).
    """

    def __init__(
        self, layers: list, store: TieredStore | None = None, policy: SparsePolicy | None = None
    ):
        self.layers = layers
        self.store = store
        self.policy = policy
        self.prefetcher: Prefetcher | None = None  # set by `set_prefetch`
        self.step: DecodeStep | None = None  # set by `use_step`
        # Prefill an empty cache one layer at a time (generate.prefill_by_layer): for a
        # tiered cache whose host tier is not the compute device's memory.
        self.layered_prefill = False
        # On CUDA, the events around each layer's compute in the last layer-by-layer
        # prefill ((start, end) per layer; `generate.layer_times` reads them)
        self.prefill_timeline: list[tuple] = []
        self.num_tokens = 0
        # A device cache with a budget holds at most `device_limit` tokens: before a
        # request would pass it, `outgrow(self)` turns the cache into a tiered one in place
        # (`move_to_tiers`; the Runtime sets both, for mode "auto" on CUDA).
        self.device_limit: int | None = None
        self.outgrow: Callable[[KVCache], None] | None = None
        self._decoding = False  # inside `decoding()`
        self.closed = False
        # A new empty cache like this one (offload/caches.py sets it): a forked child
        # renews a tiered cache it inherited (`KVState.adopt`).
        self.fresh: Callable[[], KVCache] | None = None
        # Where the cache holds a loaded session in the tiers: read it into a state again
        # (that child's `KVState.adopt`; offload/session.py sets it).
        self.reread: Callable[[Any], None] | None = None

    def use_step(self, model, backend: Backend, hit_factor: float | None = None) -> None:
        """Decode through a fixed-shape `DecodeStep` (a CUDA graph when `backend.graphs`);
        over the tiers, with device hit caches of `hit_factor` x the retrieved tokens."""
        if self.store is None:
            plan = DensePlan(self, backend, model.args.max_seq_len)
        else:
            plan = TieredPlan(self, backend, model.args.max_seq_len, hit_factor)
            for layer in self.layers:
                layer.plan = plan
        self.step = DecodeStep(model, plan, backend)

    def flush(self) -> None:
        """Bring the tiers level with the context: fixed-shape steps over the tiered store
        write new tokens to the device only and hand them to the store per chunk."""
        if self.step is not None:
            self.step.plan.flush()

    def mirror_dense_layers(self, device) -> None:
        """Keep the KV of the dense layers (selection.dense_layers) of a tiered cache on
        `device` too: they attend to every token at every step, which must not cross
        PCIe. A mirror that holds fewer tokens than the store is filled from it when
        next used (`TieredLayer.mirror_kv`): after a session is adopted, say, so opening
        one still reads no KV."""
        L = self.store.layout
        for i in range(min(self.policy.selection.dense_layers, len(self.layers))):
            if self.layers[i].mirror is None:  # (`move_to_tiers` keeps the device buffers)
                layer = DenseLayer(L.num_kv_heads, L.head_dim, self.store.dtype, device)
                self.layers[i].mirror = layer.as_mirror(self._window())

    def _window(self) -> int | None:
        """The most tokens a layer of this tiered cache holds (the model's window)."""
        most = self.store.dev[0].max_chunks
        return None if most is None else most * self.store.layout.chunk_size

    def fits(self, num_tokens: int) -> bool:
        """Can this cache hold `num_tokens` on the device? (False for a tiered cache.)"""
        return self.store is None and (self.device_limit is None or num_tokens <= self.device_limit)

    def make_room(self, num_new: int) -> None:
        """Before `num_new` tokens are added: a device cache they would take past its
        limit moves to the tiers first (`outgrow`)."""
        if self.store is None and not self.fits(self.num_tokens + num_new):
            self.outgrow(self)

    def move_to_tiers(self, store: TieredStore, policy: SparsePolicy, mirrors: bool) -> None:
        """Turn this device cache into a tiered cache over the empty `store`, in place:
        each layer's KV goes to the store (host tier, summaries) and its selection index
        is built from its keys while they are still on the device (nothing is read back);
        with `mirrors`, the dense layers keep their device buffers as their mirrors, and
        every other layer's device buffers are freed."""
        assert self.store is None and store.num_tokens == 0
        if self.step is not None:
            self.step.close()
            self.step = None
        old = self.layers
        self._attach(store, policy)
        for i, layer in enumerate(old):
            k, v = layer.k.view(), layer.v.view()
            with store.lock:  # (whole chunks go straight to the host slab, unstaged)
                store.append(i, k, v)
            policy.update_from_keys(store, i, k)
            if mirrors and policy.selectors[i] is None:
                self.layers[i].mirror = layer.as_mirror(self._window())
            old[i] = None  # the device buffers of a sparse layer go now, not at the end
        self.device_limit = self.outgrow = None

    def _attach(self, store: TieredStore, policy: SparsePolicy) -> None:
        store.start()
        self.store, self.policy = store, policy
        self.layers = [TieredLayer(store, policy, i) for i in range(store.layout.num_layers)]
        # Spilled chunk files are removed when the cache is closed or collected (by the
        # collector: on a thread of its own, storage/closing.py says why).
        close_when_collected(self, store.close)

    def decode(self, model, token: int) -> torch.Tensor:
        """Feed one token; return its float32 logits [V]."""
        self.make_room(1)
        if self.step is not None:
            logits = self.step(token, self.num_tokens)
            if logits is not None:
                self.num_tokens += 1
                return logits
        return model(torch.tensor([token], dtype=torch.long, device=model.device), self)[-1]

    def set_prefetch(self, model, mode: str, cache_factor: float = 2.0) -> None:
        """How sparse layers fetch (selection.prefetch): "off" gathers directly; "cache"
        goes through device hit caches of `cache_factor` x the selection per head; "on"
        adds the worker that speculates one layer ahead."""
        assert mode in ("off", "cache", "on"), mode
        assert self.store is not None, "prefetching needs the tiered store"
        self.prefetcher = None
        if mode != "off":
            self.prefetcher = Prefetcher(model, self.store, self.policy, cache_factor, mode == "on")
        for layer in self.layers:
            layer.prefetcher = self.prefetcher
        if self._decoding and self.prefetcher is not None:  # set inside a decode loop
            self.prefetcher.start()

    @contextmanager
    def decoding(self):
        """The span of a decode loop: the prefetch worker runs inside it, and is joined
        (its errors raised) on the way out; the tiers are brought level (`flush`)."""
        self._decoding = True
        if self.prefetcher is not None:
            self.prefetcher.start()
        try:
            yield self
        finally:
            self._decoding = False
            if self.prefetcher is not None:
                self.prefetcher.stop()
            self.flush()

    def layer_start(self, layer: int, x: torch.Tensor, cos, sin) -> None:
        """The model calls this before block `layer` runs on x [S, dim]."""
        if self.prefetcher is not None and x.shape[0] == 1:
            reuse = layer + 1 < len(self.layers) and self.layers[layer + 1].reuses_next_step()
            self.prefetcher.ahead(layer + 1, x, cos, sin, reuse)

    @classmethod
    def tiered(cls, store: TieredStore, policy: SparsePolicy) -> KVCache:
        cache = cls([])
        cache._attach(store, policy)
        return cache

    def close(self) -> None:
        """Close the store (its chunk files deleted) and let go of every buffer, so that a
        closed cache something still refers to (a runtime after `close`, a state replaced
        by a loaded session's) holds no device or host memory: the layers, the step, the
        store's tiers, the index."""
        self.closed = True
        if self.step is not None:
            self.step.close()
        if self.store is not None:
            self.store.close()
            self.store.release()
        if self.policy is not None:
            self.policy.release()
        self.layers, self.step, self.prefetcher = [], None, None

    def check_open(self) -> None:
        """A request or a save on a closed cache is one clear error, not whatever its
        released buffers would raise."""
        if self.closed:
            raise OffloadError(
                "this KV cache was closed (Runtime.close, Conversation.close, or the end of "
                "a `with` block) and holds nothing now: make a new Runtime or chat"
            )

    @classmethod
    def dense(
        cls, num_layers: int, num_kv_heads: int, head_dim: int, dtype, device,
        limit: int | None = None,
    ) -> KVCache:  # fmt: skip
        """All KV on `device`; with `limit`, at most that many tokens (see `make_room`)."""
        layers = [
            DenseLayer(num_kv_heads, head_dim, dtype, device, limit) for _ in range(num_layers)
        ]
        cache = cls(layers)
        cache.device_limit = limit
        return cache

    def advance(self, num_new: int) -> None:
        """Called by the model once every layer has appended `num_new` tokens."""
        self.num_tokens += num_new

    def truncate(self, num_tokens: int) -> None:
        """Drop every token from position `num_tokens` on (reuse a shared prefix)."""
        if num_tokens != self.num_tokens:
            self.restore(num_tokens)

    def restore(self, num_tokens: int) -> None:
        """Every layer holds exactly the first `num_tokens` tokens (at most `num_tokens`),
        whatever it holds now: after a forward pass that stopped partway (an error,
        Ctrl-C), the layers before that point hold more tokens than `num_tokens` says,
        and `truncate` to the same count would keep them."""
        self.flush()
        if self.step is not None:
            self.step.plan.truncate(num_tokens)
        if self.store is not None:
            for layer in self.layers:
                if layer.mirror is not None:  # it may not be filled yet (`mirror_kv`)
                    layer.mirror.truncate(min(num_tokens, layer.mirror.k.length))
            self.store.truncate(num_tokens)
            self.policy.truncate(num_tokens)
            if self.prefetcher is not None:
                self.prefetcher.truncate(num_tokens)
        else:
            for layer in self.layers:
                layer.truncate(num_tokens)
        self.num_tokens = num_tokens

    def forget_index(self) -> None:
        """Drop the selection index (the next prefill rebuilds it from the KV, as after a
        prompt): one that an error or Ctrl-C stopped inside an update may not fit
        together."""
        if self.policy is not None:
            self.policy.truncate(0)

    def finish_prefill(self, progress=None) -> None:
        """Build the selection index once a prefill is done (no-op without tiers)."""
        if self.policy is not None:
            self.policy.build_index(self.store, self.num_tokens, progress)

    def preload_index(self) -> None:
        """Copy the selection index to the device now, where the fixed-shape steps select
        with it (`TieredPlan.preload`): a document just read or a session just loaded,
        which the user is about to ask about, so the first question does not wait for it."""
        if self.store is not None and self.step is not None:
            self.step.plan.preload(self.num_tokens)

    def tier_bytes(self) -> dict[str, int]:
        if self.store is not None:
            return self.store.tier_bytes()
        total: dict[str, int] = {}
        for layer in self.layers:
            for tier, n in layer.tier_bytes().items():
                total[tier] = total.get(tier, 0) + n
        return total
