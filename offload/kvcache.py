"""The cache-layer interface the model calls, and the in-memory dense cache.

Each attention layer is handed one cache-layer object and calls two verbs:

    append(k, v)   k, v: [H_kv, S, D]   the new tokens' keys and values (after RoPE)
    attend(q)      q: [H_q, S, D]       -> [H_q, S, D] attention output of the S newest tokens

so where the keys live (one tensor, or device / host / disk tiers) and which of
them are attended (all, or a selected subset) is the cache's business, not the
model's. `KVCache` groups the layers and keeps the shared token count.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Protocol

import torch

from offload.attention import SparsePolicy, TieredLayer, gqa_attention
from offload.backend import Backend
from offload.graphs import DecodeStep, DensePlan
from offload.pipeline import Prefetcher
from offload.tiered_step import TieredPlan
from storage.device import Growable
from storage.tiered import TieredStore


class CacheLayer(Protocol):
    def append(self, k: torch.Tensor, v: torch.Tensor) -> None: ...

    def attend(self, q: torch.Tensor) -> torch.Tensor: ...


class DenseLayer:
    """All keys and values of one layer in two growable tensors `[H_kv, T, D]`."""

    def __init__(self, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device):
        self.k = Growable((num_kv_heads, 0, head_dim), 1, dtype, device)
        self.v = Growable((num_kv_heads, 0, head_dim), 1, dtype, device)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k.append(k)
        self.v.append(v)

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        return gqa_attention(q, self.k.view(), self.v.view())

    @property
    def capacity(self) -> int:
        return self.k.data.shape[1]

    def reserve(self, num_tokens: int, limit: int) -> None:
        """Room for `num_tokens` (grown geometrically, never past `limit` tokens)."""
        if num_tokens > self.capacity:
            grown = min(max(num_tokens, 2 * self.capacity), max(limit, num_tokens))
            self.k.reserve(grown)
            self.v.reserve(grown)

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
        k = self.k.view()
        return {"device": 2 * k.numel() * k.element_size()}


class DenseStepLayer:
    """A `DenseLayer` inside a fixed-shape decode step (offload/graphs.py): the new K/V go
    to the device position `pos`, attention reads the whole buffers up to the device
    `length`. It reads the layer's buffers when called, so a step captured after they
    grew uses the new ones."""

    def __init__(self, layer: DenseLayer, pos: torch.Tensor, length: torch.Tensor, backend):
        self.layer, self.pos, self.length, self.backend = layer, pos, length, backend

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.layer.k.data.index_copy_(1, self.pos, k)  # k, v: [H_kv, 1, D]
        self.layer.v.data.index_copy_(1, self.pos, v)

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
        self.num_tokens = 0

    def use_step(self, model, backend: Backend) -> None:
        """Decode through a fixed-shape `DecodeStep` (a CUDA graph when `backend.graphs`)."""
        if self.store is None:
            plan = DensePlan(self, backend, model.args.max_seq_len)
        else:
            plan = TieredPlan(self, backend, model.args.max_seq_len)
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
            self.layers[i].mirror = DenseLayer(L.num_kv_heads, L.head_dim, self.store.dtype, device)

    def decode(self, model, token: int) -> torch.Tensor:
        """Feed one token; return its float32 logits [V]."""
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

    @contextmanager
    def decoding(self):
        """The span of a decode loop: the prefetch worker runs inside it, and is joined
        (its errors raised) on the way out; the tiers are brought level (`flush`)."""
        if self.prefetcher is not None:
            self.prefetcher.start()
        try:
            yield self
        finally:
            if self.prefetcher is not None:
                self.prefetcher.stop()
            self.flush()

    def layer_start(self, layer: int, x: torch.Tensor, cos, sin) -> None:
        """The model calls this before block `layer` runs on x [S, dim]."""
        if self.prefetcher is not None and x.shape[0] == 1:
            self.prefetcher.ahead(layer + 1, x, cos, sin)

    @classmethod
    def tiered(cls, store: TieredStore, policy: SparsePolicy) -> KVCache:
        store.start()
        layers = [TieredLayer(store, policy, i) for i in range(store.layout.num_layers)]
        cache = cls(layers, store, policy)
        # Spilled chunk files are removed when the cache is closed or collected.
        weakref.finalize(cache, store.close)
        return cache

    def close(self) -> None:
        if self.step is not None:
            self.step.close()
        if self.store is not None:
            self.store.close()

    @classmethod
    def dense(cls, num_layers: int, num_kv_heads: int, head_dim: int, dtype, device) -> KVCache:
        return cls([DenseLayer(num_kv_heads, head_dim, dtype, device) for _ in range(num_layers)])

    def advance(self, num_new: int) -> None:
        """Called by the model once every layer has appended `num_new` tokens."""
        self.num_tokens += num_new

    def truncate(self, num_tokens: int) -> None:
        """Drop every token from position `num_tokens` on (reuse a shared prefix)."""
        if num_tokens == self.num_tokens:
            return
        self.flush()
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

    def finish_prefill(self, progress=None) -> None:
        """Build the selection index once a prefill is done (no-op without tiers)."""
        if self.policy is not None:
            self.policy.build_index(self.store, self.num_tokens, progress)

    def tier_bytes(self) -> dict[str, int]:
        if self.store is not None:
            return self.store.tier_bytes()
        total: dict[str, int] = {}
        for layer in self.layers:
            for tier, n in layer.tier_bytes().items():
                total[tier] = total.get(tier, 0) + n
        return total
